"""The PostgreSQL store's fill wait (accman.postgres.committing FILL_*):
after a commit, the next batch waits until most of the calls that were in
flight are queued, loop turn after loop turn, for at most the fill wait;
one call at a time never waits."""

import asyncio
import time

from accman.postgres import committing

from .helpers import run, stored

IN_FLIGHT = 10


async def _one_batch(store, c):
    """IN_FLIGHT concurrent calls, one batch; the fill target after it is
    int(FILL_FRACTION * IN_FLIGHT)."""
    await asyncio.gather(*(c.mod(f"f{i}", 5) for i in range(IN_FLIGHT)))
    assert store.drain_samples()[0][-1:] == [IN_FLIGHT]


def test_the_next_batch_waits_for_the_calls_in_flight(pg_url):
    """Calls arriving alone after a batch wait, turn after turn, and go
    in one batch with the call that makes the target."""
    target = int(committing.FILL_FRACTION * IN_FLIGHT)
    assert 2 < target < IN_FLIGHT

    async def main():
        async with stored(pg_url) as (store, c):
            store.fill_wait_s = 60.0            # the target decides, not the clock
            await _one_batch(store, c)
            early = [asyncio.ensure_future(c.mod("g", 1)) for _ in range(target - 1)]
            await asyncio.sleep(0.3)            # many round trips' time
            waiting = [t.done() for t in early], store.batches
            last = asyncio.ensure_future(c.mod("g", 1))
            got = await asyncio.wait_for(asyncio.gather(*early, last), 10)
            return waiting, store.batches, got, store.drain_samples()[0]

    (done_then, batches_then), batches, got, sizes = run(main())
    assert done_then == [False] * (target - 1)
    assert batches == batches_then + 1
    assert sorted(seq for _, seq in got) == list(range(1, target + 1))
    assert sizes == [target]


def test_a_batch_that_does_not_fill_goes_after_the_fill_wait(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            store.fill_wait_s = 0.2
            await _one_batch(store, c)
            t0 = time.perf_counter()
            got = await asyncio.wait_for(asyncio.gather(c.mod("g", 1), c.mod("g", 1)), 10)
            return got, time.perf_counter() - t0, store.drain_samples()[0]

    got, waited_s, sizes = run(main())
    assert sorted(got) == [(1, 1), (2, 2)]
    assert waited_s >= 0.2
    assert sizes == [2]


def test_one_call_at_a_time_never_waits_to_fill(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            store.fill_wait_s = 60.0            # a wait would time the test out
            got = [await asyncio.wait_for(c.mod("one", 1), 10) for _ in range(20)]
            return got, store.drain_samples()[0]

    got, sizes = run(main())
    assert got == [(i, i) for i in range(1, 21)]
    assert sizes == [1] * 20
