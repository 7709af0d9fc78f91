# The Turn: the requests all connections may take in one loop turn, shared
# by every connection's Pipeline.  Included by pipeline.pyx, after its
# constants (PASS_CHARGE_MAX); no I/O.


@cython.final
cdef class Turn:
    """The requests the connections may still take in this loop turn, over
    all connections (TURN_REQUESTS_MAX): a turn stays short however many
    clients flood, so that a new connection or a health check waits a few
    turns at most.  The turn's end, its last grant or its costly reads'
    share spent (`costly`), calls `spent`, which schedules `renew` before
    the connections it held back go on (and counts it)."""

    cdef readonly Py_ssize_t left
    cdef readonly Py_ssize_t size
    cdef object spent
    cdef bint over                  # `spent` was called: once a turn, until renew
    # Near or over the buffered-bytes budget's rest (accman/server/
    # server.py): one request a grant, so that a read is parsed no further
    # than it is taken and its rest stays as bytes the budget counts.
    cdef public bint one_each
    cdef bint costly_taken          # a costly read was answered this turn

    def __cinit__(self, Py_ssize_t size, spent):
        assert size > 0, "a turn takes at least one request"
        self.size = self.left = size
        self.spent = spent

    cdef int _end(self) except -1:
        """The turn's budget has run out, or its share for costly reads:
        `spent`, once a turn (a refund after it can leave some budget, and
        a charge spend it again)."""
        if not self.over:
            self.over = True
            self.spent()
        return 0

    cpdef Py_ssize_t grant(self, Py_ssize_t n) except -1:
        """How many of `n` requests a connection may take now."""
        cdef Py_ssize_t left = self.left
        assert n >= 0, "a grant of a negative number of requests"
        if self.one_each and n > 1:
            n = 1
        if n < left:
            self.left = left - n
            return n
        if left > 0:
            self.left = 0
            self._end()
        return max(left, 0)

    cpdef int charge(self, Py_ssize_t n) except -1:
        """`n` requests' worth more, for a request whose answer is more work
        than one (a /metrics render, a page of /past or /events): the turn
        ends sooner, and the connections after it wait less."""
        cdef Py_ssize_t left = self.left
        assert n >= 0, "a charge of a negative number of requests"
        self.left = left - n
        if left > 0 and self.left <= 0:
            self._end()
        return 0

    cpdef bint costly(self, Py_ssize_t n) except -1:
        """Whether a costly read, one that may cost `n` requests' worth more
        than one (`charge`), is answered now: the turn's first is, and any
        other that leaves a quarter of the turn to cheap requests, so that
        a health check among clients flooding costly reads is answered in
        the turn that reads it.  One that is not ends the turn for costly
        reads (`spent`): they go on in the next."""
        assert n > 0, "a costly read costs more than one request"
        if not self.costly_taken or self.left - n >= self.size // 4:
            self.costly_taken = True
            return True
        self._end()
        return False

    cpdef bint pass_spent(self, Py_ssize_t left_at_start):
        """Whether a connection's pass that began with `left_at_start` left
        has had its share of the turn: its costly answers (`charge`) have
        spent the turn, or PASS_CHARGE_MAX of it; it then goes on after the
        connections waiting behind it."""
        cdef Py_ssize_t left = self.left
        return left < left_at_start and (left < 0 or left_at_start - left >= PASS_CHARGE_MAX)

    cpdef int refund(self, Py_ssize_t n) except -1:
        """Requests granted and not taken."""
        self.left += n
        assert self.left <= self.size, "a refund of more than was granted"
        return 0

    def renew(self):
        self.left = self.size
        self.over = self.costly_taken = False
