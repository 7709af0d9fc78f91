"""What a data directory that was there holds, judged before the first
change to it: an AccMan store, another program's LevelDB, or an AccMan
store that lost its key file, checkpoint and log together.  What LevelDB
holds is read from a private copy (accman.ledger.datadir.snapshot): a
refused directory is left as it was found, where LevelDB opening it would
turn its log into a table and delete files.  No I/O on the directory
itself but reads.
"""

from __future__ import annotations

import json

import plyvel

from accman.errors import StoreCorrupt, StoreLocked
from accman.ledger import datadir, keyfile, migrate, wal

# Stores from before the key file are at store format 1 or 2; every later
# format was written with the key file, the checkpoint and the log beside
# it.  (A format-2 store written after the key file came, which lost all
# three, still reads as one from before it: said in DESIGN.md.)
FORMAT_WITH_KEY_MIN = 3


def key_of_keyless(path: str, shown: str, salt, ckpt) -> bytes | None:
    """Refuses the directory `path` (named `shown`) unless it is an AccMan
    store, given its key (`salt`, None without a key file) and checkpoint
    (`ckpt`, None when missing).  With neither, its format record decides:
    without one, another program's LevelDB; at a format written with the
    key file, a store that lost it with its checkpoint and log; else a
    store from before the key file, whose key (the format record's) this
    returns, to be written before LevelDB opens the directory.  Returns
    None otherwise.  One that another process has open is refused as
    locked."""
    if datadir.locked_elsewhere(path):
        raise StoreLocked(f"{shown}: the data directory is open in another "
                          "process (LevelDB lock held)")
    if salt is not None or ckpt is not None:
        return None
    raw = _format_record(path)
    if raw is None:
        raise StoreCorrupt(f"{shown}: a LevelDB database without a format record: "
                           "not an AccMan store, or damaged; nothing was changed")
    try:
        meta = json.loads(raw)
        fmt, key = meta["format"], bytes.fromhex(meta["salt"])
        assert type(fmt) is int and len(key) == keyfile.SALT_BYTES
    except (ValueError, KeyError, TypeError, RecursionError, AssertionError):
        raise StoreCorrupt(f"{shown}: unreadable format record; refusing to serve, "
                           "nothing repaired") from None
    if fmt >= FORMAT_WITH_KEY_MIN:
        raise StoreCorrupt(f"{shown}: {keyfile.KEY_NAME}, {wal.CHECKPOINT_NAME} and "
                           f"{wal.WAL_NAME} are missing, but the store is at format {fmt}, "
                           "written with them: damaged; refusing to serve, nothing repaired")
    return key


def _format_record(path: str) -> bytes | None:
    scratch = datadir.snapshot(path)
    try:
        db = plyvel.DB(scratch, create_if_missing=False, paranoid_checks=True)
        try:
            return db.get(migrate.META_KEY, verify_checksums=True)
        finally:
            db.close()
    finally:
        datadir.remove_snapshot(scratch)
