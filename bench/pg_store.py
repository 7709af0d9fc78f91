"""The PostgreSQL store's figures (issue 15), against pgbench in the same run.

    .venv/bin/python bench/pg_store.py [--seconds 10] [--json bench/results/pg_store.json]

Until the server is wired to the store, AccMan is driven in process: each
front-end is a process with one uvloop loop and CALLERS concurrent callers,
each awaiting one call at a time (as 64 keep-alive connections would).
On a fresh local server with synchronous_commit=on and fsync=on:

* durable mods (by -1, min none) from one front-end, against pgbench's
  one-row `UPDATE … RETURNING` at 64 clients (one commit per transaction);
  target: at least 2x;
* /tot reads from one front-end against `pgbench -S` at 64 clients;
  target: at least 0.8x;
* mods from two front-ends on one server, and from two front-ends on two
  servers (a store of two clusters), reported.

Ratios are of runs on the same machine minutes apart: both sides share
its two cores with whatever else runs, so read them together.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "..")
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, ROOT)

from postgres.pgcluster import Cluster, pg_bin  # noqa: E402

CALLERS = 64
ACCOUNTS = 100_000
PGBENCH_SCALE = 10          # 1M pgbench_accounts rows
UPDATE_SCRIPT = """\\set aid random(1, 1000000)
\\set delta random(-5000, 5000)
UPDATE pgbench_accounts SET abalance = abalance + :delta WHERE aid = :aid RETURNING abalance;
"""


def cred(i: int) -> str:
    return f"bench-{i}"


async def _fund(urls):
    from accman.postgres.store import PgStore
    store = await PgStore.open(urls)
    try:
        sem = asyncio.Semaphore(4096)
        loop = asyncio.get_running_loop()

        async def one(i):
            async with sem:
                fut = loop.create_future()
                store.submit(cred(i), 1_000_000_000, None, None, done=fut.set_result)
                await fut
        await asyncio.gather(*(one(i) for i in range(ACCOUNTS)))
    finally:
        await store.aclose()


async def _drive(urls, what, seconds, seed, out):
    import random
    from accman.postgres.store import PgStore
    store = await PgStore.open(urls, migrate_schema=False)
    rng = random.Random(seed)
    loop = asyncio.get_running_loop()
    stop = time.perf_counter() + seconds
    counts = [0] * CALLERS
    errors = [0]

    async def caller(n):
        k = 0
        while time.perf_counter() < stop:
            fut = loop.create_future()
            c = cred(rng.randrange(ACCOUNTS))
            if what == "mod":
                store.submit(c, -1, None, None, done=fut.set_result)
            else:
                store.read_tot(c, done=fut.set_result)
            r = await fut
            if isinstance(r, Exception):
                errors[0] += 1
            k += 1
        counts[n] = k
    t0 = time.perf_counter()
    await asyncio.gather(*(caller(i) for i in range(CALLERS)))
    elapsed = time.perf_counter() - t0
    batches = store.batches
    await store.aclose()
    out.put({"rate": sum(counts) / elapsed, "errors": errors[0],
             "mods_per_batch": (store.mods / batches) if batches else None})


def _front_end(urls, what, seconds, seed, out):
    import uvloop
    uvloop.run(_drive(urls, what, seconds, seed, out))


def front_ends(urls, what, seconds, n):
    """Runs n front-end processes at once; their summed rate."""
    ctx = multiprocessing.get_context("spawn")
    out = ctx.Queue()
    procs = [ctx.Process(target=_front_end, args=(urls, what, seconds, i, out))
             for i in range(n)]
    for p in procs:
        p.start()
    results = [out.get(timeout=seconds + 120) for _ in procs]
    for p in procs:
        p.join()
    return {"rate": sum(r["rate"] for r in results),
            "errors": sum(r["errors"] for r in results),
            "mods_per_batch": [r["mods_per_batch"] for r in results]}


def pgbench(pg: Cluster, args, seconds) -> float:
    base = [str(pg_bin() / "pgbench"), "-h", "127.0.0.1", "-p", str(pg.port), "-U", "postgres"]
    out = subprocess.run([*base, "-M", "prepared", "-c", str(CALLERS), "-j", "2",
                          "-T", str(int(seconds)), "-n", *args, "bench"],
                         check=True, capture_output=True, text=True).stdout
    return float(re.search(r"tps = ([\d.]+) \(without", out).group(1))


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=10.0)
    ap.add_argument("--json", default=None)
    args = ap.parse_args()
    import uvloop
    res = {"callers": CALLERS, "seconds": args.seconds}
    with Cluster.create("bench1") as pg1, Cluster.create("bench2") as pg2:
        u1 = pg1.create_database("bench")

        subprocess.run([str(pg_bin() / "pgbench"), "-i", "-q", "-s", str(PGBENCH_SCALE),
                        "-h", "127.0.0.1", "-p", str(pg1.port), "-U", "postgres", "bench"],
                       check=True, capture_output=True)
        with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
            f.write(UPDATE_SCRIPT)
        uvloop.run(_fund([u1]))
        pg1.psql("VACUUM ANALYZE", "bench")
        pg1.psql("CHECKPOINT", "bench")
        res["pgbench_update_tps"] = pgbench(pg1, ["-f", f.name], args.seconds)
        res["mod_1fe"] = front_ends([u1], "mod", args.seconds, 1)
        res["pgbench_select_tps"] = pgbench(pg1, ["-S"], args.seconds)
        res["tot_1fe"] = front_ends([u1], "tot", args.seconds, 1)
        res["mod_2fe_1cluster"] = front_ends([u1], "mod", args.seconds, 2)
        # A store of two clusters: a fresh one (the key made once, given to both).
        v1 = pg1.create_database("bench2c")
        v2 = pg2.create_database("bench2c")
        uvloop.run(_fund([v1, v2]))
        res["mod_2fe_2clusters"] = front_ends([v1, v2], "mod", args.seconds, 2)
        os.unlink(f.name)
    res["mod_vs_pgbench_update"] = res["mod_1fe"]["rate"] / res["pgbench_update_tps"]
    res["tot_vs_pgbench_select"] = res["tot_1fe"]["rate"] / res["pgbench_select_tps"]
    print(json.dumps(res, indent=2))
    if args.json:
        with open(args.json, "w") as f:
            json.dump(res, f, indent=2)


if __name__ == "__main__":
    main()
