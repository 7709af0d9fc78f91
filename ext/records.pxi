# The ledger's on-disk records: keys, values, and a batch's puts in the
# write-ahead log's encoding.  Included by ledger.pyx; no I/O.
#
# All integers are big-endian; every value starts with its format version,
# so that a later format can migrate.  `hid` is the account's keyed hash.
#
#   b"h" + hid + seq:u64      history: one entry a record in store formats
#                             2-4 (ver 1: no hold; ver 2: hold), an
#                             account's entries of one batch from format 5
#                             (ver 3: history.pxi)
#       1: ver, by, tot, at_ms, key ascii
#       2: ver, by, tot, at_ms, hold, key ascii
#   b"k" + hid + key ascii    idempotency record (ver 1: a mod; ver 2: a hold)
#       1: ver, seq, by, tot, has_min:u8, min
#       2: ver, seq, by, tot, has_min:u8, min, ttl_s
#   b"o" + hid + hold:u64     a hold: ver, amount, expires_ms, state:u8, use,
#                             end_seq, end_tot (state OPEN, SETTLED, EXPIRED)
#   b"O" + hid + hold:u64     an open hold (store format 4): ver, amount,
#                             expires_ms; deleted when the hold ends, so that
#                             open reads the open holds alone
#   b"l" + hid                a low-balance threshold: ver, low
#   b"e" + id:u64             an event (store format 2, read until trimmed):
#                             ver, type:u8, hid, seq, by, tot, at_ms, hold
#                             (0: none), 8 reserved bytes, key ascii
#   b"E" + last id:u64        a batch's events (store format 3): changes.pxi
#   b"\x00events"             the event ids kept: ver, first, last (rewritten by
#                             every batch with events, so that open reads it
#                             alone instead of seeking the ends of the range)

FORMAT_VERSION = 1
HID_BYTES = 16
ACCOUNT_PREFIX = b"a"            # store format 1 only (see pack_account)
EVENT_PREFIX = b"e"
EVENTS_PREFIX = b"E"
EVENTS_META_KEY = b"\x00events"
HISTORY_PREFIX = b"h"
HISTORY_END = b"i"               # sorts after every history key
KEY_PREFIX = b"k"
LOW_PREFIX = b"l"
HOLD_PREFIX = b"o"
OPEN_HOLD_PREFIX = b"O"
HOLD_KEY_BYTES = 1 + HID_BYTES + 8    # a hold's and an open hold's: prefix, hid, hold id

DEF ACCOUNT_VALUE_BYTES = 17      # ver + tot + seq
DEF HISTORY_VALUE_BYTES = 25      # ver + by + tot + at (+ key)
DEF HISTORY_HOLD_VALUE_BYTES = 33 # ver + by + tot + at + hold (+ key)
DEF KEY_VALUE_BYTES = 34          # ver + seq + by + tot + has_min + min
DEF HOLD_KEY_VALUE_BYTES = 42     # ... + ttl
DEF HISTORY_KEY_BYTES = 25        # "h" + hid + seq
DEF HOLD_VALUE_BYTES = 42         # ver + amount + expires + state + use + end_seq + end_tot
DEF OPEN_HOLD_VALUE_BYTES = 17    # ver + amount + expires
DEF EVENT_VALUE_BYTES = 66        # ver + type + hid + seq + by + tot + at + hold
                                  # + 8 reserved (+ key)

# Hold states, and event types (their names are EVENT_TYPES' order).
HOLD_OPEN, HOLD_SETTLED, HOLD_EXPIRED = 0, 1, 2
EV_MOD, EV_HOLD, EV_SETTLE, EV_EXPIRE, EV_LOW = 1, 2, 3, 4, 5
EVENT_NAMES = {EV_MOD: "mod", EV_HOLD: "hold", EV_SETTLE: "settle",
               EV_EXPIRE: "expire", EV_LOW: "low_balance"}


cdef inline void _put64(char *p, int64_t v) noexcept nogil:
    cdef uint64_t u = <uint64_t>v
    cdef int i
    for i in range(8):
        p[7 - i] = <char>(u & 0xFF)
        u >>= 8


cdef inline void _put32(char *p, uint32_t v) noexcept nogil:
    cdef int i
    for i in range(4):
        p[3 - i] = <char>(v & 0xFF)
        v >>= 8


cdef inline uint32_t _get32(const unsigned char *p) noexcept nogil:
    return (<uint32_t>p[0] << 24) | (<uint32_t>p[1] << 16) | (<uint32_t>p[2] << 8) | p[3]


cdef inline int64_t _get64(const unsigned char *p) noexcept nogil:
    cdef uint64_t u = 0
    cdef int i
    for i in range(8):
        u = (u << 8) | p[i]
    return <int64_t>u


cdef inline const unsigned char* _at(bytes value):
    return <const unsigned char *>PyBytes_AS_STRING(value)


# Format 1's account records: written only by tests that build a format-1
# store, read only by the migration that checks and removes them.
cpdef bytes pack_account(int64_t tot, int64_t seq):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, ACCOUNT_VALUE_BYTES)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = FORMAT_VERSION
    _put64(p + 1, tot)
    _put64(p + 9, seq)
    return out


cpdef tuple unpack_account(bytes value):
    """-> (tot, seq); ValueError when the record is not a version-1 account."""
    if len(value) != ACCOUNT_VALUE_BYTES or value[0] != FORMAT_VERSION:
        raise ValueError("account record of unknown format")
    return (_get64(_at(value) + 1), _get64(_at(value) + 9))


cdef bytes _id_key(bytes prefix, bytes hid, int64_t n):
    """prefix + hid + n:u64 (hid None: prefix + n), the history, hold and
    event keys."""
    cdef Py_ssize_t h = HID_BYTES if hid is not None else 0
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 1 + h + 8)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = prefix[0]
    if h:
        memcpy(p + 1, PyBytes_AS_STRING(hid), HID_BYTES)
    _put64(p + 1 + h, n)
    return out


cpdef bytes history_key(bytes hid, int64_t seq):
    return _id_key(HISTORY_PREFIX, hid, seq)


cpdef int64_t history_key_seq(bytes key):
    return _get64(_at(key) + 17)


cpdef bytes hold_key(bytes hid, int64_t hold):
    return _id_key(HOLD_PREFIX, hid, hold)


cpdef bytes open_hold_key(bytes hid, int64_t hold):
    return _id_key(OPEN_HOLD_PREFIX, hid, hold)


cpdef bytes event_key(int64_t event_id):
    return _id_key(EVENT_PREFIX, None, event_id)


cpdef bytes events_key(int64_t last_id):
    """The key of the LevelDB record of a batch's events, ..last_id."""
    return _id_key(EVENTS_PREFIX, None, last_id)


cpdef int64_t event_key_id(bytes key):
    return _get64(_at(key) + 1)


cdef bytes _pack_history(int64_t by, int64_t tot, int64_t at_ms, bytes key, int64_t hold):
    cdef Py_ssize_t klen = len(key) if key is not None else 0
    cdef Py_ssize_t fixed = HISTORY_HOLD_VALUE_BYTES if hold else HISTORY_VALUE_BYTES
    cdef bytes out = PyBytes_FromStringAndSize(NULL, fixed + klen)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = 2 if hold else 1
    _put64(p + 1, by)
    _put64(p + 9, tot)
    _put64(p + 17, at_ms)
    if hold:
        _put64(p + 25, hold)
    if klen:
        memcpy(p + fixed, PyBytes_AS_STRING(key), klen)
    return out


cpdef tuple unpack_history(bytes value):
    """-> (by, tot, at_ms, key or None, hold or None); ValueError for an
    unknown format."""
    cdef Py_ssize_t n = len(value), fixed
    if n < 1 or value[0] not in (1, 2):
        raise ValueError("history record of unknown format")
    fixed = HISTORY_VALUE_BYTES if value[0] == 1 else HISTORY_HOLD_VALUE_BYTES
    if n < fixed:
        raise ValueError("history record of unknown format")
    cdef const unsigned char *p = _at(value)
    key = value[fixed:].decode("ascii") if n > fixed else None
    hold = _get64(p + 25) if value[0] == 2 else None
    return (_get64(p + 1), _get64(p + 9), _get64(p + 17), key, hold)


cdef bytes _pack_key(int64_t seq, int64_t by, int64_t tot, object min_, int64_t ttl_s):
    """ttl_s 0: a mod's key (version 1); else a hold's (version 2)."""
    cdef bytes out = PyBytes_FromStringAndSize(
        NULL, HOLD_KEY_VALUE_BYTES if ttl_s else KEY_VALUE_BYTES)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = 2 if ttl_s else 1
    _put64(p + 1, seq)
    _put64(p + 9, by)
    _put64(p + 17, tot)
    p[25] = 0 if min_ is None else 1
    _put64(p + 26, 0 if min_ is None else <int64_t>min_)
    if ttl_s:
        _put64(p + 34, ttl_s)
    return out


cpdef tuple unpack_key(bytes value):
    """-> (seq, by, tot, min or None, ttl_s: 0 for a mod's key); ValueError
    for an unknown format."""
    cdef Py_ssize_t n = len(value)
    if not ((n == KEY_VALUE_BYTES and value[0] == 1)
            or (n == HOLD_KEY_VALUE_BYTES and value[0] == 2)):
        raise ValueError("idempotency record of unknown format")
    cdef const unsigned char *p = _at(value)
    min_ = _get64(p + 26) if p[25] else None
    return (_get64(p + 1), _get64(p + 9), _get64(p + 17), min_,
            _get64(p + 34) if value[0] == 2 else 0)


cdef bytes _pack_hold(int64_t amount, int64_t expires_ms, int state, int64_t use,
                      int64_t end_seq, int64_t end_tot):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HOLD_VALUE_BYTES)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = 1
    _put64(p + 1, amount)
    _put64(p + 9, expires_ms)
    p[17] = <char>state
    _put64(p + 18, use)
    _put64(p + 26, end_seq)
    _put64(p + 34, end_tot)
    return out


cpdef tuple unpack_hold(bytes value):
    """-> (amount, expires_ms, state, use, end_seq, end_tot)."""
    if len(value) != HOLD_VALUE_BYTES or value[0] != 1 or value[17] > HOLD_EXPIRED:
        raise ValueError("hold record of unknown format")
    cdef const unsigned char *p = _at(value)
    return (_get64(p + 1), _get64(p + 9), p[17], _get64(p + 18), _get64(p + 26),
            _get64(p + 34))


cpdef bytes pack_open_hold(int64_t amount, int64_t expires_ms):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, OPEN_HOLD_VALUE_BYTES)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = 1
    _put64(p + 1, amount)
    _put64(p + 9, expires_ms)
    return out


cpdef tuple unpack_open_hold(bytes value):
    """-> (amount, expires_ms)."""
    if len(value) != OPEN_HOLD_VALUE_BYTES or value[0] != 1:
        raise ValueError("open-hold record of unknown format")
    return (_get64(_at(value) + 1), _get64(_at(value) + 9))


cdef bytes _pack_low(int64_t low):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 9)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = 1
    _put64(p + 1, low)
    return out


cpdef int64_t unpack_low(bytes value) except? -1:
    if len(value) != 9 or value[0] != 1:
        raise ValueError("low-balance record of unknown format")
    return _get64(_at(value) + 1)


cdef bytes _pack_events_meta(int64_t first, int64_t last):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, 17)
    cdef char *p = PyBytes_AS_STRING(out)
    p[0] = 1
    _put64(p + 1, first)
    _put64(p + 9, last)
    return out


cpdef tuple unpack_events_meta(bytes value):
    """-> (first, last) event ids kept."""
    if len(value) != 17 or value[0] != 1:
        raise ValueError("events record of unknown format")
    return (_get64(_at(value) + 1), _get64(_at(value) + 9))


cpdef tuple unpack_event(bytes value):
    """-> (type name, hid, seq, by, tot, at_ms, key or None, hold or None)."""
    cdef Py_ssize_t n = len(value)
    if n < EVENT_VALUE_BYTES or value[0] != 1 or value[1] not in EVENT_NAMES:
        raise ValueError("event record of unknown format")
    cdef const unsigned char *p = _at(value)
    hold = _get64(p + 50)
    key = value[EVENT_VALUE_BYTES:].decode("ascii") if n > EVENT_VALUE_BYTES else None
    return (EVENT_NAMES[value[1]], value[2:18], _get64(p + 18), _get64(p + 26),
            _get64(p + 34), _get64(p + 42), key, hold or None)


# --- a batch's records in accman.wal's encoding -----------------------------
# Each put is klen:u8, vlen:u8, key, value; a delete is klen | 0x80, 0, key;
# the batch's changes follow them, as one block (changes.pxi).
# One byte is enough: the longest key is an idempotency record's (1 + 16 +
# 64 = 81 bytes) and the longest value a keyed event's (66 + 64 = 130); a
# longer field is a bug.
DEF WAL_FIELD_BYTES_MAX = 255
DEF WAL_KEY_BYTES_MAX = 127
DEF WAL_DELETE = 0x80

cdef inline char* _wal_room(bytearray out, Py_ssize_t kl, Py_ssize_t vl) except NULL:
    """A put of a kl-byte key and a vl-byte value at the end of `out`: its
    lengths written, a pointer to where its key goes.  One resize
    (amortised: a bytearray over-allocates)."""
    cdef Py_ssize_t n = len(out)
    if kl > WAL_KEY_BYTES_MAX or vl > WAL_FIELD_BYTES_MAX:
        raise AssertionError("a record field too long for the write-ahead log")
    PyByteArray_Resize(out, n + 2 + kl + vl)
    cdef char *p = PyByteArray_AS_STRING(out) + n
    p[0] = <char>kl
    p[1] = <char>vl
    return p + 2


cdef inline int _wal_put(bytearray out, bytes k, bytes v) except -1:
    cdef Py_ssize_t kl = len(k), vl = len(v)
    cdef char *p = _wal_room(out, kl, vl)
    memcpy(p, PyBytes_AS_STRING(k), kl)
    memcpy(p + kl, PyBytes_AS_STRING(v), vl)
    return 0


cdef inline int _wal_delete(bytearray out, bytes k) except -1:
    cdef Py_ssize_t kl = len(k), n = len(out)
    if kl > WAL_KEY_BYTES_MAX:
        raise AssertionError("a record key too long for the write-ahead log")
    PyByteArray_Resize(out, n + 2 + kl)
    cdef char *p = PyByteArray_AS_STRING(out) + n
    p[0] = <char>(kl | WAL_DELETE)
    p[1] = 0
    memcpy(p + 2, PyBytes_AS_STRING(k), kl)
    return 0


cpdef bytearray wal_record(list puts):
    """The payload of a log record of (key, value) puts and (key, None)
    deletes (the store's own: its format record, a migration's records)."""
    cdef bytearray out = bytearray()
    for k, v in puts:
        if v is None:
            _wal_delete(out, k)
        else:
            _wal_put(out, k, v)
    return out


cpdef int fill_write_batch(object wb, const unsigned char[::1] payload) except -1:
    """Puts leveldb_puts(payload) (changes.pxi) into LevelDB's write batch."""
    put, delete = wb.put, wb.delete
    for k, v in leveldb_puts(payload):
        if v is None:
            delete(k)
        else:
            put(k, v)
    return 0
