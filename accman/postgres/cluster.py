"""One PostgreSQL cluster of a store, as the store's writers and readers
see it: its writer lanes (connection, prepared accman_apply, queue) and
its read pool."""

from __future__ import annotations

import functools
from collections import deque

import asyncpg

from accman.errors import StoreError
from accman.postgres import errors as E
from accman.postgres.backends import Connection, identify, no_reset
from accman.postgres.committing import lane_fill
from accman.postgres.connecting import (CONNECT_TIMEOUT_S, SESSION_SETTINGS, connect,
                                        connect_each_host, refuse_undurable)
from accman.postgres.serving import join, same_store

# Writer connections per cluster, each with one batch in flight.  One: with
# 64 callers a second connection, whether it took half of the accounts or
# the next batch in time, made the batches smaller, and every batch still
# waits for the counter row, so mods/s fell (docs/PERFORMANCE.md, "PostgreSQL");
# a second front-end is what adds throughput.
WRITE_LANES = 1
# /tot queries of one cluster in flight at once: a second reader starts once
# as many reads wait as the first query carries (once running, a reader
# takes what is queued each time its query returns), so that a read waits
# for less than two round trips (docs/PERFORMANCE.md, "PostgreSQL": /tot
# at 64 connections 1.03-1.07x one query at a time).
READ_BATCHES_MAX = 2
# Read connections per cluster (the batched /tot queries, /past pages, event
# reads): one more than READ_BATCHES_MAX, so that a /past page does not
# wait behind the /tot queries alone (upkeep and event reads share it).
READ_POOL_CONNECTIONS_MAX = READ_BATCHES_MAX + 1
# A batch's outcomes, and the changes it made (schema version 8: null when
# its charges took the set path, each a change).  The setting is read after
# the function has run: a function in FROM is scanned before the select
# list is computed.
_APPLY_SQL = ("SELECT a.*, nullif(current_setting('accman.changes', true), '')::bigint "
              "FROM accman_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11) AS a")
# In a statement or a transaction: an idle one holds no lock, and ends once
# its client is found gone (connecting.KEEPALIVE; and with track_activities
# off every state reads 'disabled': not waited for).
_RUNNING_SQL = ("SELECT count(*) FROM pg_stat_activity a JOIN unnest($1::int[], "
                "$2::timestamptz[]) AS b(pid, started) ON a.pid = b.pid "
                "AND a.backend_start = b.started WHERE a.state IN "
                "('active', 'idle in transaction', 'idle in transaction (aborted)')")
STALLED = ("a commit of the connection the store dropped still waits in the database (for "
           "its synchronous standby, or for a lock): writes are refused until it ends")


class Lane:
    """One writer connection of a cluster and the calls queued for it.  An
    account always goes to the same lane (by its id), so its calls apply
    in order; the lanes of a cluster commit side by side, one batch each
    in flight, so one's commit overlaps the next's work."""

    def __init__(self, fill):
        self.writer = None
        self.apply = None
        self.ops: deque = deque()          # B.Op, an ordered /past among them
        self.writing = False
        self.fill = fill                   # when the next batch goes (committing.lane_fill)

    async def connect(self, url, on_closed, said, accept) -> None:
        """Connects the writer (the last one, left idle by a reconnection
        that failed after it, goes); `on_closed` hears its close, `said`
        (the store's) says its service file's failures, `accept` vets the
        host (serving.same_store)."""
        self.drop()
        writer = await connect(url, connection_class=Connection, said=said, accept=accept)
        try:
            if await writer.fetchval("SHOW transaction_read_only",
                                     timeout=CONNECT_TIMEOUT_S) == "on":
                raise StoreError(f"{E.READ_ONLY}: waiting for one that does")
            await refuse_undurable(writer)
            self.apply = await writer.prepare(_APPLY_SQL)
            await identify(writer)
        except BaseException:
            await writer.close()
            raise
        self.writer = writer
        writer.add_termination_listener(on_closed)

    def drop(self):
        """Closes the writer's socket; returns its backend, which may go on
        in the database (see Cluster.stalled)."""
        writer, self.writer = self.writer, None
        self.fill.forget()                 # its callers in flight went with the connection
        if writer is not None:
            writer.terminate()
            return writer.backend
        return None


class Cluster:
    """One PostgreSQL cluster of the store: its writer lanes, its read pool
    and queue, its event reader."""

    def __init__(self, url: str, index: int, cluster_id: bytes, store, clusters: int):
        """The `index`th of the store's `clusters`."""
        self.store = store
        self.url = url
        self.index = index
        self.cluster_id = cluster_id
        self.accept = same_store(cluster_id)   # every connection's host vetted
        self.lanes = [Lane(lane_fill(clusters)) for _ in range(WRITE_LANES)]
        self.pool = None
        self.reads: list = []              # (hid, done)
        self.readers = 0                   # /tot queries running or about to
        self._flying: list = []            # the reads of each /tot query in flight
        self.reconnecting = False
        self.abandoned: set = set()        # backends dropped mid-commit: Lane.drop, backends
        self.stall_said = False            # STALLED logged (upkeep), once while it lasts
        # Batches the database refused in a row (E.FAILED): each makes the
        # store wait twice as long before it takes writes again.
        self.refused_in_row = 0
        self.losses = 0                    # store.lost calls: one reconnection sees another
        self.error: str | None = "not connected yet"
        self.events = None                 # accman.postgres.events.EventReader
        # The counter row as last seen (after a batch of ours, or a round).
        self.last_event = 0
        self.accounts = 0
        self.open_holds = 0
        self.holds_expired = 0

    def lane(self, hid: bytes) -> Lane:
        return self.lanes[hid[0] % WRITE_LANES]

    @property
    def healthy(self) -> bool:
        return self.error is None

    @property
    def reads_flying(self) -> int:
        """Reads in the /tot queries in flight."""
        return sum(len(batch) for batch in self._flying)

    def another_reader(self) -> bool:
        """Whether a /tot read just queued starts a query of its own: the
        first, or another (up to READ_BATCHES_MAX) once as many reads wait
        as the queries in flight carry."""
        return self.readers == 0 or (self.readers < READ_BATCHES_MAX
                                     and len(self.reads) >= self.reads_flying)

    def take_reads(self, most: int) -> list:
        """The oldest `most` queued reads, for a query now in flight."""
        taken = self.reads[:most]
        del self.reads[:most]
        self._flying.append(taken)
        return taken

    def landed(self, taken: list) -> None:
        """A query of `take_reads` has its answer, or has failed."""
        self._flying = [batch for batch in self._flying if batch is not taken]

    def drop(self) -> None:
        """The cluster is lost: each lane's writer goes."""
        for lane in self.lanes:
            backend = lane.drop()
            if backend is not None:
                self.abandoned.add(backend)

    def writer_closed(self, conn) -> None:
        """Hears the close of each writer's session.  One closed while still
        in use was closed by the database's side (a restart, a failover,
        its backend ended): the cluster is lost as it closes, idle or not,
        and reconnected.  The upkeep round alone would miss a restart
        quicker than a round (it reads through the pool, which connects
        anew): /health would say 200 while the next batch met a closed
        socket.  (The listener's session: EventReader._closed.)"""
        if any(conn is lane.writer for lane in self.lanes) and not self.store.closed:
            self.store.lost(self, E.closed_by_the_database())

    async def stalled(self, conn) -> bool:
        """Whether a backend dropped mid-commit (a writer's, or an upkeep's:
        accman.postgres.backends) since the store last took writes here is
        still in a statement or a transaction.  A backend that waits for its
        commit's synchronous standby does not notice its client gone and
        holds its accounts' locks: a new writer's batches would queue behind
        it, one dropped connection each, up to max_connections; and ending
        it would make its commit, on this server alone, visible to readers.
        So the store takes no writes here until it ends by itself (the
        standby back, or the requirement lifted).  On another server (a
        failover) none matches."""
        if self.abandoned:
            pids, starts = zip(*self.abandoned, strict=True)
            if await conn.fetchval(_RUNNING_SQL, list(pids), list(starts),
                                   timeout=CONNECT_TIMEOUT_S):
                return True
            self.abandoned, self.stall_said = set(), False
        return False

    def unanswered_reads(self) -> list:
        """Every /tot read queued or in flight, (hid, done) each."""
        return self.reads + [read for batch in self._flying for read in batch]

    def note_counts(self, counts) -> None:
        """accman_counter's (last event id, accounts, open holds, holds
        expired), when a transaction of ours has read or written it."""
        if counts is not None:
            self.note_event(counts[0])
            self.accounts, self.open_holds, self.holds_expired = counts[1:]

    def note_event(self, last: int) -> None:
        """An event id known written: the newest only grows, whatever order
        the news arrives in (a commit's reply may come after a later
        commit's notification)."""
        self.last_event = max(self.last_event, last)

    async def connect(self, healthy: bool = True) -> None:
        """The writer lanes and the read pool; healthy once they are, unless
        the caller says so itself (a reconnection, whose listener comes
        back after them)."""
        try:
            for lane in self.lanes:
                await lane.connect(self.url, self.writer_closed, self.store.service_said,
                                   self.accept)
            if await self.stalled(self.lanes[0].writer):
                raise StoreError(STALLED)
            await join(self.lanes[0].writer, *self.recorded_shape())
            # min_size=0: the pool connects when a read asks.  With a floor
            # it restores the floor by itself while the database is down,
            # logging a traceback for every failed try (asyncpg.pool), while
            # the store already says the cluster is lost, once.
            # Its connects end at CONNECT_TIMEOUT_S, not the driver's 60 s, on each
            # host of the URL, the next tried beside one that does not answer
            # (connect_each_host).
            if self.pool is not None:
                # A reconnection: the pool's connections made before the
                # loss may have been ended by the database meanwhile (its
                # keepalive finds a client cut off for 11 s gone), their
                # ends not told across the cut, and each would fail one
                # read: each is closed and made anew at its next use.
                await self.pool.expire_connections()
            self.pool = self.pool or await asyncpg.create_pool(
                self.url, min_size=0, max_size=READ_POOL_CONNECTIONS_MAX,
                timeout=CONNECT_TIMEOUT_S, reset=no_reset,
                server_settings=SESSION_SETTINGS, connection_class=Connection, init=identify,
                connect=functools.partial(connect_each_host, said=self.store.service_said,
                                          accept=self.accept))
        except BaseException:
            for lane in self.lanes:
                lane.drop()
            raise
        if healthy:
            self.error = None

    def recorded_shape(self) -> tuple:
        """What this cluster records of the store as this front-end opened
        it (serving.join): the events' home, and on the home the others."""
        store = self.store
        if len(store.clusters) == 1:
            return None, None
        others = frozenset(c.cluster_id for c in store.clusters if c is not store.home)
        return store.home.cluster_id, others if self is store.home else None


def health_detail(clusters) -> str | None:
    """/health's 503 detail for a store of `clusters`, or None when every
    one can commit: with some of several lost, the others' accounts still
    take writes, and the detail says which cannot."""
    lost = [(n, c) for n, c in enumerate(clusters, 1) if not c.healthy]
    if not lost:
        return None
    # AccMan's words (errors.describe): each cause once, by its clusters
    # when they differ, so that an operator reads why as well as which.
    causes = dict.fromkeys(c.error for _, c in lost)
    why = next(iter(causes)) if len(causes) == 1 else "; ".join(
        f"cluster {n}: {c.error}" for n, c in lost)
    if len(lost) == len(clusters):
        return f"the store cannot commit ({why}); the server takes no writes"
    numbers = [str(n) for n, _ in lost]
    which = "cluster " + numbers[0] if len(lost) == 1 else "clusters " + ", ".join(numbers)
    return (f"{which} of the store's {len(clusters)} cannot commit ({why}): writes to "
            "accounts there are refused, the others' are taken")
