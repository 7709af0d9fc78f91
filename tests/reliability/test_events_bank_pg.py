"""The events checker (test_events_bank.py: its workers, readers and
checks) on PostgreSQL, a store of two clusters (docs/SCALING.md, "One
event order over several clusters"), under the database's faults.

Two real PostgreSQL clusters make one store; two AccMan front-ends serve
it, each with the webhook (the one holding its role delivers).  The bank
checker's workers change accounts of both clusters, half of them through
each front-end, so that the events of the cluster that is not the events'
home reach the store's one order only by accman/postgres/merge.py's
copies, made by either front-end.  Both run with a retention of a second:
each trims every round (a second), the home up to the webhook's cursor
row, the other cluster up to what is copied.  The readers (the Python
followers, two slow ones among them, the command line) follow through the
first front-end; the webhook goes to a real receiver that checks every
signature, taken down for longer than the retention now and then
(trimcheck.ReceiverDown).  A nemesis, in turn:

* SIGKILLs a front-end (each in turn) and starts it again on its port;
* restarts the events' home (`pg_ctl stop -m immediate`, then start), and
  the other cluster;
* stops one cluster for a second or more (the home and the other in turn);
* in the long run, SIGSTOPs a front-end for as long, then SIGCONT.

The reconciliation is test_events_bank.py's, as strict: the webhook's
stream ids 1..N without a gap and the store's a gap-free suffix of it
(trimcheck.py), each account's events exactly its history, every
acknowledged change in it (and, as test_bank.py checks them, every read
the workers made a state of that history), every reader every event (the followers and
the command line in order, each once, but for the gaps a 410 told them
of, of events past the retention then; the webhook's repeats only those
that a hand-over of its role or a restart explains, SERVER.md
"Webhooks").  And across the copy: the other cluster's own events, as it
numbered them (1..n, of which it keeps a suffix without a gap), are the
store's events of its accounts, in the same order, each once, field for
field, and the home records them all copied (copycheck.py).

In the suite, each fault once (a kill of each front-end), each after
WORK_PER_FAULT more changes acknowledged (bounded by work done, not by
time); ACCMAN_CRASH_LONG=1 runs the rotation for ACCMAN_CRASH_SECONDS
(300 s), a fault every 0.5 to 2 s, half of them before the front-ends
have recovered from the one before, with test_bank.py's seed (printed:
ACCMAN_CRASH_SEED=N replays its schedule).
"""

import itertools
import random
import signal
import threading
import time
from types import SimpleNamespace

from conftest import Conn, request_bytes, spawn_server
from copycheck import copied_upto, copy_problems, local_events, other_accounts
from eventscheck import store_and_reader_problems, webhook_problems
from followers import catch_up, cli_met_outages, start_readers, stop_readers
from postgres.pgcluster import Cluster as PgServer
from relhelp import history, stop_quietly
from test_bank import SEED, Worker, end_load
from test_events_bank import DURATION_S, LONG, LOW
from test_webhook_delivery import ENV, SECRET, check_delivery
from trimcheck import RETENTION_S, ReceiverDown, kept_problems, store_kept, webhook_stream
from webhook_receiver import Receiver, secret_file

WORKERS = 4
CREDS_PER_CLUSTER = 2
# The short run: each fault once, each after this many more changes
# acknowledged, and as many after the last.
WORK_PER_FAULT = 40
WORK_TIMEOUT_S = 90.0           # for those changes: none acknowledged by then is a fault
HEALTHY_TIMEOUT_S = 60.0        # after a fault, for both front-ends to take writes again
DOWN_S = (1.0, 3.0) if LONG else (1.0, 1.5)     # a cluster stopped this long (drawn from)
# After an unknown outcome (a 503 while a cluster is down, a reset), a
# worker waits this long before its next call, as a client backs off:
# not thousands of changes left unknown for the end to send again.
BACKOFF_S = 0.05
FAULT_EVERY_S = (0.5, 2.0)      # the long run: between faults (drawn from)
SHORT_FAULTS = ["kill", "home_restart", "kill", "other_restart", "home_down", "other_down"]
# The long run's rotation: a front-end stopped (SIGSTOP) for seconds too,
# its sessions and their locks (the copy's, the webhook's role) kept.
FAULTS = SHORT_FAULTS + ["pause"] if LONG else SHORT_FAULTS
# A hand-over of the webhook's role takes about this long (SERVER.md).
HOOK_ENV = {**ENV, "ACCMAN_WEBHOOK_LEAD_INTERVAL_S": "0.2"}


class FrontEnds:
    """Two front-ends on one store of two PostgreSQL clusters, and the
    faults of both.  `addr` and `srv` are the first front-end's (the
    readers'); `via(n)` is front-end n for a worker."""

    def __init__(self, tmp_path, pgs, dbname, rx):
        self.tmp_path, self.pgs, self.dbname = tmp_path, pgs, dbname
        self.args = [a for pg in pgs for a in ("--store", pg.url(dbname))]
        self.args += ["--webhook", rx.url, "--webhook-secret", secret_file(tmp_path, SECRET),
                      "--low-balance", LOW, "--events-retention", f"{RETENTION_S}s"]
        self.generation = 0
        self.fes = []
        self.ports = []
        try:
            for n in range(2):      # one after the other: the first sets the store up
                self.fes.append(self._spawn(n, 0))
                self.ports.append(self.fes[n].port)
        except BaseException:
            self.stop_all()
            raise
        self.lock = threading.Lock()
        # The webhook's runs: its start, and each fault that may hand its
        # role over (a front-end killed, the home restarted or stopped):
        # webhook_problems' restarts.
        self.runs_at = [time.monotonic()]
        self.ended_at = []
        self.home, self.other = self._home()
        self.counts = dict.fromkeys(FAULTS, 0)
        self.victim = 0             # the front-end the next kill hits
        self.reader_kills = 0       # of the readers' front-end

    def _spawn(self, n, port):
        self.generation += 1
        log_dir = self.tmp_path / f"fe{n}-{self.generation}"
        data = self.tmp_path / f"data{n}"
        try:
            return spawn_server(data, log_dir, port=port, env=HOOK_ENV, args=self.args)
        except RuntimeError:
            if port == 0:
                raise
            # The port was taken meanwhile: any will do (the readers and
            # the workers read the address at every connect).
            return spawn_server(data, log_dir / "retry", port=0, env=HOOK_ENV, args=self.args)

    def _home(self):
        """(the events' home, the other cluster), as the store records them."""
        homes = [pg for pg in self.pgs if pg.psql(
            "SELECT events_home = cluster_id FROM accman_schema", self.dbname) == "t"]
        assert len(homes) == 1, "the store has no one events' home"
        return homes[0], next(pg for pg in self.pgs if pg is not homes[0])

    @property
    def srv(self):
        return self.fes[0]

    @property
    def addr(self):
        return self.addr_of(0)

    def addr_of(self, n):
        with self.lock:
            return (self.fes[n].host, self.fes[n].port)

    def via(self, n):
        return Via(self, n)

    # -- the faults ---------------------------------------------------------------------

    def kill(self):
        n, self.victim = self.victim, 1 - self.victim
        self._ended()
        self.fes[n].proc.send_signal(signal.SIGKILL)
        self.fes[n].proc.wait()
        srv = self._spawn(n, self.ports[n])
        with self.lock:
            self.fes[n] = srv
        self.counts["kill"] += 1
        return n

    def pause(self, seconds):
        """SIGSTOP a front-end (each in turn) for `seconds`, then SIGCONT:
        its sessions stay, with whatever locks they hold."""
        n, self.victim = self.victim, 1 - self.victim
        self.fes[n].proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        self.fes[n].proc.send_signal(signal.SIGCONT)
        self.counts["pause"] += 1

    def restart(self, which, down_s=0.0):
        """The "home" or the "other" cluster stopped at once (`-m
        immediate`: no checkpoint, its sessions cut), down for `down_s`,
        and started again (crash recovery)."""
        pg = self.home if which == "home" else self.other
        if pg is self.home:
            self._ended()           # the webhook's role is a session on the home
        pg.stop("immediate")
        time.sleep(down_s)
        pg.start()
        self.counts[f"{which}_down" if down_s else f"{which}_restart"] += 1

    def _ended(self):
        now = time.monotonic()
        self.ended_at.append(now)
        self.runs_at.append(now)

    def wait_healthy(self):
        """Until both front-ends take writes again (they reconnect by
        themselves, with backoff)."""
        deadline = time.monotonic() + HEALTHY_TIMEOUT_S
        for n in range(2):
            while not _healthy(self.addr_of(n)):
                assert time.monotonic() < deadline, f"front-end {n} takes no writes"
                time.sleep(0.05)

    def stop_all(self):
        for fe in self.fes:
            stop_quietly(fe)


class PgWorker(Worker):
    """test_bank's worker, backing off after an unknown outcome."""

    def attempt(self, op):
        super().attempt(op)
        if op.attempts and op.attempts[-1].outcome == "unknown":
            time.sleep(BACKOFF_S)


class Via:
    """Front-end n, as a worker sees it: its address at each connect."""

    def __init__(self, fes, n):
        self.fes, self.n = fes, n

    @property
    def addr(self):
        return self.fes.addr_of(self.n)


def _healthy(addr):
    try:
        with Conn(*addr, timeout=5) as c:
            c.send(request_bytes("GET", "/health"))
            return c.response().status == 200
    except (OSError, EOFError):
        return False


def acked(workers):
    return sum(a.outcome == "ok" for w in workers for op in list(w.ops)
               for a in list(op.attempts))


def fault(fes, kind, rnd, cli, recovered=True):
    if kind == "kill":
        if fes.kill() == 0:
            # The first time, stopped and started anew, as a reader resumes.
            cli.follow(fes.addr, again=fes.reader_kills == 0)
            fes.reader_kills += 1
    elif kind == "pause":
        fes.pause(rnd.uniform(*DOWN_S))
    else:
        which, how = kind.split("_")
        fes.restart(which, rnd.uniform(*DOWN_S) if how == "down" else 0.0)
    if recovered:
        fes.wait_healthy()


def nemesis(fes, cli, workers, rnd, errors):
    """The short run's faults, each after WORK_PER_FAULT more changes
    acknowledged and waiting for the front-ends' recovery; the long run's
    in rotation until DURATION_S, half of them without that wait, so that
    the next may come while the front-ends reconnect.  Returns when the
    load is to stop."""
    try:
        if LONG:
            kinds = itertools.cycle(FAULTS)
            stop_at = time.monotonic() + DURATION_S
            while (t := time.monotonic() + rnd.uniform(*FAULT_EVERY_S)) < stop_at:
                time.sleep(t - time.monotonic())
                fault(fes, next(kinds), rnd, cli, recovered=rnd.random() < 0.5)
            fes.wait_healthy()
            return stop_at
        for kind in SHORT_FAULTS:
            wait_work(workers, acked(workers) + WORK_PER_FAULT)
            fault(fes, kind, rnd, cli)
        wait_work(workers, acked(workers) + WORK_PER_FAULT)
    except Exception as e:
        errors.append(f"nemesis: {type(e).__name__}: {e}")
    return time.monotonic()


def wait_work(workers, target):
    deadline = time.monotonic() + WORK_TIMEOUT_S
    while acked(workers) < target:
        assert time.monotonic() < deadline, f"{target} changes not acknowledged in time"
        time.sleep(0.05)


def fund_both(fes):
    """Accounts of both clusters, CREDS_PER_CLUSTER each, funded (500 and
    up: under any worker's amount): {cred: account}, the home's first.
    Where an account lives is the store's choice: credentials are funded
    in turn until each cluster has its share."""
    creds = {fes.home: {}, fes.other: {}}
    for i in itertools.count():
        if all(len(c) == CREDS_PER_CLUSTER for c in creds.values()):
            break
        assert i < 200, "the accounts all land on one cluster"
        cred = f"bank-{i}"
        r = fes.srv.mod(cred, 500 + i, key=f"fund-{cred}")
        assert r.json == {"tot": 500 + i, "seq": 1}, r
        account = fes.srv.get(f"/past?cred={cred}&limit=1").json["account"]
        pg = fes.home if holds(fes.home, fes.dbname, account) else fes.other
        assert holds(pg, fes.dbname, account), f"{cred} is on neither cluster"
        if len(creds[pg]) < CREDS_PER_CLUSTER:
            creds[pg][cred] = account
    return {**creds[fes.home], **creds[fes.other]}


def holds(pg, dbname, account):
    return pg.psql(f"SELECT count(*) FROM accman_accounts WHERE hid = "
                   f"decode('{account}', 'hex')", dbname) == "1"


def reconcile(srv, store, fes, accounts, workers, ops, settles, clients, cli, rx):
    """test_events_bank.py's checks, and the copy's: the problems found,
    and (events copied, the webhook's POSTs, ids it sent again, how far
    back its resends reached)."""
    histories = {cred: history(srv, cred) for cred in accounts}
    reads = [r for w in workers for r in w.reads]
    posts = rx.snapshot()
    problems = store_and_reader_problems(store, ops, reads, histories, settles, accounts, LOW,
                                         clients, cli, posts, RETENTION_S)
    repeats, repeated, back_s = webhook_problems(posts, fes.runs_at, fes.ended_at)
    problems += repeats
    local = local_events(fes.other, fes.dbname)
    problems += copy_problems(local, store, copied_upto(fes), other_accounts(fes))
    return problems, (local, posts, repeated, back_s)


# --- the test ------------------------------------------------------------------------

def test_every_reader_gets_every_event_of_two_clusters_through_their_faults(tmp_path):
    length = f"{DURATION_S:g} s" if LONG else f"{len(SHORT_FAULTS)} faults"
    banner = (f"events checker on PostgreSQL: seed {SEED}, {length}; replay with "
              f"ACCMAN_CRASH_SEED={SEED}" + (" ACCMAN_CRASH_LONG=1" if LONG else ""))
    print(banner, flush=True)
    rnd = random.Random(SEED)
    rx = Receiver(SECRET)
    rx.verify = True
    pgs, fes, cli, clients, hook_down = [], None, None, [], None
    workers, errors = [], []
    stop = threading.Event()
    try:
        for n in range(2):
            pgs.append(PgServer.create(name=f"events{n}"))
            pgs[n].create_database("bank")
        fes = FrontEnds(tmp_path, pgs, "bank", rx)
        accounts = fund_both(fes)
        creds = list(accounts)
        clients, cli = start_readers(fes, tmp_path, slow=True)
        hook_down = ReceiverDown(rx, SEED + 4)
        hook_down.start()
        amounts = itertools.count()
        for n in range(WORKERS):
            PgWorker(n, fes.via(n % 2), amounts, stop, workers, creds=creds)
        for w in workers:
            w.start()
        stop_at = nemesis(fes, cli, workers, rnd, errors)
        hook_down.end()
        srv, ops, settles = end_load(fes, workers, stop, stop_at, errors, banner)
        catch_up(srv, clients, cli, rx)

        # The whole stream is the webhook's (its cursor row kept every
        # event for it), of which the store keeps a suffix (trimcheck.py).
        # The store is read first: what it trims, the receiver has by then.
        first, kept = store_kept(srv)
        store = webhook_stream(rx.snapshot())
        problems = kept_problems(first, kept, store)
        assert not problems, f"{banner}\n" + "\n".join(problems)
        problems, tallies = reconcile(srv, store, fes, accounts, workers, ops, settles,
                                      clients, cli, rx)
        assert not problems, f"{banner}\n{len(problems)} problems:\n" + "\n".join(problems[:30])
        check_delivery(rx, store, SimpleNamespace(acked=[]), {})

        local, posts, repeated, back_s = tallies
        copied = local[-1]["id"]
        outcomes = [a.outcome for op in ops for a in op.attempts]
        n_acked = outcomes.count("ok")
        summary = (f"{len(store)} events ({copied} copied from the other cluster), "
                   f"{n_acked} changes acknowledged, {outcomes.count('unknown')} unknown; "
                   f"faults {fes.counts}, "
                   f"{fes.generation} front-end starts; followers: "
                   f"{[len(c.pages) for c in clients]} pages, "
                   f"{[c.outages for c in clients]} outages; cli: {len(cli.runs)} runs; "
                   f"the store keeps {first}.., the other cluster {local[0]['id']}..; the "
                   f"receiver was down {hook_down.times} times; gaps told: "
                   f"{[len(c.gaps) for c in clients]}, cli {len(cli.gaps)}; "
                   f"webhook: {len(posts)} POSTs, {repeated} ids sent again, first sent up "
                   f"to {back_s:.2f} s before the fault")
        print(f"events checker on PostgreSQL: {summary}", flush=True)
        # A real run: every fault, changes of every kind, many of them copied.
        assert all(fes.counts[k] for k in FAULTS) and fes.counts["kill"] >= 2, summary
        assert n_acked >= (len(SHORT_FAULTS) + 1) * WORK_PER_FAULT, summary
        assert {e["type"] for e in store} == {"mod", "hold", "settle", "expire",
                                              "low_balance"}, summary
        assert copied >= WORK_PER_FAULT, summary
        cli_met_outages(cli)
        # Trimming ran on both clusters, and left the lagging reader behind.
        assert first > 1 and local[0]["id"] > 1 and hook_down.times >= 1, summary
        assert clients[-1].gaps, summary
        assert [fe.stop() for fe in fes.fes] == [0, 0], "a front-end's SIGTERM did not end it"
    finally:
        stop_readers(stop, clients, cli)
        if hook_down is not None:
            hook_down.end()
        if fes is not None:
            fes.stop_all()
        rx.close()
        for pg in pgs:
            pg.destroy()


# --- the copy's check checked: each fault it exists to find, found -----------------------

def _two_clusters():
    """A store's stream of accounts h1 (the home's) and o1, o2 (the
    other's), and the other cluster's own events, as it numbered them."""
    def ev(i, account, seq):
        return {"id": i, "type": "mod", "account": account, "seq": seq, "by": seq,
                "tot": seq * (seq + 1) // 2, "at": 1000 + i, "key": f"k{account}{seq}",
                "hold": None}
    store = [ev(1, "h1", 1), ev(2, "o1", 1), ev(3, "o2", 1), ev(4, "h1", 2), ev(5, "o1", 2),
             ev(6, "o2", 2)]
    local = [{**e, "id": n} for n, e in enumerate(
        (e for e in store if e["account"] != "h1"), start=1)]
    return local, store


COPY_FAULTS = {
    "an event not copied": lambda local, store: (local, store[:4] + store[5:], 4),
    "an event copied twice": lambda local, store: (local, store + [{**store[4], "id": 7}], 4),
    "two copies swapped": lambda local, store: (local, [*store[:4], store[5], store[4]], 4),
    "a copy changed": lambda local, store: (local, [*store[:4], {**store[4], "by": 9},
                                                    store[5]], 4),
    "the record behind": lambda local, store: (local, store, 3),
    "a gap in the other cluster": lambda local, store: (
        [*local[:2], *({**e, "id": e["id"] + 1} for e in local[2:])], store, 4),
}


def test_the_copy_check_passes_a_whole_copy():
    local, store = _two_clusters()
    assert copy_problems(local, store, 4) == []
    # The other cluster's copied events trimmed: what it keeps is judged,
    # and the count of what the store has of its accounts.
    assert copy_problems(local[2:], store, 4, {"o1", "o2"}) == []
    assert copy_problems(local[2:], store[:1] + store[2:], 4, {"o1", "o2"}) != []
    assert copy_problems(local[2:], store, 4, {"o1"}) != []


def test_the_copy_check_finds_each_fault_of_a_copy():
    for name, fault in COPY_FAULTS.items():
        assert copy_problems(*fault(*_two_clusters())) != [], name
