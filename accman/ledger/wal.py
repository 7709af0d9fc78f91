"""AccMan's write-ahead log: what makes a batch durable.  Its formats and
recovery are here; writing it is accman.ledger.walwriter's.

Why our own log in front of LevelDB's: LevelDB's log grows with every write,
so each `fdatasync` of it also writes the inode (the size changed), three
disk requests per batch.  This log is a file written ahead of need (zeros,
synced) and then overwritten in place with `O_DIRECT|O_DSYNC`: a batch is
two disk requests (its blocks and the cache flush), and LevelDB is then
written without sync.  PostgreSQL's WAL segments, preallocated and
recycled, are the precedent.  (What it gains: docs/PERFORMANCE.md.)

The files, in the data directory beside LevelDB's:

* `accman.wal`: records at 4 KiB boundaries (O_DIRECT writes whole, aligned
  blocks).  A record is a 32-byte header, then its payload, laid out over
  512-byte sectors that each end in the record's stamp (lsn and payload
  bytes; accman.ledger.walsectors), zero-padded:

      magic b"AMW3", lsn:u64, payload bytes:u32, mac:16 bytes

  `mac` is a keyed BLAKE2b-128 of lsn, payload bytes and payload, under a
  key derived from the store's secret (accman.ledger.keyfile): bytes that a
  client chose (its amounts and keys, inside a payload) can never pass for
  a record.  The payload is the batch's LevelDB puts in the book's encoding
  (ext/ledger.pyx); it may hold any record the book writes, not only mods.
  Record numbers (lsn) grow by one per batch (two across an open, which
  skips the one due where the records ended) and never repeat, across laps
  and restarts.  Formats AMW1 (a plain CRC-32C where the mac is) and AMW2
  (the payload right after the header, no stamps) were written before; a
  store that has one is read once, at the open after the upgrade, whose
  checkpoint starts the log afresh in AMW3.
* `accman.checkpoint`: JSON, replaced atomically (write, fsync, rename,
  fsync the directory), with a MAC of its own: `lsn`, the first record not
  known to be in LevelDB's synced files; `logs`, the length of each LevelDB
  log file at that moment, all synced; `wal_bytes`, how much of the log's
  file was written and synced (the file never shrinks).

Writing: the records after a checkpoint start at offset 0 and go on until
the next record would pass WAL_BYTES_MAX; then a checkpoint is taken (every
LevelDB log file fsync'd, then the directory, then the new checkpoint
written) and writing starts again at 0.  Before a record that would wrap,
the writer has every queued record applied to LevelDB, so at a checkpoint
every record before it is in LevelDB's files, and those files are synced.  A checkpoint that
fails without losing anything (a descriptor that could not be had) is
postponed: the log runs on past its size and the checkpoint is tried again;
a failed fsync or rename is fail-stop (accman.ledger.commit).

Recovery, at open, before LevelDB reads anything (accman.ledger.leveldb
runs these steps in this order):

1. `read_checkpoint`: refused if damaged (its MAC), or if it names a log
   that is missing or shorter than it recorded.
2. `scan`: the records from offset 0 with lsn = the checkpoint's, the next,
   and so on, are read (and parsed by the store); the first record that is
   not the next (zeros, an older lap's record, a torn write) ends the log.
   A valid record with a later lsn after the end is damage, not a torn
   tail: a torn write can only be the last record, since each write
   completes before the next starts and a failed one stops all writing.
   And where the log ends, a record whose every sector landed but that
   fails its check is damage (it may have been acknowledged, and LevelDB
   may not have its batch), not a torn write (walsectors).
3. `logs_to_cut`, then accman.ledger.fsck checks LevelDB's files as they
   will be once cut, and the key file is compared with LevelDB's format
   record (accman.ledger.found: a key of another store is named so).
4. `check_leveldb_tail`: LevelDB's logs, past their synced lengths, hold
   the records' batches, in order: each reached LevelDB after its record
   was durable.  A batch more than the records means that a record,
   perhaps acknowledged, is missing or damaged; a batch that is not its
   record's, that LevelDB's files and the log are of two copies of the
   store (the same key), one's acknowledged batches about to be cut and
   the other's replayed.  Refused, rather than cut away.  Then
   `cut_logs`: LevelDB's logs are cut back to the
   lengths the checkpoint recorded, and a log created since is emptied.
   What was written to them after the checkpoint was never synced: after a
   power cut their tails may hold garbage, which LevelDB's recovery and
   fsck would rightly refuse.  Everything cut is in this log's records.
5. LevelDB opens, and the records are written into it again: each is the
   absolute state of the keys it puts, so writing one twice is harmless.
   Then a checkpoint, so the replayed records are synced in LevelDB.

No file is changed until every check has passed: a refused store is left
as it was found.
"""

from __future__ import annotations

import collections
import hashlib
import hmac
import itertools
import json
import os
import struct
from typing import NamedTuple

from accman.errors import FileDamage
from accman.ledger import _check, fsck, keyfile, walsectors
from accman.ledger.fsck import LOG_NAME

WAL_NAME = "accman.wal"
CHECKPOINT_NAME = "accman.checkpoint"
# 1: no MAC, no wal_bytes, records in AMW1; 2: records in AMW2, unstamped.
CHECKPOINT_FORMAT = 3
CHECKPOINT_FORMATS_READ = (1, 2, 3)
CHECKPOINT_1_FIELDS = {"format", "lsn", "logs"}     # all that format 1 wrote

BLOCK_BYTES = 4096              # O_DIRECT: buffers, offsets, lengths aligned
MAC_BYTES = 16
HEADER = struct.Struct("<4sQI16s")
MAGIC = b"AMW3"                 # a record laid out in stamped sectors (walsectors)
MAGIC_AMW2 = b"AMW2"            # the same header, the payload after it unstamped
HEADER_AMW1 = struct.Struct("<4sQII12x")
MAGIC_AMW1 = b"AMW1"
assert HEADER.size == HEADER_AMW1.size == walsectors._HEADER_BYTES == 32
# The log's size: one lap at the full durable /mod rate is seconds, so a
# checkpoint (fsyncs of LevelDB's logs, a few ms) is rare, and reading the
# whole file at open stays short.
WAL_BYTES_MAX = 64 * 1024 * 1024
# The largest payload: a batch of BATCH_MODS_MAX mods, each two puts of at
# most 2 + 255 + 255 bytes (ext/ledger.pyx), is ~4 MiB; refused beyond this.
PAYLOAD_BYTES_MAX = 16 * 1024 * 1024



class Keys(NamedTuple):
    """The MAC keys, derived from the store's secret."""

    wal: bytes
    checkpoint: bytes

    @classmethod
    def of(cls, salt: bytes) -> "Keys":
        return cls(keyfile.derive(salt, keyfile.PURPOSE_WAL),
                   keyfile.derive(salt, keyfile.PURPOSE_CHECKPOINT))


class Checkpoint(NamedTuple):
    lsn: int
    logs: dict          # LevelDB log file name -> synced length
    format: int = CHECKPOINT_FORMAT
    wal_bytes: int = 0


class Record(NamedTuple):
    lsn: int
    payload: bytes


def record_mac(key: bytes, lsn: int, n: int, payload) -> bytes:
    h = hashlib.blake2b(struct.pack("<QI", lsn, n), key=key, digest_size=MAC_BYTES)
    h.update(payload)
    return h.digest()


def _crc_amw1(lsn: int, n: int, payload) -> int:
    return _check.crc32c(payload, _check.crc32c(struct.pack("<QI", lsn, n)))


# --- 1. the checkpoint file -------------------------------------------------------

def checkpoint_mac(key: bytes, doc: dict) -> str:
    body = json.dumps(doc, sort_keys=True).encode()
    return hashlib.blake2b(body, key=key, digest_size=MAC_BYTES).hexdigest()


def read_checkpoint(path: str, keys: Keys | None) -> Checkpoint | None:
    """The directory's checkpoint, or None when it has none (a new store, or
    one written before this log existed: LevelDB's logs were all synced).
    `keys` may be None only for a store without a key file (format 1)."""
    try:
        with open(os.path.join(path, CHECKPOINT_NAME), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        fmt = doc["format"]
    except (ValueError, KeyError, TypeError, RecursionError):   # RecursionError: nested JSON
        raise FileDamage(f"{CHECKPOINT_NAME} is unreadable") from None
    if fmt not in CHECKPOINT_FORMATS_READ:
        raise FileDamage(f"{CHECKPOINT_NAME} is of format {fmt}, this AccMan reads "
                         f"formats {', '.join(map(str, CHECKPOINT_FORMATS_READ))}")
    later = sorted(set(doc) - CHECKPOINT_1_FIELDS) if fmt == 1 else []
    if later:
        # A format-1 checkpoint has no MAC to check: one with a later
        # format's fields is a flipped digit, not a store from before the key.
        raise FileDamage(f"{CHECKPOINT_NAME} says format 1 but has {', '.join(later)}, "
                         "which format 1 has not")
    if fmt >= 2:
        if keys is None:
            raise FileDamage(f"{keyfile.KEY_NAME} is missing, but {CHECKPOINT_NAME} "
                             "needs it")
        mac = doc.pop("mac", None)
        if not isinstance(mac, str) or not hmac.compare_digest(
                mac, checkpoint_mac(keys.checkpoint, doc)):
            raise FileDamage(f"{CHECKPOINT_NAME} fails its MAC")
    ckpt = _checkpoint_of(doc, fmt)
    if ckpt is None:
        raise FileDamage(f"{CHECKPOINT_NAME} is unreadable")
    return ckpt


def _checkpoint_of(doc: dict, fmt: int) -> Checkpoint | None:
    try:
        lsn, logs = doc["lsn"], doc["logs"]
        wal_bytes = doc["wal_bytes"] if fmt >= 2 else 0
        ok = (type(lsn) is int and lsn >= 1 and type(wal_bytes) is int and wal_bytes >= 0
              and isinstance(logs, dict)
              and all(LOG_NAME.match(k) and type(v) is int and v >= 0
                      for k, v in logs.items()))
    except (KeyError, TypeError):
        ok = False
    return Checkpoint(lsn, logs, fmt, wal_bytes) if ok else None


# --- 2. reading the records ---------------------------------------------------------------

def scan(path: str, ckpt: Checkpoint | None, keys: Keys | None) -> list[Record]:
    """The records after the checkpoint, in order.  FileDamage: the log is
    missing or short while a checkpoint names it, or a valid record is
    where none may be (after the log's end, or any record at all without a
    checkpoint)."""
    try:
        with open(os.path.join(path, WAL_NAME), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        if ckpt is not None:
            raise FileDamage(f"{WAL_NAME} is missing, but {CHECKPOINT_NAME} "
                             "names it") from None
        return []
    if ckpt is None:
        _refuse_any_record(raw, keys)
        return []
    if len(raw) < ckpt.wal_bytes:
        raise FileDamage(f"{WAL_NAME} has {len(raw)} bytes, {CHECKPOINT_NAME} "
                         f"recorded {ckpt.wal_bytes}")
    view = memoryview(raw)
    read = _reader(ckpt.format, keys)
    out = []
    off = 0
    expect = ckpt.lsn
    while True:
        rec = read(view, off, expect)
        if rec is None or rec.lsn != expect:
            break
        out.append(rec)
        off += record_span(len(rec.payload), ckpt.format)
        expect += 1
    # Nothing valid may follow the end with an lsn that should have come.
    for at in range(off, len(raw) - HEADER.size + 1, BLOCK_BYTES):
        rec = read(view, at, expect)
        if rec is not None:
            raise FileDamage(f"{WAL_NAME}: record {rec.lsn} at offset {at} follows "
                             f"the end of the log at offset {off} (record {expect} "
                             "is missing or damaged)")
    if ckpt.format >= 3:
        _refuse_damaged_end(view, off, expect)
    return out


def _refuse_damaged_end(view, off: int, lsn: int) -> None:
    """Where the records end, record `lsn` was never written, or was torn
    by a crash as it was written (never acknowledged: dropped); a record
    whose sectors all landed and that fails its check was acknowledged,
    perhaps, and is in no other file: FileDamage (accman.ledger.walsectors)."""
    header = None
    if off + HEADER.size <= len(view):
        magic, seen, n, _ = HEADER.unpack_from(view, off)
        if magic == MAGIC:
            header = (seen, n)
            if seen == lsn and n > PAYLOAD_BYTES_MAX:
                raise FileDamage(f"{WAL_NAME}: record {lsn} at offset {off} says it has "
                                 f"{n} bytes, over {PAYLOAD_BYTES_MAX}: damaged")
    why = walsectors.damage_at_end(view, off, lsn, header)
    if why is not None:
        raise FileDamage(f"{WAL_NAME}: record {lsn} at offset {off}, the newest, is damaged: "
                         f"{why} (a crash tears only a write that had not landed)")


def _refuse_any_record(raw: bytes, keys: Keys | None) -> None:
    """Without a checkpoint the log must hold no record, of any format.
    Without the key, a block that starts with the AMW2 or AMW3 magic is
    taken for one: refusing is the safe side."""
    view = memoryview(raw)
    readers = [_reader(1, None)]
    if keys is not None:
        readers += [_reader(2, keys), _reader(3, keys)]
    for at in range(0, len(raw) - HEADER.size + 1, BLOCK_BYTES):
        if (any(read(view, at, 0) is not None for read in readers)
                or (keys is None and raw[at:at + 4] in (MAGIC_AMW2, MAGIC))):
            raise FileDamage(f"{WAL_NAME} holds records but {CHECKPOINT_NAME} is missing")


def _reader(fmt: int, keys: Keys | None):
    """`read(view, off, min_lsn)`: the valid record at `off` numbered
    min_lsn or later, or None; in the record format of checkpoint format
    `fmt`."""
    if fmt == 1:
        def read(view, off, min_lsn):
            if off + HEADER_AMW1.size > len(view):
                return None
            magic, lsn, n, crc = HEADER_AMW1.unpack_from(view, off)
            payload = _payload(view, off, magic, MAGIC_AMW1, lsn, min_lsn, n)
            if payload is None or _crc_amw1(lsn, n, payload) != crc:
                return None
            return Record(lsn, bytes(payload))
        return read
    key = keys.wal

    def read(view, off, min_lsn):
        if off + HEADER.size > len(view):
            return None
        magic, lsn, n, mac = HEADER.unpack_from(view, off)
        if fmt == 2:
            payload = _payload(view, off, magic, MAGIC_AMW2, lsn, min_lsn, n)
        elif magic != MAGIC or lsn < min_lsn or n > PAYLOAD_BYTES_MAX:
            payload = None
        else:
            data = walsectors.gather(view, off, HEADER.size + n)
            payload = None if data is None else memoryview(data)[HEADER.size:]
        if payload is None or not hmac.compare_digest(record_mac(key, lsn, n, payload), mac):
            return None
        return Record(lsn, bytes(payload))
    return read


def _payload(view, off: int, magic: bytes, want: bytes, lsn: int, min_lsn: int, n: int):
    if magic != want or lsn < min_lsn or n > PAYLOAD_BYTES_MAX:
        return None
    start = off + HEADER.size
    if start + n > len(view):
        return None
    return view[start:start + n]


# --- 3. LevelDB's logs against the records ---------------------------------------------

def check_leveldb_tail(ckpt: Checkpoint, records: list, batches: list, body_of) -> None:
    """`records`: the log's from the checkpoint on, as (lsn, puts);
    `batches`: the write batches LevelDB's logs hold past their synced
    lengths, in order (fsck.batches_after).  Each batch was written after
    its record was durable, one a record, in the records' order (the
    applier's, and recovery's replay), LevelDB numbering each batch's puts
    and deletes on from the one before.  So there are no more batches than
    records; the first is any record's (those before it may be in a table
    that LevelDB made since, moving to a new log: its memory was full),
    and each later one the record its sequence number says (a power cut
    may have lost the batches between).  A record's batch is
    `body_of(puts)`, as a batch lays them out, or the same entries in
    another order (another AccMan's layout); `body_of` None: a store an
    older AccMan wrote, counted only.  More batches means a record,
    perhaps acknowledged, is missing or damaged; another batch, that
    LevelDB's files and the log are of two copies of a store, one's
    acknowledged batches about to be cut and the other's replayed:
    FileDamage."""
    if len(batches) > len(records):
        counts = collections.Counter(b.log for b in batches)
        where = ", ".join(f"{n} in {name}" for name, n in sorted(counts.items()))
        raise FileDamage(
            f"LevelDB's logs hold {len(batches)} batches written after the last checkpoint "
            f"({where}), but {WAL_NAME} holds {len(records)} records from record "
            f"{ckpt.lsn} on: a record that may have been acknowledged is missing "
            "or damaged")
    if body_of is None or not batches:
        return
    bodies = [body_of(puts) for _, puts in records]
    first = batches[0]
    k = next((i for i, body in enumerate(bodies) if body == first.body), None)
    if k is None:
        k = next((i for i, body in enumerate(bodies) if _same_entries(first, body)), None)
    if k is None:
        raise _not_a_record(first, f"any of the records of {WAL_NAME} from record "
                                   f"{ckpt.lsn} on")
    for before, batch in itertools.pairwise(batches):
        k = _record_at(bodies, k, batch.seq - before.seq)
        if k is None:
            raise _not_a_record(batch, f"a record of {WAL_NAME}: its sequence number "
                                       "places it past them, or between two")
        if not (batch.body == bodies[k] or _same_entries(batch, bodies[k])):
            raise _not_a_record(batch, f"record {records[k][0]} of {WAL_NAME}, where its "
                                       "sequence number places it")


def _record_at(bodies: list, k: int, step: int) -> int | None:
    """The record whose batch is `step` sequence numbers past record k's:
    each record's batch takes as many as its puts and deletes."""
    while step > 0 and k < len(bodies):
        step -= int.from_bytes(bodies[k][:4], "little")
        k += 1
    return k if step == 0 and k < len(bodies) else None


def _same_entries(batch, body: bytes) -> bool:
    """Whether `batch` holds the entries of a record's `body`, in any order."""
    if batch.body[:4] != body[:4]:
        return False

    def entries(raw):
        return sorted((key, value is not None, value or b"")
                      for key, value in fsck.batch_entries(raw, f"LevelDB log {batch.log}"))
    return entries(batch.body) == entries(body)


def _not_a_record(batch, what: str) -> FileDamage:
    return FileDamage(
        f"the batch at offset {batch.offset} of LevelDB's log {batch.log}, written after "
        f"the last checkpoint, is not {what}: LevelDB's files and the log are not of one "
        "copy of the store (a restore that mixed two?), or damaged")


# --- 4. cutting LevelDB's logs ------------------------------------------------------------

def logs_to_cut(path: str, ckpt: Checkpoint) -> dict:
    """What cutting LevelDB's logs back to their synced lengths would cut,
    as {name: bytes}; nothing is changed.  One shorter than its recorded
    length lost synced data (FileDamage)."""
    cuts = {}
    for name in sorted(os.listdir(path)):
        if not LOG_NAME.match(name):
            continue
        size = os.stat(os.path.join(path, name)).st_size
        keep = ckpt.logs.get(name, 0)
        if size < keep:
            raise FileDamage(f"LevelDB log {name} has {size} bytes, but {keep} were "
                             f"synced at the last checkpoint")
        if size > keep:
            cuts[name] = size - keep
    return cuts


def cut_logs(path: str, cuts: dict) -> None:
    """Cuts LevelDB's logs as `logs_to_cut` found, once every check passed."""
    for name, cut in cuts.items():
        file = os.path.join(path, name)
        os.truncate(file, os.stat(file).st_size - cut)
    if cuts:
        _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def record_span(payload_bytes: int, fmt: int = CHECKPOINT_FORMAT) -> int:
    """A record's bytes in the file, whole blocks: its stamped sectors, or
    (before format 3) its header and payload."""
    if fmt >= 3:
        return round_up(walsectors.sectors(HEADER.size + payload_bytes)
                        * walsectors.SECTOR_BYTES, BLOCK_BYTES)
    return round_up(HEADER.size + payload_bytes, BLOCK_BYTES)


