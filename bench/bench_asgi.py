"""The latency the middleware adds per request, p50 and p99, against the same
app without it, in the same run, with the real AccMan server behind it.

    .venv/bin/python -m pytest bench/bench_asgi.py --benchmark-enable -n 0 -p no:cacheprovider -s

Two settings, each with the plain Starlette service of examples/app.py, the
same service under AccManMiddleware in "check" mode (a `tot` before, a `mod`
when the response starts) and in "reserve" mode (a hold before, its settle
when the response starts: two durable writes):

- inprocess: the ASGI app called directly on a uvloop loop, one request at a
  time: the middleware's own cost plus its AccMan round trips, nothing else;
- uvicorn: the app under a real uvicorn subprocess, called over a keep-alive
  HTTP/1.1 connection with http.client: what a consumer sees.

A mod, hold or settle is answered only once durable, so each includes an
fsync (shared by nothing here: requests go one at a time).  The last test
prints p50/p99 and the added latency that docs/PERFORMANCE.md quotes.
"""

from __future__ import annotations

import asyncio
import http.client
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import uvloop

from accman.client import AccManSyncClient

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT))
ROUNDS = 2000
CRED = "bench-asgi"
RESULTS: dict = {}


def _ready(proc, path: Path, pattern: str, timeout_s=20.0) -> str:
    deadline = time.monotonic() + timeout_s
    while not (m := re.search(pattern, path.read_text(errors="replace"))):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.skip(f"{path.name}: not ready")
        time.sleep(0.02)
    return m.group(1)


def _spawn(cmd, base: Path, name: str, env=None):
    out, err = base / f"{name}.out", base / f"{name}.err"
    with open(out, "wb") as o, open(err, "wb") as e:
        proc = subprocess.Popen(cmd, stdout=o, stderr=e, stdin=subprocess.DEVNULL, cwd=ROOT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1", **(env or {})))
    return proc, out, err


@pytest.fixture(scope="module")
def accman_url(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench-asgi")
    proc, out, _ = _spawn([sys.executable, "-m", "accman", "serve", "--host", "127.0.0.1",
                           "--port", "0", "--data", str(base / "data")], base, "accman")
    url = "http://127.0.0.1:" + _ready(proc, out, r"http://127\.0\.0\.1:(\d+)")
    with AccManSyncClient(url) as acc:
        acc.mod(CRED, 10 ** 15)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)


def _apps(url: str) -> dict:
    os.environ["ACCMAN_URL"] = url
    from examples.app import service

    from accman.asgi import AccManMiddleware
    return {"plain": service,
            "check": AccManMiddleware(service, url=url, mode="check", cost=1),
            "reserve": AccManMiddleware(service, url=url, mode="reserve", cost=1)}


SCOPE = {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1", "method": "GET",
         "scheme": "http", "path": "/weather", "raw_path": b"/weather", "query_string": b"",
         "root_path": "", "headers": [(b"host", b"bench"), (b"accman", CRED.encode())],
         "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}


async def _one(app):
    """One request, its `receive` as uvicorn's: the body, then nothing
    until the response has ended, then `http.disconnect` (the middleware's
    disconnect watch then ends as it does under a server)."""
    done = False
    status = None
    ended = asyncio.Event()

    async def receive():
        nonlocal done
        if not done:
            done = True
            return {"type": "http.request", "body": b"", "more_body": False}
        await ended.wait()
        return {"type": "http.disconnect"}

    async def send(message):
        nonlocal status
        if message["type"] == "http.response.start":
            status = message["status"]
        elif not message.get("more_body", False):
            ended.set()

    await app(dict(SCOPE), receive, send)
    assert status == 200


def _record(benchmark, setting, variant):
    if benchmark.stats is None:
        return
    data = sorted(benchmark.stats.stats.data)
    p50 = data[len(data) // 2]
    p99 = data[min(len(data) - 1, int(len(data) * 0.99))]
    RESULTS[(setting, variant)] = (p50, p99)
    benchmark.extra_info.update(p50_us=round(p50 * 1e6, 1), p99_us=round(p99 * 1e6, 1))


@pytest.mark.parametrize("variant", ["plain", "check", "reserve"])
def test_inprocess(benchmark, accman_url, variant):
    loop = uvloop.new_event_loop()
    try:
        app = _apps(accman_url)[variant]
        for _ in range(200):
            loop.run_until_complete(_one(app))          # warm up: connections, caches
        benchmark.group = "middleware in-process (uvloop)"
        benchmark.pedantic(lambda: loop.run_until_complete(_one(app)), rounds=ROUNDS, iterations=1)
        _record(benchmark, "inprocess", variant)
    finally:
        loop.close()


@pytest.mark.parametrize("call", ["tot", "mod", "hold+settle"])
def test_calls_alone(benchmark, accman_url, call):
    """The AccMan round trips the middleware makes, alone: what is left of
    the added latency is the middleware's own work.  Check mode makes a
    `tot` and a keyed `mod`, reserve mode a keyed `hold` and its `settle`."""
    from accman.client import AccManClient
    loop = uvloop.new_event_loop()
    try:
        acc = AccManClient(accman_url)
        n = iter(range(10 ** 9))

        async def hold_settle():
            hold, _, _ = await acc.hold(CRED, -1, 90, key=f"bench-h-{os.getpid()}-{next(n)}")
            await acc.settle(CRED, hold, 1)
        one = {"tot": lambda: acc.tot(CRED),
               "mod": lambda: acc.mod(CRED, -1, key=f"bench-c-{os.getpid()}-{next(n)}"),
               "hold+settle": hold_settle}[call]
        for _ in range(200):
            loop.run_until_complete(one())
        benchmark.group = "middleware in-process (uvloop)"
        benchmark.pedantic(lambda: loop.run_until_complete(one()), rounds=ROUNDS, iterations=1)
        loop.run_until_complete(acc.aclose())
        _record(benchmark, "inprocess", f"{call} alone")
    finally:
        loop.close()


@pytest.fixture(scope="module")
def uvicorn_urls(accman_url, tmp_path_factory):
    base = tmp_path_factory.mktemp("bench-uvicorn")
    procs, urls = [], {}
    for variant, target, mode in [("plain", "examples.app:service", "check"),
                                  ("check", "examples.app:app", "check"),
                                  ("reserve", "examples.app:app", "reserve")]:
        procs.append((variant, *_spawn(
            [sys.executable, "-m", "uvicorn", target, "--app-dir", str(ROOT), "--host",
             "127.0.0.1", "--port", "0", "--no-access-log"], base, variant,
            env={"ACCMAN_URL": accman_url, "ACCMAN_MODE": mode})))
    for variant, proc, _, err in procs:
        urls[variant] = _ready(proc, err, r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
    yield urls
    for _, proc, _, _ in procs:
        proc.send_signal(signal.SIGTERM)
        proc.wait(15)


@pytest.mark.parametrize("variant", ["plain", "check", "reserve"])
def test_uvicorn(benchmark, uvicorn_urls, variant):
    conn = http.client.HTTPConnection("127.0.0.1", int(uvicorn_urls[variant]))
    headers = {"ACCMAN": CRED}

    def one():
        conn.request("GET", "/weather", headers=headers)
        r = conn.getresponse()
        r.read()
        assert r.status == 200

    for _ in range(200):
        one()
    benchmark.group = "middleware under uvicorn (HTTP/1.1 keep-alive)"
    benchmark.pedantic(one, rounds=ROUNDS, iterations=1)
    conn.close()
    _record(benchmark, "uvicorn", variant)


def test_zz_added_latency(capsys):
    if not RESULTS:
        pytest.skip("benchmarks disabled: run with --benchmark-enable")
    lines = ["", "latency per request, p50 / p99, and what the middleware adds"]
    for setting in ("inprocess", "uvicorn"):
        plain = RESULTS.get((setting, "plain"))
        for variant in ("plain", "check", "reserve", "tot alone", "mod alone",
                        "hold+settle alone"):
            r = RESULTS.get((setting, variant))
            if r is None or plain is None:
                continue
            line = f"{setting:10} {variant:17} p50 {r[0] * 1e6:7.1f} us  p99 {r[1] * 1e6:7.1f} us"
            if variant in ("check", "reserve"):
                line += (f"   added p50 {(r[0] - plain[0]) * 1e6:+7.1f} us"
                         f"  p99 {(r[1] - plain[1]) * 1e6:+7.1f} us"
                         f"   (x{r[0] / plain[0]:.2f} p50)")
            lines.append(line)
    with capsys.disabled():
        print("\n".join(lines))
