"""One key's newest value in a LevelDB directory, read from its files
without LevelDB: no copy of the store is made (it would hold the store's
key, left behind by a kill) and no file is written.  For
accman.ledger.found, which reads the format record before recovery
changes anything.

What LevelDB would read at open is read: the logs it replays (their
lengths as recovery will cut them) and the tables the MANIFEST lists
whose key range holds the key.  The entry with the highest sequence
number wins, as in LevelDB; a delete reads as None.  A log is read up
to its first bad record, as LevelDB reads it; other damage is
FileDamage.  (fsck checks every file first when the caller asks it to.)
"""

from __future__ import annotations

import os
import struct

from accman.errors import FileDamage
from accman.ledger import fsck, tablecheck
from accman.ledger.tablecheck import varint_bytes

# A table entry's type (leveldb db/dbformat.h), as a batch's.
TYPE_VALUE = fsck.BATCH_PUT
TAG = struct.Struct("<Q")       # an internal key's last 8 bytes: sequence << 8 | type


def newest(path: str, key: bytes, cuts: dict | None = None) -> bytes | None:
    """The newest value of `key` in the LevelDB directory `path`, None if
    it has none; its logs shortened by `cuts` ({name: bytes}, wal.logs_to_cut)."""
    names = set(os.listdir(path))
    version = fsck.read_version(path)
    if version is None:
        return None
    found = []
    for number in fsck.live_log_numbers(version, names):
        name = f"{number:06d}.log"
        raw = _read(path, name)
        found += _in_log(raw[:len(raw) - (cuts or {}).get(name, 0)], name, key)
    for number, (smallest, largest) in sorted(version.ranges.items()):
        if smallest[:-TAG.size] <= key <= largest[:-TAG.size]:
            name = next((n for n in (f"{number:06d}.ldb", f"{number:06d}.sst") if n in names),
                        None)
            if name is None:
                raise FileDamage(f"table {number:06d}.ldb, listed in {version.manifest}, "
                                 "is missing")
            found += _in_table(_read(path, name), name, key)
    return max(found, key=lambda entry: entry[0])[1] if found else None


def _read(path: str, name: str) -> bytes:
    with open(os.path.join(path, name), "rb") as f:
        return f.read()


def _in_log(raw: bytes, name: str, key: bytes) -> list[tuple[int, bytes | None]]:
    """(sequence, value or None) of each put or delete of `key` in a log's
    write batches, read as LevelDB reads them (a bad record ends them)."""
    named = varint_bytes(len(key)) + key
    out = []
    for _, batch in fsck.readable_records(raw, name):
        if named in batch:      # else no entry of the batch is the key's
            out += _in_batch(batch, name, key)
    return out


def _in_batch(batch: bytes, name: str, key: bytes) -> list[tuple[int, bytes | None]]:
    if len(batch) < fsck.BATCH_HEADER.size:
        raise FileDamage(f"LevelDB log {name}: a write batch of {len(batch)} bytes")
    seq = fsck.BATCH_HEADER.unpack_from(batch)[0]
    return [(seq + n, value) for n, (entry_key, value)
            in enumerate(fsck.batch_entries(batch[8:], f"LevelDB log {name}"))
            if entry_key == key]


def _in_table(raw: bytes, name: str, key: bytes) -> list[tuple[int, bytes | None]]:
    """(sequence, value or None) of each entry of `key` in a table: its
    index names the first data block whose last key is not below it, and
    the entries run on through later blocks while they are the key's."""
    what = f"table {name}"
    view = memoryview(raw)
    body_end = len(raw) - tablecheck.TABLE_FOOTER_BYTES
    _, _, index_off, index_size = tablecheck.footer(raw, what)
    index = tablecheck.read_block(raw, view, index_off, index_size, body_end,
                                  f"{what}: index block")
    out = []
    for last, handle in tablecheck.block_entries(index, f"{what}: index block"):
        if last[:-TAG.size] < key:
            continue
        off, length = tablecheck.block_handle(handle, f"{what}: a data block handle")
        block = tablecheck.read_block(raw, view, off, length, body_end, f"{what}: data block")
        for internal, value in tablecheck.block_entries(block, f"{what}: data block"):
            if len(internal) < TAG.size:
                raise FileDamage(f"{what}: data block at offset {off}: a key of "
                                 f"{len(internal)} bytes")
            user = internal[:-TAG.size]
            tag = TAG.unpack_from(internal, len(user))[0]
            if user > key:
                return out
            if user == key:
                out.append((tag >> 8, bytes(value) if tag & 0xFF == TYPE_VALUE else None))
    return out
