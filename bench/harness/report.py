"""The report: AccMan's figures, its ratio to each peer measured in the same
run, the goals with met / not met, and the machine they were taken on; as
markdown (printed, and bench/results/load.md) and as bench/results/load.json.
These are figures, never test assertions."""

import datetime
import json
import os
import platform
import subprocess
from importlib import metadata

from . import irqs, plan
from .base import LOAD_CPU, REPO_DIR, SERVER_CPU
from .cpu import OTHERS_CPU_MAX
from .servers import SERVER_KINDS, tool_version, uvicorn_http_impl

# The order of the columns: AccMan, then the peers that issue 14 asks every
# row's ratio to, then the others.
SERVERS = ("accman", "redis", "sketch", "nginx", "uvicorn")
PEERS = SERVERS[1:]

# Issue 14's goals, as same-run figures: (goal, key, kind, whose, required).
# A ratio is AccMan's req/s over the peer's; a p99 is AccMan's, in µs.
GOALS = (
    ("durable /mod at 16 connections vs Redis AOF always", ("mod", 16), "ratio", "redis", 1.1),
    ("durable /mod at 64 connections vs Redis AOF always", ("mod", 64), "ratio", "redis", 1.1),
    ("durable /mod pipelined x16, 64 connections, vs Redis AOF always", ("mod_pipelined", 64),
     "ratio", "redis", 0.6),
    ("durable /mod p99 at 16 connections", ("mod", 16), "p99_max_us", "accman", 2000),
    ("/tot at 16 connections vs nginx static 200", ("tot", 16), "ratio", "nginx", 0.9),
)


def fmt_rps(v):
    return "—" if v is None else f"{v:,.0f}"


def fmt_us(v):
    if v is None:
        return "—"
    return f"{v:.0f} µs" if v < 1000 else f"{v / 1000:.2f} ms"


def fmt_row(row):
    """One figure on one line, for the log."""
    if row.get("error"):
        return "error: " + row["error"]
    flags = ""
    if row.get("non_2xx") or row.get("socket_errors"):
        flags = f"  (!{row['non_2xx']} non-2xx, {row['socket_errors']} socket errors)"
    cpu = ""
    if row.get("server_cpu") is not None:
        cpu = (f"  cpu server {row['server_cpu']:.2f} load {row['load_cpu']:.2f} "
               f"others {row['others_cpu']:.2f}; core busy {row['server_core_busy']:.2f}"
               f"/{row['load_core_busy']:.2f}")
    return (f"{fmt_rps(row['rps']):>10} req/s  p50 {fmt_us(row['p50_us']):>9}  "
            f"p99 {fmt_us(row['p99_us']):>9}{cpu}{flags}")


def title(name):
    return SERVER_KINDS[name].title


def scenario_keys(results):
    """The keys that some server measured, in the plan's order."""
    measured = {k for r in results.values() for k in r["rows"]}
    return [k for k in plan.keys() if k in measured]


def good(results, name, key):
    row = results.get(name, {}).get("rows", {}).get(key)
    if row is None or row.get("error") or row.get("rps") is None:
        return None
    return row


def ratio(results, key, peer):
    """AccMan's req/s over the peer's (medians); None if either is missing."""
    a, b = good(results, "accman", key), good(results, peer, key)
    if a is None or b is None or not b["rps"]:
        return None
    return a["rps"] / b["rps"]


def round_ratios(results, key, peer):
    """AccMan's req/s over the peer's in each round (None where either failed)."""
    a, b = good(results, "accman", key), good(results, peer, key)
    if a is None or b is None:
        return []
    return [x / y if x is not None and y else None
            for x, y in zip(a.get("rounds_rps", [a["rps"]]), b.get("rounds_rps", [b["rps"]]),
                            strict=False)]


def goal(results, name, key, kind, who, required):
    """One goal judged: what it needs, what was measured (median, and by round)."""
    if kind == "ratio":
        measured = ratio(results, key, who)
        by_round = round_ratios(results, key, who)
        need = f">= {required}x {title(who)}"
        text = "—" if measured is None else f"{measured:.2f}x"
        ok = measured is not None and measured >= required
        rounds_ok = [r >= required for r in by_round if r is not None]
        rounds = ", ".join("—" if r is None else f"{r:.2f}x" for r in by_round)
    else:
        row = good(results, who, key)
        measured = row and row["p99_us"]
        need = f"<= {fmt_us(required)}"
        text = fmt_us(measured)
        ok = measured is not None and measured <= required
        by_round = (row or {}).get("rounds_p99_us", [])
        rounds_ok = [r <= required for r in by_round if r is not None]
        rounds = ", ".join(fmt_us(r) for r in by_round)
    status = "not measured" if measured is None else ("met" if ok else "NOT MET")
    if rounds_ok:
        status += f" ({sum(rounds_ok)} of {len(rounds_ok)} rounds)"
    return {"goal": name, "required": need, "measured": text, "value": measured,
            "rounds": rounds, "met": ok if measured is not None else None, "status": status}


def goals(results):
    return [goal(results, *g) for g in GOALS]


def _table(head, rows, align):
    lines = ["| " + " | ".join(head) + " |", "|" + "|".join(align) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def _by_key(results, present, cell):
    """A table with a row per key and a column per server (or peer)."""
    return [[plan.SCENARIOS[k[0]][0], str(k[1]), *(cell(s, k) for s in present)]
            for k in scenario_keys(results)]


def _rps_cell(results):
    def cell(s, key):
        row = results[s]["rows"].get(key)
        if row is None:
            return ""
        if row.get("error"):
            return "error"
        mark = " (!)" if row.get("non_2xx") or row.get("socket_errors") else ""
        return fmt_rps(row["rps"]) + mark
    return cell


def _latency_cell(results):
    def cell(s, key):
        row = good(results, s, key)
        return "" if row is None else f"{fmt_us(row['p50_us'])} / {fmt_us(row['p99_us'])}"
    return cell


def _cpu_cell(results):
    def cell(s, key):
        row = good(results, s, key)
        if row is None or row.get("server_cpu") is None:
            return ""
        mark = " ~" if row.get("others_cpu", 0) > OTHERS_CPU_MAX else ""
        return f"{row['server_core_busy']:.2f} / {row['load_core_busy']:.2f}{mark}"
    return cell


def _ratio_cell(results):
    def cell(peer, key):
        r = ratio(results, key, peer)
        return "" if r is None else f"{r:.2f}x"
    return cell


def idle_note(machine, results):
    """How the CPUs idle, said where a durable figure was taken: what sysfs
    said before the run, and after it if that changed meanwhile (a change
    undone within the run is not seen)."""
    durable = any(s in plan.DURABLE and not row.get("error")
                  for r in results.values() for (s, _), row in r["rows"].items())
    if not durable or "idle" not in (machine or {}):
        return []
    line = (f"- how the CPUs idle, as sysfs said before the run: "
            f"{irqs.describe_idle(machine['idle'])}")
    if "idle_after" in machine:
        line += f"; after it: {irqs.describe_idle(machine['idle_after'])}"
    return [line + " (on a VM the durable figures move with it, docs/PERFORMANCE.md)"]


def note_idle_after(machine):
    """After a run: how the CPUs idle now, kept in `machine` if it changed."""
    now = irqs.idle_polling()
    if now != machine.get("idle"):
        machine["idle_after"] = now


def notes(results, machine=None):
    out = [f"- {title(s)}: not measured: {r['error']}" for s, r in results.items()
           if r["error"]]
    out += idle_note(machine, results)
    probes = next((r["fdatasync_4k_us"] for r in results.values()
                   if r.get("fdatasync_4k_us")), None)
    if probes:
        out.append("- the disk's fdatasync of a 4 KiB append (median), just before the "
                   "durable figures: " + ", ".join(
                       f"{plan.SCENARIOS[k][0]} {v} µs" for k, v in probes.items()))
    irq_shares = next((r["disk_irq_shares"] for r in results.values()
                       if r.get("disk_irq_shares")), None)
    if irq_shares:
        out.append("- the disk's interrupts from the first durable figure on, by CPU: "
                   f"{irqs.describe(irq_shares)} (servers on CPU {SERVER_CPU}, load "
                   f"generators on CPU {LOAD_CPU}: on a VM a halted CPU takes them late, "
                   "docs/PERFORMANCE.md)")
    rows = [row for r in results.values() for row in r["rows"].values()]
    if any(row.get("others_cpu", 0) > OTHERS_CPU_MAX for row in rows):
        out.append(f"- ~ other processes used more than {OTHERS_CPU_MAX} CPU during that "
                   f"figure even after retries: it is low")
    if any(row.get("non_2xx") or row.get("socket_errors") for row in rows):
        out.append("- (!) the run had non-2xx replies or socket errors: see load.json")
    return out


def markdown(results, meta):
    present = [s for s in SERVERS if s in results]
    peers = [p for p in PEERS if p in results]
    r, n = meta["rounds"], len(present)
    lines = [f"req/s, the median of {r} round{'s' * (r != 1)}:", ""]
    lines += _table(["route", "conns", *map(title, present)],
                    _by_key(results, present, _rps_cell(results)),
                    ["---", "---:", *["---:"] * n])
    lines += ["", "latency p50 / p99 (medians; pipelined rows per batch of "
              f"{plan.PIPELINE_DEPTH}):", ""]
    lines += _table(["route", "conns", *map(title, present)],
                    _by_key(results, present, _latency_cell(results)),
                    ["---", "---:", *["---:"] * n])
    if "accman" in results and peers:
        lines += ["", "AccMan's req/s over each peer's, same route and connections:", ""]
        lines += _table(["route", "conns", *(f"vs {title(p)}" for p in peers)],
                        _by_key(results, peers, _ratio_cell(results)),
                        ["---", "---:", *["---:"] * len(peers)])
    lines += ["", "CPU busy during the median round, the server's CPU / the load "
              "generator's (interrupts and softirqs included; near 1.00 that side bounds "
              "the figure; neither near it: the figure waits on round trips or the disk):", ""]
    lines += _table(["route", "conns", *map(title, present)],
                    _by_key(results, present, _cpu_cell(results)),
                    ["---", "---:", *["---:"] * n])
    lines += ["", "Goals (issue 14), each round's figure after the median:", ""]
    lines += _table(["goal", "required", "measured", "by round", ""],
                    [[g["goal"], g["required"], g["measured"], g["rounds"], g["status"]]
                     for g in meta["goals"]],
                    ["---", "---", "---:", "---:", "---"])
    extra = notes(results, meta.get("machine"))
    return "\n".join(lines + ([""] + extra if extra else [])) + "\n"


def machine_info():
    def pkg(name):
        try:
            return metadata.version(name)
        except metadata.PackageNotFoundError:
            return None
    cpu = None
    try:
        with open("/proc/cpuinfo") as f:
            cpu = next((line.split(":", 1)[1].strip() for line in f
                        if line.startswith("model name")), None)
    except OSError:
        pass
    git = tool_version(["git", "-C", str(REPO_DIR), "rev-parse", "--short", "HEAD"])
    dirty = subprocess.run(["git", "-C", str(REPO_DIR), "status", "--porcelain"],
                           capture_output=True, text=True).stdout.strip() != ""
    return {
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "cpu": cpu, "cpus": os.cpu_count(), "kernel": platform.release(),
        "python": platform.python_version(), "git": git, "git_dirty": dirty,
        "wrk": tool_version(["wrk", "-v"]),
        "packages": {p: pkg(p) for p in ("uvloop", "plyvel", "uvicorn", "starlette",
                                          "httptools")},
        "uvicorn_http": uvicorn_http_impl(),
        "idle": irqs.idle_polling(),
    }


def heading(meta):
    m = meta["machine"]
    return (f"# AccMan HTTP load benchmark: latest run\n\n"
            f"Written by `bench/load.py` on {m['date']}: {m['cpu']}, {m['cpus']} CPUs, "
            f"Linux {m['kernel']}, Python {m['python']}, AccMan {m['git']}"
            f"{' (uncommitted changes)' if m['git_dirty'] else ''}.  Servers pinned to "
            f"CPU {SERVER_CPU}, load generator to CPU {LOAD_CPU} (`wrk -t1`), "
            f"{meta['duration_s']} s per figure, {meta['rounds']} rounds, the servers "
            f"alternating.  uvicorn ran with {m['uvicorn_http']}.\n\n")


def write_results(results, meta, out_dir):
    out_dir.mkdir(parents=True, exist_ok=True)
    doc = dict(meta)
    doc["servers"] = {
        name: {"error": r["error"], "info": r["info"],
               "fdatasync_4k_us": r.get("fdatasync_4k_us"),
               "disk_irq_shares": r.get("disk_irq_shares"),
               "rows": [dict(scenario=s, conns=c, **row) for (s, c), row in r["rows"].items()]}
        for name, r in results.items()}
    (out_dir / "load.json").write_text(json.dumps(doc, indent=2) + "\n")
    (out_dir / "load.md").write_text(heading(meta) + markdown(results, meta))
