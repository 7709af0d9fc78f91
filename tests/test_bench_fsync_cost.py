"""bench/fsync_cost.py's own behaviour, never its timings: every method
gets a row of figures (or is said to be unsupported by the file system),
and a bad argument is refused naming it."""

import os
import re
import subprocess
import sys
from pathlib import Path

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "fsync_cost.py"
METHODS = ("leveldb sync=True, 2 records", "leveldb sync=False, 2 records",
           "append 4 KiB + fdatasync", "overwrite 4 KiB + fdatasync",
           "overwrite 4 KiB, O_DSYNC", "overwrite 4 KiB, O_DIRECT+O_DSYNC",
           "unwritten 4 KiB, O_DIRECT+O_DSYNC",
           "O_DIRECT+O_DSYNC + leveldb sync=False, 2 records")
# Two rounds of one figure, e.g. "41 / 39 µs".
FIGURE = r"\d+ / \d+ µs"
RUN_TIMEOUT_S = 60


def run(*args, tmp_path):
    cpu = min(os.sched_getaffinity(0))
    return subprocess.run([sys.executable, str(SCRIPT), "--dir", str(tmp_path),
                           "--cpu", str(cpu), *args],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def test_every_method_has_its_figures(tmp_path):
    done = run("--writes", "3", "--records", "2", "--pause-us", "5", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "5 µs spun before each" in done.stdout
    rows = {line.split(" | ")[0].lstrip("| "): line
            for line in done.stdout.splitlines() if line.startswith("| ")}
    for name in METHODS:
        line = rows[name]
        unsupported = "not supported by this file system" in line
        assert unsupported or re.fullmatch(
            rf"\| {re.escape(name)} \| {FIGURE} \| {FIGURE} \| {FIGURE} \| {FIGURE} \|", line), line
    assert not any(p.name.startswith("accman-fsync-") for p in tmp_path.iterdir()), \
        "its working directory is left behind"


def test_a_bad_argument_is_refused_by_name(tmp_path):
    for args, named in ((("--writes", "0"), "--writes must be at least 1, not 0"),
                        (("--records", "0"), "--records must be at least 1, not 0"),
                        (("--pause-us", "-1"), "--pause-us must be from 0 to 1000000, not -1")):
        done = run(*args, tmp_path=tmp_path)
        assert done.returncode == 2, (args, done.stdout)
        assert named in done.stderr, (args, done.stderr)
    assert list(tmp_path.iterdir()) == [], "a refused run wrote nothing"
