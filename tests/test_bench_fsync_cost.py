"""bench/fsync_cost.py's own behaviour, never its timings: every method
gets a row of figures (an O_DIRECT one may be said to be unsupported by
the file system, leaving no descriptor open), its percentiles are by
nearest rank, and a bad argument is refused naming it."""

import errno
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "fsync_cost.py"
sys.path.insert(0, str(BENCH))

import fsync_cost  # noqa: E402
from harness.base import nearest_rank  # noqa: E402
METHODS = ("leveldb sync=True, 2 records", "leveldb sync=False, 2 records",
           "append 4 KiB + fdatasync", "overwrite 4 KiB + fdatasync",
           "overwrite 4 KiB, O_DSYNC", "overwrite 4 KiB, O_DIRECT+O_DSYNC",
           "unwritten 4 KiB, O_DIRECT+O_DSYNC",
           "O_DIRECT+O_DSYNC + leveldb sync=False, 2 records")
# Two rounds of one figure, e.g. "41 / 39 µs".
FIGURE = r"\d+ / \d+ µs"
RUN_TIMEOUT_S = 60


def run(*args, tmp_path):
    """The script with --dir and --cpu of this machine, unless `args` give their own."""
    given = args[::2]          # every argument here is a flag and its value
    defaults = ["--dir", str(tmp_path)] * ("--dir" not in given) + \
        ["--cpu", str(min(os.sched_getaffinity(0)))] * ("--cpu" not in given)
    return subprocess.run([sys.executable, str(SCRIPT), *defaults, *args],
                          capture_output=True, text=True, timeout=RUN_TIMEOUT_S)


def test_every_method_has_its_figures(tmp_path):
    done = run("--writes", "3", "--records", "2", "--pause-us", "5", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    assert "5 µs spun before each" in done.stdout
    rows = {line.split(" | ")[0].lstrip("| "): line
            for line in done.stdout.splitlines() if line.startswith("| ")}
    for name in METHODS:
        line = rows[name]
        unsupported = "O_DIRECT" in name and "not supported by this file system" in line
        assert unsupported or re.fullmatch(
            rf"\| {re.escape(name)} \| {FIGURE} \| {FIGURE} \| {FIGURE} \| {FIGURE} \|", line), line
    assert not any(p.name.startswith("accman-fsync-") for p in tmp_path.iterdir()), \
        "its working directory is left behind"


def test_each_rows_median_is_at_most_its_90th_percentile(tmp_path):
    done = run("--writes", "2", "--records", "2", tmp_path=tmp_path)
    assert done.returncode == 0, done.stderr
    rows = [line for line in done.stdout.splitlines() if re.match(r"\| \w", line)][1:]
    assert len(rows) == len(METHODS)
    for line in rows:
        cells = line.split(" | ")
        if "not supported" in line:
            continue
        medians, p90s = (re.findall(r"\d+", cells[k]) for k in (2, 3))
        assert all(int(m) <= int(p) for m, p in zip(medians, p90s, strict=True)), line


def test_a_bad_argument_is_refused_by_name(tmp_path):
    outside = max(os.sched_getaffinity(0)) + 1
    for args, named in ((("--writes", "0"), "--writes must be at least 1, not 0"),
                        (("--records", "0"), "--records must be at least 1, not 0"),
                        (("--pause-us", "-1"), "--pause-us must be from 0 to 1000000, not -1"),
                        (("--pause-us", "nan"), "--pause-us must be from 0 to 1000000, not nan"),
                        (("--cpu", str(outside)),
                         f"--cpu {outside} is not a CPU this process may run on"),
                        (("--dir", str(tmp_path / "missing")),
                         f"--dir {tmp_path / 'missing'} is not a directory")):
        done = run(*args, tmp_path=tmp_path)
        assert done.returncode == 2, (args, done.stdout)
        assert named in done.stderr, (args, done.stderr)
    assert list(tmp_path.iterdir()) == [], "a refused run wrote nothing"


def test_quantiles_are_by_nearest_rank():
    assert nearest_rank([5.0], 0.5) == nearest_rank([5.0], 0.9) == 5.0
    assert (nearest_rank([1.0, 2.0], 0.5), nearest_rank([1.0, 2.0], 0.9)) == (1.0, 2.0)
    ten = [float(i) for i in range(1, 11)]
    assert (nearest_rank(ten, 0.5), nearest_rank(ten, 0.9)) == (5.0, 9.0)
    for n in range(1, 40):
        values = [float(i) for i in range(n)]
        assert nearest_rank(values, 0.5) <= nearest_rank(values, 0.9)


def test_a_refused_o_direct_method_is_reported_and_leaves_nothing_open(tmp_path, monkeypatch):
    real_open = os.open

    def refusing_open(path, flags, *args, **kwargs):
        if flags & os.O_DIRECT:
            raise OSError(errno.EINVAL, "Invalid argument", path)
        return real_open(path, flags, *args, **kwargs)

    table = dict(fsync_cost.methods(str(tmp_path), 3, 2))
    monkeypatch.setattr(fsync_cost.os, "open", refusing_open)
    fds_before = len(os.listdir("/proc/self/fd"))
    for name in ("overwrite 4 KiB, O_DIRECT+O_DSYNC", "unwritten 4 KiB, O_DIRECT+O_DSYNC",
                 "O_DIRECT+O_DSYNC + leveldb sync=False, 2 records"):
        with pytest.raises(OSError) as refused:
            table[name]()
        assert refused.value.errno == errno.EINVAL
        # Counted while the refusal, its traceback and their frames live:
        # what the set-up opened is closed by it, not by the frames' end.
        assert len(os.listdir("/proc/self/fd")) == fds_before, f"{name} left a descriptor open"
        del refused
        assert fsync_cost.measure(table[name], 3, 0.0) is None, name
        assert fsync_cost.row(name, [None, None]) == \
            f"| {name} | not supported by this file system | | | |"
    assert fsync_cost.measure(table["append 4 KiB + fdatasync"], 3, 0.0) is not None
