"""Which PostgreSQL driver the store uses, by measurement: asyncpg against
psycopg 3 (async, its C implementation), doing what the store does.

    .venv/bin/python bench/pg_driver.py [--seconds 5]

Two workloads, each driver on the same fresh local server, in one run:

* batch: one statement per round trip carrying arrays of BATCH rows in and
  out (the store's group commit and batched reads: a server-side function
  over arrays), on one connection, back to back.
* point: 64 concurrent tasks each running a one-row prepared SELECT over a
  pool of 8 connections (what a store without batching would do).

Prints rows per second for each and the asyncpg / psycopg ratio.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time

sys.path.insert(0, os.path.join(os.path.dirname(__file__), "..", "tests"))

from postgres.pgcluster import Cluster  # noqa: E402

BATCH = 64
TASKS = 64
POOL = 8
SETUP = """
CREATE TABLE acct (hid bytea PRIMARY KEY, tot bigint NOT NULL);
INSERT INTO acct SELECT decode(lpad(to_hex(i), 32, '0'), 'hex'), i FROM generate_series(1, 10000) i;
"""
BATCH_SQL = ("SELECT a.tot FROM unnest($1::bytea[]) WITH ORDINALITY AS q(hid, n) "
             "LEFT JOIN acct a USING (hid) ORDER BY q.n")
POINT_SQL = "SELECT tot FROM acct WHERE hid = $1"


def hids(n, start=0):
    return [(1 + (start + i) % 10000).to_bytes(16, "big") for i in range(n)]


async def run_for(seconds, step):
    n = 0
    t0 = time.perf_counter()
    while time.perf_counter() - t0 < seconds:
        n += await step()
    return n / (time.perf_counter() - t0)


async def asyncpg_batch(url, seconds):
    import asyncpg
    conn = await asyncpg.connect(url)
    stmt = await conn.prepare(BATCH_SQL)
    keys = hids(BATCH)

    async def step():
        rows = await stmt.fetch(keys)
        return len(rows)
    try:
        return await run_for(seconds, step)
    finally:
        await conn.close()


async def psycopg_batch(url, seconds):
    import psycopg
    conn = await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=0)
    sql = BATCH_SQL.replace("$1", "%b")
    keys = hids(BATCH)

    async def step():
        cur = await conn.execute(sql, (keys,), binary=True)
        rows = await cur.fetchall()
        return len(rows)
    try:
        return await run_for(seconds, step)
    finally:
        await conn.close()


async def point(seconds, acquire, release, run_one):
    stop = time.perf_counter() + seconds
    counts = [0] * TASKS

    async def task(i):
        k = 0
        while time.perf_counter() < stop:
            conn = await acquire()
            try:
                await run_one(conn, hids(1, i * 131 + k)[0])
            finally:
                release(conn)
            k += 1
        counts[i] = k
    t0 = time.perf_counter()
    await asyncio.gather(*(task(i) for i in range(TASKS)))
    return sum(counts) / (time.perf_counter() - t0)


async def queue_pool(conns):
    q = asyncio.Queue()
    for c in conns:
        q.put_nowait(c)
    return q.get, q.put_nowait


async def asyncpg_point(url, seconds):
    import asyncpg
    conns = [await asyncpg.connect(url) for _ in range(POOL)]
    acquire, release = await queue_pool(conns)

    async def one(conn, hid):
        await conn.fetchval(POINT_SQL, hid)
    try:
        return await point(seconds, acquire, release, one)
    finally:
        for c in conns:
            await c.close()


async def psycopg_point(url, seconds):
    import psycopg
    conns = [await psycopg.AsyncConnection.connect(url, autocommit=True, prepare_threshold=0)
             for _ in range(POOL)]
    acquire, release = await queue_pool(conns)
    sql = POINT_SQL.replace("$1", "%b")

    async def one(conn, hid):
        cur = await conn.execute(sql, (hid,), binary=True)
        await cur.fetchone()
    try:
        return await point(seconds, acquire, release, one)
    finally:
        for c in conns:
            await c.close()


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--seconds", type=float, default=5.0)
    args = ap.parse_args()
    import uvloop
    with Cluster.create("driver") as pg:
        pg.psql(SETUP)
        url = pg.url()
        results = {}
        for name, fn in [("asyncpg batch", asyncpg_batch), ("psycopg batch", psycopg_batch),
                         ("asyncpg point", asyncpg_point), ("psycopg point", psycopg_point)]:
            results[name] = uvloop.run(fn(url, args.seconds))
            print(f"{name:16s} {results[name]:12,.0f} rows/s", flush=True)
        for w in ("batch", "point"):
            print(f"{w}: asyncpg / psycopg = "
                  f"{results['asyncpg ' + w] / results['psycopg ' + w]:.2f}x")


if __name__ == "__main__":
    main()
