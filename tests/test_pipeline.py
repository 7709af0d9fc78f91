"""The server's compiled pipeline (ext/pipeline.pyx) over the wire: the
mods and /tot reads that the embedded store's Lane takes, pipelined among
requests that it leaves to the general path, are answered in order with
exactly the SPEC's outcomes, with tokens as without, and counted in
/metrics like any other reply.  The real server as a subprocess."""

import threading

import pytest

from conftest import assert_error, get, parse_responses, patch, request_bytes

TOKENS = {
    "service": "service-token-0123456789abcdef",     # read, charge
    "mint": "mint-token-0123456789abcdef",
    "read": "read-token-0123456789abcdef",
}


@pytest.fixture(scope="module")
def token_server(tmp_path_factory):
    from conftest import spawn_server
    base = tmp_path_factory.mktemp("pipeline-tokens")
    (base / "tokens").write_text(f"read,charge {TOKENS['service']}\nmint {TOKENS['mint']}\n"
                                 f"read {TOKENS['read']}\n")
    (base / "tokens").chmod(0o600)
    srv = spawn_server(base / "data", base / "log", tokens=str(base / "tokens"))
    yield srv
    srv.kill()


def bearer(name):
    return [("Authorization", f"Bearer {TOKENS[name]}")]


def test_each_pipelined_read_sees_exactly_the_mods_before_it(shared_server, cred):
    """SPEC "Routes": a read sees every earlier mod of its connection and
    none of the later ones, though all of them are in flight at once."""
    with shared_server.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=100")
               + b"".join(patch(f"/mod?cred={cred}&by=-1&min=0") + get(f"/tot?cred={cred}")
                          for _ in range(20)))
        replies = [r.json for r in c.responses(41)]
    expected = [{"tot": 100, "seq": 1}]
    for i in range(1, 21):
        expected += [{"tot": 100 - i, "seq": 1 + i}, {"tot": 100 - i}]
    assert replies == expected


def test_a_read_sees_none_of_the_mods_pipelined_after_it_while_reads_are_busy(shared_server,
                                                                                cred):
    """SPEC "Routes": a read sees none of the later mods of its connection,
    also when the store answers it later, beside its writes (PostgreSQL's
    read pool, kept busy here by other connections reading)."""
    shared_server.mod(f"{cred}-load", 5)
    stop = threading.Event()

    def load():
        with shared_server.connect() as c:
            while not stop.is_set():
                c.send(get(f"/past?cred={cred}-load&limit=50"))
                c.responses(1)

    loaders = [threading.Thread(target=load) for _ in range(4)]
    for t in loaders:
        t.start()
    try:
        seen = []
        for i in range(40):
            with shared_server.connect() as c:
                c.send(patch(f"/mod?cred={cred}-{i}&by=10"))
                assert c.responses(1)[0].status == 200
                c.send(get(f"/tot?cred={cred}-{i}") + patch(f"/mod?cred={cred}-{i}&by=-1")
                       + get(f"/past?cred={cred}-{i}") + patch(f"/mod?cred={cred}-{i}&by=-1"))
                tot, _, past, _ = c.responses(4)
                seen.append((tot.json["tot"], [e["seq"] for e in past.json["past"]]))
    finally:
        stop.set()
        for t in loaders:
            t.join()
    assert seen == [(10, [2, 1])] * 40


def test_lane_and_general_requests_answer_in_order(shared_server, cred):
    """Mods and reads the Lane takes, between requests it does not (a
    keyed replay, a refusal waiting for a pending balance, /past, /health,
    errors), keep their order and their outcomes."""
    with shared_server.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=10&key=k1")
               + patch(f"/mod?cred={cred}&by=-4&min=0")
               + get(f"/past?cred={cred}")
               + patch(f"/mod?cred={cred}&by=10&key=k1")        # the replay of the first
               + patch(f"/mod?cred={cred}&by=-7&min=0")         # 6 left: refused
               + get("/health")
               + get(f"/tot?cred={cred}")
               + get("/nope")
               + patch(f"/mod?cred={cred}-none&by=-1")           # no account
               + patch(f"/mod?cred={cred}&by=11&key=k1")        # the key, another by
               + patch(f"/mod?cred={cred}&by=-6&min=0")
               + get(f"/tot?cred={cred}"))
        r = c.responses(12)
    assert r[0].json == {"tot": 10, "seq": 1}
    assert r[1].json == {"tot": 6, "seq": 2}
    assert [e["seq"] for e in r[2].json["past"]] == [2, 1]
    assert r[3].json == {"tot": 10, "seq": 1}
    assert_error(r[4], 409, "insufficient")
    assert r[4].json["tot"] == 6
    assert r[5].status == 200
    assert r[6].json == {"tot": 6}
    assert_error(r[7], 404, "not_found")
    assert_error(r[8], 404, "no_account")
    assert_error(r[9], 409, "key_reused")
    assert r[10].json == {"tot": 0, "seq": 3}
    assert r[11].json == {"tot": 0}


def test_http10_keep_alive_mods_keep_the_connection(shared_server, cred):
    raw = b"".join(request_bytes("PATCH", f"/mod?cred={cred}&by=2", [("Connection", "keep-alive")],
                                 version="HTTP/1.0") for _ in range(3))
    with shared_server.connect() as c:
        c.send(raw)
        replies = c.responses(3)
        c.send(request_bytes("GET", f"/tot?cred={cred}", version="HTTP/1.0"))
        last = c.response()
        assert c.closed_by_peer(5)
    assert [r.json for r in replies] == [{"tot": 2 * i, "seq": i} for i in (1, 2, 3)]
    assert all(r.headers["connection"] == "keep-alive" for r in replies)
    assert last.json == {"tot": 6} and last.headers["connection"] == "close"


def test_a_token_serves_its_pipeline_and_a_change_of_token_is_checked(token_server, cred):
    """The Lane takes a request whose token is the one the connection
    authenticated with and whose role it has; any other token is checked
    by the general path, in its turn (SPEC "Access")."""
    with token_server.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=50", bearer("mint"))
               + b"".join(patch(f"/mod?cred={cred}&by=-1&min=0", bearer("service"))
                          for _ in range(5))
               + get(f"/tot?cred={cred}", bearer("service"))
               + patch(f"/mod?cred={cred}&by=5", bearer("service"))     # service cannot mint
               + patch(f"/mod?cred={cred}&by=-1", bearer("read"))       # read cannot charge
               + get(f"/tot?cred={cred}", bearer("read"))
               + patch(f"/mod?cred={cred}&by=-1&min=0", bearer("service"))
               + get(f"/tot?cred={cred}", bearer("service")))
        r = c.responses(12)
    assert r[0].json == {"tot": 50, "seq": 1}
    assert [x.json for x in r[1:6]] == [{"tot": 50 - i, "seq": 1 + i} for i in range(1, 6)]
    assert r[6].json == {"tot": 45}
    assert_error(r[7], 403, "forbidden")
    assert_error(r[8], 403, "forbidden")
    assert r[9].json == {"tot": 45}
    assert r[10].json == {"tot": 44, "seq": 7}
    assert r[11].json == {"tot": 44}


def test_a_pipelined_request_without_its_token_is_401_and_closes(token_server, cred):
    with token_server.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=3", bearer("mint"))
               + patch(f"/mod?cred={cred}&by=3")
               + patch(f"/mod?cred={cred}&by=3", bearer("mint")))
        replies = parse_responses(c.read_all())
    assert [r.status for r in replies] == [200, 401]
    assert token_server.tot(cred, token=TOKENS["read"]) == 3


@pytest.mark.parametrize("read", ["/metrics", "/events?after=0", "/health"])
def test_a_read_at_its_turn_without_its_token_closes_before_what_follows(token_server, cred,
                                                                         read):
    """A read of server state pipelined behind writes is answered at its
    turn, but its access is judged as it is taken: a 401 closes the
    connection with nothing behind it taken (RFC 9112 9.6), where the
    mods behind it were applied and answered after the closing reply."""
    with token_server.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=100", bearer("mint"))
               + patch(f"/mod?cred={cred}&by=-1", bearer("service")) * 49
               + get(read)
               + patch(f"/mod?cred={cred}&by=-1", bearer("service")) * 5)
        # /health needs no token: all 56 answered, the connection kept.
        replies = c.responses(56) if read == "/health" else parse_responses(c.read_all())
    statuses = [r.status for r in replies]
    if read == "/health":
        assert statuses == [200] * 56 and "connection" not in replies[50].headers
        assert token_server.tot(cred, token=TOKENS["read"]) == 100 - 49 - 5
        return
    assert statuses == [200] * 50 + [401], statuses
    assert replies[-1].headers["connection"] == "close"
    assert token_server.tot(cred, token=TOKENS["read"]) == 100 - 49


EXPECTING = [("Expect", "100-continue"), ("Content-Length", "2")]


@pytest.mark.parametrize("before,target", [(b"", "/mod?cred={cred}&by=5"),
                                           (get("/health"), "/mod?cred={cred}&by=5"),
                                           (b"", "/nope"), (b"", "/mod?cred={cred}&by=x")])
def test_a_request_asking_for_100_without_a_token_gets_its_401_in_place(token_server, cred,
                                                                        before, target):
    """RFC 9110 10.1.1: a server that will not take the body answers with
    the final status, not 100 Continue: a request no token allows gets its
    401 (after the replies before it) and the connection closes, its body
    never asked for; nothing is applied.  So does one whose target is
    refused (unknown, a bad value), whose 401 came after its body."""
    with token_server.connect() as c:
        c.send(before + request_bytes("PATCH", target.format(cred=cred), EXPECTING))
        out = c.read_all(10)
    replies = parse_responses(out)
    assert b"100 Continue" not in out, out
    assert [r.status for r in replies] == [200] * bool(before) + [401], out
    assert replies[-1].headers["connection"] == "close"
    assert_error(token_server.get(f"/tot?cred={cred}", token=TOKENS["read"]), 404)


def test_a_request_asking_for_100_with_a_token_of_another_role_gets_100_then_403(
        token_server, cred):
    """A valid token without the role: the connection goes on, so the body
    is asked for and read, then the 403 (SERVER.md)."""
    with token_server.connect() as c:
        c.send(request_bytes("PATCH", f"/mod?cred={cred}&by=5", EXPECTING + bearer("read")))
        assert c.sock.recv(1024) == b"HTTP/1.1 100 Continue\r\n\r\n"
        c.send(b"{}" + get(f"/tot?cred={cred}", bearer("read")))
        forbidden, unknown = c.responses(2)
    assert_error(forbidden, 403, "forbidden")
    assert_error(unknown, 404)


def metric(srv, name):
    for line in srv.get("/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.rsplit(" ", 1)[1])
    return 0.0


def test_every_mod_and_tot_the_pipeline_answers_is_counted(server, cred):
    mods = 'accman_requests_total{route="mod",status="200"}'
    tots = 'accman_requests_total{route="tot",status="200"}'
    before = [metric(server, n) for n in (mods, tots, "accman_mod_latency_seconds_count")]
    with server.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=9")
               + b"".join(patch(f"/mod?cred={cred}&by=-1") + get(f"/tot?cred={cred}")
                          for _ in range(7)))
        assert [r.status for r in c.responses(15)] == [200] * 15
        c.send(get(f"/tot?cred={cred}"))
        assert c.response().json == {"tot": 2}
    after = [metric(server, n) for n in (mods, tots, "accman_mod_latency_seconds_count")]
    assert [a - b for a, b in zip(after, before, strict=True)] == [8, 8, 8]
