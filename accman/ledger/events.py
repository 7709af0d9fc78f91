"""The embedded store's event stream (SPEC "Events"): every applied change
is an event with an id that grows by one, with no gaps, across restarts;
events are written in the same batch as their change (ext/ledger.pyx) and
shown only once that batch is durable.

This log keeps the newest durable events in memory (EVENTS_RING_MAX), reads
older ones from LevelDB (accman.ledger.eventrecords), answers long polls
without a thread or a timer of its own per waiter beyond one loop timer
handle (EVENTS_WAITERS_MAX of them), and finds the events records past the
retention for the writer to delete.  LevelDB may lag the durable events by
a few batches (accman.ledger.commit): the ring holds far more than that,
so what is read from LevelDB is always there.

Thread use: `append` runs on the writer thread and `read`/`wait` on the
loop, both under the committer's lock, which they are given.
"""

from __future__ import annotations

import collections

from accman.errors import Busy, EventsTrimmed
from accman.ledger import _ledger, eventrecords
from accman.limits import EVENTS_WAITERS_MAX
from accman.records import Event

# Events kept in memory for /events: a long poll that follows the stream
# reads them without touching LevelDB.  64 Ki events of ~100 bytes is a few
# MiB; older ones are read from the store.
EVENTS_RING_MAX = 65536
# Events records deleted past the retention per pass of the writer, so
# that a pass never holds the lock long; the next pass, a minute on, goes on.
EVENTS_TRIM_MAX = 4096
EVENTS_TRIM_INTERVAL_S = 60.0


def event_of(event_id: int, kind: int, hid: bytes, seq: int, by: int, tot: int, at: int,
             key: str | None, hold: int | None) -> Event:
    """An Event of a decoded change (_ledger.decode_changes)."""
    return Event(event_id, _ledger.EVENT_NAMES[kind], hid.hex(), seq, by, tot, at, key, hold)


class EventLog:
    def __init__(self, store, lock, first: int, last: int, retention_s: float):
        self.store = store
        self.lock = lock
        self.first = first          # the oldest id kept, 0: none yet
        self.last = last            # the newest durable id, 0: none yet
        self.retention_ms = int(retention_s * 1000)
        # Durable batches' events, oldest first: (first id, last id, the
        # batch's change entries), at least EVENTS_RING_MAX events of them.
        self.ring = collections.deque()
        self.ring_events = 0
        self.waiters: dict = {}     # id(waiter) -> [after, limit, done, timer]
        self.trimmed = 0
        self._loop = None

    @classmethod
    def open(cls, store, lock, retention_s: float) -> "EventLog":
        meta = store.get(_ledger.EVENTS_META_KEY)
        first, last = _ledger.unpack_events_meta(meta) if meta is not None else (0, 0)
        return cls(store, lock, first, last, retention_s)

    # -- the writer's side (under the lock) ---------------------------------------

    def append(self, first: int, count: int, changes) -> bool:
        """A durable batch's `count` events, ids from `first`, as its change
        entries (ext/changes.pxi); True when a long poll waits for them."""
        if not count:
            return False
        assert first == self.last + 1, "an event id skipped or repeated"
        ring = self.ring
        ring.append((first, first + count - 1, changes))
        self.ring_events += count
        while ring and self.ring_events - (ring[0][1] - ring[0][0] + 1) >= EVENTS_RING_MAX:
            oldest = ring.popleft()
            self.ring_events -= oldest[1] - oldest[0] + 1
        self.last = first + count - 1
        if not self.first:
            self.first = first
        return bool(self.waiters)

    def _from_ring(self, start: int, limit: int) -> list:
        """Up to `limit` events from `start` on, from the ring (start at
        or after its first id)."""
        ring = self.ring
        i = len(ring) - 1
        while i > 0 and ring[i][0] > start:     # readers mostly follow the tail
            i -= 1
        out = []
        while i < len(ring) and len(out) < limit:
            first, _, changes = ring[i]
            out += [e for e in _ledger.decode_changes(first, changes) if e[0] >= start]
            i += 1
        return [event_of(*e) for e in out[:limit]]

    def past_retention(self, now_ms: int) -> list:
        """Keys of the oldest events records whose every event is past the
        retention (never the one of the newest event), EVENTS_TRIM_MAX at
        most, which the writer deletes; `first` moves on."""
        if not self.first:
            return []
        cutoff = now_ms - self.retention_ms
        out = []
        first = self.first
        for key, _, last, values in eventrecords.records(self.store, first):
            if (len(out) >= EVENTS_TRIM_MAX or last >= self.last
                    or eventrecords.newest_at_ms(values) >= cutoff):
                break
            out.append(key)
            first = last + 1
        if out:
            self.trimmed += first - self.first
            self.first = first
        return out

    # -- reading (on the loop, under the lock) --------------------------------------

    def read(self, after: int, limit: int):
        """(events, next) after `after`, oldest first, or EventsTrimmed."""
        if self.first and after < self.first - 1:
            return EventsTrimmed(self.first)
        if after >= self.last:
            return [], min(after, self.last) if self.last else after
        start = after + 1
        ring = self.ring
        ring_first = ring[0][0] if ring else self.last + 1
        if start >= ring_first:
            events = self._from_ring(start, limit)
        else:
            # Older than the ring: LevelDB has them (it lags the durable
            # events by far less than the ring holds); the newer ones of
            # the page come from the ring, which LevelDB may not have yet.
            older = min(limit, ring_first - start)
            events = [event_of(*e) for e in eventrecords.read(self.store, start, older)]
            assert len(events) == older, "an event older than the ring is not in LevelDB"
            if older < limit and ring:
                events += self._from_ring(ring_first, limit - older)
        return events, (events[-1].id if events else after)

    def wait(self, loop, after: int, limit: int, wait_s: float, done) -> None:
        """Registers a long poll: `done((events, next))` once an event after
        `after` is durable, or with no events after `wait_s`."""
        if len(self.waiters) >= EVENTS_WAITERS_MAX:
            raise Busy(f"EVENTS_WAITERS_MAX ({EVENTS_WAITERS_MAX}) long polls are waiting; "
                       "retry shortly")
        self._loop = loop
        waiter = [after, limit, done, None]
        waiter[3] = loop.call_later(wait_s, self._timeout, waiter)
        self.waiters[id(waiter)] = waiter

    def _timeout(self, waiter) -> None:
        with self.lock:
            if self.waiters.pop(id(waiter), None) is None:
                return
        waiter[2](([], waiter[0]))

    def wake(self) -> None:
        """On the loop: answers every long poll that now has events."""
        ready = []
        with self.lock:
            for key, waiter in list(self.waiters.items()):
                if waiter[0] < self.last:
                    del self.waiters[key]
                    ready.append((waiter, self.read(waiter[0], waiter[1])))
        for waiter, outcome in ready:
            waiter[3].cancel()
            waiter[2](outcome)
