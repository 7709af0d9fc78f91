"""What the embedded store answers, the PostgreSQL store answers the same:
its refusals and their sentences, its counts, holds ended before it serves,
where the event stream ends, long polls at a stop, retention shorter than
a minute.  (The black-box suite checks the same over HTTP on both stores;
these reach the store directly and fail fast.)"""

import asyncio
import logging
import time

import pytest

from accman.errors import (BadRequest, Busy, EventsTrimmed, HoldEnded, Insufficient, KeyReused,
                           NoAccount, Overflow, TooManyHolds, Unavailable)
from accman.limits import INT64_MAX, INT64_MIN
from accman.ledger import Ledger
from accman.postgres import upkeep as upkeep_module
from accman.store import Store, missing_names

from .helpers import Calls, opened, run, stored


def test_both_stores_have_every_name_of_the_store_interface(pg_url, tmp_path):
    """The server reads a store only through accman/store.py's Store: run.py
    read `path`, `cursors` and `failure` through getattr with a default,
    names the interface did not have, so a store without one was served
    with a guess.  The interface names them, and both stores have them
    (`tot` is only a store's with `inline_reads`)."""
    names = {n for n in vars(Store) if not n.startswith("_")} | set(Store.__annotations__)
    assert {"path", "cursors", "failure"} <= names
    with Ledger(str(tmp_path / "data")) as led:
        assert missing_names(led) == []
        assert (led.path, led.cursors, led.failure) == (str(tmp_path / "data"), None, None)

    async def main():
        async with stored(pg_url) as (store, c):
            assert missing_names(store) == []
            assert (store.path, store.failure) == (None, None) and store.cursors is not None
    run(main())


class _Cred(str):
    """A str subclass: no credential, though equal to one."""


async def _told(outcome):
    raise AssertionError("a coroutine function's call runs none of its body")


# Calls with a bad value (the Python API's, not the wire's), each made on an
# account "a" that both stores have: what each store raises, in its words.
_BAD_CALLS = [
    lambda s, d: s.submit(["a"], 5, None, None, done=d),           # unhashable
    lambda s, d: s.submit(_Cred("a"), 5, None, None, done=d),      # equal to a known cred
    lambda s, d: s.submit("a b", 0, None, None, done=d),           # cred and by: cred first
    lambda s, d: s.submit("a", 5, None, None, done=5),
    lambda s, d: s.submit_hold("a b", 5, 10, None, None, d),
    lambda s, d: s.submit_hold({}, -1, 10, None, None, d),
    lambda s, d: s.submit_hold("a", -1, 10, None, None, "print"),
    lambda s, d: s.submit_settle("a b", 0, 0, d),
    lambda s, d: s.submit_settle("a", 1, 0, 5),
    lambda s, d: s.read_tot(["a"], d),
    # A read's `done`, where it may be told later: an ordered read, a long poll.
    lambda s, d: s.read_tot("a", 5, True),
    lambda s, d: s.read_past("a", 10, None, _told, True),
    lambda s, d: s.read_events(0, 10, 1, _told),
]


def _refusals(store, done) -> list:
    said = []
    for call in _BAD_CALLS:
        try:
            said.append(f"returned {call(store, done)!r}")
        except Exception as e:
            said.append(f"{type(e).__name__}: {e}")
    return said


def test_bad_values_and_dones_are_refused_as_the_embedded_store_refuses_them(pg_url, tmp_path,
                                                                                caplog):
    """The same bad call got another answer from each store: PostgreSQL's
    took a `done` that cannot be called (the change committed, its caller
    never told, as the embedded store did before it checked `done`), said
    TypeError "unhashable type" for a list as cred, took a str subclass
    equal to a cred it had cached, checked the values before the cred, and
    logged a failed completion for a `done` of None.  Both stores now say
    the same, and nothing of the bad calls is applied.  A read's `done`
    that cannot be told (an ordered read's, a long poll's) was taken too,
    and its caller never heard."""
    told = []
    with Ledger(str(tmp_path / "data")) as led:
        led.mod("a", 10)
        embedded = _refusals(led, told.append)
        led.submit("a", 1, done=None)               # None tells nobody
        assert led.mod("a", 1) == (12, 3)

    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 10)
            assert _refusals(store, told.append) == embedded
            store.submit("a", 1, None, None, done=None)
            assert await c.mod("a", 1) == (12, 3)
    run(main())
    assert not any(said.startswith("returned") for said in embedded), embedded
    assert told == []
    assert "completion callback failed" not in caplog.text


async def _reads_telling_nobody(store) -> int:
    """The reads that may be told later, each with a `done` of None, which
    tells nobody (check_done takes it): the account's balance after them."""
    c = Calls(store)
    await c.mod("a", 10)
    _, end = await c.events()
    store.read_events(end, 10, 0.2, None)       # answered by its timeout
    store.read_events(end, 10, 5, None)         # answered by the change below
    store.submit("a", 1, None, None, done=None)
    store.read_tot("a", None, True)
    store.read_past("a", 10, None, None, True)  # behind the change
    store.read_tot("a", None)
    store.read_past("a", 10, None, None)
    assert await c.mod("a", 1) == (12, 3)
    await asyncio.sleep(0.4)
    return await c.tot("a", ordered=True)


def test_a_read_s_done_of_none_tells_nobody_on_both_stores(pg_url, tmp_path, caplog):
    """check_done takes a read's `done` of None, as a change's ("None tells
    nobody", accman/store.py), yet each store called it: the embedded
    store's ordered past and long poll, and every PostgreSQL read, logged
    a failed completion (or asyncio a failed callback) for it."""
    async def embedded():
        with Ledger(str(tmp_path / "data")) as led:
            led.bind_loop(asyncio.get_running_loop())
            return await _reads_telling_nobody(led)

    async def on_pg():
        async with stored(pg_url) as (store, _):
            return await _reads_telling_nobody(store)
    assert run(embedded()) == run(on_pg()) == 12
    assert [r.getMessage() for r in caplog.records if r.levelno >= logging.ERROR] == []


def test_a_closed_store_says_it_is_closed_before_it_judges_a_call(pg_url, tmp_path):
    """A closed PgStore judged a call's values (and its `done`) before it
    said it was closed, and its bind_loop took a new `deliver`; the closed
    embedded store says it is closed to every call first.  Both now refuse
    the same bad calls, and a bind, as closed: NotApplied, nothing done."""
    with Ledger(str(tmp_path / "data")) as led:
        led.mod("a", 10)
    embedded = _refusals(led, print)

    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 10)
            await store.aclose()
            with pytest.raises(Unavailable, match="^the store is closed$"):
                store.bind_loop(asyncio.get_running_loop(), print)
            return _refusals(store, print)
    on_pg = run(main())
    assert embedded == ["NotApplied: the ledger is closed"] * len(_BAD_CALLS)
    assert on_pg == ["NotApplied: the store is closed"] * len(_BAD_CALLS)


def test_refusals_say_what_the_embedded_store_says(pg_url):
    async def main():
        async with stored(pg_url, holds_per_account_max=2, holds_max=3) as (store, c):
            with pytest.raises(NoAccount, match="a charge opens none"):
                await c.mod("nobody", -1)
            with pytest.raises(NoAccount, match="a hold opens none"):
                await c.hold("nobody", -1, 60)
            with pytest.raises(NoAccount):
                await c.settle("nobody", 1, 0)
            await c.mod("a", 100)
            with pytest.raises(BadRequest, match=rf"by must be from {-INT64_MAX} to -1"):
                await c.hold("a", INT64_MIN, 60, min=INT64_MIN)
            # The values' words are accman.store's, the same for every store.
            for call, says in ((lambda: c.hold("a", -1, 0), "ttl must be a whole number of "
                                "seconds from 1 to 86400"),
                               (lambda: c.settle("a", 0, 0), "hold must be a hold id: a "
                                "positive int"),
                               (lambda: c.settle("a", 2 ** 64, 0), "hold must fit in a signed "
                                "64-bit integer"),
                               (lambda: c.settle("a", 2, -1), "use must be from 0 to the held "
                                "amount")):
                with pytest.raises(BadRequest, match=f"^{says}$"):
                    await call()
            assert await c.hold("a", -5, 60, key="h") == (2, 95, 2)
            with pytest.raises(KeyReused,
                               match="^key was used with another route, by, min or ttl$"):
                await c.hold("a", -5, 61, key="h")
            with pytest.raises(Insufficient, match=r"^this hold \(by -96\) would take the balance "
                                                   r"95 to -1, under min 0$"):
                await c.hold("a", -96, 60)
            with pytest.raises(Insufficient, match=r"^this mod \(by -96\) would take the balance "
                                                   r"95 to -1, under min 0$"):
                await c.mod("a", -96, min=0)
            with pytest.raises(Insufficient, match=r"^this mod \(by 5\) would take the balance "
                                                   r"95 to 100, under min 1000$"):
                await c.mod("a", 5, min=1000)
            await c.hold("a", -5, 1)
            with pytest.raises(TooManyHolds, match=r"HOLDS_PER_ACCOUNT_MAX \(2\)"):
                await c.hold("a", -5, 60)
            await c.mod("b", 100)
            await c.hold("b", -5, 60)
            with pytest.raises(TooManyHolds, match=r"HOLDS_MAX \(3\)"):
                await c.hold("b", -5, 60)
            assert await c.settle("a", 2, 5) == (90, 4)
            with pytest.raises(HoldEnded, match="another use"):
                await c.settle("a", 2, 4)
            with pytest.raises(BadRequest, match="held amount 5"):
                await c.settle("a", 3, 6)
            await asyncio.sleep(1.1)                        # hold 3's ttl is up
            with pytest.raises(HoldEnded, match="expired"):
                await c.settle("a", 3, 0)
            with pytest.raises(HoldEnded, match="expired"):
                await c.settle("a", 3, 0)                   # and stays so
    run(main())


def test_a_hold_over_a_limit_is_too_many_holds_whatever_the_balance(pg_url):
    """The embedded store judges a hold's limits before its balance: at a
    limit, an account that could not cover the hold either is told
    too_many_holds, not insufficient or overflow."""
    async def main():
        async with stored(pg_url, holds_per_account_max=2, holds_max=3) as (store, c):
            await c.mod("a", 2)
            await c.hold("a", -1, 60)
            await c.hold("a", -1, 60)                       # a's balance is 0 now
            with pytest.raises(TooManyHolds, match=r"HOLDS_PER_ACCOUNT_MAX \(2\)"):
                await c.hold("a", -1, 60)
            await c.mod("b", 1)
            await c.hold("b", -1, 60)                       # three open: the store's limit
            await c.mod("c", 1)
            await c.mod("c", INT64_MIN)                     # a mod with no min may go below 0
            with pytest.raises(TooManyHolds, match=r"HOLDS_MAX \(3\)"):
                await c.hold("c", -2, 60, min=INT64_MIN)    # that would also overflow
            assert [await c.tot(x) for x in "abc"] == [0, 0, INT64_MIN + 1]
    run(main())


def test_a_seq_or_an_event_id_past_64_bits_is_refused_as_on_the_wire(pg_url):
    """/past?before= and /events?after= past the signed 64-bit range are 400
    on the wire; through the store's Python calls they are BadRequest too,
    never a query that the driver cannot encode."""
    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 5)
            for call, name in ((lambda: c.past("a", before=INT64_MAX + 1), "before"),
                               (lambda: c.past("a", before=2 ** 64, ordered=True), "before"),
                               (lambda: c.events(after=INT64_MAX + 1), "after"),
                               (lambda: c.events(after=2 ** 64), "after")):
                with pytest.raises(BadRequest,
                                   match=f"^{name} must fit in a signed 64-bit integer$"):
                    await call()
            assert [e.seq for e in (await c.past("a", before=INT64_MAX)).entries] == [1]
            assert await c.events(after=INT64_MAX) == ([], 1)
    run(main())


def test_a_mod_leaves_room_for_what_open_holds_give_back(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 100)
            await c.hold("a", -100, 60)
            with pytest.raises(Overflow, match="open holds"):
                await c.mod("a", INT64_MAX)
            assert await c.mod("a", INT64_MAX - 100) == (INT64_MAX - 100, 3)
            assert await c.settle("a", 2, 0) == (INT64_MAX, 4)
    run(main())


def test_the_counts_are_in_the_stats(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 10)
            await c.mod("b", 10)
            await c.hold("a", -1, 1)
            await c.hold("b", -1, 600)
            stats = store.stats
            assert (stats["accounts"], stats["open_holds"], stats["events_last"]) == (2, 2, 4)
            assert store.open_holds == 2
            await asyncio.sleep(1.1)
            with pytest.raises(HoldEnded):
                await c.settle("a", 2, 0)                  # ends it, by its expiry
            stats = store.stats
            assert (stats["open_holds"], stats["holds_expired"], stats["events_last"]) == \
                (1, 1, 5)
    run(main())


def test_events_first_reads_the_first_event_from_its_commit_on(pg_url, monkeypatch):
    """accman_events_first, the oldest event kept, reads 0 while there is
    none and the first event's id from the commit that wrote it, as on the
    embedded store: not 0 beside events written until the next round."""
    monkeypatch.setattr(upkeep_module, "EXPIRE_INTERVAL_S", 3600.0)     # open's round alone

    async def main():
        async with stored(pg_url) as (store, c):
            ends = [(store.stats["events_first"], store.stats["events_last"])]
            await c.mod("a", 5)
            ends.append((store.stats["events_first"], store.stats["events_last"]))
            return ends
    assert run(main()) == [(0, 0), (1, 1)]


def test_a_hold_that_expired_while_down_ends_before_open_returns(pg_url):
    async def main():
        store, c = await opened(pg_url)
        await c.mod("a", 100)
        await c.hold("a", -10, 1)
        await store.aclose()
        await asyncio.sleep(1.2)
        async with stored(pg_url) as (store, c):
            assert store.open_holds == 0 and store.stats["holds_expired"] == 1
            assert await c.tot("a") == 100                 # at once, no round awaited
            assert (await c.past("a")).entries[0].hold == 2     # the expiry ends hold 2
    run(main())


def test_next_tells_where_the_event_stream_ends(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            assert await c.events(after=7) == ([], 0)      # no event yet: it ends at 0
            # Past the end, a long poll is answered at once: it would wait 30 s.
            assert await asyncio.wait_for(c.events(after=7, wait_s=30), 5) == ([], 0)
            for _ in range(3):
                await c.mod("a", 1)
            assert await c.events(after=3) == ([], 3)
            assert await c.events(after=5000) == ([], 3)
            assert await asyncio.wait_for(c.events(after=5000, wait_s=30), 5) == ([], 3)
    run(main())


def test_end_waits_answers_every_long_poll_at_once(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 1)
            polls = [asyncio.ensure_future(c.events(after=1, wait_s=30)) for _ in range(3)]
            await asyncio.sleep(0.3)
            t0 = time.monotonic()
            store.end_waits()
            assert await asyncio.gather(*polls) == [([], 1)] * 3
            assert time.monotonic() - t0 < 5
            assert await c.events(after=1, wait_s=30) == ([], 1)    # no wait any more
    run(main())


def test_the_waiters_bound_is_named_with_its_value(pg_url, monkeypatch):
    monkeypatch.setattr("accman.postgres.events.EVENTS_WAITERS_MAX", 2)

    async def main():
        async with stored(pg_url) as (store, c):
            polls = [asyncio.ensure_future(c.events(wait_s=5)) for _ in range(2)]
            await asyncio.sleep(0.3)
            with pytest.raises(Busy, match=r"EVENTS_WAITERS_MAX \(2\)"):
                await c.events(wait_s=5)
            store.end_waits()
            await asyncio.gather(*polls)
    run(main())


def test_a_retention_shorter_than_the_trim_interval_is_kept_to(pg_url):
    """Events past a one-second retention go within a round or two, not at
    the next TRIM_INTERVAL_S (a minute); the stats count them."""
    async def main():
        async with stored(pg_url, retention_s=1.0) as (store, c):
            for _ in range(3):
                await c.mod("a", 1)
            await asyncio.sleep(1.2)
            await c.mod("a", 1)                            # young: kept
            deadline = time.monotonic() + 5
            while True:                 # (a round may take 1, then 2 and 3)
                try:
                    await c.events(after=0)
                except EventsTrimmed as e:
                    if e.first == 4:
                        break
                assert time.monotonic() < deadline, "not trimmed within 5 s"
                await asyncio.sleep(0.1)
            stats = store.stats
            assert (stats["events_first"], stats["events_trimmed"]) == (4, 3)
    run(main())


def test_polls_of_one_page_share_one_read(pg_url, monkeypatch):
    """300 long polls of the stream's end, made at once, are one query (and
    one more when an event wakes them), not 300."""
    from accman.postgres.events import EventReader
    reads = []
    real_page = EventReader._page

    async def counted(self, after, limit):
        reads.append(after)
        return await real_page(self, after, limit)
    monkeypatch.setattr(EventReader, "_page", counted)

    async def main():
        async with stored(pg_url) as (store, c):
            polls = [asyncio.ensure_future(c.events(after=0, wait_s=10)) for _ in range(300)]
            await asyncio.sleep(0.3)
            assert len(reads) <= 2
            await c.mod("a", 1)
            assert all(p[1] == 1 for p in await asyncio.gather(*polls))
            assert len(reads) <= 4
    run(main())


def test_a_commit_heard_during_a_first_read_is_read_at_once(pg_url, monkeypatch):
    """A poll whose first read found nothing, while a commit was heard of
    meanwhile, reads again rather than wait out its wait."""
    from accman.postgres.events import EventReader
    real_page = EventReader._page
    state = {}

    async def page_then_commit(self, after, limit):
        outcome = await real_page(self, after, limit)
        if "done" not in state:
            state["done"] = True
            await state["calls"].mod("a", 1)           # committed, and heard of
        return outcome
    monkeypatch.setattr(EventReader, "_page", page_then_commit)

    async def main():
        store, c = await opened(pg_url)
        state["calls"] = c
        try:
            t0 = time.monotonic()
            events, nxt = await c.events(after=0, wait_s=20)
            assert [e.id for e in events] == [1] and nxt == 1
            assert time.monotonic() - t0 < 5
        finally:
            await store.aclose()
    run(main())
