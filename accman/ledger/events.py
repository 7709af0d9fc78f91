"""The embedded store's event stream (SPEC "Events"): every applied change
is an event with an id that grows by one, with no gaps, across restarts;
events are written in the same batch as their change (ext/ledger.pyx) and
shown only once that batch is durable.

This log keeps the newest durable events in memory (EVENTS_RING_MAX), reads
older ones from LevelDB (accman.ledger.eventrecords), answers long polls
without a thread or a timer of its own per waiter beyond one loop timer
handle (EVENTS_WAITERS_MAX of them), and finds the events records past the
retention for the writer to delete: never one with an event after
`kept_after`, the webhook's durably saved cursor while a server delivers
them (SPEC "Events": the receiver never loses one), whatever its age.
LevelDB may lag the durable events by up to APPLY_LAG_BATCHES_MAX batches
(accman.ledger.applier): the ring never drops an event before LevelDB has
it, so what is read from LevelDB is always there.

Thread use: `append` runs on the writer thread and `take`/`wait` on the
loop, all under the committer's lock, which they are given; `fetch`, the
part of a read that scans LevelDB and decodes, runs outside it, so that a
reader never holds up a commit.
"""

from __future__ import annotations

import collections
import contextlib

from accman.errors import AccManError, BadRequest, Busy, EventsTrimmed, StoreCorrupt
from accman.ledger import _ledger, eventrecords
from accman.limits import EVENTS_WAITERS_MAX, INT64_MAX
from accman.records import Event
from accman.store import run_callbacks

# Events kept in memory for /events: a long poll that follows the stream
# reads them without touching LevelDB.  64 Ki events of ~30 bytes each as
# change entries is a few MiB; older ones are read from the store.
EVENTS_RING_MAX = 65536
# Events records deleted past the retention per pass of the writer, so
# that a pass never holds the lock long; a full pass is followed at once
# by the next.
EVENTS_TRIM_MAX = 4096
EVENTS_TRIM_INTERVAL_S = 60.0
# A retention shorter than the interval (the Python API's, in tests) makes
# the passes that often, but never more often than this: a pass a
# millisecond would keep the writer's thread busy with nothing to trim.
EVENTS_TRIM_INTERVAL_S_MIN = 0.1


def check_kept_after(event_id, name: str = "events_kept_after", error: type = ValueError) -> None:
    """An event id as /events' `after` takes it (SPEC), or None; a refusal
    names the caller's parameter, `name`.  `error` is what the caller's
    API raises for it: ValueError for an option of the open, BadRequest
    for a call's argument (docs/DESIGN.md, "The Ledger's Python API")."""
    if event_id is not None and (type(event_id) is not int
                                 or not 0 <= event_id <= INT64_MAX):
        raise error(f"{name} must be an event id, 0 to {INT64_MAX}, "
                    f"or None; got {event_id!r}")


def event_of(event_id: int, kind: int, hid: bytes, seq: int, by: int, tot: int, at: int,
             key: str | None, hold: int | None) -> Event:
    """An Event of a decoded change (_ledger.decode_changes)."""
    return Event(event_id, _ledger.EVENT_NAMES[kind], hid.hex(), seq, by, tot, at, key, hold)


class EventLog:
    def __init__(self, store, lock, first: int, last: int, retention_s: float,
                 kept_after: int | None = None):
        self.store = store
        self.lock = lock
        self.first = first          # the oldest id kept, 0: none yet
        self.last = last            # the newest durable id, 0: none yet
        self.retention_ms = int(retention_s * 1000)
        # Durable batches' events, oldest first: (first id, last id, the
        # batch's change entries), at least EVENTS_RING_MAX events of them.
        self.ring = collections.deque()
        self.ring_events = 0
        self.waiters: dict = {}     # id(waiter) -> [after, limit, done, timer, loop]
        self.waits_ended = False    # end_waits was called: no read waits from now on
        self.trimmed = 0
        self.kept_after = kept_after    # None: the retention alone trims

    @classmethod
    def open(cls, store, lock, retention_s: float, kept_after: int | None) -> "EventLog":
        meta = store.get(_ledger.EVENTS_META_KEY)
        first, last = _ledger.unpack_events_meta(meta) if meta is not None else (0, 0)
        return cls(store, lock, first, last, retention_s, kept_after)

    def keep_after(self, event_id: int | None) -> None:
        """Events after `event_id` are kept whatever their age (None: the
        retention alone); from any thread."""
        check_kept_after(event_id, "event_id", BadRequest)
        with self.lock:
            self.kept_after = event_id

    # -- the writer's side (under the lock) ---------------------------------------

    def append(self, first: int, count: int, changes, lagging: int | None = None) -> set:
        """A durable batch's `count` events, ids from `first`, as its change
        entries (ext/changes.pxi); returns the loops whose long polls now
        have events to hear (`wake` on each).  `lagging`: the first id that
        LevelDB may lack (None: none); the ring keeps it and every later
        one, so that what it drops is always in LevelDB."""
        if not count:
            return set()
        assert first == self.last + 1, "an event id skipped or repeated"
        ring = self.ring
        ring.append((first, first + count - 1, changes))
        self.ring_events += count
        while (ring and (lagging is None or ring[0][1] < lagging)
               and self.ring_events - (ring[0][1] - ring[0][0] + 1) >= EVENTS_RING_MAX):
            oldest = ring.popleft()
            self.ring_events -= oldest[1] - oldest[0] + 1
        self.last = first + count - 1
        if not self.first:
            self.first = first
        return {waiter[4] for waiter in self.waiters.values()}

    def past_retention(self, now_ms: int) -> tuple[list, bool]:
        """Keys of the oldest events records whose every event is past the
        retention (never the one of the newest event, nor one with an event
        after `kept_after`), which the writer
        deletes; `first` moves on.  A pass takes EVENTS_TRIM_MAX events at
        most (one record at least), reading only each record's span.  The
        bool is True when the pass was full: more may be past it."""
        if not self.first:
            return [], False
        cutoff = now_ms - self.retention_ms
        out = []
        first = self.first
        full = False
        for key, _, last, newest_at in eventrecords.spans(self.store, first):
            if last >= self.last or newest_at >= cutoff or (
                    self.kept_after is not None and last > self.kept_after):
                break
            if out and last - self.first + 1 > EVENTS_TRIM_MAX:
                full = True
                break
            out.append(key)
            first = last + 1
        if out:
            self.trimmed += first - self.first
            self.first = first
        return out, full

    # -- reading ------------------------------------------------------------------------

    def take(self, after: int, limit: int):
        """Under the lock: which events a read after `after` serves, fixed
        now.  The outcome itself when it is known at once (EventsTrimmed,
        or no events: ([], next)), else a Page for `fetch`."""
        if self.first and after < self.first - 1:
            return EventsTrimmed(self.first)
        if after >= self.last:
            return [], min(after, self.last)
        # Never past `last`: the events a read serves are durable ones, and
        # `next` must not run ahead of them.
        start, stop = after + 1, min(self.last, after + limit)
        ring = self.ring
        i = max(len(ring) - 1, 0)
        while i > 0 and ring[i][0] > start:     # readers mostly follow the tail
            i -= 1
        batches = []
        while i < len(ring) and ring[i][0] <= stop:
            if ring[i][1] >= start:
                batches.append(ring[i])
            i += 1
        return Page(start, stop, batches)

    def fetch(self, taken):
        """Outside the lock: the outcome of a `take`, (events, next) oldest
        first, or EventsTrimmed when trimming took them meanwhile."""
        if type(taken) is not Page:
            return taken
        start, stop = taken.start, taken.stop
        ring_first = taken.batches[0][0] if taken.batches else stop + 1
        events = []
        if start < ring_first:
            # Older than the ring: LevelDB has them (the ring drops nothing
            # it lacks: append); the newer ones of the page come from the
            # ring, which LevelDB may not have yet.
            want = min(stop + 1, ring_first) - start
            events = eventrecords.read(self.store, start, want)
            if [e[0] for e in events] != list(range(start, start + want)):
                # Trimming took some meanwhile: it deletes the oldest first,
                # and a format-2 store's records are read in two scans.
                if self.first > start:
                    return EventsTrimmed(self.first)
                raise StoreCorrupt(f"events {start}..{start + want - 1}, older than the "
                                   "ring, are not all in LevelDB")
        for first, _, changes in taken.batches:
            events += [e for e in _ledger.decode_changes(first, changes)
                       if start <= e[0] <= stop]
        assert [e[0] for e in events] == list(range(start, stop + 1)), \
            "a page of events with a gap"
        return [event_of(*e) for e in events], stop

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
            self._drop_dead()
        if len(self.waiters) >= EVENTS_WAITERS_MAX:
            raise Busy(f"EVENTS_WAITERS_MAX ({EVENTS_WAITERS_MAX}) long polls are waiting; "
                       "retry shortly")
        waiter = [after, limit, done, None, loop]
        waiter[3] = loop.call_later(wait_s, self._timeout, waiter)
        self.waiters[id(waiter)] = waiter

    def _drop_dead(self) -> None:
        """Under the lock, at the bound: the polls whose loop has closed
        (a `read_events` of a loop that ended without cancelling it) go,
        since nothing can answer them there and each holds a place."""
        for key, waiter in list(self.waiters.items()):
            if waiter[4].is_closed():
                del self.waiters[key]

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

    def end_wait(self, done) -> None:
        """On the waiter's loop: the long poll of `done` is answered now,
        with what it has; nothing when it is not waiting."""
        with self.lock:
            waiter = next((w for w in self.waiters.values() if w[2] is done), None)
            if waiter is None:
                return
            del self.waiters[id(waiter)]
            taken = self.take(waiter[0], waiter[1])
        self._answer([(waiter, taken)])

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

    def refuse_waits(self, error) -> None:
        """From any thread: every long poll is answered with `error` on its
        own loop, and no read waits from now on (the ledger closes: a poll
        must not wait out its time for a page it can no longer get)."""
        with self.lock:
            self.waits_ended = True
            waiting = list(self.waiters.values())
            self.waiters.clear()
        for waiter in waiting:
            with contextlib.suppress(RuntimeError):     # its loop has closed
                waiter[4].call_soon_threadsafe(_refused, waiter, error)

    def _answer(self, ready: list) -> None:
        """On the polls' loop: each told its page (or the refusal its read
        met), every one of them even when another's `done` raises: each
        left its place, so its timer would no longer answer it."""
        pairs = []
        for waiter, taken in ready:
            waiter[3].cancel()
            try:
                outcome = self.fetch(taken)
            except AccManError as e:
                outcome = e
            pairs.append((waiter[2], outcome))
        run_callbacks(pairs)

def _refused(waiter, error) -> None:
    waiter[3].cancel()
    waiter[2](error)


class Page:
    """Events a read serves, ids start..stop, fixed under the lock;
    `batches` are the ring's batches that hold some of them (the ids
    before the first of them are read from LevelDB)."""

    __slots__ = ("start", "stop", "batches")

    def __init__(self, start: int, stop: int, batches: list):
        self.start = start
        self.stop = stop
        self.batches = batches
