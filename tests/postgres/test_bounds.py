"""The PostgreSQL store's own bounds (accman/postgres/store.py), each
reached; and what a lost or stalled database does to calls and health."""

import asyncio
import contextlib
import re
import socket
import time

import asyncpg
import pytest

from accman.errors import Busy, NoAccount, NotApplied, StoreError, Unavailable
from accman.postgres import PgStore
from accman.postgres.migrate import migrate
from accman.postgres import cluster as cluster_module
from accman.postgres import complaints as complaints_module
from accman.postgres import connecting
from accman.postgres import committing
from accman.postgres import store as store_module
from accman.postgres import upkeep as upkeep_module

from .helpers import locked, opened, run, stored
from .pgcluster import free_port


def test_batch_mods_max(pg_url):
    async def main():
        async with stored(pg_url, batch_mods_max=3) as (store, c):
            await c.mod("a", 1)
            store.drain_samples()
            got = await asyncio.gather(*(c.mod("a", 1) for _ in range(10)))
            assert sorted(s for _, s in got) == list(range(2, 12))
            sizes, times = store.drain_samples()
            assert max(sizes) == 3 and sum(sizes) == 10 and len(times) == len(sizes)
    run(main())


def test_read_batch_and_queue_bounds(pg_url, monkeypatch):
    monkeypatch.setattr(store_module, "READ_BATCH_MAX", 2)
    monkeypatch.setattr(store_module, "QUEUED_READS_MAX", 5)

    async def main():
        async with stored(pg_url) as (store, c):
            await asyncio.gather(*(c.mod(f"r{i}", i + 1) for i in range(5)))
            reads = [asyncio.ensure_future(c.tot(f"r{i}")) for i in range(5)]
            await asyncio.sleep(0)
            with pytest.raises(Busy, match=r"^QUEUED_READS_MAX \(5\) reads are waiting"):
                store.read_tot("r0", done=print)
            assert await asyncio.gather(*reads) == [1, 2, 3, 4, 5]
    run(main())


def test_cred_cache_bound(pg_url, monkeypatch):
    monkeypatch.setattr(store_module, "CRED_CACHE_MAX", 2)

    async def main():
        async with stored(pg_url) as (store, c):
            for i in range(5):
                await c.mod(f"c{i}", i + 1)
                assert len(store._creds) <= 2
            assert [await c.tot(f"c{i}") for i in range(5)] == [1, 2, 3, 4, 5]
    run(main())


async def until(pred, timeout_s, what=lambda: "timed out"):
    """Waits for `pred()`; past `timeout_s`, fails saying `what()`."""
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, what()
        await asyncio.sleep(0.02)


def test_lost_database_then_reconnect(pg_factory, monkeypatch):
    monkeypatch.setattr(upkeep_module, "RECONNECT_BACKOFF_S_MAX", 0.2)
    pg = pg_factory(name="flaky")
    url = pg.create_database("f")

    async def main():
        async with stored(url) as (store, c):
            assert await c.mod("a", 5, key="k") == (5, 1)
            pg.kill()
            with pytest.raises(Unavailable):
                await c.mod("a", 1, key="k2")         # outcome unknown: not acknowledged
            assert not store.healthy
            with pytest.raises(Unavailable, match="^the store cannot commit, nothing of this "
                                                  "call was applied: "):
                store.submit("a", 1, None, None, done=print)   # refused at once
            with pytest.raises(Unavailable, match="^the database cannot be read: "):
                store.read_tot("a", print, ordered=True)       # in order behind changes
            await asyncio.sleep(0.5)                 # backoff reaches its maximum
            pg.start()
            await until(lambda: store.healthy, 5 * upkeep_module.RECONNECT_BACKOFF_S_MAX + 5)
            assert await c.mod("a", 1, key="k2") == (6, 2)
            assert await c.mod("a", 5, key="k") == (5, 1)
    run(main())


def with_sync_standby(pg_factory, monkeypatch, name):
    """A primary and its synchronous standby, a database on it, and a
    COMMIT_TIMEOUT_S of 1 s: (standby, url)."""
    monkeypatch.setattr(committing, "COMMIT_TIMEOUT_S", 1.0)
    primary = pg_factory(name=name)
    return primary.add_standby(name + "_standby", sync=True), primary.create_database("s")


def test_stalled_commit_is_not_acknowledged(pg_factory, monkeypatch):
    """A primary whose synchronous standby is gone never finishes a commit:
    the batch is answered Unavailable after COMMIT_TIMEOUT_S, never 200.
    A long poll waiting meanwhile reads again when the cluster is taken as
    lost, finds the events still readable, and waits on."""
    standby, url = with_sync_standby(pg_factory, monkeypatch, "lonely")

    async def main():
        async with stored(url) as (store, c):
            assert await c.mod("a", 5) == (5, 1)
            poll = asyncio.ensure_future(c.events(after=1, wait_s=30))
            await asyncio.sleep(0.3)
            standby.stop("immediate")
            with pytest.raises(Unavailable):
                await c.mod("a", 1)
            await asyncio.sleep(0.3)
            assert not poll.done(), poll.result()
            standby.start()
            await until(lambda: store.healthy, 10)
            # The stalled mod committed on the primary once the standby came
            # back: outcome unknown was the honest answer.  Its key-less
            # retry would apply twice; keyed retries are what clients use.
            assert (await c.mod("a", 1, key="after"))[0] in (6, 7)
            events, _ = await asyncio.wait_for(poll, 10)
            assert events[0].id == 2
    run(main())


async def backends_busy(url) -> int:
    """The database's backends in a statement that waits: a writer that
    waits for its standby (SyncRep), or for a lock behind one.  A short
    read of a front-end's (its counts, a reconnection's checks) caught in
    its statement on a busy machine is not one."""
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND state = 'active' AND pid <> pg_backend_pid() "
            "AND (wait_event = 'SyncRep' OR wait_event_type = 'Lock')")
    finally:
        await conn.close()


def test_a_stalled_commit_stops_writes_until_it_ends(pg_factory, monkeypatch, caplog):
    """A batch past COMMIT_TIMEOUT_S is unknown (503) and its connection
    dropped; its backend, waiting for the standby with its accounts' locks,
    does not notice.  The store takes no writes there until that backend
    ends: later calls are refused unsent (not one more backend each until
    max_connections), /health names the cause, and the stalled commit is
    not made visible by ending it."""
    standby, url = with_sync_standby(pg_factory, monkeypatch, "alone")

    async def main():
        async with stored(url) as (store, c):
            assert await c.mod("a", 5) == (5, 1)
            standby.stop("immediate")
            with pytest.raises(Unavailable):
                await c.mod("a", 1, key="k")
            await asyncio.sleep(1.5)            # reconnection tries, backoff
            assert not store.healthy and "still waits" in store.unhealthy_detail
            assert sum("still waits" in r.message for r in caplog.records) == 1   # said once
            for n in range(3):
                with pytest.raises(Unavailable, match="nothing of this call was applied"):
                    await c.mod("b", 1, key=f"b{n}")
            assert await backends_busy(url) == 1
            assert await c.tot("a") == 5        # the stalled commit is not seen
            standby.start()
            await until(lambda: store.healthy, 15)
            assert await c.mod("a", 1, key="k") == (6, 2)      # it had committed
            assert await c.mod("b", 1, key="b0") == (1, 1)     # the refused were not
    run(main())


def test_read_pool_bound(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            await asyncio.gather(*(c.mod(f"p{i}", 1) for i in range(20)))
            pages = await asyncio.gather(*(c.past(f"p{i}") for i in range(20)))
            assert all(p.entries[0].tot == 1 for p in pages)
            assert store.clusters[0].pool.get_size() == cluster_module.READ_POOL_CONNECTIONS_MAX
    run(main())


def test_two_write_lanes_keep_each_account_in_order(pg_url, monkeypatch):
    monkeypatch.setattr(cluster_module, "WRITE_LANES", 2)

    async def main():
        async with stored(pg_url) as (store, c):
            assert len(store.clusters[0].lanes) == 2
            creds = [f"l{i}" for i in range(16)]
            await asyncio.gather(*(c.mod(x, 100) for x in creds))
            lanes = {store.clusters[0].lane(store._locate(x)[0]) for x in creds}
            assert len(lanes) == 2                      # both lanes carry accounts
            got = await asyncio.gather(*(c.mod(x, -1) for x in creds for _ in range(5)))
            assert got == [(100 - n, 1 + n) for _ in creds for n in range(1, 6)]
    run(main())


async def queries_waiting(url, like="%") -> int:
    """The queries (LIKE `like`) that wait for a lock in the database."""
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE wait_event_type = 'Lock' "
            "AND query LIKE $1", like)
    finally:
        await conn.close()


def tot_queries_waiting(url):
    return queries_waiting(url, "SELECT array_agg(a.tot%")


def test_a_second_tot_query_goes_out_while_one_waits(pg_url):
    """READ_BATCHES_MAX: while a /tot query waits in the database, the reads
    queued behind it go as a second one, and no more than that: a third
    read waits for one of them.  All are answered once the database is."""
    assert cluster_module.READ_BATCHES_MAX == 2
    assert cluster_module.READ_POOL_CONNECTIONS_MAX == 3

    async def main():
        async with stored(pg_url) as (store, c):
            await asyncio.gather(*(c.mod(f"t{i}", i + 1) for i in range(3)))
            async with locked(pg_url, "accman_accounts"):
                reads = [asyncio.ensure_future(c.tot("t0"))]
                await until_async(lambda: tot_queries_waiting(pg_url), 1)
                reads.append(asyncio.ensure_future(c.tot("t1")))
                await until_async(lambda: tot_queries_waiting(pg_url), 2)
                reads.append(asyncio.ensure_future(c.tot("t2")))
                await asyncio.sleep(0.3)
                assert await tot_queries_waiting(pg_url) == 2
                assert not any(r.done() for r in reads)
                # A /past page has a connection of its own beside them (it
                # waits for the same lock, as a query of its own).
                page = asyncio.ensure_future(c.past("t0"))
                await until_async(lambda: queries_waiting(pg_url), 3)
            assert await asyncio.gather(*reads) == [1, 2, 3]
            assert [e.tot for e in (await page).entries] == [1]
    run(main())


async def until_async(count, want, timeout_s=10):
    deadline = time.monotonic() + timeout_s
    while (got := await count()) != want:
        assert time.monotonic() < deadline, f"{got} of {want} within {timeout_s} s"
        await asyncio.sleep(0.02)


def test_a_read_that_waits_past_read_timeout_s_is_unavailable(pg_url, monkeypatch):
    """READ_TIMEOUT_S: a /tot or /past that the database does not answer in
    time is 503 unavailable, not a wait without end; the next is served."""
    monkeypatch.setattr(store_module, "READ_TIMEOUT_S", 0.5)

    async def main():
        async with stored(pg_url) as (store, c):
            assert await c.mod("a", 5) == (5, 1)
            async with locked(pg_url, "accman_accounts"):
                # Within 5 s each (wait_for), or the bound did not hold.
                with pytest.raises(Unavailable, match="did not answer in time"):
                    await asyncio.wait_for(c.tot("a"), 5)
                with pytest.raises(Unavailable, match="did not answer in time"):
                    await asyncio.wait_for(c.past("a"), 5)
            assert await c.tot("a") == 5
            assert (await c.past("a")).entries[0].tot == 5
            assert store.healthy                      # a slow read is not a lost database
    run(main())


def test_an_upkeep_round_past_round_timeout_s_marks_the_cluster_lost(pg_url, monkeypatch):
    """ROUND_TIMEOUT_S: a round of upkeep (due holds, the counts) that the
    database does not answer in time leaves its outcome unknown: the cluster
    is unhealthy (/health 503) until the store has reconnected."""
    monkeypatch.setattr(upkeep_module, "ROUND_TIMEOUT_S", 0.5)
    monkeypatch.setattr(upkeep_module, "EXPIRE_INTERVAL_S", 0.1)
    monkeypatch.setattr(upkeep_module, "RECONNECT_BACKOFF_S_MAX", 0.2)

    async def main():
        async with stored(pg_url) as (store, c):
            assert await c.mod("a", 5) == (5, 1)
            async with locked(pg_url, "accman_counter"):
                await until(lambda: not store.healthy, 10)
                assert "did not answer in time" in store.clusters[0].error
            await until(lambda: store.healthy, 10)
            assert await c.mod("a", 1) == (6, 2)
    run(main())


def test_a_refusal_s_detail_names_no_file_of_the_database():
    """SPEC "Access": an error's detail names no file path.  A full disk's
    message names a data file of PostgreSQL's; the detail keeps the rest."""
    import asyncpg

    from accman.postgres import errors as E
    e = asyncpg.exceptions.DiskFullError(
        'could not extend file "pg_tblspc/16961/PG_15_202209061/16962/16995": '
        "No space left on device")
    error = E.commit_error(e, E.classify(e))
    assert error.detail == ("the database refused the batch, nothing of it was applied: "
                            "PostgreSQL 53100: could not extend file (a path): No space left "
                            "on device")
    assert isinstance(error, NotApplied)


def test_a_cluster_lost_again_while_it_reconnects_is_reconnected(pg_url, monkeypatch):
    """A batch refused while the reconnection restarts the listener marks
    the cluster lost during the reconnection, which starts no other one:
    the reconnection goes on instead of ending with the cluster down."""
    async def main():
        async with stored(pg_url) as (store, c):
            assert await c.mod("a", 1) == (1, 1)
            cluster = store.home
            restart, lost_again = cluster.events.restart, []

            async def restart_then_refused():
                await restart()
                if not lost_again:
                    lost_again.append(True)
                    store.lost(cluster, RuntimeError("a batch refused meanwhile"))
            monkeypatch.setattr(cluster.events, "restart", restart_then_refused)
            store.lost(cluster, RuntimeError("the first loss"))
            deadline = time.monotonic() + 10
            while not (cluster.healthy and not cluster.reconnecting):
                assert time.monotonic() < deadline, cluster.error
                await asyncio.sleep(0.05)
            assert lost_again and await c.mod("a", 1) == (2, 2)
    run(main())


MAY_HAVE_LANDED = ("nothing in this batch was acknowledged and it may have been applied: "
                   "a mod or hold sent again with its key, or a settle repeated, gets its "
                   "first reply")


@pytest.mark.parametrize("exc,says", [
    (asyncio.TimeoutError(), "the database did not answer the commit in time; "
                             + MAY_HAVE_LANDED),
    (ConnectionResetError(), "the connection to the database broke during the commit; "
                             + MAY_HAVE_LANDED),
    (ValueError("a reply that did not decode"),
     "the commit failed in AccMan (ValueError); " + MAY_HAVE_LANDED),
])
def test_a_batch_whose_outcome_is_unknown_is_never_said_unapplied(exc, says):
    """Only the database's own refusal says "nothing applied": a timeout, a
    broken connection or an error on AccMan's side may follow a commit, so
    their detail asks for a retry with the key, and their error is no
    NotApplied (a client would take it for a call it may send again
    without its key, and a hold it owes no release)."""
    from accman.postgres import errors as E
    error = E.commit_error(exc, E.classify(exc))
    assert error.detail == says
    assert type(error) is Unavailable


@pytest.mark.parametrize("option,value,says", [
    ("batch_mods_max", 4097, "batch_mods_max must be an int from 1 to 4096, got 4097"),
    ("holds_max", 0, "holds_max must be an int from 1 to 1000000, got 0"),
    ("retention_s", float("inf"), "events_retention_s must be a number of seconds"),
    ("low_default", 2 ** 63, "low_balance must be an int in the signed 64-bit range"),
])
def test_a_wrong_option_is_refused_before_any_cluster_is_reached(option, value, says):
    """As the embedded Ledger's (tests/test_ledger.py): the same check, the
    same words.  Nothing listens at this URL: reaching for it first would
    be a StoreError."""
    with pytest.raises(ValueError, match=f"^{says}"):
        run(PgStore.open(["postgresql://127.0.0.1:1/none"], **{option: value}))


def test_upkeep_that_fails_every_round_is_said_once_and_its_end_once(pg_url, monkeypatch,
                                                                      caplog):
    """A round's failure that is not an outage (here accman_expire dropped
    by hand; in life a full disk) leaves the cluster healthy and is logged
    when it starts, every COMPLAINT_REPEAT_S while it lasts, and once when
    it ends: not a line a round."""
    monkeypatch.setattr(upkeep_module, "EXPIRE_INTERVAL_S", 0.05)
    monkeypatch.setattr(complaints_module, "COMPLAINT_REPEAT_S", 0.6)
    caplog.set_level("WARNING", logger="accman.postgres")

    def said():
        return [r.getMessage() for r in caplog.records if "ending due holds" in r.getMessage()]

    async def main():
        async with stored(pg_url) as (store, c):
            admin = await asyncpg.connect(pg_url)
            try:
                await admin.execute("ALTER FUNCTION accman_expire(integer) RENAME TO away")
                await until(lambda: len(said()) >= 3, 10)      # the start and two repeats
                assert store.healthy and await c.mod("a", 5) == (5, 1)
                await admin.execute("ALTER FUNCTION away(integer) RENAME TO accman_expire")
                await until(lambda: said()[-1] == "ending due holds works again", 10)
                await asyncio.sleep(0.3)                       # more rounds, all working
            finally:
                await admin.close()
        lines = said()
        assert lines[0].startswith("ending due holds failed (retried): PostgreSQL 42883: "
                                   "function accman_expire(integer) does not exist")
        repeats = lines[1:-1]
        assert repeats and all(re.match(r"ending due holds still fails \(\d+ more times "
                                        r"in \d+ s\): PostgreSQL 42883", r) for r in repeats)
        rounds = sum(int(re.search(r"\((\d+) more", r).group(1)) for r in repeats)
        assert rounds >= 2 * len(repeats)                   # each line stood for several rounds
        assert lines.count("ending due holds works again") == 1
    run(main())


def test_a_url_that_finds_no_primary_is_refused_in_the_store_s_words(pg, pg_url):
    """target_session_attrs=read-write (SCALING.md's layout) with no host
    that takes writes (mid-failover): a StoreError that says so, not the
    driver's TargetServerAttributeNotMatched."""
    run(migrate([pg_url]))
    dbname = pg_url.rsplit("/", 1)[1]
    pg.psql(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    with pytest.raises(StoreError, match=r"^cannot connect to a PostgreSQL cluster of the "
                       r"store: the PostgreSQL store cannot be reached \(no host of the store "
                       r"URL takes writes\)$"):
        run(PgStore.open([pg_url + "?target_session_attrs=read-write"]))


def test_a_primary_down_beside_a_standby_is_said_as_no_host_taking_writes(pg, pg_url):
    """SCALING.md's failover: the primary's host refuses connections and the
    other host is a standby (here read-only).  The driver raises the down
    host's ConnectionRefusedError, which was said `(connection refused)`,
    as if no database were up; it is `(no host of the store URL takes
    writes)`, as the docs say, whichever host the URL names first."""
    run(migrate([pg_url]))
    dbname = pg_url.rsplit("/", 1)[1]
    pg.psql(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    up, down = f"127.0.0.1:{pg.port}", f"127.0.0.1:{free_port()}"
    for hosts in (f"{down},{up}", f"{up},{down}"):
        url = f"postgresql://postgres@{hosts}/{dbname}?target_session_attrs=read-write"
        with pytest.raises(StoreError, match=r"cannot be reached \(no host of the store "
                           r"URL takes writes\)$"):
            run(PgStore.open([url]))


def _writes_and_reads(url):
    """A store opened on `url` takes a mod, and reads it back."""
    async def main():
        async with stored(url) as (_, c):
            assert await c.mod("w", 5) == (5, 1)
            assert await c.tot("w") == 5
    run(main())


def _read_only_twin(pg_url, pg_factory, name):
    """The database of `pg_url` on a cluster of its own, read-only, as a
    standby takes no writes: its name, and that cluster."""
    dbname = pg_url.rsplit("/", 1)[1]
    twin = pg_factory(name=name)
    twin.create_database(dbname)
    twin.psql(f'ALTER DATABASE "{dbname}" SET default_transaction_read_only = on')
    return dbname, twin


def test_a_url_of_several_hosts_takes_the_one_that_takes_writes(pg, pg_url, pg_factory):
    """SCALING.md's URL names every host of a cluster.  One that leaves out
    target_session_attrs took the first host that answered, a standby
    perhaps (here a read-only database listed first), and the store never
    opened, its writes refused on every try: read-write is the default for
    several hosts, and reads go to the primary too."""
    run(migrate([pg_url]))
    dbname, standby_like = _read_only_twin(pg_url, pg_factory, "ro-host")
    url = f"postgresql://postgres@127.0.0.1:{standby_like.port},127.0.0.1:{pg.port}/{dbname}"
    _writes_and_reads(url)


def test_hosts_of_pghost_take_the_one_that_takes_writes(pg, pg_url, pg_factory, monkeypatch):
    """A URL that names no host takes PGHOST's, a list of several as a URL's
    own (libpq's and asyncpg's rule): a read-only host listed first there
    was taken with `any`, and `any` given with them was not refused."""
    run(migrate([pg_url]))
    dbname, standby_like = _read_only_twin(pg_url, pg_factory, "ro-pghost")
    monkeypatch.setenv("PGHOST", "127.0.0.1,127.0.0.1")
    monkeypatch.setenv("PGPORT", f"{standby_like.port},{pg.port}")
    url = f"postgresql://postgres@/{dbname}"
    _writes_and_reads(url)
    with pytest.raises(StoreError, match="target_session_attrs=any cannot be used"):
        run(PgStore.open([url + "?target_session_attrs=any"]))


@pytest.mark.parametrize("attrs,hosts", [
    ("standby", 1), ("read-only", 1), ("prefer-standby", 2), ("any", 2),
])
def test_a_url_that_may_take_a_standby_is_refused(pg, pg_url, attrs, hosts):
    """A URL whose target_session_attrs can take a host other than the
    primary (`any` of several hosts takes whichever answers first) is
    refused at open, saying which setting and why, not met later as writes
    refused on a standby or reads that lag."""
    dbname = pg_url.rsplit("/", 1)[1]
    url = (f"postgresql://postgres@{','.join([f'127.0.0.1:{pg.port}'] * hosts)}/{dbname}"
           f"?target_session_attrs={attrs}")
    with pytest.raises(StoreError, match=rf"^cannot connect to a PostgreSQL cluster of the "
                       rf"store: target_session_attrs={attrs} cannot be used: AccMan writes "
                       rf"on a cluster's primary .* leave it out or give read-write$"):
        run(PgStore.open([url]))


def test_the_session_attrs_of_the_environment_are_checked_as_the_url_s(pg_url, monkeypatch):
    """PGTARGETSESSIONATTRS stands in for a URL that names none."""
    monkeypatch.setenv("PGTARGETSESSIONATTRS", "standby")
    with pytest.raises(StoreError, match="target_session_attrs=standby cannot be used"):
        run(PgStore.open([pg_url]))


def test_any_of_one_host_is_taken(pg_url):
    """One host is the one there is: `any` (libpq's default) takes it."""
    run(migrate([pg_url]))

    async def main():
        async with stored(pg_url + "?target_session_attrs=any") as (_, c):
            assert await c.mod("one", 2) == (2, 1)
    run(main())


def test_a_host_that_does_not_answer_leaves_the_next_host_of_the_url_tried(pg, pg_url,
                                                                           monkeypatch):
    """SCALING.md: after a failover a front-end finds the new primary by
    itself.  With the old primary's host cut off (here a socket that never
    answers) listed before it, asyncpg spent its whole connect timeout on
    that host and never tried the next: serve refused to start, a running
    front-end never reconnected.  Each host now has the timeout to itself."""
    monkeypatch.setattr(connecting, "CONNECT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(cluster_module, "CONNECT_TIMEOUT_S", 0.5)
    run(migrate([pg_url]))         # made on the host that answers: not the URL's first
    dbname = pg_url.rsplit("/", 1)[1]
    with socket.socket() as hole:
        hole.bind(("127.0.0.1", free_port()))
        hole.listen(16)                     # connections queue; nothing answers
        hosts = f"127.0.0.1:{hole.getsockname()[1]},127.0.0.1:{pg.port}"
        url = f"postgresql://postgres@{hosts}/{dbname}?target_session_attrs=read-write"

        async def main():
            async with stored(url) as (_, c):
                assert await c.mod("cut", 5) == (5, 1)
                assert await c.tot("cut") == 5
        run(main())


@pytest.mark.parametrize("form", ["host=", "PGHOST"])
def test_a_host_list_outside_the_authority_leaves_the_next_host_tried(pg, pg_url, monkeypatch,
                                                                       form):
    """A URL's hosts may be listed in its host= parameter, or in PGHOST when
    it names none (libpq's forms): asyncpg, given them, spent its whole
    connect timeout on a host cut off listed first and never tried the
    next.  They are tried one at a time, as the authority's are."""
    monkeypatch.setattr(connecting, "CONNECT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(cluster_module, "CONNECT_TIMEOUT_S", 0.5)
    run(migrate([pg_url]))         # made on the host that answers: not the URL's first
    dbname = pg_url.rsplit("/", 1)[1]
    with _hole() as hole:
        hosts, ports = "127.0.0.1,127.0.0.1", f"{hole.getsockname()[1]},{pg.port}"
        url = f"postgresql://postgres@/{dbname}"
        if form == "host=":
            url += f"?host={hosts}&port={ports}"
        else:
            monkeypatch.setenv("PGHOST", hosts)
            monkeypatch.setenv("PGPORT", ports)

        async def main():
            async with stored(url) as (_, c):
                assert await c.mod("cut", 5) == (5, 1)
                assert await c.tot("cut") == 5
        run(main())


def _hole():
    """A host cut off: a socket that takes connections and never answers."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", free_port()))
    hole.listen(16)                         # connections queue; nothing answers
    return hole


def test_a_host_that_does_not_answer_has_the_next_tried_beside_it(pg, pg_url, monkeypatch):
    """SCALING.md: with the host first in line cut off (at start, or the
    old primary remembered as the host that last took a connection, after
    a failover), a new connection waited CONNECT_TIMEOUT_S on it before
    trying the next: a start took 10 s, and a read needing a new pool
    connection was 503 at READ_TIMEOUT_S without trying the next host.  The
    next host is tried once the first has not answered within
    NEXT_HOST_AFTER_S, the timeouts themselves unchanged."""
    monkeypatch.setattr(connecting, "NEXT_HOST_AFTER_S", 0.2)
    assert connecting.CONNECT_TIMEOUT_S == store_module.READ_TIMEOUT_S == 10
    run(migrate([pg_url]))         # made on the host that answers: not the URL's first
    dbname = pg_url.rsplit("/", 1)[1]
    with _hole() as hole:
        cut = f"127.0.0.1:{hole.getsockname()[1]}"
        url = (f"postgresql://postgres@{cut},127.0.0.1:{pg.port}/{dbname}"
               "?target_session_attrs=read-write")

        async def main():
            began = time.monotonic()
            async with stored(url) as (store, c):
                assert time.monotonic() - began < connecting.CONNECT_TIMEOUT_S / 2
                assert await c.mod("cut", 5) == (5, 1)
                # As after a failover: the cut-off host is the one that last
                # took a connection, and the read pool connects anew.
                connecting._last_host[url] = url.replace(f"{cut},127.0.0.1:{pg.port}", cut)
                await store.clusters[0].pool.expire_connections()
                began = time.monotonic()
                assert await c.tot("cut") == 5
                assert time.monotonic() - began < connecting.CONNECT_TIMEOUT_S / 2
        run(main())


def test_a_host_slower_than_next_host_after_s_is_still_taken(pg, pg_url, monkeypatch):
    """The next host tried beside a slow one ends no attempt: a primary
    that answers after NEXT_HOST_AFTER_S, beside a host that refuses, is
    connected to, within its CONNECT_TIMEOUT_S."""
    monkeypatch.setattr(connecting, "NEXT_HOST_AFTER_S", 0.1)
    dbname = pg_url.rsplit("/", 1)[1]

    async def late(reader, writer):
        await asyncio.sleep(0.5)            # then a plain relay to the database
        up_r, up_w = await asyncio.open_connection("127.0.0.1", pg.port)

        async def relay(src, dst):
            with contextlib.suppress(OSError):
                while data := await src.read(65536):
                    dst.write(data)
                    await dst.drain()
            dst.close()
        await asyncio.gather(relay(reader, up_w), relay(up_r, writer))

    async def main():
        slow = await asyncio.start_server(late, "127.0.0.1", free_port())
        async with slow:
            hosts = f"127.0.0.1:{slow.sockets[0].getsockname()[1]},127.0.0.1:{free_port()}"
            url = f"postgresql://postgres@{hosts}/{dbname}?target_session_attrs=read-write"
            conn = await connecting.connect(url)
            try:
                assert await conn.fetchval("SELECT current_database()") == dbname
            finally:
                await conn.close()
    run(main())


def test_a_reconnection_is_healthy_only_once_its_listener_is_back(pg_url, monkeypatch, caplog):
    """Between the writer's connection and the listener's, the store is not
    healthy yet (/health 503, writes refused): a listener that fails then
    would otherwise leave a server that said 200 and took writes, then
    went back to 503 without a line, and "reconnected" said late or never."""
    monkeypatch.setattr(upkeep_module, "RECONNECT_BACKOFF_S_MAX", 0.1)
    caplog.set_level("WARNING", logger="accman.postgres")

    async def main():
        async with stored(pg_url) as (store, c):
            cluster = store.clusters[0]
            gate = asyncio.Event()
            real = cluster.events.restart

            async def held():
                await gate.wait()
                await real()
            monkeypatch.setattr(cluster.events, "restart", held)
            store.lost(cluster, ConnectionResetError(104, "reset"))
            await until(lambda: cluster.lanes[0].writer is not None, 10)
            await asyncio.sleep(0.2)
            assert not store.healthy
            with pytest.raises(Unavailable):
                await c.mod("a", 1)
            gate.set()
            await until(lambda: store.healthy, 10)
            assert await c.mod("a", 1) == (1, 1)
    run(main())
    said = [r.getMessage() for r in caplog.records]
    assert said[-1] == "reconnected to the PostgreSQL store; taking writes again"


def test_a_close_tells_every_read_it_leaves_unanswered(pg_url, monkeypatch):
    """/tot reads queued, and reads whose queries are in flight (two, at
    the close), and /past reads in flight, when the store closes: each
    caller is told once, and at once, before the cancelled queries'
    connections are cleaned up."""
    monkeypatch.setattr(store_module, "READ_BATCH_MAX", 4)

    async def main():
        store, _ = await opened(pg_url)
        await store.clusters[0].pool.execute("SELECT 1")
        told = {}
        for i in range(20):                 # five queries' worth, of 4 reads
            assert store.read_tot("nobody", lambda o, i=i: told.setdefault(i, []).append(o)) \
                is None
        for i in range(20, 23):
            assert store.read_past("nobody", 10, None,
                                   lambda o, i=i: told.setdefault(i, []).append(o)) is None
        for _ in range(3):                  # the first queries leave
            await asyncio.sleep(0)
        flying = store.clusters[0].reads_flying
        await store.aclose()
        return told, flying
    told, flying = run(main())
    assert flying > 0, "no /tot query was in flight at the close"
    assert sorted(told) == list(range(23)) and all(len(o) == 1 for o in told.values())
    codes = [told[i][0].code for i in range(23)]
    assert set(codes) <= {"no_account", "unavailable"} and "unavailable" in codes[:20]
    assert "unavailable" in codes[20:], "no /past query was in flight at the close"


def test_a_close_with_no_cluster_healthy_tells_the_calls_still_queued(pg_url):
    """Calls queued when their cluster is lost and the store then closes,
    before their writer ran: each is told once that the store is closed,
    none applied, and that it was not (NotApplied: never sent)."""
    async def main():
        store, c = await opened(pg_url)
        told = []
        for i in range(3):
            store.submit(f"q{i}", 5, done=told.append)
        store.lost(store.clusters[0], ConnectionResetError())
        await store.aclose()
        return told
    told = run(main())
    assert [(type(o), o.detail) for o in told] == [(NotApplied, "the store is closed")] * 3

    async def after():
        async with stored(pg_url) as (_, c):
            for i in range(3):
                with pytest.raises(NoAccount):
                    await c.tot(f"q{i}")
    run(after())


@pytest.mark.parametrize("flying", ["batch", "ordered past"])
def test_a_close_with_no_cluster_healthy_tells_what_flies_on_its_lane(pg_url, flying):
    """A batch whose commit waits (its table locked from outside), or an
    ordered /past whose query does, when the cluster is lost and the store
    then closes: each call is told once, at the close; the batch that its
    outcome is unknown, so that its keyed retry gets the original reply."""
    from accman.postgres import errors as E

    async def main():
        async with stored(pg_url) as (_, c):
            await c.mod("p", 5)
        store, _ = await opened(pg_url)
        told = []
        async with locked(pg_url, "accman_accounts"):
            if flying == "batch":
                for i in range(3):
                    store.submit(f"f{i}", 5, key="k", done=told.append)
            else:
                store.read_past("p", 10, None, told.append, ordered=True)
            await asyncio.sleep(0.3)
            assert told == [], "the call was answered before the lock was let go"
            store.lost(store.clusters[0], ConnectionResetError())
            await store.aclose()
        return told
    told = run(main())
    says = E.CLOSED_MID_COMMIT if flying == "batch" else "the store is closed"
    assert [(type(o), o.detail) for o in told] == [(Unavailable, says)] * len(told)
    assert len(told) == (3 if flying == "batch" else 1)

    async def retried():
        async with stored(pg_url) as (_, c):
            return [await c.mod(f"f{i}", 5, key="k") for i in range(3)]
    if flying == "batch":                   # applied or not, the retry's reply is the first's
        assert run(retried()) == [(5, 1)] * 3


def test_a_fault_of_accman_s_in_a_committed_batch_s_reply_tells_each_caller(pg_url,
                                                                            monkeypatch):
    """A bug of AccMan's in reading a committed batch's reply leaves no
    caller waiting: each is told once that the commit failed in AccMan and
    to retry with its key, which then gets the batch's reply; the lane's
    writer goes on with the next batch."""
    from accman.postgres import batch as batch_module

    def broken(*args):
        raise ValueError("a reply that did not decode")

    async def main():
        async with stored(pg_url) as (store, c):
            told = []
            with monkeypatch.context() as m:
                m.setattr(batch_module, "outcome", broken)
                for i in range(3):
                    store.submit(f"b{i}", 5, key="k", done=told.append)
                await until(lambda: len(told) >= 3, 5)
                await asyncio.sleep(0.05)       # a second telling would come now
            return told, [await c.mod(f"b{i}", 5, key="k") for i in range(3)]
    told, retried = run(main())
    assert [(type(o), o.detail) for o in told] == [(
        Unavailable, "the commit failed in AccMan (ValueError); " + MAY_HAVE_LANDED)] * 3
    assert retried == [(5, 1)] * 3


def test_a_close_tells_every_long_poll_whose_read_it_cancels(pg_url):
    """Long polls whose reads are held up (the events' table locked from
    outside) when the store closes: one waiting, whose wake-up read runs,
    and one in its first read.  Each is told once that the store is
    closing, not left waiting for a read the close cancelled; a read after
    the close is refused."""
    async def main():
        store, c = await opened(pg_url)
        await c.mod("a", 5)
        events, told = store.home.events, {}

        def poll(name, after):
            store.read_events(after, 100, 30, lambda o: told.setdefault(name, []).append(o))
        poll("waiting", 1)
        await until(lambda: len(events.waiters) == 1, 5)
        async with locked(pg_url, "accman_events"):
            events.local_commit()           # its wake-up read waits on the lock
            poll("first", 0)                # its first read too
            await until(lambda: not events.waiters, 5)
            await asyncio.sleep(0.3)
            assert told == {}
            await store.aclose()
            await asyncio.sleep(0.2)        # a second answer would come by now
        return store, told
    store, told = run(main())
    assert {k: [(type(o), str(o)) for o in v] for k, v in told.items()} == {
        "waiting": [(Unavailable, "the store is closing")],
        "first": [(Unavailable, "the store is closing")]}
    with pytest.raises(Unavailable, match="the store is closed"):
        store.read_events(0, 100, 30, lambda _o: None)


def test_a_poll_ended_as_the_store_closes_is_told_once(pg_url):
    """end_wait (its client gone) and the close in one loop turn: the poll
    is told once, by the close, not lost with a read the close cancelled
    before it began."""
    async def main():
        store, c = await opened(pg_url)
        await c.mod("a", 5)
        told = []
        done = told.append                  # one object: end_wait finds the poll by it
        store.read_events(1, 100, 30, done)
        await until(lambda: len(store.home.events.waiters) == 1, 5)
        store.end_wait(done)
        await store.aclose()
        await asyncio.sleep(0.2)
        return told
    told = run(main())
    assert [(type(o), str(o)) for o in told] == [(Unavailable, "the store is closing")]


async def reads_waiting_for_a_lock(url) -> int:
    conn = await asyncpg.connect(url)
    try:
        return await conn.fetchval(
            "SELECT count(*) FROM pg_stat_activity WHERE datname = current_database() "
            "AND wait_event_type = 'Lock' AND query LIKE '%FROM accman_events%'")
    finally:
        await conn.close()


@pytest.mark.parametrize("read", ["first", "wake-up"])
def test_a_poll_ended_while_its_read_runs_is_answered_as_it_ends(pg_url, read):
    """end_wait (its client gone: a half-close) while the poll's read is in
    the database (its first read, or one a commit's notification woke;
    accman_events locked by hand): the poll is answered as that read ends,
    with what there is, not at its deadline."""
    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 5)
            told = asyncio.get_running_loop().create_future()
            done = told.set_result          # one object: end_wait finds the poll by it
            if read == "wake-up":
                store.read_events(1, 100, 30, done)
                await until(lambda: len(store.home.events.waiters) == 1, 5)
            async with locked(pg_url, "accman_events"):
                if read == "first":
                    store.read_events(1, 100, 30, done)
                else:
                    await notify_commit(pg_url)
                await until_async(lambda: reads_waiting_for_a_lock(pg_url), 1)
                store.end_wait(done)
            return await asyncio.wait_for(told, 5)
    assert run(main()) == ([], 1)


async def notify_commit(url):
    """A commit's notification, as another front-end's would come."""
    conn = await asyncpg.connect(url)
    try:
        await conn.execute("NOTIFY accman_events, '1'")
    finally:
        await conn.close()


@pytest.mark.parametrize("setting", ["off", "local", "remote_apply"])
def test_commits_are_durable_whatever_the_database_sets(pg, pg_url, setting):
    """SPEC "Durability and order": a 200 is on disk.  A database set to
    synchronous_commit = off (a crash loses recent commits) or anything
    else is `on` on the writer's and the pool's connections, across the
    pool's resets."""
    run(migrate([pg_url]))
    dbname = pg_url.rsplit("/", 1)[1]
    pg.psql(f'ALTER DATABASE "{dbname}" SET synchronous_commit = {setting}')

    async def main():
        plain = await asyncpg.connect(pg_url)
        try:
            assert await plain.fetchval("SHOW synchronous_commit") == setting
        finally:
            await plain.close()
        async with stored(pg_url) as (store, c):
            assert await c.mod("a", 5) == (5, 1)
            cluster = store.clusters[0]
            assert await c.tot("a") == 5                    # the pool has a connection
            return (await cluster.lanes[0].writer.fetchval("SHOW synchronous_commit"),
                    await cluster.pool.fetchval("SHOW synchronous_commit"),
                    await cluster.pool.fetchval("SHOW synchronous_commit"))
    assert run(main()) == ("on", "on", "on")


@pytest.mark.parametrize("setting", ["fsync", "full_page_writes"])
def test_a_server_whose_commits_do_not_survive_a_crash_takes_no_writes(pg_factory, setting):
    """A session cannot set these: a store on a server run with either off
    is refused at open, saying which, and so is `accman migrate`, before
    either writes anything there (the schema and its key were made, then
    the open refused: a black-box probe)."""
    pg = pg_factory(name=f"undurable_{setting}", conf={setting: "off"})
    url = pg.create_database("u")
    refused = rf"the PostgreSQL server runs with {setting} = off: its commits do not survive"
    with pytest.raises(StoreError, match=refused):
        run(PgStore.open([url]))
    with pytest.raises(StoreError, match=refused):
        run(migrate([url]))
    assert pg.psql("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'accman%'", "u") == "0"
