"""Black-box tests of the HTTP service: the real server as a subprocess on
port 0, spoken to over raw sockets and with httpx (SPEC "Routes", "Values",
"Errors", "Durability and order", "Access", "Limits")."""

import os
import re
import signal
import socket
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import (ROOT, assert_error, get, parse_responses, patch, read_reply,
                      request_bytes, served_in_process)

INT64_MAX = 2 ** 63 - 1

TOKENS = {
    "read": "read-token-0123456789abcdef",
    "charge": "charge-token-0123456789abcdef",
    "mint": "mint-token-0123456789abcdef",
    "service": "service-token-0123456789abcdef",
}
TOKENS_FILE = f"""# test tokens
read {TOKENS['read']}
charge {TOKENS['charge']}
mint {TOKENS['mint']}
read,charge {TOKENS['service']}
"""


# --- routes ------------------------------------------------------------------

def test_tot_of_unknown_cred_is_404_no_account(shared_server, cred):
    assert_error(shared_server.get(f"/tot?cred={cred}"), 404, "no_account")


def test_first_mod_creates_the_account_and_tot_reads_it(shared_server, cred):
    r = shared_server.mod(cred, 100)
    assert r.status == 200
    assert r.headers["content-type"] == "application/json"
    assert int(r.headers["content-length"]) == len(r.body)
    assert r.json == {"tot": 100, "seq": 1}
    r = shared_server.get(f"/tot?cred={cred}")
    assert r.status == 200 and r.json == {"tot": 100}
    assert int(r.headers["content-length"]) == len(r.body)


def test_seq_grows_by_one_per_applied_mod(shared_server, cred):
    seqs = [shared_server.mod(cred, by).json["seq"] for by in (5, -2, 7, -10)]
    assert seqs == [1, 2, 3, 4]
    assert shared_server.tot(cred) == 0


def test_min_refuses_a_mod_that_would_go_under_it(shared_server, cred):
    shared_server.mod(cred, 10)
    doc = assert_error(shared_server.mod(cred, -20, min=0), 409, "insufficient")
    assert doc["tot"] == 10
    assert shared_server.tot(cred) == 10
    assert len(shared_server.get(f"/past?cred={cred}").json["past"]) == 1
    r = shared_server.mod(cred, -10, min=0)
    assert r.status == 200 and r.json == {"tot": 0, "seq": 2}


def test_min_may_be_negative_and_zero_is_allowed(shared_server, cred):
    assert shared_server.mod(cred, 1, min=0).json == {"tot": 1, "seq": 1}
    assert shared_server.mod(cred, -6, min=-10).json == {"tot": -5, "seq": 2}
    assert_error(shared_server.mod(cred, -6, min=-10), 409, "insufficient")
    assert shared_server.mod(cred, 5, min=0).json == {"tot": 0, "seq": 3}


@pytest.mark.parametrize("query", ["by=-1", "by=-9223372036854775808", "by=-1&min=-5",
                                   "by=-1&key=k1"])
def test_a_charge_on_an_unknown_cred_is_404_and_opens_nothing(shared_server, cred, query):
    """SPEC: only a funding mod opens an account."""
    assert_error(shared_server.patch(f"/mod?cred={cred}&{query}"), 404, "no_account")
    assert_error(shared_server.get(f"/tot?cred={cred}"), 404, "no_account")
    assert_error(shared_server.get(f"/past?cred={cred}"), 404, "no_account")


def test_a_key_applies_once_and_replays_its_answer(shared_server, cred):
    first = shared_server.mod(cred, 40, key="pay-1")
    again = shared_server.mod(cred, 40, key="pay-1")
    assert first.status == again.status == 200
    assert first.body == again.body == b'{"tot":40,"seq":1}'
    assert shared_server.tot(cred) == 40
    assert len(shared_server.get(f"/past?cred={cred}").json["past"]) == 1


def test_a_key_reused_with_other_values_is_409(shared_server, cred):
    shared_server.mod(cred, 40, key="k")
    assert_error(shared_server.mod(cred, 41, key="k"), 409, "key_reused")
    assert_error(shared_server.mod(cred, 40, key="k", min=0), 409, "key_reused")
    assert shared_server.tot(cred) == 40


def test_overflow_is_refused_and_changes_nothing(shared_server, cred):
    assert shared_server.mod(cred, INT64_MAX).status == 200
    assert_error(shared_server.mod(cred, 1), 409, "overflow")
    assert shared_server.tot(cred) == INT64_MAX
    other = cred + "-neg"
    assert shared_server.mod(other, 1).status == 200
    assert shared_server.mod(other, -INT64_MAX - 1).status == 200
    assert shared_server.mod(other, -1).status == 200          # INT64_MIN itself
    assert_error(shared_server.mod(other, -1), 409, "overflow")


def test_past_pages_newest_first(shared_server, cred):
    t0 = int(time.time() * 1000)
    for i, by in enumerate((1, 2, 3, 4, 5)):
        shared_server.mod(cred, by, **({"key": f"k{i}"} if i == 2 else {}))
    page = shared_server.get(f"/past?cred={cred}&limit=2").json
    assert [e["seq"] for e in page["past"]] == [5, 4]
    assert page["next"] == 4
    e = page["past"][0]
    assert set(e) == {"seq", "by", "tot", "at", "key", "hold"}
    assert (e["by"], e["tot"], e["key"], e["hold"]) == (5, 15, None, None)
    assert re.fullmatch("[0-9a-f]{32}", page["account"])
    assert t0 - 1000 <= e["at"] <= int(time.time() * 1000) + 1000
    page = shared_server.get(f"/past?cred={cred}&limit=2&before=4").json
    assert [(e["seq"], e["key"]) for e in page["past"]] == [(3, "k2"), (2, None)]
    assert page["next"] == 2
    page = shared_server.get(f"/past?cred={cred}&limit=2&before=2").json
    assert [e["seq"] for e in page["past"]] == [1] and page["next"] is None
    whole = shared_server.get(f"/past?cred={cred}").json
    assert [e["seq"] for e in whole["past"]] == [5, 4, 3, 2, 1]
    assert whole["next"] is None


def test_past_of_unknown_cred_is_404_no_account(shared_server, cred):
    assert_error(shared_server.get(f"/past?cred={cred}"), 404, "no_account")


def test_health_is_200_while_the_store_commits(shared_server):
    r = shared_server.get("/health")
    assert r.status == 200 and r.headers["content-type"] == "application/json"


def tot_200s(srv):
    text = srv.get("/metrics").body.decode()
    lines = [line for line in text.splitlines()
             if line.startswith('accman_requests_total{route="tot",status="200"} ')]
    return int(lines[0].rsplit(" ", 1)[1]) if lines else 0


def test_metrics_count_every_tot_answered_on_either_path(shared_server, cred):
    """A keep-alive /tot one at a time takes the server's fast path,
    pipelined ones the general path; both count in Metrics.tot_ok, which
    /metrics renders as requests_total for route tot, status 200."""
    shared_server.mod(cred, 4)
    before = tot_200s(shared_server)
    with shared_server.connect() as c:
        for _ in range(3):
            c.send(get(f"/tot?cred={cred}"))
            assert c.response().json == {"tot": 4}
        c.send(get(f"/tot?cred={cred}") * 2)
        assert [c.response().status for _ in range(2)] == [200, 200]
    assert tot_200s(shared_server) == before + 5


def test_metrics_is_prometheus_text(shared_server, cred):
    shared_server.mod(cred, 3)
    shared_server.get(f"/tot?cred={cred}")
    shared_server.get("/nope")
    r = shared_server.get("/metrics")
    assert r.status == 200
    assert r.headers["content-type"].startswith("text/plain; version=0.0.4")
    text = r.body.decode()
    for needle in ('accman_requests_total{route="tot",status="200"}',
                   'accman_requests_total{route="mod",status="200"}',
                   'accman_requests_total{route="none",status="404"}',
                   "accman_mod_latency_seconds_bucket{le=",
                   "accman_batch_size_mods_bucket{le=",
                   "accman_fsync_seconds_total ",
                   "accman_open_connections ",
                   "accman_healthy 1"):
        assert needle in text, needle
    sample_values(text)


def test_metrics_count_a_bad_query_as_reaching_no_route(start_server, cred):
    """SERVER.md: route "none" counts a request that reached no route, a
    bad query on any route included; none reaches the store."""
    srv = start_server()
    srv.mod(cred, 10)
    targets = (f"/hold?cred={cred}&by=-9223372036854775808&ttl=1", f"/hold?cred={cred}&by=5&ttl=1",
               f"/settle?cred={cred}&hold=0&use=1", f"/mod?cred={cred}&by=1x")
    for target in targets:
        assert srv.patch(target).json["error"] == "bad_request", target
    m = sample_values(srv.get("/metrics").body.decode())
    assert m['accman_requests_total{route="none",status="400"}'] == len(targets)
    assert not [k for k in m if 'status="400"' in k and 'route="none"' not in k]
    assert srv.tot(cred) == 10


def test_mods_committed_counts_changes_not_refused_calls(start_server, cred):
    """accman_mods_committed_total counts what changed a balance, and
    accman_batches_total the batches that did, on either store: a mod
    refused as insufficient, key_reused or no_account changes nothing, nor
    does a keyed repeat, answered from its first reply (on PostgreSQL one
    that shared a batch with a change was counted as a change)."""
    srv = start_server()

    def committed():
        m = sample_values(srv.get("/metrics").body.decode())
        return m["accman_mods_committed_total"], m["accman_batches_total"]
    assert srv.mod(cred, 10, key="k1").status == 200
    assert committed() == (1, 1)
    assert srv.mod(cred, -11, min=0).json["error"] == "insufficient"
    assert srv.mod(cred, 9, key="k1").json["error"] == "key_reused"
    assert srv.mod("nobody-" + cred, -1).json["error"] == "no_account"
    assert committed() == (1, 1)
    assert srv.mod(cred, -10, min=0).json == {"tot": 0, "seq": 2}
    assert committed() == (2, 2)
    with srv.connect() as c:                # one write: one batch
        c.send(patch(f"/mod?cred={cred}&by=10&key=k1") + patch(f"/mod?cred={cred}&by=3"))
        assert [r.json for r in c.responses(2)] == [{"tot": 10, "seq": 1},
                                                    {"tot": 3, "seq": 3}]
    assert committed() == (3, 3)


@pytest.mark.parametrize("close", [False, True], ids=["keep-alive", "close"])
def test_mod_latency_counts_every_mod_the_store_answers(shared_server, cred, close):
    """accman_mod_latency_seconds is a /mod from its arrival to its
    outcome, durable or refused (SERVER.md, "Metrics"): a refusal the
    store answers at once and a keyed repeat count as a change does, on
    the keep-alive path (the compiled pipeline on the embedded store) and
    on the general one (a closing request)."""
    srv = shared_server
    headers = [("Connection", "close")] if close else []

    def count():
        return sample_values(srv.get("/metrics").body.decode())[
            "accman_mod_latency_seconds_count"]
    before = count()
    targets = [f"/mod?cred={cred}&by=10&key=k1", f"/mod?cred={cred}&by=10&key=k1",
               f"/mod?cred={cred}&by=-11&min=0", f"/mod?cred={cred}&by=9&key=k1",
               f"/mod?cred=nobody-{cred}&by=-1"]
    assert [srv.patch(t, headers=headers).status for t in targets] == [200, 200, 409, 409, 404]
    assert count() - before == len(targets)


def test_every_metric_a_server_renders_is_in_server_md(shared_server):
    """SERVER.md's "Metrics" is where an operator looks a name up: every
    name the server renders, on either store, is there."""
    text = shared_server.get("/metrics").body.decode()
    names = [line.split()[2] for line in text.splitlines() if line.startswith("# TYPE ")]
    doc = (ROOT / "docs" / "SERVER.md").read_text()
    assert len(names) > 20
    assert [n for n in names if f"`{n}" not in doc] == []


def test_every_metric_has_a_help_text_of_its_own(shared_server):
    """A store's statistic that metrics.py does not know is rendered with
    a help text that only repeats its name ("Ledger statistic clusters."):
    an operator reading /metrics learns nothing from it."""
    text = shared_server.get("/metrics").body.decode()
    bare = [line for line in text.splitlines()
            if line.startswith("# HELP ") and "Ledger statistic" in line]
    assert bare == []


def sample_values(text):
    """{name: value} of every sample line: each is a name and a number."""
    samples = [line for line in text.splitlines() if line and not line.startswith("#")]
    values = {}
    for line in samples:
        name, value = line.rsplit(" ", 1)
        values[name] = float(value)
    return values


def test_metrics_count_the_fill_waits(shared_server):
    """Either store's fill wait: waits begun, misses, and waits skipped after
    one (accman.ledger.fill, accman.postgres.committing)."""
    values = sample_values(shared_server.get("/metrics").body.decode())
    names = {f"accman_fill_{k}_total" for k in ("waits", "misses", "skips")}
    assert names <= values.keys()


@pytest.mark.embedded_only("the embedded store's writer follows a write at once, or not")
def test_metrics_count_the_writes_that_followed_another_at_once(shared_server):
    text = shared_server.get("/metrics").body.decode()
    assert "# TYPE accman_back_to_back_writes_total counter" in text
    assert "accman_back_to_back_writes_total" in sample_values(text)


@pytest.mark.embedded_only("checkpoints are the embedded store's write-ahead log's")
def test_metrics_count_the_write_ahead_logs_checkpoints(shared_server):
    values = sample_values(shared_server.get("/metrics").body.decode())
    # One checkpoint at open at least; its time is counted.
    assert values["accman_checkpoints_total"] >= 1
    assert values["accman_checkpoint_seconds_total"] > 0


def test_httpx_round_trip_on_one_keep_alive_connection(shared_server, cred):
    with httpx.Client(base_url=shared_server.url) as client:
        r = client.patch("/mod", params={"cred": cred, "by": "25"})
        assert r.status_code == 200 and r.json() == {"tot": 25, "seq": 1}
        r = client.get("/tot", params={"cred": cred})
        assert r.json() == {"tot": 25}
        r = client.get("/past", params={"cred": cred, "limit": "1"})
        assert r.json()["past"][0]["by"] == 25
        r = client.get("/tot", params={"cred": cred, "x": "1"})
        assert r.status_code == 400 and r.json()["error"]


# --- errors ----------------------------------------------------------------------

@pytest.mark.parametrize("target", [
    "/tot?cred=a%41",                     # percent-encoding is never decoded
    "/tot?cred=%61",
    "/tot?cred=caf\xe9",                  # non-ASCII
    "/tot?cred=" + "a" * 129,             # over CRED_CHARS_MAX
    "/tot?cred=",
    "/tot?cred=a.b",
    "/tot",
    "/tot?cred=a&cred=a",                 # repeated parameter
    "/tot?cred=a&by=1",                   # unknown parameter for this route
    "/past?cred=a&limit=0",
    "/past?cred=a&limit=1001",
    "/past?cred=a&limit=01",
    "/past?cred=a&before=0",
    "/past?cred=a&before=-1",
])
def test_bad_read_queries_are_400(shared_server, target):
    with shared_server.connect() as c:
        c.send(request_bytes("GET", target))
        r = c.response()
        assert_error(r, 400)
        if r.headers.get("connection") == "close":   # bytes no request line may hold
            assert "\xe9" in target and c.closed_by_peer()
        else:
            c.send(get("/health"))                # the connection stays usable
            assert c.response().status == 200


@pytest.mark.parametrize("query", [
    "by=+5", "by=05", "by=0", "by=-0", "by=1e3", "by=1_0", "by=%205", "by=5%20",
    "by=\uff15",                                   # full-width digit five
    "by=\u0665",                                   # Arabic-Indic five
    "by=9223372036854775808", "by=-9223372036854775809",
    "by=", "by=1&by=1", "by=1&min=01", "by=1&min=+0", "by=1&min=1.0",
    "by=1&key=", "by=1&key=" + "k" * 65, "by=1&key=a%2Fb", "by=1&key=a/b",
    "by=1&foo=bar", "by=1&cred=x",
])
def test_bad_mod_queries_are_400_and_change_nothing(shared_server, cred, query):
    shared_server.mod(cred, 7)
    target = f"/mod?cred={cred}&{query}".encode("utf-8").decode("latin-1")
    with shared_server.connect() as c:
        c.send(request_bytes("PATCH", target))
        assert_error(c.response(), 400)
    assert shared_server.tot(cred) == 7
    assert len(shared_server.get(f"/past?cred={cred}").json["past"]) == 1


def test_mod_without_cred_or_by_is_400(shared_server):
    assert_error(shared_server.patch("/mod?by=1"), 400)
    assert_error(shared_server.patch("/mod?cred=abc"), 400)


def test_unknown_path_is_404_not_found_and_keeps_the_connection(shared_server):
    with shared_server.connect() as c:
        c.send(get("/nope"))
        assert_error(c.response(), 404, "not_found")
        c.send(get("/health"))
        assert c.response().status == 200


@pytest.mark.parametrize("method,target,allow", [
    ("POST", "/tot?cred=a", "GET"),
    ("PATCH", "/tot?cred=a", "GET"),
    ("GET", "/mod?cred=a&by=1", "PATCH"),
    ("DELETE", "/past?cred=a", "GET"),
    ("PUT", "/health", "GET"),
])
def test_known_path_with_another_method_is_405_with_allow(shared_server, method, target, allow):
    r = shared_server.request(method, target)
    assert_error(r, 405)
    assert allow in r.headers["allow"]


def framing_cases():
    big_line = "/tot?cred=" + "a" * 4096
    return [(name, raw.replace(b"\r\n", b"\r\nHost: 127.0.0.1\r\n", 1), status)
            for name, raw, status in _framing_cases(big_line)]


def _framing_cases(big_line):
    return [
        # (name, raw bytes, status)
        ("cl_and_te", b"GET /health HTTP/1.1\r\nContent-Length: 0\r\n"
                      b"Transfer-Encoding: chunked\r\n\r\n0\r\n\r\n", 400),
        ("chunked", b"PATCH /mod?cred=a&by=1 HTTP/1.1\r\nTransfer-Encoding: chunked"
                    b"\r\n\r\n0\r\n\r\n", 411),
        ("gzip", b"PATCH /mod?cred=a&by=1 HTTP/1.1\r\nTransfer-Encoding: gzip\r\n\r\n", 400),
        ("two_cl", b"GET /health HTTP/1.1\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n", 400),
        ("obs_fold", b"GET /health HTTP/1.1\r\nX-A: b\r\n c\r\n\r\n", 400),
        ("bare_cr", b"GET /health HTTP/1.1\r\nX-A: b\rc\r\n\r\n", 400),
        ("bad_request_line", b"GET  /health HTTP/1.1\r\n\r\n", 400),
        ("long_line", f"GET {big_line} HTTP/1.1\r\n\r\n".encode(), 414),
        ("header_bytes", b"GET /health HTTP/1.1\r\n" + b"X-Pad: " + b"p" * 9000
                         + b"\r\n\r\n", 431),
        ("header_count", b"GET /health HTTP/1.1\r\n"
                         + b"".join(b"X-H%d: 1\r\n" % i for i in range(70)) + b"\r\n", 431),
        ("body", b"PATCH /mod?cred=a&by=1 HTTP/1.1\r\nContent-Length: 2000\r\n\r\n"
                 + b"x" * 2000, 413),
        ("method", b"BREW /tot?cred=a HTTP/1.1\r\n\r\n", 501),
        ("version", b"GET /health HTTP/2.0\r\n\r\n", 505),
        ("version3", b"GET /health HTTP/3.1\r\n\r\n", 505),
    ]


@pytest.mark.parametrize("name,raw,status", framing_cases(), ids=[c[0] for c in framing_cases()])
def test_framing_errors_are_answered_then_the_connection_closes(shared_server, name, raw, status):
    with shared_server.connect() as c:
        c.send(raw + get("/health"))          # a request after it is never answered
        data = c.read_all()
    replies = parse_responses(data)
    assert len(replies) == 1, data
    assert_error(replies[0], status)
    assert replies[0].headers.get("connection") == "close"


def test_a_small_body_is_read_and_ignored(shared_server, cred):
    with shared_server.connect() as c:
        c.send(b"PATCH /mod?cred=%s&by=3 HTTP/1.1\r\nHost: localhost\r\nContent-Length: 2\r\n\r\n{}"
               % cred.encode() + get(f"/tot?cred={cred}"))
        assert c.response().json == {"tot": 3, "seq": 1}
        assert c.response().json == {"tot": 3}


# --- whole, one byte at a time, pipelined -------------------------------------------

def exchange_cases(cred):
    return [
        patch(f"/mod?cred={cred}&by=50&key=fund"),        # a key: replays are identical
        get(f"/tot?cred={cred}"),
        patch(f"/mod?cred={cred}&by=-80&min=0&key=big"),   # 409
        get(f"/past?cred={cred}&limit=5"),
        get("/health"),
        get(f"/tot?cred={cred}-unknown"),
        get("/nope"),
        request_bytes("POST", f"/tot?cred={cred}"),
        get(f"/tot?cred={cred}&cred={cred}"),
    ]


def test_each_request_sent_whole_then_one_byte_at_a_time(shared_server, cred):
    whole = []
    with shared_server.connect() as c:
        for raw in exchange_cases(cred):
            c.send(raw)
            whole.append(c.response())
    with shared_server.connect() as c:
        for raw, expected in zip(exchange_cases(cred), whole, strict=True):
            c.send_bytewise(raw)
            r = c.response()
            assert (r.status, r.body) == (expected.status, expected.body), raw
    assert [r.status for r in whole] == [200, 200, 409, 200, 200, 404, 404, 405, 400]


@pytest.mark.parametrize("version", ["HTTP/1.1", "HTTP/1.0"])
def test_framing_errors_one_byte_at_a_time(shared_server, version):
    for name, raw, status in framing_cases():
        if name in ("body", "header_bytes", "long_line", "version", "version3"):
            continue                      # long, or the version is the point
        raw = raw.replace(b"HTTP/1.1", version.encode(), 1)
        if name == "chunked" and version == "HTTP/1.0":
            status = 400                  # RFC 9112 6.1: faulty framing, not a missing length
        with shared_server.connect() as c:
            c.send_bytewise(raw, stop_on_reply=True)
            replies = parse_responses(c.read_all())
        assert [r.status for r in replies] == [status], name


def test_three_requests_pipelined_in_one_write(shared_server, cred):
    cases = exchange_cases(cred)
    for i in range(0, len(cases), 3):
        with shared_server.connect() as c:
            c.send(b"".join(cases[i:i + 3]))
            statuses = [r.status for r in c.responses(len(cases[i:i + 3]))]
        assert statuses == [[200, 200, 409], [200, 200, 404], [404, 405, 400]][i // 3]


def test_pipelined_reads_see_the_writes_before_them(shared_server, cred):
    with shared_server.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=10") + get(f"/tot?cred={cred}")
               + patch(f"/mod?cred={cred}&by=5") + get(f"/past?cred={cred}")
               + get(f"/tot?cred={cred}"))
        r = c.responses(5)
    assert r[0].json == {"tot": 10, "seq": 1}
    assert r[1].json == {"tot": 10} or r[1].json == {"tot": 15}  # never before its write
    assert r[2].json == {"tot": 15, "seq": 2}
    assert len(r[3].json["past"]) == 2
    assert r[4].json == {"tot": 15}


# --- keep-alive, close, HTTP/1.0 ----------------------------------------------------------

def test_keep_alive_is_the_default(shared_server):
    with shared_server.connect() as c:
        for _ in range(3):
            c.send(get("/health"))
            r = c.response()
            assert r.status == 200 and "connection" not in r.headers
        assert not c.closed_by_peer(0.2)


def test_connection_close_is_honoured(shared_server):
    with shared_server.connect() as c:
        c.send(request_bytes("GET", "/health", [("Connection", "close")]) + get("/health"))
        replies = parse_responses(c.read_all())
    assert [r.status for r in replies] == [200]
    assert replies[0].headers["connection"] == "close"


def test_http10_closes_unless_keep_alive_is_asked(shared_server):
    with shared_server.connect() as c:
        c.send(request_bytes("GET", "/health", version="HTTP/1.0"))
        replies = parse_responses(c.read_all())
    assert [r.status for r in replies] == [200]
    with shared_server.connect() as c:
        c.send(request_bytes("GET", "/health", [("Connection", "keep-alive")],
                             version="HTTP/1.0"))
        r = c.response()
        assert r.headers["connection"].lower() == "keep-alive"
        c.send(request_bytes("GET", "/health", version="HTTP/1.0"))
        assert c.response().status == 200
        assert c.closed_by_peer()


def test_half_closed_client_gets_its_replies(shared_server, cred):
    with shared_server.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=1") + get(f"/tot?cred={cred}"))
        c.sock.shutdown(socket.SHUT_WR)
        replies = parse_responses(c.read_all())
    assert [r.status for r in replies] == [200, 200]


# --- concurrency --------------------------------------------------------------------------

def test_200_concurrent_charges_on_a_balance_of_100(server, cred):
    assert server.mod(cred, 100).status == 200
    conns = [server.connect() for _ in range(200)]
    barrier = threading.Barrier(len(conns))
    statuses = [None] * len(conns)

    def charge(i):
        barrier.wait()
        conns[i].send(patch(f"/mod?cred={cred}&by=-1&min=0"))
        statuses[i] = conns[i].response().status

    threads = [threading.Thread(target=charge, args=(i,)) for i in range(len(conns))]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    for c in conns:
        c.close()
    assert statuses.count(200) == 100
    assert statuses.count(409) == 100
    assert server.tot(cred) == 0
    past = server.get(f"/past?cred={cred}&limit=1000").json["past"]
    assert len(past) == 101
    assert [e["seq"] for e in past] == list(range(101, 0, -1))
    assert sum(1 for e in past if e["by"] == -1) == 100
    assert all(e["tot"] >= 0 for e in past)


# --- access ---------------------------------------------------------------------------

@pytest.fixture(scope="module")
def token_server(tmp_path_factory, server_store):
    from conftest import spawn_server
    base = tmp_path_factory.mktemp("tokens")
    (base / "tokens").write_text(TOKENS_FILE)
    (base / "tokens").chmod(0o600)
    srv = spawn_server(base / "data", base / "log", tokens=str(base / "tokens"),
                       store=server_store)
    yield srv
    srv.kill()


def test_no_token_is_401_with_www_authenticate(token_server, cred):
    for r in (token_server.get(f"/tot?cred={cred}"),
              token_server.get(f"/past?cred={cred}"),
              token_server.mod(cred, 5),
              token_server.get("/metrics")):
        assert_error(r, 401)
        assert r.headers["www-authenticate"].startswith("Bearer")


def test_a_wrong_token_is_401(token_server, cred):
    for token in ("wrong-token-0123456789abcdef", TOKENS["read"] + "x", TOKENS["read"][:-1]):
        r = token_server.get(f"/tot?cred={cred}", token=token)
        assert_error(r, 401)
        assert "Bearer" in r.headers["www-authenticate"]


@pytest.mark.parametrize("headers,says", [
    ([], "this call needs an Authorization: Bearer token"),
    ([("Authorization", "Basic dXNlcjpwYXNz")],
     "the Authorization header must be Bearer, a space and a token"),
    ([("Authorization", f"Bearer {TOKENS['read']} extra")],
     "the Authorization header must be Bearer, a space and a token"),
    ([("Authorization", f"Bearer {TOKENS['read']}")] * 2,
     "a request must have at most one Authorization header"),
    ([("Authorization", "Bearer nope-nope-nope-nope")], "the bearer token is not valid")])
def test_a_401_says_what_is_wrong_with_the_authorization(token_server, cred, headers, says):
    r = token_server.request("GET", f"/tot?cred={cred}", headers=headers)
    assert assert_error(r, 401, "unauthorized")["detail"] == says


def test_roles(token_server, cred):
    t = TOKENS
    assert_error(token_server.mod(cred, 10, token=t["read"]), 403, "forbidden")
    assert_error(token_server.mod(cred, -1, token=t["read"]), 403)
    assert_error(token_server.mod(cred, 10, token=t["charge"]), 403)     # charge cannot mint
    assert_error(token_server.mod(cred, 10, token=t["service"]), 403)
    assert token_server.tot(cred, token=t["read"]).status == 404         # nothing changed
    assert token_server.mod(cred, 10, token=t["mint"]).json == {"tot": 10, "seq": 1}
    assert_error(token_server.mod(cred, -1, token=t["mint"]), 403)       # mint cannot charge
    assert_error(token_server.get(f"/tot?cred={cred}", token=t["mint"]), 403)
    assert token_server.mod(cred, -3, token=t["charge"], min=0).json == {"tot": 7, "seq": 2}
    assert token_server.mod(cred, -3, token=t["service"], min=0).json == {"tot": 4, "seq": 3}
    assert token_server.tot(cred, token=t["read"]) == 4
    assert token_server.tot(cred, token=t["service"]) == 4
    r = token_server.get(f"/past?cred={cred}", token=t["read"])
    assert len(r.json["past"]) == 3


def test_health_is_open_and_metrics_needs_a_token(token_server):
    assert token_server.get("/health").status == 200
    assert token_server.get("/metrics").status == 401
    assert token_server.get("/metrics", token=TOKENS["read"]).status == 200


def test_tokens_change_per_request_on_one_connection(token_server, cred):
    with token_server.connect() as c:
        for token, status in ((TOKENS["mint"], 200), (TOKENS["read"], 403),
                              (TOKENS["mint"], 200)):
            headers = [("Authorization", f"Bearer {token}")] if token else []
            c.send(patch(f"/mod?cred={cred}&by=1", headers))
            assert c.response().status == status


@pytest.mark.parametrize("token", [None, "nope-nope-nope-nope-nope"])
def test_a_401_closes_the_connection(token_server, cred, token):
    """SPEC "Access": a connection whose request was refused 401 is closed,
    so unauthenticated sockets cannot hold slots; the requests pipelined
    behind it are not taken."""
    headers = [("Authorization", f"Bearer {token}")] if token else []
    with token_server.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=1", [("Authorization", f"Bearer {TOKENS['mint']}")])
               + patch(f"/mod?cred={cred}&by=1", headers)
               + patch(f"/mod?cred={cred}&by=1", [("Authorization", f"Bearer {TOKENS['mint']}")]))
        assert c.response().status == 200
        r = c.response()
        assert r.status == 401 and r.headers["connection"] == "close"
        assert c.closed_by_peer(5)
    assert token_server.tot(cred, token=TOKENS["read"]) == 1


def test_an_unknown_path_without_a_token_is_401(token_server):
    with token_server.connect() as c:
        c.send(get("/nope"))
        assert c.response().status == 401 and c.closed_by_peer(5)


def test_tokens_and_creds_never_reach_the_log(token_server, cred):
    token_server.mod(cred, 1, token=TOKENS["mint"])
    token_server.get(f"/tot?cred={cred}", token="bad-token-zzzzzzzzzzzzzzzz")
    log = token_server.stderr() + (token_server.log_dir / "stdout").read_text()
    for secret in list(TOKENS.values()) + [cred, "bad-token-zzzz"]:
        assert secret not in log


# --- lifecycle ------------------------------------------------------------------------------

def test_state_survives_a_restart(start_server, tmp_path, cred):
    data = tmp_path / "data"
    s = start_server(data)
    for by in (100, -30, 5):
        s.mod(cred, by, key=f"k{by}")
    assert s.stop() == 0
    s = start_server(data)
    assert s.tot(cred) == 75
    assert s.mod(cred, 1).json == {"tot": 76, "seq": 4}
    assert s.mod(cred, -30, key="k-30").json == {"tot": 70, "seq": 2}    # still replays
    assert [e["seq"] for e in s.get(f"/past?cred={cred}").json["past"]] == [4, 3, 2, 1]
    assert s.stop(signal.SIGINT) == 0


def test_sigterm_answers_what_is_in_flight_then_exits_0(start_server, tmp_path, cred):
    data = tmp_path / "data"
    s = start_server(data)
    with s.connect() as c:
        c.send(b"".join(patch(f"/mod?cred={cred}&by=1") for _ in range(300)))
        time.sleep(0.005)
        s.send_signal(signal.SIGTERM)
        replies = parse_responses(c.read_all(10))
    assert s.proc.wait(15) == 0
    statuses = [r.status for r in replies]
    ok = statuses.count(200)
    assert ok >= 1
    # Answered in order: all the 200s, then at most one 503 (shutting down).
    assert statuses[:ok] == [200] * ok and statuses[ok:] in ([], [503])
    assert [r.json["seq"] for r in replies[:ok]] == list(range(1, ok + 1))
    s = start_server(data)
    assert s.tot(cred) == ok
    assert len(s.get(f"/past?cred={cred}&limit=1000").json["past"]) == ok


def test_sigterm_closes_idle_connections_and_refuses_new_ones(start_server):
    s = start_server()
    with s.connect() as idle:
        idle.send(get("/health"))
        idle.response()
        s.send_signal(signal.SIGTERM)
        assert idle.closed_by_peer()
    assert s.proc.wait(15) == 0


def test_a_second_server_on_the_same_data_dir_exits_before_binding(start_server, tmp_path):
    data = tmp_path / "data"
    first = start_server(data)
    # Same port as the first: if it bound before opening the store, the
    # message would be about the port.
    second = start_server(data, port=first.port, wait_ready=False)
    assert second.proc.wait(15) == 2
    err = second.stderr()
    assert "in use" in err and str(data) in err
    assert "Traceback" not in err and len(err.strip().splitlines()) == 1
    assert first.get("/health").status == 200


# --- limits ---------------------------------------------------------------------------------

def test_a_trickled_head_is_cut_by_the_head_deadline(start_server):
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "0.6"})
    raw = get("/tot?cred=" + "a" * 100)
    with s.connect() as c:
        t0 = time.monotonic()
        sent = 0
        try:
            # One byte every 50 ms: each byte is "activity", yet the whole
            # head needs ~6 s, ten times the deadline.
            while sent < len(raw) and time.monotonic() - t0 < 5:
                c.send(raw[sent:sent + 1])
                sent += 1
                time.sleep(0.05)
                if c.closed_by_peer(0.001):
                    break
        except OSError:
            pass
        c.closed_by_peer(3)
        elapsed = time.monotonic() - t0
        replies = parse_responses(c.buf)
    assert sent < len(raw)
    assert elapsed < 3
    assert [r.status for r in replies] == [408]
    assert replies[0].json["error"] == "timeout"


def test_a_complete_slow_request_inside_the_deadline_is_served(start_server):
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "1.5"})
    with s.connect() as c:
        # A byte every 2 ms: the head takes a small part of the deadline,
        # which leaves the client room to be descheduled on a busy machine.
        c.send_bytewise(get("/health"), delay_s=0.002)
        assert c.response().status == 200
        time.sleep(1.6)                     # idle between requests is not a head
        c.send(get("/health"))
        assert c.response().status == 200


def test_whole_reads_after_a_trickled_one_run_no_head_deadline_and_count_as_activity(
        start_server, cred):
    """The embedded store takes a read that is one whole /tot in C
    (Pipeline.quick): the head deadline, set by the trickled head before
    it, ends with that head, and every read counts against the idle time.
    The head comes in four pieces, so that it arrives well within its
    deadline even when the client is descheduled for a while; the idle
    time is measured from before the last read, which it must run from."""
    s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "0.8", "ACCMAN_IDLE_TIMEOUT_S": "1"})
    with s.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=5"))
        assert c.response().status == 200
        head = get(f"/tot?cred={cred}")
        step = -(-len(head) // 4)
        for i in range(0, len(head), step):
            c.send(head[i:i + step])
            time.sleep(0.01)
        assert c.response().status == 200
        for _ in range(6):              # 1.5 s: past the head deadline, 1.5 idle times
            time.sleep(0.25)
            t0 = time.monotonic()
            c.send(get(f"/tot?cred={cred}"))
            r = c.response()
            assert (r.status, r.json) == (200, {"tot": 5})
        assert c.closed_by_peer(5)
        assert 0.99 < time.monotonic() - t0 < 3


def test_an_idle_keep_alive_connection_is_closed(start_server):
    """The idle time runs from the connection's last activity, its reply,
    which comes after t0: the close comes no sooner than the idle time."""
    s = start_server(env={"ACCMAN_IDLE_TIMEOUT_S": "0.6"})
    with s.connect() as c:
        t0 = time.monotonic()
        c.send(get("/health"))
        assert c.response().status == 200
        assert c.closed_by_peer(5)
        assert 0.59 < time.monotonic() - t0 < 3
    with s.connect() as c:                  # never sent a byte: idle too
        assert c.closed_by_peer(5)


def test_the_connection_cap_refuses_with_503(start_server):
    s = start_server(env={"ACCMAN_CONNECTIONS_MAX": "4"})
    conns = [s.connect() for _ in range(4)]
    for c in conns:
        c.send(get("/health"))
        assert c.response().status == 200
    with s.connect() as extra:
        data = extra.read_all()
    replies = parse_responses(data)
    assert [r.status for r in replies] == [503]
    assert replies[0].json["error"] == "busy"
    conns.pop().close()
    time.sleep(0.2)
    with s.connect() as c:
        c.send(get("/health"))
        assert c.response().status == 200
    for c in conns:
        c.close()


def test_pipelining_past_the_cap_is_answered_in_order(start_server, cred):
    s = start_server(env={"ACCMAN_PIPELINE_REQUESTS_MAX": "3"})
    reqs = []
    for _ in range(150):
        reqs.append(patch(f"/mod?cred={cred}&by=1"))
        reqs.append(get(f"/tot?cred={cred}"))
    with s.connect() as c:
        c.send(b"".join(reqs))
        replies = c.responses(len(reqs))
    for i in range(150):
        assert replies[2 * i].json == {"tot": i + 1, "seq": i + 1}
        assert replies[2 * i + 1].json["tot"] >= i + 1


def flood(conn, request, seconds):
    """Send `request` pipelined for `seconds` without reading; returns bytes sent."""
    sock = conn.sock
    sock.setblocking(False)
    chunk = request * (65536 // len(request))
    sent = 0
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        try:
            offset = sent % len(chunk)   # a partial send resumes mid-chunk
            sent += sock.send(chunk[offset:])
        except BlockingIOError:
            time.sleep(0.01)
    sock.setblocking(True)
    return sent


@pytest.mark.parametrize("route", ["tot", "mod"])
def test_a_client_that_never_reads_does_not_grow_memory(start_server, cred, route):
    s = start_server(env={"ACCMAN_WRITE_BUFFER_BYTES_MAX": "65536"})
    s.mod(cred, 1)
    request = (get(f"/tot?cred={cred}") if route == "tot"
               else patch(f"/mod?cred={cred}&by=1"))
    for _ in range(200):                  # warm up allocator and caches
        s.get(f"/tot?cred={cred}")
    rss0 = s.rss_kib()
    flooders = [s.connect() for _ in range(4)]
    sent = sum(flood(c, request, 0.4) for c in flooders)
    # Meanwhile another client is served.
    assert s.get("/health").status == 200
    sent += sum(flood(c, request, 0.4) for c in flooders)
    rss1 = s.rss_kib()
    assert sent > 1_000_000 or route == "mod"   # the flood was real (kernel buffers full)
    assert rss1 - rss0 < 40 * 1024, (rss0, rss1, sent)
    for c in flooders:
        c.close()
    time.sleep(0.2)
    assert s.get("/health").status == 200


def test_a_client_that_never_reads_is_dropped_after_the_idle_time(start_server, cred):
    s = start_server(env={"ACCMAN_WRITE_BUFFER_BYTES_MAX": "16384",
                          "ACCMAN_IDLE_TIMEOUT_S": "0.8"})
    s.mod(cred, 1)
    with s.connect(rcvbuf=4096) as c:
        flood(c, get(f"/tot?cred={cred}"), 0.5)
        t0 = time.monotonic()
        # First the requests whose replies the kernel's buffers take are
        # answered (~30k; on PostgreSQL, read by read, seconds on a loaded
        # machine: a CI run took more than 6 s), then the idle time runs.
        deadline = t0 + 30
        dropped = False
        while time.monotonic() < deadline and not dropped:
            r = s.get("/metrics").body.decode()
            dropped = "accman_idle_closes_total 1" in r and "accman_open_connections 1" in r
            assert "accman_head_timeouts_total 0" in r, r
            time.sleep(0.1)
        assert dropped, r


# --- an injected ledger: store failure and a batch that never completes ----------------

FAKE_LEDGER = '''
import sys
from accman.errors import NoAccount, StartupError, Unavailable
from accman.server import run
from accman.store import Page

class FakeLedger:
    """The store interface with a failed store ("failed") or a writer that
    never finishes a batch ("stuck")."""
    inline_reads, unhealthy_detail, open_holds = True, None, 0
    path = cursors = failure = None
    def __init__(self, mode):
        self.mode, self.loop = mode, None
    healthy = property(lambda self: self.mode != "failed")
    stats = property(lambda self: {"batches": 0})
    def bind_loop(self, loop, deliver=None):
        self.loop = loop
    def tot(self, cred):
        return 5
    def read_tot(self, cred, done, ordered=False):
        return 5
    def read_past(self, cred, limit, before, done, ordered=False):
        return Page("00", [], None)
    def submit(self, cred, by, min=None, key=None, done=None, low=None):
        if self.mode == "failed":
            self.loop.call_soon(done, Unavailable("the store failed to commit"))
    def submit_hold(self, cred, by, ttl_s, min, key, done):
        raise Unavailable("no holds here")
    def submit_settle(self, cred, hold, use, done):
        raise Unavailable("no holds here")
    def read_events(self, after, limit, wait_s, done):
        raise Unavailable("no events here")
    def drain_samples(self):
        return [], []
    def end_wait(self, done):
        pass
    def end_waits(self):
        pass
    def close(self):
        print("ledger closed", file=sys.stderr, flush=True)

if sys.argv[1] == "incomplete":
    del FakeLedger.read_events, FakeLedger.end_wait
try:
    sys.exit(run(host="127.0.0.1", port=0, data=".", store=FakeLedger(sys.argv[1])))
except StartupError as e:           # as the CLI says it
    sys.exit(f"accman: {e}")
'''


def fake_ledger_server(start_server, tmp_path, mode, env=None):
    script = tmp_path / "fake_ledger.py"
    script.write_text(FAKE_LEDGER)
    return start_server(cmd=[sys.executable, str(script), mode], env=env)


@pytest.mark.embedded_only("it runs an injected fake store, not the fixture's")
def test_a_store_lacking_a_name_of_the_interface_is_refused_at_start(tmp_path):
    """run(store=...) read the store's names as it went: one without
    `read_events` served until an /events request, which failed with an
    AttributeError traceback, and one without `failure` failed only at
    its stop.  It is refused at start, naming what it lacks, and left to
    its caller unclosed (run() did not open it)."""
    script = tmp_path / "fake_ledger.py"
    script.write_text(FAKE_LEDGER)
    proc = subprocess.run([sys.executable, str(script), "incomplete"], capture_output=True,
                          text=True, timeout=60, cwd=tmp_path)
    assert proc.returncode == 1 and proc.stdout == ""
    assert ("accman: the store given to run() lacks end_wait, read_events of the store interface "
            "(accman/store.py): it is not served") in proc.stderr
    assert "Traceback" not in proc.stderr and "ledger closed" not in proc.stderr


@pytest.mark.embedded_only("it serves an injected fake store, not the fixture's; on PostgreSQL: "
                           "tests/postgres/test_serve.py")
def test_a_failed_store_answers_503_and_health_says_so(start_server, tmp_path):
    s = fake_ledger_server(start_server, tmp_path, "failed")
    assert_error(s.mod("abc", 5), 503, "unavailable")
    assert_error(s.get("/health"), 503, "unavailable")
    assert "accman_healthy 0" in s.get("/metrics").body.decode()
    assert s.get("/tot?cred=abc").json == {"tot": 5}
    assert s.stop() == 1                  # stopped, but the store had failed
    assert "ledger closed" in s.stderr()


@pytest.mark.embedded_only("it serves an injected fake store, not the fixture's")
def test_shutdown_grace_bounds_the_wait_for_a_batch(start_server, tmp_path):
    s = fake_ledger_server(start_server, tmp_path, "stuck",
                           env={"ACCMAN_SHUTDOWN_GRACE_S": "0.5"})
    with s.connect() as c:
        c.send(patch("/mod?cred=abc&by=1"))
        time.sleep(0.1)
        t0 = time.monotonic()
        s.send_signal(signal.SIGTERM)
        assert c.read_all(5) == b""       # never acknowledged
        assert s.proc.wait(5) == 0
        assert 0.4 < time.monotonic() - t0 < 3
    assert "ledger closed" in s.stderr()


# --- in process: the server's batch delivery beside another user of the loop ---------

def test_mods_over_the_wire_and_amod_on_the_same_loop_all_complete(tmp_path):
    """The server binds the ledger's completions to its own `deliver`; an
    `amod` by other code on that loop (its callback is not the server's)
    still completes, in the same batches as the wire's mods."""
    import asyncio

    import uvloop

    from accman import Ledger

    async def main():
        with Ledger(str(tmp_path / "d")) as led:
            async with served_in_process(led) as (_, host, port):
                return await asyncio.wait_for(asyncio.gather(
                    asyncio.gather(*(over_the_wire(host, port, i) for i in range(8))),
                    asyncio.gather(*(led.amod("local", 1) for _ in range(40)))), 10)

    async def over_the_wire(host, port, i):
        reader, writer = await asyncio.open_connection(host, port)
        replies = []
        for _ in range(5):
            writer.write(request_bytes("PATCH", f"/mod?cred=w{i}&by=2"))
            replies.append(await read_reply(reader))
        writer.close()
        return replies

    wire, local = uvloop.run(main())
    for replies in wire:
        assert replies == [(b"200", b'{"tot":%d,"seq":%d}' % (2 * n, n)) for n in range(1, 6)]
    assert sorted(local) == [(n, n) for n in range(1, 41)]


def test_a_sigterm_sent_at_the_ready_line_stops_the_server(tmp_path):
    """Whoever waits for the ready line may signal at once.  It was printed
    between two runs of the loop, where uvloop hears no signal: such a
    SIGTERM was lost and the server served on.  Here the signal is sent
    from within the ready line's own call, every time."""
    import subprocess
    code = ("import os, signal, sys\n"
            "from accman.server.run import run\n"
            "sys.exit(run(port=0, data=sys.argv[1],\n"
            "             ready=lambda line: os.kill(os.getpid(), signal.SIGTERM)))\n")
    proc = subprocess.run([sys.executable, "-c", code, str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert "SIGTERM: stopping" in proc.stderr


def test_sigterm_stops_a_server_whose_stderr_reader_has_gone(tmp_path):
    """The stop's own log line must not stop the stop: with stderr a pipe
    whose reader closed, SIGTERM still ends the server, exit 0."""
    import subprocess
    read_end, write_end = os.pipe()
    proc = subprocess.Popen([sys.executable, "-m", "accman", "serve", "--port", "0",
                             "--data", str(tmp_path / "d")], stdout=subprocess.PIPE,
                            stderr=write_end, text=True)
    os.close(write_end)
    try:
        assert proc.stdout.readline().startswith("accman: serving")
        os.close(read_end)                     # the reader goes away
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(60) == 0              # the stop's grace, on a loaded machine
    finally:
        if proc.poll() is None:
            proc.kill()


def test_serve_s_log_lines_are_its_own_and_name_an_exception_by_type_and_place(capsys):
    """accman serve says AccMan's loggers' warnings as its own lines
    ("accman: " first, once, whatever the root logger has) and names an
    exception by its type and place, never its message nor a traceback."""
    import logging

    from accman.server.say import SayHandler, log_to_stderr
    logger = logging.getLogger("accman")
    saved = logger.handlers[:], logger.propagate
    root = logging.StreamHandler(sys.stderr)
    logging.getLogger().addHandler(root)
    try:
        logger.handlers.clear()
        log_to_stderr()
        log_to_stderr()                                 # once, however often asked
        assert [type(h) for h in logger.handlers] == [SayHandler]
        try:
            {}["s3cret-in-a-message"]
        except KeyError:
            logging.getLogger("accman.postgres").exception("a batch failed in AccMan")
        logging.getLogger("accman.ledger").info("not said: below a warning")
    finally:
        logging.getLogger().removeHandler(root)
        logger.handlers[:], logger.propagate = saved
    err = capsys.readouterr().err
    assert re.fullmatch(r"accman: a batch failed in AccMan: KeyError at \S+test_server\.py:\d+\n",
                        err), err



# A Python program started with descriptors 0-2 closed that serves through
# accman.server.run: the ready line and the exit code come back on a pipe.
_RUN_WITHOUT_STREAMS = """
import os, sys
from accman.server import run
out = int(sys.argv[2])
code = run(port=0, data=sys.argv[1], ready=lambda line: os.write(out, line.encode() + b"\\n"))
os.write(out, b"exit %d\\n" % code)
"""


def test_run_started_without_the_standard_streams_stops_with_exit_0(tmp_path):
    """accman.server.run() called from a program started with descriptors
    0, 1 and 2 closed: the store's files and the loop took those numbers,
    and libuv aborted when it closed one at the stop (SIGABRT, not the exit
    code).  run() opens /dev/null on them itself, as `accman serve` does."""
    import subprocess
    r, w = os.pipe()
    try:
        proc = subprocess.Popen(["bash", "-c", 'exec "$0" -c "$1" "$2" "$3" 0<&- 1>&- 2>&-',
                                 sys.executable, _RUN_WITHOUT_STREAMS, str(tmp_path / "d"),
                                 str(w)], pass_fds=(w,), cwd=ROOT)
    finally:
        os.close(w)
    with os.fdopen(r) as said:
        try:
            line = said.readline()
            assert line.startswith("accman: serving http://127.0.0.1:"), (line, proc.poll())
            port = int(line.split("http://127.0.0.1:", 1)[1].split()[0])
            with socket.create_connection(("127.0.0.1", port), timeout=30) as c:
                c.sendall(b"GET /tot?cred=alice HTTP/1.1\r\nHost: 127.0.0.1\r\n\r\n")
                assert c.recv(65536).startswith(b"HTTP/1.1 404 "), "no /tot answered"
            proc.send_signal(signal.SIGTERM)
            assert proc.wait(60) == 0
            assert said.read() == "exit 0\n"
        finally:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("read", ["/health", "/metrics", "/events?after=0"])
def test_a_read_of_server_state_answered_holds_nothing_back_after_it(tmp_path, read):
    """A read of server state pipelined behind a write holds back the
    requests after it until it is answered (it sees none of them).  Once
    it was, a connection kept holding back: a later mod taken alone, then
    the requests behind it held for the next batch (a review).  Answered,
    it holds nothing back."""
    import asyncio

    import uvloop

    from accman import Ledger

    async def main():
        with Ledger(str(tmp_path / "d")) as led:
            async with served_in_process(led) as (server, host, port):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(patch("/mod?cred=a&by=1") + get(read))
                replies = [await read_reply(reader) for _ in range(2)]
                writer.write(patch("/mod?cred=a&by=1"))     # the next read: taken alone
                replies.append(await read_reply(reader))
                [conn] = server.connections
                held = conn.until_drained
                writer.close()
                return [status for status, _ in replies], held

    assert uvloop.run(main()) == ([b"200"] * 3, False)
