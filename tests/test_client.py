"""The calling side's clients (accman.client), against a small fake AccMan.

`FakeAccMan` speaks the SPEC's routes over real sockets in a thread of its
own, keeps a reference model of the ledger (balances, history, keys, roles),
and injects faults on request: a delay, a dropped connection before or after
the mod applied, a raw reply.  tests/test_asgi.py reuses it."""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
from urllib.parse import parse_qsl

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accman.calling import client as client_mod
from accman.client import (
    AccManClient,
    AccManSyncClient,
    BadReply,
    CallTimeout,
    Entry,
    Forbidden,
    OutcomeUnknown,
    ReplyParser,
    TransportError,
    Unauthorized,
    UnexpectedReply,
    Unreachable,
)
from accman.errors import (
    BadRequest,
    Busy,
    Insufficient,
    KeyReused,
    NoAccount,
    Overflow,
    Unavailable,
)
from accman.limits import INT64_MAX, INT64_MIN

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 409: "Conflict", 503: "Service Unavailable"}


class FakeAccMan:
    """The SPEC's routes over asyncio streams, in its own thread.

    `fault(method, path, params)` may return None or one action:
    ("delay", s) waits before handling; ("drop",) closes without handling;
    ("apply_drop",) handles then closes without replying (an applied mod
    whose reply is lost); ("raw", bytes) writes those bytes as the reply;
    ("reply", status, obj) answers that instead of handling."""

    def __init__(self, tokens: dict | None = None):
        self.tokens = tokens            # token -> set of roles, or None for open access
        self.accounts: dict = {}        # cred -> {"tot", "past": [entry...], "keys": {key: (by, min, body)}}
        self.requests: list = []        # (method, path, params, authorization)
        self.connections = 0
        self.fault = None
        self.loop = asyncio.new_event_loop()
        self._writers = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    # lifecycle
    def __enter__(self) -> "FakeAccMan":
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        async def shut():
            self.server.close()
            for w in list(self._writers):
                w.close()
            await asyncio.sleep(0)
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    # helpers for tests
    def fund(self, cred: str, by: int) -> None:
        self._apply(cred, by, None, None)

    def tot(self, cred: str):
        acct = self.accounts.get(cred)
        return None if acct is None else acct["tot"]

    def mods(self) -> list:
        return [r for r in self.requests if r[1] == "/mod"]

    # the protocol
    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, version = lines[0].split(" ")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                path, _, query = target.partition("?")
                params = dict(parse_qsl(query, keep_blank_values=True))
                self.requests.append((method, path, params, headers.get("authorization")))
                action = self.fault(method, path, params) if self.fault else None
                if action and action[0] == "delay":
                    await asyncio.sleep(action[1])
                    action = None
                if action and action[0] == "drop":
                    return
                if action and action[0] == "raw":
                    writer.write(action[1])
                    await writer.drain()
                    continue
                if action and action[0] == "reply":
                    status, obj = action[1], action[2]
                else:
                    status, obj = self._handle(method, path, params, headers)
                if action and action[0] == "apply_drop":
                    return
                body = json.dumps(obj).encode()
                close = headers.get("connection", "").lower() == "close"
                writer.write(
                    f"HTTP/1.1 {status} {REASONS.get(status, 'X')}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
                    f"{'Connection: close' + chr(13) + chr(10) if close else ''}\r\n".encode() + body)
                await writer.drain()
                if close:
                    return
        finally:
            self._writers.discard(writer)
            writer.close()

    def _handle(self, method, path, params, headers):
        routes = {"/tot": ("GET", "read"), "/past": ("GET", "read"), "/mod": ("PATCH", None)}
        if path not in routes:
            return 404, {"error": "not_found", "detail": "no such path"}
        if method != routes[path][0]:
            return 405, {"error": "method_not_allowed", "detail": "wrong method"}
        cred = params.get("cred", "")
        role = routes[path][1]
        if path == "/mod":
            role = "mint" if int(params["by"]) > 0 else "charge"
        if self.tokens is not None:
            auth = headers.get("authorization", "")
            roles = self.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
            if roles is None:
                return 401, {"error": "unauthorized", "detail": "a token is required"}
            if role not in roles:
                return 403, {"error": "forbidden", "detail": f"the token lacks {role}"}
        if path == "/tot":
            if cred not in self.accounts:
                return 404, {"error": "no_account", "detail": "no such account"}
            return 200, {"tot": self.accounts[cred]["tot"]}
        if path == "/past":
            acct = self.accounts.get(cred)
            if acct is None:
                return 404, {"error": "no_account", "detail": "no such account"}
            limit = int(params.get("limit", 100))
            before = int(params["before"]) if "before" in params else None
            entries = [e for e in reversed(acct["past"]) if before is None or e["seq"] < before]
            page = entries[:limit]
            nxt = page[-1]["seq"] if len(page) == limit and page and page[-1]["seq"] > 1 else None
            return 200, {"past": page, "next": nxt}
        by = int(params["by"])
        mn = int(params["min"]) if "min" in params else None
        return self._apply(cred, by, mn, params.get("key"))

    def _apply(self, cred, by, mn, key):
        acct = self.accounts.get(cred)
        if acct is not None and key is not None and key in acct["keys"]:
            kby, kmin, body = acct["keys"][key]
            if (kby, kmin) != (by, mn):
                return 409, {"error": "key_reused", "detail": "key used with another by or min"}
            return 200, body
        tot = (acct["tot"] if acct else 0) + by
        if mn is not None and tot < mn:
            return 409, {"error": "insufficient", "detail": "below min", "tot": tot - by}
        if not INT64_MIN <= tot <= INT64_MAX:
            return 409, {"error": "overflow", "detail": "out of int64"}
        if acct is None:
            acct = self.accounts[cred] = {"tot": 0, "past": [], "keys": {}}
        acct["tot"] = tot
        seq = len(acct["past"]) + 1
        acct["past"].append({"seq": seq, "by": by, "tot": tot, "at": int(time.time() * 1000), "key": key})
        body = {"tot": tot, "seq": seq}
        if key is not None:
            acct["keys"][key] = (by, mn, body)
        return 200, body


def run(coro):
    return asyncio.run(coro)


@pytest.fixture
def fake():
    with FakeAccMan() as f:
        yield f


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port


# --- the reply parser -------------------------------------------------------
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{\"tot\": 5}"


def feed_whole(data: bytes):
    return ReplyParser().feed(data)


def feed_bytewise(data: bytes):
    p, out = ReplyParser(), []
    for i in range(len(data)):
        out += p.feed(data[i:i + 1])
    return out


@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise])
def test_parser_reads_a_reply_whole_and_byte_by_byte(feed):
    assert feed(OK) == [(200, b'{"tot": 5}', False)]
    assert feed(OK + OK) == [(200, b'{"tot": 5}', False)] * 2


def test_parser_keeps_trailing_bytes_for_the_next_reply():
    p = ReplyParser()
    assert p.feed(OK + OK[:20]) == [(200, b'{"tot": 5}', False)]
    assert p.pending
    assert p.feed(OK[20:]) == [(200, b'{"tot": 5}', False)]
    assert not p.pending


@pytest.mark.parametrize("head,close", [
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n", True),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", False),
    (b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", False),
    (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length:   0  \r\n\r\n", False),
])
def test_parser_reads_connection_options(head, close):
    assert ReplyParser().feed(head)[0][2] is close


def test_parser_refuses_bytes_after_a_closing_reply():
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(BadReply):
        ReplyParser().feed(closing + OK)
    p = ReplyParser()
    p.feed(closing)
    with pytest.raises(BadReply):
        p.feed(b"x")


BAD_REPLIES = {
    "no content-length": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n",
    "two content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    "signed content-length": b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "bare CR": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    "1xx": b"HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/2": b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "space before colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "no status": b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
    "garbage": b"<html>hello</html>\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_REPLIES))
@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise])
def test_parser_refuses_what_the_server_never_sends(name, feed):
    with pytest.raises(BadReply):
        feed(BAD_REPLIES[name])


def test_parser_bounds_are_reached():
    # REPLY_HEAD_BYTES_MAX: an endless head is refused without waiting for its end.
    with pytest.raises(BadReply, match="REPLY_HEAD_BYTES_MAX"):
        ReplyParser().feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * client_mod.REPLY_HEAD_BYTES_MAX)
    many = b"".join(b"X-%d: a\r\n" % i for i in range(client_mod.REPLY_HEADERS_MAX + 1))
    with pytest.raises(BadReply, match="REPLY_HEADERS_MAX"):
        ReplyParser().feed(b"HTTP/1.1 200 OK\r\n" + many + b"Content-Length: 0\r\n\r\n")
    big = client_mod.REPLY_BODY_BYTES_MAX + 1
    with pytest.raises(BadReply, match="REPLY_BODY_BYTES_MAX"):
        ReplyParser().feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big)
    fits = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % client_mod.REPLY_BODY_BYTES_MAX
    assert ReplyParser().feed(fits) == []          # accepted, waiting for the body


def test_parsed_heads_are_cached_within_head_cache_max():
    for n in range(client_mod.HEAD_CACHE_MAX * 2):
        reply = b"HTTP/1.1 200 OK\r\nX-N: %d\r\nContent-Length: 0\r\n\r\n" % n
        assert ReplyParser().feed(reply) == [(200, b"", False)]
        assert len(client_mod._heads) <= client_mod.HEAD_CACHE_MAX


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([200, 404, 409, 503]), st.binary(max_size=40)),
                min_size=1, max_size=5),
       st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_parser_gives_the_same_replies_however_the_stream_is_cut(replies, cuts):
    stream = b"".join(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (s, len(b)) + b
                      for s, b in replies)
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    p, out = ReplyParser(), []
    for a, b in zip(bounds, bounds[1:]):
        out += p.feed(stream[a:b])
    assert out == [(s, b, False) for s, b in replies]
    assert not p.pending


# --- requests are validated before they are sent ---------------------------
@pytest.mark.parametrize("cred", ["", "a b", "a%20b", "ä", "a\r\nX: y", "a" * 129, "a&by=5"])
def test_a_bad_cred_is_refused_locally_and_never_sent(fake, cred):
    async def go():
        async with AccManClient(fake.url) as acc:
            with pytest.raises(BadRequest) as e:
                await acc.tot(cred)
            with pytest.raises(BadRequest):
                await acc.mod(cred, 1)
            return e.value
    err = run(go())
    assert fake.requests == []
    if len(cred) > 2:
        assert cred not in str(err)        # a credential is never echoed


@pytest.mark.parametrize("kwargs,exc", [
    ({"by": 0}, BadRequest), ({"by": True}, TypeError), ({"by": 1.0}, TypeError),
    ({"by": INT64_MAX + 1}, BadRequest), ({"by": INT64_MIN - 1}, BadRequest),
    ({"by": -1, "min": INT64_MAX + 1}, BadRequest), ({"by": -1, "key": ""}, BadRequest),
    ({"by": -1, "key": "k" * 65}, BadRequest), ({"by": -1, "key": "a/b"}, BadRequest),
])
def test_bad_mod_values_are_refused_locally(fake, kwargs, exc):
    with AccManSyncClient(fake.url) as acc:
        with pytest.raises(exc):
            acc.mod("alice", **kwargs)
    assert fake.requests == []


def test_bad_urls_and_tokens_are_refused():
    for url in ["ftp://h", "http://", "http://h/?q=1", "http://u:p@h", "http://h/a b"]:
        with pytest.raises(ValueError):
            AccManClient(url)
    for token in ["", "a b", "tok\r\nX: y", 5]:
        with pytest.raises(ValueError) as e:
            AccManSyncClient("http://h", token)
        assert "\r\n" not in str(e.value) and "a b" not in str(e.value)


# --- the async client against the fake -------------------------------------
def test_tot_mod_past(fake):
    async def go():
        async with AccManClient(fake.url) as acc:
            assert await acc.mod("alice", 100) == (100, 1)
            assert await acc.mod("alice", -30, min=0, key="k1") == (70, 2)
            assert await acc.tot("alice") == 70
            entries, nxt = await acc.past("alice", limit=1)
            assert entries == [Entry(2, -30, 70, entries[0].at, "k1")] and nxt == 2
            entries, nxt = await acc.past("alice", before=nxt)
            assert [e.seq for e in entries] == [1] and nxt is None
    run(go())
    assert [r[0] for r in fake.requests] == ["PATCH", "PATCH", "GET", "GET", "GET"]


def test_errors_carry_the_spec_codes(fake):
    fake.fund("bob", 5)
    fake.fund("max", INT64_MAX)

    async def go():
        async with AccManClient(fake.url) as acc:
            with pytest.raises(NoAccount):
                await acc.tot("nobody")
            with pytest.raises(NoAccount):
                await acc.past("nobody")
            with pytest.raises(Insufficient) as e:
                await acc.mod("bob", -6, min=0)
            assert e.value.tot == 5 and e.value.code == "insufficient"
            await acc.mod("bob", -1, key="once")
            with pytest.raises(KeyReused):
                await acc.mod("bob", -2, key="once")
            with pytest.raises(Overflow):
                await acc.mod("max", 1)
    run(go())
    assert fake.tot("bob") == 4


def test_token_is_sent_and_roles_map_to_401_and_403():
    with FakeAccMan(tokens={"svc-tok": {"read", "charge"}}) as fake:
        fake.fund("alice", 10)

        async def go():
            async with AccManClient(fake.url, "svc-tok") as acc:
                assert await acc.mod("alice", -1) == (9, 2)
                with pytest.raises(Forbidden) as e:
                    await acc.mod("alice", 1)
                assert e.value.status == 403
                assert "svc-tok" not in repr(acc)
            async with AccManClient(fake.url, "wrong") as acc:
                with pytest.raises(Unauthorized) as e:
                    await acc.tot("alice")
                assert e.value.status == 401
            async with AccManClient(fake.url) as acc:
                with pytest.raises(Unauthorized):
                    await acc.tot("alice")
        run(go())
        assert fake.requests[0][3] == "Bearer svc-tok"


def test_503_and_busy_and_unexpected_replies(fake):
    fake.fund("alice", 10)

    async def go():
        async with AccManClient(fake.url, retries=1) as acc:
            fake.fault = lambda m, p, q: ("reply", 503, {"error": "unavailable", "detail": "down"})
            with pytest.raises(Unavailable) as e:
                await acc.mod("alice", -1)
            assert type(e.value) is Unavailable
            fake.fault = lambda m, p, q: ("reply", 503, {"error": "busy", "detail": "later"})
            with pytest.raises(Busy):
                await acc.tot("alice")
            fake.fault = lambda m, p, q: ("reply", 405, {"error": "method_not_allowed", "detail": "no"})
            with pytest.raises(UnexpectedReply) as e:
                await acc.tot("alice")
            assert e.value.status == 405 and e.value.code == "method_not_allowed"
            fake.fault = lambda m, p, q: ("reply", 502, {})
            with pytest.raises(OutcomeUnknown):
                await acc.tot("alice")
    run(go())
    mods = fake.mods()
    # a keyless mod answered 503 is not retried; busy (refused before
    # applying) and reads are.
    assert len(mods) == 1
    assert sum(1 for r in fake.requests if r[1] == "/tot") == 2 + 1 + 2


def test_a_keyless_mod_whose_reply_is_lost_is_not_retried(fake):
    fake.fund("alice", 10)
    fake.fault = lambda m, p, q: ("apply_drop",) if p == "/mod" else None

    async def go():
        async with AccManClient(fake.url, retries=3) as acc:
            with pytest.raises(OutcomeUnknown) as e:
                await acc.mod("alice", -1)
            return e.value
    err = run(go())
    assert not isinstance(err, Unavailable)     # it may have applied: not "nothing happened"
    assert len(fake.mods()) == 1 and fake.tot("alice") == 9


def test_a_keyed_mod_whose_reply_is_lost_is_retried_and_applies_once(fake):
    fake.fund("alice", 10)
    lost = []

    def fault(m, p, q):
        if p == "/mod" and len(lost) < 2:
            lost.append(1)
            return ("apply_drop",)
    fake.fault = fault

    async def go():
        async with AccManClient(fake.url, retries=3) as acc:
            return await acc.mod("alice", -3, min=0, key="req1-r")
    assert run(go()) == (7, 2)
    assert len(fake.mods()) == 3 and fake.tot("alice") == 7


def test_a_timeout_fails_the_call_within_its_deadline(fake):
    fake.fund("alice", 10)
    fake.fault = lambda m, p, q: ("delay", 0.5) if p == "/mod" else None

    async def go():
        async with AccManClient(fake.url, timeout_s=0.1, retries=2) as acc:
            t = time.monotonic()
            with pytest.raises(CallTimeout):
                await acc.mod("alice", -1)
            elapsed = time.monotonic() - t
            assert 0.09 < elapsed < 0.3       # one attempt: a keyless mod is not retried
            fake.fault = None
            assert await acc.tot("alice") == 10   # a fresh connection; the late one was closed
    run(go())
    assert len(fake.mods()) == 1


def test_timed_out_reads_are_retried(fake):
    fake.fund("alice", 10)
    slow = [1]

    def fault(m, p, q):
        if slow:
            slow.pop()
            return ("delay", 0.5)
    fake.fault = fault

    async def go():
        async with AccManClient(fake.url, timeout_s=0.1, retries=1) as acc:
            return await acc.tot("alice")
    assert run(go()) == 10
    assert len(fake.requests) == 2


def test_unreachable_means_nothing_applied_and_even_keyless_mods_retry():
    url = f"http://127.0.0.1:{closed_port()}"

    async def go():
        async with AccManClient(url, retries=2) as acc:
            t = time.monotonic()
            with pytest.raises(Unreachable) as e:
                await acc.mod("alice", -1)
            return e.value, time.monotonic() - t
    err, elapsed = run(go())
    assert isinstance(err, Unavailable) and isinstance(err, TransportError)
    # retried twice: pauses of RETRY_PAUSE_S and 2 * RETRY_PAUSE_S
    assert elapsed >= 3 * client_mod.RETRY_PAUSE_S * 0.9
    assert "alice" not in str(err)


def test_garbage_reply_is_a_bad_reply(fake):
    fake.fault = lambda m, p, q: ("raw", b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\n\r\nxyz")

    async def go():
        async with AccManClient(fake.url, retries=0) as acc:
            with pytest.raises(BadReply):
                await acc.tot("alice")
            fake.fault = lambda m, p, q: ("raw", b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"tot\":1}")
            assert await acc.tot("alice") == 1
            fake.fault = lambda m, p, q: ("raw", b"HTTP/1.1 200 OK\r\nContent-Length: 12\r\n\r\n{\"tot\":true}")
            with pytest.raises(BadReply):
                await acc.tot("alice")
            fake.fault = lambda m, p, q: ("raw", b"junk\r\n\r\n")
            with pytest.raises(BadReply):
                await acc.tot("alice")
    run(go())


def test_a_reply_nobody_asked_for_drops_the_connection(fake):
    two = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"tot\":1}" * 2
    fake.fault = lambda m, p, q: ("raw", two) if not fake.connections > 1 else None
    fake.fund("alice", 5)

    async def go():
        async with AccManClient(fake.url, retries=0) as acc:
            assert await acc.tot("alice") == 1
            await asyncio.sleep(0.05)
            assert acc._conns == []             # closed: its framing cannot be trusted
            assert await acc.tot("alice") == 5  # a fresh connection
    run(go())
    assert fake.connections == 2


def test_many_calls_in_flight_share_a_bounded_pool(fake):
    fake.fund("alice", 10_000)
    fake.fault = lambda m, p, q: ("delay", 0.001)

    async def go():
        async with AccManClient(fake.url, connections_max=4) as acc:
            results = await asyncio.gather(*(acc.mod("alice", -1, key=f"k{i}") for i in range(500)))
            reads = await asyncio.gather(*(acc.tot("alice") for _ in range(200)))
            return results, reads
    results, reads = run(go())
    assert sorted(seq for _, seq in results) == list(range(2, 502))
    assert reads == [9500] * 200 and fake.tot("alice") == 9500
    assert fake.connections <= 4


def test_pipeline_depth_and_waiting_calls_are_bounded(fake, monkeypatch):
    monkeypatch.setattr(client_mod, "CALLS_WAITING_MAX", 5)
    fake.fund("alice", 10)
    fake.fault = lambda m, p, q: ("delay", 0.05)
    depth = client_mod.PIPELINE_DEPTH_MAX

    async def go():
        async with AccManClient(fake.url, connections_max=1, retries=0) as acc:
            await acc.tot("alice")
            tasks = [asyncio.create_task(acc.tot("alice")) for _ in range(depth + 5)]
            await asyncio.sleep(0.01)
            conn = acc._conns[0]
            assert len(conn.waiting) == depth and len(acc._waiters) == 5
            with pytest.raises(Busy, match="CALLS_WAITING_MAX"):
                await acc.tot("alice")
            assert await asyncio.gather(*tasks) == [10] * (depth + 5)
    run(go())
    assert fake.connections == 1


def test_idle_connections_are_not_reused_past_idle_reuse_s(fake, monkeypatch):
    monkeypatch.setattr(client_mod, "IDLE_REUSE_S", 0.05)
    fake.fund("alice", 1)

    async def go():
        async with AccManClient(fake.url) as acc:
            await acc.tot("alice")
            await acc.tot("alice")
            assert fake.connections == 1
            await asyncio.sleep(0.1)
            await acc.tot("alice")
            assert fake.connections == 2
    run(go())


def test_a_closed_client_refuses_calls(fake):
    async def go():
        acc = AccManClient(fake.url)
        await acc.aclose()
        with pytest.raises(Unreachable):
            await acc.tot("alice")
    run(go())


def test_cancelled_calls_leave_the_connection_usable(fake):
    fake.fund("alice", 3)
    fake.fault = lambda m, p, q: ("delay", 0.05) if p == "/past" else None

    async def go():
        async with AccManClient(fake.url, connections_max=1) as acc:
            t = asyncio.create_task(acc.past("alice"))
            await asyncio.sleep(0.01)
            t.cancel()
            assert await acc.tot("alice") == 3      # pipelined behind the cancelled one
    run(go())


# --- the blocking client ----------------------------------------------------
def test_sync_client_calls_and_errors(fake):
    with AccManSyncClient(fake.url) as acc:
        assert acc.mod("alice", 10, key="fund-1") == (10, 1)
        assert acc.mod("alice", 10, key="fund-1") == (10, 1)       # idempotent
        assert acc.tot("alice") == 10
        with pytest.raises(Insufficient) as e:
            acc.mod("alice", -11, min=0)
        assert e.value.tot == 10
        with pytest.raises(NoAccount):
            acc.tot("bob")
        entries, nxt = acc.past("alice")
        assert [e.by for e in entries] == [10] and nxt is None
    assert fake.connections == 1


def test_sync_client_reconnects_when_the_server_closed_the_idle_connection(fake):
    fake.fund("alice", 10)
    with AccManSyncClient(fake.url) as acc:
        acc.tot("alice")
        # the server closes the idle keep-alive connection
        asyncio.run_coroutine_threadsafe(_close_all(fake), fake.loop).result(2)
        time.sleep(0.05)
        # a keyless mod goes out on a fresh connection instead of into a dead one
        assert acc.mod("alice", -1) == (9, 2)
    assert fake.connections == 2 and len(fake.mods()) == 1


async def _close_all(fake):
    for w in list(fake._writers):
        w.close()


def test_sync_client_timeout_and_retry_rules(fake):
    fake.fund("alice", 10)
    fake.fault = lambda m, p, q: ("delay", 0.3) if p == "/mod" else None
    with AccManSyncClient(fake.url, timeout_s=0.1, retries=2) as acc:
        t = time.monotonic()
        with pytest.raises(CallTimeout):
            acc.mod("alice", -1)
        assert time.monotonic() - t < 0.25
        assert len(fake.mods()) == 1
        with pytest.raises(CallTimeout):
            acc.mod("alice", -1, key="k")
        assert len(fake.mods()) == 1 + 3
    time.sleep(0.35)
    assert fake.tot("alice") == 8       # the late keyless one, and the keyed one once


def test_sync_client_unreachable():
    with AccManSyncClient(f"http://127.0.0.1:{closed_port()}", retries=0) as acc:
        with pytest.raises(Unreachable):
            acc.tot("alice")
