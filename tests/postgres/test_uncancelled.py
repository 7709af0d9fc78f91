"""Commits are never cancelled in the database (accman/postgres/backends.py):
a cancel ends a commit's wait for its synchronous standby and makes it
visible on the primary alone, to be lost in a failover.  Past AccMan's
deadline, or when its caller is cancelled, a commit's socket is closed
instead; its backend waits on, unseen, and the store takes no writes on
its cluster until it ends.  A cancel from elsewhere is heard: one that
cuts a commit's wait for the standby leaves its calls unacknowledged
(unavailable), one that ends a batch's statement is not_applied."""

import asyncio
import contextlib
import gc
import warnings

import asyncpg
import pytest

from accman.errors import NotApplied, StoreError, Unavailable
from accman.postgres import committing
from accman.postgres import cursors as cursors_module
from accman.postgres import errors as E
from accman.postgres import events as events_module
from accman.postgres import merge as merge_module
from accman.postgres import upkeep as upkeep_module
from accman.postgres.backends import Connection, committed, identify

from .helpers import far_creds, fund, locked, opened, run, stored
from .test_bounds import backends_busy, until, until_async


def standby_of(primary, name):
    return primary.add_standby(name + "_standby", sync=True)


def with_standby(pg_factory, name, db):
    """(a new server, its synchronous standby, the URL of a new database
    `db` on it)."""
    primary = pg_factory(name=name)
    standby = standby_of(primary, name)
    return primary, standby, primary.create_database(db)


@contextlib.asynccontextmanager
async def two_clusters_home_standby(pg_factory, name):
    """(store, calls, the home's synchronous standby, a credential whose
    account lives on the other cluster): a store of two new clusters."""
    servers = [pg_factory(name=f"{name}_a"), pg_factory(name=f"{name}_b")]
    urls = [server.create_database("m") for server in servers]
    async with stored(urls) as (store, c):
        standby = standby_of(servers[store.clusters.index(store.home)], name)
        yield store, c, standby, far_creds(store, 64)[0]


async def count(url, sql):
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(sql)
    finally:
        await conn.close()


async def waiting_for_standby(url) -> int:
    return await count(url, "SELECT count(*) FROM pg_stat_activity "
                            "WHERE wait_event = 'SyncRep'")


def test_a_commit_past_its_deadline_or_cancelled_is_left_to_wait_unseen(pg_factory):
    primary, standby, url = with_standby(pg_factory, "deadline", "d")
    primary.psql("CREATE TABLE t (x int)", "d")

    async def main():
        conns = [await asyncpg.connect(url, connection_class=Connection) for _ in range(2)]
        for conn in conns:
            await identify(conn)
        standby.stop("immediate")
        abandoned = set()
        with pytest.raises(asyncio.TimeoutError):
            await committed(conns[0], conns[0].execute("INSERT INTO t VALUES (1)"), 0.5,
                            abandoned)
        caller = asyncio.ensure_future(committed(
            conns[1], conns[1].execute("INSERT INTO t VALUES (2)"), 60, abandoned))
        while await waiting_for_standby(url) < 2:
            await asyncio.sleep(0.02)
        caller.cancel()
        with pytest.raises(asyncio.CancelledError):
            await caller
        assert all(conn.is_closed() for conn in conns)
        assert abandoned == {conn.backend for conn in conns}
        await asyncio.sleep(0.5)                    # a cancel request would have landed
        assert await waiting_for_standby(url) == 2
        assert await count(url, "SELECT count(*) FROM t") == 0
        standby.start()
        for _ in range(500):
            if await count(url, "SELECT count(*) FROM t") == 2:
                break
            await asyncio.sleep(0.02)
        assert await count(url, "SELECT count(*) FROM t") == 2
    run(main())


async def cancel_standby_waits(url) -> None:
    """An operator's pg_cancel_backend of each backend that waits for its
    synchronous standby: PostgreSQL commits it on the primary alone."""
    await count(url, "SELECT count(pg_cancel_backend(pid)) FROM pg_stat_activity "
                     "WHERE wait_event = 'SyncRep'")


async def cut_mod(c, url) -> Unavailable:
    """The refusal of a keyed mod of a's (-3, "k1") whose commit waits for
    the stopped standby until an operator's cancel cuts the wait."""
    call = asyncio.ensure_future(c.mod("a", -3, key="k1"))
    await until_async(lambda: waiting_for_standby(url), 1)
    await cancel_standby_waits(url)
    with pytest.raises(Unavailable) as told:
        await call
    return told.value


def test_a_commit_whose_standby_wait_is_cancelled_elsewhere_is_not_acknowledged(
        pg_factory, monkeypatch):
    """A cancel from outside AccMan ends a batch's wait for the synchronous
    standby, and PostgreSQL returns success with a WARNING, the change on
    the primary alone: its calls are 503 unavailable (it may have landed),
    never 200, and the cluster reconnects.  The keyed retry is a commit
    like any (it locks its account): while the standby is away it waits
    for it, and is unavailable past COMMIT_TIMEOUT_S, never 200 from the
    primary alone; once the standby is back it gets the first reply, the
    change then on the standby too."""
    monkeypatch.setattr(committing, "COMMIT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(upkeep_module, "RECONNECT_BACKOFF_S_MAX", 0.2)
    pg, standby, url = with_standby(pg_factory, "retried", "r")

    async def main():
        async with stored(url) as (store, c):
            assert await c.mod("a", 10) == (10, 1)
            standby.stop("immediate")
            told = await cut_mod(c, url)
            assert not isinstance(told, NotApplied)
            assert "pg_cancel_backend" in told.detail
            assert "with its key" in told.detail
            assert await count(url, "SELECT tot FROM accman_accounts") == 7   # primary alone
            await until(lambda: store.healthy, 15)
            with pytest.raises(Unavailable) as told:
                await c.mod("a", -3, key="k1")
            assert "in time" in told.value.detail
            standby.start()
            await until(lambda: store.healthy, 15)
            assert await c.mod("a", -3, key="k1") == (7, 2)
            await until_async(lambda: count(standby.url("r"),
                                            "SELECT tot FROM accman_accounts"), 7)
    run(main())


def test_a_cut_wait_is_heard_whatever_client_min_messages_the_database_sets(
        pg_factory, monkeypatch):
    """The WARNING of a cut wait reaches AccMan's connections whatever
    client_min_messages the database or the role sets: at `error` it was
    not sent, and the batch was 200 on the primary alone."""
    monkeypatch.setattr(upkeep_module, "RECONNECT_BACKOFF_S_MAX", 0.2)
    pg, standby, url = with_standby(pg_factory, "quiet", "q")
    pg.psql("ALTER DATABASE q SET client_min_messages = error")
    pg.psql("ALTER ROLE postgres IN DATABASE q SET client_min_messages = error")

    async def main():
        assert await count(url, "SHOW client_min_messages") == "error"
        async with stored(url) as (_, c):
            assert await c.mod("a", 10) == (10, 1)
            standby.stop("immediate")
            told = await cut_mod(c, url)
            assert "pg_cancel_backend" in told.detail
            assert await count(url, "SELECT tot FROM accman_accounts") == 7   # primary alone
    run(main())


def _database_sets(pg, url, **settings):
    """The database of `url` sets `settings` for every session, as an
    operator's ALTER DATABASE does."""
    db = url.rsplit("/", 1)[1].split("?")[0]
    for name, value in settings.items():
        pg.psql(f"ALTER DATABASE {db} SET {name} = '{value}'")


def test_the_database_s_timeouts_do_not_cut_a_batch(pg, pg_url):
    """A statement_timeout or lock_timeout set on the database (or its
    role, or the server) does not reach AccMan's sessions: a batch waiting
    for a row lock held past both is committed once the lock goes, where
    the database's timeout refused it (and, firing as a statement ends,
    could be taken for the next batch's refusal)."""
    _database_sets(pg, pg_url, statement_timeout="200ms", lock_timeout="100ms")

    async def main():
        async with stored(pg_url) as (store, c):
            assert await c.mod("a", 10) == (10, 1)
            holder = await asyncpg.connect(pg_url)
            try:
                async with holder.transaction():
                    await holder.execute("SELECT 1 FROM accman_accounts FOR UPDATE")
                    call = asyncio.ensure_future(c.mod("a", -3))
                    await until_async(lambda: backends_busy(pg_url), 1)
                    await asyncio.sleep(0.5)        # past both timeouts, the lock held
                    assert not call.done()
            finally:
                await holder.close()
            assert await call == (7, 2)
            assert store.healthy
    run(main())


def test_the_database_s_idle_timeouts_do_not_end_a_front_end_s_sessions(pg, pg_url):
    """An idle_session_timeout set on the database does not reach AccMan's
    sessions: a front-end idle past it stays healthy and its next write
    goes through, where its writer was ended every few seconds (the
    cluster lost until the store had reconnected: /health and writes 503,
    a black-box probe)."""
    _database_sets(pg, pg_url, idle_session_timeout="300ms",
                   idle_in_transaction_session_timeout="300ms")

    async def main():
        async with stored(pg_url) as (store, c):
            assert await c.mod("a", 10) == (10, 1)
            for _ in range(10):                 # a second, idle
                await asyncio.sleep(0.1)
                assert store.healthy
            assert await c.mod("a", -3) == (7, 2)
            assert [cl.losses for cl in store.clusters] == [0]
    run(main())


def test_a_batch_cancelled_in_the_database_is_not_applied(pg_url, monkeypatch):
    """A batch's statement cancelled from outside AccMan (an operator's
    pg_cancel_backend while it waits for a row lock) is rolled back by
    PostgreSQL: its calls are 503 not_applied, and the cluster takes
    writes again once the store has reconnected."""
    monkeypatch.setattr(upkeep_module, "RECONNECT_BACKOFF_S_MAX", 0.2)

    async def main():
        async with stored(pg_url) as (store, c):
            assert await c.mod("a", 10) == (10, 1)
            holder = await asyncpg.connect(pg_url)
            try:
                async with holder.transaction():
                    await holder.execute("SELECT 1 FROM accman_accounts FOR UPDATE")
                    call = asyncio.ensure_future(c.mod("a", -3))
                    await until_async(lambda: backends_busy(pg_url), 1)
                    await holder.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                                         "WHERE wait_event_type = 'Lock'")
                    with pytest.raises(NotApplied) as told:
                        await call
                    assert "cancelled the batch's statement" in told.value.detail
            finally:
                await holder.close()
            await until(lambda: store.healthy, 15)
            assert await c.tot("a") == 10
            assert await c.mod("a", -3) == (7, 2)
    run(main())


def test_a_batch_cancelled_after_its_statement_before_its_commit_is_not_applied(
        pg_url, monkeypatch):
    """A cancel that lands once the batch's statement is done, while its
    commit runs (the Sync of the extended protocol; here a deferred
    trigger that sleeps, before the commit record is written): PostgreSQL
    rolls the batch back, and its calls are not_applied, nothing of them
    in the store."""
    monkeypatch.setattr(upkeep_module, "RECONNECT_BACKOFF_S_MAX", 0.2)
    sleeping = ("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
                "AND wait_event = 'PgSleep'")

    async def main():
        async with stored(pg_url) as (store, c):
            assert await c.mod("a", 10) == (10, 1)
            conn = await asyncpg.connect(pg_url)
            try:
                await conn.execute(
                    "CREATE FUNCTION probe_sleep() RETURNS trigger LANGUAGE plpgsql AS "
                    "$$BEGIN PERFORM pg_sleep(600); RETURN NULL; END$$; "
                    "CREATE CONSTRAINT TRIGGER probe_sleep AFTER UPDATE ON accman_accounts "
                    "DEFERRABLE INITIALLY DEFERRED FOR EACH ROW EXECUTE FUNCTION probe_sleep()")
                call = asyncio.ensure_future(c.mod("a", -3, key="k1"))
                await until_async(lambda: count(pg_url, sleeping), 1)
                await conn.execute("SELECT pg_cancel_backend(pid) FROM pg_stat_activity "
                                   "WHERE wait_event = 'PgSleep'")
                with pytest.raises(NotApplied) as told:
                    await call
                assert "cancelled the batch's statement" in told.value.detail
                await conn.execute("DROP TRIGGER probe_sleep ON accman_accounts")
            finally:
                await conn.close()
            await until(lambda: store.healthy, 15)
            assert await c.tot("a") == 10
            assert [e.seq for e in (await c.past("a")).entries] == [1]
            assert await c.mod("a", -3, key="k1") == (7, 2)
    run(main())


def test_a_commit_on_a_connection_found_closed_is_not_sent(pg_url):
    """committed() on a connection already closed (the database's side
    closed it, its close not yet heard) sends nothing: E.NotSent, which a
    batch is told as not_applied, its call never started (no coroutine
    left unawaited)."""
    async def main():
        conn = await asyncpg.connect(pg_url, connection_class=Connection)
        await conn.execute("CREATE TABLE t (x int)")
        await conn.close()
        async def attempt():
            try:
                await committed(conn, conn.execute("INSERT INTO t VALUES (1)"), 5, set())
            except E.NotSent as e:
                # What the store makes of it; the error, and the frames
                # that held the call, go as the block ends.
                return E.commit_error(e, E.classify(e)), E.classify(e)
            raise AssertionError("sent on a closed connection")
        gc.collect()        # what earlier tests left (their unclosed loops) is not judged
        with warnings.catch_warnings(record=True) as said:
            warnings.simplefilter("always")
            told, kind = await attempt()
            gc.collect()
        assert [str(w.message) for w in said] == []
        assert isinstance(told, NotApplied) and "found closed" in told.detail
        assert kind == E.UNKNOWN            # the store reconnects
        assert await count(pg_url, "SELECT count(*) FROM t") == 0
    run(main())


def test_a_cut_wait_is_heard_on_a_pooled_connection(pg_factory):
    """committed() on a pool's connection (the upkeep's, a copy's, a
    trim's) hears the cut wait as a writer's does, and leaves no listener
    behind for the pool to complain of at its release."""
    pg, standby, url = with_standby(pg_factory, "pooled", "p")
    pg.psql("CREATE TABLE t (x int)", "p")
    standby.stop("immediate")

    async def main():
        pool = await asyncpg.create_pool(url, min_size=1, max_size=1,
                                         connection_class=Connection, init=identify)
        try:
            with warnings.catch_warnings(record=True) as said:
                warnings.simplefilter("always")
                async with pool.acquire() as conn:
                    call = asyncio.ensure_future(committed(
                        conn, conn.execute("INSERT INTO t VALUES (1)"), 30, set()))
                    await until_async(lambda: waiting_for_standby(url), 1)
                    await cancel_standby_waits(url)
                    with pytest.raises(E.Unreplicated):
                        await call
                    assert await committed(conn, conn.fetchval("SELECT count(*) FROM t"),
                                           5, None) == 1
            assert [str(w.message) for w in said] == []
        finally:
            await pool.close()
    run(main())


def test_a_stalled_expiry_is_neither_seen_nor_let_past(pg_factory, monkeypatch, caplog):
    """A due hold's end that waits for a missing standby: past
    ROUND_TIMEOUT_S its connection is dropped, the cluster is unhealthy
    and stays so while that backend waits, and nothing of the end is seen
    (the balance, the events) until the standby has it.  The loss is said
    as AccMan's deadline, not as a driver's error met closing again the
    connection that the deadline closed."""
    caplog.set_level("WARNING", logger="accman.postgres")
    monkeypatch.setattr(committing, "COMMIT_TIMEOUT_S", 1.0)
    monkeypatch.setattr(upkeep_module, "ROUND_TIMEOUT_S", 1.0)
    monkeypatch.setattr(upkeep_module, "EXPIRE_INTERVAL_S", 0.1)
    monkeypatch.setattr(upkeep_module, "RECONNECT_BACKOFF_S_MAX", 0.2)
    primary, standby, url = with_standby(pg_factory, "expiry", "e")

    async def main():
        async with stored(url) as (store, c):
            assert await c.mod("a", 10) == (10, 1)
            assert await c.hold("a", -4, 1) == (2, 6, 2)
            standby.stop("immediate")
            await until(lambda: "still waits" in (store.unhealthy_detail or ""), 15)
            assert await backends_busy(url) == 1
            assert await count(url, "SELECT max(id) FROM accman_events") == 2
            assert await c.tot("a") == 6
            await asyncio.sleep(1.0)
            assert not store.healthy                # reconnection tries: still stalled
            standby.start()
            await until(lambda: store.healthy, 15)
            assert await c.tot("a") == 10
            events, _ = await c.events(after=2)
            assert [(e.type, e.by, e.hold) for e in events] == [("expire", 4, 2)]
    run(main())
    said = [r.getMessage() for r in caplog.records]
    assert not [line for line in said if "InterfaceError" in line or "asyncpg" in line], said


def test_a_stalled_copy_of_events_is_not_seen_on_the_home(pg_factory, monkeypatch):
    """The merger's commit on the home (events of another cluster given
    the store's next ids) waits for the home's missing standby: past
    MERGE_TIMEOUT_S its connection is dropped and its backend noted, and
    the copied events are not readable until the standby has them."""
    monkeypatch.setattr(merge_module, "MERGE_TIMEOUT_S", 1.0)

    async def main():
        async with two_clusters_home_standby(pg_factory, "merge") as (store, c, standby, far):
            home_url = store.home.url
            standby.stop("immediate")
            assert await c.mod(far, 5) == (5, 1)    # commits on the other cluster
            await until(lambda: store.home.abandoned, 10)
            await asyncio.sleep(0.5)
            assert await count(home_url, "SELECT count(*) FROM accman_events") == 0
            assert await backends_busy(home_url) == 1
            assert not store.home.healthy
            standby.start()
            await until(lambda: store.healthy, 15)
            events, _ = await c.events()
            assert [(e.type, e.by) for e in events] == [("mod", 5)]
    run(main())


def test_a_read_with_nothing_new_to_copy_commits_nothing(pg_factory, monkeypatch):
    """A copy that finds nothing new rolls back its row lock: a read of
    /events on a store of two clusters answers what is there while the
    home's synchronous standby is away, where a commit would wait for it
    past MERGE_TIMEOUT_S and the home would be taken for lost."""
    monkeypatch.setattr(merge_module, "MERGE_TIMEOUT_S", 1.0)

    async def main():
        async with two_clusters_home_standby(pg_factory, "empty") as (store, c, standby, far):
            assert await c.mod(far, 5) == (5, 1)
            events, _ = await c.events()                    # copied, the standby there
            standby.stop("immediate")
            for _ in range(3):
                again, _ = await asyncio.wait_for(c.events(), 5)
                assert again == events
            assert await waiting_for_standby(store.home.url) == 0
            assert store.home.healthy and not store.home.abandoned
            standby.start()
    run(main())


def test_a_trim_past_trim_timeout_s_is_given_up_and_the_next_goes_on(pg_url, monkeypatch,
                                                                     caplog):
    """TRIM_TIMEOUT_S: a trim the database does not answer in time is given
    up (its connection closed, never its statement cancelled), said in the
    log, and the cluster stays healthy (a trim holds no row a writer
    needs); the next trim goes on."""
    monkeypatch.setattr(events_module, "TRIM_TIMEOUT_S", 0.5)

    async def main():
        async with stored(pg_url) as (store, c):
            for _ in range(3):
                await c.mod("a", 1)
            reader = store.home.events
            async with locked(pg_url, "accman_cursors"):
                await reader.trim(0)
                assert "trimming events failed" in caplog.text
                assert await backends_busy(pg_url) == 1
            assert store.healthy and not store.home.abandoned
            assert await c.mod("b", 1) == (1, 1)
            await reader.trim(0)
            assert reader.trimmed == 3 and reader.first == 4
    run(main())


def test_a_cursor_save_past_its_deadline_is_not_seen_on_the_primary(pg_factory, monkeypatch):
    """A cursor's save (the webhook's) that waits for the missing standby
    past CURSOR_TIMEOUT_S fails, its connection closed rather than its
    commit cancelled: the saved value stays unseen until the standby has
    it, where a cancel made it visible on the primary alone, to be lost in
    a failover (and the events after it sent again)."""
    monkeypatch.setattr(cursors_module, "CURSOR_TIMEOUT_S", 0.5)
    primary, standby, url = with_standby(pg_factory, "cursor", "k")

    async def main():
        async with stored(url) as (store, _):
            await store.cursors.save_cursor("webhook", 2)
            standby.stop("immediate")
            with pytest.raises(StoreError, match="cannot save the webhook cursor"):
                await store.cursors.save_cursor("webhook", 5)
            await asyncio.sleep(0.5)                # a cancel request would have landed
            assert await waiting_for_standby(url) == 1
            assert await count(url, "SELECT value FROM accman_cursors") == 2
            standby.start()
            await until_async(lambda: count(url, "SELECT value FROM accman_cursors"), 5, 15)
    run(main())


def test_a_store_opens_while_its_synchronous_standby_is_away(pg_factory):
    """Opening a store already at SCHEMA_VERSION commits nothing: a
    front-end (re)started while its synchronous standby is away serves,
    reads going on and writes stalled as a running front-end's are, rather
    than hang at its start, unsaid, in a commit that waits for the standby."""
    pg, standby, url = with_standby(pg_factory, "away", "a")
    run(fund(url, ["a"]))
    standby.stop("immediate")

    async def main():
        assert await count(url, "SELECT count(*) FROM pg_stat_replication") == 0
        store, c = await asyncio.wait_for(opened(url), 5)
        try:
            assert await c.tot("a") == 5
        finally:
            await store.aclose()
    run(main())


def test_a_store_opens_with_holds_due_while_its_synchronous_standby_is_away(
        pg_factory, monkeypatch):
    """Holds that fell due while no front-end ran are ended at the open, a
    commit that waits for the standby: past ROUND_TIMEOUT_S its connection
    is closed and the front-end serves reads, unhealthy, the hold's end
    unseen until the standby is back (docs/SCALING.md)."""
    monkeypatch.setattr(upkeep_module, "ROUND_TIMEOUT_S", 1.0)
    monkeypatch.setattr(upkeep_module, "RECONNECT_BACKOFF_S_MAX", 0.2)
    pg, standby, url = with_standby(pg_factory, "due", "d")

    async def hold():
        async with stored(url) as (_, c):
            assert await c.mod("a", 10) == (10, 1)
            assert await c.hold("a", -4, 1) == (2, 6, 2)
        await asyncio.sleep(1.5)                    # past the hold's ttl, nobody running
    run(hold())
    standby.stop("immediate")

    async def main():
        store, c = await asyncio.wait_for(opened(url), 30)
        try:
            assert not store.healthy
            await until(lambda: "still waits" in (store.unhealthy_detail or ""), 15)
            assert await c.tot("a") == 6
            await asyncio.sleep(1.0)
            assert not store.healthy                # reconnection tries: still stalled
            standby.start()
            await until(lambda: store.healthy, 15)
            assert await c.tot("a") == 10
            events, _ = await c.events(after=2)
            assert [(e.type, e.by, e.hold) for e in events] == [("expire", 4, 2)]
        finally:
            await store.aclose()
    run(main())
