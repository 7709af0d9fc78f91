"""What a data directory that was there holds, judged before the first
change to it: open in another process, another program's LevelDB, an
AccMan store from before the key file, one that lost its key file, or one
whose key file is another store's.
The format record is read from LevelDB's files without LevelDB
(accman.ledger.keyread): a refused directory is left as it was found,
where LevelDB opening it would turn its log into a table and delete
files, and no copy is made, which would hold the store's key.  No I/O on
the directory but reads.
"""

from __future__ import annotations

import hmac
import json

from accman.errors import FileDamage, StoreCorrupt, StoreLocked
from accman.ledger import datadir, keyfile, keyread, migrate, plyvel_errors, wal

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
    raw = _format_record(path, shown)
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


def sealed_without_checkpoint(shown: str) -> StoreCorrupt:
    return StoreCorrupt(f"{shown}: {wal.CHECKPOINT_NAME} is missing, but {keyfile.KEY_NAME} "
                        "is here, which a store has only once its first checkpoint is "
                        "written: damaged (the checkpoint removed?); refusing to serve, "
                        "nothing repaired")


def key_mismatch(shown: str) -> StoreCorrupt:
    return StoreCorrupt(f"{shown}: {keyfile.KEY_NAME} does not match the store's format "
                        "record; refusing to serve, nothing repaired")


def refuse_another_key(path: str, shown: str, key: bytes, cuts: dict | None,
                       format_max: int) -> int | None:
    """Refuses the directory `path` (named `shown`) when its format record
    names another key than its key file's `key`: the key file, and the
    checkpoint and log that the key signs, are another store's (a restore
    from the wrong backup); or a format newer than `format_max`.  Judged
    before recovery cuts LevelDB's logs by the checkpoint's sizes (`cuts`,
    None without a checkpoint) and LevelDB rewrites them, which with
    another store's checkpoint would lose this store's synced batches.
    The record is read as LevelDB will have it once the logs are cut: a
    store with a checkpoint had its record synced before it, so one that
    is not found so is refused too (the cut by another checkpoint took
    it).  Without a checkpoint, a missing or unreadable record is left to
    the open to name (None).  Returns the record's format."""
    meta = _meta_of(_format_record(path, shown, cuts))
    if meta is None:
        if cuts is not None:
            raise StoreCorrupt(f"{shown}: no format record in LevelDB's files as "
                               f"{wal.CHECKPOINT_NAME} leaves them: the checkpoint and log "
                               "are another store's, or LevelDB's files are damaged; "
                               "refusing to serve, nothing repaired")
        return None
    if not hmac.compare_digest(meta[1], key):
        raise key_mismatch(shown)
    if meta[0] > format_max:
        raise newer_format(shown, meta[0], format_max)
    return meta[0]


def newer_format(shown: str, fmt: int, format_max: int) -> StoreCorrupt:
    return StoreCorrupt(f"{shown}: store format {fmt}, this AccMan reads format {format_max}")


def name_the_key(path: str, shown: str, key: bytes) -> None:
    """After the checkpoint failed its MAC: refused as a key file of
    another store's instead, when the format record says so (the checkpoint
    is then this store's, signed with its own key).  Nothing else the
    copy's reading raises is said in the checkpoint's place."""
    try:
        meta = _meta_of(_format_record(path, shown))
    except Exception:       # the checkpoint's refusal stands
        return
    if meta is not None and not hmac.compare_digest(meta[1], key):
        raise key_mismatch(shown)


def _meta_of(raw: bytes | None) -> tuple | None:
    """A format record's (format, key), or None if it is absent or
    unreadable."""
    try:
        meta = json.loads(raw)
        fmt, key = meta["format"], bytes.fromhex(meta["salt"])
    except (ValueError, KeyError, TypeError, RecursionError):
        return None
    return (fmt, key) if type(fmt) is int and len(key) == keyfile.SALT_BYTES else None


def _format_record(path: str, shown: str, cuts: dict | None = None) -> bytes | None:
    """The format record of the directory `path` (named `shown`) as LevelDB
    will read it once its logs are cut by `cuts` (wal.logs_to_cut)."""
    try:
        return keyread.newest(path, migrate.META_KEY, cuts)
    except FileDamage as e:
        raise StoreCorrupt(f"{shown}: data files are damaged: {e}; refusing to serve, "
                           "nothing repaired") from None
    except OSError as e:
        raise plyvel_errors.unreadable(shown, e) from None
