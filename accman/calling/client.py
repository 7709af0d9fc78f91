"""Clients for the calling servers: `AccManClient` (asyncio) and
`AccManSyncClient` (blocking, for scripts and the CLI).

Both speak HTTP/1.1 to AccMan directly (SPEC "Routes"), with no HTTP
library in between: a request is one preformatted line plus two headers, and
a reply is parsed strictly by `ReplyParser`, which does no I/O (h11's shape:
bytes in, replies or a `BadReply` out).

The async client keeps a small pool of keep-alive connections and pipelines
calls on them (the server answers pipelined requests in order, SPEC), so many
calls can be in flight at once.  Writes made in one loop turn are gathered and
flushed with one `write` (uvloop's habit).

What a failure means for money is in the exception type:

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
import json
import logging
import re
import select
import socket
import ssl as _ssl
import time
from urllib.parse import urlsplit

from accman.errors import (
    AccManError,
    BadRequest,
    Busy,
    Insufficient,
    KeyReused,
    NoAccount,
    Overflow,
    Unavailable,
)
from accman.limits import (
    CRED_CHARS_MAX,
    INT64_MAX,
    INT64_MIN,
    KEY_CHARS_MAX,
    PAST_LIMIT_MAX,
    PIPELINE_REQUESTS_MAX,
    IDLE_TIMEOUT_S,
)
from accman.records import Entry

log = logging.getLogger("accman.client")

# --- the client's own bounds (TigerBeetle: a limit on everything) -----------
# A call, from picking a connection to the parsed reply.  A mod waits for its
# group commit (a few ms); 5 s is far beyond that yet short enough that a hung
# AccMan does not hang the calling service.
TIMEOUT_S_DEFAULT = 5.0
# Keep-alive connections per client.  One connection carries thousands of
# calls a second when pipelined; a few more keep one slow group commit from
# holding up the reads queued behind it.
CONNECTIONS_MAX_DEFAULT = 8
# Requests written on one connection and not yet answered.  Well under the
# server's PIPELINE_REQUESTS_MAX so the server never has to stop reading us.
PIPELINE_DEPTH_MAX = 32
assert PIPELINE_DEPTH_MAX <= PIPELINE_REQUESTS_MAX
# Calls waiting for a free connection slot when every connection is full.
# Beyond it a call fails at once with `Busy` (back-pressure, nothing sent)
# instead of queueing without bound.
CALLS_WAITING_MAX = 4096
# Extra attempts for a retryable call, with doubling pauses from the first.
RETRIES_DEFAULT = 2
RETRY_PAUSE_S = 0.025
RETRY_PAUSE_MAX_S = 1.0
# A connection idle this long is closed instead of reused: well before the
# server's IDLE_TIMEOUT_S, so a request is never written just as the server
# closes the connection (the keep-alive race that turns a keyless mod into
# an unknown outcome).
IDLE_REUSE_S = min(30.0, IDLE_TIMEOUT_S / 2)
# Reply framing.  AccMan's replies have a status line and a handful of
# headers; a /past page of PAST_LIMIT_MAX entries with 64-character keys and
# int64 values is about 200 KiB.
REPLY_HEAD_BYTES_MAX = 8192
REPLY_HEADERS_MAX = 64
REPLY_BODY_BYTES_MAX = 1 << 20


# --- errors the shared hierarchy does not have ------------------------------
class Unauthorized(AccManError):
    """401: the client's token is missing or wrong (a configuration error)."""

    code = "unauthorized"
    status = 401


class Forbidden(AccManError):
    """403: the token's role does not allow this call (for example a
    positive mod without the `mint` role)."""

    code = "forbidden"
    status = 403


class UnexpectedReply(AccManError):
    """A well-framed reply the SPEC does not describe for this call (a 404
    `not_found` or a 405 from a wrong base URL, say).  `status` and `code`
    are the reply's."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.code = code


class TransportError(AccManError):
    """No usable reply came from AccMan.  See the subclasses for what that
    means for a mod."""

    code = "transport"
    status = 503


class Unreachable(TransportError, Unavailable):
    """Nothing reached the server (connection refused, connect timeout, the
    client closed): nothing was applied, any call can be retried."""

    code = "unreachable"


class OutcomeUnknown(TransportError):
    """The request was sent, or may have been, and no complete reply came:
    the connection broke, the reply was malformed, or the call timed out.

    For a mod this is the one case where the caller does not know whether
    the balance changed.  With a `key`, repeat the mod with the same key
    (possibly much later): it applies at most once and answers the result.
    Without a key, read the account's `past` before doing anything else."""

    code = "outcome_unknown"


class CallTimeout(OutcomeUnknown):
    """The call's `timeout_s` passed before the reply."""

    code = "timeout"


class BadReply(OutcomeUnknown):
    """The reply broke HTTP/1.1 framing or the SPEC's JSON shapes.  The
    connection is closed: its framing can no longer be trusted."""

    code = "bad_reply"


# --- the reply parser: bytes in, replies out, no I/O ------------------------
_STATUS_RE = re.compile(rb"HTTP/1\.([01]) ([2-5][0-9][0-9])(?: [\t !-~\x80-\xff]*)?")
_HEADER_RE = re.compile(
    rb"([!#$%&'*+.^_`|~0-9A-Za-z-]+):[ \t]*((?:[!-~\x80-\xff](?:[ \t]*[!-~\x80-\xff])*)?)[ \t]*")


class ReplyParser:
    """Parses a stream of HTTP/1.1 replies.  `feed(data)` returns the replies
    completed by `data`, each a tuple `(status, body, close)`; it raises
    `BadReply` on anything the SPEC's server never sends: a missing or
    repeated Content-Length, Transfer-Encoding, obs-fold, bare CR or LF, a
    1xx, a head or body over its limit, bytes after a closing reply.

    Whole replies are sliced straight out of the bytes received.  A partial
    one waits in a buffer whose scan for the end of the head resumes where
    the last one stopped, and which is copied out only once a reply can be
    complete, so trickled bytes cost linear time (h11's receive buffer)."""

    __slots__ = ("_buf", "_scan", "_head", "_done")

    def __init__(self):
        self._buf = bytearray()
        self._scan = 0
        self._head = None           # (status, length, close) of the reply being read
        self._done = False          # a reply said Connection: close

    def feed(self, data: bytes) -> list:
        if self._done:
            if data:
                raise BadReply("bytes after a reply that closed the connection")
            return []
        buf = self._buf
        if buf:
            buf += data
            head = self._head
            if head is None:
                end = buf.find(b"\r\n\r\n", self._scan)
                if end < 0:
                    if len(buf) > REPLY_HEAD_BYTES_MAX:
                        raise BadReply("reply head over REPLY_HEAD_BYTES_MAX")
                    self._scan = max(0, len(buf) - 3)
                    return []
            elif len(buf) < head[1]:
                return []
            data = bytes(buf)
            buf.clear()
        out = []
        pos = 0
        n = len(data)
        while pos < n:
            head = self._head
            if head is None:
                end = data.find(b"\r\n\r\n", pos)
                if end < 0:
                    break
                if end - pos > REPLY_HEAD_BYTES_MAX:
                    raise BadReply("reply head over REPLY_HEAD_BYTES_MAX")
                head = self._head = _parse_head(data[pos:end])
                pos = end + 4
            length = head[1]
            if n - pos < length:
                break
            out.append((head[0], data[pos:pos + length], head[2]))
            pos += length
            self._head = None
            if head[2]:
                self._done = True
                if pos < n:
                    raise BadReply("bytes after a reply that closed the connection")
                return out
        if pos < n:
            buf += data[pos:] if pos else data
            if self._head is None:
                if len(buf) > REPLY_HEAD_BYTES_MAX:
                    raise BadReply("reply head over REPLY_HEAD_BYTES_MAX")
                self._scan = max(0, len(buf) - 3)
        return out

    @property
    def pending(self) -> bool:
        """True when part of a reply has been read."""
        return bool(self._buf) or self._head is not None


# AccMan sends the same few heads over and over (the status line, the
# content type and a Content-Length of a handful of values): a parsed head is
# remembered by its bytes.  Bounded; cleared when full.
HEAD_CACHE_MAX = 256
_heads: dict = {}


def _parse_head(head: bytes) -> tuple:
    parsed = _heads.get(head)
    if parsed is None:
        parsed = _parse_head_uncached(head)
        if len(_heads) >= HEAD_CACHE_MAX:
            _heads.clear()
        _heads[head] = parsed
    return parsed


def _parse_head_uncached(head: bytes) -> tuple:
    lines = head.split(b"\r\n")
    m = _STATUS_RE.fullmatch(lines[0])
    if m is None:
        raise BadReply("malformed status line")
    if len(lines) - 1 > REPLY_HEADERS_MAX:
        raise BadReply("more than REPLY_HEADERS_MAX reply headers")
    close = m.group(1) == b"0"      # HTTP/1.0 closes unless it says keep-alive
    length = None
    for line in lines[1:]:
        h = _HEADER_RE.fullmatch(line)
        if h is None:
            raise BadReply("malformed reply header line")
        name = h.group(1).lower()
        if name == b"content-length":
            value = h.group(2)
            if length is not None:
                raise BadReply("two Content-Length headers")
            if not value.isdigit() or len(value) > 10:
                raise BadReply("malformed Content-Length")
            length = int(value)
        elif name == b"connection":
            options = {o.strip().lower() for o in h.group(2).split(b",")}
            if b"close" in options:
                close = True
            elif b"keep-alive" in options:
                close = False
        elif name == b"transfer-encoding":
            raise BadReply("Transfer-Encoding in a reply (AccMan sends Content-Length)")
    if length is None:
        raise BadReply("reply without Content-Length")
    if length > REPLY_BODY_BYTES_MAX:
        raise BadReply("reply body over REPLY_BODY_BYTES_MAX")
    return (int(m.group(2)), length, close)


# --- requests: validated locally, so nothing odd ever reaches the wire ------
_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")     # RFC 6750 b64token


def _check_name(value, what: str, chars_max: int) -> str:
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str")
    if not 1 <= len(value) <= chars_max or _NAME_RE.fullmatch(value) is None:
        # The value is never echoed: it may be a live credential.
        raise BadRequest(f"{what} must be 1 to {chars_max} characters from A-Z a-z 0-9 _ -")
    return value


def _check_int(value, what: str, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int")
    if not low <= value <= high:
        raise BadRequest(f"{what} must be between {low} and {high}")
    return value


def _target_tot(cred) -> str:
    return "/tot?cred=" + _check_name(cred, "cred", CRED_CHARS_MAX)


def _target_mod(cred, by, min, key) -> str:
    target = "/mod?cred=" + _check_name(cred, "cred", CRED_CHARS_MAX)
    if _check_int(by, "by") == 0:
        raise BadRequest("by must not be 0")
    target += f"&by={by}"
    if min is not None:
        target += f"&min={_check_int(min, 'min')}"
    if key is not None:
        target += "&key=" + _check_name(key, "key", KEY_CHARS_MAX)
    return target


def _target_past(cred, limit, before) -> str:
    target = "/past?cred=" + _check_name(cred, "cred", CRED_CHARS_MAX)
    if limit is not None:
        target += f"&limit={_check_int(limit, 'limit', 1, PAST_LIMIT_MAX)}"
    if before is not None:
        target += f"&before={_check_int(before, 'before', 1)}"
    return target


class _Endpoint:
    """The parsed base URL and the constant tail of every request."""

    def __init__(self, url: str, token: str | None):
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError("the AccMan url must start with http:// or https://")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("the AccMan url takes no query, fragment or userinfo")
        if not parts.hostname:
            raise ValueError("the AccMan url has no host")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        self.port = parts.port or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        if self.prefix and _PREFIX_RE.fullmatch(self.prefix) is None:
            raise ValueError("the AccMan url path must be plain ASCII segments")
        host = f"[{self.host}]" if ":" in self.host else self.host
        if parts.port is not None:
            host += f":{self.port}"
        self.where = f"{parts.scheme}://{host}{self.prefix}"      # for messages: no token
        tail = f" HTTP/1.1\r\nHost: {host}\r\n"
        if token is not None:
            if not isinstance(token, str) or _TOKEN_RE.fullmatch(token) is None:
                raise ValueError("the token must be a non-empty RFC 6750 b64token")
            tail += f"Authorization: Bearer {token}\r\n"
        self.tail = tail + "\r\n"

    def request(self, method: str, target: str) -> bytes:
        return (method + self.prefix + target + self.tail).encode("ascii")


_PREFIX_RE = re.compile(r"(/[A-Za-z0-9._~-]+)+")


# --- replies: status and JSON to results or typed errors --------------------
def _json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadReply("reply body is not JSON") from None


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _ok(status: int, body: bytes) -> dict:
    """The JSON object of a 200, or the typed error of anything else."""
    if status == 200:
        obj = _json(body)
        if not isinstance(obj, dict):
            raise BadReply("reply body is not a JSON object")
        return obj
    raise _error(status, body)


def _error(status: int, body: bytes) -> AccManError:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        obj = None
    if not isinstance(obj, dict):
        obj = {}
    code = obj.get("error") if isinstance(obj.get("error"), str) else ""
    detail = obj.get("detail") if isinstance(obj.get("detail"), str) else ""
    detail = detail[:200] or f"AccMan answered {status} {code}".rstrip()
    if status == 409:
        if code == "insufficient":
            tot = obj.get("tot")
            if not _is_int(tot):
                return BadReply("409 insufficient without an integer tot")
            return Insufficient(tot, detail)
        if code == "key_reused":
            return KeyReused(detail)
        if code == "overflow":
            return Overflow(detail)
    elif status == 404 and code == "no_account":
        return NoAccount(detail)
    elif status == 401:
        return Unauthorized(detail)
    elif status == 403:
        return Forbidden(detail)
    elif status == 503:
        return Busy(detail) if code == "busy" else Unavailable(detail)
    elif status in (400, 413, 414, 431):
        e = BadRequest(detail)
        e.status = status
        if code:
            e.code = code
        return e
    elif status >= 500 and status not in (501, 505):
        # A 500/502/504 comes from a proxy or a crash: the mod may have applied.
        return OutcomeUnknown(f"AccMan (or a proxy) answered {status}")
    return UnexpectedReply(status, code or "unexpected", detail)


# The two replies of the hot path, in the compact form AccMan writes them,
# are read without the JSON decoder; anything else goes through json.
_TOT_RE = re.compile(rb'\{"tot":(-?(?:0|[1-9][0-9]{0,18}))\}')
_MOD_RE = re.compile(rb'\{"tot":(-?(?:0|[1-9][0-9]{0,18})),"seq":([1-9][0-9]{0,18})\}')


def _tot(status: int, body: bytes, *_) -> int:
    if status == 200:
        m = _TOT_RE.fullmatch(body)
        if m is not None:
            return int(m.group(1))
    tot = _ok(status, body).get("tot")
    if not _is_int(tot):
        raise BadReply("/tot reply without an integer tot")
    return tot


def _mod(status: int, body: bytes, *_) -> tuple:
    if status == 200:
        m = _MOD_RE.fullmatch(body)
        if m is not None:
            return int(m.group(1)), int(m.group(2))
    obj = _ok(status, body)
    tot, seq = obj.get("tot"), obj.get("seq")
    if not (_is_int(tot) and _is_int(seq)):
        raise BadReply("/mod reply without integer tot and seq")
    return tot, seq


def _past(status: int, body: bytes, *_) -> tuple:
    obj = _ok(status, body)
    past, nxt = obj.get("past"), obj.get("next")
    if not isinstance(past, list) or not (nxt is None or _is_int(nxt)):
        raise BadReply("/past reply without a past list and a next")
    entries = []
    for e in past:
        if not isinstance(e, dict):
            raise BadReply("/past entry is not an object")
        seq, by, tot, at, key = e.get("seq"), e.get("by"), e.get("tot"), e.get("at"), e.get("key")
        if not (_is_int(seq) and _is_int(by) and _is_int(tot) and _is_int(at)
                and (key is None or isinstance(key, str))):
            raise BadReply("/past entry without integer seq, by, tot, at and a key")
        entries.append(Entry(seq, by, tot, at, key))
    return entries, nxt


def _retryable(exc: BaseException, safe: bool) -> bool:
    """Whether a failed attempt may be repeated.  `safe` is true for reads
    and keyed mods: repeating them never changes a balance twice."""
    if isinstance(exc, (Unreachable, Busy)):
        return True             # nothing was sent, or the server refused before applying
    if isinstance(exc, (OutcomeUnknown, Unavailable)):
        return safe
    return False


def _pause_s(attempt: int) -> float:
    return min(RETRY_PAUSE_S * (2 ** attempt), RETRY_PAUSE_MAX_S)


# --- the async client -------------------------------------------------------
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
            replies = self.parser.feed(data)
        except BadReply as e:
            self.abort(e)
            return
        waiting = self.waiting
        for reply in replies:
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
                fut.set_exception(OutcomeUnknown("the connection to AccMan closed before the reply"))
            else:
                fut.set_exception(Unreachable("the connection to AccMan closed before the request was sent"))
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
    ...     entries, next = await acc.past("alice", limit=10)

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
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if not 1 <= connections_max <= 1024:
            raise ValueError("connections_max must be 1 to 1024")
        if not 0 <= retries <= 10:
            raise ValueError("retries must be 0 to 10")
        self._ep = _Endpoint(url, token)
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
        req = self._ep.request("GET ", _target_tot(cred))
        return await self._call(req, True, _tot)

    async def mod(self, cred: str, by: int, min: int | None = None,
                  key: str | None = None) -> tuple:
        """Change the balance by `by`; returns `(tot, seq)` once durable.
        With `min`, applies only if the new balance is >= min, else raises
        Insufficient (with `.tot`).  With `key`, applies at most once."""
        req = self._ep.request("PATCH ", _target_mod(cred, by, min, key))
        return await self._call(req, key is not None, _mod)

    async def past(self, cred: str, limit: int | None = None,
                   before: int | None = None) -> tuple:
        """One page of history, newest first: `(entries, next)`, where
        `next` is the `before` of the following page or None."""
        req = self._ep.request("GET ", _target_past(cred, limit, before))
        return await self._call(req, True, _past)

    # --- machinery ---------------------------------------------------------
    async def _call(self, req: bytes, safe: bool, decode):
        attempt = 0
        while True:
            try:
                return decode(*await self._attempt(req))
            except AccManError as e:
                if attempt >= self._retries or self._closed or not _retryable(e, safe):
                    raise
                log.debug("AccMan call failed (%s), retry %d", e.code, attempt + 1)
            await asyncio.sleep(_pause_s(attempt))
            attempt += 1

    async def _attempt(self, req: bytes) -> tuple:
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
                if now - c.idle_since > IDLE_REUSE_S:
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
                    raise CallTimeout(f"no AccMan connection free within {self._timeout_s} s") from None
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


# --- the blocking client ----------------------------------------------------
class AccManSyncClient:
    """The blocking client, for scripts and the CLI: one keep-alive
    connection, one call at a time (use one client per thread).  The same
    methods, errors and retry rules as `AccManClient`.

    >>> with AccManSyncClient("http://127.0.0.1:8035", token) as acc:
    ...     acc.mod("alice", 1000, key="fund-2024-07-alice")
    """

    def __init__(self, url: str, token: str | None = None, *,
                 timeout_s: float = TIMEOUT_S_DEFAULT,
                 retries: int = RETRIES_DEFAULT):
        if not timeout_s > 0:
            raise ValueError("timeout_s must be positive")
        if not 0 <= retries <= 10:
            raise ValueError("retries must be 0 to 10")
        self._ep = _Endpoint(url, token)
        self._timeout_s = float(timeout_s)
        self._retries = retries
        self._sock = None
        self._parser = None
        self._idle_since = 0.0
        self._closed = False
        self._ssl = _ssl.create_default_context() if self._ep.tls else None

    def __repr__(self) -> str:
        return f"<AccManSyncClient {self._ep.where}>"

    def __enter__(self) -> "AccManSyncClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    def close(self) -> None:
        self._closed = True
        self._drop()

    def tot(self, cred: str) -> int:
        return self._call(self._ep.request("GET ", _target_tot(cred)), True, _tot)

    def mod(self, cred: str, by: int, min: int | None = None, key: str | None = None) -> tuple:
        req = self._ep.request("PATCH ", _target_mod(cred, by, min, key))
        return self._call(req, key is not None, _mod)

    def past(self, cred: str, limit: int | None = None, before: int | None = None) -> tuple:
        return self._call(self._ep.request("GET ", _target_past(cred, limit, before)), True, _past)

    def _call(self, req: bytes, safe: bool, decode):
        attempt = 0
        while True:
            try:
                return decode(*self._attempt(req))
            except AccManError as e:
                if attempt >= self._retries or self._closed or not _retryable(e, safe):
                    raise
                log.debug("AccMan call failed (%s), retry %d", e.code, attempt + 1)
            time.sleep(_pause_s(attempt))
            attempt += 1

    def _attempt(self, req: bytes) -> tuple:
        if self._closed:
            raise Unreachable("the client is closed")
        deadline = time.monotonic() + self._timeout_s
        sock = self._ready(deadline)
        try:
            sock.settimeout(max(deadline - time.monotonic(), 0.001))
            sock.sendall(req)
            while True:
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise socket.timeout
                sock.settimeout(remaining)
                data = sock.recv(65536)
                if not data:
                    raise OutcomeUnknown("the connection to AccMan closed before the reply")
                replies = self._parser.feed(data)
                if replies:
                    break
        except socket.timeout:
            self._drop()
            raise CallTimeout(f"no reply from AccMan within {self._timeout_s} s") from None
        except OSError:
            self._drop()
            raise OutcomeUnknown("the connection to AccMan broke before the reply") from None
        except AccManError:
            self._drop()
            raise
        if len(replies) > 1 or self._parser.pending:
            self._drop()
            raise BadReply("a reply that no request asked for")
        status, body, close = replies[0]
        if close:
            self._drop()
        else:
            self._idle_since = time.monotonic()
        return status, body

    def _ready(self, deadline: float):
        """The open connection, or a new one when there is none, it idled too
        long, or the server has closed it (checked before writing, so a
        keyless mod is not sent into a connection that is already gone)."""
        sock = self._sock
        if sock is not None:
            if time.monotonic() - self._idle_since > IDLE_REUSE_S or _peer_closed(sock):
                self._drop()
                sock = None
        if sock is None:
            ep = self._ep
            try:
                sock = socket.create_connection((ep.host, ep.port),
                                                timeout=max(deadline - time.monotonic(), 0.001))
                sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
                if self._ssl is not None:
                    sock = self._ssl.wrap_socket(sock, server_hostname=ep.host)
            except OSError as e:
                reason = "timed out" if isinstance(e, socket.timeout) else (e.strerror or type(e).__name__)
                raise Unreachable(f"cannot connect to AccMan at {ep.where}: {reason}") from None
            self._sock = sock
            self._parser = ReplyParser()
        return sock

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


def _peer_closed(sock) -> bool:
    """True if an idle keep-alive socket is readable: with nothing owed,
    that is the server's close (or junk); either way, do not reuse it."""
    try:
        poller = select.poll()          # not select(): fds past FD_SETSIZE are fine
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


__all__ = [
    "AccManClient", "AccManSyncClient", "Entry", "ReplyParser",
    "Unauthorized", "Forbidden", "UnexpectedReply", "TransportError",
    "Unreachable", "OutcomeUnknown", "CallTimeout", "BadReply",
    "TIMEOUT_S_DEFAULT", "CONNECTIONS_MAX_DEFAULT", "PIPELINE_DEPTH_MAX",
    "CALLS_WAITING_MAX", "RETRIES_DEFAULT", "IDLE_REUSE_S",
    "REPLY_HEAD_BYTES_MAX", "REPLY_HEADERS_MAX", "REPLY_BODY_BYTES_MAX",
]
