"""Holds, settles, expiry and events on PostgreSQL (SPEC "Holds",
"Events")."""

import asyncio
import time

import asyncpg
import pytest

from accman.errors import (BadRequest, Busy, EventsTrimmed, HoldEnded, Insufficient,
                           KeyReused, NoAccount, NoHold, TooManyHolds)
from accman.limits import EVENTS_WAITERS_MAX
from accman.postgres import upkeep
from accman.postgres.connecting import connect
from accman.postgres.schema_v7 import EXPIRE_LOOK_FACTOR

from .helpers import opened, run, stored


def test_hold_and_settle(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 100)
            assert await c.hold("a", -30, 60) == (2, 70, 2)
            assert await c.tot("a") == 70
            with pytest.raises(Insufficient):
                await c.hold("a", -80, 60)                  # min defaults to 0
            assert await c.hold("a", -80, 60, min=-10) == (3, -10, 3)
            assert await c.settle("a", 2, 10) == (-10 + 20, 4)
            assert await c.settle("a", 2, 10) == (10, 4)    # the first reply again
            with pytest.raises(HoldEnded):
                await c.settle("a", 2, 11)
            with pytest.raises(BadRequest):
                await c.settle("a", 3, 81)                  # more than held
            assert await c.settle("a", 3, 80) == (10, 5)    # all used: by 0
            with pytest.raises(NoHold):
                await c.settle("a", 1, 0)                   # a mod, not a hold
            with pytest.raises(NoHold):
                await c.settle("a", 99, 0)
            with pytest.raises(NoAccount):
                await c.settle("nobody", 1, 0)              # as the embedded store says
            entries = (await c.past("a")).entries
            assert [(e.seq, e.by, e.tot, e.hold) for e in entries] == [
                (5, 0, 10, 3), (4, 20, 10, 2), (3, -80, -10, 3), (2, -30, 70, 2),
                (1, 100, 100, None)]
    run(main())


def test_keyed_hold(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 100)
            assert await c.hold("a", -5, 60, key="h") == (2, 95, 2)
            assert await c.hold("a", -5, 60, key="h") == (2, 95, 2)
            with pytest.raises(KeyReused):
                await c.mod("a", -5, min=0, key="h")        # a mod is not the hold
            with pytest.raises(KeyReused):
                await c.hold("a", -6, 60, key="h")
            with pytest.raises(NoAccount):
                await c.hold("b", -5, 60, key="h")
    run(main())


def test_hold_bounds(pg_url):
    async def main():
        async with stored(pg_url, holds_per_account_max=3, holds_max=5) as (store, c):
            await c.mod("a", 100)
            await c.mod("b", 100)
            for _ in range(3):
                await c.hold("a", -1, 60)
            with pytest.raises(TooManyHolds, match="account"):
                await c.hold("a", -1, 60)
            await c.hold("b", -1, 60)
            await c.hold("b", -1, 60)
            with pytest.raises(TooManyHolds, match="store"):
                await c.hold("b", -1, 60)
            await c.settle("a", 2, 1)                       # one ends: room again
            assert (await c.hold("b", -1, 60))[0] == 4
    run(main())


def test_expiry_ends_a_hold_once(pg, pg_url, monkeypatch):
    monkeypatch.setattr(upkeep, "EXPIRE_INTERVAL_S", 0.1)

    async def main():
        # Two stores on one database: both run expiry rounds.
        s1, c1 = await opened(pg_url)
        s2, _ = await opened(pg_url)
        try:
            await c1.mod("a", 100)
            holds = [await c1.hold("a", -10, 1) for _ in range(5)]
            await asyncio.sleep(1.6)
            assert await c1.tot("a") == 100
            with pytest.raises(HoldEnded):
                await c1.settle("a", holds[0][0], 0)
            entries = (await c1.past("a")).entries
            ends = [e for e in entries if e.seq > 6]
            assert sorted(e.hold for e in ends) == [2, 3, 4, 5, 6]
            assert all(e.by == 10 for e in ends)
            ev, _ = await c1.events()
            assert [e.type for e in ev].count("expire") == 5
        finally:
            await s1.aclose()
            await s2.aclose()
    run(main())


def test_settle_after_ttl_is_hold_ended_at_once(pg_url, monkeypatch):
    monkeypatch.setattr(upkeep, "EXPIRE_INTERVAL_S", 3600)

    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 100)
            await asyncio.sleep(1.1)          # the round at open has run
            await c.hold("a", -10, 1)
            await asyncio.sleep(1.1)
            with pytest.raises(HoldEnded):
                await c.settle("a", 2, 3)
            assert await c.tot("a") == 100
            assert (await c.past("a")).entries[0].by == 10
    run(main())


def test_events_gap_free_with_low_balance(pg_url):
    async def main():
        async with stored(pg_url, low_default=50) as (store, c):
            await c.mod("a", 100)
            await c.mod("a", -60)                 # crosses 50: low_balance
            await c.mod("a", -10)                 # already below: none
            await c.mod("a", 100)
            await c.mod("b", 20, low=5)
            await c.mod("b", -16)                 # crosses b's own 5
            await c.hold("a", -100, 60)           # 130 -> 30 crosses 50
            events, nxt = await c.events()
            assert [e.id for e in events] == list(range(1, len(events) + 1))
            assert nxt == events[-1].id
            assert [(e.type, e.tot) for e in events] == [
                ("mod", 100), ("mod", 40), ("low_balance", 40), ("mod", 30), ("mod", 130),
                ("mod", 20), ("mod", 4), ("low_balance", 4), ("hold", 30),
                ("low_balance", 30)]
            assert events[0].account == store.account_id("a")
            page, nxt2 = await c.events(after=3, limit=2)
            assert [e.id for e in page] == [4, 5] and nxt2 == 5
            assert await c.events(after=nxt) == ([], nxt)
    run(main())


def test_events_long_poll_hears_another_front_end(pg_url):
    async def main():
        s1, c1 = await opened(pg_url)
        s2, c2 = await opened(pg_url)
        try:
            t0 = time.monotonic()
            waiting = asyncio.ensure_future(c1.events(after=0, wait_s=10))
            await asyncio.sleep(0.3)
            assert not waiting.done()
            await c2.mod("x", 5)
            events, nxt = await waiting
            assert [e.type for e in events] == ["mod"] and nxt == 1
            assert time.monotonic() - t0 < 5
            # Nothing comes: the wait ends with an empty page.
            t0 = time.monotonic()
            assert await c1.events(after=1, wait_s=0.5) == ([], 1)
            assert 0.4 < time.monotonic() - t0 < 5
        finally:
            await s1.aclose()
            await s2.aclose()
    run(main())


def test_events_waiters_bound(pg_url, monkeypatch):
    monkeypatch.setattr("accman.postgres.events.EVENTS_WAITERS_MAX", 3)

    async def main():
        async with stored(pg_url) as (store, c):
            polls = [asyncio.ensure_future(c.events(wait_s=5)) for _ in range(3)]
            await asyncio.sleep(0.3)
            with pytest.raises(Busy):
                await c.events(wait_s=5)
            await c.mod("a", 1)
            for p in polls:
                assert (await p)[1] == 1
    assert EVENTS_WAITERS_MAX == 1024
    run(main())


def test_events_trimmed(pg, pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            for _ in range(4):
                await c.mod("a", 1)
            dbname = pg_url.rsplit("/", 1)[1]
            pg.psql("UPDATE accman_events SET at = 0 WHERE id <= 2", dbname)
            await store.clusters[0].events.trim(retention_s=3600)
            with pytest.raises(EventsTrimmed) as e:
                await c.events(after=1)
            assert e.value.first == 3
            events, _ = await c.events(after=2)
            assert [x.id for x in events] == [3, 4]
    run(main())


def test_events_are_aged_by_the_database_s_clock(pg, pg_url, monkeypatch):
    """The database stamps each event's `at`: a front-end whose clock runs
    ahead of the database's by more than the retention trims nothing
    younger than it, where it judged by its own clock (a black-box probe:
    events 5 s old trimmed with a retention of 2 minutes, the front-end's
    clock 3 minutes ahead)."""
    async def main():
        async with stored(pg_url) as (store, c):
            for _ in range(3):
                await c.mod("a", 1)
            real = time.time
            monkeypatch.setattr(time, "time", lambda: real() + 180)
            await store.clusters[0].events.trim(retention_s=120)
            events, _ = await c.events(after=0)
            assert [x.id for x in events] == [1, 2, 3]
            monkeypatch.setattr(time, "time", real)
            pg.psql("UPDATE accman_events SET at = at - 121000 WHERE id <= 2",
                    pg_url.rsplit("/", 1)[1])
            await store.clusters[0].events.trim(retention_s=120)
            with pytest.raises(EventsTrimmed) as e:
                await c.events(after=0)
            assert e.value.first == 3
    run(main())


def test_a_cursor_of_the_store_keeps_the_events_after_it_past_the_retention(pg, pg_url):
    """The webhook's cursor row holds the events its receiver has not
    acknowledged, for every front-end's trimming, with or without a
    --webhook of its own (accman.postgres.events)."""
    async def main():
        async with stored(pg_url) as (store, c):
            for _ in range(6):
                await c.mod("a", 1)
            await store.cursors.save_cursor("webhook", 2)
            pg.psql("UPDATE accman_events SET at = 0", pg_url.rsplit("/", 1)[1])
            await store.clusters[0].events.trim(retention_s=3600)
            with pytest.raises(EventsTrimmed) as e:
                await c.events(after=1)
            assert e.value.first == 3
            events, _ = await c.events(after=2)
            assert [x.id for x in events] == [3, 4, 5, 6]
            await store.cursors.save_cursor("webhook", 6)
            await store.clusters[0].events.trim(retention_s=3600)
            with pytest.raises(EventsTrimmed) as e:
                await c.events(after=2)
            assert e.value.first == 6                   # the newest stays
    run(main())


def test_busy_when_queue_full(pg_url):
    async def main():
        async with stored(pg_url, queued_mods_max=4) as (store, c):
            futs = [asyncio.ensure_future(c.mod("a", 1)) for _ in range(4)]
            await asyncio.sleep(0)
            with pytest.raises(Busy, match=r"^QUEUED_MODS_MAX \(4\) calls are waiting"):
                store.submit("a", 1, None, None, done=print)
            assert [f[1] for f in await asyncio.gather(*futs)] == [1, 2, 3, 4]
    run(main())



def test_expiry_rounds_are_bounded_and_go_on(pg_url, monkeypatch):
    """A round calls accman_expire until a call ends none, EXPIRE_HOLDS_MAX
    a call, and reads the counts after each: /health's open holds go down
    as the round goes, not at its end."""
    monkeypatch.setattr(upkeep, "EXPIRE_HOLDS_MAX", 1)
    monkeypatch.setattr(upkeep, "EXPIRE_INTERVAL_S", 0.1)

    async def main():
        async with stored(pg_url) as (store, c):
            for x in ("a", "b", "c"):
                await c.mod(x, 10)
                await c.hold(x, -10, 1)
            seen = []
            note = store.clusters[0].note_counts
            monkeypatch.setattr(store.clusters[0], "note_counts",
                                lambda counts: (seen.append(counts[2]), note(counts)))
            await asyncio.sleep(1.6)
            assert [await c.tot(x) for x in ("a", "b", "c")] == [10, 10, 10]
            steps = [n for i, n in enumerate(seen) if i == 0 or n != seen[i - 1]]
            assert steps == [3, 2, 1, 0], seen
    run(main())


def test_a_call_of_accman_expire_ends_at_most_p_max_holds(pg_url, monkeypatch):
    """Each call is one short transaction: it stops inside an account once
    it has ended p_max holds, and the next call ends that account's later
    ones, in hold order."""
    monkeypatch.setattr(upkeep, "EXPIRE_INTERVAL_S", 3600.0)    # no round of its own

    async def main():
        async with stored(pg_url) as (store, c):
            for x in ("a", "b", "c"):
                await c.mod(x, 100)
                for _ in range(5):
                    await c.hold(x, -10, 1)
            await asyncio.sleep(1.2)
            conn = await asyncpg.connect(pg_url)
            try:
                ended = [await conn.fetchval("SELECT accman_expire(4)") for _ in range(5)]
            finally:
                await conn.close()
            assert ended == [4, 4, 4, 3, 0]
            for x in ("a", "b", "c"):
                entries = (await c.past(x)).entries
                assert [(e.seq, e.hold, e.tot) for e in entries[:5]] == \
                    [(11 - i, 6 - i, 100 - 10 * i) for i in range(5)]
    run(main())


async def _due_holds(c, counts: dict) -> None:
    """Funds each account of `counts` and opens its count of holds of 10
    with a ttl of 1 s, in that order, and waits until they are all due.
    An account's holds fall due after the previous account's, never in
    the same millisecond (a due time's unit), so that "the oldest due
    holds" names the same accounts to every query."""
    for x, n in counts.items():
        await c.mod(x, 100)
        for _ in range(n):
            await c.hold(x, -10, 1)
        await asyncio.sleep(0.002)
    await asyncio.sleep(1.2)


async def _expire_beside_a_lock(pg_url, p_max: int, held: int) -> int:
    """accman_expire(p_max) called while another transaction holds the
    accounts of the oldest `held` due holds (FOR UPDATE): what it ended."""
    holder, conn = await asyncpg.connect(pg_url), await asyncpg.connect(pg_url)
    try:
        async with holder.transaction():
            await holder.execute(
                "SELECT 1 FROM accman_accounts WHERE hid IN (SELECT hid FROM accman_holds "
                "ORDER BY expires_at LIMIT $1) FOR UPDATE", held)
            return await conn.fetchval("SELECT accman_expire($1)", p_max)
    finally:
        await holder.close()
        await conn.close()


def test_a_call_of_accman_expire_skips_locked_accounts_before_it_picks(pg_url, monkeypatch):
    """The oldest due holds' account held by another transaction (another
    front-end's call, a write), a call of p_max = 1 ends the next due hold
    of an account it can lock, within the oldest p_max * EXPIRE_LOOK_FACTOR
    due holds; past them it ends none and leaves the rest to a later call."""
    monkeypatch.setattr(upkeep, "EXPIRE_INTERVAL_S", 3600.0)    # no round of its own
    n = EXPIRE_LOOK_FACTOR

    async def main():
        async with stored(pg_url) as (store, c):
            await _due_holds(c, {"a": n - 1, "b": 1})
            assert await _expire_beside_a_lock(pg_url, 1, n - 1) == 1
            assert [await c.tot(x) for x in ("a", "b")] == [100 - 10 * (n - 1), 100]
            await _due_holds(c, {"c": n, "d": 1})
            assert await _expire_beside_a_lock(pg_url, 1, 2 * n - 1) == 0
            assert [await c.tot(x) for x in ("a", "c", "d")] == [
                100 - 10 * (n - 1), 100 - 10 * n, 90]
    run(main())


def test_a_call_of_accman_expire_ends_an_account_met_again_once(pg_url, monkeypatch):
    """Holds due in the order a, b, a, b, a, b: one call ends each account's
    due holds once, in hold order, the account written once (written
    again as the call's snapshot saw it, its balance and seq would go
    back)."""
    monkeypatch.setattr(upkeep, "EXPIRE_INTERVAL_S", 3600.0)    # no round of its own

    async def main():
        async with stored(pg_url) as (store, c):
            for x in ("a", "b"):
                await c.mod(x, 100)
            for _ in range(3):
                for x in ("a", "b"):
                    await c.hold(x, -10, 1)
            await asyncio.sleep(1.2)
            conn = await asyncpg.connect(pg_url)
            try:
                assert await conn.fetchval("SELECT accman_expire(100)") == 6
                assert await conn.fetchval("SELECT accman_expire(100)") == 0
            finally:
                await conn.close()
            for x in ("a", "b"):
                assert await c.tot(x) == 100
                entries = (await c.past(x)).entries
                assert [(e.seq, e.hold, e.tot) for e in entries] == [
                    (7, 4, 100), (6, 3, 90), (5, 2, 80), (4, 4, 70), (3, 3, 80), (2, 2, 90),
                    (1, None, 100)]
    run(main())


def test_a_call_of_accman_expire_locks_and_reads_only_the_accounts_it_ends(pg_url,
                                                                          monkeypatch):
    """Twelve accounts with a hold due, a call of p_max = 1 whose
    transaction is still open has locked the oldest hold's account alone
    (another front-end's call, or a write, can take every other one at
    once), and has read, by the accounts' index, that account's row twice
    (its lock, its update) and no other account of its window (the
    front-end's session settings: index scans only)."""
    monkeypatch.setattr(upkeep, "EXPIRE_INTERVAL_S", 3600.0)    # no round of its own
    names = [f"a{i}" for i in range(12)]

    async def main():
        async with stored(pg_url) as (store, c):
            await _due_holds(c, dict.fromkeys(names, 1))
            conn, other = await connect(pg_url), await asyncpg.connect(pg_url)
            try:
                async with conn.transaction():
                    assert await conn.fetchval("SELECT accman_expire(1)") == 1
                    reads = await conn.fetchval(
                        "SELECT idx_scan FROM pg_stat_xact_user_tables "
                        "WHERE relname = 'accman_accounts'")
                    async with other.transaction():
                        free = await other.fetchval(
                            "SELECT count(*) FROM (SELECT 1 FROM accman_accounts "
                            "FOR UPDATE SKIP LOCKED) s")
            finally:
                await conn.close()
                await other.close()
            assert (free, reads) == (len(names) - 1, 2)
            assert [await c.tot(x) for x in names] == [100] + [90] * (len(names) - 1)
    run(main())


def test_a_call_of_accman_expire_takes_any_p_max(pg_url, monkeypatch):
    """p_max at the top of integer (as version 6 took it): the call ends
    every due hold; its window, p_max * EXPIRE_LOOK_FACTOR, does not
    overflow."""
    monkeypatch.setattr(upkeep, "EXPIRE_INTERVAL_S", 3600.0)    # no round of its own

    async def main():
        async with stored(pg_url) as (store, c):
            await _due_holds(c, {"a": 2, "b": 1})
            conn = await asyncpg.connect(pg_url)
            try:
                assert await conn.fetchval("SELECT accman_expire(2147483647)") == 3
            finally:
                await conn.close()
            assert [await c.tot(x) for x in ("a", "b")] == [100, 100]
    run(main())


def test_retention_trims_in_the_background(pg, pg_url, monkeypatch):
    monkeypatch.setattr(upkeep, "TRIM_INTERVAL_S", 0.2)
    monkeypatch.setattr(upkeep, "EXPIRE_INTERVAL_S", 0.1)

    async def main():
        async with stored(pg_url, retention_s=1.0) as (store, c):
            await c.mod("a", 1)
            await c.mod("a", 1)
            await asyncio.sleep(1.5)
            await c.mod("a", 1)              # young: kept
            await asyncio.sleep(0.6)
            with pytest.raises(EventsTrimmed) as e:
                await c.events(after=0)
            assert e.value.first == 3
    run(main())


def test_a_keyed_funding_mod_sent_again_with_another_low_sets_nothing(pg_url):
    """`low` is not part of what a key names, as on the embedded store: the
    replay answers the first reply and the threshold stays the first
    mod's (SERVER.md)."""
    async def main():
        async with stored(pg_url) as (store, c):
            assert await c.mod("a", 100, low=10, key="fund") == (100, 1)
            assert await c.mod("a", 100, low=50, key="fund") == (100, 1)
            await c.mod("a", -60)                 # 40: under 50, not under 10
            await c.mod("a", -35)                 # 5: crosses 10
            events, _ = await c.events()
            return [(e.type, e.tot) for e in events if e.type == "low_balance"]
    assert run(main()) == [("low_balance", 5)]
