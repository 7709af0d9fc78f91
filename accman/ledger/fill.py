"""When a batch goes to be made durable: once it has filled to a target
set by the last completion.  The embedded store's loop keeps one
(accman.ledger.commit kicks; this decides), and so does each lane of the
PostgreSQL store (accman.postgres.committing, with its own bounds).  On
the embedded store it is written on the bound loop, and by a binding
under the committer's lock (`forget`); its counts are read from anywhere
(ints, each set in one step)."""

from __future__ import annotations

import time

# Filling a batch on a bound loop, once the writer has gone idle (a write
# that ends with changes queued may take them at once:
# accman.ledger.backtoback).
# A durable write costs about the same CPU whatever the batch holds, so the
# loop does not hand it a batch much smaller than the changes that were in
# flight at the last completion: clients whose replies just went out are
# about to send again.  It waits for FILL_FRACTION of them, turn after loop
# turn (reading sockets meanwhile), for at most FILL_WAIT_S; with one
# client in flight the target is 0 and nothing waits.  Nearly all, not
# half: the clients that waited on one batch stay one batch, where half
# splits them into two batches that alternate, each a write's CPU
# (docs/PERFORMANCE.md has the measurements).
FILL_FRACTION = 0.95
FILL_WAIT_S = 400e-6
# A target is of the callers answered at the completion that set it, who
# call again within their round trip if at all: a wait that would begin
# this long after that completion has nobody to wait for (a lone call after
# an idle spell), and the batch goes at once.  Longer than a round trip to
# a caller in the same region, so that such callers keep their fill wait.
FILL_TARGET_TTL_S = 0.1
# A fill wait that runs out while its callers stay away (a miss) shows
# callers that do not come back in step: they call when their own clients
# do, not on their reply, and waiting for them costs the batch the whole
# FILL_WAIT_S and saves few writes.  So after a miss, the next this many
# waits are not begun: those batches go at the end of the loop's turn.
# Callers in step reach their target and seldom come to it.
FILL_SKIPS_AFTER_MISS = 8
# The callers stayed away when at least this many of the wait's turns
# queued nothing new.  A wait that runs out over fewer is no miss: its
# turns were spent reading changes (callers that pipeline keep more in
# flight than the loop reads in FILL_WAIT_S), and their batches keep their
# waits.  An idle turn takes ~1 µs here: a machine several times slower
# still turns idle more than this many times in a wait.
FILL_MISS_IDLE_TURNS = 32


class Fill:
    """The fill target and the wait for it.  Its bounds (FILL_* by default,
    a store's own where given) are attributes, for tests to shorten."""

    def __init__(self, clock=time.perf_counter, *, fraction=FILL_FRACTION, wait_s=FILL_WAIT_S,
                 target_ttl_s=FILL_TARGET_TTL_S, skips_after_miss=FILL_SKIPS_AFTER_MISS,
                 miss_idle_turns=FILL_MISS_IDLE_TURNS):
        self.fraction = fraction
        self.wait_s = wait_s
        self.target_ttl_s = target_ttl_s
        self.skips_after_miss = skips_after_miss
        self.miss_idle_turns = miss_idle_turns
        self.target = 0
        self._clock = clock             # seconds, monotonic
        self._target_at = 0.0           # the clock at the completion that set it
        self._since = None              # the clock at the wait's start
        self._skips = 0                 # waits not to begin (FILL_SKIPS_AFTER_MISS)
        self._queued = 0                # the changes queued at the wait's last look
        self._idle_turns = 0            # its looks that found no more (FILL_MISS_IDLE_TURNS)
        # For /metrics: waits begun, misses among them, waits skipped.
        self.waits_begun = self.misses = self.skipped = 0

    def aim(self, in_flight: int, cap: int) -> None:
        """At a completion: `in_flight` changes are answered or queued."""
        self.target = min(int(self.fraction * in_flight), cap)
        self._target_at = self._clock()

    def forget(self) -> None:
        """The callers counted are gone (another loop is bound; a lane's
        connection was replaced): their target, their wait and the skips
        after their miss go (the counts stay)."""
        self.target = 0
        self._since = None
        self._skips = 0

    def counts(self) -> dict:
        """For /metrics (accman.server.metrics): waits begun, misses, skips."""
        return {"fill_waits": self.waits_begun, "fill_misses": self.misses,
                "fill_skips": self.skipped}

    def stop(self) -> None:
        """The wait ends undecided (the batch sealed by another, a lane's
        cluster lost or its store closing): the next starts afresh, not
        from this one's start."""
        self._since = None

    def waits(self, queued: int) -> bool:
        """At the end of a loop turn, with `queued` changes for the next
        batch and nothing being written: whether the batch waits another
        turn (False: it goes, and the next wait starts afresh).  A wait
        begins short of the target unless the target is stale
        (FILL_TARGET_TTL_S) or skipped after a miss (FILL_SKIPS_AFTER_MISS);
        it ends at the target or after FILL_WAIT_S, a miss if its callers
        stayed away (FILL_MISS_IDLE_TURNS)."""
        if self._waiting(queued):
            return True
        self._since = None
        return False

    def _waiting(self, queued: int) -> bool:
        if queued >= self.target:
            return False
        now = self._clock()
        if self._since is None:
            if now - self._target_at >= self.target_ttl_s:
                return False
            if self._skips:
                self._skips -= 1
                self.skipped += 1
                return False
            self._since, self._queued, self._idle_turns = now, queued, 0
            self.waits_begun += 1
            return True
        if queued == self._queued:
            self._idle_turns += 1
        self._queued = queued
        if now - self._since < self.wait_s:
            return True
        if self._idle_turns >= self.miss_idle_turns:
            self._skips = self.skips_after_miss
            self.misses += 1
        return False
