"""The command line's holds and events (issue 13): `accman hold`, `settle`,
`events [--follow]` and `mod --low`, as subprocesses against the fake
AccMan of tests/fake_accman.py: values refused before anything is sent,
exit codes, what a lost reply says, and a follower that resumes from
`next`, rides out an outage and stops cleanly on SIGINT, SIGTERM and a
closed pipe.  The real server: tests/test_e2e_holds.py."""

from __future__ import annotations

import errno
import json
import os
import select
import signal
import subprocess
import sys
import time

import pytest

from accman.calling import follow as follow_mod
from accman.client import AccManSyncClient
from accman.errors import Unreachable
from accman.records import Event
from conftest import ROOT, run_accman, server_env
from fake_accman import FakeAccMan, account_id, closed_port
from test_cli import one_line_error


def ok_json(proc):
    assert proc.returncode == 0, (proc.returncode, proc.stderr)
    assert proc.stderr == ""
    return json.loads(proc.stdout)


# --- hold, settle, events, mod --low -----------------------------------------------
def test_hold_settle_events_round_trip(fake):
    fake.fund("abc", 10)
    url = ["--url", fake.url]
    held = ok_json(run_accman("hold", "abc", "-3", "--ttl", "60", "--key", "k1", *url))
    assert held == {"hold": 2, "tot": 7, "seq": 2}
    assert fake.calls("/hold")[0][2] == {"cred": "abc", "by": "-3", "ttl": "60", "key": "k1"}
    assert ok_json(run_accman("settle", "abc", "2", "1", *url)) == {"tot": 9, "seq": 3}
    page = ok_json(run_accman("events", *url))
    assert page["next"] == 3
    assert [(e["id"], e["type"], e["by"], e["hold"]) for e in page["events"]] == [
        (1, "mod", 10, None), (2, "hold", -3, 2), (3, "settle", 2, 2)]
    assert page["events"][1]["account"] == account_id("abc") and page["events"][1]["key"] == "k1"
    page = ok_json(run_accman("events", "--after", "2", "--limit", "1", "--wait", "0", *url))
    assert [e["id"] for e in page["events"]] == [3] and page["next"] == 3
    assert ok_json(run_accman("mod", "abc", "5", "--low", "4", *url)) == {"tot": 14, "seq": 4}
    assert fake.mods()[-1][2] == {"cred": "abc", "by": "5", "low": "4"}


def test_hold_with_min_and_a_credential_after_double_dash(fake):
    fake.fund("-dash", 10)
    proc = run_accman("hold", "--ttl", "5", "--min", "8", "--url", fake.url, "--", "-dash", "-2")
    assert ok_json(proc) == {"hold": 2, "tot": 8, "seq": 2}
    assert fake.calls("/hold")[0][2]["min"] == "8"


@pytest.mark.parametrize("args,names", [
    (["hold", "abc", "3", "--ttl", "60"], "by must be negative"),
    (["hold", "abc", "0", "--ttl", "60"], "by must not be 0"),
    (["hold", "abc", "-03", "--ttl", "60"], "by"),
    # -2^63 gives back 2^63 at its end, no signed 64-bit integer (SERVER.md, "Values")
    (["hold", "abc", "-9223372036854775808", "--ttl", "60"],
     "by must be from -9223372036854775807 to -1"),
    (["hold", "abc", "-3", "--ttl", "0"], "--ttl"),
    (["hold", "abc", "-3", "--ttl", "86401"], "--ttl"),
    (["hold", "abc", "-3", "--ttl", "1.5"], "--ttl"),
    (["hold", "abc", "-3"], "--ttl"),
    (["hold", "abc", "-3", "--ttl", "60", "--min", "+1"], "--min"),
    (["hold", "abc", "-3", "--ttl", "60", "--key", "a/b"], "--key"),
    (["hold", "a&by=1", "-3", "--ttl", "60"], "cred"),
    (["settle", "abc", "0", "1"], "hold"),
    (["settle", "abc", "x", "1"], "hold"),
    (["settle", "abc", "2", "-1"], "use"),
    (["settle", "abc", "2", "1_0"], "use"),
    (["settle", "abc", "2"], "use"),
    (["events", "--after", "-1"], "--after"),
    (["events", "--limit", "0"], "--limit"),
    (["events", "--limit", "1001"], "--limit"),
    (["events", "--wait", "61"], "--wait"),
    (["events", "--wait", "1.5"], "--wait"),
    (["events", "--follow", "--wait", "-1"], "--wait"),
    # It said "from 0 to 60", and 0 is refused with --follow.
    (["events", "--follow", "--wait", "61"], "--wait must be from 1 to 60 ("),
    (["events", "--wait", "61"], "--wait must be from 0 to 60 ("),
    # It asked again at once after every empty reply, thousands of times a second.
    (["events", "--follow", "--wait", "0"], "--wait 0 with --follow would ask again at once"),
    (["mod", "abc", "-3", "--low", "5"], "--low is set by a funding mod only"),
    (["mod", "abc", "3", "--low", "05"], "--low"),
])
def test_bad_values_are_refused_before_anything_is_sent(fake, args, names):
    err = one_line_error(run_accman(*args, "--url", fake.url))
    assert names in err and f"accman {args[0]} --help" in err
    assert "a&by=1" not in err
    assert fake.requests == []


def test_refusals_exit_1_with_the_error(fake):
    fake.fund("abc", 5)
    url = ["--url", fake.url]
    err = one_line_error(run_accman("hold", "abc", "-6", "--ttl", "9", *url), 1)
    assert "409 insufficient" in err and "(tot 5)" in err
    err = one_line_error(run_accman("hold", "nobody", "-1", "--ttl", "9", *url), 1)
    assert "404 no_account" in err
    err = one_line_error(run_accman("settle", "abc", "7", "0", *url), 1)
    assert "404 no_hold" in err
    run_accman("hold", "abc", "-2", "--ttl", "9", *url)
    assert run_accman("settle", "abc", "2", "2", *url).returncode == 0
    err = one_line_error(run_accman("settle", "abc", "2", "0", *url), 1)
    assert "409 hold_ended" in err
    fake.holds_max = 0
    err = one_line_error(run_accman("hold", "abc", "-1", "--ttl", "9", *url), 1)
    assert "409 too_many_holds" in err


def test_events_trimmed_says_where_to_go_on(fake):
    for _ in range(4):
        fake.fund("abc", 1)
    fake.trim(3)
    for extra in ([], ["--follow"]):
        err = one_line_error(run_accman("events", *extra, "--url", fake.url), 1)
        assert err == ("accman: 410 events_trimmed: older than the retention; go on from "
                       "event 3 with --after 2")


def test_roles_named_for_holds_and_events():
    with FakeAccMan(tokens={"reader-token-0123": {"read"},
                            "charger-token-0123": {"charge"}}) as fake:
        fake.fund("abc", 5)
        err = one_line_error(run_accman("hold", "abc", "-1", "--ttl", "9", "--url", fake.url,
                                        "--token", "reader-token-0123"), 1)
        assert "403 forbidden: the token lacks charge; the token given (--token or " \
               "ACCMAN_TOKEN) does not have it" in err
        err = one_line_error(run_accman("settle", "abc", "1", "0", "--url", fake.url), 1)
        assert "401" in err and "the charge role" in err
        err = one_line_error(run_accman("events", "--url", fake.url,
                                        "--token", "charger-token-0123"), 1)
        assert "403 forbidden: the token lacks read; the token given (--token or " \
               "ACCMAN_TOKEN) does not have it" in err
        assert "token-0123" not in err


@pytest.mark.parametrize("args,hint", [
    (["hold", "abc", "-3", "--ttl", "30"], "a hold never settled ends by itself after --ttl 30 s"),
    (["hold", "abc", "-3", "--ttl", "30", "--key", "k"], "same --key"),
    (["settle", "abc", "2", "1"], "with the same USE it applies at most once"),
])
def test_a_lost_reply_says_what_to_do(fake, args, hint):
    fake.fund("abc", 10)
    if args[0] == "settle":
        run_accman("hold", "abc", "-3", "--ttl", "30", "--url", fake.url)
    fake.fault = lambda method, path, params: ("apply_drop",) if path != "/tot" else None
    err = one_line_error(run_accman(*args, "--url", fake.url), 3)
    assert "may or may not have applied" in err and hint in err


def test_no_server_exits_3_and_nothing_was_sent():
    url = f"http://127.0.0.1:{closed_port()}"
    for args in (["hold", "abc", "-1", "--ttl", "9"], ["settle", "abc", "1", "0"], ["events"]):
        err = one_line_error(run_accman(*args, "--url", url), 3)
        assert "no answer" in err and "nothing was sent" in err


# --- events --follow ------------------------------------------------------------------
class Follower:
    """`accman events --follow` as a subprocess whose stdout is read line by
    line."""

    def __init__(self, url, *args):
        self.proc = subprocess.Popen(
            [sys.executable, "-m", "accman", "events", "--follow", "--url", url, *args],
            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=server_env(), cwd=ROOT)
        self.buf = b""
        self.err = b""

    def said(self, text: bytes, times: int, timeout_s=15.0) -> None:
        """Reads stderr until `text` has been said `times` times: waiting
        on the follower, not on a time its start-up may outlast."""
        deadline = time.monotonic() + timeout_s
        while self.err.count(text) < times:
            left = deadline - time.monotonic()
            assert left > 0, f"{text!r} said fewer than {times} times: {self.err!r}"
            if select.select([self.proc.stderr], [], [], left)[0]:
                chunk = os.read(self.proc.stderr.fileno(), 65536)
                assert chunk, self.err
                self.err += chunk

    def lines(self, n, timeout_s=10.0) -> list:
        deadline = time.monotonic() + timeout_s
        while self.buf.count(b"\n") < n:
            left = deadline - time.monotonic()
            assert left > 0, f"fewer than {n} lines: {self.buf!r}"
            if select.select([self.proc.stdout], [], [], left)[0]:
                chunk = os.read(self.proc.stdout.fileno(), 65536)
                assert chunk, self.proc.stderr.read().decode()
                self.buf += chunk
        out = self.buf.split(b"\n")
        self.buf = b"\n".join(out[n:])
        return [json.loads(line) for line in out[:n]]

    def stop(self, sig) -> tuple:
        self.proc.send_signal(sig)
        rest, err = self.proc.communicate(timeout=10)
        return self.proc.returncode, self.buf + rest, (self.err + err).decode()

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.communicate()


@pytest.fixture
def followers():
    started = []

    def start(url, *args):
        f = Follower(url, *args)
        started.append(f)
        return f
    yield start
    for f in started:
        f.kill()


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM])
def test_follow_prints_one_event_a_line_and_stops_cleanly_on_a_signal(fake, followers, sig):
    fake.fund("abc", 1)
    fake.fund("abc", 2)
    f = followers(fake.url, "--wait", "2", "--limit", "1")
    assert [(e["id"], e["by"]) for e in f.lines(2)] == [(1, 1), (2, 2)]
    fake.fund("abc", 3)                          # during a long poll: resumed from next
    assert [(e["id"], e["by"]) for e in f.lines(1)] == [(3, 3)]
    code, rest, err = f.stop(sig)
    assert code == 0 and rest == b""
    assert err.strip().splitlines()[-1] == (
        "accman: events: stopped (signal); events written up to id 3 (not necessarily read); "
        "to resume: accman events --follow --after 3, or --after the last id the reader handled")
    assert [r[2]["after"] for r in fake.calls("/events")][:3] == ["0", "1", "2"]


def test_follow_stops_when_the_reader_closes_the_pipe(fake):
    """`accman events --follow | head -n 2`: the follower ends with the pipe,
    exit 0 and no traceback, whether an event comes or not."""
    for by in range(1, 4):
        fake.fund("abc", by)
    cmd = (f"set -o pipefail; {sys.executable} -m accman events --follow --wait 1 "
           f"--url {fake.url} | head -n 2")
    t = time.monotonic()
    proc = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=30,
                          env=server_env(), cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["id"] for line in proc.stdout.splitlines()] == [1, 2]
    assert "Traceback" not in proc.stderr and "stopped (reader gone)" in proc.stderr
    assert time.monotonic() - t < 15


def test_an_idle_follower_notices_its_reader_gone(fake, followers):
    f = followers(fake.url, "--wait", "1")
    time.sleep(0.5)
    f.proc.stdout.close()                        # no event is coming to fail a write
    assert f.proc.wait(10) == 0
    assert "stopped (reader gone)" in f.proc.stderr.read().decode()


def test_follow_rides_out_no_answer_and_says_so(followers):
    f = followers(f"http://127.0.0.1:{closed_port()}", "--wait", "1")
    f.said(b"no answer", 2)
    code, rest, err = f.stop(signal.SIGINT)
    assert code == 0 and rest == b""
    assert err.count("no answer") >= 2 and "trying again in 1 s" in err
    assert "to resume: accman events --follow --after 0" in err


def test_follow_gives_up_after_follow_outage_s_max(monkeypatch):
    # A pause far shorter than the outage bound: the follower tries again
    # several times before it gives up, even after a long pause of the
    # test's process.
    monkeypatch.setattr(follow_mod, "FOLLOW_OUTAGE_S_MAX", 0.6)
    monkeypatch.setattr(follow_mod, "FOLLOW_PAUSE_S", 0.02)
    notes = []
    with AccManSyncClient(f"http://127.0.0.1:{closed_port()}", retries=0) as acc:
        end = follow_mod.follow(acc, 7, None, 1, out=sys.stdout, note=notes.append)
    assert end.after == 7 and end.why == "error" and isinstance(end.error, Unreachable)
    assert len(notes) >= 2
    assert signal.getsignal(signal.SIGTERM) == signal.SIG_DFL       # handlers restored
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)        # and its timer stopped


# --- follow as a library call: the caller's signals and timer ----------------------------

class NoEvents:
    """A client that must not be asked: the reader is gone before the first poll."""

    def events(self, *args, **kwargs):
        raise AssertionError("polled with no reader")


class ReaderLeaves:
    """A client whose long poll outlasts the reader: it closes the read end
    of the follower's pipe, then waits."""

    def __init__(self, read_fd):
        self.read_fd = read_fd

    def events(self, *args, **kwargs):
        os.close(self.read_fd)
        time.sleep(5)
        raise AssertionError("the reader check did not end the follower")


@pytest.fixture
def caller():
    """A library caller's own SIGALRM and SIGTERM handlers (what they were
    called with in `alarms`), put back as they were after the test whatever
    the follower left, and a pipe for the follower to write to."""
    alarms = []
    before = {s: signal.getsignal(s) for s in (signal.SIGALRM, signal.SIGINT, signal.SIGTERM)}

    def handler(signum, _frame):
        alarms.append(signum)
    signal.signal(signal.SIGALRM, handler)
    signal.signal(signal.SIGTERM, handler)
    r, w = os.pipe()
    out = os.fdopen(w, "w")
    try:
        yield handler, alarms, r, out
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        for s, h in before.items():
            signal.signal(s, h)
        out.close()
        try:
            os.close(r)
        except OSError:
            pass


def test_follow_puts_back_the_callers_handlers_and_running_timer(caller):
    handler, alarms, r, out = caller
    signal.setitimer(signal.ITIMER_REAL, 5.0, 7.0)
    os.close(r)                                             # the reader is gone
    end = follow_mod.follow(NoEvents(), 4, None, 1, out=out)
    assert end == follow_mod.Followed(4, "reader gone")
    assert signal.getsignal(signal.SIGALRM) is handler
    assert signal.getsignal(signal.SIGTERM) is handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    value_s, interval_s = signal.getitimer(signal.ITIMER_REAL)
    assert 4.0 < value_s <= 5.0 and interval_s == 7.0        # running, less the time spent
    assert alarms == []


def test_a_callers_alarm_that_falls_due_while_following_goes_off_after(caller):
    handler, alarms, r, out = caller
    signal.setitimer(signal.ITIMER_REAL, 0.3)                 # one-shot, due mid-follow
    end = follow_mod.follow(ReaderLeaves(r), 0, None, 25, out=out)
    assert end.why == "reader gone"                          # at the 1 s reader check
    deadline = time.monotonic() + 2
    while not alarms and time.monotonic() < deadline:
        time.sleep(0.01)
    assert alarms == [signal.SIGALRM] and signal.getsignal(signal.SIGALRM) is handler
    assert signal.getitimer(signal.ITIMER_REAL) == (0.0, 0.0)  # a one-shot goes off once


def test_a_stop_as_follow_arms_its_timer_still_puts_everything_back(caller, monkeypatch):
    """^C just after the follower armed its timer, before its loop: it
    ends as a stop, and the caller's handlers and timer are back."""
    handler, alarms, r, out = caller
    signal.setitimer(signal.ITIMER_REAL, 5.0)
    setitimer = signal.setitimer

    def armed_then_interrupted(which, value_s, interval_s=0.0):
        old = setitimer(which, value_s, interval_s)
        if value_s == follow_mod.READER_CHECK_S:
            raise KeyboardInterrupt
        return old
    monkeypatch.setattr(signal, "setitimer", armed_then_interrupted)
    try:
        end = follow_mod.follow(NoEvents(), 4, None, 1, out=out)
    except KeyboardInterrupt:
        end = "escaped follow"                  # a fail, not the end of the test run
    finally:
        monkeypatch.undo()
    assert end == follow_mod.Followed(4, "signal")
    assert signal.getsignal(signal.SIGALRM) is handler
    assert signal.getsignal(signal.SIGTERM) is handler
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler
    value_s, interval_s = signal.getitimer(signal.ITIMER_REAL)
    assert 4.0 < value_s <= 5.0 and interval_s == 0.0


def test_a_stop_while_follow_puts_things_back_goes_to_the_callers_handler(caller, monkeypatch):
    """SIGTERM while the follower is putting back the caller's handlers:
    not a KeyboardInterrupt out of follow, but a SIGTERM to the caller's
    own handler once it is back."""
    handler, alarms, r, out = caller
    os.close(r)
    put_back = follow_mod._put_back

    def stopped_meanwhile(*args):
        signal.raise_signal(signal.SIGTERM)     # still the follower's handler
        put_back(*args)
    monkeypatch.setattr(follow_mod, "_put_back", stopped_meanwhile)
    end = follow_mod.follow(NoEvents(), 4, None, 1, out=out)
    assert end == follow_mod.Followed(4, "reader gone")
    assert alarms == [signal.SIGTERM] and signal.getsignal(signal.SIGTERM) is handler


def test_a_stop_the_caller_held_back_is_taken_by_follow_and_its_mask_put_back(caller):
    """A caller that holds the stops back until the follower takes them
    (accman events --follow does, for its resume line): one that came
    before is taken at once, as a stop, not lost; at the end the caller's
    mask is back, and a stop then waits for the caller."""
    handler, alarms, r, out = caller
    before = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        signal.raise_signal(signal.SIGTERM)            # held back: pending
        end = follow_mod.follow(NoEvents(), 4, None, 1, out=out)
        assert signal.SIGTERM in signal.pthread_sigmask(signal.SIG_BLOCK, ())
        assert signal.SIGTERM not in signal.sigpending()
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, before)
    assert end == follow_mod.Followed(4, "signal") and alarms == []


class OneEvent:
    """A client with one event to give, once."""

    def events(self, after, **kwargs):
        return [Event(id=after + 1, type="mod", account="ab" * 16, seq=1, by=5, tot=5,
                      at=1, key=None, hold=None)], after + 1


class FailingOutput:
    """An output on a real pipe whose write raises `error` after a stop
    came meanwhile (held back while the follower writes)."""

    def __init__(self, error: OSError):
        self.error = error
        self.r, self.w = os.pipe()

    def write(self, _text):
        signal.raise_signal(signal.SIGTERM)
        raise self.error

    def flush(self):
        pass

    def fileno(self):
        return self.w

    def close(self):
        os.close(self.r)
        os.close(self.w)


def test_a_write_that_fails_while_a_stop_waits_is_reported_as_the_failure(caller):
    """The stop held back during the write is taken as the mask is put
    back, but the end is the write's failure (exit 4 for the command), not
    a stop (exit 0)."""
    out = FailingOutput(OSError(errno.ENOSPC, os.strerror(errno.ENOSPC)))
    try:
        end = follow_mod.follow(OneEvent(), 4, None, 1, out=out)
    finally:
        out.close()
    assert end.why == "output failed" and end.error.errno == errno.ENOSPC
    assert end.after == 4


def test_a_closed_pipe_while_a_stop_waits_is_the_reader_gone_and_silenced(caller):
    """The end is the reader's, and the output is pointed at /dev/null, so
    that the flush at exit does not fail again (exit 120 and a warning)."""
    out = FailingOutput(BrokenPipeError(errno.EPIPE, os.strerror(errno.EPIPE)))
    try:
        end = follow_mod.follow(OneEvent(), 4, None, 1, out=out)
        assert end == follow_mod.Followed(4, "reader gone")
        assert os.fstat(out.w).st_rdev == os.stat(os.devnull).st_rdev
    finally:
        out.close()
