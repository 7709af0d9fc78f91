"""What every part of the load benchmark shares: where things are, which CPU
runs what, the one error a part raises when a server or tool cannot run,
and how a quantile is taken."""

import math
import shutil
import sys
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent.parent
REPO_DIR = BENCH_DIR.parent
WRK_DIR = BENCH_DIR / "wrk"
RESULTS_DIR = BENCH_DIR / "results"
PYTHON = sys.executable

HOST = "127.0.0.1"                # every server listens here, and only here
SERVER_CPU = "0"                  # the server under test, and all its threads
LOAD_CPU = "1"                    # wrk / redis-benchmark (and the profilers)

START_TIMEOUT_S = 30              # a server not ready by then is reported, not waited for
STOP_TIMEOUT_S = 15               # SIGTERM, then SIGKILL
RUN_SLACK_S = 30                  # a load run that overruns its duration by this is killed
SEED_TIMEOUT_S = 60               # funding the accounts of one server

# What to install when a tool is missing (Debian package names).
INSTALL_HINTS = {
    "wrk": "apt-get install -y wrk",
    "nginx": "apt-get install -y nginx",
    "redis-server": "apt-get install -y redis-server",
    "redis-benchmark": "apt-get install -y redis-server (it ships redis-benchmark)",
    "taskset": "apt-get install -y util-linux",
    "perf": "apt-get install -y linux-perf",
    "py-spy": ".venv/bin/pip install py-spy (the bench extra)",
}


class BenchError(Exception):
    """A server or a tool could not be run; the message is one line."""


def which(tool):
    """The tool's path, on PATH or in /usr/sbin (where Debian puts nginx and
    which a non-root PATH lacks); None if it is not installed."""
    return shutil.which(tool) or shutil.which(tool, path="/usr/sbin:/sbin")


def missing(tool):
    """The one-line message for a tool that is not installed."""
    return f"{tool} is not installed ({INSTALL_HINTS.get(tool, 'see bench/README.md')})"


def pinned(cpu, argv):
    return ["taskset", "-c", cpu, *argv]


def nearest_rank(ordered, q):
    """The q-quantile of sorted values by nearest rank: the smallest value
    with at least q of them at or below it (so never a lower value for a
    higher q)."""
    assert ordered and 0 < q <= 1
    return ordered[max(0, math.ceil(q * len(ordered)) - 1)]
