"""`AccManSyncClient`: the blocking client, for scripts and the `accman`
command line.  The same calls, errors and retry rules as `AccManClient`
(accman.calling.client), over one keep-alive socket.

Replies on the socket come in request order and carry nothing that names
their request, so two calls on it at once would take each other's
replies (another account's balance; an applied mod read as refused).
Calls from several threads therefore take turns on it: each attempt holds
the client's lock from its write to its reply.

A child made by fork() starts with a lock of its own and no connection:
the parent's socket would carry both processes' requests and cross their
replies, and a lock another thread held at the fork would never be
released in the child."""

from __future__ import annotations

import logging
import os
import select
import socket
import ssl as _ssl
import threading
import time
import weakref

from accman.calling import policy, replies
from accman.calling.parser import ReplyParser
from accman.calling.requests import (Endpoint, check_ssl_context, target_events, target_hold,
                                     target_mod, target_past, target_settle, target_tot)
from accman.errors import AccManError, BadReply, CallTimeout, OutcomeUnknown, Unreachable

log = logging.getLogger("accman.client")

RECV_BYTES = 65536          # one read from the socket

# Every open client, for the fork handler (weak: a client leaves when dropped).
_CLIENTS = weakref.WeakSet()


class AccManSyncClient:
    """The blocking client: one keep-alive connection, one call at a time.
    Threads may share it: their calls take turns, each attempt still
    bounded by `timeout_s` from the moment it asks for its turn.
    `ssl_context` as for AccManClient.

    >>> with AccManSyncClient("http://127.0.0.1:8035", token) as acc:
    ...     acc.mod("alice", 1000, key="fund-2024-07-alice")
    """

    def __init__(self, url: str, token: str | None = None, *,
                 timeout_s: float = policy.TIMEOUT_S_DEFAULT,
                 retries: int = policy.RETRIES_DEFAULT,
                 ssl_context: _ssl.SSLContext | None = None):
        policy.check_settings(timeout_s, retries)
        self._ep = Endpoint(url, token)
        check_ssl_context(ssl_context, self._ep)
        self._timeout_s = float(timeout_s)
        self._retries = retries
        self._sock = None
        self._parser = None
        self._idle_since = 0.0
        self._closed = False
        self._ssl = (ssl_context or _ssl.create_default_context()) if self._ep.tls else None
        # One attempt at a time on the socket.  An RLock knows its owner:
        # `_attempt` releases it exactly when this thread holds it.
        self._turn = threading.RLock()
        _CLIENTS.add(self)

    def __repr__(self) -> str:
        return f"<AccManSyncClient {self._ep.where}>"

    def __enter__(self) -> "AccManSyncClient":
        return self

    def __exit__(self, *exc) -> None:
        self.close()

    @property
    def where(self) -> str:
        """The server's URL, for messages (never the token)."""
        return self._ep.where

    def close(self) -> None:
        self._closed = True
        self._drop()

    def tot(self, cred: str) -> int:
        """The durable balance.  NoAccount for an unknown credential."""
        return self._call(self._ep.request("GET ", target_tot(cred)), True, replies.tot)

    def mod(self, cred: str, by: int, min: int | None = None, key: str | None = None,
            low: int | None = None) -> tuple:
        """`(tot, seq)` once durable; see AccManClient.mod."""
        req = self._ep.request("PATCH ", target_mod(cred, by, min, key, low))
        return self._call(req, key is not None, replies.mod)

    def hold(self, cred: str, by: int, ttl_s: int, min: int | None = None,
             key: str | None = None) -> tuple:
        """`(hold, tot, seq)` once durable; see AccManClient.hold."""
        req = self._ep.request("PATCH ", target_hold(cred, by, ttl_s, min, key))
        return self._call(req, key is not None, replies.hold)

    def settle(self, cred: str, hold: int, use: int) -> tuple:
        """`(tot, seq)` once durable; see AccManClient.settle."""
        req = self._ep.request("PATCH ", target_settle(cred, hold, use))
        return self._call(req, True, replies.settle)

    def events(self, after: int = 0, limit: int | None = None,
               wait_s: int | None = None) -> replies.EventsPage:
        """`(events, next)`; see AccManClient.events.  With `wait_s`, the
        attempt's timeout is `timeout_s + wait_s`."""
        req = self._ep.request("GET ", target_events(after, limit, wait_s))
        return self._call(req, True, replies.events(after, limit), wait_s or 0)

    def past(self, cred: str, limit: int | None = None,
             before: int | None = None) -> replies.PastPage:
        """One page of history; see AccManClient.past."""
        req = self._ep.request("GET ", target_past(cred, limit, before))
        return self._call(req, True, replies.past)

    def _call(self, req: bytes, safe: bool, decode, wait_s: int = 0):
        attempts = policy.Attempts(safe, self._retries, read=req.startswith(b"GET "))
        while True:
            try:
                return decode(*self._attempt(req, self._timeout_s + wait_s))
            except AccManError as e:
                replies.unechoed(e, req)    # a reply may quote the request: never its secrets
                ending = attempts.failed(e, self._closed)
                if ending is e:
                    raise
                if ending is not None:
                    raise ending from e
                log.debug("AccMan call failed (%s), retry %d", e.code, attempts.made)
            time.sleep(attempts.pause_s())

    def _attempt(self, req: bytes, timeout_s: float) -> tuple:
        """One attempt, in this thread's turn on the socket: a call that
        does not get it within `timeout_s` was never sent (`Unreachable`,
        as for the async client's calls that find no connection free)."""
        deadline = time.monotonic() + timeout_s
        turn = self._turn
        if turn._is_owned():
            # A call made inside this thread's own call (a signal handler):
            # it would write into the middle of that call's exchange.
            raise Unreachable("a call made during another call of the same thread; "
                              "this call was not sent")
        try:
            if not turn.acquire(timeout=timeout_s):
                raise Unreachable(f"another thread's call held the AccMan connection for "
                                  f"{timeout_s:g} s; this call was not sent")
            return self._attempt_in_turn(req, timeout_s, deadline)
        finally:
            # The lock's own record, not a flag set after acquire: an
            # interrupt (^C) raised as acquire returns would leave a flag
            # unset and the lock held for good.
            if turn._is_owned():
                turn.release()

    def _attempt_in_turn(self, req: bytes, timeout_s: float, deadline: float) -> tuple:
        if self._closed:
            raise Unreachable("the client is closed")
        sock = self._ready(deadline)
        try:
            replies_read = self._exchange(sock, req, deadline)
        except socket.timeout:
            self._drop()
            raise CallTimeout(f"no reply from AccMan within {timeout_s:g} s") from None
        except OSError:
            self._drop()
            raise OutcomeUnknown("the connection to AccMan broke before the reply") from None
        except BaseException:
            # An AccManError, or an interrupt (^C): a reply may still come
            # on this socket, and would be taken for the next call's.
            self._drop()
            raise
        if len(replies_read) > 1 or self._parser.pending:
            self._drop()
            raise BadReply("a reply that no request asked for")
        status, body, close = replies_read[0]
        if close:
            self._drop()
        else:
            self._idle_since = time.monotonic()
        return status, body

    def _exchange(self, sock, req: bytes, deadline: float) -> list:
        """Sends `req` and reads until a reply is complete."""
        sock.settimeout(max(deadline - time.monotonic(), 0.001))
        sock.sendall(req)
        while True:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                raise socket.timeout
            sock.settimeout(remaining)
            data = sock.recv(RECV_BYTES)
            if not data:
                raise OutcomeUnknown("the connection to AccMan closed before the reply")
            replies_read = self._parser.feed(data)
            if replies_read:
                return replies_read

    def _ready(self, deadline: float):
        """The open connection, or a new one when there is none, it idled too
        long, or the server has closed it (checked before writing, so a
        keyless mod is not sent into a connection that is already gone)."""
        sock = self._sock
        if sock is not None:
            if time.monotonic() - self._idle_since > policy.IDLE_REUSE_S or _peer_closed(sock):
                self._drop()
                sock = None
        if sock is None:
            sock = self._sock = self._connect(deadline)
            self._parser = ReplyParser()
        return sock

    def _connect(self, deadline: float):
        ep = self._ep
        sock = None
        try:
            sock = socket.create_connection((ep.host, ep.port),
                                            timeout=max(deadline - time.monotonic(), 0.001))
            sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
            if self._ssl is not None:
                sock = self._ssl.wrap_socket(sock, server_hostname=ep.tls_name)
        except OSError as e:
            if sock is not None:
                sock.close()
            reason = "timed out" if isinstance(e, socket.timeout) else (
                e.strerror or type(e).__name__)
            raise Unreachable(f"cannot connect to AccMan at {ep.where}: {reason}") from None
        return sock

    def _forked(self) -> None:
        """In a child after fork(): a fresh lock and no connection.  The
        child's copy of the socket is closed, not shut down: shutdown()
        would end the connection for the parent too, close() lets go of
        this process's descriptor only."""
        self._turn = threading.RLock()
        sock, self._sock, self._parser = self._sock, None, None
        if sock is not None:
            try:
                sock.close()
            except OSError:
                pass

    def _drop(self) -> None:
        if self._sock is not None:
            try:
                self._sock.close()
            except OSError:
                pass
            self._sock = None


def _after_fork_in_child() -> None:
    for client in list(_CLIENTS):
        client._forked()


if hasattr(os, "register_at_fork"):         # not on every platform (Windows)
    os.register_at_fork(after_in_child=_after_fork_in_child)


def _peer_closed(sock) -> bool:
    """True if an idle keep-alive socket is readable: with nothing owed,
    that is the server's close (or junk); either way, do not reuse it."""
    try:
        poller = select.poll()          # not select(): fds past FD_SETSIZE are fine
        poller.register(sock, select.POLLIN)
        return bool(poller.poll(0))
    except (OSError, ValueError):
        return True


__all__ = ["AccManSyncClient"]
