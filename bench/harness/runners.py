"""The load generators, pinned to the load CPU: wrk for the HTTP servers,
redis-benchmark for Redis.  Each run is bounded in time, and its output is
parsed into one row: req/s, p50 and p99 (µs), requests, failures, and how
busy each side's CPU was (harness/cpu.py)."""

import http.client
import re
import subprocess
import time

from .base import (HOST, LOAD_CPU, RUN_SLACK_S, SEED_TIMEOUT_S, WRK_DIR, BenchError,
                   pinned)
from .cpu import cpu_meter

UNITS_US = {"us": 1.0, "ms": 1e3, "s": 1e6}
WRK_LATENCY_RE = re.compile(r"^\s*(50|75|90|99)(?:\.0+)?%\s+([\d.]+)(us|ms|s)\s*$", re.M)
# wrk's "Latency  mean  stdev  max  +/- stdev" line.
WRK_MEAN_RE = re.compile(r"^\s*Latency\s+([\d.]+)(us|ms|s)\s+[\d.]+(?:us|ms|s)\s+"
                         r"([\d.]+)(us|ms|s)\s", re.M)
WRK_RPS_RE = re.compile(r"^Requests/sec:\s+([\d.]+)", re.M)
WRK_TOTAL_RE = re.compile(r"^\s*(\d+) requests in ([\d.]+)(us|ms|s|m)", re.M)
WRK_NON2XX_RE = re.compile(r"Non-2xx or 3xx responses:\s+(\d+)")
WRK_SOCKET_RE = re.compile(
    r"Socket errors: connect (\d+), read (\d+), write (\d+), timeout (\d+)")

# redis-benchmark runs a request count, not a time: a probe sizes the
# measured run so that it lasts about as long as a wrk figure.  The probe
# starts at this many requests per pipelined request, and is taken again,
# larger, until it lasts REDIS_PROBE_MIN_S (so that at 1 connection it is
# short, and at 400k/s not a few milliseconds).
REDIS_PROBE_REQUESTS = 1000
REDIS_PROBE_MIN_S = 0.3
REDIS_PROBES_MAX = 3


def parse_wrk(text):
    """The row of one wrk run's --latency output; BenchError if it has none."""
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
        "max_us": float(mean.group(3)) * UNITS_US[mean.group(4)] if mean else None,
        "requests": int(total.group(1)) if total else None,
        "non_2xx": int(non2xx.group(1)) if non2xx else 0,
        "socket_errors": sum(map(int, sock.groups())) if sock else 0,
    }


def run_wrk(url, script, args, conns, duration_s, pgid=None):
    """One wrk run of `script` (in bench/wrk/) with `args`, pinned to the
    load CPU; its row, with the CPU of the server's group `pgid`."""
    argv = pinned(LOAD_CPU, ["wrk", "-t1", f"-c{conns}", f"-d{duration_s:g}s", "--latency",
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


def parse_redis_csv(text, requests):
    """The row of one `redis-benchmark --csv` run of one command."""
    rows = [line for line in text.splitlines() if line.startswith('"')]
    if len(rows) < 2:
        raise BenchError("redis-benchmark printed no figures: " + text.strip()[-200:])
    head = [h.strip('"') for h in rows[0].split(",")]
    vals = [v.strip('"') for v in rows[1].split(",")]
    if len(head) != len(vals):
        raise BenchError(f"redis-benchmark's CSV has {len(head)} names, {len(vals)} values")
    rec = dict(zip(head, vals, strict=True))
    return {"rps": float(rec["rps"]),
            "p50_us": float(rec["p50_latency_ms"]) * 1e3,
            "p99_us": float(rec["p99_latency_ms"]) * 1e3,
            "requests": requests, "non_2xx": 0, "socket_errors": 0}


class RedisBenchmark:
    """redis-benchmark runs of one command against one Redis, sized to last
    `duration_s`: by probes the first time, by the last run's rate after."""

    def __init__(self, port, command, conns, pipeline, keyspace=None):
        self.argv = ["redis-benchmark", "-h", HOST, "-p", str(port), "-c", str(conns),
                     "-P", str(pipeline), "--csv"]
        if keyspace:
            self.argv += ["-r", str(keyspace)]
        self.command = command
        self.pipeline = pipeline
        self.last_rps = None

    def once(self, requests, duration_s, pgid, cpu=None):
        argv = [*self.argv, "-n", str(requests), *self.command]
        bound_s = 3 * duration_s + RUN_SLACK_S
        cpu = {} if cpu is None else cpu
        try:
            with cpu_meter(cpu, pgid):
                out = subprocess.run(pinned(LOAD_CPU, argv), capture_output=True, text=True,
                                     timeout=bound_s)
        except subprocess.TimeoutExpired:
            raise BenchError(f"redis-benchmark overran {bound_s} s") from None
        if out.returncode != 0:
            raise BenchError(f"redis-benchmark exited {out.returncode}: "
                             f"{(out.stderr or out.stdout).strip()[-200:]}")
        row = parse_redis_csv(out.stdout, requests)
        row.update(cpu)
        row["tool"] = "redis-benchmark"
        row["command"] = " ".join(argv)
        return row

    def probe(self, duration_s, pgid):
        """Rate of short runs, each larger, until one lasts REDIS_PROBE_MIN_S."""
        requests = REDIS_PROBE_REQUESTS * self.pipeline
        for _ in range(REDIS_PROBES_MAX):
            rps = self.once(requests, duration_s, pgid)["rps"]
            if requests / rps >= REDIS_PROBE_MIN_S:
                break
            requests = int(rps * REDIS_PROBE_MIN_S * 1.5)
        return rps

    def __call__(self, duration_s, pgid):
        rps = self.last_rps or self.probe(duration_s, pgid)
        row = self.once(max(1000, int(rps * duration_s)), duration_s, pgid)
        self.last_rps = row["rps"]
        return row


def fund_accounts(port, prefix, count, by):
    """Open `count` accounts PREFIX0 .. over one keep-alive connection, one
    durable mod each."""
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
    except (OSError, http.client.HTTPException) as e:
        raise BenchError(f"funding {prefix}: {type(e).__name__}: {e}") from None
    finally:
        conn.close()


def metrics_counters(port, wanted):
    """The named counters of a server's /metrics (Prometheus text); names
    not found are left out, so that a renamed metric costs a figure, not a run."""
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
            try:
                out[name] = float(value)
            except ValueError:
                continue
    return out
