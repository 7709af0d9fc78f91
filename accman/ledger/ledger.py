"""`Ledger`: the public Python API of the embedded store.  It composes the
in-memory book (accman.ledger._ledger), the LevelDB store, the group
committer and the event log, and keeps the store interface
(accman/store.py) for the server."""

from __future__ import annotations

import asyncio
import os
import threading

from accman.errors import AccManError, NoAccount, StoreCorrupt, Unavailable
from accman.ledger import _ledger
from accman.ledger.asynccalls import AsyncCalls, running_loop
from accman.ledger.asynccalls import result as _result
from accman.ledger.clock import checked_clock, wall_ms
from accman.ledger.commit import Committer
from accman.ledger.datadir import checked_path
from accman.ledger.events import EventLog, check_kept_after
from accman.ledger.forked import FORKED_DETAIL, inherited, refuse_inherited, track
from accman.ledger.gate import CLOSING_DETAIL, FAILED_DETAILS, Gate
from accman.ledger.leveldb import Store
from accman.ledger.opening import expire_at_open, load_book
from accman.limits import EVENTS_LIMIT_DEFAULT, EVENTS_RETENTION_S_DEFAULT, PAST_LIMIT_DEFAULT
from accman.records import Entry, Event
from accman.store import (Page, check_binding, check_events, check_options, check_past,
                          page_next, told)

# What is checked at open, from most to least (see Ledger):
#   full   the files' CRCs (accman.fsck) and every record read through LevelDB
#   heads  the files' CRCs; loading reads each history's newest entry
#   none   only what loading reads (its blocks' checksums still verified)
VERIFY_MODES = ("full", "heads", "none")


def _no_account() -> NoAccount:
    return NoAccount("no account has this cred")


def _loop_of(call: str, instead: str) -> asyncio.AbstractEventLoop:
    """The running loop, whose long polls `call` waits on or ends there; RuntimeError
    naming `call` and what to do `instead` outside one, before anything is changed."""
    loop = running_loop()
    if loop is None:
        raise RuntimeError(f"{call} needs a running event loop: long polls wait on their "
                           f"loop and are answered there; {instead}")
    return loop


class Ledger(AsyncCalls):
    """Balances, history, holds, idempotency and events, durable on LevelDB.

    >>> with Ledger("data") as led:
    ...     led.mod("alice", 1000)          # (tot, seq), durable on return
    ...     hold, tot, seq = led.hold("alice", -30, 60)
    ...     led.settle("alice", hold, 12)   # 12 spent, 18 back
    ...     led.tot("alice")

    `verify` chooses what open checks (VERIFY_MODES).  "full" (the default)
    and "heads" both check every log record's and table block's CRC-32C
    before LevelDB opens the directory (accman.ledger.fsck); loading then
    reads each account's newest history entry (its balance and seq); "full"
    also reads every record through LevelDB, which finds a block that passes
    its CRC but does not parse.  "none" checks only what loading reads: for
    tests of what happens when damage is met later.

    `low_balance`: the threshold under which an account's balance emits a
    `low_balance` event, for accounts whose funding set none;
    `events_retention_s`: how long events are kept at least (from
    EVENTS_RETENTION_S_API_MIN, a millisecond, to EVENTS_RETENTION_S_MAX);
    `events_kept_after`: an event id after which events are kept whatever
    their age, until `keep_events_after(id)` moves
    it (a webhook's saved cursor; None, the default: the retention alone
    trims); `batch_mods_max`, `queued_mods_max`, `holds_max` and
    `holds_per_account_max` lower the bounds of limits.py (tests);
    `clock_ms`, unix milliseconds, is the clock of changes and expiries.
    A wrong option is ValueError, before the directory is opened or made;
    a call's argument of the wrong type or range is BadRequest naming it.

    Reads answer from memory and show durable state only.  `mod`, `hold`
    and `settle` block until their batch is on disk; many concurrent ones
    (threads, or tasks through `amod`/`submit`) share one fsync.  Holds that
    expired while the ledger was closed end when it opens, before it is
    returned.

    From the start of `close` every method raises NotApplied ("the ledger
    is closing"), and once it has returned, NotApplied ("the ledger is
    closed"); `close` again only waits for the first one to end.  What
    describes the ledger rather than reads it still answers: the properties
    (`healthy` is False) and the metrics' `drain_samples`.

    Two attributes are the book's and the committer's own methods, bound per
    instance so that the server's hot paths run no Python frame of this class:

    `tot(cred) -> int | None`: the durable balance of `cred`, None for an
    unknown cred.

    `submit(cred, by, min=None, key=None, done=None, low=None) -> None`:
    applies a mod in call order; `done(outcome)` is called once it is
    final, with `(tot, seq)` or an AccManError (Insufficient, KeyReused,
    Overflow, NoAccount, Unavailable, NotApplied), after what it depends
    on is durable.  Raises BadRequest or NotApplied (Busy) at once.
    """

    # accman/store.py: `tot` answers from memory; the server keeps the
    # webhook's cursor in a file beside the store (`path`).
    inline_reads = True
    cursors = None

    def __init__(self, path: str, *, create: bool = True, verify: str = "full",
                 batch_mods_max: int | None = None, queued_mods_max: int | None = None,
                 store: Store | None = None, low_balance: int | None = None,
                 events_retention_s: float = EVENTS_RETENTION_S_DEFAULT,
                 holds_max: int | None = None, holds_per_account_max: int | None = None,
                 clock_ms=None, events_kept_after: int | None = None):
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}; got {verify!r}")
        if type(create) is not bool:
            raise ValueError(f"create must be True or False, got {create!r}")
        if clock_ms is not None and not callable(clock_ms):
            raise ValueError(f"clock_ms must be a function returning unix milliseconds, "
                             f"got {clock_ms!r}")
        check_options(low_balance=low_balance, events_retention_s=events_retention_s,
                      batch_mods_max=batch_mods_max, queued_mods_max=queued_mods_max,
                      holds_max=holds_max, holds_per_account_max=holds_per_account_max)
        check_kept_after(events_kept_after)
        if store is not None and not isinstance(store, Store):
            raise ValueError(f"store must be an accman.ledger.leveldb.Store or None, "
                             f"got {type(store).__name__}")
        self._clock_ms = wall_ms if clock_ms is None else checked_clock(clock_ms)
        # A given clock's first reading is the open's one (expire_at_open), taken
        # before the directory is opened or made: one that reads wrong (time.time's
        # seconds) changes nothing.  The wall clock is read once the store is loaded.
        open_ms = None if clock_ms is None else self._clock_ms()
        if store is None:
            refuse_inherited(checked_path(path))
        self.store = store if store is not None else Store(
            path, create=create, check_files=(verify != "none"))
        self.path = self.store.path
        lock = threading.Lock()
        limits = {name: value for name, value in (
            ("batch_mods_max", batch_mods_max), ("queued_mods_max", queued_mods_max),
            ("holds_max", holds_max), ("holds_per_account_max", holds_per_account_max))
            if value is not None}
        try:
            self._events = EventLog.open(self.store, lock, events_retention_s,
                                         events_kept_after)
            self._book = load_book(self.store, self._events, verify, limits, low_balance)
            expire_at_open(self._book, self.store, self._events,
                           wall_ms() if open_ms is None else open_ms)
            self._committer = Committer(self._book, self.store, self._events, lock,
                                        self._clock_ms)
        except BaseException:       # a thread that cannot start too: the lock goes
            self.store.close()
            raise
        self._gate = Gate()
        self._check_open = self._gate.check
        self._reading = self._gate.reading
        self.tot = self._book.tot
        self.submit = self._committer.submit
        # accman/store.py: the server's compiled Pipelines take mods and
        # /tot reads through it, without a Python call per request.
        self.lane = _ledger.Lane(self._book, self._committer, FAILED_DETAILS, clock_ms is None)
        track(self)

    def _forked(self) -> None:
        """In a child after fork(): every call refuses, a kept `submit` and the Lane too."""
        self._gate.forked()
        self.tot = self.submit = self._check_open
        c = self._committer     # a new lock: the parent's writer may have held it
        c.lock, c._closing, c.refusal = threading.Lock(), True, FORKED_DETAIL
        if self.store.db is not None and not self.store.db.closed:
            inherited.add(os.path.realpath(self.store.dir))  # a read-only one's: its copy
        self.store.fork_child()

    # -- reads -------------------------------------------------------------------

    def past(self, cred: str, limit: int = PAST_LIMIT_DEFAULT,
             before: int | None = None) -> list[Entry] | None:
        """Up to `limit` history entries of `cred`, newest first, with seq
        below `before` when it is given; None for an unknown cred."""
        self._check_open()
        check_past(limit, before)
        acct = self._book.account(cred)
        if acct is None:
            return None
        # Durable seq read once: everything up to it is on disk.
        with self._reading():
            return self._entries(acct.hid, acct.seq, limit, before)

    def _entries(self, hid: bytes, seq: int, limit: int, before: int | None) -> list[Entry]:
        """The page of the history 1..seq (all durable) below `before`:
        from LevelDB, and from the book for the durable batch that LevelDB
        may not have yet (taken first: what is not there is in LevelDB)."""
        last = seq if before is None else min(seq, before - 1)
        if last < 1:
            return []
        first = max(1, last - limit + 1)
        with self._committer.lock:
            tail = self._book.history_tail(hid, first, last)
        page = self.store.history(hid, first, last)
        page.update((s, _ledger.unpack_history(v)) for s, v in tail)
        if len(page) != last - first + 1:   # LevelDB's block read short: damage since the open
            missing = [s for s in range(first, last + 1) if s not in page]
            raise StoreCorrupt(f"{self.path}: history entries of seq {missing[0]}..{missing[-1]} "
                               "of a durable account are in no data file; refusing to serve "
                               "them, nothing repaired")
        return [Entry(s, *page[s]) for s in range(last, first - 1, -1)]

    def account_id(self, cred: str) -> str | None:
        """The account's public id (SPEC "Events"), None for an unknown cred."""
        self._check_open()
        acct = self._book.account(cred)
        return None if acct is None else acct.hid.hex()

    def events(self, after: int = 0, limit: int = EVENTS_LIMIT_DEFAULT) -> tuple:
        """(events, next): up to `limit` durable events with ids after
        `after`, oldest first; `next` is the `after` of the next call.
        Raises EventsTrimmed below the retention."""
        self._check_open()
        check_events(after, limit, 0)
        with self._reading():
            return _result(self._events.read(after, limit))

    def __len__(self) -> int:
        """The number of accounts."""
        self._check_open()
        return len(self._book)

    def __bool__(self) -> bool:
        """True, empty or closed: `len` counts accounts, and without this Python
        would take an empty ledger for false (`led = led or Ledger(path)`)."""
        return True

    # -- the store interface's reads (accman/store.py) ------------------------------

    def read_tot(self, cred: str, done, ordered: bool = False):
        """The balance as the store interface reads it: `ordered` sees every
        call made before this one (a read pipelined behind mods)."""
        self._check_open()
        if not ordered:
            tot = self.tot(cred)
            return _no_account() if tot is None else tot
        done = told(done)           # told later: one that cannot be is refused
        return self._committer.read_ordered(cred, _ledger.READ_TOT, done)

    def read_past(self, cred: str, limit: int, before: int | None, done,
                  ordered: bool = False):
        """A Page of history, as the store interface reads it."""
        self._check_open()
        check_past(limit, before)
        if not ordered:
            acct = self._book.account(cred)
            if acct is None:
                return _no_account()
            return self._page(acct.hid, acct.seq, limit, before)
        done = told(done)           # told later: one that cannot be is refused

        def page_at(seq):
            if isinstance(seq, AccManError):
                return done(seq)
            try:
                page = self._page(self._book.hid_of(cred), seq, limit, before)
            except Unavailable as e:        # the ledger closed meanwhile
                page = e
            return done(page)

        seq = self._committer.read_ordered(cred, _ledger.READ_SEQ, page_at)
        if seq is None or isinstance(seq, AccManError):
            return seq
        return self._page(self._book.hid_of(cred), seq, limit, before)

    def _page(self, hid: bytes, seq: int, limit: int, before: int | None) -> Page:
        with self._reading():
            entries = self._entries(hid, seq, limit, before)
        return Page(hid.hex(), entries, page_next(entries, limit))

    def read_events(self, after: int, limit: int, wait_s: float, done):
        """The store interface's /events: at once, or a long poll whose
        `done` is called on the loop.  Only a caller at the end of the
        stream waits: one whose `after` is past the newest event is told at
        once where the stream ends (`next`).  With a `wait_s`, only on a running
        loop (RuntimeError elsewhere, changing nothing)."""
        self._check_open()
        check_events(after, limit, wait_s)
        # Checked whether or not it would wait now: a caller off the loop would
        # otherwise fail only once it reads at the end of the stream.
        loop = None
        if wait_s:
            done = told(done)       # told later: one that cannot be is refused
            loop = _loop_of("read_events with a wait_s", "call it on the loop (or await "
                            "led.aevents), or with wait_s=0")
        events = self._events
        with self._reading():
            with self._committer.lock:
                taken = events.take(after, limit)
                if wait_s and taken == ([], after) and not events.waits_ended:
                    events.wait(loop, after, limit, wait_s, done)
                    return None
            return events.fetch(taken)

    def end_wait(self, done) -> None:
        """The store interface's: the long poll of `done` answered now."""
        self._check_open()
        self._events.end_wait(done)

    def end_waits(self) -> None:
        """Answers every long poll of the running loop now, with what it has, and any
        later one at once (a server that stops calls this: no poll holds it up).  Off a
        running loop, RuntimeError, changing nothing."""
        self._check_open()
        self._events.end_waits(_loop_of("end_waits", "call it on the loop whose polls it "
                                        "ends (loop.call_soon_threadsafe)"))

    # -- changes -----------------------------------------------------------------------

    def submit_hold(self, cred, by, ttl_s, min=None, key=None, done=None):  # noqa: A002
        """The store interface's hold: outcome (hold, tot, seq)."""
        self._check_open()
        return self._committer.submit_hold(cred, by, ttl_s, min, key, done)

    def submit_settle(self, cred, hold, use, done=None):
        """The store interface's settle: outcome (tot, seq)."""
        self._check_open()
        return self._committer.submit_settle(cred, hold, use, done)

    def mod(self, cred: str, by: int, *, min: int | None = None,
            key: str | None = None, low: int | None = None) -> tuple[int, int]:
        """Adds `by` to the balance of `cred` (a positive `by` opens an
        unknown account; a negative one is NoAccount there), only if the
        result is >= `min` when given; idempotent under `key`; a funding mod
        may set the account's low-balance threshold `low`.  Returns
        (tot, seq) once durable."""
        return self._blocking(self._committer.submit, cred, by, min, key, low=low)

    def hold(self, cred: str, by: int, ttl_s: int, *, min: int | None = None,
             key: str | None = None) -> tuple[int, int, int]:
        """Holds -by (by < 0) for ttl_s seconds: it leaves the balance now
        and comes back unless settled (SPEC "Holds").  `min` defaults to 0.
        Returns (hold, tot, seq) once durable."""
        return self._blocking(self._committer.submit_hold, cred, by, ttl_s, min, key)

    def settle(self, cred: str, hold: int, use: int) -> tuple[int, int]:
        """Ends a hold: `use` of it is spent, the rest returns.  Returns
        (tot, seq) once durable; HoldEnded, NoHold as the SPEC says."""
        return self._blocking(self._committer.submit_settle, cred, hold, use)

    def expire_due(self) -> int:
        """Ends the holds due by now and returns once that is durable, with
        how many ended.  The writer does this by itself when a hold is due;
        this is for a caller that must see it done (tests, with `clock_ms`)."""
        self._check_may_block("call `await asyncio.to_thread(led.expire_due)`")
        with self._gate.calling:
            return self._committer.expire_due()

    def _check_not_writer(self) -> None:
        """Refuses a call that waits for the writer, made on the writer (in a completion
        callback): it would wait for ever, and every caller with it."""
        self._check_open()
        if threading.current_thread() is self._committer._thread:
            raise RuntimeError("Ledger calls block: inside a completion callback use "
                               "`led.submit(...)`: this thread is the writer they wait for")

    def _check_may_block(self, instead: str) -> None:
        self._check_not_writer()
        if running_loop() is not None:
            # Its completion would be queued to the loop this call blocks,
            # or it would stall every other task on it: both are bugs.
            raise RuntimeError(f"Ledger calls block: inside an event loop {instead}")

    def _blocking(self, submit, *args, **kw):
        self._check_may_block("use `await led.amod(...)` or `led.submit(...)`")
        box = []
        ready = threading.Event()

        def done(outcome):
            box.append(outcome)
            ready.set()

        with self._gate.calling:
            submit(*args, done=done, **kw)
            ready.wait()
        return _result(box[0])

    def bind_loop(self, loop: asyncio.AbstractEventLoop, deliver=None) -> None:
        """Changes submitted from `loop`'s thread complete on that loop.
        `deliver`, if given, is called there with each batch's list of
        (done, outcome) pairs instead of calling each `done(outcome)`;
        it must tell every `done` its outcome."""
        self._check_open()
        check_binding(loop, deliver)
        with self._gate.calling:
            self._committer.bind_loop(loop, deliver)

    # -- state -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """True while the ledger can commit."""
        return self._gate.refusal is None and self._committer.healthy

    @property
    def failure(self) -> str | None:
        """Why the ledger stopped taking writes, for the operator's log
        (it names files and OS errors: never for a client)."""
        error = self._committer.error or self._committer.applier.error
        return None if error is None else error.detail

    # A client hears the server's own words when this store cannot commit:
    # `failure` names files and OS errors, for the operator's log only.
    unhealthy_detail = None

    @property
    def open_holds(self) -> int:
        """Open holds, as durable: a hold counts once its opening is durable
        and stops once its end is (a read sees durable state only)."""
        return self._book.open_holds_durable

    @property
    def stats(self) -> dict:
        c = self._committer
        book, wal, events = self._book, self.store.wal, self._events
        return {
            "accounts": len(book), "batches": c.batches, "mods": c.mods,
            "fsync_s_total": c.fsync_s_total, "checkpoints": wal.checkpoints,
            "checkpoint_s_total": wal.checkpoint_s_total, "last_batch_mods": c.last_batch_mods,
            "queued_mods": book.queued_mods, "open_holds": book.open_holds_durable,
            "holds_expired": book.holds_expired, "events_last": events.last,
            "events_first": events.first, "events_trimmed": events.trimmed, **c.fill.counts(),
            "healthy": self.healthy, "gave_way_s_total": c.applier.gave_way_s,
            "back_to_back_writes": c.back_to_back.writes}

    def drain_samples(self) -> tuple[list[int], list[float]]:
        """Batch sizes and fsync times since the last call (for histograms)."""
        c = self._committer
        with self._gate.calling, c.lock:
            sizes, times = c.batch_sizes, c.fsync_times_s
            c.batch_sizes, c.fsync_times_s = [], []
        return sizes, times

    def verify(self) -> dict:
        """The full check (accman.ledger.verify): counts, or StoreCorrupt.  Unavailable
        once a write has failed (the log's or LevelDB's): LevelDB is not written after it
        (Store.apply), so its files may lack acknowledged batches until the next open."""
        from accman.ledger.verify import verify_store
        with self._reading():
            applier = self._committer.applier
            applier.apply()
            if applier.error is not None or self.store.wal.broken:
                raise Unavailable("a write of the store failed, so LevelDB's files may lack "
                                  "acknowledged batches and cannot be checked: reopen the "
                                  "ledger, then verify")
            return verify_store(self.store)

    def keep_events_after(self, event_id: int | None) -> None:
        """Events after `event_id` are kept whatever their age; from any thread."""
        self._check_open()
        with self._gate.calling:
            self._events.keep_after(event_id)

    def close(self) -> None:
        """Commits what is queued, stops the writer, waits for the reads in flight, closes
        the store.  Every call made from its start is refused (see the class); a close
        while another runs returns when that one has.  From a completion callback (on the
        writer thread) it returns at once, and the rest happens as the writer ends; from
        inside a call of this thread that takes the lock (a signal handler's), as it ends."""
        if not self._gate.close(wait=threading.current_thread() is not self._committer._thread):
            return
        self.tot = self.submit = self._check_open       # raise from now on
        if not self._gate.after_my_calls(self._close_writer):
            self._close_writer()

    def _close_writer(self) -> None:
        with self._gate.ending(self._close_writer):     # on the writer: the rest at its end
            self._committer.close(then=self._close_store)

    def _close_store(self) -> None:
        """The end of close, once the writer has stopped."""
        try:
            self._gate.wait_reads()
            self._events.refuse_waits(Unavailable(CLOSING_DETAIL))
            self.store.close()
        finally:        # Store.close releases its files even when its checkpoint fails
            self._gate.closed()
            self._committer.closed()

    def __reduce__(self):
        # pickle, copy: a copy (here, or spawned) would lack the writer, the files, the lock.
        raise TypeError("a Ledger belongs to the process that opened it: open one in the "
                        "other process, once this one has closed it (a Ledger is not copied)")

    def __enter__(self) -> "Ledger":
        self._check_open()
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Ledger", "Entry", "Event", "Unavailable"]
