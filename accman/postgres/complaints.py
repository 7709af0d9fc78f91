"""The log lines of upkeep that fails round after round: a failure that
lasts (a full disk, a function dropped by hand) is said when it starts,
again when its words change, at most every COMPLAINT_REPEAT_S while it
lasts (with how many rounds failed since), and once when it ends; it never
fills the log with a line a second.  No I/O but the log."""

from __future__ import annotations

import logging
import time

from accman.postgres import errors as E

log = logging.getLogger("accman.postgres")

# A failure that goes on is said again this often, with its count.
COMPLAINT_REPEAT_S = 60.0


class Complaints:
    """One store's recurring failures, each named by what failed (the same
    words at each round: "ending due holds on cluster 0")."""

    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._open: dict[str, list] = {}     # what -> [words, said at, failures since]

    def failed(self, what: str, exc: BaseException) -> None:
        words = f"{E.describe(exc)} ({E.placed(exc)})"
        now = self._clock()
        state = self._open.get(what)
        if state is None or state[0] != words:
            log.warning("%s failed (retried): %s", what, words)
            self._open[what] = [words, now, 0]
            return
        state[2] += 1
        if now - state[1] >= COMPLAINT_REPEAT_S:
            log.warning("%s still fails (%d more times in %.0f s): %s", what, state[2],
                        now - state[1], words)
            state[1], state[2] = now, 0

    def worked(self, what: str) -> None:
        if self._open.pop(what, None) is not None:
            log.warning("%s works again", what)


def doing(store, what: str, cluster) -> str:
    """What a round does, for its complaints: on which cluster, when the
    store has several (numbered as their --store options, from 1)."""
    if len(store.clusters) == 1:
        return what
    return f"{what} on cluster {cluster.index + 1}"


def named(store, cluster) -> str:
    """The cluster, as a log line's prefix, when the store has several."""
    return "" if len(store.clusters) == 1 else f"cluster {cluster.index + 1}: "
