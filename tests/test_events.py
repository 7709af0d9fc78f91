"""The event stream of the embedded ledger (SPEC "Events"), through its
Python API: one event per applied change, ids growing by one with no gap
across reopens, pages and their bounds, the in-memory ring and LevelDB
behind it, low_balance once per crossing, the retention and its
trimming.  Long polls are in tests/test_events_long_poll.py."""

import asyncio
import os
import threading
import time

import pytest

from accman import BadRequest, Insufficient, Ledger, StoreError, Unavailable
from accman.errors import EventsTrimmed, NoHold
from accman.ledger import _ledger, commit
from accman.ledger import events as events_module
from accman.ledger.events import EVENTS_RING_MAX, EVENTS_TRIM_INTERVAL_S_MIN
from accman.ledger.leveldb import Store
from accman.limits import EVENTS_LIMIT_MAX, EVENTS_RETENTION_S_DEFAULT
from accman.records import EVENT_TYPES
from ledgerhelp import all_events, fund_many, wait_for



# --- one event per change ---------------------------------------------------------------

def test_every_applied_change_is_one_event_that_matches_its_entry(led, clock):
    led.mod("a", 100, key="fund")
    clock.advance(1)
    led.hold("a", -30, 60, key="h1")
    led.settle("a", 2, 10)
    led.hold("a", -5, 1)
    clock.advance(1)
    assert led.expire_due() == 1
    led.mod("b", 7)
    # Refusals and replays change nothing, so they make no event.
    with pytest.raises(Insufficient):
        led.hold("a", -1000, 60)
    with pytest.raises(NoHold):
        led.settle("a", 99, 0)
    led.mod("a", 100, key="fund")
    led.settle("a", 2, 10)
    events = all_events(led)
    assert [e.id for e in events] == [1, 2, 3, 4, 5, 6]
    assert [e.type for e in events] == ["mod", "hold", "settle", "hold", "expire", "mod"]
    assert set(e.type for e in events) <= set(EVENT_TYPES)
    a, b = led.account_id("a"), led.account_id("b")
    assert [e.account for e in events] == [a] * 5 + [b]
    past = {e.seq: e for e in led.past("a")}
    for e in events[:5]:
        entry = past[e.seq]
        assert (e.by, e.tot, e.at, e.key, e.hold) == (entry.by, entry.tot, entry.at, entry.key,
                                                      entry.hold)
    assert [(e.seq, e.by, e.tot, e.key, e.hold) for e in events[:5]] == [
        (1, 100, 100, "fund", None), (2, -30, 70, "h1", 2), (3, 20, 90, None, 2),
        (4, -5, 85, None, 4), (5, 5, 90, None, 4)]
    assert led.events(after=6) == ([], 6)


def test_the_credential_never_appears_in_an_event(led):
    creds = ["Sup3rS3cret-credential_0123456789", "another-live-credential"]
    for c in creds:
        led.mod(c, 50, key="k")
        led.hold(c, -5, 60)
    events = all_events(led)
    text = repr(events)
    for c in creds:
        assert c not in text
    ids = {led.account_id(c) for c in creds}
    assert len(ids) == 2 and all(len(i) == 32 and int(i, 16) >= 0 for i in ids)
    assert {e.account for e in events} == ids
    # /past carries the same public id, so the funding side can map events.
    page = led.read_past(creds[0], 10, None, None)
    assert page.account == led.account_id(creds[0])


def test_ids_run_on_across_reopens_and_expiries_at_open(path, clock):
    with Ledger(path, clock_ms=clock) as led:
        led.mod("a", 100)
        led.hold("a", -10, 5)
        assert led.stats["events_last"] == 2
    clock.advance(5)
    with Ledger(path, clock_ms=clock) as led:
        assert led.stats["events_last"] == 3                # the expiry at open
        led.mod("a", 1)
        assert [(e.id, e.type) for e in all_events(led)] == [
            (1, "mod"), (2, "hold"), (3, "expire"), (4, "mod")]
    with Ledger(path, clock_ms=clock) as led:
        assert led.mod("b", 1) == (1, 1)
        assert [e.id for e in all_events(led)] == [1, 2, 3, 4, 5]
        assert led.verify()["events"] == 5


def test_a_failed_batch_s_events_are_never_served_and_leave_no_gap(path, clock):
    class FailingStore(Store):
        fail = False

        def write(self, wal):
            if self.fail:
                raise StoreError(f"{self.path}: commit failed: injected fault")
            super().write(wal)

    store = FailingStore(path)
    with Ledger(path, clock_ms=clock, store=store) as led:
        led.mod("a", 10)
        store.fail = True
        with pytest.raises(Unavailable):
            led.mod("a", 5)
        assert [e.id for e in all_events(led)] == [1]
    with Ledger(path, clock_ms=clock) as led:
        assert led.tot("a") == 10
        led.mod("a", 1)
        assert [(e.id, e.tot) for e in all_events(led)] == [(1, 10), (2, 11)]


def test_an_event_is_served_only_once_its_batch_is_durable(path, clock):
    gate = threading.Event()
    entered = threading.Event()

    class SlowStore(Store):
        def write(self, wal):
            entered.set()
            gate.wait(10)
            super().write(wal)

    gate.set()
    led = Ledger(path, clock_ms=clock, store=SlowStore(path))
    try:
        led.mod("a", 1)
        gate.clear()
        entered.clear()
        t = threading.Thread(target=led.mod, args=("a", 2))
        t.start()
        assert entered.wait(10)
        page, nxt = led.events(after=0)
        assert [e.id for e in page] == [1] and nxt == 1
        assert led.events(after=1) == ([], 1)
        gate.set()
        t.join()
        assert [e.tot for e in all_events(led)] == [1, 3]
    finally:
        gate.set()
        led.close()


def test_events_from_leveldb_never_run_past_the_newest_durable_one(path, clock):
    """After a reopen the ring is empty and reads come from LevelDB, which
    holds a batch's events a moment before the writer says they are
    durable.  A read then must not serve them: it used to, with a `next`
    past the newest id, and the next read went back to it."""
    with Ledger(path, clock_ms=clock) as led:
        for _ in range(3):
            led.mod("a", 1)
    written = threading.Event()
    gate = threading.Event()

    class LateStore(Store):
        def write(self, wal):
            super().write(wal)
            written.set()
            gate.wait(10)

    led = Ledger(path, clock_ms=clock, store=LateStore(path))
    try:
        t = threading.Thread(target=led.mod, args=("a", 1))
        t.start()
        assert written.wait(10)
        page, nxt = led.events(after=0, limit=10)
        assert ([e.id for e in page], nxt) == ([1, 2, 3], 3)
        gate.set()
        t.join()
        page, nxt = led.events(after=0, limit=10)
        assert ([e.id for e in page], nxt) == ([1, 2, 3, 4], 4)
    finally:
        gate.set()
        led.close()


def test_event_records_hold_their_events_and_no_stray_bytes(path, clock):
    """A batch's events record is its change entries and nothing else: every
    byte of it decodes, the ids run 1..n without a gap, and no credential
    reaches any file of the store.  (Format 2's records once wrote 8 bytes
    of freed Python objects to disk, fragments of credentials among them.)"""
    async def run(led):
        await asyncio.gather(*[led.amod(f"secret-cred-{i}", 5, key="k" * (1 + i % 60))
                               for i in range(3000)])

    with Ledger(path, clock_ms=clock) as led:
        asyncio.run(run(led))
    store = Store(path)
    try:
        ids = []
        for k, v in store.iterate(_ledger.EVENTS_PREFIX):
            first, changes = _ledger.unpack_events(k, v)
            ids += [e[0] for e in _ledger.decode_changes(first, changes)]
    finally:
        store.close()
    assert ids == list(range(1, 3001))
    for top, _, names in os.walk(path):
        for name in names:
            with open(os.path.join(top, name), "rb") as f:
                assert b"secret-cred" not in f.read(), name


def test_reading_events_from_leveldb_does_not_stop_commits(path, clock):
    """A page read from LevelDB (up to a thousand records scanned and
    decoded) used to hold the commit lock throughout: every batch waited
    for it.  The page is now fixed under the lock and read outside it."""
    with Ledger(path, clock_ms=clock) as led:
        for _ in range(5):
            led.mod("a", 1)
    scanning, gate = threading.Event(), threading.Event()

    class SlowScanStore(Store):
        def iterate(self, prefix, start=None):
            if prefix == _ledger.EVENTS_PREFIX:
                scanning.set()
                gate.wait(10)
            return super().iterate(prefix, start)

    led = Ledger(path, clock_ms=clock, store=SlowScanStore(path))    # the ring is empty
    try:
        got = []
        reader = threading.Thread(target=lambda: got.append(led.events(after=0)))
        reader.start()
        assert scanning.wait(10)
        writer = threading.Thread(target=led.mod, args=("a", 1))
        writer.start()
        writer.join(5)
        committed = not writer.is_alive()
        gate.set()
        reader.join(10)
        writer.join(10)
        assert committed, "a mod waited for a read of events"
        page, nxt = got[0]
        assert [e.id for e in page] == [1, 2, 3, 4, 5] and nxt == 5   # the page as it was
        assert led.tot("a") == 6
    finally:
        gate.set()
        led.close()


# --- pages and their bounds -----------------------------------------------------------------

def test_events_page_with_after_and_limit(led):
    for i in range(30):
        led.mod("a", i + 1)
    page, nxt = led.events(after=0, limit=7)
    assert [e.id for e in page] == list(range(1, 8)) and nxt == 7
    page, nxt = led.events(after=nxt, limit=7)
    assert [e.id for e in page] == list(range(8, 15)) and nxt == 14
    page, nxt = led.events(after=25)
    assert [e.id for e in page] == list(range(26, 31)) and nxt == 30
    assert led.events(after=30) == ([], 30)
    # Past the newest event: told at once where the stream ends.
    assert led.events(after=1000) == ([], 30)


def test_events_limit_max_is_reached_and_one_more_is_refused(led):
    fund_many(led, "a", EVENTS_LIMIT_MAX + 1)
    page, nxt = led.events(limit=EVENTS_LIMIT_MAX)
    assert len(page) == EVENTS_LIMIT_MAX == 1000 and nxt == 1000
    page, _ = led.events()
    assert len(page) == 100                                 # the default
    for limit in (0, EVENTS_LIMIT_MAX + 1, -1, 1.0, True, "5"):
        with pytest.raises(BadRequest, match="limit"):
            led.events(limit=limit)


@pytest.mark.parametrize("after", [-1, 1.5, "0", None, True])
def test_a_bad_after_is_refused(led, after):
    with pytest.raises(BadRequest, match="after"):
        led.events(after=after)


# --- the ring and LevelDB behind it ------------------------------------------------------

def test_the_ring_keeps_every_event_leveldb_may_lack():
    """Past EVENTS_RING_MAX the ring drops its oldest batches, but never one
    with an event at or after the first that LevelDB may lack (LevelDB is
    written behind the durable batches: accman/ledger/applier.py)."""
    log = events_module.EventLog(None, threading.Lock(), 0, 0, 3600)
    half = EVENTS_RING_MAX // 2 + 1
    for i in range(3):
        log.append(1 + i * half, half, b"", lagging=1)
    assert [b[0] for b in log.ring] == [1, 1 + half, 1 + 2 * half]
    assert log.ring_events == 3 * half > EVENTS_RING_MAX
    log.append(1 + 3 * half, half, b"", lagging=1 + 2 * half)
    assert [b[0] for b in log.ring] == [1 + 2 * half, 1 + 3 * half]
    log.append(1 + 4 * half, half, b"")                 # LevelDB has them all
    assert [b[0] for b in log.ring] == [1 + 3 * half, 1 + 4 * half]


def test_reading_past_the_ring_falls_back_to_leveldb(path, clock):
    """The batches holding the newest EVENTS_RING_MAX events (or a batch
    more) are kept in memory; older ones come from LevelDB, the same
    events, and a page may start in one and end in the other."""
    n = EVENTS_RING_MAX + 3 * 4096 + 700
    with Ledger(path, clock_ms=clock) as led:
        fund_many(led, "a", n)
        events = led._events
        ring_first = events.ring[0][0]
        kept = events.last - ring_first + 1
        assert ring_first > 301 and EVENTS_RING_MAX <= kept < EVENTS_RING_MAX + 4096
        assert kept == events.ring_events
        before = all_events(led)
        start = ring_first - 300
        page, nxt = led.events(after=start - 1, limit=600)          # LevelDB, then the ring
        assert [e.id for e in page] == list(range(start, start + 600)) and nxt == start + 599
        assert [e.tot for e in page] == list(range(start, start + 600))
    assert [e.id for e in before] == list(range(1, n + 1))
    assert [e.tot for e in before] == [e.id for e in before]
    with Ledger(path, clock_ms=clock) as led:                 # all from LevelDB now
        assert len(led._events.ring) == 0
        assert all_events(led) == before


# --- low_balance ---------------------------------------------------------------------------

def low_events(led):
    return [(e.seq, e.by, e.tot, e.hold) for e in all_events(led) if e.type == "low_balance"]


def test_low_balance_once_per_crossing_of_the_default_threshold(path, clock):
    with Ledger(path, clock_ms=clock, low_balance=50) as led:
        led.mod("a", 100)
        led.mod("a", -50)                   # 50: at the threshold, not below
        assert low_events(led) == []
        led.mod("a", -1)                    # 49: crosses
        led.mod("a", -9)                    # 40: still below, no second event
        led.mod("a", 10)                    # 50: back at it
        led.mod("a", -1)                    # 49: crosses again
        assert low_events(led) == [(3, -1, 49, None), (6, -1, 49, None)]
        led.mod("a", 100)                   # 149
        led.hold("a", -120, 1)              # 29: a hold crosses too
        clock.advance(1)
        led.expire_due()                    # back to 149: an expiry never emits
        led.settle("a", led.hold("a", -100, 60)[0], 100)    # 49 (crossing), then the settle
        assert low_events(led) == [(3, -1, 49, None), (6, -1, 49, None),
                                   (8, -120, 29, 8), (10, -100, 49, 10)]
        events = all_events(led)
        crossing = [i for i, e in enumerate(events) if e.type == "low_balance"]
        # Each low_balance event follows the change that crossed, same account.
        for i in crossing:
            assert events[i - 1].seq == events[i].seq and events[i - 1].type != "low_balance"
            assert events[i].account == led.account_id("a")
        led.verify()


def test_a_funding_mod_s_low_sets_the_account_s_threshold_and_it_is_kept(path, clock):
    with Ledger(path, clock_ms=clock, low_balance=50) as led:
        led.mod("a", 100, low=10)           # a's own threshold: 10, not 50
        led.mod("b", 100)                   # b keeps the default
        led.mod("a", -60)
        led.mod("b", -60)
        assert [(e.account, e.tot) for e in all_events(led) if e.type == "low_balance"] == [
            (led.account_id("b"), 40)]
        with pytest.raises(BadRequest, match="low"):
            led.mod("a", -1, low=5)         # only a funding mod sets it
        with pytest.raises(BadRequest, match="low"):
            led.mod("a", 1, low=1.5)
    with Ledger(path, clock_ms=clock) as led:       # no default now: a's own is kept
        led.mod("a", -31)                   # 9: crosses 10
        led.mod("b", -40)                   # 0: no threshold for b
        assert [(e.account, e.tot) for e in all_events(led) if e.type == "low_balance"] == [
            (led.account_id("b"), 40), (led.account_id("a"), 9)]
        led.mod("a", 100, low=200)          # a new threshold, from the next change on
        led.mod("a", -1)                    # 108: under 200, but it never was at or above
        assert len(low_events(led)) == 2


def test_a_keyed_funding_mod_sent_again_with_another_low_sets_nothing(led):
    """`low` is not part of what a key names: the replay answers the first
    reply and the threshold stays the first mod's (SERVER.md)."""
    assert led.mod("a", 100, low=10, key="fund") == (100, 1)
    assert led.mod("a", 100, low=50, key="fund") == (100, 1)
    led.mod("a", -60)                       # 40: under 50, not under 10
    assert low_events(led) == []
    led.mod("a", -35)                       # 5: crosses 10
    assert [tot for _, _, tot, _ in low_events(led)] == [5]


def test_no_threshold_no_low_balance_event(led):
    led.mod("a", 10)
    led.mod("a", -20)
    assert low_events(led) == []


# --- retention -------------------------------------------------------------------------------

def test_events_past_the_retention_are_trimmed_durably_and_asking_for_them_is_410(path, clock):
    with Ledger(path, clock_ms=clock, events_retention_s=0.5) as led:
        for _ in range(10):
            led.mod("a", 1)
        clock.advance(10)
        led.mod("a", 1)
        led.mod("a", 1)
        wait_for(lambda: led.stats["events_first"] == 11)
        with pytest.raises(EventsTrimmed) as e:
            led.events(after=0)
        assert (e.value.status, e.value.code, e.value.first) == (410, "events_trimmed", 11)
        with pytest.raises(EventsTrimmed):
            led.events(after=9)
        assert [x.id for x in led.events(after=10)[0]] == [11, 12]
        assert led.stats["events_trimmed"] == 10
    with Ledger(path, clock_ms=clock) as led:
        with pytest.raises(EventsTrimmed) as e:
            led.events(after=5)
        assert e.value.first == 11
        assert led.verify()["events"] == 2
        assert led.past("a", limit=1)[0].seq == 12            # the history stays whole


def test_the_default_retention_is_events_retention_s_default(path, clock, monkeypatch):
    """SPEC: events are kept 7 days by default.  An event a second short of
    EVENTS_RETENTION_S_DEFAULT old outlives the passes that follow; a
    second past it, the next pass trims it."""
    monkeypatch.setattr(commit, "EVENTS_TRIM_INTERVAL_S", EVENTS_TRIM_INTERVAL_S_MIN)
    assert EVENTS_RETENTION_S_DEFAULT == 7 * 24 * 3600
    with Ledger(path, clock_ms=clock) as led:
        led.mod("a", 1)
        clock.advance(EVENTS_RETENTION_S_DEFAULT - 1)
        led.mod("a", 1)             # the newest event, never trimmed
        time.sleep(10 * EVENTS_TRIM_INTERVAL_S_MIN)     # passes, if the writer runs
        assert led.stats["events_first"] == 1 and led.stats["events_trimmed"] == 0
        clock.advance(2)
        wait_for(lambda: led.stats["events_first"] == 2, what="the trim of event 1")
        assert [e.id for e in led.events(after=1)[0]] == [2]


def test_a_retention_of_a_millisecond_trims_at_most_every_trim_interval_min(path, clock):
    """Retention passes ran as often as the retention: at its shortest, a
    millisecond, the idle writer woke a thousand times a second with
    nothing to trim.  They run at most every EVENTS_TRIM_INTERVAL_S_MIN."""
    passes = []
    with Ledger(path, clock_ms=clock, events_retention_s=0.001) as led:
        events = led._events
        real = events.past_retention

        def counted(now_ms):
            passes.append(time.monotonic())
            return real(now_ms)

        events.past_retention = counted
        led.mod("a", 1)
        led.mod("a", 1)
        clock.advance(10)
        led.mod("a", 1)
        wait_for(lambda: led.stats["events_first"] == 3)
        passes.clear()
        time.sleep(0.5)
        taken = list(passes)
    assert len(taken) <= 0.5 / events_module.EVENTS_TRIM_INTERVAL_S_MIN + 2, len(taken)


def test_the_newest_event_is_never_trimmed(path, clock):
    with Ledger(path, clock_ms=clock, events_retention_s=0.5) as led:
        for _ in range(5):
            led.mod("a", 1)
        clock.advance(60)
        wait_for(lambda: led.stats["events_first"] == 5)
        time.sleep(1.2)                                     # two more passes
        assert led.stats["events_first"] == 5
        assert [e.id for e in led.events(after=4)[0]] == [5]
    with Ledger(path, clock_ms=clock) as led:
        assert led.mod("a", 1) == (6, 6)
        assert [e.id for e in led.events(after=4)[0]] == [5, 6]


def test_events_after_the_kept_id_outlive_the_retention_until_it_moves(path, clock):
    """A webhook's saved cursor (accman serve --webhook): the events after
    it wait for its receiver whatever their age."""
    with Ledger(path, clock_ms=clock, events_retention_s=0.5, events_kept_after=3) as led:
        for _ in range(6):
            led.mod("a", 1)
        clock.advance(60)
        wait_for(lambda: led.stats["events_first"] == 4)
        time.sleep(1.2)                                     # two more passes
        assert led.stats["events_first"] == 4
        assert [e.id for e in led.events(after=3)[0]] == [4, 5, 6]
        with pytest.raises(BadRequest, match="^event_id must be an event id, 0 to "):
            led.keep_events_after(-2)
        led.keep_events_after(5)
        wait_for(lambda: led.stats["events_first"] == 6)
        led.keep_events_after(0)
        led.mod("a", 1)
        clock.advance(60)
        time.sleep(1.2)
        assert led.stats["events_first"] == 6               # 6 and 7 kept
        led.keep_events_after(None)                         # the retention alone
        wait_for(lambda: led.stats["events_first"] == 7)    # the newest stays


def test_trimming_deletes_events_trim_max_a_pass_and_keeps_up(path, clock, monkeypatch):
    """A pass deletes at most EVENTS_TRIM_MAX events records (the lock is
    never held long); a full pass is followed by the next one at once.  It
    used to wait the whole interval, so that trimming fell behind for good
    above EVENTS_TRIM_MAX records per interval.  (The bound is lowered to
    10 here: a record is a batch, and 8,000 batches take a minute.)"""
    monkeypatch.setattr(events_module, "EVENTS_TRIM_MAX", 10)
    deletes = []

    class CountingStore(Store):
        def write(self, wal):
            super().write(wal)
            n = sum(v is None for _, v in _ledger.leveldb_puts(wal))
            if n:
                deletes.append((time.monotonic(), n))       # durable now

    n_records = 2 * 10 + 5
    with Ledger(path, clock_ms=clock, store=CountingStore(path), events_retention_s=2) as led:
        for _ in range(n_records):
            led.mod("a", 1)                                 # a batch, a record, each
        clock.advance(60)
        wait_for(lambda: sum(n for _, n in deletes) == n_records - 1, timeout_s=20)
        assert [n for _, n in deletes] == [10, 10, 4]
        # Back to back: the three passes did not wait an interval (2 s) between them.
        assert deletes[-1][0] - deletes[0][0] < 2.0
        assert led.verify()["events"] == 1


def test_a_short_retention_is_trimmed_within_about_twice_it(path, clock):
    """Passes run every EVENTS_TRIM_INTERVAL_S, or every retention when it
    is shorter."""
    assert commit.EVENTS_TRIM_INTERVAL_S == 60
    with Ledger(path, clock_ms=clock, events_retention_s=0.3) as led:
        led.mod("a", 1)
        led.mod("a", 1)
        clock.advance(1)
        # Within seconds, where it used to take a minute more.
        wait_for(lambda: led.stats["events_first"] == 2, timeout_s=10)
