"""The server's lines for its operator, on stderr.  A reader of stderr that
has gone (a closed pipe) must not stop the server: a line that cannot be
written is dropped, and so are the ones after it."""

from __future__ import annotations

import os
import sys


def say(line: str) -> None:
    try:
        print(line, file=sys.stderr, flush=True)
    except (BrokenPipeError, OSError):
        # Later lines, and the interpreter's flush at exit, go nowhere.
        sys.stderr = open(os.devnull, "w")
