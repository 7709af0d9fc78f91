"""Open holds at open (store format 4): each open hold has an open-hold
record beside its hold record, deleted when the hold ends, so that open
reads the open holds and never the holds that ended; a store of format 3
gains them at its first open, also after a migration cut short."""

import json
import struct
import subprocess
import sys
from pathlib import Path

import plyvel
import pytest

from accman import Ledger
from accman.errors import HoldEnded, StoreCorrupt
from accman.ledger import _ledger, migrate
from accman.ledger.leveldb import META_KEY, STORE_FORMAT, Store


def records(path, prefix) -> dict:
    db = plyvel.DB(path)
    try:
        return dict(db.iterator(prefix=prefix))
    finally:
        db.close()


def rewrite(path, puts=(), deletes=(), fmt=None):
    """Records changed behind the ledger's back, then a checkpoint (the
    store closed): what an older AccMan, a cut-short migration or damage
    would leave."""
    store = Store(path)
    try:
        for k in deletes:
            store.db.delete(k)
        for k, v in puts:
            store.db.put(k, v)
        if fmt is not None:
            meta = json.loads(store.db.get(META_KEY))
            store.db.put(META_KEY, json.dumps(dict(meta, format=fmt)).encode(), sync=True)
    finally:
        store.close()


def some_holds(path, clock) -> dict:
    """a: holds 2 (settled), 4 (expired), 6 (open, 60 s); b: hold 2 (open,
    30 s). Returns the hids."""
    with Ledger(path, clock_ms=clock) as led:
        led.mod("a", 100)
        led.settle("a", led.hold("a", -10, 60)[0], 4)
        led.hold("a", -20, 1)
        clock.advance(1)
        assert led.expire_due() == 1
        led.hold("a", -30, 60)
        led.mod("b", 50)
        led.hold("b", -5, 30)
        return {c: led._book.account(c).hid for c in "ab"}


def open_hold_keys(hids) -> set:
    return {_ledger.open_hold_key(hids["a"], 6), _ledger.open_hold_key(hids["b"], 2)}


def test_only_open_holds_have_open_hold_records(path, clock):
    hids = some_holds(path, clock)
    opened = records(path, _ledger.OPEN_HOLD_PREFIX)
    assert set(opened) == open_hold_keys(hids)
    expires_a = _ledger.unpack_hold(records(path, _ledger.HOLD_PREFIX)[
        _ledger.hold_key(hids["a"], 6)])[1]
    assert _ledger.unpack_open_hold(opened[_ledger.open_hold_key(hids["a"], 6)]) == (
        30, expires_a)
    assert len(records(path, _ledger.HOLD_PREFIX)) == 4     # the ended ones kept


def test_open_reads_no_ended_hold_and_they_still_answer_settles(path, clock):
    """An ended hold's record is read only by a settle of it (and by
    verify): open succeeds with it unreadable."""
    hids = some_holds(path, clock)
    rewrite(path, puts=[(_ledger.hold_key(hids["a"], 4), b"\x09damaged")])
    with Ledger(path, clock_ms=clock) as led:
        assert led.open_holds == 2 and led.tot("a") == 66 and led.tot("b") == 45
        assert led.settle("a", 2, 4) == (96, 3)             # the first reply again
        with pytest.raises(StoreCorrupt, match="hold record of unknown format"):
            led.verify()
        clock.advance(30)
        assert led.expire_due() == 1 and led.tot("b") == 50
        assert led.settle("a", 6, 30) == (66, 7)


def test_a_format_3_store_gains_its_open_hold_records_at_open(path, clock):
    hids = some_holds(path, clock)
    rewrite(path, deletes=open_hold_keys(hids), fmt=3)
    assert records(path, _ledger.OPEN_HOLD_PREFIX) == {}
    with Ledger(path, clock_ms=clock) as led:
        assert json.loads(led.store.get(META_KEY))["format"] == STORE_FORMAT == 5
        assert led.open_holds == 2
        assert led.verify()["open_holds"] == 2
        clock.advance(30)
        assert led.expire_due() == 1
    assert set(records(path, _ledger.OPEN_HOLD_PREFIX)) == {
        _ledger.open_hold_key(hids["a"], 6)}
    with Ledger(path, clock_ms=clock) as led:
        assert led.open_holds == 1 and led.verify()["open_holds"] == 1


def test_a_store_left_between_formats_is_migrated_exactly(path, clock, monkeypatch):
    """Format 3 still, with one open-hold record missing and a stale one
    (what a cut-short migration and an older AccMan serving after it
    leave): the next open leaves exactly the open holds' records, here
    written with one record to each log record."""
    hids = some_holds(path, clock)
    stale = _ledger.open_hold_key(hids["a"], 2)
    rewrite(path, deletes=[_ledger.open_hold_key(hids["b"], 2)],
            puts=[(stale, _ledger.pack_open_hold(10, 1))], fmt=3)
    monkeypatch.setattr(migrate, "PUTS_PER_RECORD", 1)
    with Ledger(path, clock_ms=clock) as led:
        assert led.open_holds == 2 and led.verify()["open_holds"] == 2
        with pytest.raises(HoldEnded):
            led.settle("a", 2, 5)
    assert set(records(path, _ledger.OPEN_HOLD_PREFIX)) == open_hold_keys(hids)


# A format-3 server that crashed with records in its log (the migration is
# left out, so the store stays format 3), then an open that crashes in the
# migration: right after its first write to the log, or before the format
# record's checkpoint.
SERVE_AS_FORMAT_3_AND_CRASH = """
import os, sys
from accman import Ledger
from accman.ledger import migrate
migrate.through_log = lambda *args: None
led = Ledger(sys.argv[1])
for _ in range(5):
    led.mod("c", 1)
os._exit(0)
"""
CRASH_IN_MIGRATION = """
import os, sys
from accman.ledger import leveldb
write, checkpoint = leveldb.Store.write, leveldb.Store.checkpoint_at_open
def write_then_crash(store, record):
    write(store, record)
    os._exit(0)
def crash_at_checkpoint(store, after):
    if after == "the format record":
        os._exit(0)
    checkpoint(store, after)
if sys.argv[2] == "first write":
    leveldb.Store.write = write_then_crash
else:
    leveldb.Store.checkpoint_at_open = crash_at_checkpoint
leveldb.Store(sys.argv[1])
"""


@pytest.mark.parametrize("crash_at", ["first write", "format record"])
def test_a_crash_in_the_migration_loses_nothing_and_the_next_open_finishes_it(
        path, clock, crash_at):
    """The migration writes at the log's start only after recovery's
    checkpoint: the records it replayed are never written over."""
    hids = some_holds(path, clock)
    rewrite(path, deletes=open_hold_keys(hids), fmt=3)
    for script, args in ((SERVE_AS_FORMAT_3_AND_CRASH, []), (CRASH_IN_MIGRATION, [crash_at])):
        subprocess.run([sys.executable, "-c", script, path, *args], check=True, timeout=60)
    with Ledger(path, clock_ms=clock) as led:
        assert json.loads(led.store.get(META_KEY))["format"] == STORE_FORMAT
        assert led.tot("c") == 5 and led.open_holds == 2
        assert led.verify()["open_holds"] == 2
    assert set(records(path, _ledger.OPEN_HOLD_PREFIX)) == open_hold_keys(hids)


def test_verify_of_a_format_3_store_migrates_a_private_copy_and_changes_no_file(path, clock):
    """As `accman verify` opens a store: read-only, in a private copy."""
    hids = some_holds(path, clock)
    rewrite(path, deletes=open_hold_keys(hids), fmt=3)
    before = {f.name: f.read_bytes() for f in sorted(Path(path).iterdir())}
    led = Ledger(path, create=False, clock_ms=clock,
                 store=Store(path, create=False, read_only=True))
    try:
        assert led.verify()["open_holds"] == 2
    finally:
        led.close()
    assert {f.name: f.read_bytes() for f in sorted(Path(path).iterdir())} == before


def test_a_malformed_hold_key_stops_the_migration_before_it_writes(path, clock):
    hids = some_holds(path, clock)
    open_hold = struct.pack(">BqqBqqq", 1, 5, 2_000_000_000_000, _ledger.HOLD_OPEN, 0, 0, 0)
    rewrite(path, deletes=open_hold_keys(hids), fmt=3,
            puts=[(_ledger.HOLD_PREFIX + b"x" * 200, open_hold)])
    with pytest.raises(StoreCorrupt, match="a malformed hold key"):
        Ledger(path, clock_ms=clock)
    db = plyvel.DB(path)
    try:
        assert json.loads(db.get(META_KEY))["format"] == 3
        assert list(db.iterator(prefix=_ledger.OPEN_HOLD_PREFIX)) == []
    finally:
        db.close()


def test_an_open_hold_of_an_account_without_history_is_refused(path, clock):
    hids = some_holds(path, clock)
    ghost = b"g" * 16
    record = records(path, _ledger.HOLD_PREFIX)[_ledger.hold_key(hids["a"], 6)]
    rewrite(path, puts=[(_ledger.hold_key(ghost, 2), record),
                        (_ledger.open_hold_key(ghost, 2),
                         _ledger.pack_open_hold(*_ledger.unpack_hold(record)[:2]))])
    with pytest.raises(StoreCorrupt, match="hold 2 of an account that has no history"):
        Ledger(path, clock_ms=clock)


@pytest.mark.parametrize("damage,msg", [
    ("ended", "the open-hold record of hold 2 does not match an open hold"),
    ("amount", "the open-hold record of hold 6 does not match an open hold"),
    ("unreadable", "hold 6: open-hold record of unknown format"),
])
def test_an_open_hold_record_without_its_open_hold_is_refused_at_open(path, clock, damage, msg):
    """Open would end such a hold, paying its amount back a second time,
    or keep the wrong amount."""
    hids = some_holds(path, clock)
    a6 = _ledger.open_hold_key(hids["a"], 6)
    if damage == "ended":
        rewrite(path, puts=[(_ledger.open_hold_key(hids["a"], 2), _ledger.pack_open_hold(10, 1))])
    elif damage == "amount":
        expires = _ledger.unpack_open_hold(records(path, _ledger.OPEN_HOLD_PREFIX)[a6])[1]
        rewrite(path, puts=[(a6, _ledger.pack_open_hold(31, expires))])
    else:
        rewrite(path, puts=[(a6, b"\x02")])
    with pytest.raises(StoreCorrupt, match=msg):
        Ledger(path, clock_ms=clock)


def test_an_open_hold_without_its_record_is_refused_by_verify(path, clock):
    """Open cannot see it (it would never end); verify reads every hold."""
    hids = some_holds(path, clock)
    rewrite(path, deletes=[_ledger.open_hold_key(hids["a"], 6)])
    with Ledger(path, clock_ms=clock) as led:
        assert led.open_holds == 1
        with pytest.raises(StoreCorrupt, match="an open hold has no open-hold record"):
            led.verify()
