"""End to end: the real AccMan server and the example app (examples/app.py)
under a real uvicorn, each a subprocess, spoken to by httpx.

Funded, charged, header returned; 401 for a missing credential and an
unknown account; 402 when empty; 503 when AccMan goes down under a running
service; and no overdraft in reserve mode (server-side holds) under 100
concurrent requests on a nearly empty account.  tests/test_e2e_holds.py
has the clients' holds and events and a SIGKILLed service."""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import contextlib
import logging
import os
import re
import resource
import signal
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from accman.asgi import AccManMiddleware
from accman.client import AccManSyncClient
from accman.errors import Unavailable
from accman.limits import INT64_MAX, INT64_MIN
from asgi_harness import call, make_app
from ledgerhelp import wait_for

ROOT = Path(__file__).resolve().parent.parent
READY_TIMEOUT_S = 20.0
ACCMAN_READY = re.compile(r"http://127\.0\.0\.1:(\d+)")
UVICORN_READY = re.compile(r"Uvicorn running on http://127\.0\.0\.1:(\d+)")
HYPERCORN_READY = re.compile(r"Running on http://127\.0\.0\.1:(\d+)")


def uvicorn(app: str, http: str) -> list:
    """uvicorn serving `app` on a free port with the HTTP/1.1 protocol named:
    its default, `auto`, picks httptools wherever it is installed (the test
    extras install it), so a run that does not name one is never h11."""
    return ["-m", "uvicorn", app, "--app-dir", str(ROOT), "--host", "127.0.0.1",
            "--port", "0", "--no-access-log", "--http", http]


# The ASGI servers a service may run under: the command that serves `app`
# on a free port, and the ready line that names the port (on stderr).
SERVERS = {
    # h11: plain uvicorn's protocol (`pip install uvicorn`, the example's).
    "uvicorn": (lambda app: uvicorn(app, "h11"), UVICORN_READY),
    # uvicorn[standard]'s HTTP/1.1 protocol, whose disconnects are its own.
    "uvicorn --http httptools": (lambda app: uvicorn(app, "httptools"), UVICORN_READY),
    "hypercorn": (lambda app: ["-m", "hypercorn", app, "--bind", "127.0.0.1:0"],
                  HYPERCORN_READY),
    # Behind a proxy that strips /api: the scope's path is /api/..., its root_path /api.
    "uvicorn --root-path /api": (lambda app: [*SERVERS["uvicorn"][0](app), "--root-path",
                                              "/api"], UVICORN_READY),
}

FUNDER = "funder-token-0123456789abcdef"
SVC_CHECK = "svc-check-token-0123456789abcdef"       # read, charge
SVC_RESERVE = "svc-reserve-token-0123456789abcdef"   # read, charge: holds need no mint
SVC_READ = "svc-read-token-0123456789abcdef"         # read: a service's token set up wrong


def test_the_example_takes_an_empty_variable_as_unset_and_names_a_bad_one():
    """As the command line and the Node example: `ACCMAN_MODE=` in an env
    file is the default, and ACCMAN_HOLD_TTL_S is read in plain digits,
    a bad value named (int() would take "+90" and say nothing of "")."""
    def example(**env):
        script = "import examples.app as a; m = a.app; print(m.mode, m.hold_ttl_s, m._calls['url'])"
        return subprocess.run([sys.executable, "-c", script], cwd=ROOT, capture_output=True,
                              text=True, timeout=30,
                              env={**{k: v for k, v in os.environ.items()
                                      if not k.startswith("ACCMAN_")}, **env})
    empty = example(ACCMAN_URL="", ACCMAN_MODE="", ACCMAN_ON_UNAVAILABLE="",
                    ACCMAN_HOLD_TTL_S="", ACCMAN_TOKEN="")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout.split() == ["check", "None", "http://127.0.0.1:8035"]
    assert example(ACCMAN_MODE="reserve", ACCMAN_HOLD_TTL_S="30").stdout.split()[:2] == [
        "reserve", "30"]
    for bad in ("+90", " 90", "9_0", "1.5"):
        r = example(ACCMAN_HOLD_TTL_S=bad)
        assert r.returncode == 1
        assert f"ACCMAN_HOLD_TTL_S must be whole seconds in plain digits, not {bad!r}" in r.stderr


class Proc:
    """A subprocess whose stdout and stderr go to files, and the URL it
    announced in its ready line."""

    def __init__(self, name, cmd, log_dir: Path, env=None, file_bytes_max=None):
        self.name = name
        self.out = log_dir / f"{name}.out"
        self.err = log_dir / f"{name}.err"
        full_env = dict(os.environ, PYTHONUNBUFFERED="1", **(env or {}))

        def limit():        # `ulimit -f`: no file written past it (EFBIG; Python ignores SIGXFSZ)
            resource.setrlimit(resource.RLIMIT_FSIZE, (file_bytes_max, file_bytes_max))
        with open(self.out, "wb") as out, open(self.err, "wb") as err:
            self.proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                                         cwd=ROOT, env=full_env,
                                         preexec_fn=limit if file_bytes_max else None)
        self.url = None

    def wait_ready(self, pattern, stream: str) -> str:
        path = self.out if stream == "stdout" else self.err
        deadline = time.monotonic() + READY_TIMEOUT_S
        while time.monotonic() < deadline:
            m = pattern.search(path.read_text(errors="replace"))
            if m:
                self.url = f"http://127.0.0.1:{m.group(1)}"
                return self.url
            if self.proc.poll() is not None:
                break
            time.sleep(0.02)
        self.stop()
        raise RuntimeError(f"{self.name} not ready: {self.err.read_text(errors='replace')[-2000:]}")

    def stop(self, sig=signal.SIGTERM) -> None:
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


def start_accman(log_dir: Path, name="accman", port=0, file_bytes_max=None, store=None) -> Proc:
    """`accman serve` on `port` (0: any), on its data directory in `log_dir`,
    or on the PostgreSQL store URL `store` (the directory then its lock)."""
    tokens = log_dir / f"{name}-tokens"
    tokens.write_text(f"mint {FUNDER}\nread,charge {SVC_CHECK}\nread,charge {SVC_RESERVE}\n"
                      f"read {SVC_READ}\n")
    tokens.chmod(0o600)
    p = Proc(name, [sys.executable, "-m", "accman", "serve", "--host", "127.0.0.1",
                    "--port", str(port),
                    "--data", str(log_dir / f"{name}-data"), "--tokens", str(tokens),
                    *(["--store", store] if store else [])], log_dir,
             file_bytes_max=file_bytes_max)
    p.wait_ready(ACCMAN_READY, "stdout")
    return p


def start_app(log_dir: Path, name: str, accman_url: str, mode: str, token: str,
              app: str = "examples.app:app", env=None, server: str = "uvicorn") -> Proc:
    """`app` under `server` (SERVERS); its `ready` is the ready line's pattern."""
    args, ready = SERVERS[server]
    proc = Proc(name, [sys.executable, *args(app)], log_dir,
                env={"ACCMAN_URL": accman_url, "ACCMAN_MODE": mode, "ACCMAN_TOKEN": token,
                     **(env or {})})
    proc.ready = ready
    return proc


@contextlib.contextmanager
def services(log_dir, prefix="", **app):
    """A real AccMan, and a service under an ASGI server (uvicorn unless
    `server=` says) in each mode (`app`: start_app's, the example's by
    default), all stopped at the end: {"accman", "funder" (a client with
    mint), "check", "reserve" (their URLs), "apps"}."""
    accman = start_accman(log_dir)
    apps = {mode: start_app(log_dir, f"{prefix}{mode}", accman.url, mode, token, **app)
            for mode, token in (("check", SVC_CHECK), ("reserve", SVC_RESERVE))}
    try:
        for a in apps.values():
            a.wait_ready(a.ready, "stderr")
        with AccManSyncClient(accman.url, FUNDER) as funder:
            yield {"accman": accman, "funder": funder, "apps": apps,
                   **{k: a.url for k, a in apps.items()}}
    finally:
        for a in apps.values():
            a.stop()
        accman.stop()


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    with services(tmp_path_factory.mktemp("e2e")) as s:
        yield s
    for app in s["apps"].values():
        log = app.err.read_text(errors="replace")
        assert "Traceback" not in log, log[-3000:]


_n = [0]


def new_cred(stack, tot=None) -> str:
    _n[0] += 1
    cred = f"e2e-{os.getpid()}-{time.monotonic_ns()}-{_n[0]}"
    if tot is not None:
        stack["funder"].mod(cred, tot, key="open")
    return cred


def tot(stack, cred) -> int:
    with AccManSyncClient(stack["accman"].url, SVC_CHECK) as acc:
        return acc.tot(cred)


def past(stack, cred) -> list:
    with AccManSyncClient(stack["accman"].url, SVC_CHECK) as acc:
        return acc.past(cred, limit=1000)[0]


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_a_funded_request_is_charged_and_told_its_balance(stack, mode):
    cred = new_cred(stack, 20)
    with httpx.Client(base_url=stack[mode]) as http:
        r = http.get("/weather", headers={"ACCMAN": cred})
        assert r.status_code == 200 and r.json()["city"] == "Lisbon"
        assert r.headers["accman"] == "19"
        r = http.get("/report", params={"rows": 25}, headers={"ACCMAN": cred})
        assert r.status_code == 200 and len(r.json()["rows"]) == 25
        assert r.headers["accman"] == "16"                   # 3 for 25 rows
        r = http.get("/report", params={"rows": 0}, headers={"ACCMAN": cred})
        assert r.status_code == 400 and r.headers["accman"] == "16"    # refused by the app: free
        assert http.get("/health").status_code == 200               # exempt, no header needed
    assert tot(stack, cred) == 16
    entries = list(reversed(past(stack, cred)))
    bys = [e.by for e in entries]
    if mode == "check":
        assert bys == [20, -1, -3]
    else:       # each request holds its estimate and settles it: the report's is 10
        assert bys == [20, -1, 0, -10, 7, -10, 10]
        holds = [e.hold for e in entries]
        assert holds == [None, 2, 2, 4, 4, 6, 6] and all(e.key is None for e in entries[2::2])


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_a_typo_and_a_wrong_method_cost_nothing(stack, mode):
    cred = new_cred(stack, 5)
    with httpx.Client(base_url=stack[mode]) as http:
        r = http.get("/nope", headers={"ACCMAN": cred})
        assert r.status_code == 404 and r.headers["accman"] == "5"
        r = http.post("/weather", headers={"ACCMAN": cred})
        assert r.status_code == 405 and r.headers["accman"] == "5"
    assert tot(stack, cred) == 5


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_no_credential_and_unknown_account_are_401(stack, mode):
    with httpx.Client(base_url=stack[mode]) as http:
        r = http.get("/weather")
        assert r.status_code == 401 and r.json()["error"] == "no_credential"
        r = http.get("/weather", headers={"ACCMAN": new_cred(stack)})
        assert r.status_code == 401 and r.json()["error"] == "no_account"


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_an_empty_account_is_402(stack, mode):
    cred = new_cred(stack, 1)
    with httpx.Client(base_url=stack[mode]) as http:
        assert http.get("/weather", headers={"ACCMAN": cred}).headers["accman"] == "0"
        r = http.get("/weather", headers={"ACCMAN": cred})
        assert r.status_code == 402
        assert r.json()["error"] == "insufficient" and r.json()["tot"] == 0
        r = http.get("/report", headers={"ACCMAN": cred})
        assert r.status_code == 402 and r.json()["cost"] == 10
    assert tot(stack, cred) == 0


def test_reserve_mode_never_overdraws_under_100_concurrent_requests(stack):
    exact = new_cred(stack, 5)           # /weather costs exactly 1
    refunding = new_cred(stack, 25)      # /report holds 10, charges 2 for 15 rows

    async def burst(path, cred, params=None):
        limits = httpx.Limits(max_connections=100)
        async with httpx.AsyncClient(base_url=stack["reserve"], limits=limits, timeout=30) as http:
            return await asyncio.gather(*(http.get(path, params=params, headers={"ACCMAN": cred})
                                          for _ in range(100)))

    replies = asyncio.run(burst("/weather", exact))
    codes = sorted(r.status_code for r in replies)
    assert codes == [200] * 5 + [402] * 95
    assert tot(stack, exact) == 0

    replies = asyncio.run(burst("/report", refunding, {"rows": 15}))
    ok = sum(r.status_code == 200 for r in replies)
    assert {r.status_code for r in replies} <= {200, 402} and ok >= 2
    assert tot(stack, refunding) == 25 - 2 * ok >= 0
    for cred in (exact, refunding):
        entries = past(stack, cred)
        assert all(e.tot >= 0 for e in entries)     # never below zero, at any step
        holds = collections.Counter(e.hold for e in entries if e.hold is not None)
        assert set(holds.values()) == {2}           # every hold started and ended once


def test_prices_and_exemptions_name_the_app_s_paths_under_a_root_path(tmp_path):
    """The example under `uvicorn --root-path /api`: a report of 25 rows
    costs its 3, not the default 1, and /health needs no credential, in
    both modes: the middleware matches the path as the app routes it."""
    with services(tmp_path, "rp-", server="uvicorn --root-path /api") as s:
        cred = new_cred(s, 20)
        for mode, left in (("check", 17), ("reserve", 14)):
            with httpx.Client(base_url=s[mode]) as http:
                assert http.get("/health").status_code == 200
                r = http.get("/report", params={"rows": 25}, headers={"ACCMAN": cred})
                assert r.status_code == 200 and r.headers["accman"] == str(left), mode
        assert tot(s, cred) == 14


def test_503_when_accman_goes_down_under_a_running_service(tmp_path):
    accman = start_accman(tmp_path, "accman-down")
    app = start_app(tmp_path, "app-down", accman.url, "reserve", SVC_RESERVE)
    try:
        app.wait_ready(UVICORN_READY, "stderr")
        cred = "down-test"
        with AccManSyncClient(accman.url, FUNDER) as funder:
            funder.mod(cred, 10)
        with httpx.Client(base_url=app.url) as http:
            r = http.get("/weather", headers={"ACCMAN": cred})
            assert r.status_code == 200 and r.headers["accman"] == "9"
            accman.stop(signal.SIGKILL)
            r = http.get("/weather", headers={"ACCMAN": cred})
            assert r.status_code == 503
            assert r.json()["error"] == "unavailable" and r.headers["retry-after"] == "1"
            assert http.get("/health").status_code == 200
    finally:
        app.stop()
        accman.stop()
    assert cred not in app.err.read_text(errors="replace")      # never logged


def test_check_mode_stops_admitting_while_accman_takes_no_writes(tmp_path):
    """An AccMan whose store cannot commit answers every write 503 and
    goes on answering /tot.  Check mode admitted on /tot, so a service with
    on_unavailable "closed" served every request, each charge owed.  Once a
    charge meets AccMan's own 503, admission goes back to the role probe,
    a write, which meets the same 503: refused.  The store is made unable
    to commit by a file-size limit its write-ahead log soon reaches."""
    accman = start_accman(tmp_path, "accman-full", file_bytes_max=(9 << 20) // 4)
    app = start_app(tmp_path, "app-full", accman.url, "check", SVC_CHECK)
    try:
        app.wait_ready(UVICORN_READY, "stderr")
        cred = "full-test"
        with AccManSyncClient(accman.url, FUNDER) as funder, \
                AccManSyncClient(accman.url, SVC_CHECK) as reader, \
                httpx.Client(base_url=app.url) as http:
            funder.mod(cred, 100)
            r = http.get("/weather", headers={"ACCMAN": cred})
            assert r.status_code == 200 and r.headers["accman"] == "99"
            with pytest.raises(Unavailable):
                for _ in range(5000):
                    funder.mod("full-filler", 1)
            assert reader.tot(cred) == 99                       # reads go on
            r = http.get("/weather", headers={"ACCMAN": cred})  # admitted on tot; owed
            assert r.status_code == 200 and "accman" not in r.headers
            r = http.get("/weather", headers={"ACCMAN": cred})
            assert r.status_code == 503 and r.json()["error"] == "unavailable"
    finally:
        app.stop(signal.SIGKILL)    # its owed charge cannot land: no drain
        accman.stop()


# --- the middleware's own faults, found by probing it as a service would ------
def test_forked_workers_draw_their_own_request_ids(stack):
    """A server that builds the app before it forks its workers (gunicorn
    --preload): each worker's charges have their own keys, so two requests
    are two charges, not one answered twice."""
    cred = new_cred(stack, 10)
    m = AccManMiddleware(make_app(), url=stack["accman"].url, token=SVC_CHECK)
    children = []
    for _ in range(2):
        pid = os.fork()
        if pid == 0:
            code = 1
            try:
                code = 0 if asyncio.run(call(m, cred=cred)).status == 200 else 3
            finally:
                os._exit(code)
        children.append(pid)
    assert [os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]) for pid in children] == [0, 0]
    charges = [e for e in past(stack, cred) if e.by < 0]
    assert [e.by for e in charges] == [-1, -1] and len({e.key for e in charges}) == 2
    assert tot(stack, cred) == 8


@pytest.mark.parametrize("on_unavailable", ["closed", "open"])
def test_a_token_without_charge_is_503_before_the_app_runs(stack, on_unavailable, caplog):
    cred = new_cred(stack, 10)
    served = []
    m = AccManMiddleware(make_app(calls=served), url=stack["accman"].url, token=SVC_READ,
                         on_unavailable=on_unavailable)
    with caplog.at_level(logging.ERROR, logger="accman.asgi"):
        replies = [asyncio.run(call(m, cred=cred)) for _ in range(2)]
    assert [r.status for r in replies] == [503, 503] and served == []
    assert "check the url and token" in caplog.text and SVC_READ not in caplog.text
    assert ("(403 forbidden): check the url and token; AccMan said: this call needs a token "
            "with the role charge") in caplog.text
    assert m.stats["unpaid_requests"] == 0 and tot(stack, cred) == 10
    assert [e.by for e in past(stack, cred)] == [10]        # the probe changed nothing


def test_an_account_at_int64_min_is_402_though_the_probe_meets_overflow(stack, caplog):
    """A charge of 1 leaves the range of a balance at INT64_MIN: the probe
    meets 409 overflow, with no `tot`.  It shows the role, as any 409 does:
    the balance is read, and the consumer is told it."""
    cred = new_cred(stack, 1)
    with AccManSyncClient(stack["accman"].url, SVC_CHECK) as acc:
        acc.mod(cred, -INT64_MAX)
        acc.mod(cred, -2)
    served = []
    m = AccManMiddleware(make_app(calls=served), url=stack["accman"].url, token=SVC_CHECK)
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        replies = [asyncio.run(call(m, cred=cred)) for _ in range(2)]
    assert [(r.status, r.headers.get("accman")) for r in replies] == [(402, str(INT64_MIN))] * 2
    assert replies[0].json()["error"] == "insufficient" and replies[0].json()["tot"] == INT64_MIN
    assert served == [] and caplog.text == ""
    assert m.stats["refused_insufficient"] == 2 and m.stats["refused_unavailable"] == 0
    assert [e.by for e in past(stack, cred)] == [-2, -INT64_MAX, 1]     # the probe changed nothing


def test_reserve_mode_is_402_for_an_account_at_int64_min(stack, caplog):
    """The hold of the estimate leaves the range of a balance at INT64_MIN:
    AccMan answers 409 overflow, with no `tot`; the balance does not cover
    the estimate, so the consumer is told 402 with it, not that AccMan is
    unavailable, and the log says nothing of the url or the token."""
    cred = new_cred(stack, 1)
    with AccManSyncClient(stack["accman"].url, SVC_CHECK) as acc:
        acc.mod(cred, -INT64_MAX)
        acc.mod(cred, -2)
    served = []
    m = AccManMiddleware(make_app(calls=served), url=stack["accman"].url, token=SVC_RESERVE,
                         mode="reserve", cost=2)
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        r = asyncio.run(call(m, cred=cred))
    assert (r.status, r.headers.get("accman")) == (402, str(INT64_MIN)), r.body
    assert r.json()["error"] == "insufficient" and r.json()["tot"] == INT64_MIN
    assert served == [] and caplog.text == ""
    assert m.stats["refused_insufficient"] == 1 and m.stats["refused_unavailable"] == 0
    assert [e.by for e in past(stack, cred)] == [-2, -INT64_MAX, 1]     # nothing held


def mods_answered(accman) -> int:
    """The /mod requests AccMan has answered, by its /metrics (the
    middleware's admission check is a mod that changes nothing)."""
    r = httpx.get(accman.url + "/metrics", headers={"Authorization": f"Bearer {SVC_READ}"})
    return sum(int(float(n)) for n in re.findall(
        r'^accman_requests_total\{route="mod",status="\d+"\} (\S+)$', r.text, re.M))


def test_an_owed_charge_lands_at_shutdown_of_an_app_without_lifespan(tmp_path):
    """tests/bare_app.py speaks no lifespan: the middleware answers uvicorn's
    lifespan itself, so its shutdown still waits for the owed charge."""
    accman = start_accman(tmp_path, "accman-bare")
    port = accman.url.rsplit(":", 1)[1]
    app = start_app(tmp_path, "app-bare", accman.url, "check", SVC_CHECK,
                    app="tests.bare_app:app")
    cred = "bare-app-test"
    try:
        app.wait_ready(UVICORN_READY, "stderr")
        with AccManSyncClient(accman.url, FUNDER) as funder:
            funder.mod(cred, 10)
        with httpx.Client(base_url=app.url, timeout=30) as http:
            funded = mods_answered(accman)
            with concurrent.futures.ThreadPoolExecutor(1) as pool:
                pending = pool.submit(http.get, "/work", params={"s": "1"},
                                      headers={"ACCMAN": cred})
                # Admitted (AccMan answered its check), working: only then
                # does AccMan go, however slow the app is to get there.
                wait_for(lambda: mods_answered(accman) != funded, what="the request admitted")
                accman.stop()
                r = pending.result()
        assert r.status_code == 200 and "accman" not in r.headers      # the charge is owed
        app.proc.send_signal(signal.SIGTERM)
        accman = start_accman(tmp_path, "accman-bare", port=port)
        app.proc.wait(20)
        assert tot({"accman": accman}, cred) == 9
        assert [e.key[-2:] for e in past({"accman": accman}, cred) if e.by < 0] == ["-c"]
    finally:
        app.stop()
        accman.stop()
    log = app.err.read_text(errors="replace")
    assert "stranded" not in log, log[-3000:]
