"""A Ledger open when its process forks (os.fork, multiprocessing's "fork"
start method, a pre-forking server): the child has no writer thread and
shares the parent's file descriptors.  Every call of the inherited ledger
in the child is refused at once, saying why; nothing the child does writes
the parent's store; and the child does not keep the parent's directory
locked."""

import copy
import os
import pickle
import signal
import subprocess
import sys
import threading
import time

import pytest

from accman import Ledger, StoreLocked, Unavailable
from accman.ledger import copies, leveldb, unshared
from accman.ledger.forked import FORKED_DETAIL
from accman.ledger.leveldb import Store
from test_ledger_closed import assert_every_call_refused, funded

# A child that would wait for the writer thread it does not have is ended
# by this alarm, and the test sees the signal instead of hanging.
CHILD_ALARM_S = 5


def in_child(body) -> tuple[int, str]:
    """Forks; the child runs `body()` and reports what it returned or
    raised.  (the child's exit status, that report)"""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 0
        try:
            os.close(r)
            signal.alarm(CHILD_ALARM_S)
            report = repr(body())
        except BaseException as e:          # the report is the test's evidence
            report, status = f"{type(e).__name__}: {e}", 1
        finally:
            os.write(w, report.encode())
            os._exit(status)
    os.close(w)
    with os.fdopen(r) as f:
        report = f.read()
    _, status = os.waitpid(pid, 0)
    return status, report


def test_every_call_in_a_forked_child_is_refused_at_once(tmp_path):
    led = funded(str(tmp_path / "d"))
    try:
        def child():
            assert_every_call_refused(led, FORKED_DETAIL)
            led.close()                 # touches nothing of the parent's
            with pytest.raises(Unavailable) as e:
                led.mod("a", 1)
            return e.value.detail
        assert in_child(child) == (0, repr(FORKED_DETAIL))
        assert led.mod("a", 1) == (4, 3)        # the parent's ledger works on
    finally:
        led.close()


def test_a_submit_taken_before_the_fork_is_refused_in_the_child(tmp_path):
    """`submit` (and the server's Lane) is the committer's own method, kept
    by a caller from before the fork: in the child it is refused too, not
    taken into a book that no writer will ever make durable."""
    led = funded(str(tmp_path / "d"))
    submit = led.submit
    try:
        def child():
            told = []
            with pytest.raises(Unavailable) as e:
                submit("a", 1, done=told.append)
            return e.value.detail, told
        assert in_child(child) == (0, repr((FORKED_DETAIL, [])))
        assert led.tot("a") == 3
    finally:
        led.close()


def test_what_describes_the_ledger_answers_in_a_child_forked_under_its_lock(tmp_path):
    """The fork lands while the writer holds the ledger's lock (it does, a
    moment per batch): in the child, where no thread will release it, the
    properties and the metrics' samples still answer."""
    led = funded(str(tmp_path / "d"))
    try:
        def child():
            return led.healthy, led.open_holds, sum(led.drain_samples()[0])
        with led._committer.lock:
            got = in_child(child)
        assert got == (0, "(False, 1, 2)")
    finally:
        led.close()


def test_a_forked_childs_close_writes_nothing_of_the_parents_store(tmp_path):
    """The child closes the inherited ledger (the end of a `with` block)
    while the parent goes on; then the parent dies without closing.  The
    store opens with every acknowledged mod: the child's close took no
    checkpoint of the parent's log."""
    path = str(tmp_path / "d")

    def parent():
        led = funded(path)
        r, w = os.pipe()
        pid = os.fork()
        if pid == 0:
            os.read(r, 1)
            led.close()
            os._exit(0)
        led.mod("a", 1)
        os.write(w, b"x")
        os.waitpid(pid, 0)
        led.mod("a", 1)
        return led.tot("a")
    status, report = in_child(parent)       # os._exit: no close, a crash
    assert (status, report) == (0, "5")
    with Ledger(path) as led:
        assert led.tot("a") == 5 and [e.by for e in led.past("a")] == [1, 1, -2, 5]
        led.verify()


def test_a_forked_child_does_not_keep_the_directory_locked(tmp_path):
    """A worker forked while a ledger is open (a multiprocessing pool, say)
    lives on; the parent closes its ledger and can open it again.  The
    child's copy of the lock goes as it starts (its fork handler, before
    its own code): the parent waits for that, as a pool's start does."""
    path = str(tmp_path / "d")
    led = funded(path)
    r, w = os.pipe()
    started_r, started_w = os.pipe()
    pid = os.fork()
    if pid == 0:
        os.close(w)
        os.write(started_w, b"s")
        os.read(r, 1)
        os._exit(0)
    try:
        os.close(started_w)
        assert os.read(started_r, 1) == b"s"
        os.close(started_r)
        led.close()
        with Ledger(path) as again:
            assert again.tot("a") == 3
    finally:
        os.close(w)
        os.waitpid(pid, 0)


def closed_then_in_child(led, body) -> int:
    """Forks; the parent closes `led`, then the child (which inherited it
    open) runs `body()`.  The child's exit status: 0 when body returned."""
    r, w = os.pipe()
    pid = os.fork()
    if pid == 0:
        status = 1
        try:
            os.close(w)
            signal.alarm(CHILD_ALARM_S)
            os.read(r, 1)                           # the parent has closed its ledger
            body()
            status = 0
        finally:
            os._exit(status)
    try:
        led.close()
    finally:
        os.write(w, b"x")
        _, status = os.waitpid(pid, 0)
    return status


def test_a_forked_child_opening_the_inherited_directory_is_told_why(tmp_path):
    """The parent closes its ledger; the child, which inherited it open,
    cannot open the directory itself (LevelDB's lock table is the
    parent's copy): refused before any file is read, saying why.  Another
    directory it opens and uses."""
    path, other = str(tmp_path / "d"), str(tmp_path / "other")

    def child():
        with pytest.raises(StoreLocked, match="this process was forked from one that "
                                              "had the data directory open"):
            Ledger(path)
        with Ledger(other) as mine:
            assert mine.mod("b", 1) == (1, 1)
    assert closed_then_in_child(funded(path), child) == 0
    with Ledger(path) as again:
        assert again.tot("a") == 3


def test_a_read_only_ledger_leaves_its_directory_to_a_forked_child(tmp_path):
    """A read-only ledger reads a private copy (accman verify's): LevelDB's
    lock is the copy's, so a child forked while it was open opens the
    directory itself once the parent has closed it."""
    path = str(tmp_path / "d")
    funded(path).close()

    def child():
        with Ledger(path) as mine:
            assert mine.mod("a", 1) == (4, 3)
    led = Ledger(path, store=Store(path, read_only=True))
    assert closed_then_in_child(led, child) == 0


def test_a_forked_childs_exit_leaves_the_parents_read_only_copy(tmp_path):
    """A read-only ledger (accman verify's: a private copy of the store)
    is open when the process forks; the child's exit removes the copies it
    made (atexit), which are none: the parent's copy and its reads stay."""
    path = str(tmp_path / "d")
    funded(path).close()
    store = Store(path, read_only=True)
    with Ledger(path, store=store) as led:
        assert in_child(copies.remove_snapshots) == (0, "None")
        assert os.path.isdir(store.dir)
        assert [e.by for e in led.past("a")] == [-2, 5]
    assert not os.path.exists(store.dir)        # the parent's close removes it


def test_a_ledger_is_not_pickled_nor_copied_and_says_why(tmp_path):
    """Handing a ledger to a spawned worker (multiprocessing's "spawn" or
    "forkserver") pickles it: refused, naming what to do instead."""
    with Ledger(str(tmp_path / "d")) as led:
        for copy_of in (pickle.dumps, copy.copy, copy.deepcopy):
            with pytest.raises(TypeError, match="^a Ledger belongs to the process that "
                                                "opened it: open one in the other process"):
                copy_of(led)


# --- programs started by the process: exec, not fork alone ---------------------------

# A program that prints every descriptor it was given that is open on a
# file of the directory in argv[1] (or the directory itself).
LIST_FDS = """
import os, sys
where = os.path.realpath(sys.argv[1])
for name in sorted(os.listdir("/proc/self/fd"), key=int):
    try:
        target = os.readlink("/proc/self/fd/" + name)
    except OSError:
        continue
    if target == where or target.startswith(where + "/"):
        print(name, target[len(where):])
"""


def inherited_by_a_program(path) -> list[str]:
    """What a program started with every descriptor of this process that
    is not close-on-exec (os.system, close_fds=False) holds of `path`."""
    out = subprocess.run([sys.executable, "-c", LIST_FDS, str(path)], close_fds=False,
                         capture_output=True, text=True, check=True, timeout=10).stdout
    return out.splitlines()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists /proc/self/fd")
def test_a_program_the_process_starts_inherits_no_file_of_the_store(tmp_path):
    """LevelDB opens LOG, LOCK, its log and MANIFEST without O_CLOEXEC: a
    program started by the application that embeds the ledger held them
    (files deleted since stayed on disk, a child that drops its privileges
    read the tables through them).  A read-only store's copy too."""
    path = tmp_path / "d"
    led = funded(str(path))
    try:
        assert inherited_by_a_program(path) == []
    finally:
        led.close()
    store = Store(str(path), read_only=True)
    try:
        assert inherited_by_a_program(store.dir) == []
    finally:
        store.close()


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists /proc/self/fd")
def test_leveldbs_next_log_is_not_inherited_either(tmp_path, monkeypatch):
    """LevelDB opens a new log each time its memtable fills, long after the
    open: it is marked too, after the write that made it."""
    monkeypatch.setattr(leveldb, "WRITE_BUFFER_BYTES", 64 * 1024)   # LevelDB's least
    path = tmp_path / "d"
    with Ledger(str(path)) as led:
        first_log = [n for n in os.listdir(path) if n.endswith(".log")]
        done = threading.Semaphore(0)
        for i in range(3000):
            led.submit(f"account-{i}", 1, key=f"key-{i}", done=lambda _: done.release())
        for _ in range(3000):
            done.acquire()
        # LevelDB opens its next log at the write after the memtable fills:
        # the 3000 may have gone in as one batch, so one more write follows.
        led.submit("account-last", 1, done=lambda _: done.release())
        done.acquire()
        led.verify()                    # every durable batch is in LevelDB
        assert [n for n in os.listdir(path) if n.endswith(".log")] != first_log
        assert inherited_by_a_program(path) == []


@pytest.mark.skipif(not os.path.isdir("/proc/self/fd"), reason="lists /proc/self/fd")
def test_a_change_of_the_directory_is_listed_once_not_at_every_write(tmp_path, monkeypatch):
    """The mark's check runs after every write of LevelDB, on the server's
    loop for a small batch: a directory changed within the file system's
    clock tick was listed again at every write until the tick had passed
    (a table a compaction writes: milliseconds a listing with thousands of
    tables, at every batch).  It is listed once, and once more after the
    tick, which still finds a log opened within it."""
    path = tmp_path / "d"
    path.mkdir()
    for i in range(200):
        (path / f"{i:06d}.ldb").write_bytes(b"")
    marks = unshared.CloseOnExec(str(path))
    listings = []
    listdir = os.listdir
    monkeypatch.setattr(unshared.os, "listdir", lambda p=".": listings.append(p) or listdir(p))
    fds = [os.open(path / f"{n:06d}.log", os.O_CREAT | os.O_WRONLY, 0o600) for n in (300, 301)]
    try:
        os.set_inheritable(fds[0], True)    # as LevelDB opens it
        changed_ns = os.stat(path).st_mtime_ns
        marks.after_write()
        while time.time_ns() < changed_ns + unshared._MTIME_TICK_NS // 2:    # in its tick
            marks.after_write()
        listed = listings.count(marks.path)
        assert listed <= 2                  # once, and once more if a stall passed the tick
        assert not os.get_inheritable(fds[0])
        os.rename(path / "000301.log", path / "000302.log")     # a new log, maybe within the tick
        os.set_inheritable(fds[1], True)
        time.sleep(unshared._MTIME_TICK_NS / 1e9)
        marks.after_write()
        marks.after_write()
        assert listings.count(marks.path) == listed + 1
        assert not os.get_inheritable(fds[1])
    finally:
        for fd in fds:
            os.close(fd)
