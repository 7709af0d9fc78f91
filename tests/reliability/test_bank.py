"""The bank checker: Jepsen's bank test, over HTTP, against the real server.

Worker threads run keyed and unkeyed mods with unique amounts (every `by`
in the run is different, so an entry in a history names the call that made
it), some with `min`, and reads of /tot and /past, against a few accounts,
each on its own keep-alive connection, logging every call's start, end and
outcome: ok, refused (409), or unknown (timeout, reset, 5xx).  Meanwhile a
nemesis kills the server with SIGKILL at random moments, stops it with
SIGSTOP for a while and lets it go on with SIGCONT, or stops then kills it;
after a kill it restarts the server on the same data directory.

At the end, with the faults over, every unknown keyed mod is sent once more
with its key, and the checker reads every history whole and verifies:

* seqs run 1..n with no gap (across all the restarts), each entry's tot is
  the previous tot plus its by, and /tot equals the newest tot;
* every acknowledged mod is in the history exactly once, at the seq and
  with the tot its 200 named, with its key;
* every entry is a mod some call sent, whose outcome was ok or unknown,
  never one that was only ever refused;
* no entry of a mod with `min` has a tot under that min, and every 409
  insufficient was right on the balance it reported;
* no read (a /tot, a /past page, the tot of a 409) ever showed a state that
  is not in the final history, or one older than a mod acknowledged before
  the read began, or one made by a mod sent after the read ended;
* two mods acknowledged one after the other (in real time) have growing seqs;
* the accounts nobody touched are unchanged; `accman verify` passes.

Short and seeded by default (CI); ACCMAN_CRASH_LONG=1 runs for minutes
with a random seed, printed so that ACCMAN_CRASH_SEED=N replays the same
schedule of calls and faults (thread timing is the machine's).
ACCMAN_CRASH_SECONDS overrides the length.
"""

import bisect
import itertools
import os
import random
import signal
import threading
import time
from dataclasses import dataclass, field

import pytest

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


@dataclass(slots=True)
class Attempt:
    t0: float
    t1: float
    outcome: str            # ok | refused | unknown
    tot: int | None = None  # ok: the new tot; refused: the tot it was judged on
    seq: int | None = None
    detail: str = ""


@dataclass(slots=True)
class Op:
    worker: int
    cred: str
    by: int
    min: int | None
    key: str | None
    attempts: list = field(default_factory=list)

    @property
    def sent_at(self):
        return self.attempts[0].t0

    def target(self):
        t = f"/mod?cred={self.cred}&by={self.by}"
        if self.min is not None:
            t += f"&min={self.min}"
        if self.key is not None:
            t += f"&key={self.key}"
        return t


@dataclass(slots=True)
class Read:
    cred: str
    t0: float
    t1: float
    tot: int | None = None          # a /tot
    entries: list | None = None     # a /past page, newest first


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

    def pause(self, seconds, then_kill=False):
        self.srv.proc.send_signal(signal.SIGSTOP)
        time.sleep(seconds)
        if then_kill:
            self.kill()
        else:
            self.srv.proc.send_signal(signal.SIGCONT)


class Worker(threading.Thread):
    def __init__(self, n, cluster, amounts, stop, log):
        super().__init__(name=f"bank-worker-{n}", daemon=True)
        self.n = n
        self.cluster = cluster
        self.amounts = amounts
        self.stop = stop
        self.rnd = random.Random(SEED * 1000 + n)
        self.ops = []
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
                x = self.rnd.random()
                if x < 0.15:
                    self.read_tot()
                elif x < 0.20:
                    self.read_past()
                else:
                    self.mod(x)
        except Stopped:
            pass
        except Exception as e:          # a checker bug or a protocol error: report it
            self.errors.append(f"worker {self.n}: {type(e).__name__}: {e}")
        finally:
            self.drop()

    def mod(self, x):
        cred = self.rnd.choice(CREDS)
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

    def attempt(self, op):
        try:
            t0, t1, r = self.call("PATCH", op.target())
        except Stopped:
            return
        if isinstance(r, str):
            op.attempts.append(Attempt(t0, t1, "unknown", detail=r))
        elif r.status == 200:
            doc = r.json
            op.attempts.append(Attempt(t0, t1, "ok", doc["tot"], doc["seq"]))
        elif r.status == 409 and r.json["error"] == "insufficient" and op.min is not None:
            op.attempts.append(Attempt(t0, t1, "refused", r.json["tot"], detail="insufficient"))
        elif r.status >= 500:
            op.attempts.append(Attempt(t0, t1, "unknown", detail=f"{r.status} {r.body[:80]!r}"))
        else:
            op.attempts.append(Attempt(t0, t1, "unexpected", detail=f"{r.status} {r.body!r}"))
            self.errors.append(f"{op}: unexpected answer {r.status} {r.body!r}")
        if (op.attempts[-1].outcome == "unknown" and op.key is not None
                and len(op.attempts) < RETRIES_MAX and self.rnd.random() < 0.5):
            self.retry.append(op)

    def read_tot(self):
        cred = self.rnd.choice(CREDS)
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
        cred = self.rnd.choice(CREDS)
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
    kinds = itertools.cycle(["kill", "pause", "kill", "pause_kill"])
    try:
        while True:
            delay = rnd.uniform(0.3, 1.2)
            if time.monotonic() + delay >= stop_at:
                return
            time.sleep(delay)
            kind = next(kinds)
            if kind == "kill":
                cluster.kill()
            elif kind == "pause":
                cluster.pause(rnd.uniform(0.1, PAUSE_MAX_S))
            else:
                cluster.pause(rnd.uniform(0.05, 0.3), then_kill=True)
            counts[kind] += 1
    except Exception as e:
        errors.append(f"nemesis: {type(e).__name__}: {e}")


# --- the checker -----------------------------------------------------------------

class Checker:
    def __init__(self, ops, reads, histories):
        self.ops = ops
        self.reads = reads
        self.h = histories          # cred -> entries, oldest first
        self.problems = []

    def problem(self, text):
        self.problems.append(text)

    def run(self):
        self.check_histories()
        self.check_entries_are_sent_mods()
        self.check_acknowledged()
        self.check_refusals()
        self.check_order_and_reads()
        return self.problems

    def check_histories(self):
        for cred, entries in self.h.items():
            seqs = [e["seq"] for e in entries]
            if seqs != list(range(1, len(entries) + 1)):
                gaps = sorted(set(range(1, max(seqs) + 1)) - set(seqs))[:10]
                self.problem(f"{cred}: seqs are not 1..{len(entries)}: gaps {gaps}")
            tot = 0
            for e in entries:
                tot += e["by"]
                if e["tot"] != tot:
                    self.problem(f"{cred}: seq {e['seq']} has tot {e['tot']}, "
                                 f"the sum of its history is {tot}")
                    break

    def check_entries_are_sent_mods(self):
        self.by_amount = {}
        for op in self.ops:
            assert op.by not in self.by_amount, "two calls with one amount: a checker bug"
            self.by_amount[op.by] = op
        self.entry_of = {}
        for cred, entries in self.h.items():
            for e in entries[1:]:              # [0] is the opening balance
                op = self.by_amount.get(e["by"])
                if op is None or op.cred != cred:
                    self.problem(f"{cred}: entry {e} is no mod any call sent")
                    continue
                if op.by in self.entry_of:
                    self.problem(f"{cred}: the mod {op.key or op.by} applied twice: "
                                 f"seqs {self.entry_of[op.by]['seq']} and {e['seq']}")
                self.entry_of[op.by] = e
                if e["key"] != op.key:
                    self.problem(f"{cred}: seq {e['seq']} has key {e['key']}, its call "
                                 f"sent {op.key}")
                outcomes = {a.outcome for a in op.attempts}
                if not outcomes & {"ok", "unknown"}:
                    self.problem(f"{cred}: seq {e['seq']} is the mod {op.key or op.by}, "
                                 f"which was only ever refused: {outcomes}")
                if op.min is not None and e["tot"] < op.min:
                    self.problem(f"{cred}: seq {e['seq']} left tot {e['tot']} under "
                                 f"its min {op.min}")

    def check_acknowledged(self):
        for op in self.ops:
            acks = {(a.tot, a.seq) for a in op.attempts if a.outcome == "ok"}
            if not acks:
                continue
            if len(acks) > 1:
                self.problem(f"{op.key}: one key answered with different results {acks}")
            e = self.entry_of.get(op.by)
            if e is None:
                self.problem(f"{op.cred}: acknowledged mod {op.key or op.by} {acks} "
                             "is not in the history: lost")
                continue
            for tot, seq in acks:
                if (e["seq"], e["tot"]) != (seq, tot):
                    self.problem(f"{op.cred}: mod {op.key or op.by} was answered "
                                 f"tot {tot} seq {seq}, the history has {e}")

    def check_refusals(self):
        for op in self.ops:
            for a in op.attempts:
                if a.outcome == "refused" and a.tot + op.by >= op.min:
                    self.problem(f"{op.cred}: {op.key or op.by} refused as insufficient "
                                 f"on tot {a.tot}, which covers by {op.by} at min {op.min}")

    def check_order_and_reads(self):
        # Per cred: acknowledgements sorted by their end, with the running
        # maximum of their seqs: the oldest state a later call may see.
        acked = {cred: [] for cred in self.h}
        for op in self.ops:
            for a in op.attempts:
                if a.outcome == "ok":
                    acked[op.cred].append((a.t1, a.seq, op.by))
        floors = {}
        for cred, acks in acked.items():
            acks.sort()
            running, best = [], 0
            for _, seq, _ in acks:
                best = max(best, seq)
                running.append(best)
            floors[cred] = ([t1 for t1, _, _ in acks], running)

        def floor(cred, t0):
            ends, running = floors[cred]
            i = bisect.bisect_left(ends, t0)
            return running[i - 1] if i else 0

        for op in self.ops:
            # Only a mod applied by its first attempt: a later attempt may
            # be answered from the record of an earlier, unknown one.
            a = op.attempts[0]
            if a.outcome == "ok" and floor(op.cred, a.t0) >= a.seq:
                self.problem(f"{op.cred}: {op.key or op.by} got seq {a.seq}, after seq "
                             f"{floor(op.cred, a.t0)} was acknowledged (real-time order broken)")

        def seen_ok(cred, tot, t0, t1, what):
            low = floor(cred, t0)
            for e in self.h[cred][max(low, 1) - 1:]:
                if e["tot"] != tot:
                    continue
                op = self.by_amount.get(e["by"])
                if op is None or op.sent_at < t1:
                    return
            self.problem(f"{cred}: {what} showed tot {tot}, which is no state of the "
                         f"final history at or after seq {low} made by a mod sent before it")

        for r in self.reads:
            if r.tot is not None:
                seen_ok(r.cred, r.tot, r.t0, r.t1, "a /tot")
            else:
                final = self.h[r.cred]
                for e in r.entries:
                    kept = final[e["seq"] - 1] if e["seq"] <= len(final) else None
                    if kept != e:
                        self.problem(f"{r.cred}: /past showed {e}, the final history has {kept}")
                newest = r.entries[0]["seq"] if r.entries else 0
                if newest < floor(r.cred, r.t0):
                    self.problem(f"{r.cred}: /past showed seq {newest} after seq "
                                 f"{floor(r.cred, r.t0)} was acknowledged")
        for op in self.ops:
            for a in op.attempts:
                if a.outcome == "refused":
                    seen_ok(op.cred, a.tot, a.t0, a.t1, f"the 409 of {op.key or op.by}")


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
        counts = {"kill": 0, "pause": 0, "pause_kill": 0}
        stop_at = time.monotonic() + DURATION_S
        nemesis(cluster, stop_at, rnd, counts, errors)
        time.sleep(max(0.0, stop_at - time.monotonic()))
        stop.set()
        for w in workers:
            w.join(CLIENT_TIMEOUT_S * 2)
            assert not w.is_alive(), f"{w.name} hung"
            errors.extend(w.errors)
        assert not errors, f"{banner}\n" + "\n".join(errors[:20])

        # The faults are over: resolve what can be resolved.  An unknown
        # keyed mod sent again is applied now or answered from its record.
        srv = cluster.srv
        ops = [op for w in workers for op in w.ops if op.attempts]
        with srv.connect(timeout=CLIENT_TIMEOUT_S) as c:
            for op in ops:
                if op.key is not None and all(a.outcome == "unknown" for a in op.attempts):
                    t0 = time.monotonic()
                    c.send(request_bytes("PATCH", op.target()))
                    r = c.response()
                    t1 = time.monotonic()
                    if r.status == 200:
                        op.attempts.append(Attempt(t0, t1, "ok", r.json["tot"], r.json["seq"]))
                    else:
                        assert r.status == 409 and r.json["error"] == "insufficient", r
                        op.attempts.append(Attempt(t0, t1, "refused", r.json["tot"]))

        histories = {cred: history(srv, cred) for cred in CREDS}
        for cred in CREDS:
            first = histories[cred][0]
            assert (first["seq"], first["by"], first["key"]) == (1, FUND[cred], f"fund-{cred}")
            assert srv.tot(cred) == histories[cred][-1]["tot"], cred
        reads = [r for w in workers for r in w.reads]
        problems = Checker(ops, reads, histories).run()
        assert not problems, f"{banner}\n{len(problems)} problems:\n" + "\n".join(problems[:30])

        for cred in UNTOUCHED:
            assert history(srv, cred) == untouched_before[cred], cred
            assert srv.tot(cred) == FUND[cred]

        outcomes = [a.outcome for op in ops for a in op.attempts]
        acked = outcomes.count("ok")
        summary = (f"{len(ops)} mods, {acked} acknowledged, {outcomes.count('refused')} "
                   f"refused, {outcomes.count('unknown')} unknown; {len(reads)} reads; "
                   f"faults {counts}; {cluster.generation} servers")
        print(f"bank checker: {summary}", flush=True)
        # The run must have been a real one: faults of every kind, and mods
        # acknowledged throughout.
        assert counts["kill"] >= 2 and counts["pause"] >= 1 and counts["pause_kill"] >= 1, summary
        assert acked >= 100 and outcomes.count("refused") >= 1, summary

        # A clean stop, then the offline check of every record.
        assert srv.stop() == 0
        done = run_accman("verify", "--data", cluster.data)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        stop.set()
        stop_quietly(cluster.srv)


# --- the checker checks: each fault it exists to find, found -------------------------

def _entry(seq, by, tot, key=None):
    return {"seq": seq, "by": by, "tot": tot, "at": 0, "key": key}


def _scene():
    """bank-0 opened with 500; a deposit of 1000 acknowledged (t 1..2), a
    charge of 1001 at min 0 acknowledged (t 3..4), a charge of 5000 at
    min 0 refused on 499 (t 5..6); a /tot read 499 at t 7..8."""
    c = CREDS[0]
    fund = FUND[c]
    ops = [Op(0, c, 1000, None, "a", [Attempt(1, 2, "ok", fund + 1000, 2)]),
           Op(0, c, -1001, 0, "b", [Attempt(3, 4, "ok", fund - 1, 3)]),
           Op(1, c, -5000, 0, "c", [Attempt(5, 6, "refused", fund - 1)])]
    reads = [Read(c, 7, 8, tot=fund - 1)]
    hist = {c: [_entry(1, fund, fund, f"fund-{c}"), _entry(2, 1000, fund + 1000, "a"),
                _entry(3, -1001, fund - 1, "b")]}
    return ops, reads, hist


def _lose_an_acknowledged_mod(ops, reads, h):
    del h[CREDS[0]][2]


def _apply_a_mod_twice(ops, reads, h):
    h[CREDS[0]].append(_entry(4, -1001, FUND[CREDS[0]] - 1002, "b"))


def _apply_a_refused_mod(ops, reads, h):
    h[CREDS[0]].append(_entry(4, -5000, FUND[CREDS[0]] - 5001, "c"))


def _leave_a_gap(ops, reads, h):
    h[CREDS[0]][2]["seq"] = 4


def _break_a_sum(ops, reads, h):
    h[CREDS[0]][2]["tot"] += 1


def _read_a_stale_balance(ops, reads, h):
    reads[0].tot = FUND[CREDS[0]] + 1000


def _read_the_future(ops, reads, h):
    reads[0].t0, reads[0].t1 = 0.5, 0.6


def _answer_out_of_order(ops, reads, h):
    ops[1].attempts[0] = Attempt(3, 4, "ok", FUND[CREDS[0]] - 1, 1)


def _refuse_wrongly(ops, reads, h):
    ops[2].by = -10


def _show_a_lost_entry(ops, reads, h):
    reads.append(Read(CREDS[0], 9, 10, entries=[_entry(3, -1001, 0, "b")]))


FAULTS = [_lose_an_acknowledged_mod, _apply_a_mod_twice, _apply_a_refused_mod, _leave_a_gap,
          _break_a_sum, _read_a_stale_balance, _read_the_future, _answer_out_of_order,
          _refuse_wrongly, _show_a_lost_entry]


def test_the_checker_passes_a_correct_history():
    assert Checker(*_scene()).run() == []


@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__.strip("_") for f in FAULTS])
def test_the_checker_finds(fault):
    ops, reads, hist = _scene()
    fault(ops, reads, hist)
    assert Checker(ops, reads, hist).run() != []
