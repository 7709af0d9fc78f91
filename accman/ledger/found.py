"""What a data directory that was there holds, judged before the first
change to it: open in another process, another program's LevelDB, an
AccMan store from before the key file, or one that lost its key file.
What LevelDB holds is read from a private copy
(accman.ledger.datadir.snapshot): a refused directory is left as it was
found, where LevelDB opening it would turn its log into a table and delete
files.  No I/O on the directory itself but reads.
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


def refuse_if_locked(path: str, shown: str) -> None:
    """Another process has the directory open (LevelDB's lock held): its
    files are changing under us, so it is refused as it was found."""
    if datadir.locked_elsewhere(path):
        raise StoreLocked(f"{shown}: the data directory is open in another "
                          "process (LevelDB lock held)")


def key_of_keyless(path: str, shown: str, ckpt) -> bytes:
    """The key of the directory `path` (named `shown`), which has no key
    file, from its format record, to be written before LevelDB opens the
    directory; refused unless it is a store from before the key file.
    Without a format record, another program's LevelDB; at a format
    written with the key file, a store that lost it (with its checkpoint,
    `ckpt` None, and its log).  One that another process has open is
    refused as locked."""
    refuse_if_locked(path, shown)
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
        gone = (f"{keyfile.KEY_NAME} is missing, but the store is at format {fmt}, "
                "written with it" if ckpt is not None else
                f"{keyfile.KEY_NAME}, {wal.CHECKPOINT_NAME} and {wal.WAL_NAME} are missing, "
                f"but the store is at format {fmt}, written with them")
        raise StoreCorrupt(f"{shown}: {gone}: damaged; refusing to serve, nothing repaired")
    return key


def _format_record(path: str) -> bytes | None:
    scratch = datadir.scratch_path()
    try:
        datadir.snapshot(path, scratch)
        db = plyvel.DB(scratch, create_if_missing=False, paranoid_checks=True)
        try:
            return db.get(migrate.META_KEY, verify_checksums=True)
        finally:
            db.close()
    finally:
        datadir.remove_snapshot(scratch)
