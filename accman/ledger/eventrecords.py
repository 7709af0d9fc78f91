"""The events as LevelDB holds them, read in id order: since store format 3
a batch's events are one record (b"E" + its last id: its change entries,
ext/changes.pxi), and a store written before keeps one record per event
(b"e" + id) until the retention trims them.  Every id of the older
records is below every id of the newer ones: the store wrote the older
kind first.  Events come out as _ledger.decode_changes makes them: (id,
kind, hid, seq, by, tot, at_ms, key, hold)."""

from __future__ import annotations

from accman.errors import StoreCorrupt
from accman.ledger import _ledger

_KINDS = {name: kind for kind, name in _ledger.EVENT_NAMES.items()}


def _decoded(unpack, *args):
    try:
        return unpack(*args)
    except ValueError as e:
        raise StoreCorrupt(f"an events record: {e}") from e


def records(store, start: int):
    """(key, first id, last id, its events) of each events record holding
    ids from `start` on, in order (a format-2 record holds one event)."""
    for k, v in store.iterate(_ledger.EVENT_PREFIX, _ledger.event_key(start)):
        event_id = _ledger.event_key_id(k)
        name, hid, seq, by, tot, at, key, hold = _decoded(_ledger.unpack_event, v)
        yield k, event_id, event_id, [(event_id, _KINDS[name], hid, seq, by, tot, at, key,
                                       hold)]
    for k, v in store.iterate(_ledger.EVENTS_PREFIX, _ledger.events_key(start)):
        first, changes = _decoded(_ledger.unpack_events, k, v)
        events = _decoded(_ledger.decode_changes, first, changes)
        if not events or events[-1][0] != _ledger.event_key_id(k):
            raise StoreCorrupt("an events record holds other ids than its key says")
        yield k, first, events[-1][0], events


def spans(store, start: int):
    """(key, first id, last id, newest at_ms) of each events record holding
    ids from `start` on, in order, making none of their events."""
    for k, v in store.iterate(_ledger.EVENT_PREFIX, _ledger.event_key(start)):
        event_id = _ledger.event_key_id(k)
        yield k, event_id, event_id, _decoded(_ledger.unpack_event, v)[5]
    for k, v in store.iterate(_ledger.EVENTS_PREFIX, _ledger.events_key(start)):
        first, changes = _decoded(_ledger.unpack_events, k, v)
        last, newest = _decoded(_ledger.changes_span, first, changes)
        if last < first or last != _ledger.event_key_id(k):
            raise StoreCorrupt("an events record holds other ids than its key says")
        yield k, first, last, newest


def events(store, start: int):
    """Every event from `start` on, in order."""
    for _, _, _, evs in records(store, start):
        for e in evs:
            if e[0] >= start:
                yield e


def read(store, start: int, limit: int) -> list:
    """Up to `limit` events from `start` on."""
    out = []
    for e in events(store, start):
        if len(out) >= limit:
            break
        out.append(e)
    return out
