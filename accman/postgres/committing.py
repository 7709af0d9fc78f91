"""The PostgreSQL store's group commit: a lane's writer sends the calls
queued as it starts, once the batch has filled (FILL_*), as one call of
accman_apply (one transaction, one round trip) and tells each its outcome
only once the commit returned; a batch not committed in time, or whose
connection broke, is an unknown outcome for each of its calls."""

from __future__ import annotations

import asyncio
import logging
import time
from typing import TYPE_CHECKING

from accman.ledger.fill import Fill
from accman.postgres import batch as B
from accman.postgres import errors as E
from accman.postgres import schema as S
from accman.postgres.backends import committed
from accman.postgres.complaints import named

if TYPE_CHECKING:
    from accman.postgres.cluster import Cluster

log = logging.getLogger("accman.postgres")

# A batch not committed within this long is taken as lost: its calls are
# answered Unavailable and the connection is replaced.  A primary waiting
# for a synchronous standby that is gone never answers otherwise.
COMMIT_TIMEOUT_S = 10.0

# Filling a batch, on a store of one cluster: a batch costs the database
# and its round trip about the same whatever it holds (its fixed part, and
# the commit's flush), and a caller whose reply just went out may be about
# to call again, so after a commit the writer takes the next batch only
# once FILL_FRACTION of the calls in flight then (the batch's and those
# queued meanwhile) are queued, looking again after every loop turn (the
# loop reads its sockets meanwhile), for at most FILL_WAIT_S, and not once
# the cluster is lost or the store is closing.  With one call in flight
# the target is 0 and nothing waits.  Nearly all, as the embedded store
# waits for: a batch's round trip here (the database's work on it, and
# its commit's flush) is long beside the spread of the callers' return,
# and a caller left out of a batch waits for that whole round trip.  The
# target is at most FILL_TARGET_MAX calls, and never more than a batch
# takes: a batch that large has its fixed cost shared out already, and
# waiting for more (pipelining callers keep many calls in flight) only
# delays it.  A store of several
# clusters does not wait (its fill fraction is 0): a caller answered by
# one cluster calls another as often as not, so that the target is
# seldom reached and the wait mostly polls until its deadline
# (docs/PERFORMANCE.md, "PostgreSQL").
FILL_FRACTION = 0.9
FILL_WAIT_S = 400e-6
FILL_TARGET_MAX = 128
# Each lane keeps the embedded store's fill policy (accman.ledger.fill) with
# these bounds, and its other rules and their bounds: a target older than
# fill.FILL_TARGET_TTL_S is not waited for, and after a miss the next
# fill.FILL_SKIPS_AFTER_MISS waits are not begun.  But every wait that runs
# out is a miss here (no idle turns asked for): the target is at most
# FILL_TARGET_MAX, which a loop reading pipelined calls reaches within the
# wait, so the embedded store's count of idle turns
# (fill.FILL_MISS_IDLE_TURNS) has nothing to tell apart.
LANE_MISS_IDLE_TURNS = 0


def lane_fill(clusters: int, clock=time.perf_counter) -> Fill:
    """A lane's fill policy, on a store of `clusters` clusters (FILL_*)."""
    return Fill(clock, fraction=FILL_FRACTION if clusters == 1 else 0.0, wait_s=FILL_WAIT_S,
                miss_idle_turns=LANE_MISS_IDLE_TURNS)


PAST_BARRIER = B.PAST      # an ordered /past: runs on the writer between batches
_TOLD = object()            # pop's default: the op is gone from _flying, told by a close


class Committing:
    """Mixed into accman.postgres.store.PgStore, whose queue, clusters,
    deliver and counters these use."""

    async def _write(self, cluster: Cluster, lane) -> None:
        """A lane's writer: one batch in flight at a time, of all queued as
        it starts once the batch has filled (FILL_*)."""
        ops = lane.ops
        try:
            # Let this loop turn's other callbacks queue their calls first.
            await asyncio.sleep(0)
            while ops and cluster.healthy:
                if ops[0].kind == PAST_BARRIER:
                    op = ops.popleft()
                    self.queued_mods -= 1
                    self._flying[op] = None     # told by a close from now on
                    await self._past(op, lane=lane, cluster=cluster)
                    continue
                if len(ops) < lane.fill.target:
                    await self._fill(cluster, lane)
                    lane.fill.target = 0    # waited: what is queued goes, whatever came
                    continue                # the cluster may have been lost meanwhile
                taken = []
                while ops and len(taken) < self.batch_mods_max and ops[0].kind != PAST_BARRIER:
                    taken.append(ops.popleft())
                await self._commit(cluster, lane, taken)
                lane.fill.aim(len(taken) + len(ops), min(self.fill_target_max, self.batch_mods_max))
                await asyncio.sleep(0)
        finally:
            lane.writing = False
        if ops and not self._closed:
            # The cluster went unhealthy with calls still queued: none was sent.
            self._refuse(lane, named(self, cluster) + cluster.error)

    async def _fill(self, cluster: Cluster, lane) -> None:
        """Until the lane's fill policy lets the batch go (FILL_*), loop turn
        after loop turn, while the cluster is healthy and the store not
        closing."""
        fill = lane.fill
        while True:
            if not cluster.healthy or self._closing:
                fill.stop()
                return
            if not fill.waits(len(lane.ops)):
                return
            await asyncio.sleep(0)

    async def _commit(self, cluster: Cluster, lane, ops: list) -> None:
        self._flying.update(dict.fromkeys(ops))
        try:
            await self._committed(cluster, lane, ops)
        except Exception as e:
            # A fault of AccMan's in making the call or reading its reply
            # (the database's own errors are told in _committed): the
            # batch may have committed.
            log.exception("a batch failed in AccMan")
            error = E.commit_error(e, E.classify(e))
            self._deliver([(op.done, error) for op in self._landed(ops)])
        finally:
            self.queued_mods -= len(ops)

    async def _committed(self, cluster: Cluster, lane, ops: list) -> None:
        args = B.arrays(ops)
        t0 = time.perf_counter()
        for attempt in range(3):
            try:
                row = await committed(lane.writer, lane.apply.fetchrow(
                    *args, self.low_default, self.holds_per_account_max, self.holds_max),
                    COMMIT_TIMEOUT_S, cluster.abandoned)
                break
            except Exception as e:  # translated by E.classify, the one place
                kind = E.classify(e)
                if kind == E.RETRY and attempt < 2:
                    continue
                if kind == E.FAILED:
                    log.error("a batch failed: %s", E.describe(e))
                    cluster.refused_in_row += 1
                if kind != E.RETRY:         # rolled back thrice: nothing says the store is ill
                    self.lost(cluster, e)
                error = E.commit_error(e, kind)
                self._deliver([(op.done, error) for op in self._landed(ops)])
                return
        cluster.refused_in_row = 0
        commit_s = time.perf_counter() - t0
        codes, tots, seqs, counts, changes = row
        cluster.note_counts(counts)
        if counts is not None:          # it changed something (events, holds)
            # The changes, as the embedded store counts them: the history entries
            # made (not a refusal, nor a repeat answered with its first reply);
            # None from the charges' set path, where each op is one.
            if changes is None:
                changes = sum(1 for op, code in zip(ops, codes, strict=True)
                              if code == S.OK and op.kind != S.READ)
            self.count_batch(changes, commit_s)
            # Before the replies: an /events pipelined behind them copies
            # (merge) or reads what they committed.
            if cluster is self.home:
                cluster.events.local_commit()
            else:
                self.merger.note_commit(cluster, counts[0])
        outcome, refused = B.outcome, self._refused
        told = {op: outcome(op, code, tot, seq, refused)
                for op, code, tot, seq in zip(ops, codes, tots, seqs, strict=True)}
        self._deliver([(op.done, told[op]) for op in self._landed(ops)])

    def _landed(self, ops) -> list:
        """Those of `ops` (whose commit or query flew) not yet told: a
        close tells, and forgets, every op whose task it cancels."""
        return [op for op in ops if self._flying.pop(op, _TOLD) is not _TOLD]

    def count_batch(self, nmods: int, commit_s: float) -> None:
        """A committed batch of `nmods` changes, for /metrics: only one that
        changed something (calls all refused are no batch, as on the
        embedded store; a settle that found its hold due ended it)."""
        self.batches += 1
        self.mods += nmods
        self.commit_s_total += commit_s
        self.last_batch_mods = nmods
        sizes, times = self._samples
        if len(sizes) < 65536:
            sizes.append(nmods)
            times.append(commit_s)
