"""The HTTP/1.1 server: the wire parser (accman.server._wire, ext/wire.pyx),
connections, routes, replies, tokens and metrics, over a store."""

from accman.server.connection import (LimitsError, Server, ServerLimits,
                                      StartupError, is_loopback, run)

__all__ = ["Server", "ServerLimits", "LimitsError", "StartupError", "is_loopback", "run"]
