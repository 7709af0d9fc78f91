"""AccMan: prepaid balances for web APIs.

    from accman import Ledger, AccManError

`Ledger` is imported on first use, so that the calling side (accman.client,
accman.asgi) does not load LevelDB into a service that only calls AccMan.
"""

from accman.errors import (AccManError, BadRequest, Busy, Insufficient,
                           KeyReused, NoAccount, Overflow, StoreCorrupt,
                           StoreError, StoreLocked, Unavailable)

__all__ = [
    "Ledger", "Entry", "AccManError", "BadRequest", "Busy", "Insufficient",
    "KeyReused", "NoAccount", "Overflow", "StoreCorrupt", "StoreError",
    "StoreLocked", "Unavailable",
]


def __getattr__(name):
    if name in ("Ledger", "Entry"):
        from accman import ledger
        return getattr(ledger, name)
    raise AttributeError(f"module 'accman' has no attribute {name!r}")
