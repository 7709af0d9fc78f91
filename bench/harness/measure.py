"""The figures taken round by round, the servers alternating.

All the servers are started first (an idle server costs nothing) and the
figures are taken key by key (a route at some connections): in each round
every server runs that key once, the order rotating from round to round so
that no server always follows another; then the next key.  The figures that
a ratio compares are thus seconds apart, not a whole run, on a shared
machine whose speed drifts.  Each server's figure is the median over the
rounds (req/s, p50 and p99 each on its own); every round's req/s and p99
are kept, so that a ratio can be told round by round too.
"""

import contextlib
import statistics
import time

from . import irqs, plan
from .base import BenchError
from .cpu import OTHERS_CPU_MAX, fdatasync_probe_us
from .report import fmt_row
from .servers import SERVER_KINDS

DISTURBED_RETRIES = 2            # a figure disturbed by other processes is taken again


def measure_figure(runner, duration_s, quiet, log, title):
    """One figure.  A figure that other processes disturbed (they used over
    OTHERS_CPU_MAX of a CPU meanwhile) is measured again after waiting for
    quiet, up to DISTURBED_RETRIES times; the least disturbed attempt is kept."""
    row = None
    for attempt in range(1 + DISTURBED_RETRIES):
        try:
            run = runner(duration_s)
        except BenchError as e:
            return {"error": str(e)}
        run["attempts"] = attempt + 1
        if row is None or run["others_cpu"] < row["others_cpu"]:
            row = run
        if run["others_cpu"] <= OTHERS_CPU_MAX or quiet.left_s <= 0:
            break
        log(f"  {title} disturbed: others used {run['others_cpu']:.2f} CPU; "
            f"waiting for quiet, again")
        quiet.wait()
    return row


def _median(values):
    values = [v for v in values if v is not None]
    return statistics.median(values) if values else None


def combine(rows):
    """One figure from its rounds: the CPU figures of the median run by
    req/s, and the median of each of req/s, p50 and p99 over the rounds."""
    good = sorted((r for r in rows if not r.get("error")), key=lambda r: r["rps"])
    if not good:
        return dict(rows[0], rounds=len(rows))
    row = dict(good[len(good) // 2])
    row["rps"] = _median(r["rps"] for r in good)
    row["p50_us"] = _median(r.get("p50_us") for r in good)
    row["p99_us"] = _median(r.get("p99_us") for r in good)
    row["rounds"] = len(rows)
    row["rounds_rps"] = [None if r.get("error") else r["rps"] for r in rows]
    row["rounds_p99_us"] = [None if r.get("error") else r.get("p99_us") for r in rows]
    return row


def rotated(names, round_no):
    k = round_no % len(names) if names else 0
    return names[k:] + names[:k]


class Run:
    """One measuring run: the servers, their runners, and what they measured."""

    def __init__(self, names, workdir, duration_s, rounds, quiet, log):
        self.workdir, self.duration_s, self.rounds = workdir, duration_s, rounds
        self.quiet, self.log = quiet, log
        self.results = {name: {"server": name, "rows": {}, "error": None, "info": {}}
                        for name in names}
        self.servers, self.runners = {}, {}
        self.disk_irqs = self.irqs_before = None

    def start(self, stack, warmup_s):
        run_id = int(time.time())
        for name in self.results:
            prepare, runners = plan.PLANS[name]
            kind = SERVER_KINDS[name]
            try:
                server = stack.enter_context(kind(self.workdir))
                self.results[name]["info"] = server.info
                self.log(f"{kind.title}: started on {server.url} (pid {server.pid}); preparing")
                prepare(server, warmup_s)
            except BenchError as e:
                self.results[name]["error"] = str(e)
                self.log(f"{kind.title}: not measured: {e}")
                continue
            self.servers[name] = server
            self.runners[name] = runners(server, run_id)

    def probe_disk(self, scenario):
        if self.disk_irqs is None:
            self.disk_irqs = irqs.disk_irqs(self.workdir)
            self.irqs_before = irqs.read_per_cpu(self.disk_irqs) if self.disk_irqs else None
        us = fdatasync_probe_us(self.workdir)
        self.log(f"{plan.SCENARIOS[scenario][0]}: the disk's fdatasync of 4 KiB: {us} µs")
        for r in self.results.values():
            r.setdefault("fdatasync_4k_us", {})[scenario] = us

    def note_disk_irqs(self):
        """Each CPU's share of the disk's interrupts since the first durable figure."""
        if not self.irqs_before:
            return
        taken = irqs.shares(self.irqs_before, irqs.read_per_cpu(self.disk_irqs))
        if taken is not None:
            self.log(f"the disk's interrupts since the first durable figure: "
                     f"{irqs.describe(taken)}")
        for r in self.results.values():
            r["disk_irq_shares"] = taken

    def take(self, key):
        """Every server's figure of `key`, over the rounds."""
        title = f"{plan.SCENARIOS[key[0]][0]:<28} c={key[1]:<3}"
        runs = {}
        for round_no in range(self.rounds):
            for name in rotated([n for n in self.servers if key in self.runners[n]], round_no):
                row = measure_figure(self.runners[name][key], self.duration_s, self.quiet,
                                     self.log, f"{name:<8} {title}")
                runs.setdefault(name, []).append(row)
                self.log(f"{name:<8} {title} round {round_no + 1}: {fmt_row(row)}")
                server = self.servers[name]
                if not server.proc.alive():
                    self.results[name]["error"] = f"the server died: {server.proc.log_tail()}"
                    self.log(f"{name:<8} {self.results[name]['error']}")
                    del self.servers[name]
        for name, rows in runs.items():
            self.results[name]["rows"][key] = combine(rows)


def measure(names, workdir, duration_s, rounds, quiet, log, warmup_s):
    """Every figure of every server named: {name: {"rows": {(scenario,
    conns): row}, "error": ..., "info": ...}}."""
    run = Run(names, workdir, duration_s, rounds, quiet, log)
    with contextlib.ExitStack() as stack:
        run.start(stack, warmup_s)
        busy = quiet.wait()
        log(f"CPUs {busy:.0%} busy before the first figure")
        probed = set()
        for key in plan.keys():
            if key[0] in plan.DURABLE and key[0] not in probed:
                probed.add(key[0])
                run.probe_disk(key[0])
            run.take(key)
        run.note_disk_irqs()
    return run.results

