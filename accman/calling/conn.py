"""One keep-alive connection of `AccManClient` (accman.calling.client): an
asyncio protocol that writes requests, gathering the writes of one loop
turn (uvloop's habit), and hands each reply from `ReplyParser` to the
future of its request, in order.

A reply that closes the connection ends it for the requests behind it too.
Whether they were processed depends on the reply (`untaken_behind`): after
AccMan's, which it gives before taking anything more on that connection,
they were not, and are failed at once as never processed; after any other
(a 500 from a server bug, a proxy's reply) each one that was written may
have been, and is an unknown outcome."""

from __future__ import annotations

import asyncio
import collections
from typing import TYPE_CHECKING

from accman.calling import replies
from accman.calling.parser import ReplyParser
from accman.errors import BadReply, CallTimeout, OutcomeUnknown, Unreachable

if TYPE_CHECKING:
    from accman.calling.client import AccManClient

# AccMan takes no request after a reply that closes its connection (RFC
# 9112 9.6: it calls `take_no_more` before the next one is taken, or takes
# none at all; a stop marks the last reply it owes, Lifecycle.stop), but
# for its 500: on an internal error it answers 500 and closes
# (Server.internal_error) after requests behind it may already have gone
# to the store.  So a closing reply of AccMan's with one of the statuses
# it gives, 500 aside, leaves the requests behind it untaken: a 200 with
# the JSON of one of its successes (a `tot`, a `past`, an `events` or a
# `healthy`, and no `error`), or an error with AccMan's shape (SPEC
# "Errors": its code and a `detail`; replies._own_error).  Any other may
# come from another server on the way (a proxy's 502 or 504, a page
# without AccMan's shape, whatever its code), which may have sent the
# requests behind it on.
UNTAKEN_BEHIND_ERROR = frozenset({
    400, 401, 403, 404, 405, 408, 409, 410, 411, 413, 414, 431, 501, 503, 505,
})
_SUCCESS_FIELDS = ("tot", "past", "events", "healthy")


def untaken_behind(status: int, body: bytes) -> bool:
    """Whether AccMan took none of the requests behind this closing reply."""
    obj = replies._error_object(body)
    if status == 200:
        return "error" not in obj and any(f in obj for f in _SUCCESS_FIELDS)
    return status in UNTAKEN_BEHIND_ERROR and replies._own_error(obj)


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
        """The server closes after `reply`.  Behind AccMan's 401 every call
        gets it: it would be theirs too (one client, one token).  Otherwise
        a call never written was not sent (`Unreachable`), and one written
        was not processed when the reply is AccMan's (`untaken_behind`), so
        it may be sent again as a call never sent (`Unreachable`); behind
        any other closing reply it may have been applied
        (`OutcomeUnknown`)."""
        self.usable = False
        unsent = len(self.out)
        self.out = []
        waiting, self.waiting = self.waiting, collections.deque()
        sent = len(waiting) - unsent
        status, body, _ = reply
        untaken = untaken_behind(status, body)
        for i, fut in enumerate(waiting):
            if fut.done():
                continue
            if status == 401 and untaken:
                fut.set_exception(replies.error(status, body))
            elif i >= sent:
                fut.set_exception(Unreachable(
                    "AccMan closed the connection before the request was sent"))
            elif untaken:
                fut.set_exception(Unreachable(
                    f"AccMan closed the connection after the reply to an earlier request "
                    f"({status}) and did not process this one"))
            else:
                fut.set_exception(OutcomeUnknown(
                    f"AccMan closed the connection after a {status} reply to an earlier "
                    f"request; this one was sent and may have been processed"))
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
