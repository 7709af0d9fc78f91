# cython: language_level=3
"""A connection's requests in flight, in order (RFC 9112 9.3.2, SPEC
"Routes"): the replies still owed, each answered when its turn comes.  No
socket here but the one write of a batch's replies (`__call__`); the
connection (accman/server/connection.py) owns the rest.

Two kinds of entries share one queue:

* Python entries: a routes.Slot (pending, ready, or deferred), as every
  store and every route has them.
* Lane entries: a mod or a /tot taken through the embedded store's Lane
  (ext/lane.pxi) with no Python object of its own.  Its outcome is C
  fields (tot, seq, the batch number it waits for); only a refusal keeps
  its error.  The connection is registered once on each batch its entries
  wait for, and the batch's completion (`__call__`) formats every reply
  that is now ready, in order, into one buffer and one write.

`take` takes requests through the Lane while they are plain keep-alive
mods and /tot reads that pass the access rules in line (no token
configured and a loopback Host, or the token the connection already
authenticated with the role the request needs); anything else goes
back to the connection's general path, and so does any store without a
Lane (PostgreSQL).  Success replies are made here, byte for byte the
templates of accman/server/replies.py (checked at import); errors are
made by routes.reply_of.
"""

cimport cython
from cpython.bytearray cimport PyByteArray_AS_STRING, PyByteArray_GET_SIZE
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_FromStringAndSize, PyBytes_GET_SIZE
from cpython.ref cimport PyObject, Py_INCREF, Py_XDECREF
from libc.stdint cimport int64_t, uint64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memcpy
from posix.time cimport CLOCK_MONOTONIC, clock_gettime, timespec

from accman.ledger._ledger cimport Lane, Outcome
from accman.server._wire cimport Parser, Request

from accman.limits import PASS_CHARGE_MAX as _PASS_CHARGE_MAX
from accman.server import replies
from accman.server._wire import ROUTE_MOD, ROUTE_TOT
from accman.server.auth import CHARGE, MINT, READ
from accman.server.routes import turn_charge
from accman.server.state import OPEN

cdef int R_TOT = ROUTE_TOT
cdef int R_MOD = ROUTE_MOD
cdef int ROLE_READ = READ
cdef int ROLE_CHARGE = CHARGE
cdef int ROLE_MINT = MINT
cdef int KEEP = replies.KEEP
cdef int KEEP10 = replies.KEEP10
cdef int CLOSE = replies.CLOSE
cdef int STATE_OPEN = OPEN
cdef object DATE = replies.DATE
cdef Py_ssize_t PASS_CHARGE_MAX = _PASS_CHARGE_MAX

# Every reply this module makes is one of these, and fits in
# REPLY_BYTES_MAX: the head of replies.T200 (at most ~110 bytes), a Date
# of 29, a length, and a body of two int64s.
DEF REPLY_BYTES_MAX = 512
# The queue grows by doubling from this; it never holds more than the
# connection's PIPELINE_REQUESTS_MAX entries and a few replies of its
# own (a 100 Continue, a last reply), which ENTRIES_MAX asserts.
DEF ENTRIES_FIRST = 8
DEF ENTRIES_SLACK = 16


cdef bytes _head_of(bytes template):
    """The part of a replies.T200 template before its Date."""
    cdef bytes tail = b"Date: %b\r\nContent-Length: %d\r\n\r\n%b"
    if not template.endswith(tail) or b"%" in template[:-len(tail)]:
        raise AssertionError("replies.T200 changed: ext/pipeline.pyx formats it in C")
    return template[:-len(tail)]


if replies.MOD_BODY != b'{"tot":%d,"seq":%d}' or replies.TOT_BODY != b'{"tot":%d}':
    raise AssertionError("replies' bodies changed: ext/pipeline.pyx formats them in C")
cdef bytes HEAD_KEEP = _head_of(replies.T200[replies.KEEP])
cdef bytes HEAD_KEEP10 = _head_of(replies.T200[replies.KEEP10])
cdef bytes HEAD_CLOSE = _head_of(replies.T200[replies.CLOSE])


cdef struct Entry:
    PyObject* obj           # a Python entry (owned); NULL: a lane entry
    PyObject* err           # a lane entry's refusal (owned); NULL: success
    int64_t tot
    int64_t seq
    int64_t wait_no         # the batch it waits for; 0: ready
    double t0               # arrival (CLOCK_MONOTONIC s), for the latency histogram
    int route
    int mode


cdef inline double _now() noexcept nogil:
    cdef timespec ts
    clock_gettime(CLOCK_MONOTONIC, &ts)
    return ts.tv_sec + ts.tv_nsec * 1e-9


cdef inline Py_ssize_t _put_uint(char* p, uint64_t v) noexcept nogil:
    """v in decimal at p; returns its length."""
    cdef char tmp[20]
    cdef Py_ssize_t n = 0, i
    while True:
        tmp[n] = <char>(48 + v % 10)
        n += 1
        v //= 10
        if v == 0:
            break
    for i in range(n):
        p[i] = tmp[n - 1 - i]
    return n


cdef inline Py_ssize_t _put_int(char* p, int64_t v) noexcept nogil:
    if v < 0:
        p[0] = 45       # '-'
        # -(v + 1) + 1 reaches INT64_MIN's magnitude without overflow.
        return 1 + _put_uint(p + 1, <uint64_t>(-(v + 1)) + 1)
    return _put_uint(p, <uint64_t>v)


@cython.final
cdef class LaneStats:
    """The counters of replies made here, server-wide, folded into the
    server's Metrics when they are rendered (accman/server/server.py)."""

    cdef readonly Py_ssize_t mods_ok
    cdef readonly Py_ssize_t tots_ok
    cdef double latency_sum_s
    cdef Py_ssize_t latency_count
    cdef double* bounds
    cdef Py_ssize_t* counts
    cdef Py_ssize_t nbounds

    def __cinit__(self, bounds):
        cdef Py_ssize_t i
        self.nbounds = len(bounds)
        self.bounds = <double*>realloc(NULL, sizeof(double) * (self.nbounds + 1))
        self.counts = <Py_ssize_t*>realloc(NULL, sizeof(Py_ssize_t) * (self.nbounds + 1))
        if self.bounds == NULL or self.counts == NULL:
            raise MemoryError()
        for i in range(self.nbounds):
            self.bounds[i] = bounds[i]
        for i in range(self.nbounds + 1):
            self.counts[i] = 0

    def __dealloc__(self):
        free(self.bounds)
        free(self.counts)

    cdef inline void observe(self, double value_s) noexcept:
        """As metrics.Histogram.observe: the first bucket whose bound is
        >= value (bisect_left)."""
        cdef Py_ssize_t i = 0
        while i < self.nbounds and self.bounds[i] < value_s:
            i += 1
        self.counts[i] += 1
        self.latency_sum_s += value_s
        self.latency_count += 1

    def take(self):
        """(mods_ok, tots_ok, bucket counts, latency sum, latency count)
        since the last call, and zero them."""
        counts = [self.counts[i] for i in range(self.nbounds + 1)]
        out = (self.mods_ok, self.tots_ok, counts, self.latency_sum_s, self.latency_count)
        for i in range(self.nbounds + 1):
            self.counts[i] = 0
        self.mods_ok = self.tots_ok = self.latency_count = 0
        self.latency_sum_s = 0.0
        return out


include "turn.pxi"


@cython.final
cdef class Pipeline:
    """The queue of one connection (its `waiting`): deque-like for the
    connection's general path (len, append, [0], pop, clear), plus `take`,
    `drain`, the batch completion `__call__` and a stop's `close_tail`."""

    cdef object conn
    cdef Parser parser
    cdef Turn turn
    cdef object _write              # the connection's transport.write, once it is made
    cdef object _unsent             # its get_write_buffer_size
    cdef bytearray _reads           # the server's read buffer (Server.read_buffer)
    # Reads taken whole and replies written here, which read no clock: the
    # connection's sweep counts a change of it as activity.
    cdef readonly Py_ssize_t activity
    cdef object routes
    cdef Lane lane
    cdef LaneStats stats
    cdef bint tokens_on
    cdef readonly Py_ssize_t pipeline_max
    cdef readonly bint held         # drain stopped at a read at its turn: the pass's share spent
    # The turn's `left` when this connection's pass began, less the grants
    # since (Turn.pass_spent): a read, a flush, a batch's completion begin one.
    cdef public Py_ssize_t pass_left
    cdef Entry* ring
    cdef Py_ssize_t cap
    cdef Py_ssize_t first
    cdef Py_ssize_t count
    cdef int64_t registered         # the batch this connection was last registered on
    cdef char* buf                  # replies being formatted
    cdef Py_ssize_t buf_len
    cdef Py_ssize_t buf_cap

    def __cinit__(self, conn, Parser parser not None, Turn turn not None, routes, lane,
                  LaneStats stats not None, bint tokens_on, Py_ssize_t pipeline_max):
        self.conn = conn
        self.parser = parser
        self.turn = turn
        self._write = None
        self._unsent = None
        self._reads = None
        self.activity = 0
        self.routes = routes
        self.lane = lane
        self.stats = stats
        self.tokens_on = tokens_on
        self.pipeline_max = pipeline_max
        self.ring = NULL
        self.cap = self.first = self.count = 0
        self.registered = 0
        self.buf = NULL
        self.buf_len = self.buf_cap = 0

    def __dealloc__(self):
        self._clear()
        free(self.ring)
        free(self.buf)

    def made(self, transport, bytearray reads not None):
        """The connection is made: `quick` takes its reads from `reads` and
        writes to `transport`."""
        self._write = transport.write
        self._unsent = transport.get_write_buffer_size
        self._reads = reads

    # -- the queue ---------------------------------------------------------------

    def __len__(self):
        return self.count

    def __bool__(self):
        return self.count > 0

    cdef Entry* _push(self) except NULL:
        """A new entry at the tail, zeroed."""
        cdef Py_ssize_t newcap, i
        cdef Entry* grown
        cdef Entry* e
        if self.count == self.cap:
            newcap = self.cap * 2 if self.cap else ENTRIES_FIRST
            assert newcap <= 2 * (self.pipeline_max + ENTRIES_SLACK), \
                "a pipeline holds at most PIPELINE_REQUESTS_MAX requests"
            grown = <Entry*>realloc(NULL, sizeof(Entry) * newcap)
            if grown == NULL:
                raise MemoryError()
            for i in range(self.count):
                grown[i] = self.ring[(self.first + i) % self.cap]
            free(self.ring)
            self.ring = grown
            self.cap = newcap
            self.first = 0
        e = &self.ring[(self.first + self.count) % self.cap]
        self.count += 1
        e.obj = e.err = NULL
        e.tot = e.seq = e.wait_no = 0
        e.t0 = 0.0
        e.route = e.mode = 0
        return e

    cdef inline Entry* _head(self) noexcept:
        return &self.ring[self.first]

    cdef void _pop_head(self) noexcept:
        cdef Entry* e = &self.ring[self.first]
        Py_XDECREF(e.obj)
        Py_XDECREF(e.err)
        e.obj = e.err = NULL
        self.first = (self.first + 1) % self.cap
        self.count -= 1

    cdef void _clear(self) noexcept:
        while self.count:
            self._pop_head()

    def append(self, obj):
        """A Python entry (a routes.Slot) at the tail."""
        cdef Entry* e = self._push()
        Py_INCREF(obj)
        e.obj = <PyObject*>obj

    def __getitem__(self, Py_ssize_t i):
        """The Python entry at the head (0) or the tail (-1); None for a
        lane entry."""
        cdef Entry* e
        if not self.count or (i != 0 and i != -1):
            raise IndexError("a pipeline is read at its head or its tail")
        e = &self.ring[(self.first + (0 if i == 0 else self.count - 1)) % self.cap]
        return None if e.obj == NULL else <object>e.obj

    def pop(self):
        """Removes the tail and returns its Python entry (None for a lane
        entry)."""
        cdef Entry* e
        if not self.count:
            raise IndexError("pop from an empty pipeline")
        e = &self.ring[(self.first + self.count - 1) % self.cap]
        out = None if e.obj == NULL else <object>e.obj
        Py_XDECREF(e.obj)
        Py_XDECREF(e.err)
        e.obj = e.err = NULL
        self.count -= 1
        return out

    def clear(self):
        self._clear()

    def close_tail(self):
        """The last reply owed ends the connection (a stop takes nothing
        after it): it says `Connection: close` (RFC 9112 9.6), a lane
        entry's as a Slot's (routes.Slot.close_after)."""
        cdef Entry* e
        if not self.count:
            return
        e = &self.ring[(self.first + self.count - 1) % self.cap]
        if e.obj == NULL:
            e.mode = CLOSE
        else:
            (<object>e.obj).close_after()

    # -- taking requests through the lane ---------------------------------------

    cdef int _lane_mode(self, Request req, object token, int roles) noexcept:
        """The mode of a request the lane may take (KEEP, KEEP10), or -1."""
        cdef int need
        if req.error is not None or not req.keep_alive:
            return -1
        if req.route == R_MOD:
            need = ROLE_MINT if req.by > 0 else ROLE_CHARGE
        elif req.route == R_TOT and not req.head:
            need = ROLE_READ
        else:
            return -1
        if not self.tokens_on:
            if not req.loopback_host:
                return -1
        elif not (roles & need) or not _same_token(req.token, token):
            return -1
        return KEEP10 if req.http10 else KEEP

    cpdef Py_ssize_t take(self, list reqs, Py_ssize_t i, bint stopping) except -1:
        """Takes reqs[i:] through the lane while they are lane requests
        (see the module's doc) and the pipeline has room; returns the
        index of the first request it left for the general path."""
        cdef Py_ssize_t n = len(reqs)
        cdef Lane lane = self.lane
        cdef Request req
        cdef Entry* e
        cdef Outcome out
        cdef int mode
        cdef double t0 = 0.0
        cdef bint began = False
        if lane is None or stopping:
            return i
        token = None
        cdef int roles = 0
        if self.tokens_on:
            token = self.conn.token
            roles = self.conn.token_roles
        try:
            while i < n and self.count < self.pipeline_max:
                req = <Request>reqs[i]
                mode = self._lane_mode(req, token, roles)
                if mode < 0:
                    break
                if not began and (req.route == R_MOD or self.count > 0):
                    # A change, or a read ordered behind this connection's
                    # changes: under the committer's lock.
                    lane.begin()
                    began = True
                if req.route == R_MOD:
                    if t0 == 0.0:
                        t0 = _now()
                    err = lane.mod(req.cred, req.by, req.min, req.key, req.low, self,
                                   &self.registered, &out)
                else:
                    err = lane.tot(req.cred, self.count > 0, self, &self.registered, &out)
                e = self._push()
                e.route = req.route
                e.mode = mode
                e.t0 = t0
                e.tot = out.tot
                e.seq = out.seq
                e.wait_no = out.wait_no
                if err is not None:
                    Py_INCREF(err)
                    e.err = <PyObject*>err
                i += 1
        finally:
            if began:
                lane.end()
        return i

    cpdef object quick(self, Py_ssize_t n, bint plain):
        """The connection's read, its `n` bytes in the server's read buffer,
        fed to its parser within the turn's grant (PIPELINE_REQUESTS_MAX
        less the requests in flight).  Its common case is taken whole here:
        on a quiet, `plain` connection (nothing held back, no half-close,
        the server not stopping), a read that is exactly one lane request,
        nothing of another begun.  That request is taken, its reply written
        if it is ready (a /tot) or left to its batch's completion (a mod),
        and None is returned.  Any other read returns its requests for the
        connection's general path.  No clock is read here: the connection's
        sweep counts `activity`."""
        cdef bytes data
        cdef Parser parser = self.parser
        cdef bint quiet = plain and self.count == 0 and parser.between_requests()
        cdef Py_ssize_t room
        cdef list reqs
        cdef Request req
        assert 0 < n <= PyByteArray_GET_SIZE(self._reads), "a read is within the read buffer"
        data = PyBytes_FromStringAndSize(PyByteArray_AS_STRING(self._reads), n)
        room = self.turn.grant(self.pipeline_max - self.count)
        reqs = parser.feed_c(data, room)
        self.turn.refund(room - len(reqs))
        self.pass_left = self.turn.left
        if not quiet or len(reqs) != 1 or not parser.between_requests():
            return reqs
        req = <Request>reqs[0]
        if req.http10 or self.take(reqs, 0, False) == 0:
            return reqs
        self.activity += 1
        out = []
        self.drain(out)
        if out:
            self._write(out[0])
            if self._unsent():
                self.conn.finish([])    # held by the transport: counted in the budget
        return None

    # -- answering -----------------------------------------------------------------

    cdef int _ready(self, Entry* e) except -1:
        """1 when the lane entry can be answered: its batch is durable, or
        failed (then it is told so)."""
        cdef int64_t failed_no
        if e.wait_no == 0:
            return 1
        failed_no = self.lane.failed_no()
        if failed_no and e.wait_no >= failed_no:
            Py_XDECREF(e.err)
            err = self.lane.failure(e.wait_no > failed_no)
            Py_INCREF(err)
            e.err = <PyObject*>err
            e.wait_no = 0
            return 1
        return e.wait_no <= self.lane.durable_no()

    cdef int _reserve(self, Py_ssize_t more) except -1:
        cdef Py_ssize_t need = self.buf_len + more, cap
        cdef char* grown
        if need <= self.buf_cap:
            return 0
        cap = max(self.buf_cap * 2, 4096)
        while cap < need:
            cap *= 2
        grown = <char*>realloc(self.buf, cap)
        if grown == NULL:
            raise MemoryError()
        self.buf = grown
        self.buf_cap = cap
        return 0

    cdef int _format(self, Entry* e, bytes date, double now) except -1:
        """A lane entry's success reply, at the end of the buffer."""
        cdef bytes head = (HEAD_KEEP if e.mode == KEEP else
                           HEAD_KEEP10 if e.mode == KEEP10 else HEAD_CLOSE)
        cdef char body[64]
        cdef Py_ssize_t blen, hlen = PyBytes_GET_SIZE(head), dlen = PyBytes_GET_SIZE(date)
        cdef char* p
        memcpy(body, b'{"tot":', 7)
        blen = 7 + _put_int(body + 7, e.tot)
        if e.route == R_MOD:
            memcpy(body + blen, b',"seq":', 7)
            blen += 7
            blen += _put_int(body + blen, e.seq)
            self.stats.mods_ok += 1
            self.stats.observe(now - e.t0)
        else:
            self.stats.tots_ok += 1
        body[blen] = 125    # '}'
        blen += 1
        self._reserve(REPLY_BYTES_MAX + dlen)
        p = self.buf + self.buf_len
        memcpy(p, PyBytes_AS_STRING(head), hlen)
        p += hlen
        memcpy(p, b"Date: ", 6)
        p += 6
        memcpy(p, PyBytes_AS_STRING(date), dlen)
        p += dlen
        memcpy(p, b"\r\nContent-Length: ", 18)
        p += 18
        p += _put_uint(p, <uint64_t>blen)
        memcpy(p, b"\r\n\r\n", 4)
        p += 4
        memcpy(p, body, blen)
        p += blen
        self.buf_len = p - self.buf
        return 0

    cdef int _flush_buf(self, list out) except -1:
        if self.buf_len:
            out.append(PyBytes_FromStringAndSize(self.buf, self.buf_len))
            self.buf_len = 0
        return 0

    cpdef int drain(self, list out) except -1:
        """Moves the replies at the head that are ready to `out`, in order:
        lane entries whose batch is durable (consecutive ones as one bytes
        object), Slots with their reply; a deferred request is evaluated
        now, at its turn (its access was judged when it was taken), while
        the pass's charges leave it its share (Turn.pass_spent of
        `pass_left`; else `held`).  Stops at the first not ready."""
        cdef Entry* e
        cdef double now = 0.0
        cdef bytes date = None
        routes = self.routes
        self.held = False
        try:
            while self.count:
                e = self._head()
                if e.obj == NULL:
                    if not self._ready(e):
                        break
                    if e.err != NULL:
                        self._flush_buf(out)
                        if e.route == R_MOD:    # a refused mod is an outcome too
                            self.stats.observe(_now() - e.t0)
                        out.append(routes.reply_of(e.route, <object>e.err, e.mode))
                    else:
                        if date is None:
                            date = DATE.now
                        if now == 0.0 and e.route == R_MOD:
                            now = _now()
                        self._format(e, date, now)
                    self._pop_head()
                    continue
                slot = <object>e.obj
                if slot.pending:
                    break
                reply = slot.reply
                if reply is None:
                    charge = turn_charge(slot.req)
                    if (self.turn.left <= 0 or self.turn.pass_spent(self.pass_left)
                            or (charge and not self.turn.costly(charge))):
                        self.held = True    # a later pass goes on (Connection.finish)
                        break
                    self._flush_buf(out)
                    r = routes.answer(self.conn, slot.req, slot.mode, checked=True)
                    if type(r) is not bytes:
                        # Now waiting for the store, still at the head.
                        e = self._head()
                        Py_INCREF(r)
                        Py_XDECREF(e.obj)
                        e.obj = <PyObject*>r
                        self.conn.reserved += r.reserve
                        break
                    reply = r
                self._flush_buf(out)
                self.conn.reserved -= slot.reserve
                assert self.conn.reserved >= 0, "a Slot's reserve left twice"
                self._pop_head()
                out.append(reply)
        finally:
            self._flush_buf(out)
        return 0

    def __call__(self, _outcome):
        """A batch that this connection's entries waited for is durable (or
        failed): on the loop.  A plain connection gets its ready replies in
        one write here; any other flushes through the general path."""
        conn = self.conn
        if (conn.state != STATE_OPEN or conn.eof or conn.read_paused or conn.write_paused
                or conn.server.over_budget):
            conn.flush()
            return
        out = []
        self.pass_left = self.turn.left
        self.drain(out)
        if out:
            self._write(out[0] if len(out) == 1 else b"".join(out))
            self.activity += 1
        if self.held or (out and self._unsent()):
            conn.finish([])     # a later pass; or held by the transport: counted


cdef bint _same_token(bytes a, object b) noexcept:
    """a == b in time that depends only on their lengths (SPEC "Access":
    tokens compared in constant time); False when either is None."""
    cdef Py_ssize_t n, i
    cdef const unsigned char* p
    cdef const unsigned char* q
    cdef unsigned char diff = 0
    if a is None or b is None or type(b) is not bytes:
        return False
    n = PyBytes_GET_SIZE(a)
    if n != PyBytes_GET_SIZE(<bytes>b):
        return False
    p = <const unsigned char*>PyBytes_AS_STRING(a)
    q = <const unsigned char*>PyBytes_AS_STRING(<bytes>b)
    for i in range(n):
        diff |= p[i] ^ q[i]
    return diff == 0
