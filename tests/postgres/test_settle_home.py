"""Recording the events' home of a store of several clusters (settle_home,
accman/postgres/migrate.py) by a front-end late to finish a setup that
another finished meanwhile: the home the other recorded stands."""

import asyncio

import asyncpg

from accman.postgres.migrate import migrate, read_info, settle_home

from .helpers import migrate_cut_short_before_the_home, run, stored


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
                    got = await asyncio.wait_for(settle_home(conns, stale), 10)
            assert [i.events_home for i in got] == [home, home]
            for conn, info in zip(conns, infos, strict=True):
                merged = await conn.fetchval("SELECT count(*) FROM accman_merged")
                assert merged == (1 if info.cluster_id == home else 0), info
        finally:
            for c in conns:
                await c.close()
    run(main())
