"""The changes the ledger makes by itself, on the writer thread: holds
past their expiry ended, events past the retention trimmed; and
`expire_due`, the same for holds, done at once by a caller."""

from __future__ import annotations

import logging
import time

from accman.errors import Unavailable
from accman.ledger.gate import FAILED_DETAIL

log = logging.getLogger("accman.commit")

# After a wrong reading of a test's clock the writer reads it again this
# much later (or at the next batch), to find due holds once it reads right.
CLOCK_RETRY_S = 1.0


class Housekeeping:
    """Mixed into accman.ledger.commit.Committer, whose lock, book, events,
    clock and batch state these use."""

    def _housekeep(self):
        """Under the lock, on the writer thread: the changes the ledger makes
        by itself go into the filling batch (holds past their expiry, events
        past the retention).  Returns how long the writer may sleep."""
        book = self.book
        if book.failed or self._closing:
            return None
        try:
            now_ms = self.clock_ms()
        except ValueError as e:
            # A test's clock (Ledger's clock_ms) read wrong: nothing is due
            # by it, and the writer goes on writing what callers submit.
            if not self._clock_refused:
                log.error("holds do not expire and events are not trimmed while %s", e)
                self._clock_refused = True
            return CLOCK_RETRY_S
        if self._clock_refused:
            log.warning("clock_ms reads right again: holds expire and events are trimmed")
            self._clock_refused = False
        if book.expire_due(now_ms, book.batch_mods_max):
            self._seal_now = True
        if self.events is not None and time.monotonic() >= self._trim_at:
            trimmed, more = self.events.past_retention(now_ms)
            # A full pass leaves more behind: the next one follows this
            # batch, so that trimming keeps up with any rate of events.
            self._trim_at = time.monotonic() + (0.0 if more else self._trim_interval_s)
            for key in trimmed:
                book.delete(key)
                book.events_first = self.events.first
                self._seal_now = True
        due = book.next_expiry_ms()
        sleep_s = None if due is None else max(0.0, (due - now_ms) / 1000) + 0.001
        if self.events is not None:
            trim_s = self._trim_at - time.monotonic()
            sleep_s = trim_s if sleep_s is None else min(sleep_s, trim_s)
        return sleep_s

    def expire_due(self) -> int:
        """Ends the holds due by now, and returns once that, and every change applied
        before it, is durable: what the writer does by itself on its clock, done now (the
        writer may have taken some of them a moment before: those are waited for too).
        Returns how many this call ended."""
        with self.lock:
            if self._closing:
                raise Unavailable(self.refusal)
            book = self.book
            n = book.expire_due(self.clock_ms(), book.queued_mods_max)
            # Every change is one event or more, so the newest event id
            # applied says how far the durable state must reach.
            target = book.next_event - 1
            if book.has_work():         # a seal asked for with none would outlive this call
                self._seal_soon()
            while self.events.last < target and self.error is None:
                self._durable.wait()
            if self.error is not None:
                raise Unavailable(FAILED_DETAIL)
        return n
