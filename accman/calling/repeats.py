"""Log lines of a condition that every request meets while it lasts (AccMan
unreachable, the service's token refused): each refused request would say
it again, thousands a second.  Said when it starts, then at most every
REPEAT_S while it goes on, with how many times it came meanwhile.  No I/O
but the log."""

from __future__ import annotations

import logging
import time

# A line met by every request is said again at most this often.
REPEAT_S = 10.0


class Repeats:
    """The lines of one middleware, each known by its text (a few fixed
    texts: the set stays small)."""

    def __init__(self, log: logging.Logger, clock=time.monotonic):
        self._log = log
        self._clock = clock
        self._said: dict[str, list] = {}      # text -> [said at, times since]

    def say(self, level: int, text: str) -> None:
        now = self._clock()
        state = self._said.get(text)
        if state is not None and now - state[0] < REPEAT_S:
            state[1] += 1
            return
        more = "" if state is None or not state[1] else \
            f" ({state[1]} more times in {now - state[0]:.0f} s)"
        self._log.log(level, "%s%s", text, more)
        self._said[text] = [now, 0]
