"""A crowd of holds due at once (made within a second, as a rule), ended while things go wrong
(SPEC "Holds": a hold not settled within its ttl ends by itself, durably,
also across restarts; every hold has exactly one end; a settle from the ttl
on finds it ended.  "Events": ids grow by one, with no gaps).

The servers are tests/reliability/controlled_serve.py, on the embedded
store with a small BATCH_MODS_MAX: the crowd then ends in hundreds of
batches, each made durable before the next, so that a kill or a settle
lands while the crowd is being ended, not before or after it.  Each test
checks from the replies and /events that it did.  One test holds the
crowd's first commit of ends (controlled_serve's control) and settles
meanwhile.

After each, tests/crowd.py's check_books: every hold has exactly one end,
balances exact, seq and event ids gap-free, no hold open.
"""

import queue
import select
import time

import pytest

from conftest import assert_error, patch, request_bytes
from crowd import (TTL_S, all_events, check_books, crowd_seconds, in_threads, make_crowd,
                   open_holds, wait_all_ended)
import relhelp

controlled = relhelp.controlled      # a fixture: relhelp's, registered here

USE = 2             # every settle's
ACCOUNTS = 4
PER_ACCOUNT = 1000  # holds of each account: 4000 in the crowd
# Eight ends a batch: the crowd ends in 500 batches, each durable before the next.
BATCH_MODS_MAX = 8


@pytest.fixture
def crowd_server(controlled, server_store):
    """start() -> (server, control): relhelp's controlled server, on the
    same data directory at each start, with BATCH_MODS_MAX on the embedded
    store (PostgreSQL's batches are its own)."""
    kw = {"batch_mods_max": BATCH_MODS_MAX} if server_store.embedded else {}
    return lambda: controlled("data", **kw)


@pytest.mark.embedded_only("SIGKILL of the embedded store mid-expiry; PostgreSQL's: "
                           "tests/postgres/test_crowd_expiry.py")
def test_a_crowd_of_holds_ends_once_across_a_kill_mid_expiry(crowd_server):
    """SIGKILL while the crowd is being ended (/health's open holds, read
    just before, shows some ended and others not), then a restart on the
    same data: the store opens, the restarted server ends the rest, and
    every hold has ended exactly once, a hold settled before by its settle
    alone."""
    srv, _ = crowd_server()
    creds = [f"k{i}" for i in range(ACCOUNTS)]
    holds = make_crowd(srv, creds, PER_ACCOUNT)
    made = time.monotonic()
    used = {(cred, hold): USE for cred, ids in holds.items() for hold in ids[::10]}
    with srv.connect() as c:                    # long before the ttl
        c.send(b"".join(patch(f"/settle?cred={cred}&hold={hold}&use={USE}")
                        for cred, hold in used))
        statuses = [r.status for r in c.responses(len(used))]
    assert statuses == [200] * len(used), (
        f"{len(used) - statuses.count(200)} of {len(used)} settles refused, answered "
        f"{time.monotonic() - made:.1f} s after the crowd was made (its ttl {TTL_S} s)")
    crowd = ACCOUNTS * PER_ACCOUNT - len(used)
    deadline = time.monotonic() + TTL_S + 10
    with srv.connect() as c:
        while True:
            c.send(request_bytes("GET", "/health"))
            left = c.response().json["open_holds"]
            if left <= crowd - 10 * BATCH_MODS_MAX:
                break
            assert time.monotonic() < deadline, f"the crowd did not begin to end: {left} open"
            time.sleep(0.001)
    killed_ms = time.time() * 1000
    srv.kill()
    assert 0 < left < crowd, "the kill did not land while the crowd was being ended"
    restarted_ms = time.time() * 1000
    srv, _ = crowd_server()                       # the same data: opened, not refused
    wait_all_ended(srv)
    events, _ = check_books(srv, holds, used)
    expired_at = [e["at"] for e in events if e["type"] == "expire"]
    # Ended by the first server before the kill, and by the second after
    # its start: the kill landed mid-expiry.
    assert sum(at < killed_ms for at in expired_at) >= crowd - left
    assert sum(at >= restarted_ms for at in expired_at) > 0


def settle_at_times(srv, plan, senders=4):
    """Sends each (at_s, cred, hold) of `plan` (sorted by at_s) at its time,
    from `senders` connections; returns (sent_ms, cred, hold, reply) each."""
    todo = queue.Queue()
    for item in plan:
        todo.put(item)
    done = []

    def send():
        with srv.connect(timeout=30) as c:
            while True:
                try:
                    at_s, cred, hold = todo.get_nowait()
                except queue.Empty:
                    return
                time.sleep(max(0.0, at_s - time.time()))
                sent_ms = time.time() * 1000
                c.send(patch(f"/settle?cred={cred}&hold={hold}&use={USE}"))
                done.append((sent_ms, cred, hold, c.response()))

    in_threads(send, [()] * senders)
    assert len(done) == len(plan)
    return done


def test_settles_racing_a_crowd_s_expiry_end_each_hold_once(crowd_server):
    """Settles of a quarter of the crowd, spread from before the holds' ttl
    to after the crowd's second: each is 200 (then its hold ends by it
    alone, before its ttl, its use charged once) or 409 hold_ended as
    expired (then its amount came back whole), and some of them are sent
    while the crowd is being ended."""
    srv, _ = crowd_server()
    creds = [f"r{i}" for i in range(ACCOUNTS)]
    holds = make_crowd(srv, creds, PER_ACCOUNT)
    # From before the crowd's first second to after its last, in the order
    # the holds were made (and fall due): a busy machine that took seconds
    # to make the crowd spreads it over as many.
    first_s, last_s = crowd_seconds(all_events(srv))
    chosen = [(cred, hold) for cred, ids in holds.items() for hold in ids[::4]]
    step_s = (last_s - first_s + 2.4) / len(chosen)
    plan = [(first_s - 1.2 + i * step_s, cred, hold)
            for i, (cred, hold) in enumerate(sorted(chosen, key=lambda ch: ch[1]))]
    replies = settle_at_times(srv, plan)
    used, refused_ms = {}, []
    for sent_ms, cred, hold, r in replies:
        if r.status == 200:
            used[cred, hold] = USE
        else:
            assert "expired" in assert_error(r, 409, "hold_ended")["detail"], r
            refused_ms.append(sent_ms)
    wait_all_ended(srv)
    events, accounts = check_books(srv, holds, used)
    made_ms = {(e["account"], e["hold"]): e["at"] for e in events if e["type"] == "hold"}
    for e in events:
        if e["type"] == "settle":               # before the ttl, never from it on
            assert e["at"] < made_ms[e["account"], e["hold"]] + TTL_S * 1000, e
    assert used and refused_ms, "the settles did not straddle the holds' ttl"
    asked = {(accounts[cred], hold) for cred, hold in chosen}
    wheel_ms = [e["at"] for e in events
                if e["type"] == "expire" and (e["account"], e["hold"]) not in asked]
    # The crowd's end: on the embedded store hundreds of batches from the
    # second on, some settles sent between the first and the last; on
    # PostgreSQL a round's calls of accman_expire, `at` each call's start
    # (whether a settle waited on a call's locks is not seen from here).
    if srv.store.embedded:
        assert any(min(wheel_ms) <= ms <= max(wheel_ms) for ms in refused_ms), \
            "no settle was sent while the crowd was being ended"
    else:
        assert any(ms >= min(wheel_ms) for ms in refused_ms), \
            "no settle was sent once the crowd's round had begun"


def wait_settles_waiting(srv, control, timeout_s=10.0):
    """On PostgreSQL: until a batch waits for a lock besides the held
    round (the settles', on the accounts the round has locked)."""
    if srv.store.embedded:
        time.sleep(0.2)         # the settles are in the book: nothing to wait on
        return
    deadline = time.monotonic() + timeout_s
    sql = (f"SELECT count(*) FROM pg_stat_activity WHERE datname = '{control.dbname}' "
           "AND wait_event_type = 'Lock'")
    while int(control.pg.psql(sql, control.dbname)) < 2:
        assert time.monotonic() < deadline, f"no settle waited within {timeout_s} s"
        time.sleep(0.01)


def test_settles_sent_while_the_crowd_s_end_waits_to_commit_are_refused_as_expired(
        crowd_server):
    """The crowd's first commit of ends is held (a stalled disk; on
    PostgreSQL the round's accman_expire waits for the counter row with
    the accounts locked); settles of crowd holds sent meanwhile all answer
    409 hold_ended as expired once it commits, and each hold ends once,
    its money back whole."""
    srv, control = crowd_server()
    creds = [f"w{i}" for i in range(ACCOUNTS)]
    holds = make_crowd(srv, creds, PER_ACCOUNT)
    control.hold()              # before the first hold is due: the crowd's first commit waits
    try:
        # Only the last second matters here: every hold is due after it.
        _, due_s = crowd_seconds(all_events(srv))
        control.wait_holding(timeout_s=5 + TTL_S)
        assert open_holds(srv) == ACCOUNTS * PER_ACCOUNT
        time.sleep(max(0.0, due_s - time.time()))      # every hold of the crowd is due
        with srv.connect(timeout=30) as c:
            chosen = [(cred, hold) for cred, ids in holds.items() for hold in ids[::40]]
            c.send(b"".join(patch(f"/settle?cred={cred}&hold={hold}&use={USE}")
                            for cred, hold in chosen))
            wait_settles_waiting(srv, control)
            # No reply before the ends they are refused by are durable.
            assert not select.select([c.sock], [], [], 0.5)[0], "a settle answered early"
            control.release()
            replies = c.responses(len(chosen))
    finally:
        control.release()
    for r in replies:
        assert "expired" in assert_error(r, 409, "hold_ended")["detail"], r
    wait_all_ended(srv)
    check_books(srv, holds, {})
