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
from libc.stdint cimport int64_t
from libc.stdlib cimport free, realloc
from libc.string cimport memchr, memcmp, memcpy

from values cimport (INT_NEGATIVE_OK, INT_ZERO_OK, parse_int64,
                     valid_name_bytes)

from accman import limits as _limits
from accman.errors import HttpError

# --- routes (the values of Request.route) ------------------------------------
ROUTE_TOT = 1
ROUTE_MOD = 2
ROUTE_PAST = 3
ROUTE_HEALTH = 4
ROUTE_METRICS = 5

cdef enum:
    R_NONE = 0
    R_TOT = 1
    R_MOD = 2
    R_PAST = 3
    R_HEALTH = 4
    R_METRICS = 5

cdef enum:
    M_UNKNOWN = 0
    M_GET
    M_HEAD
    M_POST
    M_PUT
    M_DELETE
    M_PATCH
    M_OPTIONS
    M_TRACE
    M_CONNECT

# Query parameters, as bits of a set.
cdef enum:
    P_CRED = 1
    P_BY = 2
    P_MIN = 4
    P_KEY = 8
    P_LIMIT = 16
    P_BEFORE = 32

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
cdef Py_ssize_t BODY_BYTES_MAX = _limits.BODY_BYTES_MAX
cdef Py_ssize_t CRED_CHARS_MAX = _limits.CRED_CHARS_MAX
cdef Py_ssize_t KEY_CHARS_MAX = _limits.KEY_CHARS_MAX
cdef int64_t PAST_LIMIT_DEFAULT = _limits.PAST_LIMIT_DEFAULT
cdef int64_t PAST_LIMIT_MAX = _limits.PAST_LIMIT_MAX

# The longest line the parser ever buffers: a request line of
# REQUEST_LINE_BYTES_MAX bytes plus CRLF, or a header line that fills the
# whole header block.  Every copy into the buffer is checked against the
# limits first, so this is an assertion, not a client-reachable limit.
cdef Py_ssize_t LINE_BYTES_CAP = max(REQUEST_LINE_BYTES_MAX + 2, HEADER_BYTES_MAX)
# Where the line buffer starts when a line first spans two feeds.
cdef Py_ssize_t LINE_BYTES_FIRST = 256
# A value quoted back in an error detail is cut to this many characters: the
# detail is a sentence for a person, not an echo of the request.
cdef Py_ssize_t DETAIL_QUOTE_CHARS_MAX = 40

CODES = {
    400: "bad_request",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
    414: "uri_too_long",
    431: "headers_too_large",
    501: "not_implemented",
    505: "version_not_supported",
}

# --- byte classes -------------------------------------------------------------
cdef unsigned char TOKEN[256]      # RFC 9110 tchar: methods, header names, Connection options
cdef unsigned char TARGET[256]     # RFC 3986 pchar, '/', '?': the origin-form request-target
cdef unsigned char VALUE[256]      # field-value bytes: VCHAR, SP, HTAB, obs-text
cdef unsigned char HOST[256]       # uri-host [":" port], with IP-literal brackets
cdef unsigned char B64TOKEN[256]   # RFC 6750 b64token, before its trailing '='s

cdef void _init_tables():
    cdef int c
    alnum = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789"
    for c in range(256):
        TOKEN[c] = TARGET[c] = HOST[c] = B64TOKEN[c] = 0
        VALUE[c] = (c == HT or 0x20 <= c <= 0x7E or c >= 0x80)
    for c in alnum + b"!#$%&'*+-.^_`|~":
        TOKEN[c] = 1
    for c in alnum + b"-._~!$&'()*+,;=:@/?%":
        TARGET[c] = 1
    for c in alnum + b"-._~!$&'()*+,;=%:[]":
        HOST[c] = 1
    for c in alnum + b"-._~+/":
        B64TOKEN[c] = 1

_init_tables()


cdef inline bint ci_equal(const unsigned char* s, const char* lower,
                          Py_ssize_t n) noexcept nogil:
    """s[0:n] (token bytes) equals the lower-case ASCII `lower`, ignoring case.
    `| 0x20` folds A-Z onto a-z and maps no other token byte onto a letter."""
    cdef Py_ssize_t i
    for i in range(n):
        if (s[i] | 0x20) != <unsigned char>lower[i]:
            return False
    return True


cdef str quoted(const unsigned char* p, Py_ssize_t n):
    """p[0:n] (request-target bytes: printable ASCII) for an error detail."""
    if n > DETAIL_QUOTE_CHARS_MAX:
        return (<const char*>p)[:DETAIL_QUOTE_CHARS_MAX].decode("ascii") + "..."
    return (<const char*>p)[:n].decode("ascii")


cdef int method_of(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    if n == 3:
        if memcmp(s, b"GET", 3) == 0:
            return M_GET
        if memcmp(s, b"PUT", 3) == 0:
            return M_PUT
    elif n == 4:
        if memcmp(s, b"HEAD", 4) == 0:
            return M_HEAD
        if memcmp(s, b"POST", 4) == 0:
            return M_POST
    elif n == 5:
        if memcmp(s, b"PATCH", 5) == 0:
            return M_PATCH
        if memcmp(s, b"TRACE", 5) == 0:
            return M_TRACE
    elif n == 6:
        if memcmp(s, b"DELETE", 6) == 0:
            return M_DELETE
    elif n == 7:
        if memcmp(s, b"OPTIONS", 7) == 0:
            return M_OPTIONS
        if memcmp(s, b"CONNECT", 7) == 0:
            return M_CONNECT
    return M_UNKNOWN


cdef int route_of(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    if n == 4:
        if memcmp(s, b"/tot", 4) == 0:
            return R_TOT
        if memcmp(s, b"/mod", 4) == 0:
            return R_MOD
    elif n == 5:
        if memcmp(s, b"/past", 5) == 0:
            return R_PAST
    elif n == 7:
        if memcmp(s, b"/health", 7) == 0:
            return R_HEALTH
    elif n == 8:
        if memcmp(s, b"/metrics", 8) == 0:
            return R_METRICS
    return R_NONE


cdef inline int route_method(int route) noexcept nogil:
    return M_PATCH if route == R_MOD else M_GET


cdef inline int route_params(int route) noexcept nogil:
    if route == R_TOT:
        return P_CRED
    if route == R_MOD:
        return P_CRED | P_BY | P_MIN | P_KEY
    if route == R_PAST:
        return P_CRED | P_LIMIT | P_BEFORE
    return 0


cdef int param_of(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    if n == 4 and memcmp(s, b"cred", 4) == 0:
        return P_CRED
    if n == 2 and memcmp(s, b"by", 2) == 0:
        return P_BY
    if n == 3:
        if memcmp(s, b"min", 3) == 0:
            return P_MIN
        if memcmp(s, b"key", 3) == 0:
            return P_KEY
    if n == 5 and memcmp(s, b"limit", 5) == 0:
        return P_LIMIT
    if n == 6 and memcmp(s, b"before", 6) == 0:
        return P_BEFORE
    return 0


ROUTE_PATHS = {R_TOT: "/tot", R_MOD: "/mod", R_PAST: "/past",
               R_HEALTH: "/health", R_METRICS: "/metrics"}
PARAM_NAMES = {P_CRED: "cred", P_BY: "by", P_MIN: "min", P_KEY: "key",
               P_LIMIT: "limit", P_BEFORE: "before"}


cdef object bad_query(str detail):
    """A 400 for the query: the framing is intact, the connection stays."""
    return HttpError(400, "bad_request", detail)


@cython.final
@cython.freelist(64)
cdef class Request:
    """One request, complete with its body.

    `route` is a ROUTE_* constant, or 0 when `error` is set: then the reply
    is that error, and the query values are left at their defaults (cred,
    min, key, before None; by 0; limit PAST_LIMIT_DEFAULT).  `token` is the
    Bearer token of the Authorization header (None if absent, malformed or
    repeated), `keep_alive` whether the connection stays open after the
    reply, `http10` whether the request was HTTP/1.0."""

    cdef public int route
    cdef public str cred
    cdef public long long by
    cdef public object min
    cdef public str key
    cdef public long long limit
    cdef public object before
    cdef public bytes token
    cdef public bint keep_alive
    cdef public bint http10
    cdef public object error

    def __repr__(self):
        # No cred, key nor token: reprs end up in logs (SPEC "Access").
        if self.error is not None:
            return (f"<Request error={self.error.status} {self.error.code} "
                    f"close={self.error.close} keep_alive={self.keep_alive}>")
        return (f"<Request route={ROUTE_PATHS.get(self.route)} "
                f"keep_alive={self.keep_alive} http10={self.http10}>")


@cython.final
cdef class Parser:
    """The request parser of one connection.  feed(data) returns the requests
    completed by data, in order.  After a framing error (HttpError.close) the
    error is the last request ever returned and feed returns []."""

    cdef int _phase
    cdef unsigned char* _line       # the unfinished line, carried between feeds
    cdef Py_ssize_t _line_len
    cdef Py_ssize_t _line_cap
    cdef Request _req               # the request being read, from its request line
    cdef object _pending            # a non-closing HttpError for _req, replied after its head
    cdef Py_ssize_t _head_bytes     # header block bytes so far, CRLFs included
    cdef int _header_lines
    cdef int _hosts
    cdef bint _cl_seen
    cdef Py_ssize_t _cl
    cdef Py_ssize_t _body_left
    cdef bint _conn_close
    cdef bint _conn_keep_alive
    cdef bint _auth_seen
    cdef bint _head_method          # the request is a HEAD: see _end_of_head

    def __cinit__(self):
        self._phase = PH_START
        self._line = NULL
        self._line_len = 0
        self._line_cap = 0

    def __dealloc__(self):
        free(self._line)

    @property
    def pending(self):
        """True while part of a request has been received and not yet
        returned: the server's head deadline runs (SPEC "Limits")."""
        return (self._phase == PH_HEAD or self._phase == PH_BODY
                or (self._phase == PH_START and self._line_len > 0))

    def feed(self, bytes data not None):
        """Parse data, the next bytes of the connection; return the requests
        it completed (possibly none), in order."""
        cdef list out = []
        cdef const unsigned char* p = <const unsigned char*>PyBytes_AS_STRING(data)
        cdef Py_ssize_t n = PyBytes_GET_SIZE(data)
        cdef Py_ssize_t i = 0, k, total
        cdef const unsigned char* nl
        cdef const unsigned char* line
        cdef bint crlf
        while i < n and self._phase != PH_DEAD:
            if self._phase == PH_BODY:
                k = min(n - i, self._body_left)
                i += k
                self._body_left -= k
                if self._body_left == 0:
                    self._emit(out)
                continue
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
            if self._too_long(total, crlf, out):
                break
            if self._line_len != 0:
                # The line began in an earlier feed: complete it in the buffer.
                self._keep(p + i, k)
                line = self._line
                self._line_len = 0
            i += k
            self._complete(line, total, crlf, out)
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
        """p[0:n] continues the current line without ending it: keep it, or
        answer 414/431 now if the line can no longer end within its limit."""
        cdef Py_ssize_t have = self._line_len + n
        cdef bint ends_cr = p[n - 1] == CR     # may be the CR of the CRLF to come
        if self._phase == PH_START:
            if have - ends_cr > REQUEST_LINE_BYTES_MAX:
                return self._fail_request_line_too_long(out)
        elif self._head_bytes + have + 1 > HEADER_BYTES_MAX:   # + 1: its LF
            return self._fail_headers_too_large(out)
        return self._keep(p, n)

    cdef bint _too_long(self, Py_ssize_t total, bint crlf, list out) except -1:
        """Whether the complete line of `total` bytes (LF included) breaks its
        limit; if so the error is emitted."""
        if self._phase == PH_START:
            if total - 1 - crlf > REQUEST_LINE_BYTES_MAX:
                self._fail_request_line_too_long(out)
                return True
        elif self._head_bytes + total > HEADER_BYTES_MAX:
            self._fail_headers_too_large(out)
            return True
        return False

    cdef int _complete(self, const unsigned char* s, Py_ssize_t total, bint crlf,
                       list out) except -1:
        """s[0:total] is a whole line, LF included, within its byte limit."""
        cdef Py_ssize_t n = total - 1 - crlf
        if not crlf:
            return self._fail(400, "a line of the request head ends in a bare LF, not CRLF", out)
        if self._phase == PH_START:
            if n == 0:
                return 0    # RFC 9112 2.2: blank lines before a request line are ignored
            return self._request_line(s, n, out)
        self._head_bytes += total
        if n == 0:
            return self._end_of_head(out)
        self._header_lines += 1
        if self._header_lines > HEADERS_MAX:
            return self._fail(431, f"the request has more than {HEADERS_MAX} header lines", out)
        return self._header(s, n, out)

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
            return self._fail_request_line(s, n, i, out)
        t = j = i + 1
        while j < n and TARGET[s[j]]:
            j += 1
        if j < n and s[j] != SP:
            if s[j] == CR:
                return self._fail_request_line(s, n, j, out)
            return self._fail(400, "the request target has a byte that is not allowed in a URI", out)
        if j == t or j == n:
            return self._fail_request_line(s, n, j, out)
        v = j + 1
        if (n - v != 8 or memcmp(s + v, b"HTTP/", 5) != 0 or s[v + 6] != c'.'
                or not (c'0' <= s[v + 5] <= c'9') or not (c'0' <= s[v + 7] <= c'9')):
            return self._fail(400, "the HTTP version must be HTTP/1.1 or HTTP/1.0", out)
        if s[v + 5] != c'1' or s[v + 7] > c'1':
            return self._fail(505, f"{quoted(s + v, 8)} is not supported: use HTTP/1.1 or HTTP/1.0", out)
        method = method_of(s, i)
        if method == M_UNKNOWN:
            return self._fail(501, f"the method {quoted(s, i)} is not implemented", out)

        req = Request.__new__(Request)
        req.limit = PAST_LIMIT_DEFAULT
        req.http10 = s[v + 7] == c'0'
        self._head_method = method == M_HEAD
        self._req = req
        self._phase = PH_HEAD
        if s[t] != c'/':
            # asterisk-form, absolute-form, authority-form: well framed, but
            # AccMan serves paths only.
            self._pending = bad_query("the request target must be a path such as /tot (origin-form)")
            return 0
        question = <const unsigned char*>memchr(s + t, c'?', j - t)
        path_len = (question - (s + t)) if question != NULL else j - t
        route = route_of(s + t, path_len)
        if route == R_NONE:
            self._pending = HttpError(
                404, "not_found", "no such path: the routes are /tot /mod /past /health /metrics")
        elif method != route_method(route):
            allow = "PATCH" if route == R_MOD else "GET"
            self._pending = HttpError(
                405, "method_not_allowed", f"{ROUTE_PATHS[route]} accepts only {allow}",
                allow=allow)
        elif question == NULL:
            self._pending = self._query(req, route, s + j, 0)
        else:
            self._pending = self._query(req, route, question + 1, s + j - question - 1)
        if self._pending is None:
            req.route = route
        return 0

    cdef int _fail_request_line(self, const unsigned char* s, Py_ssize_t n,
                                Py_ssize_t at, list out) except -1:
        if at < n and s[at] == CR:
            return self._fail(400, "a bare CR (not followed by LF) in the request line", out)
        return self._fail(400, "the request line must be METHOD SP /path SP HTTP/1.1", out)

    cdef object _query(self, Request req, int route, const unsigned char* q,
                       Py_ssize_t n):
        """Validate the query q[0:n] of `route` and set its values on req;
        return the HttpError of the first fault, or None.  Nothing is
        percent-decoded (SPEC "Values")."""
        cdef int allowed = route_params(route), seen = 0, param
        cdef Py_ssize_t i = 0, end, name_len, value_len
        cdef Py_ssize_t cred_at = 0, cred_len = 0, key_at = 0, key_len = 0
        cdef const unsigned char* amp
        cdef const unsigned char* eq
        cdef const unsigned char* value
        cdef int64_t by = 0, min_ = 0, limit = PAST_LIMIT_DEFAULT, before = 0
        while n > 0:
            amp = <const unsigned char*>memchr(q + i, c'&', n - i)
            end = (amp - q) if amp != NULL else n
            if end == i:
                return bad_query("the query has an empty parameter (a leading, trailing or doubled &)")
            eq = <const unsigned char*>memchr(q + i, c'=', end - i)
            name_len = (eq - (q + i)) if eq != NULL else end - i
            if name_len == 0:
                return bad_query("a query parameter has an empty name")
            param = param_of(q + i, name_len)
            if not (param & allowed):
                return bad_query(f"unknown parameter '{quoted(q + i, name_len)}' for {ROUTE_PATHS[route]}")
            name = PARAM_NAMES[param]
            if eq == NULL:
                return bad_query(f"parameter '{name}' has no value: name=value expected")
            if seen & param:
                return bad_query(f"parameter '{name}' appears twice")
            seen |= param
            value = eq + 1
            value_len = q + end - value
            if value_len == 0:
                return bad_query(f"parameter '{name}' is empty")
            if param == P_CRED:
                # The value is never quoted back: it is a credential.
                if not valid_name_bytes(value, value_len, CRED_CHARS_MAX):
                    return bad_query(f"cred must be 1 to {CRED_CHARS_MAX} characters from A-Z a-z 0-9 _ -")
                cred_at = value - q
                cred_len = value_len
            elif param == P_BY:
                if not parse_int64(value, value_len, INT_NEGATIVE_OK, &by):
                    return bad_query("by must be a non-zero signed 64-bit decimal integer, "
                                     f"got '{quoted(value, value_len)}'")
            elif param == P_MIN:
                if not parse_int64(value, value_len, INT_NEGATIVE_OK | INT_ZERO_OK, &min_):
                    return bad_query("min must be a signed 64-bit decimal integer, "
                                     f"got '{quoted(value, value_len)}'")
            elif param == P_KEY:
                if not valid_name_bytes(value, value_len, KEY_CHARS_MAX):
                    return bad_query(f"key must be 1 to {KEY_CHARS_MAX} characters from A-Z a-z 0-9 _ -")
                key_at = value - q
                key_len = value_len
            elif param == P_LIMIT:
                if not parse_int64(value, value_len, 0, &limit) or limit > PAST_LIMIT_MAX:
                    return bad_query(f"limit must be a decimal integer from 1 to {PAST_LIMIT_MAX}, "
                                     f"got '{quoted(value, value_len)}'")
            else:
                assert param == P_BEFORE
                if not parse_int64(value, value_len, 0, &before):
                    return bad_query("before must be a seq: a positive signed 64-bit decimal integer, "
                                     f"got '{quoted(value, value_len)}'")
            if amp == NULL:
                break
            i = end + 1
        if (allowed & P_CRED) and not (seen & P_CRED):
            return bad_query("parameter 'cred' is required")
        if route == R_MOD and not (seen & P_BY):
            return bad_query("parameter 'by' is required")
        if seen & P_CRED:
            req.cred = (<const char*>q)[cred_at:cred_at + cred_len].decode("ascii")
        if seen & P_BY:
            req.by = by
        if seen & P_MIN:
            req.min = min_
        if seen & P_KEY:
            req.key = (<const char*>q)[key_at:key_at + key_len].decode("ascii")
        req.limit = limit
        if seen & P_BEFORE:
            req.before = before
        return None

    # --- header lines ---------------------------------------------------------

    cdef int _header(self, const unsigned char* s, Py_ssize_t n, list out) except -1:
        """s[0:n]: one header line without CRLF, n >= 1."""
        cdef Py_ssize_t i = 0, a, e
        cdef unsigned char c = s[0]
        if c == SP or c == HT:
            return self._fail(400, "obs-fold (a header line that starts with whitespace) is not accepted", out)
        while i < n and TOKEN[s[i]]:
            i += 1
        if i == n or memchr(s + i, c':', n - i) == NULL:
            return self._fail(400, "a header line has no colon", out)
        c = s[i]
        if c != c':':
            if c == SP or c == HT:
                return self._fail(400, "whitespace between a header name and its colon", out)
            if c == CR:
                return self._fail(400, "a bare CR (not followed by LF) in a header line", out)
            return self._fail(400, "a header name has a byte that is not a token character", out)
        if i == 0:
            return self._fail(400, "a header line has an empty name", out)
        for a in range(i + 1, n):
            if not VALUE[s[a]]:
                if s[a] == CR:
                    return self._fail(400, "a bare CR (not followed by LF) in a header line", out)
                return self._fail(400, "a header value has a control character", out)
        a = i + 1
        e = n
        while a < e and (s[a] == SP or s[a] == HT):
            a += 1
        while e > a and (s[e - 1] == SP or s[e - 1] == HT):
            e -= 1
        if i == 4 and ci_equal(s, b"host", 4):
            return self._host(s + a, e - a, out)
        if i == 10 and ci_equal(s, b"connection", 10):
            return self._connection(s + a, e - a, out)
        if i == 13 and ci_equal(s, b"authorization", 13):
            return self._authorization(s + a, e - a)
        if i == 14 and ci_equal(s, b"content-length", 14):
            return self._content_length(s + a, e - a, out)
        if i == 17 and ci_equal(s, b"transfer-encoding", 17):
            if self._cl_seen:
                return self._fail(400, "Content-Length with Transfer-Encoding is ambiguous framing", out)
            return self._fail(400, "Transfer-Encoding is not accepted: the routes take no body", out)
        return 0

    cdef int _host(self, const unsigned char* v, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t i
        self._hosts += 1
        if self._hosts > 1:
            return self._fail(400, "a request must have at most one Host header", out)
        for i in range(n):
            if not HOST[v[i]]:
                return self._fail(400, "the Host header must be host[:port]", out)
        return 0

    cdef int _connection(self, const unsigned char* v, Py_ssize_t n, list out) except -1:
        """A comma-separated list of tokens; empty elements are allowed
        (RFC 9110 5.6.1)."""
        cdef Py_ssize_t i = 0, j, a, e
        while i <= n:
            a = i
            while i < n and v[i] != c',':
                i += 1
            e = i
            i += 1
            while a < e and (v[a] == SP or v[a] == HT):
                a += 1
            while e > a and (v[e - 1] == SP or v[e - 1] == HT):
                e -= 1
            for j in range(a, e):
                if not TOKEN[v[j]]:
                    return self._fail(400, "the Connection header must be a comma-separated list of tokens", out)
            if e - a == 5 and ci_equal(v + a, b"close", 5):
                self._conn_close = True
            elif e - a == 10 and ci_equal(v + a, b"keep-alive", 10):
                self._conn_keep_alive = True
        return 0

    cdef int _authorization(self, const unsigned char* v, Py_ssize_t n) except -1:
        """`Bearer <b64token>` (RFC 6750 2.1) sets the request's token.  A
        malformed or repeated Authorization leaves it None: the server's 401."""
        cdef Py_ssize_t i = 6, a
        self._req.token = None
        if self._auth_seen:
            return 0
        self._auth_seen = True
        if n < 8 or not ci_equal(v, b"bearer", 6) or v[6] != SP:
            return 0
        while i < n and v[i] == SP:
            i += 1
        a = i
        while i < n and B64TOKEN[v[i]]:
            i += 1
        if i == a:
            return 0
        while i < n and v[i] == c'=':
            i += 1
        if i != n:
            return 0
        self._req.token = (<const char*>v)[a:n]
        return 0

    cdef int _content_length(self, const unsigned char* v, Py_ssize_t n, list out) except -1:
        cdef Py_ssize_t i, cl = 0
        if self._cl_seen:
            return self._fail(400, "two Content-Length headers are ambiguous framing", out)
        self._cl_seen = True
        if n == 0:
            return self._fail(400, "Content-Length must be decimal digits", out)
        for i in range(n):
            if not (c'0' <= v[i] <= c'9'):
                return self._fail(400, "Content-Length must be decimal digits", out)
            if cl <= BODY_BYTES_MAX:        # stops growing once over: no overflow
                cl = cl * 10 + (v[i] - c'0')
        if cl > BODY_BYTES_MAX:
            return self._fail(413, f"the body is over {BODY_BYTES_MAX} bytes: the routes take no body", out)
        self._cl = cl
        return 0

    cdef int _end_of_head(self, list out) except -1:
        cdef Request req = self._req
        if not req.http10 and self._hosts != 1:
            return self._fail(400, "an HTTP/1.1 request needs a Host header", out)
        if req.http10:
            req.keep_alive = self._conn_keep_alive and not self._conn_close
        else:
            req.keep_alive = not self._conn_close
        if self._head_method:
            # No route serves HEAD: its 405/404 reply carries a body that a
            # HEAD client will not read, so the stream cannot continue in
            # step after it.  Close once it is sent.
            req.keep_alive = False
        if self._cl > 0:
            self._phase = PH_BODY
            self._body_left = self._cl
            return 0
        return self._emit(out)

    # --- results --------------------------------------------------------------

    cdef int _emit(self, list out) except -1:
        """The current request is complete: return it, ready for the next."""
        cdef Request req = self._req
        if self._pending is not None:
            req.error = self._pending
            req.route = R_NONE
            self._pending = None
        out.append(req)
        self._req = None
        self._phase = PH_START
        self._head_bytes = 0
        self._header_lines = 0
        self._hosts = 0
        self._cl_seen = False
        self._cl = 0
        self._conn_close = False
        self._conn_keep_alive = False
        self._auth_seen = False
        return 0

    cdef int _fail(self, int status, str detail, list out) except -1:
        """A framing error: return it as the last request and read no more."""
        cdef Request req = self._req
        if req is None:
            req = Request.__new__(Request)
        req.route = R_NONE
        req.cred = None
        req.by = 0
        req.min = None
        req.key = None
        req.limit = PAST_LIMIT_DEFAULT
        req.before = None
        req.keep_alive = False
        req.error = HttpError(status, CODES[status], detail, close=True)
        out.append(req)
        self._req = None
        self._pending = None
        self._phase = PH_DEAD
        self._line_len = 0      # the buffer itself may hold the line being read: freed in __dealloc__
        return 0

    cdef int _fail_request_line_too_long(self, list out) except -1:
        return self._fail(414, f"the request line is over {REQUEST_LINE_BYTES_MAX} bytes", out)

    cdef int _fail_headers_too_large(self, list out) except -1:
        return self._fail(431, f"the request headers are over {HEADER_BYTES_MAX} bytes", out)
