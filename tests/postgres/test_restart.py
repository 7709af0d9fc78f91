"""PostgreSQL restarted under a front-end faster than an upkeep round
(`pg_ctl restart`, a quick switchover): the round, which reads through the
pool, finds a database that answers, yet every session the front-end held
open (its writer, its listener) went with the restart.  The front-end
notices each such close itself, as it happens, idle or not; a listener
ended alone is made again without touching the writer."""

import asyncio
import re
import time

import pytest

from accman.errors import Unavailable

from .helpers import opened, run

# A long poll's wait: one a new event answers is told from one that waited
# it out by far more than a loaded machine's stalls.
POLL_WAIT_S = 30


async def until(pred, timeout_s, what):
    deadline = time.monotonic() + timeout_s
    while not pred():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0.02)


async def restarted(pg):
    """Stops and starts `pg` with the loop held (pg_ctl runs in this thread):
    nothing of the store's runs between the two, as nothing would within a
    round of a quick restart."""
    pg.stop("fast")
    pg.start()
    await asyncio.sleep(0.2)            # the loop reads its sockets again


async def written(c, cred, by):
    """A mod on `c` sent again until it is taken (its first try may meet a
    session the restart closed), as a client retries a 503."""
    deadline = time.monotonic() + 10
    while True:
        try:
            return await c.mod(cred, by)
        except Unavailable:
            assert time.monotonic() < deadline, "no write taken after the restart"
            await asyncio.sleep(0.1)


def test_a_quick_restart_leaves_the_first_write_after_it_taken(pg_factory, caplog):
    """SPEC "Routes": /health is 200 while the service can commit.  The
    writer's session closed by the restart is noticed when it closes, and
    the store reconnects by itself: the first write after the restart
    commits, not 503 "the connection broke during the commit" for a batch
    sent on a socket already closed (while /health said 200 all along)."""
    caplog.set_level("WARNING", logger="accman.postgres")
    pg = pg_factory(name="quick")
    url = pg.create_database("q")

    async def main():
        store, c = await opened(url)
        try:
            assert await c.mod("a", 5) == (5, 1)
            await restarted(pg)
            await until(lambda: store.healthy and not store.clusters[0].reconnecting, 10,
                        "reconnected after the restart")
            assert store.clusters[0].losses >= 1        # noticed, with no write
            assert await c.mod("a", 1) == (6, 2)
        finally:
            await store.aclose()
    run(main())
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 2 and re.fullmatch(
        r"the PostgreSQL store lost its connection \(ConnectionDoesNotExistError at \S+:\d+\); "
        r"writes are refused until the store has reconnected", said[0]), said
    assert said[1] == "reconnected to the PostgreSQL store; taking writes again", said


def test_a_long_poll_hears_another_front_end_after_a_quick_restart(pg_factory):
    """SPEC "Events": a long poll is answered when an event comes.  The
    listener's session closed by the restart is made again: a poll on a
    front-end that writes nothing itself hears another's commit at once,
    not at the end of its wait."""
    pg = pg_factory(name="heard")
    url = pg.create_database("h")

    async def main():
        s1, c1 = await opened(url)
        s2, c2 = await opened(url)
        try:
            await restarted(pg)
            for s in (s1, s2):
                await until(lambda s=s: s.healthy and not s.clusters[0].reconnecting, 10,
                            "reconnected after the restart")
            await written(c2, "x", 5)
            last = (await c1.events(after=0))[1]
            poll = asyncio.ensure_future(c1.events(after=last, wait_s=POLL_WAIT_S))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            assert await c2.mod("x", 5) == (10, 2)
            events, nxt = await asyncio.wait_for(poll, POLL_WAIT_S + 10)
            assert [(e.seq, e.tot) for e in events] == [(2, 10)] and nxt == last + 1
            assert time.monotonic() - t0 < POLL_WAIT_S / 2, "the poll waited out its wait"
        finally:
            await s1.aclose()
            await s2.aclose()
    run(main())


def test_a_write_while_the_database_is_down_says_nothing_was_applied(pg_factory):
    """A batch made after the writer's session has closed is never sent:
    its 503 says nothing of it was applied (a keyless mod needs no check),
    not that it may have been."""
    pg = pg_factory(name="down")
    url = pg.create_database("d")

    async def main():
        store, c = await opened(url)
        try:
            assert await c.mod("a", 5) == (5, 1)
            pg.stop("fast")
            await asyncio.sleep(0.1)
            with pytest.raises(Unavailable) as told:
                await c.mod("a", 1)
            said = told.value.detail
            assert said.startswith("the store cannot commit, nothing of this call was "
                                   "applied: the PostgreSQL store "), said
            assert not store.healthy
            pg.start()
            await until(lambda: store.healthy, 10, "reconnected after the start")
            assert await c.mod("a", 1) == (6, 2)
        finally:
            await store.aclose()
    run(main())


def test_a_listener_ended_alone_is_made_again_and_leaves_writes_alone(pg_url):
    """The listener's backend ended by itself (pg_terminate_backend, an
    idle_session_timeout): the listener is made again at once, and a poll
    hears another front-end's commit; the writer, which may have a batch
    in flight, is left as it is, and the store stays healthy."""
    async def main():
        s1, c1 = await opened(pg_url)
        s2, c2 = await opened(pg_url)
        try:
            cluster = s1.clusters[0]
            writer, listener = cluster.lanes[0].writer, cluster.events.listener
            assert await c1.mod("x", 5) == (5, 1)
            await s2.clusters[0].pool.execute("SELECT pg_terminate_backend($1)",
                                              listener.get_server_pid())
            await until(lambda: cluster.events.listener not in (None, listener), 10,
                        "the listener made again")
            assert cluster.lanes[0].writer is writer and cluster.losses == 0
            assert s1.healthy
            poll = asyncio.ensure_future(c1.events(after=1, wait_s=POLL_WAIT_S))
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            assert await c2.mod("x", 5) == (10, 2)
            events, nxt = await asyncio.wait_for(poll, POLL_WAIT_S + 10)
            assert [(e.seq, e.tot) for e in events] == [(2, 10)] and nxt == 2
            assert time.monotonic() - t0 < POLL_WAIT_S / 2, "the poll waited out its wait"
            assert await c1.mod("x", 1) == (11, 3)
        finally:
            await s1.aclose()
            await s2.aclose()
    run(main())
