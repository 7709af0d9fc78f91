"""A PostgreSQL store's upkeep, on its loop: due holds ended in rounds, the
counts refreshed, events past the retention trimmed, a lost cluster
reconnected.  Every front-end runs it; the database makes each due hold
end once (accman_expire locks its account, SKIP LOCKED).

The expiry round is also the store's heartbeat: a round that loses its
connection marks the cluster lost, so that /health says 503 within a round
of the primary going away, idle or not (SPEC "Routes": 503 while the
service cannot commit).
"""

from __future__ import annotations

import asyncio
import logging
import time

from accman.postgres import errors as E
from accman.postgres.backends import closed_unless_answered, committed
from accman.postgres.cluster import STALLED
from accman.postgres.complaints import doing, named
from accman.postgres.serving import OTHER_STORE

log = logging.getLogger("accman.postgres")

# Due holds are ended in rounds this often, at most EXPIRE_HOLDS_MAX per
# call of accman_expire (one transaction: the accounts it ends holds of
# wait for its commit), calls following one another until one ends none.
# A hold ends a round after its ttl, or later while its account is locked
# by a write when the round comes (SKIP LOCKED: the next round ends it);
# a settle after the ttl is hold_expired at once regardless.
EXPIRE_INTERVAL_S = 1.0
EXPIRE_HOLDS_MAX = 4096
# Events past the retention are trimmed this often (or each round, when the
# retention is shorter).
TRIM_INTERVAL_S = 60.0
# A round's calls, each: a round not answered by then marks the cluster lost.
ROUND_TIMEOUT_S = 10.0
# Reconnecting after a lost connection: the first retry after the minimum,
# doubling to the maximum (a failover with Patroni takes ~10-30 s).
RECONNECT_BACKOFF_S_MIN = 0.05
RECONNECT_BACKOFF_S_MAX = 2.0

# The counts, and the oldest event kept or, when none is, the id the next
# event gets (EventReader.first).
_COUNTS_SQL = ("SELECT ARRAY[next_event - 1, accounts, open_holds, holds_expired, "
               "coalesce((SELECT min(id) FROM accman_events), next_event)] FROM accman_counter")


async def maintain(store) -> None:
    """Rounds every EXPIRE_INTERVAL_S until the store closes (the first at
    open is expire_round's, before the store serves)."""
    last_trim = 0.0                     # the first round trims
    trim_interval_s = min(TRIM_INTERVAL_S, store.retention_s)
    while not store.closed:
        await asyncio.sleep(EXPIRE_INTERVAL_S)
        for c in store.clusters:
            if c.healthy:
                await expire_round(store, c)
        await merge_round(store)
        if time.monotonic() - last_trim >= trim_interval_s:
            last_trim = time.monotonic()
            for c in store.clusters:
                if c.healthy:
                    await c.events.trim(store.retention_s)


async def merge_round(store) -> None:
    """On a store of several clusters: takes the copying role if no
    front-end has it, and copies what a lost notification may have left."""
    merger = store.merger
    if merger is None or not store.healthy:
        return
    try:
        await merger.lead()
    except Exception as e:
        store.complaints.failed("taking the copying role", e)
    else:
        store.complaints.worked("taking the copying role")
    if merger.leading:
        merger.kick()


async def expire_round(store, cluster) -> None:
    """Ends the cluster's due holds, reading its counts after each call:
    a round of many calls (a million holds due) shows its progress."""
    try:
        async with cluster.pool.acquire() as conn:
            try:
                await _expire_calls(store, cluster, conn)
            except BaseException as e:
                closed_unless_answered(conn, e)     # else the round waits with it
                raise
    except Exception as e:
        if E.classify(e) != E.UNKNOWN:
            store.complaints.failed(doing(store, "ending due holds", cluster), e)
        elif cluster.healthy:
            store.lost(cluster, e)
        # else the cluster is lost already, and was said to be then
    else:
        store.complaints.worked(doing(store, "ending due holds", cluster))


async def _expire_calls(store, cluster, conn) -> None:
    ended = True
    while ended:
        t0 = time.perf_counter()
        ended = await committed(conn, conn.fetchval(
            "SELECT accman_expire($1)", EXPIRE_HOLDS_MAX), ROUND_TIMEOUT_S,
            cluster.abandoned)
        if ended:
            # A batch of changes, as the embedded store's writer counts
            # the expiries it writes (/metrics).
            store.count_batch(ended, time.perf_counter() - t0)
            cluster.events.local_commit()
        counts = await conn.fetchval(_COUNTS_SQL, timeout=ROUND_TIMEOUT_S)
        cluster.note_counts(counts[:4])
        cluster.events.first = counts[4]


def note_error(store, cluster, error: str) -> None:
    """Why a lost cluster stays lost, noted; said once when it becomes a
    host that holds another store (serving.same_store), which an operator
    must mend, where a database away mends itself."""
    if error == OTHER_STORE and cluster.error != OTHER_STORE:
        log.warning("%s%s", named(store, cluster), OTHER_STORE)
    cluster.error = error


async def reconnect(store, cluster) -> None:
    """Reconnects a lost cluster, with backoff, until it is back or the
    store closes (spawned by the store when it loses the cluster)."""
    # After refused batches, a longer first wait: reconnecting succeeds
    # at once, and the next batch would be refused again (a full disk).
    delay = min(RECONNECT_BACKOFF_S_MIN * 2 ** min(cluster.refused_in_row, 16),
                RECONNECT_BACKOFF_S_MAX)
    try:
        while not store.closed:
            await asyncio.sleep(delay)
            delay = min(delay * 2, RECONNECT_BACKOFF_S_MAX)
            losses = cluster.losses
            try:
                # Healthy (/health 200, writes taken) only once the
                # listener is back too: not between the two.
                await cluster.connect(healthy=False)
                await cluster.events.restart()
            except Exception as e:
                note_error(store, cluster, E.describe(e))
                if cluster.error == STALLED and not cluster.stall_said:
                    cluster.stall_said = True
                    log.warning("%s%s", named(store, cluster), STALLED)
                continue
            if cluster.losses == losses:    # else lost again meanwhile: go on
                cluster.error = None
                log.warning("%sreconnected to the PostgreSQL store; taking writes again",
                            named(store, cluster))
                return
    finally:
        cluster.reconnecting = False
