"""What a data directory that was there holds, judged before the first
change to it: an AccMan store, or another program's LevelDB.  What LevelDB
holds is read from a private copy (accman.ledger.datadir.snapshot): a
refused directory is left as it was found, where LevelDB opening it would
turn its log into a table and delete files.  No I/O on the directory
itself but reads.
"""

from __future__ import annotations

import plyvel

from accman.errors import StoreCorrupt, StoreLocked
from accman.ledger import datadir, migrate


def refuse_unless_accman(path: str, shown: str, salt, ckpt) -> None:
    """Refuses the directory `path` (named `shown`) unless it is an AccMan
    store, given its key (`salt`, None without a key file) and its
    checkpoint (`ckpt`, None when missing): with neither, a LevelDB without
    a format record is another program's (or a store from before the key
    file, which has one).  One that another process has open is refused as
    locked."""
    if datadir.locked_elsewhere(path):
        raise StoreLocked(f"{shown}: the data directory is open in another "
                          "process (LevelDB lock held)")
    if salt is not None or ckpt is not None:
        return
    scratch = datadir.snapshot(path)
    try:
        db = plyvel.DB(scratch, create_if_missing=False, paranoid_checks=True)
        try:
            raw = db.get(migrate.META_KEY, verify_checksums=True)
        finally:
            db.close()
    finally:
        datadir.remove_snapshot(scratch)
    if raw is None:
        raise StoreCorrupt(f"{shown}: a LevelDB database without a format record: "
                           "not an AccMan store, or damaged; nothing was changed")
