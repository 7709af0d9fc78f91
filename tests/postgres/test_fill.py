"""The PostgreSQL store's fill wait (accman.postgres.committing FILL_*):
on a store of one cluster, after a commit the next batch waits until most
of the calls that were in flight are queued (never more than
FILL_TARGET_MAX, nor than a batch takes), loop turn after loop turn, for
at most the fill wait, and not once the cluster is lost or the store is
closing; one call at a time never waits, nor a store of two clusters,
nor a call that comes long after the commit that set the target, nor
the next few after a wait that ran out."""

import asyncio
import time

import pytest

from accman.errors import NotApplied, NoAccount
from accman.ledger import fill
from accman.postgres import committing

from .helpers import locked, opened, run, stored, two_clusters

IN_FLIGHT = 10
LONG_WAIT_S = 2.0       # longer than the test looks: the target decides, not the clock


async def _one_batch(store, c, creds):
    """A batch of one call on each of `creds`, all at once."""
    await asyncio.gather(*(c.mod(cred, 5) for cred in creds))
    assert store.drain_samples()[0][-1:] == [len(creds)]



def _waits(store, fill_wait_s, target_ttl_s=60.0):
    """Every lane's fill wait at `fill_wait_s`, its target kept however
    slow the test's turns (target_ttl_s long) unless told otherwise."""
    for cluster in store.clusters:
        for lane in cluster.lanes:
            lane.fill.wait_s = fill_wait_s
            lane.fill.target_ttl_s = target_ttl_s


async def _two_waiting(store, c):
    """After a batch of IN_FLIGHT, two calls that wait to fill: what they
    are told."""
    await _one_batch(store, c, [f"f{i}" for i in range(IN_FLIGHT)])
    told = []
    for _ in range(2):
        store.submit("g", 1, done=told.append)
    for _ in range(10):
        await asyncio.sleep(0)          # the writer is waiting to fill
    return told

async def _waits_for(store, c, target, cred):
    """`target` - 1 calls on `cred` queued at once, then after a pause one
    more, which sends them: whether the first were still waiting, the
    batches the last one made, the outcomes, and the batch sizes."""
    early = [asyncio.ensure_future(c.mod(cred, 1)) for _ in range(target - 1)]
    batches = store.batches
    await asyncio.sleep(0.3)            # many round trips' time
    waiting = [t.done() for t in early]
    t0 = time.perf_counter()
    last = asyncio.ensure_future(c.mod(cred, 1))
    got = await asyncio.wait_for(asyncio.gather(*early, last), 10)
    assert time.perf_counter() - t0 < LONG_WAIT_S / 2      # the target sent it, not the clock
    return waiting, store.batches - batches, got, store.drain_samples()[0]


@pytest.mark.parametrize("target_max", [None, 4], ids=["fraction", "target_max"])
def test_the_next_batch_waits_for_its_target(pg_url, target_max):
    """Calls queued after a batch wait, loop turn after loop turn, and go
    in one batch with the call that makes the target: nine in ten of the
    calls in flight at the commit, or FILL_TARGET_MAX where that is fewer."""
    fraction = int(committing.FILL_FRACTION * IN_FLIGHT)
    target = fraction if target_max is None else target_max
    assert 2 < target < IN_FLIGHT and target <= fraction

    async def main():
        async with stored(pg_url) as (store, c):
            _waits(store, LONG_WAIT_S)
            if target_max is not None:
                store.fill_target_max = target_max
            await _one_batch(store, c, [f"f{i}" for i in range(IN_FLIGHT)])
            return await _waits_for(store, c, target, "g")

    waiting, batches, got, sizes = run(main())
    assert waiting == [False] * (target - 1)
    assert batches == 1
    assert sorted(seq for _, seq in got) == list(range(1, target + 1))
    assert sizes == [target]


def test_the_target_is_never_more_than_a_batch_takes(pg_url):
    """With batch_mods_max 3 and 10 calls queued at once, the batch after
    the first goes at once: the target asks for no more than 3 queued."""
    async def main():
        async with stored(pg_url, batch_mods_max=3) as (store, c):
            _waits(store, LONG_WAIT_S)
            told = []
            for i in range(IN_FLIGHT):
                store.submit(f"m{i}", 5, done=told.append)
            await asyncio.sleep(LONG_WAIT_S / 2)
            answered_then = len(told)
            deadline = time.monotonic() + 10
            while len(told) < IN_FLIGHT and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            return answered_then, told, store.drain_samples()[0]

    answered_then, told, sizes = run(main())
    assert answered_then >= 6
    assert told == [(5, 1)] * IN_FLIGHT
    assert max(sizes) == 3 and sum(sizes) == IN_FLIGHT


def test_a_store_of_two_clusters_never_waits_to_fill(pg, pg_factory):
    """After a batch on one cluster of two, the next call on it goes at
    once, however many the batch held."""
    _, urls = two_clusters(pg, pg_factory, "fill")

    async def main():
        async with stored(urls) as (store, c):
            _waits(store, 60.0)             # a wait would time the test out
            home = [f"h{i}" for i in range(200) if store._locate(f"h{i}")[1] is store.home]
            await _one_batch(store, c, home[:IN_FLIGHT])
            got = await asyncio.wait_for(c.mod(home[IN_FLIGHT], 1), 10)
            return got, store.drain_samples()[0]

    got, sizes = run(main())
    assert got == (1, 1)
    assert sizes == [1]


def test_a_target_left_from_long_ago_is_not_waited_for(pg_url):
    """A lone call that comes the target's ttl after the commit that set
    the target goes at once: the callers the target counted are gone."""
    async def main():
        async with stored(pg_url) as (store, c):
            _waits(store, 60.0, target_ttl_s=0.05)  # a wait would time the test out
            await _one_batch(store, c, [f"f{i}" for i in range(IN_FLIGHT)])
            await asyncio.sleep(0.2)            # an idle spell past the target's ttl
            got = await asyncio.wait_for(c.mod("g", 1), 10)
            return got, store.drain_samples()[0]

    got, sizes = run(main())
    assert got == (1, 1)
    assert sizes == [1]


def test_a_target_left_from_long_ago_spends_no_skip(pg_url):
    """After a miss, a lone call on a stale target goes at once and keeps
    the lane's skip for a batch that would have waited."""
    async def main():
        async with stored(pg_url) as (store, c):
            _waits(store, 60.0, target_ttl_s=0.05)  # a wait would time the test out
            lane = store.clusters[0].lanes[0]
            await _one_batch(store, c, [f"f{i}" for i in range(IN_FLIGHT)])
            lane.fill._skips = 1                # as a miss leaves it, with one skip
            await asyncio.sleep(0.2)            # an idle spell past the target's ttl
            await asyncio.wait_for(c.mod("g", 1), 10)
            return lane.fill._skips

    assert run(main()) == 1


def test_a_wait_begun_within_the_target_s_ttl_outlasts_it(pg_url):
    """The ttl decides whether a wait begins, not how long it runs: a call
    that comes at once after the batch waits past the ttl, and goes with
    the calls that make the target."""
    target = int(committing.FILL_FRACTION * IN_FLIGHT)

    async def main():
        async with stored(pg_url) as (store, c):
            _waits(store, 1.0, target_ttl_s=0.05)
            await _one_batch(store, c, [f"f{i}" for i in range(IN_FLIGHT)])
            first = asyncio.ensure_future(c.mod("g", 1))
            await asyncio.sleep(0.2)            # past the ttl, within the wait
            waiting = not first.done()
            rest = [asyncio.ensure_future(c.mod("g", 1)) for _ in range(target - 1)]
            got = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
            return waiting, got, store.drain_samples()[0]

    waiting, got, sizes = run(main())
    assert waiting
    assert sorted(seq for _, seq in got) == list(range(1, target + 1))
    assert sizes == [target]


def test_a_batch_that_does_not_fill_goes_after_the_fill_wait(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            _waits(store, 0.2)
            await _one_batch(store, c, [f"f{i}" for i in range(IN_FLIGHT)])
            t0 = time.perf_counter()
            got = await asyncio.wait_for(asyncio.gather(c.mod("g", 1), c.mod("g", 1)), 10)
            return got, time.perf_counter() - t0, store.drain_samples()[0]

    got, waited_s, sizes = run(main())
    assert sorted(got) == [(1, 1), (2, 2)]
    assert waited_s >= 0.2
    assert sizes == [2]


def test_after_a_fill_wait_runs_out_the_next_ones_are_not_begun(pg_url):
    """Callers that do not come back in step let a fill wait run out (a
    miss): the next FILL_SKIPS_AFTER_MISS batches short of their target go
    at once; the one after waits again, and a wait that reaches its target
    is no miss."""
    skips = fill.FILL_SKIPS_AFTER_MISS
    target = int(committing.FILL_FRACTION * IN_FLIGHT)
    assert skips > 0 and 2 < target < IN_FLIGHT
    batch = [f"f{i}" for i in range(IN_FLIGHT)]

    async def short_of_the_target(store, c):
        await _one_batch(store, c, batch)
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(c.mod("g", 1), c.mod("g", 1)), 10)
        return time.perf_counter() - t0, store.drain_samples()[0]

    async def main():
        async with stored(pg_url) as (store, c):
            _waits(store, 0.05)
            missed_s, sizes = await short_of_the_target(store, c)   # runs out: a miss
            _waits(store, 60.0)             # a wait begun now would time the test out
            for _ in range(skips):
                sizes += (await short_of_the_target(store, c))[1]
            _waits(store, LONG_WAIT_S)
            after = []
            for cred in ("h", "i"):
                await _one_batch(store, c, batch)
                after.append(await _waits_for(store, c, target, cred))
            counts = [store.stats[f"fill_{k}"] for k in ("waits", "misses", "skips")]
            return missed_s, sizes, after, counts       # /metrics' counts

    missed_s, sizes, after, counts = run(main())
    assert counts == [3, 1, skips]
    assert missed_s >= 0.05
    assert sizes == [2] * (1 + skips)
    for waiting, batches, _, later in after:
        assert waiting == [False] * (target - 1)
        assert batches == 1
        assert later == [target]


def test_calls_waiting_to_fill_when_the_cluster_is_lost_are_not_sent(pg_url):
    """The wait ends with the cluster: the calls are refused NotApplied at
    once, and none is sent once the store has reconnected."""
    async def main():
        store, c = await opened(pg_url)
        try:
            _waits(store, 5.0)              # the reconnection comes well within it
            told = await _two_waiting(store, c)
            assert told == []
            # Reconnecting waits RECONNECT_BACKOFF_S_MAX (2 s), as after refused
            # batches: the calls are told before, when the wait ends with the cluster.
            store.clusters[0].refused_in_row = 8
            store.lost(store.clusters[0], ConnectionResetError())
            t0 = time.monotonic()
            while len(told) < 2 and time.monotonic() < t0 + 10:
                await asyncio.sleep(0.01)
            told_s = time.monotonic() - t0
            while not store.clusters[0].healthy and time.monotonic() < t0 + 10:
                await asyncio.sleep(0.01)
            try:
                await c.tot("g")
            except NoAccount:
                return told, told_s, None
            return told, told_s, "g was made"
        finally:
            await store.aclose()

    told, told_s, made = run(main())
    assert [type(o) for o in told] == [NotApplied, NotApplied]
    assert told_s < 1.0
    assert made is None


def test_every_lane_wait_that_runs_out_is_a_miss():
    """However its turns read (the embedded store's idle turns tell a
    miss apart there), a lane's wait that runs out skips the next ones:
    its target is no pipelining caller's whole flight (FILL_TARGET_MAX)."""
    now = [100.0]
    f = committing.lane_fill(1, clock=lambda: now[0])
    f.aim(IN_FLIGHT, committing.FILL_TARGET_MAX)
    queued = 2
    assert f.waits(queued)
    for _ in range(3):
        queued += 1
        assert f.waits(queued)          # a turn that read more
    now[0] += committing.FILL_WAIT_S * 1.5
    assert not f.waits(queued)          # ran out: a miss
    f.aim(IN_FLIGHT, committing.FILL_TARGET_MAX)
    assert not f.waits(2)               # skipped
    assert f.counts() == {"fill_waits": 1, "fill_misses": 1, "fill_skips": 1}


def test_one_call_at_a_time_never_waits_to_fill(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            _waits(store, 60.0)             # a wait would time the test out
            got = [await asyncio.wait_for(c.mod("one", 1), 10) for _ in range(20)]
            return got, store.drain_samples()[0]

    got, sizes = run(main())
    assert got == [(i, i) for i in range(1, 21)]
    assert sizes == [1] * 20


def test_a_close_ends_the_fill_wait(pg_url):
    """A store closed while its writer waits to fill commits the calls
    waiting at once, as it commits whatever is queued, and closes."""
    async def main():
        store, c = await opened(pg_url)
        try:
            _waits(store, 30.0)
            told = await _two_waiting(store, c)
            lane = store.clusters[0].lanes[0]
            waiting = told == [] and lane.writing and len(lane.ops) == 2    # none sent
        finally:
            t0 = time.perf_counter()
            await store.aclose()
        return waiting, told, time.perf_counter() - t0

    waiting, told, closing_s = run(main())
    assert waiting
    assert [repr(o) for o in sorted(told, key=repr)] == ["(1, 1)", "(2, 2)"]
    assert closing_s < 10.0


def test_a_store_closing_begins_no_wait(pg_url):
    """Calls queued behind a batch in flight as the store begins to close
    go with the next batch at once: no wait is begun (nor counted) for
    them, whatever the batch set as its target."""
    async def main():
        store, c = await opened(pg_url)
        try:
            _waits(store, 30.0)
            told = []
            async with locked(pg_url, "accman_accounts"):
                for i in range(IN_FLIGHT):
                    store.submit(f"f{i}", 5, done=told.append)
                await asyncio.sleep(0.3)        # the batch flies, held at the lock
                for _ in range(2):
                    store.submit("g", 1, done=told.append)
                closing = asyncio.ensure_future(store.aclose())
                await asyncio.sleep(0.1)
            t0 = time.perf_counter()
            await asyncio.wait_for(closing, 10)
            return told, time.perf_counter() - t0, store.stats, store.drain_samples()[0]
        finally:
            await store.aclose()

    told, closing_s, stats, sizes = run(main())
    assert sorted(told, key=repr) == sorted([(5, 1)] * IN_FLIGHT + [(1, 1), (2, 2)], key=repr)
    assert closing_s < 10.0
    assert sizes == [IN_FLIGHT, 2]
    assert (stats["fill_waits"], stats["fill_skips"]) == (0, 0)


def test_a_call_after_a_reconnection_does_not_wait_for_the_callers_before(pg_url):
    """The callers in flight at a loss went with its connection: the first
    call after the reconnection goes at once."""
    async def main():
        async with stored(pg_url) as (store, c):
            _waits(store, 30.0)
            await _one_batch(store, c, [f"f{i}" for i in range(IN_FLIGHT)])
            store.lost(store.clusters[0], ConnectionResetError())
            deadline = time.monotonic() + 10
            while not store.clusters[0].healthy and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            got = await asyncio.wait_for(c.mod("g", 1), 20)
            return got, time.perf_counter() - t0

    got, answered_s = run(main())
    assert got == (1, 1)
    assert answered_s < 10.0


def test_a_reconnection_forgets_a_miss_of_the_callers_before(pg_url):
    """A miss skips the next waits of its lane's callers; they went with
    the connection, and the first batch short of its target after the
    reconnection waits as any would."""
    async def short_of_the_target(store, c):
        await _one_batch(store, c, [f"f{i}" for i in range(IN_FLIGHT)])
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(c.mod("g", 1), c.mod("g", 1)), 10)
        return time.perf_counter() - t0

    async def main():
        async with stored(pg_url) as (store, c):
            _waits(store, 0.2)
            missed_s = await short_of_the_target(store, c)      # runs out: a miss
            store.lost(store.clusters[0], ConnectionResetError())
            deadline = time.monotonic() + 10
            while not store.clusters[0].healthy and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            waited_s = await short_of_the_target(store, c)
            return missed_s, waited_s, store.stats["fill_misses"], store.stats["fill_skips"]

    missed_s, waited_s, misses, skips = run(main())
    assert missed_s >= 0.2 and waited_s >= 0.2
    assert (misses, skips) == (2, 0)


def test_a_call_after_a_batch_lost_in_flight_does_not_wait_for_its_callers(pg_url):
    """A batch whose commit is cut by a loss sets no target: its callers
    were told it failed, and the first call after the reconnection goes at
    once."""
    async def main():
        async with stored(pg_url) as (store, c):
            _waits(store, 30.0)
            told = []
            async with locked(pg_url, "accman_accounts"):
                for i in range(IN_FLIGHT):
                    store.submit(f"f{i}", 5, done=told.append)
                await asyncio.sleep(0.3)
                assert told == [], "the batch was answered before the lock was let go"
                store.lost(store.clusters[0], ConnectionResetError())
                deadline = time.monotonic() + 10
                while len(told) < IN_FLIGHT and time.monotonic() < deadline:
                    await asyncio.sleep(0.01)
            while not store.clusters[0].healthy and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            t0 = time.perf_counter()
            got = await asyncio.wait_for(c.mod("g", 1), 20)
            return told, got, time.perf_counter() - t0

    told, got, answered_s = run(main())
    assert len(told) == IN_FLIGHT and not any(isinstance(o, tuple) for o in told)
    assert got == (1, 1)
    assert answered_s < 10.0
