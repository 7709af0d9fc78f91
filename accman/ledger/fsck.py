"""Checks a LevelDB data directory's files without LevelDB, before it opens
them: every record of the write-ahead logs and the MANIFEST, and every
block of every table, against its CRC-32C.

Why not leave it to LevelDB (paranoid_checks, verify_checksums)?  Two gaps
in LevelDB 1.22, both seen in tests/reliability/test_storage_faults.py:

* its log reader takes a record whose length runs past the end of the file
  for a torn write: it drops that record and every one after it without a
  word, and the open then turns the shortened log into a table and deletes
  the log.  Here a bad record is a torn tail only when nothing valid
  follows it, at the end of the newest log; anything else is damage.
* an iterator with verify_checksums stops early, without an error, when the
  last data block of a table is damaged.  Here every block's CRC is checked.

What LevelDB will read is what is checked: the MANIFEST that CURRENT names,
the logs it will replay (numbered from the MANIFEST's log number on, and its
previous log), and the tables the MANIFEST lists.  Files it does not list
are left-overs of an interrupted compaction that LevelDB deletes at open;
checking them would refuse a store for a crash it survives.

In an AccMan store, LevelDB's logs are written without sync behind
AccMan's own write-ahead log (accman.ledger.wal): this check reads each of
them up to the length synced at the store's last checkpoint, to which the
store cuts them once the check passed; what is cut is replayed from the
log.  Tables are checked by accman.ledger.tablecheck.

No file is written.  Any failure is a StoreCorrupt naming the file and the
offset; the directory is then to be looked at by a person, never repaired
here (the store's rule: refuse, never repair silently).
"""

from __future__ import annotations

import os
import re
import struct
from typing import NamedTuple

from accman.errors import FileDamage, StoreCorrupt
from accman.ledger import _check
from accman.ledger.tablecheck import check_table, read_prefixed, read_varint

# The log format (leveldb doc/log_format.md).  The MANIFEST is a log too.
LOG_BLOCK_BYTES = _check.LOG_BLOCK_BYTES        # 32 KiB
LOG_HEADER_BYTES = _check.LOG_HEADER_BYTES      # crc:4, length:2 (LE), type:1
LOG_ZERO, LOG_FULL, LOG_FIRST, LOG_MIDDLE, LOG_LAST = range(5)
# A log record's payload is a write batch (leveldb db/write_batch.cc):
# sequence:u64, count:u32, then the puts and deletes.
BATCH_HEADER = struct.Struct("<QI")
BATCH_DELETE, BATCH_PUT = 0, 1      # an entry's type (leveldb db/dbformat.h)


# VersionEdit tags (leveldb db/version_edit.cc); 8 was used by old versions
# for large value references and is refused by 1.22, as here.
TAG_COMPARATOR, TAG_LOG_NUMBER, TAG_NEXT_FILE, TAG_LAST_SEQUENCE = 1, 2, 3, 4
TAG_COMPACT_POINTER, TAG_DELETED_FILE, TAG_NEW_FILE, TAG_PREV_LOG_NUMBER = 5, 6, 7, 9
# The comparator LevelDB's default options name (leveldb util/comparator.cc);
# a store under another is refused by LevelDB.
LEVELDB_COMPARATOR = b"leveldb.BytewiseComparator"

# LevelDB's file names (leveldb db/filename.cc).
LOG_NAME = re.compile(r"^(\d+)\.log$")
TABLE_NAME = re.compile(r"^(\d+)\.(ldb|sst)$")
MANIFEST_NAME = re.compile(r"^MANIFEST-(\d+)$")


class Checked(NamedTuple):
    """What check_dir read: for the caller's log line and for benchmarks."""

    logs: int
    log_records: int
    tables: int
    table_blocks: int
    bytes: int


def has_leveldb_files(path: str) -> bool:
    return any(LOG_NAME.match(n) or TABLE_NAME.match(n) or MANIFEST_NAME.match(n)
               for n in os.listdir(path))


def check_dir(path: str, *, synced_logs: dict | None = None,
              shown_as: str | None = None) -> Checked:
    """Checks the LevelDB files of the directory `path`; raises StoreCorrupt
    if any is damaged, naming `shown_as` (default: `path`).  A directory
    without CURRENT and without data files is a new store and passes.

    `synced_logs`: the logs' lengths at the store's last checkpoint, to
    which recovery cuts them (accman.ledger.wal) once this check passed:
    each log is checked up to that length.  Every byte of that was synced,
    so no log may end in a torn write, and a log it lists with synced
    bytes may be missing only if LevelDB is done with it.
    Without it, the newest log may end torn (every write was synced: a
    torn one was never acknowledged)."""
    path = os.path.abspath(path)
    try:
        return _check_dir(path, synced_logs)
    except FileDamage as e:
        raise StoreCorrupt(f"{shown_as or path}: data files are damaged: {e}; refusing "
                           "to serve, nothing repaired (checked before LevelDB "
                           "opened the directory: no file was changed)") from None


def _check_dir(path: str, synced_logs: dict | None) -> Checked:
    names = set(os.listdir(path))
    state, total = _read_manifest(path, names)
    if state is None:
        return Checked(0, 0, 0, 0, 0)
    logs = sorted(int(m.group(1)) for m in map(LOG_NAME.match, names) if m)
    if state.log_number and state.log_number not in logs:
        # LevelDB makes a log before the version edit that names it, and
        # deletes the one before only once that edit is synced: the log of
        # the MANIFEST's last version is there after any crash.  Without
        # it, the MANIFEST lost its last edits (cut short at a record, or a
        # record's length damaged into a torn tail), and LevelDB would open
        # an older version, its writes since lost and their tables deleted.
        raise FileDamage(f"LevelDB log {state.log_number:06d}.log, which {state.manifest} "
                         "names as its newest, is missing: the MANIFEST lost its last "
                         "records, or the log was deleted")
    live_logs = live_log_numbers(state, names)
    if synced_logs is not None:
        for name, synced in sorted(synced_logs.items()):
            number = int(LOG_NAME.match(name).group(1))
            if synced and name not in names and (number >= state.log_number
                                                 or number == state.prev_log_number):
                raise FileDamage(f"LevelDB log {name} is missing, but {synced} bytes of "
                                 "it were synced at the last checkpoint and LevelDB "
                                 "still needs it")
    log_records = 0
    for number in live_logs:
        name = f"{number:06d}.log"
        raw = _read(path, name)
        if synced_logs is not None:
            raw = raw[:synced_logs.get(name, 0)]    # as recovery will cut it
        total += len(raw)
        torn_ok = synced_logs is None and number == live_logs[-1]
        log_records += check_log(raw, name, torn_tail_ok=torn_ok)[1]
    blocks, table_bytes = _check_tables(path, names, state)
    return Checked(len(live_logs), log_records, len(state.tables), blocks, total + table_bytes)


def live_log_numbers(state, names: set) -> list[int]:
    """The logs LevelDB replays at open, by number: from the MANIFEST's
    log number on, and its previous log."""
    logs = sorted(int(m.group(1)) for m in map(LOG_NAME.match, names) if m)
    return [n for n in logs if n >= state.log_number or n == state.prev_log_number]


def read_version(path: str):
    """What the MANIFEST that CURRENT names arrives at (its tables, their
    key ranges, its log numbers); None for a new directory.  FileDamage."""
    return _read_manifest(path, set(os.listdir(path)))[0]


def _read_manifest(path: str, names: set):
    """The version the MANIFEST that CURRENT names arrives at, and its size;
    (None, 0) for a new directory."""
    data_names = sorted(n for n in names if LOG_NAME.match(n) or TABLE_NAME.match(n)
                        or MANIFEST_NAME.match(n))
    if "CURRENT" not in names:
        if data_names:
            # LevelDB would make a new, empty store here and delete the
            # tables as obsolete.
            raise FileDamage(f"CURRENT is missing but {data_names[0]} and others are here")
        return None, 0
    current = _read(path, "CURRENT")
    manifest = current[:-1].decode("ascii", "replace")
    if not current.endswith(b"\n") or not MANIFEST_NAME.match(manifest):
        shown = ascii(current[:80].decode("latin-1"))    # each byte, escaped if not ASCII
        raise FileDamage(f"CURRENT does not name a MANIFEST: it holds {shown}")
    if manifest not in names:
        raise FileDamage(f"CURRENT names {manifest}, which is missing")
    raw = _read(path, manifest)
    edits, _ = check_log(raw, manifest, torn_tail_ok=True, keep=True)
    state = _apply_edits(edits, manifest)
    state.manifest = manifest
    return state, len(raw)


def tables_listed(path: str) -> set[str]:
    """The names of the tables the MANIFEST that CURRENT names lists (what
    LevelDB will read; any other table it deletes at open).  FileDamage if
    the MANIFEST is."""
    names = set(os.listdir(path))
    state, _ = _read_manifest(path, names)
    if state is None:
        return set()
    return {n for n in names if (m := TABLE_NAME.match(n)) and int(m.group(1)) in state.tables}


def _check_tables(path: str, names: set, state) -> tuple[int, int]:
    """Every table the MANIFEST lists: there, of its size, every block
    sound.  Returns (blocks, bytes)."""
    blocks = total = 0
    for number, size in sorted(state.tables.items()):
        name = next((n for n in (f"{number:06d}.ldb", f"{number:06d}.sst") if n in names), None)
        if name is None:
            raise FileDamage(f"table {number:06d}.ldb, listed in {state.manifest}, is missing")
        raw = _read(path, name)
        total += len(raw)
        if len(raw) != size:
            raise FileDamage(f"table {name} has {len(raw)} bytes, {state.manifest} says {size}")
        blocks += check_table(raw, name)
    return blocks, total


def _read(path: str, name: str) -> bytes:
    with open(os.path.join(path, name), "rb") as f:
        return f.read()


# --- logs --------------------------------------------------------------------------

class _Physical(NamedTuple):
    offset: int
    kind: int
    start: int          # of the payload
    length: int


def _walk(raw: bytes) -> tuple[list[_Physical], tuple[int, str] | None]:
    """The valid physical records of a log-format file, in order, up to the
    first bad one; and that one's (offset, what is wrong), or None."""
    out = []
    i, n = 0, len(raw)
    view = memoryview(raw)
    while i < n:
        left = LOG_BLOCK_BYTES - i % LOG_BLOCK_BYTES
        if left < LOG_HEADER_BYTES:
            # The writer fills a block's last few bytes with zeros.
            if any(raw[i:i + left]):
                return out, (i, "block trailer is not zeros")
            i += left
            continue
        if not _check.log_record_ok(view, i):
            return out, (i, _why_bad(raw, i))
        length, kind = struct.unpack_from("<HB", raw, i + 4)
        out.append(_Physical(i, kind, i + LOG_HEADER_BYTES, length))
        i += LOG_HEADER_BYTES + length
    return out, None


def _assemble(raw: bytes, name: str, physical: list[_Physical]):
    """The logical records as (offset of their first fragment, bytes), and
    whether the last one is left open (FIRST or MIDDLE without its LAST)."""
    records = []
    fragments = None            # inside a FIRST..LAST record
    first = 0
    for rec in physical:
        if (rec.kind in (LOG_FULL, LOG_FIRST)) != (fragments is None):
            raise FileDamage(f"{_what(name)}: record at offset {rec.offset} is out of "
                             f"sequence (type {rec.kind} "
                             f"{'inside' if fragments is not None else 'outside'} "
                             "a fragmented record)")
        payload = raw[rec.start:rec.start + rec.length]
        if rec.kind == LOG_FULL:
            records.append((rec.offset, payload))
        elif rec.kind == LOG_FIRST:
            fragments, first = [payload], rec.offset
        else:
            fragments.append(payload)
            if rec.kind == LOG_LAST:
                records.append((first, b"".join(fragments)))
                fragments = None
    return records, fragments is not None


def check_log(raw: bytes, name: str, *, torn_tail_ok: bool,
              keep: bool = False) -> tuple[list[bytes], int]:
    """Walks the records of a log-format file.  Returns its logical records
    (with `keep`) and the count of physical ones.  A bad record is allowed
    only as a torn tail: `torn_tail_ok` and no valid record anywhere after
    it, in its block or a later one."""
    physical, bad = _walk(raw)
    if bad is not None:
        _bad(raw, name, bad[0], bad[1], torn_tail_ok)
    records, left_open = _assemble(raw, name, physical)
    if left_open and (bad is None and not torn_tail_ok):
        raise FileDamage(f"{_what(name)}: ends inside a fragmented record")
    return ([r for _, r in records] if keep else []), len(physical)


class Batch(NamedTuple):
    log: str            # the LevelDB log's name
    offset: int         # of its first fragment
    seq: int            # its first put's or delete's sequence number
    body: bytes         # past its sequence number: count:u32, its puts and deletes


def batches_after(path: str, synced_logs: dict) -> list[Batch]:
    """The write batches with at least one put or delete that LevelDB's
    logs of the directory hold past their synced lengths (`synced_logs`; a
    log it lacks: 0), in the order they were written (by log number, then
    offset).  A log's walk ends at its first bad record: past the synced
    length, a power cut may have left anything."""
    out = []
    for name in sorted((n for n in os.listdir(path) if LOG_NAME.match(n)), key=_number):
        raw = _read(path, name)
        synced = synced_logs.get(name, 0)
        if len(raw) <= synced:
            continue
        out += [Batch(name, off, BATCH_HEADER.unpack_from(batch)[0], batch[8:])
                for off, batch in readable_records(raw, name)
                if off >= synced and len(batch) >= BATCH_HEADER.size
                and BATCH_HEADER.unpack_from(batch)[1] > 0]
    return out


def batch_entries(body: bytes, what: str) -> list[tuple[bytes, bytes | None]]:
    """A write batch's puts (key, value) and deletes (key, None), in order,
    from its `body` (past its sequence number: count:u32, then each entry's
    type, its key and a put's value, each after its length as a varint;
    leveldb db/write_batch.cc).  FileDamage, naming `what`, if it does not
    parse whole."""
    out = []
    i = 4
    try:
        for _ in range(struct.unpack_from("<I", body)[0]):
            kind = body[i]
            if kind not in (BATCH_DELETE, BATCH_PUT):
                raise ValueError(f"entry type {kind}")
            key, i = read_prefixed(body, i + 1)
            value = None
            if kind == BATCH_PUT:
                value, i = read_prefixed(body, i)
            out.append((key, value))
    except (ValueError, IndexError, struct.error) as e:
        raise FileDamage(f"{what}: a write batch that does not parse ({e})") from None
    if i != len(body):
        raise FileDamage(f"{what}: a write batch longer than its {len(out)} entries")
    return out


def readable_records(raw: bytes, name: str) -> list[tuple[int, bytes]]:
    """A log's logical records up to its first bad one, as (offset,
    bytes): what LevelDB's reader takes when the files are not checked
    first.  A record out of sequence there ends them all."""
    physical, _ = _walk(raw)
    try:
        return _assemble(raw, name, physical)[0]
    except FileDamage:
        return []


def _number(name: str) -> int:
    return int(name.split(".", 1)[0])


def _why_bad(raw: bytes, i: int) -> str:
    n = len(raw)
    if n - i < LOG_HEADER_BYTES:
        return "is cut short (header)"
    length, kind = struct.unpack_from("<HB", raw, i + 4)
    if kind == LOG_ZERO:
        return "is zeros"
    if kind > LOG_LAST:
        return f"has unknown type {kind}"
    end = i + LOG_HEADER_BYTES + length
    if end > i - i % LOG_BLOCK_BYTES + LOG_BLOCK_BYTES:
        return f"has length {length}, past the end of its 32 KiB block"
    if end > n:
        return f"has length {length}, past the end of the file"
    return "fails its checksum"


# What a write cut short by a crash leaves at a log's end: LevelDB's reader
# takes these for the end of the file.  A whole record that fails its
# checksum it reports as corruption, and in the MANIFEST that refuses the
# open (VersionSet::Recover), so there it is damage.
_CUT_SHORT = ("is cut short", "is zeros", "past the end of the file")


def _bad(raw: bytes, name: str, i: int, why: str, torn_tail_ok: bool) -> None:
    """Returns if the bad record at offset i is a torn tail; raises if not."""
    if torn_tail_ok and name.startswith("MANIFEST") and not any(c in why for c in _CUT_SHORT):
        raise FileDamage(f"{name}: record at offset {i} {why}")
    if not torn_tail_ok:
        raise FileDamage(f"{_what(name)}: record at offset {i} {why} (only the "
                         "newest log may end in a torn write, and only where its "
                         "bytes were not all synced)")
    later = _check.find_log_record(memoryview(raw), i + 1)
    if later >= 0:
        raise FileDamage(f"{_what(name)}: record at offset {i} {why}, and a valid record "
                      f"follows at offset {later}: damage, not a torn write")


def _what(name: str) -> str:
    return name if name.startswith("MANIFEST") else f"log {name}"


# --- the MANIFEST's version edits ----------------------------------------------------

class _Version:
    def __init__(self):
        self.manifest = ""
        self.log_number = 0
        self.prev_log_number = 0
        self.tables: dict[int, int] = {}        # file number -> size in bytes
        self.ranges: dict[int, tuple] = {}      # file number -> (smallest, largest) key


def _apply_edits(edits: list[bytes], name: str) -> _Version:
    """The tables and log numbers that LevelDB's VersionSet::Recover would
    arrive at from these VersionEdit records; FileDamage where it would
    refuse them."""
    v = _Version()
    seen = set()
    for k, edit in enumerate(edits):
        try:
            seen |= _apply_edit(v, edit)
        except (ValueError, IndexError) as e:
            raise FileDamage(f"{name}: record {k} is not a valid version edit ({e})") from None
    missing = [what for tag, what in ((TAG_NEXT_FILE, "next file number"),
                                      (TAG_LOG_NUMBER, "log number"),
                                      (TAG_LAST_SEQUENCE, "last sequence"))
               if tag not in seen]
    if missing:
        raise FileDamage(f"{name} has no {', '.join(missing)}")
    return v


# The fields of the tags _apply_edit reads past: v a varint, s a
# length-prefixed string.
_SKIPPED = {TAG_NEXT_FILE: "v", TAG_LAST_SEQUENCE: "v", TAG_COMPACT_POINTER: "vs"}


def _apply_edit(v: _Version, edit: bytes) -> set:
    """Applies one VersionEdit to `v`; returns the tags it had."""
    tags = set()
    i = 0
    while i < len(edit):
        tag, i = read_varint(edit, i)
        tags.add(tag)
        if tag == TAG_COMPARATOR:
            comparator, i = read_prefixed(edit, i)
            if comparator != LEVELDB_COMPARATOR:
                raise ValueError(f"comparator {comparator[:40]!r}")
        elif tag == TAG_LOG_NUMBER:
            v.log_number, i = read_varint(edit, i)
        elif tag == TAG_PREV_LOG_NUMBER:
            v.prev_log_number, i = read_varint(edit, i)
        elif tag == TAG_DELETED_FILE:
            _, i = read_varint(edit, i)
            number, i = read_varint(edit, i)
            v.tables.pop(number, None)
            v.ranges.pop(number, None)
        elif tag == TAG_NEW_FILE:
            _, i = read_varint(edit, i)
            number, i = read_varint(edit, i)
            v.tables[number], i = read_varint(edit, i)
            smallest, i = read_prefixed(edit, i)
            largest, i = read_prefixed(edit, i)
            v.ranges[number] = (smallest, largest)
        elif tag in _SKIPPED:
            for field in _SKIPPED[tag]:
                _, i = (read_varint if field == "v" else read_prefixed)(edit, i)
        else:
            raise ValueError(f"unknown tag {tag}")
    return tags
