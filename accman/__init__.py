"""AccMan: prepaid balances for web APIs.

    from accman import Ledger, AccManError
"""

from accman.errors import (AccManError, BadRequest, Busy, Insufficient,
                           KeyReused, NoAccount, Overflow, StoreCorrupt,
                           StoreError, StoreLocked, Unavailable)
from accman.ledger import Entry, Ledger

__all__ = [
    "Ledger", "Entry", "AccManError", "BadRequest", "Busy", "Insufficient",
    "KeyReused", "NoAccount", "Overflow", "StoreCorrupt", "StoreError",
    "StoreLocked", "Unavailable",
]
