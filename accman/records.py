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


__all__ = ["Entry"]
