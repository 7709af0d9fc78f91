"""Older store formats -> the current one, at open (accman.ledger.leveldb).

Format 1 kept an account record beside each history; since format 2 an
account is its history's newest entry.  Each account record is checked
against its history one last time, then deleted, in the one synced batch
that rewrites the format record: either all of it or none.  Format 1
predates the write-ahead log, so this batch is LevelDB's alone.

Format 3 keeps a batch's events as one record (ext/records.pxi); the one
record per event of format 2 stays readable (accman.ledger.eventrecords)
until the retention trims it, so going from 2 to 3 rewrites the format
record alone, through the log.

Format 4 keeps an open-hold record (`O`) beside each open hold's record
(`o`), so that open reads the open holds and not every hold ever taken.
`through_log` writes what a store of format 2 or 3 lacks
(`open_hold_records`) through the log, then the new format record: a
crash midway leaves the old format, and the next open does it again.

Format 5 writes an account's changes in one batch as one history record
(ext/history.pxi); the one record per change of formats 2-4 stays
readable, so going from 4 to 5 rewrites the format record alone.

plyvel's errors are the caller's to translate (accman.ledger.plyvel_errors.translated)."""

from __future__ import annotations

import json
import logging

from accman.errors import StoreCorrupt
from accman.ledger import _ledger

META_KEY = b"\x00meta"       # accman.ledger.leveldb's
# Records per log record when a migration writes through the log: far
# below the log's PAYLOAD_BYTES_MAX at ~44 bytes each.
PUTS_PER_RECORD = 65536

log = logging.getLogger("accman.ledger.migrate")


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
            ok = _ledger.unpack_history_group(seq, heads.value())[0][2] == tot
        except ValueError:
            ok = False
        heads.next()        # nothing may follow the head in this history
        ok = ok and not (heads.valid() and heads.key()[:1 + _ledger.HID_BYTES]
                         == key[:1 + _ledger.HID_BYTES])
    if not ok:
        raise StoreCorrupt(f"{path}: an account record does not match "
                           "its history; refusing to serve, nothing repaired")


def through_log(store, meta: dict, from_format: int) -> None:
    """From format 2, 3 or 4, on an open store whose recovery is
    checkpointed: through the log (LevelDB gets no batch outside it once a
    store has a checkpoint), each step checkpointed: from 2 or 3 the
    open-hold records (format 4's), then the format record `meta` alone
    (format 5 reads the records of 4 as they are).  The format says the new
    one only once the records are in; only between the format record's
    write and its checkpoint does it say so in the log alone (an older
    AccMan that opened the store then would replay it, and serve a format
    it does not know: after a crash during an upgrade, the new AccMan must
    open the store first)."""
    puts = []
    if from_format < 4:
        puts = open_hold_records(store.db, store.path)
        for i in range(0, len(puts), PUTS_PER_RECORD):
            store.write(_ledger.wal_record(puts[i:i + PUTS_PER_RECORD]))
        store.checkpoint_at_open("the open-hold records")
    store.write(_ledger.wal_record([(META_KEY, json.dumps(meta).encode())]))
    store.checkpoint_at_open("the format record")
    log.info("%s: store format %d -> %d%s%s", store.path, from_format, meta["format"],
             f" ({len(puts)} open-hold records written or removed)" if from_format < 4 else "",
             " in the read-only open's private copy; the directory is unchanged"
             if store.read_only else "")


def covered_records(db, path: str, puts: list) -> list:
    """The deletes that go with a replayed log record's puts in a store
    from before format 5.  An older AccMan wrote the record's history one
    entry a record, and LevelDB may have kept some of those in its tables
    (its memtable written out before the crash, past what recovery cuts
    back); the replay writes the same entries as one record per account,
    keyed by the newest.  Each older record that such a record covers is
    deleted, once it is checked to say what the new one says of its seq:
    else the store is damaged, and refused."""
    out = []
    for k, v in puts:
        if v is None or k[:1] != _ledger.HISTORY_PREFIX:
            continue
        hid = k[1:1 + _ledger.HID_BYTES]
        for i, entry in enumerate(_ledger.unpack_history_group(_ledger.history_key_seq(k), v)):
            key = k if i == 0 else _ledger.history_key(hid, entry[0])
            old = db.get(key, verify_checksums=True)
            if old is None or old == v:
                continue            # not written, or this replay's own record
            if not _says(entry, old):
                raise StoreCorrupt(f"{path}: history entry {entry[0]} of a replayed batch differs "
                                   "from the record an older AccMan wrote of it; refusing to "
                                   "serve, nothing repaired")
            if i:
                out.append((key, None))
    return out


def _says(entry: tuple, record: bytes) -> bool:
    """The one-entry history record says `entry` (seq, by, tot, at, key, hold)."""
    try:
        return _ledger.unpack_history_group(entry[0], record) == [entry]
    except ValueError:
        return False


def open_hold_records(db, path: str) -> list:
    """The puts (key, value) and deletes (key, None) that make the store's
    open-hold records (`O`) exactly its open holds' (`o` in state open):
    all of them for a store of format 3 or older, and whatever a migration
    cut short left behind.  Everything is read and checked before the
    caller writes anything."""
    want = {}
    for k, v in _records(db, path, _ledger.HOLD_PREFIX):
        try:
            amount, expires_ms, state, *_ = _ledger.unpack_hold(v)
        except ValueError as e:
            raise StoreCorrupt(f"{path}: hold {_ledger.history_key_seq(k)}: {e}; "
                               "refusing to serve, nothing repaired") from e
        if state == _ledger.HOLD_OPEN:
            want[_ledger.OPEN_HOLD_PREFIX + k[1:]] = _ledger.pack_open_hold(amount, expires_ms)
    out = []
    for k, v in _records(db, path, _ledger.OPEN_HOLD_PREFIX):
        if want.get(k) == v:
            del want[k]
        else:
            out.append((k, None))
    out.extend(want.items())
    return out


def _records(db, path: str, prefix: bytes):
    """The records under a hold prefix, each key of a hold's shape."""
    with db.iterator(prefix=prefix, verify_checksums=True, fill_cache=False) as it:
        for k, v in it:
            if len(k) != _ledger.HOLD_KEY_BYTES:
                raise StoreCorrupt(f"{path}: a malformed hold key ({k[:1]!r} prefix); "
                                   "refusing to serve, nothing repaired")
            yield k, v
