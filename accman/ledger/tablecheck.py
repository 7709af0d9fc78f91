"""Checks one LevelDB table file without LevelDB (leveldb
doc/table_format.md): its footer, the CRC-32C of every block it has (data,
meta, metaindex, index), and that the blocks tile the file.  For
accman.ledger.fsck, which checks the tables a MANIFEST lists.  No I/O:
bytes in, a count or FileDamage out.
"""

from __future__ import annotations

import struct

from accman.errors import FileDamage
from accman.ledger import _check

TABLE_FOOTER_BYTES = 48          # two block handles, zero padding, magic
TABLE_HANDLES_BYTES = 40         # the part of the footer before the magic
TABLE_MAGIC = 0xDB4775248B80FB57
BLOCK_TRAILER_BYTES = 5          # compression type:1, masked crc32c:4
COMPRESSION_NONE, COMPRESSION_SNAPPY = 0, 1
VARINT64_BYTES_MAX = 10


# --- varints (leveldb util/coding.cc) ------------------------------------------------

def read_varint(buf, i: int) -> tuple[int, int]:
    value = shift = 0
    for j in range(i, min(i + VARINT64_BYTES_MAX, len(buf))):
        b = buf[j]
        value |= (b & 0x7F) << shift
        if not b & 0x80:
            return value, j + 1
        shift += 7
    raise ValueError(f"bad varint at offset {i}")


def varint_bytes(value: int) -> bytes:
    out = bytearray()
    while value >= 0x80:
        out.append(value & 0x7F | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


def read_prefixed(buf, i: int) -> tuple[bytes, int]:
    length, i = read_varint(buf, i)
    if i + length > len(buf):
        raise ValueError(f"a length-prefixed field at offset {i} runs past the end")
    return bytes(buf[i:i + length]), i + length


# --- tables --------------------------------------------------------------------------

def check_table(raw: bytes, name: str) -> int:
    """Checks a table's footer and the CRC of every block it has (data,
    meta, metaindex, index), and that the blocks tile the file; returns the
    number of blocks."""
    what = f"table {name}"
    meta_off, meta_size, index_off, index_size = footer(raw, what)
    body_end = len(raw) - TABLE_FOOTER_BYTES
    view = memoryview(raw)
    index = read_block(raw, view, index_off, index_size, body_end, f"{what}: index block")
    meta = read_block(raw, view, meta_off, meta_size, body_end, f"{what}: metaindex block")
    blocks = [(index_off, index_size), (meta_off, meta_size)]
    for kind, parent, contents in (("data", "index", index), ("meta", "metaindex", meta)):
        for handle in _block_values(contents, f"{what}: {parent} block"):
            off, length = block_handle(handle, f"{what}: a {kind} block handle")
            if (off + length + BLOCK_TRAILER_BYTES > body_end      # first: block_ok's
                    or not _check.block_ok(view, off, length)):     # are C sizes
                raise FileDamage(f"{what}: {kind} block at offset {off} fails its checksum")
            blocks.append((off, length))
    # Data blocks, meta blocks, metaindex, index, footer: end to end, so
    # that no byte of the file is outside a checked block.
    at = 0
    for off, length in sorted(blocks):
        if off != at:
            raise FileDamage(f"{what}: the block at offset {off} does not follow the one "
                             f"ending at {at}")
        at = off + length + BLOCK_TRAILER_BYTES
    if at != body_end:
        raise FileDamage(f"{what}: the blocks end at {at}, the footer starts at {body_end}")
    return len(blocks)


def footer(raw: bytes, what: str) -> tuple[int, int, int, int]:
    """The metaindex and index handles (offset, size, offset, size)."""
    if len(raw) < TABLE_FOOTER_BYTES:
        raise FileDamage(f"{what}: {len(raw)} bytes, shorter than a table footer")
    footer = raw[len(raw) - TABLE_FOOTER_BYTES:]
    if struct.unpack_from("<Q", footer, TABLE_HANDLES_BYTES)[0] != TABLE_MAGIC:
        raise FileDamage(f"{what}: the footer's magic number is wrong")
    values = []
    i = 0
    try:
        for _ in range(4):
            value, i = read_varint(footer, i)
            values.append(value)
    except ValueError:
        raise FileDamage(f"{what}: the footer's block handles are unreadable") from None
    if i > TABLE_HANDLES_BYTES or any(footer[i:TABLE_HANDLES_BYTES]):
        raise FileDamage(f"{what}: the footer's padding is not zeros")
    if footer[:i] != b"".join(map(varint_bytes, values)):
        # A flipped continuation bit on a handle's last byte reads the same
        # value from the zero padding; LevelDB never writes such a varint.
        raise FileDamage(f"{what}: the footer's block handles are not as LevelDB writes them")
    return values[0], values[1], values[2], values[3]


def block_handle(handle: bytes, what: str) -> tuple[int, int]:
    """A block handle: (offset, size), exactly two varints."""
    try:
        off, i = read_varint(handle, 0)
        length, i = read_varint(handle, i)
    except ValueError:
        i = -1
    if i != len(handle):
        raise FileDamage(f"{what} is unreadable")
    return off, length


def read_block(raw: bytes, view, off: int, length: int, body_end: int, what: str) -> bytes:
    """A block's contents, uncompressed, once its CRC is checked."""
    # The bound first: block_ok takes C sizes, which a damaged handle's
    # 64-bit values overflow.
    if off + length + BLOCK_TRAILER_BYTES > body_end or not _check.block_ok(view, off, length):
        raise FileDamage(f"{what} at offset {off} fails its checksum")
    kind = raw[off + length]
    contents = raw[off:off + length]
    if kind == COMPRESSION_NONE:
        return contents
    if kind == COMPRESSION_SNAPPY:
        try:
            return _unsnappy(contents)
        except (ValueError, IndexError) as e:
            raise FileDamage(f"{what} at offset {off} does not decompress ({e})") from None
    raise FileDamage(f"{what} at offset {off} has unknown compression type {kind}")


def _block_values(block: bytes, what: str) -> list[bytes]:
    return [value for _, value in block_entries(block, what)]


def block_entries(block: bytes, what: str) -> list[tuple[bytes, bytes]]:
    """The (key, value) entries of a block (leveldb table/block.cc): each
    entry is shared:varint, unshared:varint, value_length:varint, the
    unshared key bytes, the value; then the restart offsets and their
    count.  A key is its `shared` first bytes of the key before it, then
    its unshared ones."""
    if len(block) < 4:
        raise FileDamage(f"{what} is too short")
    restarts = struct.unpack_from("<I", block, len(block) - 4)[0]
    end = len(block) - 4 - 4 * restarts
    if restarts < 1 or end < 0:
        raise FileDamage(f"{what} has a bad restart count {restarts}")
    entries = []
    i = 0
    key = b""
    try:
        while i < end:
            shared, i = read_varint(block, i)
            unshared, i = read_varint(block, i)
            value_len, i = read_varint(block, i)
            if shared > len(key) or i + unshared + value_len > end:
                raise ValueError(f"entry at offset {i} runs past the entries")
            key = key[:shared] + bytes(block[i:i + unshared])
            i += unshared
            entries.append((key, block[i:i + value_len]))
            i += value_len
    except ValueError as e:
        raise FileDamage(f"{what} has a malformed entry ({e})") from None
    return entries


def _unsnappy(src: bytes) -> bytes:
    """Snappy's raw format (google/snappy format_description.txt): the
    uncompressed length as a varint, then literals and back-references.
    For the index and metaindex blocks, and a data block read for one key:
    they are small."""
    n, i = read_varint(src, 0)
    out = bytearray()
    while i < len(src):
        tag = src[i]
        i += 1
        kind = tag & 3
        if kind == 0:                                   # literal
            length = tag >> 2
            if length >= 60:
                extra = length - 59
                length = int.from_bytes(src[i:i + extra], "little")
                i += extra
            length += 1
            if i + length > len(src):
                raise ValueError("a literal runs past the end")
            out += src[i:i + length]
            i += length
            continue
        if kind == 1:                                   # copy, 11-bit offset
            length = 4 + ((tag >> 2) & 7)
            offset = ((tag >> 5) << 8) | src[i]
            i += 1
        elif kind == 2:                                 # copy, 16-bit offset
            length = (tag >> 2) + 1
            offset = int.from_bytes(src[i:i + 2], "little")
            i += 2
        else:                                           # copy, 32-bit offset
            length = (tag >> 2) + 1
            offset = int.from_bytes(src[i:i + 4], "little")
            i += 4
        if offset == 0 or offset > len(out) or i > len(src):
            raise ValueError("a copy reaches before the start")
        start = len(out) - offset
        if offset >= length:
            out += out[start:start + length]
        else:                                           # overlapping: repeats
            for j in range(length):
                out.append(out[start + j])
    if len(out) != n:
        raise ValueError(f"{len(out)} bytes, {n} expected")
    return bytes(out)
