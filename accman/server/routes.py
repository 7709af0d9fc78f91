"""Routing and access: a parsed request in; out, its reply bytes, or a
Slot that the store completes later.  No sockets here: the connection owns
those (accman/server/connection.py), and the store is reached only through
the store interface (accman/store.py).

Access (SPEC "Access"): with tokens configured, each route needs a role
(ROUTE_ROLES; a mod needs `mint` to fund and `charge` to charge), a request
without a valid token is 401 and its connection closes, and /health and
OPTIONS need none.  With no tokens, a request whose Host does not name a
loopback address is refused (403): a page in a browser cannot reach the
server by DNS rebinding.
"""

from __future__ import annotations

import logging
from time import perf_counter

from accman.errors import AccManError, EventsTrimmed, Insufficient, StoreError
from accman.limits import (EVENT_BYTES_MAX, METRICS_TURN_REQUESTS, PAGE_ENTRIES_PER_TURN_REQUEST,
                           PAST_ENTRY_BYTES_MAX)
from accman.server import replies
from accman.server._wire import (ROUTE_EVENTS, ROUTE_HEALTH, ROUTE_HOLD, ROUTE_METRICS,
                                 ROUTE_MOD, ROUTE_OPTIONS, ROUTE_PAST, ROUTE_SETTLE,
                                 ROUTE_TOT)
from accman.server.auth import CHARGE, MINT, READ, roles_text
from accman.server.metrics import CONTENT_TYPE as METRICS_CONTENT_TYPE
from accman.server.replies import (DATE, HOLD_BODY, MOD_BODY, T200, TOT_BODY, events_body,
                                   past_body)

ROUTE_NAMES = {ROUTE_TOT: "tot", ROUTE_MOD: "mod", ROUTE_PAST: "past", ROUTE_HEALTH: "health",
               ROUTE_METRICS: "metrics", ROUTE_HOLD: "hold", ROUTE_SETTLE: "settle",
               ROUTE_EVENTS: "events", ROUTE_OPTIONS: "options"}
ANY_ROLE = READ | CHARGE | MINT
# The role each route needs; a mod's depends on its sign (mod_role).
ROUTE_ROLES = {ROUTE_TOT: READ, ROUTE_PAST: READ, ROUTE_EVENTS: READ, ROUTE_HOLD: CHARGE,
               ROUTE_SETTLE: CHARGE, ROUTE_METRICS: ANY_ROLE, ROUTE_HEALTH: 0,
               ROUTE_OPTIONS: 0}

# A store's own error (a read of its files or its database that failed)
# names the server's files and the OS's words: said in the log, once a
# kind (at most STORE_ERRORS_SAID_MAX kinds), never to the client (SPEC
# "Access").
STORE_ERROR_DETAIL = "the store could not serve this read; the server's log says why"
STORE_ERRORS_SAID_MAX = 64
log = logging.getLogger("accman.server")

_CHALLENGE = b'WWW-Authenticate: Bearer realm="accman"\r\n'
_CHALLENGE_INVALID = b'WWW-Authenticate: Bearer realm="accman", error="invalid_token"\r\n'


def mod_role(by: int) -> int:
    """SPEC "Access": minting credits, charging debits."""
    return MINT if by > 0 else CHARGE


def _need(req) -> int:
    """The roles of which `req` needs one (0: none)."""
    route = req.route
    return ROUTE_ROLES.get(route, ANY_ROLE) if route != ROUTE_MOD else mod_role(req.by)


# Reads whose answer costs the turn more than one request (turn_charge).
COSTLY_ROUTES = frozenset((ROUTE_PAST, ROUTE_EVENTS, ROUTE_METRICS))


def turn_charge(req) -> int:
    """What answering `req` may cost the turn beyond its one request
    (Turn.charge, Turn.costly): a /metrics render, or a page's most entries;
    0 for a cheap request, and for one refused as it was parsed."""
    route = req.route
    if route not in COSTLY_ROUTES or req.error is not None:
        return 0
    if route == ROUTE_METRICS:
        return METRICS_TURN_REQUESTS - 1
    return req.limit // PAGE_ENTRIES_PER_TURN_REQUEST


class Slot:
    """A request answered out of line, in its connection's queue:
    - pending: the store completes it later (`done`, its callback);
    - ready: `reply` holds its bytes, waiting for the replies before it;
    - deferred: `req` is evaluated when its turn comes (a read of server
      state pipelined behind writes, or a 100 Continue's request)."""

    __slots__ = ("conn", "route", "mode", "head", "reply", "pending", "req", "t0", "reserve",
                 "long_poll", "read_owed", "charged")

    def __init__(self, conn, route, mode, head=False, reply=None, req=None):
        self.conn = conn
        self.route = route
        self.mode = mode
        self.head = head
        self.reply = reply
        self.pending = False
        self.req = req
        self.t0 = 0.0
        # Bytes its reply may take, counted against the connection's write
        # buffer while it is owed (a /past or /events page answered later).
        self.reserve = 0
        self.long_poll = False      # an /events read that may wait for events
        # An unordered read the store answers later (Connection.reads_owed):
        # its connection's later writes wait for it.
        self.read_owed = False
        # A costly read answered later has charged the turn that took it
        # (Routes._charge_now), not the one its answer comes in.
        self.charged = False

    def done(self, outcome):
        """The store's completion, on the loop thread (Server.deliver
        answers the common case of a mod itself, without this)."""
        conn = self.conn
        if self.route == ROUTE_MOD:
            conn.metrics.mod_latency_s.observe(perf_counter() - self.t0)
        self.reply = conn.routes.reply_of(self.route, outcome, self.mode, self.head,
                                          self.charged)
        self.pending = False
        self.unowe()
        conn.server.mark_ready(conn)

    __call__ = done

    def close_after(self):
        """Its reply is the connection's last (a stop): it says `Connection:
        close`, made so, or remade so if it is made already."""
        self.mode = replies.CLOSE
        if self.reply is not None:
            self.reply = replies.closing(self.reply)

    def unowe(self):
        """An owed read is answered (or was never asked): its connection's
        writes may go on (Connection.reads_owed)."""
        if self.read_owed:
            self.read_owed = False
            self.conn.reads_owed -= 1


class Routes:
    """The server's routes over its store, tokens and metrics."""

    def __init__(self, server):
        self.server = server
        self.store = server.store
        self.tokens = server.tokens
        self.metrics = server.metrics
        self.requests = server.metrics.requests
        self.inline_reads = bool(getattr(server.store, "inline_reads", False))
        self._store_errors_said: set = set()

    # --- the hot path ---------------------------------------------------------

    def tot_now(self, req):
        """A keep-alive /tot answered from memory with no token to check, or
        None for the general path (SPEC's checks all happen there)."""
        if self.tokens is not None or not self.inline_reads or not req.loopback_host \
                or req.head:
            return None
        try:
            tot = self.store.tot(req.cred)
        except AccManError:
            return None
        if tot is None:
            return None
        self.metrics.tot_ok += 1
        body = TOT_BODY % tot
        return replies.T200_KEEP % (DATE.now, len(body), body)

    # --- every request --------------------------------------------------------

    def answer(self, conn, req, mode, ordered=False, checked=False):
        """The reply to `req`: bytes now, or a pending Slot.  `ordered`: the
        request is pipelined behind writes of its connection that are not
        yet answered, so a read must see exactly those (accman/store.py).
        `checked`: its access was judged when it was taken (`refusal`)."""
        refused = None if checked else self.refusal(conn, req, mode)
        if refused is not None:
            return refused
        route = req.route
        if route == ROUTE_TOT:
            return self._tot(conn, req, mode, ordered)
        if route == ROUTE_MOD:
            return self._mod(conn, req, mode)
        if route == ROUTE_PAST:
            return self._past(conn, req, mode, ordered)
        if route == ROUTE_HOLD or route == ROUTE_SETTLE:
            return self._hold_or_settle(conn, req, mode)
        if route == ROUTE_EVENTS:
            return self._events(conn, req, mode)
        if route == ROUTE_HEALTH:
            return self._health(mode, req.head)
        if route == ROUTE_METRICS:
            self.requests["metrics", 200] += 1
            self.server.turn.charge(METRICS_TURN_REQUESTS - 1)
            # Its own connection counted as of its last read: a request held
            # back then would be counted in the bytes it reports.
            self.server.account(conn)
            return replies.reply(200, self.server.render_metrics(), mode,
                                 content_type=METRICS_CONTENT_TYPE, head=req.head)
        if route == ROUTE_OPTIONS:
            self.requests["options", 204] += 1
            return replies.no_content(mode, req.allow)
        err = req.error
        extra = b"Allow: %s\r\n" % err.allow.encode("ascii") if err.allow else b""
        return self.error("none", err.status, err.code, err.detail, mode, extra, head=req.head)

    def unauthorized(self, conn, req) -> bool:
        """Whether `refusal` would be a 401 (and close): tokens are
        configured, the route needs a role, and `req` has no valid token."""
        return self.tokens is not None and _need(req) != 0 and not conn.roles(req.token)

    def refusal(self, conn, req, mode):
        """The refusal of a request its caller may not make, or None.  A
        401 closes the connection (`take_no_more`): it is judged when the
        request is taken, so that none behind it is (a read answered at its
        turn is judged then too, Connection._at_its_turn)."""
        err = req.error
        if err is not None and err.close:
            return None             # a framing error is answered as it is
        if self.tokens is None:
            if req.loopback_host:
                return None
            return self.error(ROUTE_NAMES.get(req.route, "none"), 403, "forbidden",
                              "this server has no tokens and answers only a Host that names "
                              "a loopback address (127.0.0.1, localhost or [::1])",
                              mode, head=req.head)
        need = _need(req)
        if need == 0:
            return None
        roles = conn.roles(req.token)
        if roles & need:
            return None
        name = ROUTE_NAMES.get(req.route, "none")
        if not roles:
            conn.take_no_more()     # SPEC: a connection refused 401 is closed
            missing = req.token is None     # absent, malformed or repeated (auth_fault)
            detail = ((req.auth_fault or "this call needs an Authorization: Bearer token")
                      if missing else "the bearer token is not valid")
            return self.error(name, 401, "unauthorized", detail, replies.CLOSE,
                              _CHALLENGE if missing else _CHALLENGE_INVALID, head=req.head)
        if err is not None:
            return None             # its own error says what is wrong
        return self.error(name, 403, "forbidden",
                          f"this call needs a token with the role {roles_text(need)}",
                          mode, head=req.head)

    # --- the routes -------------------------------------------------------------

    def _tot(self, conn, req, mode, ordered):
        if not ordered and self.inline_reads:
            try:
                tot = self.store.tot(req.cred)
            except AccManError as e:
                return self.error_of(ROUTE_TOT, e, mode, req.head)
            if tot is None:
                return self.error("tot", 404, "no_account", "no account has this cred", mode,
                                  head=req.head)
            return self.reply_of(ROUTE_TOT, tot, mode, req.head)
        slot = self._read_slot(conn, ROUTE_TOT, mode, req.head, ordered)
        try:
            outcome = self.store.read_tot(req.cred, slot, ordered)
        except AccManError as e:
            slot.unowe()
            return self.error_of(ROUTE_TOT, e, mode, req.head)
        return self._read_settled(slot, outcome)

    def _mod(self, conn, req, mode):
        if self.server.stopping:
            return self.error("mod", 503, "shutting_down",
                              "the server is shutting down; retry on another", mode)
        slot = Slot(conn, ROUTE_MOD, mode)
        slot.t0 = perf_counter()
        try:
            outcome = self.store.submit(req.cred, req.by, req.min, req.key, slot, req.low)
        except AccManError as e:        # busy, unavailable: refused at once, an outcome too
            conn.metrics.mod_latency_s.observe(perf_counter() - slot.t0)
            return self.error_of(ROUTE_MOD, e, mode)
        return self._settled(slot, outcome)

    def _past(self, conn, req, mode, ordered):
        slot = self._read_slot(conn, ROUTE_PAST, mode, req.head, ordered)
        slot.reserve = (req.limit + 1) * PAST_ENTRY_BYTES_MAX
        try:
            outcome = self.store.read_past(req.cred, req.limit, req.before, slot, ordered)
        except AccManError as e:
            slot.unowe()
            return self.error_of(ROUTE_PAST, e, mode, req.head)
        return self._charge_now(self._read_settled(slot, outcome), req)

    def _hold_or_settle(self, conn, req, mode):
        route = req.route
        if self.server.stopping:
            return self.error(ROUTE_NAMES[route], 503, "shutting_down",
                              "the server is shutting down; retry on another", mode)
        slot = Slot(conn, route, mode)
        try:
            if route == ROUTE_HOLD:
                outcome = self.store.submit_hold(req.cred, req.by, req.ttl, req.min, req.key,
                                                 slot)
            else:
                outcome = self.store.submit_settle(req.cred, req.hold, req.use, slot)
        except AccManError as e:
            return self.error_of(route, e, mode)
        return self._settled(slot, outcome)

    def _events(self, conn, req, mode):
        slot = Slot(conn, ROUTE_EVENTS, mode, req.head)
        slot.reserve = (req.limit + 1) * EVENT_BYTES_MAX
        # A server that stops answers a long poll at once (Server._shutdown),
        # and so does one whose client has half-closed (Lifecycle.peer_eof).
        wait = 0 if self.server.stopping or conn.eof else req.wait
        slot.long_poll = wait > 0
        try:
            outcome = self.store.read_events(req.after, req.limit, wait, slot)
        except AccManError as e:
            return self.error_of(ROUTE_EVENTS, e, mode, req.head)
        return self._charge_now(self._settled(slot, outcome), req)

    def _charge_now(self, r, req):
        """A page the store answers later (`r` a pending Slot) charges the
        turn that takes it, at the most its request asks (Turn.costly took
        it for that), so that pages taken in one turn cost it."""
        if type(r) is Slot and r.pending:
            self.server.turn.charge(turn_charge(req))
            r.charged = True
        return r

    def _health(self, mode, head):
        if self.server.stopping:
            return self.error("health", 503, "shutting_down", "the server is shutting down",
                              mode, head=head)
        if not self.store.healthy:
            # A store of several clusters may say which cannot commit.
            detail = (self.store.unhealthy_detail
                      or "the store cannot commit; the server takes no writes")
            return self.error("health", 503, "unavailable", detail, mode, head=head)
        self.requests["health", 200] += 1
        body = replies.HEALTH_BODY % self.store.open_holds
        return T200[mode] % (DATE.now, len(body), b"" if head else body)

    # --- outcomes to replies: each success reply is built here -------------------

    @staticmethod
    def _read_slot(conn, route, mode, head, ordered):
        """The Slot of a read.  An unordered one is owed on its connection
        (Connection.reads_owed) from before the store is asked until it is
        answered: it runs beside the store's writes, so a write of its
        connection that comes after it waits for it, or the read could see
        it (SPEC: "none of the later ones").  An ordered read is queued with
        the writes, in order."""
        slot = Slot(conn, route, mode, head)
        if not ordered:
            slot.read_owed = True
            conn.reads_owed += 1
        return slot

    def _read_settled(self, slot, outcome):
        r = self._settled(slot, outcome)
        if r is not slot:
            slot.unowe()            # answered at once
        return r

    def _settled(self, slot, outcome):
        if outcome is None:
            # A store may have called `done` already (accman/store.py).
            slot.pending = slot.reply is None
            return slot
        return self.reply_of(slot.route, outcome, slot.mode, slot.head)

    def reply_of(self, route, outcome, mode, head=False, charged=False):
        """The reply to a store's outcome: its value, or an AccManError; a
        page charges the turn for its entries unless it was `charged` when
        taken."""
        if isinstance(outcome, AccManError):
            return self.error_of(route, outcome, mode, head)
        if route == ROUTE_TOT:
            self.metrics.tot_ok += 1
            body = TOT_BODY % outcome
        else:
            if route == ROUTE_MOD or route == ROUTE_SETTLE:
                body = MOD_BODY % outcome
            elif route == ROUTE_PAST:
                if not charged:
                    self.server.turn.charge(len(outcome.entries) // PAGE_ENTRIES_PER_TURN_REQUEST)
                body = past_body(outcome.account, outcome.entries, outcome.next)
            elif route == ROUTE_HOLD:
                body = HOLD_BODY % outcome
            elif route == ROUTE_EVENTS:
                if not charged:
                    self.server.turn.charge(len(outcome[0]) // PAGE_ENTRIES_PER_TURN_REQUEST)
                body = events_body(*outcome)
            else:
                raise AssertionError(f"no success reply for route {route}")
            self.requests[ROUTE_NAMES[route], 200] += 1
        return T200[mode] % (DATE.now, len(body), b"" if head else body)

    def error_of(self, route, e, mode, head=False):
        name = ROUTE_NAMES.get(route, "none")
        if not isinstance(e, AccManError):
            return self.error(name, 500, "internal", "the store failed unexpectedly", mode,
                              head=head)
        if isinstance(e, StoreError):   # its words name the server's files: the log's
            if len(self._store_errors_said) < STORE_ERRORS_SAID_MAX and \
                    e.detail not in self._store_errors_said:
                self._store_errors_said.add(e.detail)
                log.error("a %s read failed: %s", name, e.detail)
            return self.error(name, e.status, e.code, STORE_ERROR_DETAIL, mode, head=head)
        extra = {}
        if isinstance(e, Insufficient):
            extra["tot"] = e.tot
        elif isinstance(e, EventsTrimmed):
            extra["first"] = e.first       # its detail says how to go on (SERVER.md)
        return self.error(name, e.status, e.code, e.detail, mode, head=head, **extra)

    def error(self, route_name, status, code, detail, mode, extra_headers=b"", head=False,
              **extra):
        self.requests[route_name, status] += 1
        if status not in replies.REASONS:
            status = 500
        return replies.reply(status, replies.error_body(code, detail, **extra), mode,
                             extra_headers, head=head)
