"""The full consistency check of a store, for `accman verify`, the tests
and an operator who wants proof: it reads every record once."""

from __future__ import annotations

from accman.ledger import _ledger
from accman.errors import StoreCorrupt


def verify_store(store) -> dict:
    """Raises StoreCorrupt naming the first broken rule; returns counts.

    The accounts as open loads them (each history's newest entry, found by
    seeking back) must be exactly the ends of the histories read forward."""
    accounts = {hid: (tot, seq) for hid, tot, seq in store.accounts()}
    entries = 0
    hid = None
    prev_seq = prev_tot = 0
    history_keys = {}          # (hid, key) -> (seq, by, tot)
    seen = set()               # hids with history

    def close_account():
        if hid is None:
            return
        if hid not in accounts:
            raise StoreCorrupt("a history that loading does not find")
        if accounts[hid] != (prev_tot, prev_seq):
            raise StoreCorrupt("an account's loaded balance or seq differs from its history")

    for k, v in store.iterate(_ledger.HISTORY_PREFIX):
        if len(k) != 1 + _ledger.HID_BYTES + 8:
            raise StoreCorrupt("malformed history key")
        h = k[1:1 + _ledger.HID_BYTES]
        seq = _ledger.history_key_seq(k)
        try:
            by, tot, _at, key = _ledger.unpack_history(v)
        except ValueError as e:
            raise StoreCorrupt(str(e)) from e
        if h != hid:
            close_account()
            hid, prev_seq, prev_tot = h, 0, 0
            seen.add(h)
        if seq != prev_seq + 1:
            raise StoreCorrupt(f"history seq {seq} follows {prev_seq}: a gap")
        if by == 0 or tot != prev_tot + by:
            raise StoreCorrupt(f"history entry {seq}: tot is not the previous tot plus by")
        if key is not None:
            history_keys[(h, key)] = (seq, by, tot)
        prev_seq, prev_tot = seq, tot
        entries += 1
    close_account()
    if len(seen) != len(accounts):
        raise StoreCorrupt("loading finds an account without history")

    keys = 0
    for k, v in store.iterate(_ledger.KEY_PREFIX):
        h, key = k[1:1 + _ledger.HID_BYTES], k[1 + _ledger.HID_BYTES:].decode("ascii", "replace")
        try:
            seq, by, tot, _min = _ledger.unpack_key(v)
        except ValueError as e:
            raise StoreCorrupt(str(e)) from e
        if history_keys.get((h, key)) != (seq, by, tot):
            raise StoreCorrupt("an idempotency record does not match its history entry")
        keys += 1
    if keys != len(history_keys):
        raise StoreCorrupt("a keyed history entry has no idempotency record")
    return {"accounts": len(accounts), "entries": entries, "keys": keys}
