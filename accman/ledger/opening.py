"""What a Ledger's open does once the store is open and recovered: the
in-memory book loaded from LevelDB, and the holds that came due while the
ledger was closed ended, durably, before it is returned."""

from __future__ import annotations

from accman.errors import StoreCorrupt
from accman.ledger import _ledger


def load_book(store, events, verify: str, limits: dict, low_balance):
    """The book of `store`: every account's balance and seq, low-balance
    threshold and open hold.  `verify` "full" reads every record through
    LevelDB first (accman.ledger.ledger.VERIFY_MODES)."""
    book = _ledger.Book(store.salt, store.get, next_event=events.last + 1,
                        low_default=low_balance, **limits)
    book.events_first = events.first
    if verify == "full":
        store.check_all_blocks()
    for hid, tot, seq in store.accounts():
        book.load(hid, tot, seq)
    for k, v in store.iterate(_ledger.LOW_PREFIX):
        book.load_low(k[1:], _ledger.unpack_low(v))
    for hid, hold, amount, expires_ms in store.open_holds():
        try:
            book.load_hold(hid, hold, amount, expires_ms)
        except KeyError:
            raise StoreCorrupt(f"{store.path}: hold {hold} of an account that has "
                               "no history; refusing to serve, nothing repaired") from None
    return book


def expire_at_open(book, store, events, now_ms: int) -> None:
    """Holds that expired while the ledger was closed end now, durably,
    before anyone can settle them (SPEC "Holds").  `now_ms` is one reading
    of the clock: all or none of the work."""
    while book.expire_due(now_ms, book.batch_mods_max):
        batch = book.seal()
        store.write(batch.wal)
        store.apply()
        book.finish(batch)
        book.applied(batch)
        events.append(batch.first_event, batch.nevents, batch.changes)
