# The header lines of a request head, each checked as it completes, and the
# body's framing judged from them once the blank line ends the head (RFC 9110
# 5, RFC 9112 5 and 6).  Included by wire.pyx, after its Parser, whose fields
# they set and whose _fail answers a fault; no I/O.
#
# A line's fault is answered at once, and closes the connection: a head that
# breaks the framing rules cannot be trusted to say where the next request
# starts.  What only the whole head can say (a Transfer-Encoding alone, a
# missing Host, a body over BODY_BYTES_MAX) is judged at its end.


cdef int header_line(Parser parser, const unsigned char* s, Py_ssize_t n, list out) except -1:
    """s[0:n]: one header line without CRLF, n >= 1."""
    cdef Py_ssize_t i = 0, a, e
    cdef unsigned char c = s[0]
    if c == SP or c == HT:
        return parser._fail(400, "obs-fold (a header line that starts with whitespace) is "
                                 "not accepted", out)
    while i < n and TOKEN[s[i]]:
        i += 1
    if i == n or memchr(s + i, c':', n - i) == NULL:
        return parser._fail(400, "a header line has no colon", out)
    c = s[i]
    if c != c':':
        if c == SP or c == HT:
            return parser._fail(400, "whitespace between a header name and its colon", out)
        return parser._fail(400, "a header name has a byte that is not a token character", out)
    if i == 0:
        return parser._fail(400, "a header line has an empty name", out)
    for a in range(i + 1, n):
        if not VALUE[s[a]]:
            return parser._fail(400, "a header value has a control character", out)
    a = i + 1
    e = n
    while a < e and (s[a] == SP or s[a] == HT):
        a += 1
    while e > a and (s[e - 1] == SP or s[e - 1] == HT):
        e -= 1
    if i == 4 and ci_equal(s, b"host", 4):
        return _host(parser, s + a, e - a, out)
    if i == 10 and ci_equal(s, b"connection", 10):
        return _connection(parser, s + a, e - a, out)
    if i == 13 and ci_equal(s, b"authorization", 13):
        read_authorization(parser._req, s + a, e - a, parser._auth_seen)
        parser._auth_seen = True
        return 0
    if i == 14 and ci_equal(s, b"content-length", 14):
        return _content_length(parser, s + a, e - a, out)
    if i == 6 and ci_equal(s, b"expect", 6):
        if e - a == 12 and ci_equal(s + a, b"100-continue", 12):
            parser._expect_continue = True
        return 0
    if i == 17 and ci_equal(s, b"transfer-encoding", 17):
        # Alone, judged at the end of the head (end_of_head): ambiguity
        # is refused first, whatever the order of the framing headers.
        if parser._cl_seen:
            return parser._fail(400, AMBIGUOUS_CL_TE, out)
        parser._te_seen = True
        # The codings end with the last line's (RFC 9110 5.3: lines join in order).
        parser._te_chunked = last_element_is(s + a, e - a, b"chunked", 7)
    return 0


cdef int _host(Parser parser, const unsigned char* v, Py_ssize_t n, list out) except -1:
    cdef Py_ssize_t i
    parser._hosts += 1
    if parser._hosts > 1:
        return parser._fail(400, "a request must have at most one Host header", out)
    if not host_shape_ok(v, n):
        return parser._fail(400, "the Host header must be host[:port], a port at most "
                                 f"{PORT_MAX}", out)
    if not parser._absolute:
        parser._req.loopback_host = host_is_loopback(v, n)
    return 0


cdef int _connection(Parser parser, const unsigned char* v, Py_ssize_t n, list out) except -1:
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
                return parser._fail(400, "the Connection header must be a comma-separated "
                                         "list of tokens", out)
        if e - a == 5 and ci_equal(v + a, b"close", 5):
            parser._conn_close = True
        elif e - a == 10 and ci_equal(v + a, b"keep-alive", 10):
            parser._conn_keep_alive = True
    return 0


cdef int _content_length(Parser parser, const unsigned char* v, Py_ssize_t n,
                         list out) except -1:
    cdef Py_ssize_t i, cl = 0
    if parser._cl_seen:
        return parser._fail(400, "two Content-Length headers are ambiguous framing", out)
    if parser._te_seen:
        return parser._fail(400, AMBIGUOUS_CL_TE, out)
    parser._cl_seen = True
    if n == 0:
        return parser._fail(400, "Content-Length must be decimal digits", out)
    for i in range(n):
        if not (c'0' <= v[i] <= c'9'):
            return parser._fail(400, "Content-Length must be decimal digits", out)
        if cl <= BODY_BYTES_MAX:        # stops growing once over: no overflow
            cl = cl * 10 + (v[i] - c'0')
    parser._cl = cl               # over BODY_BYTES_MAX: 413 at the end of the head
    return 0


cdef int end_of_head(Parser parser, list out) except -1:
    cdef Request req = parser._req
    # The body's framing is judged once every header is read: ambiguity
    # (a second Content-Length, or one beside Transfer-Encoding) is
    # refused as it comes, so no order of the headers answers otherwise.
    if parser._te_seen and req.http10:       # RFC 9112 6.1: a faulty framing
        return parser._fail(400, "Transfer-Encoding in an HTTP/1.0 request is faulty "
                                 "framing", out)
    if parser._te_seen and not parser._te_chunked:     # RFC 9112 6.3: no knowable length
        return parser._fail(400, "Transfer-Encoding does not end in chunked: the body's "
                                 "length cannot be known", out)
    if parser._te_seen:
        # RFC 9112 6.3: a body without a Content-Length.
        return parser._fail(411, "a body needs a Content-Length (Transfer-Encoding is not "
                                 "accepted: the routes take no body)", out)
    if parser._cl > BODY_BYTES_MAX:
        return parser._fail(413, f"the body is over {BODY_BYTES_MAX} bytes: the routes take "
                                 "no body", out)
    if not req.http10 and parser._hosts != 1:
        return parser._fail(400, "an HTTP/1.1 request needs a Host header", out)
    if req.http10:
        req.keep_alive = parser._conn_keep_alive and not parser._conn_close
    else:
        req.keep_alive = not parser._conn_close
    if parser._cl > 0:
        parser._phase = PH_BODY
        parser._body_left = parser._cl
        # RFC 9110 10.1.1: an HTTP/1.0 client's expectation is ignored.
        parser._continue = parser._expect_continue and not req.http10
        return 0
    return parser._emit(out)
