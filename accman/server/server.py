"""The server: the listening socket, the connections and what they share
(the store's completions, the buffered-bytes budget, the timers, shutdown).

Completions of one batch arrive in one loop callback (`deliver`); each
touched connection is then flushed once (Redis's beforeSleep: replies leave
after the append-only file is written).  A store that has a Lane (the
embedded ledger, accman/store.py) registers each connection once per batch
instead of each request: the connection's Pipeline is then the callback,
and answers all of that connection's requests the batch made durable in
one write.  Timers are one periodic sweep over
all connections and one clock for the Date header, not one timer per
request.
"""

from __future__ import annotations

import asyncio
import ctypes
import signal
import time
from time import perf_counter

from accman.errors import TokensError, where
from accman.limits import OVER_BUDGET_READ_BYTES, READ_BYTES_MAX, REQUEST_HELD_BYTES
from accman.server._pipeline import LaneStats, Turn
from accman.server.metrics import MOD_LATENCY_BUCKETS_S, Metrics
from accman.server.say import say
from accman.server._wire import ROUTE_MOD
from accman.server.replies import CLOSE, DATE, KEEP, MOD_BODY, T200_KEEP, error_body, reply
from accman.server.routes import Routes, Slot
from accman.server.settings import ServerLimits
from accman.server.state import OPEN
from accman.server.connection import Connection


# Connections gone since the last trim of the heap that trigger the next.
MEMORY_TRIM_CONNECTIONS = 64


def _malloc_trim() -> None:
    try:
        ctypes.CDLL(None).malloc_trim(0)
    except (OSError, AttributeError):
        pass            # not glibc: nothing to give back this way


def _refusal(detail: str) -> bytes:
    return reply(503, error_body("busy", detail), CLOSE)


class Server:
    """Serves a store (accman/store.py) over HTTP/1.1."""

    def __init__(self, store, *, tokens=None, limits=None, loop=None):
        self.store = store
        self.tokens = tokens
        self.limits = limits or ServerLimits()
        self.loop = loop or asyncio.get_event_loop()
        self.metrics = Metrics()
        # The store's C-level way in for mods and /tot (accman/store.py),
        # and the counters of the replies made through it.
        self.lane = getattr(store, "lane", None)
        self.lane_stats = LaneStats(MOD_LATENCY_BUCKETS_S)
        self.routes = Routes(self)
        self.connections = set()
        self.peers: dict = {}           # peer address -> open connections
        self.paused = set()             # connections not being read
        self.acked_waits = set()        # at a stop: to close once their replies are taken
        self.buffered = 0               # bytes held for all connections (account)
        # Over `soft_budget`, connections holding bytes are not read; the
        # rest of the budget is kept for a small read of each connection
        # holding none (OVER_BUDGET_READ_BYTES, at most half the budget).
        budget = self.limits.server_buffer_bytes_max
        kept = min(self.limits.connections_max * OVER_BUDGET_READ_BYTES, budget // 2)
        self.soft_budget = budget - kept
        self.over_budget = False
        # What one read parsed whole may hold back: PIPELINE_REQUESTS_MAX
        # requests, REQUEST_HELD_BYTES each.
        self._parsed_max = self.limits.pipeline_requests_max * REQUEST_HELD_BYTES
        # One buffer for every socket read (Connection.get_buffer): each read
        # is taken from it before the next begins.
        self.read_buffer = bytearray(READ_BYTES_MAX)
        self._reads = memoryview(self.read_buffer)
        self.read_into = self._reads
        self.turn = Turn(self.limits.turn_requests_max, self._turn_spent)
        self._add_buffered(0)           # the reads sized, Turn.one_each set
        self._connections_peak = 0
        self.stopping = False
        self.listener = None
        self._ready = []
        self._flush_scheduled = False
        self._sweeper = None
        self._clock = None
        self._stopped = None
        self._hurry = False

    async def start(self, host, port):
        self.listener = await self.loop.create_server(
            lambda: Connection(self), host, port, backlog=1024, reuse_address=True)
        self._sweeper = self.loop.call_later(self.limits.sweep_interval_s, self._sweep)
        self._tick()
        self._stopped = asyncio.Event()
        return self.listener.sockets[0].getsockname()[:2]

    def bound(self) -> list:
        """Every (host, port) the listener is bound to, in its order: one
        per address family for every interface (`--host '*'`), one per
        address for a name with several."""
        out = []
        for sock in self.listener.sockets:
            where = tuple(sock.getsockname()[:2])
            if where not in out:
                out.append(where)
        return out

    # --- connections in and out ---------------------------------------------------

    def admit(self, conn, transport):
        """None to take a new connection, or the refusal to send it."""
        limits = self.limits
        if self.stopping:
            return _refusal("the server is shutting down; retry on another")
        if len(self.connections) >= limits.connections_max:
            self.metrics.connections_refused += 1
            return _refusal("the server is at CONNECTIONS_MAX connections; retry later")
        peer = transport.get_extra_info("peername")
        peer = peer[0] if isinstance(peer, tuple) else str(peer)
        if self.peers.get(peer, 0) >= limits.connections_per_peer_max:
            self.metrics.connections_refused += 1
            return _refusal("this address has CONNECTIONS_PER_PEER_MAX connections open; "
                            "reuse them, or retry later")
        conn.peer = peer
        self.peers[peer] = self.peers.get(peer, 0) + 1
        self.connections.add(conn)
        return None

    def forget(self, conn):
        """A connection is lost: its slot (held while it lingers too) is free."""
        if conn in self.connections:
            self.connections.discard(conn)
            left = self.peers[conn.peer] - 1
            if left:
                self.peers[conn.peer] = left
            else:
                del self.peers[conn.peer]
        self.paused.discard(conn)
        self.acked_waits.discard(conn)
        if conn.buffered:
            self._add_buffered(-conn.buffered)
            conn.buffered = 0

    # --- the buffered-bytes budget (SERVER_BUFFER_BYTES_MAX) ----------------------

    def account(self, conn):
        """Counts what `conn` holds now: reply bytes in its transport,
        request bytes its parser keeps, and requests parsed and not yet
        taken (REQUEST_HELD_BYTES each)."""
        held = conn.transport.get_write_buffer_size() + conn.parser.kept_bytes
        if conn.backlog is not None:
            reqs, i = conn.backlog
            held += (len(reqs) - i) * REQUEST_HELD_BYTES
        if held != conn.buffered:
            self._add_buffered(held - conn.buffered)
            conn.buffered = held

    def _add_buffered(self, delta):
        """The total changes: over `soft_budget` connections holding bytes
        stop being read until it falls to three quarters of it, and each
        read is parsed one request at a time (Turn.one_each) from a little
        before, so that the requests a read holds back stay bytes, not
        parsed requests (REQUEST_HELD_BYTES each)."""
        self.buffered += delta
        soft = self.soft_budget
        if not self.over_budget:
            if self.buffered > soft:
                self.over_budget = True
                self.metrics.budget_pauses += 1
        elif self.buffered <= soft * 3 // 4:
            self.over_budget = False
            # call_soon: this runs inside another connection's callback.
            self.loop.call_soon(self._resume_paused)
        self.turn.one_each = self.over_budget or self.buffered > soft - self._parsed_max
        self._size_reads()

    def _size_reads(self):
        """What the next socket read may take: none takes the total past
        `soft_budget` by more than OVER_BUDGET_READ_BYTES (and one request
        held back), and over it a read (of a connection holding nothing)
        takes that at most.  While a read is parsed whole (not
        Turn.one_each), the requests it may hold back are left room for."""
        margin = 0 if self.turn.one_each else self._parsed_max
        left = max(self.soft_budget - self.buffered - margin, 0) + OVER_BUDGET_READ_BYTES
        if left >= READ_BYTES_MAX:
            self.read_into = self._reads
        elif len(self.read_into) != left:
            self.read_into = self._reads[:left]

    def _resume_paused(self):
        for conn in list(self.paused):
            if conn.state == OPEN:
                conn.flush()

    # --- the work of one loop turn (TURN_REQUESTS_MAX) ------------------------------

    def _turn_spent(self):
        """The turn has ended (Turn: its requests, or its costly reads'
        share, spent): the next starts before the connections it held back
        go on."""
        self.metrics.turns_spent += 1
        self.loop.call_soon(self.turn.renew)

    # --- the store's completions ------------------------------------------------------

    def deliver(self, pairs):
        """A batch's completions, on the loop (the store's bind_loop): a
        successful mod waiting alone on a plain keep-alive connection, the
        common case under load, is answered here in one pass; any other goes
        through its Slot and its connection's flush, and a callback that is
        not a Slot (another user of the store on this loop) is called."""
        now = perf_counter()
        loop_now = self.loop.time()
        waited = []
        date = DATE.now
        for done, outcome in pairs:
            try:
                if type(done) is not Slot:
                    done(outcome)
                    continue
                conn = done.conn
                waiting = conn.waiting
                if (type(outcome) is not tuple or done.route != ROUTE_MOD or done.mode != KEEP
                        or len(waiting) != 1 or waiting[0] is not done or conn.state != OPEN
                        or conn.eof or conn.read_paused):
                    done.done(outcome)
                    continue
                waiting.pop()
                waited.append(now - done.t0)
                # routes.reply_of's mod reply, inlined: this runs per mod.
                body = MOD_BODY % outcome
                conn.last_active_at = loop_now
                conn.write_now(T200_KEEP % (date, len(body), body))
            except Exception as e:     # a bug here: that connection closes, not the rest
                self.internal_error(getattr(done, "conn", None), e)
        if waited:
            self.metrics.mod_latency_s.observe_all(waited)
            self.metrics.requests["mod", 200] += len(waited)

    def mark_ready(self, conn):
        self._ready.append(conn)
        if not self._flush_scheduled:
            self._flush_scheduled = True
            self.loop.call_soon(self._flush_ready)

    def _flush_ready(self):
        ready, self._ready = self._ready, []
        self._flush_scheduled = False
        seen = set()
        for conn in ready:
            if conn not in seen:
                seen.add(conn)
                conn.flush()

    # --- timers -------------------------------------------------------------------------

    def _tick(self):
        """The Date header's clock: refreshed just after each wall-clock
        second turns."""
        now = time.time()
        DATE.refresh(now)
        self._clock = self.loop.call_later(1.0 - now % 1.0 + 0.001, self._tick)

    def _drain_samples(self):
        # The store keeps per-batch samples until drained; draining every
        # sweep keeps its buffer far from its cap.
        self.metrics.observe_batches(*self.store.drain_samples())

    def _give_back_memory(self):
        """Once many connections have come and gone, returns the freed heap
        to the system (glibc keeps it otherwise: a flood's memory would stay
        after the flooders left)."""
        n = len(self.connections)
        self._connections_peak = max(self._connections_peak, n)
        if self._connections_peak - n >= MEMORY_TRIM_CONNECTIONS and not self.over_budget:
            self._connections_peak = n
            _malloc_trim()

    def _sweep(self):
        self._give_back_memory()
        self._drain_samples()
        now = self.loop.time()
        buffered = 0
        for conn in list(self.connections):
            conn.sweep(now)
            if conn in self.connections:
                self.account(conn)
                buffered += conn.buffered
                if conn.read_paused:
                    # Its transport drained below its low-water mark, which
                    # no callback tells: not held back for it any more.
                    conn.update_reading()
        # What drained since it was counted (the transport says nothing
        # between its water marks) is uncounted here, exactly.
        self._add_buffered(buffered - self.buffered)
        self._sweeper = self.loop.call_later(self.limits.sweep_interval_s, self._sweep)

    def _fold_lane_stats(self):
        """The replies the Pipelines made, into the Metrics."""
        mods, tots, counts, latency_sum_s, latency_n = self.lane_stats.take()
        metrics = self.metrics
        metrics.tot_ok += tots
        if mods:
            metrics.requests["mod", 200] += mods
        hist = metrics.mod_latency_s
        for i, n in enumerate(counts):
            hist.counts[i] += n
        hist.sum += latency_sum_s
        hist.count += latency_n

    def render_metrics(self) -> bytes:
        self._fold_lane_stats()
        try:
            self._drain_samples()
            stats = dict(self.store.stats)
        except Exception:
            stats = {}
        return self.metrics.render(open_connections=len(self.connections),
                                   healthy=self.store.healthy and not self.stopping,
                                   buffered_bytes=self.buffered, stats=stats)

    def internal_error(self, conn, exc):
        # Only the type and where it was raised: an exception's message may
        # quote a credential.
        say(f"accman: internal error {where(exc)}; connection closed")
        if conn is None or not conn.fail():
            return
        transport = conn.transport
        if not transport.is_closing():
            transport.write(reply(500, error_body("internal", "the server failed on this request"),
                                  CLOSE))
            transport.close()

    # --- stopping -----------------------------------------------------------------------

    def request_stop(self, signame="signal"):
        if self.stopping:
            self._hurry = True       # a second signal: skip the grace
            return
        say(f"accman: {signame}: stopping")
        self.loop.create_task(self._shutdown())

    async def _shutdown(self):
        self.stopping = True
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.connections):
            try:
                conn.stop()
            except Exception as e:      # a bug: that connection closes, the stop goes on
                self.internal_error(conn, e)
        # Long polls are answered now, with what they have: waiting out
        # their `wait` would hold the stop for the whole grace.
        self.store.end_waits()
        deadline = self.loop.time() + self.limits.shutdown_grace_s
        while self.connections and not self._hurry and self.loop.time() < deadline:
            for conn in list(self.acked_waits):
                if conn.close_acknowledged():
                    self.acked_waits.discard(conn)
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()
        for timer in (self._sweeper, self._clock):
            if timer is not None:
                timer.cancel()
        self._stopped.set()

    def install_signal_handlers(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop, sig.name)
        self.loop.add_signal_handler(signal.SIGHUP, self.reload_tokens)

    def reload_tokens(self):
        """SIGHUP: the tokens file read again, so that a token is added or
        revoked without a restart (docs/SERVER.md, "Access"); each
        connection checks its token again at its next request."""
        if self.tokens is None or self.tokens.path is None:
            say("accman: SIGHUP: this server has no tokens file to read again; ignored")
            return
        try:
            count = self.tokens.reload()
        except TokensError as e:
            say(f"accman: SIGHUP: the tokens were not read again, the previous ones stay: {e}")
            return
        for conn in self.connections:
            conn.token = None
        say(f"accman: SIGHUP: {count} token{'s' * (count != 1)} read again from "
            f"{self.tokens.path}")

    async def serve_until_stopped(self):
        await self._stopped.wait()
