"""The buffered-bytes budget, SERVER_BUFFER_BYTES_MAX (SPEC "Limits": a
server-wide maximum, so that many clients that never read cannot exhaust
memory; docs/SERVER.md, Limits): no socket read takes the total past it,
at it no connection is read, over three quarters of it a connection
holding nothing reads a little at a time and is answered one request at a
time, and requests parsed and not yet taken count at REQUEST_HELD_BYTES.
The server runs in this process, so that its count is looked at directly
as the flood goes on; tests/reliability/test_hostile.py floods a server
process."""

import asyncio
import fcntl
import socket
import struct
import termios
import time

import pytest
import uvloop
from conftest import get, patch, served_in_process

from accman import Ledger
from accman.limits import (OVER_BUDGET_READ_BYTES, PIPELINE_REQUESTS_MAX, READ_BYTES_MAX,
                           REQUEST_HELD_BYTES)
from accman.server.connection import Connection
from accman.server.settings import ServerLimits
from accman.server.state import OPEN

pytestmark = pytest.mark.any_one_store("the budget is the connections', whatever the store")

FLOODERS = 150
BUDGET = 64 << 10           # so small that FLOODERS pass it
FLOOD_S = 3.0
# A reply of these tests', over (a 404's is the longest).
REPLY_BYTES = 512


def _flooders(host, port, n):
    """`n` connections that will never read (their receive buffers small)."""
    conns = []
    for _ in range(n):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect((host, port))
        c.setblocking(False)
        conns.append(c)
    return conns


def _send_all(conns, burst):
    for c in conns:
        try:
            c.send(burst)
        except (BlockingIOError, ConnectionError):
            pass


def _undercounted(server):
    """The connections that hold more than the server counts for them
    (their transport's bytes, their parser's, their requests held back):
    a write or a read that left bytes uncounted."""
    out = []
    for c in server.connections:
        held = c.transport.get_write_buffer_size() + c.parser.held_bytes
        if c.backlog is not None:
            held += (len(c.backlog[0]) - c.backlog[1]) * REQUEST_HELD_BYTES
        if held > c.buffered:
            out.append((held, c.buffered))
    return out


def _watch_reads(monkeypatch, reads):
    """Each socket read a connection keeps (an open one's), as (its bytes,
    the server's over_budget, full and total as it was read, and whether
    it is the connection's first)."""
    real = Connection.buffer_updated
    read_before = set()

    def buffer_updated(self, n):
        if self.state == OPEN:
            s = self.server
            reads.append((n, s.over_budget, s.full, s.buffered, self not in read_before))
            read_before.add(self)
        return real(self, n)
    monkeypatch.setattr(Connection, "buffer_updated", buffer_updated)


@pytest.mark.parametrize("request_, owed", [
    # A request's reply made at once: one at a time over three quarters.
    (get("/nope"), 1),
    (get("/tot?cred=a"), 1),
    # A mod's reply comes with its batch: those taken before the budget
    # was reached may all stay held.
    (patch("/mod?cred=a&by=1"), PIPELINE_REQUESTS_MAX),
])
def test_many_clients_that_never_read_never_pass_the_budget(tmp_path, monkeypatch,
                                                            request_, owed):
    """FLOODERS connections pipeline 404s and never read, against a budget
    they pass many times over: the bytes held never pass the budget by
    more than one reply per connection, each read over three quarters is
    OVER_BUDGET_READ_BYTES at most, and at the budget no connection is
    read.  Once they go, the budget is whole again and a health check is
    served on a new connection (it waited, not read, while it was spent)."""
    async def main():
        led = Ledger(tmp_path / "led")
        limits = ServerLimits(server_buffer_bytes_max=BUDGET)
        try:
            await led.amod("a", 1)
            async with served_in_process(led, limits) as (server, host, port):
                reader, writer = await asyncio.open_connection(host, port)
                await asyncio.sleep(0.05)
                assert len(next(iter(server.connections)).get_buffer(-1)) <= BUDGET
                conns = _flooders(host, port, FLOODERS)
                most = 0
                burst = request_ * 256
                t0 = time.monotonic()
                while time.monotonic() - t0 < FLOOD_S:
                    _send_all(conns, burst)
                    for _ in range(10):
                        await asyncio.sleep(0.001)
                        most = max(most, server.buffered)
                undercounted = _undercounted(server)
                writer.write(get("/health"))
                for c in conns:
                    c.close()
                line = await asyncio.wait_for(reader.readline(), 30)
                writer.close()
                return most, undercounted, line, server.metrics.budget_fulls
        finally:
            led.close()

    reads = []
    _watch_reads(monkeypatch, reads)
    most, undercounted, line, fulls = uvloop.run(main())
    assert fulls >= 1 and any(r[1] for r in reads), (fulls, len(reads))
    assert undercounted == [], undercounted
    assert most <= BUDGET + FLOODERS * owed * REPLY_BYTES, most
    # At the budget a connection accepted reads one byte before it is
    # held back (reading starts after connection_made); no other is read.
    assert [r for r in reads if r[2] and r[0] > 1 or r[2] and not r[4]] == []
    over = [r for r in reads if r[3] > BUDGET * 3 // 4]
    assert over and [r for r in over if r[0] > OVER_BUDGET_READ_BYTES] == []
    past = [r for r in reads if r[0] + r[3] > BUDGET and not r[2]]
    assert past == [], "a read past the budget"
    assert line.startswith(b"HTTP/1.1 200 "), line


def test_requests_parsed_and_not_taken_count_in_the_budget(tmp_path):
    """One client pipelines more /health than its write buffer lets the
    server take at once, and does not read: the requests parsed and held
    back count REQUEST_HELD_BYTES each in the server's total."""
    async def main():
        led = Ledger(tmp_path / "led")
        limits = ServerLimits(write_buffer_bytes_max=1)
        try:
            async with served_in_process(led, limits) as (server, host, port):
                [c] = _flooders(host, port, 1)
                c.send(get("/health") * 200)
                deadline = time.monotonic() + 10
                while True:
                    conns = list(server.connections)
                    if conns and conns[0].backlog is not None:
                        break
                    assert time.monotonic() < deadline, "no request was held back"
                    await asyncio.sleep(0)
                conn = conns[0]
                assert len(conn.get_buffer(-1)) == READ_BYTES_MAX     # far from the budget
                reqs, i = conn.backlog
                counted = conn.buffered
                c.close()
                return len(reqs) - i, counted
        finally:
            led.close()

    held, counted = uvloop.run(main())
    assert held > 0 and counted >= held * REQUEST_HELD_BYTES, (held, counted)


def _unread(conn) -> int:
    """The bytes its client sent that the server has not read yet."""
    sock = conn.transport.get_extra_info("socket")
    return struct.unpack("i", fcntl.ioctl(sock.fileno(), termios.FIONREAD, b"\0" * 4))[0]


async def _until(check, what):
    deadline = time.monotonic() + 10
    while not check():
        assert time.monotonic() < deadline, what
        await asyncio.sleep(0)


@pytest.mark.parametrize("request_, per_send", [
    (patch("/mod?cred=a&by=1"), 1),     # written by its batch (Pipeline.__call__)
    (get("/tot?cred=a"), 1),            # a quiet connection's /tot (Pipeline.quick)
    (get("/metrics"), 1),               # a quiet connection's other reply (Connection._fast)
])
def test_replies_left_in_the_transport_are_counted_at_once(tmp_path, request_, per_send):
    """A client sends requests, each once the last is answered, and never
    reads: once the kernel's buffers are full, each reply stays in the
    connection's transport, and is counted in the server's total as it is
    written, whichever way it was written, not only at the next sweep."""
    async def main():
        led = Ledger(tmp_path / "led")
        try:
            await led.amod("a", 1)
            async with served_in_process(led) as (server, host, port):
                [c] = _flooders(host, port, 1)
                await _until(lambda: server.connections, "no connection")
                [conn] = server.connections
                # The kernel's buffer for its replies small: they stay in
                # the transport soon.
                conn.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
                held_for = 0
                for _ in range(20_000):
                    _send_all([c], request_ * per_send)
                    await _until(lambda: not _unread(conn) and not conn.waiting,
                                 "the requests were not all answered")
                    assert _undercounted(server) == []
                    held_for += conn.transport.get_write_buffer_size() > 0
                    if held_for == 20:
                        break
                c.close()
                return held_for
        finally:
            led.close()

    assert uvloop.run(main()) == 20, "the transport never held a reply"
