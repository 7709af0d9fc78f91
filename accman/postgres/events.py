"""GET /events on PostgreSQL: pages of the event table, and long polls.

Every cluster of a store has an EventReader; the one of the events' home
(the store's only cluster, or the home of several: accman.postgres.merge)
answers the reads, and the others only hear their cluster's commits for
the merger, and trim what it has copied.

A long poll is one entry in a bounded list (limits.EVENTS_WAITERS_MAX), no
task and no timer of its own: one timer, for the earliest deadline, serves
them all.  Every front-end LISTENs on accman_events; accman_apply NOTIFYs
with the last event id of each batch at its commit, so a waiter here hears
of other front-ends' commits as soon as they are durable.  A waiter whose
deadline passes reads once more (a notification lost with a connection
cannot hide an event) and is answered with what there is.
"""

from __future__ import annotations

import asyncio
import logging
import time

from accman.errors import Busy, EventsTrimmed, Unavailable
from accman.limits import EVENTS_WAITERS_MAX
from accman.postgres import errors as E
from accman.postgres.backends import Connection, committed, pool_read
from accman.postgres.complaints import doing, named
from accman.store import check_events
from accman.postgres.schema import EVENT_TYPES, NOTIFY_CHANNEL
from accman.records import Event

log = logging.getLogger("accman.postgres")

_PAGE_SQL = ("SELECT id, type, hid, seq, by, tot, at, key, hold FROM accman_events "
             "WHERE id > $1 ORDER BY id LIMIT $2")
# The oldest event kept (or the next id, when none is), and the newest.
_ENDS_SQL = ("SELECT coalesce((SELECT min(id) FROM accman_events), next_event), "
             "next_event - 1 FROM accman_counter")
# Keeps a contiguous run of the newest events: everything below the first
# event younger than the retention ($1, in ms) goes (the newest event always
# stays), judged by the database's clock, which stamped them (a front-end's
# clock ahead of it would trim events younger than the retention), read once
# for the statement, and on
# a cluster that is not the home, nothing past what is copied ($2); on the
# home ($3), nothing past a cursor of the store (the webhook's: its
# receiver has not acknowledged what is after it, whatever its age; other
# clusters number their own events, which cursors do not name).
# Returns how many went, and the newest of them.
_TRIM_SQL = ("WITH gone AS (DELETE FROM accman_events WHERE id <= $2 AND id <= coalesce("
             "(SELECT min(value) FROM accman_cursors WHERE $3), $2) AND id < coalesce("
             "(SELECT id FROM accman_events WHERE at >= (extract(epoch FROM "
             "statement_timestamp()) * 1000)::bigint - $1 ORDER BY id LIMIT 1), "
             "(SELECT max(id) FROM accman_events)) RETURNING id) "
             "SELECT count(*), max(id) FROM gone")
_NO_BOUND = 2 ** 63 - 1
# A trim not answered by then is given up (a complaint; the next one goes on).
TRIM_TIMEOUT_S = 60.0


class EventReader:
    """The event reads and long polls of one cluster."""

    def __init__(self, store, cluster):
        self.store = store
        self.cluster = cluster
        self.home = cluster is store.home
        self.waiters: list = []          # [after, limit, deadline, done]
        self.listener = None
        self._restarting = asyncio.Lock()
        self._timer = None
        self._waking = False
        # The oldest event id kept, as last seen, or when none was, the id
        # the next event gets: an event committed since is the oldest then
        # (0: not read yet).  PgStore.stats says it as the embedded store does.
        self.first = 0
        self.ended = False               # end_waits was called: no read waits any more
        # Calls waiting for their first read, by the page they ask for: one
        # query answers all that ask for the same page (a thousand pollers
        # of the stream's end are one query, not a thousand); the polls
        # among them count toward EVENTS_WAITERS_MAX.
        self._queued: dict = {}          # (after, limit) -> [(deadline or None, done)]
        self._queued_polls = 0
        self._reading = False
        # What a read has taken out of _queued or waiters while its query
        # runs: end_wait finds a poll there too, or its client's leaving
        # would go unheard until its deadline.
        self._in_first_read: dict = {}   # as _queued
        self._in_wake: list = []         # as waiters
        # Commits heard of so far: a read that began before one re-reads
        # rather than wait for the next.
        self._commits = 0
        self.trimmed = 0                 # events this front-end trimmed since it started

    def oldest(self) -> int:
        """The oldest event id kept; 0 while none is known to be, as on the
        embedded store: an event counts from the commit that wrote it, not
        from the next round that reads the table."""
        return self.first if 0 < self.first <= self.cluster.last_event else 0

    async def start(self) -> None:
        """LISTENs on a session of its own (`_closed` hears it end)."""
        from accman.postgres.connecting import connect
        listener = await connect(self.cluster.url, connection_class=Connection,
                                 said=self.cluster.store.service_said,
                                 accept=self.cluster.accept)
        try:
            await listener.add_listener(NOTIFY_CHANNEL, self._notified)
        except BaseException:
            listener.terminate()
            raise
        self.listener = listener
        listener.add_termination_listener(self._closed)

    async def restart(self) -> None:
        """A new listener in place of the last (one at a time: a
        reconnection's and _relisten's may meet)."""
        async with self._restarting:
            merger = self.store.merger
            if self.listener is not None:
                old, self.listener = self.listener, None
                old.terminate()
                if self.home and merger is not None:
                    merger.lost_home()          # the copying role went with the session
            await self.start()
        # What was missed while away.
        if self.home:
            self.local_commit()
        else:
            merger.kick()

    def _closed(self, conn) -> None:
        """The listener's session closed.  Still the one in use, it was
        closed by the database's side (a restart, a failover, its backend
        ended): no commit would be heard
        again, and long polls would wait out their wait.  It is made again
        at once, the writers left as they are (one may have a batch in
        flight); one that cannot be made loses the cluster."""
        if conn is self.listener and not self.store.closed:
            self.store._spawn(self._relisten())

    async def _relisten(self) -> None:
        try:
            await self.restart()
        except Exception as e:
            self.store.lost(self.cluster, e)

    async def stop(self) -> None:
        """Every poll still waiting, or queued for its first read, is told
        the store is closing (the store's close has cancelled the reads:
        each put back what it held)."""
        if self._timer is not None:
            self._timer.cancel()
        told = [w[3] for w in self.waiters]
        told += [done for calls in self._queued.values() for _, done in calls]
        self.waiters.clear()
        self._queued.clear()
        self.store._deliver([(done, Unavailable("the store is closing")) for done in told])
        if self.listener is not None:
            await self.listener.close()

    def read(self, after, limit, wait_s, done):
        check_events(after, limit, wait_s)
        if wait_s > 0 and len(self.waiters) + self._queued_polls >= EVENTS_WAITERS_MAX:
            raise Busy(f"EVENTS_WAITERS_MAX ({EVENTS_WAITERS_MAX}) long polls are waiting; "
                       "retry shortly")
        deadline = time.monotonic() + wait_s if wait_s > 0 and not self.ended else None
        self._queued.setdefault((after, limit), []).append((deadline, done))
        if deadline is not None:
            self._queued_polls += 1
        if not self._reading:
            self._reading = True
            self.store._spawn(self._first_reads())
        return None

    def end_wait(self, done) -> None:
        """The long poll of `done` is answered now, with what there is
        (after one more read); one still waiting for its first read waits
        no more.  Nothing when it is not waiting."""
        for w in self.waiters + self._in_wake:
            if w[3] is done:
                # Due now: the deadline's round reads and answers it, taking
                # it out of the list only as its read starts (one being read
                # by a wake-up goes back to the list due, if it finds none).
                w[2] = time.monotonic()
                self._arm()
                return
        for queued in (self._queued, self._in_first_read):
            for calls in queued.values():
                for n, (deadline, d) in enumerate(calls):
                    if d is done and deadline is not None:
                        calls[n] = (None, d)    # answered by its read, with what there is
                        self._queued_polls -= 1
                        return

    async def _read_held(self, w):
        """The outcome for waiter `w`, taken out of the list while it is read
        (so that no other round answers it too); put back if the read is
        cancelled (the store closing), for stop() to tell."""
        try:
            return await self._outcome(w[0], w[1])
        except BaseException:
            self.waiters.append(w)
            raise

    async def _page(self, after, limit):
        """(events, next) after `after`, or EventsTrimmed.  With none after
        it, `next` is `after`, or the newest id when `after` is past it (the
        reader is told where the stream ends, as the embedded store does)."""
        from accman.postgres.store import READ_TIMEOUT_S
        rows, ends = await self._rows(after, limit, READ_TIMEOUT_S)
        if not rows:
            first, last = ends
            if after + 1 < first:
                raise EventsTrimmed(first)
            return [], min(after, last)
        if rows[0]["id"] != after + 1:
            raise EventsTrimmed(rows[0]["id"])
        events = [Event(r[0], EVENT_TYPES[r[1]], bytes(r[2]).hex(), r[3], r[4], r[5], r[6],
                        r[7], r[8]) for r in rows]
        self.cluster.note_event(events[-1].id)      # read: so it is written
        return events, events[-1].id

    async def _rows(self, after, limit, timeout_s):
        """The page's rows, and with none, the ends of the stream: both
        within `timeout_s`."""
        pool, deadline = self.cluster.pool, time.monotonic() + timeout_s
        rows = await pool_read(pool, timeout_s, "fetch", _PAGE_SQL, after, limit)
        if rows:
            return rows, None
        # A deadline spent already times out at once.
        return rows, await pool_read(pool, deadline - time.monotonic(), "fetchrow", _ENDS_SQL)

    async def _copy_first(self):
        """What every front-end's answered writes committed on the other
        clusters, copied before a read: None, or the Unavailable that
        answers the read instead."""
        merger = self.store.merger
        if merger is not None:
            try:
                await merger.before_read()
            except Exception as e:
                return Unavailable(f"the events of a cluster cannot be copied: "
                                   f"{E.describe(e)}")
        return None

    async def _outcome(self, after, limit, copied=False):
        """A page or the error that answers it; `copied`: _copy_first ran
        after every call it answers was made."""
        if not copied:
            failed = await self._copy_first()
            if failed is not None:
                return failed
        try:
            return await self._page(after, limit)
        except EventsTrimmed as e:
            return e
        except Exception as e:
            return Unavailable(E.read_detail(e, named(self.store, self.cluster)))

    async def _answer(self, after, limit, done) -> bool:
        """Reads a page for a waiter; False when there is nothing yet."""
        outcome = await self._outcome(after, limit)
        if isinstance(outcome, tuple) and not outcome[0]:
            return False
        self.store._deliver([(done, outcome)])
        return True

    async def _first_reads(self) -> None:
        """The first read of every call queued, one query per page asked;
        each query starts after every call it answers was made."""
        queued: dict = {}
        try:
            while self._queued:
                queued, self._queued = self._queued, {}
                self._in_first_read = queued
                commits = self._commits                 # heard of from now on: read again
                failed = await self._copy_first()       # one copy for the whole batch
                while queued:
                    (after, limit), calls = next(iter(queued.items()))
                    outcome = failed or await self._outcome(after, limit, copied=True)
                    del queued[(after, limit)]
                    # Only a reader at the end waits: one past it is told
                    # at once where the stream ends, as the embedded store does.
                    waits = (isinstance(outcome, tuple) and outcome == ([], after)
                             and not self.ended)
                    answered = []
                    for deadline, done in calls:
                        if deadline is not None:
                            self._queued_polls -= 1
                        if waits and deadline is not None:
                            self.waiters.append([after, limit, deadline, done])
                        else:
                            answered.append((done, outcome))
                    self.store._deliver(answered)
                if self._commits != commits:
                    self.local_commit()         # a commit or a lost cluster, during the reads
                self._arm()
        finally:
            for page, calls in queued.items():  # not read: cancelled, for stop() to tell
                self._queued.setdefault(page, []).extend(calls)
            self._in_first_read = {}
            self._reading = False

    # -- waking ----------------------------------------------------------------------

    def _notified(self, _conn, _pid, _channel, payload) -> None:
        # The payload is the newest event id of a commit (any front-end's,
        # a copy's among them); anything else (one sent by hand) says only
        # that something committed.
        last = int(payload) if payload.isdigit() else None
        if self.home:
            if last is not None:
                self.cluster.note_event(last)       # for /metrics before the next round
            self.local_commit()
        else:
            self.store.merger.note_notified(self.cluster, last)

    def local_commit(self) -> None:
        """Events may have been committed: waiters read again."""
        self._commits += 1
        if self.waiters and not self._waking:
            self._waking = True
            self.store._spawn(self._wake())

    async def _wake(self) -> None:
        # The waiters are taken out of the list while their reads run, so
        # that the deadline's round cannot answer one a second time; those
        # asking the same page share one read.  A commit heard of meanwhile
        # wakes them again.
        commits = self._commits
        taken, self.waiters = self.waiters, []
        self._in_wake = taken
        pages: dict = {}
        for w in taken:
            pages.setdefault((w[0], w[1]), []).append(w)
        try:
            failed = await self._copy_first()
            while pages:
                (after, limit), group = next(iter(pages.items()))
                outcome = failed or await self._outcome(after, limit, copied=True)
                del pages[(after, limit)]
                if isinstance(outcome, tuple) and not outcome[0] and not self.ended:
                    self.waiters.extend(group)
                else:
                    self.store._deliver([(w[3], outcome) for w in group])
        finally:
            for group in pages.values():        # not read: cancelled, for stop() to tell
                self.waiters.extend(group)
            self._in_wake = []
            self._waking = False
            self._arm()
        if self._commits != commits:
            self._commits -= 1          # not a new commit: the same, heard again
            self.local_commit()

    def _arm(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        if self.waiters:
            loop = self.store._loop
            first = min(w[2] for w in self.waiters)
            self._timer = loop.call_at(loop.time() + max(0.0, first - time.monotonic()),
                                       self._on_deadline)

    def _on_deadline(self) -> None:
        self._timer = None
        self.store._spawn(self._expire_waiters())

    async def _expire_waiters(self, everyone=False) -> None:
        """Answers the waiters whose deadline passed (all of them when
        `everyone`) after one more read each: a notification lost with a
        connection cannot hide an event."""
        now = time.monotonic()
        for w in [w for w in self.waiters if everyone or w[2] <= now]:
            if w not in self.waiters:
                continue
            self.waiters.remove(w)
            self.store._deliver([(w[3], await self._read_held(w))])
        self._arm()

    def end_waits(self) -> None:
        """Every waiter is answered now, with what there is, and no read
        waits from now on."""
        self.ended = True
        if self.waiters:
            self.store._spawn(self._expire_waiters(everyone=True))

    async def trim(self, retention_s: float) -> None:
        retention_ms = int(retention_s * 1000)
        try:
            copied = _NO_BOUND if self.home else await self.store.merger.upto(self.cluster)
            async with self.cluster.pool.acquire() as conn:
                # Its locks are on events past the retention: no writer's.
                gone, newest_gone = await committed(conn, conn.fetchrow(
                    _TRIM_SQL, retention_ms, copied, self.home), TRIM_TIMEOUT_S, None)
        except Exception as e:
            self.store.complaints.failed(doing(self.store, "trimming events", self.cluster), e)
            return
        self.store.complaints.worked(doing(self.store, "trimming events", self.cluster))
        if gone:
            self.trimmed += gone
            self.first = max(self.first, newest_gone + 1)
