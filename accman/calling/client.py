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

- `Unreachable` (an `Unavailable`): nothing reached the server; nothing was
  applied.  Always safe to retry.
- a server `503` (`Unavailable`, `Busy`): refused, nothing acknowledged.
- `OutcomeUnknown` (and its `CallTimeout`, `BadReply`): the request was sent
  and no complete reply came.  A read can simply be retried.  A mod may or may
  not have been applied: with a `key`, sending it again with the same key
  settles the question without charging twice (the server answers the
  original result); without a key, only the account's `past` can tell.

So the clients retry reads and keyed mods, and retry a keyless mod only when
nothing was sent (`Unreachable`).  Tokens and credentials never appear in
exception messages, reprs or logs.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import ssl as _ssl

from accman.calling import policy, replies
from accman.calling.parser import (HEAD_CACHE_MAX, REPLY_BODY_BYTES_MAX, REPLY_HEAD_BYTES_MAX,
                                   REPLY_HEADERS_MAX, ReplyParser)
from accman.calling.policy import (IDLE_REUSE_S, RETRIES_DEFAULT, RETRY_PAUSE_MAX_S,
                                   RETRY_PAUSE_S, TIMEOUT_S_DEFAULT)
from accman.calling.replies import PastPage
from accman.calling.requests import Endpoint, target_mod, target_past, target_tot
from accman.calling.sync import AccManSyncClient
from accman.errors import (AccManError, BadReply, Busy, CallTimeout, Forbidden, OutcomeUnknown,
                           TransportError, Unauthorized, UnexpectedReply, Unreachable)
from accman.limits import PIPELINE_REQUESTS_MAX
from accman.records import Entry

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


# --- connections -----------------------------------------------------------------
class _Conn(asyncio.Protocol):
    """One keep-alive connection: the futures of its requests in order, the
    bytes gathered this loop turn, the reply parser."""

    def __init__(self, client: "AccManClient"):
        self.client = client
        self.loop = client._loop
        self.transport = None
        self.parser = ReplyParser()
        self.waiting = collections.deque()  # futures, in request order
        self.out = []                       # request bytes not yet written
        self.usable = True                  # takes new requests
        self.idle_since = self.loop.time()

    # asyncio.Protocol
    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        try:
            answered = self.parser.feed(data)
        except BadReply as e:
            self.abort(e)
            return
        waiting = self.waiting
        for reply in answered:
            if not waiting:
                self.abort(BadReply("a reply that no request asked for"))
                return
            fut = waiting.popleft()
            if not fut.done():
                fut.set_result(reply)
            if self.client._waiters and self.usable:
                self.client._wake(self)
            if reply[2]:
                self.usable = False     # the server closes after this reply
        if not waiting:
            self.idle_since = self.loop.time()
            if not self.usable:
                self.transport.close()
        elif not self.usable:
            self.close_if_abandoned()

    def eof_received(self):
        return False                    # close our side too

    def connection_lost(self, exc):
        why = f" ({exc.strerror or type(exc).__name__})" if isinstance(exc, OSError) else ""
        self.usable = False
        self.transport = None
        client = self.client
        try:
            client._conns.remove(self)
        except ValueError:
            pass
        unsent = len(self.out)
        self.out = []
        waiting, self.waiting = self.waiting, collections.deque()
        sent = len(waiting) - unsent
        for i, fut in enumerate(waiting):
            if fut.done():
                continue
            if i < sent:
                fut.set_exception(OutcomeUnknown(
                    f"the connection to AccMan closed before the reply{why}"))
            else:
                fut.set_exception(Unreachable(
                    f"the connection to AccMan closed before the request was sent{why}"))
        client._wake()

    # the client's side
    def send(self, request: bytes, fut) -> None:
        waiting = self.waiting
        waiting.append(fut)
        if len(waiting) == 1:
            # Nothing else in flight here: write at once, sparing a loop turn.
            self.transport.write(request)
            return
        # Pipelining: gather this turn's requests into one write.
        if not self.out:
            self.loop.call_soon(self.flush)
        self.out.append(request)

    def flush(self) -> None:
        out = self.out
        if not out or self.transport is None:
            return
        self.out = []
        self.transport.write(out[0] if len(out) == 1 else b"".join(out))

    def timed_out(self, fut) -> None:
        if fut.done():
            return
        fut.set_exception(CallTimeout(f"no reply from AccMan within {self.client._timeout_s} s"))
        # Replies come in order: everything behind the late one would wait
        # for it.  Take no new requests; close once nobody waits here.
        self.usable = False
        self.close_if_abandoned()

    def close_if_abandoned(self) -> None:
        if self.transport is not None and all(f.done() for f in self.waiting):
            self.transport.close()

    def abort(self, exc: BadReply) -> None:
        self.usable = False
        for fut in self.waiting:
            if not fut.done():
                fut.set_exception(BadReply(exc.detail))     # one instance per caller
        if self.transport is not None:
            self.transport.abort()


class AccManClient:
    """The asyncio client.

    >>> async with AccManClient("http://127.0.0.1:8035", token) as acc:
    ...     tot = await acc.tot("alice")
    ...     tot, seq = await acc.mod("alice", -3, min=0, key="req-81f2-r")
    ...     entries, next = await acc.past("alice", limit=10)     # .account: the public id

    Calls may run concurrently from many tasks; they share up to
    `connections_max` keep-alive connections, pipelining up to
    PIPELINE_DEPTH_MAX calls on each.  Each attempt of a call has
    `timeout_s`; reads and keyed mods are retried up to `retries` times,
    a keyless mod only when nothing was sent (see the module docstring).
    """

    def __init__(self, url: str, token: str | None = None, *,
                 timeout_s: float = TIMEOUT_S_DEFAULT,
                 connections_max: int = CONNECTIONS_MAX_DEFAULT,
                 retries: int = RETRIES_DEFAULT):
        policy.check_settings(timeout_s, retries)
        if not 1 <= connections_max <= CONNECTIONS_MAX:
            raise ValueError(f"connections_max must be 1 to {CONNECTIONS_MAX}")
        self._ep = Endpoint(url, token)
        self._timeout_s = float(timeout_s)
        self._connections_max = connections_max
        self._retries = retries
        self._loop = None
        self._conns: list[_Conn] = []
        self._connecting = 0
        self._waiters = collections.deque()
        self._closed = False
        self._ssl = _ssl.create_default_context() if self._ep.tls else None

    def __repr__(self) -> str:
        return f"<AccManClient {self._ep.where} connections={len(self._conns)}>"

    async def __aenter__(self) -> "AccManClient":
        return self

    async def __aexit__(self, *exc) -> None:
        await self.aclose()

    async def aclose(self) -> None:
        """Close every connection.  Calls in flight fail with
        `OutcomeUnknown`; later calls fail with `Unreachable`."""
        self._closed = True
        for c in list(self._conns):
            c.usable = False
            if c.transport is not None:
                c.transport.close()
        self._wake_all()
        if self._conns:
            await asyncio.sleep(0)      # let connection_lost run

    # --- the three calls ---------------------------------------------------
    async def tot(self, cred: str) -> int:
        """The durable balance.  NoAccount for an unknown credential."""
        req = self._ep.request("GET ", target_tot(cred))
        return await self._call(req, True, replies.tot)

    async def mod(self, cred: str, by: int, min: int | None = None,
                  key: str | None = None) -> tuple:
        """Change the balance by `by`; returns `(tot, seq)` once durable.
        With `min`, applies only if the new balance is >= min, else raises
        Insufficient (with `.tot`).  With `key`, applies at most once."""
        req = self._ep.request("PATCH ", target_mod(cred, by, min, key))
        return await self._call(req, key is not None, replies.mod)

    async def past(self, cred: str, limit: int | None = None,
                   before: int | None = None) -> PastPage:
        """One page of history, newest first.  It unpacks as `(entries,
        next)`, where `next` is the `before` of the following page or None;
        `.account` is the account's public id (None from a server that does
        not send it yet)."""
        req = self._ep.request("GET ", target_past(cred, limit, before))
        return await self._call(req, True, replies.past)

    # --- machinery ---------------------------------------------------------
    async def _call(self, req: bytes, safe: bool, decode):
        attempt = 0
        while True:
            try:
                status, body, _ = await self._attempt(req)
                return decode(status, body)
            except AccManError as e:
                if attempt >= self._retries or self._closed or not policy.retryable(e, safe):
                    raise
                log.debug("AccMan call failed (%s), retry %d", e.code, attempt + 1)
            await asyncio.sleep(policy.pause_s(attempt))
            attempt += 1

    async def _attempt(self, req: bytes) -> tuple:
        """One attempt: the reply's `(status, body, close)`."""
        loop = self._loop
        if loop is None:
            loop = self._loop = asyncio.get_running_loop()
        deadline = loop.time() + self._timeout_s
        conn = self._pick()
        if conn is None:
            conn = await self._acquire(deadline)
        fut = loop.create_future()
        conn.send(req, fut)
        timer = loop.call_at(deadline, conn.timed_out, fut)
        try:
            return await fut
        finally:
            timer.cancel()

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

    async def _acquire(self, deadline: float) -> _Conn:
        while True:
            if len(self._conns) + self._connecting < self._connections_max:
                self._connecting += 1
                return await self._open(deadline)
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
                    raise CallTimeout(
                        f"no AccMan connection free within {self._timeout_s} s") from None
                raise
            finally:
                timer.cancel()
            # A waiter is handed the connection that freed a slot, if it
            # still has one; otherwise it picks again.
            if conn is not None and conn.usable and len(conn.waiting) < PIPELINE_DEPTH_MAX:
                return conn
            conn = self._pick()
            if conn is not None:
                return conn

    async def _open(self, deadline: float) -> _Conn:
        """Connect (the caller has counted itself in `_connecting`)."""
        ep = self._ep
        try:
            try:
                _, conn = await asyncio.wait_for(
                    self._loop.create_connection(lambda: _Conn(self), ep.host, ep.port,
                                                 ssl=self._ssl),
                    max(deadline - self._loop.time(), 0.001))
            except asyncio.TimeoutError:
                raise Unreachable(f"cannot connect to AccMan at {ep.where}: timed out") from None
            except OSError as e:
                reason = e.strerror or type(e).__name__
                raise Unreachable(f"cannot connect to AccMan at {ep.where}: {reason}") from None
        finally:
            self._connecting -= 1
        if self._closed:
            conn.transport.close()
            raise Unreachable("the client is closed")
        self._conns.append(conn)
        self._wake(conn)
        return conn

    async def _open_spare(self) -> None:
        try:
            await self._open(self._loop.time() + self._timeout_s)
        except AccManError as e:
            log.debug("spare AccMan connection failed: %s", e.detail)

    def _wake(self, conn=None) -> None:
        """Wake the oldest waiting call, handing it `conn` if given."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(conn)
                return

    def _wake_all(self) -> None:
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done():
                fut.set_result(None)


def _expire(fut) -> None:
    if not fut.done():
        fut.set_exception(asyncio.TimeoutError())


__all__ = [
    "AccManClient", "AccManSyncClient", "Entry", "PastPage", "ReplyParser",
    "Unauthorized", "Forbidden", "UnexpectedReply", "TransportError",
    "Unreachable", "OutcomeUnknown", "CallTimeout", "BadReply",
    "TIMEOUT_S_DEFAULT", "CONNECTIONS_MAX_DEFAULT", "PIPELINE_DEPTH_MAX",
    "CALLS_WAITING_MAX", "RETRIES_DEFAULT", "RETRY_PAUSE_S", "RETRY_PAUSE_MAX_S", "IDLE_REUSE_S",
    "REPLY_HEAD_BYTES_MAX", "REPLY_HEADERS_MAX", "REPLY_BODY_BYTES_MAX", "HEAD_CACHE_MAX",
]
