"""LevelDB's descriptors of a store's directory kept close-on-exec: plyvel's
LevelDB (1.22) opens its files without O_CLOEXEC, and a program that an
embedding application starts would hold them (docs/DESIGN.md, "Data at
rest").  Linux only: elsewhere nothing is listed, so none is marked."""

from __future__ import annotations

import os
import time

from accman.ledger import fsck

# Where this process's descriptors are listed (Linux; elsewhere none is marked).
_FD_DIR = "/proc/self/fd"
# A file system stamps times from a clock that moves in ticks (Linux's
# coarse clock: 1 to 10 ms): a directory changed again within the tick of
# a change seen keeps its mtime, so a directory listed within this long of
# its mtime is listed once more, at the first write after it.
_MTIME_TICK_NS = 20_000_000


class CloseOnExec:
    """LevelDB's descriptors of a directory, kept close-on-exec: marked
    after the open, and after a write of LevelDB that opened a new log (its
    memtable full).  A stat a write, a listing when the directory changed,
    and the sweep (a flag read a descriptor, a readlink of those
    inheritable: milliseconds for thousands of connections) only for a new
    log.  A listing costs a stat a table: a change is listed once (and
    once more past its tick), never at every write of a busy moment."""

    def __init__(self, path: str):
        self.path = os.path.realpath(path)
        self._seen_ns = None
        self._again_ns = None   # when a directory listed within its mtime's tick is listed again
        self._logs = None       # LevelDB's logs at the last sweep
        self.after_write()

    def after_write(self) -> None:
        try:
            mtime_ns = os.stat(self.path).st_mtime_ns
            if mtime_ns == self._seen_ns and (
                    self._again_ns is None or time.time_ns() < self._again_ns):
                return
            logs = {name for name in os.listdir(self.path) if fsck.LOG_NAME.match(name)}
        except OSError:         # removed under a closed store: nothing left to mark
            return
        self._seen_ns = mtime_ns
        self._again_ns = (mtime_ns + _MTIME_TICK_NS
                          if time.time_ns() - mtime_ns < _MTIME_TICK_NS else None)
        if self._logs is None or not logs <= self._logs:
            close_on_exec(self.path)
        self._logs = logs


def close_on_exec(path: str) -> int:
    """Marks close-on-exec each descriptor of this process open on `path`
    (a real path) or a file in it; returns how many it marked."""
    try:
        names = os.listdir(_FD_DIR)
    except OSError:
        return 0
    prefix = path.rstrip("/") + "/"
    marked = 0
    for name in names:
        try:
            fd = int(name)
            # Python's own descriptors and uvloop's sockets are close-on-exec
            # already: the cheap flag read first, the path only of the rest.
            if not os.get_inheritable(fd):
                continue
            target = os.readlink(f"{_FD_DIR}/{name}")
            if target == path or target.startswith(prefix):
                os.set_inheritable(fd, False)
                marked += 1
        except OSError:         # closed since the listing (the listing's own, too)
            continue
    return marked
