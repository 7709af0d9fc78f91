"""A 503 from a front end before AccMan (nginx's page when its upstream is
down, or its maintenance mode) told from AccMan's own 503 by the body
(SPEC "Errors": AccMan's is `{"error": CODE, "detail": ...}`), against a
real AccMan behind a real foreign HTTP server.  What a foreign 503 means
for money is in accman.errors.ProxyUnavailable."""

from __future__ import annotations

import asyncio
import logging

import pytest

from accman.asgi import AccManMiddleware
from accman.calling import replies
from accman.calling.policy import may_have_landed, takes_no_writes
from accman.client import AccManClient, AccManSyncClient, OutcomeUnknown, ProxyUnavailable
from accman.errors import Unavailable
from accman.server.replies import error_body
from asgi_harness import call, make_app
from threaded_proxy import Proxy

# What nginx answers when no upstream is up, or from `return 503;`.
NGINX_503 = (b"<html>\r\n<head><title>503 Service Temporarily Unavailable</title></head>\r\n"
             b"<body>\r\n<center><h1>503 Service Temporarily Unavailable</h1></center>\r\n"
             b"<hr><center>nginx/1.24.0</center>\r\n</body>\r\n</html>\r\n")


class Front(Proxy):
    """A foreign HTTP server before a real AccMan:
    it passes each request on, one connection upstream each, and while
    `refuse_writes` is set answers every PATCH with nginx's 503 page and
    keeps the connection (a front end in a read-only maintenance mode).
    While `fail_writes` is set, every PATCH fails so that its outcome is
    unknown: "502" answers nginx's 502 page, "cut" passes it on (it lands)
    and closes the connection with no reply, "hang" never answers.
    While `hold_probes` is set, a role probe waits before it is passed on
    (or failed, as `fail_writes` was when it came).  `lines` are the
    request lines it saw."""

    def __init__(self, upstream_port: int):
        self.refuse_writes = False
        self.fail_writes: str | None = None
        self.hold_probes = False
        self.lines: list[str] = []
        super().__init__(upstream_port)

    async def _serve(self, reader, writer) -> None:
        try:
            while head := await reader.readuntil(b"\r\n\r\n"):
                line = head.split(b"\r\n", 1)[0].decode("latin-1")
                self.lines.append(line)
                failing = self.fail_writes if line.startswith("PATCH ") else None
                while self.hold_probes and "&min=" in line:
                    await asyncio.sleep(0.005)
                if failing == "cut":
                    await self._pass(head)
                    return
                if failing == "hang":
                    await reader.read()             # until the client gives up
                    return
                if failing == "502":
                    writer.write(b"HTTP/1.1 502 Bad Gateway\r\nServer: nginx/1.24.0\r\n"
                                 b"Content-Type: text/html\r\nContent-Length: 0\r\n\r\n")
                elif self.refuse_writes and line.startswith("PATCH "):
                    writer.write(b"HTTP/1.1 503 Service Temporarily Unavailable\r\n"
                                 b"Server: nginx/1.24.0\r\nContent-Type: text/html\r\n"
                                 b"Content-Length: %d\r\n\r\n%s" % (len(NGINX_503), NGINX_503))
                else:
                    writer.write(await self._pass(head))
                await writer.drain()
        except (asyncio.IncompleteReadError, ConnectionError):
            pass
        finally:
            writer.close()

    async def _pass(self, head: bytes) -> bytes:
        """AccMan's reply to `head` (its routes take no body), on a
        connection of its own, without the `Connection: close` that ends
        that one: the client's connection to the front end stays open, as
        a front end's does (a client that sent the next request on it
        would have it cut short)."""
        r, w = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        try:
            w.write(head.replace(b"\r\n\r\n", b"\r\nConnection: close\r\n\r\n"))
            await w.drain()
            return (await r.read()).replace(b"\r\nConnection: close\r\n", b"\r\n", 1)
        finally:
            w.close()


def calls(lines: list) -> list:
    """The middleware's calls in the request lines a front end saw, an owed
    charge's repeats (the same line: its key) left out."""
    out, seen = [], set()
    for line in lines:
        if line.endswith("-c HTTP/1.1"):
            if line not in seen:
                out.append("charge")
            seen.add(line)
        elif "&min=" in line:
            out.append("probe")
        elif line.startswith("GET /tot?"):
            out.append("tot")
    return out


@pytest.fixture
def front(shared_server):
    f = Front(shared_server.port)
    yield f
    f.close()


@pytest.mark.any_one_store
def test_a_proxy_503_is_not_accman_s_and_the_charge_may_have_landed(shared_server, front, cred):
    """nginx's page is not AccMan's word on its store: ProxyUnavailable,
    which may have landed (a front end may answer 503 after it sent the
    request on), never Unreachable, and never retried for a keyless mod.
    AccMan's own 503s, as its server writes them, stay AccMan's."""
    shared_server.mod(cred, 10)
    front.refuse_writes = True
    with AccManSyncClient(front.url, retries=2) as acc:
        assert acc.tot(cred) == 10                          # reads pass
        with pytest.raises(ProxyUnavailable) as e:
            acc.mod(cred, -1)
    err = e.value
    assert isinstance(err, OutcomeUnknown) and not isinstance(err, Unavailable)
    assert err.code == "proxy_unavailable" and err.status == 503
    assert "AccMan answered" not in err.detail
    assert may_have_landed(err) and takes_no_writes(err)
    assert [ln.split(" ")[0] for ln in front.lines] == ["GET", "PATCH"]    # not retried
    assert shared_server.tot(cred) == 10
    own = {code: replies.error(503, error_body(code, "d"))
           for code in ("unavailable", "not_applied", "shutting_down", "busy")}
    assert [type(own[c]).__name__ for c in own] == ["Unavailable", "NotApplied", "ShuttingDown",
                                                    "Busy"]
    assert takes_no_writes(own["unavailable"]) and not takes_no_writes(own["busy"])
    # Refused before applying: the next write may meet it too, and it never landed.
    assert takes_no_writes(own["not_applied"]) and takes_no_writes(own["shutting_down"])
    assert may_have_landed(own["unavailable"]) and not may_have_landed(own["not_applied"])
    for foreign in (b'{"error":"busy"}', b'{"message":"no healthy upstream"}', b"", b"[]"):
        assert type(replies.error(503, foreign)) is ProxyUnavailable, foreign


@pytest.mark.any_one_store
def test_check_mode_names_the_proxy_and_probes_writes_after_its_503(shared_server, front, cred,
                                                                     caplog):
    """A front end that refuses writes and passes reads would have check
    mode admit on /tot and serve every request with its charge owed: once
    a charge meets its 503, admission goes back to the role probe, a write,
    which meets the same 503, as for AccMan's own.  The log line names the
    front end's 503, not AccMan's store."""
    shared_server.mod(cred, 10)
    m = AccManMiddleware(make_app(), url=front.url, retries=0)

    async def go():
        assert (await call(m, cred=cred)).status == 200     # probe, charge
        front.refuse_writes = True
        served = await call(m, cred=cred)                   # admitted on tot; owed
        refused = await call(m, cred=cred)
        front.refuse_writes = False                         # the owed charge lands
        assert await m.drain(2.0)
        await m.aclose()
        return served, refused
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        served, refused = asyncio.run(go())
    assert served.status == 200 and refused.status == 503
    assert m.stats["owed"] == 1 and m.stats["refused_unavailable"] == 1
    assert calls(front.lines) == ["probe", "charge", "tot", "charge", "probe"]
    assert "AccMan unavailable (proxy_unavailable); refusing with 503" in caplog.text
    assert "(unavailable)" not in caplog.text
    assert shared_server.tot(cred) == 8


@pytest.mark.any_one_store
@pytest.mark.parametrize("failure", ["502", "cut", "hang"])
def test_check_mode_probes_writes_after_a_charge_of_unknown_outcome(shared_server, front, cred,
                                                                    failure):
    """A charge that times out, meets a 502 or loses its connection after
    sending may have landed, and says nothing of whether the next will:
    admitted on /tot while writes keep failing so, every request would be
    served with its charge owed.  Admission goes back to the role probe, as
    after a 503; the first probe that AccMan answers ends it."""
    shared_server.mod(cred, 10)
    m = AccManMiddleware(make_app(), url=front.url, retries=0, timeout_s=0.2)

    async def go():
        statuses = [(await call(m, cred=cred)).status]      # probe, charge
        front.fail_writes = failure
        statuses.append((await call(m, cred=cred)).status)  # admitted on tot; owed
        statuses.append((await call(m, cred=cred)).status)  # the probe fails too: 503
        front.fail_writes = None                            # the owed charge lands
        assert await m.drain(2.0)
        statuses.append((await call(m, cred=cred)).status)  # probe, charge
        await m.aclose()
        return statuses
    assert asyncio.run(go()) == [200, 200, 503, 200]
    assert m.stats["owed"] == 1 and m.stats["refused_unavailable"] == 1
    assert calls(front.lines) == ["probe", "charge", "tot", "charge", "probe", "probe", "charge"]
    assert shared_server.tot(cred) == 7


@pytest.mark.any_one_store
def test_concurrent_requests_after_a_charge_of_unknown_outcome_share_one_probe(shared_server,
                                                                               front, cred):
    """After a charge of unknown outcome, the requests that come while the
    probe is under way wait for it, then read the balance: one write, not
    one per request in flight (a service under load met a transient failure
    with as many probe writes as it had requests, each a change on AccMan's
    write path, and a probe answered before the failure that ended after it
    put admission back on /tot)."""
    shared_server.mod(cred, 100)
    m = AccManMiddleware(make_app(), url=front.url, retries=0, timeout_s=0.5)

    async def go():
        assert (await call(m, cred=cred)).status == 200     # probe, charge
        front.fail_writes = "502"
        assert (await call(m, cred=cred)).status == 200     # admitted on tot; owed
        front.fail_writes = None
        replies = await asyncio.gather(*(call(m, cred=cred) for _ in range(8)))
        assert await m.drain(2.0)
        await m.aclose()
        return [r.status for r in replies]
    assert asyncio.run(go()) == [200] * 8
    assert calls(front.lines).count("probe") == 2
    assert calls(front.lines).count("tot") == 1 + 7
    assert shared_server.tot(cred) == 100 - 10


@pytest.mark.any_one_store
def test_a_probe_answered_before_a_charge_failed_leaves_admission_on_the_probe(shared_server,
                                                                              front, cred):
    """A probe sent before a charge failed says nothing of the writes since:
    its 409 put admission back on /tot, and the next request, writes still
    failing, was served with its charge owed."""
    shared_server.mod(cred, 100)
    go_on = asyncio.Event()

    async def app(scope, receive, send):
        await receive()
        if scope["path"] == "/slow":
            await go_on.wait()
        status = 404 if scope["path"] == "/free" else 200   # a 404 is not charged
        await send({"type": "http.response.start", "status": status, "headers": []})
        await send({"type": "http.response.body", "body": b"ok"})
    m = AccManMiddleware(app, url=front.url, retries=0, timeout_s=0.5)

    async def until(what: str, after: int):
        while what not in calls(front.lines[after:]):
            await asyncio.sleep(0.005)

    async def go():
        assert (await call(m, cred=cred)).status == 200     # probe, charge
        # Two connections to the front end (the second request pipelines,
        # and a spare is opened), so that a charge need not wait behind the
        # held probe on one.
        await asyncio.gather(call(m, path="/free", cred=cred), call(m, path="/free", cred=cred))
        while len(m._acc()._conns) < 2:
            await asyncio.sleep(0.005)
        n = len(front.lines)
        slow = asyncio.create_task(call(m, path="/slow", cred=cred))   # admitted on tot
        await until("tot", n)
        front.fail_writes = "502"
        assert (await call(m, cred=cred)).status == 200     # its charge owed: to the probe
        front.fail_writes, front.hold_probes = None, True
        n = len(front.lines)
        probing = asyncio.create_task(call(m, path="/free", cred=cred))
        await until("probe", n)
        front.fail_writes = "502"
        go_on.set()
        assert (await slow).status == 200                   # its charge fails after the probe
        front.hold_probes = False
        assert (await probing).status == 404                # the probe's 409, sent before
        n = len(front.lines)
        last = await call(m, cred=cred)
        front.fail_writes = None
        assert await m.drain(2.0)
        await m.aclose()
        return last.status, calls(front.lines[n:])[0]
    assert asyncio.run(go()) == (503, "probe")


@pytest.mark.any_one_store
def test_an_async_keyed_hold_behind_a_proxy_503_stays_unknown(shared_server, front, cred):
    """Retried with its key (a keyed write is safe to repeat), the hold
    meets the same page each time and ends unknown: nothing says it did
    not land."""
    shared_server.mod(cred, 10)
    front.refuse_writes = True

    async def go():
        async with AccManClient(front.url, retries=1) as acc:
            with pytest.raises(ProxyUnavailable):
                await acc.hold(cred, -3, ttl_s=60, key="k1")
    asyncio.run(go())
    assert [ln.split(" ")[0] for ln in front.lines] == ["PATCH", "PATCH"]
