"""The load benchmark's own behaviour (bench/load.py, bench/harness/,
bench/plyvel_sketch.py), never its timings: the sketch baseline keeps the
promises it is measured with, the report's medians, ratios and goals are
computed as documented, the tools' output is parsed as they print it, and a
missing tool is named with what to install."""

import argparse
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

from conftest import Conn

BENCH = Path(__file__).resolve().parents[1] / "bench"
sys.path.insert(0, str(BENCH))

import load  # noqa: E402
from harness import base, irqs, measure, plan, report, runners, servers  # noqa: E402

PYTHON = sys.executable
START_TIMEOUT_S = 15.0


# --- the sketch, a real subprocess ------------------------------------------------

class Sketch:
    def __init__(self, data):
        self.data = data
        self.port = servers.free_port()
        self.proc = subprocess.Popen(
            [PYTHON, str(BENCH / "plyvel_sketch.py"), "--port", str(self.port),
             "--data", str(data)], stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
        deadline = time.monotonic() + START_TIMEOUT_S
        while True:
            assert self.proc.poll() is None, self.proc.stderr.read().decode()
            try:
                socket.create_connection(("127.0.0.1", self.port), timeout=0.2).close()
                return
            except OSError:
                assert time.monotonic() < deadline, "the sketch did not start"
                time.sleep(0.05)

    def stop(self):
        self.proc.terminate()
        self.proc.wait(10)
        self.proc.stderr.close()

    def conn(self):
        return Conn("127.0.0.1", self.port)

    def ask(self, method, target):
        with self.conn() as c:
            c.send(f"{method} {target} HTTP/1.1\r\nHost: x\r\n\r\n".encode())
            r = c.response()
        return r.status, json.loads(r.body)


@pytest.fixture
def sketch(tmp_path):
    s = Sketch(tmp_path / "data")
    yield s
    s.stop()


def test_sketch_keeps_acknowledged_mods_across_a_restart(tmp_path):
    s = Sketch(tmp_path / "data")
    try:
        assert s.ask("PATCH", "/mod?cred=a&by=10") == (200, {"tot": 10, "seq": 1})
        assert s.ask("PATCH", "/mod?cred=a&by=-3&min=0") == (200, {"tot": 7, "seq": 2})
        assert s.ask("PATCH", "/mod?cred=b&by=5") == (200, {"tot": 5, "seq": 1})
    finally:
        s.stop()
    s = Sketch(tmp_path / "data")
    try:
        assert s.ask("GET", "/tot?cred=a") == (200, {"tot": 7})
        assert s.ask("GET", "/tot?cred=b") == (200, {"tot": 5})
        assert s.ask("PATCH", "/mod?cred=a&by=1") == (200, {"tot": 8, "seq": 3})
    finally:
        s.stop()


def test_sketch_answers_pipelined_requests_in_order(sketch):
    """A read sees exactly the earlier mods of its connection; a refused
    charge shows the balance it saw; the last request's close is honoured."""
    reqs = ["PATCH /mod?cred=p&by=5", "GET /tot?cred=p", "PATCH /mod?cred=p&by=-2",
            "GET /tot?cred=p", "GET /tot?cred=nobody", "PATCH /mod?cred=p&by=-9&min=0",
            "PATCH /mod?cred=p&by=-3&min=0", "GET /tot?cred=p"]
    wire = "".join(f"{r} HTTP/1.1\r\nHost: x\r\n\r\n" for r in reqs[:-1])
    wire += f"{reqs[-1]} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n"
    with sketch.conn() as c:
        c.send(wire.encode())
        replies = [(r.status, json.loads(r.body)) for r in c.responses(len(reqs))]
        assert c.closed_by_peer()
    assert [status for status, _ in replies] == [200, 200, 200, 200, 404, 409, 200, 200]
    assert [body.get("tot") for _, body in replies] == [5, 5, 3, 3, None, 3, 0, 0]
    assert replies[5][1]["error"] == "insufficient"


@pytest.mark.parametrize("target, wrong", [
    ("/mod?cred=a&by=%2B1", "by"), ("/mod?cred=a&by=01", "by"), ("/mod?cred=a&by=0", "by"),
    ("/mod?cred=a&by=1&by=2", "repeated"), ("/mod?cred=a&by=1&x=1", "unknown"),
    ("/mod?cred=a%20b&by=1", "cred"), ("/mod?cred=a&by=1&min=-0", "min"),
    ("/mod?cred=a&by=99999999999999999999", "by"),
])
def test_sketch_refuses_bad_input_and_changes_nothing(sketch, target, wrong):
    assert sketch.ask("PATCH", "/mod?cred=a&by=10")[0] == 200
    status, body = sketch.ask("PATCH", target)
    assert status == 400 and wrong in body["detail"]
    assert sketch.ask("GET", "/tot?cred=a") == (200, {"tot": 10})


def test_sketch_opens_accounts_only_by_funding(sketch):
    status, body = sketch.ask("PATCH", "/mod?cred=new&by=-1")
    assert (status, body["error"]) == (404, "no_account")
    assert sketch.ask("GET", "/tot?cred=new")[0] == 404
    assert sketch.ask("PATCH", "/mod?cred=new&by=1") == (200, {"tot": 1, "seq": 1})


def test_sketch_refuses_a_body_and_closes(sketch):
    with sketch.conn() as c:
        c.send(b"PATCH /mod?cred=a&by=1 HTTP/1.1\r\nContent-Length: 2\r\n\r\nxx")
        r = c.response()
        assert r.status == 400 and "body" in json.loads(r.body)["detail"]
        assert c.closed_by_peer()
    assert sketch.ask("GET", "/tot?cred=a")[0] == 404


# --- AccMan as the benchmark starts it ----------------------------------------------

def test_the_harness_starts_accman_by_its_command_and_funds_it(tmp_path):
    """`accman serve` as a subprocess, found by its ready line, whatever the
    package's layout; funded over HTTP as the plan does."""
    with servers.AccManServer(tmp_path) as server:
        runners.fund_accounts(server.port, plan.CYCLE_PREFIX, 3, plan.FUND_BY)
        with Conn("127.0.0.1", server.port) as c:
            c.send(f"GET /tot?cred={plan.CYCLE_PREFIX}2 HTTP/1.1\r\nHost: localhost\r\n\r\n"
                   .encode())
            r = c.response()
        assert (r.status, json.loads(r.body)) == (200, {"tot": plan.FUND_BY})
        pid = server.pid
    assert server.proc.popen.poll() is not None
    with pytest.raises(ProcessLookupError):
        os.killpg(pid, 0)


# --- the tools' output, parsed as they print it -------------------------------------

WRK_OUT = """\
Running 5s test @ http://127.0.0.1:4000/
  1 threads and 64 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency   910.12us  400.00us   9.00ms   80.00%
    Req/Sec    61.00k     2.00k   64.00k    70.00%
  Latency Distribution
     50%  850.00us
     75%    1.10ms
     90%    1.50ms
     99%    3.33ms
  305575 requests in 5.00s, 30.00MB read
  Non-2xx or 3xx responses: 12
Requests/sec:  61115.00
Transfer/sec:      6.00MB
"""


def test_parse_wrk_reads_rate_latency_and_failures():
    row = runners.parse_wrk(WRK_OUT)
    assert row["rps"] == 61115.0
    assert row["p50_us"] == 850.0 and row["p99_us"] == 3330.0
    assert row["mean_us"] == 910.12 and row["max_us"] == 9000.0
    assert row["requests"] == 305575 and row["non_2xx"] == 12 and row["socket_errors"] == 0


def test_parse_wrk_leaves_out_a_zero_percentile():
    """wrk prints 0 for the 99th percentile of pipelined runs: no figure."""
    row = runners.parse_wrk(WRK_OUT.replace("99%    3.33ms", "99%    0.00us"))
    assert row["p99_us"] is None and row["p50_us"] == 850.0


def test_parse_wrk_without_a_rate_is_an_error():
    with pytest.raises(base.BenchError, match="no Requests/sec"):
        runners.parse_wrk("unable to connect to 127.0.0.1:1 Connection refused\n")


def test_parse_redis_csv():
    text = ('"test","rps","avg_latency_ms","min_latency_ms","p50_latency_ms",'
            '"p95_latency_ms","p99_latency_ms","max_latency_ms"\n'
            '"INCRBY bench:__rand_int__ -1","78079.00","0.800","0.100","0.727",'
            '"1.100","1.310","5.000"\n')
    row = runners.parse_redis_csv(text, 390000)
    assert row["rps"] == 78079.0 and row["p50_us"] == 727.0 and row["p99_us"] == 1310.0
    assert row["requests"] == 390000


# --- rounds, ratios and goals -------------------------------------------------------

def fig(rps, p99=1000.0, **kw):
    return dict(rps=rps, p50_us=p99 / 2, p99_us=p99, non_2xx=0, socket_errors=0,
                server_cpu=0.9, load_cpu=0.5, others_cpu=0.0, server_core_busy=0.95,
                load_core_busy=0.6, **kw)


def test_combine_takes_each_figure_s_median_and_keeps_the_rounds():
    row = measure.combine([fig(30_000, 900), fig(10_000, 3000), fig(20_000, 1500)])
    assert row["rps"] == 20_000 and row["p99_us"] == 1500
    assert row["rounds_rps"] == [30_000, 10_000, 20_000]
    assert row["rounds_p99_us"] == [900, 3000, 1500]


def test_combine_leaves_out_failed_rounds():
    row = measure.combine([{"error": "wrk exited 1"}, fig(10_000), fig(20_000)])
    assert row["rps"] == 15_000 and row["rounds_rps"] == [None, 10_000, 20_000]
    assert measure.combine([{"error": "boom"}])["error"] == "boom"


def test_rotation_gives_every_server_every_place():
    names = ["accman", "redis", "sketch"]
    firsts = {measure.rotated(names, r)[0] for r in range(3)}
    assert firsts == set(names)


def results_of(rows_by_server):
    return {name: {"server": name, "rows": rows, "error": None, "info": {}}
            for name, rows in rows_by_server.items()}


def test_goals_judge_ratios_of_medians_and_count_rounds():
    mod16 = ("mod", 16)
    results = results_of({
        "accman": {mod16: measure.combine([fig(26_000, 1500), fig(24_000, 2500),
                                           fig(30_000, 1800)])},
        "redis": {mod16: measure.combine([fig(20_000), fig(24_000), fig(25_000)])},
    })
    by_name = {g["goal"]: g for g in report.goals(results)}
    ratio = by_name["durable /mod at 16 connections vs Redis AOF always"]
    assert ratio["value"] == pytest.approx(26_000 / 24_000)
    assert ratio["met"] is False and ratio["status"].startswith("NOT MET (2 of 3 rounds)")
    assert ratio["rounds"] == "1.30x, 1.00x, 1.20x"
    p99 = by_name["durable /mod p99 at 16 connections"]
    assert p99["value"] == 1800 and p99["met"] is True and "(2 of 3 rounds)" in p99["status"]
    assert by_name["/tot at 16 connections vs nginx static 200"]["status"] == "not measured"


def test_markdown_gives_every_row_a_ratio_to_each_peer_measured():
    keys = plan.keys()
    results = results_of({
        "accman": {k: measure.combine([fig(2000)]) for k in keys},
        "redis": {k: measure.combine([fig(1000)]) for k in keys},
        "sketch": {k: measure.combine([fig(4000)]) for k in keys},
    })
    meta = {"rounds": 1, "goals": report.goals(results)}
    text = report.markdown(results, meta)
    head = "| route | conns | vs Redis AOF always | vs uvloop+plyvel sketch |"
    assert head in text
    ratio_rows = text.split(head)[1].split("\n\n")[0].strip().splitlines()[1:]
    assert len(ratio_rows) == len(keys)
    assert all(r.endswith("| 2.00x | 0.50x |") for r in ratio_rows)


# --- the disk's interrupts ---------------------------------------------------------

INTERRUPTS = """\
           CPU0       CPU1       CPU2
 24:          1          0          0  IO-APIC   5-edge      ACPI:Ged
 35:          0          1          0  PCI-MSIX-0000:00:02.0   0-edge      virtio1-config
 36:         10     775941          5  PCI-MSIX-0000:00:02.0   1-edge      virtio1-req.0
NMI:          0          0          0  Non-maskable interrupts
LOC:   13032061   12899352          7  Local timer interrupts
"""


def test_interrupts_are_summed_per_cpu_over_the_disk_s_lines_only():
    assert irqs.per_cpu([35, 36], INTERRUPTS) == [10, 775942, 5]
    assert irqs.per_cpu([24], INTERRUPTS) == [1, 0, 0]
    assert irqs.per_cpu([], INTERRUPTS) == [0, 0, 0]


def test_shares_are_of_the_interrupts_between_two_readings():
    assert irqs.shares([10, 100], [10, 400]) == [0.0, 1.0]
    assert irqs.shares([0, 0], [30, 10]) == [0.75, 0.25]
    assert irqs.shares([5, 5], [5, 5]) is None


def _fake_sysfs(tmp_path, directory, device_rel, msi=(), legacy=None):
    """A sysfs tree in which `directory`'s block device is `device_rel`
    under devices/, the MSI interrupts or legacy irq put where given."""
    sys_root = tmp_path / "sys"
    dev = os.stat(directory).st_dev
    block = sys_root / "devices" / device_rel
    block.mkdir(parents=True)
    (sys_root / "dev" / "block").mkdir(parents=True)
    (sys_root / "dev" / "block" / f"{os.major(dev)}:{os.minor(dev)}").symlink_to(block)
    return sys_root, block


def test_the_disk_s_interrupts_are_its_nearest_device_s(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sys_root, block = _fake_sysfs(tmp_path, data, "pci0000:00/0000:00:02.0/virtio1/block/vda")
    pci = block.parents[2]
    (pci / "msi_irqs").mkdir()
    for n in ("36", "35"):
        (pci / "msi_irqs" / n).write_text("msix\n")
    assert irqs.disk_irqs(data, sys_root=sys_root) == [35, 36]


def test_a_legacy_irq_is_found_and_no_device_gives_none(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    sys_root, block = _fake_sysfs(tmp_path, data, "platform/ata0/host0/block/sda")
    assert irqs.disk_irqs(data, sys_root=sys_root) == []         # no interrupt said
    (block.parents[1] / "irq").write_text("14\n")
    assert irqs.disk_irqs(data, sys_root=sys_root) == [14]
    assert irqs.disk_irqs(data, sys_root=tmp_path / "empty") == []   # no block device


def test_the_report_says_where_the_disk_s_interrupts_went():
    results = results_of({"accman": {("mod", 16): measure.combine([fig(1000)])}})
    results["accman"]["disk_irq_shares"] = [0.02, 0.98]
    text = "\n".join(report.notes(results))
    assert "the disk's interrupts from the first durable figure on, by CPU: CPU 0 2%, " \
           "CPU 1 98% (servers on CPU 0, load generators on CPU 1" in text
    del results["accman"]["disk_irq_shares"]
    assert "interrupts" not in "\n".join(report.notes(results))


def _idle_sysfs(root, driver=None, governor=None, governor_ro=None, poll=None):
    idle = root / "devices" / "system" / "cpu" / "cpuidle"
    idle.mkdir(parents=True)
    for name, value in (("current_driver", driver), ("current_governor", governor),
                        ("current_governor_ro", governor_ro)):
        if value is not None:
            (idle / name).write_text(value + "\n")
    if poll is not None:
        params = root / "module" / "haltpoll" / "parameters"
        params.mkdir(parents=True)
        (params / "guest_halt_poll_ns").write_text(f"{poll}\n")
    return root


def test_idle_polling_says_whether_an_idle_cpu_polls_before_it_halts(tmp_path):
    root = _idle_sysfs(tmp_path / "a", "haltpoll", governor="haltpoll", poll=0)
    idle = irqs.idle_polling(sys_root=root)
    assert idle == {"driver": "haltpoll", "governor": "haltpoll", "halt_poll_ns": 0}
    assert irqs.describe_idle(idle) == ("cpuidle driver haltpoll, governor haltpoll, "
                                        "guest_halt_poll_ns 0 (an idle CPU halts at once)")
    (root / irqs.HALT_POLL_NS).write_text("200000\n")
    assert irqs.describe_idle(irqs.idle_polling(sys_root=root)).endswith(
        "guest_halt_poll_ns 200000 (an idle CPU polls up to 200 µs first)")
    menu = dict(idle, governor="menu", halt_poll_ns=200000)     # the window is not menu's
    assert irqs.describe_idle(menu) == "cpuidle driver haltpoll, governor menu"
    for ns, window in ((400, "400 ns"), (1500, "1,500 ns"), (4294967295, "4,294,967 µs")):
        assert irqs.describe_idle(dict(idle, halt_poll_ns=ns)).endswith(
            f"(an idle CPU polls up to {window} first)")


def test_idle_polling_reads_a_read_only_governor(tmp_path):
    root = _idle_sysfs(tmp_path / "ro", "haltpoll", governor_ro="haltpoll", poll=0)
    assert irqs.idle_polling(sys_root=root)["governor"] == "haltpoll"


def test_idle_polling_says_what_sysfs_does_not_say(tmp_path):
    idle = irqs.idle_polling(sys_root=tmp_path / "missing")
    assert idle == {"driver": None, "governor": None, "halt_poll_ns": None}
    assert irqs.describe_idle(idle) == "sysfs does not say how the CPUs idle"
    unreadable = _idle_sysfs(tmp_path / "dir")
    (unreadable / irqs.CPUIDLE_DIR / "current_driver").mkdir()     # read: IsADirectoryError
    assert irqs.idle_polling(sys_root=unreadable)["driver"] is None
    none = irqs.idle_polling(sys_root=_idle_sysfs(tmp_path / "none", "none"))
    assert irqs.describe_idle(none) == "no cpuidle driver (an idle CPU halts at once)"


HALTPOLL_OFF = {"driver": "haltpoll", "governor": "haltpoll", "halt_poll_ns": 0}


def test_the_report_says_how_the_cpus_idled_where_a_durable_figure_was_taken():
    durable = results_of({"accman": {("mod", 16): measure.combine([fig(1000)])}})
    reads = results_of({"accman": {("tot", 16): measure.combine([fig(1000)])}})
    failed = results_of({"accman": {("mod", 16): {"error": "wrk exited 1"}}})
    meta = {"rounds": 1, "goals": [], "machine": {"idle": HALTPOLL_OFF}}
    line = ("- how the CPUs idle, as sysfs said before the run: cpuidle driver haltpoll, "
            "governor haltpoll, guest_halt_poll_ns 0 (an idle CPU halts at once) (on a VM")
    assert line in report.markdown(durable, meta)
    assert "sysfs said" not in report.markdown(reads, meta)
    assert "sysfs said" not in "\n".join(report.notes(failed, meta["machine"]))
    assert "sysfs said" not in report.markdown(durable, dict(meta, machine={"cpus": 2}))
    changed = {"idle": HALTPOLL_OFF, "idle_after": dict(HALTPOLL_OFF, halt_poll_ns=200000)}
    assert ("halts at once); after it: cpuidle driver haltpoll, governor haltpoll, "
            "guest_halt_poll_ns 200000") in report.markdown(durable, dict(meta, machine=changed))


def test_the_run_records_how_the_cpus_idled_before_and_after(monkeypatch):
    now = dict(HALTPOLL_OFF)
    monkeypatch.setattr(irqs, "idle_polling", lambda: dict(now))
    machine = report.machine_info()
    assert machine["idle"] == HALTPOLL_OFF
    json.dumps(machine)                                 # load.json takes it
    report.note_idle_after(machine)
    assert "idle_after" not in machine
    now["halt_poll_ns"] = 200000
    report.note_idle_after(machine)
    assert machine["idle_after"]["halt_poll_ns"] == 200000


def test_load_reads_how_the_cpus_idle_again_after_the_run(monkeypatch):
    """load.run reads the setting before measuring and again after: a
    window changed meanwhile is in the run's machine info."""
    now = dict(HALTPOLL_OFF)

    def measured(*args):
        now["halt_poll_ns"] = 200000        # root changes it while the figures are taken
        return {}
    monkeypatch.setattr(irqs, "idle_polling", lambda: dict(now))
    monkeypatch.setattr(measure, "measure", measured)
    args = argparse.Namespace(quiet_budget=0, duration=1, rounds=1, quick=True,
                              only=["redis"], profile=False, save_profile=False)
    _, meta = load.run(args, lambda msg: None)
    assert meta["machine"]["idle"] == HALTPOLL_OFF
    assert meta["machine"]["idle_after"]["halt_poll_ns"] == 200000

# --- the plan ----------------------------------------------------------------------

class Started:
    """What a plan needs of a started server: where it is."""
    url, pid, port = "http://127.0.0.1:1/", 1, 1


def test_every_server_has_every_row_its_routes_allow():
    run_id = 1
    for name in ("accman", "sketch", "uvicorn", "redis"):
        assert set(plan.PLANS[name][1](Started(), run_id)) == set(plan.keys()), name
    nginx = set(plan.PLANS["nginx"][1](Started(), run_id))
    assert nginx == {k for k in plan.keys() if k[0] in plan.READ_ONLY}
    assert {g[1] for g in report.GOALS} <= set(plan.keys())
    assert set(plan.PLANS) == set(report.SERVERS) == set(servers.SERVER_KINDS)


def test_every_scenario_has_a_wrk_script():
    assert set(plan.WRK_SCRIPTS) == set(plan.SCENARIOS)
    assert all((base.WRK_DIR / script).is_file() for script in plan.WRK_SCRIPTS.values())


# --- a missing tool is named, with what to install ---------------------------------

def path_with_only(tmp_path, *tools):
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in tools:
        os.symlink(servers.find_tool(tool), bin_dir / tool)
    return str(bin_dir)


def test_load_py_without_wrk_says_what_to_install(tmp_path):
    env = dict(os.environ, PATH=path_with_only(tmp_path, "taskset"))
    out = subprocess.run([PYTHON, str(BENCH / "load.py"), "--quick", "--only", "accman"],
                         capture_output=True, text=True, env=env, timeout=60)
    assert out.returncode == 2
    assert "wrk is not installed (apt-get install -y wrk)" in out.stderr


def test_a_missing_redis_is_reported_with_what_to_install(tmp_path, monkeypatch):
    monkeypatch.setenv("PATH", path_with_only(tmp_path, "taskset"))
    with pytest.raises(base.BenchError, match=r"redis-server is not installed "
                                              r"\(apt-get install -y redis-server\)"):
        with servers.RedisServer(tmp_path):
            pass
    names = {line.split()[0] for line in load.missing_tools(["redis"])}
    assert names == {"redis-server", "redis-benchmark"}
