"""Data at rest (SPEC "Access", issue 11 item 6): the data directory 0700
and every file in it 0600, LevelDB's later files too, without changing the
process umask; `accman verify` on a read-only copy, changing no file."""

import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

from accman import Ledger
from accman.ledger import datadir, keyfile, wal
from accman.cli import EXIT_REFUSED
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


def test_a_store_made_before_is_tightened_at_open(tmp_path):
    path = tmp_path / "data"
    with Ledger(str(path)) as led:
        led.mod("alice", 1)
    os.chmod(path, 0o755)
    os.removexattr(path, "system.posix_acl_default")
    for f in path.iterdir():
        os.chmod(f, 0o644)
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
    data = crashed_store(tmp_path)
    before = files_of(data)
    proc = run_accman("verify", "--data", data)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ok" in proc.stdout and "entries=10" in proc.stdout and "keys=10" in proc.stdout
    assert files_of(data) == before
    # Its private copy is gone.
    assert not [p for p in Path(os.environ.get("TMPDIR", "/tmp")).glob("accman-verify-*")
                if p.stat().st_uid == os.getuid() and str(data) in str(p)]


def test_verify_finds_damage_in_a_read_only_open_as_in_a_normal_one(tmp_path):
    data = crashed_store(tmp_path)
    raw = bytearray((data / wal.WAL_NAME).read_bytes())
    raw[wal.HEADER.size + 2] ^= 0x01        # the first record after the checkpoint
    (data / wal.WAL_NAME).write_bytes(bytes(raw))
    proc = run_accman("verify", "--data", data)
    assert proc.returncode == EXIT_REFUSED, proc.stdout + proc.stderr
    assert f"verify {data}: FAILED" in proc.stdout and "record" in proc.stdout
    assert str(data) in proc.stdout and "accman-verify-" not in proc.stdout


def test_verify_works_on_a_read_only_mount(tmp_path):
    """Issue 11 item 6: `accman verify` on a read-only copy failed with
    EROFS.  The copy is on a tmpfs remounted read-only (root only, as CI)."""
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
    finally:
        subprocess.run(["umount", "-l", str(mnt)], capture_output=True)


def test_verify_of_a_directory_that_is_not_a_store_says_so(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run_accman("verify", "--data", tmp_path / "empty")
    assert proc.returncode != 0
    assert "no store in this directory" in proc.stderr
    assert os.listdir(tmp_path / "empty") == []


def test_the_default_acl_is_what_makes_new_files_0600(tmp_path, umask_022):
    """The mechanism itself: a file made with mode 0644 in the directory
    (as LevelDB makes its files) is 0600 under a umask of 022."""
    path = tmp_path / "d"
    datadir.make(str(path))
    datadir.tighten(str(path))
    fd = os.open(path / "000009.log", os.O_CREAT | os.O_WRONLY, 0o644)
    os.close(fd)
    assert stat.S_IMODE((path / "000009.log").stat().st_mode) == 0o600
