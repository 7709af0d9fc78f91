"""End to end: consumers that go away before their response (docs/CALLING.md,
"The consumer goes away"), with the real AccMan server and the app of
tests/gone_app.py under a real uvicorn, each a subprocess, spoken to over
raw sockets that send a request and close before the response, and by
httpx for the consumers who stay.

Before its response starts, a consumer who left is not charged (check
mode) and its hold is released at once (reserve mode), whether or not the
app reads `receive()` after the body; an app that does read it still gets
the disconnect; the body is the app's, streamed or not; a consumer who
stays is charged once; and nothing is left behind or logged at shutdown."""

from __future__ import annotations

import itertools
import os
import signal
import socket
import threading
import time
from urllib.parse import urlsplit

import httpx
import pytest

from conftest import request_bytes
from test_e2e_asgi import SVC_CHECK, UVICORN_READY, past, services, start_app, tot

# How long /work works: far longer than a close takes to reach uvicorn, so
# that the consumer has gone well before the response starts.
WORK_S = 1.5
WAIT_S = 20.0               # how long a test waits for what it expects
BYS_GONE = {"check": [10], "reserve": [10, -2, 2]}      # nothing charged; the hold back
BYS_ONE = {"check": [10, -2], "reserve": [10, -2, 0]}   # charged once: a mod, or a settle
# What uvicorn's log must never say: the middleware's watch leaves no task
# behind and no error unretrieved, at the end of a request or at shutdown.
LOG_FAULTS = ("Traceback", "Task was destroyed", "never retrieved", "ERROR")


@pytest.fixture(scope="module", params=["uvicorn", "uvicorn --http httptools"])
def stack(request, tmp_path_factory):
    """The service under uvicorn, with each of its HTTP/1.1 protocols: h11,
    and httptools (uvicorn[standard]'s), whose disconnects are their own."""
    with services(tmp_path_factory.mktemp("e2e-gone"), "gone-", app="tests.gone_app:app",
                  server=request.param) as s:
        yield {**s, "server": request.param}
    for app in s["apps"].values():
        stopped_cleanly(app)


@pytest.fixture(scope="module")
def hyper_stack(tmp_path_factory):
    """The same service under hypercorn (HTTP/1.1), whose disconnects and
    shutdown are its own."""
    with services(tmp_path_factory.mktemp("e2e-gone-hyper"), "hyper-",
                  app="tests.gone_app:app", server="hypercorn") as s:
        yield s
    for app in s["apps"].values():
        log = app.err.read_text(errors="replace")
        assert not [f for f in LOG_FAULTS if f in log], log[-3000:]


def stopped_cleanly(app) -> None:
    """uvicorn ended its shutdown (it raises the SIGTERM it caught again as
    it exits) and logged no fault."""
    log = app.err.read_text(errors="replace")
    assert app.proc.returncode in (0, -signal.SIGTERM) and "Finished server process" in log
    assert not [f for f in LOG_FAULTS if f in log], log[-3000:]


_n = itertools.count(1)


def new_cred(stack, funds=10) -> str:
    cred = f"gone-{os.getpid()}-{time.monotonic_ns()}-{next(_n)}"
    stack["funder"].mod(cred, funds, key="open")
    return cred


def new_id() -> str:
    return f"r{next(_n)}"


def seen(url: str, rid: str) -> list:
    return httpx.get(f"{url}/seen", params={"id": rid}).json()


def wait_seen(url: str, rid: str, item: str) -> list:
    """What the app did for request `rid`, once it has done `item`."""
    deadline = time.monotonic() + WAIT_S
    while item not in (s := seen(url, rid)):
        assert time.monotonic() < deadline, f"the app did {s}, never {item!r}"
        time.sleep(0.02)
    return s


def wait_tot(stack, cred, want: int) -> None:
    deadline = time.monotonic() + WAIT_S
    while (now := tot(stack, cred)) != want:
        assert time.monotonic() < deadline, f"the balance stays {now}, never {want}"
        time.sleep(0.02)


def bys(stack, cred) -> list:
    return [e.by for e in reversed(past(stack, cred))]


def leave(url: str, path: str, rid: str, cred: str, parts=(), until="body 0") -> None:
    """Sends a request (with a body of `parts`, each sent once the app has
    read the one before, or all at once when `until` is "started": an app
    that never reads) and closes the connection once the app has read the
    body whole (or, for a request without a body or an app that does not
    read it, has done `until`), before any response."""
    u = urlsplit(url)
    headers = [("ACCMAN", cred)]
    if parts:
        headers.append(("Content-Length", str(sum(map(len, parts)))))
    target = f"{path}{'&' if '?' in path else '?'}id={rid}"
    with socket.create_connection((u.hostname, u.port), timeout=WAIT_S) as sock:
        sock.sendall(request_bytes("POST" if parts else "GET", target, headers))
        if until == "started":
            sock.sendall(b"".join(parts))
            parts = ()
        for i, part in enumerate(parts):
            sock.sendall(part)
            wait_seen(url, rid, f"body {len(part)}" + (" more" if i < len(parts) - 1 else ""))
        if not parts:
            wait_seen(url, rid, until)
    # closed: the consumer has gone, the app is still working


def test_each_uvicorn_runs_the_protocol_it_names(stack):
    """The two uvicorns are h11 and httptools, not the same one twice:
    uvicorn's default picks httptools wherever it is installed (the test
    extras install it).  h11 refuses an HTTP/1.1 request without a Host;
    httptools passes it to the app, whose middleware wants a credential."""
    port = urlsplit(stack["check"]).port
    with socket.create_connection(("127.0.0.1", port), timeout=WAIT_S) as sock:
        sock.sendall(request_bytes("GET", "/idle", host=None))
        status = sock.recv(64).split(b" ", 2)[1]
    assert status == (b"401" if "httptools" in stack["server"] else b"400")


# --- consumers who leave ---------------------------------------------------------------
@pytest.mark.parametrize("mode", ["check", "reserve"])
@pytest.mark.parametrize("path,until", [("/work", "body 0"), ("/idle", "started")])
def test_a_consumer_gone_before_the_response_is_not_charged(stack, mode, path, until):
    """/work never reads `receive()` after the body, /idle never calls it
    at all (as most GET handlers: a request whose head says it has no body
    is read for it): the middleware sees the disconnect itself.  In
    reserve mode the hold comes back while the app is still working."""
    cred, rid, url = new_cred(stack), new_id(), stack[mode]
    leave(url, f"{path}?s={WORK_S}", rid, cred, until=until)
    if mode == "reserve":
        wait_tot(stack, cred, 10)
        assert "answered" not in seen(url, rid)
    assert wait_seen(url, rid, "answered") == [until, "answered"]
    assert tot(stack, cred) == 10 and bys(stack, cred) == BYS_GONE[mode]


def gone_while_accman_answers(s, mode) -> None:
    """The consumer leaves while the middleware waits for AccMan (stopped
    for a moment), and the server reads its close; the app then answers
    without awaiting anything, so the middleware's watch has had no turn
    to read the disconnect: it gets one as the response starts, and the
    consumer is not charged (its hold comes back)."""
    cred, rid, url = new_cred(s), new_id(), s[mode]
    accman = s["accman"].proc.pid
    u = urlsplit(url)
    os.kill(accman, signal.SIGSTOP)
    try:
        with socket.create_connection((u.hostname, u.port), timeout=WAIT_S) as sock:
            sock.sendall(request_bytes("GET", f"/at_once?id={rid}", [("ACCMAN", cred)]))
        time.sleep(0.5)             # the close reaches the server, AccMan not answering
    finally:
        os.kill(accman, signal.SIGCONT)
    assert wait_seen(url, rid, "answered") == ["started", "answered"]
    wait_tot(s, cred, 10)
    assert bys(s, cred) == BYS_GONE[mode]


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_a_consumer_gone_while_accman_answers_is_not_charged_by_an_app_at_once(stack, mode):
    gone_while_accman_answers(stack, mode)


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_under_hypercorn_a_consumer_gone_while_accman_answers_is_not_charged(hyper_stack, mode):
    gone_while_accman_answers(hyper_stack, mode)


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_an_app_that_reads_the_disconnect_still_sees_it(stack, mode):
    """/listen works, then reads `receive()`: it gets the disconnect that
    the middleware saw first, and in reserve mode the hold came back
    before the app read it."""
    cred, rid, url = new_cred(stack), new_id(), stack[mode]
    leave(url, f"/listen?s={WORK_S}", rid, cred)
    if mode == "reserve":
        wait_tot(stack, cred, 10)
        assert seen(url, rid) == ["body 0"]
    assert wait_seen(url, rid, "answered") == ["body 0", "http.disconnect", "answered"]
    assert tot(stack, cred) == 10 and bys(stack, cred) == BYS_GONE[mode]


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_a_streamed_body_is_the_apps_and_its_consumer_may_leave_after_it(stack, mode):
    cred, rid, url = new_cred(stack), new_id(), stack[mode]
    leave(url, f"/work?s={WORK_S}", rid, cred, parts=(b"hello", b"world"))
    assert wait_seen(url, rid, "answered") == ["body 5 more", "body 5", "answered"]
    assert tot(stack, cred) == 10 and bys(stack, cred) == BYS_GONE[mode]


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_a_consumer_gone_after_posting_a_body_the_app_never_reads_is_not_charged(stack, mode):
    """A JSON POST to a handler that has no use for its body (/idle never
    calls receive()): the middleware reads the body and the disconnect
    behind it, so the hold comes back while the app is still working."""
    cred, rid, url = new_cred(stack), new_id(), stack[mode]
    leave(url, f"/idle?s={WORK_S}", rid, cred, parts=(b'{"city": "Lisbon"}',), until="started")
    if mode == "reserve":
        wait_tot(stack, cred, 10)
        assert "answered" not in seen(url, rid)
    assert wait_seen(url, rid, "answered") == ["started", "answered"]
    assert tot(stack, cred) == 10 and bys(stack, cred) == BYS_GONE[mode]


# --- consumers who stay ------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["check", "reserve"])
@pytest.mark.parametrize("path,body,did", [("/work", b"0123456789", ["body 10", "answered"]),
                                           ("/idle", b"0123456789", ["started", "answered"]),
                                           ("/idle", b"", ["started", "answered"])])
def test_a_consumer_who_stays_is_charged_once_per_request(stack, mode, path, body, did):
    """Two requests on one keep-alive connection: each charged once, and
    the app that never reads its body (/idle), which the watch reads for
    it, loses nothing to the watch."""
    cred, url = new_cred(stack), stack[mode]
    with httpx.Client(base_url=url, timeout=WAIT_S) as http:
        for balance in ("8", "6"):
            rid = new_id()
            r = http.post(path, params={"id": rid}, content=body, headers={"ACCMAN": cred})
            assert r.status_code == 200 and r.text == "done" and r.headers["accman"] == balance
            assert wait_seen(url, rid, "answered") == did
    assert tot(stack, cred) == 6
    assert bys(stack, cred) == BYS_ONE[mode] + BYS_ONE[mode][1:]


def test_a_request_under_way_at_shutdown_ends_charged_and_logs_nothing(stack, tmp_path):
    """uvicorn lets the request finish before it stops: charged once, and
    the watch of that request ends with it (the stack's own apps are
    checked the same way when they stop, after their consumers left)."""
    app = start_app(tmp_path, "gone-shutdown", stack["accman"].url, "check", SVC_CHECK,
                    app="tests.gone_app:app")
    cred, rid = new_cred(stack), new_id()
    try:
        url = app.wait_ready(UVICORN_READY, "stderr")
        replies = []
        t = threading.Thread(target=lambda: replies.append(httpx.get(
            f"{url}/work", params={"s": 1, "id": rid}, headers={"ACCMAN": cred},
            timeout=WAIT_S)))
        t.start()
        wait_seen(url, rid, "body 0")
        app.proc.send_signal(signal.SIGTERM)
        t.join(WAIT_S)
        app.proc.wait(WAIT_S)
    finally:
        app.stop()
    assert [r.status_code for r in replies] == [200] and replies[0].headers["accman"] == "8"
    assert bys(stack, cred) == BYS_ONE["check"]
    stopped_cleanly(app)


# --- the same under hypercorn ------------------------------------------------------------
@pytest.mark.parametrize("mode,path,until", [("check", "/work", "body 0"),
                                              ("reserve", "/idle", "started")])
def test_under_hypercorn_a_consumer_gone_is_not_charged(hyper_stack, mode, path, until):
    """Both ways the watch sees a disconnect (after the body the app read;
    the request read for the app, which never reads it), one in each mode."""
    test_a_consumer_gone_before_the_response_is_not_charged(hyper_stack, mode, path, until)


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_under_hypercorn_a_consumer_who_stays_is_charged_once(hyper_stack, mode):
    # hypercorn ends a body with an empty message of its own.
    test_a_consumer_who_stays_is_charged_once_per_request(
        hyper_stack, mode, "/work", b"0123456789", ["body 10 more", "body 0", "answered"])


def test_under_hypercorn_a_consumer_gone_after_a_body_never_read_is_not_charged(hyper_stack):
    test_a_consumer_gone_after_posting_a_body_the_app_never_reads_is_not_charged(
        hyper_stack, "reserve")
