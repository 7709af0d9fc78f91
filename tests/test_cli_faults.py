"""The command line's client commands when things go wrong, against a real
AccMan: a URL whose host cannot be used, a 503 from a store that cannot
commit, ^C while a call is in flight, a closed stdout, a mistyped flag.
Faults a real server does not make on demand come from FaultProxy, a TCP
proxy in front of it.  Every message is one line, never a traceback, and
never shows a credential."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from accman.calling.usage import ARGV_WORDS_MAX
from conftest import ROOT, run_accman, server_env
from test_cli import one_line_error

# --- a fault-injecting proxy ----------------------------------------------------------

# What a store that cannot commit answers (SPEC "Errors": 503 unavailable).
REPLY_503 = (b"HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n"
             b"Content-Length: 58\r\n\r\n"
             b'{"error":"unavailable","detail":"the store cannot commit"}')
# What a token without the call's role is answered (SPEC "Access": 403).
REPLY_403 = (b"HTTP/1.1 403 Forbidden\r\nContent-Type: application/json\r\n"
             b"Content-Length: 64\r\n\r\n"
             b'{"error":"forbidden","detail":"the token lacks the charge role"}')
PROXY_TIMEOUT_S = 30.0      # no test waits this long for a byte
LATE_S = 1.0                # "late": well after a test has cancelled the call


class FaultProxy:
    """A TCP proxy in front of AccMan that acts on each request in turn by
    `plan` ("pass" once it is used up): "pass" forwards the request and its
    reply; "503" forwards it, so that the server applies it, and answers
    REPLY_503 in place of the reply (applied, not acknowledged); "hang"
    forwards it and never answers; "swallow" neither forwards it nor
    answers (never applied); "late" forwards it and answers LATE_S after
    its reply came; "late403" neither forwards it nor answers until LATE_S,
    then answers REPLY_403 (refused, never applied); "held" holds it back
    until `release` is set, then forwards it, so that the server applies
    it late (a stalled front-end's), and drops the reply (`landed` is set
    once it came).  `seen` counts the requests; `lines` are their request
    lines."""

    def __init__(self, port: int, plan=()):
        self.upstream = ("127.0.0.1", port)
        self.plan = list(plan)
        self.seen = 0
        self.lines: list[str] = []
        self.lock = threading.Lock()
        self.release, self.landed = threading.Event(), threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        self.socks = [self.listener]
        threading.Thread(target=self._accept, daemon=True).start()

    def close(self):
        for s in self.socks:
            s.close()

    def _accept(self):
        while True:
            try:
                client, _ = self.listener.accept()
            except OSError:
                return
            upstream = socket.create_connection(self.upstream, timeout=PROXY_TIMEOUT_S)
            client.settimeout(PROXY_TIMEOUT_S)
            self.socks += [client, upstream]
            threading.Thread(target=self._serve, args=(client, upstream), daemon=True).start()

    def _next_action(self) -> str:
        with self.lock:
            self.seen += 1
            return self.plan.pop(0) if self.plan else "pass"

    def _serve(self, client, upstream):
        buf = b""
        try:
            while True:
                while b"\r\n\r\n" not in buf:       # the API's requests have no body
                    chunk = client.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                request, _, buf = buf.partition(b"\r\n\r\n")
                self.lines.append(request.split(b"\r\n", 1)[0].decode("latin-1"))
                action = self._next_action()
                if action == "swallow":
                    threading.Event().wait(PROXY_TIMEOUT_S)
                    return
                if action == "late403":
                    time.sleep(LATE_S)
                    client.sendall(REPLY_403)
                    continue
                if action == "held":
                    self.release.wait(PROXY_TIMEOUT_S)
                    upstream.sendall(request + b"\r\n\r\n")
                    _read_reply(upstream)
                    self.landed.set()
                    return
                upstream.sendall(request + b"\r\n\r\n")
                if action == "hang":
                    threading.Event().wait(PROXY_TIMEOUT_S)
                    return
                reply = _read_reply(upstream)
                if action == "late":
                    time.sleep(LATE_S)
                client.sendall(REPLY_503 if action == "503" else reply)
        except OSError:
            return


def _read_reply(sock) -> bytes:
    data = b""
    while b"\r\n\r\n" not in data:
        data += sock.recv(65536)
    head, _, body = data.partition(b"\r\n\r\n")
    length = next(int(line.split(b":")[1]) for line in head.split(b"\r\n")
                  if line.lower().startswith(b"content-length:"))
    while len(body) < length:
        body += sock.recv(65536)
    return head + b"\r\n\r\n" + body




def funded(server, tot=100) -> str:
    """A new credential of `server`, funded with `tot` by `accman open`."""
    proc = run_accman("open", "--by", tot, "--url", server.url)
    assert proc.returncode == 0, proc.stderr
    return proc.stdout.strip()


def history(server, cred) -> list:
    proc = run_accman("past", cred, "--url", server.url)
    assert proc.returncode == 0, proc.stderr
    return [e["by"] for e in json.loads(proc.stdout)["past"]]


# --- a URL whose host cannot be used ----------------------------------------------------

@pytest.mark.parametrize("host", ["bücher.example", "a..b", "x" * 64 + ".example"])
@pytest.mark.parametrize("args", [["tot", "abc"], ["mod", "abc", "-1"], ["open", "--by", "5"],
                                  ["events", "--follow"]])
def test_a_host_that_cannot_be_used_is_one_line_and_exit_2(host, args):
    """Non-ASCII (Python cannot encode it for the request) or not IDNA
    labels (nor for the connection): either way nothing is sent."""
    err = one_line_error(run_accman(*args, "--url", f"http://{host}:8080"))
    # Refused by the client when it is made: it says what to write.
    assert ("the host in the URL cannot be used" in err
            or "host must be ASCII" in err) and "xn--" in err
    assert f"accman {args[0]} --help" in err


# --- a 503 from a store that cannot commit ------------------------------------------------

@pytest.mark.any_one_store("the 503 or the silence comes from a proxy, not the store")
@pytest.mark.parametrize("args,hint", [
    (["mod", "-3"], "read `accman past` for this credential before you try again"),
    (["mod", "-3", "--key", "k503"], "with the same --key, to apply it at most once"),
    (["hold", "-3", "--ttl", "60"], "read `accman past` for this credential before you try"),
    (["hold", "-3", "--ttl", "60", "--key", "h503"], "with the same --key"),
])
def test_a_503_to_a_write_is_an_unknown_outcome_that_says_what_to_do(start_server, proxy,
                                                                    args, hint):
    """The server applied it and the answer was a 503: "not acknowledged",
    so exit 3 with the advice of a lost reply, also for a keyed write once
    the client's retries (which repeat it at most once) are spent."""
    s = start_server()
    cred = funded(s)
    p = proxy(s, "503", "503", "503")
    proc = run_accman(args[0], cred, *args[1:], "--url", p.url)
    err = one_line_error(proc, 3)
    assert err.startswith("accman: 503 unavailable: the store cannot commit; not acknowledged")
    # A 503's words may say nothing applied (PostgreSQL's refusal): never contradicted.
    assert f"the {args[0]} may have applied, unless AccMan's words say nothing was" in err
    assert hint in err and proc.stdout == "" and cred not in err
    assert p.seen == (3 if "--key" in args else 1)          # a keyless write is never repeated
    assert history(s, cred) == [-3, 100]                     # it did apply, once


@pytest.mark.any_one_store("the 503 or the silence comes from a proxy, not the store")
def test_a_keyed_write_a_balance_may_refuse_says_a_refused_repeat_does_not_tell(
        start_server, proxy):
    """A keyed mod with --min, or a keyed hold, of unknown outcome: the
    repeat its advice asks for may be refused `insufficient` while the
    first attempt is still on its way (a front-end stalled behind a load
    balancer), which applies later, once the balance covers it.  The
    advice says that such a refusal does not tell; for a charge without
    --min, which no balance refuses, it has no need to."""
    s = start_server()
    cred = funded(s)
    for args, moving in [(["mod", "-3", "--min", "0", "--key", "k-min"], "insufficient"),
                         (["hold", "-3", "--ttl", "60", "--key", "k-hold"],
                          "insufficient or too_many_holds"),
                         (["mod", "-3", "--key", "k-plain"], None)]:
        p = proxy(s, "503", "503", "503")
        err = one_line_error(run_accman(args[0], cred, *args[1:], "--url", p.url), 3)
        assert "with the same --key, to apply it at most once and see its result" in err
        if moving is None:
            assert "a repeat refused" not in err
        else:
            assert (f"(a repeat refused {moving} does not say that this one never applied: it "
                    f"may still be on its way to AccMan, and apply later)") in err


@pytest.mark.any_one_store("the 503 or the silence comes from a proxy, not the store")
def test_a_503_to_open_hands_over_the_credential_and_a_503_to_a_read_is_a_refusal(
        start_server, proxy):
    s = start_server()
    p = proxy(s, "503", "503", "503")
    err = one_line_error(run_accman("open", "--by", 40, "--url", p.url), 3)
    assert "may have been opened, unless AccMan's words say nothing was" in err
    finish = err.split("run: ", 1)[1].split()
    assert finish[:2] == ["accman", "mod"] and finish[3:] == ["40", "--key", "accman-open"]
    proc = run_accman(*finish[1:], "--url", s.url)           # finishes it at most once
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"tot": 40, "seq": 1}
    p.plan = ["503"] * 3
    err = one_line_error(run_accman("tot", finish[2], "--url", p.url), 1)
    assert err == "accman: 503 unavailable: the store cannot commit"


@pytest.mark.any_one_store("the 503 or the silence comes from a proxy, not the store")
def test_a_503_to_a_settle_says_it_is_safe_to_repeat(start_server, proxy):
    s = start_server()
    cred = funded(s)
    held = json.loads(run_accman("hold", cred, "-5", "--ttl", "60", "--url", s.url).stdout)
    p = proxy(s, "503", "503", "503")
    err = one_line_error(run_accman("settle", cred, held["hold"], "2", "--url", p.url), 3)
    assert ("not acknowledged; the settle may have applied, unless AccMan's words say "
            "nothing was") in err
    assert "with the same USE it applies at most once" in err
    proc = run_accman("settle", cred, held["hold"], "2", "--url", s.url)
    assert proc.returncode == 0 and json.loads(proc.stdout)["tot"] == 98


REPEAT = ("run the same command again once AccMan takes writes: it applies at most once, "
          "and if an earlier run with the same {} got no answer, which may have applied, it "
          "answers that run's result")


@pytest.mark.parametrize("args,what", [
    (["mod", "C", "-3"], "it may be sent again once AccMan takes writes, but if an earlier "
                         "run of it got no answer, which may have applied, read `accman past` "
                         "for this credential first"),
    (["mod", "C", "-3", "--key", "k-na"], REPEAT.format("--key")),
    (["hold", "C", "-3", "--ttl", "60"], "it may be sent again once AccMan takes writes, but "
                                         "if an earlier run of it got no answer, which may "
                                         "have applied, read `accman past` for this "
                                         "credential first"),
    (["settle", "C", "1", "2"], REPEAT.format("USE")),
    (["open", "--by", "40"], None),
])
def test_a_write_refused_not_applied_says_so_and_may_be_sent_again(fake, args, what):
    """A 503 `not_applied` (the store takes no writes) says that nothing
    of this request applied: a refusal, exit 1, saying that it may be sent
    again, never "not acknowledged"; and, as the server refuses before it
    looks up a key, that an earlier run that got no answer is not settled
    by it (a keyed write or a settle repeated answers that run's result, a
    keyless one needs `accman past` first); the client sent it again
    itself (a keyless write too), each time refused."""
    from fake_accman import NOT_APPLIED
    fake.fund("C", 10)
    fake.fault = lambda m, p, q: NOT_APPLIED if m == "PATCH" else None
    err = one_line_error(run_accman(*args, "--url", fake.url), 1)
    done = (f"accman: 503 not_applied: {NOT_APPLIED[2]['detail']}; AccMan refused this "
            f"{args[0]} before applying it: nothing of this request applied")
    if what is None:                # open: each run makes a credential of its own
        what = ("no account was opened; run the same command again once AccMan takes writes "
                "(it makes a new credential; an earlier run that got no answer said how to "
                "finish opening its own)")
        assert err == f"{done}, {what}"
    else:
        assert err == f"{done}; {what}"
    assert len([r for r in fake.requests if r[0] == "PATCH"]) == 3      # retried twice
    assert fake.tot("C") == 10


# --- ^C while a call is in flight -------------------------------------------------------

def interrupted(url, *args, sig=signal.SIGINT) -> subprocess.CompletedProcess:
    """`accman ARGS --url URL`, sent `sig` once its request has reached the
    server through `url`, a FaultProxy that never answers it."""
    proc = subprocess.Popen([sys.executable, "-m", "accman", *map(str, args), "--url", url.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=server_env(), cwd=ROOT)
    deadline = time.monotonic() + 15
    while url.seen == 0:
        assert time.monotonic() < deadline and proc.poll() is None, proc.communicate()
        time.sleep(0.02)
    time.sleep(0.2)                         # the server has the request: it applies it
    proc.send_signal(sig)
    out, err = proc.communicate(timeout=15)
    return subprocess.CompletedProcess(proc.args, proc.returncode, out, err)


@pytest.mark.any_one_store("the 503 or the silence comes from a proxy, not the store")
@pytest.mark.parametrize("args,hint", [
    (["mod", "-7"], "read `accman past` for this credential before you try again"),
    (["mod", "-7", "--key", "kint"], "with the same --key"),
    (["hold", "-7", "--ttl", "60"], "a hold never settled ends by itself after --ttl 60 s"),
])
def test_sigint_during_a_write_says_what_to_do_and_exits_130(start_server, proxy, args, hint):
    s = start_server()
    cred = funded(s)
    proc = interrupted(proxy(s, "hang"), args[0], cred, *args[1:])
    err = one_line_error(proc, 130)
    assert err.startswith(f"accman: interrupted; the {args[0]} may or may not have applied")
    assert hint in err and proc.stdout == ""
    assert history(s, cred) == [-7, 100]                      # it had applied


@pytest.mark.any_one_store("the 503 or the silence comes from a proxy, not the store")
def test_sigterm_during_a_write_says_what_to_do_and_exits_143(start_server, proxy):
    """A service manager stopping a script mid-charge: killed silently, the
    script's log would not say that the mod may have applied."""
    s = start_server()
    cred = funded(s)
    proc = interrupted(proxy(s, "hang"), "mod", cred, -7, sig=signal.SIGTERM)
    err = one_line_error(proc, 143)
    assert err.startswith("accman: terminated; the mod may or may not have applied")
    assert "read `accman past` for this credential before you try again" in err
    assert history(s, cred) == [-7, 100]                      # it had applied


@pytest.mark.any_one_store("the 503 or the silence comes from a proxy, not the store")
def test_sigint_during_open_hands_over_the_credential(start_server, proxy):
    s = start_server()
    err = one_line_error(interrupted(proxy(s, "hang"), "open", "--by", 30), 130)
    finish = err.split("run: ", 1)[1].split()
    assert "may or may not have been opened" in err and finish[3:] == ["30", "--key",
                                                                         "accman-open"]
    assert json.loads(run_accman("tot", finish[2], "--url", s.url).stdout) == {"tot": 30}


@pytest.mark.any_one_store("the 503 or the silence comes from a proxy, not the store")
def test_sigint_during_a_read_exits_130_quietly(start_server, proxy):
    s = start_server()
    proc = interrupted(proxy(s, "hang"), "tot", funded(s))
    assert (proc.returncode, proc.stdout, proc.stderr) == (130, "", "")


# --- a closed stdout ------------------------------------------------------------------------

def with_reader_gone(url, *args) -> subprocess.CompletedProcess:
    """`accman ARGS --url URL` writing into a pipe whose reader has closed
    it, as `accman past CRED | (exec 0<&-; true)` does."""
    r, w = os.pipe()
    os.close(r)
    try:
        return subprocess.run([sys.executable, "-m", "accman", *map(str, args), "--url", url],
                              stdout=w, stderr=subprocess.PIPE, text=True, timeout=30,
                              env=server_env(), cwd=ROOT)
    finally:
        os.close(w)


@pytest.mark.any_one_store("what is checked is the command line writing to a closed pipe")
def test_a_read_whose_reader_is_gone_exits_0_quietly(start_server):
    s = start_server()
    cred = funded(s)
    for args in (["past", cred], ["tot", cred], ["events"]):
        proc = with_reader_gone(s.url, *args)
        assert (proc.returncode, proc.stderr) == (0, "")


@pytest.mark.any_one_store("what is checked is the command line writing to a closed pipe")
def test_a_write_whose_reader_is_gone_says_on_stderr_what_it_did(start_server):
    s = start_server()
    cred = funded(s)
    proc = with_reader_gone(s.url, "mod", cred, "-4")
    assert proc.returncode == 0
    assert proc.stderr == 'accman: stdout is closed; the mod applied: {"tot":96,"seq":2}\n'
    proc = with_reader_gone(s.url, "open", "--by", 9)
    err = one_line_error(proc, 0)
    assert err.startswith("accman: stdout is closed; the account was opened: its credential is")
    assert history(s, err.split()[-1]) == [9]


def started_without(url, streams, *args) -> subprocess.CompletedProcess:
    """`accman ARGS --url URL` started with the descriptors of `streams`
    (1, or 1 and 2) closed, as `accman ... >&- 2>&-` is."""
    closes = " ".join(f"{fd}>&-" for fd in streams)
    return subprocess.run(["bash", "-c", f'exec "$0" -m accman "$@" {closes}', sys.executable,
                           *map(str, args), "--url", url], capture_output=True, text=True,
                          timeout=30, env=server_env(), cwd=ROOT)


CLOSED_AT_START = "accman: error: cannot write to stdout: the command was started with " \
                  "stdout closed (EBADF)"


def write_refused_unsent(command) -> str:
    """What a write started with stdout closed says (exit 2)."""
    return (f"accman: error: {command}: the command was started with stdout closed (>&-), "
            "where its reply would be lost; nothing was sent (to drop the reply: >/dev/null)")


@pytest.mark.any_one_store("what is checked is the command line started with stdout closed")
def test_a_write_started_with_stdout_closed_is_refused_before_it_is_sent(start_server):
    """Its reply could only go nowhere.  Applied and then exit 4, a script
    that repeats a failing command (`until accman mod ...; do ...; done`)
    charged on every turn, and `open --by 8 >&- 2>&-` funded a credential
    that nobody would ever know.  So with a stdout open for reading only."""
    s = start_server()
    cred = funded(s)
    for args in (["open", "--by", 8], ["mod", cred, "-4"], ["hold", cred, "-6", "--ttl", 60]):
        proc = started_without(s.url, [1], *args)
        assert (proc.returncode, proc.stderr) == (2, write_refused_unsent(args[0]) + "\n"), args
    proc = started_without(s.url, [1, 2], "open", "--by", 8)     # stderr closed too
    assert (proc.returncode, proc.stderr) == (2, "")
    proc = subprocess.run(                          # stdout open for reading only
        ["bash", "-c", 'exec "$0" -m accman "$@" 1</dev/null', sys.executable, "mod", cred,
         "-4", "--url", s.url], capture_output=True, text=True, timeout=30, env=server_env(),
        cwd=ROOT)
    assert (proc.returncode, proc.stderr) == (2, write_refused_unsent("mod").replace(
        "stdout closed (>&-)", "stdout open for reading only") + "\n")
    assert history(s, cred) == [100]
    events = json.loads(run_accman("events", "--url", s.url).stdout)["events"]
    assert len(events) == 1         # funded's: no account opened


@pytest.mark.any_one_store("what is checked is the command line started with stdout closed")
def test_a_read_whose_answer_goes_nowhere_exits_4(start_server):
    """Nobody closed that stdout to read no more, as a pipe's reader does:
    not exit 0, which said that all was well even with stderr closed too."""
    s = start_server()
    cred = funded(s)
    for args in (["tot", cred], ["past", cred], ["events"]):
        err = one_line_error(started_without(s.url, [1], *args), 4)
        assert err == f"{CLOSED_AT_START}; the reply was not written", args
    assert started_without(s.url, [1, 2], "tot", cred).returncode == 4


# --- a mistyped flag --------------------------------------------------------------------------

@pytest.mark.parametrize("args,names", [
    (["tot", "--tokn", "SECRETtoken", "SECRETcred"],
     "unrecognized arguments: <not shown> <not shown>; did you mean --token?"),
    (["tot", "--tokn=SECRETtoken", "SECRETcred"],
     "unrecognized arguments: <not shown>; did you mean --token?"),
    (["tot", "--tokenSECRET12", "c"], "unrecognized arguments: <not shown>; did you mean --token?"),
    (["tot", "--SECRETtoken", "c"], "unrecognized arguments: <not shown>; did you mean --token?"),
    (["mod", "c", "5", "--SECRETkey", "k"],
     "unrecognized arguments: <not shown> <not shown>; did you mean --key?"),
    # Another command's flag is said as such, not matched to one of this one's.
    (["tot", "SECRETcred", "--key", "SECRETkey"],
     "unrecognized arguments: --key <not shown>; --key is not an option of accman tot ("),
    (["past", "SECRETcred", "--by=5", "--min", "SECRET", "--limt", "3"],
     "unrecognized arguments: --by --min <not shown> <not shown> <not shown>; --by and --min "
     "are not options of accman past; did you mean --limit? ("),
    # A command's name where a value goes is no flag: not said as an option.
    (["tot", "SECRETcred", "SECRETmore", "mod"], "unrecognized arguments: <not shown> mod ("),
    (["tot", "SECRETcred1", "SECRETcred2"], "unrecognized arguments: <not shown> ("),
    (["mod", "SECRETcred", "5", "-SECRETdash"], "unrecognized arguments: <not shown> ("),
    (["tot", "--", "--SECRETdash", "--SECRETmore"], "unrecognized arguments: <not shown> ("),
    (["tot", "--", "c", "--tokenSECRET"], "unrecognized arguments: <not shown> ("),
    # A flag's whole name only: an abbreviation is an unknown flag.
    (["hold", "SECRETcred", "-5", "--ttl", "60", "--t=SECRET"],
     "unrecognized arguments: <not shown>; did you mean --ttl?"),
    (["events", "--follow=SECRET"], "argument --follow: ignored explicit argument"),
    (["SECRETcred"], "invalid choice: '<not shown>'"),
    # Before any command: the flags it did not know are said, not only that
    # a command is missing.
    (["--verison"], "unrecognized arguments: <not shown>; a COMMAND is required: serve, open, "
                    "tot, mod, past, hold, settle, events, migrate, verify; did you mean "
                    "--version? ("),
    (["--SECRETtoken=SECRET"], "unrecognized arguments: <not shown>; a COMMAND is required: "
                               "serve, open, tot, mod, past, hold, settle, events, migrate, "
                               "verify ("),
    (["serve", "--verify=SECRET"], "argument --verify: invalid choice"),
    # A credential that starts with "-h": argparse quoted the rest of it.
    (["tot", "-hSECRETcred"], "argument -h/--help: ignored explicit argument '<not shown>'"),
    (["-h=SECRET"], "argument -h/--help: ignored explicit argument '<not shown>'"),
    # argparse reads each "h" after "-h" as -h again, and quotes what follows.
    (["tot", "-hhSECRETcred"], "argument -h/--help: ignored explicit argument '<not shown>'"),
    (["tot", "c", "-hhh=SECRET"], "argument -h/--help: ignored explicit argument '<not shown>'"),
    # A value that holds the words before argparse's list of choices.
    (["serve", "--port", "SECRET (choose from "], "argument --port: invalid port '<not shown>'"),
    (["serve", "--events-retention=SECRET (choose from 'full', 'heads')"],
     "argument --events-retention: '<not shown>' is not a duration"),
    (["serve", "--verify", "SECRET (choose from 'full', 'heads')"],
     "invalid choice: '<not shown>' (choose from 'full', 'heads') ("),
])
def test_a_usage_error_shows_flag_names_and_never_a_value(args, names, tmp_path):
    """A usage error shows only the exact names of flags and commands: an
    unknown flag, however like a known one (a credential may start with
    "--" too, and a value may be glued to a flag's name), is not shown, and
    the closest flag is suggested by its own name; after "--" every word is
    a value, and no flag is suggested for it.  A positional value, a value
    after a flag or after "=", is never shown either."""
    err = one_line_error(run_accman(*args, cwd=tmp_path))
    assert names in err and "SECRET" not in err
    assert "a value that may be a credential is not shown" in err


@pytest.mark.parametrize("args", [[], ["--"]])
def test_a_command_line_without_a_command_says_one_is_required(args, tmp_path):
    """With no command and no unknown flag to name, the usage error says
    that a command is required, as argparse's own did (the parser leaves
    that to accman.calling.usage's no_command)."""
    err = one_line_error(run_accman(*args, cwd=tmp_path))
    assert err == ("accman: error: the following arguments are required: COMMAND "
                   "(try: accman --help)")


@pytest.mark.parametrize("args,said", [
    (["serve", "--port", "99999"], "invalid port '99999'"),
    (["serve", "--port=99999"], "invalid port '99999'"),
    (["serve", "--events-retention", "5w"], "'5w' is not a duration"),
    (["serve", "--events-retention", "0"], "argument --events-retention: '0' is shorter than "
     "the shortest retention: it must be at least 1s (EVENTS_RETENTION_S_MIN)"),
    (["serve", "--events-retention", "0d"], "'0d' is shorter than the shortest retention"),
    (["serve", "--events-retention", "9" * 5000 + "d"], "is longer than the longest retention"),
    (["serve", "--compaction-nice", "20", "--port", "0"], "invalid nice value '20'"),
    (["serve", "--verify", "none"], "invalid choice: 'none' (choose from 'full', 'heads')"),
    (["serve", "--verify=ful1"], "invalid choice: 'ful1' (choose from 'full', 'heads')"),
])
def test_a_usage_error_shows_a_value_that_is_never_a_secret(args, said, tmp_path):
    """A number or a duration given to a flag of this command that takes
    one is shown, so that the typo can be seen; and a short lowercase word
    given to a flag of a few choices (`--verify none` said '<not shown>':
    a black-box probe)."""
    err = one_line_error(run_accman(*args, cwd=tmp_path))
    assert said in err and "never shown" not in err, err


@pytest.mark.parametrize("args", [
    ["serve", "--port", "SECRET9", "--url", "SECRET9"],      # given elsewhere too
    ["tot", "--port", "SECRET9"],                             # not a flag of tot
    ["tot", "--", "--port", "SECRET9"],                       # after "--": values
    ["serve", "--port", "postgresql://app:SECRET9@db/a"],     # a swapped variable
    ["serve", "--compaction-nice", "SECRET9SECRET9"],         # no number's shape
    ["serve", "--port", "7SECRET9"],                          # a digit first, then letters
    ["serve", "--webhook=9SECRET9", "--port", "9SECRET9"],    # given elsewhere, glued
    ["serve", "--verify", "secret9secret9"],                  # a choice's word, too long
    ["serve", "--verify", "SECRET9"],                         # not lowercase
    ["serve", "--verify", "secret9", "--tokens", "secret9"],  # given elsewhere too
])
def test_a_value_also_given_where_it_may_be_a_secret_is_not_shown(args, tmp_path):
    err = one_line_error(run_accman(*args, cwd=tmp_path))
    assert "secret9" not in err.lower(), err


@pytest.mark.parametrize("args,said", [
    (["serve", "--events-retention", " 90m"],
     "argument --events-retention: '<not shown>' is not a duration such as 3600, 90m or 7d ("),
    (["serve", "--compaction-nice", "SECRET", "--tokens", "digits"],
     "invalid nice value '<not shown>': a whole number from zero to 19, in plain digits ("),
    (["serve", "--verify", "SECRET", "--tokens", "full"],
     "invalid choice: '<not shown>' (choose from 'full', 'heads') ("),
    (["tot", "SECRET", "arguments"], "error: unrecognized arguments: <not shown> ("),
])
def test_a_word_given_is_hidden_where_echoed_never_in_accmans_own_words(args, said, tmp_path):
    """A word of the command line is put out of sight where the usage
    error echoes it, never where AccMan's (or argparse's) own text holds
    the same word: " 90m" is no number's shape, and still the example
    90m is said."""
    err = one_line_error(run_accman(*args, cwd=tmp_path))
    assert said in err and "SECRET" not in err, err
    assert "a value that may be a credential is not shown" in err


@pytest.mark.parametrize("args,said", [
    (["serve", "--low-balance", "5x", "-"], "argument --low-balance: '5x' is not a signed "
     '64-bit decimal integer in plain digits (an optional "-", no leading zeros, never -0) ('),
    (["serve", "--store", "postgresql://h:0/a", "/", ":", "@"],
     '(write a "/", ":" or "@" of the user info as %2F, %3A or %40) ('),
    (["serve", "--store", "postgresql://u[x@h/a", "[", "]"],
     'a "[" or "]" of the user info is written %5B or %5D'),
])
def test_a_character_accmans_words_name_is_said_though_given_as_a_word(args, said, tmp_path):
    """A character that a type's own words name ("-", "/", "[") is left
    whole there when it is given as a word too: nothing of the command line
    is echoed, so nothing is put out of sight."""
    err = one_line_error(run_accman(*args, cwd=tmp_path))
    assert said in err and "<not shown>" not in err, err


def test_many_unknown_words_are_said_listing_a_few(tmp_path):
    """`accman tot $(cat creds)`: each word of the command line was looked
    for in a message that listed them all, minutes for 20000 words.  The
    message lists UNRECOGNIZED_LISTED_MAX of them, then how many more."""
    words = [f"SECRETcred{i}" for i in range(ARGV_WORDS_MAX - 1)]
    err = one_line_error(run_accman("tot", *words, cwd=tmp_path))
    assert err.startswith("accman: error: unrecognized arguments: " + "<not shown> " * 8
                          + f"and {len(words) - 1 - 8} more (a value that may be a credential "
                          "is not shown)")
    assert "SECRET" not in err


def test_how_many_more_is_said_even_when_a_word_given_is_that_number(tmp_path):
    """The count of the words not listed is AccMan's own number, not a word
    of the command line: said even when one of them is that number
    (`accman tot 1 2 ... 20`, 11 more), which a word given would hide."""
    words = [str(i) for i in range(1, 21)]
    err = one_line_error(run_accman("tot", *words, cwd=tmp_path))
    assert ("unrecognized arguments: " + "<not shown> " * 8 + f"and {len(words) - 1 - 8} more ("
            in err), err


def test_a_command_line_over_argv_words_max_is_refused_before_it_is_parsed(tmp_path):
    """argparse's cost grows as the square of the words that start with
    "-": `accman tot $(seq -f -c%g 1 20000)` took seconds to refuse."""
    at = ["tot", "SECRETcred", *[f"-c{i}" for i in range(ARGV_WORDS_MAX - 2)]]
    assert len(at) == ARGV_WORDS_MAX
    err = one_line_error(run_accman(*at, cwd=tmp_path))
    assert err.startswith("accman: error: unrecognized arguments: ") and "SECRET" not in err
    for over in (at + ["-SECRETc"], at * 80):
        err = one_line_error(run_accman(*over, cwd=tmp_path, timeout=10))
        assert err == (f"accman: error: {len(over)} words after accman, more than any command "
                       f"takes (ARGV_WORDS_MAX, {ARGV_WORDS_MAX}) (try: accman --help)")


@pytest.mark.parametrize("args,flag", [
    (["tot", "abc", "--token", "-SECRETtoken0123456789"], "--token"),
    (["mod", "abc", "-3", "--key", "-SECRETkey"], "--key"),
    (["serve", "--data", "-SECRETdir", "--port", "0"], "--data"),
])
def test_a_value_that_starts_with_a_dash_is_told_to_go_after_equals(args, flag, tmp_path):
    """A token or a key may start with "-", which argparse takes for a flag
    and then says "expected one argument": the hint was to put a
    credential after "--", where no flag's value can go."""
    err = one_line_error(run_accman(*args, cwd=tmp_path))
    assert err.startswith(f"accman: error: argument {flag}: expected one argument (try: ")
    assert err.endswith(f"; a value that starts with '-' goes after '=': {flag}=VALUE)")
    assert "SECRET" not in err and "after '--'" not in err
    assert list(tmp_path.iterdir()) == []


def test_a_value_left_out_before_another_flag_gets_no_equals_hint():
    err = one_line_error(run_accman("mod", "abc", "-3", "--key", "--url", "http://127.0.0.1:9"))
    assert "argument --key: expected one argument" in err and "goes after '='" not in err


# --- events --follow and its reader -------------------------------------------------------

def test_follow_into_head_names_the_last_event_written_not_read(start_server):
    """`accman events --follow | head -n 3`: the follower wrote all ten
    events into the pipe, head read three; stderr says the id is the last
    written, not read, and the follower, idle in a 25 s long poll, ends
    within READER_CHECK_S of head leaving, not with the poll."""
    s = start_server()
    for by in range(1, 11):
        s.mod("abc", by)
    cmd = f'"$0" -m accman events --follow --url {s.url} | head -n 3'
    t = time.monotonic()
    proc = subprocess.run(["bash", "-o", "pipefail", "-c", cmd, sys.executable],
                          capture_output=True, text=True, timeout=60, env=server_env(), cwd=ROOT)
    assert time.monotonic() - t < 10
    assert proc.returncode == 0, proc.stderr
    assert [json.loads(line)["id"] for line in proc.stdout.splitlines()] == [1, 2, 3]
    assert proc.stderr == (
        "accman: events: stopped (reader gone); events written up to id 10 (not necessarily "
        "read); to resume: accman events --follow --after 10, or --after the last id the "
        "reader handled\n")


def test_a_follower_started_with_stdout_closed_says_so_and_exits_4(fake):
    """`accman events --follow >&-` died of an AttributeError (its reader
    check asked Python's None stdout for its descriptor), exit 1; then it
    exited 0, as if a reader had chosen to stop, even with stderr closed
    too: nothing it follows could ever be read."""
    proc = started_without(fake.url, [1], "events", "--follow")
    assert (proc.returncode, proc.stderr) == (4, (
        f"accman: events: {CLOSED_AT_START.removeprefix('accman: ')}; events written up to "
        "id 0 (not necessarily read); to resume: accman events --follow --after 0, or --after "
        "the last id the reader handled\n"))
    assert started_without(fake.url, [1, 2], "events", "--follow").returncode == 4
    assert fake.requests == []


def test_an_idle_follower_notices_its_reader_gone_within_a_poll(start_server):
    s = start_server()
    proc = subprocess.Popen([sys.executable, "-m", "accman", "events", "--follow", "--url", s.url],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=server_env(),
                            cwd=ROOT)
    try:
        time.sleep(1.5)                         # in its first long poll, of 25 s
        proc.stdout.close()
        assert proc.wait(timeout=8) == 0
        assert "stopped (reader gone); events written up to id 0" in proc.stderr.read().decode()
    finally:
        proc.kill()
        proc.wait()
