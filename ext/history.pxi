# An account's history in LevelDB: one record per account and batch, its
# entries newest first.  Included by ledger.pyx, after changes.pxi; no I/O.
#
#   b"h" + hid + seq:u64   a group (store format 5): the account's changes
#                          in one batch, `seq` the newest of them.  ver:u8
#                          (3), entries:varint, then per entry, newest
#                          first, with seqs seq, seq - 1, ... (an
#                          account's changes in a batch are consecutive):
#                          by:zigzag varint,
#                          tot:zigzag varint, at_ms:zigzag varint (from the
#                          entry before it in the group; the first from 0),
#                          hold:varint (0: none), klen:u8, key ascii
#
# Formats 2-4 wrote one record per change (records.pxi's versions 1 and
# 2); such a record is read as a group of one.  A record per account and
# batch instead of one per change: LevelDB's memtable insert and every
# compaction that carries a record cost per record, and an account charged
# many times within one batch (a busy consumer) costs one.

DEF GROUP_VERSION = 3
DEF GROUP_ENTRY_BYTES_MAX = 4 * 10 + 1 + 255    # four varints, klen, key


cdef list _history_groups(const Change* cs, Py_ssize_t n):
    """[(key, value)]: one history group per account of a batch's n
    changes, given in their order in the batch.  ValueError when an
    account's changes skip a seq.  The changes are grouped by an open
    hash table on the hid (linear probing, at most half full): `newest`
    is each account's newest change so far, `older` links a change to
    its account's one before it."""
    cdef Py_ssize_t cap = 16, i, j, slot, change, runs = 0
    while cap < 2 * n:
        cap *= 2
    cdef bytearray tables = PyByteArray_FromStringAndSize(
        NULL, (cap + 3 * n) * sizeof(Py_ssize_t))
    cdef bytearray scratch = PyByteArray_FromStringAndSize(NULL, 0)
    cdef Py_ssize_t* newest = <Py_ssize_t*>PyByteArray_AS_STRING(tables)
    cdef Py_ssize_t* older = newest + cap
    cdef Py_ssize_t* slots = older + n      # the accounts' slots, in first-change order
    cdef Py_ssize_t* run = slots + n
    cdef uint64_t lead
    memset(newest, 0xFF, cap * sizeof(Py_ssize_t))     # -1: empty
    for i in range(n):
        memcpy(&lead, cs[i].hid, 8)
        slot = <Py_ssize_t>(lead & <uint64_t>(cap - 1))
        while newest[slot] >= 0 and memcmp(cs[newest[slot]].hid, cs[i].hid, 16) != 0:
            slot = (slot + 1) & (cap - 1)
        if newest[slot] < 0:
            slots[runs] = slot
            runs += 1
        older[i] = newest[slot]
        newest[slot] = i
    out = []
    for i in range(runs):
        j = 0
        change = newest[slots[i]]
        while change >= 0:
            run[j] = change
            j += 1
            change = older[change]
        out.append(_history_group(cs, run, j, scratch))
    return out


cdef tuple _history_group(const Change* cs, const Py_ssize_t* run, Py_ssize_t n,
                          bytearray scratch):
    """(key, value) of one account's n changes, `run` newest first, made
    in `scratch` (grown to fit)."""
    cdef const Change* c = &cs[run[0]]
    cdef int64_t seq = c.seq, prev_at = 0
    cdef Py_ssize_t i, need = 1 + 10 + n * GROUP_ENTRY_BYTES_MAX
    if len(scratch) < need:
        PyByteArray_Resize(scratch, need)
    cdef char* start = PyByteArray_AS_STRING(scratch)
    cdef char* p = _put_varint(start + 1, <uint64_t>n)
    start[0] = GROUP_VERSION
    for i in range(n):
        c = &cs[run[i]]
        if c.seq != seq - i:
            raise ValueError("a write-ahead log record's changes skip a seq of an account")
        p = _put_varint(p, _zigzag(c.by))
        p = _put_varint(p, _zigzag(c.tot))
        p = _put_varint(p, _zigzag(<int64_t>(<uint64_t>c.at_ms - <uint64_t>prev_at)))
        prev_at = c.at_ms
        p = _put_varint(p, <uint64_t>c.hold)
        p[0] = <char>c.klen
        memcpy(p + 1, c.key, c.klen)
        p += 1 + c.klen
    return (_history_key_of(&cs[run[0]]), PyBytes_FromStringAndSize(start, p - start))


cpdef list unpack_history_group(int64_t seq, bytes value, int64_t first=1,
                                int64_t last=C_INT64_MAX):
    """-> [(seq, by, tot, at_ms, key or None, hold or None)] of the entries
    first..last of the history record whose key's seq is `seq`, newest
    first: a group (version 3), or one entry (versions 1 and 2, store
    formats 2-4).  The record is parsed whole either way (a page of /past
    makes objects of its own entries alone).  ValueError for an unknown
    format or a group that does not parse whole."""
    cdef Py_ssize_t n = len(value), i, klen
    cdef const unsigned char* p = _at(value)
    cdef uint64_t count, by, tot, at, hold
    cdef int64_t at_ms = 0
    if n and p[0] in (1, 2):
        entry = (seq,) + unpack_history(value)
        return [entry] if first <= seq <= last else []
    if n < 2 or p[0] != GROUP_VERSION:
        raise ValueError("history record of unknown format")
    i = _get_varint(p, n, 1, &count)
    if i < 0 or count < 1:
        raise ValueError("a history group's count of entries is cut short or 0")
    if seq < 1 or count > <uint64_t>seq:
        raise ValueError("a history group reaches below seq 1")
    out = []
    while count:
        i = _get_varint(p, n, i, &by)
        if i >= 0:
            i = _get_varint(p, n, i, &tot)
        if i >= 0:
            i = _get_varint(p, n, i, &at)
        if i >= 0:
            i = _get_varint(p, n, i, &hold)
        if i < 0 or i >= n or i + 1 + p[i] > n:
            raise ValueError("a history group is cut short, or holds a number past 64 bits")
        if hold > <uint64_t>C_INT64_MAX:
            raise ValueError("a history group names a hold past the largest id")
        klen = p[i]
        at_ms = <int64_t>(<uint64_t>at_ms + <uint64_t>_unzigzag(at))
        if first <= seq <= last:
            key = value[i + 1:i + 1 + klen].decode("ascii") if klen else None
            out.append((seq, _unzigzag(by), _unzigzag(tot), at_ms, key,
                        <int64_t>hold or None))
        i += 1 + klen
        seq -= 1
        count -= 1
    if i != n:
        raise ValueError("a history group has bytes after its entries")
    return out
