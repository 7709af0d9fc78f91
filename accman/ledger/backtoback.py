"""Whether the writer follows a write at once with the changes queued
during it (back to back), or leaves them to the loop's kick.  Called on
the writer thread only (accman.ledger.commit); its count is read from
anywhere (an int, set in one step)."""

from __future__ import annotations

# A write that ends with changes queued may be followed at once by theirs,
# sealed by the writer, or left to the bound loop, which first answers the
# batch and then, once its callers call again, seals their changes with
# those queued (the fill target, accman.ledger.fill): one batch for a round
# of callers, one write's CPU saved, the changes queued during the write
# later by the replies and the fill wait.  Back to back pays where the disk
# answers a write that follows another at once much faster than one after
# an idle gap (a virtual disk has answered in ~40 µs against ~400-600);
# elsewhere it splits the callers into two batches that alternate, each a
# write's CPU (docs/PERFORMANCE.md).  So the writer times both kinds of
# write and follows at once while back-to-back writes take at most this
# fraction of the others' time.
BACK_TO_BACK_RATIO = 0.5
# Each kind's time is a moving average with this weight for the newest
# write (about the last 16 writes of the kind; the first ones weigh 1/n,
# an average of all so far).  A write is counted as at most
# BACK_TO_BACK_OUTLIER times its kind's average: one stalled write (the
# machine busy elsewhere) does not decide the next thousand choices,
# while a disk grown slower for good raises the average within a few
# dozen writes.
BACK_TO_BACK_WEIGHT = 1 / 16
BACK_TO_BACK_OUTLIER = 4.0
# One decision in this many goes the other way, so that the kind not
# chosen is still timed: a disk's answers change with its load.
BACK_TO_BACK_PROBE_EVERY = 64


class BackToBack:
    """The writes' times and the choice.  The constants are copied as
    attributes, for tests to set."""

    def __init__(self):
        self.ratio = BACK_TO_BACK_RATIO
        self.weight = BACK_TO_BACK_WEIGHT
        self.probe_every = BACK_TO_BACK_PROBE_EVERY
        self.outlier = BACK_TO_BACK_OUTLIER
        # [average seconds, writes timed] of writes after an idle gap, and of
        # writes that followed another at once.
        self._after_gap = [0.0, 0]
        self._at_once = [0.0, 0]
        self._decisions = 0

    def wrote(self, at_once: bool, write_s: float) -> None:
        """A durable write of `write_s` seconds, which followed the last at
        once (`at_once`, sealed by the writer) or not."""
        assert write_s >= 0
        kind = self._at_once if at_once else self._after_gap
        average, n = kind
        if n:
            write_s = min(write_s, self.outlier * average)
        kind[1] = n + 1
        kind[0] = average + max(self.weight, 1 / kind[1]) * (write_s - average)

    @property
    def writes(self) -> int:
        """For /metrics: the writes that followed another at once, timed."""
        return self._at_once[1]

    def follows(self) -> bool:
        """At a write's end with changes queued: whether the writer seals
        them at once.  A kind never timed is tried first."""
        if not self._at_once[1]:
            return True
        if not self._after_gap[1]:
            return False
        self._decisions += 1
        chosen = self._at_once[0] <= self.ratio * self._after_gap[0]
        return chosen != (self._decisions % self.probe_every == 0)
