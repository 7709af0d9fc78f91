"""AccMan profiled under load: /tot and durable /mod at 64 connections, each
three times: bare (CPU per request by thread from /proc, and the group
commit's counters from /metrics), under `py-spy record --nonblocking`
(Python frames) and under `perf record -g` (every thread, native and kernel
frames), the profilers pinned to the load CPU.  Plus LevelDB's synced write
of AccMan's batch shape, timed alone on the server's CPU.  Writes the raw
profiles and summary.{json,md}."""

import collections
import json
import os
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

from . import plan
from .base import LOAD_CPU, PYTHON, RUN_SLACK_S, SERVER_CPU, pinned
from .cpu import CLK_TCK, thread_cpu_ticks
from .report import fmt_row
from .runners import metrics_counters, run_wrk
from .servers import AccManServer

PROFILE_CONNECTIONS = 64
PYSPY_RATE_HZ = 1000
PERF_RATE_HZ = 999
COMMIT_COUNTERS = ("accman_batches_total", "accman_mods_committed_total",
                   "accman_fsync_seconds_total")
CASES = (("tot", "tot.lua", [plan.TOT_CRED]),
         ("mod", "mod_cycle.lua", [plan.CYCLE_PREFIX, plan.CYCLE_CREDS]))

# A LevelDB synced write of the shape AccMan's group commit makes (one put
# per mod without a key: its history record), timed alone on the server's
# CPU: the floor under one commit cycle on this disk.
STORE_PROBE = r"""
import json, os, sys, time, plyvel
db = plyvel.DB(sys.argv[1], create_if_missing=True, write_buffer_size=16 << 20)
out = {}
for nmods in (1, 16, 32, 64, 256):
    times = []
    for _ in range(200):
        wb = db.write_batch(sync=True)
        for _ in range(nmods):
            wb.put(b"h" + os.urandom(24), os.urandom(25))
        t0 = time.perf_counter()
        wb.write()
        times.append(time.perf_counter() - t0)
    times.sort()
    out[nmods] = {"p50_us": round(times[100] * 1e6), "p90_us": round(times[180] * 1e6)}
fd = os.open(os.path.join(sys.argv[1], "raw"), os.O_WRONLY | os.O_CREAT | os.O_APPEND)
times = []
for _ in range(200):
    os.write(fd, b"x" * 4096)
    t0 = time.perf_counter()
    os.fdatasync(fd)
    times.append(time.perf_counter() - t0)
times.sort()
out["fdatasync_4k"] = {"p50_us": round(times[100] * 1e6), "p90_us": round(times[180] * 1e6)}
print(json.dumps(out))
"""


def thread_names(pyspy, pid):
    """{tid: Python thread name} from `py-spy dump`; {} when unavailable."""
    names = {}
    if pyspy is None:
        return names
    try:
        out = subprocess.run([pyspy, "dump", "--pid", str(pid)], capture_output=True,
                             text=True, timeout=30).stdout
    except (OSError, subprocess.TimeoutExpired):
        return names
    for m in re.finditer(r'^Thread (0x[0-9A-Fa-f]+|\d+) \([^)]*\): "([^"]*)"', out, re.M):
        tid = m.group(1)
        names[int(tid, 16) if tid.startswith("0x") else int(tid)] = m.group(2)
    return names


def label_thread(tid, pid, names):
    if tid in names:
        return names[tid]
    if tid == pid:
        return "MainThread"
    return f"native thread {tid}"


def perf_report(data, sort, limit_pct):
    """[(percent, key columns...)] of `perf report --sort SORT`."""
    out = subprocess.run(
        ["perf", "report", "-i", str(data), "--stdio", "--no-children", "--sort", sort,
         "-g", "none", "--percent-limit", str(limit_pct)],
        capture_output=True, text=True, timeout=120).stdout
    rows = []
    for line in out.splitlines():
        m = re.match(r"^\s*([\d.]+)%\s+(.*?)\s*$", line)
        if m and not line.lstrip().startswith("#"):
            rows.append((float(m.group(1)), m.group(2)))
    return rows


def commit_summary(before, after, duration_s):
    """What the group commit did between two /metrics readings."""
    def delta(name):
        return after.get(name, 0) - before.get(name, 0)
    batches, mods = delta(COMMIT_COUNTERS[0]), delta(COMMIT_COUNTERS[1])
    write_s = delta(COMMIT_COUNTERS[2])
    if not batches:
        return None
    return {"batches": int(batches), "mods": int(mods),
            "mods_per_batch": round(mods / batches, 1),
            "batch_write_us": round(write_s / batches * 1e6),
            "cycle_us": round(duration_s / batches * 1e6),
            "writer_busy": round(write_s / duration_s, 2)}


def stop_profiler(prof, timeout_s):
    """Wait for a profiler that ends by itself; kill its group if it overruns."""
    try:
        return prof.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        os.killpg(prof.pid, signal.SIGKILL)
        return prof.communicate()


class Profiler:
    """One AccMan server profiled case by case; `entry` collects a case's figures."""

    def __init__(self, server, duration_s, out_dir):
        self.server, self.pid = server, server.pid
        self.duration_s, self.out_dir = duration_s, out_dir
        pyspy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
        self.pyspy = pyspy if os.path.exists(pyspy) else None
        self.have_perf = shutil.which("perf") is not None
        self.names = thread_names(self.pyspy, self.pid)

    def load(self, script, args):
        return run_wrk(self.server.url, script, args, PROFILE_CONNECTIONS, self.duration_s,
                       self.pid)

    def bare(self, label, script, args):
        """Where the CPU goes by thread, and what the commits did."""
        entry = {}
        t0, m0 = thread_cpu_ticks(self.pid), metrics_counters(self.server.port, COMMIT_COUNTERS)
        row = self.load(script, args)
        t1, m1 = thread_cpu_ticks(self.pid), metrics_counters(self.server.port, COMMIT_COUNTERS)
        entry["bare"] = fmt_row(row)
        entry["rps"] = row["rps"]
        per_thread = collections.Counter()
        for tid, ticks in t1.items():
            per_thread[label_thread(tid, self.pid, self.names)] += ticks - t0.get(tid, 0)
        requests = max(row["requests"] or 0, 1)
        entry["thread_cpu_us_per_request"] = {
            k: round(v / CLK_TCK / requests * 1e6, 2) for k, v in per_thread.most_common() if v}
        commit = commit_summary(m0, m1, self.duration_s) if label == "mod" else None
        if commit:
            entry["commit"] = commit
        return entry

    def under_pyspy(self, label, script, args, entry):
        raw = self.out_dir / f"pyspy-{label}.txt"
        argv = pinned(LOAD_CPU, [self.pyspy, "record", "--pid", str(self.pid),
                                 "--duration", str(self.duration_s + 1),
                                 "--rate", str(PYSPY_RATE_HZ), "--nonblocking",
                                 "--threads", "--format", "raw", "--output", str(raw)])
        prof = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                                start_new_session=True)
        time.sleep(0.5)
        entry["under_pyspy"] = fmt_row(self.load(script, args))
        _, err = stop_profiler(prof, self.duration_s + RUN_SLACK_S)
        if raw.exists():
            entry["pyspy"] = summarise_collapsed(raw.read_text())
        else:
            entry["pyspy_error"] = err.decode(errors="replace").strip()[-300:]

    def under_perf(self, label, script, args, entry):
        data = self.out_dir / f"perf-{label}.data"
        argv = pinned(LOAD_CPU, ["perf", "record", "-F", str(PERF_RATE_HZ), "-g",
                                 "-o", str(data), "-p", str(self.pid), "--", "sleep",
                                 str(self.duration_s)])
        prof = subprocess.Popen(argv, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                start_new_session=True)
        time.sleep(0.3)
        entry["under_perf"] = fmt_row(self.load(script, args))
        stop_profiler(prof, self.duration_s + RUN_SLACK_S)

        def relabel(key):
            m = re.match(r"(\d+):\S+\s+(.*)", key)
            if not m:
                return key
            return f"{label_thread(int(m.group(1)), self.pid, self.names)}  {m.group(2)}"
        entry["perf_by_dso"] = [(pct, relabel(k)) for pct, k in perf_report(data, "pid,dso", 0.3)]
        entry["perf_by_symbol"] = [(pct, relabel(k))
                                   for pct, k in perf_report(data, "pid,sym", 0.5)][:40]
        (self.out_dir / f"perf-{label}.txt").write_text(
            "\n".join(f"{pct:6.2f}%  {k}" for pct, k in
                      perf_report(data, "pid,dso,sym", 0.1)) + "\n")
        for junk in (data, Path(str(data) + ".old")):
            junk.unlink(missing_ok=True)

    def case(self, label, script, args):
        entry = self.bare(label, script, args)
        if self.pyspy:
            self.under_pyspy(label, script, args, entry)
        if self.have_perf:
            self.under_perf(label, script, args, entry)
        return entry


def store_probe(workdir):
    probe_dir = Path(tempfile.mkdtemp(prefix="store-probe-", dir=workdir))
    try:
        out = subprocess.run(pinned(SERVER_CPU, [PYTHON, "-c", STORE_PROBE, str(probe_dir)]),
                             capture_output=True, text=True, timeout=300)
        if out.returncode != 0:
            return {"error": out.stderr.strip()[-300:]}
        return json.loads(out.stdout)
    except (subprocess.TimeoutExpired, ValueError) as e:
        return {"error": str(e)}


def profile_accman(workdir, duration_s, out_dir, log, warmup_s):
    """Profile AccMan case by case; write the raw profiles and summary.{json,md}
    to `out_dir`; the summary."""
    out_dir.mkdir(parents=True, exist_ok=True)
    summary = {"duration_s": duration_s, "connections": PROFILE_CONNECTIONS, "cases": {}}
    with AccManServer(workdir) as server:
        plan.prepare_http(server, warmup_s)
        profiler = Profiler(server, duration_s, out_dir)
        if profiler.pyspy is None:
            log("  py-spy is not installed (.venv/bin/pip install py-spy): no Python frames")
        if not profiler.have_perf:
            log("  perf is not installed (apt-get install linux-perf): no native frames")
        for label, script, args in CASES:
            entry = summary["cases"][label] = profiler.case(label, script, args)
            log(f"  profiled {label}: {entry['bare']}")
    summary["store_probe"] = store_probe(workdir)
    log(f"  store probe: {summary['store_probe']}")
    (out_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (out_dir / "summary.md").write_text(profile_markdown(summary))
    return summary


def summarise_collapsed(text, top=20):
    """Shares of py-spy's collapsed stacks ("thread;frame;...;frame count"),
    in percent of all active samples: by thread, then for each thread by
    line (the innermost Python frame: the C code it calls counts there) and
    by function, inclusive."""
    threads = collections.Counter()
    self_line = collections.defaultdict(collections.Counter)
    incl_fn = collections.defaultdict(collections.Counter)
    total = 0
    for line in text.splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        thread, *frames = stack.split(";")
        thread = re.sub(r"^thread \(\w+\): ", "", thread)
        threads[thread] += n
        if frames:
            self_line[thread][frames[-1]] += n
        for f in {_function(f) for f in frames}:
            incl_fn[thread][f] += n
    if not total:
        return {}

    def share(counter):
        return [(round(100 * v / total, 1), k) for k, v in counter.most_common(top)]
    return {"samples": total, "threads": share(threads),
            "self_by_line": {t: share(c) for t, c in self_line.items()},
            "inclusive_by_function": {t: share(c) for t, c in incl_fn.items()}}


def _function(frame):
    """'f (file.py:12)' -> 'f (file.py)'."""
    return re.sub(r":\d+\)$", ")", frame)


def _perf_lines(e):
    lines = ["", "perf, share of the process's CPU samples by thread and library:", "", "```"]
    lines += [f"{pct:6.2f}%  {k}" for pct, k in e["perf_by_dso"]] + ["```"]
    lines += ["", "perf, by symbol:", "", "```"]
    return lines + [f"{pct:6.2f}%  {k}" for pct, k in e["perf_by_symbol"][:25]] + ["```"]


def _pyspy_lines(p):
    lines = ["", f"py-spy ({p['samples']} samples of active threads), by thread: "
             + ", ".join(f"{k} {v}%" for v, k in p["threads"]), "", "```"]
    for _, thread in p["threads"]:
        lines += [f"{thread}: self, by line (C code called from a line counts there):"]
        lines += [f"{v:5.1f}%  {k}" for v, k in p["self_by_line"].get(thread, [])[:15]]
        lines += [f"{thread}: inclusive, by function:"]
        lines += [f"{v:5.1f}%  {k}" for v, k in p["inclusive_by_function"].get(thread, [])[:15]]
    return lines + ["```"]


def profile_markdown(summary):
    lines = [f"# AccMan profile: {summary['connections']} connections, "
             f"{summary['duration_s']} s per pass", ""]
    for label, e in summary["cases"].items():
        lines += [f"## {label}", "", f"- bare: {e['bare']}"]
        lines += [f"- {k.replace('_', ' ')}: {e[k]}" for k in ("under_pyspy", "under_perf")
                  if k in e]
        lines.append("- CPU per request by thread (µs): " + ", ".join(
            f"{k} {v}" for k, v in e["thread_cpu_us_per_request"].items()))
        if "commit" in e:
            lines.append("- group commit: " + ", ".join(
                f"{k} {v}" for k, v in e["commit"].items()))
        if "perf_by_dso" in e:
            lines += _perf_lines(e)
        if e.get("pyspy"):
            lines += _pyspy_lines(e["pyspy"])
        lines.append("")
    lines += ["## LevelDB sync write alone (µs, median / p90, by mods per batch)", "", "```",
              json.dumps(summary.get("store_probe"), indent=1), "```", ""]
    return "\n".join(lines)

