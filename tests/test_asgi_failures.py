"""The ASGI middleware when AccMan fails: unreachable or refusing at
admission (closed and open), owed calls and their bounds, the drain at
shutdown.  Against the fake AccMan of tests/fake_accman.py."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
import struct
import time

import pytest

from accman.asgi import AccManMiddleware
from accman.calling import owed as owed_mod
from accman.errors import Busy, Insufficient
from asgi_harness import CRED, call, end_loop, make_app, mw, serve_lifespan
from fake_accman import (BUSY, NOT_APPLIED, FakeAccMan, charges, closed_port, first_then,
                         run)

# Owed calls retried at once, not after their pause.
pytestmark = pytest.mark.usefixtures("quick_followups")


# --- AccMan unavailable -----------------------------------------------------
@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_unreachable_accman_fails_closed_with_503(mode, caplog):
    calls = []
    m = AccManMiddleware(make_app(calls=calls), url=f"http://127.0.0.1:{closed_port()}",
                         mode=mode, retries=0)
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        r = run(call(m))
        for _ in range(20):
            run(call(m))
    assert r.status == 503 and r.json()["error"] == "unavailable"
    assert r.headers["retry-after"] == "1" and calls == []
    assert m.stats["refused_unavailable"] == 21 and CRED not in caplog.text
    # Said once, not once a request (accman.calling.repeats).
    assert caplog.text.count("AccMan unavailable (unreachable); refusing with 503") == 1


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_unreachable_accman_fails_open_and_records_the_unpaid(mode, caplog):
    unpaid = []
    m = AccManMiddleware(make_app(), url=f"http://127.0.0.1:{closed_port()}", mode=mode,
                         cost=4, retries=0, on_unavailable="open",
                         on_unpaid=lambda cred, amount: unpaid.append((cred, amount)))
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        r = run(call(m))
    assert r.status == 200 and "accman" not in r.headers
    assert unpaid == [(CRED, 4)]
    assert m.stats["unpaid_requests"] == 1 and m.stats["unpaid_amount"] == 4
    assert "unpaid 4" in caplog.text and CRED not in caplog.text
    assert "accman_mw_unpaid_amount_total 4" in m.render_metrics()


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_a_consumer_gone_before_an_unpaid_response_owes_nothing(mode):
    """Served unpaid, a consumer who leaves before the response starts is
    not recorded as unpaid: with AccMan up it would not have been charged
    (docs/CALLING.md, "The consumer goes away")."""
    unpaid = []

    async def app(scope, receive, send):
        await receive()
        await asyncio.sleep(0.05)           # the consumer leaves meanwhile
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    m = AccManMiddleware(app, url=f"http://127.0.0.1:{closed_port()}", mode=mode, cost=4,
                         retries=0, on_unavailable="open",
                         on_unpaid=lambda cred, amount: unpaid.append((cred, amount)))
    run(call(m, disconnect=True))
    assert unpaid == [] and m.stats["unpaid_requests"] == 0
    assert m.stats["unpaid_amount"] == 0

def test_served_unpaid_a_second_response_start_is_no_second_debt():
    """An app that starts its response twice (a bug its server refuses),
    served while AccMan is down, owes what its first start says, once."""
    unpaid = []

    async def app(scope, receive, send):
        for status in (200, 201):
            await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    m = AccManMiddleware(app, url=f"http://127.0.0.1:{closed_port()}", cost=4, retries=0,
                         on_unavailable="open",
                         on_unpaid=lambda cred, amount: unpaid.append((cred, amount)))
    run(call(m))
    assert unpaid == [(CRED, 4)] and m.stats["unpaid_requests"] == 1


@pytest.mark.parametrize("form", ["async def", "a task", "failing"])
def test_an_async_on_unpaid_runs_to_its_end_by_the_shutdown(form, caplog):
    """An async biller (or a plain one that starts a task) is awaited: it
    bills even when it finishes after the request, and the shutdown waits
    for it; one that fails is logged, never lost in silence."""
    billed = []

    async def biller(cred, amount):
        await asyncio.sleep(0.05)
        if form == "failing":
            raise RuntimeError("the billing database is down")
        billed.append(amount)
    on_unpaid = biller if form != "a task" else (
        lambda c, a: asyncio.get_running_loop().create_task(biller(c, a)))
    m = AccManMiddleware(make_app(), url=f"http://127.0.0.1:{closed_port()}", cost=4,
                         retries=0, on_unavailable="open", on_unpaid=on_unpaid)

    async def main():
        assert (await call(m)).status == 200
        await m.aclose()
    with caplog.at_level(logging.ERROR, logger="accman.asgi"):
        run(main())
    assert m.stats["unpaid_amount"] == 4
    assert billed == ([] if form == "failing" else [4])
    assert ("on_unpaid of 4 (account " in caplog.text
            and "failed" in caplog.text) == (form == "failing")
    assert CRED not in caplog.text


@pytest.mark.parametrize("bill_s", [0.05, 5.0])
def test_an_async_biller_of_a_charge_stranded_at_close_is_waited_for_or_said(
        bill_s, monkeypatch, caplog):
    """The close strands an owed charge that AccMan keeps refusing (503
    busy: nothing applied) and tells on_unpaid: an async biller is waited for,
    SHUTDOWN_DRAIN_S more; one still running when the loop ends is logged
    as not billed, with the amount."""
    import accman.calling.asgi as asgi_mod
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.1)
    monkeypatch.setattr(asgi_mod, "SHUTDOWN_DRAIN_S", 0.3)
    billed = []

    async def biller(cred, amount):
        await asyncio.sleep(bill_s)
        billed.append(amount)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        m = mw(fake, cost=2, retries=0, on_unpaid=biller)
        fake.fault = lambda meth, p, q: BUSY if p == "/mod" and q.get("key") else None

        async def go():
            assert (await call(m)).status == 200        # served; its charge owed
            await m.aclose()
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            run(go())
    assert m.stats["stranded"] == 1 and m.stats["unpaid_amount"] == 2
    assert billed == ([2] if bill_s < 1 else [])
    assert ("on_unpaid of 2 (account " in caplog.text
            and "was cut off at shutdown: not billed" in caplog.text) == (bill_s > 1)


def test_a_wrong_token_is_503_even_when_open(caplog):
    with FakeAccMan(tokens={"good": {"read", "charge"}}) as fake:
        fake.fund(CRED, 10)
        m = mw(fake, token="wrong-token", on_unavailable="open")
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            r = run(call(m))
        assert r.status == 503 and "check the url and token" in caplog.text
        assert "wrong-token" not in caplog.text
        # Not "cannot be reached": AccMan was reached, and refused the service.
        assert r.json() == {"error": "unavailable", "detail": "the balance service is unavailable"}


def test_503_from_accman_fails_closed(fake):
    fake.fund(CRED, 10)
    fake.fault = lambda m, p, q: ("reply", 503, {"error": "unavailable", "detail": "x"})
    assert run(call(mw(fake, mode="reserve", retries=0))).status == 503


def test_a_charge_refused_not_applied_is_owed_and_lands_once_writes_are_back(caplog):
    """Check mode: a charge refused 503 `not_applied` after the work (the
    store takes no writes) is owed and lands, once, when AccMan takes
    writes again; the response is served without the balance header.  As
    writes fail while `tot` may go on, the next request is admitted on the
    role probe, not on `tot`."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = first_then(charges, NOT_APPLIED)
        m = mw(fake, cost=2, retries=0)

        async def go():
            r = await call(m)
            assert r.status == 200 and "accman" not in r.headers
            assert await m.drain(5)
            probes = len(fake.probes())
            assert (await call(m)).status == 200
            assert len(fake.probes()) == probes + 1     # admitted on a write
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            run(go())
        assert m.stats["owed"] == 1 and m.stats["stranded"] == 0 and fake.tot(CRED) == 6
        assert len([r for r in fake.mods() if r[2].get("key")]) == 3   # the charge twice
        assert caplog.text == ""


@pytest.mark.parametrize("refusal", [NOT_APPLIED, ("reply", 503, {
    "error": "shutting_down", "detail": "the server is shutting down; retry on another"})],
    ids=["not_applied", "shutting_down"])
def test_a_charge_stranded_after_refusals_before_applying_is_billed(refusal, monkeypatch,
                                                                    caplog):
    """Every attempt of the owed charge refused before it applied (the
    store takes no writes, the server stops): stranded, it is unpaid
    (on_unpaid bills it), never "outcome unknown"."""
    monkeypatch.setattr(owed_mod, "FOLLOWUP_ATTEMPTS_MAX", 2)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = lambda meth, p, q: refusal if charges(p, q) else None
        unpaid = []
        m = mw(fake, cost=2, retries=0, on_unpaid=lambda cred, amount: unpaid.append(amount))

        async def go():
            assert (await call(m)).status == 200
            assert await m.drain(5)
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            run(go())
        assert unpaid == [2] and m.stats["stranded"] == 1 and fake.tot(CRED) == 10
        assert "stranded charge: the account owes 2" in caplog.text
        assert "outcome unknown" not in caplog.text


# --- bounds of the owed-mod queue -------------------------------------------
def test_owed_mods_are_stranded_after_followup_attempts_max(monkeypatch, caplog):
    monkeypatch.setattr(owed_mod, "FOLLOWUP_ATTEMPTS_MAX", 3)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        m = mw(fake, make_app(raise_exc=ValueError("x")), mode="reserve", cost=3, retries=0)

        async def go():
            with pytest.raises(ValueError):
                await call(m)
        # AccMan goes away between the hold and its release
        fake.fault = lambda meth, p, q: ("drop",) if p == "/settle" else None
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            run(go_and_drain(m, go))
        assert m.stats["stranded"] == 1 and "still outcome_unknown after 3" in caplog.text
        assert len(fake.calls("/settle")) == 1 + 3      # the release at once, then 3 owed
        assert fake.tot(CRED) == 7        # held until the hold's expiry: logged, not lost


async def go_and_drain(m, go):
    await go()
    assert await m.drain(5)


def test_owed_mods_beyond_followups_max_are_stranded_at_once(monkeypatch):
    monkeypatch.setattr(owed_mod, "FOLLOWUPS_MAX", 1)
    monkeypatch.setattr(owed_mod, "FOLLOWUP_PAUSE_S", 0.2)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        m = mw(fake, make_app(raise_exc=ValueError("x")), mode="reserve", cost=1, retries=0)
        fake.fault = lambda meth, p, q: ("drop",) if p == "/settle" else None

        async def go():
            for settles in (2, 3):
                with pytest.raises(ValueError):
                    await call(m)
                # A hold pipelined behind a dropped settle would be dropped
                # with it: the next request waits until the release and the
                # owed queue's first try of it are over (the next try waits
                # FOLLOWUP_PAUSE_S).
                while len(fake.calls("/settle")) < settles:
                    await asyncio.sleep(0.01)
            # each release is tried at once, then owed: one queued, one stranded
            for _ in range(100):
                if m.stats["stranded"] + m.stats["owed"] == 2:
                    break
                await asyncio.sleep(0.01)
            assert m.stats["stranded"] == 1 and m.stats["owed"] == 1
            fake.fault = None
            assert await m.drain(5)
        run(go())
        assert fake.tot(CRED) == 9


def test_lifespan_shutdown_drains_within_shutdown_drain_s(monkeypatch):
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.1)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        inner = make_app(raise_exc=ValueError("x"))

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                return await serve_lifespan(receive, send)
            await inner(scope, receive, send)

        m = mw(fake, app, mode="reserve", cost=2, retries=0)
        # The hold lands; its release, and every retry of it, does not.
        fake.fault = lambda meth, p, q: ("drop",) if p == "/settle" else None

        async def go():
            with pytest.raises(ValueError):
                await call(m)
            return await lifespan(m, "startup", "shutdown")
        assert run(go()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert m.stats["stranded"] == 1 and m._client is None


# --- a token that loses its charge role, a call under way at shutdown ---------
def test_a_charge_refused_403_after_the_work_is_503_and_probes_again(caplog):
    with FakeAccMan(tokens={"svc": {"read", "charge"}}) as fake:
        fake.fund(CRED, 10)
        m = mw(fake, make_app(body=b"the work"), token="svc")
        assert run(call(m)).headers["accman"] == "9" and len(fake.probes()) == 1
        fake.tokens["svc"] = {"read"}          # the operator took `charge` away
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            r = run(call(m))
        assert r.status == 503 and b"the work" not in r.body     # not served, so not owed
        assert "refused the charge (403" in caplog.text
        assert m.stats["owed"] == m.stats["unpaid_requests"] == 0
        served = []
        r = run(call(mw_app := mw(fake, make_app(calls=served), token="svc")))
        assert r.status == 503 and served == []                # a new one probes first
        assert run(call(m)).status == 503 and len(fake.probes()) == 3   # and so does m
        assert fake.tot(CRED) == 9 and mw_app.stats["unpaid_requests"] == 0


def test_a_call_under_way_when_the_drain_ends_is_not_cut_off(monkeypatch, caplog):
    """Cut off, nobody would know whether the charge landed: reported
    unpaid, an `on_unpaid` biller would bill it twice."""
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.2)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        unpaid = []
        m = mw(fake, cost=2, retries=0, on_unpaid=lambda c, a: unpaid.append(a))
        fake.fault = first_then(charges, ("drop",), ("delay", 0.5))

        async def go():
            r = await call(m)               # the charge is dropped: owed
            await m.aclose()                # its retry is under way past the drain
            return r
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            assert run(go()).status == 200
        assert fake.tot(CRED) == 8 and len(fake.mods()) == 2      # the charge, sent twice
        assert m.stats["stranded"] == 0 and unpaid == [] and "stranded" not in caplog.text


@pytest.mark.parametrize("bare", ["returns", "raises"])
def test_an_app_without_lifespan_gets_the_middlewares_own(bare, monkeypatch):
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.1)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        inner = make_app()

        async def app(scope, receive, send):
            if scope["type"] != "http":
                if bare == "raises":
                    raise RuntimeError("http only")
                return
            await inner(scope, receive, send)

        m = mw(fake, app, cost=2, retries=0)

        async def go():
            fake.fault = lambda meth, p, q: ("drop",) if "key" in q else None
            assert (await call(m)).status == 200            # its charge is owed
            return await lifespan(m, "startup", "shutdown")
        assert run(go()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert m.stats["stranded"] == 1 and m._client is None       # drained, then closed


@pytest.mark.parametrize("fails", ["starlette", "raises"])
def test_a_shutdown_that_fails_in_the_app_still_drains(fails, monkeypatch):
    """The app's own shutdown fails (Starlette sends lifespan.shutdown.failed
    and re-raises; a bare app raises): the owed calls are still drained
    and the stranded logged, not lost with the process unsaid."""
    from contextlib import asynccontextmanager
    from starlette.applications import Starlette
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.1)
    inner = make_app()

    @asynccontextmanager
    async def failing(_app):
        yield
        raise RuntimeError("the database pool would not close")
    service = Starlette(lifespan=failing)

    async def app(scope, receive, send):
        if scope["type"] != "lifespan":
            return await inner(scope, receive, send)
        if fails == "starlette":
            return await service(scope, receive, send)
        await receive()
        await send({"type": "lifespan.startup.complete"})
        await receive()
        raise RuntimeError("the database pool would not close")

    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        m = mw(fake, app, cost=2, retries=0)
        sent = []

        async def go():
            fake.fault = lambda meth, p, q: ("drop",) if "key" in q else None
            assert (await call(m)).status == 200            # its charge is owed
            await lifespan(m, "startup", "shutdown", sent=sent)
        with pytest.raises(RuntimeError, match="would not close"):
            run(go())
        assert sent[0] == "lifespan.startup.complete"
        assert sent[1:] == (["lifespan.shutdown.failed"] if fails == "starlette" else [])
        assert m.stats["stranded"] == 1 and m._client is None       # drained, then closed


def test_an_app_that_reads_its_lifespan_then_raises_is_not_taken_over():
    async def app(scope, receive, send):
        await receive()
        raise RuntimeError("the database is down")          # a failed startup

    with FakeAccMan() as fake:
        m = mw(fake, app)
        sent = []
        with pytest.raises(RuntimeError, match="database"):
            run(lifespan(m, "startup", sent=sent))
        assert sent == []


async def lifespan(m, *events, sent=None) -> list:
    """Drives `m` through the lifespan events named (e.g. "startup",
    "shutdown"); the types of the messages it sent back."""
    messages = iter([{"type": f"lifespan.{e}"} for e in events])
    sent = [] if sent is None else sent

    async def receive():
        return next(messages)

    async def send(msg):
        sent.append(msg["type"])
    await m({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
    return sent


@pytest.fixture
def quick_close(monkeypatch):
    """close() waits 0.1 s for the queue to drain, then 0.2 s more for the
    call under way, so that a test reaches each of its stages at once."""
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.1)
    monkeypatch.setattr(owed_mod, "SHUTDOWN_LAST_CALL_S", 0.2)


def _charge_owed_then(fake, m, then):
    """Serves one request whose charge is dropped (owed), then `then()`."""
    async def go():
        assert (await call(m)).status == 200
        return await then()
    return run(go())


def test_close_cuts_a_pause_short_and_the_queue_works_after(monkeypatch, caplog):
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.1)
    monkeypatch.setattr(owed_mod, "FOLLOWUP_PAUSE_S", 30.0)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        m = mw(fake, cost=2, retries=0)
        fake.fault = lambda meth, p, q: BUSY if "key" in q else None   # known not landed

        async def close_then_owe_again():
            t0 = asyncio.get_running_loop().time()
            await m._owed.close()
            took = asyncio.get_running_loop().time() - t0
            fake.fault = first_then(charges, ("drop",))
            assert (await call(m)).status == 200        # owed again, after the close
            assert await m.drain(5)                     # and paid: the queue works
            return took
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            took = _charge_owed_then(fake, m, close_then_owe_again)
        assert took < 5 and m.stats["stranded"] == 1 and m.stats["unpaid_requests"] == 1
        assert "the account owes 2" in caplog.text and fake.tot(CRED) == 8
        assert m.stats["owed"] == 2


def test_a_call_that_timed_out_at_close_is_stranded_unknown_not_unpaid(monkeypatch, caplog):
    """Its charge lands after the client gave up on it: billed again
    through on_unpaid, the consumer would pay twice."""
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.1)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        unpaid = []
        m = mw(fake, cost=2, retries=0, timeout_s=0.3, on_unpaid=lambda c, a: unpaid.append(a))
        # Owed, known unlanded; then its retry lands well after its timeout,
        # however late the client's loop sees that timeout.
        fake.fault = first_then(charges, BUSY, ("delay", 1.0))

        async def close():
            await m._owed.close()
            deadline = time.monotonic() + 10
            while fake.tot(CRED) != 8 and time.monotonic() < deadline:
                await asyncio.sleep(0.02)           # the late charge lands
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            _charge_owed_then(fake, m, close)
        assert fake.tot(CRED) == 8 and unpaid == [] and m.stats["stranded"] == 1
        assert "outcome unknown: look for key" in caplog.text


def test_a_call_owed_as_close_cuts_the_payer_off_is_paid_by_a_new_one(quick_close, caplog):
    """close() cancels the payer under way at SHUTDOWN_LAST_CALL_S and
    strands its call; a call owed before that payer has taken its cancel
    is paid by a new payer (the queue works after close), not stranded
    as cut off by the event loop's end, nor left with no payer."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        unpaid = []
        m = mw(fake, cost=2, retries=0, timeout_s=30, on_unpaid=lambda c, a: unpaid.append(a))
        fake.fault = first_then(charges, BUSY, ("delay", 1))

        async def close_then_owe_at_once():
            await m._owed.close()                   # the retry under way is cut off
            m._owed.add(owed_mod.Mod(CRED, -3, "after-c", "charge"), Busy("full"))
            assert await m.drain(20)
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            _charge_owed_then(fake, m, close_then_owe_at_once)
            deadline = time.monotonic() + 20
            while fake.tot(CRED) != 5 and time.monotonic() < deadline:
                time.sleep(0.02)                    # the cut-off retry lands late
    assert fake.tot(CRED) == 5 and "after-c" in [r[2].get("key") for r in fake.mods()]
    assert m.stats["stranded"] == 1 and "after-c" not in caplog.text and unpaid == []


class _Stubborn(owed_mod.Mod):
    """An owed charge whose call takes a cancel and goes on, as a call can
    that swallows a cancel: its payer outlives close().  Its
    call then ends as `ends`: with nothing charged, or refused."""

    __slots__ = ("ends",)

    async def run(self, acc) -> int:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass                                    # swallowed
        await asyncio.sleep(0.3)
        if self.ends == "refused":
            raise Insufficient(0, "the balance is too low")
        return 0


@pytest.mark.parametrize("ends", ["returns", "refused"])
def test_a_payer_whose_cancel_is_swallowed_leaves_the_queue_to_the_new_one(ends, quick_close,
                                                                            caplog):
    """close() lets the payer it cuts off go, and a call owed then gets a
    new payer; the old one, going on past its cancel, pays and pops
    nothing more of the queue, nor says again what close() stranded: the
    new payer's call is paid once and its payer ends cleanly."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        m = mw(fake, cost=2, retries=0, timeout_s=30)
        fake.fault = lambda meth, p, q: ("delay", 1.0) if "key" in q else None

        async def close_then_owe():
            stubborn = _Stubborn(CRED, -2, "stubborn-c", "charge")
            stubborn.ends = ends
            m._owed.add(stubborn, Busy("full"))
            await asyncio.sleep(0.05)
            await m._owed.close()                   # its cancel is swallowed
            m._owed.add(owed_mod.Mod(CRED, -3, "after-c", "charge"), Busy("full"))
            assert await m.drain(20)
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            run(close_then_owe())
    assert fake.tot(CRED) == 7 and [r[2].get("key") for r in fake.mods()] == ["after-c"]
    assert m.stats["stranded"] == 1 and caplog.text.count("stubborn-c") == 1, caplog.text
    assert "after-c" not in caplog.text


def test_a_payer_of_a_loop_run_again_leaves_the_new_payer_s_queue_be(monkeypatch, caplog):
    """A payer of a loop stopped unclosed is replaced under the next loop;
    when the old loop runs again and its call is refused, the old payer
    neither says it nor takes it off the queue: the new payer, which met
    busy on the same call and paused, tries it again and strands it once,
    of unknown outcome and never billed: the new payer cannot know what
    the old one's attempt, under way when its loop stopped, met."""
    monkeypatch.setattr(owed_mod, "FOLLOWUP_PAUSE_S", 1.0)
    monkeypatch.setattr(owed_mod, "FOLLOWUP_ATTEMPTS_MAX", 2)
    loops = []

    class Refused(owed_mod.Mod):
        async def run(self, acc) -> int:
            loops.append(asyncio.get_running_loop())
            if len(loops) == 1:                     # the old payer's, resumed later
                await asyncio.sleep(0.2)
                raise Insufficient(0, "too low")
            raise Busy("full")                      # the new payer's: paused, then again

    stats, unpaid = {"owed": 0, "stranded": 0}, []
    owed = owed_mod.Owed(lambda: None, stats, lambda c: None,
                         lambda c, a, w: unpaid.append(a))
    old = asyncio.new_event_loop()

    async def first():
        owed.add(Refused(CRED, -2, "x-c", "charge"), Busy("full"))

    async def second():
        await asyncio.sleep(0.1)                    # the new payer met busy, and pauses
        await asyncio.to_thread(old.run_until_complete, asyncio.sleep(0.5))
        return await owed.drain(20)

    async def run_again():
        owed._paying()                              # as an add() or drain() would
        return await second()
    try:
        old.run_until_complete(first())
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            assert asyncio.run(run_again())
    finally:
        end_loop(old)
    assert stats["stranded"] == 1 and unpaid == [] and len(owed) == 0, caplog.text
    assert caplog.text.count("outcome unknown: look for key x-c") == 1, caplog.text
    assert caplog.text.count("stranded charge") == 1, caplog.text


class _Broken(owed_mod.Mod):
    """An owed charge whose call fails as no call should (a defect): its
    payer dies of it."""

    async def run(self, acc) -> int:
        raise RuntimeError("a defect")


def test_a_payer_that_fails_strands_what_it_owed_and_the_shutdown_goes_on(caplog):
    """A payer that dies of an exception AccMan's calls never raise strands
    what it held, the call it had under way as of unknown outcome, and
    says why; drain() and close() do not raise it, so the shutdown goes on
    to close the client."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        unpaid = []
        m = mw(fake, cost=2, retries=0, on_unpaid=lambda c, a: unpaid.append(a))

        async def owe_and_shut_down():
            m._owed.add(_Broken(CRED, -2, "broken-c", "charge"), Busy("full"))
            m._owed.add(owed_mod.Mod(CRED, -3, "behind-c", "charge"), Busy("full"))
            assert await m.drain(10)
            await m.aclose()
            return m._client
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            assert run(owe_and_shut_down()) is None             # the client closed
    assert m.stats["stranded"] == 2 and unpaid == [3]
    assert "outcome unknown: look for key broken-c" in caplog.text
    assert "the account owes 3 (account" in caplog.text
    assert "its payer failed: RuntimeError('a defect')" in caplog.text


class _BrokenAsOneIsOwed(owed_mod.Mod):
    """An owed charge whose call fails as no call should (a defect), and
    whose first attempt has, in the same loop step, a call owed behind it
    (`then`): an add() that runs after its payer has died and before that
    payer's done callback."""

    __slots__ = ("runs", "then")

    async def run(self, acc) -> int:
        self.runs += 1
        if self.runs == 1:
            asyncio.get_running_loop().call_soon(self.then)
        raise RuntimeError("a defect")


def test_a_call_owed_as_its_payer_fails_gets_a_payer_that_does_not_run_it_again(
        server, cred, caplog):
    """The payer that fails strands what it held at the failure itself: a
    call owed in the very next step gets a new payer, which pays that call
    alone, never the failed call again nor the one stranded behind it."""
    server.mod(cred, 10)
    unpaid = []
    m = AccManMiddleware(make_app(), url=server.url, cost=2, retries=0,
                         on_unpaid=lambda c, a: unpaid.append(a))
    broken = _BrokenAsOneIsOwed(cred, -2, "broken-c", "charge")
    broken.runs = 0
    broken.then = lambda: m._owed.add(owed_mod.Mod(cred, -3, "after-c", "charge"), Busy("full"))

    async def owe_and_shut_down():
        m._owed.add(broken, Busy("full"))
        m._owed.add(owed_mod.Mod(cred, -4, "behind-c", "charge"), Busy("full"))
        assert await m.drain(30)
        await m.aclose()
    with caplog.at_level(logging.ERROR, logger="accman.asgi"):
        asyncio.run(owe_and_shut_down())
    assert broken.runs == 1
    assert server.tot(cred) == 7 and unpaid == [4] and m.stats["stranded"] == 2
    assert caplog.text.count("look for key broken-c") == 1, caplog.text
    assert "after-c" not in caplog.text and "its payer failed: RuntimeError('a defect')" \
        in caplog.text


@pytest.mark.parametrize("how", ["bound", "cancelled"])
def test_a_call_cut_off_at_close_is_stranded_unknown(how, quick_close, caplog):
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        unpaid = []
        m = mw(fake, cost=2, retries=0, timeout_s=30, on_unpaid=lambda c, a: unpaid.append(a))
        fake.fault = first_then(charges, BUSY, ("delay", 2))

        async def close():
            if how == "bound":
                return await m._owed.close()
            closing = asyncio.ensure_future(m._owed.close())
            await asyncio.sleep(0.15)
            closing.cancel()
            with pytest.raises(asyncio.CancelledError):
                await closing
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            _charge_owed_then(fake, m, close)
        assert m.stats["stranded"] == 1 and unpaid == [] and len(m._owed) == 0
        assert "outcome unknown: look for key" in caplog.text and not m._owed._closing


def test_a_drain_and_a_second_close_waiting_as_close_cuts_the_payer_off_end_unraised(
        monkeypatch, caplog):
    """close() cuts off the payer's call at SHUTDOWN_LAST_CALL_S.  A drain()
    and a second close() waiting on that payer meanwhile were never
    cancelled: neither raises the payer's cancel; each ends once close()
    has stranded what was left, drain() with True (nothing is owed any
    more), and the call cut off is stranded once."""
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.1)
    monkeypatch.setattr(owed_mod, "SHUTDOWN_LAST_CALL_S", 0.3)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        m = mw(fake, cost=2, retries=0, timeout_s=30)
        fake.fault = first_then(charges, BUSY, ("delay", 10))     # cut off well before

        async def close_with_others_waiting():
            draining = asyncio.ensure_future(m._owed.drain(20))
            closing = asyncio.ensure_future(m._owed.close())
            deadline = time.monotonic() + 20
            while not m._owed._closing and time.monotonic() < deadline:
                await asyncio.sleep(0.005)          # past its drain: the last call's wait
            assert m._owed._closing and not closing.done()
            closing_too = asyncio.ensure_future(m._owed.close())
            return await asyncio.gather(draining, closing, closing_too,
                                        return_exceptions=True)
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            got = _charge_owed_then(fake, m, close_with_others_waiting)
    assert got == [True, None, None], got
    assert m.stats["stranded"] == 1 and len(m._owed) == 0 and not m._owed._closing
    assert caplog.text.count("outcome unknown: look for key") == 1, caplog.text


class _Held(owed_mod.Mod):
    """An owed charge whose call takes a cancel and goes on until
    `released` is set (its payer, let go by close(), outlives it), then
    ends with nothing charged."""

    __slots__ = ("released",)

    async def run(self, acc) -> int:
        try:
            await asyncio.sleep(30)
        except asyncio.CancelledError:
            pass                                    # swallowed
        await self.released.wait()
        return 0


def test_a_drain_waiting_on_a_payer_close_lets_go_ends_once_close_has_stranded(
        quick_close, caplog):
    """A drain() waiting on the payer when close() cuts it off, whose
    cancel that payer swallows and goes on (let go), ends once close() has
    stranded what was left, with True: nothing is owed any more, whatever
    the payer let go still does."""
    stats = {"owed": 0, "stranded": 0}
    owed = owed_mod.Owed(lambda: None, stats, lambda c: None, lambda c, a, w: None)

    async def main():
        held = _Held(CRED, -2, "held-c", "charge")
        held.released = asyncio.Event()
        owed.add(held, Busy("full"))
        draining = asyncio.ensure_future(owed.drain(60))
        await asyncio.sleep(0)                      # it waits on the payer
        await owed.close()
        await asyncio.wait({draining}, timeout=30)  # the payer let go goes on meanwhile
        ended = draining.done() and draining.result()
        held.released.set()
        await draining
        return ended
    with caplog.at_level(logging.ERROR, logger="accman.asgi"):
        assert asyncio.run(main()) is True
    assert stats["stranded"] == 1 and len(owed) == 0
    assert caplog.text.count("outcome unknown: look for key held-c") == 1, caplog.text


@pytest.mark.parametrize("then", ["not_found", "queue_full"])
def test_a_charge_that_may_have_landed_is_never_billed_however_it_is_stranded(
        then, monkeypatch, caplog):
    """Its first attempt applied and the reply was lost.  Stranded after a
    reply that is not AccMan's (a proxy's 404), or at once because the
    queue is full, it is still of unknown outcome: given to on_unpaid, it
    would be billed twice."""
    if then == "queue_full":
        monkeypatch.setattr(owed_mod, "FOLLOWUPS_MAX", 0)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = first_then(charges, ("apply_drop",),
                                ("reply", 404, {"error": "not_found", "detail": "a proxy's"}))
        unpaid = []
        m = mw(fake, cost=2, retries=0, on_unpaid=lambda c, a: unpaid.append(a))

        async def go():
            assert (await call(m)).status == 200
            assert await m.drain(5)
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            run(go())
        assert fake.tot(CRED) == 8 and unpaid == [] and m.stats["stranded"] == 1
        assert "outcome unknown: look for key" in caplog.text


@pytest.mark.parametrize("case", ["check owed", "reserve owed", "open unpaid"])
def test_an_app_own_balance_header_never_stands_for_a_balance_not_told(case):
    """Where no reply of AccMan tells the balance, the header is missing,
    not the app's own (one relayed from another service metered by AccMan,
    say), as the Node plugin drops the handler's."""
    app = make_app(headers=[(b"ACCMAN", b"123456")])
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        mode, failure = case.split()
        if failure == "unpaid":
            m = AccManMiddleware(app, url=f"http://127.0.0.1:{closed_port()}", retries=0,
                                 on_unavailable="open")
        else:
            m = mw(fake, app, mode=mode, retries=0)
            # The settle, or check mode's charge (the keyed mod), is owed.
            fake.fault = first_then(lambda p, q: p != "/hold" and charges(p, q) or p == "/settle",
                                    ("drop",), ("drop",))
        r = run(call(m))
        assert r.status == 200 and "accman" not in {k.lower() for k in r.headers}
        assert m.stats["owed" if failure == "owed" else "unpaid_requests"] == 1


# --- the fake itself ------------------------------------------------------------
@contextlib.contextmanager
def _delayed_tot(fake):
    """A connection whose /tot the fake has taken and is still handling."""
    with socket.create_connection(("127.0.0.1", fake.port)) as s:
        s.sendall(b"GET /tot?cred=a HTTP/1.1\r\nHost: x\r\n\r\n")
        deadline = time.monotonic() + 5
        while not fake.requests and time.monotonic() < deadline:
            time.sleep(0.005)
        assert fake.requests
        yield s


def test_the_fake_stops_with_no_request_of_its_own_still_pending():
    """A request the fake is still handling when it stops (a delay fault)
    ends with it: a task left pending on its loop is destroyed with the
    loop, and asyncio logs "Task was destroyed but it is pending" into
    whichever test runs then."""
    with FakeAccMan() as fake:
        fake.fault = lambda method, path, params: ("delay", 3600)
        with _delayed_tot(fake):
            fake.stop()
    assert not asyncio.all_tasks(fake.loop)


def test_the_fake_says_nothing_of_a_caller_gone_before_its_reply(caplog):
    """A caller that leaves while the fake still handles its request (the
    middleware's cancelled calls do) is no error of the fake's: asyncio
    would log "Unhandled exception in client_connected_cb" into the test."""
    with FakeAccMan() as fake:
        fake.fault = lambda method, path, params: ("delay", 0.1)
        with _delayed_tot(fake) as s:
            s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
        time.sleep(0.3)                         # the reply is written after the reset
    assert [r.getMessage() for r in caplog.records if r.name == "asyncio"] == []

