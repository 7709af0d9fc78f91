"""The server's lines for its operator, on stderr.  A reader of stderr that
has gone (a closed pipe) must not stop the server: a line that cannot be
written is dropped, and so are the ones after it."""

from __future__ import annotations

import logging
import os
import sys

from accman.errors import where


def say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        # Later lines, and the interpreter's flush at exit, go nowhere.
        sys.stderr = open(os.devnull, "w")


class SayHandler(logging.Handler):
    """The lines of AccMan's loggers (a store's outage and recovery, a
    failed batch), said as the server's own: "accman: " first, on stderr,
    by `say`.  Installed by `accman serve`; an application that runs the
    server itself configures its own logging."""

    def emit(self, record: logging.LogRecord) -> None:
        # An exception is named by its type and place, never its message nor
        # a traceback, which could quote a credential or a URL.
        try:
            error = record.exc_info[1] if record.exc_info else None
            said = record.getMessage() + (f": {where(error)}" if error is not None else "")
            say("accman: " + said)
        except Exception:
            self.handleError(record)


def log_to_stderr() -> None:
    """AccMan's warnings and errors as the server's lines (without a handler
    Python prints them bare); nothing when the logger has a handler."""
    logger = logging.getLogger("accman")
    if not logger.handlers:
        logger.addHandler(SayHandler(logging.WARNING))
        logger.propagate = False        # said once, whatever the root logger has
