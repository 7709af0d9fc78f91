# A change (a mod, a hold, a settle, an expiry) as one compact entry: the
# same bytes in the batch's write-ahead log record, in LevelDB's record of
# the batch's events, and in the event log's memory.  Its history entry
# and its event (two with a low_balance crossing) are made from it where
# they are needed: by the applier and recovery for LevelDB, by a reader of
# /past or /events.  One entry of ~30 bytes per change instead of a
# history put and an event put of ~130.  Included by ledger.pyx; no I/O.
#
#   entry       kind:u8 (EV_MOD.. EV_EXPIRE, | CHANGE_LOW: a low_balance
#               event follows), hid:16, seq:varint, by:zigzag varint,
#               tot:zigzag varint, at_ms:zigzag varint (from the entry
#               before it in its block; the first from 0), hold:varint
#               (0: none), klen:u8, key ascii
#   block       in a log record's payload, after its puts: 0x00 (a put's
#               key length is never 0), first event id:u64, events:u32,
#               bytes:u32, the entries
#   b"E" + last event id:u64 -> ver:u8 (1), first event id:u64, the entries
#               (LevelDB's record of the batch's events, store format 3)

DEF CHANGE_LOW = 0x80
DEF CHANGE_KIND = 0x7F
DEF CHANGE_BYTES_MAX = 1 + 16 + 10 * 5 + 1 + 64
DEF CHANGE_BYTES_MIN = 1 + 16 + 5 + 1      # kind, hid, five one-byte varints, klen
DEF BLOCK_HEAD_BYTES = 17          # 0x00, first:u64, events:u32, bytes:u32
DEF EVENTS_VALUE_HEAD = 9          # ver, first:u64


cdef struct Change:
    int kind
    bint low
    const unsigned char* hid
    int64_t seq
    int64_t by
    int64_t tot
    int64_t at_ms
    int64_t hold
    const unsigned char* key
    Py_ssize_t klen


cdef inline char* _put_varint(char* p, uint64_t v) noexcept nogil:
    while v >= 0x80:
        p[0] = <char>((v & 0x7F) | 0x80)
        p += 1
        v >>= 7
    p[0] = <char>v
    return p + 1


cdef inline uint64_t _zigzag(int64_t v) noexcept nogil:
    return (<uint64_t>v << 1) ^ <uint64_t>(v >> 63)


cdef inline int64_t _unzigzag(uint64_t u) noexcept nogil:
    return <int64_t>(u >> 1) ^ -<int64_t>(u & 1)


cdef inline Py_ssize_t _get_varint(const unsigned char* p, Py_ssize_t n, Py_ssize_t i,
                                   uint64_t* out) noexcept nogil:
    """The varint at p[i:n] into out; the index after it, or -1 (cut
    short, or more than 64 bits: a tenth byte above 1)."""
    cdef uint64_t v = 0
    cdef int shift = 0
    while i < n and shift < 64:
        if shift == 63 and p[i] > 1:
            return -1
        v |= <uint64_t>(p[i] & 0x7F) << shift
        i += 1
        if not (p[i - 1] & 0x80):
            out[0] = v
            return i
        shift += 7
    return -1


cdef int _change_put(bytearray out, int kind, bint low, bytes hid, int64_t seq, int64_t by,
                     int64_t tot, int64_t at_delta, int64_t hold, bytes key) except -1:
    """One change's entry at the end of `out`."""
    cdef Py_ssize_t klen = len(key) if key is not None else 0, n = len(out)
    if klen > 255:
        raise AssertionError("a change's key is too long for its entry")
    PyByteArray_Resize(out, n + CHANGE_BYTES_MAX)
    cdef char* start = PyByteArray_AS_STRING(out) + n
    cdef char* p = start
    p[0] = <char>(kind | (CHANGE_LOW if low else 0))
    memcpy(p + 1, PyBytes_AS_STRING(hid), 16)
    p = _put_varint(p + 17, <uint64_t>seq)
    p = _put_varint(p, _zigzag(by))
    p = _put_varint(p, _zigzag(tot))
    p = _put_varint(p, _zigzag(at_delta))
    p = _put_varint(p, <uint64_t>hold)
    p[0] = <char>klen
    if klen:
        memcpy(p + 1, PyBytes_AS_STRING(key), klen)
    PyByteArray_Resize(out, n + (p + 1 + klen - start))
    return 0


cdef Py_ssize_t _change_get(const unsigned char* p, Py_ssize_t n, Py_ssize_t i,
                            int64_t prev_at, Change* c) except -2:
    """The entry at p[i:n] into c (its at_ms from prev_at); the index after
    it.  ValueError when it does not parse."""
    cdef uint64_t v
    if i + 17 > n:
        raise ValueError("a change entry is cut short")
    c.kind = p[i] & CHANGE_KIND
    c.low = (p[i] & CHANGE_LOW) != 0
    if not EV_MOD <= c.kind <= EV_EXPIRE:
        raise ValueError("a change entry of unknown kind")
    c.hid = p + i + 1
    i = _get_varint(p, n, i + 17, &v)
    c.seq = <int64_t>v
    if i >= 0:
        i = _get_varint(p, n, i, &v)
        c.by = _unzigzag(v)
    if i >= 0:
        i = _get_varint(p, n, i, &v)
        c.tot = _unzigzag(v)
    if i >= 0:
        i = _get_varint(p, n, i, &v)
        c.at_ms = prev_at + _unzigzag(v)
    if i >= 0:
        i = _get_varint(p, n, i, &v)
        c.hold = <int64_t>v
    if i < 0 or i >= n or i + 1 + p[i] > n or c.seq < 1:
        raise ValueError("a change entry is cut short")
    c.klen = p[i]
    c.key = p + i + 1
    return i + 1 + c.klen


cdef int _changes_block(bytearray out, int64_t first, Py_ssize_t events,
                        bytearray changes) except -1:
    """The batch's entries, as the last thing in its log record's payload."""
    cdef Py_ssize_t nbytes = len(changes), n = len(out)
    PyByteArray_Resize(out, n + BLOCK_HEAD_BYTES + nbytes)
    cdef char* p = PyByteArray_AS_STRING(out) + n
    p[0] = 0
    _put64(p + 1, first)
    _put32(p + 9, <uint32_t>events)
    _put32(p + 13, <uint32_t>nbytes)
    memcpy(p + BLOCK_HEAD_BYTES, PyByteArray_AS_STRING(changes), nbytes)
    return 0


cdef bytes _history_value(Change* c):
    cdef bytes key = None
    if c.klen:
        key = (<const char*>c.key)[:c.klen]
    return _pack_history(c.by, c.tot, c.at_ms, key, c.hold)


cdef bytes _history_key_of(const Change* c):
    cdef bytes out = PyBytes_FromStringAndSize(NULL, HISTORY_KEY_BYTES)
    cdef char* p = PyBytes_AS_STRING(out)
    p[0] = c'h'
    memcpy(p + 1, c.hid, 16)
    _put64(p + 17, c.seq)
    return out


cpdef list decode_changes(int64_t first, const unsigned char[::1] data):
    """-> [(event id, kind, hid, seq, by, tot, at_ms, key or None, hold or
    None)] of a run of entries whose first event is `first`, in id order
    (a low_balance crossing is a second event of kind EV_LOW).
    ValueError when the entries do not parse whole."""
    cdef Py_ssize_t i = 0, n = data.shape[0]
    cdef int64_t at = 0, event_id = first
    cdef Change c
    out = []
    while i < n:
        i = _change_get(&data[0], n, i, at, &c)
        at = c.at_ms
        hid = (<const char*>c.hid)[:16]
        key = (<const char*>c.key)[:c.klen].decode("ascii") if c.klen else None
        hold = c.hold or None
        out.append((event_id, c.kind, hid, c.seq, c.by, c.tot, c.at_ms, key, hold))
        event_id += 1
        if c.low:
            out.append((event_id, EV_LOW, hid, c.seq, c.by, c.tot, c.at_ms, key, hold))
            event_id += 1
    return out


cpdef tuple changes_span(int64_t first, const unsigned char[::1] data):
    """-> (last event id, newest at_ms) of a run of entries whose first
    event is `first`, making none of its events (what a retention pass
    reads of a record).  ValueError when the entries do not parse whole."""
    cdef Py_ssize_t i = 0, n = data.shape[0]
    cdef int64_t at = 0, newest = C_INT64_MIN, last = first - 1
    cdef Change c
    while i < n:
        i = _change_get(&data[0], n, i, at, &c)
        at = c.at_ms
        if at > newest:
            newest = at
        last += 2 if c.low else 1
    return last, newest


cdef Py_ssize_t _block_at(const unsigned char* p, Py_ssize_t n, Py_ssize_t i,
                          int64_t* first, Py_ssize_t* events) except -1:
    """The changes block at p[i] (its 0x00): its entries' length, with its
    first event id and its count of events."""
    cdef Py_ssize_t nbytes
    if i + BLOCK_HEAD_BYTES > n:
        raise ValueError("a write-ahead log record ends inside its changes' head")
    first[0] = _get64(p + i + 1)
    events[0] = _get32(p + i + 9)
    nbytes = _get32(p + i + 13)
    if i + BLOCK_HEAD_BYTES + nbytes != n or first[0] < 1 or events[0] < 1:
        raise ValueError("a write-ahead log record's changes are not its end")
    return nbytes


cpdef list leveldb_puts(const unsigned char[::1] payload):
    """-> [(key, value or None for a delete), ...]: what LevelDB gets for
    one write-ahead log record's payload: its puts, then for its changes
    their history (a record per account: history.pxi) and one record of
    their events.  ValueError when the payload does not parse whole.  (The
    applier's write batch and recovery's replay alike: LevelDB gets the
    same from the same record.)"""
    cdef const unsigned char* p = &payload[0] if payload.shape[0] else NULL
    cdef Py_ssize_t i = 0, n = payload.shape[0], kl, vl, nbytes, events, end
    cdef Py_ssize_t changes, changes_max
    cdef int64_t first, at = 0, count = 0
    cdef bint delete
    cdef Change* cs
    cdef bytearray parsed
    out = []
    while i < n:
        if p[i] == 0:
            nbytes = _block_at(p, n, i, &first, &events)
            i += BLOCK_HEAD_BYTES
            end = i + nbytes
            head = PyBytes_FromStringAndSize(NULL, EVENTS_VALUE_HEAD)
            (<char*>PyBytes_AS_STRING(head))[0] = 1
            _put64(PyBytes_AS_STRING(head) + 1, first)
            value = head + (<const char*>p)[i:end]
            changes_max = min(events, nbytes // CHANGE_BYTES_MIN)
            parsed = PyByteArray_FromStringAndSize(NULL, changes_max * sizeof(Change))
            cs = <Change*>PyByteArray_AS_STRING(parsed)
            changes = 0
            while i < end:
                if changes == changes_max:
                    raise ValueError("a write-ahead log record's changes hold another "
                                     "count of events than its head")
                i = _change_get(p, end, i, at, &cs[changes])
                at = cs[changes].at_ms
                count += 2 if cs[changes].low else 1
                changes += 1
            if count != events:
                raise ValueError("a write-ahead log record's changes hold another "
                                 "count of events than its head")
            out += _history_groups(cs, changes)
            out.append((events_key(first + events - 1), value))
            continue
        if i + 2 > n:
            raise ValueError("a write-ahead log record ends inside a put's lengths")
        delete = p[i] & WAL_DELETE
        kl = p[i] & ~WAL_DELETE
        vl = p[i + 1]
        i += 2
        if (delete and vl) or i + kl + vl > n:
            raise ValueError("a write-ahead log record ends inside a put")
        key = (<const char*>p)[i:i + kl]
        out.append((key, None if delete else (<const char*>p)[i + kl:i + kl + vl]))
        i += kl + vl
    return out


cpdef bytes leveldb_batch_body(list ops):
    """LevelDB's write batch of `ops` (leveldb_puts'), past its sequence
    number: count:u32, then each put (1, key, value) or delete (0, key),
    key and value each after its length as a varint (leveldb
    db/write_batch.cc).  Recovery compares it with the batches LevelDB's
    logs hold (accman.ledger.wal.check_leveldb_tail)."""
    cdef Py_ssize_t size = 4
    cdef bytes k, v
    for k, v in ops:
        size += 1 + 5 + len(k) + (0 if v is None else 5 + len(v))
    out = PyBytes_FromStringAndSize(NULL, size)
    cdef char* start = PyBytes_AS_STRING(out)
    cdef char* p = start + 4
    cdef uint32_t count = <uint32_t>len(ops)
    cdef int i
    for i in range(4):                  # little-endian, as LevelDB's fixed32
        start[i] = <char>((count >> (8 * i)) & 0xFF)
    for k, v in ops:
        p[0] = 0 if v is None else 1
        p = _put_varint(p + 1, len(k))
        memcpy(p, PyBytes_AS_STRING(k), len(k))
        p += len(k)
        if v is not None:
            p = _put_varint(p, len(v))
            memcpy(p, PyBytes_AS_STRING(v), len(v))
            p += len(v)
    return out[:p - start]


cpdef tuple unpack_events(bytes key, bytes value):
    """-> (first id, entries) of LevelDB's record of a batch's events
    (decode_changes reads the entries); ValueError for an unknown format."""
    cdef Py_ssize_t n = len(value)
    if len(key) != 9 or key[0] != EVENTS_PREFIX[0]:
        raise ValueError("events record of unknown key")
    if n < EVENTS_VALUE_HEAD or value[0] != 1:
        raise ValueError("events record of unknown format")
    return _get64(_at(value) + 1), value[EVENTS_VALUE_HEAD:]


cdef list wal_history(bytearray payload, bytes hid, int64_t first, int64_t last):
    """[(seq, history value)] of `hid`'s changes with seqs first..last in a
    sealed batch's log record payload, in order."""
    cdef const unsigned char* p = <const unsigned char*>PyByteArray_AS_STRING(payload)
    cdef const unsigned char* h = <const unsigned char*>PyBytes_AS_STRING(hid)
    cdef Py_ssize_t i = 0, n = len(payload), nbytes, events
    cdef int64_t block_first, at = 0
    cdef Change c
    out = []
    while i < n and p[i] != 0:
        i += 2 + (p[i] & ~WAL_DELETE) + p[i + 1]
    if i >= n:
        return out
    nbytes = _block_at(p, n, i, &block_first, &events)
    i += BLOCK_HEAD_BYTES
    while i < n:
        i = _change_get(p, n, i, at, &c)
        at = c.at_ms
        if memcmp(c.hid, h, 16) == 0 and first <= c.seq <= last:
            out.append((c.seq, _history_value(&c)))
    return out
