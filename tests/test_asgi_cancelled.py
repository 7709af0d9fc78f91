"""The middleware when the request's task is cancelled (the ASGI server
shutting down, a task group) while one of its calls to AccMan is in flight:
against a real AccMan with tokens (the service's has `read` and `charge`,
as CALLING.md tells), behind a proxy that forwards that call, so that the
server applies it, and never answers ("hang"), or swallows it ("swallow").
The call may or may not have landed, and the consumer gets no response
(docs/CALLING.md, "A request cancelled with a call in flight")."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from accman.asgi import AccManMiddleware
from asgi_harness import call, make_app, serve_lifespan

MINT = "mint-token-0123456789abcdef"
SERVICE = "service-token-0123456789abcdef"
TOKENS = f"read,charge,mint {MINT}\nread,charge {SERVICE}\n"
FUNDS = 10
COST = 3
WAIT_S = 10.0
# After the proxy saw the call: time for the server to apply it.
APPLIED_S = 0.3
# Each call's own bound: a call the proxy never answers ends after it
# (and so does an owed call sent behind it on the same connection).
CALL_TIMEOUT_S = 0.5
# The same for the call the proxy answers late: past LATE_S.
LATE_CALL_TIMEOUT_S = 3.0

pytestmark = pytest.mark.any_one_store("what is checked is the middleware's own bookkeeping")


@pytest.fixture
def funded(start_server):
    s = start_server(tokens=TOKENS)
    s.mod("cx", FUNDS, token=MINT)
    return s


def cancelled_at(server, proxy, mode, *plan, timeout_s=CALL_TIMEOUT_S):
    """One request through the middleware in `mode`, the proxy acting on
    its calls by `plan`; the task is cancelled once the proxy has the call
    the plan's last step is for; then the owed calls land.  The
    middleware's stats."""
    p = proxy(server, *plan)
    m = AccManMiddleware(make_app(), url=p.url, token=SERVICE, mode=mode, cost=COST, retries=0,
                         timeout_s=timeout_s)

    async def main():
        task = asyncio.ensure_future(call(m, cred="cx"))
        deadline = time.monotonic() + WAIT_S
        while p.seen < len(plan):
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.01)
        await asyncio.sleep(APPLIED_S)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await m._owed.drain(WAIT_S)
        await m.aclose()
    asyncio.run(main())
    return m.stats


def entries(server):
    """The account's history, oldest first: (by, key suffix, hold)."""
    past = server.get("/past?cred=cx", token=MINT).json["past"]
    return [(e["by"], e["key"][-2:] if e["key"] else None, e["hold"]) for e in reversed(past)]


def test_check_a_charge_landed_after_the_cancel_is_said_with_what_is_owed(funded, proxy,
                                                                          caplog):
    """The probe passes; the charge is applied and answered late, after
    the cancel: the call is not cut short, and once it ends the log says
    what the service owes the account (it cannot give it back: no `mint`)."""
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        stats = cancelled_at(funded, proxy, "check", "pass", "late",
                             timeout_s=LATE_CALL_TIMEOUT_S)
    assert entries(funded) == [(FUNDS, None, None), (-COST, "-c", None)]
    said = [r.getMessage() for r in caplog.records if "was cancelled while" in r.getMessage()]
    assert len(said) == 1 and said[0].endswith(
        f"and the charge landed: the consumer paid for a response it did not get; the "
        f"service owes the account {COST}")
    assert stats["charged"] == 1 and stats["stranded"] == 0 and stats["owed"] == 0


def test_check_a_charge_in_flight_at_the_cancel_is_said_with_its_key(funded, proxy, caplog):
    """The probe passes; the charge after the work is forwarded, applied
    and never answered.  The service cannot give it back (no `mint`), and
    nothing it can read tells a landed charge from one still on its way:
    once the call times out, the log names the key to look for."""
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        stats = cancelled_at(funded, proxy, "check", "pass", "hang")
    past = funded.get("/past?cred=cx", token=MINT).json["past"]
    assert [(e["by"], e["key"][-2:] if e["key"] else None) for e in past] == [(-COST, "-c"),
                                                                               (FUNDS, None)]
    said = [r.getMessage() for r in caplog.records if "was cancelled while" in r.getMessage()]
    assert said == [f"accman: a request of account {said[0].split()[5]} was cancelled while its "
                    f"charge of {COST} was in flight: if key {past[0]['key']} is in the "
                    "account's history, the consumer paid for a response it did not get"]
    assert stats["stranded"] == 0 and stats["owed"] == 0


def calls_after_a_cancelled_charge(server, proxy, action, timeout_s) -> list[str]:
    """A check-mode request cancelled while its charge is in flight, the
    proxy acting on the charge by `action`; once the charge has ended, the
    calls (method and path) the next request makes."""
    p = proxy(server, "pass", action)
    m = AccManMiddleware(make_app(), url=p.url, token=SERVICE, cost=COST, retries=0,
                         timeout_s=timeout_s)

    async def main():
        task = asyncio.ensure_future(call(m, cred="cx"))
        deadline = time.monotonic() + WAIT_S
        while p.seen < 2:                                   # the probe, the charge
            assert time.monotonic() < deadline and not task.done()
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await m.drain(WAIT_S)                        # the charge has ended
        n = len(p.lines)
        assert (await call(m, cred="cx")).status == 200
        await m.aclose()
        return [line.split("?")[0] for line in p.lines[n:]]
    return asyncio.run(main())


def test_check_a_charge_of_unknown_outcome_at_the_cancel_sends_admission_to_the_probe(
        funded, proxy):
    """A check-mode charge that may have landed sends admission back to the
    role probe (docs/CALLING.md), also when the request was cancelled while
    it was in flight (hypercorn cancels a request's task when its client
    leaves, as clients do while AccMan hangs): the next request was
    admitted on /tot, and while writes kept failing so, each was served
    with its charge owed."""
    assert calls_after_a_cancelled_charge(funded, proxy, "hang", CALL_TIMEOUT_S) == [
        "PATCH /mod", "PATCH /mod"]                                 # the probe, the charge


def test_check_a_charge_refused_403_after_the_cancel_sends_admission_to_the_probe(
        funded, proxy, caplog):
    """A charge met by 403 (the token lost its role) sends admission back to
    the role probe and says so, also when the request was cancelled while
    the charge was in flight: nothing was said, and the next request was
    admitted on /tot with the token that can no longer charge."""
    with caplog.at_level(logging.ERROR, logger="accman.asgi"):
        assert calls_after_a_cancelled_charge(funded, proxy, "late403", LATE_CALL_TIMEOUT_S) == [
            "PATCH /mod", "PATCH /mod"]                             # the probe, the charge
    assert any("refused the charge of a cancelled request (403 forbidden)" in r.getMessage()
               for r in caplog.records), [r.getMessage() for r in caplog.records]


def test_reserve_a_hold_in_flight_at_the_cancel_is_released(funded, proxy):
    """The hold is forwarded, applied and never answered: an owed unhold
    repeats it by its key (AccMan answers its id) and releases it, long
    before its ttl."""
    stats = cancelled_at(funded, proxy, "reserve", "hang")
    assert entries(funded) == [(FUNDS, None, None), (-COST, "-h", 2), (COST, None, 2)]
    assert funded.tot("cx", token=MINT) == FUNDS and stats["stranded"] == 0


def test_reserve_a_settle_swallowed_at_the_cancel_is_a_release(funded, proxy):
    """The settle with the response's cost never reached AccMan: the hold
    is released (use 0) at once, the consumer pays nothing."""
    stats = cancelled_at(funded, proxy, "reserve", "pass", "swallow")
    assert entries(funded) == [(FUNDS, None, None), (-COST, "-h", 2), (COST, None, 2)]
    assert funded.tot("cx", token=MINT) == FUNDS and stats["stranded"] == 0


def test_reserve_a_settle_landed_at_the_cancel_is_found_and_said(funded, proxy, caplog):
    """The settle was applied, its reply lost: the release meets
    hold_ended, and the same settle answers its first reply, applying
    nothing; the log says what the service owes the account."""
    with caplog.at_level(logging.ERROR, logger="accman.asgi"):
        stats = cancelled_at(funded, proxy, "reserve", "pass", "hang")
    assert entries(funded) == [(FUNDS, None, None), (-COST, "-h", 2), (0, None, 2)]
    assert funded.tot("cx", token=MINT) == FUNDS - COST and stats["stranded"] == 0
    assert stats["charged"] == 1 and stats["charged_amount"] == COST    # it landed
    assert any(f"was settled with use {COST} by a call in flight" in r.getMessage()
               and r.getMessage().endswith(f"the service owes the account {COST}")
               for r in caplog.records)


def test_reserve_a_request_cancelled_as_the_server_shuts_down_releases_its_hold(funded):
    """uvicorn's graceful shutdown running out cancels the requests still
    in flight and at once sends the lifespan shutdown, without waiting for
    them to end.  The hold of a request whose app was still working is
    released before the drain ends, though the app's own cleanup awaits
    (a FastAPI dependency closing its session), not left to its ttl."""
    working = asyncio.Event()

    async def app(scope, receive, send):
        if scope["type"] == "lifespan":
            return await serve_lifespan(receive, send)
        working.set()
        try:
            await asyncio.sleep(WAIT_S)
        finally:
            for _ in range(3):
                await asyncio.sleep(0)

    m = AccManMiddleware(app, url=funded.url, token=SERVICE, mode="reserve", cost=COST)

    async def main():
        lifespan = asyncio.Queue()
        await lifespan.put({"type": "lifespan.startup"})
        sent = []

        async def send(message):
            sent.append(message["type"])
        served = asyncio.ensure_future(m({"type": "lifespan", "asgi": {"version": "3.0"}},
                                         lifespan.get, send))
        request = asyncio.ensure_future(call(m, cred="cx"))
        await asyncio.wait_for(working.wait(), WAIT_S)
        request.cancel()
        await lifespan.put({"type": "lifespan.shutdown"})
        await asyncio.wait_for(served, WAIT_S)
        assert request.cancelled() and sent[-1] == "lifespan.shutdown.complete"
    asyncio.run(main())
    assert entries(funded) == [(FUNDS, None, None), (-COST, "-h", 2), (COST, None, 2)]
    assert m.stats["released"] == 1 and m.stats["stranded"] == 0


def test_reserve_a_request_still_running_when_the_drain_ends_is_said(funded, monkeypatch,
                                                                        caplog):
    """A request whose app goes on past its cancel (it catches it, or
    its cleanup waits on something slow) keeps the shutdown no longer than
    SHUTDOWN_DRAIN_S; its hold, not settled by then, returns at its
    expiry, and the log says so rather than leaving it unsaid."""
    from accman.calling import asgi as asgi_mod
    monkeypatch.setattr(asgi_mod, "SHUTDOWN_DRAIN_S", 0.3)
    working, let_go = asyncio.Event(), asyncio.Event()

    async def app(scope, receive, send):
        working.set()
        try:
            await asyncio.sleep(WAIT_S)
        except asyncio.CancelledError:
            await let_go.wait()         # its cleanup, slow
            raise

    m = AccManMiddleware(app, url=funded.url, token=SERVICE, mode="reserve", cost=COST)

    async def main():
        request = asyncio.ensure_future(call(m, cred="cx"))
        await asyncio.wait_for(working.wait(), WAIT_S)
        request.cancel()
        await asyncio.wait_for(m.aclose(), WAIT_S / 2)      # bounded, not waiting for it
        let_go.set()
        with pytest.raises(asyncio.CancelledError):
            await request
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        asyncio.run(main())
    assert ("reserve-mode requests still under way when the shutdown's drain ended: 1; "
            f"what they hold returns by itself at its expiry (hold_ttl_s={m.hold_ttl_s} s)"
            in caplog.text)
