"""The bounded soak run (`just soak`): the server under churn and floods for a
fixed time, its memory and file descriptors measured before and after.

    python bench/soak.py [--seconds 60] [--churners 4] [--flooders 16]
                         [--env NAME=VALUE ...]

It starts `python -m accman serve` on a free loopback port and a fresh
temporary data directory, warms it up, and measures its RSS and open file
descriptors.  Then, for --seconds, all at once:

* churners open and close thousands of connections, each in one of five
  ways: connect and close at once; one request, read, close; half a request
  then close; a request then close without reading (with SO_LINGER 0: a
  reset); a malformed request, read the 400, close;
* flooders pipeline requests (/tot, a replayed keyed /mod, /metrics) and
  never read a reply, until the server stops reading them (back-pressure),
  stay stalled a while, then close and start over;
* a prober, every 50 ms, on a new connection: /health, a durable /mod,
  /tot (reading its own write), with a generous timeout; every failure
  is counted;
* a sampler reads the server's RSS every half second.

Then everything is closed and the server is given a few seconds to notice.
It prints what happened and the RSS at the start, peak and end, and exits 1
if the server died, a probe failed, the connections were not all released,
file descriptors leaked, or the RSS at the end is more than --rss-growth-mib
over the start.  Latencies are printed, never judged: the machine is shared.

Every socket is on 127.0.0.1; the server is stopped (SIGTERM, then SIGKILL)
on the way out, and its data directory removed.
"""

import argparse
import os
import random
import re
import shutil
import signal
import socket
import statistics
import struct
import subprocess
import sys
import tempfile
import threading
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"accman: serving http://127\.0\.0\.1:(\d+) ")
PROBE_TIMEOUT_S = 10.0


# --- the server ---------------------------------------------------------------------

class Server:
    def __init__(self, env_overrides):
        self.dir = Path(tempfile.mkdtemp(prefix="accman-soak-"))
        env = dict(os.environ, PYTHONUNBUFFERED="1", **env_overrides)
        self.out = open(self.dir / "stdout", "w+")
        self.err = open(self.dir / "stderr", "w+")
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "accman", "serve", "--host", "127.0.0.1", "--port", "0",
             "--data", str(self.dir / "data")],
            stdout=self.out, stderr=self.err, stdin=subprocess.DEVNULL, env=env, cwd=ROOT)
        deadline = time.monotonic() + 20
        while True:
            m = READY.search((self.dir / "stdout").read_text())
            if m:
                self.port = int(m.group(1))
                return
            if self.proc.poll() is not None or time.monotonic() > deadline:
                self.stop()
                raise SystemExit(f"soak: the server did not start: "
                                 f"{(self.dir / 'stderr').read_text()}")
            time.sleep(0.02)

    def alive(self):
        return self.proc.poll() is None

    def rss_kib(self):
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        return 0

    def fds(self):
        return len(os.listdir(f"/proc/{self.proc.pid}/fd"))

    def stop(self):
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(15)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
        self.out.close()
        self.err.close()

    def cleanup(self):
        shutil.rmtree(self.dir, ignore_errors=True)


# --- one request, the simple way ----------------------------------------------------------

def req(method, target):
    return f"{method} {target} HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n".encode()


class Replies:
    """Reads Content-Length framed replies off a socket, one at a time."""

    def __init__(self, sock):
        self.sock = sock
        self.buf = b""

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("closed")
        self.buf += chunk

    def next(self):
        """(status, body) of the next reply."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        length = int(m.group(1)) if m else 0
        while len(self.buf) < len(head) + 4 + length:
            self._fill()
        body = self.buf[len(head) + 4:len(head) + 4 + length]
        self.buf = self.buf[len(head) + 4 + length:]
        return int(head.split(b" ", 2)[1]), body


def read_reply(sock):
    return Replies(sock).next()


def connect(port, timeout=PROBE_TIMEOUT_S):
    s = socket.create_connection(("127.0.0.1", port), timeout=timeout)
    s.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
    return s


# --- the load -------------------------------------------------------------------------------

class Stats:
    def __init__(self):
        self.lock = threading.Lock()
        self.connections = 0
        self.churn_errors = 0
        self.flood_bytes = 0
        self.floods = 0
        self.probes = 0
        self.probe_failures = []
        self.probe_latency_s = []
        self.rss_kib = []

    def add(self, name, n=1):
        with self.lock:
            setattr(self, name, getattr(self, name) + n)


def churner(port, stop, stats, rnd):
    while not stop.is_set():
        kind = rnd.randrange(5)
        try:
            s = connect(port, timeout=5)
        except OSError:
            stats.add("churn_errors")
            time.sleep(0.01)
            continue
        stats.add("connections")
        try:
            if kind == 1:
                s.sendall(req("GET", "/health"))
                read_reply(s)
            elif kind == 2:
                s.sendall(b"GET /tot?cred=half")
            elif kind == 3:
                s.sendall(req("GET", "/tot?cred=soak-churn"))
                s.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
            elif kind == 4:
                s.sendall(b"GET /tot?cred=a%zz HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                read_reply(s)
        except (OSError, EOFError):
            stats.add("churn_errors")
        finally:
            s.close()


FLOOD_REQUESTS = [req("GET", "/tot?cred=soak-flood"),
                  req("PATCH", "/mod?cred=soak-flood&by=1&key=soak-flood-once"),
                  req("GET", "/metrics")]


def flooder(port, stop, stats, rnd):
    while not stop.is_set():
        chunk = b"".join(rnd.choice(FLOOD_REQUESTS) for _ in range(256))
        try:
            s = connect(port, timeout=5)
        except OSError:
            time.sleep(0.05)
            continue
        stats.add("floods")
        s.setblocking(False)
        stalled_since = None
        stall_for = rnd.uniform(0.5, 3.0)
        try:
            while not stop.is_set():
                try:
                    stats.add("flood_bytes", s.send(chunk))
                    stalled_since = None
                except BlockingIOError:
                    stalled_since = stalled_since or time.monotonic()
                    if time.monotonic() - stalled_since > stall_for:
                        break
                    time.sleep(0.02)
        except OSError:
            pass                    # dropped by the server (idle time): start over
        finally:
            s.close()


def prober(port, stop, stats):
    n = 0
    while not stop.is_set():
        n += 1
        t0 = time.monotonic()
        try:
            with connect(port) as s:
                replies = Replies(s)
                s.sendall(req("GET", "/health"))
                status, _ = replies.next()
                assert status == 200, f"/health {status}"
                s.sendall(req("PATCH", f"/mod?cred=soak-probe&by=1&key=p{n}"))
                status, body = replies.next()
                assert status == 200, f"/mod {status} {body[:100]!r}"
                tot = int(re.search(rb'"tot":(-?\d+)', body).group(1))
                s.sendall(req("GET", "/tot?cred=soak-probe"))
                status, body = replies.next()
                assert status == 200 and int(re.search(rb'"tot":(-?\d+)', body).group(1)) >= tot
            stats.probe_latency_s.append(time.monotonic() - t0)
        except (OSError, EOFError, AssertionError) as e:
            stats.probe_failures.append(f"{time.monotonic():.1f}: {type(e).__name__}: {e}")
        stats.add("probes")
        stop.wait(0.05)


def sampler(server, stop, stats):
    while not stop.is_set():
        if server.alive():
            stats.rss_kib.append(server.rss_kib())
        stop.wait(0.5)


def open_connections(port):
    with connect(port) as s:
        s.sendall(req("GET", "/metrics"))
        _, body = read_reply(s)
    return int(float(re.search(rb"\naccman_open_connections (\S+)", body).group(1)))


def warm_up(port):
    """Warm the allocator and caches up before the start's RSS is taken."""
    for _ in range(300):
        with connect(port) as s:
            s.sendall(req("PATCH", "/mod?cred=soak-warm&by=1") + req("GET", "/metrics"))
            replies = Replies(s)
            replies.next()
            replies.next()
    time.sleep(0.5)


def run_load(args, seed, server, stats):
    """Churners, flooders, the prober and the sampler, for --seconds."""
    port = server.port
    stop = threading.Event()
    threads = [threading.Thread(target=churner,
                                args=(port, stop, stats, random.Random(seed + i)))
               for i in range(args.churners)]
    threads += [threading.Thread(target=flooder,
                                 args=(port, stop, stats, random.Random(seed + 1000 + i)))
                for i in range(args.flooders)]
    threads += [threading.Thread(target=prober, args=(port, stop, stats)),
                threading.Thread(target=sampler, args=(server, stop, stats))]
    for t in threads:
        t.daemon = True
        t.start()
    stop.wait(args.seconds)
    stop.set()
    for t in threads:
        t.join(PROBE_TIMEOUT_S + 5)


def judge(args, server, stats, rss0, fds0):
    """What went wrong after the load, printing what happened; [] if nothing."""
    if not server.alive():
        return [f"the server died: exit {server.proc.returncode}"]
    failures = []
    # Every connection of the run is closed: the server must let them all
    # go (the one asking is the only one left).
    deadline = time.monotonic() + 10
    left = open_connections(server.port)
    while left > 1 and time.monotonic() < deadline:
        time.sleep(0.2)
        left = open_connections(server.port)
    if left > 1:
        failures.append(f"{left - 1} connections still open after the run")
    time.sleep(0.5)
    rss1, fds1 = server.rss_kib(), server.fds()
    peak = max(stats.rss_kib + [rss0, rss1])
    lat = sorted(stats.probe_latency_s) or [0.0]
    print(f"soak: {stats.connections} connections churned ({stats.churn_errors} cut "
          f"or refused), {stats.floods} floods sent {stats.flood_bytes / 2 ** 20:.1f} MiB "
          f"never read", flush=True)
    print(f"soak: {stats.probes} probes, {len(stats.probe_failures)} failed; latency "
          f"p50 {statistics.median(lat) * 1000:.1f} ms, "
          f"p99 {lat[int(len(lat) * 0.99) - 1 if len(lat) > 1 else 0] * 1000:.1f} ms, "
          f"max {lat[-1] * 1000:.1f} ms", flush=True)
    print(f"soak: RSS start {rss0 / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, "
          f"end {rss1 / 1024:.1f} MiB; fds start {fds0}, end {fds1}", flush=True)
    if stats.probe_failures:
        failures.append(f"{len(stats.probe_failures)} probes failed, e.g. "
                        f"{stats.probe_failures[:3]}")
    if stats.connections < 1000:
        failures.append(f"only {stats.connections} connections churned: not a soak")
    if (rss1 - rss0) / 1024 > args.rss_growth_mib:
        failures.append(f"RSS grew {(rss1 - rss0) / 1024:.1f} MiB over the run")
    if fds1 > fds0 + 2:
        failures.append(f"file descriptors leaked: {fds0} -> {fds1}")
    return failures


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--seconds", type=float, default=60.0)
    p.add_argument("--churners", type=int, default=4)
    p.add_argument("--flooders", type=int, default=16)
    p.add_argument("--rss-growth-mib", type=float, default=32.0,
                   help="fail when the RSS at the end is more than this over the start")
    p.add_argument("--seed", type=int, default=None)
    p.add_argument("--env", action="append", default=[], metavar="NAME=VALUE",
                   help="a limit override for the server, e.g. ACCMAN_IDLE_TIMEOUT_S=5")
    args = p.parse_args()
    seed = args.seed if args.seed is not None else random.randrange(2 ** 32)
    env = dict(kv.split("=", 1) for kv in args.env)

    server = Server(env)
    stats = Stats()
    try:
        warm_up(server.port)
        rss0, fds0 = server.rss_kib(), server.fds()
        print(f"soak: seed {seed}, {args.seconds:g} s, {args.churners} churners, "
              f"{args.flooders} flooders, port {server.port}, env {env or 'defaults'}",
              flush=True)
        run_load(args, seed, server, stats)
        failures = judge(args, server, stats, rss0, fds0)
    finally:
        server.stop()
        err = (server.dir / "stderr").read_text()
        server.cleanup()
    if "internal error" in err or "Traceback" in err:
        failures.append(f"the server logged errors: {err[-2000:]}")
    for f in failures:
        print(f"soak: FAILED: {f}", flush=True)
    if not failures:
        print("soak: ok", flush=True)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
