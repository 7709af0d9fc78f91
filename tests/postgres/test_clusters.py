"""A store of several clusters (issue 15): accounts spread by the keyed
hash, each account's history whole in one cluster; the key made once and
given to a cluster added later; clusters that are not one store refused."""

import asyncio
import hashlib

import pytest

from accman.errors import StoreError, TooManyHolds, Unavailable
from accman.postgres.migrate import migrate

from .helpers import (fund, migrate_cut_short_before_the_home, opened, run, schema_dump, stored,
                      two_clusters)
from .pgcluster import free_port

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


def test_holds_max_bounds_each_cluster_of_a_store(pg):
    """SERVER.md, SCALING.md: on a store of several clusters HOLDS_MAX
    bounds each cluster's open holds, and its refusal says so."""
    urls = [pg.create_database("hmax_a"), pg.create_database("hmax_b")]

    async def main():
        async with stored(urls, holds_max=3) as (store, c):
            creds = [f"h{i}" for i in range(40)]
            for cred in creds:
                await c.mod(cred, 10)
            held, refused = [], []
            for cred in creds:
                try:
                    held.append((cred, (await c.hold(cred, -1, 60))[0]))
                except TooManyHolds as e:
                    refused.append(e.detail)
            assert len(held) == 6 and len(refused) == 34
            assert set(refused) == {"the account's cluster has HOLDS_MAX (3) open holds; "
                                    "retry later"}
            assert store.open_holds == 6
            await c.settle(*held[0], 0)                      # room in its cluster only
            assert store.open_holds == 5
            again = [cred for cred in creds if cred != held[0][0]]
            got = []
            for cred in again:
                try:
                    got.append((await c.hold(cred, -1, 60))[0])
                except TooManyHolds:
                    pass
            assert len(got) == 1 and store.open_holds == 6
    run(main())


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


def test_some_clusters_of_a_store_are_refused_and_change_nothing(pg):
    """A front-end given some clusters of a store of several would open an
    account where the others cannot see it (a second row for a credential
    another cluster holds) and number events on its own: refused, by
    `serve` and by `migrate`, whichever clusters are left out."""
    a, b = pg.create_database("part_a"), pg.create_database("part_b")
    infos = run(migrate([a, b]))
    home = [u for u, i in zip((a, b), infos, strict=True) if i.cluster_id == i.events_home][0]
    other = b if home == a else a
    before = schema_dump(pg, ("part_a", "part_b"))
    for given, says in (([home], "the store has 2 clusters and 1 was given"),
                        ([other], "numbered on a cluster not given")):
        with pytest.raises(StoreError, match=says):
            run(opened(given))
        with pytest.raises(StoreError, match=says):
            run(opened(given, migrate_schema=False))
        with pytest.raises(StoreError, match=says):
            run(migrate(given))
    assert schema_dump(pg, ("part_a", "part_b")) == before
    assert pg.psql("SELECT count(*) FROM accman_accounts", "part_a") == "0"

    # A third cluster is added by `migrate` with all three; then the store
    # is three, and two of them are refused.
    c = pg.create_database("part_c")
    assert len(run(migrate([a, b, c]))) == 3
    with pytest.raises(StoreError, match="the store has 3 clusters and 2 were given"):
        run(opened([a, b], migrate_schema=False))
    async def whole():                                          # whole, in any order
        async with stored([c, b, a], migrate_schema=False) as (store, _):
            assert len(store.clusters) == 3
    run(whole())


def test_a_refused_migration_changes_no_cluster(pg):
    """A newer schema on one cluster, or one cluster named twice, is
    refused before any cluster is migrated or given a home."""
    fresh, newer = pg.create_database("mig_fresh"), pg.create_database("mig_newer")
    run(migrate([newer]))
    pg.psql("UPDATE accman_schema SET version = 99", "mig_newer")
    with pytest.raises(StoreError, match="version 99, newer than this AccMan's"):
        run(migrate([fresh, newer]))
    assert pg.psql("SELECT to_regclass('accman_schema') IS NULL", "mig_fresh") == "t"
    one = pg.create_database("mig_one")
    run(migrate([one]))
    same = one.replace("127.0.0.1", "localhost")
    with pytest.raises(StoreError, match="named twice"):
        run(migrate([one, same]))
    assert pg.psql("SELECT events_home IS NULL FROM accman_schema", "mig_one") == "t"


def test_serve_does_not_add_a_cluster_to_a_store_that_holds_accounts(pg):
    """SCALING.md: adding a cluster is done with the front-ends stopped,
    `accman migrate`, then the accounts moved.  A front-end started with one
    more --store added it by itself, and the accounts that ranked the new
    cluster answered no_account (a funding mod would open a second row):
    refused, changing no cluster; `accman migrate` still adds it."""
    first, added = pg.create_database("grow_a"), pg.create_database("grow_b")
    run(fund(first, [f"g{i}" for i in range(8)]))
    with pytest.raises(StoreError, match=r"cluster 2 of 2 is not of the store, which holds "
                                         r"accounts \(on cluster 1 of 2\).*accman migrate"):
        run(opened([first, added]))
    assert pg.psql("SELECT to_regclass('accman_schema') IS NULL", "grow_b") == "t"
    assert pg.psql("SELECT events_home IS NULL FROM accman_schema", "grow_a") == "t"
    assert len(run(migrate([first, added]))) == 2


def test_serve_does_not_choose_the_home_of_a_store_that_holds_accounts(pg, monkeypatch):
    """SPEC "Events": a store's events are numbered on one home.  An
    `accman migrate` adding a cluster to a store that holds accounts, cut
    short before the home was recorded, left both clusters with AccMan's
    schema and no home, and serve chose one and served, as if the added
    cluster had always been there: the accounts ranking it first answered
    no_account.  Serve refuses, changing nothing; `accman migrate` finishes
    the setup, the home the cluster that numbered the store's events."""
    first, added = pg.create_database("cut_a"), pg.create_database("cut_b")
    run(fund(first, [f"c{i}" for i in range(8)]))
    migrate_cut_short_before_the_home(monkeypatch, [first, added])
    before = schema_dump(pg, ("cut_a", "cut_b"))
    # No home; the added cluster marked as set up by a migrate of 2
    # (accman.postgres.shape), the one holding accounts a store of one still.
    assert [pg.psql("SELECT encode(events_home, 'hex') FROM accman_schema", db)
            for db in before] == ["", "00" * 12 + "00000002"]
    with pytest.raises(StoreError, match=r"^the store's setup by `accman migrate` was not "
                       r"finished \(no cluster of the 2 given is recorded as the store's "
                       r"events' home\), and cluster 1 of 2 holds accounts: .*run `accman "
                       r"migrate` with the same --store list, which finishes it, then move "):
        run(opened([first, added]))
    with pytest.raises(StoreError, match=r"^the store's setup by `accman migrate` was not "
                                         r"finished: run `accman migrate`"):
        run(opened([first, added], migrate_schema=False))
    assert schema_dump(pg, ("cut_a", "cut_b")) == before

    infos = run(migrate([first, added]))
    assert infos[0].events_home == infos[1].events_home == infos[0].cluster_id

    async def served():
        async with stored([added, first]) as (store, c):
            assert store.home is store.clusters[1]
            page = await c.events(after=0)
            assert [e.id for e in page[0]] == list(range(1, 9))
    run(served())


def test_clusters_of_two_stores_of_one_key_are_not_merged(pg, monkeypatch):
    """Two clusters given the key by one `accman migrate` cut short before
    the home, then each served alone, are two stores holding accounts, each
    numbering its events from 1.  Given together, serve and migrate made
    one the home and renumbered the other's events after its own: refused,
    by both, changing nothing.  (Served alone they are refused now, as
    clusters of an unfinished setup of 2: these are as an AccMan that did
    not mark them left them.)"""
    a, b = pg.create_database("sep_a"), pg.create_database("sep_b")
    migrate_cut_short_before_the_home(monkeypatch, [a, b])
    for db in ("sep_a", "sep_b"):
        pg.psql("UPDATE accman_schema SET events_home = NULL", db)
    run(fund(a, ["sa"]))
    run(fund(b, ["sb"]))
    before = schema_dump(pg, ("sep_a", "sep_b"))
    for call in (lambda: opened([a, b]), lambda: migrate([a, b])):
        with pytest.raises(StoreError, match=r"^clusters 1, 2 of 2 each hold accounts and none "
                           r"is recorded as the store's events' home: they are separate "
                           r"stores, .*give each its own --store$"):
            run(call())
    assert schema_dump(pg, ("sep_a", "sep_b")) == before


def test_an_account_is_held_by_the_cluster_scaling_md_s_rank_names(pg):
    """SCALING.md's procedure for adding a cluster moves the accounts whose
    rank names the new one, and gives the rank's formula: the cluster that
    holds each account is the one it names, from the tables' own bytes."""
    urls = [pg.create_database("rank_a"), pg.create_database("rank_b")]

    async def fund():
        async with stored(urls) as (store, c):
            for i in range(20):
                await c.mod(f"r{i}", 1)
    run(fund())
    cid = {db: bytes.fromhex(pg.psql("SELECT encode(cluster_id, 'hex') FROM accman_schema", db))
           for db in ("rank_a", "rank_b")}
    for db in cid:
        for hid in map(bytes.fromhex, hids_of(pg, db)):
            assert max(cid, key=lambda d: hashlib.blake2b(
                hid, digest_size=8, key=cid[d]).digest()) == db


def test_front_ends_migrating_a_new_cluster_at_once_all_start(pg):
    """Migrations started together run one after the other, and the later
    ones see what the first made (a transaction begun before it committed
    would make its tables again: "relation accman_schema already
    exists")."""
    async def together(*lists):
        return await asyncio.gather(*(migrate(urls) for urls in lists))
    for n in range(3):
        url = pg.create_database(f"race_{n}")
        infos = run(together(*[[url]] * 4))
        assert len({i[0].cluster_id for i in infos}) == 1
        # Two clusters, given in either order: one key, made once.
        a, b = pg.create_database(f"race_{n}_a"), pg.create_database(f"race_{n}_b")
        infos = run(together([a, b], [b, a], [a, b], [b, a]))
        assert len({i.hash_key for got in infos for i in got}) == 1
        assert len({i.cluster_id for got in infos for i in got}) == 2


def test_front_ends_started_together_with_urls_spelled_apart_make_one_key(pg):
    """Front-ends started together on two new clusters, each front-end's
    URLs spelled its own way (a host's name on one, its address on
    another, as a service's may be): ordered by the URLs' text, each began
    on another cluster and made a key there, both then refused the other's
    ("the clusters disagree on the credential-hash key"), and so did every
    later migrate.  Ordered by the clusters themselves, one key is made."""
    async def together(*lists):
        return await asyncio.gather(*(migrate(urls, grow=False) for urls in lists))
    for n in range(2):
        a, b = pg.create_database(f"spelled_{n}_a"), pg.create_database(f"spelled_{n}_b")
        by_name = a.replace("@127.0.0.1:", "@localhost:")
        assert min(a, b) == a and min(by_name, b) == b      # each text order begins apart
        infos = run(together([a, b], [by_name, b]))
        assert len({i.hash_key for got in infos for i in got}) == 1
        assert len({i.cluster_id for got in infos for i in got}) == 2


def test_a_table_named_accman_schema_of_another_program_is_refused_plainly(pg):
    url = pg.create_database("foreign_schema")
    pg.psql("CREATE TABLE accman_schema (id int, name text); "
            "INSERT INTO accman_schema VALUES (1, 'x')", "foreign_schema")
    for call in (lambda: migrate([url]), lambda: opened(url, migrate_schema=False)):
        with pytest.raises(StoreError, match="the accman_schema table is not AccMan's"):
            run(call())


def test_a_store_that_lost_its_accman_schema_is_refused_naming_it(pg):
    """Not "relation accman_counter already exists" from migrating it anew:
    without its key, no credential finds its account."""
    url = pg.create_database("lost_schema")
    run(migrate([url]))
    pg.psql("DROP TABLE accman_schema", "lost_schema")
    for call in (lambda: migrate([url]), lambda: opened(url, migrate_schema=False)):
        with pytest.raises(StoreError, match=r"AccMan's tables \(accman_counter, accman_accounts, "
                                             r".*\) but no accman_schema.*restore it from a "):
            run(call())
    assert pg.psql("SELECT to_regclass('accman_schema') IS NULL", "lost_schema") == "t"
    pg.psql("DROP TABLE accman_accounts CASCADE", "lost_schema")       # any of them says so
    with pytest.raises(StoreError, match=r"AccMan's tables \(accman_counter, accman_history"):
        run(migrate([url]))


def test_a_cluster_that_cannot_be_opened_is_named_on_a_store_of_several(pg):
    """Which of the --store URLs is down, or bare, is the first thing an
    operator needs; a store of one says "a cluster" as before."""
    a, b = pg.create_database("which_a"), pg.create_database("which_b")
    down = f"postgresql://postgres@127.0.0.1:{free_port()}/x"
    for call in (lambda: migrate([a, down]), lambda: opened([a, down])):
        with pytest.raises(StoreError, match="^cluster 2 of 2: cannot connect to a PostgreSQL "):
            run(call())
    run(migrate([a]))
    with pytest.raises(StoreError, match="^cluster 2 of 2 has no AccMan schema"):
        run(opened([a, b], migrate_schema=False))
    with pytest.raises(StoreError, match="^a cluster has no AccMan schema"):
        run(opened([b], migrate_schema=False))
    pg.psql("ALTER DATABASE which_b SET default_transaction_read_only = on")
    with pytest.raises(StoreError, match=r"^cluster 2 of 2: cannot connect to a PostgreSQL "
                       r"cluster of the store: the PostgreSQL store cannot be reached \(no host "
                       r"of the store URL takes writes\)$"):
        run(migrate([a, b]))
    with pytest.raises(StoreError, match="^clusters 1, 2 of 2 are the same cluster, named twice"):
        run(migrate([a, a.replace("127.0.0.1", "localhost")]))


def test_a_read_of_a_cluster_that_cannot_be_read_names_it(pg, pg_factory):
    """On a store of several, a read refused because its account's cluster
    cannot be reached names that cluster, as a write refused there does
    (a black-box probe: only writes did)."""
    other = pg_factory(name="unread")
    a, b = pg.create_database("unread_a"), other.create_database("unread_b")
    run(migrate([a, b]))

    async def main():
        async with stored([a, b]) as (store, c):
            there = next(f"z{i}" for i in range(100)
                         if store._locate(f"z{i}")[1] is store.clusters[1])
            assert await c.mod(there, 5) == (5, 1)
            other.stop("immediate")
            for read in (lambda: c.tot(there), lambda: c.past(there)):
                with pytest.raises(Unavailable, match="^cluster 2: the database cannot be "
                                                      "read: "):
                    await read()
    run(main())


def test_a_lost_cluster_is_named_in_the_log_on_a_store_of_several(pg, caplog):
    a, b = pg.create_database("named_a"), pg.create_database("named_b")
    caplog.set_level("WARNING", logger="accman.postgres")

    async def main():
        async with stored([a, b]) as (store, c):
            second = store.clusters[1]
            assert store.unhealthy_detail is None
            store.lost(second, ConnectionResetError(104, "reset"))
            # A write refused there names its cluster, as /health does.
            there = next(f"z{i}" for i in range(100) if store._locate(f"z{i}")[1] is second)
            with pytest.raises(Unavailable, match="nothing of this call was applied: cluster 2: "
                                                  "the PostgreSQL store lost its connection"):
                await c.mod(there, 5)
            # /health's detail: the other cluster's accounts still take writes.
            assert store.unhealthy_detail == (
                "cluster 2 of the store's 2 cannot commit (the PostgreSQL store lost its "
                "connection): writes to accounts there are refused, the others' are taken")
            for _ in range(200):
                if second.healthy:
                    break
                await asyncio.sleep(0.05)
            assert second.healthy
    run(main())
    said = [r.getMessage() for r in caplog.records]
    assert any(m.startswith("cluster 2: the PostgreSQL store lost its connection") for m in said)
    assert "cluster 2: reconnected to the PostgreSQL store; taking writes again" in said


@pytest.mark.parametrize("drop,says", [
    # Its indexes went with it.
    ("DROP TABLE accman_holds", "accman_holds, accman_holds_due, accman_holds_pkey"),
    ("DROP FUNCTION accman_merge", "accman_merge"),
    ("DROP INDEX accman_history_key", "accman_history_key"),
    ("ALTER TABLE accman_accounts DROP CONSTRAINT accman_accounts_pkey", "accman_accounts_pkey")])
def test_a_damaged_schema_is_refused_by_serve_and_migrate_not_repaired(pg, drop, says):
    url = pg.create_database(f"damaged_{drop.split()[-1]}")
    run(migrate([url]))
    pg.psql(drop, url.rsplit("/", 1)[1])
    name = drop.split()[-1]
    for call in (lambda: migrate([url]), lambda: opened(url),
                 lambda: opened(url, migrate_schema=False)):
        with pytest.raises(StoreError, match=f"^the store's schema is damaged: {says} missing; "
                           "nothing was repaired$"):
            run(call())
    assert pg.psql(f"SELECT to_regclass('{name}') IS NULL AND NOT EXISTS (SELECT 1 FROM "
                   f"pg_proc WHERE proname = '{name}')", url.rsplit("/", 1)[1]) == "t"


def test_health_says_which_clusters_cannot_commit():
    from types import SimpleNamespace as C

    from accman.postgres.cluster import health_detail
    assert health_detail([C(healthy=True), C(healthy=True)]) is None
    lost = "the PostgreSQL store lost its connection"
    assert health_detail([C(healthy=False, error=lost)]) == (
        f"the store cannot commit ({lost}); the server takes no writes")
    assert health_detail([C(healthy=False, error=lost)] * 2) == (
        f"the store cannot commit ({lost}); the server takes no writes")
    full = "the PostgreSQL store's disk is full"
    assert health_detail([C(healthy=False, error=lost), C(healthy=False, error=full)]) == (
        f"the store cannot commit (cluster 1: {lost}; cluster 2: {full}); the server takes "
        "no writes")
    # Some of several: which, and why (SCALING.md: a stalled commit's /health
    # names its cause), each cause once.
    assert health_detail([C(healthy=False, error=lost), C(healthy=True),
                          C(healthy=False, error=lost)]) == (
        f"clusters 1, 3 of the store's 3 cannot commit ({lost}): writes to accounts there "
        "are refused, the others' are taken")
    assert health_detail([C(healthy=True), C(healthy=False, error=full),
                          C(healthy=False, error=lost)]) == (
        f"clusters 2, 3 of the store's 3 cannot commit (cluster 2: {full}; cluster 3: "
        f"{lost}): writes to accounts there are refused, the others' are taken")
