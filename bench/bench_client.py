"""AccManClient against aiohttp and httpx: the same calls, against the same
real AccMan server, in the same run.

    .venv/bin/python -m pytest bench/bench_client.py --benchmark-enable -n 0 -p no:cacheprovider -s

Each workload is one benchmark group; pytest-benchmark's table shows the
three clients side by side, and the last test prints the ratios (how many
times longer aiohttp and httpx take than AccManClient) that docs/PERFORMANCE.md
quotes.  All three clients get the same number of connections and parse the
JSON body of every reply.  Workloads:

- tot_sequential: 200 `tot` calls, one after another (latency per call);
- tot_concurrent: 1000 `tot` calls at once (throughput);
- mod_concurrent: 1000 keyless `mod -1` calls at once (each answered only
  once durable: group commit shares the fsyncs).
"""

from __future__ import annotations

import asyncio
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import aiohttp
import httpx
import pytest
import uvloop

from accman.client import AccManClient, AccManSyncClient

ROOT = Path(__file__).resolve().parent.parent
CONNECTIONS = 8
SEQUENTIAL_CALLS = 200
CONCURRENT_CALLS = 1000
CRED = "bench-client"
RESULTS: dict = {}


@pytest.fixture(scope="module")
def accman_url(tmp_path_factory):
    base = tmp_path_factory.mktemp("bench-accman")
    out = base / "stdout"
    with open(out, "wb") as f, open(base / "stderr", "wb") as err:
        proc = subprocess.Popen([sys.executable, "-m", "accman", "serve", "--host", "127.0.0.1",
                                 "--port", "0", "--data", str(base / "data")],
                                stdout=f, stderr=err, cwd=ROOT,
                                env=dict(os.environ, PYTHONUNBUFFERED="1"))
    deadline = time.monotonic() + 20
    while not (m := re.search(r"http://127\.0\.0\.1:\d+", out.read_text())):
        if proc.poll() is not None or time.monotonic() > deadline:
            proc.kill()
            pytest.skip("the AccMan server did not start: " + (base / "stderr").read_text()[-500:])
        time.sleep(0.02)
    url = m.group(0)
    with AccManSyncClient(url) as acc:
        acc.mod(CRED, 10 ** 15)
    yield url
    proc.send_signal(signal.SIGTERM)
    proc.wait(15)


@pytest.fixture(scope="module", params=["asyncio", "uvloop"])
def loop(request):
    loop = uvloop.new_event_loop() if request.param == "uvloop" else asyncio.new_event_loop()
    yield loop
    loop.close()


class AccMan:
    def __init__(self, url):
        self.c = AccManClient(url, connections_max=CONNECTIONS)

    async def tot(self):
        return await self.c.tot(CRED)

    async def mod(self):
        return (await self.c.mod(CRED, -1))[0]

    async def close(self):
        await self.c.aclose()


class Aiohttp:
    def __init__(self, url, connections=CONNECTIONS):
        self.s = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=connections))
        self.tot_url = f"{url}/tot?cred={CRED}"
        self.mod_url = f"{url}/mod?cred={CRED}&by=-1"

    async def tot(self):
        async with self.s.get(self.tot_url) as r:
            assert r.status == 200
            return (await r.json())["tot"]

    async def mod(self):
        async with self.s.patch(self.mod_url) as r:
            assert r.status == 200
            return (await r.json())["tot"]

    async def close(self):
        await self.s.close()


class Httpx:
    def __init__(self, url, connections=CONNECTIONS):
        # No pool timeout: with 1000 calls queued for its pool, httpx's
        # default 5 s runs out before the calls do.
        self.c = httpx.AsyncClient(limits=httpx.Limits(max_connections=connections),
                                   timeout=httpx.Timeout(60.0))
        self.tot_url = f"{url}/tot?cred={CRED}"
        self.mod_url = f"{url}/mod?cred={CRED}&by=-1"

    async def tot(self):
        r = await self.c.get(self.tot_url)
        assert r.status_code == 200
        return r.json()["tot"]

    async def mod(self):
        r = await self.c.patch(self.mod_url)
        assert r.status_code == 200
        return r.json()["tot"]

    async def close(self):
        await self.c.aclose()


# aiohttp and httpx with the same 8 connections, and with their default
# pool of 100 (what a user who does not tune them gets).
CLIENTS = {"accman": AccMan, "aiohttp": Aiohttp, "httpx": Httpx,
           "aiohttp-100": lambda url: Aiohttp(url, 100), "httpx-100": lambda url: Httpx(url, 100)}


async def tot_sequential(c):
    for _ in range(SEQUENTIAL_CALLS):
        await c.tot()


async def tot_concurrent(c):
    await asyncio.gather(*(c.tot() for _ in range(CONCURRENT_CALLS)))


async def mod_concurrent(c):
    await asyncio.gather(*(c.mod() for _ in range(CONCURRENT_CALLS)))


WORKLOADS = {"tot_sequential": (tot_sequential, 20),
             "tot_concurrent": (tot_concurrent, 10),
             "mod_concurrent": (mod_concurrent, 10)}
SLOW_ROUNDS = 4         # httpx takes seconds per round of the concurrent workloads


@pytest.mark.parametrize("client", list(CLIENTS))
@pytest.mark.parametrize("workload", list(WORKLOADS))
def test_client(benchmark, accman_url, loop, workload, client):
    run, rounds = WORKLOADS[workload]
    if client.startswith("httpx"):
        rounds = min(rounds, SLOW_ROUNDS)

    async def make():
        return CLIENTS[client](accman_url)
    c = loop.run_until_complete(make())
    try:
        loop.run_until_complete(run(c))          # connect and warm up outside the timing
        benchmark.group = f"{workload} ({type(loop).__module__.split('.')[0]} loop)"
        benchmark.pedantic(lambda: loop.run_until_complete(run(c)), rounds=rounds, iterations=1)
    finally:
        loop.run_until_complete(c.close())
    if benchmark.stats is not None:
        RESULTS[(benchmark.group, client)] = benchmark.stats.stats.median


def test_zz_ratios(capsys):
    """Prints the medians and the ratios to AccManClient's time."""
    if not RESULTS:
        pytest.skip("benchmarks disabled: run with --benchmark-enable")
    lines = ["", "median per workload; ratio = client time / AccManClient time"]
    for group in sorted({g for g, _ in RESULTS}):
        base = RESULTS.get((group, "accman"))
        calls = SEQUENTIAL_CALLS if group.startswith("tot_sequential") else CONCURRENT_CALLS
        row = [f"{group:30}"]
        for client in CLIENTS:
            t = RESULTS.get((group, client))
            if t is not None and base:
                row.append(f"{client} {t * 1e6 / calls:.1f} us/call (x{t / base:.2f})")
        lines.append(" | ".join(row))
    with capsys.disabled():
        print("\n".join(lines))
