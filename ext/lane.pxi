# The Lane: the server's way into the book at C speed (SPEC's mods and
# reads, for ext/pipeline.pyx), beside the Python API of the Book that
# every other caller uses.  Included by ledger.pyx, after the Book; no I/O.
#
# A change made through the Lane allocates no outcome and registers no
# callback of its own: its (tot, seq) comes back in an Outcome, with the
# number of the batch it waits for, and the caller's `waiter` (one per
# connection) is registered once on that batch, however many of the
# connection's requests wait for it.  When the batch is durable the
# committer calls waiter(None) on the loop (Unavailable if it failed), and
# the waiter answers every request whose batch number is now durable.


cdef int _register(Book book, object waiter, int64_t* registered, Outcome* out) except -1:
    """out.wait_no from the batch that the book's answer waits for
    (book._wait); `waiter` registered on it, once per batch."""
    cdef Batch wait = book._wait
    if wait is None:
        out.wait_no = 0
        return 0
    out.wait_no = wait.no
    if wait.no != registered[0]:
        wait.done_loop.append((waiter, None))
        registered[0] = wait.no
    return 0


cdef inline int64_t _wall_ms() noexcept nogil:
    """Unix milliseconds, as time.time_ns() // 1_000_000."""
    cdef timespec ts
    clock_gettime(CLOCK_REALTIME, &ts)
    return <int64_t>ts.tv_sec * 1000 + ts.tv_nsec // 1000000


cdef class Lane:
    """Created by the Ledger over its book and committer.  Every call but
    `durable_no`, `failed_no` and `failure` is made between `begin` and
    `end`, on the thread of the committer's bound loop."""

    def __cinit__(self, Book book, committer, tuple failed_details, bint wall_clock):
        """`wall_clock`: the committer's clock is the wall clock (no test's
        clock_ms), read here in C."""
        self.book = book
        self.committer = committer
        self.lock = committer.lock
        self.clock_ms = None if wall_clock else committer.clock_ms
        self.failed_details = failed_details
        self.held = False
        self.closing = False
        self.queued = False

    cdef int begin(self) except -1:
        """Takes the committer's lock for a run of calls, which share one
        clock reading (they arrived in one read of a socket)."""
        assert not self.held, "Lane.begin twice"
        if self.committer._loop is None:
            raise AssertionError("the Lane is used before the ledger is bound to a loop")
        self.at_ms = _wall_ms() if self.clock_ms is None else self.clock_ms()
        self.lock.acquire()
        self.held = True
        self.queued = False
        self.closing = self.committer._closing
        return 0

    cdef int end(self) except -1:
        """Releases the lock; a run that queued a change has the writer
        told (at the end of this loop turn, as Committer.submit does)."""
        if not self.held:
            return 0
        committer = self.committer
        try:
            # Committer._queued has nothing to do while a batch is written
            # or its kick is due: not called then (most runs, under load).
            if self.queued and not (committer._writing or committer._kick_pending):
                committer._queued(None, True)
        finally:
            self.held = False
            self.lock.release()
        return 0

    cdef object mod(self, str cred, int64_t by, object min_, str key, object low,
                    object waiter, int64_t* registered, Outcome* out):
        """A mod of values the wire checked (cred, by != 0, min, key, low
        only with by > 0).  Returns None with (tot, seq) in `out`, or the
        refusal (an AccManError); out.wait_no says whether it waits."""
        cdef Book book = <Book>self.book
        cdef Account acct
        cdef bytes kb = None if key is None else key.encode("ascii")
        assert self.held
        if self.closing:
            out.wait_no = 0
            return NotApplied(self.committer.refusal)
        try:
            acct = book._lookup(cred)
            outcome = book._mod(acct, book._hid, cred, by, min_, kb, low, self.at_ms, out)
        except AccManError as e:       # Busy, Unavailable: nothing changed
            out.wait_no = 0
            return e
        if outcome is None:
            self.queued = True
        elif type(outcome) is tuple:    # a keyed mod's original answer
            out.tot = outcome[0]
            out.seq = outcome[1]
            outcome = None
        _register(book, waiter, registered, out)
        return outcome

    cdef object tot(self, str cred, bint ordered, object waiter, int64_t* registered,
                    Outcome* out):
        """The balance: durable, or `ordered` (a read pipelined behind this
        connection's writes: Book.read_ordered).  None with the balance in
        out.tot, or NoAccount."""
        cdef Book book = <Book>self.book
        cdef Account acct
        out.wait_no = 0
        if not ordered:
            acct = book._find(cred)
            if acct is None or acct.seq == 0:
                return NoAccount("no account has this cred")
            out.tot = acct.tot
            return None
        assert self.held
        acct = book._lookup(cred)
        if acct is None or (acct.seq == 0 and acct.pbatch is None):
            return NoAccount("no account has this cred")
        out.tot = acct.ptot
        book._wait = acct.pbatch
        _register(book, waiter, registered, out)
        return None

    cdef int64_t durable_no(self) noexcept:
        return (<Book>self.book).durable_no

    cdef int64_t failed_no(self) noexcept:
        return (<Book>self.book).failed_no

    cdef object failure(self, bint behind):
        """What a request is told when its batch failed, as the Committer
        tells its callers: the failed batch may have reached the disk
        (Unavailable), unless it was never handed to it; a batch `behind`
        it was never written (NotApplied)."""
        if behind or (<Book>self.book).failed_untried:
            return NotApplied(self.failed_details[1])
        return Unavailable(self.failed_details[0])
