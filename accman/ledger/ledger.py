"""`Ledger`: the public Python API.  It composes the in-memory book
(accman._ledger), the LevelDB store and the group committer."""

from __future__ import annotations

import asyncio
import threading
from accman.ledger import _ledger
from accman.ledger.commit import Committer, running_loop
from accman.errors import AccManError, BadRequest, NoAccount, Unavailable
from accman.limits import PAST_LIMIT_DEFAULT, PAST_LIMIT_MAX
from accman.records import Entry
from accman.store import Page, page_next
from accman.ledger.leveldb import Store


# What is checked at open, from most to least (see Ledger):
#   full   the files' CRCs (accman.fsck) and every record read through LevelDB
#   heads  the files' CRCs; loading reads each history's newest entry
#   none   only what loading reads (its blocks' checksums still verified)
VERIFY_MODES = ("full", "heads", "none")


def _no_account() -> NoAccount:
    return NoAccount("no account has this cred")


class Ledger:
    """Balances, history and idempotency, durable on LevelDB.

    >>> with Ledger("data") as led:
    ...     led.mod("alice", 1000)          # (tot, seq), durable on return
    ...     led.tot("alice")

    `verify` chooses what open checks (VERIFY_MODES).  "full" (the default)
    and "heads" both check every log record's and table block's CRC-32C
    before LevelDB opens the directory (accman.fsck, ~2 ms per MiB here);
    loading then reads each account's newest history entry (its balance
    and seq); "full" also reads every record through LevelDB (~1 us a
    record), which finds a block that passes its CRC but does not parse.
    "none" checks only what loading reads: for tests of what happens when
    damage is met later.

    Reads answer from memory and show durable state only.  `mod` blocks
    until its batch is on disk; many concurrent mods (threads, or tasks
    through `amod`/`submit`) share one fsync.

    Two attributes are the book's and the committer's own methods, bound
    per instance so that the server's hot paths run no Python frame of
    this class:

    `tot(cred) -> int | None`: the durable balance of `cred`, None for an
    unknown cred.

    `submit(cred, by, min=None, key=None, done=None) -> None`: applies a
    mod in call order; `done(outcome)` is called once it is final, with
    `(tot, seq)` or an AccManError (Insufficient, KeyReused, Overflow,
    NoAccount, Unavailable), after what it depends on is durable.  Raises
    BadRequest, Unavailable or Busy at once, changing nothing.

    The Ledger keeps the store interface (accman/store.py) for the server.
    """

    # accman/store.py: `tot` answers from memory.
    inline_reads = True

    def __init__(self, path: str, *, create: bool = True, verify: str = "full",
                 batch_mods_max: int | None = None, queued_mods_max: int | None = None,
                 store: Store | None = None):
        self.store = store if store is not None else Store(
            path, create=create, check_files=(verify != "none"))
        self.path = self.store.path
        try:
            limits = {}
            if batch_mods_max is not None:
                limits["batch_mods_max"] = batch_mods_max
            if queued_mods_max is not None:
                limits["queued_mods_max"] = queued_mods_max
            self._book = _ledger.Book(self.store.salt, self.store.new_batch,
                                      self.store.get, **limits)
            if verify not in VERIFY_MODES:
                raise ValueError(f"verify must be one of {', '.join(VERIFY_MODES)}")
            if verify == "full":
                self.store.check_all_blocks()
            load = self._book.load
            for hid, tot, seq in self.store.accounts():
                load(hid, tot, seq)
        except BaseException:
            self.store.close()
            raise
        self._committer = Committer(self._book, self.store)
        self._closed = False
        self.tot = self._book.tot
        self.submit = self._committer.submit

    def _refuse_closed(self, *_args):
        raise Unavailable("the ledger is closed")

    # -- reads -------------------------------------------------------------------

    def past(self, cred: str, limit: int = PAST_LIMIT_DEFAULT,
             before: int | None = None) -> list[Entry] | None:
        """Up to `limit` history entries of `cred`, newest first, with seq
        below `before` when it is given; None for an unknown cred."""
        if type(limit) is not int or not 1 <= limit <= PAST_LIMIT_MAX:
            raise BadRequest(f"limit must be an int from 1 to {PAST_LIMIT_MAX}")
        if before is not None and (type(before) is not int or before < 1):
            raise BadRequest("before must be a positive int (a seq)")
        if self._closed:
            self._refuse_closed()
        acct = self._book.account(cred)
        if acct is None:
            return None
        # Durable seq read once: everything up to it is on disk.
        return self._entries(acct.hid, acct.seq, limit, before)

    def _entries(self, hid: bytes, seq: int, limit: int, before: int | None) -> list[Entry]:
        """The page of the history 1..seq (all durable) below `before`."""
        last = seq if before is None else min(seq, before - 1)
        if last < 1:
            return []
        first = max(1, last - limit + 1)
        out = []
        for k, v in self.store.history(hid, first, last):
            by, tot, at, key = _ledger.unpack_history(v)
            out.append(Entry(_ledger.history_key_seq(k), by, tot, at, key))
        return out

    # -- the store interface's reads (accman/store.py) ------------------------------

    def read_tot(self, cred: str, done, ordered: bool = False):
        """The balance as the store interface reads it: `ordered` sees every
        call made before this one (a read pipelined behind mods)."""
        if not ordered:
            tot = self.tot(cred)
            return _no_account() if tot is None else tot
        return self._committer.read_ordered(cred, _ledger.READ_TOT, done)

    def read_past(self, cred: str, limit: int, before: int | None, done,
                  ordered: bool = False):
        """A Page of history, as the store interface reads it."""
        if self._closed:
            self._refuse_closed()
        if not ordered:
            acct = self._book.account(cred)
            if acct is None:
                return _no_account()
            return self._page(acct.hid, acct.seq, limit, before)

        def page_at(seq):
            if isinstance(seq, AccManError):
                return done(seq)
            return done(self._page(self._book.hid_of(cred), seq, limit, before))

        seq = self._committer.read_ordered(cred, _ledger.READ_SEQ, page_at)
        if seq is None or isinstance(seq, AccManError):
            return seq
        return self._page(self._book.hid_of(cred), seq, limit, before)

    def _page(self, hid: bytes, seq: int, limit: int, before: int | None) -> Page:
        entries = self._entries(hid, seq, limit, before)
        return Page(hid.hex(), entries, page_next(entries, limit))

    def __len__(self) -> int:
        """The number of accounts."""
        return len(self._book)

    # -- mods ----------------------------------------------------------------------

    def mod(self, cred: str, by: int, *, min: int | None = None,
            key: str | None = None) -> tuple[int, int]:
        """Adds `by` to the balance of `cred` (creating the account), only
        if the result is >= `min` when given; idempotent under `key`.
        Returns (tot, seq) once durable."""
        if running_loop() is not None:
            # Its completion would be queued to the loop this call blocks,
            # or it would stall every other task on it: both are bugs.
            raise RuntimeError("Ledger.mod blocks: inside an event loop use "
                               "`await led.amod(...)` or `led.submit(...)`")
        box = []
        ready = threading.Event()

        def done(outcome):
            box.append(outcome)
            ready.set()

        self._committer.submit(cred, by, min, key, done)
        ready.wait()
        outcome = box[0]
        if isinstance(outcome, AccManError):
            raise outcome
        return outcome

    def bind_loop(self, loop: asyncio.AbstractEventLoop, deliver=None) -> None:
        """Mods submitted from `loop`'s thread complete on that loop.
        `deliver`, if given, is called there with each batch's list of
        (done, outcome) pairs instead of calling each `done(outcome)`;
        it must tell every `done` its outcome."""
        self._committer.bind_loop(loop, deliver)

    async def amod(self, cred: str, by: int, *, min: int | None = None,
                   key: str | None = None) -> tuple[int, int]:
        """`mod` for asyncio: many concurrent amods share one fsync."""
        loop = asyncio.get_running_loop()
        if self._committer._loop is not loop:
            self.bind_loop(loop)
        fut = loop.create_future()

        def done(outcome):
            if not fut.done():
                fut.set_result(outcome)

        self._committer.submit(cred, by, min, key, done)
        outcome = await fut
        if isinstance(outcome, AccManError):
            raise outcome
        return outcome

    # -- state -------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        """True while the ledger can commit."""
        return not self._closed and self._committer.healthy

    @property
    def stats(self) -> dict:
        c = self._committer
        return {
            "accounts": len(self._book),
            "batches": c.batches,
            "mods": c.mods,
            "fsync_s_total": c.fsync_s_total,
            "checkpoints": self.store.wal.checkpoints,
            "checkpoint_s_total": self.store.wal.checkpoint_s_total,
            "last_batch_mods": c.last_batch_mods,
            "queued_mods": self._book.queued_mods,
            "healthy": self.healthy,
        }

    def drain_samples(self) -> tuple[list[int], list[float]]:
        """Batch sizes and fsync times since the last call (for histograms)."""
        c = self._committer
        with c.lock:
            sizes, times = c.batch_sizes, c.fsync_times_s
            c.batch_sizes, c.fsync_times_s = [], []
        return sizes, times

    def verify(self) -> dict:
        """The full check: every account's history runs 1..seq without gaps,
        each entry's tot is the previous tot plus its by, the last equals
        the account's balance, and every idempotency record names an entry
        with its key.  Raises StoreCorrupt; returns counts."""
        from accman.ledger.verify import verify_store
        return verify_store(self.store)

    def close(self) -> None:
        """Commits what is queued, stops the writer, closes the store."""
        if self._closed:
            return
        self._closed = True
        self.tot = self._refuse_closed
        self._committer.close()
        self.store.close()

    def __enter__(self) -> "Ledger":
        return self

    def __exit__(self, *exc) -> None:
        self.close()


__all__ = ["Ledger", "Entry", "Unavailable"]
