"""A crowd of holds due at once (made within a second, as a rule), and the accounting checked
once it has ended (tests/reliability/test_crowd_expiry.py,
tests/postgres/test_crowd_expiry.py): every hold has exactly one end in
the events (a settle for a settle answered 200, an expiry otherwise),
each account's balance is its funding less what its 200 settles used,
its history's seq gap-free and each balance the one before plus `by`,
the event ids gap-free, each history entry one event, and no hold open."""

import itertools
import threading
import time

from conftest import patch, request_bytes

FUNDING = 10 ** 9
AMOUNT = 7          # every hold's
TTL_S = 5           # room to make the crowd, and settle some, on a busy machine
# What a test does once the crowd is made (settles sent "long before the
# ttl", front-ends stopped before it) needs it still open: a crowd whose
# making took the ttl less this is said so, not found as holds ended early.
OPEN_AFTER_MAKING_S = 1.0


def get_json(c, target):
    c.send(request_bytes("GET", target))
    r = c.response()
    return r.status, r.json


def in_threads(target, argses):
    """target(*args) for each args of `argses`, each in a thread of its
    own, all at once; returns once all have."""
    threads = [threading.Thread(target=target, args=args) for args in argses]
    for t in threads:
        t.start()
    for t in threads:
        t.join()


def make_crowd(srv, creds, per_account, via=(), ttl_s=TTL_S):
    """Funds each cred and makes `per_account` holds of AMOUNT on it, for
    `ttl_s`, from the start of a whole second so that all are made within
    it and fall due in one second (more, on a machine too busy to make them
    within it: crowd_seconds).  Through `srv`, one connection a cred;
    or through each front-end of `via` in turn, one connection each, its
    creds' holds pipelined in turn (c0, c1, .., c0, c1, ..), so that those
    due first are of every account.  Returns {cred: [hold ids]}."""
    with srv.connect(timeout=60) as c:
        c.send(b"".join(patch(f"/mod?cred={cred}&by={FUNDING}") for cred in creds))
        funded = [r.json for r in c.responses(len(creds))]
    assert funded == [{"tot": FUNDING, "seq": 1}] * len(creds)
    groups = [(fe, creds[i::len(via)]) for i, fe in enumerate(via)] or [
        (srv, [cred]) for cred in creds]
    while time.time() % 1 > 0.02:
        time.sleep(0.002)
    holds = {}

    def make(fe, group):
        order = group * per_account
        with fe.connect(timeout=60) as c:
            c.send(b"".join(patch(f"/hold?cred={cred}&by=-{AMOUNT}&ttl={ttl_s}")
                            for cred in order))
            replies = c.responses(len(order))
        assert [r.status for r in replies] == [200] * len(order)
        for cred, r in zip(order, replies, strict=True):
            holds.setdefault(cred, []).append(r.json["hold"])

    began = time.monotonic()
    in_threads(make, groups)
    took_s = time.monotonic() - began
    assert took_s < ttl_s - OPEN_AFTER_MAKING_S, \
        f"the crowd took {took_s:.1f} s to make, too near its ttl of {ttl_s} s"
    assert sorted(holds) == sorted(creds)
    return holds


def all_events(srv):
    out, after = [], 0
    with srv.connect(timeout=30) as c:
        while True:
            status, doc = get_json(c, f"/events?after={after}&limit=1000")
            assert status == 200, doc
            if not doc["events"]:
                return out
            out += doc["events"]
            after = doc["next"]


def history(srv, cred):
    """(public account id, the whole history of `cred` oldest first)."""
    out, before = [], None
    with srv.connect(timeout=30) as c:
        while True:
            status, doc = get_json(c, f"/past?cred={cred}&limit=1000"
                                      + ("" if before is None else f"&before={before}"))
            assert status == 200, doc
            out += doc["past"]
            before = doc["next"]
            if before is None:
                return doc["account"], out[::-1]


def open_holds(srv):
    return srv.get("/health").json["open_holds"]


def wait_all_ended(srv, timeout_s=20.0):
    deadline = time.monotonic() + timeout_s
    while open_holds(srv) != 0:
        assert time.monotonic() < deadline, f"holds still open after {timeout_s} s"
        time.sleep(0.01)


def crowd_seconds(events):
    """(first, last): the seconds the crowd falls due in (the embedded
    store's wheel's: the first whole second at or after each hold's ttl);
    one second, or two when making it crossed a second's edge, or more on
    a machine too busy to make it within a second."""
    seconds = {(e["at"] + TTL_S * 1000 + 999) // 1000 for e in events if e["type"] == "hold"}
    return min(seconds), max(seconds)


def check_books(srv, holds, used):
    """The accounting after the crowd has ended: see the module's doc.
    `used` is {(cred, hold): use} of the settles answered 200.  Returns
    (the events, {cred: public account id})."""
    events = all_events(srv)
    assert [e["id"] for e in events] == list(range(1, len(events) + 1))
    ends = {}
    for e in events:
        if e["type"] in ("settle", "expire"):
            ends.setdefault((e["account"], e["hold"]), []).append(e)
    entries, accounts = set(), {}
    for cred, ids in holds.items():
        account, past = history(srv, cred)
        accounts[cred] = account
        assert [e["seq"] for e in past] == list(range(1, len(past) + 1)), cred
        for before, e in itertools.pairwise(past):
            assert e["tot"] == before["tot"] + e["by"], (cred, e)
        entries |= {(account, e["seq"]) for e in past}
        spent = 0
        for hold in ids:
            end = ends.pop((account, hold), [])
            assert len(end) == 1, (cred, hold, end)
            if (cred, hold) in used:
                assert (end[0]["type"], end[0]["by"]) == ("settle", AMOUNT - used[cred, hold])
                spent += used[cred, hold]
            else:
                assert (end[0]["type"], end[0]["by"]) == ("expire", AMOUNT), (cred, end)
        assert past[-1]["tot"] == srv.tot(cred) == FUNDING - spent, cred
    assert ends == {}, "ends of holds no test made"
    assert {(e["account"], e["seq"]) for e in events if e["type"] != "low_balance"} == entries
    assert open_holds(srv) == 0
    return events, accounts
