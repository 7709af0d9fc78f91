"""One gap-free event order for a store of several clusters (SPEC "Events":
"a global id that grows by one, with no gaps"; accman.postgres.merge): every
event of every cluster once, each account's in its order, the ids already
read kept when a store grows to two clusters, a copy that fails part-way
copying nothing, and front-ends killed mid-load losing nothing."""

import asyncio
import re
import signal
import time

import asyncpg
import pytest

from accman.errors import Unavailable
from accman.postgres import merge as merge_module
from accman.postgres import upkeep as upkeep_module
from accman.postgres.migrate import migrate

from .bank import spawn_front_end
from .helpers import far_creds, locked, opened, run, stored, two_clusters
from .test_bounds import until


async def all_events(c):
    out, after = [], 0
    while True:
        page, after = await c.events(after=after, limit=1000)
        if not page:
            return out
        out += page


def history_keys(cluster, dbname):
    """{(account id, seq)} of every history entry of a cluster's database."""
    rows = cluster.psql("SELECT encode(hid, 'hex') || ' ' || seq FROM accman_history", dbname)
    return {(h, int(s)) for h, s in (r.split() for r in rows.split("\n") if r)}


def check_order(events, expected_keys):
    """Ids 1..n, every history entry's event exactly once (low_balance aside),
    each account's events in seq order."""
    assert [e.id for e in events] == list(range(1, len(events) + 1))
    keys = [(e.account, e.seq) for e in events if e.type != "low_balance"]
    assert len(keys) == len(set(keys)) and set(keys) == expected_keys
    last = {}
    for e in events:
        assert e.seq >= last.get(e.account, 0), e
        last[e.account] = e.seq


def test_two_clusters_number_their_events_in_one_order(pg, pg_factory):
    other, urls = two_clusters(pg, pg_factory, "m")

    async def main():
        s1, c1 = await opened(urls)
        s2, c2 = await opened(urls)           # a second front-end, at once
        try:
            assert s1.home is not None and s1.home.cluster_id == s2.home.cluster_id
            await asyncio.gather(*(c.mod(f"u{i}", 10) for i in range(60) for c in (c1,)))
            await asyncio.gather(*(c.mod(f"u{i}", -1, min=0) for i in range(60)
                                   for c in (c1, c2)))
            # A read sees every write answered before it, on either cluster.
            for i in range(0, 60, 7):
                _, seq = await c2.mod(f"u{i}", 2)
                seen = {(e.account, e.seq) for e in await all_events(c2)}
                assert (s2.account_id(f"u{i}"), seq) in seen
            return await all_events(c1), await all_events(c2)
        finally:
            await s1.aclose()
            await s2.aclose()
    seen1, seen2 = run(main())
    keys = history_keys(pg, "m_a") | history_keys(other, "m_b")
    assert len(keys) == 60 + 120 + 9
    check_order(seen2, keys)
    assert [(e.id, e.account, e.seq) for e in seen1] == \
        [(e.id, e.account, e.seq) for e in seen2][:len(seen1)]


def test_a_long_poll_hears_a_commit_on_another_cluster(pg, pg_factory):
    other, urls = two_clusters(pg, pg_factory, "lp")

    async def main():
        s1, c1 = await opened(urls)
        s2, c2 = await opened(urls)
        try:
            away = next(f"x{i}" for i in range(100)
                        if s2._locate(f"x{i}")[1] is not s2.home)
            waiting = asyncio.ensure_future(c1.events(after=0, wait_s=10))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            await c2.mod(away, 5)
            events, nxt = await waiting
            assert [(e.id, e.account) for e in events] == [(1, s2.account_id(away))]
            assert time.monotonic() - t0 < 5
        finally:
            await s1.aclose()
            await s2.aclose()
    run(main())


def test_a_long_poll_is_told_at_once_when_another_cluster_is_lost(pg, pg_factory):
    """A cluster that is not the events' home stops: a poll waiting on the
    home is answered Unavailable within the upkeep round that notices, as
    a poll made then is (its copy from that cluster fails), not at its
    deadline."""
    first = pg.create_database("lost_a")

    async def seed():                       # an event on `first` makes it the home
        async with stored(first) as (_, c):
            await c.mod("seed", 1)
    run(seed())
    other = pg_factory(name="lost")
    urls = [first, other.create_database("lost_b")]
    run(migrate(urls))                      # a cluster added to a store with accounts

    async def main():
        async with stored(urls) as (store, c):
            assert store.home.url == first
            poll = asyncio.ensure_future(c.events(after=1, wait_s=30))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            other.stop("immediate")
            with pytest.raises(Unavailable, match="the events of a cluster cannot be copied"):
                await asyncio.wait_for(poll, 20)
            return time.monotonic() - t0
    took = run(main())
    assert took < 5, took


def test_a_read_on_one_front_end_sees_every_write_another_answered(pg, pg_factory):
    """A mod on a cluster that is not the events' home, acknowledged by one
    front-end, is in the very next /events of another front-end: it copies
    whatever the other clusters have committed before it reads, not only
    what it knows of (its own commits, the notifications it has heard)."""
    other, urls = two_clusters(pg, pg_factory, "raw")

    async def main():
        s1, c1 = await opened(urls)
        s2, c2 = await opened(urls)
        try:
            creds = far_creds(s1, 200)[:40]
            after = 0
            for cred in creds:
                await c1.mod(cred, 5)
                events, after = await c2.events(after=after)
                assert [e.account for e in events] == [s1.account_id(cred)], cred
        finally:
            await s1.aclose()
            await s2.aclose()
    run(main())


def test_many_reads_at_once_share_one_copy(pg, pg_factory, monkeypatch):
    """before_read: reads that asked before a copy began are served by it,
    so that long polls woken together cost one copy, not one each."""
    other, urls = two_clusters(pg, pg_factory, "share")
    passes = []

    async def main():
        async with stored(urls) as (store, c):
            real = store.merger._pass

            async def counted(cluster):
                passes.append(cluster.index)
                return await real(cluster)
            monkeypatch.setattr(store.merger, "_pass", counted)
            # Each `after` its own read (reads of one `after` share a page).
            await asyncio.gather(*(c.events(after=n) for n in range(50)))
    run(main())
    assert 1 <= len(passes) <= 4            # 50 without the sharing (an upkeep round may add one)


def test_a_store_grown_to_two_clusters_keeps_the_ids_it_gave(pg, pg_factory):
    first = pg.create_database("g_a")

    async def before():
        async with stored(first) as (store, c):
            for i in range(5):
                await c.mod(f"u{i}", 3)
            return await all_events(c)
    old = run(before())
    other = pg_factory(name="added")
    second = other.create_database("g_b")
    infos = run(migrate([second, first]))        # the order of --store does not matter
    assert infos[0].events_home == infos[1].events_home == infos[1].cluster_id

    async def after():
        async with stored([first, second]) as (store, c):
            assert store.home.url == first
            for i in range(30):
                await c.mod(f"v{i}", 1)
            return await all_events(c)
    events = run(after())
    assert [(e.id, e.account, e.seq, e.at) for e in events[:5]] == \
        [(e.id, e.account, e.seq, e.at) for e in old]
    check_order(events, history_keys(pg, "g_a") | history_keys(other, "g_b"))
    assert int(other.psql("SELECT count(*) FROM accman_accounts", "g_b")) > 0


def test_a_copy_that_fails_part_way_copies_nothing(pg, pg_factory, monkeypatch):
    other, urls = two_clusters(pg, pg_factory, "f")
    home_db = {}

    async def main():
        async with stored(urls) as (store, c):
            home_db["name"] = store.home.url.rsplit("/", 1)[1]
            far = [f"y{i}" for i in range(200) if store._locate(f"y{i}")[1] is not store.home]
            home_cluster = pg if store.home.url == urls[0] else other
            # accman_merge does its work, then the transaction fails.
            home_cluster.psql(
                "CREATE FUNCTION failing_merge(a bytea, b bigint, c smallint[], d bytea[], "
                "e bigint[], f bigint[], g bigint[], h bigint[], i text[], j bigint[]) "
                "RETURNS void LANGUAGE plpgsql AS $$ BEGIN "
                "PERFORM accman_merge(a, b, c, d, e, f, g, h, i, j); "
                "RAISE EXCEPTION 'injected'; END $$", home_db["name"])
            monkeypatch.setattr(merge_module, "_MERGE_SQL",
                                "SELECT failing_merge($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)")
            await asyncio.gather(*(c.mod(y, 1) for y in far[:10]))
            with pytest.raises(Unavailable, match="copied"):
                await c.events()                 # 503: the copy failed
            assert home_cluster.psql("SELECT count(*) FROM accman_events",
                                     home_db["name"]) == "0"
            assert home_cluster.psql("SELECT upto FROM accman_merged",
                                     home_db["name"]) == "0"
            monkeypatch.undo()
            events = await all_events(c)
            assert [e.id for e in events] == list(range(1, 11))
            assert {e.account for e in events} == {store.account_id(y) for y in far[:10]}
    run(main())


def test_a_copy_that_waits_past_merge_timeout_s_is_unavailable(pg, pg_factory, monkeypatch):
    """MERGE_TIMEOUT_S: a copy that waits for its record on the home (the
    accman_merged row, locked by hand here, as another front-end's copy
    holds it while it reads a slow cluster) fails in time (503 for a read
    that needs it, retried by the copier), instead of holding /events
    without end; its backend holds nothing a writer needs, so the home
    goes on taking writes.  Then the copy catches up."""
    monkeypatch.setattr(merge_module, "MERGE_TIMEOUT_S", 0.5)
    other, urls = two_clusters(pg, pg_factory, "t")

    async def main():
        async with stored(urls) as (store, c):
            far = far_creds(store, 200)
            near = next(f"n{i}" for i in range(200) if store._locate(f"n{i}")[1] is store.home)
            async with locked(store.home.url, "accman_merged"):
                await asyncio.gather(*(c.mod(z, 1) for z in far[:5]))
                with pytest.raises(Unavailable, match="copied"):
                    await asyncio.wait_for(c.events(), 5)   # within 5 s, or no bound
                await asyncio.sleep(0.3)
                assert store.home.healthy and not store.home.abandoned
                assert await c.mod(near, 1) == (1, 1)       # the home takes writes
            events = await all_events(c)
            assert [e.id for e in events] == list(range(1, 7))
            assert {e.account for e in events} == {store.account_id(z)
                                                   for z in far[:5] + [near]}
    run(main())


def test_a_copy_from_a_cluster_that_does_not_answer_leaves_the_home_healthy(
        pg, pg_factory, monkeypatch, caplog):
    """MERGE_TIMEOUT_S passed while the other cluster's events were read
    (its accman_events locked by hand): the copy fails naming that
    cluster, and the home, which held nothing a writer needs, is not taken
    for lost: its writes, in flight or new, go on."""
    monkeypatch.setattr(merge_module, "MERGE_TIMEOUT_S", 0.5)
    caplog.set_level("WARNING", logger="accman.postgres")
    other, urls = two_clusters(pg, pg_factory, "slow")

    async def main():
        async with stored(urls) as (store, c):
            far = far_creds(store, 200)
            near = next(f"n{i}" for i in range(200) if store._locate(f"n{i}")[1] is store.home)
            await c.mod(far[0], 1)
            away = next(k for k in store.clusters if k is not store.home)
            async with locked(away.url, "accman_events"):
                with pytest.raises(Unavailable) as told:
                    await asyncio.wait_for(c.events(), 5)
                await asyncio.sleep(0.3)
                assert store.home.healthy and not store.home.abandoned
                await c.mod(near, 1)
            return told.value.detail, away.index + 1, store.home.index + 1
    detail, slow, home = run(main())
    assert detail == (f"the events of a cluster cannot be copied: cluster {slow} failed "
                      "reading its events: the database did not answer in time")
    said = [r.getMessage() for r in caplog.records]
    assert not [m for m in said if m.startswith(f"cluster {home}:")], said


def test_events_gone_from_a_cluster_before_their_copy_are_damage_named_as_such(
        pg, pg_factory):
    """Events of another cluster missing before they were copied (deleted
    by hand here, as damage or a trim that did not wait would) are never
    skipped: the read is refused with the damage's own words, the range
    and the cluster, and nothing is copied past the gap."""
    other, urls = two_clusters(pg, pg_factory, "gap")

    async def main():
        async with stored(urls) as (store, c):
            far = far_creds(store, 200)
            away = next(k for k in store.clusters if k is not store.home)
            async with locked(store.home.url, "accman_merged"):
                await asyncio.gather(*(c.mod(z, 1) for z in far[:4]))
                conn = await asyncpg.connect(away.url)
                try:
                    await conn.execute("DELETE FROM accman_events WHERE id <= 2")
                finally:
                    await conn.close()
            with pytest.raises(Unavailable) as told:
                await asyncio.wait_for(c.events(), 10)
            conn = await asyncpg.connect(store.home.url)
            try:
                copied = await conn.fetchval("SELECT count(*) FROM accman_events")
            finally:
                await conn.close()
            return told.value.detail, away.index + 1, copied
    detail, gone, copied = run(main())
    assert detail == ("the events of a cluster cannot be copied: events 1..2 of cluster "
                      f"{gone} were trimmed before they were copied to the home")
    assert copied == 0


def test_front_ends_killed_mid_load_lose_no_event(pg, pg_factory, tmp_path):
    """Two front-end processes on a store of two clusters, keyed mods from
    32 callers each; one is killed with SIGKILL halfway.  A front-end opened
    afterwards reads every event of both clusters once, in one gap-free
    order."""
    other, urls = two_clusters(pg, pg_factory, "k")

    async def fund():
        async with stored(urls) as (store, c):
            await asyncio.gather(*(c.mod(f"acct-{i}", 500) for i in range(40)))
    run(fund())
    procs = [spawn_front_end(urls=urls, seconds=4.0, callers=32, accounts=40, seed=i,
                             out=str(tmp_path / f"fe{i}.jsonl"), retry_s=0)
             for i in range(2)]
    time.sleep(2.5)
    procs[0].send_signal(signal.SIGKILL)
    for p in procs:
        p.communicate(timeout=60)
    assert procs[1].returncode == 0

    async def read():
        async with stored(urls) as (store, c):
            return await all_events(c)
    events = run(read())
    check_order(events, history_keys(pg, "k_a") | history_keys(other, "k_b"))
    assert len(events) > 200


def test_a_cluster_far_behind_is_copied_in_passes_of_merge_batch_max(pg, pg_factory,
                                                                      monkeypatch):
    """MERGE_BATCH_MAX events per copy: a cluster 23 events behind, at 5 a
    pass, is copied in five passes or more, in order, once."""
    monkeypatch.setattr(merge_module, "MERGE_BATCH_MAX", 5)
    other, urls = two_clusters(pg, pg_factory, "p")

    async def main():
        async with stored(urls) as (store, c):
            far = far_creds(store, 300)
            passes = []
            real_pass = store.merger._pass

            async def counted(cluster):
                n = await real_pass(cluster)
                passes.append(n)
                return n
            monkeypatch.setattr(store.merger, "_pass", counted)
            await asyncio.gather(*(c.mod(z, 1) for z in far[:23]))
            events = await all_events(c)
            assert [e.id for e in events] == list(range(1, 24))
            copied = [n for n in passes if n]
            assert sum(copied) == 23 and max(copied) == 5 and len(copied) >= 5
    run(main())


def test_copied_events_are_in_the_metrics_before_the_next_round(pg, pg_factory, monkeypatch):
    """accman_events_written_total and accman_events_first count the events
    copied to the home once they are read, not from the next round."""
    monkeypatch.setattr(upkeep_module, "EXPIRE_INTERVAL_S", 3600.0)     # open's round alone
    other, urls = two_clusters(pg, pg_factory, "met")

    async def main():
        async with stored(urls) as (store, c):
            ends = [(store.stats["events_first"], store.stats["events_last"])]
            for cred in far_creds(store, 40)[:3]:
                await c.mod(cred, 5)
            assert len(await all_events(c)) == 3                # copied to the home
            ends.append((store.stats["events_first"], store.stats["events_last"]))
            return ends
    assert run(main()) == [(0, 0), (1, 3)]


def test_a_cursor_row_off_the_events_home_holds_back_no_trimming(pg, pg_factory):
    """Cursors name ids of the store's one order, which only the home's
    events carry; another cluster numbers its own, so a row left there
    (a store whose home moved as it grew) keeps nothing."""
    other, urls = two_clusters(pg, pg_factory, "cur")

    async def main():
        async with stored(urls) as (store, c):
            for cred in far_creds(store, 40)[:3]:
                await c.mod(cred, 5)
            assert len(await all_events(c)) == 3            # copied to the home
            (away,) = [k for k in store.clusters if k is not store.home]
            await away.pool.execute("INSERT INTO accman_cursors VALUES ('webhook', 0)")
            await away.pool.execute("UPDATE accman_events SET at = 0")
            await away.events.trim(retention_s=3600)
            return await away.pool.fetchval("SELECT count(*) FROM accman_events")
    assert run(main()) == 1                                 # the newest stays


# What a failing copy says (the log, a 503's detail): the cluster at fault,
# what it was doing, and why in AccMan's words.
_COPY_FAILED = {
    "source": r"cluster 2 failed reading its events",
    "home": r"the home, cluster 2, (failed (taking its record of the copy|writing the copy)"
            r"|takes no writes)"}
_OUTAGE = r": the PostgreSQL store (cannot be reached \(connection refused\)|lost its connection)"


@pytest.mark.parametrize("down", ["source", "home"])
def test_a_copy_that_fails_names_the_cluster_at_fault_and_its_step(pg, pg_factory, caplog,
                                                                  down):
    """Cluster 2 of a store of two stops (pg_ctl stop -m immediate): the
    one events are copied from, or the home they are copied to.  The log's
    complaint and /events' 503 name cluster 2 and the step it failed (or,
    the home's sessions heard closing first, that the home takes no
    writes), not only the two clusters of the copy; /health names it too."""
    caplog.set_level("WARNING", logger="accman.postgres")
    other = pg_factory(name="down")
    urls = [pg.create_database(f"fault_{down}"), other.create_database(f"fault_{down}")]
    home_url = urls[1] if down == "home" else urls[0]

    async def seed():                       # an event there makes it the home
        async with stored(home_url) as (_, c):
            await c.mod("seed", 1)
    run(seed())
    run(migrate(urls))                      # a cluster added to a store with accounts

    async def main():
        async with stored(urls) as (store, c):
            assert store.home.url == home_url
            off_home = far_creds(store, 200)[0]
            await c.mod(off_home, 1)
            assert len(await all_events(c)) == 2        # copied: the copy worked
            other.stop("immediate")
            if down == "home":
                await c.mod(off_home, 1)    # a commit on cluster 1 is copied at once
            with pytest.raises(Unavailable) as told:
                await c.events(after=2)
            await until(lambda: not store.clusters[1].healthy, 10)
            return told.value.detail, store.unhealthy_detail
    detail, health = run(main())
    copy = ("copying events of cluster 2 to the home, cluster 1" if down == "source" else
            "copying events of cluster 1 to the home, cluster 2")
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(copy)]
    assert said and re.match(rf"{copy} failed \(retried\): {_COPY_FAILED[down]}{_OUTAGE} "
                             r"\(\w+ at \S+:\d+\)$", said[0]), said
    assert re.fullmatch(rf"the events of a cluster cannot be copied: {_COPY_FAILED[down]}"
                        rf"{_OUTAGE}", detail), detail
    assert health.startswith("cluster 2 of the store's 2 cannot commit"), health
