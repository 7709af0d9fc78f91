"""The embedded store's event stream (SPEC "Events"): every applied change
is an event with an id that grows by one, with no gaps, across restarts;
events are written in the same batch as their change (ext/ledger.pyx) and
shown only once that batch is durable.

This log keeps the newest durable events in memory (EVENTS_RING_MAX), reads
older ones from LevelDB, answers long polls without a thread or a timer of
its own per waiter beyond one loop timer handle (EVENTS_WAITERS_MAX of
them), and finds the events past the retention for the writer to delete.

Thread use: `append` runs on the writer thread and `take`/`wait` on the
loop, all under the committer's lock, which they are given; `fetch`, the
part of a read that scans LevelDB and decodes, runs outside it, so that a
reader never holds up a commit.
"""

from __future__ import annotations

import collections
import itertools

from accman.errors import Busy, EventsTrimmed
from accman.ledger import _ledger
from accman.limits import EVENTS_WAITERS_MAX
from accman.records import Event

# Events kept in memory for /events: a long poll that follows the stream
# reads them without touching LevelDB.  64 Ki events of ~100 bytes is a few
# MiB; older ones are read from the store.
EVENTS_RING_MAX = 65536
# Records deleted past the retention per pass of the writer, so that a
# pass never holds the lock long; the next pass, a minute on, goes on.
EVENTS_TRIM_MAX = 4096
EVENTS_TRIM_INTERVAL_S = 60.0


def decode(event_id: int, value: bytes) -> Event:
    kind, hid, seq, by, tot, at, key, hold = _ledger.unpack_event(value)
    return Event(event_id, kind, hid.hex(), seq, by, tot, at, key, hold)


class EventLog:
    def __init__(self, store, lock, first: int, last: int, retention_s: float):
        self.store = store
        self.lock = lock
        self.first = first          # the oldest id kept, 0: none yet
        self.last = last            # the newest durable id, 0: none yet
        self.retention_ms = int(retention_s * 1000)
        self.ring = collections.deque(maxlen=EVENTS_RING_MAX)   # (id, value), durable
        self.waiters: dict = {}     # id(waiter) -> [after, limit, done, timer, loop]
        self.waits_ended = False    # end_waits was called: no read waits from now on
        self.trimmed = 0

    @classmethod
    def open(cls, store, lock, retention_s: float) -> "EventLog":
        meta = store.get(_ledger.EVENTS_META_KEY)
        first, last = _ledger.unpack_events_meta(meta) if meta is not None else (0, 0)
        return cls(store, lock, first, last, retention_s)

    # -- the writer's side (under the lock) ---------------------------------------

    def append(self, events: list) -> set:
        """A durable batch's events; returns the loops whose long polls now
        have events to hear (`wake` on each)."""
        if not events:
            return set()
        assert events[0][0] == self.last + 1, "an event id skipped or repeated"
        self.ring.extend(events)
        self.last = events[-1][0]
        if not self.first:
            self.first = events[0][0]
        return {waiter[4] for waiter in self.waiters.values()}

    def past_retention(self, now_ms: int) -> tuple[list, bool]:
        """Ids of the oldest events past the retention (never the newest),
        EVENTS_TRIM_MAX at most, which the writer deletes; `first` moves on.
        The bool is True when the pass was full: more may be past it."""
        if not self.first:
            return [], False
        cutoff = now_ms - self.retention_ms
        out = []
        start = self.first
        for k, v in self.store.scan(_ledger.event_key(start), _ledger.EVENT_PREFIX,
                                    EVENTS_TRIM_MAX):
            event_id = _ledger.event_key_id(k)
            if event_id >= self.last or _ledger.unpack_event(v)[5] >= cutoff:
                break
            out.append(event_id)
        if out:
            self.first = out[-1] + 1
            self.trimmed += len(out)
        return out, len(out) == EVENTS_TRIM_MAX

    # -- reading ------------------------------------------------------------------------

    def take(self, after: int, limit: int):
        """Under the lock: which events a read after `after` serves, fixed
        now.  The outcome itself when it is known at once (EventsTrimmed,
        or no events: ([], next)), else a Page for `fetch`."""
        if self.first and after < self.first - 1:
            return EventsTrimmed(self.first)
        if after >= self.last:
            return [], min(after, self.last) if self.last else after
        # Never past `last`: LevelDB has a batch's events a moment before
        # the writer says they are durable, and `next` must not run ahead.
        start, stop = after + 1, min(self.last, after + limit)
        ring = self.ring
        ring_first = ring[0][0] if ring else self.last + 1
        if start < ring_first:
            return Page(start, stop, None)
        at = start - ring_first
        return Page(start, stop, list(itertools.islice(ring, at, at + stop - start + 1)))

    def fetch(self, taken):
        """Outside the lock: the outcome of a `take`, (events, next) oldest
        first, or EventsTrimmed when trimming took them meanwhile."""
        if type(taken) is not Page:
            return taken
        pairs = taken.pairs
        if pairs is None:
            n = taken.stop - taken.start + 1
            pairs = [(_ledger.event_key_id(k), v) for k, v in self.store.scan(
                _ledger.event_key(taken.start), _ledger.EVENT_PREFIX, n)]
            if not pairs or pairs[0][0] != taken.start:
                return EventsTrimmed(self.first)
        assert [i for i, _ in pairs] == list(range(taken.start, taken.stop + 1)), \
            "a page of events with a gap"
        return [decode(i, v) for i, v in pairs], taken.stop

    def read(self, after: int, limit: int):
        """(events, next) after `after`, oldest first, or EventsTrimmed;
        called without the lock."""
        with self.lock:
            taken = self.take(after, limit)
        return self.fetch(taken)

    def wait(self, loop, after: int, limit: int, wait_s: float, done) -> None:
        """Registers a long poll: `done((events, next))` once an event after
        `after` is durable, or with no events after `wait_s`."""
        if len(self.waiters) >= EVENTS_WAITERS_MAX:
            raise Busy(f"EVENTS_WAITERS_MAX ({EVENTS_WAITERS_MAX}) long polls are waiting; "
                       "retry shortly")
        waiter = [after, limit, done, None, loop]
        waiter[3] = loop.call_later(wait_s, self._timeout, waiter)
        self.waiters[id(waiter)] = waiter

    def _timeout(self, waiter) -> None:
        with self.lock:
            if self.waiters.pop(id(waiter), None) is None:
                return
        waiter[2](([], waiter[0]))

    def wake(self, loop) -> None:
        """On `loop`: answers each of its long polls that now has events."""
        ready = []
        with self.lock:
            for key, waiter in list(self.waiters.items()):
                if waiter[4] is loop and waiter[0] < self.last:
                    del self.waiters[key]
                    ready.append((waiter, self.take(waiter[0], waiter[1])))
        self._answer(ready)

    def end_waits(self, loop) -> None:
        """On `loop`: answers each of its long polls now, with the events
        it has or none, and no read waits from now on (a server that stops
        keeps none waiting, its own webhook's included)."""
        with self.lock:
            self.waits_ended = True
            ready = [(w, self.take(w[0], w[1])) for w in self.waiters.values() if w[4] is loop]
            for waiter, _ in ready:
                del self.waiters[id(waiter)]
        self._answer(ready)

    def _answer(self, ready: list) -> None:
        for waiter, taken in ready:
            waiter[3].cancel()
            waiter[2](self.fetch(taken))


class Page:
    """Events a read serves, ids start..stop, fixed under the lock; `pairs`
    are their (id, value) from the ring, or None: read them from LevelDB."""

    __slots__ = ("start", "stop", "pairs")

    def __init__(self, start: int, stop: int, pairs: list | None):
        self.start = start
        self.stop = stop
        self.pairs = pairs
