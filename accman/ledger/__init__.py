"""The ledger: balances, history and idempotency, durable on LevelDB behind
AccMan's own write-ahead log, with group commit.

    from accman.ledger import Ledger      # also: from accman import Ledger

ledger.py is the Python `Ledger`; the in-memory book and the record formats
are the native accman.ledger._ledger (ext/ledger.pyx); commit.py is the
group committer, store.py LevelDB, wal.py the write-ahead log, fsck.py the
file checks at open and verify.py the full consistency check; background.py
keeps LevelDB's compaction behind the request path.
"""

from accman.ledger.ledger import VERIFY_MODES, Entry, Ledger

__all__ = ["Ledger", "Entry", "VERIFY_MODES"]
