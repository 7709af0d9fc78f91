"""Durable /mod throughput with and without a webhook, in the same run.

    .venv/bin/python bench/webhooks.py                 # 10 rounds of 2 s per figure
    .venv/bin/python bench/webhooks.py --rounds 20 --duration 5 --conns 64

The webhook is "never on the commit path" (docs/SERVER.md, Webhooks): a
slow or dead receiver must not slow mods.  This measures durable /mod
(`by=-1&min=0` cycling over 1000 funded accounts, bench/wrk/mod_cycle.lua)
against an AccMan server for each of

    none      no --webhook: the peer the others are divided by
    fast      a receiver that answers 200 at once
    slow      a receiver that holds each POST for --slow-s seconds, then 200
    failing   a receiver that answers 500 at once (retried with backoff)
    down      a URL where nothing listens (connection refused, retried)

All five servers run from the start (each funded and warmed up once), and
the measured runs take turns, round by round, in a rotated order, short
and many: on this shared machine one figure moves by a factor of two from
minute to minute, and interleaving spreads that over all five alike.  It
prints each one's median req/s and CPU per mod (all the server's threads),
and their ratios to `none` (the medians of the per-round ratios).  For `fast` it
also prints the events delivered per second and the lag at the end (from
/metrics): the webhook kept up, or it did not.  Figures, never assertions.

Like bench/load.py: the server is pinned to CPU 0, wrk to CPU 1, and the
receiver (a thread of this process) to CPU 1 as well: it is the other side,
and on a 2-core machine it competes with wrk, not with the server.
"""

import argparse
import asyncio
import contextlib
import os
import statistics
import sys
import tempfile
import threading
from pathlib import Path

from harness import base, plan
from harness.cpu import CLK_TCK, thread_cpu_ticks
from harness.runners import fund_accounts, metrics_counters, run_wrk
from harness.servers import AccManServer, free_port

SECRET = b"bench-webhook-secret-0123456789abcdef"
CONFIGS = ("none", "fast", "slow", "failing", "down")
WEBHOOK_COUNTERS = ("accman_webhook_events_total", "accman_webhook_lag_events",
                    "accman_webhook_failures_total", "accman_mods_committed_total")


class Receiver:
    """An asyncio receiver in a thread: 200 at once, 200 after `delay_s`,
    or 500 at once."""

    def __init__(self, status=200, delay_s=0.0):
        self.status, self.delay_s = status, delay_s
        self.posts = 0
        self.loop = asyncio.new_event_loop()
        self.port = free_port()
        threading.Thread(target=self.loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(self._listen(), self.loop).result(10)

    async def _listen(self):
        self.server = await asyncio.start_server(self._serve, base.HOST, self.port)

    async def _serve(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            length = 0
            for line in head.split(b"\r\n"):
                if line.lower().startswith(b"content-length:"):
                    length = int(line.split(b":")[1])
            await reader.readexactly(length)
            self.posts += 1
            if self.delay_s:
                await asyncio.sleep(self.delay_s)
            writer.write(b"HTTP/1.1 %d X\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                         % self.status)
            await writer.drain()
        except (OSError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            pass
        except asyncio.CancelledError:
            # close(): a POST held by the slow receiver ends unanswered; the
            # task ends without an error for asyncio to print.
            pass
        writer.close()

    def close(self):
        async def stop():
            self.server.close()
            serving = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in serving:
                task.cancel()
            await asyncio.gather(*serving, return_exceptions=True)
        asyncio.run_coroutine_threadsafe(stop(), self.loop).result(10)
        self.loop.call_soon_threadsafe(self.loop.stop)


class WebhookAccMan(AccManServer):
    """AccMan with --webhook URL (None: without)."""

    def __init__(self, workdir, url, secret_path):
        super().__init__(workdir)
        self.extra = [] if url is None else ["--webhook", url, "--webhook-secret",
                                             str(secret_path)]

    def start(self, argv, **kw):
        super().start([*argv, *self.extra], **kw)


def receiver_for(config, slow_s):
    if config == "fast":
        return Receiver()
    if config == "slow":
        return Receiver(delay_s=slow_s)
    if config == "failing":
        return Receiver(status=500)
    return None


def fixture(stack, config, workdir, secret_path, slow_s):
    """The server (and receiver) of one configuration, started and funded,
    closed by `stack`."""
    rx = receiver_for(config, slow_s)
    if rx is not None:
        stack.callback(rx.close)
    if config == "none":
        url = None
    else:
        port = rx.port if rx is not None else free_port()     # down: nothing listens
        url = f"http://{base.HOST}:{port}/hook"
    server = stack.enter_context(WebhookAccMan(workdir, url, secret_path))
    fund_accounts(server.port, plan.CYCLE_PREFIX, plan.CYCLE_CREDS, plan.FUND_BY)
    run_wrk(server.url, "mod_cycle.lua", [plan.CYCLE_PREFIX, plan.CYCLE_CREDS], 16,
            plan.WARMUP_S)
    return server


def one_run(server, conns, duration_s):
    """One measured wrk run against a running server: its row, with the
    server's CPU per mod and the webhook's deliveries meanwhile."""
    args = [plan.CYCLE_PREFIX, plan.CYCLE_CREDS]
    before = metrics_counters(server.port, WEBHOOK_COUNTERS)
    ticks = sum(thread_cpu_ticks(server.pid).values())
    row = run_wrk(server.url, "mod_cycle.lua", args, conns, duration_s, pgid=server.pid)
    ticks = sum(thread_cpu_ticks(server.pid).values()) - ticks
    after = metrics_counters(server.port, WEBHOOK_COUNTERS)
    row["cpu_us_per_mod"] = ticks / CLK_TCK / max(row["requests"] or 0, 1) * 1e6
    delivered = (after.get(WEBHOOK_COUNTERS[0], 0) - before.get(WEBHOOK_COUNTERS[0], 0))
    row["events_per_s"] = delivered / duration_s
    row["lag_events"] = after.get(WEBHOOK_COUNTERS[1])
    row["failures"] = after.get(WEBHOOK_COUNTERS[2], 0) - before.get(WEBHOOK_COUNTERS[2], 0)
    return row


def describe(config, row):
    text = (f"{config:<8} {row['rps']:>9,.0f} req/s  p50 {row['p50_us'] or 0:>7,.0f} µs  "
            f"p99 {row['p99_us'] or 0:>8,.0f} µs  CPU/mod {row['cpu_us_per_mod']:5.1f} µs  "
            f"non-2xx {row['non_2xx']}")
    if config != "none":
        text += (f"  delivered {row['events_per_s']:>9,.0f} events/s  lag "
                 f"{row['lag_events'] if row['lag_events'] is not None else '?'}"
                 f"  failed attempts {row['failures']:.0f}")
    return text


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--rounds", type=int, default=10)
    ap.add_argument("--duration", type=float, default=2.0, help="seconds per run")
    ap.add_argument("--conns", type=int, default=16)
    ap.add_argument("--slow-s", type=float, default=5.0,
                    help="how long the slow receiver holds each POST")
    ap.add_argument("--only", default=",".join(CONFIGS),
                    help=f"a comma-separated subset of {','.join(CONFIGS)}")
    opts = ap.parse_args(argv)
    configs = [c for c in opts.only.split(",") if c]
    if "none" not in configs or not set(configs) <= set(CONFIGS):
        ap.error(f"--only takes names of {', '.join(CONFIGS)}, and needs none (the peer)")
    for tool in ("wrk", "taskset"):
        if base.which(tool) is None:
            raise base.BenchError(base.missing(tool))
    os.sched_setaffinity(0, {int(base.LOAD_CPU)})     # the receivers' CPU
    rps = {c: [] for c in configs}
    cpu = {c: [] for c in configs}
    with tempfile.TemporaryDirectory(prefix="accman-webhooks-") as tmp, \
            contextlib.ExitStack() as stack:
        secret_path = Path(tmp) / "webhook.secret"
        secret_path.write_bytes(SECRET)
        os.chmod(secret_path, 0o600)
        servers = {c: fixture(stack, c, tmp, secret_path, opts.slow_s) for c in configs}
        print(f"durable /mod at {opts.conns} connections, {opts.rounds} rounds of "
              f"{opts.duration:g} s; slow receiver holds each POST {opts.slow_s:g} s",
              flush=True)
        for i in range(opts.rounds):
            order = configs[i % len(configs):] + configs[:i % len(configs)]
            for config in order:
                row = one_run(servers[config], opts.conns, opts.duration)
                rps[config].append(row["rps"])
                cpu[config].append(row["cpu_us_per_mod"])
                print(f"round {i + 1}  {describe(config, row)}", flush=True)
    print("\nmedians, and the medians of the per-round ratios to none (req/s, and the "
          "server's CPU per mod, all threads):")
    for config in configs:
        ratios = [a / b for a, b in zip(rps[config], rps["none"], strict=True)]
        cpu_ratios = [a / b for a, b in zip(cpu[config], cpu["none"], strict=True)]
        print(f"  {config:<8} {statistics.median(rps[config]):>9,.0f} req/s "
              f"{statistics.median(ratios):.2f}x none (rounds: "
              f"{', '.join(f'{r:.2f}' for r in ratios)});  CPU/mod "
              f"{statistics.median(cpu[config]):5.1f} µs {statistics.median(cpu_ratios):.2f}x "
              f"none (rounds: {', '.join(f'{r:.2f}' for r in cpu_ratios)})")
    return 0


if __name__ == "__main__":
    try:
        sys.exit(main())
    except base.BenchError as e:
        print(f"webhooks: {e}", file=sys.stderr)
        sys.exit(1)
