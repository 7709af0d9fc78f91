"""One client connection: the only code that reads and writes sockets (a
stop looks at what a client sent unread, accman/server/state.py, and takes
nothing).

Per connection: one wire Parser; each read is fed to it, every request it
completes is answered in order (accman.server.routes makes the replies),
and the replies of one read leave in ONE transport.write (uvloop/httptools
habit: gather, then flush once).

Order (RFC 9112 9.3.2, SPEC "Routes"): each request is handed to the store
when it arrives, so mods apply in the order received and pipelined mods
share batches; its reply waits in `waiting` (a compiled Pipeline,
ext/pipeline.pyx) behind those before it.  A read pipelined behind
unanswered writes asks the store for an ordered read, which sees exactly
the writes before it; a read of server state (/health, /metrics, /events)
behind them is evaluated when its turn comes.  A read the store answers
later beside its writes (PostgreSQL's read pool) holds the writes that come
after it on its connection until it is answered, so that it never sees
them.  Mods and /tot reads that the store's Lane takes (the embedded
store) never come back to this module's per-request code: the Pipeline
takes them and answers them.

Bounds (accman/limits.py, ServerLimits): requests unanswered per connection
(PIPELINE_REQUESTS_MAX: at most that many are parsed, the rest of a read is
held unparsed and reading pauses), reply bytes buffered per connection, the
server-wide buffered bytes, the head deadline, the idle time (shorter before
a request has authenticated; accman/server/deadlines.py).  The state machine
is accman/server/state.py.

Nothing here logs a request line, a credential or a token.
"""

from __future__ import annotations

import asyncio
from hmac import compare_digest

from accman.server._pipeline import Pipeline
from accman.server._wire import (ROUTE_EVENTS, ROUTE_HEALTH, ROUTE_HOLD, ROUTE_METRICS,
                                 ROUTE_MOD, ROUTE_SETTLE, ROUTE_TOT, Parser)
from accman.server.deadlines import Deadlines
from accman.server.replies import CLOSE, CONTINUE, KEEP, KEEP10
from accman.server.routes import COSTLY_ROUTES, Slot, turn_charge
from accman.server.state import CLOSED, OPEN, SHUT, Lifecycle

# Reads of server state, evaluated at their turn when pipelined behind writes.
_AT_ITS_TURN = frozenset((ROUTE_HEALTH, ROUTE_METRICS, ROUTE_EVENTS))
# Requests that change an account: held while an unordered read of their
# connection is owed (routes.Routes._read_slot).
_WRITES = frozenset((ROUTE_MOD, ROUTE_HOLD, ROUTE_SETTLE))


class Connection(asyncio.BufferedProtocol, Lifecycle, Deadlines):
    __slots__ = ("server", "routes", "metrics", "pipeline_max", "write_buffer_max", "parser",
                 "_time", "transport", "peer", "state", "eof", "waiting", "backlog",
                 "read_paused", "read_paused_at", "write_paused", "write_paused_at",
                 "write_paused_left", "head_started_at", "last_active_at", "shut_at", "token",
                 "token_roles", "authed", "buffered", "flush_soon", "continue_owed",
                 "continue_queued", "reserved", "until_drained", "activity_seen", "reads_owed",
                 "drain_watched")

    def __init__(self, server):
        self.server = server
        self.routes = server.routes
        self.metrics = server.metrics
        self.pipeline_max = server.limits.pipeline_requests_max
        self.write_buffer_max = server.limits.write_buffer_bytes_max
        self.parser = Parser()
        self._time = server.loop.time
        self.transport = None
        self.peer = None
        self.state = OPEN
        self.eof = False
        # Slots and lane entries, in request order; the head is next out.
        self.waiting = Pipeline(self, self.parser, server.turn, server.routes, server.lane,
                                server.lane_stats, server.tokens is not None,
                                self.pipeline_max)
        self.backlog = None         # (requests, index) parsed but not yet taken
        self.read_paused = False
        self.read_paused_at = 0.0
        self.write_paused = False
        self.write_paused_at = 0.0     # paused, or last seen to make progress since
        self.write_paused_left = 0      # the bytes it owed then (Deadlines.sweep)
        self.head_started_at = 0.0  # 0: no partial request buffered
        self.last_active_at = 0.0
        self.shut_at = 0.0
        self.token = None           # the last token that checked out, and its roles
        self.token_roles = 0
        self.authed = server.tokens is None
        self.buffered = 0           # bytes counted in the server's budget
        self.flush_soon = False
        self.continue_owed = False
        self.continue_queued = False    # its 100 Continue waits in `waiting`
        self.reserved = 0           # reserves of the Slots in `waiting` (Slot.reserve)
        # A read of server state is owed (/events, /health, /metrics): nothing
        # more is taken until every reply is out (SPEC: a read sees none of
        # the later mods of its connection).
        self.until_drained = False
        # Unordered reads the store answers later: a write after them waits
        # until they are answered (routes.Routes._read_slot).
        self.reads_owed = 0
        self.activity_seen = 0      # the Pipeline's activity at the last sweep
        self.drain_watched = False  # the transport's high-water mark lowered (_watch_drain)

    # --- asyncio callbacks ---

    def connection_made(self, transport):
        self.transport = transport
        self.waiting.made(transport, self.server.read_buffer)
        refusal = self.server.admit(self, transport)
        if refusal is not None:
            self.state = CLOSED
            transport.write(refusal)
            transport.close()
            return
        transport.set_write_buffer_limits(high=self.write_buffer_max)
        self.last_active_at = self._time()

    def connection_lost(self, _exc):
        self.lost()

    def pause_writing(self):
        self.write_paused = True
        self.write_paused_at = self._time()
        self.write_paused_left = self.owed_bytes()
        self.server.account(self)
        self.update_reading()

    def resume_writing(self):
        self.write_paused = False
        self.last_active_at = self._time()
        if self.state < SHUT:
            if self.drain_watched:
                self.drain_watched = False
                self.transport.set_write_buffer_limits(high=self.write_buffer_max)
            self.server.account(self)
            self.flush()

    def eof_received(self):
        self.peer_eof()
        return True

    def get_buffer(self, _hint):
        """Where the next read goes: the server's read buffer, as much of it
        as the buffered-bytes budget leaves (Server._size_reads)."""
        return self.server.read_into

    def buffer_updated(self, n):
        if self.state != OPEN:
            return                  # draining: nothing new is taken; shut: lingering
        try:
            if self.until_drained and not self.waiting:
                self.until_drained = False      # its read answered (in C): nothing held
            reqs = self.waiting.quick(
                n, self.backlog is None and not self.eof and not self.server.stopping)
            if reqs is None:
                return              # one lane request, taken whole (Pipeline.quick)
            now = self._time()
            if reqs or self.parser.pending or self.parser.held_bytes:
                # Blank lines alone are no activity: a CRLF now and then
                # must not hold a connection past its idle time.
                self.last_active_at = now
            if not self.waiting and self.backlog is None:
                if len(reqs) == 1 and self._fast(reqs):
                    if self.head_started_at or self.parser.pending or self.continue_queued:
                        self._partial(now, True)
                        out = []
                        self._continue(out)
                        if out:
                            self.finish(out)
                    return
            out = []
            if reqs:
                self._take(reqs, 0, out)
                self.waiting.drain(out)
            self._partial(now, bool(reqs))
            self._continue(out)
            self.finish(out)
        except Exception as e:  # a bug, not the client's fault: say so, close
            self.server.internal_error(self, e)

    def _partial(self, now, completed):
        """The head deadline runs from the first byte of a request: from this
        read when it `completed` a request before it; later bytes do not
        reset it.  A completed request's 100 Continue is no longer awaited."""
        if completed:
            self.continue_queued = False
        if not self.parser.pending:
            self.head_started_at = 0.0
        elif completed or not self.head_started_at:
            self.head_started_at = now

    # --- requests ---

    def _fast(self, reqs):
        """The hot paths for one request on a quiet connection: taken by
        the store's Lane and answered now or later; a keep-alive HTTP/1.1
        /tot answered from memory; or any route, written at once or left
        waiting alone.  False for the general path."""
        req = reqs[0]
        if (not req.keep_alive or req.http10 or self.eof or self.parser.held_bytes
                or self.server.stopping or req.error is not None):
            return False
        waiting = self.waiting
        if waiting.take(reqs, 0, False):
            out = []
            waiting.drain(out)
            if out:
                self.write_now(out[0])
            return True
        if req.route == ROUTE_TOT:
            reply = self.routes.tot_now(req)
            if reply is not None:
                self.write_now(reply)
                return True
        if self._costly_held(req):
            return False            # held back in the general path (_take)
        r = self.routes.answer(self, req, KEEP)
        if type(r) is bytes:
            if self.state != OPEN:
                self.finish([r])
            else:
                self.write_now(r)
        else:
            self._wait_on(r)
        return True

    def write_now(self, reply):
        """A quiet connection's reply, written at once; what its transport
        keeps of it (a client not reading) counts in the server's budget."""
        transport = self.transport
        transport.write(reply)
        if transport.get_write_buffer_size():
            self.finish([])

    def _wait_on(self, slot):
        """A Slot now waits in `waiting`, for the store or for its turn;
        its reserve counts against the bytes this connection may have owed
        (WRITE_BUFFER_BYTES_MAX) until it leaves (Pipeline.drain takes it
        off), and a read of server state (/events, /health, /metrics) holds
        back what comes after it: it sees none of the later changes."""
        self.waiting.append(slot)
        self.reserved += slot.reserve
        if slot.route in _AT_ITS_TURN:
            self.until_drained = True

    def _take(self, reqs, i, out):
        """Take reqs[i:] in order until one ends the connection, the pipeline
        is full, the replies made and not yet sent (and the reserves of
        those still owed) reach WRITE_BUFFER_BYTES_MAX, a write comes
        while a read of this connection is owed (`reads_owed`), this
        pass's costly answers have spent the turn or PASS_CHARGE_MAX, or a
        costly read finds the turn's share of them spent; the rest wait in
        `backlog`."""
        waiting = self.waiting
        routes = self.routes
        turn = self.server.turn
        pass_left = waiting.pass_left   # the pass's start, its grants taken off
        stopping = self.server.stopping
        n = len(reqs)
        room = self._room(out)
        while i < n:
            if (self._held_back(room, out) or (self.reads_owed and reqs[i].route in _WRITES)
                    or turn.pass_spent(pass_left)):
                self.backlog = (reqs, i)
                return
            # The store's Lane takes a run of requests, writes among them:
            # not while a read of this connection is owed.
            taken = waiting.take(reqs, i, stopping) if not self.reads_owed else i
            if taken != i:
                i = taken
                continue
            req = reqs[i]
            if (not waiting or req.route not in _AT_ITS_TURN) and self._costly_held(req):
                self.backlog = (reqs, i)    # the turn's costly share is spent
                return
            i += 1
            err = req.error
            if not req.keep_alive or stopping or (err is not None and err.close):
                mode = CLOSE
                self.take_no_more()
            else:
                mode = KEEP10 if req.http10 else KEEP
            if not waiting:
                r = routes.answer(self, req, mode)
                if type(r) is bytes:
                    out.append(r)
                    room -= len(r)
                else:
                    self._wait_on(r)
                    room -= r.reserve
            elif req.route in _AT_ITS_TURN:
                self._at_its_turn(req, mode)
            else:
                r = routes.answer(self, req, mode, True)
                if type(r) is bytes:
                    waiting.append(Slot(self, req.route, mode, reply=r))
                else:
                    self._wait_on(r)
                    room -= r.reserve
            if self.state != OPEN:
                return

    def _room(self, out) -> int:
        """The bytes this pass's replies may still take (`out` has those
        made): replies are held for a client until it reads them, and one
        read of small pipelined /past requests can ask for megabytes, also
        when the store answers them later."""
        room = self.write_buffer_max - self.transport.get_write_buffer_size() - self.reserved
        server = self.server
        if server.over_budget:
            # One reply at a time (finish() goes on while the client reads
            # it): an empty transport buffer may only mean that the kernel's
            # are not full yet, and a client that never reads must not fill
            # its own buffer past the server's budget.
            room = min(room, 1)
        else:
            # Nor may one pass's replies spend the part of the budget kept
            # for connections holding nothing.
            room = min(room, server.soft_budget - server.buffered)
        for reply in out:
            room -= len(reply)
        return room

    def _costly_held(self, req) -> bool:
        """A costly read that the turn's share of them cannot take now
        (Turn.costly): it waits for the next turn."""
        if req.route not in COSTLY_ROUTES:
            return False
        charge = turn_charge(req)
        return charge > 0 and not self.server.turn.costly(charge)

    def _at_its_turn(self, req, mode):
        """A read of server state behind unanswered replies waits to be
        answered at its turn; its access is judged now, so that a 401
        closes before the requests behind it are taken (RFC 9112 9.6)."""
        refused = self.routes.refusal(self, req, mode)
        if refused is not None:
            self.waiting.append(Slot(self, req.route, mode, reply=refused))
        else:
            self._wait_on(Slot(self, req.route, mode, req.head, req=req))

    def _held_back(self, room, out) -> bool:
        """No request more is taken now: a read of server state is owed
        (_wait_on: it sees none of the later mods), the pipeline is full, or
        the replies owed reach the bytes bound (`room` is what is left of it)."""
        waiting = self.waiting
        if self.until_drained:
            if waiting:
                return True
            self.until_drained = False
        return len(waiting) >= self.pipeline_max or (room <= 0 and bool(out or self.reserved))

    def _continue(self, out):
        """A 100 Continue goes out once every reply before it has
        (RFC 9110 10.1.1), before its request's own reply.  The client may
        wait for it to send the body: the head deadline runs again from it
        (_awaiting_continue).  A request its token cannot make at all (a
        401) gets that reply in place of the 100, its body not asked for
        (RFC 9110 10.1.1), and the connection closes after it."""
        if self.parser.take_continue():
            self.continue_owed = True
        if self.state != OPEN:
            self.continue_owed = False      # nothing more is read: no body to ask for
            return
        if not self.continue_owed or self.backlog is not None or self.parser.held_bytes:
            return
        self.continue_owed = False
        reply, mode = CONTINUE, KEEP
        req = self.parser.awaiting_body
        if req is not None and self.routes.unauthorized(self, req):
            reply, mode = self.routes.refusal(self, req, KEEP), CLOSE
        if self.waiting:
            self.waiting.append(Slot(self, 0, mode, reply=reply))
            self.continue_queued = reply is CONTINUE
        else:
            out.append(reply)

    def _pump(self, out):
        """Take the requests held back (parsed in `backlog`, then unparsed in
        the parser) while the pipeline has room and the pass's share is not
        spent (`held`): PIPELINE_REQUESTS_MAX at most per call, so one
        client cannot hold the loop."""
        taken = 0
        while self.state == OPEN and taken < self.pipeline_max:
            room = self.pipeline_max - len(self.waiting)
            if room <= 0 or self.write_paused or self.waiting.held:
                return
            if self.backlog is not None:
                if self.server.turn.left <= 0:
                    return          # the turn is spent: after renew, in turn (finish)
                reqs, i = self.backlog
                self.backlog = None
            else:
                if not self.parser.held_bytes:
                    return          # a grant asked for nothing could end the turn unspent
                if out and self.server.over_budget:
                    return          # one reply at a time (_room): the rest stays bytes
                room = self.server.turn.grant(room)
                reqs, i = self.parser.more(room), 0
                self.server.turn.refund(room - len(reqs))
                self.waiting.pass_left -= len(reqs)     # a pass's share is of its charges
                if not reqs:
                    return
                self._partial(self._time(), True)
            taken += len(reqs) - i
            self._take(reqs, i, out)
            self.waiting.drain(out)
            if self.backlog is not None:
                return

    def flush(self):
        """After completions, or when the client reads again: send what is
        now in order, then take the requests held back."""
        if self.state >= SHUT:
            return
        try:
            out = []
            self.waiting.pass_left = self.server.turn.left      # a pass begins
            self.waiting.drain(out)
            self._pump(out)
            self._continue(out)
            self.finish(out)
        except Exception as e:
            self.server.internal_error(self, e)

    def finish(self, out):
        """Writes `out` in one write, then shuts, pauses or goes on."""
        transport = self.transport
        if out:
            transport.write(out[0] if len(out) == 1 else b"".join(out))
            self.last_active_at = self._time()
        if self.state != OPEN or self.eof:
            if not self.waiting:
                self.shut()
                return
        self.server.account(self)
        if self.server.over_budget and self.state == OPEN and not self.write_paused:
            self._watch_drain()
        self.update_reading()
        if out and out[-1] is CONTINUE and self.parser.pending:
            self.continue_queued = False        # the body's deadline runs from its 100
            self.head_started_at = self.last_active_at
        if self.write_paused or self.flush_soon:
            return
        if self.waiting.held or (
                self.state == OPEN and (self.backlog is not None or self.parser.held_bytes)
                and len(self.waiting) < self.pipeline_max
                and (not self.server.over_budget or not transport.get_write_buffer_size())
                and not self._held_for_the_store()):
            # Reads at their turn past this pass's share (Pipeline.drain,
            # draining or not), or requests held back (the turn's requests
            # spent, or the bytes bound) but able to go on: next loop turn,
            # after the other connections have had theirs.  Over the
            # server's budget too while its client reads what it is sent:
            # taking its held requests, one reply at a time (_take), is what
            # lowers the total; a client that does not read stops at its
            # first reply left in the buffer.
            self.flush_soon = True
            self.server.loop.call_soon(self._flush_soon)

    def _watch_drain(self):
        """Over the budget's rest a connection holding reply bytes is not
        read until they are out, which a transport tells only once past its
        high-water mark: at 0 it tells (resume_writing sets it back), where
        the sweep would find it up to a second later."""
        if self.transport.get_write_buffer_size():
            self.drain_watched = True
            self.transport.set_write_buffer_limits(high=0)      # pause_writing, now

    def _held_for_the_store(self) -> bool:
        """Held back until a reply the store owes arrives (an /events read
        owed, an unordered read that a write waits for, or the reserves of
        pending replies): its completion flushes this connection
        (Slot.done), so that waiting by polling every loop turn would only
        spin."""
        return bool(self.waiting) and (self.until_drained or self.reserved > 0
                                       or self.reads_owed > 0)

    def _flush_soon(self):
        self.flush_soon = False
        self.flush()

    # --- tokens ---

    def roles(self, token):
        """The roles of `token`, checked once per connection while it stays
        the same (compared in constant time)."""
        if token is None:
            return 0
        cached = self.token
        if cached is not None and compare_digest(token, cached):
            return self.token_roles
        roles = self.server.tokens.roles(token)
        if roles:
            self.token = token
            self.token_roles = roles
            self.authed = True
        return roles
