"""The sectors of a write-ahead log record (format AMW3): how a record is
laid out over the disk's sectors, and how recovery tells a write that did
not land whole from damage to one that did.

Why: the records are acknowledged once their write is durable, and LevelDB
gets their batch after the replies, so the newest record may have been
acknowledged and be in no other file.  A crash can tear only a write in
progress (never acknowledged), and a torn write is dropped; damage to a
write that had landed must be refused, not dropped.  A MAC alone cannot
tell the two apart.  So each 512-byte sector of a record ends in a stamp,
the record's lsn and payload length: a sector that did not land holds what
was there before (zeros, an older record's sector, an older format's
bytes), whose stamp is not this record's.  A record that fails its MAC
while every sector of it carries its stamp was written whole: damage.
(SQL Server's torn page detection stamps each sector of a page for the
same reason.)

A record is its 32-byte header (accman.ledger.wal.HEADER) and its payload,
cut into SECTOR_DATA_BYTES pieces, each followed by the stamp; the last
piece is zero-padded, and the record's span is padded with zeros to whole
blocks.  The parser and the judge do no I/O: they read a buffer.
"""

from __future__ import annotations

import struct

from accman.ledger import _check

SECTOR_BYTES = 512                  # the smallest unit a disk writes whole
STAMP = struct.Struct("<QI")        # lsn, payload bytes
SECTOR_DATA_BYTES = SECTOR_BYTES - STAMP.size
_HEADER_BYTES = 32                  # accman.ledger.wal.HEADER.size


def sectors(record_bytes: int) -> int:
    """The sectors a record of `record_bytes` (header and payload) takes."""
    return -(-record_bytes // SECTOR_DATA_BYTES)


def lay_out(buf, record, lsn: int, payload_bytes: int) -> int:
    """Writes `record` (header and payload) into `buf` as stamped sectors
    from offset 0; returns the bytes used (whole sectors).  In C: it is on
    the writer's path, once a batch."""
    return _check.lay_out_sectors(buf, record, STAMP.pack(lsn, payload_bytes), SECTOR_BYTES)


def gather(view, off: int, record_bytes: int) -> bytes | None:
    """The record's header and payload from its sectors at `off`, or None
    when the file ends first."""
    k = sectors(record_bytes)
    if off + k * SECTOR_BYTES > len(view):
        return None
    data = b"".join(view[off + i * SECTOR_BYTES:off + i * SECTOR_BYTES + SECTOR_DATA_BYTES]
                    for i in range(k))
    return data[:record_bytes]


def damage_at_end(view, off: int, lsn: int, header: tuple | None) -> str | None:
    """Judges the place where record `lsn` was due, at `off`, where no valid
    record is: None when its write never happened or did not land whole
    (dropped, as it was never acknowledged); else why it is damage.
    `header`: (lsn, payload bytes) from the header at `off` when its magic
    is right, else None.

    The first sector landed when its stamp or its header names `lsn` (no
    earlier write put that lsn there: an open skips the lsn due where the
    records ended); then its length is known, and the record landed whole
    when each of its sectors bears its stamp.  A sector whose stamp is
    another's did not land (it holds zeros, an older lap's sector, or an
    older format's bytes, which may read as any stamp).  Damage too: a
    header and a stamp of `lsn` that disagree on the length, and a record
    cut by the file's end (the file is written ahead of every record)."""
    if off + SECTOR_BYTES > len(view):
        return None
    first = STAMP.unpack_from(view, off + SECTOR_DATA_BYTES)
    named = [x for x in (first, header) if x is not None and x[0] == lsn]
    if not named:
        return None                                 # the first sector did not land
    if len(named) == 2 and named[0] != named[1]:
        return (f"its header and its first sector's stamp disagree on its length "
                f"({named[1][1]} and {named[0][1]} bytes)")
    length = named[0][1]
    for i in range(1, sectors(_HEADER_BYTES + length)):
        at = off + i * SECTOR_BYTES
        if at + SECTOR_BYTES > len(view):
            return f"the file ends inside it, at offset {len(view)}"
        if STAMP.unpack_from(view, at + SECTOR_DATA_BYTES) != (lsn, length):
            return None                             # this sector did not land: torn
    return "every sector of its write landed, yet it fails its check"
