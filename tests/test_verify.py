"""accman.ledger.verify: the full check refuses each broken rule it names.
The records are the ledger's own, moved or removed in LevelDB (the file
checks pass: these are well-formed records telling a wrong story)."""

import pytest

from accman import Ledger
from accman.errors import StoreCorrupt
from accman.ledger import _ledger
from accman.ledger.leveldb import Store
from accman.ledger.verify import verify_store


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
