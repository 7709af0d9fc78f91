"""The clients against the real AccMan server when connections fail or are
shared: a full server that refuses connections as they open, an AccMan that
is down or stalled, a burst of calls while the pool's connections are
dialled, replies that close a connection with calls pipelined
behind them, one sync client shared by threads, one async client used
under two event loops; and the event stream's order check against every
page real servers send.  What each failure means
for money is in its type (docs/CALLING.md, "Errors"), so each test checks
the type and what the server applied."""

from __future__ import annotations

import asyncio
import json
import os
import signal
import socket
import sys
import threading
import time

import pytest

from accman.calling import client as client_mod
from accman.client import (AccManClient, AccManSyncClient, CallTimeout, OutcomeUnknown,
                           Unauthorized, Unreachable)
from accman.errors import AccManError, Busy
from fake_accman import closed_port, run
from test_cli_faults import PROXY_TIMEOUT_S
from threaded_proxy import Proxy


def hold_slots(srv, n: int) -> list:
    """`n` connections to `srv`, each admitted (it answered a request on it)."""
    held = []
    for _ in range(n):
        c = srv.connect()
        c.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
        assert c.response().status == 200
        held.append(c)
    return held


def wait_for_room(srv, timeout_s: float = 5.0) -> None:
    """Until `srv` takes a new connection again."""
    deadline = time.monotonic() + timeout_s
    while True:
        r = srv.get("/health")
        if r.status == 200:
            return
        assert time.monotonic() < deadline, r
        time.sleep(0.02)


class Front(Proxy):
    """The first connection made through it is answered `refusal` (raw
    bytes) once `heads` requests have arrived on it, and closed, as a full
    server does; every later one is passed through."""

    def __init__(self, upstream_port: int, refusal: bytes, heads: int):
        self.refusal = refusal
        self.heads = heads
        super().__init__(upstream_port)

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        if self.connections == 1:
            for _ in range(self.heads):
                await reader.readuntil(b"\r\n\r\n")
            writer.write(self.refusal)
            await writer.drain()
            writer.close()
            return
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(_pipe(reader, up_writer), _pipe(up_reader, writer))


async def _pipe(reader, writer) -> None:
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass
    finally:
        writer.close()


def kinds(results) -> set:
    return {type(r) for r in results}


# --- a full server refuses connections as they open ------------------------------
def test_a_full_server_s_refusals_are_busy_and_never_wedge_the_pool(start_server, cred):
    """A server at CONNECTIONS_MAX answers `503 busy` and closes as the
    connection opens, often before the client has sent anything.  No such
    connection is pooled; each call gets Busy, or Unreachable when it was
    never sent, never an AttributeError or a CallTimeout; and the client
    works again as soon as the server has room.

    A request that reaches the server before it accepts the connection
    makes its close a reset, which can destroy the 503 on the way: that
    call cannot tell a refusal from a crash, and is an OutcomeUnknown (the
    server applied nothing, as the balance shows)."""
    srv = start_server(env={"ACCMAN_CONNECTIONS_MAX": "2"})
    srv.mod(cred, 100)
    held = hold_slots(srv, 2)

    async def while_full(acc):
        one_by_one = []
        for _ in range(12):
            one_by_one += await asyncio.gather(acc.tot(cred), return_exceptions=True)
        at_once = await asyncio.gather(*(acc.mod(cred, -1) for _ in range(40)),
                                       return_exceptions=True)
        assert kinds(one_by_one + at_once) <= {Busy, Unreachable, OutcomeUnknown}
        assert Busy in kinds(one_by_one)
        # Nothing lost stays pooled; one refused by a 503 the server sent
        # unasked (or closed by it) is closing, and leaves the pool as its
        # close is heard, on a loop turn that may come after this one.
        assert all(c.transport is not None and (c.usable or c.transport.is_closing())
                   for c in acc._conns), acc._conns

    async def refused_all(acc):
        # Every connection the client opened while the server was full, a
        # spare dialled in the background among them, refused and gone: one
        # dialled as the slots free would take one, and the probe below
        # would find the server full of the client's idle connections.
        deadline = time.monotonic() + 15.0         # past the client's 10 s dial timeout
        while acc._conns or acc._connecting:
            assert time.monotonic() < deadline, (acc._conns, acc._connecting)
            await asyncio.sleep(0.01)

    async def go():
        async with AccManClient(srv.url, connections_max=4, timeout_s=10.0, retries=2) as acc:
            await while_full(acc)
            await refused_all(acc)
            for c in held:
                c.close()
            await asyncio.get_running_loop().run_in_executor(None, wait_for_room, srv)
            t = time.monotonic()
            assert [await acc.mod(cred, -1) for _ in range(5)][-1][0] == 95
            assert time.monotonic() - t < 5.0           # no call waited out its timeout
    run(go())
    assert srv.tot(cred) == 95                          # nothing refused was applied


def test_a_refusal_before_any_request_is_busy_or_else_unreachable():
    """A closing 503 that comes as the connection opens, before the client
    wrote anything: AccMan's own (`busy`) is Busy; any other (a proxy's
    503) is Unreachable, since nothing was sent, so even a keyless call is
    retried."""
    async def refused(body: bytes):
        acc = AccManClient("http://127.0.0.1:1")
        acc._bound_loop()
        conn = client_mod.Conn(acc)
        conn.connection_made(_Transport())
        conn.data_received(b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                           b"Content-Length: %d\r\n\r\n%s" % (len(body), body))
        try:
            acc._discard(conn)
        except AccManError as e:
            return e
    assert type(run(refused(b'{"error":"busy","detail":"full"}'))) is Busy
    err = run(refused(b'{"error":"unavailable","detail":"no backend"}'))
    assert type(err) is Unreachable and "no backend" in err.detail


class _Transport(asyncio.Transport):
    def close(self) -> None:
        pass


# --- dials that fail -----------------------------------------------------------------
def test_calls_waiting_on_dials_that_fail_are_unreachable_at_once():
    """AccMan down: every call, also those queued behind the pool's dials,
    is Unreachable (nothing sent) as soon as the dials are refused, not a
    CallTimeout after timeout_s."""
    url = f"http://127.0.0.1:{closed_port()}"

    async def go():
        async with AccManClient(url, timeout_s=10.0, retries=0) as acc:
            t = time.monotonic()
            results = await asyncio.gather(*(acc.mod("alice", -1) for _ in range(50)),
                                           return_exceptions=True)
            return results, time.monotonic() - t
    results, elapsed = run(go())
    assert kinds(results) == {Unreachable}
    assert elapsed < 5.0                    # no call waited out its timeout


def test_a_call_queued_behind_a_stalled_dial_is_unreachable():
    """A listener whose accept queue is full: connects hang.  The call
    that waits for the dialling one's slot was never sent: Unreachable,
    not an OutcomeUnknown."""
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen(0)
    port = listener.getsockname()[1]
    fill = [socket.socket() for _ in range(4)]
    for s in fill:
        s.setblocking(False)
        s.connect_ex(("127.0.0.1", port))
    url = f"http://127.0.0.1:{port}"

    async def go():
        async with AccManClient(url, connections_max=1, timeout_s=0.5, retries=0) as acc:
            dialling = asyncio.create_task(acc.tot("alice"))
            await asyncio.sleep(0.01)
            return await asyncio.gather(dialling, acc.mod("alice", -1),
                                        return_exceptions=True)
    try:
        results = run(go())
    finally:
        for s in fill + [listener]:
            s.close()
    assert [type(r) for r in results] == [Unreachable, Unreachable]


def test_a_call_that_never_got_a_connection_is_unreachable_and_not_applied(
        start_server, cred, monkeypatch):
    """A stalled AccMan (SIGSTOP): the call on the only connection is sent
    and times out (CallTimeout: unknown); those queued for a slot time out
    unsent, Unreachable, and the server, once resumed, applied none of
    them."""
    monkeypatch.setattr(client_mod, "PIPELINE_DEPTH_MAX", 1)
    srv = start_server()
    srv.mod(cred, 100)

    async def go():
        async with AccManClient(srv.url, connections_max=1, timeout_s=0.5, retries=0) as acc:
            await acc.tot(cred)
            srv.send_signal(signal.SIGSTOP)
            try:
                return await asyncio.gather(*(acc.mod(cred, -1) for _ in range(6)),
                                            return_exceptions=True)
            finally:
                srv.send_signal(signal.SIGCONT)
    results = run(go())
    assert kinds(results) == {CallTimeout, Unreachable}
    sent = sum(isinstance(r, OutcomeUnknown) for r in results)
    time.sleep(0.2)
    assert 100 - sent <= srv.tot(cred) <= 100


# --- a burst while the pool dials -----------------------------------------------------
class HoldReplies(Proxy):
    """Passes every request on to the real server at once and holds every
    reply back until `release()`.  `heads` counts the requests passed on
    (AccMan's requests have no body: one head each); `reached` is set once
    `expect` of them have been."""

    def __init__(self, upstream_port: int, expect: int):
        self.expect = expect
        self.heads = 0
        self.reached = threading.Event()
        self._released = asyncio.Event()        # bound to the proxy's loop at its first wait
        super().__init__(upstream_port)

    def release(self) -> None:
        self.loop.call_soon_threadsafe(self._released.set)

    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        await asyncio.gather(self._requests(reader, up_writer), self._replies(up_reader, writer))

    async def _requests(self, reader, writer) -> None:
        tail = b""                          # a head's end may be split between reads
        try:
            while data := await reader.read(65536):
                writer.write(data)
                seen = tail + data
                self.heads += seen.count(b"\r\n\r\n")
                end = seen.rfind(b"\r\n\r\n")
                tail = seen[end + 4 if end >= 0 else 0:][-3:]
                if self.heads >= self.expect:
                    self.reached.set()
                await writer.drain()
        except OSError:
            pass
        finally:
            writer.close()

    async def _replies(self, reader, writer) -> None:
        await self._released.wait()
        await _pipe(reader, writer)


DEPTH = client_mod.PIPELINE_DEPTH_MAX


@pytest.mark.any_one_store("the subject lies between the client and the server")
@pytest.mark.parametrize("connections_max,calls", [(1, 20), (4, 100), (1, DEPTH + 8)])
def test_calls_queued_while_the_pool_dials_are_pipelined_at_once(shared_server, cred,
                                                                   connections_max, calls):
    """Calls started together on a fresh client, most of them queued while
    the pool's connections are dialled: each is written as soon as a
    connection is up, pipelined as on an open connection, not one per
    reply.  All of them, up to PIPELINE_DEPTH_MAX per connection, reach
    the server before it has answered any, the rest wait for a slot; and
    each call gets the reply to its own request."""
    creds = [f"{cred}-{i}" for i in range(calls)]
    for i, c in enumerate(creds):
        shared_server.mod(c, 100 + i)
    on_wire = min(calls, connections_max * DEPTH)
    proxy = HoldReplies(shared_server.port, on_wire)

    async def go():
        async with AccManClient(proxy.url, connections_max=connections_max,
                                timeout_s=30.0, retries=0) as acc:
            burst = asyncio.gather(*(acc.mod(c, -1) if i % 2 else acc.tot(c)
                                     for i, c in enumerate(creds)), return_exceptions=True)
            try:
                reached = await asyncio.get_running_loop().run_in_executor(
                    None, proxy.reached.wait, 10.0)
                assert reached, f"{proxy.heads} of {on_wire} requests sent before any reply"
                assert len(acc._conns) == connections_max == proxy.connections
                in_flight = [len(c.waiting) for c in acc._conns]
                assert sum(in_flight) == on_wire == proxy.heads and max(in_flight) <= DEPTH
                assert len(acc._waiters) == calls - on_wire
            finally:
                proxy.release()
                results = await burst
            return results
    try:
        results = run(go())
    finally:
        proxy.close()
    assert results == [(100 + i - 1, 2) if i % 2 else 100 + i for i in range(calls)]


# --- replies that close the connection ---------------------------------------------
def test_calls_pipelined_behind_a_401_are_unauthorized_too(start_server):
    """A wrong token: the server answers 401 and closes, processing nothing
    after it (RFC 9112 §9.6).  Every call pipelined behind it is refused
    the same way, none is an unknown outcome."""
    srv = start_server(tokens=f"read,charge,mint {'T' * 32}")

    async def go():
        async with AccManClient(srv.url, "W" * 32, connections_max=1) as acc:
            return await asyncio.gather(*(acc.mod("alice", -1) for _ in range(20)),
                                        return_exceptions=True)
    assert kinds(run(go())) == {Unauthorized}


def test_calls_pipelined_behind_a_closing_refusal_are_sent_again(start_server, cred):
    """The first connection is answered `503 busy` and closed, as a full
    server does, once 20 keyless mods are pipelined on it.  The 19 behind
    the first were never processed: they are retried as unsent calls, as
    is the first (Busy), and every mod applies exactly once."""
    srv = start_server()
    srv.mod(cred, 100)
    body = b'{"error":"busy","detail":"the server is at CONNECTIONS_MAX connections"}'
    front = Front(srv.port, b"HTTP/1.1 503 Service Unavailable\r\nConnection: close\r\n"
                            b"Content-Type: application/json\r\nContent-Length: %d\r\n\r\n%s"
                  % (len(body), body), heads=20)

    async def go():
        async with AccManClient(front.url, connections_max=1, retries=2) as acc:
            first = asyncio.create_task(acc.mod(cred, -1))
            while not acc._conns:                       # the first is sent: pipeline on it
                await asyncio.sleep(0.005)
            rest = await asyncio.gather(*(acc.mod(cred, -1) for _ in range(19)),
                                        return_exceptions=True)
            return [await first] + rest
    try:
        results = run(go())
    finally:
        front.close()
    assert not [r for r in results if isinstance(r, AccManError)], results
    assert srv.tot(cred) == 80 and front.connections == 2


# An AccMan whose /past for the credential "boom" raises: a bug stands in for
# any internal error, which the server answers `500` and closes
# (Server.internal_error) after requests behind it went to the store.
BUGGY_SERVER = """
import sys
from accman.server import routes, run

past = routes.Routes._past

def buggy_past(self, conn, req, mode, ordered):
    if req.cred == "boom":
        raise RuntimeError("injected bug")
    return past(self, conn, req, mode, ordered)

routes.Routes._past = buggy_past
sys.exit(run(host="127.0.0.1", port=0, data=sys.argv[1]))
"""


@pytest.mark.embedded_only("it serves the data directory through an injected bug")
def test_calls_pipelined_behind_a_500_are_unknown_and_never_charged_twice(
        start_server, tmp_path, cred):
    """Keyless mods pipelined around a read that hits a server bug: the
    500 closes the connection after mods behind it in the pipeline may
    have been applied.  None of them is sent again: each either is
    reported applied or is an OutcomeUnknown, and the server charged no
    more than those calls."""
    script = tmp_path / "buggy_server.py"
    script.write_text(BUGGY_SERVER)
    srv = start_server(cmd=[sys.executable, str(script), str(tmp_path / "data")])
    srv.mod(cred, 1000)

    async def go():
        async with AccManClient(srv.url, connections_max=1, retries=2) as acc:
            await acc.tot(cred)                 # the connection is open: one write each
            calls = [acc.mod(cred, -1) for _ in range(10)] + [acc.past("boom"),
                                                             acc.mod(cred, -1)]
            return await asyncio.gather(*calls, return_exceptions=True)
    results = run(go())
    mods = results[:10] + results[11:]
    applied = sum(isinstance(r, tuple) for r in mods)
    unknown = sum(isinstance(r, OutcomeUnknown) for r in mods)
    assert applied + unknown == 11, results
    assert applied <= 1000 - srv.tot(cred) <= applied + unknown, results


class _Wire(asyncio.Transport):
    """A transport that keeps what is written and never closes."""

    def __init__(self):
        super().__init__()
        self.written = []

    def write(self, data) -> None:
        self.written.append(data)

    def is_closing(self) -> bool:
        return False

    def close(self) -> None:
        pass


def _behind_closing(reply: bytes) -> list:
    """The errors of three calls pipelined behind a first that gets
    `reply`: two written, the third not yet flushed."""
    async def go():
        acc = AccManClient("http://127.0.0.1:1")
        loop = acc._bound_loop()
        conn = client_mod.Conn(acc)
        conn.connection_made(_Wire())
        futs = [loop.create_future() for _ in range(4)]
        for fut in futs[:3]:
            conn.send(b"PATCH /mod?cred=a&by=-1 HTTP/1.1\r\n\r\n", fut)
        conn.flush()
        conn.send(b"PATCH /mod?cred=a&by=-1 HTTP/1.1\r\n\r\n", futs[3])
        conn.data_received(reply)
        return [type(f.exception()) for f in futs[1:]]
    return run(go())


def _closing(status: int, body: bytes) -> bytes:
    return (b"HTTP/1.1 %d X\r\nConnection: close\r\nContent-Length: %d\r\n\r\n%s"
            % (status, len(body), body))


@pytest.mark.parametrize("status,code", [(500, b"internal"), (502, b"bad_gateway"),
                                         (504, b"gateway_timeout"), (400, b""), (302, b"")])
def test_calls_written_behind_another_closing_reply_are_unknown(status, code):
    """Behind a closing reply that AccMan does not give before taking
    anything more (its 500, a proxy's 502 or 504 whatever its body, a 400
    or a redirect that is not AccMan's), each written call may have been
    applied: OutcomeUnknown; the one not yet written is Unreachable."""
    body = b'{"error":"%s","detail":"x"}' % code if code else b"<html>bad</html>"
    assert _behind_closing(_closing(status, body)) == [OutcomeUnknown, OutcomeUnknown,
                                                       Unreachable]


@pytest.mark.parametrize("status,code", [(503, b"busy"), (503, b"shutting_down"),
                                         (400, b"bad_request"), (408, b"timeout"),
                                         (413, b"payload_too_large"),
                                         (431, b"headers_too_large"),
                                         (503, b"unavailable"), (409, b"insufficient"),
                                         (404, b"no_account")])
def test_calls_behind_a_reply_given_before_taking_more_are_unreachable(status, code):
    """Behind a closing error of AccMan's, which it gives before taking any
    request more on the connection (conn.untaken_behind: a framing error,
    or the last reply a stop owes, whatever it is), nothing was processed:
    every call is Unreachable, and is sent again."""
    body = b'{"error":"%s","detail":"x"}' % code
    if code == b"insufficient":
        body = b'{"error":"insufficient","tot":3,"detail":"x"}'
    assert _behind_closing(_closing(status, body)) == [Unreachable] * 3


@pytest.mark.parametrize("body", [b'{"tot":5,"seq":2}', b'{"tot":5}',
                                  b'{"hold":3,"tot":5,"seq":2}',
                                  b'{"account":"ab","past":[],"next":null}',
                                  b'{"events":[],"next":4}', b'{"healthy":true,"open_holds":0}'])
def test_calls_behind_a_closing_success_are_unreachable(body):
    """A success of AccMan's that closes (the last reply a stop owes): the
    server took nothing after it (RFC 9112 9.6), whatever the route."""
    assert _behind_closing(_closing(200, body)) == [Unreachable] * 3


@pytest.mark.parametrize("status,body", [
    (200, b"<html>a proxy's page</html>"), (200, b"{}"), (200, b'{"ok":true}'),
    (200, b'{"tot":5,"error":"x","detail":"y"}'), (200, b"[1]"), (201, b'{"tot":5}'),
])
def test_calls_behind_a_closing_200_not_of_accmans_shape_are_unknown(status, body):
    """A closing 200 whose body is none of AccMan's successes is another
    server's (a proxy's page), which may have sent the calls behind it on:
    each written one may have been applied."""
    assert _behind_closing(_closing(status, body)) == [OutcomeUnknown, OutcomeUnknown,
                                                       Unreachable]


@pytest.mark.parametrize("body", [b'{"error":"busy"}', b'{"error":"shutting_down"}',
                                  b'{"error":"busy","detail":null}'])
def test_calls_behind_a_foreign_503_with_accmans_code_are_unknown(body):
    """A closing 503 whose body has AccMan's code but not its error shape
    (SPEC "Errors": a `detail` string too) is a front end's
    (ProxyUnavailable), which may have sent the calls behind it on: each
    written one may have been applied, as behind any foreign reply.  They
    were taken for never processed (Unreachable), and a keyless mod among
    them would be sent again."""
    assert _behind_closing(_closing(503, body)) == [OutcomeUnknown, OutcomeUnknown,
                                                    Unreachable]


class BlackHole:
    """A proxy before the real server, in a thread: the first connection's
    first request is passed on (the server applies it) and its reply is
    swallowed; then the proxy stops listening, so every later connect is
    refused, as when AccMan goes down after taking a request."""

    def __init__(self, upstream_port: int):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.upstream_port = upstream_port
        self.forwarded = threading.Event()
        self.held = []
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        conn, _ = self.listener.accept()
        self.listener.close()
        up = socket.create_connection(("127.0.0.1", self.upstream_port))
        self.held += [conn, up]
        up.sendall(conn.recv(65536))
        up.recv(65536)                      # the reply, swallowed
        self.forwarded.set()

    def close(self) -> None:
        for s in self.held + [self.listener]:
            s.close()


def test_a_sync_keyed_mod_sent_then_unreachable_is_unknown(start_server, cred):
    """A keyed mod whose first attempt reached the server and got no reply
    (CallTimeout), and whose retries then find AccMan down (Unreachable):
    the call is an OutcomeUnknown, since the server applied it, never
    `Unreachable` ("not applied")."""
    srv = start_server()
    srv.mod(cred, 100)
    hole = BlackHole(srv.port)
    try:
        with AccManSyncClient(hole.url, timeout_s=0.5, retries=2) as acc:
            with pytest.raises(OutcomeUnknown) as got:
                acc.mod(cred, -1, key="k-sync")
    finally:
        hole.close()
    assert type(got.value) is CallTimeout and "may have been applied" in got.value.detail
    assert srv.tot(cred) == 99


def test_an_async_keyed_hold_sent_then_unreachable_is_unknown(start_server, cred):
    """The same for AccManClient, with a keyed hold."""
    srv = start_server()
    srv.mod(cred, 100)
    hole = BlackHole(srv.port)

    async def go():
        async with AccManClient(hole.url, timeout_s=0.5, retries=2) as acc:
            return (await asyncio.gather(acc.hold(cred, -10, ttl_s=60, key="k-async"),
                                         return_exceptions=True))[0]
    try:
        err = run(go())
    finally:
        hole.close()
    assert type(err) is CallTimeout and "may have been applied" in err.detail
    assert srv.tot(cred) == 90


# (the balance before, the charge, the refusal its retry meets)
LATE = {"insufficient": (10, -15), "no_account": (None, -4)}


@pytest.mark.parametrize("refusal", LATE)
def test_a_refusal_a_late_first_attempt_can_outrun_is_unknown(start_server, proxy, cred,
                                                             refusal):
    """A keyed mod with `min` whose first attempt is held back on its way
    (a front-end stalled behind a load balancer) and whose retry is refused
    `insufficient` (or `no_account`, the account not yet opened): the first
    attempt may arrive later, meet a balance topped up (or an account
    opened) meanwhile, and apply, so the call is an OutcomeUnknown, not the
    refusal ("nothing applied")."""
    before, by = LATE[refusal]
    srv = start_server()
    if before is not None:
        srv.mod(cred, before)
    p = proxy(srv, "held")
    with AccManSyncClient(p.url, timeout_s=0.5, retries=1) as acc:
        with pytest.raises(OutcomeUnknown) as got:
            acc.mod(cred, by, min=0, key="k-late")
    assert type(got.value) is CallTimeout and "may have been applied" in got.value.detail
    srv.mod(cred, 10)                   # topped up, or opened, after the refusal
    p.release.set()
    assert p.landed.wait(PROXY_TIMEOUT_S)
    assert srv.tot(cred) == (before or 0) + 10 + by     # the first attempt applied after all


# --- one sync client shared by threads -----------------------------------------------
def test_threads_sharing_a_sync_client_each_get_their_own_replies(shared_server, cred):
    """Eight threads on one AccManSyncClient, half reading balances, half
    charging with min=0: every reply is the one to the thread's own call
    (replies on a socket name no request: unguarded, a thread would read
    another account's balance, and an applied mod could come back
    Insufficient)."""
    creds = [f"{cred}-{i}" for i in range(8)]
    wrong = []

    def work(acc, i):
        for n in range(150):
            try:
                if i % 2:
                    got, want = acc.tot(creds[i]), 1000 * (i + 1)
                else:
                    got, want = acc.mod(creds[i], -1, min=0)[0], 1000 * (i + 1) - n - 1
            except AccManError as e:
                got, want = e, None
            if got != want:
                wrong.append((i, n, got, want))

    with AccManSyncClient(shared_server.url) as acc:
        for i, c in enumerate(creds):
            acc.mod(c, 1000 * (i + 1))
        threads = [threading.Thread(target=work, args=(acc, i)) for i in range(8)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    assert wrong == []
    assert [shared_server.tot(c) for c in creds[::2]] == [850, 2850, 4850, 6850]


def test_a_thread_that_waits_out_its_turn_is_unreachable_and_not_sent(start_server, cred):
    """One thread's long poll holds the shared connection; another thread's
    keyless mod that does not get its turn within timeout_s is Unreachable
    (never sent), and the server applied nothing."""
    srv = start_server()
    srv.mod(cred, 100)
    with AccManSyncClient(srv.url, timeout_s=0.5, retries=0) as acc:
        last = acc.events(after=0).next
        poll = threading.Thread(target=acc.events, args=(last,), kwargs={"wait_s": 3})
        poll.start()
        while acc._turn.acquire(blocking=False):       # until the poll holds the turn
            acc._turn.release()
            time.sleep(0.005)
        err = None
        t = time.monotonic()
        try:
            acc.mod(cred, -1)
        except AccManError as e:
            err = e
        waited = time.monotonic() - t
        poll.join()
    assert type(err) is Unreachable and 0.25 <= waited < 2.5
    assert srv.tot(cred) == 100


def test_an_interrupt_as_a_call_takes_its_turn_does_not_keep_the_lock(shared_server, cred):
    """^C arriving just as a call's acquire of the lock returns (the
    profile hook raises KeyboardInterrupt there, where the interpreter
    runs signal handlers): the lock is released, and the next calls, from
    this thread or another, are served."""
    shared_server.mod(cred, 100)
    with AccManSyncClient(shared_server.url, timeout_s=1.0, retries=0) as acc:
        turn = acc._turn

        def interrupt(frame, event, arg):
            if event == "c_return" and getattr(arg, "__self__", None) is turn \
                    and arg.__name__ == "acquire":
                sys.setprofile(None)
                raise KeyboardInterrupt
        sys.setprofile(interrupt)
        try:
            with pytest.raises(KeyboardInterrupt):
                acc.tot(cred)
        finally:
            sys.setprofile(None)
        other = []
        t = threading.Thread(target=lambda: other.append(acc.tot(cred)))
        t.start()
        t.join()
        assert other == [100] and acc.tot(cred) == 100


def test_a_forked_child_has_its_own_lock_and_connection(shared_server, cred):
    """A sync client with an open keep-alive connection forks while
    another thread holds its lock.  The child's calls neither wait for
    that lock nor use the parent's socket: parent and child each make
    calls at the same time and get their own replies, and the parent's
    connection still works afterwards."""
    mine, childs = cred + "-parent", cred + "-child"
    with AccManSyncClient(shared_server.url, timeout_s=2.0, retries=0) as acc:
        acc.mod(mine, 1000)
        acc.mod(childs, 1000)
        sock = acc._sock
        held, release = threading.Event(), threading.Event()

        def hold_turn():
            with acc._turn:
                held.set()
                release.wait(10)
        holder = threading.Thread(target=hold_turn)
        holder.start()
        held.wait(5)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:                                    # the child
            try:
                got = [acc.mod(childs, 7)[0] for _ in range(20)]
                os.write(w, repr(got).encode())
            except BaseException as e:
                os.write(w, repr(e).encode())
            finally:
                os._exit(0)
        os.close(w)
        release.set()
        holder.join()
        parent = [acc.mod(mine, -1)[0] for _ in range(20)]
        with os.fdopen(r) as f:
            child = f.read()
        os.waitpid(pid, 0)
        assert parent == list(range(999, 979, -1))
        assert child == repr(list(range(1007, 1147, 7)))
        assert acc._sock is sock and acc.tot(mine) == 980


# --- the event stream's order check and what real servers send -----------------------
async def follow(acc, after: int = 0, limit: int = 3) -> tuple:
    """Every event after `after`, page by page, each page checked by the
    client; (ids, the last next)."""
    ids = []
    while True:
        events, nxt = await acc.events(after, limit=limit)
        if not events:
            return ids, after
        ids += [e.id for e in events]
        after = nxt


def test_every_page_a_real_server_sends_passes_the_order_check(start_server, cred):
    """The client's check (ids from after + 1, one by one, next the last;
    an empty page's next at most after) refuses no reply of a correct
    server: small pages, a page asked past the end of the stream, a long
    poll woken by a mod."""
    srv = start_server()

    async def go():
        async with AccManClient(srv.url) as acc:
            for i in range(10):
                await acc.mod(f"{cred}-{i % 3}", 5 + i)
            hold, _, _ = await acc.hold(f"{cred}-0", -3, ttl_s=60)
            await acc.settle(f"{cred}-0", hold, 1)
            ids, last = await follow(acc)
            assert ids == list(range(1, 13)) and last == 12
            assert await acc.events(last + 50) == ([], last)    # told where the stream ends
            poll = asyncio.create_task(acc.events(last, wait_s=5))
            await asyncio.sleep(0.2)
            await acc.mod(f"{cred}-1", 1)
            events, nxt = await poll
            assert [e.id for e in events] == [13] and nxt == 13
    run(go())


# --- one async client, two event loops -------------------------------------------------
def test_a_client_used_under_a_second_event_loop_says_why_it_cannot(shared_server, cred):
    """Each asyncio.run() makes a new loop; the client's connections belong
    to the first.  A call under the second is a RuntimeError naming that,
    not asyncio's "Event loop is closed" from deep inside, and nothing is
    sent; closing the client afterwards is still fine."""
    acc = AccManClient(shared_server.url)
    assert run(acc.mod(cred, 3)) == (3, 1)
    with pytest.raises(RuntimeError, match="one client per event loop"):
        run(acc.mod(cred, 3))
    run(acc.aclose())
    assert shared_server.tot(cred) == 3


class Echo:
    """Not AccMan at the URL (a proxy, a firewall, another service): every
    request is answered with `status` and `code`, and a detail that quotes
    the request's head, credential and token included."""

    def __init__(self, status: int, code: str):
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.status, self.code = status, code
        threading.Thread(target=self._run, daemon=True).start()

    def _run(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            with conn:
                head = conn.recv(65536).split(b"\r\n\r\n")[0].decode("latin-1")
                body = json.dumps({"error": self.code, "detail": "x" * 150 + head}).encode()
                conn.sendall(b"HTTP/1.1 %d X\r\nContent-Type: application/json\r\n"
                             b"Content-Length: %d\r\nConnection: close\r\n\r\n%s"
                             % (self.status, len(body), body))

    def close(self) -> None:
        self.listener.close()


@pytest.mark.parametrize("status,code", [(400, "bad_request"), (404, "not_found"),
                                         (401, "unauthorized"), (403, "forbidden")])
def test_a_detail_that_quotes_the_request_shows_no_credential_or_token(status, code):
    """CALLING.md: a credential is never echoed in a message.  The detail
    is cut to DETAIL_CHARS_MAX after the secrets are out of sight, so that
    no piece of one is left at the cut either."""
    cred, token = "SECRETcred" + "c" * 40, "SECRETtoken" + "t" * 40
    echo = Echo(status, code)
    try:
        with AccManSyncClient(echo.url, token, retries=0) as acc:
            with pytest.raises(AccManError) as sync_error:
                acc.tot(cred)

        async def calls():
            async with AccManClient(echo.url, token, retries=0) as acc:
                with pytest.raises(AccManError) as async_error:
                    await acc.mod(cred, -1)
                return async_error
        async_error = run(calls())
    finally:
        echo.close()
    for info in (sync_error, async_error):
        message = str(info.value)
        assert info.value.detail == message and len(message) <= 200
        assert "SECRET" not in message and "<not shown>" in message, message
        assert "SECRET" not in repr(info.value)
