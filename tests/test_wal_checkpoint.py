"""The write-ahead log's checkpoints when the process has no descriptor to
spare (issue 11 item 3): a checkpoint that cannot open a file lost nothing,
so commits go on and it is tried again; only a failure that can have lost
an acknowledged write stops them.  The descriptors are really exhausted
(RLIMIT_NOFILE lowered, every slot filled), not simulated, in a new
interpreter that no other test's thread shares.  And no
checkpoint at all once a write has failed, nor any write."""

import errno
import gc
import logging
import multiprocessing
import os
import resource
import shutil
import time
import types
from concurrent.futures import ProcessPoolExecutor

import plyvel
import pytest

from accman import Ledger
from accman.errors import StoreError, Unavailable
from accman.ledger import _ledger, keyfile, wal, walwriter
from accman.ledger.leveldb import Store

LAP_BYTES = 4 * wal.BLOCK_BYTES         # four one-block records a lap


# How long no descriptor may come free before NoDescriptors holds them all.
SETTLE_S = 0.3


class NoDescriptors:
    """Every descriptor slot of the process taken, under a soft limit a
    little above what is open now; `free()` gives them back."""

    def __init__(self):
        # A file the cycle collector finalized while they are held would
        # free a slot (a checkpoint would then open its file): none is.
        self.collecting = gc.isenabled()
        gc.collect()
        gc.disable()
        self.limits = resource.getrlimit(resource.RLIMIT_NOFILE)
        open_now = len(os.listdir("/proc/self/fd"))
        resource.setrlimit(resource.RLIMIT_NOFILE, (open_now + 32, self.limits[1]))
        self.held = []
        self._take_free()
        # The ledger's threads and LevelDB's may still close a descriptor
        # of their start (a loaded machine runs them late: CI failed so
        # once): a slot freed meanwhile is taken too, until none has been
        # for a while.
        quiet_since = time.monotonic()
        while time.monotonic() - quiet_since < SETTLE_S:
            time.sleep(0.02)
            if self._take_free():
                quiet_since = time.monotonic()

    def _take_free(self) -> int:
        """Takes every free slot; how many there were."""
        taken = 0
        while True:
            try:
                self.held.append(os.open("/dev/null", os.O_RDONLY))
            except OSError as e:
                assert e.errno == errno.EMFILE
                return taken
            taken += 1

    def free(self):
        for fd in self.held:
            os.close(fd)
        self.held = []
        resource.setrlimit(resource.RLIMIT_NOFILE, self.limits)
        if self.collecting:
            gc.enable()


class Warnings(logging.Handler):
    """The warnings AccMan logs while it is attached, as text."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.lines = []

    def emit(self, record):
        self.lines.append(record.getMessage())

    def __enter__(self):
        logging.getLogger("accman").addHandler(self)
        return self

    def __exit__(self, *exc):
        logging.getLogger("accman").removeHandler(self)

    @property
    def text(self):
        return "\n".join(self.lines)


def in_a_fresh_process(fn, *args):
    """fn(*args) run in a new interpreter; what it returns comes back.  The
    test process has threads of earlier tests (servers, ledgers ending)
    that may close a descriptor while NoDescriptors holds every slot, and
    one slot freed lets a checkpoint open its file; a new interpreter has
    only the threads of the ledger under test.  A child that dies (a
    crash out of descriptors) fails the test: BrokenProcessPool, where a
    multiprocessing Pool would wait for ever."""
    with ProcessPoolExecutor(1, mp_context=multiprocessing.get_context("spawn")) as pool:
        return pool.submit(fn, *args).result()


def wraps_without_descriptors(path: str) -> dict:
    """Twelve mods (three laps of the log) with no descriptor to spare,
    then five with descriptors back, once the retry is due."""
    seen = {}
    led = Ledger(path, store=Store(path, wal_bytes_max=LAP_BYTES))
    seen["checkpoint_before"] = open(os.path.join(path, wal.CHECKPOINT_NAME), "rb").read()
    with Warnings() as short:
        nd = NoDescriptors()
        try:
            seen["mods"] = [led.mod("alice", 1) for _ in range(12)]
            seen["healthy"] = led.healthy
            seen["postponed"] = led.store.wal.checkpoints_postponed
            seen["pos"] = led.store.wal.pos
        finally:
            nd.free()
    seen["short"] = short.text
    seen["checkpoint"] = open(os.path.join(path, wal.CHECKPOINT_NAME), "rb").read()
    shutil.copytree(path, path + "-crashed")    # what a kill -9 now leaves
    time.sleep(walwriter.CHECKPOINT_RETRY_S)
    with Warnings() as back:
        seen["mods_after"] = [led.mod("alice", 1) for _ in range(5)]
    seen["back"] = back.text
    seen["pos_after"] = led.store.wal.pos
    led.close()
    return seen


def test_a_checkpoint_without_a_free_descriptor_is_postponed_and_commits_go_on(tmp_path):
    path = str(tmp_path / "data")
    seen = in_a_fresh_process(wraps_without_descriptors, path)
    assert seen["mods"] == [(i, i) for i in range(1, 13)]
    assert seen["healthy"]
    assert seen["postponed"] >= 1
    assert seen["pos"] > LAP_BYTES                          # the log ran on
    assert "checkpoint postponed, nothing is lost and commits go on" in seen["short"]
    assert "Too many open files" in seen["short"]
    assert seen["checkpoint"] == seen["checkpoint_before"]
    # Descriptors back, the retry due: the next wrap takes the checkpoint.
    assert seen["mods_after"] == [(i, i) for i in range(13, 13 + 5)]
    assert "checkpoint taken after" in seen["back"]
    assert seen["pos_after"] <= LAP_BYTES
    with Ledger(path + "-crashed") as led:
        assert led.tot("alice") == 12 and len(led.past("alice")) == 12
        led.verify()
    with Ledger(path) as led:
        assert led.tot("alice") == 17


def closes_without_descriptors(path: str) -> str:
    """A mod, then a close with no descriptor to spare; its warnings."""
    led = Ledger(path)
    led.mod("alice", 7)
    with Warnings() as said:
        nd = NoDescriptors()
        try:
            led.close()
        finally:
            nd.free()
    return said.text


def test_a_postponed_checkpoint_at_close_is_logged_and_the_next_open_replays(tmp_path):
    path = str(tmp_path / "data")
    said = in_a_fresh_process(closes_without_descriptors, path)
    assert "no checkpoint at close (the next open replays the log" in said
    with Ledger(path) as led:
        assert led.tot("alice") == 7


def overruns_without_descriptors(path: str, overrun: int) -> dict:
    """Mods with no descriptor to spare until one is refused."""
    seen = {"acked": 0}
    led = Ledger(path, store=Store(path, wal_bytes_max=LAP_BYTES,
                                   wal_overrun_bytes_max=overrun))
    nd = NoDescriptors()
    try:
        for _ in range((LAP_BYTES + overrun) // wal.BLOCK_BYTES + 2):
            led.mod("alice", 1)
            seen["acked"] += 1
    except Unavailable as e:
        seen["refused"] = e.detail
    finally:
        nd.free()
    seen["healthy"] = led.healthy
    seen["why"] = led._committer.error.detail if led._committer.error else None
    led.close()
    return seen


def test_past_its_overrun_bound_the_log_stops_commits_and_says_why(tmp_path):
    """WAL_OVERRUN_BYTES_MAX, reached (scaled down): the log may not grow
    without bound while no checkpoint can be taken."""
    path = str(tmp_path / "data")
    overrun = 3 * wal.BLOCK_BYTES
    seen = in_a_fresh_process(overruns_without_descriptors, path, overrun)
    assert "the store failed to commit" in seen.get("refused", "")
    assert seen["acked"] == (LAP_BYTES + overrun) // wal.BLOCK_BYTES
    assert not seen["healthy"]
    assert (f"accman.wal ran {overrun} bytes past its size without a checkpoint"
            in seen["why"])
    with Ledger(path) as led:
        assert led.tot("alice") == seen["acked"]


def test_a_failed_fsync_of_leveldb_s_log_at_a_checkpoint_stops_commits(tmp_path, monkeypatch):
    """After a failed fsync LevelDB's pages may be lost while marked clean:
    a later checkpoint would wrap over records that LevelDB lacks.  So this
    one is fail-stop, unlike a file that could not be opened."""
    path = str(tmp_path / "data")
    led = Ledger(path, store=Store(path, wal_bytes_max=LAP_BYTES))
    real_fsync = os.fsync

    def eio_on_leveldb_logs(fd):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(".log"):
            raise OSError(errno.EIO, "Input/output error")
        real_fsync(fd)

    monkeypatch.setattr(os, "fsync", eio_on_leveldb_logs)
    acked = 0
    with pytest.raises(Unavailable):
        for _ in range(LAP_BYTES // wal.BLOCK_BYTES + 1):
            led.mod("alice", 1)
            acked += 1
    assert acked == LAP_BYTES // wal.BLOCK_BYTES
    assert "Input/output error" in led._committer.error.detail
    led.close()
    monkeypatch.undo()
    with Ledger(path) as led:
        assert led.tot("alice") == acked


def test_a_checkpoint_whose_temp_file_meets_a_full_disk_is_postponed_and_commits_go_on(
        tmp_path, caplog, monkeypatch):
    """The new checkpoint is written whole to a temp file before the rename:
    a failure there leaves the checkpoint as it was, so it is postponed and
    the temp file removed; the log runs on, a kill -9 meanwhile loses
    nothing, and the retry takes the checkpoint once the disk has room."""
    path = str(tmp_path / "data")
    led = Ledger(path, store=Store(path, wal_bytes_max=LAP_BYTES))
    ckpt_before = open(os.path.join(path, wal.CHECKPOINT_NAME), "rb").read()
    real_write = os.write

    def no_space_for_the_checkpoint(fd, data):
        if os.readlink(f"/proc/self/fd/{fd}").endswith(wal.CHECKPOINT_NAME + ".tmp"):
            raise OSError(errno.ENOSPC, "No space left on device")
        return real_write(fd, data)

    monkeypatch.setattr(os, "write", no_space_for_the_checkpoint)
    monkeypatch.setattr(walwriter, "CHECKPOINT_RETRY_S", 0.0)     # every wrap tries
    with caplog.at_level(logging.WARNING, logger="accman.ledger.wal"):
        for i in range(1, 13):                  # three laps' worth
            assert led.mod("alice", 1) == (i, i)
    assert led.healthy and led.store.wal.checkpoints_postponed >= 2
    assert led.store.wal.pos > LAP_BYTES                    # the log ran on
    assert "writing accman.checkpoint.tmp: No space left on device" in caplog.text
    assert open(os.path.join(path, wal.CHECKPOINT_NAME), "rb").read() == ckpt_before
    assert not os.path.exists(os.path.join(path, wal.CHECKPOINT_NAME + ".tmp"))
    copy = tmp_path / "crashed"
    shutil.copytree(path, copy)
    monkeypatch.setattr(os, "write", real_write)
    led.mod("alice", 1)
    assert led.store.wal.pos <= LAP_BYTES                   # taken: the log wrapped
    led.close()
    with Ledger(str(copy)) as led:
        assert led.tot("alice") == 12 and len(led.past("alice")) == 12
    with Ledger(path) as led:
        assert led.tot("alice") == 13


@pytest.mark.parametrize("took_effect", [False, True])
def test_a_failed_rename_of_the_checkpoint_stops_commits_and_loses_nothing(
        tmp_path, monkeypatch, took_effect):
    """Unlike its temp file, a rename that failed is not known to have
    changed nothing: a network file system may have done it and lost the
    reply.  Taken for postponed, a rename that took effect would leave a
    checkpoint that names the next record at offset 0 while that record is
    written past the log's size, and the next open would refuse the store
    as damaged (a record after the log's end): so it is fail-stop."""
    path = str(tmp_path / "data")
    led = Ledger(path, store=Store(path, wal_bytes_max=LAP_BYTES))
    real_rename = os.rename

    def failing_rename(src, dst, **kw):
        if dst == wal.CHECKPOINT_NAME:
            if took_effect:
                real_rename(src, dst, **kw)
            raise OSError(errno.EIO, "Input/output error")
        return real_rename(src, dst, **kw)

    monkeypatch.setattr(os, "rename", failing_rename)
    acked = 0
    with pytest.raises(Unavailable, match="the store failed to commit"):
        for _ in range(LAP_BYTES // wal.BLOCK_BYTES + 1):
            led.mod("alice", 1)
            acked += 1
    assert acked == LAP_BYTES // wal.BLOCK_BYTES
    assert "Input/output error" in led._committer.error.detail
    copy = tmp_path / "crashed"
    shutil.copytree(path, copy)
    led.close()
    monkeypatch.undo()
    for p in (copy, path):
        with Ledger(str(p)) as led:
            assert led.tot("alice") == acked


class NoSpaceOnce:
    """LevelDB, whose next write of a batch fails as a full disk makes it
    (plyvel's IOError) once `armed`; the retry goes through."""

    def __init__(self, db):
        self._db = db
        self.armed = False

    def write_batch(self, **options):
        wb = self._db.write_batch(**options)
        batch = types.SimpleNamespace(put=wb.put, delete=wb.delete, write=wb.write)
        if self.armed:
            self.armed = False

            def no_space():
                raise plyvel.IOError(b"IO error: 000003.log: No space left on device")
            batch.write = no_space
        return batch

    def __getattr__(self, name):
        return getattr(self._db, name)


def record(i):
    return _ledger.wal_record([(b"\xfetest-%04d" % i, b"%d" % i)])


def test_after_a_failed_leveldb_write_nothing_is_retried_written_or_checkpointed(tmp_path):
    """A LevelDB write that fails may leave part of its batch in LevelDB's
    log (tests/reliability/test_storage_faults.py has a full disk do it),
    which a retry would follow with the whole batch; the records since the
    last checkpoint are then the only whole copy.  So the store retries
    nothing, though the retry would go through, takes no write (naming
    why), and no checkpoint that would make those records redundant; the
    next open replays them."""
    path = str(tmp_path / "data")
    store = Store(path, wal_bytes_max=LAP_BYTES)
    db = store.db = NoSpaceOnce(store.db)
    ckpt_before = open(os.path.join(path, wal.CHECKPOINT_NAME), "rb").read()
    try:
        store.write(record(1))
        store.write(record(2))
        db.armed = True
        with pytest.raises(StoreError, match="commit failed: IO error: .*No space left"):
            store.apply()
        assert store.apply() == 0               # neither batch: the failed one is not retried
        with pytest.raises(StoreError, match="refused, since a write before it failed"):
            store.write(record(3))
        with pytest.raises(OSError, match="no checkpoint after a failed write"):
            store.wal.checkpoint()
    finally:
        store.close()
    assert open(os.path.join(path, wal.CHECKPOINT_NAME), "rb").read() == ckpt_before
    store = Store(path)
    try:
        assert [store.get(b"\xfetest-%04d" % i) for i in (1, 2, 3)] == [b"1", b"2", None]
    finally:
        store.close()


def test_the_key_file_is_made_before_leveldb_and_kept_by_every_open(tmp_path):
    path = tmp_path / "data"
    with Ledger(str(path)) as led:
        salt = led.store.salt
    for _ in range(2):
        with Ledger(str(path)) as led:
            assert led.store.salt == salt == keyfile.read_key(str(path))
