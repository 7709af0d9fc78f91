"""The bank checker through the calling side: a real service (the app of
tests/calling_bank_app.py, wrapped by AccManMiddleware, under a real
uvicorn) in front of a real AccMan, under concurrent paid requests, while
AccMan is SIGKILLed and restarted on the same port and data directory.

Consumers (one account each, funded with a known amount, several
requests in flight) send paid requests with amounts of their own
(callingcheck.py) and record what each got: its status and ACCMAN header.
An account refused 402 is topped up with a keyed funding mod.  Once the
load and the kills are over, the service is stopped (its shutdown drains
what it owes), every top-up of unknown outcome is sent again with its key,
and each account is reconciled from its history, the consumers' records
and the service's log (callingcheck.check_account):

* a response served as paid (200 with the header) is charged exactly once,
  and its header is the balance after that charge; one served without the
  header was owed, its key or hold named in the log, and is charged once
  after the drain, or stranded, said with the key or hold to look for;
* nothing is charged for a refusal (402, 503), a free response (400) or a
  request whose consumer left before the response, and nothing is in a
  history that no request of that amount made;
* a hold of a 503 (an unknown outcome) is undone by an owed unhold the log
  names, every hold ends once, none is left open;
* the balance is the funding less the history's charges, and in reserve
  mode it never goes under 0 (but after an expired hold's charge);
* the service's counters agree with what the consumers got, and its log
  holds no traceback.

Short and seeded by default (in each mode a kill, a SIGSTOP past the hold
ttl, and a last kill with AccMan down as the shutdown begins);
ACCMAN_CRASH_LONG=1 runs for minutes with kills and stops every second or
two, under an ASGI server drawn among uvicorn's two protocols and
hypercorn (ACCMAN_CALLING_SERVER names one), with a random seed, printed
so that ACCMAN_CRASH_SEED=N replays the same schedule (thread timing is
the machine's).
ACCMAN_CRASH_SECONDS overrides the length."""

import asyncio
import contextlib
import itertools
import os
import random
import re
import signal
import socket
import threading
import time
import urllib.parse

import httpx
import pytest

from accman.client import AccManClient, AccManSyncClient
from accman.calling.owed import SHUTDOWN_DRAIN_S
from accman.errors import AccManError
from callingcheck import (Account, Request, ServiceLog, TopUp, check_account,
                          collections_of, left_late, log_problems)
from test_e2e_asgi import FUNDER, SVC_CHECK, SVC_RESERVE, start_accman, start_app

LONG = os.environ.get("ACCMAN_CRASH_LONG") == "1"
SEED = (int(os.environ["ACCMAN_CRASH_SEED"]) if os.environ.get("ACCMAN_CRASH_SEED")
        else random.SystemRandom().randrange(2 ** 32) if LONG else 20261205)
DURATION_S = float(os.environ.get("ACCMAN_CRASH_SECONDS") or 120)        # a long run's
CONSUMERS = 4
# A short run makes its faults after this many paid responses each (its
# duration only a bound): counted, not timed, so that a slow machine still
# runs a real load around every fault.
PAID_PER_FAULT = 20
SHORT_RUN_MAX_S = 60.0
IN_FLIGHT = 3                   # requests in flight per consumer
FUND = 5000                     # a few requests' worth: accounts meet 402 and are topped up
FREE_SHARE = 0.1                # requests the app answers 400: free
# Requests whose consumer leaves LEAVE_S after sending, while the app works
# LEAVE_WORK_S: not charged, the hold released at once (docs/CALLING.md,
# "The consumer goes away").
LEAVE_SHARE = 0.05
LEAVE_S, LEAVE_WORK_S = 0.03, 0.3
# Short, so that a settle owed across a restart may find its hold expired
# and be charged as a keyed mod instead (docs/CALLING.md).
HOLD_TTL_S = 3
CONSUMER_TIMEOUT_S = 60.0
# How long AccMan stays down once the service's shutdown has begun: back
# within its drain (check mode's short run), or past it, so that what is
# still owed is stranded (reserve mode's); a long run draws either.
DOWN_AT_SHUTDOWN_S = {"check": 1.0, "reserve": SHUTDOWN_DRAIN_S + 1.0}
APP_STOP_S = 40.0               # over the drain's 3 x SHUTDOWN_DRAIN_S + SHUTDOWN_LAST_CALL_S


class AccMan:
    """The AccMan under test and its restarts, on one port and data directory."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.proc = start_accman(tmp_path)
        self.url = self.proc.url
        self.port = int(self.url.rsplit(":", 1)[1])
        self.faults = {"kill": 0, "pause": 0, "pause_kill": 0}

    def stop(self):
        self.proc.stop()

    def kill_and_restart(self, restart=True):
        self.proc.stop(signal.SIGKILL)
        if restart:
            self.restart()

    def restart(self):
        self.proc = start_accman(self.tmp_path, port=self.port)
        assert self.proc.url == self.url

    def pause(self, seconds, then_kill=False):
        """SIGSTOP for `seconds`: the middleware's calls time out (its
        timeout_s is 2 s), and holds pass their ttl while their settles are
        owed; then SIGCONT, or a kill and a restart."""
        self.proc.proc.send_signal(signal.SIGSTOP)
        try:
            time.sleep(seconds)
        finally:
            self.proc.proc.send_signal(signal.SIGCONT)
        if then_kill:
            self.kill_and_restart()

    def nemesis(self, rnd, stop, consumers, errors):
        """Faults until `stop.at`: in a short run a kill and a pause past
        the hold ttl, each after PAID_PER_FAULT more paid responses, and
        in a long one kills, pauses and pauses ended by a kill, every
        second or two; then a last kill just before the load stops (a
        short run's once it has PAID_PER_FAULT more), AccMan left down for
        the shutdown (shutdown_drain)."""
        try:
            if LONG:
                kinds = itertools.cycle(["kill", "pause", "kill", "pause_kill"])
                while (t := time.monotonic() + rnd.uniform(0.5, 2.0)) < stop.at - 5:
                    time.sleep(t - time.monotonic())
                    kind = next(kinds)
                    if kind == "kill":
                        self.kill_and_restart()
                    else:
                        self.pause(rnd.uniform(0.2, 4.0), then_kill=kind == "pause_kill")
                    self.faults[kind] += 1
            else:
                for n, kind in ((1, "kill"), (2, "pause")):
                    wait_paid(consumers, n * PAID_PER_FAULT, stop)
                    if kind == "kill":
                        self.kill_and_restart()
                    else:
                        self.pause(HOLD_TTL_S + 0.5)
                    self.faults[kind] += 1
                wait_paid(consumers, 3 * PAID_PER_FAULT, stop)
                stop.at = time.monotonic() + 0.5
            time.sleep(max(0.0, stop.at - rnd.uniform(0.2, 0.5) - time.monotonic()))
            self.kill_and_restart(restart=False)
            self.faults["kill"] += 1
        except Exception as e:
            errors.append(f"nemesis: {type(e).__name__}: {e}")
            stop.at = 0.0


class Stop:
    """When the consumers stop sending (`at`, monotonic): a short run's
    nemesis brings it forward once its faults are made."""

    def __init__(self, at):
        self.at = at


def paid(consumers) -> int:
    return sum(r.status == 200 and r.header is not None and not r.gone
               for c in consumers for r in list(c.requests))


def wait_paid(consumers, n, stop):
    while (got := paid(consumers)) < n:
        if time.monotonic() >= stop.at:
            raise AssertionError(f"only {got} paid responses of the {n} awaited by the "
                                 f"run's bound ({SHORT_RUN_MAX_S:g} s)")
        time.sleep(0.01)


class Consumer:
    """One account's consumer: IN_FLIGHT loops of paid requests, each with
    an amount of its own; a 402 tops the account up (one at a time)."""

    def __init__(self, n, rnd):
        self.cred = f"calbank-{n}-{os.getpid()}-{time.monotonic_ns()}"
        self.rnd = random.Random(rnd.random())
        self.amounts = itertools.count(1000)
        self.requests = []
        self.topups = []
        self.topping = False
        self.url = None

    async def run(self, url, funder, stop):
        self.url = url
        async with httpx.AsyncClient(base_url=url, timeout=CONSUMER_TIMEOUT_S) as http:
            await asyncio.gather(*(self.loop(http, funder, stop) for _ in range(IN_FLIGHT)))

    async def loop(self, http, funder, stop):
        while time.monotonic() < stop.at:
            x = self.rnd.random()
            r = Request(self.cred, next(self.amounts), x < FREE_SHARE, x > 1 - LEAVE_SHARE)
            params = {"a": r.a, **({"free": "1"} if r.free else {}),
                      **({"s": str(LEAVE_WORK_S)} if r.gone else {})}
            self.requests.append(r)
            if r.gone:
                await self.leave(r, params)
                continue
            try:
                got = await http.get("/work", params=params, headers={"ACCMAN": self.cred})
                r.status = got.status_code
                r.header = int(got.headers["accman"]) if "accman" in got.headers else None
                r.detail = got.text[:200]
            except httpx.HTTPError as e:
                r.detail = f"{type(e).__name__}: {e}"
            if r.status == 402 and not self.topping:
                await self.top_up(funder, 3 * r.a)
            elif r.status in (402, 503, None):
                await asyncio.sleep(0.02)

    async def leave(self, r, params):
        """A request on a connection of its own, dropped LEAVE_S after it
        was sent (or as its response begins, if sooner): long before the
        app answers, unless this process stalls.  When it was sent and
        when its connection was closed are what the checker judges it by:
        each read beside its socket call, so that a charge whose response
        began after the close cannot pass as begun before it."""
        url = urllib.parse.urlsplit(self.url)
        loop = asyncio.get_running_loop()
        sock = socket.socket()
        sock.setblocking(False)
        try:
            await loop.sock_connect(sock, (url.hostname, url.port))
            await loop.sock_sendall(sock, f"GET /work?{urllib.parse.urlencode(params)} HTTP/1.1"
                                    f"\r\nHost: {url.netloc}\r\nACCMAN: {self.cred}\r\n\r\n"
                                    .encode())
            r.sent_at = time.monotonic()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(loop.sock_recv(sock, 1), LEAVE_S)
        finally:
            # Closed here, at once: a transport's abort() closes its socket
            # only on the loop's next turn, after closed_at.
            sock.close()
            r.closed_at = time.monotonic()

    async def top_up(self, funder, by):
        self.topping = True
        t = TopUp(self.cred, f"top-{len(self.topups)}", by)
        self.topups.append(t)
        try:
            await funder.mod(self.cred, by, key=t.key)
            t.ok = True
        except AccManError:
            pass                    # AccMan down: sent again with its key after the run
        finally:
            self.topping = False


def test_a_consumer_that_leaves_has_closed_its_connection_when_it_reads_closed_at():
    """The checker judges a charge of a consumer that left by closed_at: a
    response begun after it is one the docs say moves nothing, so the
    connection must be closed by then, not a loop turn later."""
    listener = socket.create_server(("127.0.0.1", 0))
    consumer = Consumer(0, random.Random(SEED))
    consumer.url = f"http://127.0.0.1:{listener.getsockname()[1]}"
    r = Request(consumer.cred, 1000, False, gone=True)

    async def main():
        await consumer.leave(r, {"a": r.a})
        # No loop turn has run since closed_at was read (the calls below
        # block): the peer sees the close only if it came before.
        peer, _ = listener.accept()
        with peer:
            peer.settimeout(CONSUMER_TIMEOUT_S)
            got = b""
            while chunk := peer.recv(65536):
                got += chunk
        return got
    try:
        assert asyncio.run(main()).startswith(b"GET /work?a=1000 HTTP/1.1\r\n")
    finally:
        listener.close()
    assert r.sent_at <= r.closed_at


async def load(app_url, accman_url, consumers, stop):
    async with AccManClient(accman_url, FUNDER, timeout_s=2.0) as funder:
        for c in consumers:
            await funder.mod(c.cred, FUND, key="open")
        await asyncio.gather(*(c.run(app_url, funder, stop) for c in consumers))


def history(acc, cred) -> list:
    entries, before = [], None
    while True:
        page = acc.past(cred, limit=1000, before=before)
        entries += page.entries
        if page.next is None:
            return entries[::-1]
        before = page.next


def metrics(url) -> dict:
    text = httpx.get(url + "/metrics").text
    return {m[1]: int(m[2]) for m in re.finditer(r"^accman_mw_(\w+)_total (\d+)$", text, re.M)}


# The ASGI server the service runs under: uvicorn (h11) in the short run; a
# long one draws it, unless ACCMAN_CALLING_SERVER names one of SERVERS.
SERVER = os.environ.get("ACCMAN_CALLING_SERVER")
SERVERS_DRAWN = ["uvicorn", "uvicorn --http httptools", "hypercorn"]
# Each mode with on_unavailable "closed"; and "open", which serves unpaid
# what AccMan cannot admit (check mode's in the short run, both in a long one).
CASES = ["check", "reserve", "check open"] + (["reserve open"] if LONG else [])


@pytest.mark.parametrize("case", CASES)
def test_every_paid_response_is_charged_once_through_accman_kills(tmp_path, case):
    rnd = random.Random(SEED)
    duration_s = DURATION_S if LONG else SHORT_RUN_MAX_S
    mode = case.split()[0]
    down_s = DOWN_AT_SHUTDOWN_S[mode] if not LONG else rnd.choice(
        list(DOWN_AT_SHUTDOWN_S.values()))
    accman = AccMan(tmp_path)
    counts, stats, summary, _ = bank_run(tmp_path, case, accman, rnd, duration_s, down_s)
    # The run must have been a real one: AccMan killed while requests were
    # served and charged, refused (or served unpaid) and owed around the kills.
    assert accman.faults["kill"] >= 2 and accman.faults["pause"] >= 1, summary
    assert counts.get("200+", 0) >= (50 if LONG else 3 * PAID_PER_FAULT), summary
    assert (stats["unpaid_requests"] if case.endswith(" open") else counts.get(503, 0)) >= 1, \
        summary


def bank_run(tmp_path, case, accman, rnd, duration_s, down_s):
    """One run of the checker against `accman` (AccMan, or another with its
    url, faults, proc, nemesis and restart): the load and its nemesis (for
    at most `duration_s`), the service's shutdown with AccMan down for
    `down_s`, the reconciliation, asserted empty; returns the consumers'
    statuses, the service's counters, a summary and its log (a ServiceLog)."""
    mode, _, unavailable = case.partition(" ")
    banner = (f"calling bank checker ({case}): seed {SEED}, {'' if LONG else 'at most '}"
              f"{duration_s:g} s; replay with "
              f"ACCMAN_CRASH_SEED={SEED}" + (" ACCMAN_CRASH_LONG=1" if LONG else ""))
    server = SERVER or (rnd.choice(SERVERS_DRAWN) if LONG else "uvicorn")
    banner += f", under {server}"
    app = start_app(tmp_path, f"calbank-{mode}", accman.url, mode,
                    SVC_CHECK if mode == "check" else SVC_RESERVE,
                    app="tests.calling_bank_app:app", server=server,
                    env={"ACCMAN_HOLD_TTL_S": str(HOLD_TTL_S),
                         "ACCMAN_ON_UNAVAILABLE": unavailable or "closed"})
    print(banner, flush=True)
    consumers = [Consumer(n, rnd) for n in range(CONSUMERS)]
    errors = []
    try:
        app_url = app.wait_ready(app.ready, "stderr")
        stop = Stop(time.monotonic() + duration_s)
        nemesis = threading.Thread(target=accman.nemesis, args=(rnd, stop, consumers, errors))
        nemesis.start()
        asyncio.run(load(app_url, accman.url, consumers, stop))
        nemesis.join()
        assert not errors, errors
        stats = metrics(app_url)
        shutdown_drain(app, accman, down_s)
        assert app.proc.returncode in (0, -signal.SIGTERM), app.proc.returncode
        log = ServiceLog(app.err.read_text())
        problems = reconcile(mode, accman, consumers, log, stats)
    finally:
        app.stop(signal.SIGKILL)
        accman.stop()
    requests = [r for c in consumers for r in c.requests]
    counts = collections_of(requests)
    summary = (f"{len(requests)} requests {counts}, {sum(len(c.topups) for c in consumers)} "
               f"top-ups, faults {accman.faults}, {left_late(requests, log)}")
    print(f"calling bank checker ({case}): {summary}", flush=True)
    assert not problems, f"{banner}\n{summary}\n{len(problems)} problems:\n" + "\n".join(
        problems[:30])
    return counts, stats, summary, log


def shutdown_drain(app, accman, down_s):
    """The service's shutdown, AccMan down as it starts and back `down_s`
    later: within the drain, what is owed lands; past it, it is stranded
    (docs/CALLING.md, "Failure behaviour")."""
    app.proc.send_signal(signal.SIGTERM)
    time.sleep(down_s)
    accman.restart()
    app.proc.wait(APP_STOP_S)


def reconcile(mode, accman, consumers, log, stats) -> list:
    """Every problem the histories, the records, the log and the counters show."""
    problems = log_problems(log)
    requests = [r for c in consumers for r in c.requests]
    statuses = collections_of(requests)
    gone = sum(r.gone for r in requests)
    # A consumer gone may leave before the middleware counts its request,
    # and its request may be refused (a 402 or a 503 nobody reads).
    for stat, want in (("requests", len(requests)), ("refused_insufficient", statuses.get(402, 0)),
                       ("refused_unavailable", statuses.get(503, 0)),
                       ("free_status", statuses.get(400, 0)),
                       ("owed", sum(map(len, log.queued.values()))),
                       # Served unpaid at admission: its line says the error's code.
                       ("unpaid_requests", sum(bool(re.fullmatch(r"[a-z_]+", why))
                                               for u in log.unpaid.values() for _, why in u)),
                       ("expired", len(re.findall(r"expired before (the response|its settle "
                                                  r"landed \(the response started)", log.text)))):
        low, high = ((want - gone, want) if stat == "requests" else
                     (want, want + gone) if stat.startswith("refused_") else (want, want))
        if not low <= stats[stat] <= high:
            problems.append(f"stats[{stat!r}] is {stats[stat]}, not from {low} to {high}: "
                            f"the consumers saw {want}, and {gone} left")
    with AccManSyncClient(accman.url, FUNDER) as funder:
        for t in (t for c in consumers for t in c.topups if not t.ok):
            funder.mod(t.cred, t.by, key=t.key)     # applied now, or answered from its record
            t.ok = True
    with AccManSyncClient(accman.url, SVC_CHECK) as acc:
        deadline = time.monotonic() + HOLD_TTL_S + 5
        while httpx.get(accman.url + "/health").json()["open_holds"]:
            assert time.monotonic() < deadline, "holds still open past their ttl"
            time.sleep(0.1)
        for c in consumers:
            acct = Account(c.cred, history(acc, c.cred))
            problems += check_account(mode, acct, c.requests, c.topups, FUND, log,
                                      acc.tot(c.cred))
    return problems
