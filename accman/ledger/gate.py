"""A ledger's way from open to closed, as its callers see it: every call is
refused from the start of `close` (CLOSING_DETAIL) and after it
(CLOSED_DETAIL), the same for every method, and the calls that read LevelDB
are counted, so that close waits for the ones in flight before it closes
LevelDB: a read that a close overtook would find LevelDB freed under it
(plyvel checks that a database is open, then reads without the GIL).
"""

from __future__ import annotations

import contextlib
import logging
import threading

from accman.errors import NotApplied, StoreError
from accman.ledger.forked import FORKED_DETAIL

log = logging.getLogger("accman.ledger.gate")

# What every call of a ledger is told from the start of its close, and once
# it has closed.
CLOSING_DETAIL = "the ledger is closing"
CLOSED_DETAIL = "the ledger is closed"
# What a call made inside another of its thread is told (Gate.calling).
NESTED_DETAIL = ("a Ledger call made inside another call of this ledger on this thread (a "
                 "signal handler's, run between two steps of the call it interrupted): that "
                 "call may hold the ledger's lock, which this one would wait for forever; "
                 "make it from another thread, or once the interrupted call has returned")
# What a client is told of a failed commit.  The cause (error.detail) names
# files and OS errors of the server: it goes to the log and to
# Committer.error, never to a client (SPEC "Access").
FAILED_DETAIL = ("the store failed to commit; nothing in this batch was acknowledged, "
                 "and the store takes no more writes until it is reopened")
# What the changes behind that batch are told: applied in memory only, in
# batches never handed to the disk (one batch is written at a time).
BEHIND_FAILED_DETAIL = ("the store failed to commit a batch before this change's, which was "
                        "never written: nothing of it was applied, and the store takes no "
                        "more writes until it is reopened")
FAILED_DETAILS = (FAILED_DETAIL, BEHIND_FAILED_DETAIL)


class Gate:
    """Open, closing, or closed; and the reads in flight."""

    def __init__(self):
        self.refusal: str | None = None     # None while open, else the detail
        self._reads = 0
        # This thread's calls in flight, and a close to run as they end: a
        # close made inside a call (by a signal handler, which runs on the
        # main thread between two steps of whatever it interrupted) cannot
        # wait for that call, nor for a lock the call holds.
        self._mine = _Mine()
        # `with gate.calling:` around a call that takes the ledger's lock or
        # waits for its writer (a class, not a generator: it is on the
        # path of every change made through the Python API).
        self.calling = _Calling(self)
        self._cond = threading.Condition()

    def check(self, *_args, **_kw) -> None:
        """Raises NotApplied unless the ledger is open: a closed ledger
        refuses every call before it does anything."""
        refusal = self.refusal
        if refusal is not None:
            raise NotApplied(refusal)

    @contextlib.contextmanager
    def reading(self):
        """Around a call that reads LevelDB: refused unless open; counted
        until it ends.  Inside `calling`, so that this thread's count
        covers the whole of the read's: a close inside it never waits for
        it."""
        with self.calling:
            with self._cond:
                self.check()
                self._reads += 1
            try:
                yield
            finally:
                with self._cond:
                    self._reads -= 1
                    if not self._reads:
                        self._cond.notify_all()

    def close(self, wait: bool = True) -> bool:
        """Every call is refused as closing from now on.  False when the
        ledger was closing or closed already, once that close has ended if
        `wait`: a close returns with the ledger closed, whichever thread
        began it (its writer, which that close waits for, does not wait,
        nor does a thread inside a call)."""
        with self._cond:
            if self.refusal is not None:
                wait = wait and not self._mine.calls
                while wait and self.refusal == CLOSING_DETAIL:
                    self._cond.wait()
                return False
            self.refusal = CLOSING_DETAIL
            return True

    @contextlib.contextmanager
    def ending(self, rest):
        """Around a close's wait for its writer: interrupted there (^C in
        the join), the close still ends (`rest`), on a thread of its own,
        since a later close waits for this one to end."""
        try:
            yield
        except BaseException:
            if self.refusal == CLOSING_DETAIL:
                threading.Thread(target=_logged, args=(rest,), name="accman-close",
                                 daemon=True).start()
            raise

    def after_my_calls(self, then) -> bool:
        """True if this thread is inside a call: `then` runs as it ends."""
        if not self._mine.calls:
            return False
        self._mine.then = then
        return True

    def wait_reads(self) -> None:
        """Returns once no read is in flight (none starts any more)."""
        with self._cond:
            while self._reads:
                self._cond.wait()

    def closed(self) -> None:
        with self._cond:
            self.refusal = CLOSED_DETAIL
            self._cond.notify_all()

    def forked(self) -> None:
        """In a child after fork() (accman.ledger.forked): every call is
        refused with FORKED_DETAIL, and close does nothing.  The condition
        is a new one: a thread of the parent may have held it at the fork."""
        self._cond = threading.Condition()
        self._reads = 0
        self.refusal = FORKED_DETAIL


def _logged(close) -> None:
    try:
        close()
    except StoreError as e:     # no caller is left to raise it to
        log.error("the store's close after an interrupted close failed: %s", e.detail)


class _Mine(threading.local):
    """A thread's calls in flight (Gate.calling), and the close to run as
    the last one ends."""
    calls = 0
    then = None


class _Calling:
    """Gate.calling: counted for this thread until it ends, when a close
    made inside it runs (Gate.after_my_calls); refused inside another."""

    __slots__ = ("_mine",)

    def __init__(self, gate: Gate):
        self._mine = gate._mine

    def __enter__(self) -> None:
        # A call inside another of this thread is a signal handler's (or a
        # finalizer's): refused, whatever the interrupted call, rather than
        # hang when that call holds the lock.  The count is read once, as
        # the increment alone reads it.
        mine = self._mine
        calls = mine.calls
        if calls:
            raise RuntimeError(NESTED_DETAIL)
        mine.calls = calls + 1

    def __exit__(self, *_exc) -> None:
        mine = self._mine
        mine.calls -= 1
        if mine.calls or mine.then is None:
            return
        then, mine.then = mine.then, None
        try:
            then()
        except StoreError as e:     # the close's failure, not this call's
            log.error("the store's close after a call failed: %s", e.detail)
