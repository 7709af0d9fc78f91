"""The AccMan HTTP/1.1 server: an asyncio.Protocol on uvloop, and the only
code that touches sockets.

Per connection: one wire Parser; each read is fed to it, every request it
yields is answered in order, and the replies of one read leave in ONE
transport.write (uvloop/httptools habit: gather, then flush once).

Order: a /mod is submitted to the ledger on arrival (so mods apply in the
order received) but its reply waits for its batch to be durable; whatever
the client sent after it on that connection queues behind it, and a read in
that queue is evaluated only when its turn comes, so a client reads its own
writes.  Completions of one batch arrive in one loop callback; each touched
connection is then flushed once (Redis's beforeSleep: replies leave after
the append-only file is written).

Bounds (accman/limits.py, overridable by ACCMAN_<NAME> environment variables
for tests and tuning, see ServerLimits): connections, requests unanswered
per connection, reply bytes buffered per connection, the head deadline, the
idle keep-alive time and the shutdown grace.  Timers are one periodic sweep
over all connections, not one timer per request.

Nothing here logs a request line, a credential or a token.
"""

import asyncio
import ipaddress
import json
import os
import signal
import socket
import sys
from collections import deque
from dataclasses import dataclass, fields
from hmac import compare_digest
from time import perf_counter

from accman import limits as L
from accman.server._wire import (ROUTE_HEALTH, ROUTE_METRICS, ROUTE_MOD, ROUTE_PAST,
                          ROUTE_TOT, Parser)
from accman.server.auth import CHARGE, MINT, READ, roles_text
from accman.ledger.commit import run_callbacks
from accman.errors import (AccManError, Insufficient, StoreCorrupt,
                           StoreError, StoreLocked)
from accman.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from accman.server.metrics import Metrics


# --- limits ------------------------------------------------------------------



class LimitsError(ValueError):
    """A limit override that cannot be used; the message is one line."""


@dataclass(frozen=True)
class ServerLimits:
    """The server's own bounds.  Defaults come from accman/limits.py; each can
    be overridden by an environment variable ACCMAN_<FIELD NAME IN CAPITALS>
    (ACCMAN_HEAD_TIMEOUT_S=0.5, ...) so that tests driving the server as a
    subprocess can reach every limit quickly.  The parser's limits (request
    line, headers, body) are not overridable: they are small enough to reach."""

    connections_max: int = L.CONNECTIONS_MAX
    pipeline_requests_max: int = L.PIPELINE_REQUESTS_MAX
    write_buffer_bytes_max: int = L.WRITE_BUFFER_BYTES_MAX
    head_timeout_s: float = L.HEAD_TIMEOUT_S
    idle_timeout_s: float = L.IDLE_TIMEOUT_S
    shutdown_grace_s: float = L.SHUTDOWN_GRACE_S
    linger_s: float = L.LINGER_S

    @classmethod
    def from_env(cls, environ=None) -> "ServerLimits":
        environ = os.environ if environ is None else environ
        values = {}
        for f in fields(cls):
            name = "ACCMAN_" + f.name.upper()
            raw = environ.get(name)
            if raw is None:
                continue
            try:
                value = f.type(raw)
            except ValueError:
                raise LimitsError(f"{name}={raw!r} is not a number") from None
            if not value > 0:
                raise LimitsError(f"{name} must be positive")
            values[f.name] = value
        return cls(**values)

    @property
    def sweep_interval_s(self) -> float:
        # At most a second; a quarter of the shortest timeout so that small
        # test timeouts fire close to on time.
        return min(1.0, self.head_timeout_s / 4, self.idle_timeout_s / 4)


class StartupError(Exception):
    """`accman serve` cannot start; the message is one line for a person."""


# --- replies -----------------------------------------------------------------

REASONS = {
    200: b"OK", 400: b"Bad Request", 401: b"Unauthorized", 403: b"Forbidden",
    404: b"Not Found", 405: b"Method Not Allowed", 408: b"Request Timeout",
    409: b"Conflict", 413: b"Content Too Large", 414: b"URI Too Long",
    431: b"Request Header Fields Too Large", 500: b"Internal Server Error",
    501: b"Not Implemented", 503: b"Service Unavailable",
    505: b"HTTP Version Not Supported",
}

# How the reply ends the exchange: keep-alive on HTTP/1.1 (the default, no
# header), close, or keep-alive asked for by an HTTP/1.0 client.
KEEP, CLOSE, KEEP10 = 0, 1, 2
_CONNECTION_HEADERS = (b"", b"Connection: close\r\n", b"Connection: keep-alive\r\n")


def _template(status, mode, content_type=b"application/json", extra=b""):
    """`template % (len(body), body)` is a whole reply."""
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n"
            % (status, REASONS[status], content_type))
    return (head + _CONNECTION_HEADERS[mode] + extra).replace(b"%", b"%%") + \
        b"Content-Length: %d\r\n\r\n%b"


T200 = tuple(_template(200, mode) for mode in (KEEP, CLOSE, KEEP10))
T200_KEEP = T200[KEEP]
MOD_OK_BODY = b'{"tot":%d,"seq":%d}'      # `% (tot, seq)`: a durable mod's reply body
TOT_OK_BODY = b'{"tot":%d}'               # `% tot`: a balance's reply body


def mod_role(by):
    """The role a mod needs (SPEC "Access"): minting credits, charging debits."""
    return MINT if by > 0 else CHARGE


_TEMPLATES = {}


def reply_bytes(status, body, mode, extra=b"", content_type=b"application/json"):
    key = (status, mode, extra, content_type)
    tmpl = _TEMPLATES.get(key)
    if tmpl is None:
        tmpl = _TEMPLATES[key] = _template(status, mode, content_type, extra)
    return tmpl % (len(body), body)


def error_body(code, detail, tot=None) -> bytes:
    doc = {"error": code}
    if tot is not None:
        doc["tot"] = tot
    doc["detail"] = detail
    return json.dumps(doc, separators=(",", ":")).encode()


TOO_MANY_CONNECTIONS_REPLY = reply_bytes(
    503, error_body("busy", "the server is at CONNECTIONS_MAX connections; retry later"),
    CLOSE)


# --- connections -------------------------------------------------------------

class Slot:
    """A request answered out of line: a mod waiting for its batch, or a
    request that arrived behind one (evaluated when its turn comes)."""

    __slots__ = ("conn", "req", "mode", "reply", "pending", "t0")

    def __init__(self, conn, req, mode):
        self.conn = conn
        self.req = req
        self.mode = mode
        self.reply = None
        self.pending = False
        self.t0 = 0.0

    def done(self, outcome):
        """The ledger's completion: runs on the loop thread once the batch
        holding this mod (or the state it was refused on) is durable.
        (Server.deliver answers the common case itself, without this.)"""
        conn = self.conn
        server = conn.server
        server.metrics.mod_latency_s.observe(perf_counter() - self.t0)
        self.reply = conn.mod_outcome(outcome, self.mode)
        self.pending = False
        server.mark_ready(conn)

    # A Slot is the `done` callback the ledger is given.
    __call__ = done


class Connection(asyncio.Protocol):
    """One client connection: its parser, its queue of replies in request
    order, its back-pressure state and its timers."""

    __slots__ = ("server", "ledger", "metrics", "requests", "pipeline_max", "parser", "_time",
                 "transport", "waiting", "backlog", "closing", "shut", "shut_at", "eof",
                 "closed", "read_paused", "write_paused", "write_paused_at",
                 "head_started_at", "last_active_at", "token", "token_roles",
                 "write_buffer_max", "flush_soon")

    def __init__(self, server):
        self.server = server
        self.ledger = server.ledger
        self.metrics = server.metrics
        self.requests = server.metrics.requests
        self.pipeline_max = server.limits.pipeline_requests_max
        self.write_buffer_max = server.limits.write_buffer_bytes_max
        self.flush_soon = False
        self.parser = Parser()
        self._time = server.loop.time
        self.transport = None
        self.waiting = deque()      # Slots, in request order; the head is next out
        self.backlog = None         # (requests, index) parsed but not yet taken
        self.closing = False        # no further request will be taken
        self.shut = False           # transport.close() called: flushing, then gone
        self.shut_at = 0.0
        self.eof = False            # the client half-closed: close once all is answered
        self.closed = False         # connection_lost, or aborted
        self.read_paused = False
        self.write_paused = False
        self.write_paused_at = 0.0
        self.head_started_at = 0.0  # 0: no partial request buffered
        self.last_active_at = 0.0
        self.token = None           # the last token that checked out, and its roles
        self.token_roles = 0

    # --- asyncio callbacks ---

    def connection_made(self, transport):
        self.transport = transport
        server = self.server
        if len(server.connections) >= server.limits.connections_max or server.stopping:
            server.metrics.connections_refused += 1
            self.closing = self.closed = True
            transport.write(TOO_MANY_CONNECTIONS_REPLY)
            transport.close()
            return
        server.connections.add(self)
        transport.set_write_buffer_limits(high=server.limits.write_buffer_bytes_max)
        self.last_active_at = server.loop.time()

    def connection_lost(self, exc):
        self.closing = self.closed = True
        self.backlog = None
        self.server.connections.discard(self)

    def pause_writing(self):
        self.write_paused = True
        self.write_paused_at = self.server.loop.time()
        self._update_reading()

    def resume_writing(self):
        self.write_paused = False
        self.last_active_at = self.server.loop.time()
        if not self.closed:
            if self.backlog is not None:
                self.flush()        # take the requests held for reply bytes
            else:
                self._update_reading()

    def eof_received(self):
        self.eof = True
        if self.shut:
            # Lingering after our own close: the client is done too.
            self.transport.close()
        elif not self.closed:
            # A half-closed client still gets the replies it is owed; the
            # connection closes once they are sent.
            self._finish([])
        return True

    def data_received(self, data):
        if self.closing:
            return
        try:
            parser = self.parser
            reqs = parser.feed(data)
            now = self._time()
            self.last_active_at = now
            if reqs:
                self.head_started_at = now if parser.pending else 0.0
                if len(reqs) == 1 and not self.waiting and self._fast(reqs[0]):
                    return
                out = []
                self._process(reqs, 0, out)
                if out and not (self.waiting or self.closing or self.eof or self.read_paused
                                or self.backlog is not None):
                    # The common case, all answered and nothing to change:
                    # one write (pause_writing, if it comes, pauses reading).
                    self.transport.write(out[0] if len(out) == 1 else b"".join(out))
                else:
                    self._finish(out)
            elif not self.head_started_at and parser.pending:
                # The head deadline runs from the first byte of a request;
                # later bytes do not reset it.
                self.head_started_at = now
        except Exception as e:  # a bug, not the client's fault: say so, close
            self.server.internal_error(self, e)

    # --- request handling ---

    def _fast(self, req):
        """The hot paths: one keep-alive HTTP/1.1 /tot or /mod with nothing
        owed before it on the connection, taken without the pipeline
        machinery of _process/_finish: a /tot is answered and written at
        once, a /mod submitted and left waiting alone (Server.deliver then
        writes its reply).  Neither closes the connection.  Anything else
        (a denial included) returns False for the general path."""
        if (not req.keep_alive or req.http10 or self.closing or self.eof
                or self.read_paused or self.backlog is not None or self.server.stopping):
            return False
        route = req.route
        if route == ROUTE_TOT:
            # _answer's /tot branch, inlined for the common case (no tokens,
            # a known cred): the hottest path of all, and the call was, with
            # the dict update that counted a 200 before tot_ok, ~4 % of a
            # /tot's CPU.
            if self.server.tokens is None:
                try:
                    tot = self.ledger.tot(req.cred)
                except AccManError:
                    tot = None
                if tot is not None:
                    self.metrics.tot_ok += 1
                    body = TOT_OK_BODY % tot
                    self.transport.write(T200_KEEP % (len(body), body))
                    return True
            self.transport.write(self._answer(req, KEEP))
            return True
        if route != ROUTE_MOD:
            return False
        if (self.server.tokens is not None
                and not self._roles(req.token) & mod_role(req.by)):
            return False
        slot = Slot(self, req, KEEP)
        slot.t0 = perf_counter()
        slot.pending = True
        try:
            self.ledger.submit(req.cred, req.by, req.min, req.key, done=slot)
        except AccManError as e:
            self.transport.write(self._error("mod", e.status, e.code, e.detail, KEEP))
            return True
        waiting = self.waiting
        waiting.append(slot)
        if len(waiting) >= self.pipeline_max:
            self._update_reading()
        return True

    def _process(self, reqs, i, out):
        """Take requests reqs[i:] in order until one closes the connection,
        PIPELINE_REQUESTS_MAX are unanswered, or the replies made and not yet
        sent reach WRITE_BUFFER_BYTES_MAX (the rest wait in `backlog`, and
        are taken a loop turn later or when the client reads)."""
        waiting = self.waiting
        stopping = self.server.stopping
        n = len(reqs)
        # Replies are bytes held for a client until it reads them: one read
        # of small pipelined /past requests can ask for megabytes.  Count
        # what is buffered and what this call makes.
        room = self.write_buffer_max - self.transport.get_write_buffer_size()
        for reply in out:
            room -= len(reply)
        while i < n:
            if len(waiting) >= self.pipeline_max or (room <= 0 and out):
                self.backlog = (reqs, i)
                return
            req = reqs[i]
            i += 1
            err = req.error
            if not req.keep_alive or stopping or (err is not None and err.close):
                mode = CLOSE
                self.closing = True
            else:
                mode = KEEP10 if req.http10 else KEEP
            if not waiting:
                reply = self._answer(req, mode)
                if reply is not None:
                    out.append(reply)
                    room -= len(reply)
            else:
                slot = Slot(self, req, mode)
                if req.route == ROUTE_MOD and err is None:
                    reply = self._mod(req, slot)
                    if reply is not None:
                        slot.reply = reply
                waiting.append(slot)
            if mode == CLOSE:
                return

    def _answer(self, req, mode):
        """The reply to `req` now, or None when it is a mod now waiting for
        its batch (then it is at the tail of `waiting`)."""
        route = req.route
        server = self.server
        if route == ROUTE_TOT:
            if server.tokens is not None and not self._roles(req.token) & READ:
                return self._deny(req, READ, "tot", mode)
            try:
                tot = self.ledger.tot(req.cred)
            except AccManError as e:
                return self._error("tot", e.status, e.code, e.detail, mode)
            if tot is None:
                return self._error("tot", 404, "no_account",
                                   "no account has this cred", mode)
            self.metrics.tot_ok += 1
            body = TOT_OK_BODY % tot
            return T200[mode] % (len(body), body)
        if route == ROUTE_MOD:
            slot = Slot(self, req, mode)
            reply = self._mod(req, slot)
            if reply is None:
                self.waiting.append(slot)
            return reply
        if route == ROUTE_PAST:
            return self._past(req, mode)
        if route == ROUTE_HEALTH:
            return self._health(mode)
        if route == ROUTE_METRICS:
            if server.tokens is not None and not self._roles(req.token):
                return self._deny(req, READ | CHARGE | MINT, "metrics", mode)
            self.requests["metrics", 200] += 1
            body = server.render_metrics()
            return reply_bytes(200, body, mode, content_type=METRICS_CONTENT_TYPE)
        err = req.error
        if err is not None:
            extra = b"Allow: %s\r\n" % err.allow.encode("ascii") if err.allow else b""
            return self._error("none", err.status, err.code, err.detail, mode, extra)
        return self._error("none", 500, "internal",
                           "the server could not route this request", mode)

    def _mod(self, req, slot):
        """Submit a mod; None when it now waits for its batch, else the
        reply (refused before it reached the ledger, or by the ledger at once)."""
        server = self.server
        by = req.by
        if server.tokens is not None:
            need = mod_role(by)
            if not self._roles(req.token) & need:
                return self._deny(req, need, "mod", slot.mode)
        if server.stopping:
            return self._error("mod", 503, "shutting_down",
                               "the server is shutting down; retry on another", slot.mode)
        slot.t0 = perf_counter()
        slot.pending = True
        try:
            self.ledger.submit(req.cred, by, req.min, req.key, done=slot)
        except AccManError as e:
            slot.pending = False
            return self._error("mod", e.status, e.code, e.detail, slot.mode)
        return None

    def mod_outcome(self, outcome, mode):
        if type(outcome) is tuple:
            self.requests["mod", 200] += 1
            body = MOD_OK_BODY % outcome
            return T200[mode] % (len(body), body)
        if isinstance(outcome, Insufficient):
            return self._error("mod", 409, outcome.code, outcome.detail, mode,
                               tot=outcome.tot)
        if isinstance(outcome, AccManError):
            return self._error("mod", outcome.status, outcome.code, outcome.detail, mode)
        return self._error("mod", 500, "internal", "the ledger failed unexpectedly", mode)

    def _past(self, req, mode):
        if self.server.tokens is not None and not self._roles(req.token) & READ:
            return self._deny(req, READ, "past", mode)
        limit = req.limit
        try:
            entries = self.ledger.past(req.cred, limit, req.before)
        except AccManError as e:
            return self._error("past", e.status, e.code, e.detail, mode)
        if entries is None:
            return self._error("past", 404, "no_account", "no account has this cred", mode)
        nxt = None
        if entries and len(entries) == limit and entries[-1].seq > 1:
            nxt = entries[-1].seq
        body = json.dumps(
            {"past": [{"seq": e.seq, "by": e.by, "tot": e.tot, "at": e.at, "key": e.key}
                      for e in entries],
             "next": nxt},
            separators=(",", ":")).encode()
        self.requests["past", 200] += 1
        return T200[mode] % (len(body), body)

    def _health(self, mode):
        server = self.server
        if server.stopping:
            return self._error("health", 503, "shutting_down",
                               "the server is shutting down", mode)
        if not self.ledger.healthy:
            return self._error("health", 503, "unavailable",
                               "the store cannot commit; the server takes no writes", mode)
        self.requests["health", 200] += 1
        body = b'{"healthy":true}'
        return T200[mode] % (len(body), body)

    def _roles(self, token):
        if token is None:
            return 0
        cached = self.token
        if cached is not None and compare_digest(token, cached):
            return self.token_roles
        roles = self.server.tokens.roles(token)
        if roles:
            self.token = token
            self.token_roles = roles
        return roles

    def _deny(self, req, need, route, mode):
        token = req.token
        if token is None:
            return self._error(route, 401, "unauthorized",
                               "this call needs an Authorization: Bearer token", mode,
                               b'WWW-Authenticate: Bearer realm="accman"\r\n')
        if not self._roles(token):
            return self._error(route, 401, "unauthorized", "the bearer token is not valid",
                               mode, b'WWW-Authenticate: Bearer realm="accman", '
                                     b'error="invalid_token"\r\n')
        return self._error(route, 403, "forbidden",
                           f"this call needs a token with the role {roles_text(need)}"
                           if need in (READ, CHARGE, MINT) else
                           "this call needs a token with a role", mode)

    def _error(self, route, status, code, detail, mode, extra=b"", tot=None):
        self.requests[route, status] += 1
        if status not in REASONS:
            status = 500
        return reply_bytes(status, error_body(code, detail, tot), mode, extra)

    # --- output, back-pressure, timers ---

    def _drain(self, out):
        """Move the replies at the head of `waiting` that are ready to `out`;
        a queued request other than a mod is evaluated now, at its turn."""
        waiting = self.waiting
        while waiting:
            slot = waiting[0]
            if slot.pending:
                break
            reply = slot.reply
            if reply is None:
                reply = self._answer(slot.req, slot.mode)
            waiting.popleft()
            out.append(reply)

    def flush(self):
        """After mod completions: send what is now in order, then take the
        requests held back by PIPELINE_REQUESTS_MAX."""
        if self.closed or self.shut:
            return
        try:
            out = []
            self._drain(out)
            if (self.backlog is not None and not self.closing
                    and len(self.waiting) < self.pipeline_max):
                reqs, i = self.backlog
                self.backlog = None
                self._process(reqs, i, out)
                self._drain(out)
            self._finish(out)
        except Exception as e:
            self.server.internal_error(self, e)

    def _finish(self, out):
        transport = self.transport
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            self.last_active_at = self.server.loop.time()
        if self.closing or self.eof:
            if self.closing:
                self.backlog = None
            if not self.waiting and self.backlog is None:
                self._shut()
                return
            if self.closing:
                if not self.read_paused:
                    self.read_paused = True
                    transport.pause_reading()
                return
        self._update_reading()
        if (self.backlog is not None and not self.write_paused and not self.flush_soon
                and len(self.waiting) < self.pipeline_max):
            # Held back by the reply-bytes bound but the socket took them:
            # go on next loop turn, after the other connections have had theirs.
            self.flush_soon = True
            self.server.loop.call_soon(self._flush_soon)

    def _flush_soon(self):
        self.flush_soon = False
        self.flush()

    def _update_reading(self):
        pause = (self.write_paused or self.backlog is not None
                 or len(self.waiting) >= self.pipeline_max)
        if pause != self.read_paused and not (self.closed or self.shut):
            self.read_paused = pause
            if pause:
                self.transport.pause_reading()
            else:
                self.head_started_at = 0.0
                self.transport.resume_reading()

    def sweep(self, now):
        if self.closed:
            return
        limits = self.server.limits
        if self.write_paused:
            # The client stopped reading its replies: a connection that makes
            # no progress for the idle time is dropped.
            if now - self.write_paused_at >= limits.idle_timeout_s:
                self.server.metrics.idle_closes += 1
                self.abort()
            return
        if self.shut:
            # Lingering ends after LINGER_S once the replies are out; a client
            # that never reads them does not keep the connection past the
            # idle time.
            waited = now - self.shut_at
            if waited >= limits.idle_timeout_s:
                self.abort()
            elif waited >= limits.linger_s and not self.transport.get_write_buffer_size():
                self.transport.close()
            return
        if self.closing:
            return
        if self.head_started_at:
            if not self.read_paused and now - self.head_started_at >= limits.head_timeout_s:
                self._head_timeout()
        elif (not self.waiting and self.backlog is None
              and now - self.last_active_at >= limits.idle_timeout_s):
            self.server.metrics.idle_closes += 1
            self._shut()

    def _head_timeout(self):
        self.server.metrics.head_timeouts += 1
        self.closing = True
        reply = self._error(
            "none", 408, "timeout",
            f"the request head did not arrive within HEAD_TIMEOUT_S "
            f"({self.server.limits.head_timeout_s:g} s)", CLOSE)
        self._last_reply(None, reply)

    def _last_reply(self, req, reply):
        """Sends `reply` (a CLOSE one) after every reply still owed."""
        if self.waiting:
            slot = Slot(self, req, CLOSE)
            slot.reply = reply
            self.waiting.append(slot)
            self._finish([])
        else:
            self._finish([reply])

    def stop(self):
        """Shutdown: take no new request; answer the one held back (if any)
        with 503, send what is owed, then close."""
        if self.shut and not self.closed:
            self.transport.close()          # no lingering while stopping
            return
        if self.closed or self.closing:
            return
        self.closing = True
        if self.backlog is None:
            self._finish([])
            return
        reqs, i = self.backlog
        self.backlog = None
        self._last_reply(reqs[i], self._error(
            "none", 503, "shutting_down", "the server is shutting down; retry on another", CLOSE))

    def _shut(self):
        """Close after the replies already written: FIN, then linger (read
        and discard) until the client closes or LINGER_S passes."""
        self.closing = self.shut = True
        self.shut_at = self.server.loop.time()
        transport = self.transport
        if self.eof or self.server.stopping or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()

    def abort(self):
        self.closing = self.closed = True
        self.backlog = None
        self.waiting.clear()
        self.transport.abort()


# --- the server --------------------------------------------------------------

class Server:
    """Owns the listening socket, the connections, the sweep timer and the
    shutdown sequence.  `ledger` is anything with the Ledger API, so a test
    can inject a wrapped or faulty one."""

    def __init__(self, ledger, *, tokens=None, limits=None, loop=None):
        self.ledger = ledger
        self.tokens = tokens
        self.limits = limits or ServerLimits()
        self.loop = loop or asyncio.get_event_loop()
        self.metrics = Metrics()
        self.connections = set()
        self.stopping = False
        self.listener = None
        self._ready = []
        self._flush_scheduled = False
        self._sweeper = None
        self._stopped = None
        self._hurry = False

    async def start(self, host, port):
        self.listener = await self.loop.create_server(
            lambda: Connection(self), host, port, backlog=1024,
            reuse_address=True)
        self._sweeper = self.loop.call_later(self.limits.sweep_interval_s, self._sweep)
        self._stopped = asyncio.Event()
        return self.listener.sockets[0].getsockname()[:2]

    def deliver(self, pairs):
        """The ledger's completions of one batch, on the loop (see
        Ledger.bind_loop): a successful mod waiting alone on a plain
        keep-alive connection, the common case under load, is answered
        here in one pass; any other goes through Slot.done and its
        connection's flush, and a callback that is not a Slot (another
        user of the ledger on this loop) is called."""
        now = perf_counter()
        loop_now = self.loop.time()
        waited = []
        for done, outcome in pairs:
            try:
                if type(done) is not Slot:
                    run_callbacks(((done, outcome),))
                    continue
                conn = done.conn
                waiting = conn.waiting
                if (type(outcome) is not tuple or done.mode != KEEP or len(waiting) != 1
                        or waiting[0] is not done or conn.closing or conn.eof
                        or conn.read_paused or conn.backlog is not None):
                    done.done(outcome)
                    continue
                waiting.pop()
                waited.append(now - done.t0)
                # mod_outcome's success reply, inlined: this runs per mod.
                body = MOD_OK_BODY % outcome
                conn.transport.write(T200_KEEP % (len(body), body))
                conn.last_active_at = loop_now
            except Exception as e:     # a bug here: that connection closes, not the rest
                self.internal_error(done.conn, e)
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

    def _drain_samples(self):
        # The ledger keeps per-batch samples until drained; draining every
        # sweep keeps its buffer far from its cap.
        drain = getattr(self.ledger, "drain_samples", None)
        if drain is not None:
            self.metrics.observe_batches(*drain())

    def _sweep(self):
        self._drain_samples()
        now = self.loop.time()
        for conn in list(self.connections):
            conn.sweep(now)
        self._sweeper = self.loop.call_later(self.limits.sweep_interval_s, self._sweep)

    def render_metrics(self) -> bytes:
        try:
            self._drain_samples()
            stats = dict(self.ledger.stats)
        except Exception:
            stats = {}
        return self.metrics.render(open_connections=len(self.connections),
                                   healthy=self.ledger.healthy and not self.stopping,
                                   stats=stats)

    def internal_error(self, conn, exc):
        # Only the type and where it was raised: an exception's message may
        # quote a credential.
        tb = exc.__traceback__
        while tb is not None and tb.tb_next is not None:
            tb = tb.tb_next
        where = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb else "?"
        print(f"accman: internal error {type(exc).__name__} at {where}; connection closed",
              file=sys.stderr, flush=True)
        if conn.closed or conn.shut:
            return
        conn.closing = conn.shut = True
        conn.backlog = None
        self.connections.discard(conn)
        transport = conn.transport
        if not transport.is_closing():
            transport.write(reply_bytes(
                500, error_body("internal", "the server failed on this request"), CLOSE))
            transport.close()

    def request_stop(self, signame="signal"):
        if self.stopping:
            self._hurry = True       # a second signal: skip the grace
            return
        print(f"accman: {signame}: stopping", file=sys.stderr, flush=True)
        self.loop.create_task(self._shutdown())

    async def _shutdown(self):
        self.stopping = True
        if self.listener is not None:
            self.listener.close()
        for conn in list(self.connections):
            conn.stop()
        deadline = self.loop.time() + self.limits.shutdown_grace_s
        while self.connections and not self._hurry and self.loop.time() < deadline:
            await asyncio.sleep(0.01)
        for conn in list(self.connections):
            conn.abort()
        if self._sweeper is not None:
            self._sweeper.cancel()
        self._stopped.set()

    def install_signal_handlers(self):
        for sig in (signal.SIGTERM, signal.SIGINT):
            self.loop.add_signal_handler(sig, self.request_stop, sig.name)

    async def serve_until_stopped(self):
        await self._stopped.wait()


# --- starting --------------------------------------------------------------------

def is_loopback(host) -> bool:
    """True when every address `host` names is a loopback address."""
    if not host:
        return False
    try:
        infos = socket.getaddrinfo(host, None, type=socket.SOCK_STREAM)
    except OSError:
        return False
    addrs = {info[4][0].split("%")[0] for info in infos}
    return bool(addrs) and all(ipaddress.ip_address(a).is_loopback for a in addrs)


def _loop_exception_handler(loop, context):
    # Never print the context's repr: it can hold a protocol and its buffers.
    exc = context.get("exception")
    what = type(exc).__name__ if exc is not None else "error"
    print(f"accman: event loop {what}: {context.get('message', '')}",
          file=sys.stderr, flush=True)


def run(*, host="127.0.0.1", port=8080, data="./accman-data", tokens=None,
        limits=None, ledger=None, ready=None, verify="full") -> int:
    """Serve until SIGTERM/SIGINT; returns the exit code.  Raises
    StartupError (one line for a person) when it cannot start.

    `ledger`, when given, is served instead of opening `data` (tests inject
    a wrapped or faulty ledger this way); it is closed on the way out."""
    import uvloop

    limits = limits or ServerLimits.from_env()
    if tokens is None and not is_loopback(host):
        raise StartupError(
            f"refusing to serve on {host or 'all interfaces'} without tokens: "
            f"pass --tokens FILE, or bind a loopback address such as 127.0.0.1")
    data_path = os.path.abspath(data)
    if ledger is None:
        from accman.ledger import Ledger
        try:
            ledger = Ledger(data_path, verify=verify)
        except StoreLocked:
            raise StartupError(
                f"data directory {data_path} is in use by another accman server") from None
        except StoreCorrupt as e:
            raise StartupError(f"corrupt data directory: {e.detail}") from None
        except StoreError as e:
            raise StartupError(f"cannot open data directory {data_path}: {e.detail}") from None
    else:
        data_path = str(getattr(ledger, "path", data_path))
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    loop.set_exception_handler(_loop_exception_handler)
    failed = False
    try:
        server = Server(ledger, tokens=tokens, limits=limits, loop=loop)
        ledger.bind_loop(loop, deliver=server.deliver)
        try:
            bound_host, bound_port = loop.run_until_complete(server.start(host, port))
        except OSError as e:
            reason = os.strerror(e.errno) if e.errno else str(e)
            raise StartupError(f"cannot listen on {host}:{port}: {reason}") from None
        # Before the ready line: whoever waits for it may signal at once.
        server.install_signal_handlers()
        url_host = f"[{bound_host}]" if ":" in bound_host else bound_host
        line = f"accman: serving http://{url_host}:{bound_port} data={data_path}"
        if ready is None:
            print(line, flush=True)
        else:
            ready(line)
        loop.run_until_complete(server.serve_until_stopped())
        failed = not ledger.healthy
    finally:
        try:
            ledger.close()
        finally:
            asyncio.set_event_loop(None)
            loop.close()
    if failed:
        print("accman: stopped; the store had failed to commit, see the log above",
              file=sys.stderr, flush=True)
        return 1
    print("accman: stopped", file=sys.stderr, flush=True)
    return 0
