"""Older store formats -> the current one, at open (accman.ledger.leveldb).

Format 1 kept an account record beside each history; since format 2 an
account is its history's newest entry.  Each account record is checked
against its history one last time, then deleted, in the one synced batch
that rewrites the format record: either all of it or none.  Format 1
predates the write-ahead log, so this batch is LevelDB's alone.

Format 4 keeps an open-hold record (`O`) beside each open hold's record
(`o`), so that open reads the open holds and not every hold ever taken.
`open_hold_records` says what a store of an earlier format lacks; the
store writes it through its log before the new format record, so a crash
midway leaves the old format, and the next open does it again.

plyvel's errors are the caller's to translate (leveldb._translated)."""

from __future__ import annotations

import json

from accman.errors import StoreCorrupt
from accman.ledger import _ledger

META_KEY = b"\x00meta"       # accman.ledger.leveldb's


def from_format_1(db, path: str, meta: dict) -> None:
    """Migrates the store in `db` (named `path` in errors), writing `meta`
    as its format record."""
    heads = db.raw_iterator(verify_checksums=True, fill_cache=False)
    wb = db.write_batch(transaction=True, sync=True)
    try:
        with db.iterator(prefix=_ledger.ACCOUNT_PREFIX, verify_checksums=True,
                         fill_cache=False) as it:
            for k, v in it:
                if len(k) != 1 + _ledger.HID_BYTES:
                    raise StoreCorrupt(f"{path}: malformed account key")
                try:
                    tot, seq = _ledger.unpack_account(v)
                except ValueError as e:
                    raise StoreCorrupt(f"{path}: {e}") from e
                _check_head(heads, path, k[1:], tot, seq)
                wb.delete(k)
        wb.put(META_KEY, json.dumps(meta).encode())
    finally:
        heads.close()
    wb.write()


def _check_head(heads, path: str, hid: bytes, tot: int, seq: int) -> None:
    """A format-1 account record must name its history's newest entry."""
    key = _ledger.history_key(hid, seq)
    heads.seek(key)
    ok = seq >= 1 and heads.valid() and heads.key() == key
    if ok:
        try:
            ok = _ledger.unpack_history(heads.value())[1] == tot
        except ValueError:
            ok = False
        heads.next()        # nothing may follow the head in this history
        ok = ok and not (heads.valid() and heads.key()[:1 + _ledger.HID_BYTES]
                         == key[:1 + _ledger.HID_BYTES])
    if not ok:
        raise StoreCorrupt(f"{path}: an account record does not match "
                           "its history; refusing to serve, nothing repaired")


def open_hold_records(db, path: str) -> list:
    """The puts (key, value) and deletes (key, None) that make the store's
    open-hold records (`O`) exactly its open holds' (`o` in state open):
    all of them for a store of format 3 or older, and whatever a migration
    cut short left behind."""
    want = {}
    with db.iterator(prefix=_ledger.HOLD_PREFIX, verify_checksums=True,
                     fill_cache=False) as it:
        for k, v in it:
            try:
                amount, expires_ms, state, *_ = _ledger.unpack_hold(v)
            except ValueError as e:
                raise StoreCorrupt(f"{path}: {e}; refusing to serve, nothing repaired") from e
            if state == _ledger.HOLD_OPEN:
                want[_ledger.OPEN_HOLD_PREFIX + k[1:]] = _ledger.pack_open_hold(amount, expires_ms)
    out = []
    with db.iterator(prefix=_ledger.OPEN_HOLD_PREFIX, verify_checksums=True,
                     fill_cache=False) as it:
        for k, v in it:
            if want.get(k) == v:
                del want[k]
            else:
                out.append((k, None))
    out.extend(want.items())
    return out
