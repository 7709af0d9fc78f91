"""The full consistency check of a store, for `accman verify`, the tests
and an operator who wants proof: it reads every record once."""

from __future__ import annotations

from accman.errors import StoreCorrupt
from accman.ledger import _ledger


def verify_store(store) -> dict:
    """Raises StoreCorrupt naming the first broken rule; returns counts.

    The accounts as open loads them (each history's newest entry, found by
    seeking back) must be exactly the ends of the histories read forward;
    every idempotency record must name its history entry, and every keyed
    entry have its record."""
    accounts = {hid: (tot, seq) for hid, tot, seq in store.accounts()}
    entries, history_keys = _check_histories(store, accounts)
    keys = _check_keys(store, history_keys)
    return {"accounts": len(accounts), "entries": entries, "keys": keys}


def _check_histories(store, accounts: dict) -> tuple[int, dict]:
    """Each history runs 1..seq without gaps, each entry's tot is the
    previous tot plus its by, and its end is the loaded account.  Returns
    the entry count and {(hid, key): (seq, by, tot)} of keyed entries."""
    entries = 0
    history_keys = {}
    ends = {}                   # hid -> (tot, seq) of its last entry read
    for k, v in store.iterate(_ledger.HISTORY_PREFIX):
        if len(k) != 1 + _ledger.HID_BYTES + 8:
            raise StoreCorrupt("malformed history key")
        hid = k[1:1 + _ledger.HID_BYTES]
        seq = _ledger.history_key_seq(k)
        try:
            by, tot, _at, key = _ledger.unpack_history(v)
        except ValueError as e:
            raise StoreCorrupt(str(e)) from e
        prev_tot, prev_seq = ends.get(hid, (0, 0))
        if seq != prev_seq + 1:
            raise StoreCorrupt(f"history seq {seq} follows {prev_seq}: a gap")
        if by == 0 or tot != prev_tot + by:
            raise StoreCorrupt(f"history entry {seq}: tot is not the previous tot plus by")
        if key is not None:
            history_keys[(hid, key)] = (seq, by, tot)
        ends[hid] = (tot, seq)
        entries += 1
    for hid, end in ends.items():
        if hid not in accounts:
            raise StoreCorrupt("a history that loading does not find")
        if accounts[hid] != end:
            raise StoreCorrupt("an account's loaded balance or seq differs from its history")
    if len(ends) != len(accounts):
        raise StoreCorrupt("loading finds an account without history")
    return entries, history_keys


def _check_keys(store, history_keys: dict) -> int:
    keys = 0
    for k, v in store.iterate(_ledger.KEY_PREFIX):
        hid = k[1:1 + _ledger.HID_BYTES]
        key = k[1 + _ledger.HID_BYTES:].decode("ascii", "replace")
        try:
            seq, by, tot, _min = _ledger.unpack_key(v)
        except ValueError as e:
            raise StoreCorrupt(str(e)) from e
        if history_keys.get((hid, key)) != (seq, by, tot):
            raise StoreCorrupt("an idempotency record does not match its history entry")
        keys += 1
    if keys != len(history_keys):
        raise StoreCorrupt("a keyed history entry has no idempotency record")
    return keys
