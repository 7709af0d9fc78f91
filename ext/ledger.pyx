# cython: language_level=3
"""The in-memory book: every account's balance, validation of mod values,
and the building of LevelDB write batches.  No I/O: the store's reads that
the book needs (an idempotency record on disk) come in as a callable, and
batches are handed to the committer, which writes them.

Each account keeps two states:

* durable (`tot`, `seq`): what readers see.  Set only after the batch that
  made it is on disk (`Batch.finish`).
* pending (`ptot`, `pseq`): every mod applied so far, in arrival order.  Mods
  are judged against it (min, overflow), so that many mods of one account can
  share one fsync, and it is thrown away if a commit fails.

On-disk records (all integers big-endian, every value starts with its format
version so that a later format can migrate):

    b"h" + hid + seq:uint64     -> ver, by:int64, tot:int64, at_ms:int64, key ascii
    b"k" + hid + key ascii      -> ver, seq:int64, by:int64, tot:int64, has_min:u8, min:int64

An account is its history: its balance and seq are those of its newest
entry, found at open with one seek per account (accman.store).  Store format
1 also kept a b"a" + hid -> ver, tot, seq record per account, rewritten in
every batch that touched it; it doubled LevelDB's work per mod, and format
2 drops it (the store migrates a format-1 directory at open).

`hid` is a keyed BLAKE2b-128 of the credential (the key is random per data
directory): the credential never appears in the data files.
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_Resize
from cpython.bytes cimport PyBytes_FromStringAndSize, PyBytes_AS_STRING
from libc.stdint cimport int64_t, uint64_t, uint8_t
from libc.string cimport memcpy

from values cimport valid_name

import hashlib

from accman.errors import (BadRequest, Busy, Insufficient, KeyReused, NoAccount,
                           Overflow, Unavailable)
from accman.limits import (BATCH_MODS_MAX, CRED_CHARS_MAX, INT64_MAX,
                           INT64_MIN, KEY_CHARS_MAX, QUEUED_MODS_MAX)

FORMAT_VERSION = 1
HID_BYTES = 16
ACCOUNT_PREFIX = b"a"            # format 1 only (see pack_account)
HISTORY_END = b"i"               # sorts after every history key
HISTORY_PREFIX = b"h"
KEY_PREFIX = b"k"

DEF ACCOUNT_VALUE_BYTES = 17      # ver + tot + seq
DEF HISTORY_VALUE_BYTES = 25      # ver + by + tot + at (+ key)
DEF KEY_VALUE_BYTES = 34          # ver + seq + by + tot + has_min + min
DEF HISTORY_KEY_BYTES = 25        # "h" + hid + seq


# --- big-endian packing, without struct's per-call format parsing ----------

cdef inline void _put64(char *p, int64_t v) noexcept nogil:
    cdef uint64_t u = <uint64_t>v
    cdef int i
    for i in range(8):
        p[7 - i] = <char>(u & 0xFF)
        u >>= 8


cdef inline int64_t _get64(const unsigned char *p) noexcept nogil:
    cdef uint64_t u = 0
    cdef int i
    for i in range(8):
        u = (u << 8) | p[i]
    return <int64_t>u


# Format 1's account records: written only by tests that build a format-1
# store, read only by the migration that checks and removes them.
cpdef bytes pack_account(int64_t tot, int64_t seq):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, ACCOUNT_VALUE_BYTES)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = FORMAT_VERSION
    _put64(p + 1, tot)
    _put64(p + 9, seq)
    return out


cpdef tuple unpack_account(bytes value):
    """-> (tot, seq); ValueError when the record is not a version-1 account."""
    if len(value) != ACCOUNT_VALUE_BYTES or value[0] != FORMAT_VERSION:
        raise ValueError("account record of unknown format")
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(value)
    return (_get64(p + 1), _get64(p + 9))


cpdef bytes history_key(bytes hid, int64_t seq):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HISTORY_KEY_BYTES)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = b"h"
    memcpy(p + 1, PyBytes_AS_STRING(hid), HID_BYTES)
    _put64(p + 17, seq)
    return out


cpdef int64_t history_key_seq(bytes key):
    return _get64(<const unsigned char *>PyBytes_AS_STRING(key) + 17)


cdef bytes _pack_history(int64_t by, int64_t tot, int64_t at_ms, bytes key):
    cdef Py_ssize_t klen = len(key) if key is not None else 0
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HISTORY_VALUE_BYTES + klen)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = FORMAT_VERSION
    _put64(p + 1, by)
    _put64(p + 9, tot)
    _put64(p + 17, at_ms)
    if klen:
        memcpy(p + HISTORY_VALUE_BYTES, PyBytes_AS_STRING(key), klen)
    return out


cpdef tuple unpack_history(bytes value):
    """-> (by, tot, at_ms, key or None); ValueError for an unknown format."""
    cdef Py_ssize_t n = len(value)
    if n < HISTORY_VALUE_BYTES or value[0] != FORMAT_VERSION:
        raise ValueError("history record of unknown format")
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(value)
    key = value[HISTORY_VALUE_BYTES:].decode("ascii") if n > HISTORY_VALUE_BYTES else None
    return (_get64(p + 1), _get64(p + 9), _get64(p + 17), key)


cdef bytes _pack_key(int64_t seq, int64_t by, int64_t tot, object min_):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, KEY_VALUE_BYTES)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = FORMAT_VERSION
    _put64(p + 1, seq)
    _put64(p + 9, by)
    _put64(p + 17, tot)
    p[25] = 0 if min_ is None else 1
    _put64(p + 26, 0 if min_ is None else <int64_t>min_)
    return out


cpdef tuple unpack_key(bytes value):
    """-> (seq, by, tot, min or None); ValueError for an unknown format."""
    if len(value) != KEY_VALUE_BYTES or value[0] != FORMAT_VERSION:
        raise ValueError("idempotency record of unknown format")
    cdef const unsigned char *p = <const unsigned char *>PyBytes_AS_STRING(value)
    min_ = _get64(p + 26) if p[25] else None
    return (_get64(p + 1), _get64(p + 9), _get64(p + 17), min_)


# --- value checks: the Python API's equivalent of the wire's rules ----------

cdef inline void _check_cred(object cred) except *:
    if type(cred) is not str or not valid_name(<str>cred, CRED_CHARS_MAX):
        raise BadRequest(f"cred must be a string of 1 to {CRED_CHARS_MAX} characters "
                         "from A-Z a-z 0-9 _ -")


cdef inline bytes _key_bytes(object key):
    """The idempotency key as stored, None for none; BadRequest if invalid."""
    if key is None:
        return None
    if type(key) is not str or not valid_name(<str>key, KEY_CHARS_MAX):
        raise BadRequest(f"key must be a string of 1 to {KEY_CHARS_MAX} characters "
                         "from A-Z a-z 0-9 _ -")
    return (<str>key).encode("ascii")


cdef inline void _check_int64(object v, str name) except *:
    # bool is an int subclass and float is not an amount: both refused.
    if type(v) is not int:
        raise BadRequest(f"{name} must be an int, got {type(v).__name__}")
    if not (INT64_MIN <= v <= INT64_MAX):
        raise BadRequest(f"{name} must fit in a signed 64-bit integer")


# --- a batch's records in accman.wal's encoding -----------------------------
# Each put is klen:u8, vlen:u8, key, value.  One byte is enough: the longest
# key is an idempotency record's (1 + 16 + 64 = 81 bytes) and the longest
# value a keyed history entry's (25 + 64 = 89); a longer field is a bug.
DEF WAL_FIELD_BYTES_MAX = 255

cdef inline int _wal_put(bytearray out, bytes k, bytes v) except -1:
    # One resize (amortised: a bytearray over-allocates) and two copies.
    cdef Py_ssize_t kl = len(k), vl = len(v), n = len(out)
    if kl > WAL_FIELD_BYTES_MAX or vl > WAL_FIELD_BYTES_MAX:
        raise AssertionError("a record field too long for the write-ahead log")
    PyByteArray_Resize(out, n + 2 + kl + vl)
    cdef char *p = PyByteArray_AS_STRING(out) + n
    p[0] = <char>kl
    p[1] = <char>vl
    memcpy(p + 2, PyBytes_AS_STRING(k), kl)
    memcpy(p + 2 + kl, PyBytes_AS_STRING(v), vl)
    return 0


cpdef list unpack_wal_puts(const unsigned char[::1] payload):
    """-> [(key, value), ...] of one write-ahead log record's payload, in
    order; ValueError when it does not parse whole."""
    cdef Py_ssize_t i = 0, n = payload.shape[0], kl, vl
    out = []
    while i < n:
        if i + 2 > n:
            raise ValueError("a write-ahead log record ends inside a put's lengths")
        kl = payload[i]
        vl = payload[i + 1]
        i += 2
        if kl == 0 or i + kl + vl > n:
            raise ValueError("a write-ahead log record ends inside a put")
        out.append((bytes(payload[i:i + kl]), bytes(payload[i + kl:i + kl + vl])))
        i += kl + vl
    return out


# --- accounts and batches ---------------------------------------------------

# Not tracked by the garbage collector: a ledger holds one Account per
# account (a million is ordinary), and a full collection walked every one of
# them, ~116 ms per million here, a stall of the whole server whenever it
# ran.  Untracked, the dicts that hold only accounts are untracked too.  This
# is safe because nothing leaves a reference cycle through an Account: its
# only reference that can lead back to it is `pbatch`, which `finish` and
# `fail` clear when that batch is done with.
@cython.no_gc
cdef class Account:
    cdef readonly bytes hid
    cdef readonly int64_t tot       # durable balance
    cdef readonly int64_t seq       # durable history length; 0: not yet durable
    cdef int64_t ptot               # pending balance
    cdef int64_t pseq
    cdef Batch pbatch               # the last batch that changed it

    def __cinit__(self, bytes hid, int64_t tot=0, int64_t seq=0):
        self.hid = hid
        self.tot = self.ptot = tot
        self.seq = self.pseq = seq
        self.pbatch = None

    @property
    def pending(self):
        return (self.ptot, self.pseq)


cdef class Batch:
    """The mods of one durable write.  `wb` is the store's write batch: one
    history record per mod, and one idempotency record per keyed mod."""
    cdef readonly object wb
    cdef readonly Py_ssize_t nmods
    cdef readonly list done_loop        # (callback, outcome), run on the loop
    cdef readonly list done_direct      # (callback, outcome), run by the writer
    cdef readonly bytearray wal
    cdef dict touched                   # Account -> None, in first-touch order
    cdef list sealed                    # (Account, tot, seq) at seal time
    cdef list keys                      # pending-key map entries it owns

    def __cinit__(self, wb):
        self.wb = wb
        self.nmods = 0
        self.done_loop = []
        self.done_direct = []
        self.touched = {}
        self.sealed = None
        self.keys = []
        self.wal = bytearray()

    cdef inline int put(self, bytes k, bytes v) except -1:
        """One record, into the LevelDB batch and the log record alike."""
        self.wb.put(k, v)
        return _wal_put(self.wal, k, v)

    cdef inline void add_done(self, object done, object outcome, bint on_loop):
        if on_loop:
            self.done_loop.append((done, outcome))
        else:
            self.done_direct.append((done, outcome))


cdef class PendingKey:
    """An idempotency key whose mod is applied but not yet durable."""
    cdef int64_t by
    cdef object min_
    cdef tuple result
    cdef Batch batch


# _replay's answer for a key not applied before, and _judge's for a refusal
# that now waits for durable state.
cdef object _NOT_KEYED = object()
cdef object _WAITS = object()
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
    cdef object _new_wb          # () -> a store write batch
    cdef object _get_key         # (key bytes) -> stored value or None
    cdef dict pkeys              # hid + key -> PendingKey
    cdef readonly list open_batches   # filling batches, oldest first
    cdef readonly Py_ssize_t queued_mods
    cdef readonly Py_ssize_t batch_mods_max
    cdef readonly Py_ssize_t queued_mods_max
    cdef readonly bint failed
    cdef bytes _hid              # _lookup's hash of a cred not seen before

    def __cinit__(self, bytes salt, new_wb, get_key,
                  Py_ssize_t batch_mods_max=BATCH_MODS_MAX,
                  Py_ssize_t queued_mods_max=QUEUED_MODS_MAX):
        self.by_hid = {}
        self.by_cred = {}
        self._hasher = hashlib.blake2b(digest_size=HID_BYTES, key=salt)
        self._new_wb = new_wb
        self._get_key = get_key
        self.pkeys = {}
        self.open_batches = [Batch(new_wb())]
        self.queued_mods = 0
        self.batch_mods_max = batch_mods_max
        self.queued_mods_max = queued_mods_max
        self.failed = False

    # -- loading ------------------------------------------------------------

    def load(self, bytes hid, int64_t tot, int64_t seq):
        """Adds an account read from the store at open."""
        self.by_hid[hid] = Account(hid, tot, seq)

    def __len__(self):
        return len(self.by_hid)

    cpdef bytes hid_of(self, str cred):
        h = self._hasher.copy()
        h.update(cred.encode("ascii"))
        return h.digest()

    cdef inline Account _find(self, object cred):
        """The account of a valid cred, or None; caches cred -> account."""
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

    # -- mods -----------------------------------------------------------------

    cdef inline Account _lookup(self, object cred):
        """The account of `cred`, durable or pending, or None.  A cred not
        seen before is checked and hashed here; its hash is then
        self._hid (the name of a new account)."""
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

    cdef inline int _check_writable(self) except -1:
        if self.failed:
            raise Unavailable("the store failed to commit; the ledger takes no "
                              "more writes until it is reopened")
        if self.queued_mods >= self.queued_mods_max:
            raise Busy(f"{self.queued_mods_max} mods are waiting for the disk; "
                       "retry shortly")
        return 0

    cpdef object apply(self, object cred, object by, object min_, object key,
                       object done, bint on_loop, int64_t at_ms):
        """Applies one mod to the pending state, in call order.

        Returns None when the outcome waits for a batch (`done` is then
        registered on it), or the outcome itself when it is final already
        (the caller delivers it).  Raises BadRequest, Unavailable or Busy
        with nothing changed."""
        cdef Account acct = self._lookup(cred)
        cdef bytes hid = self._hid
        _check_int64(by, "by")
        if by == 0:
            raise BadRequest("by must be non-zero")
        if min_ is not None:
            _check_int64(min_, "min")
        cdef bytes kb = _key_bytes(key)
        self._check_writable()
        if acct is None and by < 0:
            # SPEC: only the funding side opens accounts.
            return NoAccount("no account has this cred; a charge opens none")
        cdef object outcome
        if kb is not None and acct is not None:
            outcome = self._replay(hid + kb, by, min_, done, on_loop)
            if outcome is not _NOT_KEYED:
                return outcome
        outcome = self._judge(acct, by, min_, done, on_loop)
        if outcome is _WAITS:
            return None
        if outcome is not None:
            return outcome
        if acct is None:
            acct = Account(hid)
            self.by_hid[hid] = acct
            self.by_cred[cred] = acct
        self._append(acct, by, min_, kb, done, on_loop, at_ms)
        return None

    cdef object _replay(self, bytes pkid, int64_t by, object min_, object done, bint on_loop):
        """The answer to a mod whose key was applied before: its original
        outcome, KeyReused if it differs, or _NOT_KEYED for a new key."""
        cdef PendingKey pk = self.pkeys.get(pkid)
        if pk is not None:
            # The original is applied but not durable: answer with it
            # when its batch is.
            if pk.by != by or pk.min_ != min_:
                outcome = KeyReused("key was used with another by or min")
            else:
                outcome = pk.result
            pk.batch.add_done(done, outcome, on_loop)
            return None
        stored = self._get_key(KEY_PREFIX + pkid)
        if stored is None:
            return _NOT_KEYED
        seq, sby, stot, smin = unpack_key(stored)
        if sby != by or smin != min_:
            return KeyReused("key was used with another by or min")
        return (stot, seq)

    cdef object _judge(self, Account acct, object by, object min_, object done, bint on_loop):
        """A refusal (overflow, insufficient) of the mod on the pending
        balance, or None when it applies.  A refusal judged on state that
        is not yet durable is told only once it is: None is returned and
        `done` registered on that state's batch."""
        cdef int64_t cur = acct.ptot if acct is not None else 0
        cdef object refusal = None
        # In Python ints: int64 + int64 can leave int64.
        new = cur + by
        if not (INT64_MIN <= new <= INT64_MAX):
            refusal = Overflow("the balance would leave the signed 64-bit range")
        elif min_ is not None and new < min_:
            refusal = Insufficient(cur)
        if refusal is not None and acct is not None and acct.pbatch is not None:
            acct.pbatch.add_done(done, refusal, on_loop)
            return _WAITS
        return refusal

    cdef int _append(self, Account acct, int64_t by, object min_, bytes kb, object done,
                     bint on_loop, int64_t at_ms) except -1:
        """The mod applies: its history entry (and key record) into the
        filling batch, the pending balance moved on."""
        cdef Batch batch = self.open_batches[len(self.open_batches) - 1]
        cdef PendingKey pk
        if batch.nmods >= self.batch_mods_max:
            batch = Batch(self._new_wb())
            self.open_batches.append(batch)
        acct.ptot += by
        acct.pseq += 1
        acct.pbatch = batch
        result = (acct.ptot, acct.pseq)
        batch.put(history_key(acct.hid, acct.pseq), _pack_history(by, acct.ptot, at_ms, kb))
        if kb is not None:
            pkid = acct.hid + kb
            batch.put(KEY_PREFIX + pkid, _pack_key(acct.pseq, by, acct.ptot, min_))
            pk = PendingKey()
            pk.by = by
            pk.min_ = min_
            pk.result = result
            pk.batch = batch
            self.pkeys[pkid] = pk
            batch.keys.append(pkid)
        batch.touched[acct] = None
        batch.nmods += 1
        self.queued_mods += 1
        batch.add_done(done, result, on_loop)
        return 0

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

    # -- the writer's side --------------------------------------------------

    cpdef bint has_work(self):
        return (<Batch>self.open_batches[0]).nmods > 0

    cpdef Batch seal(self):
        """Takes the oldest filling batch for writing and notes the pending
        state of each account it touched, which `finish` makes visible.
        Mods that arrive from now on go to a newer batch."""
        cdef Batch batch = self.open_batches.pop(0)
        if not self.open_batches:
            self.open_batches.append(Batch(self._new_wb()))
        cdef Account acct
        batch.sealed = [(acct, acct.ptot, acct.pseq) for acct in batch.touched]
        batch.touched = None
        return batch

    cpdef void finish(self, Batch batch):
        """The batch is durable: its balances become visible."""
        cdef Account acct
        cdef PendingKey pk
        for acct, tot, seq in batch.sealed:
            acct.tot = tot
            acct.seq = seq
            if acct.pbatch is batch:
                acct.pbatch = None
        for pkid in batch.keys:
            pk = self.pkeys.get(pkid)
            if pk is not None and pk.batch is batch:
                del self.pkeys[pkid]
        self.queued_mods -= batch.nmods

    cpdef list fail(self, Batch batch):
        """The batch could not be made durable.  Everything pending is
        dropped (what was applied in memory after it depended on it), and
        the book refuses writes from now on.  Returns every batch whose
        callbacks must now be told `Unavailable`, `batch` first."""
        cdef Account acct
        self.failed = True
        for acct in self.by_hid.values():
            acct.ptot = acct.tot
            acct.pseq = acct.seq
            acct.pbatch = None
        self.pkeys.clear()
        failed = [batch] + self.open_batches
        self.open_batches = [Batch(self._new_wb())]
        self.queued_mods = 0
        return failed
