"""The accounts' histories as LevelDB holds them (ext/history.pxi: a
record per account and batch, keyed by its newest seq): each history's
newest entry, for open; the entries of a page of /past; an open hold's
record checked against its hold's.  Reads only, checksums verified; a
record that does not parse is StoreCorrupt."""

from __future__ import annotations

from accman.errors import StoreCorrupt
from accman.ledger import _ledger
from accman.ledger.plyvel_errors import translated
from accman.limits import INT64_MAX

HID_END = 1 + _ledger.HID_BYTES
KEY_BYTES = HID_END + 8


def newest(db, path: str):
    """Yields (hid, tot, seq) of every account: the newest entry of each
    history, from the last history back.  At most one seek per account (to
    its history's first record, then one step back to the previous
    history's newest), not a read of every record."""
    with translated(path, "load accounts"):
        it = db.raw_iterator(verify_checksums=True, fill_cache=False)
        try:
            it.seek(_ledger.HISTORY_END)
            if it.valid():
                it.prev()
            else:
                it.seek_to_last()
            while it.valid():
                k = it.key()
                if k[:1] != _ledger.HISTORY_PREFIX:
                    break
                if len(k) != KEY_BYTES:
                    raise StoreCorrupt(f"{path}: malformed history key")
                seq = _ledger.history_key_seq(k)
                if seq < 1:
                    raise StoreCorrupt(f"{path}: a history entry with seq {seq}")
                yield k[1:HID_END], _group(path, seq, it.value(), seq, seq)[0][2], seq
                # One step back is the previous history's newest record
                # unless this history has older records: then seek past
                # them.  (Short histories never seek.)
                it.prev()
                if it.valid() and it.key()[:HID_END] == k[:HID_END]:
                    it.seek(k[:HID_END])
                    it.prev()
        finally:
            it.close()


def page(db, path: str, hid: bytes, first: int, last: int) -> dict:
    """{seq: (by, tot, at_ms, key, hold)} of the entries first..last that
    LevelDB holds: one forward range scan, from the record that holds
    `first` to the one that holds `last`."""
    out = {}
    for newest_seq, value in _records_from(db, path, hid, first):
        for seq, *entry in _group(path, newest_seq, value, first, last):
            out[seq] = tuple(entry)
        if newest_seq >= last:
            break
    return out


def record_of(db, path: str, hid: bytes, seq: int) -> dict:
    """{seq: (by, tot, at_ms, key, hold)} of every entry of the record that
    holds `seq`; empty when none does."""
    for newest_seq, value in _records_from(db, path, hid, seq):
        return {s: tuple(entry) for s, *entry in _group(path, newest_seq, value, 1, newest_seq)}
    return {}


def _records_from(db, path: str, hid: bytes, seq: int):
    """Yields (newest seq, value) of hid's history records from the one
    that holds `seq` on (a record's key is its newest seq)."""
    with translated(path, "read history"):
        with db.iterator(start=_ledger.history_key(hid, seq),
                         stop=_ledger.history_key(hid, INT64_MAX), verify_checksums=True) as it:
            for k, v in it:
                yield _ledger.history_key_seq(k), v


def _group(path: str, seq: int, value: bytes, first: int, last: int) -> list:
    try:
        return _ledger.unpack_history_group(seq, value, first, last)
    except ValueError as e:
        raise StoreCorrupt(f"{path}: the history record of seq {seq}: {e}; "
                           "refusing to serve, nothing repaired") from e


def open_hold(db, path: str, k: bytes, v: bytes) -> tuple:
    """(hid, hold, amount, expires_ms) of an open-hold record, checked
    against its hold record (a point read): open would otherwise end, and
    so pay back, a hold that has already ended."""
    if len(k) != _ledger.HOLD_KEY_BYTES:
        raise StoreCorrupt(f"{path}: a malformed open-hold key; refusing to serve, "
                           "nothing repaired")
    hold = _ledger.history_key_seq(k)
    record = db.get(_ledger.HOLD_PREFIX + k[1:], verify_checksums=True)
    try:
        held = _ledger.unpack_open_hold(v)
        ok = record is not None and _ledger.unpack_hold(record)[:3] == (
            *held, _ledger.HOLD_OPEN)
    except ValueError as e:
        raise StoreCorrupt(f"{path}: hold {hold}: {e}; refusing to serve, "
                           "nothing repaired") from e
    if not ok:
        raise StoreCorrupt(f"{path}: the open-hold record of hold {hold} does not "
                           "match an open hold; refusing to serve, nothing repaired")
    return (k[1:1 + _ledger.HID_BYTES], hold) + held
