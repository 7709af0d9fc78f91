"""A ledger in a child made by fork() (os.fork, multiprocessing's "fork"
start method, a server that forks its workers).  The child has the parent's
memory but none of its other threads: no writer would ever make its
changes durable, and a lock another thread held at the fork stays held.
It shares the parent's file descriptors: a checkpoint written from the
child would name the child's stale place in the parent's write-ahead log,
and the parent's next open would refuse the log after it (StoreCorrupt);
the descriptor of the directory's flock is shared too, so a child that
lives on would keep the directory locked after the parent closes it.

So in the child every ledger open at the fork refuses every call
(Unavailable, FORKED_DETAIL), its close writes and closes nothing of the
store, and the child's copy of the flock's descriptor is closed (the
parent's lock stays: a flock goes with the last descriptor of it).  The
same precedent as accman.calling.sync's fork handler."""

from __future__ import annotations

import os
import weakref

from accman.errors import StoreLocked

FORKED_DETAIL = ("this ledger belongs to the process that opened it, and this process is a "
                 "fork of that one: use the ledger there, or open it in a process started "
                 "afresh (multiprocessing's \"spawn\") once that one has closed it")

# Every ledger of this process, for the fork handler (weak: a ledger dropped
# is no longer handled; one closed is handled and does nothing).
_ledgers: weakref.WeakSet = weakref.WeakSet()
# In a child: the directories whose LevelDB was open at the fork.  LevelDB
# keeps the locks it holds in a table of the process, which the child
# inherits and cannot clear (closing the inherited database would wait for
# the parent's compaction thread, which the child does not have): its own
# open of such a directory would fail on that table, after recovery had
# read and checked the files, with words that blame another process.
inherited: set[str] = set()


def track(ledger) -> None:
    """`ledger._forked()` is called in each child forked from now on."""
    _ledgers.add(ledger)


def refuse_inherited(path: str) -> None:
    """StoreLocked, saying why, for a directory that this process, a
    forked child, inherited open (by any name: `inherited` holds real
    paths)."""
    if os.path.realpath(path) in inherited:
        raise StoreLocked(f"{os.path.abspath(path)}: this process was forked from one that "
                          "had the data directory open, and LevelDB's lock table is that "
                          "process's: open it in a process started afresh "
                          "(multiprocessing's \"spawn\"), or fork before opening it")


def _after_fork_in_child() -> None:
    for ledger in list(_ledgers):
        ledger._forked()


if hasattr(os, "register_at_fork"):         # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_after_fork_in_child)
