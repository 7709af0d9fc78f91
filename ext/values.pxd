# cython: language_level=3
"""C-level validators of the SPEC's values, shared by ext/wire.pyx (raw query
bytes) and ext/ledger.pyx (str arguments of the Python API), so that the wire
and the API can never disagree on what a cred, a key or a number is.

Everything here is inline: cimporting this file adds no runtime module.
Python's int() is never used on input: it accepts '+5', ' 5', '1_000' and
non-ASCII digits, all of which the SPEC refuses.
"""

from libc.stdint cimport int64_t, uint64_t, INT64_MAX


cdef inline bint name_char(Py_UCS4 c) noexcept nogil:
    """True for the characters of a cred or a key: A-Z a-z 0-9 _ -"""
    return ((c'a' <= c <= c'z') or (c'A' <= c <= c'Z') or (c'0' <= c <= c'9')
            or c == c'_' or c == c'-')


cdef inline bint valid_name_bytes(const unsigned char* p, Py_ssize_t n,
                                  Py_ssize_t max_chars) noexcept nogil:
    """True if p[0:n] is 1..max_chars name characters (see name_char)."""
    cdef Py_ssize_t i
    if n < 1 or n > max_chars:
        return False
    for i in range(n):
        if not name_char(p[i]):
            return False
    return True


cdef inline bint valid_name(str s, Py_ssize_t max_chars) noexcept:
    """True if s is 1..max_chars name characters (see name_char); False for
    None.  Non-ASCII letters and digits are refused: they are not name_char."""
    cdef Py_UCS4 c
    if s is None:
        return False
    if len(s) < 1 or len(s) > max_chars:
        return False
    for c in s:
        if not name_char(c):
            return False
    return True


# Flags of parse_int64.
cdef enum:
    INT_NEGATIVE_OK = 1     # a leading '-' is allowed (by, min)
    INT_ZERO_OK = 2         # "0" is allowed (min); "-0" never is


cdef inline bint parse_int64(const unsigned char* p, Py_ssize_t n, int flags,
                             int64_t* out) noexcept nogil:
    """Parse p[0:n] as the SPEC's plain ASCII decimal, -?(0|[1-9][0-9]*), into
    out[0].  False, out untouched, when the text is anything else: empty, a
    '+', spaces, leading zeros, '-0', non-ASCII digits, a value outside
    signed 64-bit range, a '-' without INT_NEGATIVE_OK, or 0 without
    INT_ZERO_OK.  Overflow is checked before each digit is added, in unsigned
    arithmetic, so no intermediate value ever wraps."""
    cdef Py_ssize_t i = 0
    cdef bint negative = False
    cdef uint64_t magnitude = 0, bound, digit
    if n > 0 and p[0] == c'-':
        if not (flags & INT_NEGATIVE_OK):
            return False
        negative = True
        i = 1
    if i >= n:
        return False
    if p[i] == c'0':
        # "0" alone; never "-0" and never a leading zero.
        if n - i != 1 or negative or not (flags & INT_ZERO_OK):
            return False
        out[0] = 0
        return True
    # |INT64_MIN| is one more than INT64_MAX.
    bound = <uint64_t>INT64_MAX + negative
    while i < n:
        if p[i] < c'0' or p[i] > c'9':
            return False
        digit = p[i] - c'0'
        if magnitude > (bound - digit) // 10:
            return False
        magnitude = magnitude * 10 + digit
        i += 1
    if negative:
        # -(magnitude - 1) - 1 reaches INT64_MIN without a signed overflow.
        out[0] = -<int64_t>(magnitude - 1) - 1
    else:
        out[0] = <int64_t>magnitude
    return True
