"""What a data directory that was there holds, judged before the first
change to it: an AccMan store, another program's LevelDB, or an AccMan
store that lost its checkpoint and log.  What LevelDB holds is read from a
private copy (accman.ledger.datadir.snapshot): a refused directory is left
as it was found, where LevelDB opening it would turn its log into a table
and delete files.  No I/O on the directory itself but reads.
"""

from __future__ import annotations

import json
import os

import plyvel

from accman.errors import StoreCorrupt, StoreLocked
from accman.ledger import datadir, migrate, wal

# The first store format written only with AccMan's write-ahead log beside
# it: a store at it or later without a checkpoint holds records that no
# crash leaves there.  (Formats 1 and 2 were written before the log too: a
# store of theirs without one is being upgraded, or predates it.)
FORMAT_WITH_LOG_MIN = 3


def refuse_unless_accman(path: str, shown: str, salt, ckpt) -> None:
    """Refuses the directory `path` (named `shown`) unless it is an AccMan
    store, given its key file's `salt` and its checkpoint `ckpt` (None when
    missing).  A checkpoint is AccMan's (its MAC was checked); without one,
    the format record decides: with no key file either, a LevelDB without
    one is another program's; with the key file, records at a format
    written with the log are a store whose checkpoint and log are gone.
    One that another process has open is refused as locked."""
    if datadir.locked_elsewhere(path):
        raise StoreLocked(f"{shown}: the data directory is open in another "
                          "process (LevelDB lock held)")
    if ckpt is not None:
        return
    if salt is not None and not os.path.exists(os.path.join(path, "CURRENT")):
        return
    fmt, more = _format_and_records(path)
    if salt is None and fmt is None:
        raise StoreCorrupt(f"{shown}: a LevelDB database without a format record: "
                           "not an AccMan store, or damaged; nothing was changed")
    if salt is not None and more and (fmt is None or fmt >= FORMAT_WITH_LOG_MIN):
        raise StoreCorrupt(f"{shown}: {wal.CHECKPOINT_NAME} is missing, but the store holds "
                           f"records {_written(fmt)}: damaged (its checkpoint and log were "
                           "removed?); refusing to serve, nothing repaired")


def _format_and_records(path: str):
    """(the format record's format, or None without one; whether LevelDB
    holds any other record), read from a private copy."""
    scratch = datadir.snapshot(path)
    try:
        db = plyvel.DB(scratch, create_if_missing=False, paranoid_checks=True)
        try:
            raw = db.get(migrate.META_KEY, verify_checksums=True)
            with db.iterator(include_value=False) as it:
                first_two = [next(it, None), next(it, None)]
            more = any(k is not None and k != migrate.META_KEY for k in first_two)
        finally:
            db.close()
    finally:
        datadir.remove_snapshot(scratch)
    if raw is None:
        return None, more
    try:
        fmt = json.loads(raw)["format"]
    except (ValueError, KeyError, TypeError, RecursionError):
        fmt = None
    # An unreadable one is none of the old formats.
    return (fmt if type(fmt) is int else FORMAT_WITH_LOG_MIN), more


def _written(fmt) -> str:
    if fmt is None:
        return "without a format record"
    return f"of store format {fmt}, which is written with it"
