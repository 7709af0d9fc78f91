"""What a stop tells a client that pipelines (docs/SERVER.md, Shutdown): the
last reply it is owed says `Connection: close`, or the first request the
stop did not take is answered `503 shutting_down`, so that the requests
it sent after are known not taken (RFC 9112 9.6) and may be sent again
elsewhere, never of unknown outcome.  The stop's other steps are tested
in test_http_basics.py."""

import asyncio
import os
import signal
import socket
import threading
import time

import pytest
import uvloop
from conftest import (get, parse_responses, patch, read_to_the_end, request_bytes,
                      served_in_process, with_history)

from accman import Ledger
from accman.client import AccManClient
from accman.errors import Unreachable
from accman.server.state import unread_request

MODS = 20
LATE = 200


class HeldDisk:
    """The ledger's writes to its file ahead (os.pwritev, on its writer
    threads) wait while `held`: every mod taken meanwhile stays owed."""

    def __init__(self, monkeypatch):
        self.open = threading.Event()
        self.open.set()
        real = os.pwritev

        def pwritev(*args):
            if threading.current_thread() is not threading.main_thread():
                assert self.open.wait(30), "the disk was held for good"
            return real(*args)
        monkeypatch.setattr(os, "pwritev", pwritev)

    def hold(self):
        self.open.clear()

    def release(self):
        self.open.set()


async def _the_connection(server):
    """The server's one connection, once it has accepted it (the client's
    connect can end before the server's accept has run)."""
    deadline = time.monotonic() + 10
    while len(server.connections) != 1:
        assert time.monotonic() < deadline, f"{len(server.connections)} connections, not 1"
        await asyncio.sleep(0.001)
    [conn] = server.connections
    return conn


async def _owed_until(conn, n):
    """Until `conn` owes `n` replies (its requests all read and taken)."""
    deadline = time.monotonic() + 10
    while len(conn.waiting) != n:
        assert time.monotonic() < deadline, f"{len(conn.waiting)} replies owed, not {n}"
        await asyncio.sleep(0.001)


def _stop_with_mods_owed(path, disk, last: bytes) -> tuple[list, int]:
    """MODS charges of 1 pipelined and `last` behind them, all taken and
    owed (the disk held) when the server stops; then LATE charges more.
    The replies the client gets until the server's end, and the balance
    the ledger has after."""
    async def main():
        led = Ledger(path)
        try:
            async with served_in_process(led) as (server, host, port):
                await led.amod("a", 1000)
                reader, writer = await asyncio.open_connection(host, port)
                disk.hold()
                writer.write(patch("/mod?cred=a&by=-1") * MODS + last)
                conn = await _the_connection(server)
                await _owed_until(conn, MODS + 1)
                server.request_stop("a test")
                await asyncio.sleep(0.05)
                writer.write(patch("/mod?cred=a&by=-1") * LATE)
                await asyncio.sleep(0.05)
                disk.release()
                data = await asyncio.wait_for(reader.read(-1), 10)
                writer.close()
                await asyncio.wait_for(server.serve_until_stopped(), 10)
        finally:
            disk.release()
            tot = led.tot("a")
            led.close()
        return parse_responses(data, heads=[False] * MODS + [last.startswith(b"HEAD")]), tot

    return uvloop.run(main())


@pytest.mark.parametrize("last,status", [
    (patch("/mod?cred=a&by=-1"), 200),          # a lane entry
    (patch("/mod?cred=nobody&by=-1"), 404),     # a lane entry refused
    (get("/nope"), 404),                        # a reply made, waiting its turn
    (get("/health"), 503),                      # answered at its turn, while stopping
    (request_bytes("HEAD", "/tot?cred=a"), 200),    # a read ordered behind the mods
])
def test_the_last_reply_owed_at_a_stop_says_close(tmp_path, monkeypatch, last, status):
    """The requests sent after the stop are not taken, and the last reply
    the client gets says so (`Connection: close`); every one before it is
    a keep-alive reply as it was made.  None of the late ones applied."""
    disk = HeldDisk(monkeypatch)
    replies, tot = _stop_with_mods_owed(str(tmp_path / "d"), disk, last)
    assert [r.status for r in replies] == [200] * MODS + [status]
    assert [r.json["tot"] for r in replies[:MODS]] == list(range(999, 999 - MODS, -1))
    assert [r.headers.get("connection") for r in replies] == [None] * MODS + ["close"]
    assert tot == 1000 - MODS - (last.startswith(b"PATCH /mod?cred=a&"))


def test_a_client_pipelining_through_a_stop_knows_its_late_calls_not_taken(tmp_path,
                                                                            monkeypatch):
    """AccManClient's calls pipelined on one connection: those the stop
    finds owed are answered; those sent after it, behind the reply that
    says `Connection: close`, are `Unreachable` (never taken, safe to send
    again), not of unknown outcome, and none of them applied."""
    disk = HeldDisk(monkeypatch)

    async def main():
        led = Ledger(str(tmp_path / "d"))
        try:
            async with served_in_process(led) as (server, host, port):
                async with AccManClient(f"http://{host}:{port}", connections_max=1,
                                        retries=0) as acc:
                    await acc.mod("a", 1000)
                    disk.hold()
                    first = [asyncio.ensure_future(acc.mod("a", -1)) for _ in range(MODS)]
                    conn = await _the_connection(server)
                    await _owed_until(conn, MODS)
                    server.request_stop("a test")
                    await asyncio.sleep(0.05)
                    late = [asyncio.ensure_future(acc.mod("a", -1)) for _ in range(10)]
                    await asyncio.sleep(0.05)
                    disk.release()
                    got = await asyncio.wait_for(
                        asyncio.gather(*first, *late, return_exceptions=True), 10)
                await asyncio.wait_for(server.serve_until_stopped(), 10)
        finally:
            disk.release()
            tot = led.tot("a")
            led.close()
        return got, tot

    got, tot = uvloop.run(main())
    assert got[:MODS] == [(999 - i, 2 + i) for i in range(MODS)]
    assert [type(e) for e in got[MODS:]] == [Unreachable] * 10, got[MODS:]
    assert tot == 1000 - MODS


@pytest.mark.any_one_store("the stop's rules are the connection's, whatever the store")
def test_a_request_unread_at_a_stop_is_answered_503_after_the_replies(start_server, cred):
    """Nothing owed, but replies still in the server's buffers and the
    client's next requests unread (reading is held back while the client
    does not read).  A close would be a reset, which drops what the kernel
    has yet to send: the stop lingers, every reply arrives whole, then an
    orderly end.  The first request not taken, held or still in the
    kernel, is answered `503 shutting_down` with `Connection: close`: the
    client learns that it was not taken, nor anything after it."""
    s = start_server()
    with_history(s, cred, 1000)
    big = get(f"/past?cred={cred}&limit=1000")
    with s.connect(rcvbuf=4096) as c:
        for _ in range(150):
            c.send(big)
            time.sleep(0.02)
        c.send(get("/health"))
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)
        replies = read_to_the_end(c)
    last = replies.pop()
    assert (last.status, last.json["error"]) == (503, "shutting_down"), last
    assert last.headers["connection"] == "close"
    assert 1 < len(replies) < 151, len(replies)
    assert all(r.status == 200 and len(r.json["past"]) == 1000 for r in replies)
    assert s.proc.wait(5) == 0


def test_a_bug_in_one_connection_s_stop_does_not_stop_the_stop(tmp_path, monkeypatch):
    """One connection's stop raises (a bug): that connection gets its 500
    and closes, as after any internal error, and the others are stopped
    as ever; the server's stop ends, where it used to hang for good."""
    from accman.server.connection import Connection
    real = Connection.stop
    broken = []

    def stop(conn):
        if not broken:
            broken.append(conn)
            raise RuntimeError("a bug in stop")
        real(conn)
    monkeypatch.setattr(Connection, "stop", stop)

    async def main():
        with Ledger(str(tmp_path / "d")) as led:
            async with served_in_process(led) as (server, host, port):
                clients = [await asyncio.open_connection(host, port) for _ in range(3)]
                while len(server.connections) < 3:
                    await asyncio.sleep(0.001)
                server.request_stop("a test")
                await asyncio.wait_for(server.serve_until_stopped(), 10)
                return [await asyncio.wait_for(r.read(-1), 5) for r, _ in clients]

    got = uvloop.run(main())
    assert len(broken) == 1
    assert sorted(parse_responses(b)[0].status if b else 0 for b in got) == [0, 0, 500]


@pytest.mark.parametrize("sent,expected", [
    (b"", None), (b"\r\n\r\n", None), (b"PATCH /mod?cred=a&by=-1 HTTP/1.1\r\n", False),
    (b"\r\nGET /tot", False), (b"HEAD /tot?cred=a HTTP/1.1\r\n\r\n", True),
    (b"\r\nHE", True), (b"HEADER / HTTP/1.1\r\n", False),
])
def test_unread_request_looks_without_taking(sent, expected):
    """What a stop sees of a client's unread bytes: whether they begin a
    request, and whether a HEAD (its 503 then has no body); the bytes stay
    for the lingering close to read."""
    a, b = socket.socketpair()
    with a, b:
        if sent:
            a.sendall(sent)
        assert unread_request(b) is expected
        b.setblocking(False)
        got = b.recv(1024) if sent else b""
        assert got == sent
