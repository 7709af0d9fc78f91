"""AccMan on PostgreSQL over HTTP, against pgbench in the same run (issue 15).

    .venv/bin/python bench/pg_http.py [--seconds 5] [--rounds 3] [--save]

A PostgreSQL cluster of this machine's Debian binaries
(tests/postgres/pgcluster.py: fsync=on, synchronous_commit=on, no standby),
pgbench's tables at scale 10 (1M accounts) in one database, an AccMan store
of ACCOUNTS funded accounts in another, and AccMan front-ends (`accman serve
--store URL`, subprocesses spoken to over HTTP only) under wrk.  In each
round every figure runs once, in this order, so that the two sides of each
ratio are seconds apart:

    pgbench_update  pgbench -c64 -j2 -M prepared: one-row UPDATE ... RETURNING
                    of a random aid, one commit per transaction
    mod_1fe         wrk -t1 -c64: PATCH /mod by=-1&min=0 of a random funded
                    account, one front-end (AccMan batches many per commit)
    pgbench_select  pgbench -S -c64 -j2 -M prepared
    tot_1fe         wrk -t1 -c64: GET /tot of a random funded account
    mod_2fe         two front-ends on the one cluster, wrk -c64 on each
    mod_2fe_2c      two front-ends on a store of two clusters (the second on
                    this machine too), wrk -c64 on each

Nothing is pinned: either side has the whole machine, PostgreSQL on both
cores.  The ratios are mod_1fe / pgbench_update (issue 15's target: at least
2x) and tot_1fe / pgbench_select (at least 0.8x), per round and their
medians.  Each figure records the CPU (in cores) that the load generator,
the front-ends, PostgreSQL and everything else on the shared machine used
during it: "others" is the noise of the other tenants.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import resource
import socket
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH = Path(__file__).resolve().parent
sys.path.insert(0, str(BENCH.parent / "tests"))
sys.path.insert(0, str(BENCH.parent))

from harness.base import PYTHON, REPO_DIR, RESULTS_DIR, WRK_DIR, BenchError  # noqa: E402
from harness.cpu import CLK_TCK, busy_ticks, proc_cpu_ticks  # noqa: E402
from harness.runners import parse_wrk  # noqa: E402
from harness.servers import Proc  # noqa: E402
from postgres.pgcluster import PG_USER, Cluster, pg_bin  # noqa: E402

CONNS = 64
ACCOUNTS = 100_000
FUND_BY = 1_000_000_000_000
PREFIX = "bench-"
PGBENCH_SCALE = 10
UPDATE_SQL = """\\set aid random(1, 1000000)
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid RETURNING abalance;
"""
START_TIMEOUT_S = 60
RUN_SLACK_S = 60
FUND_PIPELINE = 64           # PIPELINE_REQUESTS_MAX: the server takes no more per connection
FUND_CONNECTIONS = 8
READY_RE = re.compile(r"accman: serving http://127\.0\.0\.1:(\d+) ")
FIGURES = ("pgbench_update", "mod_1fe", "pgbench_select", "tot_1fe", "mod_2fe", "mod_2fe_2c")


# --- the front-ends --------------------------------------------------------------

class FrontEnd:
    """`accman serve --store URL...` in a process group of its own."""

    def __init__(self, urls, workdir):
        self.workdir = Path(tempfile.mkdtemp(prefix="fe-", dir=workdir))
        argv = [PYTHON, "-m", "accman", "serve", "--host", "127.0.0.1", "--port", "0",
                "--data", str(self.workdir / "data")]
        for u in urls:
            argv += ["--store", u]
        env = dict(os.environ, PYTHONPATH=str(REPO_DIR))
        self.proc = Proc(argv, log_path=self.workdir / "server.log", stdout_pipe=True,
                         cwd=REPO_DIR, env=env)
        line = self.proc.popen.stdout.readline().decode(errors="replace")
        m = READY_RE.match(line)
        if m is None:
            self.proc.stop()
            raise BenchError(f"accman did not start: {line.strip()} {self.proc.log_tail()}")
        self.port = int(m.group(1))
        # Keep draining stdout so that the server never blocks on a full pipe.
        threading.Thread(target=self.proc.popen.stdout.read, daemon=True).start()

    @property
    def url(self):
        return f"http://127.0.0.1:{self.port}"

    def stop(self):
        self.proc.stop()


def fund(port, first, count):
    """Funds PREFIX{first} .. PREFIX{first+count-1}, pipelined over a few
    connections; every reply must be a 200."""
    def worker(ids):
        with socket.create_connection(("127.0.0.1", port), timeout=60) as s:
            buf = b""
            for at in range(0, len(ids), FUND_PIPELINE):
                chunk = ids[at:at + FUND_PIPELINE]
                s.sendall(b"".join(b"PATCH /mod?cred=%s%d&by=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"
                                   % (PREFIX.encode(), i, FUND_BY) for i in chunk))
                for _ in chunk:
                    while b"\r\n\r\n" not in buf:
                        buf += s.recv(65536)
                    head, _, buf = buf.partition(b"\r\n\r\n")
                    if not head.startswith(b"HTTP/1.1 200"):
                        raise BenchError(f"funding: {head[:80]!r}")
                    length = int(re.search(rb"Content-Length: (\d+)", head).group(1))
                    while len(buf) < length:
                        buf += s.recv(65536)
                    buf = buf[length:]
    ids = list(range(first, first + count))
    threads = [threading.Thread(target=worker, args=(ids[n::FUND_CONNECTIONS],))
               for n in range(FUND_CONNECTIONS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


# --- CPU, in cores, by who used it ----------------------------------------------------

def postgres_ticks(clusters):
    """CPU ticks of the clusters' postmasters and their backends, those that
    exited included (the postmaster's cutime and cstime: pgbench's backends
    end with its run)."""
    roots = {c.pid for c in clusters if c.pid}
    total = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        if int(entry) in roots:
            total += sum(int(x) for x in fields[11:15])
        elif int(fields[1]) in roots:
            total += int(fields[11]) + int(fields[12])
    return total


class CpuMeter:
    def __init__(self, front_ends, clusters):
        self.front_ends = front_ends
        self.clusters = clusters

    def _sample(self):
        fe = kernel = 0
        for f in self.front_ends:
            group, kernel = proc_cpu_ticks(f.proc.pid)
            fe += group
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return (time.monotonic(), fe, postgres_ticks(self.clusters), kernel,
                ru.ru_utime + ru.ru_stime, busy_ticks())

    def __enter__(self):
        self.t0 = self._sample()
        return self

    def __exit__(self, *exc):
        t1 = self._sample()
        wall = t1[0] - self.t0[0]
        fe = (t1[1] - self.t0[1]) / CLK_TCK / wall
        pg = (t1[2] - self.t0[2]) / CLK_TCK / wall
        load = (t1[4] - self.t0[4]) / wall
        busy = (t1[5] - self.t0[5] - (t1[3] - self.t0[3])) / CLK_TCK / wall
        self.cpu = {"load_cpu": round(load, 2), "frontends_cpu": round(fe, 2),
                    "postgres_cpu": round(pg, 2),
                    "others_cpu": round(max(0.0, busy - fe - pg - load), 2)}
        return False


# --- the load -------------------------------------------------------------------------

def wrk(front_ends, script, seconds, meter):
    """wrk -t1 -c64 on each front-end at once; the summed row."""
    procs = []
    with meter:
        for n, f in enumerate(front_ends):
            argv = ["wrk", "-t1", f"-c{CONNS}", f"-d{seconds:g}s", "--latency", "-s",
                    str(WRK_DIR / script), f.url, "--", PREFIX, str(ACCOUNTS), str(n + 1)]
            procs.append(subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                          text=True))
        outs = [p.communicate(timeout=seconds + RUN_SLACK_S) for p in procs]
    rows = []
    for p, (out, err) in zip(procs, outs, strict=True):
        if p.returncode != 0:
            raise BenchError(f"wrk exited {p.returncode}: {err.strip()[-200:]}")
        rows.append(parse_wrk(out))
    bad = sum(r["non_2xx"] + r["socket_errors"] for r in rows)
    return {"rate": sum(r["rps"] for r in rows), "p50_us": max(r["p50_us"] or 0 for r in rows),
            "p99_us": max(r["p99_us"] or 0 for r in rows), "errors": bad, **meter.cpu}


def pgbench(pg, args, seconds, meter):
    argv = [str(pg_bin() / "pgbench"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", PG_USER,
            "-M", "prepared", "-c", str(CONNS), "-j", "2", "-T", str(int(seconds)), "-n",
            *args, "bench"]
    with meter:
        out = subprocess.run(argv, check=True, capture_output=True, text=True,
                             timeout=seconds + RUN_SLACK_S).stdout
    tps = float(re.search(r"tps = ([\d.]+) \(without", out).group(1))
    lat = re.search(r"latency average = ([\d.]+) ms", out)
    return {"rate": tps, "mean_us": float(lat.group(1)) * 1000 if lat else None, **meter.cpu}


def batch_sizes(front_ends):
    """Mods per batch so far, from each front-end's /metrics."""
    out = []
    for f in front_ends:
        with socket.create_connection(("127.0.0.1", f.port), timeout=10) as s:
            s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
            text = b""
            while chunk := s.recv(65536):
                text += chunk
        m = dict(re.findall(rb"(?m)^(accman_batches_total|accman_mods_committed_total) (\S+)$",
                            text))
        batches = float(m.get(b"accman_batches_total", 0))
        out.append(round(float(m.get(b"accman_mods_committed_total", 0)) / batches, 1)
                   if batches else None)
    return out


# --- the run ---------------------------------------------------------------------------

def run(seconds, rounds, workdir):
    with Cluster.create("bench1") as pg1, Cluster.create("bench2") as pg2:
        pg1.create_database("bench")
        subprocess.run([str(pg_bin() / "pgbench"), "-i", "-q", "-s", str(PGBENCH_SCALE),
                        "-h", "127.0.0.1", "-p", str(pg1.port), "-U", PG_USER, "bench"],
                       check=True, capture_output=True)
        script = Path(workdir) / "update.sql"
        script.write_text(UPDATE_SQL)
        one = [pg1.create_database("accman")]
        two = [pg1.create_database("accman2"), pg2.create_database("accman2")]
        fes1 = [FrontEnd(one, workdir), FrontEnd(one, workdir)]
        fes2 = [FrontEnd(two, workdir), FrontEnd(two, workdir)]
        try:
            fund(fes1[0].port, 0, ACCOUNTS)
            fund(fes2[0].port, 0, ACCOUNTS)
            for c, db in ((pg1, "bench"), (pg1, "accman"), (pg1, "accman2"), (pg2, "accman2")):
                c.psql("VACUUM ANALYZE", db)
            pg1.psql("CHECKPOINT")
            pg2.psql("CHECKPOINT")
            clusters = [pg1, pg2]
            runs = {
                "pgbench_update": lambda m: pgbench(pg1, ["-f", str(script)], seconds, m),
                "mod_1fe": lambda m: wrk(fes1[:1], "mod_random.lua", seconds, m),
                "pgbench_select": lambda m: pgbench(pg1, ["-S"], seconds, m),
                "tot_1fe": lambda m: wrk(fes1[:1], "tot_random.lua", seconds, m),
                "mod_2fe": lambda m: wrk(fes1, "mod_random.lua", seconds, m),
                "mod_2fe_2c": lambda m: wrk(fes2, "mod_random.lua", seconds, m),
            }
            fes_of = {"mod_2fe": fes1, "mod_2fe_2c": fes2}
            results = {name: [] for name in FIGURES}
            for r in range(rounds):
                for name in FIGURES:
                    meter = CpuMeter(fes_of.get(name, fes1[:1]), clusters)
                    row = runs[name](meter)
                    results[name].append(row)
                    print(f"round {r + 1} {name:15} {row['rate']:>10,.0f}/s  "
                          f"cpu load {row['load_cpu']} fe {row['frontends_cpu']} "
                          f"pg {row['postgres_cpu']} others {row['others_cpu']}", flush=True)
            mods_per_batch = batch_sizes(fes1 + fes2)
        finally:
            for f in fes1 + fes2:
                f.stop()
    return summarise(results, seconds, mods_per_batch)


def summarise(results, seconds, mods_per_batch):
    def ratios(a, b):
        return [round(x["rate"] / y["rate"], 2)
                for x, y in zip(results[a], results[b], strict=True)]
    out = {"seconds": seconds, "connections": CONNS, "accounts": ACCOUNTS,
           "rounds": results,
           "median": {k: round(statistics.median(r["rate"] for r in v)) for k, v in
                      results.items()},
           "mod_vs_pgbench_update": ratios("mod_1fe", "pgbench_update"),
           "tot_vs_pgbench_select": ratios("tot_1fe", "pgbench_select"),
           "mods_per_batch_so_far": mods_per_batch}
    out["mod_vs_pgbench_update_median"] = statistics.median(out["mod_vs_pgbench_update"])
    out["tot_vs_pgbench_select_median"] = statistics.median(out["tot_vs_pgbench_select"])
    return out


def markdown(res) -> str:
    lines = [f"{res['connections']} connections / clients, {res['seconds']:g} s a figure, "
             f"{len(res['rounds']['mod_1fe'])} rounds; CPU in cores during each figure.", "",
             "| figure | median /s | rounds /s | load CPU | front-ends CPU | PostgreSQL CPU "
             "| others CPU |", "|---|---:|---|---:|---:|---:|---:|"]
    for name in FIGURES:
        rows = res["rounds"][name]
        each = ", ".join(f"{r['rate']:,.0f}" for r in rows)
        cpu = [statistics.median(r[k] for r in rows)
               for k in ("load_cpu", "frontends_cpu", "postgres_cpu", "others_cpu")]
        lines.append(f"| {name} | {res['median'][name]:,} | {each} | "
                     + " | ".join(f"{c:.2f}" for c in cpu) + " |")
    lines += ["", f"mod_1fe / pgbench_update: {res['mod_vs_pgbench_update']} "
              f"(median {res['mod_vs_pgbench_update_median']:.2f}; target >= 2)",
              f"tot_1fe / pgbench_select: {res['tot_vs_pgbench_select']} "
              f"(median {res['tot_vs_pgbench_select_median']:.2f}; target >= 0.8)",
              f"mods per batch, over the whole run, per front-end: "
              f"{res['mods_per_batch_so_far']}", ""]
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--seconds", type=float, default=5.0)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--save", action="store_true",
                    help="write bench/results/pg_http.json and pg_http.md")
    args = ap.parse_args()
    for tool in ("wrk",):
        if subprocess.run(["which", tool], capture_output=True).returncode != 0:
            sys.exit(f"{tool} is not installed (apt-get install -y {tool})")
    with tempfile.TemporaryDirectory(prefix="accman-pg-http-") as workdir:
        os.chmod(workdir, 0o755)
        res = run(args.seconds, args.rounds, workdir)
    text = markdown(res)
    print(text)
    if args.save:
        RESULTS_DIR.mkdir(exist_ok=True)
        (RESULTS_DIR / "pg_http.json").write_text(json.dumps(res, indent=2) + "\n")
        (RESULTS_DIR / "pg_http.md").write_text(text)


if __name__ == "__main__":
    main()
