"""Holds and events end to end (issue 13): both clients and the command line
against the real AccMan server (a subprocess, with tokens), and the
middleware's reserve mode under a real uvicorn whose service is SIGKILLed
with a hold open.  The fake-server tests of the same calls, with faults, are
tests/test_client_holds.py, tests/test_cli_holds.py and
tests/test_asgi_reserve.py."""

from __future__ import annotations

import asyncio
import json
import signal
import threading
import time

import httpx
import pytest

from accman.client import AccManClient, AccManSyncClient
from accman.errors import HoldEnded, Insufficient, KeyReused, NoAccount, NoHold
from conftest import run_accman
from test_cli_holds import Follower
from test_e2e_asgi import (FUNDER, SVC_CHECK, SVC_RESERVE, UVICORN_READY, start_accman,
                           start_app)

EXPIRY_WAIT_S = 30.0        # how long a test waits for the server to end an expired hold


@pytest.fixture(scope="module")
def accman(tmp_path_factory):
    p = start_accman(tmp_path_factory.mktemp("e2e-holds"))
    yield p
    p.stop()


class AsyncAsSync:
    """An AccManClient driven call by call, on a loop of its own."""

    def __init__(self, url, token, **kw):
        self.loop = asyncio.new_event_loop()
        self.acc = AccManClient(url, token, **kw)

    def __getattr__(self, name):
        method = getattr(self.acc, name)
        return lambda *a, **kw: self.loop.run_until_complete(method(*a, **kw))

    def close(self):
        self.loop.run_until_complete(self.acc.aclose())
        self.loop.close()


@pytest.fixture(params=["async", "sync"])
def service(request, accman):
    """A client with the service's roles (read, charge), of each kind."""
    c = (AsyncAsSync if request.param == "async" else AccManSyncClient)(accman.url, SVC_CHECK)
    yield c
    c.close()


@pytest.fixture
def funder(accman):
    with AccManSyncClient(accman.url, FUNDER) as f:
        yield f


_n = [0]


def new_cred() -> str:
    _n[0] += 1
    return f"holds-{time.monotonic_ns()}-{_n[0]}"


def last_event(accman) -> int:
    with AccManSyncClient(accman.url, SVC_CHECK) as acc:
        after = 0
        while True:
            events, nxt = acc.events(after, limit=1000)
            if not events:
                return nxt
            after = nxt


def wait_for_tot(acc, cred, tot, timeout_s=EXPIRY_WAIT_S) -> float:
    """Seconds until `cred`'s balance is `tot`."""
    t = time.monotonic()
    while acc.tot(cred) != tot:
        assert time.monotonic() - t < timeout_s, f"tot stays {acc.tot(cred)}, not {tot}"
        time.sleep(0.1)
    return time.monotonic() - t


# --- the clients -------------------------------------------------------------------
def test_hold_settle_and_their_errors_on_the_real_server(service, funder):
    cred = new_cred()
    funder.mod(cred, 10)
    hold, tot, seq = service.hold(cred, -6, ttl_s=60, key="req-1-h")
    assert (hold, tot, seq) == (2, 4, 2) and service.tot(cred) == 4
    assert service.hold(cred, -6, ttl_s=60, key="req-1-h") == (2, 4, 2)   # keyed: once
    with pytest.raises(KeyReused):
        service.hold(cred, -6, ttl_s=61, key="req-1-h")
    assert service.settle(cred, hold, 2) == (8, 3)
    assert service.settle(cred, hold, 2) == (8, 3)                         # the first reply
    with pytest.raises(HoldEnded):
        service.settle(cred, hold, 1)
    with pytest.raises(NoHold):
        service.settle(cred, 99, 0)
    with pytest.raises(NoAccount):
        service.hold(new_cred(), -1, ttl_s=60)
    with pytest.raises(Insufficient) as e:
        service.hold(cred, -9, ttl_s=60)
    assert e.value.tot == 8
    h2, _, _ = service.hold(cred, -8, ttl_s=60)
    assert service.settle(cred, h2, 8) == (0, 5)                           # all used: by 0
    entries = service.past(cred).entries
    assert [(e.seq, e.by, e.hold) for e in entries] == [
        (5, 0, 4), (4, -8, 4), (3, 4, 2), (2, -6, 2), (1, 10, None)]


def test_events_carry_every_change_in_order(service, funder, accman):
    start = last_event(accman)
    cred = new_cred()
    funder.mod(cred, 10, low=5, key="fund")
    hold, _, _ = service.hold(cred, -6, ttl_s=60)          # 10 -> 4: under 5
    service.settle(cred, hold, 1)
    events, nxt = service.events(after=start)
    mine = [e for e in events if e.account == service.past(cred).account]
    assert [(e.type, e.seq, e.by, e.tot, e.hold) for e in mine if e.type != "low_balance"] == [
        ("mod", 1, 10, 10, None), ("hold", 2, -6, 4, hold), ("settle", 3, 5, 9, hold)]
    assert [e.type for e in mine].count("low_balance") == 1
    assert mine[0].key == "fund" and nxt == events[-1].id
    assert [e.id for e in events] == list(range(start + 1, nxt + 1))


def test_a_long_poll_on_the_real_server(accman, funder):
    cred = new_cred()

    async def go():
        async with AccManClient(accman.url, SVC_CHECK, timeout_s=0.5, retries=0) as acc:
            after = last_event(accman)
            t = time.monotonic()
            assert await acc.events(after, wait_s=1) == ([], after)    # longer than timeout_s
            assert time.monotonic() - t >= 0.9
            poll = asyncio.create_task(acc.events(after, wait_s=20))
            await asyncio.sleep(0.2)
            t = time.monotonic()
            await asyncio.get_running_loop().run_in_executor(None, funder.mod, cred, 4)
            events, _ = await poll
            return events, time.monotonic() - t
    events, elapsed = asyncio.run(go())
    assert [(e.type, e.by) for e in events][:1] == [("mod", 4)] and elapsed < 5


def test_an_unsettled_hold_ends_by_itself(service, funder, accman):
    cred = new_cred()
    funder.mod(cred, 10)
    start = last_event(accman)
    hold, tot, _ = service.hold(cred, -7, ttl_s=1)
    assert tot == 3
    wait_for_tot(service, cred, 10)
    with pytest.raises(HoldEnded):
        service.settle(cred, hold, 7)
    end = service.past(cred).entries[0]
    assert (end.by, end.tot, end.key, end.hold) == (7, 10, None, hold)
    events, _ = service.events(after=start)
    assert [e.type for e in events if e.hold == hold] == ["hold", "expire"]


def test_the_cli_holds_settles_and_follows_the_real_server(accman, funder):
    cred = new_cred()
    funder.mod(cred, 10)
    env = {"ACCMAN_URL": accman.url, "ACCMAN_TOKEN": SVC_CHECK}
    proc = run_accman("hold", cred, "-4", "--ttl", "60", env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"hold": 2, "tot": 6, "seq": 2}
    proc = run_accman("settle", cred, "2", "3", env=env)
    assert json.loads(proc.stdout) == {"tot": 7, "seq": 3}
    after = last_event(accman) - 3
    f = Follower(accman.url, "--token", SVC_CHECK, "--after", str(after), "--wait", "2")
    try:
        assert [e["type"] for e in f.lines(3)] == ["mod", "hold", "settle"]
        funder.mod(cred, 1)
        assert [(e["type"], e["by"]) for e in f.lines(1)] == [("mod", 1)]
        code, rest, err = f.stop(signal.SIGINT)
        assert code == 0 and rest == b"" and f"--after {after + 4}" in err
    finally:
        f.kill()


# --- the middleware under uvicorn, its service SIGKILLed --------------------------------
def test_a_sigkilled_services_hold_returns_by_its_expiry(tmp_path, accman, funder):
    app = start_app(tmp_path, "holds-app", accman.url, "reserve", SVC_RESERVE,
                    app="tests.holds_app:app", env={"ACCMAN_HOLD_TTL_S": "2"})
    cred = new_cred()
    funder.mod(cred, 10)
    try:
        url = app.wait_ready(UVICORN_READY, "stderr")
        with httpx.Client(base_url=url) as http:
            r = http.get("/work", headers={"ACCMAN": cred})
            assert r.status_code == 200 and r.headers["accman"] == "7"
        start = last_event(accman)

        def slow_request():
            try:
                httpx.get(url + "/work", params={"s": "60"}, headers={"ACCMAN": cred},
                          timeout=30)
            except httpx.HTTPError:
                pass            # the service dies under it
        threading.Thread(target=slow_request, daemon=True).start()
        with AccManSyncClient(accman.url, SVC_CHECK) as acc:
            wait_for_tot(acc, cred, 4, timeout_s=10)            # held
            app.stop(signal.SIGKILL)
            assert acc.tot(cred) == 4
            waited = wait_for_tot(acc, cred, 7)                 # back, with nobody to settle
            entries = acc.past(cred).entries
            events, _ = acc.events(after=start)
    finally:
        app.stop()
    hold = entries[1].hold
    assert (entries[1].by, entries[0].by, entries[0].hold, entries[0].key) == (-3, 3, hold, None)
    assert [e.type for e in events if e.hold == hold] == ["hold", "expire"]
    assert waited < EXPIRY_WAIT_S
