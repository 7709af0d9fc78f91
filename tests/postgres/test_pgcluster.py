"""The suite's own PostgreSQL servers (pgcluster.py): for a user who is not
root (the binaries then run as that user, in a tree it owns already), and
where their directories are made (in memory where there is room)."""

import fcntl
import os
import shutil
import subprocess
import tempfile
from pathlib import Path

import pytest

from . import pgcluster
from .pgcluster import in_memory, remove_orphans, suite_parent_dir

MAKE_AND_STOP = """
import sys
sys.path.insert(0, sys.argv[1])
from pgcluster import Cluster
with Cluster.create() as pg:
    print(pg.port > 0)
"""


def test_a_user_who_is_not_root_makes_and_stops_a_cluster():
    """Cluster.create() gave its new directory to the postgres user with
    os.chown, which only root may do: as any other user every PostgreSQL
    test failed at its fixture (PermissionError).  As root the suite runs
    it as `nobody`, from a copy of the module that user can read, with the
    system's Python (the standard library is all it needs)."""
    here = Path(__file__).with_name("pgcluster.py")
    copy = Path(tempfile.mkdtemp(prefix="accman-pgcluster-"))
    try:
        os.chmod(copy, 0o755)
        shutil.copy(here, copy / "pgcluster.py")
        os.chmod(copy / "pgcluster.py", 0o644)
        cmd = ["/usr/bin/python3", "-c", MAKE_AND_STOP, str(copy)]
        if os.geteuid() == 0:
            cmd = ["runuser", "-u", "nobody", "--", *cmd]
        done = subprocess.run(cmd, capture_output=True, text=True, timeout=60, cwd="/")
        assert (done.returncode, done.stdout.strip()) == (0, "True"), done.stderr[-2000:]
    finally:
        shutil.rmtree(copy, ignore_errors=True)


def test_the_suite_s_clusters_are_made_where_it_chose(pg, monkeypatch):
    """Where the run chose at its start (not chosen again: the run's own
    clusters have taken some of the room since), in memory if there."""
    assert pg.base.parent == Path(pgcluster.PARENT_DIR or tempfile.gettempdir())
    assert pg.base.name.startswith(pgcluster.DIR_PREFIX)
    if pgcluster.PARENT_DIR == pgcluster.MEMORY_DIR:
        assert pgcluster._fs_type(pgcluster.PARENT_DIR) == "tmpfs"
    # Short enough for the sockets (pytest's tmp_path under a worker is not).
    chosen = tempfile.mkdtemp(prefix="accman-pgdir-")
    try:
        monkeypatch.setenv("ACCMAN_TEST_PG_DIR", chosen)
        assert suite_parent_dir() == chosen
    finally:
        os.rmdir(chosen)


@pytest.mark.parametrize("path, says", [
    ("absent", "is not a directory"),
    ("x" * 80, "is too long: the clusters' Unix sockets under it would need"),
])
def test_a_test_pg_dir_postgresql_cannot_use_is_refused_naming_why(
        monkeypatch, tmp_path, path, says):
    where = tmp_path / path
    if path != "absent":
        where.mkdir()
    monkeypatch.setenv("ACCMAN_TEST_PG_DIR", str(where))
    with pytest.raises(ValueError, match=f"ACCMAN_TEST_PG_DIR: {where} {says}"):
        suite_parent_dir()


def mount(fstype, path):
    """A file system of `fstype` (a tmpfs of 8 MiB) mounted at `path`."""
    size = ["-o", "size=8m"] if fstype == "tmpfs" else []
    subprocess.run(["mount", "-t", fstype, *size, fstype, str(path)], check=True)


def umount(path):
    # Lazy: a file the test still holds open does not keep it mounted.
    subprocess.run(["umount", "-l", str(path)])


def test_memory_is_a_tmpfs_with_the_room_asked_for(tmp_path):
    """Mounted by the test: a ramfs holding a tmpfs, so that which one a
    path is on does not depend on the machine's own mounts."""
    if os.geteuid() != 0:
        pytest.skip("mounting a file system needs root (CI runs as root)")
    outer, mem = tmp_path / "outer", tmp_path / "outer" / "mem"
    outer.mkdir()
    mount("ramfs", outer)
    try:
        mem.mkdir()
        (outer / "memo").mkdir()
        (outer / "a b").mkdir()
        mount("tmpfs", mem)
        mount("tmpfs", outer / "a b")
        (mem / "sub").mkdir()
        assert in_memory(str(mem), 4 << 20) and in_memory(str(mem / "sub"), 4 << 20)
        assert not in_memory(str(mem), 16 << 20)
        # A neighbour whose name begins with the mount point's is not under it;
        # a mount point with a space is written in octal in the mount table.
        assert pgcluster._fs_type(str(outer / "memo")) == "ramfs"
        assert not in_memory(str(outer / "memo"), 0)
        assert in_memory(str(outer / "a b"), 4 << 20)
        assert not in_memory(str(mem / "absent"), 0)
    finally:
        for m in (mem, outer / "a b", outer):
            umount(m)


def test_a_cluster_in_memory_keeps_its_shared_memory_in_its_directory(monkeypatch):
    """Its dynamic shared memory's segments are files of its directory, there
    after a SIGKILL and removed with it (the default's are POSIX segments
    in /dev/shm, which a killed server leaves there for good)."""
    if pgcluster._fs_type("/dev/shm") != "tmpfs":
        pytest.skip("this machine has no tmpfs at /dev/shm")
    monkeypatch.setattr(pgcluster, "PARENT_DIR", "/dev/shm")
    c = pgcluster.Cluster.create("killed")
    try:
        c.kill()
        segments = os.listdir(c.data / "pg_dynshmem")
        assert segments and all(name.startswith("mmap.") for name in segments), segments
    finally:
        c.destroy()
    assert not c.base.exists()


def test_a_killed_cluster_leaves_no_system_v_segment():
    """The segment its SIGKILLed postmaster names in its lock file, there
    after the kill (only a later start would remove it), is removed by
    destroy, as a clean stop removes it."""
    c = pgcluster.Cluster.create("killed")
    try:
        c.kill()
        seg = pgcluster._lock_file_segment(c.data)
        assert seg is not None and pgcluster._attached(*seg) is not None, seg
    finally:
        c.destroy()
    assert pgcluster._attached(*seg) is None


def owner_held(d):
    """`d` made as make_dir makes one, its owner file locked by a file
    description of its own, as another process's would be."""
    d.mkdir()
    fd = os.open(d / pgcluster.OWNER_NAME, os.O_RDONLY | os.O_CREAT)
    fcntl.flock(fd, fcntl.LOCK_EX)
    return fd


def test_directories_whose_maker_has_ended_are_removed_and_the_rest_kept(
        tmp_path, monkeypatch):
    """An orphan: its owner file unlocked (its maker gone); kept: one still
    held, one being made (no owner file yet), one not made by make_dir (the
    benchmarks' own).  The sweep happens at a process's first make_dir."""
    orphan = tmp_path / "accman-pg-initdb-x1"
    orphan.mkdir()
    (orphan / pgcluster.OWNER_NAME).touch()
    (orphan / "data").mkdir()
    held = owner_held(tmp_path / "accman-pg-x2")
    making = tmp_path / "accman-pg-x3"
    making.mkdir()
    bench = tmp_path / "accman-pg-http-x4"
    bench.mkdir()
    monkeypatch.setattr(pgcluster, "PARENT_DIR", str(tmp_path))
    monkeypatch.setattr(pgcluster, "_swept", False)
    try:
        made = pgcluster.make_dir()
        assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
            ["accman-pg-x2", "accman-pg-x3", "accman-pg-http-x4", made.name])
        # The new one is held for as long as this process lives.
        assert remove_orphans(tmp_path) == []
        pgcluster.remove_dir(made)
        assert not made.exists() and made not in pgcluster._owned
    finally:
        os.close(held)
    assert remove_orphans(tmp_path) == ["accman-pg-x2"]


def test_memory_s_orphans_are_removed_before_its_room_is_judged(tmp_path, monkeypatch):
    """A killed run's clusters in memory would otherwise keep every later
    run off it (too little room), and so never be removed."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mem = tmp_path / "shm"
    mem.mkdir()
    mount("tmpfs", mem)
    try:
        orphan = mem / "accman-pg-x1"
        orphan.mkdir()
        (orphan / pgcluster.OWNER_NAME).touch()
        (orphan / "base").write_bytes(bytes(6 << 20))
        monkeypatch.setattr(pgcluster, "MEMORY_DIR", str(mem))
        monkeypatch.setattr(pgcluster, "MEMORY_FREE_MIN_BYTES", 4 << 20)
        monkeypatch.delenv("ACCMAN_TEST_PG_DIR", raising=False)
        assert suite_parent_dir() == str(mem) and not orphan.exists()
        monkeypatch.setattr(pgcluster, "MEMORY_FREE_MIN_BYTES", 16 << 20)
        assert suite_parent_dir() is None
    finally:
        umount(mem)
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    assert 0 < pgcluster._memory_available() <= total


def test_a_failed_command_or_start_says_why_in_postgresql_s_words(pg):
    with pytest.raises(pgcluster.CommandFailed, match='relation "no_such_table" does not exist'):
        pg.psql("SELECT * FROM no_such_table")
    owned = dict(pgcluster._owned)
    with pytest.raises(pgcluster.CommandFailed,
                       match=r'(?s)could not start server.*invalid value for parameter "port"'):
        pgcluster.Cluster.create("badport", conf={"port": "'none'"})
    # The directory it made is gone with it.
    assert pgcluster._owned == owned
