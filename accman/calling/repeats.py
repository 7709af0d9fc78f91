"""Log lines of a condition that every request meets while it lasts (AccMan
unreachable, the service's token refused): each refused request would say
it again, thousands a second.  Said when it starts, then at most every
REPEAT_S while it goes on, with how many times it came meanwhile.  A line
forgotten (past LINES_MAX) with repeats not yet said says their count as it
goes, in one line, so that no repeat goes uncounted.  No I/O but the log."""

from __future__ import annotations

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


class Repeats:
    """The lines of one middleware, each known by its text (a few fixed
    texts and the codes of the replies: at most LINES_MAX kept)."""

    def __init__(self, log: logging.Logger, clock=time.monotonic):
        self._log = log
        self._clock = clock
        self._said: dict[str, list] = {}      # text -> [said at, times since, last met, level]

    def say(self, level: int, text: str, said: str = "") -> None:
        """`said` (AccMan's words, which vary with what answers) is logged
        after `text` but is no part of what the line is known by."""
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
            return
        self._log.log(level, "%s%s%s", text, f"; AccMan said: {said}" if said else "", more)
        if state is None and len(self._said) >= LINES_MAX:
            self._forget(min(self._said, key=lambda t: self._said[t][2]))
        self._said[text] = [now, 0, now, level]
        assert len(self._said) <= LINES_MAX

    def _forget(self, text: str) -> None:
        """Forgets a line, saying the repeats that it has not said yet: an
        operator counts what an outage refused from these lines."""
        at, since, seen, level = self._said.pop(text)
        if since:
            self._log.log(level, "%s (%d more times in the %.0f s after it was last said; "
                          "no longer counted)", text, since, seen - at)
