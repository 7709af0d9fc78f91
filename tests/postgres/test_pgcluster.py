"""The suite's own PostgreSQL servers (pgcluster.py): for a user who is not
root (the binaries then run as that user, in a tree it owns already), and
where their directories are made (in memory where there is room)."""

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


def test_the_suite_s_clusters_are_made_where_suite_parent_dir_says(pg, monkeypatch):
    assert pgcluster.PARENT_DIR == suite_parent_dir()
    assert pg.base.parent == Path(pgcluster.PARENT_DIR or tempfile.gettempdir())
    assert pg.base.name.startswith(f"accman-pg-{os.getpid()}-")
    monkeypatch.setenv("ACCMAN_TEST_PG_DIR", "/elsewhere")
    assert suite_parent_dir() == "/elsewhere"


def test_memory_is_a_tmpfs_with_the_room_asked_for(tmp_path):
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    mem = tmp_path / "mem"
    mem.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=8m", "tmpfs", str(mem)], check=True)
    try:
        (mem / "sub").mkdir()
        assert in_memory(str(mem), 4 << 20) and in_memory(str(mem / "sub"), 4 << 20)
        assert not in_memory(str(mem), 16 << 20)
        # A neighbour whose name begins with the mount point's is not under it.
        (tmp_path / "memo").mkdir()
        on_tmpfs = pgcluster._fs_type(str(tmp_path)) == "tmpfs"
        assert in_memory(str(tmp_path / "memo"), 0) == on_tmpfs
        assert not in_memory(str(tmp_path / "absent"), 0)
    finally:
        subprocess.run(["umount", "-l", str(mem)], check=True)


def test_directories_of_ended_processes_are_removed_and_the_rest_kept(tmp_path):
    ended = subprocess.Popen(["true"])
    ended.wait()
    gone = tmp_path / f"accman-pg-{ended.pid}-initdb-x1"
    (gone / "data").mkdir(parents=True)
    mine = tmp_path / f"accman-pg-{os.getpid()}-x2"
    init = tmp_path / "accman-pg-1-x3"                  # a process alive: init's
    bench = tmp_path / "accman-pg-http-x4"             # no pid: not a cluster's
    for d in (mine, init, bench):
        d.mkdir()
    assert remove_orphans(tmp_path) == [gone.name]
    assert not gone.exists() and mine.exists() and init.exists() and bench.exists()
