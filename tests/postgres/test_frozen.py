"""A PostgreSQL that does not answer (its processes stopped with SIGSTOP,
as a host cut off without a reset would look): a read is answered 503
within READ_TIMEOUT_S (SCALING.md, "Bounds"), on a pooled connection,
whose timed-out query's return to the pool waits for the cancel's
answer, and on a new one, whose connect would wait for the driver's own
timeout (60 s): each waited as long as the database was stopped."""

import asyncio
import contextlib
import os
import signal
import subprocess
import time
from pathlib import Path

import pytest

from accman.errors import Unavailable
from accman.postgres import backends as backends_module
from accman.postgres import committing
from accman.postgres import store as store_module
from accman.postgres import upkeep as upkeep_module

from .helpers import run, stored
from .test_bounds import until

# How long a test waits for what a timeout of a second or a few must bring
# while the database is stopped: short of the driver's own timeout (60 s),
# long past the one the test sets, so that a loaded machine does not fail it.
FROZEN_WAIT_S = 20
# Beyond CLOSE_TIMEOUT_S, for a close on a loaded machine: far short of the
# read's timeout (READ_TIMEOUT_S, 10 s) that a release passes on.
CLOSE_SLACK_S = 2.0


@contextlib.contextmanager
def frozen(pg):
    """`pg`'s postmaster and its processes stopped (SIGSTOP) in the block.
    The postmaster first, then the children it has: listed before it
    stopped, a backend it forked meanwhile (a pool's new connection) would
    run on and answer.  Whatever happens, those stopped are continued."""
    pids = [pg.pid]
    try:
        _signal(pg.pid, signal.SIGSTOP)
        _until_stopped(pg.pid)
        kids = subprocess.run(["pgrep", "-P", str(pg.pid)], capture_output=True,
                              text=True).stdout.split()
        pids += map(int, kids)
        for pid in pids[1:]:
            _signal(pid, signal.SIGSTOP)
        yield
    finally:
        # The children first: the postmaster, once running, reaps those
        # that had already exited (pgrep lists them until it does).
        for pid in reversed(pids):
            _signal(pid, signal.SIGCONT)


# How long a stopped postmaster may take to be seen stopped: it is at once
# on an idle machine; a loaded one may not run the signal's delivery soon.
STOP_SEEN_WAIT_S = 10


def _until_stopped(pid: int) -> None:
    """Until `pid` is stopped ('T', or 't' under a tracer): a fork it was
    making when stopped is made, or not begun until it runs again."""
    deadline = time.monotonic() + STOP_SEEN_WAIT_S
    while (state := _state(pid)) not in ("T", "t"):
        assert state not in ("Z", "X", None), f"the postmaster {pid} ended (state {state})"
        assert time.monotonic() < deadline, f"the postmaster {pid} did not stop ({state})"
        time.sleep(0.001)


def _state(pid: int) -> str | None:
    """The process's state letter (/proc/PID/stat), or None once it is gone."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except FileNotFoundError:
        return None


def _signal(pid: int, sig) -> None:
    """`sig` to `pid`, unless it has ended (an exiting backend, reaped)."""
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, sig)


async def unanswered(read):
    """`read` refused by its own timeout (READ_TIMEOUT_S, set low), well
    before the driver's connect timeout (60 s) or the database's return
    would answer it: FROZEN_WAIT_S tells them apart on a loaded machine."""
    with pytest.raises(Unavailable, match="did not answer in time"):
        await asyncio.wait_for(read(), FROZEN_WAIT_S)


def test_reads_are_503_within_read_timeout_s_when_the_database_does_not_answer(
        pg_factory, monkeypatch):
    monkeypatch.setattr(store_module, "READ_TIMEOUT_S", 1.0)
    pg = pg_factory(name="frozen")
    url = pg.create_database("f")

    async def main():
        async with stored(url) as (store, c):
            assert await c.mod("a", 5) == (5, 1)
            assert await c.tot("a") == 5
            reads = (lambda: c.tot("a"), lambda: c.past("a"), lambda: c.events(after=0))
            with frozen(pg):
                # On a connection of the pool: its query times out, and its
                # return to the pool waits for the cancel's answer.
                await unanswered(reads[0])
                # Its idle connections closed (as an upkeep round's abandoned
                # one is): each read connects anew.
                await store.clusters[0].pool.expire_connections()
                for read in reads:
                    await unanswered(read)
            assert await c.tot("a") == 5
    run(main())


def test_a_round_frozen_in_its_counts_read_loses_the_cluster_in_time(
        pg_factory, monkeypatch):
    """The upkeep round is the store's heartbeat (/health 503 within a
    round of the database going away, idle or not).  Frozen while the
    round reads its counts, the read times out at ROUND_TIMEOUT_S and its
    connection is closed, not given back to the pool, whose return would
    wait for the cancel's answer as long as the database is stopped: the
    cluster is lost in time, with no write to notice it."""
    monkeypatch.setattr(upkeep_module, "ROUND_TIMEOUT_S", 1.0)
    monkeypatch.setattr(upkeep_module, "EXPIRE_INTERVAL_S", 0.1)
    # The counts read, made slow enough to be caught in flight.
    monkeypatch.setattr(upkeep_module, "_COUNTS_SQL", "SELECT c FROM ("
                        + upkeep_module._COUNTS_SQL + ") q(c), pg_sleep(0.2)")
    pg = pg_factory(name="frozenround")
    url = pg.create_database("r")

    async def main():
        async with stored(url) as (store, c):
            assert await c.mod("a", 5) == (5, 1)
            await until(lambda: pg.psql(
                "SELECT count(*) FROM pg_stat_activity WHERE query LIKE 'SELECT c FROM (%' "
                "AND state = 'active'", "r") == "1", 10,
                lambda: "the counts read was never seen in flight")
            with frozen(pg):
                await until(lambda: not store.healthy, FROZEN_WAIT_S, _tasks_said)
    run(main())


def _tasks_said() -> str:
    """The running loop's tasks and where each waits: what held the round
    (this test failed now and then in whole runs, its cause not seen)."""
    import io
    out = io.StringIO()
    for task in asyncio.all_tasks():
        task.print_stack(limit=6, file=out)
    return f"still healthy after {FROZEN_WAIT_S} s; the tasks:\n{out.getvalue()}"


def test_a_past_behind_writes_frozen_on_the_writer_leaves_the_writes_after_it_refused(
        pg_factory, monkeypatch):
    """A /past pipelined behind a connection's writes reads on the writer,
    after their commit.  Frozen there, it is 503 within READ_TIMEOUT_S and
    the writer's connection is closed: the writes queued behind it are
    refused as not applied, at once, not sent on a connection whose
    timed-out query waits for the cancel's answer (and then answered as of
    unknown outcome at COMMIT_TIMEOUT_S); a read queued behind them is
    refused as a read."""
    monkeypatch.setattr(store_module, "READ_TIMEOUT_S", 1.0)
    # Within FROZEN_WAIT_S: the writes' answer once their commit times out
    # (unknown outcome) is told apart from their refusal by its words.
    monkeypatch.setattr(committing, "COMMIT_TIMEOUT_S", 10.0)
    pg = pg_factory(name="frozen-past")
    url = pg.create_database("fp")

    async def main():
        async with stored(url) as (store, c):
            assert await c.mod("a", 5) == (5, 1)
            loop = asyncio.get_running_loop()
            page, after, page2 = (loop.create_future() for _ in range(3))
            with frozen(pg):
                store.read_past("a", 10, None, page.set_result, ordered=True)
                store.submit("a", -1, done=after.set_result)
                store.read_past("a", 10, None, page2.set_result, ordered=True)
                got = await asyncio.wait_for(page, FROZEN_WAIT_S)
                assert isinstance(got, Unavailable), got
                refused = await asyncio.wait_for(after, FROZEN_WAIT_S)
                assert isinstance(refused, Unavailable), refused
                assert "nothing of this call was applied" in refused.detail, refused.detail
                unread = await asyncio.wait_for(page2, FROZEN_WAIT_S)     # a read: said as one
                assert isinstance(unread, Unavailable), unread
                assert unread.detail.startswith("the database cannot be read: "), unread.detail
            await until(lambda: store.healthy, 20)
            assert await c.tot("a") == 5
    run(main())


def test_closes_are_bounded_when_the_database_does_not_answer(pg_factory, monkeypatch):
    """backends.CLOSE_TIMEOUT_S: a pooled connection that a reconnection
    expired (Cluster.connect) is closed at its release, and that close,
    to a database that does not answer, ends within the bound and raises
    nothing into the release; so does every close of the store's own
    (writer, pool, listener), so that a store stops in time."""
    monkeypatch.setattr(backends_module, "CLOSE_TIMEOUT_S", 0.5)
    pg = pg_factory(name="frozen-close")
    url = pg.create_database("fc")

    async def main():
        async with stored(url) as (store, c):
            assert await c.mod("a", 5) == (5, 1)
            pool = store.clusters[0].pool
            # As a read takes one (backends.pool_read): the release then
            # passes the acquire's timeout on to the close.
            conn = await pool.acquire(timeout=store_module.READ_TIMEOUT_S)
            with frozen(pg):
                await pool.expire_connections()
                t0 = time.monotonic()
                await asyncio.wait_for(pool.release(conn), FROZEN_WAIT_S)
                took_s = time.monotonic() - t0
                assert took_s < backends_module.CLOSE_TIMEOUT_S + CLOSE_SLACK_S, took_s
                await asyncio.wait_for(store.aclose(), FROZEN_WAIT_S)
    run(main())
