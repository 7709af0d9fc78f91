"""Events in LevelDB (store format 3): a batch's events are one record,
read back in id order across records, and trimmed past the retention a
whole record at a time, never the newest event's; a store of format 2,
one record per event, opens, reads and trims the same.  Through the
Ledger's API, with LevelDB's records looked at directly."""

import asyncio
import json
import struct
import threading

import plyvel
import pytest

from accman import Ledger
from accman.errors import EventsTrimmed
from accman.ledger import _ledger
from accman.ledger import events as events_module
from accman.ledger.leveldb import META_KEY, STORE_FORMAT, Store


def records(path) -> dict:
    db = plyvel.DB(path)
    try:
        return dict(db.iterator())
    finally:
        db.close()


def events_records(recs: dict) -> list:
    """(first, last) of each batch's events record, in order."""
    out = []
    for k, v in sorted(recs.items()):
        if k[:1] == _ledger.EVENTS_PREFIX:
            first, changes = _ledger.unpack_events(k, v)
            events = _ledger.decode_changes(first, changes)
            assert [e[0] for e in events] == list(range(first, first + len(events)))
            assert events[-1][0] == _ledger.event_key_id(k)
            out.append((first, events[-1][0]))
    return out


def one_batch(led, creds):
    """A mod of each cred, all in one batch (concurrent on one loop)."""
    async def main():
        await asyncio.gather(*(led.amod(c, 5) for c in creds))
    asyncio.run(main())


def test_a_batchs_events_are_one_leveldb_record(tmp_path):
    path = str(tmp_path / "d")
    with Ledger(path) as led:
        one_batch(led, [f"c{i}" for i in range(20)])
        led.mod("c0", 1)
        assert led.drain_samples()[0] == [20, 1]
    recs = records(path)
    assert not any(k[:1] == _ledger.EVENT_PREFIX for k in recs)
    assert events_records(recs) == [(1, 20), (21, 21)]
    with Ledger(path) as led:
        events, nxt = led.events(0, 100)
        assert [e.id for e in events] == list(range(1, 22)) and nxt == 21
        assert [e.seq for e in events] == [1] * 20 + [2]
        assert events[-1].tot == 6 and led.verify()["events"] == 21


def test_events_read_from_leveldb_cross_records_in_order(tmp_path):
    path = str(tmp_path / "d")
    with Ledger(path) as led:
        for b in range(5):
            one_batch(led, [f"b{b}-{i}" for i in range(b + 1)])     # 1..5 events
    with Ledger(path) as led:               # the ring is empty: all from LevelDB
        ids = []
        after = 0
        while True:
            events, after = led.events(after, 4)
            if not events:
                break
            ids += [e.id for e in events]
        assert ids == list(range(1, 16))
        assert [e.id for e in led.events(2, 5)[0]] == [3, 4, 5, 6, 7]


def trim_now(led):
    """The writer's retention pass, now (it runs once a minute), with the
    next batch: a mod to wake the writer."""
    led._committer._trim_at = 0
    led.mod("waker", 1)


def test_the_retention_trims_whole_records_and_never_the_newest(tmp_path):
    path = str(tmp_path / "d")
    now = [1_000_000_000]
    led = Ledger(path, clock_ms=lambda: now[0], events_retention_s=15)
    try:
        one_batch(led, ["a", "b", "c"])                 # events 1..3 at t
        now[0] += 10_000
        one_batch(led, ["a", "b"])                      # 4..5 at t+10 s
        now[0] += 10_000
        led.mod("a", 1)                                 # 6 at t+20 s
        now[0] += 1_000                                 # t+21 s: cutoff t+6 s
        trim_now(led)                                   # the waker is 7
        assert led.events(3, 10)[0][0].id == 4
        with pytest.raises(EventsTrimmed):
            led.events(0, 10)
        assert led.stats["events_first"] == 4 and led.stats["events_trimmed"] == 3
        now[0] += 60_000                                # all past it: the newest stays
        trim_now(led)                                   # the waker is 8
        assert [e.id for e in led.events(6, 10)[0]] == [7, 8]
        assert led.stats["events_first"] == 7
        assert led.verify()["events"] == 2
    finally:
        led.close()
    assert events_records(records(path)) == [(7, 7), (8, 8)]


def format_2_event(kind, hid, seq, by, tot, at, key, hold) -> bytes:
    """An event's record as store format 2 wrote it (ext/records.pxi)."""
    return (struct.pack(">BB16sqqqqq8x", 1, kind, hid, seq, by, tot, at, hold or 0)
            + (key or "").encode("ascii"))


def as_format_2(path):
    """The store as format 2 wrote it: one record per event."""
    store = Store(path)
    for k, v in list(store.db.iterator(prefix=_ledger.EVENTS_PREFIX)):
        for event_id, *event in _ledger.decode_changes(*_ledger.unpack_events(k, v)):
            store.db.put(_ledger.event_key(event_id), format_2_event(*event))
        store.db.delete(k)
    meta = json.loads(store.db.get(META_KEY))
    store.db.put(META_KEY, json.dumps(dict(meta, format=2)).encode(), sync=True)
    store.close()


def test_a_format_2_store_opens_reads_and_trims_its_records(tmp_path):
    path = str(tmp_path / "d")
    now = [1_000_000_000]
    with Ledger(path, clock_ms=lambda: now[0]) as led:
        one_batch(led, ["a", "b", "c"])
        led.mod("a", 1)
    as_format_2(path)
    assert sorted(k for k in records(path) if k[:1] == _ledger.EVENT_PREFIX) == [
        _ledger.event_key(i) for i in range(1, 5)]
    now[0] += 10_000
    led = Ledger(path, clock_ms=lambda: now[0], events_retention_s=5)
    try:
        assert json.loads(led.store.get(META_KEY))["format"] == STORE_FORMAT
        one_batch(led, ["a", "b"])                      # events 5..6, one record
        assert [e.id for e in led.events(0, 10)[0]] == [1, 2, 3, 4, 5, 6]
        assert [e.id for e in led.events(3, 2)[0]] == [4, 5]
        assert led.verify()["events"] == 6
        trim_now(led)                                   # 1..4 past it; the waker is 7
        assert [e.id for e in led.events(4, 10)[0]] == [5, 6, 7]
        assert led.stats["events_first"] == 5
    finally:
        led.close()
    recs = records(path)
    assert not any(k[:1] == _ledger.EVENT_PREFIX for k in recs)
    assert events_records(recs) == [(5, 6), (7, 7)]
    with Ledger(path) as led:
        assert led.verify()["events"] == 3


def test_trimming_between_a_format_2_store_s_two_scans_is_events_trimmed(tmp_path):
    """A page older than the ring is read from LevelDB outside the lock; a
    format-2 store's records are read in two scans (one record per event,
    then a batch's).  A retention pass that lands between them took the
    page's last format-2 events and its first format-3 ones: the read is
    EventsTrimmed, never a page with a gap."""
    path = str(tmp_path / "d")
    now = [1_000_000_000]
    with Ledger(path, clock_ms=lambda: now[0]) as led:
        one_batch(led, ["a", "b", "c"])                 # 1..3
        led.mod("a", 1)                                 # 4
    as_format_2(path)                                   # 1..4: a record each
    with Ledger(path, clock_ms=lambda: now[0]) as led:
        one_batch(led, ["a", "b"])                      # 5..6: one record
        led.mod("a", 1)                                 # 7
        led.mod("a", 1)                                 # 8
    hook = []

    class HookStore(Store):
        def iterate(self, prefix, start=None):
            if prefix == _ledger.EVENTS_PREFIX and hook:
                hook.pop()()                            # the writer's pass, here
            return super().iterate(prefix, start)

    now[0] += 60_000
    led = Ledger(path, clock_ms=lambda: now[0], events_retention_s=5, store=HookStore(path))
    try:
        assert not led._events.ring                     # every page from LevelDB
        hook.append(lambda: trim_and_apply(led))
        with pytest.raises(EventsTrimmed) as e:
            led.events(after=1, limit=5)                # 2..6
        assert not hook and e.value.first == 8 == led.stats["events_first"]
        assert [e.id for e in led.events(8, 10)[0]] == [9]
    finally:
        led.close()


def trim_and_apply(led):
    """The writer's retention pass, from another thread as the writer's
    own, and its deletes written into LevelDB (which the applier does a
    moment after the batch is durable: here, before the scan goes on)."""
    t = threading.Thread(target=trim_now, args=(led,))
    t.start()
    t.join()
    led._committer.applier.apply()


def test_a_retention_pass_takes_at_most_events_trim_max_events(tmp_path, monkeypatch):
    """A pass holds the committer's lock: it is bounded by events, not by
    records (a record is a batch, thousands of events), reads only each
    record's span, and always takes one record at least."""
    monkeypatch.setattr(events_module, "EVENTS_TRIM_MAX", 10)
    path = str(tmp_path / "d")
    now = [1_000_000_000]
    led = Ledger(path, clock_ms=lambda: now[0], events_retention_s=5)
    try:
        one_batch(led, [f"big{i}" for i in range(12)])  # 1..12: more than a pass
        for b in range(4):
            one_batch(led, [f"c{b}-{i}" for i in range(4)])     # 13..28, 4 a record
        now[0] += 60_000
        events = led._events
        with led._committer.lock:
            assert events.past_retention(now[0]) == ([_ledger.events_key(12)], True)
            keys, full = events.past_retention(now[0])
            assert keys == [_ledger.events_key(16), _ledger.events_key(20)] and full
            keys, full = events.past_retention(now[0])
            assert keys == [_ledger.events_key(24)] and not full   # never the newest's
            assert events.first == 25
    finally:
        led.close()
