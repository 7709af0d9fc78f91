"""A store of several clusters (issue 15): accounts spread by the keyed
hash, each account's history whole in one cluster; the key made once and
given to a cluster added later; clusters that are not one store refused."""

import asyncio

import pytest

from accman.errors import StoreError
from accman.postgres.migrate import migrate

from .helpers import opened, run, stored, two_clusters

ACCOUNTS = 200


def hids_of(cluster, dbname):
    return set(cluster.psql("SELECT encode(hid, 'hex') FROM accman_history", dbname).split())


def test_accounts_spread_over_two_clusters(pg, pg_factory):
    other, urls = two_clusters(pg, pg_factory, "two")

    async def main():
        async with stored(urls) as (store, c):
            await asyncio.gather(*(c.mod(f"u{i}", 10) for i in range(ACCOUNTS)))
            await asyncio.gather(*(c.mod(f"u{i}", -1) for i in range(ACCOUNTS)))
            for i in range(0, ACCOUNTS, 37):
                page = await c.past(f"u{i}")
                assert [(e.seq, e.tot) for e in page.entries] == [(2, 9), (1, 10)]
            return {store.account_id(f"u{i}") for i in range(ACCOUNTS)}
    ids = run(main())
    a, b = hids_of(pg, "two_a"), hids_of(other, "two_b")
    assert a and b and not (a & b) and a | b == ids
    # Neither cluster holds most of them all: a hash, not a fallback.
    assert min(len(a), len(b)) > ACCOUNTS // 4
    # Every entry of an account is in the cluster that holds it.
    for cluster, db in ((pg, "two_a"), (other, "two_b")):
        assert cluster.psql("SELECT count(*) FROM accman_history GROUP BY hid "
                            "HAVING count(*) <> 2", db) == ""

    # The same store, opened again, finds every account where it left it.
    async def again():
        async with stored(urls, migrate_schema=False) as (store, c):
            assert await asyncio.gather(*(c.tot(f"u{i}") for i in range(ACCOUNTS))) == \
                [9] * ACCOUNTS
    run(again())


def test_a_cluster_added_later_gets_the_key(pg):
    first = pg.create_database("key_a")
    infos = run(migrate([first]))
    second = pg.create_database("key_b")
    infos2 = run(migrate([first, second]))
    assert infos2[0].hash_key == infos2[1].hash_key == infos[0].hash_key
    assert infos2[0].cluster_id != infos2[1].cluster_id


def test_clusters_of_two_stores_are_refused(pg):
    a, b = pg.create_database("own_a"), pg.create_database("own_b")
    run(migrate([a]))
    run(migrate([b]))                 # each made a key of its own
    with pytest.raises(StoreError, match="disagree on the credential-hash key") as e:
        run(opened([a, b]))
    keys = [pg.psql("SELECT encode(hash_key, 'hex') FROM accman_schema", db)
            for db in ("own_a", "own_b")]
    assert all(len(k) == 32 and k not in str(e.value) for k in keys)
    with pytest.raises(StoreError, match="disagree"):
        run(migrate([a, b]))
    with pytest.raises(StoreError, match="named twice"):
        run(opened([a, a]))


def test_unmigrated_cluster_is_refused_without_migration(pg):
    a = pg.create_database("bare")
    with pytest.raises(StoreError, match="no AccMan schema"):
        run(opened(a, migrate_schema=False))
