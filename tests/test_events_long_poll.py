"""Long polls of the embedded ledger's event stream (SPEC "Events": GET
/events waits up to `wait` seconds for the first event): answered at once
when events exist, after the wait when none come, woken on their own
loop, EVENTS_WAITERS_MAX of them, and all at once when a server stops."""

import asyncio
import threading
import time

import pytest

from accman import BadRequest, Busy, Ledger
from accman.errors import EventsTrimmed
from accman.limits import EVENTS_WAIT_S_MAX, EVENTS_WAITERS_MAX
from ledgerhelp import wait_for



@pytest.mark.parametrize("wait_s", [-1, EVENTS_WAIT_S_MAX + 0.5, EVENTS_WAIT_S_MAX + 1, "1",
                                    True, float("nan")])
def test_a_wait_out_of_0_to_events_wait_s_max_is_refused(led, wait_s):
    async def poll():
        return await led.aevents(wait_s=wait_s)
    # The Python API's parameter named, as the wire's error names the query's.
    with pytest.raises(BadRequest, match=f"^wait_s must be from 0 to {EVENTS_WAIT_S_MAX} seconds"):
        asyncio.run(poll())


def test_a_wait_of_events_wait_s_max_is_taken_and_woken(led):
    assert EVENTS_WAIT_S_MAX == 60

    async def main():
        poll = asyncio.ensure_future(led.aevents(wait_s=EVENTS_WAIT_S_MAX))
        await asyncio.sleep(0.2)
        assert not poll.done()
        await led.amod("a", 1)
        return await asyncio.wait_for(poll, 10)

    page, nxt = asyncio.run(main())
    assert [e.type for e in page] == ["mod"] and nxt == 1


def test_a_long_poll_is_answered_at_once_when_events_exist(led):
    led.mod("a", 1)

    async def main():
        t0 = time.monotonic()
        got = await led.aevents(after=0, wait_s=30)
        return got, time.monotonic() - t0

    (page, nxt), took = asyncio.run(main())
    assert [e.id for e in page] == [1] and nxt == 1 and took < 5


def test_a_long_poll_with_nothing_new_ends_empty_after_its_wait(led):
    led.mod("a", 1)

    async def main():
        t0 = time.monotonic()
        got = await led.aevents(after=1, wait_s=1)
        return got, time.monotonic() - t0

    got, took = asyncio.run(main())
    assert got == ([], 1) and 0.9 <= took < 5


def test_a_long_poll_past_the_end_is_told_where_the_stream_ends_at_once(led):
    """It used to wait its whole `wait` for events past `after`, and answer
    next = after, while an immediate read said next = the newest id."""
    led.mod("a", 1)

    async def main():
        t0 = time.monotonic()
        got = await led.aevents(after=50, wait_s=5)
        return got, time.monotonic() - t0

    got, took = asyncio.run(main())
    assert got == ([], 1) and took < 2


def test_a_long_poll_is_woken_by_a_mod_on_its_loop(led):
    async def main():
        poll = asyncio.ensure_future(led.aevents(after=0, wait_s=30))
        await asyncio.sleep(0.2)
        assert not poll.done()
        t0 = time.monotonic()
        await led.amod("a", 5)
        got = await asyncio.wait_for(poll, 10)
        return got, time.monotonic() - t0

    (page, nxt), took = asyncio.run(main())
    assert [(e.type, e.tot) for e in page] == [("mod", 5)] and nxt == 1 and took < 5


def test_a_long_poll_is_woken_by_a_mod_from_another_thread(led):
    """The writer wakes the loop each poll waits on: it used to wake only
    the loop bound for mods, and a poll on any other loop waited its whole
    `wait`, then answered nothing."""
    async def main():
        threading.Timer(0.2, led.mod, args=("a", 5)).start()
        t0 = time.monotonic()
        got = await led.aevents(after=0, wait_s=20)
        return got, time.monotonic() - t0

    (page, nxt), took = asyncio.run(main())
    assert [(e.type, e.tot) for e in page] == [("mod", 5)] and nxt == 1 and took < 5


def test_a_long_poll_below_the_retention_is_refused_at_once(path, clock):
    with Ledger(path, clock_ms=clock, events_retention_s=0.3) as led:
        led.mod("a", 1)
        led.mod("a", 1)
        clock.advance(5)
        wait_for(lambda: led.stats["events_first"] == 2)

        async def main():
            return await led.aevents(after=0, wait_s=30)

        with pytest.raises(EventsTrimmed):
            asyncio.run(main())


def test_events_waiters_max_long_polls_and_no_more(led):
    """The real bound: EVENTS_WAITERS_MAX polls wait at once (one entry and
    one loop timer each); one more is Busy; one mod answers them all."""
    assert EVENTS_WAITERS_MAX == 1024

    async def main():
        polls = [asyncio.ensure_future(led.aevents(after=0, wait_s=30))
                 for _ in range(EVENTS_WAITERS_MAX)]
        await asyncio.sleep(0.2)
        assert len(led._events.waiters) == EVENTS_WAITERS_MAX
        with pytest.raises(Busy, match="EVENTS_WAITERS_MAX"):
            await led.aevents(after=0, wait_s=30)
        await led.amod("a", 1)
        got = await asyncio.wait_for(asyncio.gather(*polls), 10)
        assert not led._events.waiters
        again = await led.aevents(after=1, wait_s=0.1)       # room again
        return got, again

    got, again = asyncio.run(main())
    assert all([e.id for e in page] == [1] and nxt == 1 for page, nxt in got)
    assert again == ([], 1)


def test_end_waits_answers_every_long_poll_at_once(led):
    async def main():
        polls = [asyncio.ensure_future(led.aevents(after=0, wait_s=30)) for _ in range(5)]
        await asyncio.sleep(0.1)
        t0 = time.monotonic()
        led.end_waits()
        got = await asyncio.wait_for(asyncio.gather(*polls), 5)
        return got, time.monotonic() - t0

    got, took = asyncio.run(main())
    assert got == [([], 0)] * 5 and took < 1 and not led._events.waiters

    async def later():
        return await asyncio.wait_for(led.aevents(after=0, wait_s=30), 5)

    assert asyncio.run(later()) == ([], 0)          # a later poll does not wait either



@pytest.mark.parametrize("call,says", [
    (lambda led: led.end_waits(), r"end_waits needs a running event loop: .*"
                                  r"call it on the loop whose polls it ends"),
    (lambda led: led.read_events(0, 10, 1, print), r"read_events with a wait_s needs a "
                                                   r"running event loop: .*wait_s=0"),
    (lambda led: led.read_events(1, 10, 1, print), r"read_events with a wait_s needs"),
])
def test_a_long_poll_call_off_an_event_loop_is_refused_naming_it(led, call, says):
    """Off a running loop these said Python's bare "no running event loop",
    naming neither the call nor what it needs; and a read_events with a wait
    worked while it had events to return, failing only at the stream's end.
    Refused, they change nothing: a later long poll still waits."""
    led.mod("a", 1)
    with pytest.raises(RuntimeError, match=f"^{says}"):
        call(led)
    assert not led._events.waiters and not led._events.waits_ended
    assert led.read_events(0, 10, 0, print) == led.events()      # no wait: any thread

    async def polled():
        return await asyncio.wait_for(led.aevents(after=1, wait_s=0.3), 5)

    t0 = time.monotonic()
    assert asyncio.run(polled()) == ([], 1) and time.monotonic() - t0 >= 0.25


def test_a_cancelled_long_poll_gives_up_its_place_and_holds_up_no_other(led):
    """A long poll cancelled (a timeout around `aevents`, its loop's end)
    kept its place among the EVENTS_WAITERS_MAX until its wait ended, and
    for ever once its loop had ended; a mod that woke it then answered a
    cancelled future (InvalidStateError), and the polls woken with it were
    never answered."""
    async def cancelled_then_other():
        with pytest.raises(asyncio.TimeoutError):
            await asyncio.wait_for(led.aevents(after=0, wait_s=30), 0.05)
        other = asyncio.ensure_future(led.aevents(after=0, wait_s=30))
        await asyncio.sleep(0.05)
        threading.Thread(target=led.mod, args=("a", 5)).start()
        return await asyncio.wait_for(other, 5)

    page, nxt = asyncio.run(cancelled_then_other())
    assert [e.id for e in page] == [1] and nxt == 1 and not led._events.waiters

    async def left_waiting():
        asyncio.ensure_future(led.aevents(after=1, wait_s=30))
        await asyncio.sleep(0.05)
        assert len(led._events.waiters) == 1

    asyncio.run(left_waiting())             # asyncio.run cancels it as the loop ends
    assert not led._events.waiters


def test_a_long_poll_whose_done_raises_keeps_none_woken_with_it_waiting(led):
    """Polls woken together are each told their page: a `done` that
    raised left the polls after it unanswered for ever (each had left its
    place, so its timer no longer answered it)."""
    heard = []

    def broken(_outcome):
        raise RuntimeError("a caller's broken callback")

    async def main():
        led.read_events(0, 10, 30, broken)
        led.read_events(0, 10, 30, heard.append)
        threading.Thread(target=led.mod, args=("a", 5)).start()
        for _ in range(100):
            if heard:
                break
            await asyncio.sleep(0.05)

    asyncio.run(main())
    assert len(heard) == 1 and [e.id for e in heard[0][0]] == [1], heard
    assert not led._events.waiters


def test_a_long_poll_left_on_a_closed_loop_holds_no_place(led, monkeypatch):
    """A `read_events` long poll whose loop ended without cancelling it
    kept its place for ever: EVENTS_WAITERS_MAX of them and every later
    poll was Busy.  At the bound, those of closed loops go first."""
    from accman.ledger import events as events_module
    monkeypatch.setattr(events_module, "EVENTS_WAITERS_MAX", 2)

    async def left():
        led.read_events(0, 10, 30, lambda _outcome: None)

    asyncio.run(left())
    asyncio.run(left())
    assert len(led._events.waiters) == 2

    async def another():
        poll = asyncio.ensure_future(led.aevents(after=0, wait_s=30))
        await asyncio.sleep(0.05)
        assert not poll.done()
        await led.amod("a", 1)
        return await asyncio.wait_for(poll, 5)

    page, nxt = asyncio.run(another())
    assert [e.id for e in page] == [1] and nxt == 1
