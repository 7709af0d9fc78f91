"""In-process ledger benchmarks (pytest-benchmark).

    .venv/bin/python -m pytest bench/bench_ledger.py --benchmark-enable -n 0 -p no:cacheprovider -s

Each figure is printed beside its peer measured in the same run:

- `tot` lookups/s against a plain Python dict lookup through a method call
  (the cheapest thing a Python lookup API can be);
- durable mods/s through group commit with 1, 16, 256 and 1024 concurrent
  asyncio writers, against the LevelDB ceiling on this disk measured in the
  same run: one synced put (the fsync cost) and large synced batches of puts
  (LevelDB's write rate);
- open time and memory per account with ACCOUNTS_BIG accounts, against the
  size of the same data as plain Python dict entries;
- holds ended by their ttl, HOLDS_CROWDED of them due in the same second,
  against the durable mods/s of 1024 writers (an expiry is one change, as
  a mod is).

The figures and the targets are written into docs/PERFORMANCE.md by hand
from a run's output.  Nothing here asserts on time.
"""

import asyncio
import gc
import os
import time

import plyvel
import pytest
import uvloop

from accman import Ledger
from accman.limits import BATCH_MODS_MAX

ACCOUNTS_BIG = int(os.environ.get("ACCMAN_BENCH_ACCOUNTS", "1000000"))
LOOKUP_CREDS = [f"cred-{i:06d}" for i in range(1000)]
results = {}


@pytest.fixture(scope="module")
def led(tmp_path_factory):
    with Ledger(str(tmp_path_factory.mktemp("bench") / "d")) as led:
        for c in LOOKUP_CREDS:
            led.mod(c, 10 ** 12)
        yield led


def _lookups(tot, creds, rounds=100):
    for _ in range(rounds):
        for c in creds:
            tot(c)


def test_tot_lookups(benchmark, led):
    led.tot(LOOKUP_CREDS[0])
    benchmark.pedantic(_lookups, args=(led.tot, LOOKUP_CREDS), rounds=20, iterations=1)
    results["tot_per_s"] = 100 * len(LOOKUP_CREDS) / benchmark.stats["mean"]


def test_peer_dict_method_lookups(benchmark):
    class Peer:
        def __init__(self):
            self.d = {c: 10 ** 12 for c in LOOKUP_CREDS}

        def tot(self, cred):
            return self.d.get(cred)

    benchmark.pedantic(_lookups, args=(Peer().tot, LOOKUP_CREDS), rounds=20, iterations=1)
    results["dict_per_s"] = 100 * len(LOOKUP_CREDS) / benchmark.stats["mean"]


@pytest.mark.parametrize("writers", [1, 16, 256, 1024])
def test_durable_mods_group_commit(benchmark, led, writers):
    per_writer = max(20, 20000 // writers)
    if writers == 1:
        per_writer = 500

    def run():
        async def writer(w):
            cred = LOOKUP_CREDS[w % len(LOOKUP_CREDS)]
            for _ in range(per_writer):
                await led.amod(cred, -1)

        async def main():
            await asyncio.gather(*[writer(w) for w in range(writers)])

        uvloop.run(main())

    benchmark.pedantic(run, rounds=3, iterations=1)
    results[f"mods_per_s_{writers}"] = writers * per_writer / benchmark.stats["mean"]


def test_leveldb_ceiling(benchmark, tmp_path):
    """The disk's own limits, in this run: synced single puts (fsync rate)
    and synced batches of 4096 puts of ledger-sized records."""
    db = plyvel.DB(str(tmp_path / "raw"), create_if_missing=True)
    n = 300
    t0 = time.perf_counter()
    for i in range(n):
        db.put(b"h%016d" % i, b"x" * 25, sync=True)
    results["fsync_s"] = (time.perf_counter() - t0) / n
    key = [0]

    def batch():
        wb = db.write_batch(sync=True)
        k = key[0]
        for i in range(4096):
            wb.put(b"h%016d" % (k + i), b"x" * 25)
        key[0] = k + 4096
        wb.write()

    benchmark.pedantic(batch, rounds=20, iterations=1)
    results["leveldb_puts_per_s"] = 4096 / benchmark.stats["mean"]
    db.close()


HOLDS_CROWDED = 100_000
HOLDS_PER_ACCOUNT = 4000


def test_expire_a_crowded_second(benchmark, tmp_path):
    """HOLDS_CROWDED holds with the same expiry second, ended as the writer
    ends them: BATCH_MODS_MAX a batch, each batch made durable before the
    next (Ledger.expire_due takes QUEUED_MODS_MAX a call: set to the
    writer's batch here), on a test clock."""
    now = [1_700_000_000_000]
    accounts = [f"held-{i}" for i in range(HOLDS_CROWDED // HOLDS_PER_ACCOUNT)]

    with Ledger(str(tmp_path / "d"), clock_ms=lambda: now[0],
                queued_mods_max=BATCH_MODS_MAX) as held:
        for cred in accounts:
            held.mod(cred, 10 ** 12)

        def open_holds():
            async def holder(cred):
                for _ in range(HOLDS_PER_ACCOUNT):
                    await held.ahold(cred, -1, 1)

            async def main():
                await asyncio.gather(*map(holder, accounts))
            now[0] += 10_000
            uvloop.run(main())
            assert held.open_holds == HOLDS_CROWDED
            now[0] += 2_000
            return (), {}

        def expire():
            while held.open_holds:
                held.expire_due()

        benchmark.pedantic(expire, setup=open_holds, rounds=3, iterations=1)
    results["expiries_per_s"] = HOLDS_CROWDED / benchmark.stats["mean"]


def _rss_bytes():
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def test_open_time_and_memory_big(benchmark, tmp_path):
    """ACCOUNTS_BIG accounts, created through group commit, then reopened."""
    path = str(tmp_path / "big")
    creds = [f"acct{i:08d}" for i in range(ACCOUNTS_BIG)]

    async def fill():
        led = Ledger(path)
        step = 256

        async def w(k):
            for i in range(k, ACCOUNTS_BIG, step):
                await led.amod(creds[i], i + 1)

        await asyncio.gather(*[w(k) for k in range(step)])
        led.close()

    uvloop.run(fill())
    gc.collect()
    before = _rss_bytes()
    holder = []

    def open_it():
        if holder:
            holder.pop().close()
        holder.append(Ledger(path))

    benchmark.pedantic(open_it, rounds=2, iterations=1)
    gc.collect()
    led = holder.pop()
    results["open_s"] = benchmark.stats["mean"]
    # The reopen leaves exactly one ledger alive; its RSS growth over the
    # process before opening is the book's memory.
    results["bytes_per_account"] = (_rss_bytes() - before) / ACCOUNTS_BIG
    assert led.tot(creds[-1]) == ACCOUNTS_BIG
    led.close()
    peer = {os.urandom(16): (i, 1) for i in range(min(ACCOUNTS_BIG, 200000))}
    results["peer_dict_bytes_per_account"] = _sizeof_dict(peer) / len(peer)


def _sizeof_dict(d):
    import sys
    total = sys.getsizeof(d)
    for k, v in d.items():
        total += sys.getsizeof(k) + sys.getsizeof(v) + sum(sys.getsizeof(x) for x in v)
    return total


def test_report():
    """Prints the figures side by side (run with -s)."""
    r = results
    lines = ["", "ledger benchmark (same run):"]
    if "tot_per_s" in r:
        lines.append(f"  tot lookups/s: {r['tot_per_s']:,.0f}  (dict via method: "
                     f"{r.get('dict_per_s', 0):,.0f}; ratio "
                     f"{r['tot_per_s'] / r.get('dict_per_s', 1):.2f}x)")
    if "leveldb_puts_per_s" in r:
        lines.append(f"  ceiling: fsync {r['fsync_s'] * 1e3:.2f} ms, LevelDB synced batch "
                     f"puts/s {r['leveldb_puts_per_s']:,.0f}")
    for w in (1, 16, 256, 1024):
        k = f"mods_per_s_{w}"
        if k in r:
            extra = ""
            if "leveldb_puts_per_s" in r:
                # each mod writes ~2 records (history + account)
                extra = f"  ({r[k] * 2 / r['leveldb_puts_per_s']:.0%} of the put ceiling)"
            lines.append(f"  durable mods/s, {w:>4} writers: {r[k]:,.0f}{extra}")
    if "expiries_per_s" in r:
        peer = r.get("mods_per_s_1024")
        ratio = f"; ratio {r['expiries_per_s'] / peer:.2f}x" if peer else ""
        lines.append(f"  {HOLDS_CROWDED:,} holds due in one second ended: "
                     f"{r['expiries_per_s']:,.0f}/s (durable mods/s, 1024 writers: "
                     f"{peer or 0:,.0f}{ratio})")
    if "open_s" in r:
        lines.append(f"  open {ACCOUNTS_BIG:,} accounts: {r['open_s']:.2f} s, "
                     f"{r['bytes_per_account']:.0f} B/account (a bare dict of 16-byte "
                     f"keys to (tot, seq): {r['peer_dict_bytes_per_account']:.0f} B/account)")
    print("\n".join(lines))
