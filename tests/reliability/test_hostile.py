"""Hostile clients (issue 11): many connections that never read, sockets
that never authenticate, one address taking every slot, and a process out
of descriptors.  SPEC "Limits": a client that reaches a bound gets an error
or back-pressure, never a crash or unbounded memory; running out of
descriptors refuses connections, it never stops commits."""

import os
import re
import socket
import threading
import time

import pytest

from accman.limits import (FDS_RESERVED, METRICS_TURN_REQUESTS, PAGE_ENTRIES_PER_TURN_REQUEST,
                           PASS_CHARGE_MAX)
from conftest import PYTHON, assert_error, get, parse_responses, patch, request_bytes
from relhelp import metrics

TOKENS = {"mint": "mint-token-0123456789abcdef", "all": "readcharge-0123456789abcdef"}
TOKENS_FILE = f"mint {TOKENS['mint']}\nread,charge {TOKENS['all']}\n"


def auth(token):
    return [("Authorization", f"Bearer {token}")]


def test_one_address_cannot_take_every_connection(start_server):
    """CONNECTIONS_PER_PEER_MAX: the next connection from the same address
    is refused with 503; another address is still served, and a slot
    freed is taken again."""
    s = start_server(env={"ACCMAN_CONNECTIONS_PER_PEER_MAX": "5"})
    held = [s.connect() for _ in range(5)]
    try:
        for c in held:
            c.send(get("/health"))
            assert c.response().status == 200
        with s.connect() as c:
            r = c.response()
            assert_error(r, 503, "busy")
            assert "CONNECTIONS_PER_PEER_MAX" in r.json["detail"]
        other = socket.socket()
        other.bind(("127.0.0.2", 0))
        other.connect((s.host, s.port))
        other.sendall(get("/health"))
        assert b" 200 OK\r\n" in other.recv(65536)
        other.close()
        held.pop().close()
        time.sleep(0.2)
        assert s.get("/health").status == 200
    finally:
        for c in held:
            c.close()
    assert metrics(s)["accman_connections_refused_total"] >= 1


def test_an_unauthenticated_connection_idles_out_first(start_server):
    """UNAUTHED_IDLE_TIMEOUT_S: with tokens configured, a socket that has
    sent no valid token is closed long before IDLE_TIMEOUT_S; one that
    has authenticated keeps the full idle time."""
    s = start_server(tokens=TOKENS_FILE, env={"ACCMAN_UNAUTHED_IDLE_TIMEOUT_S": "0.5",
                                              "ACCMAN_IDLE_TIMEOUT_S": "30"})
    with s.connect() as idle, s.connect() as authed:
        authed.send(get("/metrics", auth(TOKENS["all"])))
        assert authed.response().status == 200
        t0 = time.monotonic()
        assert idle.closed_by_peer(10)
        assert time.monotonic() - t0 < 10
        time.sleep(1.0)
        authed.send(get("/health"))
        assert authed.response().status == 200


def test_health_alone_does_not_authenticate(start_server):
    s = start_server(tokens=TOKENS_FILE, env={"ACCMAN_UNAUTHED_IDLE_TIMEOUT_S": "0.5",
                                              "ACCMAN_IDLE_TIMEOUT_S": "30"})
    with s.connect() as c:
        c.send(get("/health"))
        assert c.response().status == 200
        assert c.closed_by_peer(10)


# How long a flood may take to spend SERVER_BUFFER_BYTES_MAX.  The kernel
# takes a few MB of each connection's replies into its socket buffers
# before the server holds any, at the pace the server answers: a second or
# so on an idle machine, more than three under a whole suite's load.
FLOOD_PAUSE_WITHIN_S = 60.0
FLOOD_LOOK_EVERY_S = 0.5        # how often /metrics is asked meanwhile


def flood_without_reading(s, n, request, seconds):
    """`n` connections send `request` pipelined for at least `seconds` and
    never read, until the server has paused for its budget (at most
    FLOOD_PAUSE_WITHIN_S); the connections."""
    conns = []
    for _ in range(n):
        c = socket.socket()
        c.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        c.connect((s.host, s.port))
        c.setblocking(False)
        conns.append(c)
    burst = request * 256
    t0 = time.monotonic()
    looked = t0 + seconds
    while time.monotonic() < t0 + FLOOD_PAUSE_WITHIN_S:
        for c in conns:
            try:
                c.send(burst)
            except (BlockingIOError, ConnectionError):
                pass
        time.sleep(0.01)
        if time.monotonic() >= looked:
            if metrics(s)["accman_budget_pauses_total"] >= 1:
                break
            looked = time.monotonic() + FLOOD_LOOK_EVERY_S
    return conns


def budget_state(m) -> dict:
    """What a flood that reached no pause left: the connections open and
    dropped, the bytes held."""
    return {k: m[k] for k in ("accman_open_connections", "accman_idle_closes_total",
                              "accman_buffered_bytes")}


def test_clients_that_never_read_stay_within_the_server_budget(start_server, cred):
    """SERVER_BUFFER_BYTES_MAX: 40 connections pipeline 404s and never read.
    The bytes held for all of them stay near the budget, the server pauses
    them, memory stays bounded, and another client is served meanwhile."""
    budget = 2 << 20
    s = start_server(env={"ACCMAN_SERVER_BUFFER_BYTES_MAX": str(budget),
                          "ACCMAN_WRITE_BUFFER_BYTES_MAX": str(256 << 10)})
    s.mod(cred, 3)
    rss0 = s.rss_kib()
    conns = flood_without_reading(s, 40, get("/nope"), 3.0)
    try:
        m = metrics(s)
        assert m["accman_budget_pauses_total"] >= 1, budget_state(m)
        # Only replies pass the budget: one each over its rest (a 404's,
        # under a KiB), the part kept covering a small read of each.
        assert m["accman_buffered_bytes"] <= budget + 40 * 1024, m["accman_buffered_bytes"]
        t0 = time.monotonic()
        assert s.get(f"/tot?cred={cred}").json == {"tot": 3}
        assert s.mod(cred, -1).json == {"tot": 2, "seq": 2}
        assert time.monotonic() - t0 < 5
        grown_mib = (s.rss_kib() - rss0) / 1024
        assert grown_mib < 64, f"40 clients that never read grew the server by {grown_mib:.0f} MiB"
    finally:
        for c in conns:
            c.close()
    # Once they have gone, the held-back ones are freed: the test above.


def test_connections_held_back_by_the_budget_are_freed_once_their_clients_go(start_server):
    """A probe's case: 20 clients pipeline /metrics and never read, past a
    small SERVER_BUFFER_BYTES_MAX, then close.  The requests held unread
    kept the budget spent, and a connection held back by the budget was
    neither read (so its client's close was not seen) nor timed out: 19
    stayed for good, and with a low CONNECTIONS_MAX every new client was
    refused.  Held back with no progress for IDLE_TIMEOUT_S, one is
    dropped: its bytes go, the budget recovers, pipelining is served."""
    s = start_server(env={"ACCMAN_SERVER_BUFFER_BYTES_MAX": "1000000",
                          "ACCMAN_IDLE_TIMEOUT_S": "2"})
    conns = flood_without_reading(s, 20, get("/metrics"), 3.0)
    m = metrics(s)
    assert m["accman_budget_pauses_total"] >= 1, budget_state(m)
    for c in conns:
        c.close()
    deadline = time.monotonic() + 2 + 2 * 1.0 + 5          # idle, two sweeps, slack
    while (m := metrics(s))["accman_open_connections"] > 1:  # the metrics' own
        assert time.monotonic() < deadline, m
        time.sleep(0.2)
    assert m["accman_buffered_bytes"] == 0
    with s.connect() as c:
        c.send(get("/health") * 50)
        assert [r.status for r in c.responses(50)] == [200] * 50


def test_clients_that_read_are_served_through_a_spent_budget(start_server):
    """A review's case: 20 clients pipeline 100 KB of /health each while
    reading every reply.  Their unparsed requests alone spent a 500 KB
    budget, and nothing was taken while it was spent: all of them stalled
    until IDLE_TIMEOUT_S dropped them.  A connection whose client reads
    what it is sent goes on taking its held requests over the budget."""
    s = start_server(env={"ACCMAN_SERVER_BUFFER_BYTES_MAX": "500000",
                          "ACCMAN_IDLE_TIMEOUT_S": "30"})
    request = get("/health")
    burst = request * (100_000 // len(request))
    want = len(burst) // len(request)
    got = [0] * 20

    def client(i):
        with socket.create_connection((s.host, s.port)) as c:
            threading.Thread(target=c.sendall, args=(burst,), daemon=True).start()
            tail = b""
            while got[i] < want:
                data = c.recv(1 << 16)
                if not data:
                    return
                tail += data
                got[i] += tail.count(b"HTTP/1.1 200")
                tail = tail[tail.rfind(b"HTTP/1.1 200") + 1:] if b"HTTP/1.1 200" in tail \
                    else tail[-16:]

    threads = [threading.Thread(target=client, args=(i,), daemon=True) for i in range(20)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(25)                  # well before IDLE_TIMEOUT_S would drop them
    assert got == [want] * 20
    m = metrics(s)
    assert m["accman_budget_pauses_total"] >= 1 and m["accman_idle_closes_total"] == 0


def spawn_with_nofile(start_server, nofile, data, args=(), **kw):
    """The server under `ulimit -n nofile` (soft and hard: it cannot raise it),
    on `data` and the test's store."""
    cmd = ["prlimit", f"--nofile={nofile}:{nofile}", PYTHON, "-m", "accman", "serve",
           "--host", "127.0.0.1", "--port", "0", "--data", str(data),
           *start_server.store.serve_args(data), *map(str, args)]
    return start_server(data=data, cmd=cmd, **kw)


def test_out_of_descriptors_refuses_connections_and_never_stops_commits(
        start_server, tmp_path, cred):
    """Issue 11, item 3: under a low descriptor limit, sockets that never
    authenticate fill every connection slot.  The cap stays FDS_RESERVED
    under the limit, so new connections are refused, mods keep committing,
    and the checkpoint at a clean stop still opens its files."""
    data = tmp_path / "data"
    tokens = tmp_path / "tokens"
    tokens.write_text(TOKENS_FILE)
    tokens.chmod(0o600)
    s = spawn_with_nofile(start_server, 400, data, ["--tokens", tokens])
    worker = s.connect()
    worker.send(patch(f"/mod?cred={cred}&by=100", auth(TOKENS["mint"])))
    assert worker.response().status == 200
    hogs = []
    refused = 0
    for _ in range(400):
        try:
            c = socket.create_connection((s.host, s.port), timeout=5)
        except OSError:
            refused += 1
            continue
        hogs.append(c)
    try:
        time.sleep(0.3)
        for c in hogs:          # the ones over the cap were answered 503 and closed
            c.setblocking(False)
            try:
                if c.recv(65536).startswith(b"HTTP/1.1 503"):
                    refused += 1
            except BlockingIOError:
                pass
        assert refused >= 1, "the connection cap did not stay under the descriptor limit"
        in_use = len(os.listdir(f"/proc/{s.proc.pid}/fd"))
        assert in_use <= 400 - FDS_RESERVED + 32, f"{in_use} of 400 descriptors in use"
        for i in range(50):
            worker.send(patch(f"/mod?cred={cred}&by=-1", auth(TOKENS["all"])))
            assert worker.response().json == {"tot": 99 - i, "seq": i + 2}
        worker.send(get("/health"))
        assert worker.response().status == 200
    finally:
        for c in hogs:
            c.close()
        worker.close()
    assert s.stop() == 0, s.stderr()
    assert "failed" not in s.stderr()
    s = start_server(data=data)
    assert s.tot(cred) == 50


def test_a_descriptor_limit_too_low_to_serve_is_refused_at_start(start_server, tmp_path):
    try:
        spawn_with_nofile(start_server, 200, tmp_path / "d")
    except RuntimeError as e:
        assert "descriptor limit is 200" in str(e) and "ulimit -n" in str(e)
    else:
        raise AssertionError("the server started with 200 descriptors")


def test_a_loop_turn_takes_at_most_turn_requests_max_and_the_rest_go_on(start_server, cred):
    """TURN_REQUESTS_MAX: three connections pipeline 200 requests each in
    one send; with 8 a turn, the server spends many turns on them, answers
    every one in order, and serves a health check meanwhile."""
    s = start_server(env={"ACCMAN_TURN_REQUESTS_MAX": "8"})
    s.mod(cred, 5)
    conns = [s.connect() for _ in range(3)]
    try:
        for c in conns:
            c.send(get(f"/tot?cred={cred}") * 200)
        assert s.get("/health").status == 200
        for c in conns:
            assert [c.response().json for _ in range(200)] == [{"tot": 5}] * 200
    finally:
        for c in conns:
            c.close()
    assert metrics(s)["accman_turns_spent_total"] >= 600 // 8 - 8


def test_a_costly_request_counts_for_more_in_the_turn(start_server, cred):
    """METRICS_TURN_REQUESTS, PAGE_ENTRIES_PER_TURN_REQUEST: a /metrics
    counts for 10 requests and a page for one per 3 entries, so that a
    flood of them keeps turns short.  With 200 a turn (a read is granted
    PIPELINE_REQUESTS_MAX, 64, so a turn is spent once fewer are left), 40
    /metrics or 20 pages of 60 entries spend at least two turns, where 40
    requests of one each would spend none."""
    s = start_server(env={"ACCMAN_TURN_REQUESTS_MAX": "200"})
    for _ in range(60):
        s.mod(cred, 1)
    spent = metrics(s)["accman_turns_spent_total"]
    for _ in range(40):
        assert s.get("/metrics").status == 200
    spent, was = metrics(s)["accman_turns_spent_total"], spent
    assert spent - was >= 2
    for target, field in ((f"/past?cred={cred}&limit=60", "past"), ("/events?limit=60", "events")):
        for _ in range(20):
            assert len(s.get(target).json[field]) == 60
        spent, was = metrics(s)["accman_turns_spent_total"], spent
        assert spent - was >= 2, target


# Clients that pipeline pages and never read them, enough of them that the
# pages the server makes for them all take it seconds of CPU; a second is
# many turns (each a few milliseconds).
FLOOD_CONNECTIONS = 60
FLOOD_PAGES = 300
FLOOD_PAGE_ENTRIES = 100
FLOODED_HEALTH_WAIT_S_MAX = 1.0


def test_a_flood_of_unread_pages_leaves_a_health_check_a_few_turns(start_server, cred):
    """PASS_CHARGE_MAX: clients that pipeline /past pages and never read
    them took every turn in turn, each for all the pages it had parsed (a
    grant counted a page as one request, its cost charged after), so that
    a health check on an open connection behind 60 of them waited 1.5-2.5 s
    on the embedded store.  Each now has a few pages a turn, and the check
    waits a few turns.  (Found by a black-box audit of the SPEC.)"""
    s = start_server()
    with s.connect() as c:
        c.send(b"".join(request_bytes("PATCH", f"/mod?cred={cred}&by=1")
                        for _ in range(FLOOD_PAGE_ENTRIES)))
        assert [r.status for r in c.responses(FLOOD_PAGE_ENTRIES)] == \
            [200] * FLOOD_PAGE_ENTRIES
    probe = socket.create_connection((s.host, s.port), timeout=10)
    flood = []
    try:
        probe.sendall(get("/health"))
        assert probe.recv(65536).startswith(b"HTTP/1.1 200 ")
        page = get(f"/past?cred={cred}&limit={FLOOD_PAGE_ENTRIES}")
        for _ in range(FLOOD_CONNECTIONS):
            f = socket.create_connection((s.host, s.port), timeout=10)
            f.setblocking(False)
            try:
                f.send(page * FLOOD_PAGES)
            except BlockingIOError:
                pass
            flood.append(f)
        time.sleep(0.2)
        probe.settimeout(FLOODED_HEALTH_WAIT_S_MAX)
        t0 = time.monotonic()
        probe.sendall(get("/health"))
        try:
            reply = probe.recv(65536)
        except socket.timeout:
            reply = b""
        assert reply.startswith(b"HTTP/1.1 200 "), (
            f"/health not answered within {FLOODED_HEALTH_WAIT_S_MAX} s behind "
            f"{FLOOD_CONNECTIONS} clients flooding unread pages "
            f"({time.monotonic() - t0:.2f} s)")
    finally:
        probe.close()
        for f in flood:
            f.close()


# Connections that pipeline pages and read them, with a small turn: each
# pass ends at PASS_CHARGE_MAX (seven pages of 30 entries), and the turn is
# spent many times over.
HELD_CONNECTIONS = 10
HELD_PAGES = 40
HELD_PAGE_ENTRIES = 30
HELD_TURN_REQUESTS = 100
CHEAP_PAGE_ENTRIES = PAGE_ENTRIES_PER_TURN_REQUEST - 1      # charged nothing more


def _turns_spent_by_held_pages(start_server, cred, entries=HELD_PAGE_ENTRIES):
    """The turns spent while HELD_CONNECTIONS pipeline HELD_PAGES pages (of
    `entries`) and read them, with a turn of HELD_TURN_REQUESTS."""
    s = start_server(env={"ACCMAN_TURN_REQUESTS_MAX": str(HELD_TURN_REQUESTS)})
    with s.connect() as c:
        c.send(b"".join(request_bytes("PATCH", f"/mod?cred={cred}&by=1")
                        for _ in range(HELD_PAGE_ENTRIES)))
        assert [r.status for r in c.responses(HELD_PAGE_ENTRIES)] == [200] * HELD_PAGE_ENTRIES
    was = metrics(s)["accman_turns_spent_total"]
    conns = [s.connect() for _ in range(HELD_CONNECTIONS)]
    try:
        for c in conns:
            c.send(get(f"/past?cred={cred}&limit={entries}") * HELD_PAGES)
        for c in conns:
            assert [r.status for r in c.responses(HELD_PAGES)] == [200] * HELD_PAGES
    finally:
        for c in conns:
            c.close()
    return metrics(s)["accman_turns_spent_total"] - was


@pytest.mark.embedded_only("PostgreSQL answers a page later, and charges it then, in no pass")
def test_requests_held_back_go_on_in_a_turn_with_room_not_in_a_spent_one(start_server, cred):
    """TURN_REQUESTS_MAX, PASS_CHARGE_MAX: a connection whose pass ended
    with requests held back goes on once the turn is renewed, never in a
    turn already spent, so that a turn costs at most its budget and one
    page more, and the pages spend as many turns as their cost says.
    Resumed into a spent turn, each connection held back overdrew it by a
    page or more, and these pages spent 30 turns where their cost is 40."""
    spent = _turns_spent_by_held_pages(start_server, cred)
    page_charge = HELD_PAGE_ENTRIES // PAGE_ENTRIES_PER_TURN_REQUEST
    cost = HELD_CONNECTIONS * HELD_PAGES * (1 + page_charge)
    # Less the turn under way when the pages came.
    assert spent >= cost // (HELD_TURN_REQUESTS + page_charge) - 1, spent


@pytest.mark.embedded_only("the store's Lane keeps the mod unanswered while the reads queue")
def test_costly_reads_at_their_turn_behind_a_write_spend_turns_as_they_cost(start_server,
                                                                            cred):
    """TURN_REQUESTS_MAX, PASS_CHARGE_MAX: /metrics pipelined behind a mod
    is evaluated at its turn, once the mod is answered; those a pass
    evaluates so cost at most PASS_CHARGE_MAX or the rest of the turn, the
    rest going on in a later turn with room, as the reads a pass takes do.
    All 63 of a connection were rendered in one pass, each connection's in
    the same turn, and 40 clients pipelining so held a health check
    0.3-1.2 s."""
    s = start_server(env={"ACCMAN_TURN_REQUESTS_MAX": str(HELD_TURN_REQUESTS)})
    was = metrics(s)["accman_turns_spent_total"]
    conns = [s.connect() for _ in range(HELD_CONNECTIONS)]
    try:
        for c in conns:
            c.send(request_bytes("PATCH", f"/mod?cred={cred}&by=1") + get("/metrics") * 63)
        for c in conns:
            assert [r.status for r in c.responses(64)] == [200] * 64
    finally:
        for c in conns:
            c.close()
    spent = metrics(s)["accman_turns_spent_total"] - was
    cost = HELD_CONNECTIONS * 63 * METRICS_TURN_REQUESTS
    # Less the turn under way when the reads came.
    assert spent >= cost // (HELD_TURN_REQUESTS + METRICS_TURN_REQUESTS) - 1, spent


def _metrics_answered(replies):
    """The metrics requests the server had answered when it made each
    /metrics reply, itself counted."""
    out = []
    for r in replies:
        m = re.search(rb'accman_requests_total\{route="metrics",status="200"\} (\d+)', r.body)
        if m:
            out.append(int(m.group(1)))
    return out


@pytest.mark.embedded_only("the store's Lane keeps the mod unanswered while the reads queue")
def test_reads_at_their_turn_take_a_pass_share_whatever_a_flush_takes_next(start_server,
                                                                          cred):
    """PASS_CHARGE_MAX: /metrics pipelined behind mods, on a connection
    whose client sends more of them, go on a pass's share at a time while
    another connection's /metrics are ready too: at most eight (each is
    charged METRICS_TURN_REQUESTS - 1 more) before the other is served.
    A flush took more requests after its drain had spent the pass's share,
    and the next drain had a share of its own: 63 in a row.  The turn is
    made large so that only the pass's share can end a pass."""
    s = start_server(env={"ACCMAN_TURN_REQUESTS_MAX": "100000",
                          "ACCMAN_WRITE_BUFFER_BYTES_MAX": str(64 << 20)})
    last = request_bytes("GET", "/health", [("Connection", "close")])
    got = {}
    with s.connect() as a, s.connect() as b:
        readers = [threading.Thread(target=lambda k=k, c=c: got.update({k: c.read_all(10)}))
                   for k, c in (("a", a), ("b", b))]
        for t in readers:
            t.start()
        a.send((patch(f"/mod?cred={cred}&by=1") + get("/metrics") * 63) * 3 + last)
        b.send(get("/metrics") * 400 + last)
        for t in readers:
            t.join()
    mine, other = (_metrics_answered(parse_responses(got[k])) for k in ("a", "b"))
    assert len(mine) == 3 * 63 and len(other) == 400
    share = PASS_CHARGE_MAX // (METRICS_TURN_REQUESTS - 1) + 1
    in_a_row = [1]
    for was, now in zip(mine[:-1], mine[1:], strict=True):
        if now == was + 1 and was < other[-1]:  # the other still had some to answer
            in_a_row[-1] += 1
        else:
            in_a_row.append(1)
    # Two passes in a row at most: the other may be between its passes.
    assert max(in_a_row) <= 2 * share, in_a_row


def test_a_turn_is_counted_spent_only_when_its_requests_are(start_server, cred):
    """TURN_REQUESTS_MAX: accman_turns_spent_total counts the turns whose
    requests were all taken.  A connection's flush asked the turn for a
    whole pipeline's room to parse on even when it held nothing to parse,
    and a grant of more than the turn had left ended it, counted, though
    the grant was refunded at once: on PostgreSQL, which answers each page
    later and flushes its connection then, these pages spent 74-76 turns
    where their cost is 44.  The pages here cost one request each (too
    small to be costly reads, whose share ends a turn sooner: Turn.costly),
    so that only spent requests end a turn (tests/test_turn.py has the
    flush alone)."""
    spent = _turns_spent_by_held_pages(start_server, cred, CHEAP_PAGE_ENTRIES)
    cost = HELD_CONNECTIONS * HELD_PAGES
    # A read's grant is asked before its requests are parsed: one turn
    # more at most for each connection's read, and the /metrics above.
    assert spent <= cost // HELD_TURN_REQUESTS + HELD_CONNECTIONS + 1, spent
