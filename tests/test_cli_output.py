"""The command line's last words, against a real AccMan: a stdout that fails
(a full disk, a descriptor that takes no writes) loses no credential and
shows no traceback."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys

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

@pytest.fixture(params=["full disk", "read-only descriptor"])
def failing_stdout(request):
    """A stdout on which every write fails otherwise than by a closed pipe:
    /dev/full (ENOSPC) or /dev/null opened for reading only (EBADF); and
    what the command says of it."""
    path, mode, words = {
        "full disk": ("/dev/full", "wb", "No space left on device (ENOSPC)"),
        "read-only descriptor": (os.devnull, "rb", "Bad file descriptor (EBADF)"),
    }[request.param]
    with open(path, mode) as f:
        yield f, words


@pytest.mark.any_one_store("what is checked is the command line writing to a stdout that fails")
def test_a_write_whose_stdout_fails_says_what_it_did_and_exits_4(start_server, failing_stdout):
    """The output asked for is lost, so not exit 0; the call applied, so
    not 3 (which would invite a second mod): exit 4, and one line on
    stderr with the OS error and what the write did."""
    out, words = failing_stdout
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
                                                                       failing_stdout):
    out, words = failing_stdout
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
