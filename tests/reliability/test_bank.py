"""The bank checker: Jepsen's bank test, over HTTP, against the real server.

Worker threads run keyed and unkeyed mods and keyed holds with unique
amounts (every `by` in the run is different, so an entry in a history names
the call that made it), some with `min`, settles of most holds (the others
are left to expire: their ttl is 1 to 3 s), and reads of /tot and /past,
against a few accounts, each on its own keep-alive connection, logging
every call's start, end and outcome: ok, refused (409), hold_ended,
unapplied (a 503 that says the change was refused before it applied:
`not_applied`, `busy`, `shutting_down`), or unknown (timeout, reset, other
5xx).  The records and the checks are in bankcheck.py.  Meanwhile a
nemesis kills the server with SIGKILL at random moments, stops it with
SIGSTOP for a while and lets it go on with SIGCONT, stops then kills it, or
stops it gracefully with SIGTERM (the changes it refuses meanwhile are
answered `shutting_down`); after each it restarts the server on the same
data directory.

At the end, with the faults over, every unknown keyed mod is sent once more
with its key, and the checker reads every history whole and verifies:

* seqs run 1..n with no gap (across all the restarts), each entry's tot is
  the previous tot plus its by, and /tot equals the newest tot;
* every acknowledged mod is in the history exactly once, at the seq and
  with the tot its 200 named, with its key;
* every entry is a mod some call sent, whose outcome was ok or unknown,
  never one that was only ever refused (a 409, or a 503 unapplied);
* no entry of a mod with `min` has a tot under that min, and every 409
  insufficient was right on the balance it reported;
* no read (a /tot, a /past page, the tot of a 409) ever showed a state that
  is not in the final history, or one older than a mod acknowledged before
  the read began, or one made by a mod sent after the read ended;
* two changes acknowledged one after the other (in real time) have growing
  seqs;
* every hold ends once: by its settle (an acknowledged settle at the seq and
  tot of its 200, with by = amount - use) or by its expiry (by = amount, not
  before its ttl, also when it fell due while the server was down), and once
  every ttl has passed none is open; a hold_ended answers only an expired
  hold;
* the event stream has ids 1..N without a gap across every restart, and
  each account's events are exactly its history, one per entry, of its kind;
* the accounts nobody touched are unchanged; `accman verify` passes.

Short and seeded by default (CI); ACCMAN_CRASH_LONG=1 runs for minutes
with a random seed, printed so that ACCMAN_CRASH_SEED=N replays the same
schedule of calls and faults (thread timing is the machine's).
ACCMAN_CRASH_SECONDS overrides the length.
"""

import itertools
import os
import random
import signal
import threading
import time

import pytest

from bankcheck import Attempt, Checker, Op, Read, SettleOp
import bankfaults
from bankfaults import FAULTS, find, scene
from conftest import Conn, request_bytes, run_accman, spawn_server
from relhelp import history, stop_quietly

LONG = os.environ.get("ACCMAN_CRASH_LONG") == "1"
SEED = (int(os.environ["ACCMAN_CRASH_SEED"]) if os.environ.get("ACCMAN_CRASH_SEED")
        else random.SystemRandom().randrange(2 ** 32) if LONG else 20261125)
DURATION_S = float(os.environ.get("ACCMAN_CRASH_SECONDS") or (300 if LONG else 10))
WORKERS = 8
CREDS = [f"bank-{i}" for i in range(4)]
UNTOUCHED = ["still-0", "still-1"]
# Opening balances: small, so that charges with min=0 are refused at times;
# under 1000, the smallest amount of a call, so a `by` still names one call.
FUND = {cred: 500 + i for i, cred in enumerate(CREDS + UNTOUCHED)}
# Far longer than any pause of the nemesis: a timeout is a fault, not noise.
CLIENT_TIMEOUT_S = 15.0
PAUSE_MAX_S = 1.0
RETRIES_MAX = 3
# The 503s that say the change was refused before it applied (docs/SERVER.md,
# "Errors"): the checker finds any such change in a history.
UNAPPLIED = ("not_applied", "busy", "shutting_down")
HOLD_TTL_S = (1, 3)             # drawn from; the longest, with a second of expiry wheel,
HOLDS_END_S = HOLD_TTL_S[1] + 2  # is how long after the faults every hold has ended


class Stopped(Exception):
    pass


class Cluster:
    """The server under test and its restarts, on one data directory."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.data = tmp_path / "data"
        self.generation = 0
        self.lock = threading.Lock()
        self.srv = self._spawn(0)
        self.addr = (self.srv.host, self.srv.port)

    def _spawn(self, port):
        self.generation += 1
        log_dir = self.tmp_path / f"server{self.generation}"
        try:
            return spawn_server(self.data, log_dir, port=port)
        except RuntimeError:
            if port == 0:
                raise
            # The old port was taken meanwhile: any port will do, the
            # workers read the address at every connect.
            return spawn_server(self.data, log_dir / "retry", port=0)

    def restart(self):
        self.srv.proc.wait()
        srv = self._spawn(self.srv.port)
        with self.lock:
            self.srv = srv
            self.addr = (srv.host, srv.port)

    def kill(self):
        self.srv.proc.send_signal(signal.SIGKILL)
        self.restart()

    def term(self):
        """A graceful stop, as a rolling restart makes."""
        self.srv.proc.send_signal(signal.SIGTERM)
        self.restart()

    def pause(self, seconds, then_kill=False):
        self.srv.proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        if then_kill:
            self.kill()
        else:
            self.srv.proc.send_signal(signal.SIGCONT)


class Worker(threading.Thread):
    """Calls on `cluster.addr` (read at each connect) against `creds`."""

    def __init__(self, n, cluster, amounts, stop, log, creds=CREDS):
        super().__init__(name=f"bank-worker-{n}", daemon=True)
        self.n = n
        self.cluster = cluster
        self.creds = creds
        self.amounts = amounts
        self.stop = stop
        self.rnd = random.Random(SEED * 1000 + n)
        self.ops = []
        self.settles = []
        self.to_settle = []         # SettleOps of acknowledged holds, not yet sent
        self.reads = []
        self.errors = []
        self.retry = []
        self.conn = None
        self.count = itertools.count()
        log.append(self)

    # --- the connection ---

    def connect(self):
        while self.conn is None:
            if self.stop.is_set():
                raise Stopped
            host, port = self.cluster.addr
            try:
                self.conn = Conn(host, port, timeout=CLIENT_TIMEOUT_S)
            except OSError:
                time.sleep(0.02)            # down between a kill and its restart
        return self.conn

    def drop(self):
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def call(self, method, target):
        """(t0, t1, response) or (t0, t1, exception name) when the outcome
        is unknown.  Raises Stopped before anything was sent."""
        conn = self.connect()
        t0 = time.monotonic()
        try:
            conn.send(request_bytes(method, target))
            r = conn.response()
        except (OSError, EOFError) as e:
            self.drop()
            return t0, time.monotonic(), type(e).__name__
        t1 = time.monotonic()
        if r.status >= 500 or r.headers.get("connection") == "close":
            self.drop()
        return t0, t1, r

    # --- the calls ---

    def run(self):
        try:
            while not self.stop.is_set():
                if self.retry and self.rnd.random() < 0.5:
                    self.attempt(self.retry.pop(0))
                    continue
                if self.to_settle and self.rnd.random() < 0.3:
                    self.attempt(self.to_settle.pop(0))
                    continue
                x = self.rnd.random()
                if x < 0.15:
                    self.read_tot()
                elif x < 0.20:
                    self.read_past()
                elif x < 0.35:
                    self.hold()
                else:
                    self.mod(0.2 + 0.8 * self.rnd.random())
        except Stopped:
            pass
        except Exception as e:          # a checker bug or a protocol error: report it
            self.errors.append(f"worker {self.n}: {type(e).__name__}: {e}")
        finally:
            self.drop()

    def mod(self, x):
        cred = self.rnd.choice(self.creds)
        amount = 1000 + next(self.amounts)
        keyed = self.rnd.random() < 0.85
        key = f"w{self.n}-{next(self.count)}" if keyed else None
        if x < 0.50:
            by, min_ = amount, None                         # a deposit
        elif x < 0.80:
            by, min_ = -amount, 0                           # a charge if covered
        elif x < 0.90:
            by, min_ = -amount, None                        # a charge, below 0 allowed
        else:
            by, min_ = -amount, -50_000                     # an overdraft limit
        op = Op(self.n, cred, by, min_, key)
        self.ops.append(op)
        self.attempt(op)

    def hold(self):
        """A keyed hold of a unique amount; once acknowledged, most are
        settled later (with a use drawn now), the others left to expire."""
        cred = self.rnd.choice(self.creds)
        op = Op(self.n, cred, -(1000 + next(self.amounts)), 0,
                f"w{self.n}-{next(self.count)}", ttl=self.rnd.randint(*HOLD_TTL_S))
        self.ops.append(op)
        self.attempt(op)

    def attempt(self, op):
        try:
            t0, t1, r = self.call("PATCH", op.target())
        except Stopped:
            return
        op.attempts.append(self.outcome(op, t0, t1, r))
        outcome = op.attempts[-1].outcome
        if (outcome in ("unknown", "unapplied") and getattr(op, "key", True) is not None
                and len(op.attempts) < RETRIES_MAX and self.rnd.random() < 0.5):
            self.retry.append(op)               # a settle is idempotent by (hold, use)
        if (outcome == "ok" and getattr(op, "ttl", None) is not None
                and len(op.attempts) == 1 and self.rnd.random() < 0.7):
            amount = -op.by
            use = self.rnd.choice([0, amount, self.rnd.randint(0, amount)])
            settle = SettleOp(self.n, op.cred, op.attempts[-1].seq, use)
            self.settles.append(settle)
            self.to_settle.append(settle)

    def outcome(self, op, t0, t1, r):
        if isinstance(r, str):
            return Attempt(t0, t1, "unknown", detail=r)
        if r.status == 200:
            doc = r.json
            return Attempt(t0, t1, "ok", doc["tot"], doc["seq"])
        code = r.json.get("error") if r.status == 409 else None
        if code == "insufficient" and getattr(op, "min", None) is not None:
            return Attempt(t0, t1, "refused", r.json["tot"], detail="insufficient")
        if code == "hold_ended" and isinstance(op, SettleOp):
            return Attempt(t0, t1, "ended", detail=r.json["detail"])
        if r.status == 503 and r.json.get("error") in UNAPPLIED:
            return Attempt(t0, t1, "unapplied", detail=r.json["error"])
        if r.status >= 500:
            return Attempt(t0, t1, "unknown", detail=f"{r.status} {r.body[:80]!r}")
        self.errors.append(f"{op}: unexpected answer {r.status} {r.body!r}")
        return Attempt(t0, t1, "unexpected", detail=f"{r.status} {r.body!r}")

    def read_tot(self):
        cred = self.rnd.choice(self.creds)
        try:
            t0, t1, r = self.call("GET", f"/tot?cred={cred}")
        except Stopped:
            return
        if isinstance(r, str) or r.status >= 500:
            return
        if r.status != 200:
            self.errors.append(f"/tot of {cred}: {r.status} {r.body!r}")
            return
        self.reads.append(Read(cred, t0, t1, tot=r.json["tot"]))

    def read_past(self):
        cred = self.rnd.choice(self.creds)
        try:
            t0, t1, r = self.call("GET", f"/past?cred={cred}&limit=10")
        except Stopped:
            return
        if isinstance(r, str) or r.status >= 500:
            return
        if r.status != 200:
            self.errors.append(f"/past of {cred}: {r.status} {r.body!r}")
            return
        self.reads.append(Read(cred, t0, t1, entries=r.json["past"]))


def nemesis(cluster, stop_at, rnd, counts, errors):
    """Faults until stop_at, in a fixed rotation so that every kind occurs
    in a short run; the moments and pause lengths are random."""
    kinds = itertools.cycle(["kill", "pause", "term", "kill", "pause_kill"])
    try:
        while True:
            delay = rnd.uniform(0.3, 1.2)
            if time.monotonic() + delay >= stop_at:
                return
            time.sleep(delay)
            kind = next(kinds)
            if kind == "kill":
                cluster.kill()
            elif kind == "term":
                cluster.term()
            elif kind == "pause":
                cluster.pause(rnd.uniform(0.1, PAUSE_MAX_S))
            else:
                cluster.pause(rnd.uniform(0.05, 0.3), then_kill=True)
            counts[kind] += 1
    except Exception as e:
        errors.append(f"nemesis: {type(e).__name__}: {e}")


# --- the test ------------------------------------------------------------------------

def test_bank_under_kill_and_stop(tmp_path):
    banner = (f"bank checker: seed {SEED}, {DURATION_S:g} s; replay with "
              f"ACCMAN_CRASH_SEED={SEED}" + (" ACCMAN_CRASH_LONG=1" if LONG else ""))
    print(banner, flush=True)
    rnd = random.Random(SEED)
    cluster = Cluster(tmp_path)
    workers, errors = [], []
    stop = threading.Event()
    try:
        for cred in CREDS + UNTOUCHED:
            r = cluster.srv.mod(cred, FUND[cred], key=f"fund-{cred}")
            assert r.json == {"tot": FUND[cred], "seq": 1}, r
        untouched_before = {cred: history(cluster.srv, cred) for cred in UNTOUCHED}

        amounts = itertools.count()
        for n in range(WORKERS):
            Worker(n, cluster, amounts, stop, workers)
        for w in workers:
            w.start()
        counts = {"kill": 0, "pause": 0, "term": 0, "pause_kill": 0}
        stop_at = time.monotonic() + DURATION_S
        nemesis(cluster, stop_at, rnd, counts, errors)
        srv, ops, settles = end_load(cluster, workers, stop, stop_at, errors, banner)

        histories = {cred: history(srv, cred) for cred in CREDS}
        for cred in CREDS:
            first = histories[cred][0]
            assert (first["seq"], first["by"], first["key"]) == (1, FUND[cred], f"fund-{cred}")
            assert srv.tot(cred) == histories[cred][-1]["tot"], cred
        reads = [r for w in workers for r in w.reads]
        accounts = {cred: srv.get(f"/past?cred={cred}&limit=1").json["account"]
                    for cred in CREDS + UNTOUCHED}
        checker = Checker(ops, reads, histories, settles, all_events(srv),
                          {c: accounts[c] for c in CREDS}, all_ended=True)
        problems = checker.run()
        untouched = [e for e in checker.events if e["account"] in
                     {accounts[c] for c in UNTOUCHED}]
        problems = [p for p in problems if "which no test account is" not in p]
        assert len(untouched) == len(UNTOUCHED), untouched          # their funding only
        assert not problems, f"{banner}\n{len(problems)} problems:\n" + "\n".join(problems[:30])

        for cred in UNTOUCHED:
            assert history(srv, cred) == untouched_before[cred], cred
            assert srv.tot(cred) == FUND[cred]

        outcomes = [a.outcome for op in ops for a in op.attempts]
        acked = outcomes.count("ok")
        ends = [how for _, how in checker.ends.values()]
        summary = (f"{len(ops)} mods and holds, {acked} acknowledged, "
                   f"{outcomes.count('refused')} refused, {outcomes.count('unapplied')} "
                   f"unapplied, {outcomes.count('unknown')} unknown; "
                   f"{len(checker.ends)} holds ended: {ends.count('settle')} settled, "
                   f"{ends.count('expire')} expired, {ends.count('either')} either; "
                   f"{len(checker.events)} events; {len(reads)} reads; "
                   f"faults {counts}; {cluster.generation} servers")
        print(f"bank checker: {summary}", flush=True)
        # The run must have been a real one: faults of every kind, and
        # changes acknowledged throughout, holds settled and expired.
        assert counts["kill"] >= 2 and counts["pause"] >= 1 and counts["pause_kill"] >= 1 \
            and counts["term"] >= 1, summary
        assert acked >= 100 and outcomes.count("refused") >= 1, summary
        assert ends.count("settle") >= 10 and ends.count("expire") >= 10, summary

        # A clean stop, then the offline check of every record.
        assert srv.stop() == 0
        done = run_accman("verify", "--data", cluster.data)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        stop.set()
        stop_quietly(cluster.srv)


def end_load(cluster, workers, stop, stop_at, errors, banner):
    """At `stop_at`, the workers stopped and their errors asserted none;
    then what can be resolved is: an unknown keyed change sent again is
    applied now or answered from its record, an unknown settle sent again
    is answered its first reply, or hold_ended when its hold expired
    meanwhile; and every hold has ended once its ttl (and the wheel's
    second) passed.  Returns the server, the changes and the settles
    tried."""
    time.sleep(max(0.0, stop_at - time.monotonic()))
    stop.set()
    for w in workers:
        w.join(CLIENT_TIMEOUT_S * 2)
        assert not w.is_alive(), f"{w.name} hung"
        errors.extend(w.errors)
    assert not errors, f"{banner}\n" + "\n".join(errors[:20])
    srv = cluster.srv
    ops = [op for w in workers for op in w.ops if op.attempts]
    settles = [s for w in workers for s in w.settles if s.attempts]
    resolve(srv, workers[0], [op for op in ops if op.key is not None] + settles)
    deadline = time.monotonic() + HOLDS_END_S + 10
    while srv.get("/health").json["open_holds"]:
        assert time.monotonic() < deadline, "holds still open past their ttl"
        time.sleep(0.1)
    return srv, ops, settles


def resolve(srv, worker, ops):
    """Sends once more each change whose outcome is unknown: one attempt
    or more unknown, the others (if any) unapplied."""
    with srv.connect(timeout=CLIENT_TIMEOUT_S) as c:
        for op in ops:
            outcomes = {a.outcome for a in op.attempts}
            if "unknown" in outcomes and outcomes <= {"unknown", "unapplied"}:
                t0 = time.monotonic()
                c.send(request_bytes("PATCH", op.target()))
                r = c.response()
                op.attempts.append(worker.outcome(op, t0, time.monotonic(), r))
                assert op.attempts[-1].outcome in ("ok", "refused", "ended"), r


def all_events(srv):
    out, after = [], 0
    with srv.connect(timeout=CLIENT_TIMEOUT_S) as c:
        while True:
            c.send(request_bytes("GET", f"/events?after={after}&limit=1000"))
            doc = c.response().json
            if not doc["events"]:
                return out
            out += doc["events"]
            after = doc["next"]


# --- the checker checks: each fault it exists to find, found -------------------------

def test_the_checker_passes_a_correct_history():
    assert (bankfaults.CRED, bankfaults.FUND) == (CREDS[0], FUND[CREDS[0]])
    assert find(*scene()) == []


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__.strip("_") for f in FAULTS])
def test_the_checker_finds(fault):
    made = scene()
    fault(*made[:5])
    assert find(*made) != []
