"""LevelDB behind the write-ahead log: a durable, answered batch is written
into LevelDB after its replies, off the acknowledgement path (its record is
what makes it durable, and recovery replays it), at most APPLY_LAG_*
behind (accman.ledger.leveldb, which applies them itself past that).
While what LevelDB lacks is small (APPLY_ON_LOOP_MODS_MAX mods), it is
written by the loop once a batch's replies are out (by the writer, for a
batch no loop answers); more waits for the applier thread, which writes
it in a run (APPLY_RUN_MODS, APPLY_RUN_BATCHES), or once it has waited
APPLY_WAIT_S_MAX.  Until LevelDB has a batch, the book keeps what a
reader would look for there (Book.applied, history_tail).

If a write fails, its batch is still durable (the next open replays its
record), but nothing after it can be: `error` is the writer's to fail its
next batch with, as a failed write of the log (accman.ledger.commit)."""

from __future__ import annotations

import logging
import threading

from accman.errors import StoreError
from accman.ledger import background

log = logging.getLogger("accman.commit")

# Waking a thread and handing it the GIL costs more than LevelDB's write of
# at most this many mods, which the loop therefore makes itself (the few
# connections of a light load).
APPLY_ON_LOOP_MODS_MAX = 32
# Each insert into LevelDB's memory misses the CPU's caches, which the
# loop's requests and replies have filled with theirs; in a run of writes
# the later inserts find the structure cached (PERFORMANCE.md).  So more
# waits, and the applier thread writes it once this many mods, or this
# many batches, wait: the loop meanwhile answers and reads, and the disk
# writes the next batches.  Below APPLY_LAG_BATCHES_MAX.
APPLY_RUN_MODS = 1024
APPLY_RUN_BATCHES = 16
# A durable batch waits no longer than this for LevelDB when the load
# stops short of a run.
APPLY_WAIT_S_MAX = 0.05


class Applier:
    """The committer's: `store_call(call)` runs a store call, returning its
    StoreError (or None); `lock` guards the book."""

    def __init__(self, book, store, lock, store_call):
        self.book = book
        self.store = store
        self.lock = lock
        self._store_call = store_call
        self.error: StoreError | None = None
        self._wake = threading.Condition(lock)
        self._pending = False           # a run is due
        self.wait_s_max = APPLY_WAIT_S_MAX
        self._stop = False
        self._marked = store.applied    # the store's applied batches the book knows of
        self._compaction = background.watch(store.level0_files)
        self._thread = threading.Thread(target=self._run, name="accman-apply", daemon=True)
        self._thread.start()

    def durable(self) -> None:
        """Under the lock, on the writer: a batch is durable (the book's
        last unapplied one).  The applier writes a run once enough wait,
        and starts its clock once more wait than the loop writes."""
        waiting = self.book.unapplied
        mods = sum(b.nmods for b in waiting)
        if len(waiting) >= APPLY_RUN_BATCHES or mods >= APPLY_RUN_MODS:
            self._pending = True
            self._wake.notify()
        elif mods - waiting[-1].nmods <= APPLY_ON_LOOP_MODS_MAX < mods:
            self._wake.notify()

    def _small(self) -> bool:
        """Under the lock: what LevelDB lacks is at most
        APPLY_ON_LOOP_MODS_MAX mods."""
        return sum(b.nmods for b in self.book.unapplied) <= APPLY_ON_LOOP_MODS_MAX

    def _small_now(self) -> bool:
        with self.lock:
            return self._small()

    def unanswered(self) -> None:
        """On the writer, after a batch whose completions went to no loop
        (plain threads, housekeeping, a failure): the loop's rule, in its
        place; the next batch waits for it."""
        if self._small_now():
            self.apply()

    def lagging_event(self) -> int | None:
        """Under the lock: the first event id that LevelDB may lack (of the
        oldest durable batch not yet in it), None when it has them all."""
        return next((b.first_event for b in self.book.unapplied if b.nevents), None)

    def answered(self) -> None:
        """On the loop: a batch's replies are out; if what LevelDB lacks is
        small, it is written now, while the next batch may be on its way to
        the disk.  Then the loop gives LevelDB's compaction what it owes it
        (accman.ledger.background)."""
        if self._small_now():
            self.apply()
        if self._compaction is not None:
            self._compaction.give_way()

    @property
    def gave_way_s(self) -> float:
        """The loop's sleeps for LevelDB's compaction, all told."""
        return self._compaction.slept_s if self._compaction is not None else 0.0

    def _run(self) -> None:
        while True:
            with self.lock:
                while not self._stop and self.error is None and not self._pending:
                    if self._small() or self.store.wal.broken:
                        self._wake.wait()       # the loop's, nothing, or nothing to do
                    elif not self._wake.wait(self.wait_s_max):
                        break                   # what waits has waited its longest
                if self._stop or self.error is not None:
                    return
                self._pending = False
            self.apply()
            with self.lock:
                # A small batch made durable during that write may have
                # found it not yet marked, and left its write to this run.
                again = bool(self.book.unapplied) and self._small()
            if again:
                self.apply()

    def apply(self) -> None:
        """The durable batches LevelDB lacks into it, in order
        (Store.apply), from any thread: the loop's, the applier's, the
        writer's when no loop takes its replies, a reader's of LevelDB alone
        (Ledger.verify)."""
        error = self._store_call(self.store.apply)
        book = self.book
        with self.lock:
            if error is None:
                # Batches the store has had applied (here, or by the writer
                # at the lag bound) that the book still keeps.
                applied = self.store.applied
                while book.unapplied and self._marked < applied:
                    book.applied(book.unapplied[0])
                    self._marked += 1
                return
            first = self.error is None
            self.error = error
        if first:
            log.error("a durable batch could not be written to LevelDB; the store takes "
                      "no more writes until it is reopened (the next open replays it): %s",
                      error.detail)

    def stop(self) -> None:
        """After the writer's last batch: the applier ends, and what it had
        not written is written here."""
        with self.lock:
            self._stop = True
            self._wake.notify()
        self._thread.join()
        self.apply()
