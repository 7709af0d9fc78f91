"""Fail-stop: the changes applied in memory behind a batch whose write
failed were never handed to the disk (one batch is written at a time, and
the book drops every open batch as it fails).  Nothing of them applied:
each is told NotApplied (503 not_applied), as a change refused after the
failure is; only the failed batch itself may have reached the disk
(503 unavailable, an unknown outcome).  A plain Unavailable would have a
client owe a release for each such hold, and bill each such charge as
stranded, though none applied."""

import threading

from accman import Ledger, NotApplied, StoreError, Unavailable
from accman.ledger.leveldb import Store
from ledgerhelp import entries, wait_for


class FailingWhenLet(Store):
    """Its second write waits for `gate`, then fails, writing nothing;
    `writing` is set while it waits."""

    def __init__(self, path):
        super().__init__(path)
        self.gate = threading.Event()
        self.writing = threading.Event()
        self.writes = 0

    def write(self, wal_record):
        self.writes += 1
        if self.writes >= 2:
            self.writing.set()
            self.gate.wait()
            raise StoreError(f"{self.path}: commit failed: injected fault")
        super().write(wal_record)


def test_the_changes_behind_a_failed_batch_are_not_applied(tmp_path):
    path = str(tmp_path / "d")
    store = FailingWhenLet(path)
    led = Ledger(path, store=store)
    failed, behind = [], []
    try:
        led.mod("a", 10)
        led.submit("a", -1, key="f", done=failed.append)
        wait_for(store.writing.is_set, 10, "the failing batch being written")
        led.submit("a", -2, key="b1", done=behind.append)      # in the open batch
        led.submit_hold("a", -3, 60, key="b2", done=behind.append)
    finally:
        store.gate.set()
        wait_for(lambda: failed and len(behind) == 2, 10, "every change answered")
        led.close()
    with Ledger(path) as led:
        assert [key for _, _, _, key, _ in entries(led, "a")] == [None]
    assert type(failed[0]) is Unavailable, failed                # it may have reached the disk
    assert [type(o) for o in behind] == [NotApplied] * 2, behind    # they cannot have


class FailingApply(Store):
    """Its LevelDB writes fail once `fail` is set; its log's do not."""

    fail = False            # the open applies too, before __init__ has returned

    def apply(self):
        if self.fail:
            self.wal.broken = True          # as Store.apply marks a LevelDB write that failed
            raise StoreError(f"{self.path}: commit failed: injected LevelDB fault")
        return super().apply()


def _next_change_told(path, store, durable_first=False):
    """What a change submitted once `store.fail` is set is told (after, with
    `durable_first`, a keyed mod answered durably in between)."""
    led = Ledger(path, store=store)
    told = []
    try:
        assert led.mod("a", 10) == (10, 1)
        store.fail = True
        if durable_first:
            assert led.mod("a", -1, key="d") == (9, 2)     # durable; LevelDB's write fails after
        led.submit("a", -2, key="n", done=told.append)
        wait_for(lambda: told, 10, "the next change answered")
    finally:
        led.close()
    return told[0]


def test_a_batch_behind_a_failed_leveldb_write_is_not_applied(tmp_path):
    """LevelDB's write of a durable batch fails: that batch stays durable
    (answered, replayed from its log record at the next open), and the
    next batch is never handed to the disk, so its changes are told
    NotApplied, not the Unavailable of a batch that may have landed."""
    path = str(tmp_path / "d")
    told = _next_change_told(path, FailingApply(path), durable_first=True)
    assert type(told) is NotApplied, told
    with Ledger(path) as led:
        assert led.tot("a") == 9
        assert [key for _, _, _, key, _ in entries(led, "a")] == [None, "d"]


class FailingApplyMeanwhile(Store):
    """LevelDB's write of an earlier batch fails (on the applier's thread)
    after the writer has looked for such a failure and before its batch
    reaches the log: simulated by marking the failure as the write starts."""

    fail = False

    def write(self, wal_record):
        if self.fail:
            self.wal.broken = True          # as Store.apply marks a LevelDB write that failed
        super().write(wal_record)


def test_a_batch_refused_for_a_leveldb_write_failed_meanwhile_is_not_applied(tmp_path):
    """The log refuses the batch (Store.write after a failure): it never
    reached the disk, so its change is told NotApplied."""
    path = str(tmp_path / "d")
    told = _next_change_told(path, FailingApplyMeanwhile(path))
    assert type(told) is NotApplied, told
    with Ledger(path) as led:
        assert [key for _, _, _, key, _ in entries(led, "a")] == [None]
