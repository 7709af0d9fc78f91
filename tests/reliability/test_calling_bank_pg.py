"""The calling-side bank checker (test_calling_bank.py: the same load, the
same service, the same reconciliation) against an AccMan front-end on the
PostgreSQL store (docs/SCALING.md), whose failures are the database's as
well as its own: PostgreSQL restarted under load (`pg_ctl stop -m
immediate`, then started), stopped for seconds, the front-end SIGKILLed and
restarted on the same port, and, in a long run, a synchronous standby
stopped for seconds (writes stall while reads go on; the front-end
restarted meanwhile, every other time) or a failover to it,
the front-end given both hosts (target_session_attrs=read-write, as
tests/postgres/test_failover.py).
The database is down as the service's shutdown begins, and back within
its drain.  The middleware's client takes one URL (docs/CALLING.md): one
front-end serves the service, or, as in docs/SCALING.md's production
layout, two behind a load balancer (a round-robin TCP proxy, rrproxy.py),
the front-end faults hitting each in turn.

In the suite, two short cases (reserve mode: holds, settles and unholds
across each fault), one front-end and two; ACCMAN_CRASH_LONG=1 (`just
crash-calling`) runs both modes, closed and open, with the standby's
stops and with the failover, and both modes through two front-ends, the
proxy health-checking them or not, for minutes each."""

import functools
import itertools
import signal
import random
import time

import httpx
import pytest

from postgres.pgcluster import Cluster
from rrproxy import RoundRobin
from test_calling_bank import (DURATION_S, HOLD_TTL_S, LONG, PAID_PER_FAULT, SEED,
                               SHORT_RUN_MAX_S, AccMan, bank_run, wait_paid)
from test_e2e_asgi import start_accman

# Back within the shutdown's drain (SHUTDOWN_DRAIN_S): what is owed lands.
DOWN_AT_SHUTDOWN_S = 1.0
# The database down in a "db_down" fault: longer than the front-end's
# reconnection backoff's first steps, within the middleware's hold ttl or past it.
DB_DOWN_S = (1.0, 4.0)
HEALTHY_TIMEOUT_S = 30.0
# A synchronous standby stopped: past the middleware's timeout_s (2 s), short
# of the front-end's COMMIT_TIMEOUT_S (10 s), or past it.
STANDBY_DOWN_S = (3.0, 12.0)


class PgAccMan(AccMan):
    """Front-ends on `pg`'s database `db` (and its standby's, through a
    two-host URL, when there is one), and the faults of both: one
    front-end, or `front_ends` behind a round-robin TCP proxy (rrproxy.py,
    health-checked if `checked`), each of which a front-end's fault hits
    in turn."""

    def __init__(self, tmp_path, pg, db, front_ends=1, checked=False):
        self.tmp_path, self.pg, self.db_down = tmp_path, pg, False
        hosts = ",".join(f"127.0.0.1:{c.port}" for c in [pg, *pg.standbys])
        self.store = f"postgresql://postgres@{hosts}/{db}?target_session_attrs=read-write"
        self.fes = [start_accman(tmp_path, name=f"accman{n or ''}", store=self.store)
                    for n in range(front_ends)]
        self.ports = [int(fe.url.rsplit(":", 1)[1]) for fe in self.fes]
        self.victim = 0                 # the front-end the next fault hits
        # A short run's faults: the database's and its front-end's, or, of
        # two front-ends, the first killed, the second stopped past the
        # hold ttl (its calls time out, and are sent again to the first,
        # while their first attempts wait in the stopped one), the first
        # killed again.
        self.short_kinds = (("db_restart", "kill", "db_down") if front_ends == 1 else
                            ("kill", "pause", "kill"))
        self.proxy = (RoundRobin([("127.0.0.1", port) for port in self.ports], checked)
                      if front_ends > 1 else None)
        self.url = self.proxy.url if self.proxy else self.fes[0].url
        self.faults = {"db_restart": 0, "db_down": 0, "kill": 0, "pause": 0, "failover": 0,
                       "standby_down": 0, "standby_down_kill": 0}

    @property
    def proc(self):
        return self.fes[self.victim]

    def start(self, n):
        """Front-end `n` started again on its port."""
        self.fes[n] = start_accman(self.tmp_path, name=f"accman{n or ''}", port=self.ports[n],
                                   store=self.store)
        assert self.fes[n].url.endswith(f":{self.ports[n]}"), self.fes[n].url

    def stop(self):
        for fe in self.fes:
            fe.stop()
        if self.proxy:
            self.proxy.stop()

    def restart(self):
        """The database back if it is down, then each front-end that is;
        returns once every front-end takes writes (/health 200): they
        reconnect by themselves, with backoff."""
        if self.db_down:
            self.pg.start()
            self.db_down = False
        for n, fe in enumerate(self.fes):
            if fe.proc.poll() is not None:
                self.start(n)
        deadline = time.monotonic() + HEALTHY_TIMEOUT_S
        for fe in self.fes:
            while httpx.get(fe.url + "/health").status_code != 200:
                assert time.monotonic() < deadline, f"{fe.name} takes no writes"
                time.sleep(0.05)

    def db_stop(self):
        self.pg.stop("immediate")
        self.db_down = True

    def failover(self):
        """The primary SIGKILLed and its synchronous standby promoted: the
        front-end finds the new primary through its URL by itself."""
        old = self.pg
        self.pg = old.standbys[-1]      # still old's, which stops it at the end
        old.kill()
        self.pg.promote()

    def fault(self, kind, rnd):
        if kind == "db_restart":
            self.db_stop()
            self.restart()
        elif kind == "db_down":
            self.db_stop()
            time.sleep(rnd.uniform(*DB_DOWN_S))
            self.restart()
        elif kind == "kill":
            self.kill_and_restart()
        elif kind == "pause":
            self.pause(HOLD_TTL_S + 0.5)
        elif kind.startswith("standby_down"):
            # Commits wait for the synchronous standby: the front-end's
            # writes stall past the middleware's timeout while its reads go
            # on (docs/SCALING.md), and complete once the standby is back;
            # a front-end killed meanwhile leaves its commit waiting, which
            # the new one's writes queue behind.
            standby = self.pg.standbys[0]
            standby.stop("immediate")
            down_s = rnd.uniform(*STANDBY_DOWN_S)
            time.sleep(down_s / 2)
            if kind == "standby_down_kill":
                self.proc.stop(signal.SIGKILL)
                self.start(self.victim)
            time.sleep(down_s / 2)
            standby.start()
        else:
            self.failover()
        self.faults[kind] += 1
        if kind in ("kill", "pause", "standby_down_kill"):
            self.victim = (self.victim + 1) % len(self.fes)

    def nemesis(self, rnd, stop, consumers, errors, failover=False):
        """Each of `short_kinds` in a short run, each after PAID_PER_FAULT
        more paid responses; every second or two in a long one (with a standby, its
        stops, or one failover a third in); then the database stopped just
        before the load stops (`stop.at`; a short run's once it has
        PAID_PER_FAULT more) and left down for the shutdown
        (shutdown_drain)."""
        try:
            start, span = time.monotonic(), stop.at - time.monotonic()
            if LONG:
                kinds = itertools.cycle(["db_restart", "kill", "db_down", "pause", "kill"] + (
                    ["standby_down", "standby_down_kill"] if self.pg.standbys and not failover
                    else []))
                while (t := time.monotonic() + rnd.uniform(0.5, 2.0)) < stop.at - 12:
                    time.sleep(t - time.monotonic())
                    failing_over = failover and self.pg.standbys and t > start + span / 3
                    self.fault("failover" if failing_over else next(kinds), rnd)
            else:
                for n, kind in enumerate(self.short_kinds, 1):
                    wait_paid(consumers, n * PAID_PER_FAULT, stop)
                    self.fault(kind, rnd)
                wait_paid(consumers, 4 * PAID_PER_FAULT, stop)
                stop.at = time.monotonic() + 0.5
            time.sleep(max(0.0, stop.at - rnd.uniform(0.2, 0.5) - time.monotonic()))
            self.db_stop()
        except Exception as e:
            errors.append(f"nemesis: {type(e).__name__}: {e}")
            stop.at = 0.0


# (the embedded test's case, the database's topology): "standby" stops a
# synchronous standby now and then, "failover" promotes it once.
CASES = ([("check", ""), ("reserve", ""), ("check open", ""), ("reserve open", ""),
          ("check", "failover"), ("reserve", "failover"), ("check", "standby"),
          ("reserve", "standby")] if LONG else [("reserve", "")])


@pytest.mark.parametrize("case,topology", CASES, ids=[" ".join(filter(None, c)) for c in CASES])
def test_every_paid_response_is_charged_once_through_postgresql_faults(tmp_path, case,
                                                                      topology):
    rnd = random.Random(SEED)
    with Cluster.create(name="calbank") as pg:
        if topology:
            pg.add_standby("calbank_standby", sync=True)
        pg.create_database("bank")
        accman = PgAccMan(tmp_path, pg, "bank")
        accman.nemesis = functools.partial(accman.nemesis, failover=topology == "failover")
        counts, stats, summary, log = bank_run(tmp_path, case, accman, rnd,
                                               DURATION_S if LONG else SHORT_RUN_MAX_S,
                                               DOWN_AT_SHUTDOWN_S)
    # A real run: requests charged, and refused or owed around the faults;
    # among the refusals, changes the front-end refused unsent while the
    # database was down (not_applied), which owed nothing (the checker's
    # log_problems says any release owed for one).
    assert log.refused_unapplied >= 1, summary
    want = {"db_restart", "kill", "db_down"} | ({"failover"} if topology == "failover" else
                                                {"standby_down"} if topology else set())
    assert all(accman.faults[k] for k in want), summary
    assert counts.get("200+", 0) >= (50 if LONG else 4 * PAID_PER_FAULT), summary
    assert (stats["unpaid_requests"] if case.endswith(" open") else counts.get(503, 0)) >= 1, \
        summary


# Two front-ends behind the proxy: in the suite, reserve mode (a hold made
# through one front-end is settled or released through either) with no
# health check, so that the middleware's retries meet a dead front-end;
# the long run: both modes, with the health check and without.
TWO_CASES = ([("check", False), ("reserve", False), ("check", True), ("reserve", True)]
             if LONG else [("reserve", False)])


@pytest.mark.parametrize("case,checked", TWO_CASES,
                         ids=[f"{c} {'checked' if k else 'unchecked'}" for c, k in TWO_CASES])
def test_every_paid_response_is_charged_once_through_two_front_ends(tmp_path, case, checked):
    """docs/SCALING.md's layout: the middleware's AccMan URL a round-robin
    TCP proxy (rrproxy.py) before two front-ends on one database,
    SIGKILLed and restarted under the load, or stopped past the hold ttl,
    each fault hitting the next front-end (in a long run, the database
    restarted and stopped too); the same reconciliation."""
    rnd = random.Random(SEED)
    with Cluster.create(name="calbank2") as pg:
        pg.create_database("bank")
        accman = PgAccMan(tmp_path, pg, "bank", front_ends=2, checked=checked)
        counts, stats, summary, _ = bank_run(tmp_path, case, accman, rnd,
                                             DURATION_S if LONG else SHORT_RUN_MAX_S,
                                             DOWN_AT_SHUTDOWN_S)
    print(f"calling bank checker ({case}, two front-ends): the proxy's connections "
          f"{accman.proxy.stats}", flush=True)
    # A real run: each front-end given connections, and killed under the
    # load; requests charged, and refused around the faults.
    want = {"kill", "pause"} | ({"db_restart", "db_down"} if LONG else set())
    assert all(accman.faults[k] for k in want) and accman.faults["kill"] >= 2, summary
    assert all(accman.proxy.stats["sent"]), accman.proxy.stats
    assert counts.get("200+", 0) >= (50 if LONG else 4 * PAID_PER_FAULT), summary
    assert counts.get(503, 0) >= 1, summary
