"""One gap-free event order for a store of several clusters.

Each cluster numbers the events of its own batches without gaps, under its
counter row's lock held to the commit, so a cluster's events become visible
in id order: what a reader sees of them is always 1..n.  One cluster is the
store's events' home (accman_schema.events_home, chosen once by `accman
migrate`): its own batches number their events in the store's order
directly, and the events of every other cluster are copied into it, in
their cluster's order, by accman_merge: under the home's counter lock
they get the store's next ids, and the home's accman_merged row for their
cluster records how far that cluster's events are copied, in the same
transaction.  So:

* the store's ids grow by one with no gaps, and survive a restart (the
  copy and its record commit together, durably);
* an account's events keep their order (an account lives in one cluster,
  and a cluster's events are copied in its order);
* a copy that fails part-way copies nothing, and the next pass starts from
  the record: no event is copied twice or skipped;
* several front-ends may copy at once: each pass locks its cluster's
  accman_merged row first, so they take turns, each from where the last
  one left.

One front-end at a time copies as other clusters commit (the one holding a
session advisory lock on the home, taken in the upkeep rounds); every
front-end copies whatever the other clusters have committed before it
answers /events, so that a read sees the events of every write answered
before it, by this front-end or another (SPEC "Routes": pipelined order).
"""

from __future__ import annotations

import asyncio

from accman.errors import StoreCorrupt, StoreError
from accman.postgres import errors as E
from accman.postgres.backends import Abandoned, committed

# Events copied per pass (one transaction on the home); a cluster further
# behind is copied in several passes.
MERGE_BATCH_MAX = 4096
MERGE_TIMEOUT_S = 10.0
# The session advisory lock the copying front-end holds on the home ("merg").
MERGE_LOCK_ID = 0x6D657267

_UPTO_SQL = "SELECT upto FROM accman_merged WHERE cluster_id = $1 FOR UPDATE"
_LOCAL_SQL = ("SELECT id, type, hid, seq, by, tot, at, key, hold FROM accman_events "
              "WHERE id > $1 ORDER BY id LIMIT $2")
_MERGE_SQL = "SELECT accman_merge($1, $2, $3, $4, $5, $6, $7, $8, $9, $10)"
_LEAD_SQL = "SELECT pg_try_advisory_lock($1)"
# The steps of a copy, for its errors: each names the cluster that failed
# (the home, written to, or the cluster read from) and what it was doing.
_LOCKING, _READING, _WRITING = ("the home, cluster {home}, failed taking its record of the copy",
                                "cluster {other} failed reading its events",
                                "the home, cluster {home}, failed writing the copy")
_READING_UPTO = "the home, cluster {home}, failed reading how far the copy is"


class _NothingNew(Exception):
    """A pass found nothing to copy: its transaction rolls back, since its
    row lock wrote nothing that needs keeping, and a commit would wait for
    the WAL's flush and the home's synchronous standby like a write."""


class Merger:
    """Copies the other clusters' events into the home's, for one store."""

    def __init__(self, store, home, others):
        self.store = store
        self.home = home
        self.others = others
        self.leading = False
        # Per cluster: the newest local id known committed, and known copied.
        self.committed = {c.index: 0 for c in others}
        self.copied = {c.index: 0 for c in others}
        self._lock = asyncio.Lock()       # one pass at a time in this front-end
        self._kicked = False
        # Reads asked for a whole copy (numbered), and the last one served.
        self._asked = self._served = 0

    # -- what wakes it ------------------------------------------------------------

    def note_commit(self, cluster, last_event: int) -> None:
        """A batch of this front-end committed events up to `last_event` on
        `cluster` (not the home)."""
        self.committed[cluster.index] = max(self.committed[cluster.index], last_event)
        self.kick()

    def note_notified(self, cluster, last: int | None) -> None:
        """Another front-end's batch committed on `cluster`, up to event
        `last` when the notification said."""
        if last is not None:
            self.committed[cluster.index] = max(self.committed[cluster.index], last)
        if self.leading:
            self.kick()

    def kick(self) -> None:
        if not self._kicked:
            self._kicked = True
            self.store._spawn(self._run())

    async def _run(self) -> None:
        self._kicked = False
        try:
            await self.catch_up(force=True)
        except Exception:       # said by _copy; the next kick or round copies again
            return

    def _copying(self, cluster) -> str:
        """What a copy does, for its complaints: both clusters named, as
        /health and the log name them (from 1)."""
        return (f"copying events of cluster {cluster.index + 1} to the home, "
                f"cluster {self.home.index + 1}")

    def _failed(self, step: str, cluster, exc: BaseException) -> StoreError:
        """`exc`, raised in `step` of a copy of `cluster`'s events, as an
        error that names the cluster at fault and the step."""
        return E.step_error(exc, step.format(home=self.home.index + 1,
                                             other=cluster.index + 1))

    # -- copying ----------------------------------------------------------------------

    async def catch_up(self, force: bool = False) -> None:
        """Copies what this front-end knows committed and not yet copied (with
        `force`, whatever the other clusters have); returns once it is
        copied, or raises."""
        async with self._lock:
            await self._copy(force)

    async def _copy(self, force: bool) -> None:
        """A failed copy is a complaint (accman.postgres.complaints),
        whoever asked for it: a read, a commit, or a round."""
        for c in self.others:
            try:
                while force or self.copied[c.index] < self.committed[c.index]:
                    if await self._pass(c) < MERGE_BATCH_MAX:
                        break
            except Exception as e:
                self.store.complaints.failed(self._copying(c), e)
                raise
            self.store.complaints.worked(self._copying(c))     # said if it had failed

    async def before_read(self) -> None:
        """Copies whatever the other clusters had committed when it was
        called, by any front-end: a read then sees the events of every
        write answered before it, wherever it was answered.  One forced
        copy serves every read that asked before it began, so that many
        long polls woken at once cost one copy, not one each."""
        self._asked += 1
        mine = self._asked
        async with self._lock:
            if self._served >= mine:
                return                  # a copy begun after this call is done
            began = self._asked
            await self._copy(force=True)
            self._served = began

    async def _pass(self, cluster) -> int:
        """One copy of `cluster`'s next events; how many were copied.  Its
        error names the cluster that failed, and the step."""
        if not self.home.healthy:
            raise StoreError(f"the home, cluster {self.home.index + 1}, takes no writes: "
                             f"{self.home.error}")
        step = [_LOCKING]               # the step under way, as _copied moves on
        try:
            async with self.home.pool.acquire() as hc:
                backend = hc.backend
                try:
                    # It holds the home's counter row, as a writer's batch does.
                    rows = await committed(hc, self._copied(hc, cluster, step),
                                           MERGE_TIMEOUT_S, self.home.abandoned)
                except Abandoned as e:
                    # Past the deadline while the home wrote (accman_merge
                    # takes the counter row; the commit may wait for the
                    # standby), its backend may go on and commit: no writes
                    # there while it waits.  Before, waiting for the copy's
                    # record (another front-end's copy may hold it) or while
                    # the other cluster was read, it held nothing of a
                    # writer's, and ends as its socket closes.
                    if step[0] == _WRITING:
                        self.store.lost(self.home, e)
                    else:
                        self.home.abandoned.discard(backend)
                    raise
        except StoreCorrupt:
            raise                       # damage, named where it is found: refused as such
        except Exception as e:
            raise self._failed(step[0], cluster, e) from None
        if not rows:
            return 0
        last = rows[-1]["id"]
        self.copied[cluster.index] = last
        self.committed[cluster.index] = max(self.committed[cluster.index], last)
        self.home.events.local_commit()
        return len(rows)

    async def _copied(self, hc, cluster, step: list) -> list:
        """The transaction of a pass, on the home's connection `hc`: the
        rows it copied (none: `cluster` is copied up to its newest).
        `step[0]` is the step under way."""
        try:
            async with hc.transaction():
                upto = await hc.fetchval(_UPTO_SQL, cluster.cluster_id,
                                         timeout=MERGE_TIMEOUT_S)
                step[0] = _READING
                rows = await cluster.pool.fetch(_LOCAL_SQL, upto, MERGE_BATCH_MAX,
                                                timeout=MERGE_TIMEOUT_S)
                if rows and rows[0]["id"] != upto + 1:
                    raise StoreCorrupt(f"events {upto + 1}..{rows[0]['id'] - 1} of cluster "
                                       f"{cluster.index + 1} were trimmed before they were "
                                       "copied to the home")
                step[0] = _WRITING          # the home's from here on, its commit too
                if not rows:
                    raise _NothingNew
                cols = list(zip(*rows, strict=True))
                await hc.execute(_MERGE_SQL, cluster.cluster_id, rows[-1]["id"], *cols[1:],
                                 timeout=MERGE_TIMEOUT_S)
        except _NothingNew:
            self.copied[cluster.index] = upto
            self.committed[cluster.index] = max(self.committed[cluster.index], upto)
            return []
        return rows

    async def upto(self, cluster) -> int:
        """How far `cluster`'s events are copied, as the home says; its
        error names the home."""
        try:
            return await self.home.pool.fetchval(
                "SELECT upto FROM accman_merged WHERE cluster_id = $1", cluster.cluster_id,
                timeout=MERGE_TIMEOUT_S)
        except Exception as e:
            raise self._failed(_READING_UPTO, cluster, e) from None

    # -- who copies as others commit --------------------------------------------------

    async def lead(self) -> None:
        """Takes the copying role when no front-end holds it (each round),
        on the home's listener connection: the role goes with that session."""
        if self.leading:
            return
        listener = self.home.events.listener
        if listener is not None and await listener.fetchval(_LEAD_SQL, MERGE_LOCK_ID):
            self.leading = True
            self.kick()

    def lost_home(self) -> None:
        """The home's listener connection went: so did the role."""
        self.leading = False
