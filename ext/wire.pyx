# cython: language_level=3
"""HTTP/1.1 request parsing for AccMan: bytes in, Request objects out; no I/O.

h11's shape: the server hands every received chunk to Parser.feed and gets
back the requests it completed, in order, each either routable or carrying
the HttpError to answer with.  The parser never raises on client bytes.

How it stays fast and bounded (the hot path of a >100k requests/s server):

- Complete lines are parsed in place, straight from the bytes object that
  feed received: no copy, no slicing, one memchr per line.  Only a line that
  is cut by the end of a chunk is copied, into a buffer that is bounded by
  the limits (the request line or the header block must fit in it, else 414
  or 431) and that is scanned once: the next chunk is searched for the line's
  end from its own first byte, so trickled bytes cost linear time
  (h11's receive buffer habit).
- Everything learnt from a completed line goes straight into the Request
  under construction or into C fields of the Parser, so completed lines are
  never kept nor re-read.
- The Python objects made per request are the Request itself and the values
  the server reads (cred, key, token); numbers stay C integers until read.

Limits come from accman.limits.  What counts, precisely:
- REQUEST_LINE_BYTES_MAX: the request line without its CRLF; 414 as soon as
  more than that many bytes of it are buffered without its end.
- HEADER_BYTES_MAX: every byte after the request line's CRLF up to and
  including the blank line that ends the head; 431 as soon as the bytes
  buffered so far cannot end within it.
- HEADERS_MAX: header lines (the blank line not counted); 431 on the next one.
- BODY_BYTES_MAX: the Content-Length a request may declare; the body is read
  and ignored, a larger one is 413.
"""

cimport cython
from cpython.bytes cimport PyBytes_AS_STRING, PyBytes_GET_SIZE
from cpython.pyport cimport PY_SSIZE_T_MAX
from libc.stdint cimport INT64_MIN as C_INT64_MIN, int64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcmp, memcpy

from values cimport (INT_NEGATIVE_OK, INT_ZERO_OK, parse_int64,
                     valid_name_bytes)

from accman import limits as _limits
from accman.errors import HttpError
from accman.server.auth import TOKEN_CHARS

# Where the parser is in the current request.
cdef enum:
    PH_START = 0    # expecting a request line (blank lines before it are skipped)
    PH_HEAD = 1     # expecting header lines or the blank line that ends the head
    PH_BODY = 2     # skipping the declared body
    PH_DEAD = 3     # a framing error was returned: no more input is read

cdef enum:
    CR = 13
    LF = 10
    SP = 32
    HT = 9

# --- limits: read once from accman.limits, the one place they are defined ----
cdef Py_ssize_t REQUEST_LINE_BYTES_MAX = _limits.REQUEST_LINE_BYTES_MAX
cdef Py_ssize_t HEADER_BYTES_MAX = _limits.HEADER_BYTES_MAX
cdef int HEADERS_MAX = _limits.HEADERS_MAX
cdef int REQUEST_BLANK_LINES_MAX = _limits.REQUEST_BLANK_LINES_MAX
cdef Py_ssize_t BODY_BYTES_MAX = _limits.BODY_BYTES_MAX
cdef Py_ssize_t CRED_CHARS_MAX = _limits.CRED_CHARS_MAX
cdef Py_ssize_t KEY_CHARS_MAX = _limits.KEY_CHARS_MAX
cdef int64_t PAST_LIMIT_DEFAULT = _limits.PAST_LIMIT_DEFAULT

# The longest line the parser ever buffers: a request line of
# REQUEST_LINE_BYTES_MAX bytes plus CRLF, or a header line that fills the
# whole header block.  Every copy into the buffer is checked against the
# limits first, so this is an assertion, not a client-reachable limit.
cdef Py_ssize_t LINE_BYTES_CAP = max(REQUEST_LINE_BYTES_MAX + 2, HEADER_BYTES_MAX)
# Where the line buffer starts when a line first spans two feeds.
cdef Py_ssize_t LINE_BYTES_FIRST = 256
# feed's default: every request the bytes complete.
cdef Py_ssize_t FEED_ALL = PY_SSIZE_T_MAX

include "errors.pxi"
include "bytes.pxi"


@cython.final
@cython.freelist(64)
cdef class Request:
    """One request, complete with its body.

    `route` is a ROUTE_* constant, or 0 when `error` is set: then the reply
    is that error, and the query values are left at their defaults (cred,
    min, key, before, low None; by, ttl, hold, after, wait 0; use -1; limit
    PAST_LIMIT_DEFAULT).  `token` is the Bearer token of the Authorization
    header (None if absent, malformed or repeated; `auth_fault` then says
    which of the last two, for the 401's detail), `keep_alive` whether the
    connection stays open after the reply, `http10` whether the request was
    HTTP/1.0, `head` whether it was a HEAD (answered as its GET, without
    the body), `loopback_host` whether its Host (or absolute-form
    authority) names a loopback address, or it had none, and `allow` the
    methods of the path an OPTIONS asked about."""

    # Its fields are declared in accman/server/_wire.pxd, so that other
    # compiled modules read them at C speed (ext/pipeline.pyx).

    def __repr__(self):
        # No cred, key nor token: reprs end up in logs (SPEC "Access").
        if self.error is not None:
            return (f"<Request error={self.error.status} {self.error.code} "
                    f"close={self.error.close} keep_alive={self.keep_alive}>")
        return (f"<Request route={ROUTE_PATHS.get(self.route)} "
                f"keep_alive={self.keep_alive} http10={self.http10}>")


include "target.pxi"


@cython.final
cdef class Parser:
    """The request parser of one connection.  feed(data) returns the requests
    completed by data, in order.  After a framing error (HttpError.close) the
    error is the last request ever returned and feed returns []."""

    # Its fields and C methods are declared in accman/server/_wire.pxd, so
    # that the connection's quiet read is taken in C (ext/pipeline.pyx).

    def __cinit__(self):
        self._phase = PH_START
        self._line = NULL
        self._line_len = 0
        self._line_cap = 0

    def __dealloc__(self):
        free(self._line)

    def take_continue(self):
        """True once when the request being read asked `Expect: 100-continue`
        and its head is complete: the server answers 100 Continue, and the
        client sends the body (RFC 9110 10.1.1)."""
        if self._continue:
            self._continue = False
            return True
        return False

    @property
    def awaiting_body(self):
        """The request whose head is whole and whose body is still to come
        (a 100 Continue's, RFC 9110 10.1.1), its values read, or None.  A
        refusal of its target (`error`, not closing) is set only once it
        is whole: its access is judged as any request's is."""
        return self._req if self._phase == PH_BODY else None

    @property
    def pending(self):
        """True while part of a request has been received and not yet
        returned: the server's head deadline runs (SPEC "Limits")."""
        return self.pending_c()

    @property
    def pending_head(self):
        """The request being received is a HEAD, or can only be one (its
        method cut short: `may_be_head`): its reply has no body (RFC 9112
        6.3)."""
        return self._req.head if self._req is not None else may_be_head(
            self._line, self._line_len)

    cdef bint pending_c(self) noexcept:
        return (self._phase == PH_HEAD or self._phase == PH_BODY
                or (self._phase == PH_START and self._line_len > 0))

    cdef bint between_requests(self) noexcept:
        """Nothing of a request held: none begun, no bytes kept for `more`,
        no 100 Continue owed."""
        return not self.pending_c() and self._rest is None and not self._continue

    def feed(self, bytes data not None, Py_ssize_t max_requests=FEED_ALL):
        """Parse data, the next bytes of the connection; return the requests
        it completed, in order: at most max_requests, the rest of data being
        kept, unparsed and uncopied, for `more` (the server bounds the work
        and the requests it holds per connection this way)."""
        return self.feed_c(data, max_requests)

    cdef list feed_c(self, bytes data, Py_ssize_t max_requests):
        """feed, for compiled callers."""
        cdef bytes rest = self._rest
        if rest is not None:
            self._rest = None
            data = rest[self._rest_at:] + data
        return self._parse(data, 0, max_requests)

    def more(self, Py_ssize_t max_requests=FEED_ALL):
        """Parse on in the bytes a capped feed kept; [] when there are none."""
        cdef bytes rest = self._rest
        if rest is None:
            return []
        self._rest = None
        return self._parse(rest, self._rest_at, max_requests)

    @property
    def held_bytes(self):
        """Bytes fed and not yet parsed: `more` takes them."""
        return 0 if self._rest is None else PyBytes_GET_SIZE(self._rest) - self._rest_at

    @property
    def kept_bytes(self):
        """The bytes kept for `more`: the held ones, and the parsed part of
        the read they came in while it is no more than half of it."""
        return 0 if self._rest is None else PyBytes_GET_SIZE(self._rest)

    cdef list _parse(self, bytes data, Py_ssize_t i, Py_ssize_t max_requests):
        cdef list out = []
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t k, total
        cdef const unsigned char* nl
        cdef const unsigned char* line
        cdef bint crlf
        self._cur_n = 0                     # no line of an earlier call is current
        while i < n and self._phase != PH_DEAD:
            if len(out) >= max_requests:
                if i > n - i:
                    # Most of it parsed: the rest is kept as a copy of its
                    # own, not in the whole read (`kept_bytes` is at most
                    # twice `held_bytes`; copying only then keeps the
                    # copies of a long pipeline linear).
                    data = data[i:]
                    i = 0
                self._rest = data
                self._rest_at = i
                break
            if self._phase == PH_BODY:
                k = min(n - i, self._body_left)
                i += k
                self._body_left -= k
                if self._body_left == 0:
                    self._emit(out)
                continue
            self._chunk, self._chunk_n = p + i, n - i
            nl = <const unsigned char*>memchr(p + i, LF, n - i)
            if nl == NULL:
                self._unfinished(p + i, n - i, out)
                break
            k = nl - (p + i) + 1            # this chunk's bytes of the line, LF included
            line = p + i
            total = self._line_len + k
            if k >= 2:
                crlf = p[i + k - 2] == CR
            else:
                crlf = self._line_len > 0 and self._line[self._line_len - 1] == CR
            if self._phase == PH_START and not_a_method(
                    self._line[0] if self._line_len != 0 else p[i]):
                self._fail_not_http(out)    # before its length, as _unfinished does
                break
            if self._too_long(p + i, total, crlf, out):
                break
            if self._line_len != 0:
                # The line began in an earlier feed: complete it in the buffer.
                self._keep(p + i, k)
                line = self._line
                self._line_len = 0
            i += k
            # Any fault of a line with a CR is said as a bare CR (_fail), as
            # _unfinished says it whatever the split, at no cost to a good line.
            self._cur = line
            self._cur_n = total - 1 - crlf
            self._complete(line, total, crlf, out)
            self._cur_n = 0
        return out

    # --- lines ----------------------------------------------------------------

    cdef int _keep(self, const unsigned char* p, Py_ssize_t n) except -1:
        """Append p[0:n] to the unfinished line."""
        cdef Py_ssize_t need = self._line_len + n, cap
        cdef unsigned char* grown
        assert need <= LINE_BYTES_CAP, "the limit checks bound every line"
        if need > self._line_cap:
            cap = max(self._line_cap * 2, LINE_BYTES_FIRST)
            while cap < need:
                cap *= 2
            cap = min(cap, LINE_BYTES_CAP)
            grown = <unsigned char*>realloc(self._line, cap)
            if grown == NULL:
                raise MemoryError()
            self._line = grown
            self._line_cap = cap
        memcpy(self._line + self._line_len, p, n)
        self._line_len = need
        return 0

    cdef int _unfinished(self, const unsigned char* p, Py_ssize_t n,
                         list out) except -1:
        """p[0:n] continues the current line without ending it (no LF): keep
        it, or answer now a bare CR, or 414/431 if the line can no longer end
        within its limit."""
        cdef Py_ssize_t have = self._line_len + n
        if self._phase == PH_START and self._line_len == 0 and not_a_method(p[0]):
            return self._fail_not_http(out)
        if self._bare_cr_in_limit(p, n, max(0, self._line_len - 1)):
            return self._fail_bare_cr(out)
        if self._phase == PH_START:
            if have - (p[n - 1] == CR) > REQUEST_LINE_BYTES_MAX:     # may end in CRLF
                return self._fail_request_line_too_long(out)
        elif self._head_bytes + have + 1 > HEADER_BYTES_MAX:   # + 1: its LF
            return self._fail_headers_too_large(out)
        return self._keep(p, n)

    cdef bint _bare_cr_in_limit(self, const unsigned char* p, Py_ssize_t n,
                                Py_ssize_t j) noexcept:
        """Whether the line (the part kept, then p[0:n]) has, from position j
        on, a CR followed by a byte other than LF, both within the line's
        limit as a feed of one byte at a time meets them: that feed says a
        bare CR before the line's length, so every split says it."""
        cdef Py_ssize_t kept = self._line_len, total = self._line_len + n
        cdef unsigned char after
        while j + 1 < total:
            if (self._line[j] if j < kept else p[j - kept]) == CR:
                after = self._line[j + 1] if j + 1 < kept else p[j + 1 - kept]
                if after != LF:
                    if self._phase == PH_START:
                        return j + 2 - (after == CR) <= REQUEST_LINE_BYTES_MAX
                    return self._head_bytes + j + 3 <= HEADER_BYTES_MAX
            j += 1
        return False

    cdef bint _too_long(self, const unsigned char* p, Py_ssize_t total, bint crlf,
                        list out) except -1:
        """Whether the complete line of `total` bytes (LF included; the part
        kept, then p) breaks its limit; if so the error is emitted: a bare
        CR met within the limit first (_unfinished)."""
        if self._phase == PH_START:
            if total - 1 - crlf <= REQUEST_LINE_BYTES_MAX:
                return False
        elif self._head_bytes + total <= HEADER_BYTES_MAX:
            return False
        if self._bare_cr_in_limit(p, total - 1 - self._line_len, 0):
            self._fail_bare_cr(out)
        elif self._phase == PH_START:
            self._fail_request_line_too_long(out)
        else:
            self._fail_headers_too_large(out)
        return True

    cdef int _complete(self, const unsigned char* s, Py_ssize_t total, bint crlf,
                       list out) except -1:
        """s[0:total] is a whole line, LF included, within its byte limit."""
        cdef Py_ssize_t n = total - 1 - crlf
        if not crlf:
            return self._fail(400, "a line of the request head ends in a bare LF, not CRLF", out)
        if self._phase == PH_START:
            if n == 0:      # RFC 9112 2.2: blank lines before a request line are ignored
                self._blank_lines += 1
                if self._blank_lines > REQUEST_BLANK_LINES_MAX:
                    return self._fail(400, f"more than {REQUEST_BLANK_LINES_MAX} blank lines "
                                           "before a request line", out)
                return 0
            self._blank_lines = 0
            return self._request_line(s, n, out)
        self._head_bytes += total
        if n == 0:
            return end_of_head(self, out)
        self._header_lines += 1
        if self._header_lines > HEADERS_MAX:
            return self._fail(431, f"the request has more than {HEADERS_MAX} header lines", out)
        return header_line(self, s, n, out)

    cdef int _fail_bare_cr(self, list out) except -1:
        return self._fail(400, _BARE_CR[self._phase == PH_START], out)

    cdef int _fail_not_http(self, list out) except -1:
        # At a line's first byte, whole or not: TLS to a plain port is refused at once.
        return self._fail(400, "a request line starts with its method (a token): "
                               "this is not an HTTP request", out)

    # --- the request line -----------------------------------------------------

    cdef int _request_line(self, const unsigned char* s, Py_ssize_t n,
                           list out) except -1:
        """s[0:n]: METHOD SP request-target SP HTTP-version, without CRLF."""
        cdef Py_ssize_t i = 0, t, j, v, path_len
        cdef int method, route
        cdef const unsigned char* question
        cdef Request req
        while i < n and TOKEN[s[i]]:
            i += 1
        if i == 0 or i == n or s[i] != SP:
            return self._fail_request_line(out)
        t = j = i + 1
        while j < n and TARGET[s[j]]:
            j += 1
        if j < n and s[j] != SP:
            return self._fail(400, "the request target has a byte that is not allowed in a URI", out)
        if j == t or j == n:
            return self._fail_request_line(out)
        v = j + 1
        if (n - v != 8 or memcmp(s + v, b"HTTP/", 5) != 0 or s[v + 6] != c'.'
                or not (c'0' <= s[v + 5] <= c'9') or not (c'0' <= s[v + 7] <= c'9')):
            return self._fail_version(s + v, n - v, out)
        if s[v + 5] != c'1' or s[v + 7] > c'1':
            return self._fail(505, f"{quoted(s + v, 8)} is not supported: use HTTP/1.1 or HTTP/1.0", out)
        method = method_of(s, i)
        if method == M_UNKNOWN:
            return self._fail(501, f"the method {quoted(s, i)} is not implemented", out)

        req = new_request()
        req.http10 = s[v + 7] == c'0'
        self._req = req
        self._phase = PH_HEAD
        self._pending = self._target(req, method, s + t, j - t)
        if self._pending is not None and self._pending.close:
            return self._fail(400, self._pending.detail, out)   # a malformed target
        return 0

    cdef object _target(self, Request req, int method, const unsigned char* s,
                        Py_ssize_t n):
        """The request-target s[0:n] (n >= 1) of `method`: sets req's route
        and values, or returns the HttpError to answer once the head is in."""
        cdef Py_ssize_t a, path_len
        cdef int route
        cdef const unsigned char* question
        req.head = method == M_HEAD
        if method == M_OPTIONS and n == 1 and s[0] == c'*':
            req.allow = ALLOW_ANY
            req.route = R_OPTIONS
            return None
        if s[0] != c'/':
            # RFC 9112 3.2.2: a server accepts the absolute form; its
            # authority stands for the Host header.
            if not ci_prefix(s, n, b"http://", 7):
                return bad_target("the request target must be a path such as /tot, "
                                  "or an http:// URI naming this server")
            a = 7
            while a < n and s[a] != c'/' and s[a] != c'?':
                a += 1
            if a == 7 or not host_shape_ok(s + 7, a - 7):
                return bad_target("the authority of an absolute request target must be "
                                  f"host[:port], a port at most {PORT_MAX}")
            req.loopback_host = host_is_loopback(s + 7, a - 7)
            self._absolute = True
            if a == n and method == M_OPTIONS:      # RFC 9112 3.2.4: the same as "*"
                req.allow = ALLOW_ANY
                req.route = R_OPTIONS
                return None
            if a == n:
                return HttpError(404, "not_found", f"no such path: the routes are {_ROUTE_LIST}")
            s += a
            n -= a
        question = <const unsigned char*>memchr(s, c'?', n)
        path_len = (question - s) if question != NULL else n
        route = route_of(s, path_len)
        if route == R_NONE:
            return HttpError(404, "not_found", f"no such path: the routes are {_ROUTE_LIST}")
        if method == M_OPTIONS:
            req.allow = ALLOW_PATCH if route_patches(route) else ALLOW_GET
            req.route = R_OPTIONS
            return None
        if route_patches(route):
            if method != M_PATCH:
                return HttpError(405, "method_not_allowed",
                                 f"{ROUTE_PATHS[route]} accepts only PATCH (and OPTIONS)",
                                 allow=ALLOW_PATCH)
        elif method != M_GET and method != M_HEAD:
            return HttpError(405, "method_not_allowed",
                             f"{ROUTE_PATHS[route]} accepts only GET and HEAD (and OPTIONS)",
                             allow=ALLOW_GET)
        if question == NULL:
            err = parse_query(req, route, s + n, 0)
        else:
            err = parse_query(req, route, question + 1, s + n - question - 1)
        if err is None:
            req.route = route
        return err

    cdef int _fail_version(self, const unsigned char* v, Py_ssize_t n, list out) except -1:
        """What follows the target, v[0:n], is not a version: said as a space
        inside the target when the line ends in one."""
        cdef Py_ssize_t k = n - 9      # where the SP before a final "HTTP/x.y" would be
        if k > 0 and v[0] != SP and v[k] == SP and memcmp(v + k + 1, b"HTTP/", 5) == 0:
            return self._fail(400, "the request line must be METHOD SP /path SP HTTP/1.1: "
                                   "a space in the target must be sent as %20", out)
        return self._fail(400, "the HTTP version must be HTTP/1.1 or HTTP/1.0", out)

    cdef int _fail_request_line(self, list out) except -1:
        return self._fail(400, "the request line must be METHOD SP /path SP HTTP/1.1", out)

    # --- header lines: headers.pxi (header_line, end_of_head) -----------------

    # --- results --------------------------------------------------------------

    cdef int _emit(self, list out) except -1:
        """The current request is complete: return it, ready for the next."""
        cdef Request req = self._req
        if self._pending is not None:
            clear_values(req)
            req.error = self._pending
            self._pending = None
        out.append(req)
        self._req = None
        self._phase = PH_START
        self._head_bytes = 0
        self._header_lines = 0
        self._hosts = 0
        self._cl_seen = False
        self._te_seen = False
        self._cl = 0
        self._conn_close = False
        self._conn_keep_alive = False
        self._auth_seen = False
        self._absolute = False
        self._expect_continue = False
        self._continue = False
        return 0

    cdef int _fail(self, int status, str detail, list out) except -1:
        """A framing error: return it as the last request and read no more."""
        cdef Request req = self._req
        if self._cur_n and memchr(self._cur, CR, self._cur_n) != NULL:
            status, detail = 400, _BARE_CR[self._phase == PH_START]
        if req is None:
            # A HEAD's reply has no body (RFC 9112 6.3), its line parsed whole or not.
            req = new_request()
            req.head = self._phase == PH_START and (
                starts_head(self._cur, self._cur_n, NULL, 0) if self._cur_n
                else starts_head(self._line, self._line_len, self._chunk, self._chunk_n))
        clear_values(req)
        req.keep_alive = False
        req.error = HttpError(status, CODES[status], detail, close=True)
        out.append(req)
        self._req = None
        self._pending = None
        self._phase = PH_DEAD
        self._continue = False
        self._rest = None
        self._line_len = 0      # the buffer itself may hold the line being read: freed in __dealloc__
        return 0

    cdef int _fail_request_line_too_long(self, list out) except -1:
        return self._fail(414, f"the request line is over {REQUEST_LINE_BYTES_MAX} bytes", out)

    cdef int _fail_headers_too_large(self, list out) except -1:
        return self._fail(431, f"the request headers are over {HEADER_BYTES_MAX} bytes", out)


include "headers.pxi"
