"""Holds, settles and the event stream on the calling side (issue 13): both
clients' `hold`, `settle`, `events` and `mod(low=)`, against the fake
AccMan of tests/fake_accman.py: every method, value and typed error, the
retry rules, the long poll's timeout and its connection of its own.  The
decoders alone are in tests/test_client_wire.py; the real server in
tests/test_e2e_holds.py."""

from __future__ import annotations

import asyncio
import signal
import threading
import time

import pytest

from accman.calling import client as client_mod
from accman.client import (AccManClient, AccManSyncClient, CallTimeout, Event, EventsPage,
                           OutcomeUnknown)
from accman.errors import (BadRequest, Busy, EventsTrimmed, HoldEnded, Insufficient, KeyReused,
                           NoAccount, NoHold, TooManyHolds)
from accman.limits import EVENTS_LIMIT_MAX, EVENTS_WAIT_S_MAX, HOLD_TTL_S_MAX, INT64_MAX
from fake_accman import account_id


class AsyncAsSync:
    """An AccManClient driven call by call from a test, on a loop of its own
    (a client keeps the loop of its first call)."""

    def __init__(self, url, **kw):
        self.loop = asyncio.new_event_loop()
        self.acc = AccManClient(url, **kw)

    def __getattr__(self, name):
        method = getattr(self.acc, name)
        return lambda *a, **kw: self.loop.run_until_complete(method(*a, **kw))

    def close(self):
        self.loop.run_until_complete(self.acc.aclose())
        self.loop.close()


@pytest.fixture(params=["async", "sync"])
def client(request, fake):
    """Each test runs with both clients: the same calls, values, errors."""
    made = []

    def make(**kw):
        c = AsyncAsSync(fake.url, **kw) if request.param == "async" else AccManSyncClient(
            fake.url, **kw)
        made.append(c)
        return c
    yield make
    for c in made:
        c.close()


# --- hold and settle ------------------------------------------------------------
def test_hold_takes_the_amount_and_settle_returns_the_rest(fake, client):
    fake.fund("alice", 10)
    acc = client()
    assert acc.hold("alice", -6, ttl_s=60) == (2, 4, 2)
    assert acc.tot("alice") == 4                        # what is left to spend
    assert acc.settle("alice", 2, 2) == (8, 3)          # 2 spent, 4 back
    entries, _ = acc.past("alice")
    assert [(e.seq, e.by, e.tot, e.hold) for e in entries] == [
        (3, 4, 8, 2), (2, -6, 4, 2), (1, 10, 10, None)]
    (_, _, params, _), = fake.calls("/hold")
    assert params == {"cred": "alice", "by": "-6", "ttl": "60"}   # min left to the server
    assert fake.calls("/settle")[0][2] == {"cred": "alice", "hold": "2", "use": "2"}


def test_settling_all_of_it_or_none_of_it(fake, client):
    fake.fund("alice", 10)
    acc = client()
    h1, _, _ = acc.hold("alice", -3, ttl_s=60)
    h2, _, _ = acc.hold("alice", -4, ttl_s=60)
    assert acc.settle("alice", h1, 3) == (3, 4)         # all used: by 0
    assert acc.settle("alice", h2, 0) == (7, 5)         # none used: all back
    assert [e.by for e in acc.past("alice").entries[:2]] == [4, 0]


def test_settling_again_answers_the_first_reply_and_another_use_is_hold_ended(fake, client):
    fake.fund("alice", 10)
    acc = client()
    hold, _, _ = acc.hold("alice", -5, ttl_s=60)
    first = acc.settle("alice", hold, 1)
    assert acc.settle("alice", hold, 1) == first
    with pytest.raises(HoldEnded) as e:
        acc.settle("alice", hold, 2)
    assert (e.value.status, e.value.code) == (409, "hold_ended")
    assert fake.tot("alice") == 9


def test_an_expired_hold_is_returned_and_settling_it_is_hold_ended(fake, client):
    fake.fund("alice", 10)
    acc = client()
    hold, tot, _ = acc.hold("alice", -5, ttl_s=1)
    assert tot == 5
    fake.expire_due(time.monotonic() + 2)
    assert acc.tot("alice") == 10
    with pytest.raises(HoldEnded):
        acc.settle("alice", hold, 5)
    assert acc.past("alice").entries[0].by == 5          # the expiry, as an entry


def test_hold_errors(fake, client):
    fake.fund("alice", 10)
    fake.holds_max = 2
    acc = client()
    with pytest.raises(NoAccount):
        acc.hold("nobody", -1, ttl_s=60)
    with pytest.raises(Insufficient) as e:
        acc.hold("alice", -11, ttl_s=60)
    assert e.value.tot == 10
    with pytest.raises(Insufficient):
        acc.hold("alice", -5, ttl_s=60, min=6)
    assert acc.hold("alice", -1, ttl_s=60, min=-5)[1] == 9
    acc.hold("alice", -1, ttl_s=60)
    with pytest.raises(TooManyHolds) as e:
        acc.hold("alice", -1, ttl_s=60)
    assert (e.value.status, e.value.code) == (409, "too_many_holds")
    with pytest.raises(NoHold) as e:
        acc.settle("alice", 99, 0)
    assert (e.value.status, e.value.code) == (404, "no_hold")
    assert fake.tot("alice") == 8


def test_a_keyed_hold_applies_once(fake, client):
    fake.fund("alice", 10)
    acc = client()
    first = acc.hold("alice", -4, ttl_s=60, key="req-1-h")
    assert acc.hold("alice", -4, ttl_s=60, key="req-1-h") == first
    with pytest.raises(KeyReused):
        acc.hold("alice", -5, ttl_s=60, key="req-1-h")
    with pytest.raises(KeyReused):
        acc.hold("alice", -4, ttl_s=61, key="req-1-h")
    assert fake.tot("alice") == 6 and len(fake.open_holds("alice")) == 1


# --- values are checked before anything is sent -----------------------------------
@pytest.mark.parametrize("call,exc", [
    (lambda a: a.hold("alice", 5, ttl_s=60), BadRequest),           # by must be negative
    (lambda a: a.hold("alice", 0, ttl_s=60), BadRequest),
    (lambda a: a.hold("alice", -2**63, ttl_s=60), BadRequest),     # its end: 2^63 back
    (lambda a: a.hold("alice", True, ttl_s=60), TypeError),
    (lambda a: a.hold("alice", -1, ttl_s=0), BadRequest),
    (lambda a: a.hold("alice", -1, ttl_s=HOLD_TTL_S_MAX + 1), BadRequest),
    (lambda a: a.hold("alice", -1, ttl_s=1.5), TypeError),
    (lambda a: a.hold("alice", -1, ttl_s=60, min=INT64_MAX + 1), BadRequest),
    (lambda a: a.hold("alice", -1, ttl_s=60, key="a b"), BadRequest),
    (lambda a: a.hold("a&by=-1", -1, ttl_s=60), BadRequest),
    (lambda a: a.settle("alice", 0, 1), BadRequest),
    (lambda a: a.settle("alice", 1, -1), BadRequest),
    (lambda a: a.settle("alice", 1, True), TypeError),
    (lambda a: a.settle("alice", "1", 1), TypeError),
    (lambda a: a.events(after=-1), BadRequest),
    (lambda a: a.events(limit=0), BadRequest),
    (lambda a: a.events(limit=EVENTS_LIMIT_MAX + 1), BadRequest),
    (lambda a: a.events(wait_s=-1), BadRequest),
    (lambda a: a.events(wait_s=EVENTS_WAIT_S_MAX + 1), BadRequest),
    (lambda a: a.events(wait_s=0.5), TypeError),
    (lambda a: a.mod("alice", -1, low=5), BadRequest),              # a funding mod only
    (lambda a: a.mod("alice", 1, low=INT64_MAX + 1), BadRequest),
    (lambda a: a.mod("alice", 1, low=False), TypeError),
])
def test_bad_values_are_refused_locally(fake, client, call, exc):
    with pytest.raises(exc):
        call(client())
    assert fake.requests == []


def test_the_bounds_of_each_value_are_accepted(fake, client):
    fake.fund("alice", 10)
    acc = client()
    acc.hold("alice", -1, ttl_s=1)
    acc.hold("alice", -1, ttl_s=HOLD_TTL_S_MAX)
    acc.events(after=0, limit=EVENTS_LIMIT_MAX, wait_s=0)
    acc.events(limit=1)
    acc.mod("alice", 1, low=-5)
    assert [r[2].get("ttl") for r in fake.calls("/hold")] == ["1", str(HOLD_TTL_S_MAX)]
    assert fake.calls("/events")[0][2] == {"after": "0", "limit": str(EVENTS_LIMIT_MAX),
                                           "wait": "0"}


# --- retries -------------------------------------------------------------------------
def lose_first(fake, path, n=1):
    lost = []

    def fault(method, p, params):
        if p == path and len(lost) < n:
            lost.append(1)
            return ("apply_drop",)
    fake.fault = fault


def test_a_keyless_hold_whose_reply_is_lost_is_not_retried(fake, client):
    fake.fund("alice", 10)
    lose_first(fake, "/hold")
    with pytest.raises(OutcomeUnknown):
        client(retries=3).hold("alice", -3, ttl_s=60)
    assert len(fake.calls("/hold")) == 1 and fake.tot("alice") == 7


def test_a_keyed_hold_whose_reply_is_lost_is_retried_and_applies_once(fake, client):
    fake.fund("alice", 10)
    lose_first(fake, "/hold", 2)
    assert client(retries=3).hold("alice", -3, ttl_s=60, key="k-h") == (2, 7, 2)
    assert len(fake.calls("/hold")) == 3 and len(fake.open_holds("alice")) == 1


def test_a_settle_whose_reply_is_lost_is_retried_and_applies_once(fake, client):
    fake.fund("alice", 10)
    acc = client(retries=3)
    hold, _, _ = acc.hold("alice", -4, ttl_s=60)
    lose_first(fake, "/settle", 2)
    assert acc.settle("alice", hold, 1) == (9, 3)       # no key needed: same use, first reply
    assert len(fake.calls("/settle")) == 3 and fake.tot("alice") == 9


# --- events ----------------------------------------------------------------------------
def test_events_page_through_every_change_in_order(fake, client):
    fake.fund("alice", 10, low=5)
    acc = client()
    hold, _, _ = acc.hold("alice", -6, ttl_s=1, key="k-h")      # 10 -> 4: crosses 5
    acc.settle("alice", hold, 2)
    h2, _, _ = acc.hold("alice", -1, ttl_s=1)
    fake.expire_due(time.monotonic() + 2)
    page = acc.events(limit=3)
    assert isinstance(page, EventsPage) and page.next == 3
    events, nxt = page
    assert [e.type for e in events] == ["mod", "hold", "low_balance"]
    assert events[1] == Event(2, "hold", account_id("alice"), 2, -6, 4, events[1].at, "k-h", 2)
    rest, nxt = acc.events(after=nxt)
    assert [(e.id, e.type, e.by, e.hold) for e in rest] == [
        (4, "settle", 4, hold), (5, "hold", -1, h2), (6, "expire", 1, h2)]
    assert nxt == 6
    assert acc.events(after=nxt) == ([], 6)


def test_low_is_sent_on_a_funding_mod(fake, client):
    client().mod("alice", 10, low=3, key="fund-1")
    assert fake.mods()[0][2] == {"cred": "alice", "by": "10", "key": "fund-1", "low": "3"}
    assert fake.accounts["alice"]["low"] == 3


def test_events_older_than_the_retention_are_trimmed_with_first(fake, client):
    for _ in range(5):
        fake.fund("alice", 1)
    fake.trim(4)
    acc = client()
    with pytest.raises(EventsTrimmed) as e:
        acc.events(after=2)
    assert (e.value.status, e.value.code, e.value.first) == (410, "events_trimmed", 4)
    assert [ev.id for ev in acc.events(after=e.value.first - 1).events] == [4, 5]


def fund_later(fake, cred, delay_s):
    t = threading.Timer(delay_s, fake.fund, (cred, 7))
    t.start()
    return t


def test_a_long_poll_answers_as_soon_as_an_event_comes(fake, client):
    acc = client()
    t = time.monotonic()                # before the timer: the event comes 0.3 s after t
    fund_later(fake, "alice", 0.3)
    events, nxt = acc.events(wait_s=10)
    assert 0.29 < time.monotonic() - t < 5
    assert [(e.type, e.by) for e in events] == [("mod", 7)] and nxt == 1


def test_a_long_poll_may_take_longer_than_timeout_s_by_its_wait(fake, client):
    """The attempt's timeout is timeout_s + wait_s: a poll that waits its
    whole wait is not a timeout.  timeout_s leaves the reply that ends the
    wait room to be late on a busy machine."""
    acc = client(timeout_s=0.5, retries=0)
    t = time.monotonic()
    assert acc.events(wait_s=1) == ([], 0)
    assert time.monotonic() - t >= 0.9
    fake.fault = lambda m, p, q: ("delay", 4) if p == "/events" else None
    t = time.monotonic()
    with pytest.raises(CallTimeout, match="1.5 s"):
        acc.events(wait_s=1)
    assert 1.4 < time.monotonic() - t < 3.5


def test_a_long_poll_does_not_hold_up_the_calls_behind_it(fake):
    """Replies come in order on a connection: the long poll has its own, so
    calls made meanwhile are answered at once, even with one pooled
    connection."""
    fake.fund("alice", 3)

    async def go():
        async with AccManClient(fake.url, connections_max=1) as acc:
            await acc.tot("alice")
            poll = asyncio.create_task(acc.events(after=1, wait_s=3))
            await asyncio.sleep(0.05)
            t = time.monotonic()
            assert await asyncio.gather(*(acc.tot("alice") for _ in range(20))) == [3] * 20
            assert time.monotonic() - t < 1
            await acc.mod("alice", 2)
            events, _ = await poll
            return [e.by for e in events]
    assert asyncio.run(go()) == [2]
    assert fake.connections == 2


def test_long_polls_reuse_their_idle_connection(fake):
    async def go():
        async with AccManClient(fake.url) as acc:
            for _ in range(3):
                assert await acc.events(wait_s=1) == ([], 0)
            return len(acc._polls)
    assert asyncio.run(go()) == 1
    assert fake.connections == 1


def test_long_polls_in_flight_are_bounded(fake, monkeypatch):
    monkeypatch.setattr(client_mod, "LONG_POLLS_MAX", 2)

    async def go():
        async with AccManClient(fake.url, retries=0) as acc:
            polls = [asyncio.create_task(acc.events(wait_s=2)) for _ in range(2)]
            await asyncio.sleep(0.05)
            with pytest.raises(Busy, match="LONG_POLLS_MAX"):
                await acc.events(wait_s=2)
            assert await acc.events() == ([], 0)     # a plain read is not a long poll
            fake.fund("alice", 1)
            return [len(p.events) for p in await asyncio.gather(*polls)]
    assert asyncio.run(go()) == [1, 1]
    assert len(fake.calls("/events")) == 3


def test_a_cancelled_long_poll_closes_its_connection(fake):
    async def go():
        async with AccManClient(fake.url) as acc:
            poll = asyncio.create_task(acc.events(wait_s=5))
            await asyncio.sleep(0.05)
            poll.cancel()
            await asyncio.sleep(0.05)
            assert acc._polls == []
            fake.fund("alice", 4)
            events, _ = await acc.events(wait_s=1)
            return [e.by for e in events]
    assert asyncio.run(go()) == [4]
    assert fake.connections == 2


def test_an_interrupted_sync_call_does_not_leave_its_reply_for_the_next(fake):
    """^C during a blocking call (a long poll, most likely): the reply it
    still owes must not be read as the reply of the next call on the same
    client, which would then return another account's balance."""
    fake.fund("alice", 5)
    fake.fund("bob", 9)
    fake.fault = lambda m, p, q: ("delay", 1) if q.get("cred") == "bob" else None

    def interrupt(signum, frame):
        raise KeyboardInterrupt
    old = signal.signal(signal.SIGALRM, interrupt)
    try:
        with AccManSyncClient(fake.url, retries=0) as acc:
            assert acc.tot("alice") == 5            # the socket is in use, kept alive
            signal.setitimer(signal.ITIMER_REAL, 0.2)
            with pytest.raises(KeyboardInterrupt):
                acc.tot("bob")
            assert acc.tot("alice") == 5
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, old)
