"""The command line's two streams (accman.cli), either of which may fail:
stdout (a reader that closed it, a full disk, an I/O error) and stderr.
Neither shows a traceback: a line that stdout does not take is handed
back to the command with the error, which it says on stderr
(commands.unprinted); a line that stderr does not take is lost, and
the exit code still says what happened."""

from __future__ import annotations

import sys

from accman.calling.follow import silence


def to_stdout(line: str) -> OSError | None:
    """Writes `line` to stdout; returns None, or the OSError that the write
    raised (BrokenPipeError for a process started with stdout closed), with
    stdout then pointed at /dev/null, so that the flush at exit does not
    fail again and print a traceback."""
    try:
        if sys.stdout is None:          # started with stdout closed: print() drops it
            raise BrokenPipeError
        print(line, flush=True)
        return None
    except OSError as e:
        if sys.stdout is not None:
            silence(sys.stdout)
        return e


def say(line: str | None, code):
    """Writes `line` (if any) to stderr and returns `code`.  A stderr that
    fails too loses the line, not the code, and shows no traceback."""
    if line and sys.stderr is not None:     # print(file=None) would write to stdout
        try:
            print(line, file=sys.stderr, flush=True)
        except OSError:
            silence(sys.stderr)
    return code


__all__ = ["to_stdout", "say"]
