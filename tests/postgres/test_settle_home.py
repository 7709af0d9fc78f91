"""Recording the events' home of a store of several clusters (settle_home,
accman/postgres/migrate.py) by a front-end late to finish a setup that
another finished meanwhile: the home the other recorded stands."""

import asyncio
import re

import asyncpg
import pytest

from accman.errors import StoreError
from accman.postgres.migrate import MIGRATE_LOCK_ID, migrate, read_info, settle_home

from .helpers import fund, migrate_cut_short_before_the_home, opened, run, stored

# What a step that has hung is given: a migration of fresh clusters takes
# seconds on a machine loaded by the other workers and PostgreSQL servers.
HANG_S = 60


def test_a_late_setup_keeps_the_home_another_recorded_meanwhile(pg, monkeypatch):
    """Two front-ends started together on two new clusters, the second late:
    its migrations found both marked and no home, and the first then
    recorded the home and served, a commit on the other cluster not yet
    copied to the home (the copy waits here for the home's counter, which
    the test holds).  The late one chose the home again from the clusters'
    event counters, read without the migrate lock: the other cluster, ahead
    now, on which it added an accman_merged row though it is not the home.
    It reads the clusters again under the migrate lock, and takes the home
    recorded."""
    a, b = pg.create_database("lateset_a"), pg.create_database("lateset_b")
    migrate_cut_short_before_the_home(monkeypatch, [a, b])

    async def main():
        conns = [await asyncpg.connect(u) for u in (a, b)]
        try:
            stale = [await read_info(c) for c in conns]     # the late one's migrations
            assert {i.home for i in stale} == {None}
            infos = await migrate([a, b])                    # the first, to its end
            home = infos[0].events_home
            other = next(i.cluster_id for i in infos if i.cluster_id != home)
            at_home = conns[[i.cluster_id for i in infos].index(home)]
            async with stored([a, b]) as (store, c):
                cred = next(f"late{n}" for n in range(1000)
                            if store._locate(f"late{n}")[1].cluster_id == other)
                async with at_home.transaction():
                    await at_home.execute("SELECT 1 FROM accman_counter FOR UPDATE")
                    assert await c.mod(cred, 5) == (5, 1)
                    got = await asyncio.wait_for(settle_home(conns, stale), HANG_S)
            assert [i.events_home for i in got] == [home, home]
            for conn, info in zip(conns, infos, strict=True):
                merged = await conn.fetchval("SELECT count(*) FROM accman_merged")
                assert merged == (1 if info.cluster_id == home else 0), info
        finally:
            for c in conns:
                await c.close()
    run(main())


# Migrations waiting for a migrate lock in the database of the connection.
_WAITERS_SQL = ("SELECT count(*) FROM pg_locks l JOIN pg_database d ON l.database = d.oid "
                "WHERE l.locktype = 'advisory' AND NOT l.granted "
                "AND d.datname = current_database()")


async def _waiting(holder, count):
    """Until `count` migrations wait for the migrate lock `holder` holds."""
    end = asyncio.get_running_loop().time() + HANG_S
    while await holder.fetchval(_WAITERS_SQL) < count:
        if asyncio.get_running_loop().time() > end:
            pytest.fail(f"{count} migrations never waited for the migrate lock")
        await asyncio.sleep(0.02)


async def _holding(urls):
    """A connection holding the migrate lock on each of `urls`."""
    holders = [await asyncpg.connect(u) for u in urls]
    for h in holders:
        await h.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK_ID)
    return holders


async def _unlock(conn):
    await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK_ID)


async def _in_turn(holders, url, first, second):
    """Two front-ends' migrations, `first` and `second` (made by those
    calls), started together on the clusters whose migrate locks `holders`
    hold (so that both read them bare), let through the first cluster
    (`url`) in that order, and left waiting at the second, in that order.
    Between them at the first cluster a gate's connection waits, which lets the
    second go on only once the first waits at the second cluster:
    PostgreSQL grants an advisory lock's waiters in the order they came,
    and without the gate the second, granted the first cluster as soon as
    the first let it go, could reach the second cluster first."""
    gate = await asyncpg.connect(url)
    try:
        one = asyncio.ensure_future(first())
        await _waiting(holders[0], 1)
        gated = asyncio.ensure_future(gate.execute("SELECT pg_advisory_lock($1)",
                                                   MIGRATE_LOCK_ID))
        await _waiting(holders[0], 2)
        two = asyncio.ensure_future(second())
        await _waiting(holders[0], 3)
        await _unlock(holders[0])
        await asyncio.wait_for(gated, HANG_S)
        await _waiting(holders[1], 1)
        await _unlock(gate)
        await _waiting(holders[1], 2)
        return one, two
    finally:
        await gate.close()


def test_a_setup_of_two_does_not_take_clusters_a_setup_of_three_marked(pg):
    """Front-ends started together on new clusters, one given A, B and C,
    the other A and B (a --store left out of one's configuration): both
    read them bare, the first marked A and B as clusters of three, and the
    second, migrating them next while the first migrated C, recorded A
    and B as a store of two and served it; the first then added C to it
    and served three, each front-end opening accounts where the other
    does not look for them.  The second is refused; the first finishes."""
    a, b, c = (pg.create_database(f"three_marks_{x}") for x in "abc")

    async def main():
        holders = await _holding([a, b, c])
        try:
            three, two = await _in_turn(holders, a, lambda: migrate([a, b, c], grow=False),
                                        lambda: opened([a, b]))
            await _unlock(holders[1])
            done = await asyncio.wait_for(asyncio.gather(two, return_exceptions=True), HANG_S)
            await _unlock(holders[2])
            got = await asyncio.wait_for(three, HANG_S)
        finally:
            for h in holders:
                await h.close()
        for store in [d[0] for d in done if isinstance(d, tuple)]:
            await store.aclose()
        assert isinstance(done[0], StoreError), "served as a store of two"
        assert re.match(r"^clusters 1, 2 of 2 were being set up by `accman migrate` as part "
                        r"of a store of 3 clusters", str(done[0])), str(done[0])
        assert len({i.events_home for i in got}) == 1
    run(main())
    run(fund([a, b, c], ["t"]))


def test_a_setup_of_three_does_not_grow_a_store_of_two_recorded_meanwhile(pg):
    """The same front-ends, the one given two first to the clusters: it
    marked A and B and recorded them as a store of two, and served it,
    while the other migrated C; that one then added C to the store and
    served three.  It is refused, changing nothing; the store of two
    serves."""
    a, b, c = (pg.create_database(f"two_first_{x}") for x in "abc")

    async def main():
        holders = await _holding([a, b, c])
        try:
            two, three = await _in_turn(holders, a, lambda: opened([a, b]),
                                        lambda: migrate([a, b, c], grow=False))
            await _unlock(holders[1])
            store, _ = await asyncio.wait_for(two, HANG_S)
            await _waiting(holders[2], 1)
            await _unlock(holders[2])
            try:
                with pytest.raises(StoreError, match=r"^cluster [12] of 3 was set up meanwhile by "
                                   r"another AccMan as the home of a store of 2 clusters \(2 "
                                   r"of the 3 given\), which a front-end may serve"):
                    await asyncio.wait_for(three, HANG_S)
            finally:
                await store.aclose()
        finally:
            for h in holders:
                await h.close()
    run(main())
    # The store of two as it was recorded, and C still marked by its setup of three.
    assert sum(int(pg.psql("SELECT count(*) FROM accman_merged", f"two_first_{x}"))
               for x in "abc") == 1
    assert pg.psql("SELECT encode(events_home, 'hex') LIKE '000000000000000000000000%' "
                   "FROM accman_schema", "two_first_c") == "t"
    run(fund([a, b], ["t"]))
