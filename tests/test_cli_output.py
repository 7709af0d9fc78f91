"""The command line's last words, against a real AccMan: a stdout that fails
(a full disk, a descriptor that takes no writes) loses no credential and
shows no traceback; a second stop while the command writes how its call
ended cuts no line and changes no exit code.  What the command writes is
made to wait on a pipe the test has filled, and a stop meant to come
while it writes is sent once Linux's /proc says that it is blocked
writing, and the next step waits until /proc says that the stop was taken
or held back."""

from __future__ import annotations

import fcntl
import json
import os
import select
import signal
import socket
import struct
import subprocess
import sys
import termios
import time
from pathlib import Path

import pytest

from conftest import ROOT, server_env
from test_cli import one_line_error
from test_cli_faults import funded, history

WAIT_S = 15.0               # no step of these tests comes near it


def accman(*args) -> list:
    return [sys.executable, "-m", "accman", *map(str, args)]


def run_with(stdout, *args) -> subprocess.CompletedProcess:
    """`accman ARGS` with `stdout` (a file) as its stdout."""
    return subprocess.run(accman(*args), stdout=stdout, stderr=subprocess.PIPE, text=True,
                          timeout=30, env=server_env(), cwd=ROOT)


# --- a stdout that fails -------------------------------------------------------------------

_FAILING = {
    "full disk": ("/dev/full", "wb", "No space left on device (ENOSPC)"),
    "read-only descriptor": (os.devnull, "rb", "Bad file descriptor (EBADF)"),
}


@pytest.fixture(params=list(_FAILING))
def failing_stdout(request):
    """A stdout on which every write fails otherwise than by a closed pipe:
    /dev/full (ENOSPC) or /dev/null opened for reading only (EBADF); and
    what the command says of it."""
    path, mode, words = _FAILING[request.param]
    with open(path, mode) as f:
        yield f, words


@pytest.fixture
def full_stdout():
    """failing_stdout's full disk: the stdout a write can only find failing
    once it has been sent (one open for reading only is known before, and
    the write is not sent: test_cli_faults.py)."""
    path, mode, words = _FAILING["full disk"]
    with open(path, mode) as f:
        yield f, words


@pytest.mark.any_one_store("what is checked is the command line writing to a stdout that fails")
def test_a_write_whose_stdout_fails_says_what_it_did_and_exits_4(start_server, full_stdout):
    """The output asked for is lost, so not exit 0; the call applied, so
    not 3 (which would invite a second mod): exit 4, and one line on
    stderr with the OS error and what the write did."""
    out, words = full_stdout
    said = f"accman: error: cannot write to stdout: {words}"
    s = start_server()
    cred = funded(s)
    proc = run_with(out, "mod", cred, "-4", "--url", s.url)
    assert (proc.returncode, proc.stderr) == (4, f'{said}; the mod applied: {{"tot":96,"seq":2}}\n')
    err = one_line_error(run_with(out, "hold", cred, "-6", "--ttl", "60", "--url", s.url), 4)
    assert err.startswith(f"{said}; the hold applied: ")
    assert json.loads(err.split("applied: ", 1)[1])["tot"] == 90
    assert history(s, cred) == [-6, -4, 100]


@pytest.mark.any_one_store("what is checked is the command line writing to a stdout that fails")
def test_open_whose_stdout_fails_hands_over_the_credential_and_exits_4(start_server,
                                                                       full_stdout):
    out, words = full_stdout
    s = start_server()
    err = one_line_error(run_with(out, "open", "--by", 9, "--url", s.url), 4)
    assert err.startswith(f"accman: error: cannot write to stdout: {words}; the account was "
                          f"opened: its credential is ")
    assert history(s, err.split()[-1]) == [9]


@pytest.mark.any_one_store("what is checked is the command line writing to a stdout that fails")
def test_a_read_whose_stdout_fails_says_so_and_exits_4(start_server, failing_stdout):
    out, words = failing_stdout
    s = start_server()
    cred = funded(s)
    for args in (["past", cred], ["tot", cred], ["events"]):
        proc = run_with(out, *args, "--url", s.url)
        assert (proc.returncode, proc.stderr) == (
            4, f"accman: error: cannot write to stdout: {words}; the reply was not written\n")


@pytest.mark.any_one_store("what is checked is the command line writing to a stderr that fails")
def test_a_stderr_that_fails_too_loses_the_line_not_the_exit_code(start_server):
    s = start_server()
    with open("/dev/full", "wb") as full:
        for args, code in ((["open", "--by", 5, "--url", s.url], 4), (["tot", "--tokn", "x"], 2)):
            proc = subprocess.run(accman(*args), stdout=full, stderr=full, timeout=30,
                                  env=server_env(), cwd=ROOT)
            assert proc.returncode == code, args


@pytest.mark.any_one_store("what is checked is the command line writing to a stdout that fails")
def test_a_follower_whose_stdout_fails_says_where_to_resume_and_exits_4(start_server,
                                                                        failing_stdout):
    out, words = failing_stdout
    s = start_server()
    for by in (1, 2):
        s.mod("abc", by)
    proc = run_with(out, "events", "--follow", "--url", s.url)
    assert (proc.returncode, proc.stderr) == (4, (
        f"accman: events: error: cannot write to stdout: {words}; events written up to id 0 "
        "(not necessarily read); to resume: accman events --follow --after 0, or --after the "
        "last id the reader handled\n"))


@pytest.mark.embedded_only("verify checks the embedded store's data directory")
def test_verify_whose_stdout_fails_puts_its_verdict_on_stderr(start_server, tmp_path,
                                                              failing_stdout):
    out, words = failing_stdout
    data = tmp_path / "data"
    s = start_server(data)
    s.mod("acct", 10)
    assert s.stop() == 0
    err = one_line_error(run_with(out, "verify", "--data", data), 4)
    assert err.startswith(f"accman: error: cannot write to stdout: {words}; verify {data}: ok (")


@pytest.mark.parametrize("args", [["--help"], ["tot", "--help"], ["--version"]])
def test_help_whose_stdout_fails_says_so_and_exits_4(failing_stdout, args):
    """The help is the answer: argparse dropped the write's error, exit 0."""
    out, words = failing_stdout
    proc = run_with(out, *args)
    assert (proc.returncode, proc.stderr) == (
        4, f"accman: error: cannot write to stdout: {words}\n")
    proc = subprocess.run(["bash", "-c", 'exec "$0" -m accman "$@" >&-', sys.executable, *args],
                          capture_output=True, text=True, timeout=30, env=server_env(), cwd=ROOT)
    assert (proc.returncode, proc.stderr) == (4, "accman: error: cannot write to stdout: the "
                                                 "command was started with stdout closed (EBADF)\n")


def test_serve_whose_stdout_fails_refuses_to_start(tmp_path, failing_stdout):
    """Whoever waits for the ready line would wait for ever: the start ends,
    as every refused start does, with one line and exit 2."""
    out, words = failing_stdout
    proc = run_with(out, "serve", "--port", 0, "--data", tmp_path / "data")
    assert one_line_error(proc, 2) == (
        f"accman: error: cannot write the ready line to stdout: {words}")


def test_serve_whose_reader_closed_stdout_serves_and_says_so_on_stderr(tmp_path):
    r, w = os.pipe()
    os.close(r)
    try:
        proc = subprocess.Popen(accman("serve", "--port", 0, "--data", tmp_path / "data"),
                                stdout=w, stderr=subprocess.PIPE, text=True, env=server_env(),
                                cwd=ROOT)
    finally:
        os.close(w)
    try:
        line = proc.stderr.readline()
        assert line.startswith("accman: stdout is closed; serving http://127.0.0.1:"), line
        port = int(line.split("http://127.0.0.1:", 1)[1].split()[0])
        with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as c:
            c.sendall(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
            assert c.recv(65536).startswith(b"HTTP/1.1 200 ")
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
    finally:
        proc.kill()
        proc.wait()


@pytest.mark.parametrize("closed", [0, 1, 2])
def test_serve_started_without_a_standard_stream_stops_with_exit_0(tmp_path, closed):
    """Started with descriptor 0, 1 or 2 closed (`accman serve <&-`), the
    server's event loop took that number, and libuv aborted when it closed
    it: a SIGTERM ended in SIGABRT, not exit 0, "accman: stopped" unsaid."""
    proc = subprocess.Popen(["bash", "-c", f'exec "$0" -m accman serve --port 0 --data '
                             f'"$1" {closed}>&-', sys.executable, tmp_path / "data"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=server_env(), cwd=ROOT)
    try:
        ready = proc.stderr if closed == 1 else proc.stdout     # the line, or its words
        line = ready.readline()
        assert "serving http://127.0.0.1:" in line, (line, proc.poll())
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(WAIT_S) == 0
        if closed != 2:
            assert proc.stderr.read().endswith("accman: stopped\n")
    finally:
        proc.kill()
        proc.wait()


# --- a second stop while the command writes -----------------------------------------------

def full_pipe() -> tuple:
    """`(read end, write end, bytes in it)` of a pipe filled to the brim:
    a process that writes a line to it blocks until the test reads."""
    r, w = os.pipe()
    os.set_blocking(w, False)
    filled = 0
    try:
        while True:
            filled += os.write(w, b"." * 4096)
    except BlockingIOError:
        pass
    os.set_blocking(w, True)
    return r, w, filled


def wait_for(check, what):
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, f"no {what} within {WAIT_S} s"
        time.sleep(0.01)


def blocked_writing_to_a_pipe(proc) -> bool:
    """Linux's /proc: the kernel function that `proc` sleeps in."""
    assert proc.poll() is None, "the command ended before it blocked"
    return "pipe_write" in Path(f"/proc/{proc.pid}/wchan").read_text()


def taken_or_held(proc, sig) -> bool:
    """`sig`, sent to `proc`, was taken (no longer pending) or is held back
    (pending and blocked): /proc/PID/status."""
    if proc.poll() is not None:
        return True
    fields = dict(line.split(":", 1) for line in
                  Path(f"/proc/{proc.pid}/status").read_text().splitlines())
    bit = 1 << (sig - 1)
    pending = int(fields["ShdPnd"], 16) | int(fields["SigPnd"], 16)
    return not pending & bit or bool(int(fields["SigBlk"], 16) & bit)


def drain(fd, proc) -> bytes:
    """Everything written to the read end `fd` until `proc` exits."""
    data = b""
    deadline = time.monotonic() + WAIT_S
    while time.monotonic() < deadline:
        if select.select([fd], [], [], 0.1)[0]:
            chunk = os.read(fd, 65536)
            if not chunk:
                return data
            data += chunk
    raise AssertionError(f"the command did not end within {WAIT_S} s of its reader reading")


@pytest.fixture
def full_stream():
    """`start(args, stream)`: `accman ARGS` with `stream` ("stdout" or
    "stderr") a full pipe, the other one a pipe of its own.  `finish(proc)`
    reads both and waits for the end."""
    if not Path(f"/proc/{os.getpid()}/wchan").exists():
        pytest.skip("needs Linux's /proc/PID/wchan to see a process blocked writing")
    started = []

    def start(args, stream):
        r, w, filled = full_pipe()
        pipes = {"stdout": subprocess.PIPE, "stderr": subprocess.PIPE, stream: w}
        try:
            proc = subprocess.Popen(accman(*args), **pipes, env=server_env(), cwd=ROOT)
        finally:
            os.close(w)
        started.append((proc, r))
        proc.full = (stream, r, filled)
        return proc

    def finish(proc) -> subprocess.CompletedProcess:
        stream, r, filled = proc.full
        written = drain(r, proc)[filled:]
        other = (proc.stdout if stream == "stderr" else proc.stderr).read()
        proc.wait(WAIT_S)
        out, err = (other, written) if stream == "stderr" else (written, other)
        return subprocess.CompletedProcess(proc.args, proc.returncode, out.decode(),
                                           err.decode())
    start.finish = finish
    yield start
    for proc, r in started:
        if proc.poll() is None:
            proc.kill()
        proc.wait()
        os.close(r)


def stopped_twice(full_stream, url, first, second, *args) -> subprocess.CompletedProcess:
    """`accman ARGS --url URL` (a FaultProxy that never answers), its stderr
    a full pipe: `first` once its request reached the server, `second` once
    it is blocked writing what that stop ended."""
    proc = full_stream([*args, "--url", url.url], "stderr")
    wait_for(lambda: url.seen > 0, "request at the server")
    time.sleep(0.2)                         # the server has the request: it applies it
    proc.send_signal(first)
    wait_for(lambda: blocked_writing_to_a_pipe(proc), "write to the full stderr")
    proc.send_signal(second)
    wait_for(lambda: taken_or_held(proc, second), f"{second!r} taken or held back")
    return full_stream.finish(proc)


@pytest.mark.any_one_store("the silence comes from a proxy, not the store")
@pytest.mark.parametrize("first,second,word,code", [
    (signal.SIGTERM, signal.SIGTERM, "terminated", 143),
    (signal.SIGTERM, signal.SIGINT, "terminated", 143),
    (signal.SIGINT, signal.SIGTERM, "interrupted", 130),
])
def test_a_second_stop_while_the_advice_is_written_changes_nothing(start_server, proxy,
                                                                   full_stream, first, second,
                                                                   word, code):
    """A service manager's SIGTERM, then another (or a ^C) while the slow
    reader of stderr has not yet taken the advice: the advice is written
    whole, and the exit code is the first stop's."""
    s = start_server()
    cred = funded(s)
    proc = stopped_twice(full_stream, proxy(s, "hang"), first, second, "mod", cred, -7)
    assert proc.returncode == code and proc.stdout == ""
    assert proc.stderr == (
        f"accman: {word}; the mod may or may not have applied: read `accman past` for this "
        "credential before you try again (a mod with --key is safe to repeat)\n")
    assert history(s, cred) == [-7, 100]                      # it had applied


@pytest.mark.any_one_store("what is checked is the command line's own output")
@pytest.mark.parametrize("sig,word,code", [(signal.SIGINT, "interrupted", 130),
                                           (signal.SIGTERM, "terminated", 143)])
def test_a_stop_while_a_write_prints_its_reply_ends_it_saying_what_applied(
        start_server, full_stream, sig, word, code):
    """stdout may never drain (a full pipe, a stopped terminal): a stop
    ends the command at once, and stderr says what the mod did, since the
    outcome is known."""
    s = start_server()
    cred = funded(s)
    proc = full_stream(["mod", cred, -5, "--url", s.url], "stdout")
    wait_for(lambda: blocked_writing_to_a_pipe(proc), "write to the full stdout")
    proc.send_signal(sig)
    proc.wait(WAIT_S)                       # ends with its stdout still full
    proc = full_stream.finish(proc)
    assert proc.returncode == code and proc.stdout == ""
    assert proc.stderr == f'accman: {word}; the mod applied: {{"tot":95,"seq":2}}\n'
    assert history(s, cred) == [-5, 100]


@pytest.mark.any_one_store("what is checked is the command line's own output")
def test_a_stop_the_command_was_started_ignoring_stays_ignored(start_server, proxy):
    """A background job of a non-interactive shell starts with SIGINT
    ignored: a ^C meant for the foreground does not cut its write short."""
    s = start_server()
    cred = funded(s)
    slow = proxy(s, "hang")
    proc = subprocess.Popen(accman("mod", cred, -7, "--url", slow.url), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=server_env(), cwd=ROOT,
                            preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_IGN))
    try:
        wait_for(lambda: slow.seen > 0, "request at the server")
        proc.send_signal(signal.SIGINT)
        wait_for(lambda: taken_or_held(proc, signal.SIGINT), "SIGINT taken")
        time.sleep(0.2)
        assert proc.poll() is None          # still waiting for its reply
        proc.send_signal(signal.SIGTERM)
        out, err = proc.communicate(timeout=WAIT_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 143 and err.startswith(b"accman: terminated; the mod may or may not")


@pytest.mark.any_one_store("what is checked is the command line's own output")
def test_a_second_stop_while_a_follower_says_where_to_resume_changes_nothing(start_server,
                                                                             full_stream):
    s = start_server()
    s.mod("abc", 3)
    proc = full_stream(["events", "--follow", "--url", s.url], "stderr")
    assert json.loads(proc.stdout.readline())["id"] == 1
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: blocked_writing_to_a_pipe(proc), "write to the full stderr")
    proc.send_signal(signal.SIGTERM)
    wait_for(lambda: taken_or_held(proc, signal.SIGTERM), "SIGTERM taken or held back")
    proc = full_stream.finish(proc)
    assert proc.returncode == 0 and proc.stdout == ""
    assert proc.stderr == (
        "accman: events: stopped (signal); events written up to id 1 (not necessarily read); "
        "to resume: accman events --follow --after 1, or --after the last id the reader "
        "handled\n")


def in_pipe(r) -> int:
    """The bytes waiting in the pipe whose read end is `r` (FIONREAD)."""
    return struct.unpack("i", fcntl.ioctl(r, termios.FIONREAD, b"\0" * 4))[0]


def waiting_for_room(proc) -> bool:
    """Linux's /proc: `proc` sleeps in poll (for room in its stdout)."""
    assert proc.poll() is None, "the command ended before it waited"
    return "poll" in Path(f"/proc/{proc.pid}/wchan").read_text()


@pytest.mark.any_one_store("what is checked is the command line's own output")
def test_a_follower_whose_reader_stops_reading_ends_at_a_stop_on_a_whole_line(start_server,
                                                                           full_stream):
    """A follower whose reader neither reads nor exits ends at a stop, at
    once, not only by SIGKILL: it writes a piece of whole lines only once
    the pipe has room for it, and a stop while it waits for room ends it
    there, naming the last line written."""
    s = start_server()
    for i in range(60):                                     # ~3 pieces of lines
        s.mod(f"cred-{i:02d}", 3)
    proc = full_stream(["events", "--follow", "--url", s.url], "stdout")
    stream, r, filled = proc.full
    wait_for(lambda: waiting_for_room(proc), "wait for room in the full stdout")
    assert len(os.read(r, 4096)) == 4096                    # room for one piece
    wait_for(lambda: in_pipe(r) > filled - 4096, "a piece written")
    wait_for(lambda: waiting_for_room(proc), "wait for room again")
    proc.send_signal(signal.SIGTERM)
    proc.wait(WAIT_S)                                       # its stdout still full
    written = drain(r, proc)[filled - 4096:].decode()
    err = proc.stderr.read().decode()
    assert proc.returncode == 0 and written.endswith("\n")
    ids = [json.loads(line)["id"] for line in written.splitlines()]
    assert ids == list(range(1, len(ids) + 1)) and 1 < len(ids) < 60
    assert err == (f"accman: events: stopped (signal); events written up to id {ids[-1]} (not "
                   f"necessarily read); to resume: accman events --follow --after {ids[-1]}, "
                   "or --after the last id the reader handled\n")


@pytest.mark.any_one_store("what is checked is the follower's reading of `next`")
def test_a_follower_after_the_stream_s_end_says_so_and_follows_from_the_newest(start_server):
    """An `--after` past the newest event (a store restored from an older
    copy): the server's `next` is the newest id, and the events after it
    are new ones, written, with a line on stderr that says so."""
    s = start_server()
    s.mod("abc", 1)
    proc = subprocess.Popen(accman("events", "--follow", "--after", 9, "--wait", 1, "--url", s.url),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=server_env(),
                            cwd=ROOT)
    said = [b""]

    def told() -> bool:
        if select.select([proc.stderr], [], [], 0)[0]:
            said[0] += os.read(proc.stderr.fileno(), 65536)
        return b"\n" in said[0]
    try:
        # Its first line comes with its first poll's answer: a mod after it
        # is a new event, however long the follower took to start.
        wait_for(told, "line on stderr")
        s.mod("abc", 2)
        line = json.loads(proc.stdout.readline())
        assert (line["id"], line["by"]) == (2, 2)
    finally:
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    assert (said[0] + err).decode().splitlines()[0] == (
        "accman: events: event 9 is past the stream's end (the newest is 1): following from "
        "event 1")
