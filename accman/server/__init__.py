"""The HTTP/1.1 server over a store (accman/store.py):

    run.py         start-up: checks before the port is bound, descriptors, loop, signals
    undo.py        what a refused start added to --data, taken back
    server.py      the listener, connections, completions, budget, timers, shutdown
    connection.py  one client connection: the only code that touches sockets
    state.py       a connection's states and their transitions
    routes.py      a request in, reply bytes (or a pending Slot) out; access
    replies.py     status lines, headers, bodies
    settings.py    the server's bounds, overridable from the environment
    auth.py        tokens and roles
    metrics.py     /metrics
    _wire          the request parser (ext/wire.pyx), no I/O
"""

from accman.errors import LimitsError, StartupError
from accman.server.run import is_loopback, run
from accman.server.server import Server
from accman.server.settings import ServerLimits

__all__ = ["Server", "ServerLimits", "LimitsError", "StartupError", "is_loopback", "run"]
