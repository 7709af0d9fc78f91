"""AccMan's write-ahead log: what makes a batch of mods durable.

Why our own log in front of LevelDB's: LevelDB's log grows with every write,
so each `fdatasync` of it also writes the inode (the size changed), three
disk requests per batch.  This log is a file written ahead of need (zeros,
synced once) and then overwritten in place with `O_DIRECT|O_DSYNC`: a batch
is two disk requests (its blocks and the cache flush), and LevelDB is then
written without sync.  Measured on durable /mod at 64 connections: 1.14x,
ahead in 6 of 6 rounds (docs/PERFORMANCE.md).  PostgreSQL's WAL segments,
preallocated and recycled, are the precedent.

The files, both in the data directory beside LevelDB's:

* `accman.wal`: records at 4 KiB boundaries (O_DIRECT writes whole, aligned
  blocks).  A record is a 32-byte header, then its payload, zero-padded:

      magic b"AMW1", lsn:u64, payload bytes:u32, crc32c:u32 (of lsn,
      payload bytes and payload), 12 zero bytes

  The payload is the batch's LevelDB puts in the book's encoding
  (ext/ledger.pyx, `_wal_put`).  Record numbers (lsn) grow by one per batch
  and never repeat, across wraps and restarts.
* `accman.checkpoint`: JSON, replaced atomically (write, fsync, rename,
  fsync the directory): `lsn`, the first record not known to be in
  LevelDB's synced files, and `logs`, the length of each LevelDB log file
  at that moment, all synced.

The records after a checkpoint start at offset 0.  Writing goes on from
there until the next record would pass WAL_BYTES_MAX; then a checkpoint is
taken (every LevelDB log file fsync'd, then the directory, then the new
checkpoint written) and writing starts again at 0.  The writer applies each
record to LevelDB before it writes the next, so at a checkpoint every
record before it is in LevelDB's files, and those files are synced.

Recovery, at open, before LevelDB reads anything (accman.ledger.leveldb):

1. `scan`: the records from offset 0 with lsn = the checkpoint's, the
   next, and so on, are read (and parsed by the store): the first record
   that is not the next (zeros, an older lap's record, a torn write) ends
   the log.  Damage is refused here, before any file changes.
2. `cut_logs`: LevelDB's log files are cut back to the lengths the
   checkpoint recorded, and a log created since is emptied.  What was
   written to them after the checkpoint was never synced: after a power cut
   their tails may hold garbage (on a file system without a journal, blocks
   that were never written), which LevelDB's recovery and accman.fsck would
   rightly refuse.  Everything cut is in this log's records.
3. LevelDB opens, and the records are written into it again: each is the
   absolute state of the keys it puts, so writing one twice is harmless.
   Then a checkpoint, so the replayed records are synced in LevelDB.

A torn write can only be the last record: each write completes before the
next starts, and a failed one stops all writing (accman.commit).  So a
valid record with a later lsn after the end is damage, not a torn tail, and
is refused, as is a log whose checkpoint is missing.
"""

from __future__ import annotations

import errno
import json
import mmap
import os
import re
import struct
import threading
import time
from typing import NamedTuple

from accman.ledger import _check

WAL_NAME = "accman.wal"
CHECKPOINT_NAME = "accman.checkpoint"
CHECKPOINT_FORMAT = 1

BLOCK_BYTES = 4096              # O_DIRECT: buffers, offsets, lengths aligned
HEADER = struct.Struct("<4sQII12x")
MAGIC = b"AMW1"
# The log's size: one lap at the full durable /mod rate (one 4 KiB block
# per batch of ~48 mods at 60k mods/s, ~5 MB/s) is ~12 s, so a checkpoint
# (fsyncs of LevelDB's logs, a few ms) is rare, and reading the whole file
# at open takes ~40 ms.
WAL_BYTES_MAX = 64 * 1024 * 1024
# The file is written ahead of the records (zeros, synced) by this much at a
# time: overwriting written blocks changes no metadata, so each record is
# the two disk requests and not the three of an append.  A thread of its
# own does it (_Grower), GROW_LEAD_BYTES ahead of the records: 1 MiB takes
# ~1.6 ms here, and a record waiting behind it put the p99 of a single
# client's mods at 1.1-1.4 ms during a new store's first lap; with the
# grower 0.87-0.92 ms (A/B, 3 of 3 rounds; 0.5-0.6 ms with the whole file
# written beforehand, which costs ~60 ms and 64 MiB of writes per new
# store).  At 64 connections it changes nothing (1.01x); a single client
# is 0.92x as fast while the grower's writes share the disk with its
# records.  After the first lap there is nothing left to grow.
GROW_BYTES = 1024 * 1024
GROW_LEAD_BYTES = 2 * GROW_BYTES
# The largest payload: a batch of BATCH_MODS_MAX mods, each two puts of at
# most 2 + 255 + 255 bytes (ext/ledger.pyx), is ~4 MiB; refused beyond this.
PAYLOAD_BYTES_MAX = 16 * 1024 * 1024

_LOG_NAME = re.compile(r"^\d+\.log$")
_ZEROS = memoryview(bytes(BLOCK_BYTES))         # a record's padding


class Damage(Exception):
    """The log or its checkpoint is damaged; accman.ledger.leveldb names the
    directory and refuses to serve."""


class Checkpoint(NamedTuple):
    lsn: int
    logs: dict          # LevelDB log file name -> synced length


# --- the checkpoint file ---------------------------------------------------------

def read_checkpoint(path: str) -> Checkpoint | None:
    """The directory's checkpoint, or None when it has none (a new store, or
    one written before this log existed: LevelDB's logs were all synced)."""
    try:
        with open(os.path.join(path, CHECKPOINT_NAME), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return None
    try:
        doc = json.loads(raw)
        if doc["format"] != CHECKPOINT_FORMAT:
            raise Damage(f"{CHECKPOINT_NAME} is of format {doc['format']}, this "
                         f"AccMan reads format {CHECKPOINT_FORMAT}")
        lsn, logs = doc["lsn"], doc["logs"]
        ok = (type(lsn) is int and lsn >= 1 and isinstance(logs, dict)
              and all(_LOG_NAME.match(k) and type(v) is int and v >= 0
                      for k, v in logs.items()))
    except (ValueError, KeyError, TypeError):
        ok = False
    if not ok:
        raise Damage(f"{CHECKPOINT_NAME} is unreadable")
    return Checkpoint(lsn, logs)


def _write_checkpoint(path: str, lsn: int, logs: dict) -> None:
    tmp = os.path.join(path, CHECKPOINT_NAME + ".tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o644)
    try:
        os.write(fd, json.dumps({"format": CHECKPOINT_FORMAT, "lsn": lsn,
                                 "logs": logs}, sort_keys=True).encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, os.path.join(path, CHECKPOINT_NAME))
    _fsync_dir(path)


def _fsync_dir(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_leveldb_logs(path: str) -> dict:
    """fsyncs every LevelDB log file, then the directory (files created since
    the last checkpoint); returns each one's synced length.  LevelDB writes
    its logs only from the thread that writes batches, which is the caller:
    nothing is appended meanwhile.  A log deleted meanwhile was turned into
    a table first, and tables are synced by LevelDB."""
    logs = {}
    for name in sorted(os.listdir(path)):
        if not _LOG_NAME.match(name):
            continue
        try:
            fd = os.open(os.path.join(path, name), os.O_RDONLY)
        except FileNotFoundError:
            continue
        try:
            logs[name] = os.fstat(fd).st_size
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_dir(path)
    return logs


# --- recovery ------------------------------------------------------------------------

def cut_logs(path: str, ckpt: Checkpoint) -> dict:
    """Step 1 of recovery: cuts LevelDB's logs back to their synced lengths.
    Checks every log before it cuts any: one shorter than its recorded
    length lost synced data (Damage).  Returns {name: bytes cut}."""
    cuts = {}
    for name in sorted(os.listdir(path)):
        if not _LOG_NAME.match(name):
            continue
        size = os.stat(os.path.join(path, name)).st_size
        keep = ckpt.logs.get(name, 0)
        if size < keep:
            raise Damage(f"LevelDB log {name} has {size} bytes, but {keep} were "
                         f"synced at the last checkpoint")
        if size > keep:
            cuts[name] = size - keep
    for name, cut in cuts.items():
        file = os.path.join(path, name)
        os.truncate(file, os.stat(file).st_size - cut)
    if cuts:
        _fsync_dir(path)
    return cuts


class Record(NamedTuple):
    lsn: int
    payload: bytes


def scan(path: str, ckpt: Checkpoint | None) -> list[Record]:
    """Step 2's reading: the records after the checkpoint, in order.
    Damage: a valid record where none may be (after the log's end, or any
    record at all without a checkpoint)."""
    try:
        with open(os.path.join(path, WAL_NAME), "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        return []
    view = memoryview(raw)
    out = []
    off = 0
    if ckpt is not None:
        expect = ckpt.lsn
        while True:
            rec = _record_at(view, off)
            if rec is None or rec.lsn != expect:
                break
            out.append(rec)
            off += _span(len(rec.payload))
            expect += 1
        first_bad = expect
    else:
        first_bad = 0
    # Nothing valid may follow the end with an lsn that should have come.
    for at in range(off, len(raw) - HEADER.size + 1, BLOCK_BYTES):
        rec = _record_at(view, at, first_bad)
        if rec is not None:
            if ckpt is None:
                raise Damage(f"{WAL_NAME} holds records but {CHECKPOINT_NAME} "
                             "is missing")
            raise Damage(f"{WAL_NAME}: record {rec.lsn} at offset {at} follows "
                         f"the end of the log at offset {off} (record {first_bad} "
                         "is missing or damaged)")
    return out


def _record_at(view, off: int, min_lsn: int = 0) -> Record | None:
    """The valid record at `off` numbered min_lsn or later, or None."""
    if off + HEADER.size > len(view):
        return None
    magic, lsn, n, crc = HEADER.unpack_from(view, off)
    if magic != MAGIC or lsn < min_lsn or n > PAYLOAD_BYTES_MAX or off + HEADER.size + n > len(view):
        return None
    payload = view[off + HEADER.size:off + HEADER.size + n]
    if _crc(lsn, n, payload) != crc:
        return None
    return Record(lsn, bytes(payload))


def _crc(lsn: int, n: int, payload) -> int:
    return _check.crc32c(payload, _check.crc32c(struct.pack("<QI", lsn, n)))


def _round_up(n: int, unit: int) -> int:
    return -(-n // unit) * unit


def _span(payload_bytes: int) -> int:
    """A record's bytes in the file: header and payload, whole blocks."""
    return _round_up(HEADER.size + payload_bytes, BLOCK_BYTES)


# --- writing -----------------------------------------------------------------------------

class Wal:
    """The log, open for writing, for one thread at a time (the committer's
    writer, or the store's open and close).  `append` returns once the
    record is on disk.  OSError is the caller's to translate (accman.ledger.leveldb)."""

    def __init__(self, path: str, next_lsn: int, bytes_max: int = WAL_BYTES_MAX):
        self.path = path
        self.next_lsn = next_lsn
        self.bytes_max = bytes_max
        self.pos = 0
        self.broken = False         # set by the store when a write failed
        # For /metrics: read without a lock (set in one step each).
        self.checkpoints = 0
        self.checkpoint_s_total = 0.0
        file = os.path.join(path, WAL_NAME)
        created = not os.path.exists(file)
        self.fd = _open_direct(file, os.O_RDWR | os.O_CREAT | os.O_DSYNC)
        try:
            if created:
                _fsync_dir(path)
            size = os.fstat(self.fd).st_size // BLOCK_BYTES * BLOCK_BYTES
            self._buf = mmap.mmap(-1, GROW_BYTES)      # page-aligned
            self._grower = _Grower(file, size, bytes_max)
        except BaseException:
            os.close(self.fd)
            raise
        self._ready = size          # the writer's copy of _grower.ready
        self._asked = size          # what it last asked the grower for

    def append(self, payload) -> None:
        """Writes one record after the last, durably."""
        n = len(payload)
        if n > PAYLOAD_BYTES_MAX:
            raise ValueError(f"a write-ahead log record of {n} bytes")
        span = _span(n)
        if self.pos + span > self.bytes_max:
            self.checkpoint()
        file_end = self.pos + span
        if file_end + GROW_LEAD_BYTES > self._asked:
            self._asked = self._grower.ask(file_end + GROW_LEAD_BYTES)
        if file_end > self._ready:
            self._ready = self._grower.wait_for(file_end)
        if span > len(self._buf):
            self._buf.close()
            self._buf = mmap.mmap(-1, span)
        buf = self._buf
        lsn = self.next_lsn
        HEADER.pack_into(buf, 0, MAGIC, lsn, n, _crc(lsn, n, payload))
        body_end = HEADER.size + n
        buf[HEADER.size:body_end] = payload
        buf[body_end:span] = _ZEROS[:span - body_end]     # no earlier record's bytes
        with memoryview(buf) as view:
            written = os.pwritev(self.fd, [view[:span]], self.pos)
        if written != span:
            raise OSError(f"a short write to {WAL_NAME} ({written} of {span} bytes)")
        self.pos += span
        self.next_lsn = lsn + 1

    def checkpoint(self) -> None:
        """Makes every record so far redundant: LevelDB's logs synced, then
        the checkpoint naming the next record, which is written at 0."""
        t0 = time.perf_counter()
        logs = _sync_leveldb_logs(self.path)
        _write_checkpoint(self.path, self.next_lsn, logs)
        self.pos = 0
        self.checkpoint_s_total += time.perf_counter() - t0
        self.checkpoints += 1

    def close(self) -> None:
        if self.fd >= 0:
            self._grower.close()
            os.close(self.fd)
            self.fd = -1
            self._buf.close()


def _open_direct(file: str, flags: int) -> int:
    """O_DIRECT: writes go to the disk from our page-aligned buffers, not
    through the page cache (one copy fewer, and no cache filled with a log
    no one reads).  A file system that refuses it (EINVAL: older tmpfs,
    some network file systems) gets the same writes through the page
    cache, which O_DSYNC and fdatasync make as durable."""
    try:
        return os.open(file, flags | getattr(os, "O_DIRECT", 0), 0o644)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return os.open(file, flags, 0o644)


class _Grower:
    """Writes the log's file ahead of its records: zeros, GROW_BYTES at a
    time, each chunk synced before the writer may use it.  Each chunk is
    first allocated (`fallocate`: the size changes, no data is written),
    then written with O_DIRECT: a direct write that extends the file holds
    the inode's lock until its I/O completes, and the writer's own direct
    overwrites need that lock too; over allocated blocks it does not.  (A
    buffered write instead cost 3 % at 64 connections: A/B, 4 of 4.)  Never
    past what was asked for: a new store's file grows with its records,
    not to WAL_BYTES_MAX at once."""

    def __init__(self, file: str, size: int, bytes_max: int):
        self.bytes_max = bytes_max
        self.cv = threading.Condition()
        self.ready = size           # zeros (or records) written and synced
        self.want = size
        self.error: OSError | None = None
        self.closing = False
        self.fd = _open_direct(file, os.O_WRONLY)
        self.thread = threading.Thread(target=self._run, name="accman-wal-grow",
                                       daemon=True)
        self.thread.start()

    def ask(self, end: int) -> int:
        """Have the file written up to `end`, rounded up to whole chunks
        (capped at bytes_max, unless a single record needs more); returns
        what is now asked for."""
        with self.cv:
            end = min(_round_up(end, GROW_BYTES), max(self.bytes_max, end - GROW_LEAD_BYTES))
            if end > self.want:
                self.want = end
                self.cv.notify_all()
            return self.want

    def wait_for(self, end: int) -> int:
        """Blocks until the file is written up to `end`; returns how far it
        is.  OSError if the grower failed (a full disk): fail-stop."""
        with self.cv:
            while self.ready < end:
                if self.error is not None:
                    raise OSError(self.error.errno, f"growing {WAL_NAME}: "
                                  f"{self.error.strerror or self.error}")
                if self.closing:
                    raise OSError(f"{WAL_NAME} is closed")
                self.cv.wait()
            return self.ready

    def _run(self) -> None:
        zeros_map = mmap.mmap(-1, GROW_BYTES)       # page-aligned, for O_DIRECT
        zeros = memoryview(zeros_map)
        while True:
            with self.cv:
                while not self.closing and self.ready >= self.want:
                    self.cv.wait()
                if self.closing:
                    return
                start = self.ready
                end = min(start + GROW_BYTES, _round_up(self.want, BLOCK_BYTES))
            try:
                os.posix_fallocate(self.fd, start, end - start)
                if os.pwritev(self.fd, [zeros[:end - start]], start) != end - start:
                    raise OSError(f"a short write growing {WAL_NAME}")
                os.fdatasync(self.fd)
            except OSError as e:
                with self.cv:
                    self.error = e
                    self.cv.notify_all()
                return
            with self.cv:
                self.ready = end
                self.cv.notify_all()

    def close(self) -> None:
        with self.cv:
            self.closing = True
            self.cv.notify_all()
        if self.thread is not threading.current_thread():
            self.thread.join()
        os.close(self.fd)
