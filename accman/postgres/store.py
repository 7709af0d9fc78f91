"""`PgStore`: accman/store.py's interface on one or more PostgreSQL clusters.

    store = await PgStore.open(["postgresql://h1,h2/accman?target_session_attrs=read-write"])
    store.bind_loop(loop, deliver)
    store.submit("alice", 100, None, "k1", done)      # done((tot, seq)) once committed

Group commit at the database: the calls queued for a cluster go to it as one call of accman_apply
(one transaction, one round trip), answered only after that commit returned; the next batch fills
while one is in flight, and on a store of one cluster after the commit until most of the callers
answered are back, or 128 of them (accman.postgres.committing FILL_*). Unordered /tot reads of a
loop turn go as one query on a read connection (a second beside it once as many wait:
Cluster.another_reader). Everything a batch judges (min, overflow, keys, seq, holds) is judged in
the database against rows it has locked (accman.postgres.schema).

Accounts spread over the clusters by rendezvous hashing of the account id with each cluster's id:
adding a cluster moves only the accounts that now rank it first (docs/SCALING.md). Their events are
numbered in one gap-free order on one of them (accman.postgres.merge).

A broken connection mid-batch leaves the batch's outcome unknown: its calls are answered
Unavailable (nothing acknowledged; a keyed retry gets the original reply), the cluster is
unhealthy, and the store reconnects by itself with backoff, through the URL's hosts
(target_session_attrs=read-write finds the new primary after a failover).
"""

from __future__ import annotations

import asyncio
import hashlib
import logging

from accman.errors import Busy, NotApplied, Unavailable, where
from accman.limits import (BATCH_MODS_MAX, EVENTS_RETENTION_S_DEFAULT, HOLDS_MAX,
                           HOLDS_PER_ACCOUNT_MAX, QUEUED_MODS_MAX)
from accman.postgres import batch as B
from accman.postgres import errors as E
from accman.postgres import schema as S
from accman.postgres import upkeep
from accman.postgres.backends import pool_read, writer_read
from accman.postgres.cluster import Cluster, health_detail
from accman.postgres.committing import FILL_TARGET_MAX, PAST_BARRIER, Committing
from accman.postgres.complaints import Complaints, named
from accman.postgres.connecting import ServiceSaid
from accman.postgres.cursors import PgCursors
from accman.postgres.events import EventReader
from accman.postgres.merge import Merger
from accman.postgres.migrate import migrate, read_infos
from accman.postgres.shape import check_infos
from accman.store import (check_binding, check_cred, check_mod, check_options,
                          check_past, check_settle, run_callbacks, told)

log = logging.getLogger("accman.postgres")

# Unordered /tot reads of one cluster in one query; more wait for the next.
READ_BATCH_MAX = 4096
# Unordered reads queued for a cluster; beyond it a read is refused `busy`.
QUEUED_READS_MAX = 65536
READ_TIMEOUT_S = 10.0
# cred -> (hid, cluster) cache: hashing is ~1 us, a dict hit ~50 ns.
CRED_CACHE_MAX = 65536



class PgStore(Committing):
    """The store interface (accman/store.py) on PostgreSQL.  Make one with
    `await PgStore.open(urls)`; calls are made on the loop it was opened on."""

    # accman/store.py: every read goes to the database; no files on this
    # machine; why it is unhealthy is in `unhealthy_detail`.
    inline_reads = False
    path = None
    failure = None

    def __init__(self, clusters_info, urls, *, hash_key, low_default, retention_s,
                 batch_mods_max, queued_mods_max, holds_per_account_max, holds_max):
        self._hasher = hashlib.blake2b(digest_size=16, key=hash_key)
        self._refused = B.refusals(holds_per_account_max, holds_max, len(urls))
        # Its service file's failures, said by this store (and not another's).
        self.service_said = ServiceSaid()
        self.clusters = [Cluster(u, i, info.cluster_id, self, len(urls))
                         for i, (u, info) in enumerate(zip(urls, clusters_info, strict=True))]
        self.low_default = low_default
        self.retention_s = retention_s
        self.batch_mods_max = batch_mods_max
        self.fill_target_max = FILL_TARGET_MAX     # the cap of a lane's fill target
        self.queued_mods_max = queued_mods_max
        self.holds_per_account_max = holds_per_account_max
        self.holds_max = holds_max
        self.queued_mods = 0
        self.complaints = Complaints()
        self._creds: dict = {}
        self._loop = asyncio.get_running_loop()
        self._deliver = run_callbacks
        self._closed = False
        self._closing = False               # aclose has begun: no batch waits to fill
        self._tasks: set = set()
        self._flying: dict = {}            # ops whose commit or /past query flies, in order
        self.batches = 0
        self.mods = 0
        self.commit_s_total = 0.0
        self.last_batch_mods = 0
        self._samples: tuple[list, list] = ([], [])
        # Where the store's events are numbered and read: the one cluster, or
        # the events' home of several, the merger copying the others' there.
        home_id = clusters_info[0].events_home if len(clusters_info) > 1 else None
        self.home = next(c for c in self.clusters
                         if home_id is None or c.cluster_id == home_id)
        others = [c for c in self.clusters if c is not self.home]
        self.merger = Merger(self, self.home, others) if others else None
        # The webhook's cursor, shared by the front-ends, and its role.
        self.cursors = PgCursors(self)

    @classmethod
    async def open(cls, urls: list[str], *, migrate_schema: bool = True,
                   low_default: int | None = None,
                   retention_s: float = EVENTS_RETENTION_S_DEFAULT,
                   batch_mods_max: int = BATCH_MODS_MAX,
                   queued_mods_max: int = QUEUED_MODS_MAX,
                   holds_per_account_max: int = HOLDS_PER_ACCOUNT_MAX,
                   holds_max: int = HOLDS_MAX) -> "PgStore":
        """Connects to every cluster (migrating the schema first unless
        told not to) and checks that they make one store.  A wrong option
        is ValueError, before any cluster is reached."""
        check_options(low_balance=low_default, events_retention_s=retention_s,
                      batch_mods_max=batch_mods_max, queued_mods_max=queued_mods_max,
                      holds_per_account_max=holds_per_account_max, holds_max=holds_max)
        urls = list(urls)
        infos = await (migrate(urls, grow=False) if migrate_schema else read_infos(urls))
        key = check_infos(infos)
        store = cls(infos, urls, hash_key=key, low_default=low_default,
                    retention_s=retention_s, batch_mods_max=batch_mods_max,
                    queued_mods_max=queued_mods_max,
                    holds_per_account_max=holds_per_account_max, holds_max=holds_max)
        try:
            for c in store.clusters:
                await c.connect()
                c.events = EventReader(store, c)
                await c.events.start()
                # Holds that expired while no front-end ran end before this
                # one serves (as the embedded store ends them at open).
                await upkeep.expire_round(store, c)
            await upkeep.merge_round(store)
            store._spawn(upkeep.maintain(store))
            # From here a service file's failure is the running store's to log.
            store.service_said.serving = True
        except BaseException:
            await store.aclose()
            raise
        return store

    # -- accounts --------------------------------------------------------------------

    def account_id(self, cred: str) -> str:
        """The account's public id (SPEC "Events"): hex of the keyed hash."""
        return self._locate(cred)[0].hex()

    def _locate(self, cred) -> tuple[bytes, Cluster]:
        hit = self._creds.get(cred) if type(cred) is str else None     # as Book._find
        if hit is not None:
            return hit
        check_cred(cred)
        h = self._hasher.copy()
        h.update(cred.encode("ascii"))
        hid = h.digest()
        clusters = self.clusters
        if len(clusters) == 1:
            hit = (hid, clusters[0])
        else:
            # Rendezvous hashing: the cluster whose id ranks this account highest.
            hit = (hid, max(clusters, key=lambda c: hashlib.blake2b(
                hid, digest_size=8, key=c.cluster_id).digest()))
        if len(self._creds) >= CRED_CACHE_MAX:
            self._creds.clear()
        self._creds[cred] = hit
        return hit

    # -- binding -----------------------------------------------------------------------

    def bind_loop(self, loop, deliver=None) -> None:
        self._check_open()
        check_binding(loop, deliver)        # as the embedded store: nothing bound on bad input
        if loop is not self._loop:
            raise RuntimeError("a PgStore is used on the loop it was opened on")
        self._deliver = deliver or run_callbacks

    # -- writes ------------------------------------------------------------------------

    def _check_open(self) -> None:
        """A closed store says so before it judges a call's values, as the
        embedded store does: refused before it does anything."""
        if self._closed:
            raise NotApplied("the store is closed")

    def _queue(self, cluster: Cluster, op) -> None:
        self._check_open()
        if not cluster.healthy:     # a read here is in order behind its connection's changes
            raise B.unsent(op, named(self, cluster) + (cluster.error or "reconnecting"))
        if self.queued_mods >= self.queued_mods_max:
            raise Busy(f"QUEUED_MODS_MAX ({self.queued_mods_max}) calls are waiting for "
                       "the database; retry shortly")
        lane = cluster.lane(op.hid)
        lane.ops.append(op)
        self.queued_mods += 1
        if not lane.writing:
            lane.writing = True
            self._spawn(self._write(cluster, lane))

    # A change's checks, in the embedded store's order: open, `done`, the cred, the values.
    def submit(self, cred, by, min=None, key=None, done=None, low=None):  # noqa: A002
        self._check_open()
        done = told(done)
        hid, cluster = self._locate(cred)
        check_mod(by, min, key, low)
        self._queue(cluster, B.Op(S.MOD, hid, by, min, key, low, done))

    def submit_hold(self, cred, by, ttl_s, min, key, done):  # noqa: A002
        self._check_open()
        done = told(done)
        hid, cluster = self._locate(cred)
        B.check_hold(by, ttl_s, min, key)
        self._queue(cluster, B.Op(S.HOLD, hid, by, 0 if min is None else min, key, ttl_s,
                                  done))

    def submit_settle(self, cred, hold, use, done):
        self._check_open()
        done = told(done)
        hid, cluster = self._locate(cred)
        check_settle(hold, use)
        self._queue(cluster, B.Op(S.SETTLE, hid, use, None, None, hold, done))

    def _refuse(self, lane, why: str) -> None:
        ops = list(lane.ops)
        lane.ops.clear()
        self.queued_mods -= len(ops)
        self._deliver([(op.done, B.unsent(op, why)) for op in ops])

    # -- losing and regaining a cluster ---------------------------------------------------

    def lost(self, cluster: Cluster, exc: BaseException) -> None:
        """The cluster's connections are gone (or their outcome unknown, or
        the database refused a batch): it is unhealthy until the store has
        reconnected, with backoff.  Said once, however long it lasts."""
        if cluster.healthy:
            log.warning("%s%s (%s); writes are refused until the store has reconnected",
                        named(self, cluster), E.describe(exc), where(exc))
            cluster.error = E.describe(exc)
        else:
            upkeep.note_error(self, cluster, E.describe(exc))
        cluster.losses += 1
        cluster.drop()
        if self.home.events is not None:    # long polls read again, told as a new one is
            self.home.events.local_commit()
        if not cluster.reconnecting and not self._closed:
            cluster.reconnecting = True
            self._spawn(upkeep.reconnect(self, cluster))

    # -- reads ---------------------------------------------------------------------------

    def read_tot(self, cred, done, ordered=False):
        self._check_open()
        done = told(done)           # told later, always: one that cannot be is refused
        hid, cluster = self._locate(cred)
        if ordered:
            self._queue(cluster, B.Op(S.READ, hid, 0, None, None, None, done))
            return None
        if len(cluster.reads) >= QUEUED_READS_MAX:
            raise Busy(f"QUEUED_READS_MAX ({QUEUED_READS_MAX}) reads are waiting for the "
                       "database; retry shortly")
        cluster.reads.append((hid, done))
        if cluster.another_reader():
            cluster.readers += 1
            self._spawn(self._read_tots(cluster))
        return None

    async def _read_tots(self, cluster: Cluster) -> None:
        try:
            await asyncio.sleep(0)
            while cluster.reads:
                taken = cluster.take_reads(READ_BATCH_MAX)
                try:
                    tots = await pool_read(cluster.pool, READ_TIMEOUT_S, "fetchval",
                                           B.TOT_SQL, [h for h, _ in taken])
                except Exception as e:
                    error = Unavailable(E.read_detail(e, named(self, cluster)))
                    self._deliver([(done, error) for _, done in taken])
                    continue
                finally:
                    cluster.landed(taken)
                self._deliver([(done, t if t is not None else B.no_account())
                               for (_, done), t in zip(taken, tots, strict=True)])
                await asyncio.sleep(0)
        finally:
            cluster.readers -= 1

    def read_past(self, cred, limit, before, done, ordered=False):
        self._check_open()
        check_past(limit, before)
        done = told(done)
        hid, cluster = self._locate(cred)
        op = B.Op(PAST_BARRIER, hid, limit, before, None, None, done)
        if ordered:
            self._queue(cluster, op)
        else:
            self._flying[op] = None
            self._spawn(self._past(op, pool=cluster.pool, cluster=cluster))
        return None

    async def _past(self, op, pool=None, lane=None, cluster=None) -> None:
        try:        # on the lane's writer: behind its writes, after their commit
            rows = await (writer_read(lane.writer, READ_TIMEOUT_S, *B.past_query(op)) if lane
                          else pool_read(pool, READ_TIMEOUT_S, "fetch", *B.past_query(op)))
            page = B.past_page(op.hid, op.by, rows)
        except Exception as e:
            if E.ours(e):
                log.exception("a /past page failed in AccMan")
            elif lane is not None and not E.answered(e):    # the writer is gone, or closed:
                self.lost(cluster, e)   # the writes queued behind are refused, not sent
            page = Unavailable(E.read_detail(e, named(self, cluster)))
        if self._landed([op]):
            self._deliver([(op.done, page)])

    # -- events --------------------------------------------------------------------------

    def read_events(self, after, limit, wait_s, done):
        self._check_open()
        done = told(done)
        return self.home.events.read(after, limit, wait_s, done)

    def end_wait(self, done) -> None:
        """The long poll of `done` answered now (its client has left)."""
        if self.home.events is not None and not self._closed:    # else stop() tells it
            self.home.events.end_wait(done)

    def end_waits(self) -> None:
        """Answers every long poll now, with what it has (a server stopping)."""
        if self.home.events is not None:
            self.home.events.end_waits()

    def _spawn(self, coro) -> None:
        if self._closed:                    # nothing starts once closed: nothing would end it
            coro.close()
            return
        task = self._loop.create_task(coro)
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    # -- state ---------------------------------------------------------------------------

    @property
    def healthy(self) -> bool:
        return not self._closed and all(c.healthy for c in self.clusters)

    @property
    def unhealthy_detail(self) -> str | None:
        return "the store is closed" if self._closed else health_detail(self.clusters)

    @property
    def closed(self) -> bool:
        return self._closed

    @property
    def open_holds(self) -> int:
        return sum(c.open_holds for c in self.clusters)

    @property
    def stats(self) -> dict:
        """The names of accman.server.metrics; the counts as of this
        front-end's last commit or upkeep round.  A batch's time is its whole
        accman_apply round trip, the commit's WAL flush included."""
        stats = {"batches": self.batches, "mods": self.mods,
                 "fsync_s_total": self.commit_s_total,
                 "last_batch_mods": self.last_batch_mods, "queued_mods": self.queued_mods,
                 "accounts": sum(c.accounts for c in self.clusters),
                 "open_holds": self.open_holds,
                 "holds_expired": sum(c.holds_expired for c in self.clusters),
                 "clusters": len(self.clusters), "healthy": self.healthy}
        fills = [lane.fill.counts() for c in self.clusters for lane in c.lanes]
        stats.update({name: sum(f[name] for f in fills) for name in fills[0]})
        home = self.home
        stats["events_last"] = home.last_event
        if home.events is not None:
            stats["events_first"] = home.events.oldest()
            stats["events_trimmed"] = home.events.trimmed
        return stats

    def drain_samples(self):
        out, self._samples = self._samples, ([], [])
        return out

    async def aclose(self) -> None:
        """Waits for what is queued to commit while a cluster is healthy,
        then closes every connection.  What is left unanswered is told,
        once, as its task is cancelled: the changes still queued
        NotApplied (never sent), the reads Unavailable, and the batches in
        flight Unavailable too (their outcome unknown: a keyed retry gets
        the original reply)."""
        self._closing = True
        while any(lane.ops or lane.writing for c in self.clusters for lane in c.lanes) and \
                any(c.healthy for c in self.clusters):
            await asyncio.sleep(0.001)
        if self._closed:                    # after the wait: one close of two acts
            return
        self._closed = True
        closed, unsent = Unavailable("the store is closed"), NotApplied("the store is closed")
        unknown = Unavailable(E.CLOSED_MID_COMMIT)
        told = [(done, closed) for c in self.clusters for _, done in c.unanswered_reads()]
        told += [(op.done, closed if op.kind in (S.READ, PAST_BARRIER) else unsent)
                 for c in self.clusters for lane in c.lanes for op in lane.ops]
        told += [(op.done, closed if op.kind in (S.READ, PAST_BARRIER) else unknown)
                 for op in self._flying]
        self._flying.clear()
        for t in list(self._tasks):
            t.cancel()
        self._deliver(told)
        await asyncio.gather(*self._tasks, return_exceptions=True)
        await self.cursors.close()
        for c in self.clusters:
            if c.events is not None:
                await c.events.stop()
            for lane in c.lanes:
                if lane.writer is not None:
                    await lane.writer.close()
            if c.pool is not None:
                await c.pool.close()

    def close(self) -> None:
        """The interface's close, from outside the loop: runs aclose on it."""
        if self._loop.is_running():
            raise RuntimeError("on the store's loop, await store.aclose()")
        self._loop.run_until_complete(self.aclose())
