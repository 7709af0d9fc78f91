"""Log lines of a condition that every request meets while it lasts (AccMan
unreachable, the service's token refused, an account at its bound of
holds, a cost function over its estimate): each request would say it
again, thousands a second.  Said when it starts, then at most every
REPEAT_S while it goes on, with how many times it came meanwhile.  Repeats
not yet said when the line stops coming are said once it has not come for
REPEAT_S (a timer on the running event loop, armed only while some count is
unsaid), or at close.  A line forgotten (past LINES_MAX) with repeats not
yet said says their count as it goes, in one line, so that no repeat goes
uncounted.  No I/O but the log."""

from __future__ import annotations

import asyncio
import logging
import time

# A line met by every request is said again at most this often.
REPEAT_S = 10.0
# The lines kept.  A line's text holds the error code of the reply, and a
# foreign server at a wrong URL may send a new code with every reply: past
# this many, the line met longest ago is forgotten (said at once if it
# comes back), so that the lines kept stay bounded.  Its repeats not yet
# said are said as it goes: at most one line more per new line said.
LINES_MAX = 64
# The shortest wait of the timer: the event loop may run a timer a little
# before its time, and a line not yet due is waited for again, never in a
# busy loop.
TIMER_MIN_S = 0.001


class Repeats:
    """The lines of one middleware, each known by its text (a few fixed
    texts and the codes of the replies: at most LINES_MAX kept)."""

    def __init__(self, log: logging.Logger, clock=time.monotonic):
        self._log = log
        self._clock = clock
        self._said: dict[str, list] = {}      # text -> [said at, times since, last met, level]
        self._timer: asyncio.TimerHandle | None = None
        self._timer_loop = None

    def say(self, level: int, text: str, said: str = "", why: str = "",
            note: str = "") -> None:
        """`note` (what this time is about: the account of the request that
        says the line), `said` (AccMan's words, which vary with what
        answers) and `why` (the client's words of what failed on the way:
        a refused connection, a certificate not trusted) are logged after
        `text` but are no part of what the line is known by."""
        now = self._clock()
        state = self._said.get(text)
        if state is None:
            more = ""
        elif now - state[2] >= REPEAT_S:        # it had stopped: a new spell
            more = "" if not state[1] else \
                f" (before, {state[1]} more times in the {state[2] - state[0]:.0f} s after it " \
                "was last said)"
        elif now - state[0] >= REPEAT_S:
            more = f" ({state[1]} more times in {now - state[0]:.0f} s)"
        else:
            state[1] += 1
            state[2] = now
            self._arm(REPEAT_S)
            return
        self._log.log(level, "%s%s%s%s%s", text, f" ({note})" if note else "",
                      f"; AccMan said: {said}" if said else "", f": {why}" if why else "", more)
        if state is None and len(self._said) >= LINES_MAX:
            self._forget(min(self._said, key=lambda t: self._said[t][2]))
        self._said[text] = [now, 0, now, level]
        assert len(self._said) <= LINES_MAX
        if self._timer is not None and not any(s[1] for s in self._said.values()):
            self._cancel()                      # no count left to say

    def flush(self, closing: bool = False) -> None:
        """Says the repeats not yet said of each line not met for REPEAT_S
        (every line's, `closing`): a spell that ended says what it counted
        without waiting for the line to come again, which it may never do.
        The timer's work; then armed again if some count is still unsaid."""
        self._cancel()
        now = self._clock()
        due_s = None                            # until the next unsaid count is due
        for text, state in self._said.items():
            if not state[1]:
                continue
            left_s = state[2] + REPEAT_S - now
            if closing or left_s <= 0:
                self._log.log(state[3], "%s (%d more times in the %.0f s after it was last "
                              "said; not met since)", text, state[1], state[2] - state[0])
                state[1] = 0
            elif due_s is None or left_s < due_s:
                due_s = left_s
        if due_s is not None:
            self._arm(due_s)

    def close(self) -> None:
        """Says every count not yet said, and leaves no timer behind."""
        self.flush(closing=True)

    def _arm(self, delay_s: float) -> None:
        """Arms the timer on the running event loop, unless it is armed
        there already; with no running loop, the counts wait for the next
        line said, or close.  A timer on a loop that is no longer the one
        running (an `asyncio.run` ended) is replaced: it would never run."""
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            return
        if self._timer is not None and self._timer_loop is loop:
            return
        self._cancel()
        self._timer = loop.call_later(max(delay_s, TIMER_MIN_S), self.flush)
        self._timer_loop = loop

    def _cancel(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = self._timer_loop = None

    def _forget(self, text: str) -> None:
        """Forgets a line, saying the repeats that it has not said yet: an
        operator counts what an outage refused from these lines."""
        at, since, seen, level = self._said.pop(text)
        if since:
            self._log.log(level, "%s (%d more times in the %.0f s after it was last said; "
                          "no longer counted)", text, since, seen - at)
