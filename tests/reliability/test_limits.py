"""Every named limit of accman/limits.py that the server enforces, reached
over the wire, with the answer docs/SERVER.md documents for it (SPEC
"Limits": an error or back-pressure, never a crash or unbounded memory).

Each limit is reached exactly where that matters (at the limit: served;
one over: refused), with small overrides (ACCMAN_<NAME>) where the default
would take long to reach.  BATCH_MODS_MAX and QUEUED_MODS_MAX belong to the
ledger; they are reached through tests/reliability/controlled_serve.py,
whose store can hold commits (a stalled disk), so that mods pile up.

tests/test_server.py has the first tests of the timeouts and caps; these
go further: the edges, what a limit must not do (cut a connection that is
owed a reply), and that everyone else is still served meanwhile.
"""

import select
import signal
import time

import pytest

from accman import limits as L
from conftest import assert_error, get, parse_responses, patch, spawn_server
import relhelp
from relhelp import history, metrics

controlled = relhelp.controlled      # a fixture: relhelp's, registered here


def read_until_closed(c, timeout_s=10.0):
    """Every reply until the server closes the connection."""
    assert c.closed_by_peer(timeout_s), "the server did not close the connection"
    return parse_responses(c.buf)


# --- values: CRED_CHARS_MAX, KEY_CHARS_MAX, the int64 range ---------------------------

def test_cred_and_key_at_their_limits_and_one_over(shared_server):
    cred = "c" * L.CRED_CHARS_MAX
    key = "k" * L.KEY_CHARS_MAX
    r = shared_server.mod(cred, 5, key=key)
    assert r.json == {"tot": 5, "seq": 1}
    assert shared_server.mod(cred, 5, key=key).json == {"tot": 5, "seq": 1}   # replayed
    assert shared_server.tot(cred) == 5
    assert history(shared_server, cred)[0]["key"] == key
    for target in (f"/mod?cred={cred}c&by=5", f"/tot?cred={cred}c", f"/past?cred={cred}c"):
        method = "PATCH" if target.startswith("/mod") else "GET"
        assert "cred" in assert_error(shared_server.request(method, target), 400)["detail"]
    r = shared_server.mod(cred, 5, key=key + "k")
    assert "key" in assert_error(r, 400)["detail"]
    assert shared_server.tot(cred) == 5


def test_amounts_at_the_int64_edges_and_one_over(shared_server, cred):
    assert shared_server.mod(cred + "-max", L.INT64_MAX).json == {"tot": L.INT64_MAX, "seq": 1}
    assert shared_server.mod(cred + "-min", 1).status == 200      # only funding opens one
    assert shared_server.mod(cred + "-min", L.INT64_MIN + 1).status == 200
    assert shared_server.mod(cred + "-min", -2).json == {"tot": L.INT64_MIN, "seq": 3}
    assert shared_server.mod(cred, 1, min=L.INT64_MIN).status == 200
    assert_error(shared_server.mod(cred, 1, min=L.INT64_MAX), 409, "insufficient")
    for name, query in (("by", f"by={L.INT64_MAX + 1}"), ("by", f"by={L.INT64_MIN - 1}"),
                        ("min", f"by=1&min={L.INT64_MAX + 1}"),
                        ("min", f"by=1&min={L.INT64_MIN - 1}")):
        r = shared_server.patch(f"/mod?cred={cred}&{query}")
        assert name in assert_error(r, 400)["detail"]
    assert shared_server.tot(cred) == 1
    # The balance too: a mod that would leave the range changes nothing.
    assert_error(shared_server.mod(cred + "-max", 1), 409, "overflow")
    assert_error(shared_server.mod(cred + "-min", -1), 409, "overflow")
    assert shared_server.tot(cred + "-max") == L.INT64_MAX


# --- /past pages: PAST_LIMIT_DEFAULT, PAST_LIMIT_MAX ----------------------------------

def test_past_pages_at_their_default_and_their_maximum(shared_server, cred):
    n = L.PAST_LIMIT_MAX + 5
    with shared_server.connect(timeout=60) as c:
        c.send(b"".join(patch(f"/mod?cred={cred}&by={i + 1}") for i in range(n)))
        seqs = [c.response().json["seq"] for _ in range(n)]
    assert seqs == list(range(1, n + 1))
    page = shared_server.get(f"/past?cred={cred}").json
    assert len(page["past"]) == L.PAST_LIMIT_DEFAULT
    assert page["past"][0]["seq"] == n and page["next"] == n - L.PAST_LIMIT_DEFAULT + 1
    page = shared_server.get(f"/past?cred={cred}&limit={L.PAST_LIMIT_MAX}").json
    assert [e["seq"] for e in page["past"]] == list(range(n, n - L.PAST_LIMIT_MAX, -1))
    rest = shared_server.get(f"/past?cred={cred}&limit={L.PAST_LIMIT_MAX}"
                             f"&before={page['next']}").json
    assert [e["seq"] for e in rest["past"]] == [5, 4, 3, 2, 1] and rest["next"] is None
    r = shared_server.get(f"/past?cred={cred}&limit={L.PAST_LIMIT_MAX + 1}")
    assert "limit" in assert_error(r, 400)["detail"]


# --- the parser's limits: request line, header bytes and lines, body ------------------

def line_of(length):
    """A request line of exactly `length` bytes (CRLF not counted): a 404."""
    fixed = len(b"GET / HTTP/1.1")
    return b"GET /" + b"a" * (length - fixed) + b" HTTP/1.1"


def test_request_line_at_its_limit_and_one_over(shared_server):
    with shared_server.connect() as c:
        c.send(line_of(L.REQUEST_LINE_BYTES_MAX) + b"\r\nHost: 127.0.0.1\r\n\r\n")
        assert_error(c.response(), 404, "not_found")         # served; the connection stays
        c.send(get("/health"))
        assert c.response().status == 200
        c.send(line_of(L.REQUEST_LINE_BYTES_MAX + 1) + b"\r\nHost: 127.0.0.1\r\n\r\n")
        replies = read_until_closed(c)
    assert [r.status for r in replies] == [414]
    assert replies[0].headers["connection"] == "close"


def header_block(total):
    """Host, one padding header and the blank line: `total` bytes in all."""
    pad = total - len(b"Host: 127.0.0.1\r\nX-Pad: \r\n\r\n")
    return b"Host: 127.0.0.1\r\nX-Pad: " + b"p" * pad + b"\r\n\r\n"


def test_header_bytes_at_their_limit_and_one_over(shared_server):
    with shared_server.connect() as c:
        c.send(b"GET /health HTTP/1.1\r\n" + header_block(L.HEADER_BYTES_MAX))
        assert c.response().status == 200
        c.send(b"GET /health HTTP/1.1\r\n" + header_block(L.HEADER_BYTES_MAX + 1))
        replies = read_until_closed(c)
    assert [r.status for r in replies] == [431]


def test_header_lines_at_their_limit_and_one_over(shared_server):
    def head(lines):        # Host and lines - 1 others
        return b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n" + b"X: y\r\n" * (lines - 1) + b"\r\n"

    with shared_server.connect() as c:
        c.send(head(L.HEADERS_MAX))
        assert c.response().status == 200
        c.send(head(L.HEADERS_MAX + 1))
        replies = read_until_closed(c)
    assert [r.status for r in replies] == [431]


def test_body_at_its_limit_and_one_over(shared_server, cred):
    def mod_with_body(n, by):
        return (b"PATCH /mod?cred=%s&by=%d HTTP/1.1\r\nHost: 127.0.0.1\r\n"
                b"Content-Length: %d\r\n\r\n" % (cred.encode(), by, n) + b"b" * n)

    with shared_server.connect() as c:
        c.send(mod_with_body(L.BODY_BYTES_MAX, 3))
        assert c.response().json == {"tot": 3, "seq": 1}        # read and ignored
        c.send(mod_with_body(L.BODY_BYTES_MAX + 1, 4))
        replies = read_until_closed(c)
    assert [r.status for r in replies] == [413]
    assert shared_server.tot(cred) == 3                         # not applied


def test_a_framing_error_reply_survives_the_bytes_sent_after_it(start_server):
    """LINGER_S (accman/limits.py): after a framing error the server sends
    its reply and a FIN, then reads and discards what the client still sends,
    so the client's late bytes cannot turn the close into a reset that
    destroys the reply; and it stops lingering after LINGER_S."""
    s = start_server(env={"ACCMAN_LINGER_S": "0.5"})
    with s.connect() as c:
        c.send(line_of(L.REQUEST_LINE_BYTES_MAX + 1) + b"\r\nHost: 127.0.0.1\r\n\r\n"
               + b"x" * 200_000)
        r = c.response()
        assert r.status == 414 and r.headers["connection"] == "close"
        # A client that goes on sending is cut off once the lingering ends.
        deadline = time.monotonic() + 15
        with pytest.raises(OSError):
            while time.monotonic() < deadline:
                c.sock.sendall(b"y" * 1024)
                time.sleep(0.02)
        assert time.monotonic() < deadline


# --- connections: CONNECTIONS_MAX -----------------------------------------------------

def parse_metrics(body):
    """/metrics samples read off a connection already open (at the cap, a
    new one would be refused)."""
    out = {}
    for line in body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_over_the_connection_cap_every_new_connection_gets_503_and_the_others_are_served(
        start_server):
    cap = 8
    s = start_server(env={"ACCMAN_CONNECTIONS_MAX": str(cap)})
    held = [s.connect() for _ in range(cap)]
    try:
        for c in held:
            c.send(get("/health"))
            assert c.response().status == 200
        extra = [s.connect() for _ in range(3 * cap)]
        for c in extra:
            replies = read_until_closed(c)
            assert [r.status for r in replies] == [503]
            assert replies[0].json["error"] == "busy"
            assert replies[0].headers["connection"] == "close"
            c.close()
        for c in held:                       # the ones in are still served
            c.send(get("/health"))
            assert c.response().status == 200
        c = held.pop()
        c.send(get("/metrics"))
        counters = parse_metrics(c.response().body)
        assert counters["accman_connections_refused_total"] >= 3 * cap
        assert counters["accman_open_connections"] == cap
        c.close()
        deadline = time.monotonic() + 10
        while True:                          # its slot frees once the close is seen
            with s.connect() as c:
                c.send(get("/health"))
                try:
                    if c.response().status == 200:
                        break
                except EOFError:
                    pass
            assert time.monotonic() < deadline, "a freed slot was never reused"
            time.sleep(0.05)
    finally:
        for c in held:
            c.close()


# --- the group commit: BATCH_MODS_MAX, QUEUED_MODS_MAX --------------------------------

def pipeline_mods(srv, creds_and_counts):
    """Open one connection per (cred, count), pipeline `count` mods of by=1 on
    it, and return the connections (replies unread)."""
    conns = []
    for cred, count in creds_and_counts:
        c = srv.connect(timeout=60)
        c.send(b"".join(patch(f"/mod?cred={cred}&by=1") for _ in range(count)))
        conns.append(c)
    return conns


def wait_metric(srv, name, predicate, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while True:
        value = metrics(srv).get(name)
        if value is not None and predicate(value):
            return value
        assert time.monotonic() < deadline, f"{name} = {value}"
        time.sleep(0.02)


def test_a_batch_never_holds_more_than_batch_mods_max(controlled):
    """BATCH_MODS_MAX at its real value: with the disk stalled on a batch of
    one mod, more mods than a batch holds pile up behind it; they are
    committed as one full batch of exactly 4096 and one of the rest, and
    every mod is answered, in order."""
    srv, control = controlled()
    control.hold()
    with srv.connect() as primer:
        primer.send(patch("/mod?cred=primer&by=1"))
        control.wait_holding()                   # the writer holds a batch of one
        per_conn = L.PIPELINE_REQUESTS_MAX - 4
        n_conns = L.BATCH_MODS_MAX // per_conn + 8
        flood = n_conns * per_conn
        assert L.BATCH_MODS_MAX < flood < 2 * L.BATCH_MODS_MAX
        conns = pipeline_mods(srv, [(f"batch-{i}", per_conn) for i in range(n_conns)])
        wait_metric(srv, "accman_queued_mods", lambda v: v == flood + 1)
        control.release()
        assert primer.response().json == {"tot": 1, "seq": 1}
    for c in conns:
        assert [c.response().json["seq"] for _ in range(per_conn)] == list(range(1, per_conn + 1))
        c.close()
    m = metrics(srv)
    assert m["accman_mods_committed_total"] == flood + 1
    rest = flood - L.BATCH_MODS_MAX
    assert m["accman_batches_total"] == 3                        # 1, 4096, the rest
    assert m['accman_batch_size_mods_bucket{le="1"}'] == 1
    assert m['accman_batch_size_mods_bucket{le="1024"}'] == 2    # 1 and the rest
    assert m['accman_batch_size_mods_bucket{le="4096"}'] == 3    # and the full one
    assert m["accman_last_batch_mods"] == rest


def test_over_queued_mods_max_a_mod_is_503_busy_and_nothing_else_suffers(controlled, cred):
    """QUEUED_MODS_MAX (set to 100 through the ledger: at 65536 it takes a
    thousand connections to reach): the mods over it are refused at once
    with 503 busy, change nothing, and the server takes mods again as soon
    as the disk catches up; it never stops taking writes for it."""
    srv, control = controlled(queued_mods_max=100)
    control.hold()
    conns = pipeline_mods(srv, [(f"{cred}-{i}", 50) for i in range(3)])
    control.wait_holding()
    wait_metric(srv, "accman_queued_mods", lambda v: v == 100)
    assert srv.get("/health").status == 200              # back-pressure, not failure
    control.release()
    statuses = []
    for c in conns:
        replies = c.responses(50)
        statuses += [r.status for r in replies]
        for r in replies:
            if r.status == 503:
                assert r.json["error"] == "busy"
        c.close()
    assert statuses.count(200) == 100 and statuses.count(503) == 50
    tots = [srv.tot(f"{cred}-{i}") for i in range(3)]
    assert sum(t for t in tots if isinstance(t, int)) == 100    # the 503s changed nothing
    assert srv.mod(cred, 1).status == 200


# --- per connection: PIPELINE_REQUESTS_MAX, WRITE_BUFFER_BYTES_MAX --------------------

def test_pipelining_over_the_cap_stops_the_server_reading(controlled, cred):
    """PIPELINE_REQUESTS_MAX is back-pressure: with 4 unanswered (their
    batch held), the server takes no fifth request from that connection,
    so no fifth mod is applied; once the batch is durable it takes the
    rest, in order."""
    srv, control = controlled(env={"ACCMAN_PIPELINE_REQUESTS_MAX": "4"})
    control.hold()
    with srv.connect(timeout=30) as c:
        c.send(b"".join(patch(f"/mod?cred={cred}&by={i + 1}") for i in range(12)))
        control.wait_holding()
        wait_metric(srv, "accman_queued_mods", lambda v: v >= 4)
        time.sleep(0.3)                     # time for a fifth, were it taken
        assert metrics(srv)["accman_queued_mods"] == 4
        assert srv.get(f"/tot?cred={cred}").status == 404   # nothing durable yet
        control.release()
        replies = c.responses(12)
    assert [r.json["seq"] for r in replies] == list(range(1, 13))
    assert srv.tot(cred) == sum(range(1, 13))


def test_a_client_that_never_reads_is_paused_then_dropped(start_server, cred):
    """WRITE_BUFFER_BYTES_MAX: a client that sends and never reads fills the
    server's reply buffer; the server stops reading it (its sends stall),
    keeps serving the others, and drops it after IDLE_TIMEOUT_S without
    progress."""
    s = start_server(env={"ACCMAN_WRITE_BUFFER_BYTES_MAX": "16384",
                          "ACCMAN_IDLE_TIMEOUT_S": "1.5"})
    s.mod(cred, 1)
    request = get("/metrics")
    c = s.connect()
    try:
        c.sock.setblocking(False)
        stalled_since = None
        deadline = time.monotonic() + 30
        while True:
            try:
                c.sock.send(request * 64)
                stalled_since = None
            except BlockingIOError:
                stalled_since = stalled_since or time.monotonic()
                if time.monotonic() - stalled_since > 0.3:
                    break               # the server stopped reading this socket
                time.sleep(0.01)
            assert time.monotonic() < deadline, "the server kept reading a client that never reads"
        assert s.get("/health").status == 200               # others are served
        wait_metric(s, "accman_idle_closes_total", lambda v: v >= 1)
        # Gone: what is left to read is what the kernel buffered, then the end.
        c.sock.setblocking(True)
        c.sock.settimeout(10)
        received = 0
        try:
            while chunk := c.sock.recv(1 << 20):
                received += len(chunk)
                assert received < 64 << 20, "the server is still sending"
        except ConnectionResetError:
            pass
    finally:
        c.close()


def test_a_client_that_never_reads_big_replies_does_not_grow_memory(start_server, cred):
    """WRITE_BUFFER_BYTES_MAX bounds what one connection costs, whatever it
    asks for: docs/SERVER.md puts it at the write buffer plus one socket
    read of parsed requests.  A /past page of 1000 entries is ~60 KiB for a
    ~60-byte request: four clients that pipeline 200 of them (12 KiB each)
    and never read must not cost the server more than a few MiB each."""
    s = start_server()
    with s.connect(timeout=60) as c:
        c.send(b"".join(patch(f"/mod?cred={cred}&by={i + 1}") for i in range(L.PAST_LIMIT_MAX)))
        c.responses(L.PAST_LIMIT_MAX)
    target = f"/past?cred={cred}&limit={L.PAST_LIMIT_MAX}"
    for _ in range(20):                               # warm up allocator and caches
        assert len(s.get(target).body) > 50_000
    rss0 = s.rss_kib()
    flooders = [s.connect() for _ in range(4)]
    try:
        for c in flooders:
            c.send(get(target) * 200)
        # Until every page is answered, or (a server that holds the rest
        # back) the count stands still for a second.
        key = 'accman_requests_total{route="past",status="200"}'
        last, still_since = None, time.monotonic()
        while True:
            answered = metrics(s)[key]
            if answered != last:
                last, still_since = answered, time.monotonic()
            if answered >= 20 + 4 * 200 or time.monotonic() - still_since > 1.0:
                break
            time.sleep(0.05)
        assert s.get("/health").status == 200             # others are served
        rss1 = s.rss_kib()
    finally:
        for c in flooders:
            c.close()
    grown_mib = (rss1 - rss0) / 1024
    assert grown_mib < 16, (f"four clients that never read grew the server by {grown_mib:.0f} "
                            f"MiB (RSS {rss0 // 1024} -> {rss1 // 1024} MiB)")


# --- time: HEAD_TIMEOUT_S, IDLE_TIMEOUT_S, SHUTDOWN_GRACE_S ---------------------------

def test_a_head_stalled_after_its_request_line_gets_408(start_server):
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "0.5"})
    with s.connect() as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")      # and then nothing
        replies = read_until_closed(c)
    assert [r.status for r in replies] == [408]
    assert replies[0].json["error"] == "timeout"
    assert "HEAD_TIMEOUT_S" in replies[0].json["detail"]


def test_a_body_short_of_its_content_length_gets_408_saying_so(start_server):
    """The deadline covers the body a whole head announces, and says so."""
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "0.5"})
    with s.connect() as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\nContent-Length: 10\r\n\r\nhello")
        replies = read_until_closed(c)
    assert [r.status for r in replies] == [408]
    assert replies[0].json["detail"].startswith(
        "the request (its head, and the body its Content-Length announces) did not arrive whole")


def test_header_lines_trickled_one_by_one_still_meet_the_head_deadline(start_server):
    """Each line comes well within the deadline; the head as a whole does
    not: the deadline runs from the head's first byte."""
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "0.8"})
    with s.connect() as c:
        c.send(b"GET /health HTTP/1.1\r\nHost: 127.0.0.1\r\n")
        sent = 0
        for _ in range(40):                     # 40 x 0.1 s: five times the deadline
            if select.select([c.sock], [], [], 0.1)[0]:
                break                           # answered: cut
            c.send(b"X-Slow: 1\r\n")
            sent += 1
        replies = read_until_closed(c)
    assert sent < 40
    assert [r.status for r in replies] == [408]


def test_the_head_deadline_runs_per_request_on_a_keep_alive_connection(start_server):
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "0.6"})
    with s.connect() as c:
        for _ in range(3):                      # idle gaps longer than the deadline
            c.send(get("/health"))
            assert c.response().status == 200
            time.sleep(0.8)
        c.send(get("/health") + b"GET /health HTTP/1.1\r\n")   # a whole one, then half
        assert c.response().status == 200
        replies = read_until_closed(c)
    assert [r.status for r in replies] == [408]


@pytest.mark.any_one_store("the idle time is the connection's, whatever the store")
@pytest.mark.parametrize("tokens", [False, True])
def test_blank_lines_do_not_hold_a_connection_past_its_idle_time(start_server, tmp_path, tokens):
    """A CRLF now and then (RFC 9112 2.2 lets a server skip them before a
    request) is no request and no activity: the idle time, or with tokens
    the unauthenticated one, closes the connection as if nothing came.
    Counted as activity, four of them 1.5 s apart held it ~8 s."""
    env = {"ACCMAN_IDLE_TIMEOUT_S": "2", "ACCMAN_UNAUTHED_IDLE_TIMEOUT_S": "2"}
    kw = {}
    if tokens:
        (tmp_path / "tokens").write_text("read read-token-0123456789abcdef\n")
        (tmp_path / "tokens").chmod(0o600)
        kw["tokens"] = str(tmp_path / "tokens")
    s = start_server(env=env, **kw)
    with s.connect() as c:
        t0 = time.monotonic()
        for _ in range(3):
            if c.closed_by_peer(1.5):
                break
            c.send(b"\r\n")
        else:
            assert c.closed_by_peer(5)
        closed_after_s = time.monotonic() - t0
    assert closed_after_s < 4, closed_after_s


def test_a_connection_owed_a_reply_is_not_idle(controlled, cred):
    """IDLE_TIMEOUT_S closes connections with nothing owed: one whose mod
    waits for a stalled disk longer than the idle time keeps its reply."""
    srv, control = controlled(env={"ACCMAN_IDLE_TIMEOUT_S": "0.5"})
    with srv.connect(timeout=30) as idle:
        with srv.connect(timeout=30) as c:
            control.hold()
            c.send(patch(f"/mod?cred={cred}&by=9"))
            control.wait_holding()
            assert idle.closed_by_peer(10)          # the idle one went
            time.sleep(1.0)                         # twice the idle time, still owed
            control.release()
            assert c.response().json == {"tot": 9, "seq": 1}


def test_shutdown_grace_bounds_the_wait_for_a_stalled_disk(controlled, cred, tmp_path):
    """SHUTDOWN_GRACE_S: on SIGTERM with a mod stuck behind a stalled disk,
    the server answers new connections no more, waits the grace, drops the
    connection (the mod's outcome is then unknown to its client), and exits
    once the disk lets the ledger close; the mod is then durable."""
    srv, control = controlled(env={"ACCMAN_SHUTDOWN_GRACE_S": "0.5"})
    with srv.connect(timeout=30) as c:
        control.hold()
        c.send(patch(f"/mod?cred={cred}&by=9"))
        control.wait_holding()
        srv.send_signal(signal.SIGTERM)
        assert c.closed_by_peer(15)                  # dropped after the grace
        assert parse_responses(c.buf) == []          # unanswered: unknown outcome
    with pytest.raises(OSError):
        srv.connect(timeout=2).close()              # no longer listening
    assert srv.proc.poll() is None                   # the ledger still waits for the disk
    control.release()
    assert srv.proc.wait(15) == 0
    again = spawn_server(srv.data, tmp_path / "again", store=srv.store)
    try:
        assert again.tot(cred) == 9                  # committed on the way out
    finally:
        again.kill()


def test_the_longest_history_entry_and_event_are_their_byte_bounds():
    """A /past or /events reply owed is counted against its connection's
    write buffer at PAST_ENTRY_BYTES_MAX or EVENT_BYTES_MAX an entry, its
    size unknown until the store answers: each bound is the longest JSON
    of one, with its separator, every field at its extreme (an id, seq,
    hold or `at` at int64's largest, `by` and `tot` at its smallest, a key
    of KEY_CHARS_MAX, the longest type, an account id of the stores'
    length).  Were one short, a page could overrun its reservation."""
    from accman.ledger import _ledger
    from accman.records import EVENT_TYPES, Entry, Event
    from accman.server.replies import _json, entry_doc, event_doc
    big, small, key = L.INT64_MAX, L.INT64_MIN, "k" * L.KEY_CHARS_MAX
    entry = Entry(big, small, small, big, key, big)
    event = Event(big, max(EVENT_TYPES, key=len), "a" * (2 * _ledger.HID_BYTES), big,
                  small, small, big, key, big)
    assert len(_json(entry_doc(entry)) + b",") == L.PAST_ENTRY_BYTES_MAX
    assert len(_json(event_doc(event)) + b",") == L.EVENT_BYTES_MAX
