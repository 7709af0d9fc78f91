# The byte classes of HTTP/1.1 request parsing and helpers over them.
# Included by wire.pyx; no I/O.

# --- byte classes -------------------------------------------------------------
cdef unsigned char TOKEN[256]      # RFC 9110 tchar: methods, header names, Connection options
cdef unsigned char TARGET[256]     # RFC 3986 pchar, '/', '?', and '[' ']' of an IP-literal authority
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
    for c in alnum + b"-._~!$&'()*+,;=:@/?%[]":
        TARGET[c] = 1
    for c in alnum + b"-._~!$&'()*+,;=%:[]":
        HOST[c] = 1
    for c in TOKEN_CHARS.encode("ascii"):
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


cdef bint last_element_is(const unsigned char* v, Py_ssize_t n, const char* lower,
                          Py_ssize_t k) noexcept nogil:
    """The comma-separated list v[0:n] ends in the element `lower` (k
    bytes), ignoring case; empty elements and the whitespace around each
    are skipped (RFC 9110 5.6.1)."""
    cdef Py_ssize_t e = n, a
    while e > 0 and (v[e - 1] == SP or v[e - 1] == HT or v[e - 1] == c','):
        e -= 1
    a = e
    while a > 0 and v[a - 1] != c',':
        a -= 1
    while a < e and (v[a] == SP or v[a] == HT):
        a += 1
    return e - a == k and ci_equal(v + a, lower, k)


cdef str quoted(const unsigned char* p, Py_ssize_t n):
    """p[0:n] (request-target bytes: printable ASCII) for an error detail."""
    if n > DETAIL_QUOTE_CHARS_MAX:
        return (<const char*>p)[:DETAIL_QUOTE_CHARS_MAX].decode("ascii") + "..."
    return (<const char*>p)[:n].decode("ascii")


cdef str shown_number(const unsigned char* p, Py_ssize_t n):
    """A bad number p[0:n] for an error detail: quoted (cut to
    DETAIL_QUOTE_CHARS_MAX) when it has a number's shape, at most
    NUMBER_LETTERS_MAX letters, not counting the two characters after each
    % (`+5`, `1e3`, `5m`, `%EF%BC%91`), else not: a credential of letters
    sent in a number's place is not quoted back (a credential has no %)."""
    cdef Py_ssize_t k = 0, letters = 0
    while k < n:
        if p[k] == c'%':
            k += 3
            continue
        if c'a' <= p[k] <= c'z' or c'A' <= p[k] <= c'Z':
            letters += 1
        k += 1
    return NOT_SHOWN if letters > NUMBER_LETTERS_MAX else "'" + quoted(p, n) + "'"


cdef inline bint not_a_method(unsigned char c):
    """Whether `c` cannot start a request line: not a method's (a token's)
    first byte, nor the CR or LF of a blank line before it."""
    return not TOKEN[c] and c != CR and c != LF


cdef bint may_be_head(const unsigned char* line, Py_ssize_t n) noexcept:
    """The request line so far, line[0:n], begins with the method HEAD and
    its SP, or, cut short within them, with their first bytes: no other
    method begins with H, so only a HEAD's line (or none) goes on from it."""
    cdef Py_ssize_t k
    cdef const unsigned char* want = <const unsigned char*>b"HEAD "
    if n < 1:
        return False
    for k in range(min(n, 5)):
        if line[k] != want[k]:
            return False
    return True


cdef bint starts_head(const unsigned char* kept, Py_ssize_t kept_n,
                      const unsigned char* rest, Py_ssize_t rest_n) noexcept:
    """The line kept[0:kept_n], then rest[0:rest_n], starts with the method
    HEAD and its SP."""
    cdef Py_ssize_t k
    cdef const unsigned char* want = <const unsigned char*>b"HEAD "
    if kept_n + rest_n < 5:
        return False
    for k in range(5):
        if (kept[k] if k < kept_n else rest[k - kept_n]) != want[k]:
            return False
    return True
