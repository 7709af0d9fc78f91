"""HTTP load benchmark: AccMan against the stacks it replaces, in one run.

    python bench/load.py [--quick] [--only accman,uvicorn,nginx,redis] [--duration S]
                         [--profile | --profile-only] [--save | --no-save] [--quiet-budget S]

Each server is started here, pinned to CPU 0 (`taskset -c 0`), on a free
loopback port and a fresh temporary data directory; the load generator runs
pinned to CPU 1 (`taskset -c 1 wrk -t1 -cN -dDs --latency`).  Measured, for
each server that has the route:

    /tot             GET, one funded credential, at 1, 16 and 64 connections
    /tot pipelined   16 requests per write (bench/wrk/tot_pipeline.lua), 16 and 64 connections
    /mod             durable PATCH `by=-1&min=0`, cycling over 1000 funded credentials,
                     at 1, 16 and 64 connections
    /mod new cred    durable PATCH `by=1`, a new credential every request, 64 connections

The peers, measured in the same run so that their ratios mean something:

    accman   `python -m accman serve` (group commit, its own synced log, LevelDB without sync)
    uvicorn  bench/baseline_app.py: uvicorn + starlette + plyvel, one sync write per mod
    nginx    a static 200 (bench/nginx.conf.template): the ceiling of wrk and loopback TCP
    redis    redis-benchmark GET / INCRBY against redis-server --appendfsync always
             (requests per write -P 1 and -P 16; runs are bounded by a request count sized
             from a short probe run)

It prints the figures, AccMan's ratio to each peer, how busy each side's CPU
was, and the targets of issue 3 with met / not met.  These are figures,
never test assertions.  A full run (no --only, --quick or --duration) writes
bench/results/load.md and load.json; --profile writes bench/results/profile/.

Every process it starts listens on 127.0.0.1 only, runs in its own process
group, and is stopped (SIGTERM, then SIGKILL) by that group's id on the way
out; every run is bounded in time.  The machine is shared: figures that other
processes disturbed are taken again after waiting for quiet, within a bounded
budget (bench/README.md, "A shared machine").
"""

import argparse
import collections
import contextlib
import datetime
import http.client
import json
import os
import platform
import queue
import re
import resource
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

BENCH_DIR = Path(__file__).resolve().parent
REPO_DIR = BENCH_DIR.parent
WRK_DIR = BENCH_DIR / "wrk"
RESULTS_DIR = BENCH_DIR / "results"
PYTHON = sys.executable

HOST = "127.0.0.1"
SERVER_CPU = "0"                 # the server under test, and all its threads
LOAD_CPU = "1"                   # wrk / redis-benchmark (and the profilers)

CONNECTIONS = (1, 16, 64)
PIPELINE_CONNECTIONS = (16, 64)
PIPELINE_DEPTH = 16
UNIQUE_CONNECTIONS = 64
CYCLE_CREDS = 1000               # /mod cycles over this many funded accounts
FUND_BY = 10 ** 12               # no charge of a run is refused for want of funds
TOT_CRED = "bench-0"             # the /tot credential: the first cycled account
CYCLE_PREFIX = "bench-"

DURATION_S = 5                   # per measured run
QUICK_DURATION_S = 2
WARMUP_S = 1                     # per server, not recorded
START_TIMEOUT_S = 30             # a server that is not ready by then is reported, not waited for
STOP_TIMEOUT_S = 15              # SIGTERM, then SIGKILL
RUN_SLACK_S = 30                 # a load run that overruns its duration by this is killed
SEED_TIMEOUT_S = 60

QUIET_WAIT_S = 60                # one wait for other load to leave the CPUs, at most
QUIET_BUDGET_S = 300             # all such waits of one run, at most
QUIET_BUSY_MAX = 0.15            # busy fraction of all CPUs that counts as quiet
OTHERS_CPU_MAX = 0.2             # CPUs used by other processes during a figure: disturbed
DISTURBED_RETRIES = 2
KEY_ROW = ("tot", 64)            # the row of the ratio targets ...
KEY_ROW_REPEATS = 3              # ... is taken this often, servers alternating; median kept

REDIS_PROBE = {1: 20_000, 16: 200_000}   # requests in the sizing probe, by -P

TARGETS = (
    # (name, scenario key, kind, required)
    ("/tot at 64 connections vs nginx static 200", ("tot", 64), "ratio_nginx", 0.85),
    ("/tot at 64 connections vs uvicorn baseline", ("tot", 64), "ratio_uvicorn", 5.0),
    ("durable /mod at 64 connections", ("mod", 64), "rps", 60_000),
    ("pipelined /tot (depth 16, 64 connections)", ("tot_pipelined", 64), "rps", 400_000),
    ("/tot p99 latency at 16 connections", ("tot", 16), "p99_max_us", 400),
)

SERVERS = ("accman", "uvicorn", "nginx", "redis")
SERVER_TITLES = {"accman": "AccMan", "uvicorn": "uvicorn+starlette+plyvel",
                 "nginx": "nginx static 200", "redis": "Redis (appendfsync always)"}
SCENARIO_TITLES = {
    "tot": "/tot", "tot_pipelined": "/tot pipelined x16",
    "mod": "/mod durable", "mod_unique": "/mod durable, new cred",
}


class BenchError(Exception):
    """A server or a tool could not be run; the message is one line."""


# --- processes -----------------------------------------------------------------

def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


class Proc:
    """A process started in its own group, stopped by that group's id."""

    def __init__(self, argv, *, log_path, stdout_pipe=False, cwd=None, env=None):
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log, start_new_session=True)
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def log_tail(self, lines=5):
        try:
            text = Path(self.log_path).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, sig=signal.SIGTERM):
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT_S)
        # Workers of a group whose leader exited (nginx's, say) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


def wait_port(proc, port, deadline):
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"exited with {proc.popen.returncode}: {proc.log_tail()}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"not accepting on {HOST}:{port} after {START_TIMEOUT_S} s")


def pinned(cpu, argv):
    return ["taskset", "-c", cpu, *argv]


CLK_TCK = os.sysconf("SC_CLK_TCK")


def proc_cpu_ticks(pgid):
    """CPU ticks (user + system) used so far by the live processes of a
    process group (the server, its threads, nginx's worker), and by kernel
    threads (process group 0: the journal and I/O workers that fsync wakes,
    which work for whoever calls it)."""
    group = kernel = 0
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as f:
                stat = f.read()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2:].split()
        ticks = int(fields[11]) + int(fields[12])      # fields 14, 15: utime, stime
        pgrp = int(fields[2])                           # field 5
        if pgrp == pgid:
            group += ticks
        elif pgrp == 0:
            kernel += ticks
    return group, kernel


@contextlib.contextmanager
def cpu_meter(row, pgid):
    """Adds to `row` the share of one CPU that the server (its process
    group) and the load generator (this process's children reaped meanwhile)
    used during the block: a figure whose own CPU is near 1.0 is bound by
    that side; neither near 1.0 means it waits (on round trips, on fsync)."""
    def children_s():
        ru = resource.getrusage(resource.RUSAGE_CHILDREN)
        return ru.ru_utime + ru.ru_stime
    t0, c0, b0, p0 = time.monotonic(), children_s(), busy_ticks(), core_busy_ticks()
    s0, k0 = proc_cpu_ticks(pgid or -1)
    yield
    wall = time.monotonic() - t0
    s1, k1 = proc_cpu_ticks(pgid or -1)
    p1 = core_busy_ticks()
    # How busy each pinned CPU was, interrupts and softirqs included (the
    # loopback TCP receive path runs there, charged to no process): the
    # truer test of a saturated side.
    row["server_core_busy"] = round((p1[SERVER_CPU] - p0[SERVER_CPU]) / CLK_TCK / wall, 2)
    row["load_core_busy"] = round((p1[LOAD_CPU] - p0[LOAD_CPU]) / CLK_TCK / wall, 2)
    server = (s1 - s0) / CLK_TCK / wall
    load = children_s() - c0
    load /= wall
    if pgid:
        row["server_cpu"] = round(server, 2)
    row["load_cpu"] = round(load, 2)
    # Whatever else ran meanwhile (the machine is shared): the CPU time of
    # all processes, less the two sides measured here and kernel threads.
    others = (busy_ticks() - b0 - (k1 - k0)) / CLK_TCK / wall - server - load
    row["others_cpu"] = round(max(0.0, others), 2)


def core_busy_ticks():
    """{cpu number as str: ticks not idle (nor iowait)} from /proc/stat."""
    out = {}
    with open("/proc/stat") as f:
        for line in f:
            name, *fields = line.split()
            if name.startswith("cpu") and name != "cpu":
                v = [int(x) for x in fields[:8]]
                out[name[3:]] = sum(v) - v[3] - v[4]
    return out


def busy_ticks():
    """Ticks all CPUs spent running processes so far (user, nice, system),
    from /proc/stat; interrupts and softirqs (loopback TCP's receive side)
    are left out: they are not charged to any process."""
    with open("/proc/stat") as f:
        fields = [int(x) for x in f.readline().split()[1:]]
    return fields[0] + fields[1] + fields[2]


# --- the servers -----------------------------------------------------------------

class Server:
    """Start in __enter__, stop in __exit__; `port`, `pid` once started."""

    name = ""

    def __init__(self, workdir):
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=workdir))
        self.proc = None
        self.port = None
        self.info = {}

    @property
    def pid(self):
        return self.proc.pid

    @property
    def url(self):
        return f"http://{HOST}:{self.port}/"

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.stop()
        return False


class AccManServer(Server):
    name = "accman"
    READY_RE = re.compile(r"http://127\.0\.0\.1:(\d+)")

    def __init__(self, workdir, repo=REPO_DIR):
        super().__init__(workdir)
        self.repo = Path(repo)       # bench/ab.py serves other revisions' checkouts

    def __enter__(self):
        if not (self.repo / "accman" / "server.py").exists():
            raise BenchError("accman/server.py does not exist yet")
        env = dict(os.environ, PYTHONPATH=str(self.repo))
        self.proc = Proc(pinned(SERVER_CPU, [
            PYTHON, "-m", "accman", "serve", "--host", HOST, "--port", "0",
            "--data", str(self.workdir / "data")]),
            log_path=self.workdir / "server.log", stdout_pipe=True, cwd=self.repo, env=env)
        lines = queue.Queue()

        def read_stdout(stream):
            # Kept draining after the ready line so that the server never
            # blocks on a full pipe.
            for raw in iter(stream.readline, b""):
                lines.put(raw.decode(errors="replace"))
            lines.put(None)

        threading.Thread(target=read_stdout, args=(self.proc.popen.stdout,), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"no ready line after {START_TIMEOUT_S} s") from None
            if line is None:
                self.proc.popen.wait(STOP_TIMEOUT_S)
                raise BenchError(f"exited with {self.proc.popen.returncode}: "
                                 f"{self.proc.log_tail()}")
            m = self.READY_RE.search(line)
            if m:
                self.port = int(m.group(1))
                break
        wait_port(self.proc, self.port, deadline)
        self.info = {"ready_line": line.strip()}
        return self


class UvicornServer(Server):
    name = "uvicorn"

    def __enter__(self):
        self.port = free_port()
        self.proc = Proc(pinned(SERVER_CPU, [
            PYTHON, str(BENCH_DIR / "baseline_app.py"), "--host", HOST,
            "--port", str(self.port), "--data", str(self.workdir / "data")]),
            log_path=self.workdir / "server.log", cwd=self.workdir)
        wait_port(self.proc, self.port, time.monotonic() + START_TIMEOUT_S)
        self.info = {"http": uvicorn_http_impl()}
        return self


class NginxServer(Server):
    name = "nginx"

    def __enter__(self):
        nginx = shutil.which("nginx") or ("/usr/sbin/nginx" if os.path.exists("/usr/sbin/nginx")
                                          else None)
        if nginx is None:
            raise BenchError("nginx is not installed")
        self.port = free_port()
        prefix = str(self.workdir)
        conf = (BENCH_DIR / "nginx.conf.template").read_text()
        conf = conf.replace("@PREFIX@", prefix).replace("@PORT@", str(self.port))
        (self.workdir / "nginx.conf").write_text(conf)
        self.proc = Proc(pinned(SERVER_CPU, [
            nginx, "-p", prefix, "-c", f"{prefix}/nginx.conf", "-e", f"{prefix}/error.log"]),
            log_path=self.workdir / "server.log", cwd=self.workdir)
        wait_port(self.proc, self.port, time.monotonic() + START_TIMEOUT_S)
        self.info = {"version": tool_version([nginx, "-v"])}
        return self


class RedisServer(Server):
    name = "redis"

    def __enter__(self):
        for tool in ("redis-server", "redis-benchmark"):
            if shutil.which(tool) is None:
                raise BenchError(f"{tool} is not installed")
        self.port = free_port()
        self.proc = Proc(pinned(SERVER_CPU, [
            "redis-server", "--bind", HOST, "--port", str(self.port),
            "--dir", str(self.workdir), "--appendonly", "yes", "--appendfsync", "always",
            "--save", "", "--daemonize", "no", "--protected-mode", "yes",
            "--logfile", str(self.workdir / "redis.log")]),
            log_path=self.workdir / "server.log", cwd=self.workdir)
        wait_port(self.proc, self.port, time.monotonic() + START_TIMEOUT_S)
        self.info = {"version": tool_version(["redis-server", "--version"])}
        return self

    def command(self, *args):
        """One RESP command on a fresh connection; the raw reply."""
        payload = b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(a), a) for a in (x.encode() for x in args))
        with socket.create_connection((HOST, self.port), timeout=5) as s:
            s.sendall(payload)
            return s.recv(4096)


# --- the load generators -----------------------------------------------------------

UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6}
WRK_LATENCY_RE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
WRK_MEAN_RE = re.compile(r"^\s*Latency\s+([\d.]+)(us|ms|s)\s", re.M)
WRK_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
WRK_TOTAL_RE = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.M)
WRK_NON2XX_RE = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
WRK_SOCKET_RE = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")


def parse_wrk(text):
    rps = WRK_RPS_RE.search(text)
    if rps is None:
        raise BenchError("wrk printed no Requests/sec: " + " | ".join(text.splitlines()[-3:]))
    # wrk 4.1 prints a 99th percentile of 0 when it records latency per
    # pipelined batch (its histogram then holds fewer samples than it counts):
    # no figure, rather than a wrong one.
    lat = {p: float(v) * UNITS_US[u] for p, v, u in WRK_LATENCY_RE.findall(text)
           if float(v) > 0}
    mean = WRK_MEAN_RE.search(text)
    total = WRK_TOTAL_RE.search(text)
    non2xx = WRK_NON2XX_RE.search(text)
    sock = WRK_SOCKET_RE.search(text)
    return {
        "rps": float(rps.group(1)),
        "p50_us": lat.get("50"), "p99_us": lat.get("99"),
        "mean_us": float(mean.group(1)) * UNITS_US[mean.group(2)] if mean else None,
        "requests": int(total.group(1)) if total else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(map(int, sock.groups())) if sock else 0,
    }


def run_wrk(url, script, args, conns, duration_s, pgid=None):
    argv = pinned(LOAD_CPU, ["wrk", "-t1", f"-c{conns}", f"-d{duration_s}s", "--latency",
                             "-s", str(WRK_DIR / script), url, "--", *map(str, args)])
    cpu = {}
    try:
        with cpu_meter(cpu, pgid):
            out = subprocess.run(argv, capture_output=True, text=True,
                                 timeout=duration_s + RUN_SLACK_S)
    except subprocess.TimeoutExpired:
        raise BenchError(f"wrk overran {duration_s + RUN_SLACK_S} s") from None
    if out.returncode != 0:
        raise BenchError(f"wrk exited {out.returncode}: {out.stderr.strip()[-200:]}")
    row = parse_wrk(out.stdout)
    row.update(cpu)
    row["tool"] = "wrk"
    row["command"] = " ".join(argv[3:])      # without the taskset prefix
    return row


def run_redis_benchmark(port, command, conns, pipeline, duration_s, keyspace=None,
                        pgid=None):
    """redis-benchmark is bounded by a request count: a probe run sizes it so
    that the measured run lasts about `duration_s` (the probe is the warm-up)."""
    def once(n, cpu=None):
        argv = ["redis-benchmark", "-h", HOST, "-p", str(port), "-c", str(conns),
                "-n", str(n), "-P", str(pipeline), "--csv"]
        if keyspace:
            argv += ["-r", str(keyspace)]
        argv += command
        bound_s = 3 * duration_s + RUN_SLACK_S
        try:
            with cpu_meter(cpu if cpu is not None else {}, pgid):
                out = subprocess.run(pinned(LOAD_CPU, argv), capture_output=True, text=True,
                                     timeout=bound_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"redis-benchmark overran {bound_s} s") from None
        rows = [line for line in out.stdout.splitlines() if line.startswith('"')]
        if out.returncode != 0 or len(rows) < 2:
            raise BenchError(f"redis-benchmark exited {out.returncode}: "
                             f"{(out.stderr or out.stdout).strip()[-200:]}")
        head = [h.strip('"') for h in rows[0].split(",")]
        vals = [v.strip('"') for v in rows[1].split(",")]
        rec = dict(zip(head, vals))
        return argv, {"rps": float(rec["rps"]),
                      "p50_us": float(rec["p50_latency_ms"]) * 1e3,
                      "p99_us": float(rec["p99_latency_ms"]) * 1e3,
                      "requests": n, "non_2xx": 0, "socket_errors": 0}

    _, probe = once(REDIS_PROBE[1 if pipeline == 1 else 16])
    n = max(1000, int(probe["rps"] * duration_s))
    cpu = {}
    argv, row = once(n, cpu)
    row.update(cpu)
    row["tool"] = "redis-benchmark"
    row["command"] = " ".join(argv)
    return row


# --- seeding ----------------------------------------------------------------------

def fund_accounts(port, prefix=CYCLE_PREFIX, count=CYCLE_CREDS, by=FUND_BY):
    """Open `count` accounts over one keep-alive connection, one durable mod each."""
    deadline = time.monotonic() + SEED_TIMEOUT_S
    conn = http.client.HTTPConnection(HOST, port, timeout=10)
    try:
        for i in range(count):
            if time.monotonic() > deadline:
                raise BenchError(f"funding {count} accounts took over {SEED_TIMEOUT_S} s")
            conn.request("PATCH", f"/mod?cred={prefix}{i}&by={by}")
            resp = conn.getresponse()
            body = resp.read()
            if resp.status != 200:
                raise BenchError(f"funding {prefix}{i}: {resp.status} {body[:120]!r}")
    finally:
        conn.close()


# --- the machine -------------------------------------------------------------------

def cpu_busy_fraction(interval_s=1.0):
    """Busy fraction of all CPUs over `interval_s` (0..1), from /proc/stat."""
    t0, b0 = time.monotonic(), busy_ticks()
    time.sleep(interval_s)
    wall = time.monotonic() - t0
    return min(1.0, (busy_ticks() - b0) / CLK_TCK / wall / (os.cpu_count() or 1))


class QuietBudget:
    """Waiting for other processes to leave the CPUs, bounded over the run."""

    def __init__(self, total_s):
        self.left_s = total_s

    def wait(self, wait_s=QUIET_WAIT_S):
        """Wait (at most `wait_s`, and what is left of the budget) for the
        CPUs to be quiet; the busy fraction last seen."""
        t0 = time.monotonic()
        deadline = t0 + max(0.0, min(wait_s, self.left_s))
        busy = cpu_busy_fraction()
        while busy > QUIET_BUSY_MAX and time.monotonic() < deadline:
            busy = cpu_busy_fraction()
        self.left_s -= time.monotonic() - t0
        return busy


def fdatasync_probe_us(directory, count=100):
    """Median time of appending 4 KiB to a file and fdatasync'ing it, in the
    directory the servers write to: the disk's latency at that moment, which
    bounds every durable figure."""
    path = os.path.join(directory, "fsync-probe")
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    times = []
    try:
        for _ in range(count):
            os.write(fd, b"x" * 4096)
            t0 = time.perf_counter()
            os.fdatasync(fd)
            times.append(time.perf_counter() - t0)
    finally:
        os.close(fd)
        os.unlink(path)
    times.sort()
    return round(times[count // 2] * 1e6)


def tool_version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    return (out.stdout + out.stderr).strip().splitlines()[0] if (out.stdout + out.stderr) else None


def uvicorn_http_impl():
    try:
        import httptools  # noqa: F401
        return "httptools"
    except ImportError:
        return "h11"


def machine_info():
    def pkg(name):
        try:
            from importlib.metadata import version
            return version(name)
        except Exception:
            return None
    cpu = None
    with contextlib.suppress(OSError):
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    git = tool_version(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip() != ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "git": git, "git_dirty": dirty,
        "wrk": tool_version(["wrk", "-v"]),
        "packages": {p: pkg(p) for p in ("uvloop", "plyvel", "uvicorn", "starlette",
                                          "httptools")},
        "uvicorn_http": uvicorn_http_impl(),
    }


# --- the plan ----------------------------------------------------------------------

def http_plan(server, duration_s, run_id):
    """(scenario, conns, runner) for an HTTP server with /tot and /mod."""
    url, pgid = server.url, server.pid

    def wrk(script, args, c):
        return lambda: run_wrk(url, script, args, c, duration_s, pgid)
    plan = [("tot", c, wrk("tot.lua", [TOT_CRED], c)) for c in CONNECTIONS]
    plan += [("tot_pipelined", c, wrk("tot_pipeline.lua", [TOT_CRED, PIPELINE_DEPTH], c))
             for c in PIPELINE_CONNECTIONS]
    plan += [("mod", c, wrk("mod_cycle.lua", [CYCLE_PREFIX, CYCLE_CREDS], c))
             for c in CONNECTIONS]
    plan.append(("mod_unique", UNIQUE_CONNECTIONS,
                 wrk("mod_unique.lua", [f"u{run_id}-"], UNIQUE_CONNECTIONS)))
    return plan


def nginx_plan(server, duration_s, run_id):
    return [(s, c, run) for s, c, run in http_plan(server, duration_s, run_id)
            if s in ("tot", "tot_pipelined")]


def redis_plan(server, duration_s, run_id):
    port, pgid = server.port, server.pid

    def bench(command, c, pipeline=1, keyspace=None):
        return lambda: run_redis_benchmark(port, command, c, pipeline, duration_s,
                                           keyspace=keyspace, pgid=pgid)
    get = ["GET", "bench:tot"]
    incr = ["INCRBY", "bench:__rand_int__", "-1"]
    new = ["INCRBY", f"u{run_id}:__rand_int__", "1"]
    plan = [("tot", c, bench(get, c)) for c in CONNECTIONS]
    plan += [("tot_pipelined", c, bench(get, c, PIPELINE_DEPTH)) for c in PIPELINE_CONNECTIONS]
    plan += [("mod", c, bench(incr, c, keyspace=CYCLE_CREDS)) for c in CONNECTIONS]
    plan.append(("mod_unique", UNIQUE_CONNECTIONS,
                 bench(new, UNIQUE_CONNECTIONS, keyspace=10 ** 12)))
    return plan


def prepare_http(server):
    fund_accounts(server.port)
    run_wrk(server.url, "tot.lua", [TOT_CRED], 64, WARMUP_S)
    run_wrk(server.url, "mod_cycle.lua", [CYCLE_PREFIX, CYCLE_CREDS], 64, WARMUP_S)


def prepare_nginx(server):
    run_wrk(server.url, "tot.lua", [TOT_CRED], 64, WARMUP_S)


def prepare_redis(server):
    reply = server.command("SET", "bench:tot", str(FUND_BY))
    if not reply.startswith(b"+OK"):
        raise BenchError(f"redis SET answered {reply[:80]!r}")


KINDS = {
    "accman": (AccManServer, prepare_http, http_plan),
    "uvicorn": (UvicornServer, prepare_http, http_plan),
    "nginx": (NginxServer, prepare_nginx, nginx_plan),
    "redis": (RedisServer, prepare_redis, redis_plan),
}


def measure_figure(runner, quiet, log, title):
    """One figure.  A figure that other processes disturbed (they used over
    OTHERS_CPU_MAX of a CPU meanwhile) is measured again after waiting for
    quiet, up to DISTURBED_RETRIES times; the least disturbed attempt is kept."""
    row = None
    for attempt in range(1 + DISTURBED_RETRIES):
        try:
            run = runner()
        except BenchError as e:
            return {"error": str(e)}
        run["attempts"] = attempt + 1
        if row is None or run["others_cpu"] < row["others_cpu"]:
            row = run
        if run["others_cpu"] <= OTHERS_CPU_MAX or quiet.left_s <= 0:
            break
        log(f"  {title} disturbed: others used {run['others_cpu']:.2f} CPU; "
            f"waiting for quiet, again")
        quiet.wait()
    return row


def measure(names, workdir, duration_s, quiet, log):
    """Every figure of every server named: {name: {"rows": {(scenario,
    conns): row}, "error": ..., "info": ...}}.

    All the servers are started first (an idle server costs nothing) and the
    figures are taken route by route, each server in turn: the figures that
    a ratio compares are minutes apart at most, not a whole run, on a shared
    machine whose speed drifts.  The row of the first two targets, /tot at
    64 connections, is taken KEY_ROW_REPEATS times, the servers alternating,
    and each server's median kept."""
    results = {name: {"server": name, "rows": {}, "error": None, "info": {}}
               for name in names}
    run_id = int(time.time())
    with contextlib.ExitStack() as stack:
        servers, plans = {}, {}
        for name in names:
            cls, prepare, plan = KINDS[name]
            try:
                server = stack.enter_context(cls(workdir))
                results[name]["info"] = server.info
                log(f"{SERVER_TITLES[name]}: started on {server.url} (pid {server.pid}); "
                    f"preparing")
                prepare(server)
            except BenchError as e:
                results[name]["error"] = str(e)
                log(f"{SERVER_TITLES[name]}: not measured: {e}")
                continue
            servers[name] = server
            plans[name] = {(sc, c): run for sc, c, run in plan(server, duration_s, run_id)}
        busy = quiet.wait()
        log(f"CPUs {busy:.0%} busy before the first figure")
        keys = [(sc, c) for sc in SCENARIO_TITLES
                for c in sorted({c for p in plans.values() for (s2, c) in p if s2 == sc})]
        probed = set()
        for key in keys:
            scenario, conns = key
            title = f"{SCENARIO_TITLES[scenario]:<24} c={conns:<3}"
            if scenario.startswith("mod") and scenario not in probed:
                probed.add(scenario)
                us = fdatasync_probe_us(workdir)
                log(f"{SCENARIO_TITLES[scenario]}: the disk's fdatasync of 4 KiB: {us} µs")
                for r in results.values():
                    r.setdefault("fdatasync_4k_us", {})[scenario] = us
            repeats = KEY_ROW_REPEATS if key == KEY_ROW else 1
            runs = collections.defaultdict(list)
            for _ in range(repeats):
                for name, server in list(servers.items()):
                    runner = plans[name].get(key)
                    if runner is None:
                        continue
                    row = measure_figure(runner, quiet, log, f"{name:<8} {title}")
                    runs[name].append(row)
                    if repeats == 1:
                        log(f"{name:<8} {title} {fmt_row(row)}")
                    if not server.proc.alive():
                        results[name]["error"] = f"the server died: {server.proc.log_tail()}"
                        log(f"{name:<8} {results[name]['error']}")
                        del servers[name]
            for name, rows in runs.items():
                good_rows = sorted((r for r in rows if not r.get("error")),
                                   key=lambda r: r["rps"])
                row = good_rows[len(good_rows) // 2] if good_rows else rows[0]
                if repeats > 1:
                    row = dict(row, repeats_rps=[r.get("rps") for r in rows])
                    log(f"{name:<8} {title} {fmt_row(row)}  (median of "
                        f"{', '.join(fmt_rps(r.get('rps')) for r in rows)})")
                results[name]["rows"][key] = row
    return results


# --- profiling ----------------------------------------------------------------------

PROFILE_CONNECTIONS = 64
PYSPY_RATE_HZ = 1000
PERF_RATE_HZ = 999

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


def thread_cpu_ticks(pid):
    """{tid: user + system ticks} of one process's threads."""
    ticks = {}
    with contextlib.suppress(OSError):
        for tid in os.listdir(f"/proc/{pid}/task"):
            with contextlib.suppress(OSError):
                with open(f"/proc/{pid}/task/{tid}/stat") as f:
                    stat = f.read()
                fields = stat[stat.rindex(")") + 2:].split()
                ticks[int(tid)] = int(fields[11]) + int(fields[12])
    return ticks


def commit_counters(port):
    """AccMan's own group-commit counters from /metrics (names may change:
    missing ones are left out)."""
    wanted = ("accman_batches_total", "accman_mods_committed_total",
              "accman_fsync_seconds_total")
    try:
        conn = http.client.HTTPConnection(HOST, port, timeout=5)
        conn.request("GET", "/metrics")
        text = conn.getresponse().read().decode()
        conn.close()
    except (OSError, http.client.HTTPException):
        return {}
    out = {}
    for line in text.splitlines():
        name, _, value = line.partition(" ")
        if name in wanted:
            with contextlib.suppress(ValueError):
                out[name] = float(value)
    return out


def thread_names(pyspy, pid):
    """{tid: Python thread name} from `py-spy dump`; {} when unavailable."""
    names = {}
    if pyspy is None:
        return names
    with contextlib.suppress(OSError, subprocess.TimeoutExpired):
        out = subprocess.run([pyspy, "dump", "--pid", str(pid)], capture_output=True,
                             text=True, timeout=30).stdout
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


def profile_accman(workdir, duration_s, out_dir, log):
    """AccMan under /tot and durable /mod at 64 connections, three times
    each: bare (per-thread CPU and the group-commit counters), under py-spy
    (Python frames, --nonblocking so that it barely slows the server), under
    perf (every thread, native and kernel frames).  Plus the LevelDB sync
    write of AccMan's batch shape timed alone.  Writes the raw profiles and
    summary.{json,md} to `out_dir`."""
    out_dir.mkdir(parents=True, exist_ok=True)
    pyspy = shutil.which("py-spy") or str(Path(PYTHON).parent / "py-spy")
    pyspy = pyspy if os.path.exists(pyspy) else None
    have_perf = shutil.which("perf") is not None
    summary = {"duration_s": duration_s, "connections": PROFILE_CONNECTIONS, "cases": {}}
    with AccManServer(workdir) as server:
        pid = server.pid
        prepare_http(server)
        names = thread_names(pyspy, pid)
        cases = (("tot", "tot.lua", [TOT_CRED]),
                 ("mod", "mod_cycle.lua", [CYCLE_PREFIX, CYCLE_CREDS]))
        for label, script, args in cases:
            entry = summary["cases"][label] = {}

            def load():
                return run_wrk(server.url, script, args, PROFILE_CONNECTIONS, duration_s, pid)

            # Bare: where the CPU goes by thread, and what the commits did.
            t0, m0 = thread_cpu_ticks(pid), commit_counters(server.port)
            row = load()
            t1, m1 = thread_cpu_ticks(pid), commit_counters(server.port)
            entry["bare"] = fmt_row(row)
            entry["rps"] = row["rps"]
            per_thread = collections.Counter()
            for tid, ticks in t1.items():
                per_thread[label_thread(tid, pid, names)] += ticks - t0.get(tid, 0)
            entry["thread_cpu_us_per_request"] = {
                k: round(v / CLK_TCK / row["requests"] * 1e6, 2)
                for k, v in per_thread.most_common() if v}
            if m0 and m1 and label == "mod":
                batches = m1.get("accman_batches_total", 0) - m0.get("accman_batches_total", 0)
                mods = (m1.get("accman_mods_committed_total", 0)
                        - m0.get("accman_mods_committed_total", 0))
                write_s = (m1.get("accman_fsync_seconds_total", 0)
                           - m0.get("accman_fsync_seconds_total", 0))
                if batches:
                    entry["commit"] = {
                        "batches": int(batches), "mods": int(mods),
                        "mods_per_batch": round(mods / batches, 1),
                        "batch_write_us": round(write_s / batches * 1e6),
                        "cycle_us": round(duration_s / batches * 1e6),
                        "writer_busy": round(write_s / duration_s, 2)}

            if pyspy:
                raw = out_dir / f"pyspy-{label}.txt"
                argv = pinned(LOAD_CPU, [pyspy, "record", "--pid", str(pid),
                                         "--duration", str(duration_s + 1),
                                         "--rate", str(PYSPY_RATE_HZ), "--nonblocking",
                                         "--threads", "--format", "raw",
                                         "--output", str(raw)])
                prof = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.PIPE, start_new_session=True)
                time.sleep(0.5)
                entry["under_pyspy"] = fmt_row(load())
                try:
                    _, err = prof.communicate(timeout=duration_s + RUN_SLACK_S)
                except subprocess.TimeoutExpired:
                    os.killpg(prof.pid, signal.SIGKILL)
                    _, err = prof.communicate()
                if raw.exists():
                    entry["pyspy"] = summarise_collapsed(raw.read_text())
                else:
                    entry["pyspy_error"] = err.decode(errors="replace").strip()[-300:]

            if have_perf:
                data = out_dir / f"perf-{label}.data"
                argv = pinned(LOAD_CPU, ["perf", "record", "-F", str(PERF_RATE_HZ), "-g",
                                         "-o", str(data), "-p", str(pid), "--", "sleep",
                                         str(duration_s)])
                prof = subprocess.Popen(argv, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.DEVNULL, start_new_session=True)
                time.sleep(0.3)
                entry["under_perf"] = fmt_row(load())
                try:
                    prof.wait(duration_s + RUN_SLACK_S)
                except subprocess.TimeoutExpired:
                    os.killpg(prof.pid, signal.SIGKILL)
                    prof.wait()

                def relabel(key):
                    m = re.match(r"(\d+):\S+\s+(.*)", key)
                    if not m:
                        return key
                    return f"{label_thread(int(m.group(1)), pid, names)}  {m.group(2)}"
                entry["perf_by_dso"] = [(pct, relabel(k))
                                        for pct, k in perf_report(data, "pid,dso", 0.3)]
                entry["perf_by_symbol"] = [(pct, relabel(k))
                                           for pct, k in perf_report(data, "pid,sym", 0.5)][:40]
                (out_dir / f"perf-{label}.txt").write_text(
                    "\n".join(f"{pct:6.2f}%  {k}" for pct, k in
                              perf_report(data, "pid,dso,sym", 0.1)) + "\n")
                for junk in (data, Path(str(data) + ".old")):
                    junk.unlink(missing_ok=True)
            log(f"  profiled {label}: {entry['bare']}")

    probe_dir = Path(tempfile.mkdtemp(prefix="store-probe-", dir=workdir))
    try:
        out = subprocess.run(pinned(SERVER_CPU, [PYTHON, "-c", STORE_PROBE, str(probe_dir)]),
                             capture_output=True, text=True, timeout=300)
        summary["store_probe"] = json.loads(out.stdout) if out.returncode == 0 else \
            {"error": out.stderr.strip()[-300:]}
    except (subprocess.TimeoutExpired, ValueError) as e:
        summary["store_probe"] = {"error": str(e)}
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


def profile_markdown(summary):
    lines = [f"# AccMan profile: {summary['connections']} connections, "
             f"{summary['duration_s']} s per pass", ""]
    for label, e in summary["cases"].items():
        lines += [f"## {label}", "", f"- bare: {e['bare']}"]
        for k in ("under_pyspy", "under_perf"):
            if k in e:
                lines.append(f"- {k.replace('_', ' ')}: {e[k]}")
        lines.append("- CPU per request by thread (µs): " + ", ".join(
            f"{k} {v}" for k, v in e["thread_cpu_us_per_request"].items()))
        if "commit" in e:
            lines.append("- group commit: " + ", ".join(
                f"{k} {v}" for k, v in e["commit"].items()))
        if "perf_by_dso" in e:
            lines += ["", "perf, share of the process's CPU samples by thread and library:",
                      "", "```"]
            lines += [f"{pct:6.2f}%  {k}" for pct, k in e["perf_by_dso"]] + ["```"]
            lines += ["", "perf, by symbol:", "", "```"]
            lines += [f"{pct:6.2f}%  {k}" for pct, k in e["perf_by_symbol"][:25]] + ["```"]
        if e.get("pyspy"):
            p = e["pyspy"]
            lines += ["", f"py-spy ({p['samples']} samples of active threads), by thread: "
                      + ", ".join(f"{k} {v}%" for v, k in p["threads"]), "", "```"]
            for _, thread in p["threads"]:
                lines += [f"{thread}: self, by line (C code called from a line counts there):"]
                lines += [f"{v:5.1f}%  {k}" for v, k in p["self_by_line"].get(thread, [])[:15]]
                lines += [f"{thread}: inclusive, by function:"]
                lines += [f"{v:5.1f}%  {k}"
                          for v, k in p["inclusive_by_function"].get(thread, [])[:15]]
            lines += ["```"]
        lines.append("")
    lines += ["## LevelDB sync write alone (µs, median / p90, by mods per batch)", "", "```",
              json.dumps(summary.get("store_probe"), indent=1), "```", ""]
    return "\n".join(lines)


# --- reporting ----------------------------------------------------------------------

def fmt_rps(v):
    return "—" if v is None else f"{v:,.0f}"


def fmt_us(v):
    if v is None:
        return "—"
    return f"{v:.0f} µs" if v < 1000 else f"{v / 1000:.2f} ms"


def fmt_row(row):
    if row.get("error"):
        return "error: " + row["error"]
    flags = ""
    if row.get("non_2xx") or row.get("socket_errors"):
        flags = f"  (!{row['non_2xx']} non-2xx, {row['socket_errors']} socket errors)"
    cpu = ""
    if row.get("server_cpu") is not None:
        cpu = (f"  cpu server {row['server_cpu']:.2f} load {row['load_cpu']:.2f} "
               f"others {row['others_cpu']:.2f}; core busy {row['server_core_busy']:.2f}"
               f"/{row['load_core_busy']:.2f}")
    return f"{fmt_rps(row['rps']):>10} req/s  p50 {fmt_us(row['p50_us']):>9}  " \
           f"p99 {fmt_us(row['p99_us']):>9}{cpu}{flags}"


def scenario_keys(results):
    keys = []
    for scenario in SCENARIO_TITLES:
        conns = sorted({c for r in results.values() for (s, c) in r["rows"] if s == scenario})
        keys += [(scenario, c) for c in conns]
    return keys


def good(results, name, key):
    row = results.get(name, {}).get("rows", {}).get(key)
    if row is None or row.get("error") or row.get("rps") is None:
        return None
    return row


def ratio(results, key, peer):
    a, b = good(results, "accman", key), good(results, peer, key)
    if a is None or b is None or not b["rps"]:
        return None
    return a["rps"] / b["rps"]


def targets(results):
    out = []
    for name, key, kind, required in TARGETS:
        row = good(results, "accman", key)
        if kind == "rps":
            measured = row and row["rps"]
            text, ok = fmt_rps(measured), measured is not None and measured >= required
            need = f">= {required:,.0f} req/s"
        elif kind == "p99_max_us":
            measured = row and row["p99_us"]
            text, ok = fmt_us(measured), measured is not None and measured <= required
            need = f"<= {required} µs"
        else:
            peer = kind.split("_", 1)[1]
            measured = ratio(results, key, peer)
            text = "—" if measured is None else f"{measured:.2f}x"
            ok = measured is not None and measured >= required
            need = f">= {required}x {peer}"
        status = "not measured" if measured is None else ("met" if ok else "NOT MET")
        if measured is not None and not ok:
            if kind == "p99_max_us":
                status += f" (+{measured - required:.0f} µs)"
            else:
                status += f" ({measured / required:.0%} of it)"
        out.append({"target": name, "required": need, "measured": text,
                    "value": measured, "status": status})
    return out


def markdown(results, meta):
    present = [s for s in SERVERS if s in results]
    lines = []
    lines.append("| route | conns | " + " | ".join(
        f"{SERVER_TITLES[s]} req/s | p50 | p99" for s in present) + " |")
    lines.append("|---|---:|" + "---:|---:|---:|" * len(present))
    for key in scenario_keys(results):
        cells = [SCENARIO_TITLES[key[0]], str(key[1])]
        for s in present:
            row = results[s]["rows"].get(key)
            if row is None:
                cells += ["", "", ""]
            elif row.get("error"):
                cells += ["error", "", ""]
            else:
                mark = " (!)" if row.get("non_2xx") or row.get("socket_errors") else ""
                cells += [fmt_rps(row["rps"]) + mark, fmt_us(row["p50_us"]),
                          fmt_us(row["p99_us"])]
        lines.append("| " + " | ".join(cells) + " |")
    peers = [p for p in present if p != "accman"]
    if "accman" in results and peers:
        lines += ["", "AccMan's req/s over each peer's, same route and connections:", ""]
        lines.append("| route | conns | " + " | ".join(f"vs {SERVER_TITLES[p]}" for p in peers)
                     + " |")
        lines.append("|---|---:|" + "---:|" * len(peers))
        for key in scenario_keys(results):
            cells = [SCENARIO_TITLES[key[0]], str(key[1])]
            for p in peers:
                r = ratio(results, key, p)
                cells.append("" if r is None else f"{r:.2f}x")
            lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "CPU during each figure: the server's CPU busy / the load generator's "
              "CPU busy (interrupts and softirqs included; 1.00 is all of it, and near it "
              "that side bounds the figure; neither near it: the figure waits on round "
              "trips or the disk):", ""]
    lines.append("| route | conns | " + " | ".join(SERVER_TITLES[s] for s in present) + " |")
    lines.append("|---|---:|" + "---:|" * len(present))
    for key in scenario_keys(results):
        cells = [SCENARIO_TITLES[key[0]], str(key[1])]
        for s in present:
            row = results[s]["rows"].get(key)
            if row is None or row.get("error") or row.get("server_cpu") is None:
                cells.append("")
            else:
                mark = " ~" if row.get("others_cpu", 0) > OTHERS_CPU_MAX else ""
                cells.append(f"{row['server_core_busy']:.2f} / "
                             f"{row['load_core_busy']:.2f}{mark}")
        lines.append("| " + " | ".join(cells) + " |")
    lines += ["", "| target | required | measured | |", "|---|---|---:|---|"]
    for t in meta["targets"]:
        lines.append(f"| {t['target']} | {t['required']} | {t['measured']} | {t['status']} |")
    notes = []
    for s in present:
        r = results[s]
        if r["error"]:
            notes.append(f"- {SERVER_TITLES[s]}: not measured: {r['error']}")
    probes = next((r["fdatasync_4k_us"] for r in results.values()
                   if r.get("fdatasync_4k_us")), None)
    if probes:
        notes.append("- the disk's fdatasync of a 4 KiB append (median), just before the "
                     "durable figures: " + ", ".join(
                         f"{SCENARIO_TITLES[k]} {v} µs" for k, v in probes.items()))
    if KEY_ROW_REPEATS > 1:
        notes.append(f"- {SCENARIO_TITLES[KEY_ROW[0]]} at {KEY_ROW[1]} connections: the median "
                     f"of {KEY_ROW_REPEATS} runs per server, the servers alternating")
    if any(row.get("others_cpu", 0) > OTHERS_CPU_MAX
           for r in results.values() for row in r["rows"].values()):
        notes.append(f"- ~ other processes used more than {OTHERS_CPU_MAX} CPU during that "
                     f"figure even after {DISTURBED_RETRIES} retries: it is low")
    if any(row.get("non_2xx") or row.get("socket_errors")
           for r in results.values() for row in r["rows"].values()):
        notes.append("- (!) the run had non-2xx replies or socket errors: see load.json")
    if notes:
        lines += ["", *notes]
    return "\n".join(lines) + "\n"


def write_results(results, meta, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = dict(meta)
    doc["servers"] = {
        name: {"error": r["error"], "info": r["info"],
               "fdatasync_4k_us": r.get("fdatasync_4k_us"),
               "rows": [dict(scenario=s, conns=c, **row) for (s, c), row in r["rows"].items()]}
        for name, r in results.items()}
    (out_dir / "load.json").write_text(json.dumps(doc, indent=2) + "\n")
    m = meta["machine"]
    head = (f"# AccMan HTTP load benchmark: latest run\n\n"
            f"Written by `bench/load.py` on {m['date']}: {m['cpu']}, {m['cpus']} CPUs, "
            f"Linux {m['kernel']}, Python {m['python']}, AccMan {m['git']}"
            f"{' (uncommitted changes)' if m['git_dirty'] else ''}.  Servers pinned to "
            f"CPU {SERVER_CPU}, load generator to CPU {LOAD_CPU} (`wrk -t1`), "
            f"{meta['duration_s']} s per figure.  uvicorn ran with {m['uvicorn_http']}.  "
            f"Latencies of pipelined rows are per batch of {PIPELINE_DEPTH}.\n\n")
    (out_dir / "load.md").write_text(head + markdown(results, meta))


# --- main ----------------------------------------------------------------------------

def main(argv=None):
    p = argparse.ArgumentParser(description="HTTP load benchmark of AccMan and its peers.")
    p.add_argument("--quick", action="store_true",
                   help=f"{QUICK_DURATION_S} s per figure instead of {DURATION_S} s")
    p.add_argument("--only", default=",".join(SERVERS),
                   help="comma-separated servers: " + ",".join(SERVERS))
    p.add_argument("--duration", type=int, default=None, help="seconds per figure")
    p.add_argument("--profile", action="store_true",
                   help="also profile AccMan (py-spy, perf) at 64 connections; "
                        "writes bench/results/profile/")
    p.add_argument("--profile-only", action="store_true",
                   help="only profile AccMan, measure nothing else")
    p.add_argument("--quiet-budget", type=float, default=QUIET_BUDGET_S,
                   help="seconds, over the whole run, to wait for other processes to "
                        "leave the CPUs (the machine is shared); 0 never waits")
    save = p.add_mutually_exclusive_group()
    save.add_argument("--save", dest="save", action="store_true", default=None,
                      help="write bench/results/load.{md,json} (default: full runs only)")
    save.add_argument("--no-save", dest="save", action="store_false")
    args = p.parse_args(argv)

    only = [s.strip() for s in args.only.split(",") if s.strip()]
    if args.profile_only:
        only, args.profile = [], True
    unknown = set(only) - set(SERVERS)
    if unknown:
        p.error(f"unknown server {sorted(unknown)[0]!r}; choose from {','.join(SERVERS)}")
    if shutil.which("wrk") is None and set(only) - {"redis"}:
        p.error("wrk is not installed (apt-get install wrk)")
    if shutil.which("taskset") is None:
        p.error("taskset is not installed (util-linux)")
    if (os.cpu_count() or 1) < 2:
        print("warning: one CPU: server and load generator share it", file=sys.stderr)
    duration_s = args.duration or (QUICK_DURATION_S if args.quick else DURATION_S)
    save = args.save if args.save is not None else (not args.quick and args.duration is None
                                                    and set(only) == set(SERVERS))

    def on_signal(signum, frame):
        raise KeyboardInterrupt      # unwinds through the servers' __exit__
    signal.signal(signal.SIGTERM, on_signal)

    def log(msg):
        print(msg, flush=True)

    workdir = tempfile.mkdtemp(prefix="accman-bench-")
    results = {}
    profile = None
    quiet = QuietBudget(args.quiet_budget)
    machine = machine_info()         # before: the tree the servers run is the one recorded
    started = time.monotonic()
    try:
        if only:
            results = measure([s for s in SERVERS if s in only], workdir, duration_s,
                              quiet, log)
        if args.profile:
            log("profiling AccMan:")
            busy = quiet.wait()
            log(f"  CPUs {busy:.0%} busy before start")
            try:
                profile = profile_accman(workdir, duration_s, RESULTS_DIR / "profile", log)
            except BenchError as e:
                log(f"  not profiled: {e}")
    finally:
        shutil.rmtree(workdir, ignore_errors=True)

    meta = {"duration_s": duration_s, "quick": args.quick, "only": only,
            "elapsed_s": round(time.monotonic() - started, 1), "machine": machine}
    meta["targets"] = targets(results)
    if results:
        print()
        print(markdown(results, meta))
    if profile is not None:
        print(f"profile: {RESULTS_DIR / 'profile'}/summary.json")
    if save and results:
        # (--profile-only measures no figures: the last run's stay.)
        write_results(results, meta, RESULTS_DIR)
        print(f"written: {RESULTS_DIR / 'load.md'}, {RESULTS_DIR / 'load.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
