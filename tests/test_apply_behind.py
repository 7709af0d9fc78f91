"""LevelDB behind the write-ahead log (accman/ledger/commit.py): a batch is
answered once its log record is durable, and written into LevelDB after
that.  Until it is, the book answers what LevelDB would (the history of a
/past, an idempotency key, a settled hold); a failed LevelDB write after
the answer loses nothing that was answered and stops the writes, LevelDB's
too (no retry) until the reopen replays the log."""

import asyncio
import threading
import time
import types

import plyvel
import pytest

from accman import Ledger, StoreError, Unavailable
from accman.ledger import _ledger
from accman.ledger.applier import APPLY_ON_LOOP_MODS_MAX, APPLY_RUN_BATCHES, APPLY_RUN_MODS
from accman.ledger.events import EVENTS_RING_MAX
from accman.limits import BATCH_MODS_MAX
from accman.ledger.leveldb import APPLY_LAG_BATCHES_MAX, APPLY_LAG_BYTES_MAX, Store
from ledgerhelp import wait_for


# How long a gated LevelDB write waits at most: longer than any test's
# load behind it takes on a slow machine under the whole suite (18 batches
# of 4096 mods took 4 s alone and over 10 s there); each test opens the
# gate as it ends.
GATE_WAIT_S = 60


class GatedApply(Store):
    """LevelDB's write of a durable batch waits for `gate` once `armed`."""

    def __init__(self, path):
        self.armed = False          # before the open, which applies what it writes
        self.gate = threading.Event()
        self.waiting = threading.Event()
        super().__init__(path)

    def apply(self):
        if self.armed and self._queued:
            self.waiting.set()
            assert self.gate.wait(GATE_WAIT_S)
        return super().apply()


def in_leveldb(store, cred_hid, seq):
    return seq in store.history(cred_hid, seq, seq)


def gated(store, call, *args, **kw):
    """`call` answered while LevelDB's write of its batch waits: returns
    its answer and a function that lets LevelDB have it."""
    store.gate.clear()
    store.waiting.clear()
    store.armed = True
    answer = call(*args, **kw)
    assert store.waiting.wait(10)

    def release():
        store.armed = False
        store.gate.set()
    return answer, release


def test_a_batch_is_answered_before_leveldb_has_it_and_read_from_memory(tmp_path):
    path = str(tmp_path / "data")
    store = GatedApply(path)
    led = Ledger(path, store=store)
    try:
        led.mod("alice", 100)
        hold, _, _ = led.hold("alice", -30, 60, key="h1")
        hid = led._book.hid_of("alice")

        answer, release = gated(store, led.mod, "alice", -5, key="k1")
        assert answer == (65, 3) and not in_leveldb(store, hid, 3)
        # What LevelDB would say, the book says meanwhile.
        assert [(e.seq, e.by, e.tot, e.key) for e in led.past("alice")] == [
            (3, -5, 65, "k1"), (2, -30, 70, "h1"), (1, 100, 100, None)]
        assert [e.seq for e in led.past("alice", limit=2, before=4)] == [3, 2]
        assert led.mod("alice", -5, key="k1") == (65, 3)        # the key's replay
        assert led.tot("alice") == 65
        release()
        assert led.verify()["entries"] == 3 and in_leveldb(store, hid, 3)
        assert led.mod("alice", -5, key="k1") == (65, 3)        # now from LevelDB

        answer, release = gated(store, led.settle, "alice", hold, 10)
        assert answer == (85, 4) and not in_leveldb(store, hid, 4)
        assert led.settle("alice", hold, 10) == (85, 4)         # the hold, from memory
        assert led.past("alice", limit=1)[0].hold == hold
        release()
        assert led.verify()["entries"] == 4
        assert led.settle("alice", hold, 10) == (85, 4)         # from LevelDB
    finally:
        store.gate.set()
        led.close()
    with Ledger(path) as led:
        assert [e.seq for e in led.past("alice")] == [4, 3, 2, 1]
        assert led.tot("alice") == 85


def batches_on_a_loop(led, names, n=APPLY_ON_LOOP_MODS_MAX + 1):
    """One batch per name, on a loop: n concurrent mods of credentials
    name-0, name-1, ..."""
    async def run():
        for name in names:
            await asyncio.gather(*(led.amod(f"{name}-{i}", 1) for i in range(n)))
    asyncio.run(run())


def waiting_ledger(tmp_path, wait_s_max):
    """A Ledger whose applier writes what waits after `wait_s_max` (or a run)."""
    led = Ledger(str(tmp_path / "data"))
    led._committer.applier.wait_s_max = wait_s_max
    return led, led._committer.store


def test_larger_batches_wait_for_a_run_of_them(tmp_path):
    """A batch of more than APPLY_ON_LOOP_MODS_MAX mods answered on a loop
    is not written into LevelDB at once (the book answers for it); once
    APPLY_RUN_BATCHES of them wait, the applier writes them all."""
    led, store = waiting_ledger(tmp_path, 60.0)     # the run decides, not the clock
    with led:
        applied = store.applied
        batches_on_a_loop(led, [f"b{k}" for k in range(APPLY_RUN_BATCHES - 1)])
        assert led.stats["batches"] >= APPLY_RUN_BATCHES - 1
        assert store.applied == applied and len(store._queued) == led.stats["batches"]
        hid = led._book.hid_of("b0-0")
        assert not in_leveldb(store, hid, 1)
        assert [(e.seq, e.tot) for e in led.past("b0-0")] == [(1, 1)]
        batches_on_a_loop(led, ["last"])
        wait_for(lambda: store.applied >= applied + APPLY_RUN_BATCHES, what="the run")
        assert in_leveldb(store, hid, 1) and led.verify()["entries"] == led.stats["mods"]


def test_a_run_is_also_its_mods(tmp_path):
    """APPLY_RUN_MODS waiting make a run, however few batches hold them."""
    led, store = waiting_ledger(tmp_path, 60.0)
    n = APPLY_RUN_MODS // 2 + 1
    with led:
        applied = store.applied
        batches_on_a_loop(led, ["a"], n)
        assert store.applied == applied and led.stats["batches"] == 1
        batches_on_a_loop(led, ["b"], n)
        wait_for(lambda: store.applied == applied + 2, what="the run")


def test_a_small_batch_behind_a_waiting_one_waits_with_it(tmp_path):
    """The loop writes into LevelDB only while what LevelDB lacks is small
    (APPLY_ON_LOOP_MODS_MAX mods): a small batch behind a larger one that
    waits for a run waits with it."""
    led, store = waiting_ledger(tmp_path, 60.0)
    with led:
        applied = store.applied
        batches_on_a_loop(led, ["big"])
        batches_on_a_loop(led, ["small"], 2)
        assert store.applied == applied and len(store._queued) == led.stats["batches"]
        # Nor by the writer, for a batch no loop answers: it would have
        # written before it took the second plain mod.
        led.mod("plain", 1)
        led.mod("plain", 1)
        assert store.applied == applied and len(store._queued) == led.stats["batches"]


class PausedRun(Store):
    """Once `armed`, the applier thread's write pauses after LevelDB has
    the queued batches and before the book is told (`paused`, `go`)."""

    def __init__(self, path):
        self.armed = False
        self.paused, self.go = threading.Event(), threading.Event()
        super().__init__(path)

    def apply(self):
        applied = super().apply()
        if self.armed and threading.current_thread().name == "accman-apply":
            self.armed = False
            self.paused.set()
            assert self.go.wait(10)
        return applied


def test_a_small_batch_durable_during_a_run_s_write_is_written_after_it(tmp_path):
    """A small batch made durable while the applier's write (at the end of
    its wait) is between LevelDB and the book finds that batch still
    waiting, so neither the loop nor the writer writes it, and nothing is
    due: the applier writes it once it has told the book, rather than
    leave it until the next batch."""
    path = str(tmp_path / "data")
    store = PausedRun(path)
    led = Ledger(path, store=store)
    led._committer.applier.wait_s_max = 0.2
    try:
        applied = store.applied
        store.armed = True
        batches_on_a_loop(led, ["b"])               # waits, then the applier writes it
        assert store.paused.wait(10)
        led.mod("small", 1)                         # durable while that write is paused
        store.go.set()
        wait_for(lambda: store.applied == applied + 2, 2.0, what="the small batch in LevelDB")
    finally:
        store.go.set()
        led.close()


def test_a_batch_short_of_a_run_reaches_leveldb_after_its_longest_wait(tmp_path):
    """What waits short of a run is written once it has waited wait_s_max
    (APPLY_WAIT_S_MAX), not before, not much after."""
    led, store = waiting_ledger(tmp_path, 0.5)
    with led:
        applied = store.applied
        t0 = time.monotonic()               # before the wait's clock starts
        batches_on_a_loop(led, ["b"])
        assert store.applied == applied or time.monotonic() - t0 >= 0.5
        wait_for(lambda: store.applied > applied, 5.0, what="the batch in LevelDB")
        assert 0.5 <= time.monotonic() - t0 < 3.0
        assert in_leveldb(store, led._book.hid_of("b-0"), 1)


@pytest.mark.parametrize("records, size", [
    (APPLY_LAG_BATCHES_MAX, 64),                        # many small records
    (4, APPLY_LAG_BYTES_MAX // 4),                      # a few large ones
])
def test_the_writer_applies_what_waits_past_either_lag_bound(tmp_path, records, size):
    """LevelDB lags the log by at most APPLY_LAG_BATCHES_MAX records and
    APPLY_LAG_BYTES_MAX of them: the writer's next record applies them first."""
    store = Store(str(tmp_path / "data"))
    applied_at = []
    store.apply = lambda: applied_at.append(len(store._queued))   # nothing written
    try:
        for _ in range(records):
            store.write(bytes(size))
        assert applied_at == []
        store.write(bytes(size))
        assert applied_at == [records]
    finally:
        store._queued.clear()
        store.close(checkpoint=False)


def test_events_leveldb_lacks_are_read_from_memory_past_the_ring(tmp_path):
    """While LevelDB lags, more events than the ring's EVENTS_RING_MAX are
    durable: the ring keeps every one LevelDB lacks, and they are read."""
    path = str(tmp_path / "data")
    store = GatedApply(path)
    led = Ledger(path, store=store)
    try:
        store.armed = True
        n = BATCH_MODS_MAX

        async def run():
            for b in range(EVENTS_RING_MAX // n + 2):
                await asyncio.gather(*(led.amod(f"e{b}-{i}", 1) for i in range(n)))
        asyncio.run(run())
        assert store.waiting.is_set() and store.applied == 0
        assert led._events.last > EVENTS_RING_MAX
        page, _ = led.events(after=0, limit=5)
        assert [e.id for e in page] == [1, 2, 3, 4, 5]
    finally:
        store.gate.set()
        led.close()


class FullDisk:
    """LevelDB (plyvel's DB) on a disk that is full while `full` is set:
    each write of a batch fails then as a full disk fails it, plyvel's
    IOError with nothing inserted, and the store keeps the batch at the head
    of its queue (Store.apply).  `writes` counts every write of a batch
    tried, failed or not."""

    def __init__(self, db):
        self._db = db
        self.full = False
        self.writes = 0

    def write_batch(self, **options):
        wb = self._db.write_batch(**options)

        def write():
            self.writes += 1
            if self.full:
                raise plyvel.IOError(b"IO error: 000005.log: No space left on device")
            wb.write()
        return types.SimpleNamespace(put=wb.put, delete=wb.delete, write=write)

    def __getattr__(self, name):
        return getattr(self._db, name)


def on_full_disk(path):
    """A ledger whose LevelDB is FullDisk's, and that FullDisk."""
    store = Store(path)
    disk = store.db = FullDisk(store.db)
    return Ledger(path, store=store), disk


def test_a_failed_leveldb_write_after_the_answer_loses_nothing_and_stops_writes(tmp_path):
    path = str(tmp_path / "data")
    led, disk = on_full_disk(path)
    answered = [led.mod("alice", 10)]
    try:
        led.verify()                    # waits until LevelDB has it
        disk.full = True
        # Durable in the log, so answered; LevelDB's write then fails.
        answered.append(led.mod("alice", 5, key="k"))
        assert answered == [(10, 1), (15, 2)]
        # A mod made durable before the applier failed is answered (its
        # record is replayed at the next open); after it, none is.
        with pytest.raises(Unavailable, match="failed to commit"):
            for _ in range(50):
                answered.append(led.mod("alice", 1))
                time.sleep(0.01)
        assert not led.healthy
        assert "commit failed: IO error: 000005.log: No space left" in led.failure
        # LevelDB lacks acknowledged batches: a check of it would pass on less.
        with pytest.raises(Unavailable, match="cannot be checked: reopen the ledger"):
            led.verify()
        assert led.tot("alice") == answered[-1][0]
        assert [e.seq for e in led.past("alice")] == [s for _, s in reversed(answered)]
    finally:
        led.close()
    with Ledger(path) as led:           # the log's records are replayed
        assert [(e.tot, e.seq) for e in led.past("alice")] == list(reversed(answered))
        assert led.mod("alice", 5, key="k") == (15, 2)
        assert led.verify()["entries"] == len(answered)


def test_no_leveldb_write_is_tried_once_one_has_failed(tmp_path):
    """A LevelDB write that failed may have left part of its batch in
    LevelDB's log, and a retry would write the batch whole after that part.
    Once one has failed, the store writes LevelDB no more, not even once the
    disk has room again: not for the writer's next batch, nor for a verify,
    nor at close (on a full disk each would only fail again).  The log
    holds every answered batch whole, the next open replays them, and until
    then every read sees them, from the book."""
    path = str(tmp_path / "data")
    led, disk = on_full_disk(path)
    try:
        led.mod("alice", 10)
        led.verify()                                    # waits until LevelDB has it
        disk.full = True
        assert led.mod("alice", 5, key="k") == (15, 2)  # durable, then LevelDB's write fails
        wait_for(lambda: not led.healthy, what="the failed LevelDB write")
        writes = disk.writes
        disk.full = False                               # a retry would go through now
        with pytest.raises(Unavailable, match="failed to commit"):
            led.mod("alice", 1)
        with pytest.raises(Unavailable, match="cannot be checked: reopen the ledger"):
            led.verify()
        assert led.tot("alice") == 15
        assert [(e.tot, e.seq, e.key) for e in led.past("alice")] == [(15, 2, "k"),
                                                                     (10, 1, None)]
        assert [(e.id, e.tot) for e in led.events()[0]] == [(1, 10), (2, 15)]
    finally:
        led.close()
    assert disk.writes == writes
    with Ledger(path) as led:           # the log's records are replayed
        assert [(e.tot, e.seq) for e in led.past("alice")] == [(15, 2), (10, 1)]
        assert led.mod("alice", 5, key="k") == (15, 2)


def test_verify_refuses_once_the_log_failed_with_an_answered_batch_not_in_leveldb(tmp_path):
    """The log's write fails while LevelDB still lacks an answered batch:
    LevelDB is not written after that either, so a check of its files would
    pass on less than was answered; verify refuses until the reopen, which
    replays the batch."""
    path = str(tmp_path / "data")
    store = GatedApply(path)
    led = Ledger(path, store=store)
    try:
        led.mod("alice", 10)
        answer, release = gated(store, led.mod, "alice", 5)
        assert answer == (15, 2)

        def no_space(payload):
            raise OSError(28, "No space left on device")
        store.wal.append = no_space
        # The writer's write of the next batch, as it fails (the writer
        # itself waits in LevelDB's write of the answered one).
        with pytest.raises(StoreError, match="commit failed: No space left on device"):
            store.write(_ledger.wal_record([(b"\xfetest", b"1")]))
        release()
        with pytest.raises(Unavailable, match="cannot be checked: reopen the ledger"):
            led.verify()
        assert [(e.tot, e.seq) for e in led.past("alice")] == [(15, 2), (10, 1)]
    finally:
        store.gate.set()
        led.close()
    with Ledger(path) as led:
        assert [(e.tot, e.seq) for e in led.past("alice")] == [(15, 2), (10, 1)]
        assert led.verify()["entries"] == 2
