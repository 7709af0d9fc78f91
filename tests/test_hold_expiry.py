"""Expiry of holds in the embedded ledger (SPEC "Holds": a hold not
settled within its ttl ends by itself with use 0, durably, also across
restarts), on an injected clock: by the writer's own clock, by
expire_due, by a settle past the ttl, at open, in batches, once each."""

import asyncio
import threading

import pytest

from accman import Ledger
from accman.errors import HoldEnded
from ledgerhelp import entries, gated_ledger, wait_for



# --- expiry ------------------------------------------------------------------------------------

def test_a_hold_not_settled_within_its_ttl_ends_by_itself_with_use_0(led, clock):
    led.mod("a", 100)
    hold, _, _ = led.hold("a", -30, 10, key="h")
    clock.advance(9.999)
    assert led.expire_due() == 0
    assert led.tot("a") == 70 and led.open_holds == 1
    clock.advance(0.001)
    t_end = clock()
    assert led.expire_due() == 1
    assert led.tot("a") == 100 and led.open_holds == 0
    assert entries(led, "a")[-1] == (3, 30, 100, None, hold)
    assert led.past("a", limit=1)[0].at == t_end
    assert led.stats["holds_expired"] == 1
    with pytest.raises(HoldEnded, match="expired"):
        led.settle("a", hold, 0)
    assert led.expire_due() == 0                        # it ended once
    assert len(entries(led, "a")) == 3
    assert led.verify()["open_holds"] == 0


def test_a_settle_past_the_ttl_finds_the_hold_expired(led, clock):
    """The writer has not run its expiry yet: the settle itself ends the
    hold as expired, durably, and answers hold_ended."""
    led.mod("a", 100)
    led.hold("a", -30, 10)
    clock.advance(10.5)
    with pytest.raises(HoldEnded, match="expired"):
        led.settle("a", 2, 30)
    assert led.tot("a") == 100
    assert entries(led, "a")[-1] == (3, 30, 100, None, 2)
    assert led.expire_due() == 0
    led.verify()


def test_the_writer_expires_holds_on_its_own_clock(led, clock):
    """No call to expire_due: the writer sleeps until the next hold is due
    and ends it (one thread for all holds, none per hold)."""
    led.mod("a", 100)
    for ttl in (1, 2, 2, 3):
        led.hold("a", -10, ttl)
    before = set(threading.enumerate())     # other tests' threads may end meanwhile
    clock.advance(2)
    wait_for(lambda: led.tot("a") == 90)
    assert led.open_holds == 1
    clock.advance(1)
    wait_for(lambda: led.tot("a") == 100)
    assert led.open_holds == 0
    assert set(threading.enumerate()) - before == set(), "a thread was started for the holds"
    assert [e[1] for e in entries(led, "a")[5:]] == [10, 10, 10, 10]


def test_expire_due_returns_only_once_its_expiries_are_durable(path, clock):
    """The writer wakes when the hold is due and takes it into a batch; an
    expire_due called while that batch is written waits for it (it used to
    return 0 at once, the expiry not yet durable nor visible)."""
    with gated_ledger(path, clock) as (led, store):
        gate = store.gate
        led.mod("a", 100)
        led.hold("a", -30, 1)
        gate.clear()
        clock.advance(1)
        assert store.writing.wait(10), "the writer did not expire the hold by itself"
        threading.Timer(0.3, gate.set).start()
        assert led.expire_due() == 0
        assert led.tot("a") == 100


def test_open_holds_count_a_hold_and_its_expiry_once_they_are_durable(path, clock):
    """open_holds (/health, /metrics) is read state, durable as tot is: a
    hold counts once its opening is durable and until its expiry is, so
    that a /past read after a count of 0 shows every end."""
    with gated_ledger(path, clock) as (led, store):
        gate = store.gate
        led.mod("a", 100)
        gate.clear()
        got = []
        led.submit_hold("a", -30, 1, done=got.append)
        assert store.writing.wait(10)
        assert led.open_holds == 0 and got == []
        gate.set()
        wait_for(lambda: got)
        assert led.open_holds == 1
        gate.clear()
        clock.advance(1)
        assert store.writing.wait(10), "the writer did not expire the hold by itself"
        assert led.open_holds == 1 and led.tot("a") == 70
        gate.set()
        wait_for(lambda: led.open_holds == 0)
        assert led.tot("a") == 100


def test_holds_due_while_closed_end_at_open_before_it_returns(path, clock):
    with Ledger(path, clock_ms=clock) as led:
        led.mod("a", 100)
        led.hold("a", -10, 5)
        led.hold("a", -20, 60)
        assert led.tot("a") == 70
    clock.advance(30)
    t_open = clock()
    with Ledger(path, clock_ms=clock) as led:
        assert led.tot("a") == 80 and led.open_holds == 1
        assert entries(led, "a")[-1] == (4, 10, 80, None, 2)
        assert led.past("a", limit=1)[0].at == t_open
        assert led.settle("a", 3, 20) == (80, 5)
        with pytest.raises(HoldEnded):
            led.settle("a", 2, 0)
    with Ledger(path, clock_ms=clock) as led:
        assert led.tot("a") == 80 and led.open_holds == 0
        assert led.verify()["holds"] == 2


def test_more_holds_due_at_open_than_a_batch_holds(path, clock):
    with Ledger(path, clock_ms=clock) as led:
        led.mod("a", 100)

        async def hold_all():
            await asyncio.gather(*[led.ahold("a", -1, 1 + i % 3) for i in range(25)])

        asyncio.run(hold_all())
    clock.advance(10)
    with Ledger(path, clock_ms=clock, batch_mods_max=4) as led:
        assert led.tot("a") == 100 and led.open_holds == 0
        ends = [e for e in entries(led, "a") if e[4] is not None and e[4] != e[0]]
        assert sorted(e[4] for e in ends) == list(range(2, 27))
        assert led.verify()["open_holds"] == 0


def test_many_holds_due_at_once_end_in_batches_each_once(path, clock):
    with Ledger(path, clock_ms=clock, batch_mods_max=8) as led:
        led.mod("a", 1000)
        led.mod("b", 1000)

        async def hold_all():
            return await asyncio.gather(*[led.ahold("ab"[i % 2], -(i + 1), 5)
                                          for i in range(50)])

        asyncio.run(hold_all())
        clock.advance(5)
        wait_for(lambda: led.open_holds == 0)
        led.expire_due()
        assert led.tot("a") == 1000 and led.tot("b") == 1000
        assert led.stats["holds_expired"] == 50
        for cred in "ab":
            ends = [e for e in entries(led, cred) if e[4] is not None and e[4] != e[0]]
            assert len(ends) == 25 and len({e[4] for e in ends}) == 25
        assert led.verify() == {"accounts": 2, "entries": 102, "keys": 0, "holds": 50,
                                "open_holds": 0, "events": 102}


def test_open_holds_survive_a_reopen_and_expire_on_time(path, clock):
    with Ledger(path, clock_ms=clock) as led:
        led.mod("a", 100)
        led.hold("a", -10, 60)
    clock.advance(30)
    with Ledger(path, clock_ms=clock) as led:
        assert led.open_holds == 1 and led.tot("a") == 90
        clock.advance(29)
        assert led.expire_due() == 0
        clock.advance(1)
        assert led.expire_due() == 1
        assert led.tot("a") == 100


def test_holds_of_one_second_end_in_the_order_they_were_made_a_part_at_a_time(path, clock):
    """A second's holds end in the order they were made, however many
    calls take them (each at most its bound), a settled one skipped."""
    with Ledger(path, clock_ms=clock, batch_mods_max=2, queued_mods_max=3) as led:
        for cred in "abc":
            led.mod(cred, 100)
        made = [(cred, led.hold(cred, -1, 5)[0]) for cred in "abc" * 4]
        led.settle(*made[4], 0)
        after = led.events(limit=1000)[1]
        clock.advance(5)
        while led.expire_due():
            pass
        ended, _ = led.events(after=after, limit=1000)
        ids = {led.account_id(cred): cred for cred in "abc"}
        assert [(ids[e.account], e.hold) for e in ended] == made[:4] + made[5:]
        assert {e.type for e in ended} == {"expire"} and led.open_holds == 0


def test_a_hold_added_to_a_second_being_ended_ends_after_the_others(path, clock):
    """A clock set back can put a new hold in the second whose holds are
    being ended, a part at a time: it ends too, after those made before."""
    with Ledger(path, clock_ms=clock, batch_mods_max=2, queued_mods_max=3) as led:
        clock.set(1_700_000_000_000)
        led.mod("a", 100)
        holds = [led.hold("a", -1, 1)[0] for _ in range(5)]
        after = led.events(limit=1000)[1]
        clock.set(1_700_000_001_000)
        led.expire_due()
        clock.set(1_700_000_000_000)
        holds.append(led.hold("a", -1, 1)[0])
        clock.set(1_700_000_001_000)
        while led.expire_due():
            pass
        ended = [e.hold for e in led.events(after=after, limit=1000)[0] if e.type == "expire"]
        assert ended == holds and led.open_holds == 0 and led.tot("a") == 100


def test_expiry_is_by_the_second_after_the_ttl(led, clock):
    """The expiry wheel has a bucket per second: a hold ends by itself at
    the first whole second at or after its ttl; a settle from its ttl on
    finds it ended."""
    clock.set(1_700_000_000_400)
    led.mod("a", 100)
    led.hold("a", -10, 1)                   # due at ..._001_400
    clock.set(1_700_000_001_999)
    assert led.expire_due() == 0 and led.tot("a") == 90
    clock.set(1_700_000_002_000)
    assert led.expire_due() == 1 and led.tot("a") == 100
    led.hold("a", -10, 1)                   # due at ..._003_000
    clock.set(1_700_000_003_000)
    with pytest.raises(HoldEnded):
        led.settle("a", 4, 0)


def test_expire_due_inside_an_event_loop_is_refused_and_runs_in_a_thread(led, clock):
    """expire_due waits for its batch's fsync: on the loop it stalled every
    other task meanwhile.  Refused there; in a thread it works, and returns
    once the due hold's end is durable (the writer, on its own clock, may
    have taken it first: it is waited for too)."""
    led.mod("a", 10)
    led.hold("a", -4, 1)

    async def main():
        with pytest.raises(RuntimeError, match=r"^Ledger calls block: inside an event loop "
                                               r"call `await asyncio.to_thread\(led.expire_due"):
            led.expire_due()
        assert led.tot("a") == 6
        clock.advance(1)
        await asyncio.to_thread(led.expire_due)
        return led.tot("a")

    assert asyncio.run(main()) == 10
