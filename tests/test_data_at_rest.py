"""Data at rest (SPEC "Access", issue 11 item 6): the data directory 0700
and every file in it 0600, LevelDB's later files too, without changing the
process umask; `accman verify` on a read-only copy, changing no file."""

import os
import shutil
import stat
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest

from accman import Ledger
from accman.errors import StoreCorrupt, StoreError, StoreLocked
from accman.ledger import copies, datadir, keyfile, wal
from accman.ledger.leveldb import Store
from accman.cli import EXIT_REFUSED, EXIT_USAGE
from conftest import run_accman


def modes(path):
    return {p.name: stat.S_IMODE(p.lstat().st_mode) for p in Path(path).iterdir()}


@pytest.fixture
def umask_022():
    old = os.umask(0o022)
    yield
    os.umask(old)


def test_a_new_store_is_0700_and_every_file_0600_leveldb_later_files_too(tmp_path, umask_022):
    path = tmp_path / "parent" / "data"
    with Ledger(str(path)) as led:
        for i in range(200):
            led.mod(f"acct-{i % 7}", 1, key=f"k-{i}")
        # A table made by LevelDB's own compaction thread while the store
        # is open, long after the open.
        led.store.db.compact_range()
        assert os.umask(0o022) == 0o022             # the process umask is untouched
        made_while_open = modes(path)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert any(n.endswith(".ldb") for n in made_while_open), made_while_open
    assert set(made_while_open.values()) == {0o600}, made_while_open
    assert set(modes(path).values()) == {0o600}, modes(path)
    assert {keyfile.KEY_NAME, wal.WAL_NAME, wal.CHECKPOINT_NAME} <= set(made_while_open)


def open_to_others(tmp_path):
    """A store with one mod, made as an AccMan before data at rest left
    it: the directory 0755 without its default ACL, its files 0644."""
    path = tmp_path / "data"
    with Ledger(str(path)) as led:
        led.mod("alice", 1)
    os.chmod(path, 0o755)
    os.removexattr(path, "system.posix_acl_default")
    for f in path.iterdir():
        os.chmod(f, 0o644)
    return path


def test_a_store_made_before_is_tightened_at_open(tmp_path):
    path = open_to_others(tmp_path)
    with Ledger(str(path)) as led:
        assert led.tot("alice") == 1
        led.mod("alice", 1)
    assert stat.S_IMODE(path.stat().st_mode) == 0o700
    assert set(modes(path).values()) == {0o600}, modes(path)


def test_the_credential_hash_key_is_only_in_files_no_one_else_can_read(tmp_path):
    path = tmp_path / "data"
    with Ledger(str(path)) as led:
        led.mod("alice_1", 1)
        salt = led.store.salt
    holders = [f.name for f in path.iterdir()
               if salt.hex().encode() in f.read_bytes() or salt in f.read_bytes()]
    assert keyfile.KEY_NAME in holders
    for name in holders:
        assert stat.S_IMODE((path / name).stat().st_mode) == 0o600


def crashed_store(tmp_path):
    """A store with acknowledged mods after its last checkpoint, as a kill
    -9 leaves it (recovery has work to do)."""
    led = Ledger(str(tmp_path / "live"))
    for i in range(10):
        led.mod("alice", i + 1, key=f"k{i}")
    copy = tmp_path / "data"
    shutil.copytree(led.path, copy)
    led.close()
    return copy


def files_of(path):
    return {p.name: p.read_bytes() for p in Path(path).iterdir()}


def test_verify_changes_no_file_of_the_store(tmp_path):
    data, scratch = crashed_store(tmp_path), tmp_path / "tmp"
    scratch.mkdir()
    before = files_of(data)
    proc = run_accman("verify", "--data", data, env={"TMPDIR": scratch})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout and "entries=10" in proc.stdout and "keys=10" in proc.stdout
    assert files_of(data) == before
    assert list(scratch.iterdir()) == []        # its private copy is gone


@pytest.mark.parametrize("where", ["LevelDB's close", "the copy's removal"])
def test_a_stop_on_the_way_out_still_removes_the_private_copy(tmp_path, monkeypatch, where):
    """^C or SIGTERM (raised in Python between any two steps) landing in
    the read-only store's close, before or during the removal of its copy
    (an rmtree of many files): the copy, which holds the store's key, is
    removed all the same, and the stop goes on."""
    from accman.ledger.leveldb import Store
    data, scratch = crashed_store(tmp_path), tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    store = Store(str(data), create=False, read_only=True)
    assert [p.name[:14] for p in scratch.iterdir()] == ["accman-verify-"]
    if where == "LevelDB's close":
        release = store._release

        def stopped():
            release()
            raise KeyboardInterrupt
        monkeypatch.setattr(store, "_release", stopped)
    else:
        rmtree, calls = shutil.rmtree, []

        def stopped(path, ignore_errors=False):
            calls.append(path)
            if len(calls) == 1:
                os.unlink(next(p for p in Path(path).iterdir() if p.is_file()))
                raise KeyboardInterrupt
            rmtree(path, ignore_errors=ignore_errors)
        monkeypatch.setattr(copies.shutil, "rmtree", stopped)
    with pytest.raises(KeyboardInterrupt):
        store.close(checkpoint=False)
    assert list(scratch.iterdir()) == []


def test_verify_stopped_before_its_store_closes_still_removes_the_copy(tmp_path, monkeypatch):
    """A stop in the ledger's close, before the store's own close (where
    the removal is) runs at all: verify's last step removes the copy."""
    from accman import cli
    from accman.ledger.ledger import Ledger
    data, scratch = crashed_store(tmp_path), tmp_path / "tmp"
    scratch.mkdir()
    monkeypatch.setattr("tempfile.tempdir", str(scratch))

    def stopped(self, *args, **kwargs):
        assert [p.name[:14] for p in scratch.iterdir()] == ["accman-verify-"]
        raise KeyboardInterrupt
    monkeypatch.setattr(Ledger, "close", stopped)
    assert cli.main(["verify", "--data", str(data)]) == cli.EXIT_INTERRUPTED
    assert list(scratch.iterdir()) == [] and copies._copies == set()


def test_a_copy_s_name_taken_by_another_is_refused_and_left_alone(tmp_path, monkeypatch):
    from accman.ledger.leveldb import Store
    data, scratch = crashed_store(tmp_path), tmp_path / "tmp"
    (scratch / "accman-verify-0000").mkdir(parents=True)
    (scratch / "accman-verify-0000" / "theirs").write_text("x")
    monkeypatch.setattr("tempfile.tempdir", str(scratch))
    monkeypatch.setattr(copies.secrets, "token_hex", lambda n: "0000")
    with pytest.raises(StoreError, match="cannot copy the store to read it .a directory in "):
        Store(str(data), create=False, read_only=True)
    assert (scratch / "accman-verify-0000" / "theirs").read_text() == "x"
    assert copies._copies == set()


def test_verify_finds_damage_in_a_read_only_open_as_in_a_normal_one(tmp_path):
    data = crashed_store(tmp_path)
    raw = bytearray((data / wal.WAL_NAME).read_bytes())
    raw[wal.HEADER.size + 2] ^= 0x01        # the first record after the checkpoint
    (data / wal.WAL_NAME).write_bytes(bytes(raw))
    proc = run_accman("verify", "--data", data)
    assert proc.returncode == EXIT_REFUSED, proc.stdout + proc.stderr
    assert f"verify {data}: FAILED" in proc.stdout and "record" in proc.stdout
    assert str(data) in proc.stdout and "accman-verify-" not in proc.stdout
    assert proc.stdout.count(str(data)) == 1, proc.stdout          # named once


def test_verify_works_on_a_read_only_mount(tmp_path):
    """Issue 11 item 6: `accman verify` on a read-only copy failed with
    EROFS.  The copy is on a tmpfs remounted read-only (root only, as CI).
    `accman serve` there says the file system is read-only, where it said
    permission denied (a black-box probe)."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    data = crashed_store(tmp_path)
    mnt = tmp_path / "ro"
    mnt.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64m", "tmpfs", str(mnt)], check=True)
    try:
        shutil.copytree(data, mnt / "data")
        subprocess.run(["mount", "-o", "remount,ro", str(mnt)], check=True)
        with pytest.raises(OSError):
            (mnt / "data" / "probe").write_bytes(b"")
        proc = run_accman("verify", "--data", mnt / "data")
        assert proc.returncode == 0, proc.stdout + proc.stderr
        assert "ok" in proc.stdout and "entries=10" in proc.stdout
        proc = run_accman("serve", "--data", mnt / "data", "--port", "0")
        assert proc.returncode == 2, proc
        assert proc.stderr == (f"accman: error: cannot open data directory {mnt / 'data'}: on "
                               "a read-only file system (accman writes to it; `accman verify` "
                               "reads a read-only copy)\n"), proc.stderr
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_verify_of_a_directory_that_is_not_a_store_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_accman("verify", "--data", tmp_path / "empty")
    assert proc.returncode != 0
    assert "no store in this directory" in proc.stderr
    assert os.listdir(tmp_path / "empty") == []


@pytest.mark.parametrize("name", ["CURRENT", wal.WAL_NAME])
def test_a_store_file_that_is_a_named_pipe_is_refused_not_waited_on(tmp_path, name):
    """A store whose CURRENT or log was a named pipe made `accman verify`
    and the open wait for ever (a plain open of a pipe with no writer);
    such a store is damaged: refused at once, naming the file, and left
    as it was."""
    data = tmp_path / "data"
    with Ledger(str(data)) as led:
        led.mod("a", 5)
    (data / name).unlink()
    os.mkfifo(data / name, 0o600)
    before = sorted(os.listdir(data))
    proc = run_accman("verify", "--data", data, timeout=20)
    assert proc.returncode == EXIT_REFUSED, proc.stdout + proc.stderr
    assert f"{name} is not a regular file" in proc.stdout + proc.stderr
    with pytest.raises(StoreCorrupt, match=f"{name} is not a regular file"):
        Ledger(str(data))
    assert sorted(os.listdir(data)) == before and stat.S_ISFIFO(os.stat(data / name).st_mode)


def test_a_store_file_gone_while_another_has_the_store_open_is_no_damage(tmp_path):
    """The check that store files are regular runs before the lock: a file
    that the open store renamed or deleted between the listing and its stat
    (a checkpoint's accman.checkpoint.tmp, a compacted table) made a second
    open say StoreCorrupt, "refusing to serve", of a store that is whole
    and in use, instead of StoreLocked.  A link to nothing is still damage."""
    data = str(tmp_path / "data")
    led = Ledger(data, store=Store(data, wal_bytes_max=wal.BLOCK_BYTES))   # checkpoints often
    stop = threading.Event()

    def writer():
        while not stop.is_set():
            led.mod("a", 1)

    thread = threading.Thread(target=writer)
    thread.start()
    refusals = set()
    try:
        end = time.monotonic() + 0.5
        while time.monotonic() < end:
            try:
                Ledger(data)
            except StoreError as e:
                refusals.add(type(e).__name__ if type(e) is StoreLocked else str(e))
    finally:
        stop.set()
        thread.join()
        led.close()
    assert refusals == {"StoreLocked"}
    datadir.check_regular(data, os.listdir(data) + ["000999.ldb", "accman.checkpoint.tmp"])
    os.symlink(tmp_path / "nowhere", os.path.join(data, "000998.ldb"))
    with pytest.raises(StoreCorrupt, match=r"000998\.ldb is a symbolic link to nothing"):
        Ledger(data)


def test_a_store_file_made_again_between_its_stat_and_its_lstat_is_no_damage(
        tmp_path, monkeypatch):
    """A checkpoint's accman.checkpoint.tmp that the open store removed
    before the check's stat and made again before its lstat is a regular
    file, not a symbolic link to nothing (seen once in a full run)."""
    data = tmp_path / "data"
    data.mkdir()
    (data / "accman.checkpoint.tmp").write_bytes(b"x")
    real_stat = os.stat

    def stat_between(path, *args, **kw):
        if str(path).endswith("accman.checkpoint.tmp"):
            raise FileNotFoundError(2, "No such file or directory", str(path))
        return real_stat(path, *args, **kw)
    monkeypatch.setattr(datadir.os, "stat", stat_between)
    datadir.check_regular(str(data))
    (data / "accman.checkpoint.tmp").unlink()
    os.symlink(tmp_path / "nowhere", data / "accman.checkpoint.tmp")
    with pytest.raises(StoreCorrupt, match="accman.checkpoint.tmp is a symbolic link to nothing"):
        datadir.check_regular(str(data))


def test_the_default_acl_is_what_makes_new_files_0600(tmp_path, umask_022):
    """The mechanism itself: a file made with mode 0644 in the directory
    (as LevelDB makes its files) is 0600 under a umask of 022."""
    path = tmp_path / "d"
    datadir.make(str(path))
    datadir.tighten(str(path))
    fd = os.open(path / "000009.log", os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    assert stat.S_IMODE((path / "000009.log").stat().st_mode) == 0o600


def _state(path):
    """What a refused open must leave as it was: each entry's mode and
    bytes, and the directory's own mode and default ACL."""
    path = Path(path)
    try:
        acl = os.getxattr(path, "system.posix_acl_default")
    except OSError:
        acl = None
    return (stat.S_IMODE(path.stat().st_mode), acl,
            {p.name: (stat.S_IMODE(p.lstat().st_mode), p.read_bytes() if p.is_file() else None)
             for p in sorted(path.iterdir())})


def test_a_data_path_that_is_a_file_is_refused_and_left_as_it_was(tmp_path):
    afile = tmp_path / "afile"
    afile.write_bytes(b"not a store")
    os.chmod(afile, 0o644)
    with pytest.raises(StoreError, match="not a directory"):
        Ledger(str(afile))
    for store_args in ([], ["--store", "postgresql://accman@127.0.0.1:1/none"]):
        proc = run_accman("serve", "--port", "0", "--data", afile, *store_args)
        assert proc.returncode == EXIT_USAGE, proc.stderr   # serve's refusals
        assert "not a directory" in proc.stderr and "Traceback" not in proc.stderr
        assert proc.stderr.count(str(afile)) == 1, proc.stderr      # named once
    assert stat.S_IMODE(afile.stat().st_mode) == 0o644
    assert afile.read_bytes() == b"not a store"


def _unfollowable(tmp_path, kind):
    """A data path the OS cannot follow to a directory, and its strerror."""
    if kind == "under a file":
        (tmp_path / "afile").write_bytes(b"not a store")
        return tmp_path / "afile" / "data", "Not a directory"
    os.symlink("loop_b", tmp_path / "loop_a")
    os.symlink("loop_a", tmp_path / "loop_b")
    return tmp_path / "loop_a", "Too many levels of symbolic links"


@pytest.mark.parametrize("store_args", [[], ["--store", "postgresql://accman@127.0.0.1:1/x"]])
@pytest.mark.parametrize("kind", ["under a file", "a loop of links"])
def test_a_data_path_the_os_cannot_follow_is_one_line_and_exit_2(tmp_path, kind, store_args):
    """serve said a path under a file, or a loop of symbolic links, with a
    traceback and exit 1 (its first look at the directory, before the
    store's, let the OS error through): one line naming the path and why."""
    data, why = _unfollowable(tmp_path, kind)
    before = sorted(p.name for p in tmp_path.iterdir())
    proc = run_accman("serve", "--port", "0", "--data", data, *store_args)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.splitlines()) == 1
    assert str(data) in proc.stderr and why in proc.stderr
    assert sorted(p.name for p in tmp_path.iterdir()) == before


def test_a_data_path_that_is_a_dangling_link_is_named_as_one(tmp_path):
    """A symbolic link to nothing was met as `open failed (LOCK): No such
    file or directory`, a file the person never named."""
    os.symlink(tmp_path / "gone", tmp_path / "data")
    with pytest.raises(StoreError, match=r"data: a symbolic link to .*gone, which does not "
                                         r"exist \(nothing was changed\)"):
        Ledger(str(tmp_path / "data"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["data"]


def test_a_data_path_under_a_dangling_link_names_the_link(tmp_path):
    """A link to nothing on the way (`LINK/data`) was said as `open failed
    (LINK): File exists`: the link is named as one, and nothing is made."""
    os.symlink(tmp_path / "gone", tmp_path / "link")
    with pytest.raises(StoreError, match=r"link/data: on its way, .*link is a symbolic link "
                                         r"to .*gone, which does not exist"):
        Ledger(str(tmp_path / "link" / "data"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["link"]


@pytest.mark.parametrize("data,says", [
    ("", "data: path must name a directory, got an empty one"),
    ("a\0b", "data: path must not hold a NUL character")])
def test_run_refuses_a_data_path_as_serve_does(tmp_path, data, says):
    """accman.server.run(data="") served a store made in the current
    directory (abspath's reading of ""), and a NUL character was a
    ValueError traceback: `--data` and Ledger refuse both."""
    code = ("from accman.server.run import run\n"
            "def served(line):\n"
            "    raise SystemExit('served: ' + line)\n"
            f"run(port=0, data={data!r}, ready=served)\n")
    proc = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True,
                          text=True, timeout=30)
    assert f"StartupError: {says}" in proc.stderr, proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_a_directory_of_other_files_is_refused_and_left_as_it_was(tmp_path):
    """A mistyped --data (a home or system directory) is not made 0700
    and filled with a store."""
    other = tmp_path / "other"
    (other / "sub").mkdir(parents=True)
    (other / "notes.txt").write_text("mine")
    os.chmod(other, 0o755)
    before = _state(other)
    with pytest.raises(StoreError, match=r"not empty \(notes.txt, sub\)"):
        Ledger(str(other))
    proc = run_accman("serve", "--port", "0", "--data", other)
    assert proc.returncode == EXIT_USAGE
    assert "holds no AccMan store and is not empty" in proc.stderr
    assert _state(other) == before


def test_a_file_system_root_with_only_lost_found_takes_a_new_store(tmp_path):
    root = tmp_path / "volume"
    (root / "lost+found").mkdir(parents=True)
    with Ledger(str(root)) as led:
        led.mod("alice", 5)
    with Ledger(str(root)) as led:
        assert led.tot("alice") == 5
    assert stat.S_IMODE(root.stat().st_mode) == 0o700


def test_a_creation_cut_short_on_a_file_system_root_is_made_again(tmp_path):
    """What a power cut during a new store's creation leaves (the key, a
    first MANIFEST, CURRENT.dbtmp) beside lost+found is made again."""
    made = tmp_path / "made"
    with Ledger(str(made)):
        pass
    root = tmp_path / "volume"
    (root / "lost+found").mkdir(parents=True)
    shutil.copy(made / keyfile.KEY_NAME, root / keyfile.PENDING_NAME)     # sealed after
    (root / "MANIFEST-000001").write_bytes(datadir._first_manifest())
    (root / "CURRENT.dbtmp").write_bytes(b"MANIF")
    with Ledger(str(root)) as led:
        assert led.mod("alice", 3) == (3, 1)
    assert (root / "lost+found").is_dir()


NO_DATABASE = "postgresql://accman@127.0.0.1:1/none"


def _front_end_refused(data, says):
    """A front-end of a PostgreSQL store given `data` is refused before it
    changes anything there, saying `says`."""
    before = _state(data)
    proc = run_accman("serve", "--port", "0", "--data", data, "--store", NO_DATABASE)
    assert proc.returncode == EXIT_USAGE
    assert says in proc.stderr
    assert _state(data) == before


def test_a_lock_directory_of_other_files_is_refused_and_left_as_it_was(tmp_path):
    """--data beside --store holds only the lock: a directory of other
    files is refused before the lock is made in it, as for the embedded
    store."""
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    _front_end_refused(other, "holds no AccMan store and is not empty (notes.txt)")


def test_a_front_end_s_lock_directory_is_not_taken_for_an_embedded_store(tmp_path):
    """A restart that leaves out --store must not serve an empty embedded
    ledger from the front-end's directory beside the real one."""
    d = tmp_path / "d"
    d.mkdir(mode=0o700)             # as a front-end that served leaves it
    os.close(datadir.lock_exclusive(str(d)))
    datadir.mark_frontend(str(d))
    before = _state(d)
    proc = run_accman("serve", "--port", "0", "--data", d)
    assert proc.returncode == EXIT_USAGE
    assert ("holds the lock of a front-end of a PostgreSQL store (FRONTEND.accman)"
            in proc.stderr)
    with pytest.raises(StoreError, match="not an embedded store: serve it with --store"):
        Ledger(str(d))
    proc = run_accman("verify", "--data", d)          # verify says what the directory is
    assert proc.returncode == EXIT_USAGE and "holds the lock of a front-end of a PostgreSQL " \
        "store (FRONTEND.accman), not an embedded store" in proc.stderr, proc.stderr
    assert _state(d) == before
    # The front-end itself takes it again; not one that holds an embedded store.
    datadir.check_usable(str(d), also=datadir.CURSOR_FILE, frontend=True)
    store = tmp_path / "store"
    with Ledger(str(store)) as led:
        led.mod("alice", 5)
    _front_end_refused(store, "holds an embedded store: a front-end of a PostgreSQL store needs")


@pytest.mark.parametrize("found", [None, [], ["LOCK"], ["lost+found"]])
def test_a_front_end_start_that_fails_takes_back_its_lock_and_mark(tmp_path, found):
    """A front-end refused at its start (here: no database at the URL) left
    its lock and mark in --data, and in a directory it made: a later
    `serve --data` of the same path then refused it as a front-end's.  It
    takes back what it added; what was there stays."""
    d = tmp_path / "d"
    if found is not None:
        d.mkdir(mode=0o700)
        for name in found:
            (d / name).mkdir() if name == "lost+found" else (d / name).touch()
    before = _state(d) if found is not None else None
    proc = run_accman("serve", "--port", "0", "--data", d, "--store", NO_DATABASE)
    assert proc.returncode == EXIT_USAGE and "cannot open the PostgreSQL store" in proc.stderr
    if found is None:
        assert not d.exists()
    else:
        assert _state(d) == before
    with Ledger(str(d)) as led:       # the embedded store takes the path
        assert led.mod("alice", 5) == (5, 1)


def test_a_front_end_start_that_fails_takes_back_the_parents_it_made(tmp_path):
    """--data under directories that are missing: the start makes them all
    for its lock, and a refused start takes back each it made, as it takes
    back --data itself; the directory that was there stays."""
    proc = run_accman("serve", "--port", "0", "--data", tmp_path / "a" / "b" / "d",
                      "--store", NO_DATABASE)
    assert proc.returncode == EXIT_USAGE and "cannot open the PostgreSQL store" in proc.stderr
    assert os.listdir(tmp_path) == []


# A failed front-end start's undo, with another front-end starting in the
# same --data after each of its unlinks: that one takes the lock once LOCK
# is gone, and keeps the mark it finds (datadir.mark_frontend).
_UNDO_RACED = """
import os, sys
from accman.errors import StoreLocked
from accman.ledger import datadir
from accman.server.undo import Undo, lock_directory
d = sys.argv[1]
undo = Undo(d, [sys.argv[2]], False)
lock_directory(d)
held, unlink = [], os.unlink
def raced(path, *, dir_fd=None):
    unlink(path, dir_fd=dir_fd)
    if not held:
        try:
            held.append(datadir.lock_exclusive(d))
        except StoreLocked:
            return
        datadir.mark_frontend(d)
os.unlink = raced
undo()
print(len(held), sorted(os.listdir(d)))
"""


@pytest.mark.parametrize("seed", ["0", "8"])
def test_a_failed_front_end_start_leaves_the_mark_of_one_that_takes_the_lock(tmp_path, seed):
    """The undo took the lock's file and the mark away in a set's order (the
    hash seed's): LOCK first, another front-end starting then made a new
    LOCK, took it, kept the mark it found, and lost it to the undo: its
    directory, unmarked, is taken for a new embedded store.  The mark goes
    while the lock still guards the path, under any seed."""
    env = {**os.environ, "PYTHONHASHSEED": seed}
    proc = subprocess.run([sys.executable, "-c", _UNDO_RACED, str(tmp_path / "d"), NO_DATABASE],
                          capture_output=True, text=True, timeout=30, env=env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == ["1", f"['{datadir.FRONTEND_MARK}',", "'LOCK']"], proc.stdout


# Another front-end's whole life (its lock, its mark, its exit) between a
# failed front-end start's first look at --data and the lock it takes.
_FRONT_END_MEANWHILE = """
import os, sys
from accman.ledger import datadir
from accman.server.undo import Undo, lock_directory
d = sys.argv[1]
undo = Undo(d, [sys.argv[2]], False)
os.makedirs(d, exist_ok=True)
os.close(datadir.lock_exclusive(d))
datadir.mark_frontend(d)
lock_directory(d)
undo()
print(sorted(os.listdir(d)))
"""


@pytest.mark.parametrize("found", [None, []])
def test_a_failed_front_end_start_leaves_what_another_made_before_its_lock(tmp_path, found):
    """The other front-end left its lock and its mark, as a front-end
    does: the failed start, which had seen --data missing or empty, took
    them (and the directory) back as its own, and a later start without
    --store took that path for a new embedded store."""
    d = tmp_path / "d"
    if found is not None:
        d.mkdir()
    proc = subprocess.run([sys.executable, "-c", _FRONT_END_MEANWHILE, str(d), NO_DATABASE],
                          capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.split() == [f"['{datadir.FRONTEND_MARK}',", "'LOCK']"], proc.stdout


def test_a_refused_store_keeps_its_files_modes(tmp_path):
    """Tightening comes after every check: a store refused as damaged is
    left as it was found, modes included."""
    path = open_to_others(tmp_path)
    (path / "CURRENT").unlink()             # LevelDB's files without CURRENT
    before = _state(path)
    with pytest.raises(StoreCorrupt):
        Ledger(str(path))
    assert _state(path) == before


def test_a_webhook_cursor_is_the_lock_directorys_not_a_new_stores(tmp_path):
    """A cursor an older AccMan left beside --store is that directory's to
    hold; with no store behind it, it is not where a new embedded store
    starts (its deliveries would resume past events never sent)."""
    d = tmp_path / "d"
    d.mkdir()
    (d / "LOCK").write_bytes(b"")
    (d / "webhook.cursor").write_text("20\n")
    datadir.check_usable(str(d), also=datadir.CURSOR_FILE)
    with pytest.raises(StoreError, match=r"not empty \(webhook.cursor\)"):
        Ledger(str(d))


def test_the_store_s_own_files_are_written_whole_by_an_os_that_writes_short(
        tmp_path, monkeypatch):
    """`os.write` may take fewer bytes than it is given.  The key, the
    checkpoint and the format record were each one unchecked call: with an
    OS that writes at most 7 bytes a call, a new store's files were short,
    and the next open refused the store as damaged."""
    real_write = os.write
    monkeypatch.setattr(os, "write", lambda fd, data: real_write(fd, bytes(data[:7])))
    path = str(tmp_path / "d")
    with Ledger(path) as led:
        assert led.mod("alice", 5) == (5, 1)
    monkeypatch.undo()
    with Ledger(path) as led:
        assert led.tot("alice") == 5 and led.mod("alice", 1) == (6, 2)


def test_a_lock_taken_on_a_lock_file_unlinked_meanwhile_is_taken_again(tmp_path, monkeypatch):
    """Between a start's open of LOCK and its flock, a refused start took
    its store back (LOCK unlinked last) and another start made a new LOCK
    and took it: the flock on the unlinked file succeeded, and two servers
    had one directory.  The lock is taken on the file the path names."""
    held, flock = [], datadir.fcntl.flock

    def swapped(fd, op):
        if not held:
            held.append(None)
            os.unlink(tmp_path / "LOCK")
            held.append(datadir.lock_exclusive(str(tmp_path)))     # the other start's
        flock(fd, op)

    monkeypatch.setattr(datadir.fcntl, "flock", swapped)
    try:
        with pytest.raises(StoreLocked):
            datadir.lock_exclusive(str(tmp_path))
    finally:
        os.close(held[1])


def test_a_shared_lock_taken_on_a_lock_file_unlinked_meanwhile_is_taken_again(
        tmp_path, monkeypatch):
    """`accman verify`'s shared lock, between its open of LOCK and its flock:
    a refused start took its store back (LOCK unlinked last) and a server
    made a new LOCK and took it.  The shared flock on the unlinked file
    succeeded, and verify read a directory a server was writing."""
    os.close(datadir.lock_exclusive(str(tmp_path)))
    held, flock = [], datadir.fcntl.flock

    def swapped(fd, op):
        if not held:
            held.append(None)
            os.unlink(tmp_path / "LOCK")
            held.append(datadir.lock_exclusive(str(tmp_path)))     # the server's
        flock(fd, op)

    monkeypatch.setattr(datadir.fcntl, "flock", swapped)
    try:
        with pytest.raises(StoreLocked):
            os.close(datadir.lock_shared(str(tmp_path)))
    finally:
        os.close(held[1])
