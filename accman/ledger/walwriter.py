"""AccMan's write-ahead log, written: `Wal` appends a batch's record with
`O_DIRECT|O_DSYNC`, a thread of its own writes the file ahead of the
records, and a checkpoint makes the records so far redundant.  The formats
and recovery are accman.ledger.wal's.

A checkpoint: every LevelDB log file fsync'd and its length noted, the
directory fsync'd, and the checkpoint file replaced atomically (written,
fsync'd, renamed, the directory fsync'd).  One that fails without losing
anything (a descriptor that could not be had, a temp file that could not
be written) is postponed: the log runs on past its size and the checkpoint
is tried again.  A failed fsync or rename is fail-stop (OSError, for
accman.ledger.commit): after a failed fsync the kernel may have dropped
LevelDB's pages while marking them clean, and a later checkpoint would
then wrap over records that LevelDB lacks.

Once a write has failed (the log's, or LevelDB's of a batch: `broken`) no
checkpoint is taken at all, fail-stop as well: a LevelDB write that failed
may have left part of its batch in LevelDB's log (which is why the store
writes nothing after it: a retry would put the whole batch after that
part), so LevelDB's files can no longer be trusted to read back what they
were given; the records since the last checkpoint are the only whole copy,
and the next open cuts LevelDB's logs back and replays them.
"""

from __future__ import annotations

import errno
import json
import logging
import mmap
import os
import threading
import time

from accman.errors import CheckpointPostponed
from accman.ledger import walsectors
from accman.ledger.files import write_whole
from accman.ledger.fsck import LOG_NAME
from accman.ledger.wal import (BLOCK_BYTES, CHECKPOINT_FORMAT, CHECKPOINT_NAME, HEADER, MAGIC,
                               PAYLOAD_BYTES_MAX, WAL_BYTES_MAX, WAL_NAME, Checkpoint, Keys,
                               checkpoint_mac, record_mac, record_span, round_up)

log = logging.getLogger("accman.ledger.wal")

# How far past WAL_BYTES_MAX the log may run while its checkpoint is
# postponed (a descriptor could not be had) before commits stop: minutes of
# full load, and the whole file is still read at open in well under a second.
WAL_OVERRUN_BYTES_MAX = 256 * 1024 * 1024
# A postponed checkpoint is tried again at the first wrap after this long:
# often enough to end an overrun soon, rarely enough not to add a failing
# directory scan to every batch.
CHECKPOINT_RETRY_S = 1.0
# The file is written ahead of the records (zeros, synced) this much at a
# time, by a thread of its own, GROW_LEAD_BYTES ahead: overwriting written
# blocks changes no metadata, so each record is two disk requests and not
# the three of an append, and a record never waits behind a chunk.
GROW_BYTES = 1024 * 1024
GROW_LEAD_BYTES = 2 * GROW_BYTES

_ZEROS = memoryview(bytes(BLOCK_BYTES))         # a record's padding


# --- checkpoints ---------------------------------------------------------------------

def _write_checkpoint(dir_fd: int, key: bytes, ckpt: Checkpoint) -> None:
    """Replaces the checkpoint atomically.  CheckpointPostponed when nothing
    was changed (the temp file could not be made); OSError when the rename
    or the directory's fsync failed: what is on disk is then unknown."""
    doc = {"format": CHECKPOINT_FORMAT, "lsn": ckpt.lsn, "logs": ckpt.logs,
           "wal_bytes": ckpt.wal_bytes}
    doc["mac"] = checkpoint_mac(key, doc)
    tmp = CHECKPOINT_NAME + ".tmp"
    try:
        fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=dir_fd)
        try:
            write_whole(fd, json.dumps(doc, sort_keys=True).encode())
            os.fsync(fd)
        finally:
            os.close(fd)
    except OSError as e:
        _unlink_quietly(tmp, dir_fd)
        raise CheckpointPostponed(f"writing {tmp}: {e.strerror or e}") from e
    # Never postponed: a rename that failed may yet have taken effect (a
    # network file system that did it and lost the reply), and a checkpoint
    # in place that the writer took for postponed would name the next record
    # at offset 0 while it is written past the log's size.
    os.rename(tmp, CHECKPOINT_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def _unlink_quietly(name: str, dir_fd: int) -> None:
    try:
        os.unlink(name, dir_fd=dir_fd)
    except OSError:
        pass


def _sync_leveldb_logs(dir_fd: int) -> dict:
    """fsyncs every LevelDB log file, then the directory (files created since
    the last checkpoint); returns each one's synced length.  LevelDB writes
    its logs only from the thread that writes batches, which is the caller:
    nothing is appended meanwhile.  A log deleted meanwhile was turned into
    a table first, and tables are synced by LevelDB.  CheckpointPostponed
    when a file could not be opened (nothing changed); a failed fsync is
    OSError: LevelDB's unsynced pages may be lost, so it is fail-stop."""
    try:
        names = sorted(os.listdir(dir_fd))
    except OSError as e:
        raise CheckpointPostponed(f"listing the data directory: {e.strerror or e}") from e
    logs = {}
    for name in names:
        if not LOG_NAME.match(name):
            continue
        try:
            fd = os.open(name, os.O_RDONLY, dir_fd=dir_fd)
        except FileNotFoundError:
            continue
        except OSError as e:
            raise CheckpointPostponed(f"opening {name}: {e.strerror or e}") from e
        try:
            logs[name] = os.fstat(fd).st_size
            os.fsync(fd)
        finally:
            os.close(fd)
    os.fsync(dir_fd)
    return logs


# --- writing -----------------------------------------------------------------------------

class Wal:
    """The log, open for writing, for one thread at a time (the committer's
    writer, or the store's open and close).  `append` returns once the
    record is on disk.  OSError is the caller's to translate
    (accman.ledger.leveldb); CheckpointPostponed from `checkpoint` lost
    nothing.  The directory's descriptor is held open for the log's life:
    a checkpoint needs it even when no descriptor is free."""

    def __init__(self, path: str, next_lsn: int, keys: Keys,
                 bytes_max: int = WAL_BYTES_MAX,
                 overrun_bytes_max: int = WAL_OVERRUN_BYTES_MAX):
        self.path = path
        self.next_lsn = next_lsn
        self.bytes_max = bytes_max
        self.overrun_bytes_max = overrun_bytes_max
        self._keys = keys
        self.pos = 0
        self.broken = False         # set by the store when a write failed: no checkpoint
        # For /metrics and the log: read without a lock (set in one step each).
        self.checkpoints = 0
        self.checkpoint_s_total = 0.0
        self.checkpoints_postponed = 0
        self.write_s = 0.0          # the last record's synced write alone (backtoback.py)
        self._retry_at = 0.0
        self.fd = self.dir_fd = -1
        self.dir_fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
        try:
            created = not os.path.exists(os.path.join(path, WAL_NAME))
            self.fd = _open_direct(WAL_NAME, os.O_RDWR | os.O_CREAT | os.O_DSYNC, self.dir_fd)
            if created:
                os.fsync(self.dir_fd)
            size = os.fstat(self.fd).st_size // BLOCK_BYTES * BLOCK_BYTES
            self._buf = mmap.mmap(-1, GROW_BYTES)      # page-aligned
            self._grower = _Grower(self.dir_fd, size, bytes_max)
        except BaseException:
            self._close_fds()
            raise
        self._ready = size          # the writer's copy of _grower.ready
        self._asked = size          # what it last asked the grower for
        if size == 0:
            # A new log has its first chunk before its first checkpoint,
            # which records it: a log emptied later is then told apart.
            self._asked = self._grower.ask(GROW_LEAD_BYTES)
            try:
                self._ready = self._grower.wait_for(BLOCK_BYTES)
            except BaseException:
                self.close()        # the caller never gets the log to close
                raise

    def wraps(self, payload_bytes: int) -> bool:
        """Whether appending a record of this payload tries a checkpoint
        first (which needs every record so far in LevelDB)."""
        return self.pos + record_span(payload_bytes) > self.bytes_max

    def append(self, payload) -> None:
        """Writes one record after the last, durably."""
        n = len(payload)
        if n > PAYLOAD_BYTES_MAX:
            raise ValueError(f"a write-ahead log record of {n} bytes")
        span = record_span(n)
        if self.wraps(n):
            self._wrap(span)
        assert self.pos % BLOCK_BYTES == 0 and span % BLOCK_BYTES == 0
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
        record = HEADER.pack(MAGIC, lsn, n, record_mac(self._keys.wal, lsn, n, payload)) + payload
        body_end = walsectors.lay_out(buf, record, lsn, n)
        buf[body_end:span] = _ZEROS[:span - body_end]     # no earlier record's bytes
        with memoryview(buf) as view:
            t0 = time.perf_counter()
            written = os.pwritev(self.fd, [view[:span]], self.pos)
            self.write_s = time.perf_counter() - t0
        if written != span:
            raise OSError(f"a short write to {WAL_NAME} ({written} of {span} bytes)")
        self.pos += span
        self.next_lsn = lsn + 1

    def _wrap(self, span: int) -> None:
        """At the end of a lap: a checkpoint, then writing starts again at 0.
        A postponed checkpoint lets the log run on past its size, tried
        again every CHECKPOINT_RETRY_S; past overrun_bytes_max
        (WAL_OVERRUN_BYTES_MAX) it stops commits (OSError), naming why."""
        over_cap = self.pos + span > self.bytes_max + self.overrun_bytes_max
        now = time.monotonic()
        if now < self._retry_at and not over_cap:
            return
        try:
            self.checkpoint()
        except CheckpointPostponed as e:
            self.checkpoints_postponed += 1
            if over_cap:
                raise OSError(f"{WAL_NAME} ran {self.overrun_bytes_max} bytes past its "
                              f"size without a checkpoint; the last attempt: {e}") from e
            self._retry_at = now + CHECKPOINT_RETRY_S
            log.warning("%s: checkpoint postponed, nothing is lost and commits go on "
                        "(the log runs on past its size, at %d bytes; tried again in "
                        "%.0f s): %s", self.path, self.pos, CHECKPOINT_RETRY_S, e)

    def checkpoint(self) -> None:
        """Makes every record so far redundant: LevelDB's logs synced, then
        the checkpoint naming the next record, which is written at 0.
        CheckpointPostponed when it could not be taken and nothing changed;
        OSError (fail-stop) once a write has failed (`broken`)."""
        if self.broken:
            raise OSError(f"no checkpoint after a failed write: LevelDB's files may lack a "
                          f"batch, or hold it damaged, that {WAL_NAME} alone holds whole; "
                          "the next open replays it")
        t0 = time.perf_counter()
        logs = _sync_leveldb_logs(self.dir_fd)
        _write_checkpoint(self.dir_fd, self._keys.checkpoint,
                          Checkpoint(self.next_lsn, logs, CHECKPOINT_FORMAT, self._ready))
        if self._retry_at:
            log.warning("%s: checkpoint taken after %d postponed; the log wraps again",
                        self.path, self.checkpoints_postponed)
            self._retry_at = 0.0
        self.pos = 0
        self.checkpoint_s_total += time.perf_counter() - t0
        self.checkpoints += 1

    def close(self) -> None:
        """Each part closed even when a stop (^C) lands while one before it
        is (Store._release)."""
        try:
            if self.fd >= 0:
                try:
                    self._grower.close()
                finally:
                    self._buf.close()
        finally:
            self._close_fds()

    def _close_fds(self) -> None:
        for name in ("fd", "dir_fd"):
            fd = getattr(self, name)
            if fd >= 0:
                os.close(fd)
                setattr(self, name, -1)


def _open_direct(name: str, flags: int, dir_fd: int) -> int:
    """O_DIRECT: writes go to the disk from our page-aligned buffers, not
    through the page cache (one copy fewer, and no cache filled with a log
    no one reads).  A file system that refuses it (EINVAL: older tmpfs,
    some network file systems) gets the same writes through the page
    cache, which O_DSYNC and fdatasync make as durable."""
    try:
        return os.open(name, flags | getattr(os, "O_DIRECT", 0), 0o600, dir_fd=dir_fd)
    except OSError as e:
        if e.errno != errno.EINVAL:
            raise
        return os.open(name, flags, 0o600, dir_fd=dir_fd)


class _Grower:
    """Writes the log's file ahead of its records: zeros, GROW_BYTES at a
    time, each chunk synced before the writer may use it.  Each chunk is
    first allocated (`fallocate`: the size changes, no data is written),
    then written with O_DIRECT: a direct write that extends the file holds
    the inode's lock until its I/O completes, and the writer's own direct
    overwrites need that lock too; over allocated blocks it does not.
    Never past what was asked for: a new store's file grows with its
    records, not to WAL_BYTES_MAX at once."""

    def __init__(self, dir_fd: int, size: int, bytes_max: int):
        self.bytes_max = bytes_max
        self.cv = threading.Condition()
        self.ready = size           # zeros (or records) written and synced
        self.want = size
        self.error: OSError | None = None
        self.closing = False
        self.fd = _open_direct(WAL_NAME, os.O_WRONLY, dir_fd)
        self.thread = threading.Thread(target=self._run, name="accman-wal-grow",
                                       daemon=True)
        self.thread.start()

    def ask(self, end: int) -> int:
        """Have the file written up to `end`, rounded up to whole chunks;
        capped at bytes_max while the records stay inside it (past it, when
        a record is bigger than the log or a checkpoint is postponed, the
        lead applies again).  Returns what is now asked for."""
        with self.cv:
            cap = end if end - GROW_LEAD_BYTES > self.bytes_max else self.bytes_max
            end = min(round_up(end, GROW_BYTES), max(cap, end - GROW_LEAD_BYTES))
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
        try:
            zeros_map = mmap.mmap(-1, GROW_BYTES)   # page-aligned, for O_DIRECT
        except OSError as e:
            # Told like any failure of this thread: a writer waits for it.
            self._fail(e)
            return
        zeros = memoryview(zeros_map)
        while True:
            with self.cv:
                while not self.closing and self.ready >= self.want:
                    self.cv.wait()
                if self.closing:
                    return
                start = self.ready
                end = min(start + GROW_BYTES, round_up(self.want, BLOCK_BYTES))
            assert start % BLOCK_BYTES == 0 and end % BLOCK_BYTES == 0
            try:
                os.posix_fallocate(self.fd, start, end - start)
                if os.pwritev(self.fd, [zeros[:end - start]], start) != end - start:
                    raise OSError(f"a short write growing {WAL_NAME}")
                os.fdatasync(self.fd)
            except OSError as e:
                self._fail(e)
                return
            with self.cv:
                self.ready = end
                self.cv.notify_all()

    def _fail(self, e: OSError) -> None:
        """The thread ends: a writer waiting in `wait_for`, or the next one,
        gets the cause (fail-stop) rather than waiting for ever."""
        with self.cv:
            self.error = e
            self.cv.notify_all()

    def close(self) -> None:
        with self.cv:
            self.closing = True
            self.cv.notify_all()
        try:
            if self.thread is not threading.current_thread():
                try:
                    self.thread.join()
                except BaseException:
                    self.thread.join()  # a stop landed: it is told to end, then its fd
                    raise
        finally:
            os.close(self.fd)
