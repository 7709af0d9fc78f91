# The request-target of AccMan's routes: methods, paths, query parameters
# and their values (SPEC "Routes" and "Values").  Included by wire.pyx, after
# its Request class; no I/O, and nothing is percent-decoded.

# --- routes: Request.route is one of these, 0 when the request is an error ---
cdef enum:
    R_NONE = 0
    R_TOT = 1
    R_MOD = 2
    R_PAST = 3
    R_HEALTH = 4
    R_METRICS = 5
    R_HOLD = 6
    R_SETTLE = 7
    R_EVENTS = 8
    R_OPTIONS = 9       # OPTIONS on a known path (or *): 204 with `allow`

ROUTE_TOT = R_TOT
ROUTE_MOD = R_MOD
ROUTE_PAST = R_PAST
ROUTE_HEALTH = R_HEALTH
ROUTE_METRICS = R_METRICS
ROUTE_HOLD = R_HOLD
ROUTE_SETTLE = R_SETTLE
ROUTE_EVENTS = R_EVENTS
ROUTE_OPTIONS = R_OPTIONS

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
    P_TTL = 64
    P_HOLD = 128
    P_USE = 256
    P_AFTER = 512
    P_WAIT = 1024
    P_LOW = 2048

ROUTE_PATHS = {R_TOT: "/tot", R_MOD: "/mod", R_PAST: "/past", R_HEALTH: "/health",
               R_METRICS: "/metrics", R_HOLD: "/hold", R_SETTLE: "/settle",
               R_EVENTS: "/events"}
PARAM_NAMES = {P_CRED: "cred", P_BY: "by", P_MIN: "min", P_KEY: "key",
               P_LIMIT: "limit", P_BEFORE: "before", P_TTL: "ttl", P_HOLD: "hold",
               P_USE: "use", P_AFTER: "after", P_WAIT: "wait", P_LOW: "low"}
_ROUTE_LIST = " ".join(ROUTE_PATHS[r] for r in sorted(ROUTE_PATHS))
ALLOW_GET = "GET, HEAD, OPTIONS"
ALLOW_PATCH = "PATCH, OPTIONS"
ALLOW_ANY = "GET, HEAD, PATCH, OPTIONS"


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
        if memcmp(s, b"/hold", 5) == 0:
            return R_HOLD
    elif n == 7:
        if memcmp(s, b"/health", 7) == 0:
            return R_HEALTH
        if memcmp(s, b"/settle", 7) == 0:
            return R_SETTLE
        if memcmp(s, b"/events", 7) == 0:
            return R_EVENTS
    elif n == 8:
        if memcmp(s, b"/metrics", 8) == 0:
            return R_METRICS
    return R_NONE


cdef inline bint route_patches(int route) noexcept nogil:
    """True for the routes that change state: PATCH; the others are GET."""
    return route == R_MOD or route == R_HOLD or route == R_SETTLE


cdef inline int route_params(int route) noexcept nogil:
    if route == R_TOT:
        return P_CRED
    if route == R_MOD:
        return P_CRED | P_BY | P_MIN | P_KEY | P_LOW
    if route == R_PAST:
        return P_CRED | P_LIMIT | P_BEFORE
    if route == R_HOLD:
        return P_CRED | P_BY | P_TTL | P_MIN | P_KEY
    if route == R_SETTLE:
        return P_CRED | P_HOLD | P_USE
    if route == R_EVENTS:
        return P_AFTER | P_LIMIT | P_WAIT
    return 0


cdef inline int route_requires(int route) noexcept nogil:
    if route == R_TOT or route == R_PAST:
        return P_CRED
    if route == R_MOD:
        return P_CRED | P_BY
    if route == R_HOLD:
        return P_CRED | P_BY | P_TTL
    if route == R_SETTLE:
        return P_CRED | P_HOLD | P_USE
    return 0


cdef int param_of(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    if n == 2 and memcmp(s, b"by", 2) == 0:
        return P_BY
    if n == 3:
        if memcmp(s, b"min", 3) == 0:
            return P_MIN
        if memcmp(s, b"key", 3) == 0:
            return P_KEY
        if memcmp(s, b"ttl", 3) == 0:
            return P_TTL
        if memcmp(s, b"use", 3) == 0:
            return P_USE
        if memcmp(s, b"low", 3) == 0:
            return P_LOW
    elif n == 4:
        if memcmp(s, b"cred", 4) == 0:
            return P_CRED
        if memcmp(s, b"hold", 4) == 0:
            return P_HOLD
        if memcmp(s, b"wait", 4) == 0:
            return P_WAIT
    elif n == 5:
        if memcmp(s, b"limit", 5) == 0:
            return P_LIMIT
        if memcmp(s, b"after", 5) == 0:
            return P_AFTER
    elif n == 6 and memcmp(s, b"before", 6) == 0:
        return P_BEFORE
    return 0


cdef object bad_query(str detail):
    """A 400 for the query: the framing is intact, the connection stays."""
    return HttpError(400, "bad_request", detail)


cdef object bad_target(str detail):
    """A 400 for a request target of no form HTTP/1.1 has: the request line
    is malformed, a framing error (SPEC "Errors"): answered, then closed."""
    return HttpError(400, "bad_request", detail, close=True)


# --- numeric values --------------------------------------------------------------
# Each numeric parameter: the grammar flags of parse_int64, its range, and
# the rule an error states.

cdef int64_t EVENTS_WAIT_S_MAX_ = _limits.EVENTS_WAIT_S_MAX
cdef int64_t HOLD_TTL_S_MAX_ = _limits.HOLD_TTL_S_MAX
cdef int64_t LIMIT_MAX = max(_limits.PAST_LIMIT_MAX, _limits.EVENTS_LIMIT_MAX)

_NUMBER_RULES = {
    P_BY: "a non-zero signed 64-bit decimal integer",
    P_MIN: "a signed 64-bit decimal integer",
    P_LOW: "a signed 64-bit decimal integer",
    P_LIMIT: f"a decimal integer from 1 to {_limits.PAST_LIMIT_MAX}",
    P_BEFORE: "a seq: a positive signed 64-bit decimal integer",
    P_TTL: f"a whole number of seconds from 1 to {_limits.HOLD_TTL_S_MAX}",
    P_HOLD: "a hold id: a positive signed 64-bit decimal integer",
    P_USE: "an amount from 0 to the held amount: a decimal integer",
    P_AFTER: f"an event id: a decimal integer from 0 to {_limits.INT64_MAX}",
    P_WAIT: f"a whole number of seconds from 0 to {_limits.EVENTS_WAIT_S_MAX}",
}
# /events' limit has a bound of its own.
_EVENTS_LIMIT_RULE = f"a decimal integer from 1 to {_limits.EVENTS_LIMIT_MAX}"


cdef str _number_rule(int param, int route):
    """The rule of `param`'s values on `route`, as its 400 states it."""
    if param == P_LIMIT and route == R_EVENTS:
        return _EVENTS_LIMIT_RULE
    return _NUMBER_RULES[param]


cdef inline bint number_ok(int param, const unsigned char* v, Py_ssize_t n,
                           int64_t* out) noexcept nogil:
    """Parses v[0:n] as the value of the numeric `param` within its range."""
    if param == P_BY:
        return parse_int64(v, n, INT_NEGATIVE_OK, out)
    if param == P_MIN or param == P_LOW:
        return parse_int64(v, n, INT_NEGATIVE_OK | INT_ZERO_OK, out)
    if param == P_LIMIT:
        return parse_int64(v, n, 0, out) and out[0] <= LIMIT_MAX
    if param == P_BEFORE or param == P_HOLD:
        return parse_int64(v, n, 0, out)
    if param == P_TTL:
        return parse_int64(v, n, 0, out) and out[0] <= HOLD_TTL_S_MAX_
    if param == P_USE or param == P_AFTER:
        return parse_int64(v, n, INT_ZERO_OK, out)
    if param == P_WAIT:
        return parse_int64(v, n, INT_ZERO_OK, out) and out[0] <= EVENTS_WAIT_S_MAX_
    return False


cdef object _set_number(Request req, int param, int64_t value):
    if param == P_BY:
        req.by = value
    elif param == P_MIN:
        req.min = value
    elif param == P_LOW:
        req.low = value
    elif param == P_LIMIT:
        req.limit = value
    elif param == P_BEFORE:
        req.before = value
    elif param == P_TTL:
        req.ttl = value
    elif param == P_HOLD:
        req.hold = value
    elif param == P_USE:
        req.use = value
    elif param == P_AFTER:
        req.after = value
    else:
        assert param == P_WAIT
        req.wait = value
    return None


cdef str _not_its_parameter(int param, int route):
    """The detail for a parameter `route` does not take: a name of another
    route's is quoted; any other is not (`cred:SECRET`, `cred%3DSECRET`: a
    credential whose = was mistyped is never quoted back), and the route's
    names are listed."""
    cdef int allowed = route_params(route)
    path = ROUTE_PATHS[route]
    names = ", ".join(PARAM_NAMES[p] for p in sorted(PARAM_NAMES) if p & allowed) or "none"
    if param:
        return f"unknown parameter '{PARAM_NAMES[param]}' for {path} (it takes {names})"
    return (f"unknown parameter for {path} (its name is not quoted back: it may hold a "
            f"credential; {path} takes {names})")


cdef object parse_query(Request req, int route, const unsigned char* q, Py_ssize_t n):
    """Validate the query q[0:n] of `route` and set its values on req;
    return the HttpError of the first fault, or None."""
    cdef int allowed = route_params(route), seen = 0, param
    cdef Py_ssize_t i = 0, end, name_len, value_len
    cdef const unsigned char* amp
    cdef const unsigned char* eq
    cdef const unsigned char* value
    cdef int64_t number = 0
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
            return bad_query(_not_its_parameter(param, route))
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
                return bad_query(f"cred must be 1 to {CRED_CHARS_MAX} characters "
                                 "from A-Z a-z 0-9 _ -")
            req.cred = (<const char*>value)[:value_len].decode("ascii")
        elif param == P_KEY:
            if not valid_name_bytes(value, value_len, KEY_CHARS_MAX):
                return bad_query(f"key must be 1 to {KEY_CHARS_MAX} characters "
                                 "from A-Z a-z 0-9 _ -")
            req.key = (<const char*>value)[:value_len].decode("ascii")
        elif number_ok(param, value, value_len, &number):
            _set_number(req, param, number)
        else:
            return bad_query(f"{name} must be {_number_rule(param, route)}, "
                             f"got {shown_number(value, value_len)}")
        if amp == NULL:
            break
        i = end + 1
    return _route_rules(req, route, seen)


cdef object _route_rules(Request req, int route, int seen):
    """What one route asks beyond each value's own grammar."""
    cdef int missing = route_requires(route) & ~seen
    cdef int param
    for param in (P_CRED, P_BY, P_TTL, P_HOLD, P_USE):
        if missing & param:
            return bad_query(f"parameter '{PARAM_NAMES[param]}' is required")
    if ((route == R_PAST and req.limit > _limits.PAST_LIMIT_MAX)
            or (route == R_EVENTS and req.limit > _limits.EVENTS_LIMIT_MAX)):
        return bad_query(f"limit must be {_number_rule(P_LIMIT, route)}, got '{req.limit}'")
    if route == R_MOD and (seen & P_LOW) and req.by < 0:
        return bad_query("low is set by a funding mod only (by > 0), not by a charge")
    if route == R_HOLD and req.by >= 0:
        return bad_query("by must be negative for a hold: the amount it takes "
                         f"out of the balance, got '{req.by}'")
    if route == R_HOLD and req.by == C_INT64_MIN:
        # The ledger's own rule (the amount, -by, is a signed 64-bit
        # integer), checked here so that the reply is a bad query like
        # any other: counted as one, answered before the store is asked.
        return bad_query(f"by must be from {-_limits.INT64_MAX} to -1 for a hold: the amount "
                         f"it takes is a signed 64-bit integer, got '{req.by}'")
    return None


# --- the request target ------------------------------------------------------------

cdef inline bint ci_prefix(const unsigned char* s, Py_ssize_t n, const char* lower,
                           Py_ssize_t k) noexcept nogil:
    return n >= k and ci_equal(s, lower, k)


cdef bint host_is_loopback(const unsigned char* h, Py_ssize_t n) noexcept nogil:
    """True when the uri-host [":" port] h[0:n] names this machine by a
    loopback name: localhost, 127.x.y.z or [::1] (SPEC "Access": with no
    tokens configured, nothing else is answered).  The port may be empty
    (RFC 3986 3.2.3: the same as none)."""
    cdef Py_ssize_t i, end = n, dots = 0, digits = 0, octet = 0
    if n >= 1 and h[0] == c'[':
        end = 1
        while end < n and h[end] != c']':
            end += 1
        return (end < n and _ipv6_is_loopback(h + 1, end - 1)
                and (end + 1 == n or (h[end + 1] == c':'
                                      and (end + 2 == n or _all_digits(h + end + 2, n - end - 2)))))
    i = n - 1
    while i >= 0 and c'0' <= h[i] <= c'9':
        i -= 1
    if i >= 0 and h[i] == c':':
        end = i                     # a port, or an empty one
    if end == 9 and ci_equal(h, b"localhost", 9):
        return True
    if not ci_prefix(h, end, b"127.", 4):
        return False
    for i in range(4, end):
        if h[i] == c'.':
            if digits == 0:
                return False
            dots += 1
            digits = octet = 0
        elif c'0' <= h[i] <= c'9':
            digits += 1
            octet = octet * 10 + (h[i] - c'0')
            if digits > 3 or octet > 255:
                return False
        else:
            return False
    return dots == 2 and digits > 0


cdef inline int _hex_value(unsigned char c) noexcept nogil:
    if c'0' <= c <= c'9':
        return c - c'0'
    c |= 0x20
    return c - c'a' + 10 if c'a' <= c <= c'f' else -1


cdef bint _ipv6_is_loopback(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """s[0:n], an IP-literal without its brackets, is the address ::1 in any
    of its spellings (RFC 4291 2.2: leading zeros, one :: for zero groups,
    the last two groups as an IPv4 address), as the --host check reads it:
    [0:0:0:0:0:0:0:1] and [::0.0.0.1] name it as [::1] does."""
    cdef Py_ssize_t i = 0, groups = 0, digits
    cdef int nonzero = 0
    cdef long value = 0
    cdef bint gap = n >= 2 and s[0] == c':' and s[1] == c':'
    if gap:
        i = 2
    while i < n:
        if n - i == 7 and memcmp(s + i, b"0.0.0.1", 7) == 0:
            # The last 32 bits written as IPv4 (a leading zero is refused, as
            # ipaddress refuses it): groups 0 and 1.
            groups += 2
            nonzero += 1
            value = 1
            i = n
            break
        digits = 0
        value = 0
        while i < n and digits < 5 and _hex_value(s[i]) >= 0:
            value = value * 16 + _hex_value(s[i])
            digits += 1
            i += 1
        if digits == 0 or digits > 4:
            return False
        groups += 1
        nonzero += value != 0
        if i == n:
            break
        if s[i] != c':' or i + 1 == n:
            return False
        i += 1
        if s[i] == c':':
            if gap or i + 1 == n:
                return False    # a second ::, or a :: last: its last group is 0
            gap = True
            i += 1
    return (i == n and groups > 0 and value == 1 and nonzero == 1
            and (groups <= 7 if gap else groups == 8))


cdef inline bint _all_digits(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    if n < 1:
        return False
    for i in range(n):
        if not (c'0' <= s[i] <= c'9'):
            return False
    return True


cdef enum:
    PORT_MAX = 65535       # the largest TCP port


cdef inline bint _port_ok(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """s[0:n] is a port: digits (leading zeros allowed, RFC 3986 3.2.3) of
    at most PORT_MAX, the largest TCP port."""
    cdef Py_ssize_t i
    cdef long port = 0
    if n < 1:
        return False
    for i in range(n):
        if not (c'0' <= s[i] <= c'9'):
            return False
        port = port * 10 + (s[i] - c'0')
        if port > PORT_MAX:
            return False
    return True


cdef inline bint _host_chars(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    cdef Py_ssize_t i
    for i in range(n):
        if not HOST[s[i]]:
            return False
    return True


cdef bint host_shape_ok(const unsigned char* s, Py_ssize_t n) noexcept nogil:
    """s[0:n] is uri-host [":" port] (RFC 3986 3.2.2, 3.2.3; RFC 9112
    3.2): HOST bytes only; an IP-literal's brackets (an IPv6 address, one
    with a zone id, RFC 6874, or an IPvFuture) at its ends and nowhere
    else; at most one colon outside them, before a port of digits up to
    PORT_MAX; no
    empty host before a port (RFC 9110 4.2.1).  An empty value is allowed
    (RFC 9112 3.2)."""
    cdef Py_ssize_t i = 0, colon = -1
    if not _host_chars(s, n):
        return False
    if n > 0 and s[0] == c'[':
        i = 1
        while i < n and s[i] != c']':
            if s[i] == c'[':
                return False
            i += 1
        if i == n or i == 1:
            return False                    # no closing bracket, or nothing inside
        i += 1
        if i == n:
            return True
        if s[i] != c':':
            return False
        return _port_ok(s + i + 1, n - i - 1) or i + 1 == n
    for i in range(n):
        if s[i] == c'[' or s[i] == c']':
            return False
        if s[i] == c':':
            if colon >= 0:
                return False
            colon = i
    if colon < 0:
        return True
    return colon > 0 and (colon == n - 1 or _port_ok(s + colon + 1, n - colon - 1))


# --- the Authorization header ----------------------------------------------------

cdef int read_authorization(Request req, const unsigned char* v, Py_ssize_t n,
                            bint repeated) except -1:
    """`Bearer <b64token>` (RFC 6750 2.1) sets the request's token.  A
    malformed or repeated Authorization leaves it None, and says which in
    `auth_fault`: the detail of the server's 401."""
    cdef Py_ssize_t i = 6, a
    req.token = None
    if repeated:
        req.auth_fault = "a request must have at most one Authorization header"
        return 0
    req.auth_fault = "the Authorization header must be Bearer, a space and a token"
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
    req.token = (<const char*>v)[a:n]
    req.auth_fault = None
    return 0


# --- a request's values ------------------------------------------------------------

cdef void clear_values(Request req):
    """An error's request carries no route and no values."""
    req.route = R_NONE
    req.cred = None
    req.by = 0
    req.min = None
    req.key = None
    req.limit = PAST_LIMIT_DEFAULT
    req.before = None
    req.ttl = req.hold = req.after = req.wait = 0
    req.use = -1
    req.low = None
    req.allow = None


cdef Request new_request():
    cdef Request req = Request.__new__(Request)
    req.limit = PAST_LIMIT_DEFAULT
    req.use = -1
    req.loopback_host = True
    return req
