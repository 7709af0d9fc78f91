"""A/B of two AccMan revisions under the same HTTP load, minutes apart.

    .venv/bin/python bench/ab.py HEAD~1 HEAD                  # durable /mod, 64 connections
    .venv/bin/python bench/ab.py --route tot --conns 16 main WORKTREE
    .venv/bin/python bench/ab.py --route mod_pipelined main WORKTREE
    .venv/bin/python bench/ab.py --b-args=--compaction-nice=19 HEAD HEAD   # a flag's worth

On this shared machine one figure moves by 5-20 % from minute to minute, so a
change is judged by alternating the two revisions, round after round, and
comparing them round by round, never by one run of each.  Each revision is
checked out into a temporary directory and its Cython modules built there
(WORKTREE means this checkout as it is, uncommitted changes included); each
round starts each server afresh, pinned to CPU 0 like bench/load.py (whose
harness this reuses), funds the same accounts, warms it up, and drives it
from CPU 1 with wrk.

For each run it prints req/s, p50/p99, the CPU each server thread spent per
request (from /proc) and, for /mod, the mods per batch (from /metrics); then
each revision's median and B's median over A's.  Figures, never assertions.
"""

import argparse
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

from harness import base, plan, report
from harness.cpu import CLK_TCK, thread_cpu_ticks
from harness.profile import COMMIT_COUNTERS
from harness.runners import fund_accounts, metrics_counters, run_wrk
from harness.servers import AccManServer

ROUTES = {
    # route: (wrk script, its arguments, accounts funded first)
    "mod": ("mod_cycle.lua", [plan.CYCLE_PREFIX, plan.CYCLE_CREDS], plan.CYCLE_CREDS),
    "mod_pipelined": ("mod_pipeline.lua",
                      [plan.CYCLE_PREFIX, plan.CYCLE_CREDS, plan.PIPELINE_DEPTH],
                      plan.CYCLE_CREDS),
    "mod_pipelined_random": ("mod_pipeline_random.lua",
                             [plan.CYCLE_PREFIX, plan.CYCLE_CREDS, plan.PIPELINE_DEPTH],
                             plan.CYCLE_CREDS),
    "mod_paced": ("mod_paced.lua", [plan.CYCLE_PREFIX, plan.CYCLE_CREDS, plan.PACE_MEAN_MS],
                  plan.CYCLE_CREDS),
    "tot": ("tot.lua", [plan.TOT_CRED], 1),
    "tot_pipelined": ("tot_pipeline.lua", [plan.TOT_CRED, plan.PIPELINE_DEPTH], 1),
}
WORKTREE = "WORKTREE"
BUILD_TIMEOUT_S = 600


def checkout(rev, into):
    """A built checkout of `rev` (WORKTREE: this one, as it is) under `into`."""
    if rev == WORKTREE:
        return base.REPO_DIR
    path = Path(into) / rev.replace("/", "_").replace("~", "-")
    subprocess.run(["git", "clone", "--quiet", "--no-checkout", str(base.REPO_DIR), str(path)],
                   check=True)
    subprocess.run(["git", "-C", str(path), "checkout", "--quiet", rev], check=True)
    out = subprocess.run([base.PYTHON, "setup.py", "build_ext", "--inplace"], cwd=path,
                         capture_output=True, text=True, timeout=BUILD_TIMEOUT_S)
    if out.returncode != 0:
        raise base.BenchError(f"building {rev} failed: {out.stderr.strip()[-300:]}")
    return path


def one_run(repo, workdir, route, conns, duration_s, server_args=()):
    script, args, accounts = ROUTES[route]
    with AccManServer(workdir, repo=repo, args=server_args) as server:
        fund_accounts(server.port, plan.CYCLE_PREFIX, accounts, plan.FUND_BY)
        run_wrk(server.url, script, args, conns, plan.WARMUP_S)
        before = thread_cpu_ticks(server.pid), metrics_counters(server.port, COMMIT_COUNTERS)
        row = run_wrk(server.url, script, args, conns, duration_s, pgid=server.pid)
        after = thread_cpu_ticks(server.pid), metrics_counters(server.port, COMMIT_COUNTERS)
    n = max(row["requests"] or 0, 1)
    threads = sorted(((after[0][t] - before[0].get(t, 0)) / CLK_TCK / n * 1e6
                      for t in after[0]), reverse=True)
    row["cpu_us_by_thread"] = [round(us, 1) for us in threads if us >= 0.05]
    batches, mods = (after[1].get(name, 0) - before[1].get(name, 0)
                     for name in COMMIT_COUNTERS[:2])
    row["mods_per_batch"] = mods / batches if batches else None
    return row


def describe(label, row):
    per_batch = (f"  mods/batch {row['mods_per_batch']:.1f}"
                 if row["mods_per_batch"] is not None else "")
    cpu = " + ".join(f"{us:.1f}" for us in row["cpu_us_by_thread"])
    return (f"{label}  {row['rps']:>10,.0f} req/s  p50 {report.fmt_us(row['p50_us']):>8}  "
            f"p99 {report.fmt_us(row['p99_us']):>8}  max {report.fmt_us(row['max_us']):>8}  "
            f"CPU/request {cpu} µs{per_batch}"
            f"  non-2xx {row['non_2xx']}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("a", help="revision A (git rev, or WORKTREE)")
    ap.add_argument("b", help="revision B (git rev, or WORKTREE)")
    ap.add_argument("--route", choices=sorted(ROUTES), default="mod")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=int, default=plan.DURATION_S, help="seconds per run")
    ap.add_argument("--b-args", default="", metavar="FLAGS",
                    help="more flags of `accman serve` for B, split at spaces")
    opts = ap.parse_args(argv)
    server_args = {"A": [], "B": opts.b_args.split()}
    with tempfile.TemporaryDirectory(prefix="accman-ab-") as tmp:
        repos = {"A": checkout(opts.a, tmp)}
        repos["B"] = repos["A"] if opts.b == opts.a else checkout(opts.b, tmp)
        print(f"A = {opts.a}, B = {opts.b} {opts.b_args}: {opts.route} at {opts.conns} "
              f"connections, "
              f"{opts.rounds} rounds of {opts.duration:g} s, alternating", flush=True)
        rps = {"A": [], "B": []}
        for i in range(opts.rounds):
            # Alternate which goes first, so that neither always follows the other.
            for label in ("A", "B") if i % 2 == 0 else ("B", "A"):
                row = one_run(repos[label], tmp, opts.route, opts.conns, opts.duration,
                              server_args[label])
                rps[label].append(row["rps"])
                print(f"round {i + 1}  " + describe(label, row), flush=True)
        med = {k: statistics.median(v) for k, v in rps.items()}
        ahead = sum(b > a for a, b in zip(rps["A"], rps["B"], strict=True))
        print(f"median req/s: A {med['A']:,.0f}, B {med['B']:,.0f}; "
              f"B/A {med['B'] / med['A']:.2f}x; B ahead in {ahead} of {opts.rounds} rounds")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except base.BenchError as e:
        print(f"ab: {e}", file=sys.stderr)
        sys.exit(1)
