"""The ASGI middleware (accman.asgi), driven directly as an ASGI app against
the fake AccMan of tests/fake_accman.py: every branch of check mode, what
both modes share, what is free.  tests/test_asgi_reserve.py has reserve
mode on holds, tests/test_asgi_failures.py AccMan's failures and the owed
calls."""

from __future__ import annotations

import asyncio
import contextlib
import decimal
import gc
import logging
import re
import ssl
import types

import pytest
from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from accman.asgi import AccManMiddleware
from accman.client import AccManClient, AccManSyncClient
from asgi_harness import CRED, Reply, call, history, http_scope, make_app, mw
from fake_accman import closed_port, run

# Owed calls retried at once, not after their pause.
pytestmark = pytest.mark.usefixtures("quick_followups")


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


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_a_second_response_start_is_not_charged_again(fake, mode):
    """An app that starts its response twice (a bug its server refuses) is
    charged once, as its first start says: no second charge with the
    first's key, which AccMan would refuse and the middleware would then
    bill as unpaid."""
    fake.fund(CRED, 10)
    unpaid = []

    async def app(scope, receive, send):
        for rows in (b"2", b"5"):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"x-rows", rows)]})
        await send({"type": "http.response.body", "body": b"ok"})

    def cost(scope, status, headers):
        return 5 if status is None else int(dict(headers)[b"x-rows"])

    async def go():
        m = mw(fake, app, mode=mode, cost=cost, on_unpaid=lambda *a: unpaid.append(a))
        await call(m)
        assert await m.drain(5)
        return m
    m = run(go())
    assert fake.tot(CRED) == 8 and m.stats["charged"] == 1 and unpaid == []
    assert [by for by, _ in history(fake)] == ([10, -2] if mode == "check" else [10, -5, 3])


def test_a_start_its_cost_function_refused_is_not_the_one_charged(fake):
    """Check mode: a cost function that raises at the first start (the app
    catches it and starts again) leaves that start unsent; the start the
    server gets is charged as it says, and carries the balance, not the
    app's own header."""
    fake.fund(CRED, 10)

    async def app(scope, receive, send):
        with contextlib.suppress(ValueError):
            await send({"type": "http.response.start", "status": 200,
                        "headers": [(b"x-rows", b"many")]})
        await send({"type": "http.response.start", "status": 200,
                    "headers": [(b"x-rows", b"3"), (b"accman", b"999999")]})
        await send({"type": "http.response.body", "body": b"ok"})

    def cost(scope, status, headers):
        return 5 if status is None else int(dict(headers)[b"x-rows"])
    r = run(call(mw(fake, app, cost=cost)))
    assert r.headers["accman"] == "7" and fake.tot(CRED) == 7
    assert [by for by, _ in history(fake)] == [10, -3]


def test_a_client_gone_before_the_response_is_not_charged_in_check_mode(fake):
    fake.fund(CRED, 10)
    run(call(mw(fake, make_app(read_disconnect=True)), disconnect=True))
    assert fake.tot(CRED) == 10 and fake.mods() == []


def watches() -> list:
    """The middleware's disconnect watches still running on this loop."""
    return [t for t in asyncio.all_tasks() if "DisconnectWatch._watch" in repr(t.get_coro())]


async def answer_after(seconds, receive, send):
    await asyncio.sleep(seconds)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_a_client_gone_is_seen_though_the_app_never_reads_it_again(fake, mode):
    """The middleware reads the disconnect itself once the app has read the
    body; its watch ends with the request (tests/test_e2e_gone.py has the
    same under uvicorn)."""
    fake.fund(CRED, 10)

    async def app(scope, receive, send):
        await receive()
        await answer_after(0.05, receive, send)     # the consumer leaves meanwhile

    async def go():
        m = mw(fake, app, mode=mode, cost=3)
        await call(m, disconnect=True)
        assert watches() == [] and await m.drain(5)
        return m
    m = run(go())
    assert fake.tot(CRED) == 10 and m.stats["charged"] == 0
    assert history(fake) == ([(10, None)] if mode == "check" else
                             [(10, None), (-3, "-h"), (3, None)])


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_the_watch_ends_with_the_request_and_leaves_no_error_behind(fake, mode, caplog):
    """A consumer that waits is charged once; the watch's read, still
    waiting, is cancelled when the app returns, and a read that failed is
    retrieved (asyncio logs an error nobody retrieved when its task goes)."""
    fake.fund(CRED, 10)

    async def broken():
        raise OSError("the server's receive failed")

    async def go():
        m = mw(fake, make_app(), mode=mode, cost=3)
        assert (await call(m)).headers["accman"] == "7"
        assert watches() == []
        assert (await call(m, later=broken)).headers["accman"] == "4"
        gc.collect()
        assert watches() == [] and await m.drain(5)
    with caplog.at_level(logging.ERROR, logger="asyncio"):
        run(go())
    assert fake.tot(CRED) == 4 and "never retrieved" not in caplog.text


@pytest.mark.parametrize("mode", ["check", "reserve"])
@pytest.mark.parametrize("cancels", [1, 2])
def test_a_cancelled_request_ends_its_watch(fake, mode, cancels):
    """The ASGI server cancels the request (a shutdown's timeout) while the
    app works after reading its body, once, or again while the request
    ends its watch: nothing charged, no watch left."""
    fake.fund(CRED, 10)

    working = []

    async def app(scope, receive, send):
        await receive()
        working.append(1)
        await answer_after(3600, receive, send)

    async def go():
        m = mw(fake, app, mode=mode, cost=3)
        task = asyncio.create_task(call(m))
        while not working:
            await asyncio.sleep(0.01)
        for _ in range(cancels):
            task.cancel()
            await asyncio.sleep(0)
        with pytest.raises(asyncio.CancelledError):
            await task
        await asyncio.sleep(0)          # a cancelled watch ends in the next turn
        assert watches() == [] and await m.drain(5)
    run(go())
    assert fake.tot(CRED) == 10 and fake.mods() == []


def test_an_app_that_gives_up_a_read_leaves_the_shared_one_running(fake):
    """A read the app cancels (a timeout, Starlette's is_disconnected) does
    not cancel the watch's: the app's next read gets the disconnect."""
    fake.fund(CRED, 10)
    got = []

    async def leaves():
        await asyncio.sleep(0.05)
        return {"type": "http.disconnect"}

    async def app(scope, receive, send):
        await receive()
        with contextlib.suppress(asyncio.TimeoutError):
            await asyncio.wait_for(receive(), 0.001)
        got.append((await receive())["type"])
        await answer_after(0, receive, send)

    run(call(mw(fake, app, cost=3), later=leaves))
    assert got == ["http.disconnect"] and fake.mods() == []


def test_check_mode_charge_that_fails_after_serving_is_retried_with_its_key(fake, caplog):
    """A charge that fails after the app answered is owed, retried with its
    key, and lands once; its queueing is a warning, shown where logging is
    left as Python sets it: the service log's first sign that AccMan fails."""
    caplog.set_level(logging.WARNING, logger="accman.asgi")
    fake.fund(CRED, 10)
    lost = []

    def fault(method, path, params):
        if path == "/mod" and "key" in params and len(lost) < 3:      # the charge
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
    assert m.stats["charged"] == 1 and m.stats["charged_amount"] == 2     # once it landed
    assert [r.levelname for r in caplog.records if "queued" in r.getMessage()] == ["WARNING"]


# --- what is free -------------------------------------------------------------
@pytest.mark.parametrize("status", [404, 405, 400, 500])
def test_an_error_response_is_not_charged_in_check_mode(fake, status):
    fake.fund(CRED, 10)
    m = mw(fake, make_app(status=status), cost=3)
    r = run(call(m, "/nope"))
    assert r.status == status and r.headers["accman"] == "10"
    assert fake.tot(CRED) == 10 and fake.mods() == []
    assert m.stats["free_status"] == 1 and m.stats["charged"] == 0


def test_a_path_the_app_does_not_serve_is_admitted_as_any_other(fake):
    """An ASGI middleware cannot know the app's routes (the app routes
    after it): a path it does not serve is 401 without a credential, and
    with one the app's 404, free (docs/CALLING.md; the Node plugin, which
    knows fastify's routes, answers 404 to both and calls nothing).  Such a
    request is metered, so `requests` counts it, not `exempt` (the plugin,
    which lets it through unmetered, counts it in `exempt`)."""
    async def thing(_request):
        return PlainTextResponse("ok")
    fake.fund(CRED, 10)
    m = mw(fake, Starlette(routes=[Route("/thing", thing)]), cost=3)
    refused = run(call(m, "/nope", cred=None))
    assert (refused.status, refused.json()["error"]) == (401, "no_credential")
    r = run(call(m, "/nope"))
    assert (r.status, r.headers["accman"]) == (404, "10") and fake.mods() == []
    assert run(call(m, "/thing")).headers["accman"] == "7"
    counted = {k: m.stats[k] for k in ("requests", "exempt", "refused_no_credential",
                                       "free_status", "charged")}
    assert counted == {"requests": 3, "exempt": 0, "refused_no_credential": 1,
                       "free_status": 1, "charged": 1}


def test_a_head_is_charged_as_its_get_and_a_cost_function_may_tell_it(fake):
    """Prices name paths, not methods, and Starlette answers a HEAD on each
    GET route with the GET's status and headers: the HEAD is charged as
    its GET is, unless the cost function says otherwise (docs/CALLING.md,
    as node/README.md says of fastify's HEAD routes)."""
    async def thing(_request):
        return PlainTextResponse("ok")
    app = Starlette(routes=[Route("/thing", thing)])

    async def head(m):
        messages = []
        scope = {**http_scope("/thing"), "method": "HEAD"}

        async def receive():
            return {"type": "http.request", "body": b"", "more_body": False}

        async def send(message):
            messages.append(message)
        await m(scope, receive, send)
        return Reply(messages)
    fake.fund(CRED, 10)
    r = run(head(mw(fake, app, cost=3)))
    assert (r.status, r.headers["accman"]) == (200, "7")       # the server drops the body
    free_head = mw(fake, app, cost=lambda scope, status, headers: 0
                   if scope["method"] == "HEAD" and status is not None else 3)
    assert run(head(free_head)).headers["accman"] == "7" and fake.tot(CRED) == 7


def test_responses_under_400_are_charged(fake):
    fake.fund(CRED, 10)
    for status, tot in [(200, "9"), (201, "8"), (304, "7"), (399, "6")]:
        assert run(call(mw(fake, make_app(status=status)))).headers["accman"] == tot


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_charge_below_is_configurable(fake, mode):
    fake.fund(CRED, 10)
    every = mw(fake, make_app(status=404), mode=mode, cost=2, charge_below=None)
    assert run(call(every)).headers["accman"] == "8"
    only_5xx_free = mw(fake, make_app(status=404), mode=mode, cost=2, charge_below=500)
    assert run(call(only_5xx_free)).headers["accman"] == "6"
    failing = mw(fake, make_app(status=503), mode=mode, cost=2, charge_below=500)
    r = run(call(failing))
    assert r.status == 503 and r.headers["accman"] == "6" and fake.tot(CRED) == 6


def test_an_error_response_served_while_accman_is_down_is_not_unpaid():
    unpaid = []
    m = AccManMiddleware(make_app(status=404), url=f"http://127.0.0.1:{closed_port()}",
                         retries=0, on_unavailable="open",
                         on_unpaid=lambda cred, amount: unpaid.append(amount))
    assert run(call(m)).status == 404
    assert unpaid == [] and m.stats["unpaid_requests"] == 0


# --- the modes side by side (reserve mode: tests/test_asgi_reserve.py) --------
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
    for charge_below in (199, 601, True, "400", 400.0):
        with pytest.raises(ValueError, match="charge_below"):
            AccManMiddleware(app, url=fake.url, charge_below=charge_below)
    bad = [({"timeout_s": 0}, ValueError, "timeout_s"),
           ({"timeout_s": "2"}, TypeError, "timeout_s"),
           ({"retries": -1}, ValueError, "retries"),
           ({"retries": 1.0}, TypeError, "retries"),
           ({"exempt": "/health"}, TypeError, "exempt"),       # ("/health") without its comma
           ({"exempt": ["health"]}, ValueError, "exempt"),
           ({"exempt": 5}, TypeError, "exempt must be a collection of paths, not a int"),
           ({"prices": {"x": 1}}, ValueError, "prices"),
           ({"prices": [("/x", 1)]}, TypeError, "prices"),
           # A glob or a route template would match no path, never priced or exempted.
           ({"prices": {"/users/*/report": 10}}, ValueError, r"prices: '/users/\*/report' has"),
           ({"exempt": ["/users/{id}/avatar"]}, ValueError, "exempt: '/users/{id}/avatar' is"),
           # Nor would a query string or a fragment: a request's path has neither.
           ({"prices": {"/report?format=pdf": 10}}, ValueError,
            r"prices: '/report\?format=pdf' has a query string or a fragment"),
           ({"exempt": ["/docs#intro"]}, ValueError, "exempt: '/docs#intro' has a query"),
           ({"on_unpaid": 5}, TypeError, "on_unpaid"),
           ({"timeout_s": float("inf")}, ValueError, "timeout_s")]
    for kw, error, named in bad:
        with pytest.raises(error, match=named):
            AccManMiddleware(app, url=fake.url, **kw)
    with pytest.raises(TypeError, match="the AccMan url must be a str"):
        AccManMiddleware(app, url=123)


def test_a_price_that_only_exempt_paths_match_is_refused(fake):
    """Exempt wins over any price: a price that exempt paths alone match
    would never be charged, and is refused rather than served free."""
    app = make_app()
    for exempt, prices, by in [(("/public/*",), {"/public/premium/*": 5}, "/public/*"),
                               (("/public/*",), {"/public/report": 5}, "/public/*"),
                               (("/health",), {"/health": 5}, "/health"),
                               (("*",), {"/x": 1}, "*")]:
        price = next(iter(prices))
        with pytest.raises(ValueError, match=re.escape(f"prices[{price!r}] is exempt (by {by!r})")):
            AccManMiddleware(app, url=fake.url, exempt=exempt, prices=prices)
    # A price that paths outside exempt match too is kept; exempt wins where it matches.
    fake.fund(CRED, 10)
    m = mw(fake, exempt=("/api/health",), prices={"/api/*": 2})
    assert run(call(m, path="/api/x")).headers["accman"] == "8"
    assert run(call(m, path="/api/health", cred=None)).status == 200


def test_settings_of_every_usual_type_are_taken(fake):
    fake.fund(CRED, 10)
    m = mw(fake, prices=types.MappingProxyType({"*": 3, "/free": 0}),
           exempt={"/health"}, timeout_s=decimal.Decimal("2"))
    assert run(call(m)).headers["accman"] == "7"
    assert run(call(m, path="/free")).headers["accman"] == "7"
    assert run(call(m, path="/health", cred=None)).status == 200
    assert run(call(mw(fake, exempt=None))).headers["accman"] == "6"     # None: no exemption


@pytest.mark.parametrize("path,root_path,tot", [
    ("/v1/report", "/v1", 90),          # mounted (a Starlette Mount, uvicorn --root-path)
    ("/v1", "/v1", 99),                 # the mount's own root: "/", the default cost
    ("/report", "/v1", 90),             # a server that strips the root path itself
    ("/v10/report", "/v1", 99),         # not under the mount: matched as it is
])
def test_paths_are_matched_without_the_root_path_the_app_is_mounted_at(fake, path, root_path,
                                                                       tot):
    fake.fund(CRED, 100)
    m = mw(fake, exempt=("/health",), prices={"/report": 10})
    scope = http_scope(path)
    scope["root_path"] = root_path
    sent = []

    async def receive():
        return {"type": "http.request", "body": b"", "more_body": False}

    async def send(message):
        sent.append(message)
    run(m(scope, receive, send))
    assert Reply(sent).headers["accman"] == str(tot)
    exempt = http_scope("/v1/health", cred=None)
    exempt["root_path"] = "/v1"
    run(m(exempt, receive, send))
    root = http_scope("/v1", cred=None)     # exempt as "/" is: its redirect costs nothing
    root["root_path"] = "/v1"
    run(mw(fake, exempt=("/",))(root, receive, send))
    assert len(fake.mods()) == 1 and Reply(sent[-2:]).status == 200


def test_a_probe_that_applies_is_a_configuration_error(fake, caplog):
    """An url that names something other than an AccMan keeping `min`."""
    fake.fund(CRED, 10)
    fake.fault = lambda meth, p, q: ("reply", 200, {"tot": 9, "seq": 2}) \
        if q.get("min") else None
    served = []
    with caplog.at_level(logging.ERROR, logger="accman.asgi"):
        r = run(call(mw(fake, make_app(calls=served), on_unavailable="open")))
    assert r.status == 503 and served == []
    assert "was applied to account" in caplog.text and "owed back" in caplog.text


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
            await m.aclose()
            return r, await acc.tot(CRED)       # the caller's client: still open
    r, tot = run(go())
    assert r.status == 200 and r.headers["x-balance"] == "9" and tot == 9


@pytest.mark.parametrize("option,value", [("url", "http://127.0.0.1:1"), ("token", "tok"),
                                          ("timeout_s", 0.05), ("retries", 0),
                                          ("ssl_context", ssl.create_default_context())])
def test_an_option_of_the_client_s_beside_a_client_is_refused(option, value):
    """A given client decides its url, token, timeout, retries and TLS
    trust: one of them given beside it would go unused unsaid (timeout_s=0.05
    would wait as long as the client does)."""
    acc = AccManClient("http://127.0.0.1:1")
    says = f"{option} is the client's: with client given, set it on that client"
    with pytest.raises(ValueError, match=re.escape(says)):
        AccManMiddleware(make_app(), client=acc, **{option: value})
    AccManMiddleware(make_app(), client=acc, **{option: None})     # None: not given
    with pytest.raises(ValueError, match=re.escape("timeout_s, retries are the client's: with "
                                                   "client given, set them on that client")):
        AccManMiddleware(make_app(), client=acc, timeout_s=0.05, retries=0)


def test_a_client_that_is_not_an_async_client_is_refused(fake):
    """The middleware awaits its client's calls: a sync client's charge
    would block the loop, land, and then fail the request (500), the
    consumer charged for nothing."""
    for client, named in [(AccManSyncClient(fake.url), "AccManSyncClient"),
                          (fake.url, "str")]:
        with pytest.raises(TypeError, match=f"client must be an AccManClient, not {named}"):
            AccManMiddleware(make_app(), client=client)


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_a_read_that_outlives_the_request_gets_the_disconnect(fake, mode):
    """A task of the app still reading receive() when the request has
    ended (its watch cancelled) is told the request is over, as ASGI says,
    not cancelled itself."""
    fake.fund(CRED, 10)
    later = []

    async def app(scope, receive, send):
        await receive()
        later.append(asyncio.create_task(receive()))
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})

    async def go():
        m = mw(fake, app, mode=mode, cost=3)
        await call(m)
        return await asyncio.wait_for(later[0], 5)
    assert run(go()) == {"type": "http.disconnect"}

