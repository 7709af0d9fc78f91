"""The events checker: the event stream, end to end, through SIGKILLs.

The bank checker's workers (test_bank.py: keyed and unkeyed mods, holds,
settles, expiries, reads, each on its own connection) change a few accounts
of a real AccMan on its embedded store, which a nemesis SIGKILLs at random
moments (a third of the times after a SIGSTOP of a moment) and restarts
on the same port and data directory.  Meanwhile four readers follow the
stream, each recording what it got:

* the Python client's follower (AccManClient.events, CALLING.md "The event
  stream"), resuming from each page's `next`, of random lengths, and
  riding out the outages; and the same on AccManSyncClient;
* `accman events --follow`, a subprocess whose stdout lines are parsed at
  the end, stopped (SIGTERM) and started again `--after` its last line's
  id, as CALLING.md says, after the second kill (and whenever the server
  came back on another port);
* the webhook (`accman serve --webhook`) into a real HTTP receiver that
  refuses a POST whose AccMan-Signature is not the HMAC-SHA256 of its body
  (SERVER.md "Webhooks"), and dedupes by id.

Afterwards the store is read whole (GET /events from 0, /past of each
account) and reconciled:

* the store: ids 1..N without a gap, each account's events exactly its
  history, and every acknowledged change (a 200 its writer saw) in it, at
  the seq and tot of its 200 (bankcheck.Checker); with --low-balance, a
  low_balance event right after each change that crossed it, and no other;
* each reader: every event it got is the store's event of that id, whole
  (type, account, seq, by, tot, at, key, hold); it got every id 1..N;
* the Python followers and the command line: ids 1..N in order, each once
  (no duplicate is allowed: each resumes from the last id it has);
* the webhook: every POST signed and acknowledged, its ids consecutive,
  and none starting past the highest id seen before it (no skip).  A
  duplicate is allowed only where SERVER.md allows one: a failed attempt
  is retried with the same body, and after a crash the batch in flight
  and those acknowledged since the last cursor save are sent again, by
  the new server's first POST (webhook_problems).

Short and seeded by default; ACCMAN_CRASH_LONG=1 (with test_bank.py's seed
and length variables) runs for minutes.  The checks are in eventscheck.py.
"""

import asyncio
import itertools
import json
import os
import random
import signal
import subprocess
import threading
import time
from types import SimpleNamespace

from accman.client import AccManClient, AccManSyncClient
from accman.errors import AccManError, BadReply, TransportError, Unavailable
from eventscheck import reader_problems, store_and_reader_problems, webhook_problems
from conftest import PYTHON, ROOT, server_env, spawn_server
from relhelp import history, stop_quietly
from test_bank import (CREDS, FUND, SEED, UNTOUCHED, Cluster, Worker, all_events, end_load)
from test_webhook_delivery import ENV, SECRET, check_delivery
from webhook_receiver import Receiver, secret_file

LONG = os.environ.get("ACCMAN_CRASH_LONG") == "1"
DURATION_S = float(os.environ.get("ACCMAN_CRASH_SECONDS") or (300 if LONG else 4))
WORKERS = 4
KILL_EVERY_S = (0.4, 1.0)       # drawn from, between kills
LOW = 100                       # --low-balance: the workers' balances cross it often
POLL_WAIT_S = 1                 # the followers' long polls: short, so that they end soon
CLI_LIMIT = 37                  # the command line's pages: not the default, nor a round number
CATCH_UP_S = 40.0               # after the faults, for every reader to reach the newest id


class HookCluster(Cluster):
    """test_bank's server and its restarts, with the webhook on, noting
    when each run of the server was started and each was killed."""

    def __init__(self, tmp_path, rx):
        self.args = ["--webhook", rx.url, "--webhook-secret", secret_file(tmp_path, SECRET),
                     "--low-balance", LOW]
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


class ClientFollower(threading.Thread):
    """CALLING.md's follower: `events(after, wait_s)`, then `after = next`,
    on AccManClient, or AccManSyncClient with `sync`; an outage
    (Unreachable, a reset) is waited out and the same `after` asked again.
    A BadReply is recorded and asked again; an EventsPageRefused (the
    client's checks of the ids' order, the page's size and the events'
    types), like any other error, is recorded and ends it (the same page
    would come again): the stream broke its promise."""

    def __init__(self, cluster, sync=False):
        self.name_ = "the sync client's follower" if sync else "the client's follower"
        super().__init__(name=self.name_, daemon=True)
        self.cluster = cluster
        self.sync = sync
        self.pages = []             # (after, [event dicts], next)
        self.errors = []
        self.outages = 0
        self.until = None           # the id to reach, then stop
        self.quit = threading.Event()
        # Pages of every length, so that their ends fall anywhere in the
        # server's batches, and on a restart.
        self.rnd = random.Random(SEED + 1 + sync)

    @property
    def after(self):
        return self.pages[-1][2] if self.pages else 0

    def run(self):
        try:
            self._follow_sync() if self.sync else asyncio.run(self._follow())
        except Exception as e:          # a bug of the test: report it
            self.errors.append(f"{self.name_}: {type(e).__name__}: {e}")

    def _going(self):
        return not self.quit.is_set() and (self.until is None or self.after < self.until)

    def _url(self):
        return f"http://{self.cluster.addr[0]}:{self.cluster.addr[1]}"

    def _ask(self):
        return {"after": self.after, "limit": self.rnd.randint(1, 300), "wait_s": POLL_WAIT_S}

    def _failed(self, e):
        """The pause before asking again, or None: the follower ends."""
        if isinstance(e, BadReply):
            self.errors.append(f"{self.name_} after {self.after}: {e}")
        elif isinstance(e, (TransportError, Unavailable)):
            self.outages += 1
        else:
            self.errors.append(f"{self.name_} after {self.after}: {e!r}")
            return None
        return 0.05

    def _got(self, page):
        events, nxt = page
        self.pages.append((self.after, [e._asdict() for e in events], nxt))

    async def _follow(self):
        url, acc = None, None
        try:
            while self._going():
                if self._url() != url:
                    if acc is not None:
                        await acc.aclose()
                    url = self._url()
                    acc = AccManClient(url, timeout_s=5)
                try:
                    self._got(await acc.events(**self._ask()))
                except AccManError as e:
                    pause = self._failed(e)
                    if pause is None:
                        return
                    await asyncio.sleep(pause)
        finally:
            if acc is not None:
                await acc.aclose()

    def _follow_sync(self):
        url, acc = None, None
        try:
            while self._going():
                if self._url() != url:
                    if acc is not None:
                        acc.close()
                    url = self._url()
                    acc = AccManSyncClient(url, timeout_s=5)
                try:
                    self._got(acc.events(**self._ask()))
                except AccManError as e:
                    pause = self._failed(e)
                    if pause is None:
                        return
                    time.sleep(pause)
        finally:
            if acc is not None:
                acc.close()

    def events(self):
        return [e for _, page, _ in self.pages for e in page]


class CliFollower:
    """`accman events --follow` as a subprocess writing to a file; another
    one, `--after` the last id written, when told to or when the server's
    address changed (the port taken meanwhile)."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.runs = []              # (proc, stdout path, stderr path)
        self.addr = None

    def start(self, addr):
        n = len(self.runs)
        out, err = self.tmp_path / f"follow{n}.out", self.tmp_path / f"follow{n}.err"
        after = self.events()[-1]["id"] if self.runs and self.events() else 0
        url = f"http://{addr[0]}:{addr[1]}"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(
                [PYTHON, "-m", "accman", "events", "--follow", "--after", str(after),
                 "--wait", str(POLL_WAIT_S), "--limit", str(CLI_LIMIT), "--url", url],
                stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=server_env(), cwd=ROOT)
        self.runs.append((proc, out, err))
        self.addr = addr

    def follow(self, addr, again=False):
        """After a restart: the same follower if the address is the same,
        unless `again`: stopped and started anew, as a reader resumes."""
        if again or addr != self.addr:
            self.stop()
            self.start(addr)

    def stop(self):
        """SIGTERM: exit 0, whole lines written (CALLING.md)."""
        proc = self.runs[-1][0]
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            code = proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
            raise AssertionError("accman events --follow did not stop on SIGTERM") from None
        err = self.runs[-1][2].read_text()
        assert code == 0, (code, err)
        # Its last words name the last event written, which a resume takes.
        last = self.events()[-1]["id"] if self.events() else 0
        assert f"to resume: accman events --follow --after {last}," in err, err[-300:]

    def kill(self):
        for proc, _, _ in self.runs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()

    def events(self):
        """Every whole line written, in order, across the runs."""
        out = []
        for _, path, _ in self.runs:
            text = path.read_text()
            for line in text[:text.rfind("\n") + 1].splitlines():
                out.append(json.loads(line))
        return out

    def stderr(self):
        return "".join(err.read_text() for _, _, err in self.runs)


def nemesis(cluster, cli, stop_at, rnd, counts, errors):
    """SIGKILL and restart on the same port and data, until stop_at; every
    third kill comes after a SIGSTOP of a moment, so that long polls and a
    webhook POST wait on a server that never answers them."""
    try:
        while True:
            delay = rnd.uniform(*KILL_EVERY_S)
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


def catch_up(srv, clients, cli, rx):
    """Until every reader has the store's newest event (or CATCH_UP_S)."""
    newest = all_events(srv)[-1]["id"]
    for client in clients:
        client.until = newest
    deadline = time.monotonic() + CATCH_UP_S
    while time.monotonic() < deadline:
        cli_events = cli.events()
        if (all(c.after >= newest for c in clients) and rx.max_id() >= newest and cli_events
                and cli_events[-1]["id"] >= newest):
            break
        time.sleep(0.05)
    for client in clients:
        client.quit.set()
        client.join(POLL_WAIT_S + 10)
    cli.stop()


# --- the test ------------------------------------------------------------------------

def start_readers(server, tmp_path):
    """The readers of the stream, following `server` (its `addr`): the
    Python followers (async and sync) and the command line's."""
    clients = [ClientFollower(server), ClientFollower(server, sync=True)]
    for client in clients:
        client.start()
    cli = CliFollower(tmp_path)
    cli.start(server.addr)
    return clients, cli


def cli_met_outages(cli):
    """The command line's follower met an outage and was started again."""
    assert "no answer" in cli.stderr(), "the command line never met an outage"
    assert len(cli.runs) >= 2, "the command line was never started again"


def stop_readers(stop, clients, cli):
    """Ends the workers (`stop`) and every reader `start_readers` made."""
    stop.set()
    for client in clients:
        client.quit.set()
    if cli is not None:
        cli.kill()


def test_every_reader_gets_every_event_through_sigkills(tmp_path):
    banner = (f"events checker: seed {SEED}, {DURATION_S:g} s; replay with "
              f"ACCMAN_CRASH_SEED={SEED}" + (" ACCMAN_CRASH_LONG=1" if LONG else ""))
    print(banner, flush=True)
    rnd = random.Random(SEED)
    rx = Receiver(SECRET)
    rx.verify = True
    cluster = cli = None
    clients = []
    workers, errors = [], []
    stop = threading.Event()
    try:
        cluster = HookCluster(tmp_path, rx)
        for cred in CREDS + UNTOUCHED:
            r = cluster.srv.mod(cred, FUND[cred], key=f"fund-{cred}")
            assert r.json == {"tot": FUND[cred], "seq": 1}, r
        clients, cli = start_readers(cluster, tmp_path)
        amounts = itertools.count()
        for n in range(WORKERS):
            Worker(n, cluster, amounts, stop, workers)
        for w in workers:
            w.start()
        counts = {"kill": 0}
        stop_at = time.monotonic() + DURATION_S
        nemesis(cluster, cli, stop_at, rnd, counts, errors)
        srv, ops, settles = end_load(cluster, workers, stop, stop_at, errors, banner)
        catch_up(srv, clients, cli, rx)

        store = all_events(srv)
        histories = {cred: history(srv, cred) for cred in CREDS}
        accounts = {cred: srv.get(f"/past?cred={cred}&limit=1").json["account"]
                    for cred in CREDS}
        posts = rx.snapshot()
        problems = store_and_reader_problems(store, ops, [], histories, settles, accounts, LOW,
                                             clients, cli, posts)
        repeats, repeated, back_s = webhook_problems(posts, cluster.started_at,
                                                     cluster.killed_at)
        problems += repeats
        assert not problems, f"{banner}\n{len(problems)} problems:\n" + "\n".join(problems[:30])
        # Ids 1..N, each POST signed, in order, acknowledged, none skipped.
        check_delivery(rx, store, SimpleNamespace(acked=[]), {})

        acked = sum(a.outcome == "ok" for op in ops for a in op.attempts)
        summary = (f"{len(store)} events, {acked} changes acknowledged; {counts['kill']} kills, "
                   f"{cluster.generation} servers; "
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
        assert srv.stop() == 0
    finally:
        stop_readers(stop, clients, cli)
        if cluster is not None:
            stop_quietly(cluster.srv)
        rx.close()


# --- the checks checked: each fault they exist to find, found ----------------------------

def _stream(n=6):
    return [{"id": i, "type": "mod", "account": "a1", "seq": i, "by": 1000 + i, "tot": i,
             "at": 1, "key": f"k{i}", "hold": None} for i in range(1, n + 1)]


def _post(events, at):
    from webhook_receiver import Post
    return Post("/", {}, json.dumps({"events": events}).encode(), 200, at)


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
