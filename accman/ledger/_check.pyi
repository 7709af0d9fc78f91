"""Type stubs of accman.ledger._check (ext/check.pyx): CRC-32C and
LevelDB's masked CRCs, for accman.ledger.fsck and the write-ahead log's
format-1 records; no I/O."""

from typing import Final

from collections.abc import Buffer

LOG_BLOCK_BYTES: Final[int]
LOG_HEADER_BYTES: Final[int]

def crc32c(data: Buffer, crc: int = 0) -> int:
    """The CRC-32C of `data`, continuing `crc` (0 to start)."""

def mask(crc: int) -> int:
    """LevelDB's masked form of a CRC: ((crc >> 15) | (crc << 17)) + 0xa282ead8."""

def unmask(masked: int) -> int: ...

def block_ok(buf: Buffer, offset: int, size: int) -> bool:
    """True if the table block buf[offset:offset+size] matches the CRC in
    its 5-byte trailer (all of it inside buf)."""

def log_record_ok(buf: Buffer, offset: int) -> bool:
    """True if a whole log record with a known type and a matching CRC
    starts at `offset`, inside its 32 KiB block."""

def find_log_record(buf: Buffer, start: int) -> int:
    """The first offset >= start where a valid log record starts, or -1."""

def lay_out_sectors(buf: Buffer, record: Buffer, stamp: Buffer, sector_bytes: int) -> int:
    """Writes `record` into `buf` in pieces of sector_bytes - len(stamp),
    each followed by `stamp`, the last zero-padded; returns the bytes
    written (whole sectors)."""
