"""HTTP load benchmark: AccMan against the stacks it replaces, in one run.

    python bench/load.py [--quick] [--only accman,redis,sketch,nginx,uvicorn]
                         [--duration S] [--rounds N] [--profile | --profile-only]
                         [--save | --no-save] [--quiet-budget S]

Every server is started here (bench/harness/servers.py), pinned to CPU 0, on
a free loopback port and a fresh temporary directory, and driven from CPU 1
by `wrk -t1` or `redis-benchmark`: /tot at 1, 16 and 64 connections, /tot
pipelined x16, durable /mod at 1, 16 and 64 connections, durable /mod
pipelined x16, and durable /mod opening a new account per request
(bench/harness/plan.py).  The peers, measured in the same run:

    redis    redis-server, appendonly yes + appendfsync always (GET, INCRBY)
    sketch   bench/plyvel_sketch.py: uvloop, a dict, one synced plyvel batch per batch
    nginx    a static 200: the ceiling of wrk and loopback TCP
    uvicorn  bench/baseline_app.py: uvicorn + starlette + plyvel, one synced write per mod

Each figure is taken in --rounds rounds (3), the servers alternating round by
round, and each server's median kept (bench/harness/measure.py).  It prints
the figures, AccMan's ratio to each peer, how busy each side's CPU was, and
issue 14's goals with met / not met: figures, never test assertions.  A full
run (no --quick, --only, --duration or --rounds) writes bench/results/load.md
and load.json; --profile writes bench/results/profile/ at the default
duration, else a temporary directory that it names.  --quick is the smoke
form: one round of 1 s per figure, no waiting for quiet, nothing written.

Every process it starts listens on 127.0.0.1 only, runs in its own process
group, and is stopped by that group's id on the way out; every run is
bounded in time.
"""

import argparse
import os
import shutil
import signal
import sys
import tempfile
import time
from pathlib import Path

from harness import base, measure, profile, report
from harness.cpu import QuietBudget
from harness.plan import DURATION_S, WARMUP_S

ROUNDS = 3                       # per figure, the servers alternating; the median is kept
QUICK_DURATION_S = 1
QUICK_ROUNDS = 1
QUIET_BUDGET_S = 300             # all the waits of one run for the CPUs to be quiet, at most

# The tools each server needs, besides taskset.
TOOLS = {"accman": ("wrk",), "sketch": ("wrk",), "uvicorn": ("wrk",),
         "nginx": ("wrk", "nginx"), "redis": ("redis-server", "redis-benchmark")}


def parse_args(argv):
    p = argparse.ArgumentParser(description="HTTP load benchmark of AccMan and its peers.")
    p.add_argument("--quick", action="store_true",
                   help=f"smoke form: {QUICK_ROUNDS} round of {QUICK_DURATION_S} s per figure, "
                        f"no waiting for quiet, nothing written")
    p.add_argument("--only", default=",".join(report.SERVERS),
                   help="comma-separated servers: " + ",".join(report.SERVERS))
    p.add_argument("--duration", type=int, default=None,
                   help=f"seconds per figure (default {DURATION_S})")
    p.add_argument("--rounds", type=int, default=None,
                   help=f"rounds per figure, the servers alternating (default {ROUNDS})")
    p.add_argument("--profile", action="store_true",
                   help="also profile AccMan (py-spy, perf) at 64 connections; "
                        "writes bench/results/profile/")
    p.add_argument("--profile-only", action="store_true",
                   help="only profile AccMan, measure nothing else")
    p.add_argument("--quiet-budget", type=float, default=None,
                   help=f"seconds, over the whole run, to wait for other processes to "
                        f"leave the CPUs (default {QUIET_BUDGET_S}, 0 with --quick)")
    save = p.add_mutually_exclusive_group()
    save.add_argument("--save", dest="save", action="store_true", default=None,
                      help="write bench/results/load.{md,json} (default: full runs only)")
    save.add_argument("--no-save", dest="save", action="store_false")
    args = p.parse_args(argv)
    args.only = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.profile_only:
        args.only, args.profile = [], True
    unknown = set(args.only) - set(report.SERVERS)
    if unknown:
        p.error(f"unknown server {sorted(unknown)[0]!r}; choose from {','.join(report.SERVERS)}")
    if (args.duration or 1) < 1 or (args.rounds or 1) < 1:
        p.error("--duration and --rounds are at least 1")
    if base.which("taskset") is None:
        p.error(base.missing("taskset"))
    if base.which("wrk") is None and (args.profile or set(args.only) - {"redis"}):
        p.error(base.missing("wrk"))
    # Only figures of record overwrite bench/results/: the whole table for
    # load.{md,json}, the default duration for the profile.
    timed_as_of_record = not (args.quick or args.duration or args.rounds)
    full = timed_as_of_record and set(args.only) == set(report.SERVERS)
    args.save_profile = timed_as_of_record if args.save is None else args.save
    args.save = full if args.save is None else args.save
    args.rounds = args.rounds or (QUICK_ROUNDS if args.quick else ROUNDS)
    args.duration = args.duration or (QUICK_DURATION_S if args.quick else DURATION_S)
    if args.quiet_budget is None:
        args.quiet_budget = 0 if args.quick else QUIET_BUDGET_S
    return args


def missing_tools(names):
    """One line per tool that a named server needs and that is not installed."""
    tools = dict.fromkeys(t for n in names for t in TOOLS[n])
    return [base.missing(t) for t in tools if base.which(t) is None]


def run(args, log):
    """Measure (and profile); the results and the run's description."""
    workdir = tempfile.mkdtemp(prefix="accman-bench-")
    quiet = QuietBudget(args.quiet_budget)
    meta = {"duration_s": args.duration, "rounds": args.rounds, "quick": args.quick,
            "only": args.only, "machine": report.machine_info()}
    started = time.monotonic()
    results = {}
    try:
        if args.only:
            names = [s for s in report.SERVERS if s in args.only]
            results = measure.measure(names, workdir, args.duration, args.rounds, quiet, log,
                                      min(WARMUP_S, args.duration))
        if args.profile:
            log("profiling AccMan:")
            log(f"  CPUs {quiet.wait():.0%} busy before start")
            out_dir = base.RESULTS_DIR / "profile" if args.save_profile else Path(
                tempfile.mkdtemp(prefix="accman-profile-"))
            try:
                profile.profile_accman(workdir, args.duration, out_dir, log, WARMUP_S)
                log(f"profile: {out_dir}/summary.md")
            except base.BenchError as e:
                log(f"  not profiled: {e}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    meta["elapsed_s"] = round(time.monotonic() - started, 1)
    report.note_idle_after(meta["machine"])
    meta["goals"] = report.goals(results)
    return results, meta


def main(argv=None):
    args = parse_args(argv)
    if (os.cpu_count() or 1) < 2:
        print("warning: one CPU: server and load generator share it", file=sys.stderr)

    def on_signal(signum, frame):
        raise KeyboardInterrupt      # unwinds through the servers' __exit__
    signal.signal(signal.SIGTERM, on_signal)

    def log(msg):
        print(msg, flush=True)

    for line in missing_tools(args.only):
        log(f"not installed, its server is not measured: {line}")
    results, meta = run(args, log)
    if results:
        print()
        print(report.markdown(results, meta))
    if args.save and results:
        report.write_results(results, meta, base.RESULTS_DIR)
        print(f"written: {base.RESULTS_DIR / 'load.md'}, {base.RESULTS_DIR / 'load.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
