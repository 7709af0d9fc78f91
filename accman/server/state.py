"""A connection's state and every transition of it, in one place (h11's
_state.py: everything that affects the state machine lives here).

    OPEN --take_no_more--> DRAINING --nothing owed--> SHUT --client closes--> CLOSED
      '--------------- lost, abort, an internal error --------------------------'

- OPEN: requests are read and answered.
- DRAINING: no request is taken any more (a framing error, `Connection:
  close`, a 401, the head deadline, shutdown); the replies still owed go
  out, then SHUT.  A client's half-close (`eof`) drains the same way; a
  long poll that waits at the head is answered at once (its client has
  left, and its wait may be a minute: its place among the store's bounded
  waiters goes to another).  A lost connection's long poll is ended too.
- SHUT: a FIN follows the last reply, and the connection lingers, reading
  and discarding, until the client closes or LINGER_S passes (nginx's
  lingering close: closing while the client still sends makes the kernel
  reset the connection, and a reset can destroy the reply before it is read).
- CLOSED: the transport is gone.

Whether reading is paused is derived, in `update_reading`, from the
conditions that call for it: the transport's buffer is full, the pipeline is
full or held back, the server is over its buffered-bytes budget and this
connection holds bytes, or the connection drains.  Nothing else pauses or
resumes reading.
"""

from __future__ import annotations

import fcntl
import os
import socket
import struct
import termios

from accman.server._wire import ROUTE_EVENTS, Parser
from accman.server.replies import CLOSE, CONTINUE
from accman.server.routes import Slot

OPEN, DRAINING, SHUT, CLOSED = 0, 1, 2, 3


def _kernel_count(sock, request: int) -> int | None:
    """A count the kernel keeps of socket `sock` (an ioctl); None where it
    cannot say (another system, a socket gone)."""
    try:
        raw = fcntl.ioctl(sock.fileno(), request, b"\0\0\0\0")
    except (AttributeError, OSError, ValueError):
        return None
    return struct.unpack("i", raw)[0]


def unsent_bytes(sock) -> int | None:
    """The bytes sent on `sock` and not yet acknowledged by the peer, a FIN
    counting one (Linux's SIOCOUTQ, which is TIOCOUTQ's number)."""
    return _kernel_count(sock, termios.TIOCOUTQ)


def all_taken(sock) -> bool | None:
    """Whether the peer has acknowledged everything sent on `sock` and
    nothing it sent lies unread (FIONREAD): a close then resets nothing
    already there.  None where the kernel cannot say."""
    unsent, unread = unsent_bytes(sock), _kernel_count(sock, termios.FIONREAD)
    if unsent is None or unread is None:
        return None
    return unsent == 0 and unread == 0


# The bytes a stop looks at of what a client sent and no read has taken:
# enough for the blank lines a request may follow (REQUEST_BLANK_LINES_MAX)
# and the start of its method.
UNREAD_PEEK_BYTES = 64


def unread_request(sock) -> bool | None:
    """Whether the bytes the peer sent on `sock` that no read has taken yet
    begin a request (they are looked at, not taken: MSG_PEEK), and if so
    whether a HEAD, as the connection's own parser would tell: None when
    they do not (none, only blank lines, or the kernel cannot say)."""
    data = _peek(sock)
    if not data:
        return None
    parser = Parser()
    reqs = parser.feed(data)
    if reqs:
        return reqs[0].head
    return parser.pending_head if parser.pending else None


def _peek(sock) -> bytes:
    """Up to UNREAD_PEEK_BYTES of what the peer sent on `sock` and no read
    has taken, left in place; b"" when none (or the kernel cannot say)."""
    try:
        fd = os.dup(sock.fileno())
    except (AttributeError, OSError, ValueError):
        return b""
    try:
        peer = socket.socket(fileno=fd)
    except OSError:
        os.close(fd)
        return b""
    with peer:
        peer.setblocking(False)     # whatever socket.setdefaulttimeout says: never wait
        try:
            return peer.recv(UNREAD_PEEK_BYTES, socket.MSG_PEEK)
        except OSError:             # nothing there (EAGAIN), or the socket is gone
            return b""


class Lifecycle:
    """The transitions, mixed into Connection, whose attributes they use:
    state, eof, read_paused, read_paused_at, write_paused, waiting, backlog,
    parser, head_started_at, continue_queued, transport, server, routes."""

    __slots__ = ()

    def take_no_more(self) -> None:
        """OPEN -> DRAINING: answer what is owed, take nothing new."""
        if self.state == OPEN:
            self.state = DRAINING
            self.backlog = None

    def last_reply(self, reply) -> None:
        """Sends `reply` (a closing one) after every reply still owed."""
        if self.waiting:
            self.waiting.append(Slot(self, 0, CLOSE, reply=reply))
            self.finish([])
        else:
            self.finish([reply])

    def stop(self) -> None:
        """Shutdown: take no new request; answer the one held back or begun
        (if any) with 503, send what is owed, the last of it saying
        `Connection: close` (the client learns that what it sent after was
        not taken), then shut and linger, as any close after a reply does
        (the stop waits for it).  A quiet one (`_quiet`) closes at once,
        or, its last replies still on their way in the kernel or its
        client's bytes unread, as soon as all is taken (the server's stop
        asks, `close_acknowledged`): a client acknowledges late (up to ~40
        ms on Linux, 200 ms elsewhere), and a keep-alive connection just
        used would otherwise hold the stop for LINGER_S.  One draining or
        lingering already goes on."""
        if self.state != OPEN:
            return
        head = self._held_request()
        self.take_no_more()
        if head is not None:
            self.last_reply(self.routes.error(
                "none", 503, "shutting_down", "the server is shutting down; retry on another",
                CLOSE, head=head))
        elif self.waiting:
            self.waiting.close_tail()
            self.finish([])
        elif not self._quiet():
            self.finish([])
        else:
            taken = all_taken(self.transport.get_extra_info("socket"))
            self.shut(linger=not taken)
            if taken is False:
                self.server.acked_waits.add(self)

    def _held_request(self) -> bool | None:
        """The request a stop answers: the first held back, parsed or not
        yet, else one begun and not yet whole (its rest is not read, nor
        asked for: a 100 Continue queued for it is taken back), else one
        the client has sent that no read has taken (`unread_request`).
        Whether it is a HEAD, whose reply has no body (RFC 9112 6.3); None
        when there is none (held bytes that are only blank lines hold no
        request)."""
        if self.backlog is not None:
            reqs, i = self.backlog
            return reqs[i].head
        if self.parser.held_bytes:
            reqs = self.parser.more(1)  # the connection ends: nothing else reads on
            if reqs:
                return reqs[0].head
        if not self.parser.pending:
            return unread_request(self.transport.get_extra_info("socket"))
        self._withdraw_continue()
        return self.parser.pending_head

    def _quiet(self) -> bool:
        """Nothing owed, every reply handed to the kernel, and reading not
        held back: what the kernel still holds either way is its to say
        (`all_taken`)."""
        return not (self.waiting or self.read_paused or self.write_paused
                    or self.transport.get_write_buffer_size())

    def close_acknowledged(self) -> bool:
        """At a stop, a quiet connection lingering while its last replies
        (and its FIN) were on their way, or its client's bytes unread,
        closes once its client's side has everything and the lingering has
        read what came; True once it needs no more asking (closed, or its
        kernel cannot say).  Bytes the client sends after that close meet
        a reset, every reply being on its side by then."""
        if self.state != SHUT:
            return True
        taken = all_taken(self.transport.get_extra_info("socket"))
        if taken:
            self.transport.close()
        return taken is not False

    def _withdraw_continue(self) -> None:
        """A 100 Continue still queued behind earlier replies (the last in
        `waiting` while its request is read) is taken back."""
        waiting = self.waiting
        if self.continue_queued and waiting:
            tail = waiting[-1]
            if tail is not None and tail.reply is CONTINUE:
                waiting.pop()
        self.continue_queued = False

    def peer_eof(self) -> None:
        """The client half-closed: it still gets the replies it is owed."""
        self.eof = True
        if self.state == SHUT:
            self.transport.close()      # lingering after our FIN: the client is done too
        elif self.state != CLOSED:
            self.take_no_more()
            self._end_long_poll()
            self.finish([])

    def _end_long_poll(self) -> None:
        """A long poll waiting at the head is answered now, with what there
        is: nobody is there to hear the events it waits for."""
        head = self.waiting[0] if self.waiting else None
        if head is not None and head.route == ROUTE_EVENTS and head.pending and head.long_poll:
            self.server.store.end_wait(head)

    def owes(self) -> bool:
        """True while a reply is owed or a request is still to be taken."""
        if self.waiting:
            return True
        return self.state == OPEN and (self.backlog is not None or self.parser.held_bytes > 0)

    def shut(self, linger: bool = True) -> None:
        """-> SHUT: FIN after the replies already written, then linger
        (unless told not to, or the client has closed its side)."""
        self.state = SHUT
        self.shut_at = self.server.loop.time()
        transport = self.transport
        if not linger or self.eof or not transport.can_write_eof():
            transport.close()
            return
        transport.write_eof()
        if self.read_paused:
            self.read_paused = False
            transport.resume_reading()

    def lost(self) -> None:
        """The transport is gone (connection_lost)."""
        if self.state != CLOSED:
            self._end_long_poll()
        self.state = CLOSED
        self.backlog = None
        self.waiting.clear()
        self.reserved = 0
        self.server.forget(self)

    def abort(self) -> None:
        """-> CLOSED at once: a client that makes no progress, or shutdown's end."""
        self.lost()
        self.transport.abort()

    def fail(self) -> bool:
        """An internal error on this connection: a 500 is to be sent, then
        it closes.  False when it is closed or shut already."""
        if self.state >= SHUT:
            return False
        self.lost()
        return True

    def update_reading(self) -> None:
        if self.state >= SHUT:
            return
        server = self.server
        pause = (self.state != OPEN or self.write_paused or self.backlog is not None
                 or self.parser.held_bytes > 0 or len(self.waiting) >= self.pipeline_max
                 or (server.over_budget and self.buffered > 0))
        if pause != self.read_paused:
            self.read_paused = pause
            now = server.loop.time()
            if pause:
                self.read_paused_at = now
                self.transport.pause_reading()
                server.paused.add(self)
            else:
                self._head_clock_resumed(now)
                self.transport.resume_reading()
                server.paused.discard(self)

    def _head_clock_resumed(self, now) -> None:
        """The head deadline does not run while the server holds reading
        back (its own back-pressure): a head begun keeps the time it had
        run before the pause, none of the pause counted, and one begun
        meanwhile (its bytes held) starts now."""
        if not self.parser.pending:
            self.head_started_at = 0.0
        elif self.head_started_at:
            self.head_started_at = now - max(0.0, self.read_paused_at - self.head_started_at)
        else:
            self.head_started_at = now
