"""The events checker: the event stream, end to end, through SIGKILLs.

The bank checker's workers (test_bank.py: keyed and unkeyed mods, holds,
settles, expiries, reads, each on its own connection) change a few accounts
of a real AccMan on its embedded store, with a retention of a second (a
trim pass each second), which a nemesis SIGKILLs at random moments (a
third of the times after a SIGSTOP of a moment; the first server and every
fourth living through trim passes) and restarts on the same port and data
directory, while the webhook's receiver is taken down for longer than the
retention (trimcheck.ReceiverDown).  Meanwhile the readers follow the
stream (followers.py), each recording what it got, and each gap it was
told of by a 410 events_trimmed:

* the Python client's follower (AccManClient.events, CALLING.md "The event
  stream"), resuming from each page's `next`, of random lengths, and
  riding out the outages; and the same on AccManSyncClient; and two slow
  ones, a little behind the newest event, and behind the retention;
* `accman events --follow`, a subprocess whose stdout lines are parsed at
  the end, stopped (SIGTERM) and started again `--after` its last line's
  id, as CALLING.md says, after the second kill (and whenever the server
  came back on another port);
* the webhook (`accman serve --webhook`) into a real HTTP receiver that
  refuses a POST whose AccMan-Signature is not the HMAC-SHA256 of its body
  (SERVER.md "Webhooks"), and dedupes by id.

Afterwards the webhook's receiver has the whole stream (its cursor kept
every event for it past the retention), of which the store keeps a
gap-free suffix (trimcheck.py), and that stream (with /past of each
account) is reconciled:

* the stream: ids 1..N without a gap, each account's events exactly its
  history, and every acknowledged change (a 200 its writer saw) in it, at
  the seq and tot of its 200 (bankcheck.Checker); with --low-balance, a
  low_balance event right after each change that crossed it, and no other;
* each reader: every event it got is the store's event of that id, whole
  (type, account, seq, by, tot, at, key, hold); it got every id 1..N but
  those of the gaps it was told of, each of ids all past the retention
  when told (the lagging one must meet one);
* the Python followers and the command line: ids 1..N in order, each once
  (no duplicate is allowed: each resumes from the last id it has);
* the webhook: every POST signed and acknowledged, its ids consecutive,
  and none starting past the highest id seen before it (no skip).  A
  duplicate is allowed only where SERVER.md allows one: a failed attempt
  is retried with the same body, and after a crash the batch in flight
  and those acknowledged since the last cursor save are sent again, by
  the new server's first POST (webhook_problems).

After a clean stop `accman verify` passes: a trim cut short by a kill
left no damage.  Short and seeded by default; ACCMAN_CRASH_LONG=1 (with
test_bank.py's seed and length variables) runs for minutes.  The checks
are in eventscheck.py and trimcheck.py.
"""

import itertools
import json
import os
import random
import threading
import time
from types import SimpleNamespace

from eventscheck import reader_problems, store_and_reader_problems, webhook_problems
from conftest import run_accman, spawn_server
from followers import catch_up, cli_met_outages, start_readers, stop_readers
from relhelp import history, stop_quietly
from test_bank import CREDS, FUND, SEED, UNTOUCHED, Cluster, Worker, end_load
from test_webhook_delivery import ENV, SECRET, check_delivery
from trimcheck import RETENTION_S, ReceiverDown, kept_problems, store_kept, webhook_stream
from webhook_receiver import Receiver, secret_file

LONG = os.environ.get("ACCMAN_CRASH_LONG") == "1"
DURATION_S = float(os.environ.get("ACCMAN_CRASH_SECONDS") or (300 if LONG else 5))
WORKERS = 4
KILL_EVERY_S = (0.4, 1.0)       # drawn from, between kills
# The first wait and every fourth, drawn from: a server that lives through
# trim passes (one a second), so that they run under the faults, while the
# receiver is down too (trimcheck.ReceiverDown), and a kill may cut one.
LIVE_S = (1.6, 2.2)
LOW = 100                       # --low-balance: the workers' balances cross it often


class HookCluster(Cluster):
    """test_bank's server and its restarts, with the webhook on, noting
    when each run of the server was started and each was killed."""

    def __init__(self, tmp_path, rx):
        self.args = ["--webhook", rx.url, "--webhook-secret", secret_file(tmp_path, SECRET),
                     "--low-balance", LOW, "--events-retention", f"{RETENTION_S}s"]
        self.started_at = []
        self.killed_at = []         # when each run stopped: its SIGKILL, or its SIGSTOP
        self._stopped_at = None
        super().__init__(tmp_path)

    def pause(self, seconds, then_kill=False):
        if then_kill:
            self._stopped_at = time.monotonic()
        super().pause(seconds, then_kill)

    def kill(self):
        self.killed_at.append(self._stopped_at or time.monotonic())
        self._stopped_at = None
        super().kill()

    def _spawn(self, port):
        self.generation += 1
        log_dir = self.tmp_path / f"server{self.generation}"
        self.started_at.append(time.monotonic())
        try:
            srv = spawn_server(self.data, log_dir, port=port, env=ENV, args=self.args)
        except RuntimeError:
            if port == 0:
                raise
            srv = spawn_server(self.data, log_dir / "retry", port=0, env=ENV, args=self.args)
        return srv


def nemesis(cluster, cli, stop_at, rnd, counts, errors):
    """SIGKILL and restart on the same port and data, until stop_at; every
    third kill comes after a SIGSTOP of a moment, so that long polls and a
    webhook POST wait on a server that never answers them."""
    try:
        while True:
            delay = rnd.uniform(*(LIVE_S if counts["kill"] % 4 == 0 else KILL_EVERY_S))
            if time.monotonic() + delay >= stop_at:
                return
            time.sleep(delay)
            if counts["kill"] % 3 == 2:
                cluster.pause(rnd.uniform(0.05, 0.3), then_kill=True)
            else:
                cluster.kill()
            cli.follow(cluster.addr, again=counts["kill"] == 1)
            counts["kill"] += 1
    except Exception as e:
        errors.append(f"nemesis: {type(e).__name__}: {e}")


# --- the test ------------------------------------------------------------------------

def test_every_reader_gets_every_event_through_sigkills(tmp_path):
    banner = (f"events checker: seed {SEED}, {DURATION_S:g} s; replay with "
              f"ACCMAN_CRASH_SEED={SEED}" + (" ACCMAN_CRASH_LONG=1" if LONG else ""))
    print(banner, flush=True)
    rnd = random.Random(SEED)
    rx = Receiver(SECRET)
    rx.verify = True
    cluster = cli = hook_down = None
    clients = []
    workers, errors = [], []
    stop = threading.Event()
    try:
        cluster = HookCluster(tmp_path, rx)
        for cred in CREDS + UNTOUCHED:
            r = cluster.srv.mod(cred, FUND[cred], key=f"fund-{cred}")
            assert r.json == {"tot": FUND[cred], "seq": 1}, r
        clients, cli = start_readers(cluster, tmp_path, slow=True)
        hook_down = ReceiverDown(rx, SEED + 4)
        hook_down.start()
        amounts = itertools.count()
        for n in range(WORKERS):
            Worker(n, cluster, amounts, stop, workers)
        for w in workers:
            w.start()
        counts = {"kill": 0}
        stop_at = time.monotonic() + DURATION_S
        nemesis(cluster, cli, stop_at, rnd, counts, errors)
        hook_down.end()
        srv, ops, settles = end_load(cluster, workers, stop, stop_at, errors, banner)
        catch_up(srv, clients, cli, rx)

        # The whole stream is the webhook's (its cursor kept every event
        # for it), of which the store keeps a suffix (trimcheck.py).  The
        # store is read first: what it trims, the receiver has by then.
        first, kept = store_kept(srv)
        posts = rx.snapshot()
        store = webhook_stream(posts)
        histories = {cred: history(srv, cred) for cred in CREDS}
        accounts = {cred: srv.get(f"/past?cred={cred}&limit=1").json["account"]
                    for cred in CREDS}
        problems = kept_problems(first, kept, store)
        assert not problems, f"{banner}\n" + "\n".join(problems)
        problems = store_and_reader_problems(store, ops, [], histories, settles, accounts, LOW,
                                              clients, cli, posts, RETENTION_S)
        repeats, repeated, back_s = webhook_problems(posts, cluster.started_at,
                                                     cluster.killed_at)
        problems += repeats
        assert not problems, f"{banner}\n{len(problems)} problems:\n" + "\n".join(problems[:30])
        # Ids 1..N, each POST signed, in order, acknowledged, none skipped.
        check_delivery(rx, store, SimpleNamespace(acked=[]), {})

        acked = sum(a.outcome == "ok" for op in ops for a in op.attempts)
        summary = (f"{len(store)} events, {acked} changes acknowledged; {counts['kill']} kills, "
                   f"{cluster.generation} servers; the store keeps {first}.., the receiver was "
                   f"down {hook_down.times} times; gaps told: {[len(c.gaps) for c in clients]}, "
                   f"cli {len(cli.gaps)}; "
                   f"followers: {[len(c.pages) for c in clients]} pages, "
                   f"{[c.outages for c in clients]} outages; cli: {len(cli.runs)} runs; webhook: "
                   f"{len(posts)} POSTs, {repeated} ids sent again, first sent up to "
                   f"{back_s:.2f} s before the kill")
        print(f"events checker: {summary}", flush=True)
        # A real run: kills throughout, changes of every kind acknowledged.
        assert counts["kill"] >= 2 and acked >= 100, summary
        assert {e["type"] for e in store} == {"mod", "hold", "settle", "expire",
                                              "low_balance"}, summary
        cli_met_outages(cli)
        # Trimming ran, and left the lagging reader behind.
        assert first > 1 and hook_down.times >= 1 and clients[-1].gaps, summary
        assert srv.stop() == 0
        done = run_accman("verify", "--data", cluster.data)
        assert done.returncode == 0, done.stdout + done.stderr
    finally:
        stop_readers(stop, clients, cli)
        if hook_down is not None:
            hook_down.end()
        if cluster is not None:
            stop_quietly(cluster.srv)
        rx.close()


# --- the checks checked: each fault they exist to find, found ----------------------------

def _stream(n=6):
    return [{"id": i, "type": "mod", "account": "a1", "seq": i, "by": 1000 + i, "tot": i,
             "at": 1, "key": f"k{i}", "hold": None} for i in range(1, n + 1)]


def _post(events, at):
    from webhook_receiver import Post
    return Post("/", {}, json.dumps({"events": events}).encode(), 200, at=at)


def test_the_events_checker_passes_what_the_docs_allow():
    """Every event once, in order; the webhook's retry of a batch, and the
    batches a new run sends again before its first new one."""
    s = _stream()
    assert reader_problems("r", list(s), s) == []
    posts = [_post(s[0:2], 1.0), _post(s[0:2], 1.1), _post(s[2:4], 1.2),   # a retry
             _post(s[1:3], 2.5), _post(s[3:5], 2.6), _post(s[5:6], 2.7)]   # run 2 sends again
    assert reader_problems("w", [e for p in posts for e in p.events], s,
                           repeats_allowed=True) == []
    assert webhook_problems(posts, [0.0, 2.0])[:2] == ([], 5)


def _changed(s):
    return [*s[:2], {**s[2], "tot": 99}, *s[3:]]


def _key_lost(s):
    return [*s[:3], {**s[3], "key": None}, *s[4:]]


FAULTS = {
    "an event changed": _changed,
    "a key lost": _key_lost,
    "an event missed": lambda s: s[:2] + s[3:],
    "the last event missed": lambda s: s[:-1],
    "an event twice": lambda s: s[:3] + s[2:],
    "two events swapped": lambda s: [*s[:2], s[3], s[2], *s[4:]],
}


def test_the_events_checker_finds_each_fault_of_a_reader():
    s = _stream()
    for name, fault in FAULTS.items():
        assert reader_problems("r", fault(s), s) != [], name
    assert reader_problems("w", _changed(s), s, repeats_allowed=True) != []
    assert reader_problems("w", s[:2] + s[3:], s, repeats_allowed=True) != []


def test_the_events_checker_finds_a_webhook_repeat_the_docs_do_not_allow():
    """Ids sent again in the middle of a run's chain of POSTs, and not a
    retry of the POST before: a duplicate no crash explains."""
    s = _stream()
    posts = [_post(s[0:2], 1.0), _post(s[2:4], 1.1), _post(s[1:5], 1.2), _post(s[5:6], 1.3)]
    problems, repeated, _ = webhook_problems(posts, [0.0])
    assert len(problems) == 1 and repeated == 3, problems
    # The same POSTs with a new run starting before the third: allowed.
    assert webhook_problems(posts, [0.0, 1.15])[:2] == ([], 3)
    # A restart starts one run: two resends after it are one too many.
    posts = [_post(s[0:2], 1.0), _post(s[2:4], 1.1), _post(s[1:3], 1.2), _post(s[0:2], 1.3)]
    assert len(webhook_problems(posts, [0.0, 1.15])[0]) == 1


def test_the_events_checker_judges_the_gaps_trimming_tells_of():
    """A gap told by a 410, of events past the retention then, is what the
    docs allow; one of an event within it, a silent one, one told but
    whose events were got anyway, or one told of nothing, is a fault."""
    s = [{**e, "at": 1000 * e["id"]} for e in _stream()]      # event i at i s
    told_at_9s = [(1, 4, 9000)]                                # 2 and 3: past 1 s at 9 s
    assert reader_problems("r", [s[0], *s[3:]], s, gaps=told_at_9s, retention_s=1) == []
    assert reader_problems("r", [s[0], *s[3:]], s, gaps=[(1, 4, 3500)], retention_s=1) != []
    assert reader_problems("r", [s[0], *s[3:]], s, retention_s=1) != []
    assert reader_problems("r", s, s, gaps=told_at_9s, retention_s=1) != []
    assert reader_problems("r", s, s, gaps=[(3, 4, 9000)], retention_s=1) != []
    # The store keeps a suffix of the stream, whole and without a gap.
    assert kept_problems(4, s[3:], s) == []
    assert kept_problems(3, s[3:], s) != []
    assert kept_problems(4, [s[3], s[5]], s) != []
    assert kept_problems(4, [s[3], {**s[4], "tot": 99}, s[5]], s) != []
    assert kept_problems(4, s[3:5], s) != []
    assert kept_problems(4, s[3:], s[:2] + s[3:]) != []         # the webhook's with a gap
