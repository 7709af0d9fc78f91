"""The middleware's reserve mode on AccMan's holds (issue 13), driven as an
ASGI app against the fake AccMan of tests/fake_accman.py: the hold before
the app, the settle when the response starts, the release at once on an
exception, a disconnect or no response, a hold that expired under a slow
app, owed settles, and no overdraft under concurrency; an owed settle
whose hold expires, against a real AccMan behind the fault proxy of
tests/test_cli_faults.py.  The real server, uvicorn and a SIGKILLed
service are in tests/test_e2e_holds.py."""

from __future__ import annotations

import asyncio
import logging
import re
import threading
import time

import pytest

from accman.asgi import HOLD_TTL_S_DEFAULT, AccManMiddleware, fingerprint
from accman.calling import owed as owed_mod
from accman.limits import HOLD_TTL_S_MAX, HOLDS_PER_ACCOUNT_MAX
from asgi_harness import CRED, call, entries, http_scope, make_app, mw
from fake_accman import BUSY, NOT_APPLIED, FakeAccMan, first_then, run
from test_cli_faults import FaultProxy

# Owed calls retried at once, not after their pause.
pytestmark = pytest.mark.usefixtures("quick_followups")


def served_and_drained(m, **kw):
    async def go():
        r = await call(m, **kw)
        assert await m.drain(5)
        return r
    return run(go())


def est_then(est, cost):
    return lambda scope, status, headers: est if status is None else cost


# --- the flow ---------------------------------------------------------------------
def test_a_request_holds_its_estimate_then_settles_its_cost(fake):
    fake.fund(CRED, 10)
    m = mw(fake, mode="reserve", cost=est_then(5, 2))
    r = run(call(m))
    assert r.status == 200 and r.headers["accman"] == "8"
    assert entries(fake) == [(10, None, None), (-5, "-h", 2), (3, None, 2)]
    (_, _, hold, _), = fake.calls("/hold")
    assert hold["by"] == "-5" and hold["ttl"] == str(HOLD_TTL_S_DEFAULT)
    assert hold["key"].endswith("-h") and "min" not in hold         # the SPEC's default, 0
    assert fake.calls("/settle")[0][2] == {"cred": CRED, "hold": "2", "use": "2"}
    assert fake.mods() == [] and fake.open_holds(CRED) == {}
    assert m.stats["charged"] == 1 and m.stats["charged_amount"] == 2


def test_the_exact_cost_uses_all_of_the_hold(fake):
    fake.fund(CRED, 10)
    r = run(call(mw(fake, mode="reserve", cost=4)))
    assert r.headers["accman"] == "6"
    assert entries(fake) == [(10, None, None), (-4, "-h", 2), (0, None, 2)]


def test_the_charge_is_capped_at_the_hold(fake):
    fake.fund(CRED, 10)
    m = mw(fake, mode="reserve", cost=est_then(2, 7))
    assert run(call(m)).headers["accman"] == "8"
    assert m.stats["capped"] == 1 and fake.calls("/settle")[0][2]["use"] == "2"


@pytest.mark.parametrize("status", [404, 405, 400, 500])
def test_an_error_response_releases_the_whole_hold(fake, status):
    fake.fund(CRED, 10)
    m = mw(fake, make_app(status=status), mode="reserve", cost=3)
    r = run(call(m, "/nope"))
    assert r.status == status and r.headers["accman"] == "10"
    assert entries(fake) == [(10, None, None), (-3, "-h", 2), (3, None, 2)]
    assert m.stats["free_status"] == 1 and m.stats["released"] == 1


def test_a_zero_estimate_holds_nothing(fake):
    fake.fund(CRED, 10)
    m = mw(fake, mode="reserve", cost=est_then(0, 5))
    r = run(call(m))
    assert r.status == 200 and r.headers["accman"] == "10"
    assert fake.calls("/hold") == [] and fake.calls("/settle") == [] and fake.tot(CRED) == 10
    assert m.stats["capped"] == 1


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_an_overdrawn_account_is_refused_even_at_an_estimate_of_0(fake, mode):
    """A balance under 0 (a hold that expired under a slow app, then its
    charge) covers no estimate: both modes refuse it 402 until it is
    funded, where reserve mode, holding nothing at 0, served it."""
    fake.fund(CRED, 1)
    fake.fund(CRED, -3)
    calls = []
    m = mw(fake, mode=mode, cost=est_then(0, 0), app=make_app(calls=calls))
    r = run(call(m))
    assert (r.status, r.json()["error"]) == (402, "insufficient")
    assert calls == [] and fake.tot(CRED) == -2 and fake.calls("/hold") == []
    fake.fund(CRED, 2)
    assert run(call(m)).status == 200 and calls == ["/thing"]


def test_the_token_needs_read_and_charge_only():
    with FakeAccMan(tokens={"svc": {"read", "charge"}}) as fake:
        fake.fund(CRED, 10)
        m = mw(fake, token="svc", mode="reserve", cost=est_then(5, 1))
        r = served_and_drained(m)
        assert r.status == 200 and r.headers["accman"] == "9"
        r = served_and_drained(mw(fake, make_app(status=404), token="svc", mode="reserve",
                                  cost=5))
        assert r.headers["accman"] == "9" and fake.tot(CRED) == 9
        assert m.stats["stranded"] == 0 and fake.open_holds(CRED) == {}


def test_hold_ttl_s_is_the_holds_ttl_and_is_checked(fake):
    fake.fund(CRED, 10)
    run(call(mw(fake, mode="reserve", hold_ttl_s=7)))
    assert fake.calls("/hold")[0][2]["ttl"] == "7"
    for bad in (0, HOLD_TTL_S_MAX + 1, 1.5, True, "90"):
        with pytest.raises(ValueError, match="hold_ttl_s"):
            mw(fake, mode="reserve", hold_ttl_s=bad)


def test_hold_ttl_s_is_refused_in_check_mode_where_nothing_is_held(fake):
    """A ttl that check mode would leave unused, unsaid: refused, naming it
    and the mode, as a client's option beside a client is."""
    for kw in ({}, {"mode": "check"}):
        with pytest.raises(ValueError, match=r'^hold_ttl_s is the ttl of reserve mode\'s '
                                             r'holds: with mode="check" nothing is held'):
            mw(fake, hold_ttl_s=HOLD_TTL_S_DEFAULT, **kw)
    with pytest.raises(ValueError, match="whole seconds"):      # a bad value: said as such
        mw(fake, hold_ttl_s=0)
    assert mw(fake, mode="reserve", hold_ttl_s=None).hold_ttl_s == HOLD_TTL_S_DEFAULT
    assert mw(fake).hold_ttl_s is None                          # check mode: nothing held
    fake.fund(CRED, 10)
    assert run(call(mw(fake))).headers["accman"] == "9"         # left out: check mode serves


def test_too_many_holds_is_429_and_the_app_never_runs(fake, caplog):
    fake.fund(CRED, 10)
    fake.holds_max = 0
    calls = []
    m = mw(fake, make_app(calls=calls), mode="reserve")
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        r = run(call(m))
    assert r.status == 429 and r.json()["error"] == "too_many_requests"
    assert r.headers["retry-after"] == "1" and calls == []
    assert m.stats["refused_too_many"] == 1 and fingerprint(CRED) in caplog.text


def test_too_many_holds_and_a_capped_cost_are_said_once_a_spell_not_once_a_request(
        fake, caplog):
    """Every request of a consumer at its bound of holds meets the 429, and
    every request of a cost function over its estimate the cap: each line
    is said when it starts, naming the account or the amounts, then its
    count (at shutdown here), as the lines of an outage are
    (accman.calling.repeats): a busy service does not flood its log."""
    fake.fund(CRED, 1000)
    fake.holds_max = 0
    refused = mw(fake, mode="reserve")
    capped = mw(fake, mode="reserve", cost=est_then(2, 7))

    async def go():
        for _ in range(20):
            assert (await call(refused)).status == 429
        await refused.aclose()
        fake.holds_max = HOLDS_PER_ACCOUNT_MAX
        for _ in range(20):
            assert (await call(capped)).status == 200
        await capped.aclose()
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        run(go())
    said = [r.getMessage() for r in caplog.records if r.name == "accman.asgi"]
    line = "accman: too many holds open; refusing with 429"
    too_many = [text for text in said if text.startswith(line)]
    assert too_many[0] == (f"{line} (account {fingerprint(CRED)}); AccMan said: over "
                           "HOLDS_PER_ACCOUNT_MAX open holds")
    assert len(too_many) == 2 and re.fullmatch(
        re.escape(line) + r" \(19 more times in the \d+ s after it was last said; not met "
                          r"since\)", too_many[1])
    line = "accman: cost over the hold: charged the hold"
    cap = [text for text in said if text.startswith(line)]
    assert cap[0] == f"{line} (cost 7, hold 2)" and len(cap) == 2
    assert cap[1].startswith(f"{line} (19 more times in the ")
    assert refused.stats["refused_too_many"] == 20 and capped.stats["capped"] == 20


# --- releases, at once ------------------------------------------------------------
def test_an_app_that_raises_releases_its_hold_at_once(fake):
    fake.fund(CRED, 10)
    m = mw(fake, make_app(raise_exc=RuntimeError("boom")), mode="reserve", cost=3)

    async def go():
        with pytest.raises(RuntimeError):
            await call(m)
        assert await m.drain(5)
    run(go())
    assert entries(fake) == [(10, None, None), (-3, "-h", 2), (3, None, 2)]
    assert fake.calls("/settle")[0][2]["use"] == "0"
    assert m.stats["released"] == 1 and m.stats["owed"] == 0


def test_a_cost_function_that_raises_releases_the_hold(fake):
    fake.fund(CRED, 10)

    def cost(scope, status, headers):
        if status is None:
            return 3
        raise KeyError("x-rows")
    m = mw(fake, mode="reserve", cost=cost)

    async def go():
        with pytest.raises(KeyError):
            await call(m)
        assert await m.drain(5)
    run(go())
    assert fake.tot(CRED) == 10 and fake.calls("/settle")[0][2]["use"] == "0"


def test_a_disconnect_releases_the_hold_while_the_app_still_runs(fake):
    """The release does not wait for the app: the consumer's money is back
    as soon as the middleware sees the disconnect."""
    fake.fund(CRED, 10)
    seen = {}

    async def app(scope, receive, send):
        await receive()
        assert (await receive())["type"] == "http.disconnect"
        for _ in range(100):
            if fake.tot(CRED) == 10:
                break
            await asyncio.sleep(0.01)
        seen["tot while the app runs"] = fake.tot(CRED)
        await make_app()(scope, receive, send)       # a response to nobody: not charged

    m = mw(fake, app, mode="reserve", cost=3)
    served_and_drained(m, disconnect=True)
    assert seen == {"tot while the app runs": 10}
    assert entries(fake) == [(10, None, None), (-3, "-h", 2), (3, None, 2)]
    assert len(fake.calls("/settle")) == 1 and m.stats["charged"] == 0


def test_no_response_releases_the_hold(fake):
    fake.fund(CRED, 10)
    m = mw(fake, make_app(respond=False), mode="reserve", cost=3)
    served_and_drained(m)
    assert entries(fake) == [(10, None, None), (-3, "-h", 2), (3, None, 2)]


def test_a_cancelled_request_releases_its_hold(fake):
    """The ASGI server cancels the request's task (a shutdown, a timeout):
    the hold is not left to its expiry."""
    fake.fund(CRED, 10)

    async def hang(scope, receive, send):
        await asyncio.sleep(3600)
    m = mw(fake, hang, mode="reserve", cost=3)

    async def go():
        task = asyncio.create_task(call(m))
        while not fake.open_holds(CRED):
            await asyncio.sleep(0.01)
        task.cancel()
        with pytest.raises(asyncio.CancelledError):
            await task
        assert await m.drain(5)
    run(go())
    assert fake.tot(CRED) == 10 and fake.open_holds(CRED) == {}


# --- holds that expire, settles that fail ---------------------------------------------
def test_a_hold_that_expired_under_a_slow_app_is_charged_as_a_keyed_mod(fake, caplog):
    fake.fund(CRED, 10)

    async def slow(scope, receive, send):
        await asyncio.sleep(1.05)                   # the app runs past the ttl
        fake.expire_due()
        await make_app()(scope, receive, send)

    m = mw(fake, slow, mode="reserve", cost=est_then(5, 2), hold_ttl_s=1)
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        r = served_and_drained(m)
    assert r.status == 200 and r.headers["accman"] == "8"
    assert entries(fake) == [(10, None, None), (-5, "-h", 2), (5, None, 2), (-2, "-c", None)]
    assert m.stats["expired"] == 1 and m.stats["charged_amount"] == 2
    assert "expired before the response (the app ran past hold_ttl_s=1 s)" in caplog.text
    assert CRED not in caplog.text


def test_a_hold_that_expired_while_accman_held_its_settle_is_not_blamed_on_the_app(fake,
                                                                                    caplog):
    """The app answers at once; AccMan takes the settle only after the
    hold's ttl (stalled, or restarting: its first attempt gets no reply).
    The charge is the same keyed mod, but the warning does not tell the
    operator to raise hold_ttl_s for an app that was never slow."""
    fake.fund(CRED, 10)
    stalled = []

    def fault(method, path, params):
        if path == "/settle" and not stalled:
            stalled.append(1)
            fake._expire(time.monotonic() + HOLD_TTL_S_DEFAULT + 1)     # on the fake's loop
            return ("drop",)
    fake.fault = fault
    m = mw(fake, mode="reserve", cost=est_then(5, 2), retries=1)
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        r = served_and_drained(m)
    assert r.status == 200 and r.headers["accman"] == "8"
    assert entries(fake) == [(10, None, None), (-5, "-h", 2), (5, None, 2), (-2, "-c", None)]
    assert m.stats["expired"] == 1
    assert "the app ran past" not in caplog.text
    assert re.search(r"expired before its settle landed \(the response started 0\.\d s after "
                     r"the hold, within hold_ttl_s=90 s: AccMan answered the settle late\)",
                     caplog.text), caplog.text


def test_a_settle_that_fails_is_owed_and_lands_once(fake):
    fake.fund(CRED, 10)
    lost = []

    def fault(method, path, params):
        if path == "/settle" and len(lost) < 3:
            lost.append(1)
            return ("apply_drop",) if len(lost) == 1 else ("drop",)
    fake.fault = fault
    m = mw(fake, mode="reserve", cost=est_then(5, 2), retries=1)
    r = served_and_drained(m)
    assert r.status == 200 and "accman" not in r.headers      # served; balance unknown
    assert entries(fake) == [(10, None, None), (-5, "-h", 2), (3, None, 2)]
    assert m.stats["owed"] == 1 and m.stats["stranded"] == 0
    assert {c[2]["use"] for c in fake.calls("/settle")} == {"2"}
    assert m.stats["charged"] == 1 and m.stats["charged_amount"] == 2     # once it landed


def test_an_owed_settle_whose_hold_expired_meanwhile_is_charged_as_a_mod(fake):
    fake.fund(CRED, 10)
    fake.fault = lambda m, p, q: ("drop",) if p == "/settle" else None
    m = mw(fake, mode="reserve", cost=est_then(5, 2), retries=0)

    async def go():
        r = await call(m)
        await asyncio.sleep(0.05)                       # owed, failing
        fake.fault = None
        fake.expire_due(time.monotonic() + HOLD_TTL_S_DEFAULT + 1)
        assert await m.drain(5)
        return r
    assert run(go()).status == 200
    assert entries(fake) == [(10, None, None), (-5, "-h", 2), (5, None, 2), (-2, "-c", None)]
    assert m.stats["stranded"] == 0


def test_a_hold_with_unknown_outcome_is_undone(fake):
    fake.fund(CRED, 10)
    lost = []

    def fault(method, path, params):
        if path == "/hold" and not lost:
            lost.append(1)
            return ("apply_drop",)
    fake.fault = fault
    r = served_and_drained(mw(fake, mode="reserve", cost=3, retries=0))
    assert r.status == 503
    # the hold repeated with its key answers its first reply; then released
    assert entries(fake) == [(10, None, None), (-3, "-h", 2), (3, None, 2)]
    assert len(fake.calls("/hold")) == 2


def test_a_stranded_release_loses_nothing_and_says_so(monkeypatch, caplog):
    monkeypatch.setattr(owed_mod, "FOLLOWUP_ATTEMPTS_MAX", 2)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = lambda m, p, q: ("drop",) if p == "/settle" else None
        m = mw(fake, make_app(raise_exc=ValueError("x")), mode="reserve", cost=3, retries=0)

        async def go():
            with pytest.raises(ValueError):
                await call(m)
            assert await m.drain(5)
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            run(go())
        assert m.stats["stranded"] == 1 and m.stats["unpaid_amount"] == 0
        assert "nothing is lost: a hold returns by itself at its expiry" in caplog.text
        assert fake.tot(CRED) == 7
        fake.fault = None
        fake.expire_due(time.monotonic() + HOLD_TTL_S_DEFAULT + 1)
        assert fake.tot(CRED) == 10


def test_a_settle_stranded_after_a_dropped_reply_is_of_unknown_outcome(monkeypatch, caplog):
    """A settle sent with no reply may have landed, whatever its later
    attempts met: billed through on_unpaid, it could be billed twice."""
    monkeypatch.setattr(owed_mod, "FOLLOWUP_ATTEMPTS_MAX", 3)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = first_then(lambda path, _: path == "/settle", ("apply_drop",), BUSY)
        unpaid = []
        m = mw(fake, mode="reserve", cost=est_then(5, 2), retries=0,
               on_unpaid=lambda cred, amount: unpaid.append(amount))
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            served_and_drained(m)
        assert unpaid == [] and m.stats["stranded"] == 1 and fake.tot(CRED) == 8
        assert "outcome unknown: look for hold" in caplog.text


class Expiring(FaultProxy):
    """Settles are swallowed (never applied) until `expired` is set, then
    passed; a charge (key `-c`) is forwarded and never answered: "held"
    with `release` already set, so that `landed` is set once AccMan has
    answered it, that is once it has applied."""

    def __init__(self, port: int):
        super().__init__(port)
        self.expired = threading.Event()
        self.release.set()

    def _next_action(self) -> str:
        super()._next_action()
        line = self.lines[-1]
        if line.startswith("PATCH /settle"):
            return "pass" if self.expired.is_set() else "swallow"
        return "held" if re.search(r"[?&]key=[\w-]+-c ", line) else "pass"


def test_an_owed_settle_charged_as_a_mod_is_stranded_naming_the_mod_s_key(
        start_server, cred, monkeypatch, caplog):
    """An owed settle whose hold expires meanwhile is charged as a keyed
    mod; when that charge's reply never comes and the settle is stranded
    of unknown outcome, the log names the charge's key beside the hold:
    the hold's history shows only its expiry, and whoever looks there
    alone would bill the consumer again for a charge that landed."""
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.1)
    monkeypatch.setattr(owed_mod, "SHUTDOWN_LAST_CALL_S", 0.5)
    srv = start_server()
    srv.mod(cred, 10)
    p = Expiring(srv.port)
    unpaid = []
    m = AccManMiddleware(make_app(), url=p.url, mode="reserve", cost=3, hold_ttl_s=1,
                         timeout_s=0.3, retries=0, on_unpaid=lambda c, a: unpaid.append(a))

    async def until(done):
        deadline = time.monotonic() + 30
        while not done() and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert done()

    async def main():
        assert (await call(m, cred=cred)).status == 200     # its settle owed
        await until(lambda: srv.tot(cred) == 10)            # the hold expired, all back
        p.expired.set()
        # Forwarded is not applied: the balance read after the shutdown
        # counts on AccMan having answered the charge, however slow the
        # machine.
        await until(p.landed.is_set)
        await m.aclose()
    try:
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            run(main())
    finally:
        p.close()
    assert srv.tot(cred) == 7                               # the charge landed
    assert m.stats["stranded"] == 1 and unpaid == []
    rid = re.search(r"[?&]key=([\w-]+)-h ", p.lines[0]).group(1)
    stranded = [r.getMessage() for r in caplog.records if "stranded settle" in r.getMessage()]
    assert len(stranded) == 1 and "outcome unknown" in stranded[0]
    assert f"key {rid}-c " in stranded[0]


# --- concurrency ------------------------------------------------------------------
def test_no_overdraft_under_concurrency(fake):
    fake.fund(CRED, 10)
    fake.fault = lambda m, p, q: ("delay", 0.002)

    async def slow(scope, receive, send):
        await asyncio.sleep(0.01)
        await make_app()(scope, receive, send)

    m = mw(fake, slow, mode="reserve", cost=est_then(3, 2))

    async def go():
        return await asyncio.gather(*(call(m) for _ in range(100)))
    replies = run(go())
    ok = [r for r in replies if r.status == 200]
    assert {r.status for r in replies} == {200, 402} and len(ok) >= 3
    assert all(e["tot"] >= 0 for e in fake.accounts[CRED]["past"])
    assert fake.tot(CRED) == 10 - 2 * len(ok) and fake.open_holds(CRED) == {}


def test_a_shared_client_is_used_for_holds(fake):
    from accman.client import AccManClient
    fake.fund(CRED, 10)

    async def go():
        async with AccManClient(fake.url) as acc:
            m = AccManMiddleware(make_app(), client=acc, mode="reserve", cost=2)
            return await call(m)
    assert run(go()).headers["accman"] == "8"


def test_a_hold_answered_by_a_failed_commit_is_undone_at_once():
    """A plain 503 to a hold ("not acknowledged", not "not applied"): the
    request gets 503, and the hold, which may have applied, is repeated
    with its key and released rather than left to its ttl."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = first_then(lambda path, _: path == "/hold",
                                ("apply_reply", 503, {"error": "unavailable", "detail": "commit"}))
        m = mw(fake, mode="reserve", cost=est_then(5, 2), retries=0, hold_ttl_s=3600)

        async def go():
            assert (await call(m)).status == 503
            assert await m.drain(5)
        run(go())
        assert fake.tot(CRED) == 10 and fake.open_holds(CRED) == {}


def test_a_hold_refused_not_applied_owes_no_release(caplog):
    """A 503 `not_applied` to a hold (the store takes no writes: its
    database not reached, say) held nothing: the request gets 503 and
    nothing is owed, neither a repeat of the hold nor a release, where a
    plain 503 owes one (test_a_hold_answered_by_a_failed_commit_is_undone_at_once)
    and an outage of seconds owed thousands.  With retries, the hold is
    sent again, keyed as it is, and the request served."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = lambda m, p, q: NOT_APPLIED if p == "/hold" else None
        m = mw(fake, mode="reserve", cost=est_then(5, 2), retries=0)

        async def go():
            for _ in range(3):
                r = await call(m)
                assert r.status == 503 and r.json()["error"] == "unavailable"
            assert await m.drain(5)
        with caplog.at_level(logging.WARNING, logger="accman.asgi"):
            run(go())
        assert m.stats["owed"] == 0 and m.stats["refused_unavailable"] == 3
        assert len(fake.calls("/hold")) == 3 and fake.calls("/settle") == []
        assert "queued" not in caplog.text and "refusing with 503" in caplog.text
        fake.fault = first_then(lambda path, _: path == "/hold", NOT_APPLIED)
        r = run(call(mw(fake, mode="reserve", cost=est_then(5, 2), retries=1)))
        assert r.status == 200 and r.headers["accman"] == "8"
        assert fake.tot(CRED) == 8 and fake.open_holds(CRED) == {}


@pytest.mark.parametrize("refusal", [NOT_APPLIED, BUSY], ids=["not_applied", "busy"])
def test_a_settle_refused_not_applied_is_owed_and_stranded_unpaid(monkeypatch, caplog, refusal):
    """A settle refused before it applied (not_applied, or busy: back-
    pressure) is owed (it applies nothing, and is sent again), and stranded
    it is billed: no attempt of it landed."""
    monkeypatch.setattr(owed_mod, "FOLLOWUP_ATTEMPTS_MAX", 2)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = lambda m, p, q: refusal if p == "/settle" else None
        unpaid = []
        m = mw(fake, mode="reserve", cost=est_then(5, 2), retries=0,
               on_unpaid=lambda cred, amount: unpaid.append(amount))
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            assert served_and_drained(m).status == 200
        assert unpaid == [2] and m.stats["owed"] == 1 and m.stats["stranded"] == 1
        assert "the account owes 2" in caplog.text and "outcome unknown" not in caplog.text
        assert len(fake.calls("/settle")) == 1 + 2


def test_a_request_cancelled_before_its_first_message_releases_its_hold(fake):
    """The server cancels the request (a shutdown's timeout) while the
    app waits for its first message, which the middleware's watch reads
    for it: the hold is released at once, not left to its ttl."""
    fake.fund(CRED, 10)

    async def go():
        m = mw(fake, make_app(), mode="reserve", cost=3)
        reading = asyncio.Event()

        async def receive():
            reading.set()
            await asyncio.sleep(3600)

        async def send(message):
            raise AssertionError(f"nothing is sent: {message}")
        task = asyncio.create_task(m(http_scope(), receive, send))
        await reading.wait()
        await cancelled_then_drained(m, task)
        return m
    m = run(go())
    assert fake.tot(CRED) == 10 and m.stats["released"] == 1


async def cancelled_then_drained(m, task) -> None:
    """`task`, a request through `m`, cancelled; then what `m` owes drained."""
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await task
    assert await m.drain(5)


def test_a_release_of_a_hold_on_no_account_is_nothing_held(fake):
    """An owed release repeats the hold with its key: on an account that
    is not there the repeat holds nothing, and the release is done, as the
    Node plugin takes it, rather than a failure to retry and strand (a
    first attempt still on its way would expire whole at its ttl)."""
    from accman.calling.client import AccManClient

    async def main():
        async with AccManClient(fake.url) as acc:
            return await owed_mod.Unhold("nobody-here", 5, 60, "rel-1").run(acc)
    assert run(main()) == 0


@pytest.mark.parametrize("on_unavailable", ["closed", "open"])
def test_a_hold_refused_for_overflow_whose_balance_cannot_be_read_owes_nothing(
        fake, on_unavailable):
    """The hold met 409 overflow (nothing held), then the balance read for
    the 402 failed: the request is refused 503 (served unpaid when open),
    and no release is owed for a hold that never applied."""
    fake.fund(CRED, 10)
    unpaid = []

    def fault(method, path, params):
        if path == "/hold":
            return ("reply", 409, {"error": "overflow", "detail": "out of int64"})
        if path == "/tot":
            return ("reply", 503, {"error": "unavailable", "detail": "down"})
    fake.fault = fault

    async def go():
        m = mw(fake, mode="reserve", cost=2, retries=0, on_unavailable=on_unavailable,
               on_unpaid=lambda cred, amount: unpaid.append(amount))
        r = await call(m)
        assert await m.drain(5)
        return m, r
    m, r = run(go())
    assert r.status == (200 if on_unavailable == "open" else 503)
    assert unpaid == ([2] if on_unavailable == "open" else [])
    assert m.stats["owed"] == 0 and len(fake.calls("/hold")) == 1 and fake.tot(CRED) == 10


def test_a_request_cancelled_after_its_hold_met_overflow_owes_no_release(fake):
    """Cancelled while the balance is read after the hold's 409 overflow
    (the server shutting down): the hold never applied, so no release is
    owed for it."""
    fake.fund(CRED, 10)

    def fault(method, path, params):
        if path == "/hold":
            return ("reply", 409, {"error": "overflow", "detail": "out of int64"})
        if path == "/tot":
            return ("delay", 5)
    fake.fault = fault

    async def go():
        m = mw(fake, mode="reserve", cost=2)
        task = asyncio.get_running_loop().create_task(call(m))
        while not fake.calls("/tot"):
            await asyncio.sleep(0.01)
        await cancelled_then_drained(m, task)
        return m
    m = run(go())
    assert m.stats["owed"] == 0 and len(fake.calls("/hold")) == 1
