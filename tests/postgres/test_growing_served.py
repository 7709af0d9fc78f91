"""A cluster added to a store while front-ends serve it (SCALING.md,
"Several clusters": the front-ends are stopped first): `accman migrate`
refuses, changing nothing, and a front-end cut off while one was added
takes no writes when it comes back (accman/postgres/serving.py)."""

import asyncio
import threading
import time

import asyncpg
import pytest

from accman.errors import StoreError, Unavailable
from accman.postgres.migrate import migrate
from accman.postgres.serving import FRONTEND_LOCK_ID, GROWING, RESHAPED

from .helpers import opened, run, schema_dump, stored

_SERVED = (r"^1 AccMan front-end serves the store on cluster 1 of {count} \(from "
           r"(127\.0\.0\.1|local)\): stop every front-end of the store before adding a cluster "
           r"\(docs/SCALING.md, \"Several clusters\"\); nothing was changed$")


@pytest.mark.parametrize("store_of", [1, 2])
def test_a_cluster_is_not_added_while_a_front_end_serves_the_store(pg, store_of):
    """The front-end would go on opening accounts, and looking for them,
    on the clusters it has, where the store of one more looks elsewhere."""
    dbs = [f"gs_served{store_of}_{k}" for k in range(store_of + 1)]
    urls = [pg.create_database(db) for db in dbs]
    run(migrate(urls[:store_of]))

    async def main():
        async with stored(urls[:store_of]) as (_, c):
            await c.mod("kept", 5)
            before = schema_dump(pg, dbs)
            with pytest.raises(StoreError, match=_SERVED.format(count=store_of + 1)):
                await migrate(urls)
            assert schema_dump(pg, dbs) == before
            await migrate(urls[:store_of])              # the store as it is: taken
            assert await c.mod("kept", 1) == (6, 2)
        await migrate(urls)                             # the front-end stopped
    run(main())


def test_a_front_end_does_not_start_while_a_cluster_is_being_added(pg, pg_url):
    """A migrate adding a cluster holds the front-ends' lock to its end."""
    run(migrate([pg_url]))

    async def main():
        adding = await asyncpg.connect(pg_url)
        try:
            assert await adding.fetchval("SELECT pg_try_advisory_lock($1)", FRONTEND_LOCK_ID)
            with pytest.raises(StoreError, match=rf"{GROWING}$"):
                await opened([pg_url])
        finally:
            await adding.close()
        async with stored(pg_url) as (_, c):
            assert await c.mod("later", 3) == (3, 1)
    run(main())


def test_a_front_end_cut_off_while_a_cluster_was_added_takes_no_writes(pg):
    """Its writer's session lost (the lock with it), a cluster added
    meanwhile: its reconnection finds the store changed, and it stays
    unhealthy, refusing writes there, where it reconnected and went on with
    one cluster of two before."""
    urls = [pg.create_database(db) for db in ("gs_cut_a", "gs_cut_b")]
    run(migrate(urls[:1]))

    async def main():
        async with stored(urls[:1]) as (store, c):
            assert await c.mod("before", 5) == (5, 1)
            # The loop is held until the cluster is added: the store hears
            # of its lost session only then.
            pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE datname = 'gs_cut_a' AND pid <> pg_backend_pid()", "gs_cut_a")
            gone = time.monotonic() + 10        # a backend ends after its signal
            while pg.psql("SELECT count(*) FROM pg_stat_activity WHERE datname = 'gs_cut_a' "
                          "AND pid <> pg_backend_pid()", "gs_cut_a") != "0":
                assert time.monotonic() < gone, "the front-end's sessions did not end"
                time.sleep(0.01)
            failed = []
            added = threading.Thread(target=lambda: failed.extend(_raised(migrate(urls))))
            added.start()
            added.join()
            assert failed == []
            deadline = asyncio.get_running_loop().time() + 10
            while True:
                try:
                    await c.mod("before", 1)
                except Unavailable as e:
                    if RESHAPED in e.detail:
                        break
                assert asyncio.get_running_loop().time() < deadline, "no refusal seen"
                await asyncio.sleep(0.05)
            assert not store.healthy
            await asyncio.sleep(1.5)                # a reconnection round later: still
            with pytest.raises(Unavailable, match="changed since this front-end started"):
                await c.mod("before", 1)
        assert pg.psql("SELECT tot FROM accman_accounts", "gs_cut_a") == "5"
    run(main())


def _raised(coro) -> list:
    """What running `coro` on a loop of its own raised, if anything."""
    try:
        asyncio.run(coro)
    except Exception as e:
        return [e]
    return []
