"""`AccManClient`, the asyncio client for the calling servers, and the
calling side's public names (`accman.client` is this module).

It speaks HTTP/1.1 to AccMan directly (SPEC "Routes"), with no HTTP library
in between: a request is one preformatted line plus two headers
(accman.calling.requests), and a reply is parsed strictly by `ReplyParser`
(accman.calling.parser) and decoded by accman.calling.replies, none of which
does I/O.

The client keeps a small pool of keep-alive connections and pipelines calls
on them (the server answers pipelined requests in order, SPEC), so many
calls can be in flight at once.  Writes made in one loop turn are gathered
and flushed with one `write` (uvloop's habit).  `AccManSyncClient`
(accman.calling.sync) is the blocking client, for scripts and the CLI.

What a failure means for money is in the exception type (accman.errors):

- `Unreachable` (an `Unavailable`): nothing reached the server (the connect
  failed, or no connection was free within the timeout), or the server
  closed the connection before processing the call (it was pipelined
  behind a closing reply of AccMan's, given before it takes more: conn.py
  untaken_behind); nothing was applied.  Always safe to retry.
- a server `503` `NotApplied` (`Busy` and `ShuttingDown` among them):
  refused before applying, nothing was applied.  Always safe to retry.
- a server `503` `Unavailable` (its store failed to commit): nothing
  acknowledged, and a mod may have been applied: retried as below.
- `OutcomeUnknown` (and its `CallTimeout`, `BadReply`, `ProxyUnavailable`):
  the request was sent and no complete reply from AccMan came (also behind
  any other closing reply; a 503 without AccMan's error body is a proxy's).  A
  read can simply be retried.  A mod may or may not have been applied:
  with a `key`, sending it again with the same key never charges twice
  (the server answers the original result), and its success settles the
  question; a refusal by a balance or a count that moves (`Insufficient`,
  `Overflow`, `TooManyHolds`, `NoAccount`) does not, since the first
  attempt may still be on its way (a stalled front-end) and apply later,
  so the call ends as of unknown outcome: the account's `past`, by key,
  tells whether it has applied so far.  Without a key, only `past` can
  tell.
- `EventsPageRefused`: an `events` page of the SPEC's shape that the
  client cannot go on past: its ids break the stream's order
  (`EventsOutOfOrder`: a gap, a repeat, a `next` that skips), it holds
  more events than the `limit` asked (`EventsOverLimit`), or an event of
  a type this client does not know (`EventTypeUnknown`: the server is
  newer; upgrade accman).  AccMan's own word on its stream,
  which asking again would not change, so it is never retried, and is no
  `TransportError` that a follower would ride out.

So the clients retry reads and keyed mods, and retry a keyless mod only when
it was not sent or not processed (`Unreachable`) or refused before applying
(`NotApplied`: `not_applied`, `busy`, `shutting_down`).  A
hold is retried as a mod is; a settle always, since settling again with the
same `use` answers the first reply (SPEC "Holds").  Tokens and credentials
never appear in exception messages, reprs or logs.

A long poll (`events` with `wait_s`) has a connection of its own, outside
the pool: its reply may be held back for up to `wait_s`, and everything
pipelined behind it on a shared connection would wait as long.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl as _ssl

from accman.calling import policy, replies
from accman.calling.conn import Conn
from accman.calling.parser import (HEAD_CACHE_MAX, REPLY_BODY_BYTES_MAX, REPLY_HEAD_BYTES_MAX,
                                   REPLY_HEADERS_MAX, ReplyParser)
from accman.calling.policy import (IDLE_REUSE_S, RETRIES_DEFAULT, RETRY_PAUSE_MAX_S,
                                   RETRY_PAUSE_S, TIMEOUT_S_DEFAULT, TIMEOUT_S_MAX)
from accman.calling.replies import EventsPage, PastPage
from accman.calling.requests import (Endpoint, check_ssl_context, target_events, target_hold,
                                     target_mod, target_past, target_settle, target_tot)
from accman.calling.sync import AccManSyncClient
from accman.deadline import within
from accman.calling.policy import RETRIES_MAX
from accman.calling.replies import ACCOUNT_CHARS_MAX, DETAIL_CHARS_MAX
from accman.errors import (AccManError, BadReply, BadRequest, Busy, CallTimeout, EventsOutOfOrder,
                           EventsOverLimit, EventsPageRefused, EventsTrimmed, EventTypeUnknown,
                           Forbidden, HoldEnded, Insufficient, KeyReused, NoAccount, NoHold,
                           NotApplied, OutcomeUnknown, Overflow, ProxyUnavailable, ShuttingDown,
                           TooManyHolds, TransportError, Unauthorized, Unavailable,
                           UnexpectedReply, Unreachable)
from accman.limits import PIPELINE_REQUESTS_MAX
from accman.records import Entry, Event

log = logging.getLogger("accman.client")

# --- the async client's own bounds ---------------------------------------------
# Keep-alive connections per client.  One connection carries thousands of
# calls a second when pipelined; a few more keep one slow group commit from
# holding up the reads queued behind it.
CONNECTIONS_MAX_DEFAULT = 8
CONNECTIONS_MAX = 1024
# Requests written on one connection and not yet answered.  Well under the
# server's PIPELINE_REQUESTS_MAX so the server never has to stop reading us.
PIPELINE_DEPTH_MAX = 32
assert PIPELINE_DEPTH_MAX <= PIPELINE_REQUESTS_MAX
# Calls waiting for a free connection slot when every connection is full.
# Beyond it a call fails at once with `Busy` (back-pressure, nothing sent)
# instead of queueing without bound.
CALLS_WAITING_MAX = 4096
# Long polls in flight at once per client, each on a connection of its own.
# An event stream has one follower or a few; beyond the bound a long poll
# fails at once with `Busy` (nothing sent) instead of opening sockets
# without limit.
LONG_POLLS_MAX = 16


class AccManClient:
    """The asyncio client.

    >>> async with AccManClient("http://127.0.0.1:8035", token) as acc:
    ...     tot = await acc.tot("alice")
    ...     tot, seq = await acc.mod("alice", -3, min=0, key="req-81f2-r")
    ...     entries, next = await acc.past("alice", limit=10)     # .account: the public id
    ...     hold, tot, seq = await acc.hold("alice", -10, ttl_s=90, key="req-81f2-h")
    ...     tot, seq = await acc.settle("alice", hold, 3)          # 3 spent, 7 back
    ...     events, next = await acc.events(after=0, wait_s=30)    # a long poll

    Calls may run concurrently from many tasks; they share up to
    `connections_max` keep-alive connections, pipelining up to
    PIPELINE_DEPTH_MAX calls on each.  Each attempt of a call has
    `timeout_s`; reads and keyed mods are retried up to `retries` times,
    a keyless mod only when nothing was sent (see the module docstring).
    `ssl_context` is the TLS trust of an https url, used as given (a
    private CA: `ssl.create_default_context(cafile=...)`); None, the
    default context.
    """

    def __init__(self, url: str, token: str | None = None, *,
                 timeout_s: float = TIMEOUT_S_DEFAULT,
                 connections_max: int = CONNECTIONS_MAX_DEFAULT,
                 retries: int = RETRIES_DEFAULT, ssl_context: _ssl.SSLContext | None = None):
        policy.check_settings(timeout_s, retries)
        if isinstance(connections_max, bool) or not isinstance(connections_max, int):
            raise TypeError(f"connections_max must be an int, not {type(connections_max).__name__}")
        if not 1 <= connections_max <= CONNECTIONS_MAX:
            raise ValueError(f"connections_max must be 1 to {CONNECTIONS_MAX}")
        self._ep = Endpoint(url, token)
        check_ssl_context(ssl_context, self._ep)
        self._timeout_s = float(timeout_s)
        self._connections_max = connections_max
        self._retries = retries
        self._loop = None
        self._conns: list[Conn] = []
        self._connecting = 0
        self._waiters = collections.deque()
        self._polls: list[Conn] = []       # long polls' own connections
        self._polls_in_flight = 0
        self._closed = False
        self._ssl = (ssl_context or _ssl.create_default_context()) if self._ep.tls else None

    def __repr__(self) -> str:
        return f"<AccManClient {self._ep.where} connections={len(self._conns)}>"

    async def __aenter__(self) -> "AccManClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection.  Calls in flight fail with
        `OutcomeUnknown`; later calls fail with `Unreachable`.  Closing a
        client whose event loop has ended (a finished `asyncio.run`) only
        lets go of its connections: their sockets close as they are
        collected, since no loop is left to close them."""
        self._closed = True
        loop = self._loop
        if loop is not None and loop is not asyncio.get_running_loop() and loop.is_closed():
            self._conns, self._polls = [], []
            self._waiters.clear()
            return
        self._bound_loop()
        for c in self._conns + self._polls:
            c.usable = False
            if c.transport is not None:
                c.transport.close()
        self._wake_all()
        if self._conns or self._polls:
            await asyncio.sleep(0)      # let connection_lost run

    # --- the calls -----------------------------------------------------------
    async def tot(self, cred: str) -> int:
        """The durable balance.  NoAccount for an unknown credential."""
        req = self._ep.request("GET ", target_tot(cred))
        return await self._call(req, True, replies.tot)

    async def mod(self, cred: str, by: int, min: int | None = None,
                  key: str | None = None, low: int | None = None) -> tuple:
        """Change the balance by `by`; returns `(tot, seq)` once durable.
        With `min`, applies only if the new balance is >= min, else raises
        Insufficient (with `.tot`).  With `key`, applies at most once.
        `low`, on a funding mod (by > 0) only, sets the account's
        low-balance threshold (SPEC "Events")."""
        req = self._ep.request("PATCH ", target_mod(cred, by, min, key, low))
        return await self._call(req, key is not None, replies.mod)

    async def hold(self, cred: str, by: int, ttl_s: int, min: int | None = None,
                   key: str | None = None) -> tuple:
        """Reserve `-by` (by < 0) for up to `ttl_s` seconds; returns `(hold,
        tot, seq)` once durable: the hold's id (the seq of the entry that
        starts it) and what is left to spend.  `min` (the server's default
        0) and `key` as for a mod; TooManyHolds over the bounds of open
        holds.  A hold not settled within `ttl_s` ends by itself, all of it
        returned.  Retried as a mod is: with a key, or when nothing was
        sent."""
        req = self._ep.request("PATCH ", target_hold(cred, by, ttl_s, min, key))
        return await self._call(req, key is not None, replies.hold)

    async def settle(self, cred: str, hold: int, use: int) -> tuple:
        """End `hold`: `use` of it (0 to the held amount) is spent, the rest
        returns; `(tot, seq)` once durable.  Settling again with the same
        `use` answers the first reply, so it is always retried; another
        `use`, or a hold that expired, is HoldEnded; NoHold for an id the
        account never had."""
        req = self._ep.request("PATCH ", target_settle(cred, hold, use))
        return await self._call(req, True, replies.settle)

    async def events(self, after: int = 0, limit: int | None = None,
                     wait_s: int | None = None) -> EventsPage:
        """The events after `after`, oldest first, as `(events, next)`:
        `next` is the `after` of the following call.  With `wait_s` (whole
        seconds, up to EVENTS_WAIT_S_MAX) the server waits that long for a
        first event (a long poll): the attempt's timeout is then `timeout_s
        + wait_s`, on a connection of its own.  EventsTrimmed (with
        `.first`) when `after` is older than the retention keeps."""
        req = self._ep.request("GET ", target_events(after, limit, wait_s))
        return await self._call(req, True, replies.events(after, limit), wait_s or 0)

    async def past(self, cred: str, limit: int | None = None,
                   before: int | None = None) -> PastPage:
        """One page of history, newest first.  It unpacks as `(entries,
        next)`, where `next` is the `before` of the following page or None;
        `.account` is the account's public id (None from a server that does
        not send it yet)."""
        req = self._ep.request("GET ", target_past(cred, limit, before))
        return await self._call(req, True, replies.past)

    # --- machinery ---------------------------------------------------------
    async def _call(self, req: bytes, safe: bool, decode, wait_s: int = 0):
        attempts = policy.Attempts(safe, self._retries, read=req.startswith(b"GET "))
        while True:
            try:
                if wait_s:
                    status, body, _ = await self._long_poll(req, self._timeout_s + wait_s)
                else:
                    status, body, _ = await self._attempt(req)
                return decode(status, body)
            except AccManError as e:
                replies.unechoed(e, req)    # a reply may quote the request: never its secrets
                ending = attempts.failed(e, self._closed)
                if ending is e:
                    raise
                if ending is not None:
                    raise ending from e
                log.debug("AccMan call failed (%s), retry %d", e.code, attempts.made)
            await asyncio.sleep(attempts.pause_s())

    async def _attempt(self, req: bytes) -> tuple:
        """One attempt: the reply's `(status, body, close)`."""
        loop = self._bound_loop()
        deadline = loop.time() + self._timeout_s
        conn = self._pick()
        if conn is None:
            conn = await self._acquire(deadline)
        fut = loop.create_future()
        conn.send(req, fut)
        timer = loop.call_at(deadline, conn.timed_out, fut, self._timeout_s)
        try:
            return await fut
        finally:
            timer.cancel()

    async def _long_poll(self, req: bytes, timeout_s: float) -> tuple:
        """One attempt on a connection of its own (an idle one kept from an
        earlier long poll, or a new one)."""
        if self._closed:
            raise Unreachable("the client is closed")
        if self._polls_in_flight >= LONG_POLLS_MAX:
            raise Busy("more than LONG_POLLS_MAX long polls in flight on this client")
        loop = self._bound_loop()
        deadline = loop.time() + timeout_s
        self._polls_in_flight += 1
        try:
            conn = self._idle_poll()
            if conn is None:
                conn = await self._dial(deadline, pooled=False)
                self._polls.append(conn)
            fut = loop.create_future()
            conn.send(req, fut)
            timer = loop.call_at(deadline, conn.timed_out, fut, timeout_s)
            try:
                return await fut
            except asyncio.CancelledError:
                # Nobody wants the reply it still owes: it cannot be reused.
                conn.usable = False
                conn.close_if_abandoned()
                raise
            finally:
                timer.cancel()
        finally:
            self._polls_in_flight -= 1

    def _bound_loop(self):
        """The running event loop, which must be the one this client first
        ran on: its connections, futures and timers belong to that loop and
        cannot move (asyncio would fail deep inside, "Event loop is
        closed", or hang)."""
        loop = asyncio.get_running_loop()
        if loop is not self._loop:
            if self._loop is not None:
                ended = " (it has ended: each asyncio.run() makes a new one)" \
                    if self._loop.is_closed() else ""
                raise RuntimeError(
                    f"this AccManClient was first used on another event loop{ended}, to which "
                    f"its connections belong: make one client per event loop, for instance "
                    f"inside the coroutine that asyncio.run() runs")
            self._loop = loop
        return loop

    def _idle_poll(self):
        """A long poll's connection with nothing owed, not idle too long."""
        now = self._loop.time()
        for c in list(self._polls):
            if not c.usable or c.waiting:
                continue
            if now - c.idle_since > policy.IDLE_REUSE_S:
                c.usable = False
                c.transport.close()
                continue
            return c
        return None

    def _pick(self):
        """An idle connection, or a pipelining one once the pool is full; None
        when the caller should open or wait.  Starts a background connect
        when pipelining while the pool has room."""
        if self._closed:
            raise Unreachable("the client is closed")
        best = None
        best_n = PIPELINE_DEPTH_MAX
        now = None
        for c in self._conns:
            if not c.usable:
                continue
            n = len(c.waiting)
            if n == 0:
                if now is None:
                    now = self._loop.time()
                if now - c.idle_since > policy.IDLE_REUSE_S:
                    c.usable = False
                    c.transport.close()
                    continue
                return c
            if n < best_n:
                best, best_n = c, n
        if len(self._conns) + self._connecting < self._connections_max:
            if best is None:
                return None
            self._connecting += 1
            self._loop.create_task(self._open_spare())
        return best

    async def _acquire(self, deadline: float) -> Conn:
        while True:
            if len(self._conns) + self._connecting < self._connections_max:
                self._connecting += 1
                return await self._open(deadline, own_call=True)
            if len(self._waiters) >= CALLS_WAITING_MAX:
                raise Busy("more than CALLS_WAITING_MAX calls wait for an AccMan connection")
            fut = self._loop.create_future()
            self._waiters.append(fut)
            timer = self._loop.call_at(deadline, _expire, fut)
            try:
                conn = await fut
            except BaseException as e:
                # Woken waiters were popped by _wake; a timed-out or cancelled
                # one is still queued.
                try:
                    self._waiters.remove(fut)
                except ValueError:
                    pass
                if isinstance(e, asyncio.TimeoutError):
                    # Nothing was sent: not an unknown outcome, whatever the call.
                    raise Unreachable(f"no AccMan connection free within {self._timeout_s:g} s; "
                                      "the call was not sent") from None
                raise
            finally:
                timer.cancel()
            # A waiter is handed a connection that freed a slot or has just
            # opened, if it still has room (a call that picked it meanwhile
            # may have taken the slot); otherwise it picks again.
            if conn is not None and conn.usable and len(conn.waiting) < PIPELINE_DEPTH_MAX:
                return conn
            conn = self._pick()
            if conn is not None:
                return conn

    async def _open(self, deadline: float, own_call: bool) -> Conn:
        """A new pooled connection (the caller has counted itself in
        `_connecting`; with `own_call` it sends its call on it as this
        returns).  The calls that queued while it was dialled are handed
        all the room beside that call at once, and go out pipelined in one
        write as on an open connection, rather than one per reply.  When
        the dial fails its slot is free again, and a waiting call is woken
        to dial in it: it learns at once whether AccMan can be reached,
        rather than wait out its timeout."""
        try:
            conn = await self._dial(deadline, pooled=True)
        except BaseException:
            self._connecting -= 1
            self._wake()
            raise
        self._connecting -= 1
        self._conns.append(conn)
        self._wake(conn, PIPELINE_DEPTH_MAX - len(conn.waiting) - int(own_call))
        return conn

    async def _dial(self, deadline: float, pooled: bool) -> Conn:
        ep = self._ep
        try:
            # Dialled in the calling task: one cancelled as its connection
            # opens ends cancelled, and sends nothing (accman.deadline).
            async with within(max(deadline - self._loop.time(), 0.001)):
                _, conn = await self._loop.create_connection(
                    lambda: Conn(self, pooled), ep.host, ep.port, ssl=self._ssl,
                    server_hostname=ep.tls_name)
        except asyncio.TimeoutError:
            raise Unreachable(f"cannot connect to AccMan at {ep.where}: timed out") from None
        except OSError as e:
            reason = e.strerror or type(e).__name__
            raise Unreachable(f"cannot connect to AccMan at {ep.where}: {reason}") from None
        if self._closed or not conn.usable:
            self._discard(conn)
        return conn

    def _discard(self, conn: Conn):
        """Raises the error of a connection that is no use as it opens: the
        client closed meanwhile, or the connection died or was refused before
        its first request (its `connection_lost` may already have run).  It
        is never pooled, and nothing was sent on it."""
        conn.usable = False
        if conn.transport is not None:
            conn.transport.close()
        if self._closed:
            raise Unreachable("the client is closed")
        if isinstance(conn.refusal, Busy):
            raise conn.refusal          # AccMan's own: at CONNECTIONS_MAX, or shutting down
        why = f": {conn.refusal.detail}" if conn.refusal is not None else ""
        raise Unreachable(f"AccMan at {self._ep.where} closed the connection as it opened{why}")

    async def _open_spare(self) -> None:
        try:
            await self._open(self._loop.time() + self._timeout_s, own_call=False)
        except AccManError as e:
            log.debug("spare AccMan connection failed: %s", e.detail[:replies.DETAIL_CHARS_MAX])

    def _wake(self, conn=None, calls: int = 1) -> None:
        """Wake the `calls` oldest waiting calls, handing them `conn` if
        given.  A connection is handed out as far as it has room: all of
        it once as it opens (`_open`), then a slot per reply that frees one
        (Conn.data_received), so it is never handed to more waiting calls
        than PIPELINE_DEPTH_MAX allows; each still checks the room as it
        runs (`_acquire`)."""
        while calls > 0 and self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                calls -= 1

    def _wake_all(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)


def _expire(fut) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


__all__ = [
    "AccManClient", "AccManSyncClient", "Entry", "Event", "PastPage", "EventsPage", "ReplyParser",
    # Every error a call raises (CALLING.md, "Errors"), all of accman.errors.
    "AccManError", "NoAccount", "Insufficient", "KeyReused", "Overflow", "TooManyHolds",
    "HoldEnded", "NoHold", "EventsTrimmed", "EventsPageRefused", "EventsOutOfOrder",
    "EventsOverLimit", "EventTypeUnknown", "BadRequest", "Unavailable", "NotApplied", "Busy",
    "ShuttingDown", "Unauthorized", "Forbidden", "UnexpectedReply", "TransportError",
    "Unreachable", "OutcomeUnknown", "CallTimeout", "BadReply", "ProxyUnavailable",
    "RETRIES_MAX", "ACCOUNT_CHARS_MAX", "DETAIL_CHARS_MAX",
    "TIMEOUT_S_DEFAULT", "TIMEOUT_S_MAX", "CONNECTIONS_MAX_DEFAULT", "PIPELINE_DEPTH_MAX",
    "CALLS_WAITING_MAX", "LONG_POLLS_MAX", "RETRIES_DEFAULT", "RETRY_PAUSE_S",
    "RETRY_PAUSE_MAX_S", "IDLE_REUSE_S",
    "REPLY_HEAD_BYTES_MAX", "REPLY_HEADERS_MAX", "REPLY_BODY_BYTES_MAX", "HEAD_CACHE_MAX",
]
