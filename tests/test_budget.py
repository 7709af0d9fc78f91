"""The buffered-bytes budget, SERVER_BUFFER_BYTES_MAX (SPEC "Limits": a
server-wide maximum, so that many clients that never read cannot exhaust
memory; docs/SERVER.md, Limits): a part of it is kept for a small read of
each connection holding nothing; over the rest, a connection holding
bytes is not read, one holding none reads OVER_BUDGET_READ_BYTES at most
and is answered one request at a time, and no read takes the total past
the rest by more than that; requests parsed and not yet taken count at
REQUEST_HELD_BYTES; only replies pass the budget.
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
from conftest import get, patch, read_reply, served_in_process

from accman import Ledger
from accman.limits import (OVER_BUDGET_READ_BYTES, PIPELINE_REQUESTS_MAX, READ_BYTES_MAX,
                           REQUEST_HELD_BYTES)
from accman.server.connection import Connection
from accman.server.settings import ServerLimits
from accman.server.state import OPEN

pytestmark = pytest.mark.any_one_store("the budget is the connections', whatever the store")

# Connections that never read, and a budget so small that they pass it;
# the part of it kept for connections holding nothing covers them all
# (CONNECTIONS_MAX each time 10 more than them).
FLOODS = [(150, 512 << 10), (3, 64 << 10)]
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


def _not_replies(server) -> int:
    """What the server holds for all connections but replies: requests
    unparsed, and parsed but not yet taken."""
    held = 0
    for c in server.connections:
        held += c.parser.held_bytes
        if c.backlog is not None:
            held += (len(c.backlog[0]) - c.backlog[1]) * REQUEST_HELD_BYTES
    return held


def _watch_reads(monkeypatch, reads):
    """Each socket read a connection keeps (an open one's), as (its bytes,
    the server's total as it was read, and whether it is parsed a request
    a grant: Turn.one_each)."""
    real = Connection.buffer_updated

    def buffer_updated(self, n):
        if self.state == OPEN:
            reads.append((n, self.server.buffered, self.server.turn.one_each))
        return real(self, n)
    monkeypatch.setattr(Connection, "buffer_updated", buffer_updated)


@pytest.mark.parametrize("flooders,budget", FLOODS)
@pytest.mark.parametrize("request_, owed", [
    # A request's reply made at once: one at a time over the budget's rest.
    (get("/nope"), 1),
    (get("/tot?cred=a"), 1),
    # A mod's reply comes with its batch: those taken before the rest was
    # passed may all stay held.
    (patch("/mod?cred=a&by=1"), PIPELINE_REQUESTS_MAX),
])
def test_clients_that_never_read_never_pass_the_budget(tmp_path, monkeypatch, request_, owed,
                                                       flooders, budget):
    """Connections pipeline requests and never read, against a budget they
    pass many times over: what the server holds but replies
    never passes the budget, replies pass it by those owed (one per
    connection, or a pipeline of mods), no read under the budget's rest
    takes the total past it by more than OVER_BUDGET_READ_BYTES, and over
    it each read is that at most.  A health check on a new connection is served while they are
    still there (it holds nothing: its read is in the part kept)."""
    async def main():
        led = Ledger(tmp_path / "led")
        connections = flooders + 10
        limits = ServerLimits(server_buffer_bytes_max=budget, connections_max=connections)
        try:
            await led.amod("a", 1)
            async with served_in_process(led, limits) as (server, host, port):
                conns = _flooders(host, port, flooders)
                most = most_not_replies = 0
                burst = request_ * 256
                t0 = time.monotonic()
                while time.monotonic() - t0 < FLOOD_S:
                    _send_all(conns, burst)
                    for _ in range(10):
                        await asyncio.sleep(0.001)
                        most = max(most, server.buffered)
                        most_not_replies = max(most_not_replies, _not_replies(server))
                undercounted = _undercounted(server)
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(get("/health"))
                line = await asyncio.wait_for(reader.readline(), 10)
                for c in conns:
                    c.close()
                writer.close()
                return (most, most_not_replies, undercounted, line, server.soft_budget,
                        server.metrics.budget_pauses, connections)
        finally:
            led.close()

    reads = []
    _watch_reads(monkeypatch, reads)
    most, not_replies, undercounted, line, soft, pauses, connections = uvloop.run(main())
    assert soft == budget - connections * OVER_BUDGET_READ_BYTES
    assert pauses >= 1 and undercounted == [], (pauses, undercounted)
    assert not_replies <= budget, not_replies
    assert most <= budget + flooders * owed * REPLY_BYTES, most
    over = [r for r in reads if r[1] > soft]
    assert over and [r for r in over if r[0] > OVER_BUDGET_READ_BYTES] == []
    assert [r for r in reads if r[1] <= soft and r[0] + r[1] > soft + OVER_BUDGET_READ_BYTES] == []
    # A read parsed whole leaves room for the requests it may hold back.
    whole = PIPELINE_REQUESTS_MAX * REQUEST_HELD_BYTES
    assert [r for r in reads if not r[2] and r[0] + r[1] + whole > soft + OVER_BUDGET_READ_BYTES
            ] == []
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


def test_over_the_budget_a_flush_takes_one_request_and_parses_no_more(tmp_path):
    """Over the budget's rest, a connection held back whose client reads
    what it is sent goes on one request at a time: a flush takes one and
    leaves the rest as the bytes they are, never parsed into requests held
    back (REQUEST_HELD_BYTES each, many times their bytes)."""
    async def main():
        led = Ledger(tmp_path / "led")
        limits = ServerLimits(server_buffer_bytes_max=8 << 10, connections_max=2)
        try:
            async with served_in_process(led, limits) as (server, host, port):
                [c] = _flooders(host, port, 1)
                c.send(get("/nope") * 600)
                await _until(lambda: server.over_budget, "the budget's rest was not passed")
                [conn] = server.connections
                await _until(lambda: conn.read_paused and not conn.waiting,
                             "the connection was not held back")
                held = conn.parser.held_bytes
                conn.flush()
                c.close()
                return held, conn.parser.held_bytes, conn.backlog
        finally:
            led.close()

    before, after, backlog = uvloop.run(main())
    assert backlog is None and 0 < after < before, (before, after, backlog)


@pytest.mark.parametrize("sweeping", [True, False], ids=["swept", "unswept"])
def test_a_client_that_reads_goes_on_once_its_transport_has_drained(tmp_path, sweeping):
    """Over the budget's rest, a connection whose reply stayed in its
    transport a moment (a slow link) is held back; its client then read it
    all, the transport drained below its low-water mark (which no callback
    tells), and the connection was never read again: its next request,
    a health check, was closed as idle after IDLE_TIMEOUT_S, unanswered (a
    review).  The transport now tells its drain (Connection._watch_drain),
    so that the connection goes on without waiting for the sweep (about a
    second), and the sweep that counts it lets it be read too."""
    async def main():
        led = Ledger(tmp_path / "led")
        limits = ServerLimits(server_buffer_bytes_max=64 << 10, connections_max=200,
                              idle_timeout_s=3)
        try:
            await asyncio.gather(*(led.amod("a", 1) for _ in range(1000)))
            async with served_in_process(led, limits) as (server, host, port):
                flood = await _past_the_rest(server, host, port)
                if not sweeping:
                    server._sweeper.cancel()
                slow, conn = await _slow_link(server, host, port)
                reader, writer = await asyncio.open_connection(sock=slow)
                writer.write(get("/past?cred=a&limit=1000"))       # ~70 KB
                await _until(lambda: conn.read_paused, "the reader was not held back")
                assert (await read_reply(reader))[0] == b"200"
                writer.write(get("/health"))
                status = (await asyncio.wait_for(read_reply(reader), 10))[0]
                # Its high-water mark is back once the drain was told.
                high = conn.transport.get_write_buffer_limits()[1]
                watched = conn.drain_watched, high == conn.write_buffer_max
                for c in flood:
                    c.close()
                writer.close()
                return status, server.over_budget, watched
        finally:
            led.close()

    assert uvloop.run(main()) == (b"200", True, (False, True))


def test_a_slow_steady_reader_of_a_large_reply_over_the_rest_is_not_dropped(tmp_path):
    """Over the budget's rest, a connection holding reply bytes has its
    transport's high-water mark at 0 (_watch_drain): it stays paused until
    its transport is empty.  A client that reads steadily but slowly was
    timed from that pause and dropped after IDLE_TIMEOUT_S, its reply cut
    short, though it made progress the whole time (a review).  Progress is
    now the bytes it owes going down (PAUSED_PROGRESS_BYTES_MIN, or a
    quarter of them) within the idle time."""
    idle_s = 1.5

    async def main():
        led = Ledger(tmp_path / "led")
        limits = ServerLimits(server_buffer_bytes_max=64 << 10, connections_max=200,
                              idle_timeout_s=idle_s)
        try:
            await asyncio.gather(*(led.amod("a", 1) for _ in range(1000)))
            async with served_in_process(led, limits) as (server, host, port):
                flood = await _past_the_rest(server, host, port)
                slow, conn = await _slow_link(server, host, port)
                loop = asyncio.get_running_loop()
                await loop.sock_sendall(slow, get("/past?cred=a&limit=1000"))    # ~70 KB
                started, got, watched = time.monotonic(), b"", 0.0
                while not _whole(got) and time.monotonic() - started < 30:
                    await asyncio.sleep(0.05)           # 1 KiB each 50 ms: ~3.5 s
                    if conn.drain_watched and conn.write_paused:
                        watched += 0.05
                    chunk = await asyncio.wait_for(loop.sock_recv(slow, 1024), 10)
                    if not chunk:
                        break
                    got += chunk
                for c in flood + [slow]:
                    c.close()
                return got, watched
        finally:
            led.close()

    got, watched = uvloop.run(main())
    assert got.startswith(b"HTTP/1.1 200 ") and _whole(got), (len(got), got[-40:])
    assert watched > idle_s, watched        # paused, its drain watched, past the idle time


def _read_paused(tmp_path, idle_s, pages, chunk, every_s, read_s, sndbuf):
    """A client sent `pages` pipelined /past pages of ~70 KB, read `chunk`
    bytes every `every_s` for up to `read_s`, through a small receive
    buffer, the server's send buffer `sndbuf` bytes: (bytes read, whether
    the server dropped it, its seconds paused)."""
    async def main():
        led = Ledger(tmp_path / "led")
        try:
            await asyncio.gather(*(led.amod("a", 1) for _ in range(1000)))
            limits = ServerLimits(idle_timeout_s=idle_s)
            async with served_in_process(led, limits) as (server, host, port):
                slow, conn = await _slow_link(server, host, port)
                conn.transport.get_extra_info("socket").setsockopt(
                    socket.SOL_SOCKET, socket.SO_SNDBUF, sndbuf)
                loop = asyncio.get_running_loop()
                await loop.sock_sendall(slow, get("/past?cred=a&limit=1000") * pages)
                await asyncio.sleep(0.2)
                started, got, dropped, paused = time.monotonic(), 0, False, 0.0
                while time.monotonic() - started < read_s:
                    await asyncio.sleep(every_s)
                    paused += every_s if conn.write_paused else 0.0
                    data = await asyncio.wait_for(loop.sock_recv(slow, chunk), 10)
                    if not data:
                        dropped = True
                        break
                    got += len(data)
                # An abort leaves the kernel's queue to be sent: the server's word.
                dropped = dropped or conn not in server.connections
                slow.close()
                return got, dropped, paused
        finally:
            led.close()
    return uvloop.run(main())


def test_a_trickling_reader_of_paused_replies_is_dropped(tmp_path):
    """A client that reads a few bytes now and then moves what it owes by
    less than PAUSED_PROGRESS_BYTES_MIN (or a quarter of it) each idle
    time: no progress, dropped, where any byte read counted (a review: it
    held its replies, and the server's budget, for as long as it liked)."""
    got, dropped, paused = _read_paused(tmp_path, 2.0, 6, 1024, 0.25, 12, 4096)
    assert dropped and paused >= 2.0 and got < 100_000, (got, dropped, paused)


def test_a_reader_whose_replies_wait_in_the_kernel_makes_progress(tmp_path):
    """With the kernel's own buffers (a send buffer of megabytes on
    loopback), a reader's progress may empty only the kernel's queue while
    the transport's count stands (the socket is writable again only once a
    third of it is free): it was dropped after the idle time, reading all
    along (a review).  What it owes counts the kernel's unacknowledged
    bytes too."""
    got, dropped, paused = _read_paused(tmp_path, 1.0, 60, 4096, 0.04, 3.5, 1 << 20)
    assert not dropped and paused >= 3.0 and got > 250_000, (got, dropped, paused)


async def _past_the_rest(server, host, port):
    """90 connections that never read, sent requests until the server is
    past its budget's rest."""
    flood = _flooders(host, port, 90)
    for _ in range(60):
        _send_all(flood, get("/nope") * 64)
        await asyncio.sleep(0.01)
    await _until(lambda: server.over_budget, "the budget's rest was not passed")
    return flood


async def _slow_link(server, host, port):
    """A connection through small socket buffers at both ends: its socket
    and the server's Connection."""
    others = set(server.connections)
    [slow] = _flooders(host, port, 1)
    await _until(lambda: len(server.connections) > len(others), "no connection")
    [conn] = set(server.connections) - others
    conn.transport.get_extra_info("socket").setsockopt(socket.SOL_SOCKET, socket.SO_SNDBUF, 4096)
    return slow, conn


def _whole(reply: bytes) -> bool:
    """Whether `reply` holds a whole response: its head and Content-Length's bytes."""
    head, sep, body = reply.partition(b"\r\n\r\n")
    length = [int(line.split(b":")[1]) for line in head.split(b"\r\n")
              if line.lower().startswith(b"content-length:")]
    return bool(sep) and len(length) == 1 and len(body) == length[0]
