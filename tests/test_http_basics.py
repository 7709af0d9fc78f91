"""SPEC "Routes", its HTTP basics, against the real server: a Date on every
reply, HEAD on every GET route, OPTIONS, Expect: 100-continue, the absolute
form of the target, 411 for a body without a length, pipelined order, and
the protected mode's Host check (SPEC "Access")."""

import email.utils
import signal
import time

import httpx
import pytest
from conftest import (assert_error, get, parse_responses, patch, read_to_the_end,
                      request_bytes, with_history)

from accman.server.state import unsent_bytes


def replies(conn, n, heads=()):
    out = []
    for i in range(n):
        if i < len(heads) and heads[i]:
            out.append(head_only(conn))
        else:
            out.append(conn.response())
    return out


def head_only(conn):
    """A reply to a HEAD: its head, no body whatever Content-Length says."""
    while b"\r\n\r\n" not in conn.buf:
        conn._fill()
    head, _, conn.buf = conn.buf.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = {k.strip().lower(): v.strip() for k, _, v in
               (line.partition(":") for line in lines[1:])}
    return int(lines[0].split(" ")[1]), headers


# --- Date ----------------------------------------------------------------------------

def test_every_reply_has_a_date_within_a_second_of_now(shared_server, cred):
    """RFC 9110 6.6.1: an origin server with a clock sends Date."""
    shared_server.mod(cred, 5)
    answers = [shared_server.get(f"/tot?cred={cred}"), shared_server.mod(cred, -1),
               shared_server.get(f"/past?cred={cred}"), shared_server.get("/health"),
               shared_server.get("/metrics"), shared_server.get("/nope"),
               shared_server.patch("/tot?cred=a"), shared_server.get("/tot?cred=")]
    for r in answers:
        when = email.utils.parsedate_to_datetime(r.headers["date"]).timestamp()
        assert abs(when - time.time()) < 2.5, r.headers["date"]
        assert r.headers["date"].endswith(" GMT")


def test_the_date_moves_with_the_clock(shared_server):
    first = shared_server.get("/health").headers["date"]
    time.sleep(1.2)
    assert shared_server.get("/health").headers["date"] != first


# --- HEAD ------------------------------------------------------------------------------

@pytest.mark.parametrize("target", ["/tot?cred={cred}", "/past?cred={cred}", "/health",
                                    "/metrics", "/tot?cred=unknown-{cred}", "/nope"])
def test_head_answers_the_get_head_without_its_body(shared_server, cred, target):
    """SPEC "Routes": HEAD is answered on every GET route (uptime checkers
    probe /health with it); the connection stays usable after it."""
    shared_server.mod(cred, 7)
    target = target.format(cred=cred)
    full = shared_server.get(target)
    with shared_server.connect() as c:
        c.send(request_bytes("HEAD", target) + get("/health"))
        status, headers = head_only(c)
        assert status == full.status
        assert headers["content-type"] == full.headers["content-type"]
        if target != "/metrics":         # its counters move between the two calls
            assert int(headers["content-length"]) == len(full.body)
        assert c.response().status == 200       # nothing was left in between


@pytest.mark.parametrize("line,status", [
    (b"HEAD /tot?cred=a HTTP/1.2", 505),
    (b"HEAD /tot?cred=" + b"a" * 3000 + b" HTTP/1.1", 414),
    (b'HEAD /tot?cred="a" HTTP/1.1', 400),
    (b"HEAD /tot?cred=a\rb HTTP/1.1", 400),
    (b"HEAD /tot?cred=a  HTTP/1.1", 400),
])
@pytest.mark.parametrize("bytewise", [False, True])
def test_a_refused_head_request_line_is_answered_without_a_body(shared_server, line,
                                                                status, bytewise):
    """RFC 9112 6.3: a reply to a HEAD ends with its head, whatever its
    Content-Length: a request line refused before it is parsed whole is a
    HEAD's all the same, and bytes after the head would be read as the
    start of a next reply."""
    with shared_server.connect() as c:
        data = line + b"\r\nHost: 127.0.0.1\r\n\r\n"
        if bytewise and status != 414:
            c.send_bytewise(data, stop_on_reply=True)
        else:
            c.send(data)
        out = c.read_all()
    head, sep, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 %d " % status) and sep, out
    assert b"\r\nContent-Length: " in head and body == b"", out


@pytest.mark.parametrize("sent", [b"HEAD /health HTTP/1.1\r\nHost: 127.0.0.1\r\n", b"HEA",
                                  b"\r\nH"])
def test_a_head_cut_by_the_head_deadline_is_answered_without_a_body(start_server, sent):
    """Cut in its headers, or in its method (no other begins with H)."""
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "0.3"})
    with s.connect() as c:
        c.send(sent)
        out = c.read_all()
    head, sep, body = out.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 408 ") and sep and body == b"", out


@pytest.mark.parametrize("pipeline_max", ["64", "1"])
def test_a_head_held_back_at_shutdown_is_answered_without_a_body(start_server, pipeline_max):
    """A stop answers the request it holds back (here behind a long poll of
    /events, which later requests wait for) with a 503: a HEAD's ends with
    its head, as every reply to a HEAD does; parsed (held back) or not yet
    (past PIPELINE_REQUESTS_MAX, unparsed)."""
    s = start_server(env={"ACCMAN_PIPELINE_REQUESTS_MAX": pipeline_max})
    with s.connect() as c:
        c.send(get("/health") + get("/events?after=0&wait=30")
               + request_bytes("HEAD", "/health"))
        assert c.response().status == 200       # all three were read
        s.send_signal(signal.SIGTERM)
        out = c.read_all(10)
    assert s.proc.wait(15) == 0
    assert b"HTTP/1.1 503 " in out, out
    head, sep, body = out[out.index(b"HTTP/1.1 503 "):].partition(b"\r\n\r\n")
    assert sep and body == b"", out


def test_head_of_a_patch_route_is_405_without_a_body(shared_server):
    with shared_server.connect() as c:
        c.send(request_bytes("HEAD", "/mod?cred=a&by=1") + get("/health"))
        status, headers = head_only(c)
        assert status == 405 and headers["allow"] == "PATCH, OPTIONS"
        assert c.response().status == 200


# --- OPTIONS -------------------------------------------------------------------------------

@pytest.mark.parametrize("target,allow", [("/tot", "GET, HEAD, OPTIONS"),
                                          ("/mod", "PATCH, OPTIONS"),
                                          ("/health", "GET, HEAD, OPTIONS"),
                                          ("*", "GET, HEAD, PATCH, OPTIONS")])
def test_options_is_204_with_allow(shared_server, target, allow):
    with shared_server.connect() as c:
        c.send(request_bytes("OPTIONS", target) + get("/health"))
        r = c.response()
        assert r.status == 204 and r.headers["allow"] == allow and r.body == b""
        assert "content-length" not in r.headers      # RFC 9110 8.6: none in a 204
        assert c.response().status == 200


def test_options_of_an_unknown_path_is_404(shared_server):
    assert_error(shared_server.request("OPTIONS", "/nope"), 404, "not_found")


# --- Expect: 100-continue ---------------------------------------------------------------------

def test_expect_100_continue_is_answered_at_once(shared_server, cred):
    """curl sends Expect: 100-continue with a body and waits a second for
    it; the server answers 100 Continue at once, then the request."""
    shared_server.mod(cred, 10)
    with shared_server.connect() as c:
        c.send(request_bytes("PATCH", f"/mod?cred={cred}&by=-1",
                             [("Expect", "100-continue"), ("Content-Length", "2")]))
        t0 = time.monotonic()
        while b"\r\n\r\n" not in c.buf:
            c._fill()
        assert c.buf.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        assert time.monotonic() - t0 < 5     # not the 10 s head deadline
        c.buf = c.buf[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        c.send(b"{}")
        assert c.response().json == {"tot": 9, "seq": 2}


def test_a_100_continue_follows_the_replies_owed_before_it(shared_server, cred):
    shared_server.mod(cred, 10)
    with shared_server.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=-1")
               + request_bytes("PATCH", f"/mod?cred={cred}&by=-2",
                               [("Expect", "100-continue"), ("Content-Length", "2")]))
        assert c.response().json == {"tot": 9, "seq": 2}
        while b"\r\n\r\n" not in c.buf:
            c._fill()
        assert c.buf.startswith(b"HTTP/1.1 100 Continue\r\n\r\n")
        c.buf = c.buf[len(b"HTTP/1.1 100 Continue\r\n\r\n"):]
        c.send(b"{}")
        assert c.response().json == {"tot": 7, "seq": 3}


CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


def take_continue(c) -> float:
    """Reads the 100 Continue the server owes next; returns when it came."""
    while len(c.buf) < len(CONTINUE):
        c._fill()
    assert c.buf.startswith(CONTINUE), c.buf
    c.buf = c.buf[len(CONTINUE):]
    return time.monotonic()


def cut_after(c, continued_at) -> float:
    """The connection closes with a 408 alone: the seconds since the 100."""
    c.closed_by_peer(15)
    waited = time.monotonic() - continued_at
    assert [r.status for r in parse_responses(c.buf)] == [408], c.buf
    return waited


def behind_a_long_poll(c, s, cred, poll_s):
    """Sends a long poll that ends after `poll_s` and, behind it, the head of
    a charge of 1 that asks for 100 Continue; returns once the poll's reply
    and the 100 are in, and the time the 100 came."""
    s.mod(cred, 10)
    newest = s.get("/events?after=0").json["next"]
    c.send(get(f"/events?after={newest}&wait={poll_s}")
           + request_bytes("PATCH", f"/mod?cred={cred}&by=-1",
                           [("Expect", "100-continue"), ("Content-Length", "2")]))
    assert c.response().json["events"] == []
    return take_continue(c)


def test_a_100_continue_held_behind_a_long_poll_does_not_run_the_head_deadline(
        start_server, cred):
    """A client that waits for its 100 Continue before it sends the body
    cannot send it while the server holds the 100 behind an earlier reply:
    the head deadline (1 s here) does not run meanwhile (a poll of 3 s)."""
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "1"})
    with s.connect() as c:
        behind_a_long_poll(c, s, cred, 3)
        c.send(b"{}")
        r = c.response()
        assert (r.status, r.json) == (200, {"tot": 9, "seq": 2}), r


def test_the_head_deadline_runs_again_from_a_held_100_continue(start_server, cred):
    """Once the 100 is out, the body has the head deadline from then: one
    that never comes is cut, not at once (the time the 100 was held is not
    counted), and nothing is applied."""
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "1"})
    with s.connect() as c:
        waited = cut_after(c, behind_a_long_poll(c, s, cred, 3))
        assert parse_responses(c.buf)[0].json["error"] == "timeout"
    assert 0.5 < waited < 8, waited
    assert s.tot(cred) == 10


def test_a_slow_head_s_100_continue_gives_the_body_the_whole_head_deadline(
        start_server, cred):
    """A 100 sent at once still comes only once the head is whole: the
    body's deadline runs from it.  The head takes 1.6 s of the 3 s
    deadline, the body comes 2.2 s after the 100 (3.8 s after the head
    began, 0.8 s past the deadline from the first byte: more than the
    server's sweep interval, 0.75 s here, so that a sweep would see it)."""
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "3"})
    s.mod(cred, 10)
    head = request_bytes("PATCH", f"/mod?cred={cred}&by=-1",
                         [("Expect", "100-continue"), ("Content-Length", "2")])
    with s.connect() as c:
        step = -(-len(head) // 5)
        for i in range(0, len(head), step):
            time.sleep(0.4 if i else 0)
            c.send(head[i:i + step])
        take_continue(c)
        time.sleep(2.2)
        c.send(b"{}")
        r = c.response()
        assert (r.status, r.json) == (200, {"tot": 9, "seq": 2}), r


def head_timeouts(s) -> int:
    """The server's count of connections cut by HEAD_TIMEOUT_S (/metrics)."""
    for line in s.get("/metrics").body.decode().splitlines():
        if line.startswith("accman_head_timeouts_total "):
            return int(line.split()[1])
    raise AssertionError("no accman_head_timeouts_total in /metrics")


def cut_behind_the_poll(c, s, within_s, why):
    """The head deadline runs out within `within_s` (counted in /metrics)
    while a long poll is owed; then the poll's reply, with no events, and
    the 408, and the connection closes."""
    deadline = time.monotonic() + within_s
    while head_timeouts(s) == 0:
        assert time.monotonic() < deadline, why
        time.sleep(0.1)
    c.closed_by_peer(10)
    replies = parse_responses(c.buf)
    assert [r.status for r in replies] == [200, 408], c.buf
    assert replies[0].json["events"] == [], replies[0].json


@pytest.mark.any_one_store("the head deadline is the connection's, whatever the store")
def test_a_head_after_a_100_continue_s_request_has_its_own_deadline(start_server, cred):
    """The request that asked for the 100 (an /events long poll of 6 s,
    with a body) ends in the read that begins the next one: that next
    head's deadline (1 s) runs from that read, not held off by the 100 of
    the request before it until the poll ends.  Its 100 waits behind a mod
    (on the embedded store answered in C with the batch's completion)."""
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "1"})
    with s.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=1")
               + request_bytes("GET", "/events?after=1&wait=6",
                               [("Expect", "100-continue"), ("Content-Length", "1")]))
        assert c.response().status == 200
        take_continue(c)
        c.send(b"x" + get(f"/tot?cred={cred}")[:20])
        # The poll (the mod's event, 1, was the newest) is answered, then the 408.
        cut_behind_the_poll(c, s, 4, "the next head ran no deadline")


def test_a_head_begun_in_the_read_that_ends_a_request_has_its_whole_deadline(
        start_server):
    """The deadline (2 s) of a head that begins in the read that ends the
    request before it runs from that read: the second head takes 1.4 s and
    is served, though it ends 2.6 s after the first head began."""
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "2"})
    with s.connect() as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        time.sleep(1.2)
        c.send(b"\r\nGET /health HTTP/1.1\r\n")
        time.sleep(1.4)
        c.send(b"Host: 127.0.0.1\r\n\r\n")
        assert [r.status for r in c.responses(2)] == [200, 200]


def test_a_head_begun_while_reading_is_paused_has_its_deadline_after_the_resume(
        start_server, cred):
    """A head cut short in bytes held while reading is paused (a pipeline
    of 2, full with a mod and a long poll of 4 s) is parsed once the mod's
    reply makes room, and reading resumes: its deadline (1 s) runs from
    the resume, though the poll's reply is still owed, not left until the
    poll ends and then to the idle time (75 s).  The 408 follows the
    poll's reply."""
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "1", "ACCMAN_PIPELINE_REQUESTS_MAX": "2"})
    with s.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=1") + get("/events?after=1&wait=4")
               + get(f"/tot?cred={cred}")[:20])
        assert c.response().status == 200
        cut_behind_the_poll(c, s, 3, "the head ran no deadline after the resume")


@pytest.mark.any_one_store("the head deadline is the connection's, whatever the store")
def test_a_100_continue_sent_once_reading_resumes_starts_the_body_s_deadline(
        start_server, cred):
    """A head held back behind a long poll (reading paused) gets its 100
    when the poll ends and reading resumes: its body's deadline (1 s) runs
    from there, cut with 408, not left to the idle time (8 s)."""
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "1", "ACCMAN_IDLE_TIMEOUT_S": "8"})
    s.mod(cred, 10)
    newest = s.get("/events?after=0").json["next"]
    with s.connect() as c:
        c.send(get(f"/events?after={newest}&wait=2") + get("/health")
               + request_bytes("PATCH", f"/mod?cred={cred}&by=-1",
                               [("Expect", "100-continue"), ("Content-Length", "2")]))
        assert [r.status for r in c.responses(2)] == [200, 200]
        waited = cut_after(c, take_continue(c))
    assert 0.5 < waited < 5, waited
    assert s.tot(cred) == 10


def test_a_100_continue_written_with_a_batch_s_replies_starts_the_body_s_deadline(
        start_server, cred):
    """A 100 queued behind mods filling the pipeline (reading paused, then
    resumed by the first batch, which zeroes the head clock) goes out with
    a later batch's replies, written in C: the body's deadline (1 s) still
    runs from it, a 408 and not the idle time (6 s)."""
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "1", "ACCMAN_IDLE_TIMEOUT_S": "6"})
    s.mod(cred, 1000)
    with s.connect() as c:
        c.send(b"".join(patch(f"/mod?cred={cred}&by=-1") for _ in range(62)))
        time.sleep(0.0005)
        c.send(patch(f"/mod?cred={cred}&by=-1")
               + request_bytes("PATCH", f"/mod?cred={cred}&by=-1",
                               [("Expect", "100-continue"), ("Content-Length", "2")]))
        assert [r.status for r in c.responses(63)] == [200] * 63
        waited = cut_after(c, take_continue(c))
    assert waited < 4, waited
    assert s.tot(cred) == 1000 - 63


def test_no_100_continue_once_the_connection_takes_nothing_more(start_server, cred):
    """A `Connection: close` request before it ends the connection: the
    request after it is never read, and asks for no body."""
    s = start_server()
    with s.connect() as c:
        c.send(get("/events?after=0&wait=1")
               + request_bytes("GET", "/health", [("Connection", "close")])
               + request_bytes("PATCH", f"/mod?cred={cred}&by=1",
                               [("Expect", "100-continue"), ("Content-Length", "2")]))
        assert c.closed_by_peer(10)
        assert b"100 Continue" not in c.buf, c.buf
        assert [r.status for r in parse_responses(c.buf)] == [200, 200]


def test_a_stop_withdraws_a_100_continue_held_behind_a_long_poll(start_server, cred):
    """A stop takes no body more: the 100 waiting behind a long poll is not
    sent, and its request, whole but for its body, is answered `503
    shutting_down` after the poll's reply (ended by the stop), as a request
    held back is; nothing is applied."""
    s = start_server()
    s.mod(cred, 10)
    newest = s.get("/events?after=0").json["next"]
    with s.connect() as c:
        c.send(get(f"/events?after={newest}&wait=30")
               + request_bytes("PATCH", f"/mod?cred={cred}&by=-1",
                               [("Expect", "100-continue"), ("Content-Length", "2")]))
        time.sleep(1)               # both read: the 100 waits behind the poll
        assert s.stop() == 0
        assert c.closed_by_peer(10)
    assert CONTINUE not in c.buf, c.buf
    replies = parse_responses(c.buf)
    assert [r.status for r in replies] == [200, 503], c.buf
    assert replies[0].json["events"] == [] and replies[1].json["error"] == "shutting_down"
    assert start_server().tot(cred) == 10


@pytest.mark.any_one_store("the stop's rules for a connection are the same whatever the store")
@pytest.mark.parametrize("begun", ["head", "HEAD's head", "HEAD's method", "body after its 100"])
def test_a_request_begun_when_a_stop_comes_is_answered_503(start_server, cred, begun):
    """Its rest is not read: a head cut short, or a body one byte short
    after its 100 Continue, gets `503 shutting_down` and the connection's
    close, not a bare close (a HEAD's without a body); nothing is applied."""
    s = start_server()
    s.mod(cred, 10)
    with s.connect() as c:
        if begun == "body after its 100":
            c.send(request_bytes("PATCH", f"/mod?cred={cred}&by=-1",
                                 [("Expect", "100-continue"), ("Content-Length", "2")]))
            take_continue(c)
            c.send(b"{")
        elif begun == "HEAD's method":
            c.send(b"HEA")
        else:
            method = "HEAD" if begun == "HEAD's head" else "PATCH"
            c.send(request_bytes(method, f"/mod?cred={cred}&by=-1")[:30])
        time.sleep(1)               # read before the stop
        assert s.stop() == 0
        assert c.closed_by_peer(10)
    if begun.startswith("HEAD's"):
        status, headers = head_only(c)
        assert (status, c.buf) == (503, b""), c.buf
    else:
        [reply] = parse_responses(c.buf)
        status, headers = reply.status, reply.headers
        assert reply.json["error"] == "shutting_down", c.buf
    assert (status, headers["connection"]) == (503, "close"), c.buf
    assert start_server().tot(cred) == 10


@pytest.mark.any_one_store("the stop's rules for a connection are the same whatever the store")
def test_a_stop_lingers_after_its_503_so_late_bytes_reset_nothing(start_server, cred):
    """The client of a request begun may go on sending after the stop's
    503 (its body, more requests): the server closes as after any reply,
    a FIN, then reading and discarding, so the late bytes cannot make the
    kernel reset the connection (which can destroy the 503 unread).  The
    stop waits for it: the client's close ends it."""
    s = start_server(env={"ACCMAN_LINGER_S": "30"})
    s.mod(cred, 10)
    with s.connect() as c:
        c.send(request_bytes("PATCH", f"/mod?cred={cred}&by=-1",
                             [("Expect", "100-continue"), ("Content-Length", "2")]))
        take_continue(c)
        c.send(b"{")
        time.sleep(1)               # read before the stop
        s.proc.send_signal(signal.SIGTERM)
        r = c.response()
        assert (r.status, r.json["error"]) == (503, "shutting_down")
        assert c.sock.recv(1) == b""                # its FIN
        for _ in range(5):
            # Late, read and discarded; after a reset a send fails (EPIPE).
            c.send(b"}" + get("/health") * 100)
            time.sleep(0.1)
        assert s.proc.poll() is None                # the stop waits for the lingering
    assert s.proc.wait(5) == 0                      # the client's close ends it
    assert start_server().tot(cred) == 10


@pytest.mark.any_one_store("the stop's rules for a connection are the same whatever the store")
def test_a_stop_closes_a_quiet_connection_once_its_reply_is_taken(start_server, cred):
    """A reply handed to the kernel and not yet taken by its slow client (a
    4 KB receive buffer, unread): the stop neither closes the connection
    at once, which a request the client sent next would turn into a reset
    dropping the reply, nor holds it for LINGER_S: it closes once the
    client has read and acknowledged all of it.  (A keep-alive connection
    used just before a stop is the same, for its client's delayed ACK.)"""
    s = start_server(env={"ACCMAN_LINGER_S": "30"})
    with_history(s, cred, 100)
    with s.connect(rcvbuf=4096) as c:
        c.send(get(f"/past?cred={cred}&limit=100"))
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        assert s.proc.poll() is None                # the reply is not all taken yet
        replies = read_to_the_end(c)
        assert s.proc.wait(5) == 0                  # closed by the server, not the client
    assert [(r.status, len(r.json["past"])) for r in replies] == [(200, 100)]


@pytest.mark.any_one_store("the stop's rules for a connection are the same whatever the store")
def test_a_stop_lingers_where_replies_are_still_in_the_kernel(start_server, cred):
    """Every reply handed to the kernel, none read yet by a slow client,
    which sends its next request after the stop: had the stop closed at
    once, that request would make the close a reset, which drops the
    replies still in the kernel.  It lingers: the replies arrive whole."""
    s = start_server()
    with_history(s, cred, 1000)
    with s.connect(rcvbuf=4096) as c:
        c.send(get(f"/past?cred={cred}&limit=1000") * 3)
        time.sleep(0.5)
        s.proc.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        c.send(get("/health"))              # late: read and discarded
        replies = read_to_the_end(c)
    assert [(r.status, len(r.json["past"])) for r in replies] == [(200, 1000)] * 3
    assert s.proc.wait(5) == 0


@pytest.mark.any_one_store("the stop's rules for a connection are the same whatever the store")
def test_a_stop_closes_an_idle_connection_without_lingering(start_server):
    """Nothing owed nor begun, every reply sent: it is closed at once, and
    a client that keeps it open does not hold the stop."""
    s = start_server(env={"ACCMAN_LINGER_S": "30"})
    with s.connect() as c:
        c.send(get("/health"))
        assert c.response().status == 200
        assert s.stop(timeout=5) == 0
        assert c.closed_by_peer(5)


def test_blank_lines_held_at_a_stop_are_no_request(start_server):
    """Bytes held back by the pipeline cap that are only blank lines hold
    no request: the stop answers the poll before them and closes, with no
    503 for a request nobody made."""
    s = start_server(env={"ACCMAN_PIPELINE_REQUESTS_MAX": "1"})
    newest = s.get("/events?after=0").json["next"]
    with s.connect() as c:
        c.send(get(f"/events?after={newest}&wait=30") + b"\r\n")
        time.sleep(1)               # read before the stop
        assert s.stop() == 0
        assert c.closed_by_peer(10)
    assert [r.status for r in parse_responses(c.buf)] == [200], c.buf


def test_a_body_read_with_its_head_gets_its_final_reply_alone(start_server, cred):
    """The 100 Continue asks for a body the server does not have: one that
    came with its head, in the same read, has nothing left to ask for, and
    its request gets its final reply alone (RFC 9110 10.1.1 lets a server
    omit the 100 once it has the content; docs/SERVER.md).  One write is no
    promise of one read: the server is stopped (SIGSTOP) while the request
    goes out, and resumed only once the server's kernel has acknowledged
    every byte of it, so that its first read of the connection takes head
    and body together (a read of TCP takes all that is queued, up to its
    buffer)."""
    s = start_server()
    s.mod(cred, 10)
    with s.connect() as c:
        s.send_signal(signal.SIGSTOP)
        try:
            wait_state(s.pid, "T")
            c.send(request_bytes("PATCH", f"/mod?cred={cred}&by=-1",
                                 [("Expect", "100-continue"), ("Content-Length", "2")]) + b"{}")
            wait_all_acknowledged(c.sock)
        finally:
            s.send_signal(signal.SIGCONT)
        r = c.response()
        assert r.status == 200 and r.json == {"tot": 9, "seq": 2}


def wait_state(pid, state):
    """Until the process `pid` is in `state` (/proc's: "T" stopped)."""
    deadline = time.monotonic() + 30
    while True:
        with open(f"/proc/{pid}/stat") as f:
            if f.read().rpartition(")")[2].split()[0] == state:
                return
        assert time.monotonic() < deadline, f"process {pid} never reached state {state}"
        time.sleep(0.001)


def wait_all_acknowledged(sock):
    """Until the peer's kernel has acknowledged every byte sent on `sock`
    (Linux's SIOCOUTQ, TIOCOUTQ's number: the bytes sent and not yet
    acknowledged), so that they are all in the peer's receive queue."""
    deadline = time.monotonic() + 30
    while (unsent := unsent_bytes(sock)) != 0:
        assert unsent is not None, "the kernel does not say what is unacknowledged"
        assert time.monotonic() < deadline, "the bytes sent were never acknowledged"
        time.sleep(0.001)


def test_httpx_and_curl_style_bodies_cost_no_wait(shared_server, cred):
    shared_server.mod(cred, 10)
    with httpx.Client(base_url=shared_server.url) as client:
        t0 = time.monotonic()
        r = client.patch(f"/mod?cred={cred}&by=-1", content=b"{}",
                         headers={"Expect": "100-continue"})
        assert r.status_code == 200 and r.json() == {"tot": 9, "seq": 2}
        assert time.monotonic() - t0 < 5


# --- the absolute form, and a body without a length -------------------------------------------

def test_an_absolute_target_naming_this_server_is_served(shared_server, cred):
    shared_server.mod(cred, 3)
    with shared_server.connect() as c:
        c.send(request_bytes("GET", f"http://127.0.0.1:{shared_server.port}/tot?cred={cred}"))
        assert c.response().json == {"tot": 3}


def test_a_chunked_body_is_411_and_the_connection_closes(shared_server):
    with shared_server.connect() as c:
        c.send(request_bytes("PATCH", "/mod?cred=a&by=1", [("Transfer-Encoding", "chunked")])
               + b"0\r\n\r\n")
        r = c.response()
        assert_error(r, 411, "length_required")
        assert r.headers["connection"] == "close" and c.closed_by_peer(5)


@pytest.mark.parametrize("target", ["tot?cred={cred}", "*", "http://u@127.0.0.1/tot?cred={cred}"])
def test_a_malformed_target_is_a_framing_error_and_nothing_after_it_applies(shared_server,
                                                                             cred, target):
    """SPEC "Errors": a malformed request line is a framing error, answered
    and closed; a mod pipelined behind it is not applied."""
    shared_server.mod(cred, 5)
    with shared_server.connect() as c:
        c.send(get(target.format(cred=cred)) + patch(f"/mod?cred={cred}&by=-1"))
        r = c.response()
        assert_error(r, 400, "bad_request")
        assert r.headers["connection"] == "close" and c.closed_by_peer(5)
    assert shared_server.tot(cred) == 5


def test_blank_lines_do_not_hold_a_connection(shared_server):
    """REQUEST_BLANK_LINES_MAX: a CRLF now and then never starts a request
    (nor its deadline), so past the bound the connection is closed."""
    from accman.limits import REQUEST_BLANK_LINES_MAX
    with shared_server.connect() as c:
        for _ in range(REQUEST_BLANK_LINES_MAX):
            c.send(b"\r\n")
        assert not c.closed_by_peer(0.3)
        c.sock.settimeout(10)
        c.send(b"\r\n")
        r = c.response()
        assert_error(r, 400, "bad_request")
        assert "blank lines" in r.json["detail"] and c.closed_by_peer(5)


def test_a_tls_hello_is_refused_at_once(shared_server):
    """A first byte no method starts with (TLS to a plain-HTTP port) is a
    400 at once, not a 408 when the head's deadline ends."""
    with shared_server.connect() as c:
        c.send(b"\x16\x03\x01\x00\xa5\x01\x00\x00\xa1\x03\x03")
        r = c.response()
        assert_error(r, 400, "bad_request")
        assert "not an HTTP request" in r.json["detail"] and c.closed_by_peer(5)


# --- pipelined order (RFC 9112 9.3.2) ------------------------------------------------------------

def test_a_pipelined_read_sees_exactly_the_writes_before_it(shared_server, cred):
    """Issue 11, item 1: mod +10, tot, mod -3, tot in one send answered
    10, 10, 7, 7 (the first tot read the balance after the second mod)."""
    with shared_server.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=10") + get(f"/tot?cred={cred}")
               + patch(f"/mod?cred={cred}&by=-3") + get(f"/tot?cred={cred}"))
        got = [r.json["tot"] for r in replies(c, 4)]
    assert got == [10, 10, 7, 7]


def test_a_pipelined_past_sees_exactly_the_writes_before_it(shared_server, cred):
    with shared_server.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=5") + get(f"/past?cred={cred}")
               + patch(f"/mod?cred={cred}&by=1") + get(f"/past?cred={cred}")
               + get(f"/tot?cred={cred}"))
        r = replies(c, 5)
    assert [e["seq"] for e in r[1].json["past"]] == [1]
    assert [e["seq"] for e in r[3].json["past"]] == [2, 1]
    assert r[4].json == {"tot": 6}


def test_pipelined_reads_of_a_new_account_behind_its_funding(shared_server, cred):
    """The account exists for the read only through the mod before it."""
    with shared_server.connect() as c:
        c.send(get(f"/tot?cred={cred}") + patch(f"/mod?cred={cred}&by=4")
               + get(f"/tot?cred={cred}") + get(f"/past?cred={cred}"))
        r = replies(c, 4)
    assert r[0].status == 404 and r[1].json == {"tot": 4, "seq": 1}
    assert r[2].json == {"tot": 4} and len(r[3].json["past"]) == 1


def test_many_pipelined_mods_and_reads_in_one_send(shared_server, cred):
    """Mods keep batching together: every read shows the running sum."""
    shared_server.mod(cred, 1000)
    parts, expect, tot = [], [], 1000
    for i in range(1, 40):
        tot -= i
        parts.append(patch(f"/mod?cred={cred}&by=-{i}"))
        parts.append(get(f"/tot?cred={cred}"))
        expect += [tot, tot]
    with shared_server.connect() as c:
        c.send(b"".join(parts))
        got = [r.json["tot"] for r in replies(c, len(parts))]
    assert got == expect


# --- protected mode: no tokens, loopback only ----------------------------------------

@pytest.mark.parametrize("host", ["evil.example", "evil.example:8080", "10.0.0.1",
                                  "127.0.0.1.nip.io", "", "evil.example:", "[::1:0]"])
def test_without_tokens_a_non_loopback_host_is_refused(shared_server, cred, host):
    """SPEC "Access": a page served from another name, rebound by DNS to
    127.0.0.1, cannot move money: its requests carry that name as Host."""
    shared_server.mod(cred, 5)
    for method, target in (("PATCH", f"/mod?cred={cred}&by=-5"), ("GET", f"/tot?cred={cred}"),
                           ("GET", "/health")):
        with shared_server.connect() as c:
            c.send(request_bytes(method, target, [("Host", host)]))
            assert_error(c.response(), 403, "forbidden")
    assert shared_server.tot(cred) == 5


@pytest.mark.parametrize("host", ["127.0.0.1", "localhost:9", "LOCALHOST", "[::1]:80",
                                  "127.8.9.10", "127.0.0.1:", "[0:0:0:0:0:0:0:1]",
                                  "[0::1]:80"])
def test_without_tokens_a_loopback_host_is_served(shared_server, host):
    with shared_server.connect() as c:
        c.send(request_bytes("GET", "/health", [("Host", host)]))
        assert c.response().status == 200


def test_an_ipv6_loopback_server_serves_its_own_host(start_server):
    s = start_server(host="::1")
    with s.connect() as c:
        c.send(request_bytes("GET", "/health", [("Host", f"[::1]:{s.port}")]))
        assert c.response().status == 200
