"""The SPEC's records as Python values, shared by every part: the ledger
makes them, the server writes them as JSON, the clients read them back.
No I/O and no imports of the parts, so the calling side can use them
without the ledger."""

from __future__ import annotations

from typing import NamedTuple


class Entry(NamedTuple):
    """One history entry (SPEC "Routes"): the change an applied mod, hold,
    settle or expiry made to one account.  `at` is unix milliseconds; `hold`
    names the hold that a hold's start or end belongs to, None otherwise."""

    seq: int
    by: int
    tot: int
    at: int
    key: str | None
    hold: int | None = None


class Event(NamedTuple):
    """One event of the stream (SPEC "Events"): an applied change, or a
    low-balance alert.  `id` grows by one per event of the store, with no
    gaps; `account` is the account's public id, never its credential."""

    id: int
    type: str               # "mod" | "hold" | "settle" | "expire" | "low_balance"
    account: str
    seq: int
    by: int
    tot: int
    at: int
    key: str | None
    hold: int | None


EVENT_TYPES = ("mod", "hold", "settle", "expire", "low_balance")

__all__ = ["Entry", "Event", "EVENT_TYPES"]
