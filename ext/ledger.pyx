# cython: language_level=3
"""The in-memory book: every account's balance, its open holds and its
low-balance threshold; validation of the values; the events; and the
building of the write batches.  No I/O: the store's reads that the book
needs (an idempotency or hold record on disk) come in as a callable, and
batches are handed to the committer, which writes them.

Each account keeps two states:

* durable (`tot`, `seq`): what readers see.  Set only after the batch that
  made it is on disk (`Book.finish`).
* pending (`ptot`, `pseq`): every change applied so far, in arrival order.
  Changes are judged against it (min, overflow), so that many of them can
  share one fsync, and it is thrown away if a commit fails.

Every applied change (a mod, a hold, a settle, an expiry) is one history
entry and one event, in the same batch; its records are in records.pxi,
the holds' rules in holds.pxi.  An account is its history: its balance and
seq are those of its newest entry, found at open with one seek per account.
"""

cimport cython
from cpython.bytearray cimport (PyByteArray_AS_STRING, PyByteArray_FromStringAndSize,
                                PyByteArray_Resize)
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport int64_t, uint32_t, uint64_t, uint8_t
from libc.stdint cimport INT64_MAX as C_INT64_MAX, INT64_MIN as C_INT64_MIN
from libc.string cimport memcmp, memcpy, memset
from posix.time cimport CLOCK_REALTIME, clock_gettime, timespec

from values cimport valid_name

import hashlib
import heapq

from accman.errors import (AccManError, BadRequest, Busy, HoldEnded, Insufficient, KeyReused,
                           NoAccount, NoHold, NotApplied, Overflow, TooManyHolds, Unavailable)
from accman.limits import (BATCH_MODS_MAX, CRED_CHARS_MAX, HOLDS_MAX, HOLDS_PER_ACCOUNT_MAX,
                           INT64_MAX, INT64_MIN, KEY_CHARS_MAX, QUEUED_MODS_MAX)
from accman.store import check_hold, check_int64, check_settle, name_refused

include "records.pxi"
include "changes.pxi"
include "history.pxi"


# --- value checks: the Python API's equivalent of the wire's rules ----------

cdef inline void _check_cred(object cred) except *:
    if type(cred) is not str or not valid_name(<str>cred, CRED_CHARS_MAX):
        raise name_refused("cred", CRED_CHARS_MAX, cred)


cdef inline bytes _key_bytes(object key):
    """The idempotency key as stored, None for none; BadRequest if invalid."""
    if key is None:
        return None
    if type(key) is not str or not valid_name(<str>key, KEY_CHARS_MAX):
        raise name_refused("key", KEY_CHARS_MAX, key)
    return (<str>key).encode("ascii")


cdef inline void _check_int64(object v, str name) except *:
    # accman.store.check_int64, compiled for the mod path, in the same words
    # (a test holds them equal): bool is an int subclass and float is not an
    # amount, both refused.
    if type(v) is not int:
        check_int64(v, name)                # raises, in the same words
    if not (INT64_MIN <= v <= INT64_MAX):
        raise BadRequest(f"{name} must fit in a signed 64-bit integer")


include "accounts.pxi"


# _replay's answer for a key not applied before.
cdef object _NOT_KEYED = object()
READ_TOT = 0
READ_SEQ = 1


cdef class Book:
    """Accounts in memory and the batches that make them durable.

    Not thread-safe by itself: the Ledger calls every method that changes
    it under one lock.  `tot` only reads durable fields, which the writer
    sets under that lock in one step per account, so it needs none."""

    cdef dict by_hid             # hid -> Account: every account
    cdef dict by_cred            # cred -> Account: creds seen since open
    cdef object _hasher          # keyed blake2b, copied per credential
    cdef object _get             # (key bytes) -> stored value or None
    cdef dict pkeys              # hid + key -> PendingKey
    cdef dict holds              # hid + hold:u64 -> Hold: open, or ended in a pending batch
    cdef dict wheel              # expiry second -> {hold id: None} (holds.pxi)
    cdef list wheel_seconds      # a heap of the wheel's seconds
    cdef object due              # book_expire_due's walk: (second, iterator of ids) or None
    cdef readonly list open_batches   # filling batches, oldest first
    cdef readonly Py_ssize_t queued_mods
    cdef readonly Py_ssize_t batch_mods_max
    cdef readonly Py_ssize_t queued_mods_max
    cdef readonly Py_ssize_t open_holds   # pending, as ptot: what HOLDS_MAX bounds
    # Durable, as tot: what a read (/health, /metrics) is told.
    cdef readonly Py_ssize_t open_holds_durable
    cdef readonly Py_ssize_t holds_max
    cdef readonly Py_ssize_t holds_per_account_max
    cdef readonly Py_ssize_t holds_expired
    # Accounts whose first change is durable (seq > 0), as tot: what a read
    # (len, /metrics) is told; by_hid also holds those whose first is pending.
    cdef readonly Py_ssize_t accounts_durable
    cdef readonly int64_t next_event
    cdef public int64_t events_first      # the oldest event kept (the committer trims)
    cdef int64_t events_sealed            # the newest event in a sealed batch
    cdef readonly object low_default
    cdef readonly bint failed
    cdef readonly int64_t durable_no      # the newest batch made durable (finish)
    cdef readonly list unapplied          # durable batches LevelDB does not have yet
    cdef readonly int64_t failed_no       # the batch whose write failed; 0: none
    # The failed batch was never handed to the disk (LevelDB's write of an
    # earlier, durable one had failed): nothing of it applied.
    cdef readonly bint failed_untried
    cdef int64_t last_no                  # the newest batch made
    cdef bytes _hid              # _lookup's hash of a cred not seen before
    cdef Batch _wait             # the batch that _replay's or _judge's answer waits for
    cdef Batch holds_batch       # the newest batch that opened or ended a hold

    def __cinit__(self, bytes salt, get,
                  Py_ssize_t batch_mods_max=BATCH_MODS_MAX,
                  Py_ssize_t queued_mods_max=QUEUED_MODS_MAX,
                  int64_t next_event=1, object low_default=None,
                  Py_ssize_t holds_max=HOLDS_MAX,
                  Py_ssize_t holds_per_account_max=HOLDS_PER_ACCOUNT_MAX):
        self.by_hid = {}
        self.by_cred = {}
        self._hasher = hashlib.blake2b(digest_size=HID_BYTES, key=salt)
        self._get = get
        self.pkeys = {}
        self.holds = {}
        self.wheel = {}
        self.wheel_seconds = []
        self.open_batches = [Batch(1)]
        self.queued_mods = 0
        self.batch_mods_max = batch_mods_max
        self.queued_mods_max = queued_mods_max
        self.open_holds = self.open_holds_durable = 0
        self.holds_max = holds_max
        self.holds_per_account_max = holds_per_account_max
        self.holds_expired = 0
        self.next_event = next_event
        self.events_first = 0
        self.events_sealed = next_event - 1
        if low_default is not None:
            _check_int64(low_default, "low_balance")
        self.low_default = low_default
        self.failed = False
        self.durable_no = 0
        self.unapplied = []
        self.failed_no = 0
        self.failed_untried = False
        self.last_no = 1

    cdef Batch _new_batch(self):
        self.last_no += 1
        return Batch(self.last_no)

    # -- loading --------------------------------------------------------------

    def load(self, bytes hid, int64_t tot, int64_t seq):
        """Adds an account read from the store at open."""
        assert seq > 0, "a stored account has a history"
        self.by_hid[hid] = Account(hid, tot, seq)
        self.accounts_durable += 1

    def load_low(self, bytes hid, int64_t low):
        """An account's low-balance threshold, read at open."""
        (<Account>self.by_hid[hid]).low = low

    def load_hold(self, bytes hid, int64_t hold, int64_t amount, int64_t expires_ms):
        """An open hold, read at open (holds.pxi)."""
        _track_hold(self, self.by_hid[hid], hold, amount, expires_ms)
        self.open_holds_durable += 1

    def __len__(self):
        return self.accounts_durable

    cpdef bytes hid_of(self, str cred):
        h = self._hasher.copy()
        h.update(cred.encode("ascii"))
        return h.digest()

    cdef inline Account _find(self, object cred):
        """The account of a valid cred, or None; caches cred -> account.
        Anything but a str is refused before the cache is asked."""
        if type(cred) is not str:
            _check_cred(cred)
        cdef Account acct = self.by_cred.get(cred)
        if acct is not None:
            return acct
        _check_cred(cred)
        acct = self.by_hid.get(self.hid_of(cred))
        if acct is not None:
            self.by_cred[cred] = acct
        return acct

    # -- reads: durable state only -------------------------------------------

    cpdef object tot(self, object cred):
        """The durable balance of `cred`, or None when it has no durable
        account.  A cred seen before is one dict lookup: no hashing, no
        validation (only valid creds enter the cache)."""
        cdef Account acct = self._find(cred)
        if acct is None or acct.seq == 0:
            return None
        return acct.tot

    cpdef Account account(self, object cred):
        """The account with durable state, or None."""
        cdef Account acct = self._find(cred)
        if acct is None or acct.seq == 0:
            return None
        return acct

    cpdef object read_ordered(self, object cred, int what, object done, bint on_loop):
        """A read pipelined behind writes (SPEC: it sees every earlier mod
        of its connection and none of the later ones): the account's state
        as of this call, which includes every call made before it.  Returns
        it at once when it is durable, NoAccount when there is no account,
        or None when `done` now waits for the account's pending batch.
        `what` is READ_TOT (the outcome is tot) or READ_SEQ (the seq)."""
        cdef Account acct = self._lookup(cred)
        if acct is None or (acct.seq == 0 and acct.pbatch is None):
            return NoAccount("no account has this cred")
        value = acct.ptot if what == READ_TOT else acct.pseq
        if acct.pbatch is None:
            return value
        acct.pbatch.add_done(done, value, on_loop)
        return None

    # -- mods -----------------------------------------------------------------

    cdef inline Account _lookup(self, object cred):
        """The account of `cred`, durable or pending, or None.  A cred not
        seen before is checked and hashed here; its hash is then
        self._hid (the name of a new account).  Anything but a str is
        refused before the cache is asked (a list is not even hashable)."""
        if type(cred) is not str:
            _check_cred(cred)
        cdef Account acct = self.by_cred.get(cred)
        if acct is not None:
            self._hid = acct.hid
            return acct
        _check_cred(cred)
        self._hid = self.hid_of(cred)
        acct = self.by_hid.get(self._hid)
        if acct is not None:
            self.by_cred[cred] = acct
        return acct

    cdef inline int _check_sound(self) except -1:
        """A store that failed to commit answers no change, not even a
        keyed repeat of a durable one: it takes no writes until reopened."""
        if self.failed:
            raise NotApplied("the store failed to commit; the store takes no "
                             "more writes until it is reopened")
        return 0

    cdef inline int _check_room(self) except -1:
        """QUEUED_MODS_MAX bounds the changes queued: checked just before a
        call queues one, so that a call that queues none (a keyed repeat,
        a refusal) is answered while the queue is full."""
        if self.queued_mods >= self.queued_mods_max:
            raise Busy(f"QUEUED_MODS_MAX ({self.queued_mods_max}) changes are waiting "
                       "for the disk; retry shortly")
        return 0

    cpdef object apply(self, object cred, object by, object min_, object key,
                       object done, bint on_loop, int64_t at_ms, object low=None):
        """Applies one mod to the pending state, in call order.

        Returns None when the outcome waits for a batch (`done` is then
        registered on it), or the outcome itself when it is final already
        (the caller delivers it).  Raises BadRequest or NotApplied (Busy
        among them) with nothing changed.  `low`, on a funding mod, sets the account's
        low-balance threshold."""
        cdef Account acct = self._lookup(cred)
        cdef bytes hid = self._hid
        _check_int64(by, "by")
        if by == 0:
            raise BadRequest("by must be non-zero")
        if min_ is not None:
            _check_int64(min_, "min")
        if low is not None:
            _check_int64(low, "low")
            if by < 0:
                raise BadRequest("low is set by a funding mod only (by > 0)")
        cdef bytes kb = _key_bytes(key)
        cdef Outcome out
        outcome = self._mod(acct, hid, cred, by, min_, kb, low, at_ms, &out)
        if outcome is None:
            outcome = (out.tot, out.seq)
        return self._told(outcome, done, on_loop)

    cdef object _told(self, object outcome, object done, bint on_loop):
        """`outcome`, final now; or None once `done` waits for self._wait."""
        if self._wait is None:
            return outcome
        self._wait.add_done(done, outcome, on_loop)
        return None

    cdef object _mod(self, Account acct, bytes hid, object cred, int64_t by, object min_,
                     bytes kb, object low, int64_t at_ms, Outcome* out):
        """A mod of valid values on `acct` (None: `cred` has no account;
        `hid` is its hash either way).  Returns None when it applied, its
        new (tot, seq) in `out`; else its outcome: a refusal, or a keyed
        change's original answer.  Either way self._wait is the batch that
        the answer waits for, None when it is final now.  Raises
        NotApplied (Busy among them) with nothing changed."""
        self._wait = None
        self._check_sound()
        if acct is None and by < 0:
            # SPEC: only the funding side opens accounts.
            return NoAccount("no account has this cred; a charge opens none")
        cdef object outcome
        if kb is not None and acct is not None:
            outcome = self._replay(hid + kb, by, min_, 0)
            if outcome is not _NOT_KEYED:
                return outcome
        outcome = self._judge(acct, by, min_, "mod")
        if outcome is not None:
            return outcome
        self._check_room()
        if acct is None:
            acct = Account(hid)
            self.by_hid[hid] = acct
            self.by_cred[cred] = acct
        cdef Batch batch = self._change(acct, by, at_ms, kb, 0, EV_MOD)
        out.tot = acct.ptot
        out.seq = acct.pseq
        if kb is not None:
            self._keep_key(batch, acct.hid + kb, by, min_, 0, (acct.ptot, acct.pseq))
        if low is not None:
            acct.low = low
            batch.put(LOW_PREFIX + acct.hid, _pack_low(low))
        self._wait = batch
        return None

    cdef object _replay(self, bytes pkid, int64_t by, object min_, int64_t ttl_s):
        """The answer to a change whose key was applied before: its original
        outcome, KeyReused if it differs, or _NOT_KEYED for a new key.
        `ttl_s` 0 is a mod's key, else a hold's.  An original that is not
        durable yet is answered once it is: self._wait is its batch."""
        cdef PendingKey pk = self.pkeys.get(pkid)
        self._wait = None
        if pk is not None:
            if pk.by != by or pk.min_ != min_ or pk.ttl_s != ttl_s:
                outcome = KeyReused("key was used with another route, by, min or ttl")
            else:
                outcome = pk.result
            self._wait = self._pending(pk.batch)
            return outcome
        stored = self._get(KEY_PREFIX + pkid)
        if stored is None:
            return _NOT_KEYED
        seq, sby, stot, smin, sttl = unpack_key(stored)
        if sby != by or smin != min_ or sttl != ttl_s:
            return KeyReused("key was used with another route, by, min or ttl")
        return (seq, stot, seq) if ttl_s else (stot, seq)

    cdef object _judge(self, Account acct, int64_t by, object min_, str what):
        """A refusal (overflow, insufficient) of the change (`what`: "mod"
        or "hold", as its refusal names it) on the pending balance, or None
        when it applies.  A refusal judged on state that is not yet durable
        is told only once it is: self._wait is then that state's batch.

        The balance plus what open holds took must stay in range too: their
        ends give it back, and an expiry cannot be refused."""
        cdef int64_t cur = acct.ptot if acct is not None else 0
        cdef object refusal = None
        self._wait = None
        if (by > 0 and cur > C_INT64_MAX - by) or (by < 0 and cur < C_INT64_MIN - by):
            refusal = Overflow("the balance would leave the signed 64-bit range")
        elif acct is not None and acct.open_holds and acct.held + (cur + by) > INT64_MAX:
            refusal = Overflow("the balance, with what its open holds give back when they "
                               "end, would leave the signed 64-bit range")
        elif min_ is not None and cur + by < <int64_t>min_:
            refusal = Insufficient(cur, what=what, by=by, min_=min_)
        if refusal is not None and acct is not None:
            self._wait = acct.pbatch
        return refusal

    cdef inline Batch _pending(self, Batch batch):
        """`batch` while it is not durable, else None."""
        if batch is None or batch.no <= self.durable_no:
            return None
        return batch

    cdef Batch _change(self, Account acct, int64_t by, int64_t at_ms, bytes kb,
                       int64_t hold, int kind):
        """Applies one change that passed its checks: its entry (its history
        entry and its event, and a low_balance event when it crosses the
        threshold) goes into the filling batch, and the pending balance
        moves on.  `hold` -1 names the hold this entry starts (its own
        seq)."""
        cdef Batch batch = self.open_batches[len(self.open_batches) - 1]
        if batch.nmods >= self.batch_mods_max:
            batch = self._new_batch()
            self.open_batches.append(batch)
        cdef int64_t before = acct.ptot
        acct.ptot += by
        acct.pseq += 1
        acct.pbatch = batch
        if hold == -1:
            hold = acct.pseq
        low = acct.low if acct.low is not None else self.low_default
        cdef bint crossed = low is not None and before >= <int64_t>low > acct.ptot
        _change_put(batch.changes, kind, crossed, acct.hid, acct.pseq, by, acct.ptot,
                    at_ms - batch.last_at, hold, kb)
        batch.last_at = at_ms
        if not batch.first_event:
            batch.first_event = self.next_event
        batch.nevents += 2 if crossed else 1
        self.next_event += 2 if crossed else 1
        batch.touched[acct] = None
        batch.nmods += 1
        self.queued_mods += 1
        return batch

    cdef void _keep_key(self, Batch batch, bytes pkid, int64_t by, object min_,
                        int64_t ttl_s, tuple result) except *:
        """A keyed change's idempotency record, and its pending answer."""
        cdef PendingKey pk = PendingKey()
        n = len(result)
        seq, tot = result[n - 1], result[n - 2]
        batch.put(KEY_PREFIX + pkid, _pack_key(seq, by, tot, min_, ttl_s))
        pk.by = by
        pk.min_ = min_
        pk.ttl_s = ttl_s
        pk.result = result
        pk.batch = batch
        self.pkeys[pkid] = pk
        batch.keys.append(pkid)

    # -- holds (holds.pxi) --------------------------------------------------------

    cpdef object hold(self, object cred, object by, object ttl_s, object min_, object key,
                      object done, bint on_loop, int64_t at_ms):
        """Applies a hold: see holds.pxi, book_hold."""
        return book_hold(self, cred, by, ttl_s, min_, key, done, on_loop, at_ms)

    cpdef object settle(self, object cred, object hold, object use, object done,
                        bint on_loop, int64_t at_ms):
        """Ends a hold: see holds.pxi, book_settle."""
        return book_settle(self, cred, hold, use, done, on_loop, at_ms)

    cpdef Py_ssize_t expire_due(self, int64_t now_ms, Py_ssize_t most):
        """Ends at most `most` holds due by `now_ms`: see holds.pxi."""
        return book_expire_due(self, now_ms, most)

    cpdef object next_expiry_ms(self):
        """When the next open hold is due, or None: the writer's clock."""
        return book_next_expiry_ms(self)

    # -- the writer's side --------------------------------------------------

    cpdef bint has_work(self):
        cdef Batch batch = self.open_batches[0]
        return batch.nmods > 0 or batch.ndeletes > 0

    cpdef void delete(self, bytes key) except *:
        """A record deleted in the filling batch (events past retention)."""
        (<Batch>self.open_batches[len(self.open_batches) - 1]).delete(key)

    cpdef Batch seal(self):
        """Takes the oldest filling batch for writing and notes the pending
        state of each account it touched, which `finish` makes visible.
        Changes that arrive from now on go to a newer batch."""
        cdef Batch batch = self.open_batches.pop(0)
        if not self.open_batches:
            self.open_batches.append(self._new_batch())
        cdef Account acct
        batch.sealed = [(acct, acct.ptot, acct.pseq) for acct in batch.touched]
        batch.touched = None
        if batch.nevents:
            self.events_sealed = batch.first_event + batch.nevents - 1
            if not self.events_first:
                self.events_first = batch.first_event
        if batch.nevents or batch.ndeletes:
            batch.put(EVENTS_META_KEY, _pack_events_meta(self.events_first, self.events_sealed))
        if batch.nevents:
            # Its last part: nothing is put into it after this.
            _changes_block(batch.wal, batch.first_event, batch.nevents, batch.changes)
        return batch

    cpdef void finish(self, Batch batch):
        """The batch is durable (its record in the write-ahead log): its
        balances become visible.  LevelDB gets it after (`applied`)."""
        cdef Account acct
        for acct, tot, seq in batch.sealed:
            if acct.seq == 0:
                self.accounts_durable += 1
            acct.tot = tot
            acct.seq = seq
            if acct.pbatch is batch:
                acct.pbatch = None
        self.queued_mods -= batch.nmods
        assert self.queued_mods >= 0, "a batch finished twice"
        self.open_holds_durable += batch.holds_delta
        assert 0 <= self.open_holds_durable, "a hold ended before it was opened"
        assert batch.no > self.durable_no, "batches are made durable in order"
        self.durable_no = batch.no
        self.unapplied.append(batch)

    cpdef void applied(self, Batch batch):
        """LevelDB has the durable batch: what it stored is read from
        there from now on (idempotency and hold records)."""
        cdef PendingKey pk
        assert self.unapplied and self.unapplied[0] is batch, \
            "batches reach LevelDB in the order they became durable"
        del self.unapplied[0]
        for pkid in batch.keys:
            pk = self.pkeys.get(pkid)
            if pk is not None and pk.batch is batch:
                del self.pkeys[pkid]
        for hold_id in batch.ended:
            h = self.holds.get(hold_id)
            if h is not None and (<Hold>h).end_batch is batch:
                del self.holds[hold_id]

    cpdef list history_tail(self, bytes hid, int64_t first, int64_t last):
        """[(seq, history value)] of hid's entries first..last in the
        durable batches that LevelDB does not have yet: the tail of a page
        of /past.  Under the lock."""
        cdef Batch batch
        out = []
        for batch in self.unapplied:
            out += wal_history(batch.wal, hid, first, last)
        return out

    cpdef list fail(self, Batch batch, bint tried=True):
        """The batch could not be made durable (None: a durable batch could
        not be written to LevelDB, and what follows it cannot be); `tried`
        False: it was never handed to the disk.  Everything pending is
        dropped (what was applied in memory after it depended on it), and
        the book refuses writes from now on.  Returns every batch whose
        callbacks must now be told of the failure, `batch` first."""
        cdef Account acct
        failed = ([batch] if batch is not None else []) + self.open_batches
        if not self.failed:
            self.failed = True
            self.failed_no = (<Batch>failed[0]).no
            self.failed_untried = not tried
        for acct in self.by_hid.values():
            acct.ptot = acct.tot
            acct.pseq = acct.seq
            acct.pbatch = None
        self.pkeys.clear()
        self.open_batches = [self._new_batch()]
        self.queued_mods = 0
        return failed


include "holds.pxi"
include "lane.pxi"
