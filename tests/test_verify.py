"""accman.ledger.verify: the full check refuses each broken rule it names.
The records are the ledger's own, moved or removed in LevelDB (the file
checks pass: these are well-formed records telling a wrong story)."""

import struct
import threading

import pytest

from accman import Ledger
from accman.errors import StoreCorrupt
from accman.ledger import _ledger, eventrecords
from accman.ledger.leveldb import Store
from accman.ledger.verify import verify_store
from model import Clock
from test_event_records import format_2_event


@pytest.fixture
def store(tmp_path):
    path = str(tmp_path / "data")
    with Ledger(path) as led:
        for i, by in enumerate((10, 20, -5, 7)):
            led.mod("alice", by, key=f"k{i}")
        led.mod("bob", 3)
        hid = led._book.account("alice").hid
    s = Store(path)
    yield s, hid
    s.close()


def test_a_sound_store_passes_with_its_counts(store):
    s, _ = store
    assert verify_store(s) == {"accounts": 2, "entries": 5, "keys": 4, "holds": 0,
                               "open_holds": 0, "events": 5}


def test_a_gap_in_a_history_is_refused(store):
    s, hid = store
    s.db.delete(_ledger.history_key(hid, 2))
    with pytest.raises(StoreCorrupt, match="history seq 3 follows 1: a gap"):
        verify_store(s)


def test_an_entry_whose_tot_is_not_the_sum_is_refused(store):
    s, hid = store
    s.db.put(_ledger.history_key(hid, 3), s.db.get(_ledger.history_key(hid, 2)))
    with pytest.raises(StoreCorrupt, match="history entry 3: tot is not the previous tot"):
        verify_store(s)


def test_a_missing_idempotency_record_is_refused(store):
    s, hid = store
    s.db.delete(_ledger.KEY_PREFIX + hid + b"k1")
    with pytest.raises(StoreCorrupt, match="a keyed history entry has no idempotency record"):
        verify_store(s)


def test_an_idempotency_record_naming_another_entry_is_refused(store):
    s, hid = store
    s.db.put(_ledger.KEY_PREFIX + hid + b"k1", s.db.get(_ledger.KEY_PREFIX + hid + b"k2"))
    with pytest.raises(StoreCorrupt, match="does not match its history entry"):
        verify_store(s)


# --- holds and events ---------------------------------------------------------------

def _history(by, tot, at, hold=None, key=b""):
    """A history record as ext/records.pxi writes it (version 2: with hold)."""
    if hold is None:
        return struct.pack(">Bqqq", 1, by, tot, at) + key
    return struct.pack(">Bqqqq", 2, by, tot, at, hold) + key


def _hold_record(amount, expires_ms, state, use=0, end_seq=0, end_tot=0):
    return struct.pack(">BqqBqqq", 1, amount, expires_ms, state, use, end_seq, end_tot)


@pytest.fixture
def held(tmp_path):
    """alice: +100 (1), hold 30 (2, crossing her low of 80), settle use 10
    (3), hold 5 (4), its expiry (5), hold 7 still open (6); bob: +10 (1),
    hold 4 (2), settle use 0 (3); carol: +10 (1), hold 3 (2), settle use 3
    (3: by 0).  Events 1..16, one a low_balance."""
    path = str(tmp_path / "data")
    clock = Clock()
    with Ledger(path, clock_ms=clock) as led:
        led.mod("alice", 100, low=80)
        led.hold("alice", -30, 60)
        led.settle("alice", 2, 10)
        led.hold("alice", -5, 1)
        clock.advance(1)
        led.expire_due()
        led.hold("alice", -7, 60)
        led.mod("bob", 10)
        led.hold("bob", -4, 60)
        led.settle("bob", 2, 0)
        led.mod("carol", 10)
        led.hold("carol", -3, 60)
        led.settle("carol", 2, 3)
        hids = {c: led._book.account(c).hid for c in ("alice", "bob", "carol")}
    s = Store(path)
    yield s, hids
    s.close()


def _entry(s, hid, seq):
    """(by, tot, at_ms, key, hold) of a history record of one entry (each
    change here is a batch of its own)."""
    [(_, *entry)] = _ledger.unpack_history_group(
        seq, s.db.get(_ledger.history_key(hid, seq)))
    return tuple(entry)


def _record(s, event_id):
    """(key, value) of the events record holding `event_id` (store format 3:
    a batch's change entries; each change here is a batch of its own)."""
    for k, first, last, _ in eventrecords.records(s, event_id):
        assert first <= event_id <= last
        return k, bytearray(s.db.get(k))
    raise AssertionError(f"no record holds event {event_id}")


def _as_format2(s):
    """The store's events rewritten as store format 2 kept them, one record
    per event (b"e" + id), which a store of that format still holds until
    its retention trims them: the rules hold for them too."""
    for k, _, _, evs in list(eventrecords.records(s, 0)):
        s.db.delete(k)
        for event_id, *event in evs:
            s.db.put(_ledger.event_key(event_id), format_2_event(*event))


def test_a_sound_store_with_holds_and_events_passes(held):
    s, _ = held
    assert verify_store(s) == {"accounts": 3, "entries": 12, "keys": 0, "holds": 5,
                               "open_holds": 1, "events": 13}
    kinds = [_ledger.EVENT_NAMES[e[1]] for e in eventrecords.events(s, 0)]
    assert kinds == ["mod", "hold", "low_balance", "settle", "hold", "expire", "hold",
                     "mod", "hold", "settle", "mod", "hold", "settle"]
    _as_format2(s)
    assert verify_store(s)["events"] == 13


def test_the_end_of_a_hold_that_never_began_is_refused(held):
    s, hids = held
    by, tot, at, _, _ = _entry(s, hids["bob"], 3)
    s.db.put(_ledger.history_key(hids["bob"], 3), _history(by, tot, at, hold=99))
    with pytest.raises(StoreCorrupt, match="history entry 3: the end of hold 99, which never"):
        verify_store(s)


def test_a_second_end_of_a_hold_is_refused(held):
    s, hids = held
    by, tot, at, _, _ = _entry(s, hids["alice"], 5)          # hold 4's expiry, by 5
    s.db.put(_ledger.history_key(hids["alice"], 5), _history(by, tot, at, hold=2))
    with pytest.raises(StoreCorrupt, match="history entry 5: a second end of hold 2"):
        verify_store(s)


def test_an_end_that_returns_more_than_was_held_is_refused(held):
    s, hids = held
    _, tot, at, _, _ = _entry(s, hids["bob"], 3)
    s.db.put(_ledger.history_key(hids["bob"], 3), _history(5, tot + 1, at, hold=2))
    with pytest.raises(StoreCorrupt, match="history entry 3: hold 2 returns more than it held"):
        verify_store(s)


def test_a_hold_that_takes_nothing_is_refused(held):
    s, hids = held
    by, tot, at, _, _ = _entry(s, hids["bob"], 1)
    s.db.put(_ledger.history_key(hids["bob"], 1), _history(by, tot, at, hold=1))
    with pytest.raises(StoreCorrupt, match="history entry 1: a hold that takes nothing"):
        verify_store(s)


def test_a_by_of_0_outside_a_hold_s_end_is_refused(held):
    s, hids = held
    by, tot, at, _, _ = _entry(s, hids["carol"], 3)
    assert by == 0
    s.db.put(_ledger.history_key(hids["carol"], 3), _history(by, tot, at))
    with pytest.raises(StoreCorrupt, match="history entry 3: by is 0 outside a hold's end"):
        verify_store(s)


@pytest.mark.parametrize("hold,record,msg", [
    (2, dict(amount=31, state=1, use=10, end_seq=3, end_tot=90),
     "hold 2: its record does not match its start"),
    (2, dict(amount=30, state=0), "hold 2: ended in the history, open in its record"),
    (2, dict(amount=30, state=1, use=11, end_seq=3, end_tot=90),
     "hold 2: its record does not match its end"),
    (4, dict(amount=5, state=1, use=0, end_seq=5, end_tot=90),
     None),                                     # the entry agrees; its event does not
    (6, dict(amount=7, state=1, use=7, end_seq=7, end_tot=75),
     "hold 6: its record does not match its end"),
])
def test_a_hold_record_that_disagrees_with_the_history_is_refused(held, hold, record, msg):
    s, hids = held
    key = _ledger.hold_key(hids["alice"], hold)
    expires = _ledger.unpack_hold(s.db.get(key))[1]
    s.db.put(key, _hold_record(record.pop("amount"), expires, record.pop("state"), **record))
    with pytest.raises(StoreCorrupt, match=msg or "event 6: a expire event of the wrong kind"):
        verify_store(s)


def test_a_hold_that_began_without_its_record_is_refused(held):
    s, hids = held
    s.db.delete(_ledger.hold_key(hids["alice"], 6))
    with pytest.raises(StoreCorrupt, match="a hold that began has no record"):
        verify_store(s)


@pytest.mark.parametrize("hold,amount,msg", [
    (2, 30, "open-hold record of hold 2: no open hold matches it"),    # an ended hold
    (6, 8, "open-hold record of hold 6: no open hold matches it"),     # the wrong amount
    (6, None, "an open hold has no open-hold record"),
])
def test_open_hold_records_that_are_not_the_open_holds_are_refused(held, hold, amount, msg):
    s, hids = held
    key = _ledger.open_hold_key(hids["alice"], hold)
    if amount is None:
        s.db.delete(key)
    else:
        expires = _ledger.unpack_hold(s.db.get(_ledger.hold_key(hids["alice"], hold)))[1]
        s.db.put(key, _ledger.pack_open_hold(amount, expires))
    with pytest.raises(StoreCorrupt, match=msg):
        verify_store(s)


def test_a_skipped_event_id_is_refused(held):
    s, _ = held
    s.db.delete(_record(s, 4)[0])
    with pytest.raises(StoreCorrupt, match="event 5 where 4 was due: an id skipped"):
        verify_store(s)


def test_events_that_end_before_the_newest_id_are_refused(held):
    s, _ = held
    s.db.delete(_record(s, 13)[0])
    with pytest.raises(StoreCorrupt, match="the events end at 12, the store says 13"):
        verify_store(s)


def test_an_events_record_holding_other_ids_than_its_key_is_refused(held):
    s, _ = held
    k, raw = _record(s, 8)
    s.db.put(_ledger.events_key(9), bytes(raw))     # event 8's entry under 9's key
    s.db.delete(k)
    with pytest.raises(StoreCorrupt, match="holds other ids than its key says"):
        verify_store(s)


# An entry's first byte is its kind (ext/changes.pxi); a record's value is
# ver, its first id (8 bytes), then its entries: the first entry is at 9.
ENTRY_AT = 9
CHANGE_LOW = 0x80


def test_an_event_that_does_not_match_its_entry_is_refused(held):
    s, _ = held
    k, raw = _record(s, 8)                          # bob's +10: by is one byte, after
    raw[ENTRY_AT + 18] ^= 2                         # kind, hid (16) and seq (1): 10 -> 11
    s.db.put(k, bytes(raw))
    with pytest.raises(StoreCorrupt, match="event 8 does not match the history entry"):
        verify_store(s)


def test_an_event_of_the_wrong_kind_is_refused(held):
    s, _ = held
    k, raw = _record(s, 2)                          # alice's hold (and its low_balance)
    raw[ENTRY_AT] = CHANGE_LOW | _ledger.EV_MOD     # said to be a mod
    s.db.put(k, bytes(raw))
    with pytest.raises(StoreCorrupt, match="event 2: a mod event of the wrong kind"):
        verify_store(s)


def test_a_settle_event_for_an_expiry_is_refused(held):
    s, _ = held
    k, raw = _record(s, 6)                          # hold 4's expiry
    raw[ENTRY_AT] = _ledger.EV_SETTLE               # said to be a settle
    s.db.put(k, bytes(raw))
    with pytest.raises(StoreCorrupt, match="event 6: a settle event of the wrong kind"):
        verify_store(s)


def test_two_events_of_one_change_are_refused(held):
    s, _ = held
    _, raw4 = _record(s, 4)                         # alice's settle
    k5, _ = _record(s, 5)
    s.db.put(k5, bytes(raw4[:1]) + struct.pack(">Q", 5) + bytes(raw4[ENTRY_AT:]))
    with pytest.raises(StoreCorrupt, match="event 5: a second event of one change"):
        verify_store(s)


def test_a_low_balance_event_that_follows_no_crossing_change_is_refused(held):
    """Store format 2 only: format 3 makes a low_balance event from the
    entry of the change that crossed, so it cannot stand alone."""
    s, _ = held
    _as_format2(s)
    raw = bytearray(s.db.get(_ledger.event_key(8)))     # bob's first mod
    raw[1] = _ledger.EV_LOW                             # said to be a low_balance
    s.db.put(_ledger.event_key(8), bytes(raw))
    with pytest.raises(StoreCorrupt, match="event 8: a low_balance event that does not follow"):
        verify_store(s)


def test_a_trimmed_store_whose_first_event_is_a_low_balance_passes(held):
    """Trimming cuts by id, so the oldest event kept may be the low_balance
    of a change whose own event is gone."""
    s, _ = held
    _as_format2(s)
    for i in (1, 2):
        s.db.delete(_ledger.event_key(i))
    s.db.put(_ledger.EVENTS_META_KEY, struct.pack(">Bqq", 1, 3, 13))
    assert verify_store(s)["events"] == 11


def test_a_live_ledger_verifies_while_its_writer_goes_on(tmp_path):
    """Ledger.verify on a ledger in use: the writer applies batches to
    LevelDB while the check reads it, pass after pass.  Each check reads
    one state (a LevelDB snapshot): a history, its keys, holds and events
    as of one moment, never a newer key record than the history it read,
    which used to be refused as damage most times."""
    with Ledger(str(tmp_path / "data")) as led:
        for i in range(20):
            led.mod(f"c{i}", 100)
        stop = threading.Event()

        def write(t):
            i = 0
            while not stop.is_set():
                cred = f"c{(i * 7 + t) % 20}"
                if i % 3:
                    led.mod(cred, 1, key=f"m{t}-{i}")
                else:
                    hold, _, _ = led.hold(cred, -1, 60, key=f"h{t}-{i}")
                    led.settle(cred, hold, 1)
                i += 1
        writers = [threading.Thread(target=write, args=(t,)) for t in range(4)]
        for t in writers:
            t.start()
        try:
            counts = [led.verify()]
            # Pass after pass until the checks have seen three states: a
            # loaded machine may schedule the writers late, never not at all.
            while len({c["entries"] for c in counts}) < 3 and len(counts) < 5000:
                counts.append(led.verify())
        finally:
            stop.set()
            for t in writers:
                t.join()
        assert len({c["entries"] for c in counts}) >= 3      # it ran under writes
        assert led.verify()["entries"] == led.stats["events_last"]
