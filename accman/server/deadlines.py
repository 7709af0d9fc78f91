"""A connection's deadlines, mixed into Connection (whose attributes they
use): the head deadline, the idle time, the time a client that does not
read its replies may take, lingering after a close.  The server's sweep
calls `sweep` about once a second (docs/SERVER.md, "Limits")."""

from __future__ import annotations

from accman.limits import PAUSED_PROGRESS_BYTES_MIN
from accman.server.replies import CLOSE
from accman.server.state import CLOSED, OPEN, SHUT, unsent_bytes


class Deadlines:

    __slots__ = ()

    def sweep(self, now):
        state = self.state
        if state == CLOSED:
            return
        limits = self.server.limits
        self._count_activity(now)
        if self.write_paused:
            # The client stopped reading its replies: a connection that makes
            # no progress for the idle time is dropped.  A slow but steady
            # reader may stay paused for longer (over the budget's rest its
            # high-water mark is 0: Connection._watch_drain).
            left = self.owed_bytes()
            if left > self.write_paused_left:
                self.write_paused_left = left       # replies added: counted from here
            elif self.write_paused_left - left >= min(PAUSED_PROGRESS_BYTES_MIN,
                                                      self.write_paused_left // 4):
                self.write_paused_at, self.write_paused_left = now, left
            if now - self.write_paused_at >= limits.idle_timeout_s:
                self.metrics.idle_closes += 1
                self.abort()
            return
        if state == SHUT:
            # Lingering ends after LINGER_S once the replies are out; a client
            # that never reads them does not keep it past the idle time.
            waited = now - self.shut_at
            if waited >= limits.idle_timeout_s:
                self.abort()
            elif waited >= limits.linger_s and not self.transport.get_write_buffer_size():
                self.transport.close()
            return
        if state == OPEN:               # a draining one ends when its replies are out
            self._sweep_open(now, limits)

    def owed_bytes(self) -> int:
        """The reply bytes its client has not taken: the transport's, and
        the kernel's not yet acknowledged (which a large send buffer may
        hold most of); the transport's alone where the kernel cannot say."""
        unsent = unsent_bytes(self.transport.get_extra_info("socket"))
        return self.transport.get_write_buffer_size() + (unsent or 0)

    def _sweep_open(self, now, limits):
        """An open connection's bounds: held back by the budget, its head's
        deadline, its idle time."""
        if self.read_paused and self.server.over_budget and not self.waiting and self.owes():
            # Held back by SERVER_BUFFER_BYTES_MAX with nothing in flight: a
            # client that has gone is not seen while it is not read, and its
            # held bytes would keep the budget spent for good.  No progress
            # for the idle time: dropped (nothing it holds was taken).
            if now - self.last_active_at >= limits.idle_timeout_s:
                self.metrics.idle_closes += 1
                self.abort()
            elif not self.transport.get_write_buffer_size():
                self.flush()                # its client has read what it was sent: go on
            return
        awaiting = self._awaiting_continue()        # may start the clock
        if self.head_started_at:
            if (not self.read_paused and not awaiting
                    and now - self.head_started_at >= limits.head_timeout_s):
                self._head_timeout()
        elif not self.owes():
            idle_s = limits.idle_timeout_s if self.authed else limits.unauthed_idle_timeout_s
            if now - self.last_active_at >= idle_s:
                self.metrics.idle_closes += 1
                self.take_no_more()
                self.shut()

    def _awaiting_continue(self) -> bool:
        """Whether the request being read asked for a 100 Continue not sent
        yet (owed behind earlier replies, a long poll's among them): its
        client may wait for it to send the body, so the head deadline does
        not run.  Once it is out (nothing queues after it while its request
        is read), the deadline runs from its write (finish), or, written in
        C (Pipeline.__call__), from the sweep that counted the write."""
        if self.continue_owed:
            return True
        if self.continue_queued:
            if self.waiting:
                return True
            self.continue_queued = False
            if self.parser.pending:         # from the 100's write, or a resume after it
                self.head_started_at = max(self.head_started_at, self.last_active_at)
        return False

    def _count_activity(self, now):
        """Reads and writes done in C (Pipeline.quick, a batch's replies)
        read no clock: the sweep that sees them counts them as activity
        now, never early."""
        activity = self.waiting.activity
        if activity != self.activity_seen:
            self.activity_seen = activity
            self.last_active_at = now

    def _head_timeout(self):
        self.metrics.head_timeouts += 1
        self.take_no_more()
        self.last_reply(self.routes.error(
            "none", 408, "timeout",
            f"the request (its head, and the body its Content-Length announces) did not "
            f"arrive whole within HEAD_TIMEOUT_S "
            f"({self.server.limits.head_timeout_s:g} s)", CLOSE,
            head=self.parser.pending_head))
