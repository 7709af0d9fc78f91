"""The full consistency check of a store, for `accman verify`, the tests
and an operator who wants proof: it reads every record once."""

from __future__ import annotations

from functools import partial

from accman.errors import StoreCorrupt
from accman.ledger import _ledger, eventrecords, histories
from accman.ledger.leveldb import Store
from accman.ledger.plyvel_errors import translated


class _AsOf:
    """A store's reads as of one moment: its LevelDB through a snapshot.
    A ledger in use goes on applying batches while the check reads pass
    after pass; each batch is one write of LevelDB, so a snapshot holds
    whole batches, and the passes agree on what they read."""

    def __init__(self, store, snapshot):
        self.path = store.path
        self.db = snapshot          # get, iterator, raw_iterator: as a plyvel DB's

    accounts, get, iterate = Store.accounts, Store.get, Store.iterate


def verify_store(store) -> dict:
    """The check (_verify) of the store as of now: a LevelDB snapshot."""
    with translated(store.path, "verify"):
        snapshot = store.db.snapshot()
    try:
        return _verify(_AsOf(store, snapshot))
    finally:
        snapshot.close()


def _verify(store) -> dict:
    """Raises StoreCorrupt naming the first broken rule; returns counts.

    The accounts as open loads them (each history's newest entry, found by
    seeking back) must be exactly the ends of the histories read forward;
    every idempotency record must name its history entry, and every keyed
    entry have its record; every hold has exactly one start and at most
    one end, as its record says, and an open-hold record while it is open;
    the events kept run without a gap and each matches the history entry
    it names."""
    accounts = {hid: (tot, seq) for hid, tot, seq in store.accounts()}
    holds = _Holds()
    entries, history_keys = _check_histories(store, accounts, holds)
    keys = _check_keys(store, history_keys)
    open_holds = _check_holds(store, holds)
    events = _check_events(store)
    return {"accounts": len(accounts), "entries": entries, "keys": keys,
            "holds": len(holds.starts), "open_holds": open_holds, "events": events}


def _decoded(unpack, value):
    try:
        return unpack(value)
    except ValueError as e:
        raise StoreCorrupt(str(e)) from e


class _Holds:
    """What the histories say of holds: their starts and their ends."""

    def __init__(self):
        self.starts = {}        # (hid, hold) -> amount
        self.ends = {}          # (hid, hold) -> (seq, by, tot)

    def entry(self, hid: bytes, seq: int, by: int, tot: int, hold) -> None:
        if hold is None:
            if by == 0:
                raise StoreCorrupt(f"history entry {seq}: by is 0 outside a hold's end")
            return
        if hold == seq:
            if by >= 0:
                raise StoreCorrupt(f"history entry {seq}: a hold that takes nothing")
            self.starts[(hid, hold)] = -by
            return
        if (hid, hold) not in self.starts or hold > seq:
            raise StoreCorrupt(f"history entry {seq}: the end of hold {hold}, which never began")
        if (hid, hold) in self.ends:
            raise StoreCorrupt(f"history entry {seq}: a second end of hold {hold}")
        if not 0 <= by <= self.starts[(hid, hold)]:
            raise StoreCorrupt(f"history entry {seq}: hold {hold} returns more than it held")
        self.ends[(hid, hold)] = (seq, by, tot)


def _check_histories(store, accounts: dict, holds: _Holds) -> tuple[int, dict]:
    """Each history runs 1..seq without gaps, each entry's tot is the
    previous tot plus its by, and its end is the loaded account.  Returns
    the entry count and {(hid, key): (seq, by, tot)} of keyed entries."""
    entries = 0
    history_keys = {}
    ends = {}                   # hid -> (tot, seq) of its last entry read
    for k, v in store.iterate(_ledger.HISTORY_PREFIX):
        if len(k) != 1 + _ledger.HID_BYTES + 8:
            raise StoreCorrupt("malformed history key")
        hid = k[1:1 + _ledger.HID_BYTES]
        group = _decoded(partial(_ledger.unpack_history_group, _ledger.history_key_seq(k)), v)
        for seq, by, tot, _at, key, hold in reversed(group):
            prev_tot, prev_seq = ends.get(hid, (0, 0))
            if seq != prev_seq + 1:
                raise StoreCorrupt(f"history seq {seq} follows {prev_seq}: a gap")
            if tot != prev_tot + by:
                raise StoreCorrupt(f"history entry {seq}: tot is not the previous tot plus by")
            holds.entry(hid, seq, by, tot, hold)
            if key is not None:
                history_keys[(hid, key)] = (seq, by, tot)
            ends[hid] = (tot, seq)
            entries += 1
    for hid, end in ends.items():
        if hid not in accounts:
            raise StoreCorrupt("a history that loading does not find")
        if accounts[hid] != end:
            raise StoreCorrupt("an account's loaded balance or seq differs from its history")
    if len(ends) != len(accounts):
        raise StoreCorrupt("loading finds an account without history")
    return entries, history_keys


def _check_keys(store, history_keys: dict) -> int:
    keys = 0
    for k, v in store.iterate(_ledger.KEY_PREFIX):
        hid = k[1:1 + _ledger.HID_BYTES]
        key = k[1 + _ledger.HID_BYTES:].decode("ascii", "replace")
        seq, by, tot, _min, _ttl = _decoded(_ledger.unpack_key, v)
        if history_keys.get((hid, key)) != (seq, by, tot):
            raise StoreCorrupt("an idempotency record does not match its history entry")
        keys += 1
    if keys != len(history_keys):
        raise StoreCorrupt("a keyed history entry has no idempotency record")
    return keys


def _check_holds(store, holds: _Holds) -> int:
    """Every hold record names a hold that began, says how it ended as its
    history does, and every hold that began has its record; the open-hold
    records are exactly the open holds'.  Returns the number of open holds."""
    seen = 0
    still_open = {}             # open-hold key -> (amount, expires_ms)
    for k, v in store.iterate(_ledger.HOLD_PREFIX):
        hid, hold = k[1:1 + _ledger.HID_BYTES], _ledger.history_key_seq(k)
        amount, _expires, state, use, end_seq, end_tot = _decoded(_ledger.unpack_hold, v)
        if holds.starts.get((hid, hold)) != amount:
            raise StoreCorrupt(f"hold {hold}: its record does not match its start")
        end = holds.ends.get((hid, hold))
        if state == _ledger.HOLD_OPEN:
            if end is not None:
                raise StoreCorrupt(f"hold {hold}: ended in the history, open in its record")
            still_open[_ledger.OPEN_HOLD_PREFIX + k[1:]] = (amount, _expires)
        elif end != (end_seq, amount - use, end_tot):
            raise StoreCorrupt(f"hold {hold}: its record does not match its end")
        seen += 1
    if seen != len(holds.starts):
        raise StoreCorrupt("a hold that began has no record")
    _check_open_hold_records(store, still_open)
    return len(still_open)


def _check_open_hold_records(store, still_open: dict) -> None:
    """Open finds the open holds by their open-hold records alone: one per
    open hold, saying what its hold record says, and none for an ended one."""
    listed = 0
    for k, v in store.iterate(_ledger.OPEN_HOLD_PREFIX):
        if len(k) != _ledger.HOLD_KEY_BYTES:
            raise StoreCorrupt("a malformed open-hold key")
        if still_open.get(k) != _decoded(_ledger.unpack_open_hold, v):
            raise StoreCorrupt(f"open-hold record of hold {_ledger.history_key_seq(k)}: "
                               "no open hold matches it")
        listed += 1
    if listed != len(still_open):
        raise StoreCorrupt("an open hold has no open-hold record: open would never end it")


def _check_events(store) -> int:
    """The events kept are the ids first..last, each matching its entry and
    of the kind of that entry (SPEC "Events"): a change's events of one
    account come in the order of its seqs, one per change; a low_balance
    event follows the change that crossed; a settle or expire event ends
    its hold as the hold's record says."""
    meta = store.get(_ledger.EVENTS_META_KEY)
    first, last = _decoded(_ledger.unpack_events_meta, meta) if meta is not None else (0, 0)
    expect = first
    newest = {}                 # hid -> the seq of its newest change event
    entries = _Entries(store)
    prev = None                 # (hid, seq) of the previous event, a change
    for event_id, kind_no, hid, seq, by, tot, at, key, hold in eventrecords.events(store, 0):
        if event_id != expect:
            raise StoreCorrupt(f"event {event_id} where {expect} was due: an id skipped")
        kind = _ledger.EVENT_NAMES[kind_no]
        if entries.get(hid, seq) != (by, tot, at, key, hold):
            raise StoreCorrupt(f"event {event_id} does not match the history entry it names")
        if kind == "low_balance":
            # The first event kept may follow a change trimmed before it.
            if prev != (hid, seq) and event_id != first:
                raise StoreCorrupt(f"event {event_id}: a low_balance event that does not "
                                   "follow the change that crossed")
            prev = None
        else:
            _check_event_kind(store, event_id, kind, hid, seq, hold)
            if seq <= newest.get(hid, 0):
                raise StoreCorrupt(f"event {event_id}: a second event of one change, or "
                                   "an account's changes out of order")
            newest[hid] = seq
            prev = (hid, seq)
        expect += 1
    if first and expect != last + 1:
        raise StoreCorrupt(f"the events end at {expect - 1}, the store says {last}")
    return expect - first if first else 0


class _Entries:
    """The history entries that the events name, read a record at a time:
    a batch's events of one account name one record's entries."""

    RECORDS_KEPT = 1024

    def __init__(self, store):
        self.store = store
        self.records = {}       # hid -> {seq: entry} of its record read last

    def get(self, hid: bytes, seq: int):
        entry = self.records.get(hid, {}).get(seq)
        if entry is None:
            if len(self.records) >= self.RECORDS_KEPT:
                self.records.clear()
            self.records[hid] = histories.record_of(self.store.db, self.store.path, hid, seq)
            entry = self.records[hid].get(seq)
        return entry


_ENDED = {"settle": _ledger.HOLD_SETTLED, "expire": _ledger.HOLD_EXPIRED}


def _check_event_kind(store, event_id: int, kind: str, hid: bytes, seq: int, hold) -> None:
    if kind == "mod":
        ok = hold is None
    elif kind == "hold":
        ok = hold == seq
    else:
        ok = hold is not None and hold != seq
        if ok:
            raw = store.get(_ledger.hold_key(hid, hold))
            record = _decoded(_ledger.unpack_hold, raw) if raw is not None else None
            ok = record is not None and (record[2], record[4]) == (_ENDED[kind], seq)
    if not ok:
        raise StoreCorrupt(f"event {event_id}: a {kind} event of the wrong kind of entry")
