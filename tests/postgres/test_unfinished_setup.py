"""A store of several clusters whose setup by `accman migrate` was cut
short: what `serve` and `migrate` say of it, and that no cluster of it
serves in a store of another shape (SCALING.md, "Several clusters")."""

import asyncio
import re
import subprocess
import sys

import asyncpg
import pytest

from accman.errors import StoreError
from accman.postgres.migrate import MIGRATE_LOCK_ID, migrate

from .helpers import (fund, locked, migrate_cut_short_before_the_home, opened, run, schema_dump,
                      stored)

# On a cluster: its own record as the events' home refused (a full disk, a
# connection lost there), so that a migrate stops at that write.
_REFUSE_HOME_RECORD = """
CREATE FUNCTION refuse_home_record() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the home''s record refused'; END $$;
CREATE TRIGGER refuse_home_record BEFORE UPDATE OF events_home ON accman_schema
    FOR EACH ROW WHEN (NEW.events_home = NEW.cluster_id) EXECUTE FUNCTION refuse_home_record();
"""
# On the home: a new row of accman_merged refused (a cluster being added).
_REFUSE_MERGED_ROW = """
CREATE FUNCTION refuse_merged_row() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN RAISE EXCEPTION 'the home''s record refused'; END $$;
CREATE TRIGGER refuse_merged_row BEFORE INSERT ON accman_merged
    FOR EACH ROW EXECUTE FUNCTION refuse_merged_row();
"""
_FINISH = (r"serve does not finish the setup of a store that holds accounts; stop the "
           r"front-ends and run `accman migrate` with the same --store list, which finishes it, "
           r"then move the accounts of the clusters added \(docs/SCALING.md, \"Several "
           r"clusters\"\)$")
_UNFINISHED = r"^the store's setup by `accman migrate` was not finished .*" + _FINISH
_OTHER_SHAPE = (r"^(a cluster was|clusters? [\d, ]+ of 3 (was|were)) being set up by `accman "
                r"migrate` as part of a store of 2 clusters, and that setup was not finished "
                r"\(\d given\): run `accman migrate` with the same 2 --store URLs, which "
                r"finishes it$")


def _grown_cut_short_at_the_home(pg, prefix, c):
    """A store of one (PREFIX_a, 8 accounts C0..C7) whose growth by a
    cluster (PREFIX_b) a migrate began and that stopped at the home's own
    record: their URLs and the credentials."""
    home, added = pg.create_database(f"{prefix}_a"), pg.create_database(f"{prefix}_b")
    creds = [f"{c}{i}" for i in range(8)]
    run(fund(home, creds))
    pg.psql(_REFUSE_HOME_RECORD, f"{prefix}_a")
    with pytest.raises(StoreError, match="cannot record the store's clusters"):
        run(migrate([added, home]))
    pg.psql("DROP TRIGGER refuse_home_record ON accman_schema", f"{prefix}_a")
    return home, added, creds


def test_a_migrate_cut_short_at_the_home_s_record_is_said_to_be_unfinished(pg):
    """A migrate adding a cluster to a store that holds accounts, cut short
    when the home's own record failed: the cluster given before it in the
    --store list already named the home, and serve said "cluster 1 of 2 is
    not of the store", as if it were added by hand.  Serve says the setup
    was not finished and that migrate with the same list finishes it,
    changing nothing; that migrate then does.  Meanwhile the store of one
    it was serves alone, and the added cluster does not."""
    home, added, creds = _grown_cut_short_at_the_home(pg, "half", "h")
    before = schema_dump(pg, ("half_a", "half_b"))
    with pytest.raises(StoreError, match=_UNFINISHED):
        run(opened([added, home]))
    assert schema_dump(pg, ("half_a", "half_b")) == before
    with pytest.raises(StoreError, match=_OTHER_SHAPE):
        run(opened([added]))

    async def alone():           # the store of one it was goes on, its accounts found
        async with stored(home) as (_, c):
            assert await c.tot(creds[0]) == 5
    run(alone())
    infos = run(migrate([added, home]))
    assert infos[0].events_home == infos[1].events_home == infos[1].cluster_id
    _serves_the_store([home, added], len(creds))


def test_a_home_that_does_not_record_the_store_is_said_to_be_unfinished(pg):
    """The clusters as an AccMan that recorded the home in --store order
    left them, cut short at the home's own record: the cluster given first
    names the home, which records nothing.  Serve said "cluster 1 of 2 is
    not of the store"; it says the setup was not finished."""
    home, added, creds = _grown_cut_short_at_the_home(pg, "noted", "n")
    home_id = pg.psql("SELECT encode(cluster_id, 'hex') FROM accman_schema", "noted_a")
    pg.psql(f"UPDATE accman_schema SET events_home = '\\x{home_id}'", "noted_b")
    pg.psql("UPDATE accman_schema SET events_home = NULL", "noted_a")
    before = schema_dump(pg, ("noted_a", "noted_b"))
    with pytest.raises(StoreError, match=r"^the store's setup by `accman migrate` was not "
                       r"finished \(cluster 2 of 2, the store's events' home, does not record "
                       r"its clusters\), and cluster 2 of 2 holds accounts: " + _FINISH):
        run(opened([added, home]))
    assert schema_dump(pg, ("noted_a", "noted_b")) == before
    run(migrate([added, home]))
    _serves_the_store([home, added], len(creds))


def test_a_home_that_does_not_record_the_store_is_not_grown_by_serve_without_accounts(pg):
    """The same, the store holding no account yet: the home, recording
    nothing, is a store of one, which a front-end serves alone.  Serve given
    both finished the setup and served the two, while that front-end went
    on opening accounts that the store of two looks for on the other
    cluster.  Serve refuses, changing nothing; `accman migrate`, with the
    front-end stopped, finishes it."""
    urls = [pg.create_database(f"bare_home_{x}") for x in "ab"]
    run(migrate(urls))
    dbs = [u.rsplit("/", 1)[1] for u in urls]
    k = next(k for k, db in enumerate(dbs)
             if pg.psql("SELECT events_home = cluster_id FROM accman_schema", db) == "t")
    pg.psql("UPDATE accman_schema SET events_home = NULL; DELETE FROM accman_merged", dbs[k])

    async def main():
        async with stored(urls[k]):                      # a front-end serving the home alone
            before = schema_dump(pg, dbs)
            with pytest.raises(StoreError, match=rf"^the store's setup by `accman migrate` was "
                               rf"not finished \(cluster {k + 1} of 2, the store's events' home, "
                               r"does not record its clusters\): serve does not add a cluster to "
                               r"a store set up already; stop the front-ends and run `accman "
                               r"migrate` with the same --store list, which finishes it"):
                await opened(urls)
            assert schema_dump(pg, dbs) == before
    run(main())
    infos = run(migrate(urls))
    assert infos[0].events_home == infos[1].events_home == infos[k].cluster_id


def test_a_cluster_added_by_a_migrate_cut_short_at_the_home_is_said_to_be_unfinished(pg):
    """A third cluster added to a store of two that holds accounts, the
    migrate cut short when the home was to record it: serve said it "is not
    of the store", as if given by mistake; it says the setup was not
    finished, and migrate with the same list finishes it."""
    urls = [pg.create_database(f"third_{x}") for x in "abc"]
    run(fund(urls[:2], ["t1", "t2", "t3"]))
    home = next(db for db in ("third_a", "third_b")
                if pg.psql("SELECT events_home = cluster_id FROM accman_schema", db) == "t")
    pg.psql(_REFUSE_MERGED_ROW, home)
    with pytest.raises(StoreError, match="cannot record the store's clusters"):
        run(migrate(urls))
    pg.psql("DROP TRIGGER refuse_merged_row ON accman_merged", home)
    before = schema_dump(pg, ("third_a", "third_b", "third_c"))
    with pytest.raises(StoreError, match=r"^the store's setup by `accman migrate` was not "
                       r"finished \(the home does not record cluster 3 of 3 yet\), and "
                       r"clusters? [\d, ]+ of 3 holds? accounts: " + _FINISH):
        run(opened(urls))
    assert schema_dump(pg, ("third_a", "third_b", "third_c")) == before
    assert len(run(migrate(urls))) == 3


def _serves_the_store(urls, events):
    """The store of `urls` serves, its events' home the first URL's cluster,
    which numbered the store's `events` (the accounts that rank the added
    cluster would then be moved to it: SCALING.md)."""
    async def served():
        async with stored(urls) as (store, c):
            assert store.home is store.clusters[0]
            page = await c.events(after=0)
            assert [e.id for e in page[0]] == list(range(1, events + 1))
    run(served())


def test_a_cluster_of_an_unfinished_setup_is_refused_in_a_store_of_another_shape(pg,
                                                                                  monkeypatch):
    """A migrate of two new clusters cut short before the home was
    recorded: each was served alone, as a store of one, whose accounts
    the store of two would then look for on the other cluster.  Every
    other count is refused, by serve and migrate, changing nothing; the
    two, in either order, finish the setup and serve."""
    a, b, c = (pg.create_database(f"shape_{x}") for x in "abc")
    migrate_cut_short_before_the_home(monkeypatch, [a, b])
    before = schema_dump(pg, ("shape_a", "shape_b", "shape_c"))
    calls = ((opened, {}), (opened, {"migrate_schema": False}), (migrate, {}))
    for given, tried in (([a], calls), ([a, b, c], calls), ([b], calls[:1]),
                         ([c, b, a], calls[:1])):
        for call, kw in tried:
            with pytest.raises(StoreError, match=_OTHER_SHAPE):
                run(call(given, **kw))
    assert schema_dump(pg, ("shape_a", "shape_b", "shape_c")) == before
    with pytest.raises(StoreError, match=r"^the store's setup by `accman migrate` was not "
                                         r"finished: run `accman migrate` with the same "):
        run(opened([a, b], migrate_schema=False))
    run(fund([b, a], ["s1", "s2", "s3"]))          # no account yet: serve finishes it
    with pytest.raises(StoreError, match="the store has 2 clusters and 1 was given|"
                                         "numbered on a cluster not given"):
        run(opened([a]))


# The migrate lock awaited in this database (pg_locks lists every database's),
# looked for every 20 ms for up to 10 s.
_WAIT_POLLS_MAX = 500
_MIGRATE_WAITERS_SQL = ("SELECT count(*) FROM pg_locks l JOIN pg_database d ON l.database = "
                        "d.oid WHERE l.locktype = 'advisory' AND NOT l.granted "
                        "AND d.datname = current_database()")


async def _waiting(holder, count):
    """Until `count` migrations wait for the migrate lock `holder` holds."""
    for _ in range(_WAIT_POLLS_MAX):
        if await holder.fetchval(_MIGRATE_WAITERS_SQL) >= count:
            return
        await asyncio.sleep(0.02)
    pytest.fail(f"{count} migrations never waited for the migrate lock")


async def _migrate_killed_waiting(held: str, stores: list[str]) -> None:
    """`accman migrate` of `stores` killed (SIGKILL) once it waits for the
    migrate lock, which this test holds on the cluster `held` meanwhile."""
    holder = await asyncpg.connect(held)
    try:
        await holder.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK_ID)
        proc = subprocess.Popen([sys.executable, "-m", "accman", "migrate",
                                 *(arg for url in stores for arg in ("--store", url))])
        try:
            await _waiting(holder, 1)
        finally:
            proc.kill()
            proc.wait()
    finally:
        await holder.close()


def test_a_cluster_left_by_a_migrate_killed_mid_way_serves_only_in_its_store(pg):
    """`accman migrate` of two new clusters killed (SIGKILL) once the first
    has its schema, while the second's migration waits for its lock: the
    first was served alone, as a store of one.  Refused; the two finish."""
    a, b = pg.create_database("killed_a"), pg.create_database("killed_b")
    run(_migrate_killed_waiting(b, [a, b]))
    assert pg.psql("SELECT to_regclass('accman_schema') IS NULL", "killed_b") == "t"
    before = schema_dump(pg, ("killed_a", "killed_b"))
    with pytest.raises(StoreError, match=_OTHER_SHAPE):
        run(opened([a]))
    assert schema_dump(pg, ("killed_a", "killed_b")) == before
    run(fund([a, b], ["k1"]))


def test_a_new_cluster_named_twice_is_left_a_cluster_that_serves_alone(pg):
    """A new cluster is known to be named twice only once migrated: it is
    not left marked as one of a setup of 2, which it never was."""
    url = pg.create_database("twice_new")
    with pytest.raises(StoreError, match="^clusters 1, 2 of 2 are the same cluster, named "
                                         "twice$"):
        run(migrate([url, url.replace("127.0.0.1", "localhost")]))
    assert pg.psql("SELECT events_home IS NULL FROM accman_schema", "twice_new") == "t"
    run(fund(url, ["w"]))


def test_a_new_cluster_named_twice_leaves_another_setup_s_mark(pg, monkeypatch):
    """Named twice beside a cluster of another setup of as many clusters,
    unfinished: that cluster's mark was cleared with the new one's, and it
    then served alone, as a store of one, opening accounts the store of
    three would look for on the other clusters.  Only the mark this
    migrate made goes; the other setup's cluster is still refused alone."""
    z, p, q, x = (pg.create_database(f"marks_{c}") for c in "zpqx")
    migrate_cut_short_before_the_home(monkeypatch, [z, p, q])
    with pytest.raises(StoreError, match="^clusters 1, 2 of 3 are the same cluster, named "
                                         "twice$"):
        run(migrate([x, x.replace("127.0.0.1", "localhost"), z]))
    assert pg.psql("SELECT events_home IS NULL FROM accman_schema", "marks_x") == "t"
    with pytest.raises(StoreError, match=r"^a cluster was being set up by `accman migrate` as "
                                         r"part of a store of 3 clusters"):
        run(opened([z]))
    run(fund([q, p, z], ["m"]))                 # the setup of three finishes


def test_a_new_cluster_named_twice_leaves_the_mark_of_a_setup_that_migrated_it_meanwhile(pg):
    """The same, the other setup's mark made on the very cluster named twice,
    between this migrate's reads and its migration of it (front-ends
    started at once on new clusters, one given one twice), and the other
    setup then cut short: the mark went, and the cluster served alone."""
    x, y = pg.create_database("meanwhile_x"), pg.create_database("meanwhile_y")

    async def main():
        holder_x, holder_y = await asyncpg.connect(x), await asyncpg.connect(y)
        try:
            for holder in (holder_x, holder_y):
                await holder.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK_ID)
            setup = asyncio.ensure_future(migrate([x, y]))
            await _waiting(holder_x, 1)
            twice = asyncio.ensure_future(migrate([x, x.replace("127.0.0.1", "localhost")]))
            await _waiting(holder_x, 2)
            await holder_x.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK_ID)
            with pytest.raises(StoreError, match="^clusters 1, 2 of 2 are the same cluster"):
                await twice
            await _waiting(holder_y, 1)             # the setup has marked x: cut short
            setup.cancel()
            with pytest.raises(asyncio.CancelledError):
                await setup
        finally:
            await holder_x.close()
            await holder_y.close()
    run(main())
    with pytest.raises(StoreError, match=_OTHER_SHAPE):
        run(opened([x]))
    run(fund([y, x], ["y"]))


@pytest.mark.parametrize("served", [1, 2])
def test_serve_does_not_add_a_cluster_to_a_store_a_front_end_serves(pg, served):
    """A front-end serving a store with no account yet, and another started
    with one more --store: the second added the cluster at its start, the
    first went on with the clusters it had, and a credential funded
    through one was looked for on another cluster by the other
    (no_account).  Serve adds no cluster to a store set up already,
    changing nothing; `accman migrate`, with the front-ends stopped,
    does."""
    urls = [pg.create_database(f"running{served}_{x}") for x in "abc"][:served + 1]
    dbs = [u.rsplit("/", 1)[1] for u in urls]

    async def main():
        async with stored(urls[:served]):
            before = schema_dump(pg, dbs)
            with pytest.raises(StoreError, match=rf"^cluster {served + 1} of {served + 1} is "
                               r"not of the store, which .* already makes?: serve does not "
                               r"add a cluster, .*run `accman migrate` with every --store"):
                await opened(urls)
            assert schema_dump(pg, dbs) == before
    run(main())
    assert len(run(migrate(urls))) == served + 1


def test_front_ends_started_at_once_with_one_and_two_clusters_do_not_both_serve(pg):
    """Front-ends started at once on new clusters, one given A, the other
    A and B (a --store added to one's configuration only): each found A
    bare, the first made it a store of one, and the second, migrating A
    next, marked it as one of two and served both: a credential funded
    through the first was no_account through the second.  The second,
    finding A set up meanwhile, is refused and changes nothing; the first
    serves."""
    a, b = pg.create_database("together_a"), pg.create_database("together_b")

    async def main():
        holder = await asyncpg.connect(a)
        try:
            await holder.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK_ID)
            alone = asyncio.ensure_future(opened([a]))
            await _waiting(holder, 1)
            both = asyncio.ensure_future(opened([b, a]))
            await _waiting(holder, 2)
            await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK_ID)
            done = await asyncio.gather(alone, both, return_exceptions=True)
        finally:
            await holder.close()
        for store in [d[0] for d in done if isinstance(d, tuple)]:
            await store.aclose()
        assert isinstance(done[0], tuple)
        assert isinstance(done[1], StoreError), done[1]
        assert re.match(r"^cluster 2 of 2: it was set up meanwhile by another AccMan, as a "
                        r"store of one, which a front-end may serve: stop the front-ends "
                        r"given it alone, and run `accman migrate` with every --store",
                        str(done[1])), str(done[1])
    run(main())
    assert pg.psql("SELECT to_regclass('accman_schema') IS NULL", "together_b") == "t"
    assert pg.psql("SELECT events_home IS NULL FROM accman_schema", "together_a") == "t"


def test_a_store_of_one_whose_growth_was_cut_short_is_not_grown_by_serve(pg):
    """`accman migrate` adding a new cluster to a store of one with no
    account yet, killed once the new cluster (first in the URLs' order) was
    migrated and marked, before the store's own cluster was: serve given
    both then marked the store of one and served the two, while a
    front-end serving it alone went on, opening accounts the store of two
    looks for on the other cluster.  Serve refuses, changing nothing."""
    one, added = pg.create_database("grown_z"), pg.create_database("grown_a")
    run(migrate([one]))

    async def main():
        await _migrate_killed_waiting(one, [one, added])
        assert pg.psql("SELECT events_home IS NOT NULL FROM accman_schema", "grown_a") == "t"
        async with stored(one):                       # a front-end serving it alone
            before = schema_dump(pg, ("grown_z", "grown_a"))
            with pytest.raises(StoreError, match=r"^the store's setup by `accman migrate` was "
                               r"not finished \(no cluster of the 2 given is recorded as the "
                               r"store's events' home\): serve does not add a cluster to a "
                               r"store set up already; stop the front-ends and run `accman "
                               r"migrate` with the same --store list, which finishes it"):
                await opened([one, added])
            assert schema_dump(pg, ("grown_z", "grown_a")) == before
    run(main())
    assert len(run(migrate([one, added]))) == 2


# events_home of a cluster marked by a migrate of 2 (accman.postgres.shape.setting_up).
_MARKED_2 = "'\\x" + "00" * 12 + "00000002'"


@pytest.mark.parametrize("accounts", [8, 0])
def test_a_cluster_the_home_records_that_does_not_record_it_is_finished_only_without_accounts(
        pg, accounts):
    """A migrate adding a cluster to a store of one, cut short once the home
    recorded the added cluster and before the added cluster recorded the
    home (here the record undone by hand): serve finished the setup and
    served, the accounts that rank the added cluster not moved (no_account
    for them, a second row on a funding mod), where SCALING.md says serve
    does not finish the setup of a store that holds accounts.  It refuses,
    changing nothing; with no account (front-ends started together on new
    clusters, one reading mid-way) it finishes it."""
    one, added = (pg.create_database(f"pending{accounts}_{x}") for x in "ab")
    dbs = [u.rsplit("/", 1)[1] for u in (one, added)]
    run(fund(one, [f"p{i}" for i in range(accounts)]))
    run(migrate([one, added]))
    pg.psql(f"UPDATE accman_schema SET events_home = {_MARKED_2}", dbs[1])
    before = schema_dump(pg, dbs)
    if accounts:
        with pytest.raises(StoreError, match=r"^the store's setup by `accman migrate` was not "
                           r"finished \(cluster 2 of 2 does not record the store's events' "
                           r"home yet\), and cluster 1 of 2 holds accounts: " + _FINISH):
            run(opened([one, added]))
        assert schema_dump(pg, dbs) == before
        run(migrate([one, added]))
        _serves_the_store([one, added], accounts)
    else:
        run(fund([one, added], ["q"]))


# A lock on a table awaited in this database, looked for as _waiting does.
_TABLE_WAITS_SQL = ("SELECT EXISTS (SELECT 1 FROM pg_locks l JOIN pg_database d ON l.database = "
                    "d.oid WHERE l.locktype = 'relation' AND NOT l.granted "
                    "AND d.datname = current_database())")


def test_a_front_end_reading_while_another_finishes_the_setup_and_opens_an_account_starts(pg):
    """Front-ends started together on a store of three with no account,
    one cluster recorded by the home and not recording it yet: the first
    read that cluster still marked; the second then finished the setup and
    committed an account on the home; the first, reading the accounts
    next, refused to start, as if the accounts were there while the setup
    was not finished.  It starts."""
    urls = [pg.create_database(f"overtaken_{x}") for x in "abc"]
    dbs = [u.rsplit("/", 1)[1] for u in urls]
    run(migrate(urls))
    home = next(k for k, db in enumerate(dbs)
                if pg.psql("SELECT events_home = cluster_id FROM accman_schema", db) == "t")
    pending, other = (k for k in range(3) if k != home)
    pg.psql("UPDATE accman_schema SET events_home = '\\x" + "00" * 12 + "00000003'",
            dbs[pending])

    async def main():
        holder, watcher = await asyncpg.connect(urls[pending]), await asyncpg.connect(urls[other])
        stores = []
        try:
            # The second front-end, past its checks, waits to migrate.
            await holder.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK_ID)
            second = asyncio.ensure_future(opened(urls))
            await _waiting(holder, 1)
            async with locked(urls[other], "accman_accounts"):
                # The first has read the clusters and waits at the accounts of one.
                first = asyncio.ensure_future(opened([urls[k] for k in (pending, other, home)]))
                for _ in range(_WAIT_POLLS_MAX):
                    if await watcher.fetchval(_TABLE_WAITS_SQL):
                        break
                    await asyncio.sleep(0.02)
                else:
                    pytest.fail("the first front-end never read the accounts")
                await holder.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK_ID)
                stores.append(await second)
                store, calls = stores[0]
                cred = next(f"o{i}" for i in range(100)
                            if store._locate(f"o{i}")[1] is store.home)
                assert await calls.mod(cred, 5) == (5, 1)
            stores.append(await first)
            assert await stores[1][1].tot(cred) == 5
        finally:
            for store, _ in stores:
                await store.aclose()
            await holder.close()
            await watcher.close()
    run(main())
