"""One keep-alive connection of `AccManClient` (accman.calling.client): an
asyncio protocol that writes requests, gathering the writes of one loop
turn (uvloop's habit), and hands each reply from `ReplyParser` to the
future of its request, in order.

A reply that closes the connection ends it for the requests behind it too:
the server processes nothing after it (RFC 9112 §9.6), so they are failed
at once as never processed, not left to the close as unknown outcomes."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from accman.calling import replies
from accman.calling.parser import ReplyParser
from accman.errors import BadReply, CallTimeout, OutcomeUnknown, Unreachable

if TYPE_CHECKING:
    from accman.calling.client import AccManClient


class Conn(asyncio.Protocol):
    """One keep-alive connection: the futures of its requests in order, the
    bytes gathered this loop turn, the reply parser."""

    def __init__(self, client: "AccManClient", pooled: bool = True):
        self.client = client
        self.loop = client._loop
        self.pooled = pooled                # in the pool, or a long poll's own
        self.transport = None
        self.parser = ReplyParser()
        self.waiting = collections.deque()  # futures, in request order
        self.out = []                       # request bytes not yet written
        self.usable = True                  # takes new requests
        self.idle_since = self.loop.time()
        self.refusal = None                 # the server's 503 as it opened, if any

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
                self._unasked(reply)
                return
            fut = waiting.popleft()
            if not fut.done():
                fut.set_result(reply)
            if reply[2]:
                self._closing_reply(reply)
                return
            if self.client._waiters and self.usable and self.pooled:
                self.client._wake(self)
        if not waiting:
            self.idle_since = self.loop.time()
            if not self.usable:
                self.transport.close()
        elif not self.usable:
            self.close_if_abandoned()

    def _unasked(self, reply) -> None:
        """A reply with no request waiting for it.  A closing 503 is the
        server refusing the connection as it opens (a full server answers
        `503 busy` and closes, SPEC "Limits"): it is kept as the error of
        the call that dialled.  Anything else means the connection is out
        of step with its requests."""
        status, body, close = reply
        if close and status == 503:
            self.usable = False
            self.refusal = replies.error(status, body)
            self.transport.close()
        else:
            self.abort(BadReply("a reply that no request asked for"))

    def _closing_reply(self, reply) -> None:
        """The server closes after `reply` and processes no request behind
        it (RFC 9112 §9.6; AccMan takes no more once it has decided to
        close).  Those calls were not applied: a 401 would be theirs too
        (one client, one token), so they get it; any other may be sent
        again as a call that was never sent (`Unreachable`)."""
        self.usable = False
        self.out = []
        waiting, self.waiting = self.waiting, collections.deque()
        status, body, _ = reply
        for fut in waiting:
            if not fut.done():
                fut.set_exception(replies.error(status, body) if status == 401 else Unreachable(
                    f"AccMan closed the connection after the reply to an earlier request "
                    f"({status}) and did not process this one"))
        self.transport.close()

    def eof_received(self):
        self.usable = False             # the server is closing: write nothing more
        return False                    # close our side too

    def connection_lost(self, exc):
        why = f" ({exc.strerror or type(exc).__name__})" if isinstance(exc, OSError) else ""
        self.usable = False
        self.transport = None
        client = self.client
        try:
            (client._conns if self.pooled else client._polls).remove(self)
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
        transport = self.transport
        if not self.usable or transport is None or transport.is_closing():
            # A write into a closing transport is dropped: nothing would be
            # sent, and the close would report the call as an unknown outcome.
            raise Unreachable("the connection to AccMan closed before the request was sent")
        waiting = self.waiting
        waiting.append(fut)
        if len(waiting) == 1:
            # Nothing else in flight here: write at once, sparing a loop turn.
            transport.write(request)
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

    def timed_out(self, fut, timeout_s: float) -> None:
        if fut.done():
            return
        fut.set_exception(CallTimeout(f"no reply from AccMan within {timeout_s:g} s"))
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


__all__ = ["Conn"]
