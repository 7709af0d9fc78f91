"""The suite's own PostgreSQL servers (pgcluster.py) for a user who is not
root: the binaries then run as that user, in a tree it owns already."""

import os
import shutil
import subprocess
import tempfile
from pathlib import Path

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
