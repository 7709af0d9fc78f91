"""Group commit: one writer thread makes batches durable, one at a time,
while the next batch fills.

Redis's `appendfsync always` is the precedent: replies wait until the write
is on disk (`beforeSleep`), many of them per fsync.  Here mods are applied to
the book's pending state as they arrive, their records go into the filling
batch's log record, and the writer thread takes that batch, makes it
durable (its synced record in accman.wal, without the GIL), and only then
makes its balances visible and releases its results.  LevelDB gets the
batch behind the replies (accman.ledger.applier).

A failed write is fail-stop, like Redis under `always`: what was applied in
memory cannot be trusted to match the disk, so every mod not yet durable is
answered Unavailable (it may have reached the disk) and the book takes no
more writes until reopened: each is refused as NotApplied.
"""

from __future__ import annotations

import logging
import threading
import time

from accman.errors import NotApplied, StoreError, Unavailable, WriteRefused
from accman.ledger.applier import Applier
from accman.ledger.backtoback import BackToBack
from accman.ledger.fill import Fill
from accman.ledger.events import EVENTS_TRIM_INTERVAL_S, EVENTS_TRIM_INTERVAL_S_MIN
from accman.ledger.clock import wall_ms
from accman.ledger.gate import BEHIND_FAILED_DETAIL, CLOSED_DETAIL, CLOSING_DETAIL, FAILED_DETAIL
from accman.ledger.asynccalls import running_loop
from accman.ledger.housekeeping import Housekeeping
from accman.store import check_done, run_callbacks

log = logging.getLogger("accman.commit")

# Batch-size and fsync-time samples kept for /metrics histograms between two
# reads; 65536 batches is minutes of full load at ~0.3 ms per fsync.
SAMPLES_MAX = 65536


class Committer(Housekeeping):
    """Owns the lock around the book's changes and the writer thread.

    `submit` is called from any thread (the event loop's, or plain threads
    through Ledger.mod); `done` callbacks registered from the bound loop's
    thread run on that loop, one `call_soon_threadsafe` per batch (through
    the loop's `deliver`, see bind_loop); the others run on the writer
    thread."""

    def __init__(self, book, store, events=None, lock=None, clock_ms=None):
        self.book = book
        self.store = store
        self.events = events            # accman.ledger.events.EventLog, or None
        # Unix milliseconds: the time of each change, and the expiry clock.
        self.clock_ms = clock_ms or wall_ms
        self.lock = lock or threading.Lock()
        self._wake = threading.Condition(self.lock)
        # Notified after each batch is durable (or failed): expire_due waits on it.
        self._durable = threading.Condition(self.lock)
        self._writer_idle = False
        self._seal_now = False          # the writer may seal what is queued
        self._at_once = False           # the next write follows the last by the writer's choice
        self._idled = False             # the writer waited before it sealed its batch
        # Whether a write that ends with changes queued is followed at once.
        self.back_to_back = BackToBack()
        # A batch is being written and its completion has not yet been seen
        # by the loop, which kicks then; set by the writer at seal, cleared
        # by the loop (_delivered, for the batch sealed last: the writer may
        # have sealed the next one already) or by the writer when nothing
        # goes there.
        self._writing = False
        self._sealed_no = 0             # the batch the writer sealed last
        self._kick_pending = False
        self._closing = False
        self._clock_refused = False     # the writer's last clock reading was wrong
        self._then = None           # what a close made on the writer runs at its end
        # Set as the writer stops: close waits on it (a ^C in Thread.join marks it ended).
        self._ended = threading.Event()
        # What every change is told once the ledger closes (CLOSING_DETAIL,
        # then CLOSED_DETAIL); None while it is open.
        self.refusal: str | None = None
        self._loop = None
        self._deliver_on_loop = run_callbacks
        self.fill = Fill()              # the loop's side of filling (accman.ledger.fill)
        self.error: StoreError | None = None
        self._untold = None             # the batch sealed whose callers are not told yet
        # Counters for /metrics; read without the lock (ints, set in one step).
        self.batches = 0
        self.mods = 0
        self.fsync_s_total = 0.0
        self.last_batch_mods = 0
        self.batch_sizes: list[int] = []      # drained by metrics readers
        self.fsync_times_s: list[float] = []
        # Retention passes: every EVENTS_TRIM_INTERVAL_S, or the retention
        # itself when shorter, so an event is gone by about twice it; but at
        # most every EVENTS_TRIM_INTERVAL_S_MIN (then by the retention and it).
        self._trim_interval_s = EVENTS_TRIM_INTERVAL_S if events is None else max(
            EVENTS_TRIM_INTERVAL_S_MIN, min(EVENTS_TRIM_INTERVAL_S, events.retention_ms / 1000))
        self._trim_at = time.monotonic() + self._trim_interval_s
        self.applier = Applier(book, store, self.lock, self._store_call)
        self._thread = threading.Thread(target=self._run, name="accman-commit",
                                        daemon=True)
        self._thread.start()

    # -- binding to an event loop ---------------------------------------------

    def bind_loop(self, loop, deliver=None) -> None:
        """Completions of mods submitted from `loop`'s thread run on it:
        `deliver(pairs)` is called there with each batch's list of
        (done, outcome) and must see every `done` told its outcome (by
        default each is called, `done(outcome)`).  A server passes its own
        to answer a whole batch in one call, without a call per mod."""
        with self.lock:
            self._bind(loop, deliver)

    def _bind(self, loop, deliver) -> None:
        if loop is not self._loop:
            # A completion handed to a former loop may never run there, nor
            # a kick due at the end of its turn (the loop stopped in it): what
            # it queued is sealed now, and this loop's mods kick for themselves.
            # Its fill target counted that loop's callers: this one waits for none.
            self._writing = False
            self._kick_pending = False
            self.fill.forget()
            if self.book.has_work():
                self._seal_soon()
        self._loop = loop
        self._deliver_on_loop = deliver or run_callbacks

    def claim_loop(self, loop):
        """Binds `loop` (bind_loop, the default delivery), returning the binding it
        replaced (for give_back), unless another loop still running is bound: None
        then, since its completions would go to a loop whose thread is not this one's."""
        with self.lock:
            if self._loop is not None and self._loop is not loop and self._loop.is_running():
                return None
            former = (self._loop, self._deliver_on_loop)
            self._bind(loop, None)
            return former

    def give_back(self, loop, former) -> None:
        """`former` bound again: the call that claimed `loop` was refused, none made on it."""
        with self.lock:
            if self._loop is loop:
                self._bind(*former)

    # -- the submitting side ---------------------------------------------------

    def submit(self, cred, by, min=None, key=None, done=None, low=None) -> None:  # noqa: A002
        """Applies one mod now, in call order; `done(outcome)` runs once its
        outcome is final and everything it depends on is durable.  (Named
        like Ledger.submit, which is this very method.)"""
        min_ = min
        # Only a call made from inside the bound loop, while it runs, is
        # completed on it; a plain call from the same thread (the loop
        # stopped, or never ran there) is completed directly.
        on_loop = self._loop is not None and running_loop() is self._loop
        at_ms = self.clock_ms()
        with self.lock:
            if self._closing:
                raise NotApplied(self.refusal)
            check_done(done)        # after the closing: a closed ledger says so first
            outcome = self.book.apply(cred, by, min_, key, done, on_loop, at_ms, low)
            self._queued(outcome, on_loop)
        if outcome is not None:
            self._final(done, outcome, on_loop)

    def submit_hold(self, cred, by, ttl_s, min=None, key=None, done=None):  # noqa: A002
        """A hold (ext/holds.pxi), as `submit`; its outcome (hold, tot, seq)."""
        self._change(self.book.hold, (cred, by, ttl_s, min, key), done)

    def submit_settle(self, cred, hold, use, done=None):
        """Ends a hold (ext/holds.pxi), as `submit`; its outcome (tot, seq)."""
        self._change(self.book.settle, (cred, hold, use), done)

    def _change(self, apply, args, done):
        on_loop = self._loop is not None and running_loop() is self._loop
        at_ms = self.clock_ms()
        with self.lock:
            if self._closing:
                raise NotApplied(self.refusal)
            check_done(done)
            outcome = apply(*args, done, on_loop, at_ms)
            self._queued(outcome, on_loop)
        if outcome is not None:
            self._final(done, outcome, on_loop)

    def _queued(self, outcome, on_loop) -> None:
        """Under the lock, after a change: the writer is told, now (a plain
        thread) or at the end of the loop turn."""
        if outcome is None:
                if not on_loop:
                    self._seal_soon()
                elif not self._writing and not self._kick_pending:
                    # Wake the writer once this loop turn has read every
                    # ready socket (call_soon runs after the I/O callbacks),
                    # not on the first mod: otherwise a burst from many
                    # connections commits as a batch of one, then the rest.
                    # While a batch is written, its completion kicks.
                    self._kick_pending = True
                    self._loop.call_soon(self._kick)

    def _final(self, done, outcome, on_loop) -> None:
        """An outcome final at once (a refusal of durable state, a replayed
        key): still delivered asynchronously, so callers see one contract."""
        if done is None:
            return          # nobody to tell, as for an outcome that waits (Batch.add_done)
        if on_loop:
            self._loop.call_soon(done, outcome)
        else:
            done(outcome)

    def _seal_soon(self) -> None:
        """Under the lock: the writer may seal what is queued, woken if idle."""
        self._seal_now = True
        if self._writer_idle:
            self._writer_idle = False
            self._wake.notify()

    def read_ordered(self, cred, what: int, done):
        """A read that sees every call made before it (ext/ledger.pyx,
        Book.read_ordered): its value, NoAccount, or None when `done` waits
        for the account's pending batch."""
        on_loop = self._loop is not None and running_loop() is self._loop
        with self.lock:
            return self.book.read_ordered(cred, what, done, on_loop)

    def _kick(self) -> None:
        """On the loop, at the end of a turn: hands the writer what is
        queued, or waits another turn for the batch to fill (FILL_*)."""
        self._kick_pending = False
        book = self.book
        if self._writing or not book.has_work():
            # A batch being written kicks on completion.  No batch fills
            # meanwhile (what waited was sealed), so the next wait starts
            # afresh, not from this one's start.
            self.fill.stop()
            return
        if self._seal_now:
            # A seal asked for already (by a plain thread, the writer, or a
            # kick that ended a wait) is the writer's to take, however late
            # it wakes: no wait begins on that batch, and no skip is spent
            # on it.  Read without the lock: a seal asked for just after is
            # seen at the next kick (a wait that ran out meanwhile may count
            # a miss; nothing waits longer).
            self.fill.stop()
        elif self.fill.waits(book.queued_mods):
            self._kick_pending = True
            self._loop.call_soon(self._kick)
            return
        with self.lock:
            # The writer may not be waiting yet (it has just handed over a
            # completion); it sees _seal_now before it waits.  A writer that
            # has sealed since the look above takes what queues meanwhile at
            # that batch's end: a seal asked for now would outlive the batch
            # and cost the next one its fill wait.
            if not self._writing:
                self._seal_soon()

    def _delivered(self, pairs: list, nmods: int, no: int) -> None:
        """On the loop: batch `no`'s completions, then the next batch's
        kick, its fill target being the mods in flight at this completion
        (the batch's `nmods`, and those queued since)."""
        with self.lock:
            if no == self._sealed_no:
                self._writing = False
        try:
            self._deliver_on_loop(pairs)
        finally:
            book = self.book
            self.fill.aim(nmods + book.queued_mods, book.batch_mods_max)
            self._kick()
            self.applier.answered()

    # -- the writer thread -------------------------------------------------------

    def _run(self) -> None:
        try:
            self._write_batches()
        except Exception as e:      # a bug: fail-stop, as a disk's error, never a hang
            self._fail_stop(e)
        finally:
            self.applier.stop()
            self._ended.set()
            if self._then is not None:
                try:
                    self._then()
                except StoreError as e:         # no caller is left to raise it to
                    log.error("the store's close after the writer's end failed: %s", e.detail)

    def _write_batches(self) -> None:
        while True:
            batch = self._untold = self._next_batch()
            if batch is None:
                return          # closing, and everything is written
            at_once, self._at_once = self._at_once, False     # _done chose to follow
            t0 = time.perf_counter()
            error, tried = self._write(batch)
            fsync_s = time.perf_counter() - t0
            if error is None and (at_once or self._idled):
                # Timed as one kind or the other; a write sealed at once by
                # another's asking (a plain thread's, work off the loop) is
                # neither chosen nor after a gap.
                self.back_to_back.wrote(at_once, self.store.wal.write_s)
            if not self._done(batch, error, fsync_s, tried):
                # No completion went to the loop, so no kick will come from
                # it (and the loop does not apply it): what the loop queued
                # meanwhile is sealed now, after LevelDB's write that the
                # loop would have made.  With nothing queued no seal is
                # asked for: it would outlive this batch and cost the loop's
                # next one its fill wait.
                self.applier.unanswered()
                with self.lock:
                    self._writing = False
                    if self.book.has_work():
                        self._seal_now = True

    def _next_batch(self):
        """Waits for a batch to seal, and seals it; None once closing with
        nothing left.  Mods submitted on the bound loop are sealed when the
        loop says so (_kick), or when a write ends with them queued and the
        writer follows it at once (accman.ledger.backtoback) or no running
        loop was handed its completions; any other submitter, closing, or
        the writer's own clock (holds due, events past retention) says now."""
        book = self.book
        with self.lock:
            self._idled = False
            while True:
                sleep_s = self._housekeep()
                if self._closing or (self._seal_now and book.has_work()):
                    break
                self._writer_idle = self._idled = True
                self._wake.wait(sleep_s)
            self._writer_idle = False
            self._seal_now = False
            if not book.has_work():
                return None
            self._writing = True
            batch = book.seal()
            self._sealed_no = batch.no
            return batch

    def _write(self, batch) -> tuple:
        """Makes the batch durable (its log record).  Returns (the StoreError
        if it could not, None if it is durable; whether it was handed to the
        disk): not once LevelDB's write of an earlier one failed, whether
        seen here or by the store (WriteRefused: it failed meanwhile, on the
        applier's thread)."""
        if self.applier.error is not None:
            return self.applier.error, False
        error = self._store_call(self.store.write, batch.wal)
        return error, not isinstance(error, WriteRefused)

    def _store_call(self, call, *args):
        try:
            call(*args)
            return None
        except StoreError as e:
            return e
        except Exception as e:
            # A bug, not the disk: still fail-stop.  A writer thread that
            # died here would leave every mod waiting forever.
            log.exception("writing a batch raised")
            return StoreError(f"{self.store.path}: commit failed: "
                              f"unexpected {type(e).__name__}: {e}")

    def _done(self, batch, error, fsync_s, tried) -> bool:
        """A written (or failed; `tried`: handed to the disk) batch: its
        balances visible, its callers told.  True when completions went to
        the loop, which then kicks."""
        book = self.book
        with self.lock:
            if error is None:
                book.finish(batch)
                self.applier.durable()
                # What queued during the write goes to the disk at once
                # where this disk answers such a write much faster than one
                # after a gap (accman.ledger.backtoback); else the loop's
                # kick takes it, once the batch is answered, with what its
                # callers send next (FILL_*).  Looked for before the loop
                # has the replies: what it queues once answered waits for
                # its kick either way.
                if book.has_work() and self.back_to_back.follows():
                    self._seal_now = self._at_once = True
                waiting = () if self.events is None else self.events.append(
                    batch.first_event, batch.nevents, batch.changes,
                    self.applier.lagging_event())
            else:
                self.error = error
                failed = book.fail(batch, tried)
                self._untold = None     # its callers are told below, with the rest
            self._durable.notify_all()
        if error is not None:
            log.error("a batch could not be made durable; the store takes no more "
                      "writes until it is reopened: %s", error.detail)
            self._tell_failed(failed, error, tried)
            return False
        self._count(batch.nmods, fsync_s)
        self._untold = None
        kicks = self._deliver(batch.done_loop, batch.done_direct, batch.nmods, batch.no)
        for loop in waiting:
            self._wake_events(loop)
        return kicks

    def _fail_stop(self, exc: Exception) -> None:
        """The writer ends on a fault of its own: as when a batch cannot be made durable
        (_done), every caller waiting is told, and the ledger takes no more writes."""
        log.exception("the commit writer failed; the store takes no more writes until reopened")
        error = StoreError(f"{self.store.path}: commit failed: unexpected {type(exc).__name__} "
                           f"in the writer: {exc}")
        with self.lock:
            self.error = error
            failed = self.book.fail(self._untold)
            self._untold = None
            self._durable.notify_all()
        self._tell_failed(failed, error)

    def _tell_failed(self, failed: list, error: StoreError, tried: bool = True) -> None:
        """The first batch may have reached the disk (Unavailable) if it was
        `tried`; those behind it (Book.fail) were never handed to it
        (NotApplied)."""
        assert error is not None
        for i, b in enumerate(failed):
            told = ((NotApplied, BEHIND_FAILED_DETAIL) if i or not tried
                    else (Unavailable, FAILED_DETAIL))
            self._deliver(_told(b.done_loop, *told), _told(b.done_direct, *told), b.nmods, b.no)

    def _wake_events(self, loop) -> None:
        """Long polls wait on their own loop, which need not be the bound one (a mod
        from a plain thread wakes an `aevents` too): wake them there."""
        try:
            loop.call_soon_threadsafe(self.events.wake, loop)
        except RuntimeError:
            pass            # the loop is closed: nobody is waiting on it

    def _count(self, nmods: int, fsync_s: float) -> None:
        self.batches += 1
        self.mods += nmods
        self.fsync_s_total += fsync_s
        self.last_batch_mods = nmods
        # Bounded: a metrics reader drains these every scrape; when none does,
        # sampling stops at the bound (the counters above stay exact).
        if len(self.batch_sizes) < SAMPLES_MAX:
            self.batch_sizes.append(nmods)
            self.fsync_times_s.append(fsync_s)

    def _deliver(self, on_loop: list, direct: list, nmods: int, no: int) -> bool:
        """True if the completions went to the loop while it runs, which
        then kicks.  A loop stopped (not closed) runs them when it runs
        again: False, so that the writer seals what queued meanwhile."""
        handed = False
        if on_loop:
            try:
                self._loop.call_soon_threadsafe(self._delivered, on_loop, nmods, no)
                handed = self._loop.is_running()
            except RuntimeError:
                pass        # the loop is closed: nobody is waiting on it
        if direct:
            run_callbacks(direct, BaseException)      # on the writer: it goes on
        return handed

    # -- closing -------------------------------------------------------------------

    def close(self, then=None) -> None:
        """Refuses every change from now on (CLOSING_DETAIL), writes what is queued, then
        stops the writer thread; `then()`, if given, runs once it has stopped.  Called on
        the writer itself (from a completion), it returns at once and `then` runs at the
        writer's end: the store's close must not happen under a writer with batches left."""
        with self.lock:
            self._closing = True
            self.refusal = CLOSING_DETAIL
            self._wake.notify()
            if threading.current_thread() is self._thread:
                self._then = then
                return
        self._ended.wait()
        if then is not None:
            then()

    def closed(self) -> None:
        """The store is closed too: changes are refused as CLOSED_DETAIL."""
        with self.lock:
            self.refusal = CLOSED_DETAIL

    @property
    def healthy(self) -> bool:
        return self.error is None and self.applier.error is None and not self._closing


def _told(callbacks: list, refusal: type, detail: str) -> list:
    """An error of its own for each caller (a raised error gathers its traceback)."""
    return [(done, refusal(detail)) for done, _ in callbacks]
