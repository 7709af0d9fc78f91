"""Clients that never read (issue 11, item 4): N connections pipeline
`GET /` as fast as the server takes them and never read a reply, for a
while; meanwhile another process probes /health and the server's RSS is
sampled.  Then the flooders leave and the RSS is read again.

    python bench/hostile.py [--connections 300] [--seconds 10]

Targets: RSS growth under 256 MiB while they flood, /health answered under
1 s meanwhile, and the memory given back (or kept flat) once they leave.
The flooders run in one process with one epoll loop, and the prober in
another, so that neither competes with the other for a GIL.  It prints the
figures and exits 1 when a target is missed or the server died.  Every
socket is on 127.0.0.1; the server is stopped on the way out.
"""

from __future__ import annotations

import argparse
import multiprocessing
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
READY = re.compile(r"accman: serving http://127\.0\.0\.1:(\d+) ")
GROWTH_MIB_MAX = 256
HEALTH_S_MAX = 1.0
REQUEST = b"GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n"


def start_server(data: Path):
    out = open(data.parent / "stdout", "w+")
    proc = subprocess.Popen([sys.executable, "-m", "accman", "serve", "--port", "0",
                             "--data", str(data)], stdout=out, stderr=subprocess.STDOUT,
                            cwd=ROOT)
    deadline = time.monotonic() + 20
    while time.monotonic() < deadline:
        out.seek(0)
        m = READY.search(out.read())
        if m:
            return proc, int(m.group(1))
        time.sleep(0.05)
    proc.kill()
    raise SystemExit("hostile: the server did not start")


def rss_mib(pid: int) -> float:
    with open(f"/proc/{pid}/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    raise RuntimeError("no VmRSS")


def open_connections(port: int) -> int:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(b"GET /metrics HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n")
        body = b""
        while chunk := s.recv(65536):
            body += chunk
    return int(re.search(rb"\naccman_open_connections (\d+)", body).group(1)) - 1


def flood(port: int, n: int, seconds: float) -> None:
    """N sockets, written to whenever writable, never read."""
    socks = []
    ep = select.epoll()
    for _ in range(n):
        s = socket.socket()
        s.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        s.connect(("127.0.0.1", port))
        s.setblocking(False)
        socks.append(s)
        ep.register(s.fileno(), select.EPOLLOUT)
    by_fd = {s.fileno(): s for s in socks}
    burst = REQUEST * 512
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        for fd, _ in ep.poll(0.1):
            try:
                by_fd[fd].send(burst)
            except (BlockingIOError, ConnectionError):
                pass
    for s in socks:
        s.close()


def probe(port: int, seconds: float, queue) -> None:
    """/health on a new connection every 100 ms: the latencies."""
    out = []
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        t0 = time.monotonic()
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
                s.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                ok = s.recv(65536).startswith(b"HTTP/1.1 200")
        except OSError:
            ok = False
        out.append(time.monotonic() - t0 if ok else float("inf"))
        time.sleep(0.1)
    queue.put(out)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--connections", type=int, default=300)
    p.add_argument("--seconds", type=float, default=10.0)
    args = p.parse_args()
    base = Path(tempfile.mkdtemp(prefix="accman-hostile-"))
    proc, port = start_server(base / "data")
    try:
        time.sleep(0.5)
        rss0 = rss_mib(proc.pid)
        queue = multiprocessing.Queue()
        prober = multiprocessing.Process(target=probe, args=(port, args.seconds, queue))
        flooder = multiprocessing.Process(target=flood,
                                          args=(port, args.connections, args.seconds))
        flooder.start()
        prober.start()
        peak = rss0
        while flooder.is_alive():
            peak = max(peak, rss_mib(proc.pid))
            time.sleep(0.25)
        latencies = queue.get(timeout=30)
        prober.join()
        settle_until = time.monotonic() + 20
        while open_connections(port) > 0 and time.monotonic() < settle_until:
            time.sleep(0.2)         # the server notices the closes, and lingers
        time.sleep(1.5)             # a sweep trims the heap
        rss_end = rss_mib(proc.pid)
        alive = proc.poll() is None
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
        shutil.rmtree(base, ignore_errors=True)
    worst = max(latencies) if latencies else float("inf")
    print(f"hostile: {args.connections} connections for {args.seconds:g} s; RSS start "
          f"{rss0:.0f} MiB, peak {peak:.0f}, after they left {rss_end:.0f}")
    print(f"hostile: /health {len(latencies)} probes, median "
          f"{statistics.median(latencies) * 1000:.1f} ms, max {worst * 1000:.1f} ms")
    failures = []
    if not alive:
        failures.append("the server died")
    if peak - rss0 > GROWTH_MIB_MAX:
        failures.append(f"RSS grew {peak - rss0:.0f} MiB (target < {GROWTH_MIB_MAX})")
    if worst > HEALTH_S_MAX:
        failures.append(f"a /health took {worst:.2f} s (target < {HEALTH_S_MAX:g})")
    for f in failures:
        print(f"hostile: MISSED: {f}")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
