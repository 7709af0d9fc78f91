"""The command line's two streams (accman.cli), either of which may fail:
stdout (a reader that closed it, a full disk, an I/O error) and stderr.
Neither shows a traceback: a line that stdout does not take is handed
back to the command with the error, which it says on stderr
(commands.stdout_failed); a line that stderr does not take is lost, and
the exit code still says what happened."""

from __future__ import annotations

import logging
import sys

from accman.calling.commands import os_reason, stdout_closed_at_start, stdout_failed
from accman.calling.follow import silence
from accman.errors import StartupError, where


def to_stdout(line: str) -> OSError | None:
    """Writes `line` to stdout; returns None, or the OSError that the write
    raised (stdout_closed_at_start's for a process started with stdout closed),
    with stdout then pointed at /dev/null, so that the flush at exit does
    not fail again and print a traceback."""
    try:
        if sys.stdout is None:          # started with stdout closed: print() drops it
            raise stdout_closed_at_start()
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


def print_result(line: str, code: int) -> int:
    """Prints the result `line` of verify or migrate and returns `code`.  A
    result that stdout does not take goes to stderr, with stdout_failed's
    code in place of a success (a failed check keeps its own)."""
    e = to_stdout(line)
    if e is None:
        return code
    words, lost = stdout_failed(e)
    return say(f"accman: {words}; {line.removeprefix('accman: ')}", code or lost)


def print_ready(line: str) -> None:
    """Prints serve's ready line.  Whoever waits for it (a supervisor, a
    script that reads the port) would wait for ever if stdout lost it: a
    stdout that fails (a full disk) ends the start, StartupError.  One its
    reader closed is a reader that wants no more, and one closed from the
    start has nobody waiting on it: serving goes on, the line on stderr."""
    e = to_stdout(line)
    if e is None:
        return
    if sys.stdout is not None and not isinstance(e, BrokenPipeError):
        raise StartupError(f"cannot write the ready line to stdout: {os_reason(e)}")
    say(f"accman: stdout is closed; {line.removeprefix('accman: ')}", None)


class SaidLines(logging.Handler):
    """AccMan's loggers' warnings (a migration's) as the command's own
    lines, "accman: " first, on stderr, as `accman serve` says them
    (accman.server.say, which the calling side does not import): an
    exception named by its type and place, never its message."""

    def emit(self, record: logging.LogRecord) -> None:
        error = record.exc_info[1] if record.exc_info else None
        say("accman: " + record.getMessage() + (f": {where(error)}" if error else ""), None)


def log_to_stderr() -> None:
    """AccMan's warnings and worse said by SaidLines; nothing when the
    logger has a handler (an application's)."""
    logger = logging.getLogger("accman")
    if not logger.handlers:
        logger.addHandler(SaidLines(logging.WARNING))
        logger.propagate = False        # said once, whatever the root logger has


__all__ = ["to_stdout", "say", "print_result", "print_ready", "log_to_stderr"]
