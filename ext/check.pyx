# cython: language_level=3
"""CRC-32C (Castagnoli) and LevelDB's masked form of it, for accman.ledger.fsck,
which checks a data directory's logs and tables before LevelDB opens it;
and the layout of a write-ahead log record over stamped sectors, for
accman.ledger.walsectors.

Table-driven, eight bytes a step ("slicing by 8"), in a C loop with the GIL
released, so that checking a large store costs little more than reading it.
No I/O here: buffers in, numbers out (h11's habit).
"""

from libc.stdint cimport uint8_t, uint32_t
from libc.string cimport memcpy, memset

# The reflected Castagnoli polynomial (RFC 3720, iSCSI), as LevelDB uses.
cdef uint32_t POLY = 0x82F63B78u
# LevelDB stores CRCs "masked" (rotated and offset), because computing the
# CRC of a string that contains embedded CRCs is problematic (crc32c.h).
cdef uint32_t MASK_DELTA = 0xA282EAD8u

# The log format (leveldb doc/log_format.md): 32 KiB blocks; a record is
# crc:4 (masked, of type and payload), length:2 (LE), type:1, payload.
# Defined once, for C, and exported to Python as they are.
cdef enum:
    C_LOG_BLOCK_BYTES = 32768
    C_LOG_HEADER_BYTES = 7
    LOG_TYPE_MAX = 4            # FULL 1, FIRST 2, MIDDLE 3, LAST 4

LOG_BLOCK_BYTES = C_LOG_BLOCK_BYTES
LOG_HEADER_BYTES = C_LOG_HEADER_BYTES

cdef uint32_t TABLE[8][256]


cdef void _init_table() noexcept:
    cdef uint32_t c
    cdef int i, j, k
    for i in range(256):
        c = i
        for j in range(8):
            c = (c >> 1) ^ POLY if c & 1 else c >> 1
        TABLE[0][i] = c
    for i in range(256):
        c = TABLE[0][i]
        for k in range(1, 8):
            c = TABLE[0][c & 0xFF] ^ (c >> 8)
            TABLE[k][i] = c


_init_table()


cdef inline uint32_t _load32(const uint8_t* p) noexcept nogil:
    return (<uint32_t>p[0] | (<uint32_t>p[1] << 8) | (<uint32_t>p[2] << 16)
            | (<uint32_t>p[3] << 24))


cdef uint32_t _extend(uint32_t crc, const uint8_t* p, Py_ssize_t n) noexcept nogil:
    """The CRC-32C of p[0:n] continuing `crc` (0 to start)."""
    cdef uint32_t c = ~crc
    cdef uint32_t lo, hi
    while n >= 8:
        lo = c ^ _load32(p)
        hi = _load32(p + 4)
        c = (TABLE[7][lo & 0xFF] ^ TABLE[6][(lo >> 8) & 0xFF]
             ^ TABLE[5][(lo >> 16) & 0xFF] ^ TABLE[4][lo >> 24]
             ^ TABLE[3][hi & 0xFF] ^ TABLE[2][(hi >> 8) & 0xFF]
             ^ TABLE[1][(hi >> 16) & 0xFF] ^ TABLE[0][hi >> 24])
        p += 8
        n -= 8
    while n > 0:
        c = TABLE[0][(c ^ p[0]) & 0xFF] ^ (c >> 8)
        p += 1
        n -= 1
    return ~c


cdef inline uint32_t _mask(uint32_t crc) noexcept nogil:
    return ((crc >> 15) | (crc << 17)) + MASK_DELTA


def crc32c(const uint8_t[::1] data, uint32_t crc=0) -> int:
    """The CRC-32C of `data` (any contiguous bytes-like), continuing `crc`."""
    cdef Py_ssize_t n = data.shape[0]
    cdef const uint8_t* p = &data[0] if n else NULL
    with nogil:
        crc = _extend(crc, p, n)
    return crc


def mask(uint32_t crc) -> int:
    """LevelDB's masked form of a CRC, as stored in its files."""
    return _mask(crc)


def unmask(uint32_t masked) -> int:
    cdef uint32_t rot = masked - MASK_DELTA
    return (rot >> 17) | (rot << 15)


def block_ok(const uint8_t[::1] buf, Py_ssize_t offset, Py_ssize_t size) -> bool:
    """True if the table block buf[offset:offset+size] and its 5-byte
    trailer (compression type, masked CRC of contents and type) are inside
    `buf` and agree."""
    cdef Py_ssize_t n = buf.shape[0]
    cdef uint32_t crc
    if offset < 0 or size < 0 or offset > n or size + 5 > n - offset:
        return False
    with nogil:
        crc = _mask(_extend(0, &buf[offset], size + 1))
    return crc == _load32(&buf[offset + size + 1])


cdef inline bint _log_record_at(const uint8_t* p, Py_ssize_t offset,
                                Py_ssize_t n) noexcept nogil:
    """True if a whole record with a known type and a matching CRC starts
    at p[offset] and ends inside both the buffer and its 32 KiB block."""
    cdef Py_ssize_t left = C_LOG_BLOCK_BYTES - offset % C_LOG_BLOCK_BYTES
    cdef Py_ssize_t length
    cdef uint8_t kind
    if left < C_LOG_HEADER_BYTES or n - offset < C_LOG_HEADER_BYTES:
        return False
    kind = p[offset + 6]
    if kind < 1 or kind > LOG_TYPE_MAX:
        return False
    length = p[offset + 4] | (<Py_ssize_t>p[offset + 5] << 8)
    if C_LOG_HEADER_BYTES + length > left or C_LOG_HEADER_BYTES + length > n - offset:
        return False
    return _mask(_extend(0, p + offset + 6, length + 1)) == _load32(p + offset)


def log_record_ok(const uint8_t[::1] buf, Py_ssize_t offset) -> bool:
    """True if a valid log record (header, known type, CRC) starts at
    `offset` (see _log_record_at)."""
    cdef Py_ssize_t n = buf.shape[0]
    if offset < 0 or offset >= n:
        return False
    return _log_record_at(&buf[0], offset, n)


def find_log_record(const uint8_t[::1] buf, Py_ssize_t start) -> int:
    """The first offset >= start where a valid log record starts, or -1.
    Every offset is tried, not just those the record chain would reach:
    this is how a bad record is told from a torn tail (a torn write leaves
    nothing valid after it; damage in the middle does)."""
    cdef Py_ssize_t n = buf.shape[0]
    cdef Py_ssize_t i, found = -1
    if start < 0:
        start = 0
    if start >= n:
        return -1
    with nogil:
        for i in range(start, n):
            if _log_record_at(&buf[0], i, n):
                found = i
                break
    return found


# --- the write-ahead log's stamped sectors (accman.ledger.walsectors) ----------------------

def lay_out_sectors(uint8_t[::1] buf, const uint8_t[::1] record, const uint8_t[::1] stamp,
                    Py_ssize_t sector_bytes) -> int:
    """Writes `record` into `buf` from offset 0 in pieces of sector_bytes -
    len(stamp), each followed by `stamp`, the last piece zero-padded;
    returns the bytes written (whole sectors)."""
    cdef Py_ssize_t n = record.shape[0], s = stamp.shape[0]
    cdef Py_ssize_t data = sector_bytes - s, at = 0, i = 0, piece
    if data <= 0:
        raise ValueError("a sector must hold more than its stamp")
    cdef Py_ssize_t k = (n + data - 1) // data
    if k * sector_bytes > buf.shape[0]:
        raise ValueError(f"{k} sectors do not fit in a buffer of {buf.shape[0]} bytes")
    with nogil:
        while i < n:
            piece = min(data, n - i)
            memcpy(&buf[at], &record[i], piece)
            if piece < data:
                memset(&buf[at + piece], 0, data - piece)
            memcpy(&buf[at + data], &stamp[0], s)
            i += piece
            at += sector_bytes
    return at
