"""A host of a front-end's URL that answers with another store, or with
none (a failover to a host that is no copy of the store, a name moved):
the front-end reads and writes nothing there (serving.same_store), where
it went on with its own credential-hash key among the other store's
accounts: a charge of an account it had was `no_account`, a funding
opened an account that the other store's front-ends can never find (a
black-box probe)."""

import asyncio
import re

import asyncpg
import pytest

from accman.errors import StoreError, Unavailable
from accman.postgres.migrate import migrate
from accman.postgres.serving import NO_STORE, OTHER_STORE, same_store

from .helpers import opened, run, stored


async def _until_refused(call, deadline_s: float) -> Unavailable:
    loop = asyncio.get_running_loop()
    deadline = loop.time() + deadline_s
    while True:
        try:
            await call()
        except Unavailable as e:
            if OTHER_STORE in e.detail:
                return e
        assert loop.time() < deadline, "the other store was never refused"
        await asyncio.sleep(0.05)


def test_a_failover_to_another_store_reads_and_writes_nothing_there(pg, pg_factory, caplog):
    own = pg_factory(name="own")
    name = "failover_other"
    own.create_database(name)
    other_url = pg.create_database(name)
    run(migrate([other_url]))                   # another store, of the same name
    url = f"postgresql://postgres@127.0.0.1:{own.port},127.0.0.1:{pg.port}/{name}"
    run(migrate([url]))                         # the front-end's: on its first host

    async def main():
        loop = asyncio.get_running_loop()
        async with stored(url) as (store, c):
            assert await c.mod("alice", 990) == (990, 1)
            own.stop("immediate")
            await _until_refused(lambda: c.mod("alice", 5), 30)
            e = await _until_refused(lambda: c.tot("alice"), 10)
            assert e.detail.startswith("the database cannot be read: "), e.detail
            assert not store.healthy and OTHER_STORE in store.unhealthy_detail
            own.start()                         # its own store back: served again
            deadline = loop.time() + 30
            while True:
                try:
                    assert await c.mod("alice", 5) == (995, 2)
                    break
                except Unavailable:
                    assert loop.time() < deadline, "the store's own host was not taken back"
                    await asyncio.sleep(0.1)
            assert await c.tot("alice") == 995
    caplog.set_level("WARNING", logger="accman.postgres")
    run(main())
    assert pg.psql("SELECT count(*) FROM accman_accounts", name) == "0"
    said = [r.getMessage() for r in caplog.records]
    assert sum(OTHER_STORE in m for m in said) == 1, said     # once, however many tries


@pytest.mark.parametrize("how", ["start", "migrate"])
def test_no_store_is_made_on_a_host_other_than_the_url_s_first(pg, pg_factory, how):
    """A front-end started, or `accman migrate` run, while the store's
    primary is away took the next host of its URL, a database of the same
    name with no store, and made a new, empty store there, which starts
    then served (two reviews): a store is made on its URL's first host
    only."""
    own = pg_factory(name=f"own_{how}")
    name = f"made_by_{how}"
    own.create_database(name)
    pg.create_database(name)
    url = f"postgresql://postgres@127.0.0.1:{own.port},127.0.0.1:{pg.port}/{name}"
    run(migrate([url]))                         # made by migrate, on its first host
    own.stop("immediate")
    with pytest.raises(StoreError, match=f"^{re.escape(NO_STORE)}$"):
        run(opened(url) if how == "start" else migrate([url]))
    assert pg.psql("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'accman%'",
                   name) == "0"
    own.start()
    async def main():
        async with stored(url) as (_, c):
            assert await c.mod("alice", 5) == (5, 1)
    run(main())


@pytest.mark.parametrize("made", [True, False], ids=["another store", "no store"])
def test_a_database_of_another_store_or_of_none_is_refused(pg_url, made):
    if made:
        run(migrate([pg_url]))

    async def main():
        conn = await asyncpg.connect(pg_url)
        try:
            with pytest.raises(StoreError, match=f"^{re.escape(OTHER_STORE)}$"):
                await same_store(b"\x00" * 16)(conn, True)
            if made:                            # its own id: taken
                found = await conn.fetchval("SELECT cluster_id FROM accman_schema")
                await same_store(found)(conn, True)
        finally:
            await conn.close()
    run(main())
