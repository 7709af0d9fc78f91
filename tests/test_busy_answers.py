"""QUEUED_MODS_MAX refuses a call that would queue a change (503 busy):
one that queues none is answered while the queue is full.  A
keyed repeat of a change still waiting for its commit gets that change's
answer when it is durable, where a client retrying with its key was told
`busy` again and again under a load that kept the queue full; a key
reused with another value is key_reused; a refusal on the balance, an
unknown account and a settle repeated are answered; a new change is busy.
Each answer that waits for a batch is told that batch's failure if it
fails.  A settle that finds its hold due would queue its expiry: busy.
A store that failed to commit answers no change, not even a repeat."""

import pytest

from accman import (Busy, HoldEnded, Insufficient, KeyReused, Ledger, NoAccount, NotApplied,
                    StoreError, Unavailable)
from accman.ledger.leveldb import Store
from ledgerhelp import GatedStore, wait_for
from model import Clock

QUEUED = 4


def full_ledger(tmp_path, store_class=GatedStore):
    """A Ledger whose disk waits for its store's gate, with a's keyed
    funding ("f", 10) and keyed hold ("h", 3) queued.  Returns (ledger,
    store, got, told): got holds the outcomes told so far by name, told(name)
    makes a `done` that keeps one there."""
    path = str(tmp_path / "d")
    store = store_class(path)
    led = Ledger(path, store=store, queued_mods_max=QUEUED, batch_mods_max=2)
    assert led.mod("b", 5, key="b1") == (5, 1)      # durable: b and b1 on the disk
    store.gate.clear()
    got = {}

    def told(name):
        return lambda outcome: got.setdefault(name, outcome)
    led.submit("a", 10, key="f", done=told("fund"))
    assert led.submit_hold("a", -3, 60, key="h", done=told("hold")) is None
    return led, store, got, told


def test_a_full_queue_answers_what_queues_no_change(tmp_path):
    led, store, got, told = full_ledger(tmp_path)
    try:
        led.submit_settle("a", 2, 1, done=told("settle"))
        led.submit("a", -1, done=told("charge"))
        with pytest.raises(Busy, match=r"^QUEUED_MODS_MAX \(4\)"):
            led.submit("a", -1, done=told("new"))
        with pytest.raises(Busy):
            led.submit("b", -1, key="new", done=told("new keyed"))
        with pytest.raises(Busy):
            led.submit_hold("a", -1, 60, done=told("new hold"))
        led.submit("a", 10, key="f", done=told("fund again"))
        led.submit("a", 11, key="f", done=told("fund reused"))
        led.submit_hold("a", -3, 60, key="h", done=told("hold again"))
        led.submit_settle("a", 2, 1, done=told("settle again"))
        led.submit("a", -100, min=0, done=told("insufficient"))
        led.submit("nobody", -1, done=told("no account"))
        # Every answer judged on a change not durable yet waits for it.
        assert set(got) == {"no account"}
        store.gate.set()
        wait_for(lambda: len(got) == 10, 10)
        # The busy calls changed nothing: b's balance, the key "new" unused.
        assert led.tot("b") == 5
        assert led.mod("b", -1, key="new") == (4, 2)
    finally:
        store.gate.set()
        led.close()
    assert got["fund"] == got["fund again"] == (10, 1)
    assert got["hold"] == got["hold again"] == (2, 7, 2)
    assert got["settle"] == got["settle again"] == (9, 3)
    assert got["charge"] == (8, 4)
    assert isinstance(got["fund reused"], KeyReused)
    assert isinstance(got["insufficient"], Insufficient) and got["insufficient"].tot == 8
    assert isinstance(got["no account"], NoAccount)
    assert not {"new", "new keyed", "new hold"} & set(got)


class FailingWhenLet(GatedStore):
    """Its writes after the first wait for the gate, then fail."""

    def __init__(self, path):
        super().__init__(path)
        self.writes = 0

    def write(self, wal):
        self.writes += 1
        if self.writes >= 2:
            self.gate.wait()
            raise StoreError("the disk is gone")
        Store.write(self, wal)


def test_a_failed_store_answers_no_repeat(tmp_path):
    led, store, got, told = full_ledger(tmp_path, FailingWhenLet)
    try:
        store.gate.set()
        wait_for(lambda: len(got) == 2, 10)
        for cred, by, key in (("a", 10, "f"), ("b", 5, "b1")):
            with pytest.raises(NotApplied, match="failed to commit"):
                led.submit(cred, by, key=key, done=told(key))
    finally:
        store.gate.set()
        led.close()
    assert not {"f", "b1"} & set(got)


def test_repeats_under_a_full_queue_are_told_their_batch_s_failure(tmp_path):
    """The answers a full queue gives while a batch is written are told its
    failure when it fails, as the changes they wait for are: 503
    unavailable for the batch that failed, not_applied behind it; none is
    told the change's success."""
    led, store, got, told = full_ledger(tmp_path, FailingWhenLet)
    try:
        led.submit_settle("a", 2, 1, done=told("settle"))
        led.submit("a", -1, done=told("charge"))
        led.submit("a", 10, key="f", done=told("fund again"))
        led.submit("a", 11, key="f", done=told("fund reused"))
        led.submit_hold("a", -3, 60, key="h", done=told("hold again"))
        led.submit_settle("a", 2, 1, done=told("settle again"))
        led.submit("a", -100, min=0, done=told("insufficient"))
        assert got == {}
        store.gate.set()
        wait_for(lambda: len(got) == 9, 10)
    finally:
        store.gate.set()
        led.close()
    assert isinstance(got["fund"], Unavailable) and not isinstance(got["fund"], NotApplied)
    for repeat, original in (("fund again", "fund"), ("fund reused", "fund"),
                             ("hold again", "hold"), ("settle again", "settle"),
                             ("insufficient", "charge")):
        assert isinstance(got[original], Unavailable), got
        assert type(got[repeat]) is type(got[original]), (repeat, got)


def test_a_settle_that_finds_its_hold_due_is_busy_and_ends_nothing(tmp_path):
    """A settle of a hold past its expiry ends it first, a change: on a full
    queue it is busy, and the hold is neither expired by it nor counted;
    the writer's clock ends it once the disk goes on, with use 0."""
    path = str(tmp_path / "d")
    clock = Clock()
    store = GatedStore(path)
    led = Ledger(path, store=store, clock_ms=clock, queued_mods_max=QUEUED, batch_mods_max=2)
    try:
        assert led.mod("a", 10) == (10, 1)
        assert led.hold("a", -3, 1) == (2, 7, 2)
        store.gate.clear()
        for _ in range(QUEUED):
            led.submit("b", 1, done=None)
        assert store.writing.wait(10)
        clock.advance(2)
        for use in (1, 0):
            with pytest.raises(Busy):
                led.submit_settle("a", 2, use)
        assert led.stats["holds_expired"] == 0
        assert led.stats["queued_mods"] == QUEUED
        store.gate.set()
        wait_for(lambda: led.stats["holds_expired"] == 1, 10)
        with pytest.raises(HoldEnded, match="expired"):
            led.settle("a", 2, 1)
        assert led.tot("a") == 10
        assert [e.hold for e in led.past("a")] == [2, 2, None]
    finally:
        store.gate.set()
        led.close()
