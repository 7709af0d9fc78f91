"""The middleware when the request's task is cancelled (the ASGI server
shutting down, a task group) while one of its calls to AccMan is in flight:
against a real AccMan behind a proxy that forwards that call, so that the
server applies it, and never answers.  The call may have landed, and the
consumer gets no response: what it moved is given back, exactly once
(docs/CALLING.md, "Releases happen at once")."""

from __future__ import annotations

import asyncio
import time

import pytest

from accman.asgi import AccManMiddleware
from asgi_harness import call, make_app

FUNDS = 10
COST = 3
WAIT_S = 10.0
# After the proxy saw the call: time for the server to apply it.
APPLIED_S = 0.3

pytestmark = pytest.mark.any_one_store("what is checked is the middleware's own bookkeeping")


def cancelled_at(server, proxy, mode, calls_before):
    """One request through the middleware in `mode`, its task cancelled
    once the proxy has forwarded its call number `calls_before + 1` (which
    it never answers); then the owed calls landed.  The middleware's
    stats."""
    p = proxy(server, *["pass"] * calls_before, "hang")
    m = AccManMiddleware(make_app(), url=p.url, mode=mode, cost=COST, retries=0)

    async def main():
        task = asyncio.ensure_future(call(m, cred="cx"))
        deadline = time.monotonic() + WAIT_S
        while p.seen <= calls_before:
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
    past = server.get("/past?cred=cx").json["past"]
    return [(e["by"], e["key"][-2:] if e["key"] else None, e["hold"]) for e in reversed(past)]


def test_check_a_charge_in_flight_at_the_cancel_is_given_back(start_server, proxy):
    """The probe passes, the charge after the work is forwarded, applied
    and never answered: it is owed to the end (its key lands it once),
    then refunded (key ...-r)."""
    s = start_server()
    s.mod("cx", FUNDS)
    stats = cancelled_at(s, proxy, "check", 1)
    assert entries(s) == [(FUNDS, None, None), (-COST, "-c", None), (COST, "-r", None)]
    assert s.tot("cx") == FUNDS
    assert stats["charged"] == 0 and stats["stranded"] == 0


def test_reserve_a_hold_in_flight_at_the_cancel_is_released(start_server, proxy):
    """The hold is forwarded, applied and never answered: an owed unhold
    repeats it by its key (AccMan answers its id) and releases it, long
    before its ttl."""
    s = start_server()
    s.mod("cx", FUNDS)
    stats = cancelled_at(s, proxy, "reserve", 0)
    assert entries(s) == [(FUNDS, None, None), (-COST, "-h", 2), (COST, None, 2)]
    assert s.tot("cx") == FUNDS
    assert stats["stranded"] == 0


def test_reserve_a_settle_in_flight_at_the_cancel_is_given_back(start_server, proxy):
    """The hold passes, the settle with the response's cost is forwarded,
    applied and never answered: the same settle is owed (it answers its
    first reply), then the cost is refunded."""
    s = start_server()
    s.mod("cx", FUNDS)
    stats = cancelled_at(s, proxy, "reserve", 1)
    assert entries(s) == [(FUNDS, None, None), (-COST, "-h", 2), (0, None, 2),
                          (COST, "-r", None)]
    assert s.tot("cx") == FUNDS
    assert stats["charged"] == 0 and stats["stranded"] == 0
