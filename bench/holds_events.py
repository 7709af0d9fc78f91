"""Holds and events under HTTP load, each figure a ratio against a peer
measured in the same run (issue 13).

    .venv/bin/python bench/holds_events.py                    # ~6 min
    .venv/bin/python bench/holds_events.py --quick            # 1 round of 1 s per figure
    .venv/bin/python bench/holds_events.py --before REV --rounds 5 --conns 16

The figures, each taken in --rounds rounds and its median kept:

    A/B     /tot and durable /mod (bench/ab.py's runs): REV, by default the
            revision before holds and events landed (f206369~1), against
            this worktree, alternating round by round
    pairs   hold + settle pairs per second (bench/wrk/hold_settle.lua),
            against charge + refund pairs (two durable mods, the same wrk
            work) on the same server in the same round
    events  /events pages of 1000 per second, from the in-memory ring and,
            after a restart, from LevelDB, against /past pages of 1000 (read
            from LevelDB) of the same server

Servers are pinned to CPU 0 and driven from CPU 1 by wrk (bench/harness);
every server listens on 127.0.0.1 only and is stopped by its process
group.  Figures, never assertions; nothing is written: the figures of
record go to docs/PERFORMANCE.md by hand, with the command that made them.
"""

import argparse
import http.client
import json
import socket
import statistics
import sys
import tempfile
import threading

from ab import WORKTREE, checkout, describe, one_run
from harness import base, plan
from harness.runners import fund_accounts, run_wrk
from harness.servers import AccManServer

BEFORE = "f206369~1"            # main before "Ledger: holds, settles, expiry and ..."
PAIR_CREDS = 1000               # accounts the pairs cycle over (and N of hold_settle.lua)
PAIR_FUND = 2 * PAIR_CREDS * 10 ** 9    # a multiple of 2N: see hold_settle.lua
EVENTS = 20_000                 # events (and /past entries) written before the pages
PAGE = 1000                     # items per page: EVENTS_LIMIT_MAX, PAST_LIMIT_MAX
PAGE_CONNS = 16


def median(rows, key="rps"):
    return statistics.median(r[key] for r in rows)


def cpu_us(row, per=1):
    """The server's CPU per request (times `per`), in µs: steadier than
    req/s on a shared machine, where a run may lose the CPU to others."""
    return row["server_cpu"] / row["rps"] * 1e6 * per


# --- A/B: /tot and durable /mod ------------------------------------------------------

def ab_figures(repos, tmp, opts):
    rows = {(route, label): [] for route in ("tot", "mod") for label in "AB"}
    for i in range(opts.rounds):
        for route in ("tot", "mod"):
            for label in ("A", "B") if i % 2 == 0 else ("B", "A"):
                row = one_run(repos[label], tmp, route, opts.conns, opts.duration)
                rows[route, label].append(row)
                print(f"round {i + 1}  /{route:<4} " + describe(label, row), flush=True)
    return rows


# --- hold + settle pairs -------------------------------------------------------------

def fund_pairs(port):
    """PAIR_CREDS accounts, account i funded with PAIR_FUND + i."""
    fund_accounts(port, plan.CYCLE_PREFIX, PAIR_CREDS, PAIR_FUND)
    conn = http.client.HTTPConnection(base.HOST, port, timeout=10)
    try:
        for i in range(1, PAIR_CREDS):
            conn.request("PATCH", f"/mod?cred={plan.CYCLE_PREFIX}{i}&by={i}")
            resp = conn.getresponse()
            if resp.status != 200:
                raise base.BenchError(f"funding pairs: {resp.status} {resp.read()[:100]!r}")
            resp.read()
    finally:
        conn.close()


def get_json(port, path):
    conn = http.client.HTTPConnection(base.HOST, port, timeout=10)
    try:
        conn.request("GET", path)
        return json.loads(conn.getresponse().read())
    finally:
        conn.close()


def pairs_round(tmp, opts, first):
    args = [plan.CYCLE_PREFIX, PAIR_CREDS]
    rows = {}
    with AccManServer(tmp) as server:
        fund_pairs(server.port)
        run_wrk(server.url, "hold_settle.lua", args + ["hold"], opts.conns, plan.WARMUP_S)
        run_wrk(server.url, "hold_settle.lua", args + ["mod"], opts.conns, plan.WARMUP_S)
        for mode in (first, "mod" if first == "hold" else "hold"):
            rows[mode] = run_wrk(server.url, "hold_settle.lua", args + [mode], opts.conns,
                                 opts.duration, pgid=server.pid)
        rows["open_holds"] = get_json(server.port, "/health")["open_holds"]
    return rows


# --- /events pages ----------------------------------------------------------------------

def write_events(port, n):
    """n mods of bench-0, pipelined on one connection: n events, and n
    entries of bench-0's history for the /past peer."""
    request = (f"PATCH /mod?cred={plan.TOT_CRED}&by=1 HTTP/1.1\r\nHost: {base.HOST}\r\n\r\n"
               .encode())
    with socket.create_connection((base.HOST, port), timeout=60) as s:
        sender = threading.Thread(target=s.sendall, args=(request * n,))
        sender.start()
        seen, buf = 0, b""
        while seen < n:
            chunk = s.recv(1 << 16)
            if not chunk:
                raise base.BenchError("the server closed while the events were written")
            buf += chunk
            seen += chunk.count(b"HTTP/1.1 200")
            if b"HTTP/1.1 " in chunk.replace(b"HTTP/1.1 200", b""):
                raise base.BenchError(f"writing events: {chunk[:200]!r}")
        sender.join()


def events_round(tmp, opts):
    rows = {}
    events, past = ["events", EVENTS, PAGE], ["past", EVENTS, PAGE, plan.TOT_CRED]
    with AccManServer(tmp) as server:
        write_events(server.port, EVENTS)
        run_wrk(server.url, "pages.lua", events, PAGE_CONNS, plan.WARMUP_S)
        rows["ring"] = run_wrk(server.url, "pages.lua", events, PAGE_CONNS, opts.duration,
                               pgid=server.pid)
        rows["past"] = run_wrk(server.url, "pages.lua", past, PAGE_CONNS, opts.duration,
                               pgid=server.pid)
        workdir = server.workdir
    again = AccManServer(tmp)
    again.workdir = workdir                     # the same data directory: the ring is empty
    with again as server:
        run_wrk(server.url, "pages.lua", events, PAGE_CONNS, plan.WARMUP_S)
        rows["leveldb"] = run_wrk(server.url, "pages.lua", events, PAGE_CONNS, opts.duration,
                                  pgid=server.pid)
    return rows


# --- the run -------------------------------------------------------------------------------

def report(ab, pairs, events, opts):
    print(f"\nmedians of {opts.rounds} rounds of {opts.duration:g} s:")
    for route, title in (("tot", "/tot"), ("mod", "/mod durable")):
        a, b = median(ab[route, "A"]), median(ab[route, "B"])
        print(f"  {title:<13} at {opts.conns} connections: A {a:>9,.0f}/s  B {b:>9,.0f}/s  "
              f"B/A {b / a:.2f}x")
    holds, mods = median([r["hold"] for r in pairs]), median([r["mod"] for r in pairs])
    hold_us = statistics.median(cpu_us(r["hold"], 2) for r in pairs)
    mod_us = statistics.median(cpu_us(r["mod"], 2) for r in pairs)
    print(f"  hold+settle   at {opts.conns} connections: {holds / 2:>9,.0f} pairs/s "
          f"({hold_us:.1f} µs of server CPU a pair); charge+refund {mods / 2:,.0f} pairs/s "
          f"({mod_us:.1f} µs); ratios {holds / mods:.2f}x, CPU {hold_us / mod_us:.2f}x "
          f"(open holds left: {max(r['open_holds'] for r in pairs)})")
    ring, level, past = (median([r[k] for r in events]) for k in ("ring", "leveldb", "past"))
    us = {k: statistics.median(cpu_us(r[k]) for r in events) for k in ("ring", "leveldb", "past")}
    print(f"  /events pages of {PAGE} at {PAGE_CONNS} connections: ring {ring:,.0f}/s "
          f"({ring * PAGE:,.0f} events/s, {us['ring']:,.0f} µs a page), LevelDB {level:,.0f}/s "
          f"({us['leveldb']:,.0f} µs); /past pages {past:,.0f}/s ({us['past']:,.0f} µs); "
          f"ratios {ring / past:.2f}x and {level / past:.2f}x")
    failures = sum(r.get("non_2xx", 0) for rows in ab.values() for r in rows)
    failures += sum(r[k].get("non_2xx", 0) for r in pairs for k in ("hold", "mod"))
    failures += sum(r[k].get("non_2xx", 0) for r in events for k in ("ring", "leveldb", "past"))
    print(f"  non-2xx replies in all runs: {failures}")


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--before", default=BEFORE, help=f"revision A (default {BEFORE})")
    ap.add_argument("--conns", type=int, default=64)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--duration", type=float, default=plan.DURATION_S, help="seconds per run")
    ap.add_argument("--quick", action="store_true", help="1 round of 1 s per figure")
    opts = ap.parse_args(argv)
    if opts.quick:
        opts.rounds, opts.duration = 1, 1
    with tempfile.TemporaryDirectory(prefix="accman-holds-") as tmp:
        repos = {"A": checkout(opts.before, tmp), "B": checkout(WORKTREE, tmp)}
        print(f"A = {opts.before}, B = this worktree; {opts.rounds} rounds of "
              f"{opts.duration:g} s", flush=True)
        ab = ab_figures(repos, tmp, opts)
        pairs, events = [], []
        for i in range(opts.rounds):
            pairs.append(pairs_round(tmp, opts, "hold" if i % 2 == 0 else "mod"))
            print(f"round {i + 1}  pairs: hold+settle {pairs[-1]['hold']['rps']:,.0f} req/s "
                  f"({cpu_us(pairs[-1]['hold']):.1f} µs), charge+refund "
                  f"{pairs[-1]['mod']['rps']:,.0f} req/s ({cpu_us(pairs[-1]['mod']):.1f} µs)",
                  flush=True)
            events.append(events_round(tmp, opts))
            print(f"round {i + 1}  pages: " + ", ".join(
                f"{k} {v['rps']:,.0f}/s ({cpu_us(v):,.0f} µs)" for k, v in events[-1].items()),
                flush=True)
        report(ab, pairs, events, opts)
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except base.BenchError as e:
        print(f"holds_events: {e}", file=sys.stderr)
        sys.exit(1)
