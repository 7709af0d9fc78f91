"""GET /events over the wire, against the real server (SPEC "Events"): the
events and their fields, pages and their limits, the long poll (at once,
after its wait, woken by another connection, EVENTS_WAITERS_MAX, at
shutdown), 410 events_trimmed, low_balance once per crossing, the
roles.  Written against the fixtures of tests/conftest.py only."""

import os
import re
import select
import signal
import socket
import time

import pytest

from conftest import ROOT, assert_error, get, parse_responses, patch, request_bytes
from accman.limits import (EVENTS_LIMIT_DEFAULT, EVENTS_LIMIT_MAX, EVENTS_RETENTION_S_MAX,
                           EVENTS_WAIT_S_MAX, EVENTS_WAITERS_MAX)
from ledgerhelp import wait_for

TOKENS = {"read": "read-token-0123456789abcdef", "charge": "charge-token-0123456789abcdef",
          "mint": "mint-token-0123456789abcdef"}
TOKENS_FILE = "".join(f"{role} {token}\n" for role, token in TOKENS.items())
EVENT_FIELDS = {"id", "type", "account", "seq", "by", "tot", "at", "key", "hold"}


def events(srv, after=0, limit=None, wait=None, token=None):
    q = f"/events?after={after}"
    if limit is not None:
        q += f"&limit={limit}"
    if wait is not None:
        q += f"&wait={wait}"
    return srv.get(q, token=token)


def all_events(srv):
    out, after = [], 0
    while True:
        doc = events(srv, after, EVENTS_LIMIT_MAX).json
        if not doc["events"]:
            assert doc["next"] == after
            return out
        out += doc["events"]
        after = doc["next"]


def readable(conn, timeout_s):
    return bool(conn.buf) or bool(select.select([conn.sock], [], [], timeout_s)[0])


# --- the events ---------------------------------------------------------------------------

def test_every_change_is_an_event_with_the_account_s_public_id(server):
    cred = "Sup3rS3cret-credential-0123456789"
    server.mod(cred, 100, key="fund")
    server.patch(f"/hold?cred={cred}&by=-30&ttl=60&key=h")
    server.patch(f"/settle?cred={cred}&hold=2&use=10")
    server.mod("other", 5)
    r = events(server)
    assert r.status == 200 and r.headers["content-type"] == "application/json"
    assert cred.encode() not in r.body                  # the credential never leaves
    doc = r.json
    assert doc["next"] == 4 and all(set(e) == EVENT_FIELDS for e in doc["events"])
    got = [(e["id"], e["type"], e["seq"], e["by"], e["tot"], e["key"], e["hold"])
           for e in doc["events"]]
    assert got == [(1, "mod", 1, 100, 100, "fund", None), (2, "hold", 2, -30, 70, "h", 2),
                   (3, "settle", 3, 20, 90, None, 2), (4, "mod", 1, 5, 5, None, None)]
    account = server.get(f"/past?cred={cred}").json["account"]
    assert [e["account"] for e in doc["events"][:3]] == [account] * 3
    assert doc["events"][3]["account"] != account
    entries = {e["seq"]: e for e in server.get(f"/past?cred={cred}").json["past"]}
    for e in doc["events"][:3]:
        assert {k: e[k] for k in ("seq", "by", "tot", "at", "key", "hold")} == entries[e["seq"]]


def test_ids_run_on_across_a_kill_and_a_restart(start_server, tmp_path):
    data = tmp_path / "d"
    srv = start_server(data=data)
    for _ in range(3):
        srv.mod("a", 1)
    srv.kill()
    srv = start_server(data=data)
    srv.mod("a", 1)
    assert srv.stop() == 0
    srv = start_server(data=data)
    srv.mod("b", 1)
    assert [e["id"] for e in all_events(srv)] == [1, 2, 3, 4, 5]


def test_pages_with_after_and_limit_and_their_bounds(server):
    with server.connect() as c:
        c.send(patch("/mod?cred=a&by=1") * (EVENTS_LIMIT_MAX + 1))
        assert all(r.status == 200 for r in c.responses(EVENTS_LIMIT_MAX + 1))
    doc = events(server, 0, EVENTS_LIMIT_MAX).json
    assert len(doc["events"]) == EVENTS_LIMIT_MAX and doc["next"] == EVENTS_LIMIT_MAX
    # The default, which the clients check pages against (replies.events):
    # the request parser gives /events PAST_LIMIT_DEFAULT's value.
    assert len(events(server).json["events"]) == EVENTS_LIMIT_DEFAULT
    doc = events(server, 995, 3).json
    assert [e["id"] for e in doc["events"]] == [996, 997, 998] and doc["next"] == 998
    assert events(server, 1001).json == {"events": [], "next": 1001}
    assert events(server, 5000).json == {"events": [], "next": 1001}   # told where it ends
    for query in (f"limit={EVENTS_LIMIT_MAX + 1}", "limit=0", "after=-1", "after=01",
                  f"wait={EVENTS_WAIT_S_MAX + 1}", "wait=-1", "wait=1.5", "cred=a",
                  "after=1&after=2"):
        doc = assert_error(server.get(f"/events?{query}"), 400, "bad_request")
        assert re.search(r"\b(limit|after|wait|cred)\b", doc["detail"]), (query, doc)


def test_after_past_an_empty_stream_is_told_it_ends_at_0(server):
    """With no event yet, `next` is 0: a reader that follows it misses none
    of the first events (it was `after` itself, which skipped them)."""
    assert events(server, 1000).json == {"events": [], "next": 0}
    server.patch("/mod?cred=a&by=1")
    assert [e["id"] for e in events(server, 0).json["events"]] == [1]


def test_head_and_pipelined_events_see_the_changes_before_them(server):
    with server.connect() as c:
        c.send(patch("/mod?cred=a&by=7") + get("/events?after=0")
               + request_bytes("HEAD", "/events?after=0") + patch("/mod?cred=a&by=1")
               + get("/events?after=1"))
        replies = [c.response(to_head=h) for h in (False, False, True, False, False)]
    assert [r.status for r in replies] == [200] * 5
    # Each sees the mod before it and not the one after it (SPEC: a read
    # sees every earlier mod of its connection and none of the later ones).
    assert [e["tot"] for e in replies[1].json["events"]] == [7]
    assert replies[1].json["next"] == 1
    assert replies[2].body == b"" and int(replies[2].headers["content-length"]) > 0
    assert [e["tot"] for e in replies[4].json["events"]] == [8]


def test_a_pipelined_long_poll_sees_none_of_the_later_mods(server):
    """A long poll is a read too: the mods pipelined after it wait for its
    reply, which a change elsewhere brings."""
    server.patch("/mod?cred=a&by=1")
    with server.connect() as c:
        c.send(get("/events?after=1&wait=30") + patch("/mod?cred=a&by=5"))
        time.sleep(0.3)
        assert server.get("/tot?cred=a").json == {"tot": 1}    # the later mod waits
        server.patch("/mod?cred=b&by=2")
        poll, mod = c.response(), c.response()
    assert [(e["id"], e["tot"]) for e in poll.json["events"]] == [(2, 2)]
    assert mod.json == {"tot": 6, "seq": 2}


def test_events_need_the_read_role(start_server, tmp_path):
    srv = start_server(data=tmp_path / "d", tokens=TOKENS_FILE)
    srv.mod("a", 1, token=TOKENS["mint"])
    assert_error(events(srv), 401, "unauthorized")
    for role in ("charge", "mint"):
        doc = assert_error(events(srv, token=TOKENS[role]), 403, "forbidden")
        assert "read" in doc["detail"]
    assert events(srv, token=TOKENS["read"]).json["next"] == 1


# --- the long poll ----------------------------------------------------------------------------

def test_a_long_poll_is_answered_at_once_when_events_exist(server):
    server.mod("a", 1)
    t0 = time.monotonic()
    doc = events(server, 0, wait=EVENTS_WAIT_S_MAX).json
    assert [e["id"] for e in doc["events"]] == [1] and time.monotonic() - t0 < 5


def test_a_long_poll_with_nothing_new_answers_empty_after_its_wait(server):
    server.mod("a", 1)
    t0 = time.monotonic()
    assert events(server, 1, wait=1).json == {"events": [], "next": 1}
    assert 0.9 <= time.monotonic() - t0 < 5


def test_long_polls_one_after_another_on_one_connection(server):
    """A long poll that waits alone on a quiet connection reserves room for
    its reply, given back when it is answered: once taken twice, and the
    connection's bound on owed reply bytes drifted by a page each poll."""
    server.patch("/mod?cred=a&by=1")
    with server.connect() as c:
        for _ in range(3):
            c.send(get(f"/events?after=1&limit={EVENTS_LIMIT_MAX}&wait=1"))
            r = c.response()
            assert (r.status, r.json) == (200, {"events": [], "next": 1})
        c.send(get("/tot?cred=a"))
        assert c.response().json == {"tot": 1}


def test_a_long_poll_is_woken_by_a_mod_on_another_connection(server):
    server.mod("a", 1)
    with server.connect() as c:
        c.send(get(f"/events?after=1&wait={EVENTS_WAIT_S_MAX}"))
        assert not readable(c, 0.5)
        t0 = time.monotonic()
        server.mod("a", 2)
        doc = c.response().json
        assert time.monotonic() - t0 < 5
        assert [(e["id"], e["tot"]) for e in doc["events"]] == [(2, 3)] and doc["next"] == 2
        c.send(get("/health"))                  # the connection goes on
        assert c.response().status == 200


def test_a_long_poll_is_woken_by_a_hold_s_expiry(server):
    server.mod("a", 10)
    server.patch("/hold?cred=a&by=-4&ttl=1")
    with server.connect() as c:
        c.send(get("/events?after=2&wait=30"))
        doc = c.response().json
    assert [(e["type"], e["by"], e["tot"], e["hold"]) for e in doc["events"]] == [
        ("expire", 4, 10, 2)]


def fill_with_long_polls(srv, conns):
    """Event 1, then EVENTS_WAITERS_MAX clients long-polling after it (one
    connection each, into `conns`: a poll pipelined behind another waits
    for its turn); returns the 503 of one more, once every poll waits."""
    srv.mod("a", 1)
    for _ in range(EVENTS_WAITERS_MAX):
        c = srv.connect(timeout=30)
        c.send(get("/events?after=1&wait=30"))
        conns.append(c)
    return wait_for(lambda: (r := events(srv, 1, wait=1)).status == 503 and r, 20,
                    "the polls filling the bound")


def test_events_waiters_max_long_polls_and_one_more_is_503_busy(start_server, tmp_path):
    """The real bound, reached over the wire: EVENTS_WAITERS_MAX clients
    long-poll at once (one connection each: a poll pipelined behind another
    waits for its turn), one more is 503 busy, and one mod answers all."""
    srv = start_server(data=tmp_path / "d",
                       env={"ACCMAN_CONNECTIONS_PER_PEER_MAX": EVENTS_WAITERS_MAX + 16})
    conns = []
    try:
        r = fill_with_long_polls(srv, conns)
        doc = assert_error(r, 503, "busy")
        assert f"EVENTS_WAITERS_MAX ({EVENTS_WAITERS_MAX})" in doc["detail"]
        assert events(srv, 0).json["next"] == 1          # a read without wait is served
        srv.mod("a", 1)
        for c in conns:
            assert [e["id"] for e in c.response().json["events"]] == [2]
        assert events(srv, 2, wait=1).json == {"events": [], "next": 2}    # room again
    finally:
        for c in conns:
            c.close()


def test_long_polls_of_clients_that_left_give_their_places_up(start_server, tmp_path):
    """EVENTS_WAITERS_MAX clients long-poll, then all leave: their polls held
    every place until their wait ran out (30 s), and every poll meanwhile
    was 503 busy.  A poll whose client has gone gives its place up."""
    srv = start_server(data=tmp_path / "d",
                       env={"ACCMAN_CONNECTIONS_PER_PEER_MAX": EVENTS_WAITERS_MAX + 16})
    conns = []
    try:
        fill_with_long_polls(srv, conns)
    finally:
        for c in conns:
            c.close()
    r = wait_for(lambda: (r := events(srv, 1, wait=1)).status != 503 and r, 10,
                 "a place freed by a client that left")
    assert r.json == {"events": [], "next": 1}


def cpu_s(srv) -> float:
    """The server process's CPU time so far (user + system), in seconds."""
    with open(f"/proc/{srv.pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_a_request_held_behind_a_long_poll_costs_no_cpu_while_it_waits(server):
    """The requests pipelined after a waiting /events are held until it is
    answered; they are taken again when it is, not by polling every loop
    turn (which spun a core for the whole wait)."""
    server.patch("/mod?cred=a&by=1")
    with server.connect() as c:
        c.send(get("/events?after=1&wait=30") + get("/tot?cred=a"))
        time.sleep(0.3)
        before = cpu_s(server)
        time.sleep(2)
        spent = cpu_s(server) - before
        server.patch("/mod?cred=b&by=2")
        poll, tot = c.response(), c.response()
    assert [e["id"] for e in poll.json["events"]] == [2] and tot.json == {"tot": 1}
    assert spent < 0.5, f"{spent:.2f} s of CPU in 2 s of waiting"


@pytest.mark.parametrize("query", ["after=1000&wait=30", "after=0"])
def test_a_half_close_gets_every_reply_owed_and_ends_a_long_poll(server, query):
    """A client that half-closes still gets every reply it is owed, in full:
    the large ones before its /events, then the /events itself (a long poll
    answered at once: nobody is there to wait for events; a plain read as
    it is).  Ending the poll by cutting the connection lost the replies
    still in its buffers."""
    with server.connect() as c:                         # 1000 entries: ~100 KB a page
        c.send(patch("/mod?cred=a&by=1") * 1000)
        assert all(r.status == 200 for r in c.responses(1000))
    after = int(query.split("&")[0].split("=")[1])
    n = 20
    with server.connect() as c:
        c.send(get("/past?cred=a&limit=1000") * n + get(f"/events?{query}"))
        time.sleep(0.3)
        c.sock.shutdown(socket.SHUT_WR)
        t0 = time.monotonic()
        data = c.read_all(timeout_s=10)
    replies = parse_responses(data)
    assert [r.status for r in replies] == [200] * (n + 1)
    assert all(len(r.json["past"]) == 1000 for r in replies[:n])
    assert replies[n].json["next"] == (after if after else 100)   # a page of 100 from 0
    assert time.monotonic() - t0 < 10


def test_sigterm_answers_waiting_long_polls_at_once(start_server, tmp_path):
    """A stop does not wait out the long polls: they are answered with what
    they have, well within its grace, and the server exits once their
    clients close.  (It used to hold the stop for the whole
    SHUTDOWN_GRACE_S, then cut them off.)"""
    srv = start_server(data=tmp_path / "d")
    srv.mod("a", 1)
    conns = [srv.connect() for _ in range(3)]
    for c in conns:
        c.send(get(f"/events?after=1&wait={EVENTS_WAIT_S_MAX}"))
    time.sleep(0.3)
    t0 = time.monotonic()
    srv.proc.send_signal(signal.SIGTERM)
    for c in conns:
        assert c.response().json == {"events": [], "next": 1}
    assert time.monotonic() - t0 < 5
    for c in conns:
        c.close()
    assert srv.proc.wait(5) == 0


# --- retention ---------------------------------------------------------------------------------

def test_events_past_a_short_retention_are_410_with_first(start_server, tmp_path):
    srv = start_server(data=tmp_path / "d", args=["--events-retention", "1s"])
    for _ in range(3):
        srv.mod("a", 1)
    time.sleep(1.5)
    srv.mod("a", 1)                                 # young: kept, and never the newest
    # A retention pass may come between the ages of events 2 and 3 and trim
    # only 1..2 first (first 3); the next pass takes 3.
    r = wait_for(lambda: (lambda r: r if r.status == 410 and r.json["first"] == 4 else None)(
        events(srv, 0)), timeout_s=10)
    assert_error(r, 410, "events_trimmed")
    # The detail says how to go on, in SERVER.md's words, and the reply is
    # the one SERVER.md shows.
    assert r.json["detail"] == ("events before 4 are past the retention and were trimmed; the "
                                "oldest kept is 4; after=3 goes on from there")
    shown = [line.strip() for line in (ROOT / "docs" / "SERVER.md").read_text().splitlines()
             if line.strip().startswith('{"error":"events_trimmed"')]
    assert shown == [r.body.decode()]
    assert_error(events(srv, 2, wait=5), 410, "events_trimmed")     # at once, no wait
    assert [e["id"] for e in events(srv, 3).json["events"]] == [4]
    m = srv.get("/metrics").body.decode()
    assert re.search(r"(?m)^accman_events_first 4$", m)
    assert re.search(r"(?m)^accman_events_trimmed_total 3$", m)
    assert re.search(r"(?m)^accman_events_written_total 4$", m)
    assert srv.get("/past?cred=a").json["past"][-1]["seq"] == 1    # the history stays whole


@pytest.mark.parametrize("value,ok", [("1s", True), ("90m", True), ("7d", True), ("3600", True),
                                      ("36500d", True), ("36501d", False),
                                      (str(EVENTS_RETENTION_S_MAX + 1), False),
                                      ("0", False), ("1w", False), ("-5", False), ("", False)])
def test_events_retention_takes_a_duration(start_server, tmp_path, value, ok):
    if ok:
        srv = start_server(data=tmp_path / "d", args=["--events-retention", value])
        assert srv.get("/health").status == 200
    else:
        with pytest.raises(RuntimeError, match="events-retention"):
            start_server(data=tmp_path / "d", args=["--events-retention", value])


@pytest.mark.parametrize("value", ["abc", "1.5", "+5", "9223372036854775808", "", "-0", "-00"])
def test_low_balance_takes_a_signed_64_bit_integer(start_server, tmp_path, value):
    """As the wire's low= takes it: `-0`, a 400 there, is refused here."""
    with pytest.raises(RuntimeError, match="low-balance"):
        start_server(data=tmp_path / "d", args=["--low-balance", value])


# --- low_balance ----------------------------------------------------------------------------------

def test_low_balance_once_per_crossing(start_server, tmp_path):
    srv = start_server(data=tmp_path / "d", args=["--low-balance", "50"])
    srv.mod("a", 100)
    srv.mod("a", -50)               # 50: at it, not below
    srv.mod("a", -1)                # 49: crosses
    srv.mod("a", -9)                # 40: already below
    srv.mod("a", 10)                # 50: back at it
    srv.patch("/hold?cred=a&by=-20&ttl=600")    # 30: crosses again, by a hold
    srv.mod("b", 100, low=10)       # b's own threshold
    srv.mod("b", -60)               # 40: above b's 10
    srv.mod("b", -35)               # 5: crosses b's
    assert_error(srv.mod("b", -1, low=3), 400, "bad_request")      # only funding sets it
    low = [(e["seq"], e["by"], e["tot"], e["hold"]) for e in all_events(srv)
           if e["type"] == "low_balance"]
    assert low == [(3, -1, 49, None), (6, -20, 30, 6), (3, -35, 5, None)]
    accounts = [e["account"] for e in all_events(srv) if e["type"] == "low_balance"]
    assert accounts[0] == srv.get("/past?cred=a").json["account"]
    assert accounts[2] == srv.get("/past?cred=b").json["account"]


def test_no_low_balance_without_a_threshold(server):
    server.mod("a", 10)
    server.mod("a", -20)
    assert [e["type"] for e in all_events(server)] == ["mod", "mod"]


def test_many_clients_read_events_while_mods_go_on(server):
    """Readers following the stream see every id once, in order, while
    mods are applied by another connection."""
    n = 300
    with server.connect() as writer, server.connect() as reader:
        writer.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        writer.send(patch("/mod?cred=a&by=1") * n)
        seen, after = [], 0
        deadline = time.monotonic() + 30
        while after < n:
            assert time.monotonic() < deadline
            reader.send(get(f"/events?after={after}&limit=7&wait=5"))
            doc = reader.response().json
            seen += [e["id"] for e in doc["events"]]
            after = doc["next"]
        writer.responses(n)
    assert seen == list(range(1, n + 1))
