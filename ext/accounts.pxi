# The book's state per account and per durable write.  Included by
# ledger.pyx, after records.pxi (a batch's puts) and before the Book; no
# I/O: the Book changes them under its lock, and the committer writes a
# sealed Batch and runs its callbacks.
#
# An Account keeps its durable and its pending state (ledger.pyx), a Batch
# the changes of one durable write and the callbacks that wait for it, a
# PendingKey the answer of a keyed change until its batch reaches LevelDB
# (Book.applied): until then the store has no idempotency record to replay.

# Not tracked by the garbage collector: a ledger holds one Account per
# account (a million is ordinary), and a full collection walking every one
# of them stalls the whole server.  Untracked, the dicts that hold only
# accounts are untracked too.  This is safe because nothing leaves a
# reference cycle through an Account: its only reference that can lead back
# to it is `pbatch`, which `finish` and `fail` clear when that batch is done.
@cython.no_gc
cdef class Account:
    cdef readonly bytes hid
    cdef readonly int64_t tot       # durable balance
    cdef readonly int64_t seq       # durable history length; 0: not yet durable
    cdef int64_t ptot               # pending balance
    cdef int64_t pseq
    cdef Batch pbatch               # the last batch that changed it
    cdef readonly object low        # its low-balance threshold, None: the default
    cdef readonly Py_ssize_t open_holds
    # What its open holds took (pending, like ptot), a Python int: it may
    # pass 64 bits.  Their ends return it, so ptot + held stays in range.
    cdef readonly object held

    def __cinit__(self, bytes hid, int64_t tot=0, int64_t seq=0):
        self.hid = hid
        self.tot = self.ptot = tot
        self.seq = self.pseq = seq
        self.pbatch = None
        self.low = None
        self.open_holds = 0
        self.held = 0

    @property
    def pending(self):
        return (self.ptot, self.pseq)


cdef class Batch:
    """The changes of one durable write: `wal`, its log record's payload
    (its puts; at seal, its `changes` as one block: changes.pxi), from
    which LevelDB's write batch is made too.  Its events are ids
    first_event.. (nevents of them).  `no` numbers the batches of a book
    in the order they are made, sealed and made durable: a change that
    waits for this batch waits for `no`."""
    cdef readonly int64_t no
    cdef readonly Py_ssize_t nmods      # changes (history entries) in it
    cdef readonly Py_ssize_t ndeletes   # records it deletes (events past retention)
    cdef readonly list done_loop        # (callback, outcome), run on the loop
    cdef readonly list done_direct      # (callback, outcome), run by the writer
    cdef readonly bytearray wal
    cdef readonly bytearray changes     # an entry per change (changes.pxi)
    cdef readonly int64_t first_event   # 0: none yet
    cdef readonly Py_ssize_t nevents
    cdef int64_t last_at                # the at_ms of the last entry
    cdef dict touched                   # Account -> None, in first-touch order
    cdef list sealed                    # (Account, tot, seq) at seal time
    cdef list keys                      # pending-key map entries it owns
    cdef list ended                     # holds it ends (hold map entries it owns)
    cdef Py_ssize_t holds_delta         # holds it opens less those it ends

    def __cinit__(self, int64_t no):
        self.no = no
        self.nmods = 0
        self.ndeletes = 0
        self.done_loop = []
        self.done_direct = []
        self.touched = {}
        self.sealed = None
        self.keys = []
        self.ended = []
        self.wal = bytearray()
        self.changes = bytearray()
        self.first_event = 0
        self.nevents = 0
        self.holds_delta = 0
        self.last_at = 0

    cdef inline int put(self, bytes k, bytes v) except -1:
        """One record."""
        return _wal_put(self.wal, k, v)

    cdef int delete(self, bytes k) except -1:
        self.ndeletes += 1
        return _wal_delete(self.wal, k)

    cdef inline void add_done(self, object done, object outcome, bint on_loop):
        if done is None:
            return
        if on_loop:
            self.done_loop.append((done, outcome))
        else:
            self.done_direct.append((done, outcome))


cdef class PendingKey:
    """An idempotency key whose change is applied but not yet durable."""
    cdef int64_t by
    cdef object min_
    cdef int64_t ttl_s              # 0: a mod's key; else a hold's
    cdef tuple result
    cdef Batch batch
