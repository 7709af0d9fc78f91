"""The events checker's readers (tests/reliability/test_events_bank.py and
test_events_bank_pg.py): the Python client's followers, one of them
lagging on purpose, and `accman events --follow`, each recording what it
got and every gap it was told of (a 410 events_trimmed: SERVER.md,
Errors), which eventscheck.py judges.

A module, not a conftest.py: see relhelp.py."""

import asyncio
import json
import os
import random
import re
import signal
import subprocess
import threading
import time

from accman.client import AccManClient, AccManSyncClient
from accman.errors import AccManError, BadReply, EventsTrimmed, TransportError, Unavailable
from conftest import PYTHON, ROOT, server_env
from test_bank import SEED
from trimcheck import store_kept

POLL_WAIT_S = 1                 # the followers' long polls: short, so that they end soon
CLI_LIMIT = 37                  # the command line's pages: not the default, nor a round number
# The end of a command line's output read for its last line (CliFollower.last_id):
# an event's line is a few hundred bytes.
CLI_TAIL_BYTES = 16 * 1024
CATCH_UP_S = 40.0               # after the faults, for every reader to reach the newest id
# The slow followers' page lengths and pauses after each (drawn from): the
# dawdler's keep it behind the newest event by less than the retention
# (trimcheck.RETENTION_S) on a quiet machine, so that a trim of events
# within it shows; the laggard's leave it behind the writers.
DAWDLE = ((500, 1000), (0.1, 0.4))
LAG = ((1, 8), (0.3, 2.5))


class ClientFollower(threading.Thread):
    """CALLING.md's follower: `events(after, wait_s)`, then `after = next`,
    on AccManClient, or AccManSyncClient with `sync`; an outage
    (Unreachable, a reset) is waited out and the same `after` asked again.
    An EventsTrimmed is noted as a gap (after, first, when told, in
    wall-clock ms) and followed on from `first - 1`, as CALLING.md's
    follower does.  A BadReply is recorded and asked again; an EventsPageRefused (the
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
        self.gaps = []              # (after, first, told at ms) of each 410 events_trimmed
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
        if isinstance(e, EventsTrimmed):
            self.gaps.append((self.after, e.first, int(time.time() * 1000)))
            self.pages.append((self.after, [], e.first - 1))
            return 0.0
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


class SlowFollower(ClientFollower):
    """A sync follower that pauses after each page: DAWDLE, a little behind
    the newest event; LAG, behind the retention, told of gaps."""

    def __init__(self, cluster, lag=False):
        super().__init__(cluster, sync=True)
        self.name_ = "the lagging follower" if lag else "the dawdling follower"
        self.rnd = random.Random(SEED + 3 + lag)
        self.limits, self.pause_s = LAG if lag else DAWDLE

    def _ask(self):
        return {**super()._ask(), "limit": self.rnd.randint(*self.limits)}

    def _got(self, page):
        super()._got(page)
        self.quit.wait(self.rnd.uniform(*self.pause_s))


class CliFollower:
    """`accman events --follow` as a subprocess writing to a file; another
    one, `--after` the last id written, when told to or when the server's
    address changed (the port taken meanwhile).  One told of trimmed
    events exits 1 naming the `--after` that goes on (CALLING.md): the
    gap is noted, as the Python followers note theirs, and another is
    started from there."""

    def __init__(self, tmp_path):
        self.tmp_path = tmp_path
        self.runs = []              # (proc, stdout path, stderr path)
        self.afters = []            # the --after each run was started with
        self.addr = None
        self.gaps = []              # (after, first, told at ms) of each exit on events_trimmed

    def start(self, addr, after=None):
        n = len(self.runs)
        out, err = self.tmp_path / f"follow{n}.out", self.tmp_path / f"follow{n}.err"
        if after is None:
            after = self.last_id()
        url = f"http://{addr[0]}:{addr[1]}"
        with open(out, "wb") as o, open(err, "wb") as e:
            proc = subprocess.Popen(
                [PYTHON, "-m", "accman", "events", "--follow", "--after", str(after),
                 "--wait", str(POLL_WAIT_S), "--limit", str(CLI_LIMIT), "--url", url],
                stdout=o, stderr=e, stdin=subprocess.DEVNULL, env=server_env(), cwd=ROOT)
        self.runs.append((proc, out, err))
        self.afters.append(after)
        self.addr = addr

    def follow(self, addr, again=False):
        """After a restart: the same follower if the address is the same,
        unless `again`: stopped and started anew, as a reader resumes."""
        if self.check_trimmed(addr):
            return
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
        last = self.last_id()
        assert f"to resume: accman events --follow --after {last}," in err, err[-300:]

    def check_trimmed(self, addr=None):
        """If the last run ended told of trimmed events: its gap noted, and
        another started after it, at `addr` (None: the same); True if so.
        Started where it is to follow, not stopped at once: a SIGTERM
        before Python has set its handler would end it unlike a stop."""
        proc, _, err = self.runs[-1]
        if proc.poll() != 1:
            return False
        text = err.read_text()
        m = re.search(r"events_trimmed: .* go on from event (\d+) with --after (\d+)", text)
        assert m, f"accman events --follow exited 1: {text[-300:]}"
        # The file's time is after the 410 was answered.
        told_ms = int(err.stat().st_mtime * 1000)
        last = self.last_id()
        self.gaps.append((last, int(m.group(1)), told_ms))
        self.start(addr or self.addr, after=int(m.group(2)))
        return True

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

    def last_id(self):
        """The id the follower is after, as its resume line names it: the
        last whole line its last run wrote, or, before that run wrote one,
        the `--after` it was started with (past every line before it); 0
        before any run.  From the file's end: the checker asks this every
        few milliseconds while the output grows to many megabytes."""
        if not self.runs:
            return 0
        path = self.runs[-1][1]
        with open(path, "rb") as f:
            # One byte more: the newline before a line of CLI_TAIL_BYTES.
            start = max(0, f.seek(0, os.SEEK_END) - CLI_TAIL_BYTES - 1)
            f.seek(start)
            tail = f.read()
        end = tail.rfind(b"\n")
        begin = tail.rfind(b"\n", 0, max(end, 0)) + 1
        assert start == 0 or begin > 0, f"{path}: a line longer than {CLI_TAIL_BYTES} bytes"
        return json.loads(tail[begin:end])["id"] if end >= 0 else self.afters[-1]

    def stderr(self):
        return "".join(err.read_text() for _, _, err in self.runs)


def catch_up(srv, clients, cli, rx):
    """Until every reader has the store's newest event (or CATCH_UP_S)."""
    newest = store_kept(srv)[1][-1]["id"]
    for client in clients:
        client.until = newest
    deadline = time.monotonic() + CATCH_UP_S
    while time.monotonic() < deadline:
        cli.check_trimmed()
        if (all(c.after >= newest for c in clients) and rx.max_id() >= newest
                and cli.last_id() >= newest):
            break
        time.sleep(0.05)
    for client in clients:
        client.quit.set()
        client.join(POLL_WAIT_S + 10)
    cli.stop()


def start_readers(server, tmp_path, slow=False):
    """The readers of the stream, following `server` (its `addr`): the
    Python followers (async and sync; with `slow`, SlowFollower's two,
    the one that lags last) and the command line's."""
    clients = [ClientFollower(server), ClientFollower(server, sync=True)]
    if slow:
        clients += [SlowFollower(server), SlowFollower(server, lag=True)]
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

