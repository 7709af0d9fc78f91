"""The ASGI middleware (accman.asgi), driven directly as an ASGI app against
the fake AccMan of tests/test_client.py: every branch of both modes, the
unavailable paths, owed mods and their bounds."""

from __future__ import annotations

import asyncio
import json
import logging

import pytest

from accman.calling import asgi as asgi_mod
from accman.asgi import AccManMiddleware, fingerprint
from accman.client import AccManClient
from fake_accman import FakeAccMan, closed_port, run

CRED = "alice_4f9a-SECRET"


class Reply:
    def __init__(self, messages):
        start = messages[0] if messages else {"type": "http.response.start", "status": None}
        assert start["type"] == "http.response.start"
        self.status = start["status"]
        self.headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
        self.body = b"".join(m.get("body", b"") for m in messages[1:])

    def json(self):
        return json.loads(self.body)


async def call(app, path="/thing", cred=CRED, headers=(), disconnect=False):
    hs = [(k.encode(), v.encode()) for k, v in headers]
    if cred is not None:
        hs.append((b"accman", cred.encode()))
    scope = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
             "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
             "query_string": b"", "root_path": "", "headers": hs,
             "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}
    sent_body = False
    messages = []

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect:
            return {"type": "http.disconnect"}
        await asyncio.sleep(3600)

    async def send(message):
        messages.append(message)

    await app(scope, receive, send)
    return Reply(messages)


def make_app(status=200, body=b"ok", headers=(), raise_exc=None, read_disconnect=False,
             respond=True, calls=None):
    async def app(scope, receive, send):
        if calls is not None:
            calls.append(scope["path"])
        await receive()
        if read_disconnect:
            assert (await receive())["type"] == "http.disconnect"
        if raise_exc is not None:
            raise raise_exc
        if not respond:
            return
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"), *headers]})
        await send({"type": "http.response.body", "body": body})
    return app


def mw(fake, app=None, **kw):
    kw.setdefault("url", fake.url)
    return AccManMiddleware(app or make_app(), **kw)


def history(fake, cred=CRED):
    return [(e["by"], e["key"][-2:] if e["key"] else None) for e in fake.accounts[cred]["past"]]


@pytest.fixture
def fake():
    with FakeAccMan() as f:
        yield f


@pytest.fixture(autouse=True)
def quick_followups(monkeypatch):
    monkeypatch.setattr(asgi_mod, "FOLLOWUP_PAUSE_S", 0.01)


# --- check mode -------------------------------------------------------------
def test_check_mode_charges_and_returns_the_balance(fake):
    fake.fund(CRED, 10)
    m = mw(fake, cost=3)
    r = run(call(m))
    assert r.status == 200 and r.body == b"ok" and r.headers["accman"] == "7"
    assert fake.tot(CRED) == 7
    assert history(fake) == [(10, None), (-3, "-c")]
    assert m.stats["charged"] == 1 and m.stats["charged_amount"] == 3
    # every mod carries its own key
    run(call(m))
    keys = [e["key"] for e in fake.accounts[CRED]["past"][1:]]
    assert len(set(keys)) == 2 and all(len(k) <= 64 for k in keys)


@pytest.mark.parametrize("cred,headers,detail", [
    (None, (), "required"),
    ("bad cred", (), "not a credential"),
    ("", (), "not a credential"),
    ("x" * 129, (), "not a credential"),
    (CRED, (("accman", "other"),), "more than one"),
])
def test_no_usable_credential_is_401_no_credential(fake, cred, headers, detail):
    r = run(call(mw(fake), cred=cred, headers=headers))
    assert r.status == 401 and r.json()["error"] == "no_credential"
    assert detail in r.json()["detail"] and "www-authenticate" in r.headers
    assert fake.requests == []


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_unknown_account_is_401_no_account(fake, mode):
    calls = []
    r = run(call(mw(fake, make_app(calls=calls), mode=mode), cred="nobody"))
    assert r.status == 401 and r.json()["error"] == "no_account"
    assert calls == [] and "nobody" not in fake.accounts


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_too_low_a_balance_is_402_with_the_balance(fake, mode):
    fake.fund(CRED, 2)
    calls = []
    r = run(call(mw(fake, make_app(calls=calls), mode=mode, cost=3)))
    assert r.status == 402
    assert r.json() == {"error": "insufficient", "detail": r.json()["detail"], "tot": 2, "cost": 3}
    assert r.headers["accman"] == "2" and calls == [] and fake.tot(CRED) == 2


def test_reserve_mode_tells_an_empty_account_from_an_unknown_one(fake):
    fake.fund(CRED, 5)
    fake.fund(CRED, -5)
    assert run(call(mw(fake, mode="reserve"))).status == 402


def test_exempt_paths_and_prices(fake):
    fake.fund(CRED, 100)
    m = mw(fake, cost=1, exempt=("/health", "/static/*"),
           prices={"/report": 10, "/api/*": 2, "/api/big/*": 50})
    assert run(call(m, "/health", cred=None)).status == 200
    assert run(call(m, "/static/app.js", cred=None)).status == 200
    assert fake.requests == []
    for path, tot in [("/other", 99), ("/report", 89), ("/api/x", 87), ("/api/big/y", 37)]:
        assert run(call(m, path)).headers["accman"] == str(tot)
    assert m.stats["exempt"] == 2


def test_cost_function_sees_the_request_then_the_response(fake):
    fake.fund(CRED, 100)
    seen = []

    def cost(scope, status, headers):
        seen.append((scope["path"], status, headers and dict(headers).get(b"x-rows")))
        if status is None:
            return 5                         # the estimate
        return 0 if status >= 400 else int(dict(headers)[b"x-rows"])

    m = mw(fake, make_app(headers=[(b"x-rows", b"4")]), cost=cost)
    assert run(call(m)).headers["accman"] == "96"
    assert seen == [("/thing", None, None), ("/thing", 200, b"4")]
    failing = mw(fake, make_app(status=404), cost=cost)
    r = run(call(failing))
    assert r.status == 404 and r.headers["accman"] == "96"       # free: no mod at all
    assert len(fake.mods()) == 1


def test_a_client_gone_before_the_response_is_not_charged_in_check_mode(fake):
    fake.fund(CRED, 10)
    run(call(mw(fake, make_app(read_disconnect=True)), disconnect=True))
    assert fake.tot(CRED) == 10 and fake.mods() == []


def test_check_mode_charge_that_fails_after_serving_is_retried_with_its_key(fake):
    fake.fund(CRED, 10)
    lost = []

    def fault(method, path, params):
        if path == "/mod" and len(lost) < 3:
            lost.append(1)
            return ("apply_drop",) if len(lost) == 1 else ("drop",)
    fake.fault = fault
    m = mw(fake, cost=2, retries=1)

    async def go():
        r = await call(m)
        assert await m.drain(5)
        return r
    r = run(go())
    assert r.status == 200 and "accman" not in r.headers      # served; balance unknown
    assert fake.tot(CRED) == 8 and history(fake) == [(10, None), (-2, "-c")]
    assert m.stats["owed"] == 1 and m.stats["stranded"] == 0


# --- reserve mode -----------------------------------------------------------
def test_reserve_mode_holds_then_settles(fake):
    fake.fund(CRED, 10)

    def cost(scope, status, headers):
        return 5 if status is None else 2

    r = run(call(mw(fake, mode="reserve", cost=cost)))
    assert r.status == 200 and r.headers["accman"] == "8"
    assert history(fake) == [(10, None), (-5, "-r"), (3, "-s")]
    assert [m[2].get("min") for m in fake.mods()] == ["0", None]


def test_reserve_mode_with_the_exact_cost_makes_one_mod(fake):
    fake.fund(CRED, 10)
    r = run(call(mw(fake, mode="reserve", cost=4)))
    assert r.headers["accman"] == "6" and history(fake) == [(10, None), (-4, "-r")]


def test_reserve_mode_never_charges_more_than_the_reservation(fake):
    fake.fund(CRED, 10)
    m = mw(fake, mode="reserve", cost=lambda s, status, h: 2 if status is None else 7)
    r = run(call(m))
    assert r.headers["accman"] == "8" and m.stats["capped"] == 1


def test_reserve_mode_releases_when_the_app_raises(fake):
    fake.fund(CRED, 10)
    m = mw(fake, make_app(raise_exc=RuntimeError("boom")), mode="reserve", cost=3)

    async def go():
        with pytest.raises(RuntimeError):
            await call(m)
        assert await m.drain(5)
    run(go())
    assert fake.tot(CRED) == 10 and history(fake) == [(10, None), (-3, "-r"), (3, "-s")]
    assert m.stats["released"] == 1


@pytest.mark.parametrize("app", [make_app(read_disconnect=True), make_app(respond=False)])
def test_reserve_mode_releases_when_the_client_goes_or_nothing_is_sent(fake, app):
    fake.fund(CRED, 10)
    run(call(mw(fake, app, mode="reserve", cost=3), disconnect=True))
    assert fake.tot(CRED) == 10 and history(fake) == [(10, None), (-3, "-r"), (3, "-s")]


def test_reserve_mode_has_no_overdraft_under_concurrency(fake):
    fake.fund(CRED, 10)
    fake.fault = lambda m, p, q: ("delay", 0.002)

    async def slow(scope, receive, send):
        await asyncio.sleep(0.01)
        await make_app()(scope, receive, send)

    m = mw(fake, slow, mode="reserve", cost=lambda s, st, h: 3 if st is None else 2)

    async def go():
        return await asyncio.gather(*(call(m) for _ in range(100)))
    replies = run(go())
    ok = [r for r in replies if r.status == 200]
    assert {r.status for r in replies} == {200, 402} and len(ok) >= 3
    assert all(e["tot"] >= 0 for e in fake.accounts[CRED]["past"])
    assert fake.tot(CRED) == 10 - 2 * len(ok)


def test_check_mode_can_overdraw_under_concurrency_as_documented(fake):
    """The difference between the modes, shown: concurrent requests all pass
    the check before any is charged, so the balance goes below zero."""
    fake.fund(CRED, 3)

    async def slow(scope, receive, send):
        await asyncio.sleep(0.02)
        await make_app()(scope, receive, send)

    async def go():
        return await asyncio.gather(*(call(mw(fake, slow, cost=1)) for _ in range(20)))
    assert [r.status for r in run(go())] == [200] * 20
    assert fake.tot(CRED) == 3 - 20


def test_a_refund_the_token_may_not_make_is_stranded_and_logged(caplog):
    with FakeAccMan(tokens={"svc": {"read", "charge"}}) as fake:
        fake.fund(CRED, 10)
        m = mw(fake, token="svc", mode="reserve", cost=lambda s, st, h: 5 if st is None else 1)

        async def go():
            r = await call(m)
            assert await m.drain(5)
            return r
        with caplog.at_level(logging.INFO, logger="accman.asgi"):
            r = run(go())
        assert r.status == 200 and "accman" not in r.headers
        assert fake.tot(CRED) == 5 and m.stats["stranded"] == 1
        assert "the service owes the account 4" in caplog.text
        assert fingerprint(CRED) in caplog.text and CRED not in caplog.text
        assert "svc" not in caplog.text.replace("service", "")


def test_a_reservation_with_unknown_outcome_is_undone(fake):
    fake.fund(CRED, 10)
    lost = []

    def fault(method, path, params):
        if path == "/mod" and not lost:
            lost.append(1)
            return ("apply_drop",)
    fake.fault = fault
    m = mw(fake, mode="reserve", cost=3, retries=0)

    async def go():
        r = await call(m)
        assert await m.drain(5)
        return r
    r = run(go())
    assert r.status == 503
    assert fake.tot(CRED) == 10 and history(fake) == [(10, None), (-3, "-r"), (3, "-s")]


# --- AccMan unavailable -----------------------------------------------------
@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_unreachable_accman_fails_closed_with_503(mode, caplog):
    calls = []
    m = AccManMiddleware(make_app(calls=calls), url=f"http://127.0.0.1:{closed_port()}",
                         mode=mode, retries=0)
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        r = run(call(m))
    assert r.status == 503 and r.json()["error"] == "unavailable"
    assert r.headers["retry-after"] == "1" and calls == []
    assert m.stats["refused_unavailable"] == 1 and CRED not in caplog.text


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


def test_a_wrong_token_is_503_even_when_open(caplog):
    with FakeAccMan(tokens={"good": {"read", "charge"}}) as fake:
        fake.fund(CRED, 10)
        m = mw(fake, token="wrong-token", on_unavailable="open")
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            r = run(call(m))
        assert r.status == 503 and "check the url and token" in caplog.text
        assert "wrong-token" not in caplog.text


def test_503_from_accman_fails_closed(fake):
    fake.fund(CRED, 10)
    fake.fault = lambda m, p, q: ("reply", 503, {"error": "unavailable", "detail": "x"})
    assert run(call(mw(fake, mode="reserve", retries=0))).status == 503


# --- bounds of the owed-mod queue -------------------------------------------
def test_owed_mods_are_stranded_after_followup_attempts_max(monkeypatch, caplog):
    monkeypatch.setattr(asgi_mod, "FOLLOWUP_ATTEMPTS_MAX", 3)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        m = mw(fake, make_app(raise_exc=ValueError("x")), mode="reserve", cost=3, retries=0)

        async def go():
            with pytest.raises(ValueError):
                await call(m)
        # AccMan goes away between the reservation and the release
        fake.fault = lambda meth, p, q: ("drop",) if q.get("by") == "3" else None
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            run(go_and_drain(m, go))
        assert m.stats["stranded"] == 1 and "still outcome_unknown after 3" in caplog.text
        assert fake.tot(CRED) == 7        # the consumer is owed 3: logged, not lost silently


async def go_and_drain(m, go):
    await go()
    assert await m.drain(5)


def test_owed_mods_beyond_followups_max_are_stranded_at_once(monkeypatch):
    monkeypatch.setattr(asgi_mod, "FOLLOWUPS_MAX", 1)
    monkeypatch.setattr(asgi_mod, "FOLLOWUP_PAUSE_S", 0.2)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        m = mw(fake, make_app(raise_exc=ValueError("x")), mode="reserve", cost=1, retries=0)
        fake.fault = lambda meth, p, q: ("drop",) if q.get("by") == "1" else None

        async def go():
            for _ in range(2):
                with pytest.raises(ValueError):
                    await call(m)
            assert m.stats["stranded"] == 1 and m.stats["owed"] == 1
            fake.fault = None
            assert await m.drain(5)
        run(go())
        assert fake.tot(CRED) == 9


def test_lifespan_shutdown_drains_within_shutdown_drain_s(monkeypatch):
    monkeypatch.setattr(asgi_mod, "SHUTDOWN_DRAIN_S", 0.1)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        inner = make_app(raise_exc=ValueError("x"))

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                while True:
                    msg = await receive()
                    await send({"type": msg["type"] + ".complete"})
                    if msg["type"] == "lifespan.shutdown":
                        return
            await inner(scope, receive, send)

        m = mw(fake, app, mode="reserve", cost=2, retries=0)

        async def go():
            with pytest.raises(ValueError):
                await call(m)
            fake.fault = lambda meth, p, q: ("drop",)
            messages = iter([{"type": "lifespan.startup"}, {"type": "lifespan.shutdown"}])
            sent = []

            async def receive():
                return next(messages)

            async def send(msg):
                sent.append(msg["type"])
            await m({"type": "lifespan", "asgi": {"version": "3.0"}}, receive, send)
            return sent
        assert run(go()) == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
        assert m.stats["stranded"] == 1 and m._client is None


# --- the rest ---------------------------------------------------------------
def test_websockets_pass_through(fake):
    seen = []

    async def app(scope, receive, send):
        seen.append(scope["type"])
    run(mw(fake, app)({"type": "websocket", "path": "/ws", "headers": []}, None, None))
    assert seen == ["websocket"] and fake.requests == []


def test_configuration_errors_are_refused_at_once(fake):
    app = make_app()
    for kw in [{"mode": "hold"}, {"on_unavailable": "maybe"}, {"header": "a b"}]:
        with pytest.raises(ValueError):
            AccManMiddleware(app, url=fake.url, **kw)
    with pytest.raises(TypeError):
        AccManMiddleware(app, url=fake.url, cost=1.5)
    with pytest.raises(ValueError):
        AccManMiddleware(app, url=fake.url, prices={"/x": -1})
    with pytest.raises(ValueError):
        AccManMiddleware(app)
    with pytest.raises(ValueError):
        AccManMiddleware(app, url="http://h", token="bad token")


def test_a_cost_function_returning_garbage_is_a_server_error(fake):
    fake.fund(CRED, 10)
    m = mw(fake, cost=lambda s, st, h: -1)
    with pytest.raises(ValueError):
        run(call(m))
    assert fake.mods() == []


def test_a_shared_client_and_a_custom_header(fake):
    fake.fund(CRED, 10)

    async def go():
        async with AccManClient(fake.url) as acc:
            m = AccManMiddleware(make_app(), client=acc, header="X-Balance", cost=1)
            r = await call(m, cred=None, headers=(("x-balance", CRED),))
            return r
    r = run(go())
    assert r.status == 200 and r.headers["x-balance"] == "9"
