"""Webhooks over a real server (SPEC "Events", issue 13): `accman serve
--webhook` against a real receiver in this process (tests/webhook_receiver.py)
that answers 500 for a while, is down for a while, holds a POST without
answering, and comes back, while the server is SIGKILLed and restarted.

The checks, against the events the store serves on GET /events:
- at least once: every event the store has was acknowledged by the
  receiver, and the receiver got no event the store does not have, each
  exactly as the store serves it;
- in id order, none skipped: taken in arrival order, every POST holds a run
  of consecutive ids, and the ids a POST brings for the first time start
  right after the highest id seen before it (a re-sent batch brings none);
- every POST signed: AccMan-Signature is the HMAC-SHA256 of its body, and
  AccMan-Event-Ids names its first and last id;
- every acknowledged change (mod, hold, settle) is in the stream.
"""

import os
import signal
import stat
import threading
import time

from accman.server.cursors import parse_cursor
from conftest import Conn, request_bytes
from webhook_receiver import Receiver, secret_file

SECRET = b"reliability-webhook-secret-0123456789"
# Retries every 20-200 ms and short waits: the faults below last about a second.
ENV = {
    "ACCMAN_WEBHOOK_BACKOFF_BASE_S": "0.02",
    "ACCMAN_WEBHOOK_BACKOFF_CAP_S": "0.2",
    "ACCMAN_WEBHOOK_ATTEMPT_TIMEOUT_S": "0.5",
    "ACCMAN_WEBHOOK_POLL_WAIT_S": "1",
    "ACCMAN_WEBHOOK_EVENTS_PER_POST_MAX": "40",
}
CREDS = [f"hook-{i}" for i in range(6)]
WAIT_S = 60.0


def start(start_server, tmp_path, rx, env=None):
    return start_server(data=tmp_path / "data", env={**ENV, **(env or {})},
                        args=["--webhook", rx.url,
                              "--webhook-secret", secret_file(tmp_path, SECRET)])


class Mods:
    """Keyed changes on CREDS over one keep-alive connection: a funding mod
    per credential (with a low-balance threshold that the charges then
    cross), charges, and every tenth a hold and its settle.  `acked` holds
    (type, cred, seq, by, tot) of every 200.  A change whose connection
    broke is sent again as it was on the next connection: its key (a
    settle: its hold and use) applies it at most once."""

    def __init__(self):
        self.acked = []
        self.n = 0
        self.pending = None

    def _next(self):
        self.n += 1
        cred = CREDS[self.n % len(CREDS)]
        if self.n <= len(CREDS):
            return "mod", cred, 1000 + self.n, f"/mod?cred={cred}&by={1000 + self.n}" \
                f"&low=950&key=k{self.n}"
        if self.n % 10 == 0:
            return "hold", cred, -2, f"/hold?cred={cred}&by=-2&ttl=60&key=h{self.n}"
        by = -1 - self.n % 3
        return "mod", cred, by, f"/mod?cred={cred}&by={by}&key=k{self.n}"

    def _apply(self, conn):
        kind, cred, by, target = self.pending
        conn.send(request_bytes("PATCH", target))
        r = conn.response()
        assert r.status == 200, (target, r)
        self.acked.append((kind, cred, r.json["seq"], by, r.json["tot"]))
        if kind == "hold":
            # The settle that ends it: 1 of the 2 used, 1 back (by = N - U).
            self.pending = ("settle", cred, 1,
                            f"/settle?cred={cred}&hold={r.json['hold']}&use=1")
        else:
            self.pending = None

    def run(self, srv, count, stop=None):
        done = 0
        conn = None
        try:
            conn = srv.connect(timeout=10)
            while done < count and not (stop is not None and stop.is_set()):
                if self.pending is None:
                    self.pending = self._next()
                self._apply(conn)
                done += 1
        except (OSError, EOFError):
            if stop is None:
                raise
        finally:
            if conn is not None:
                conn.close()
        return done


def metric(srv, name):
    r = srv.get("/metrics")
    for line in r.body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def store_events(srv):
    """Every event the store serves, read page by page through GET /events."""
    out, after = [], 0
    with srv.connect(timeout=30) as c:
        while True:
            c.send(request_bytes("GET", f"/events?after={after}&limit=1000"))
            r = c.response()
            assert r.status == 200, r
            page = r.json
            if not page["events"]:
                return out
            out += page["events"]
            after = page["next"]


def accounts(srv, mods):
    """The public account id of each credential that a mod funded."""
    return {cred: srv.get(f"/past?cred={cred}&limit=1").json["account"]
            for cred in {m[1] for m in mods.acked}}


def check_delivery(rx, events, mods, account_of):
    """The module's checks (its docstring), on everything the receiver got."""
    ids = [e["id"] for e in events]
    assert ids == list(range(1, len(ids) + 1)), "the store's ids have a gap"
    by_id = {e["id"]: e for e in events}
    posts = rx.snapshot()
    seen = 0
    for p in posts:
        assert p.valid(SECRET), "a POST whose signature does not match its body"
        got = p.ids
        assert got == list(range(got[0], got[-1] + 1)), f"a POST not in id order: {got}"
        assert p.headers["accman-event-ids"] == f"{got[0]}-{got[-1]}"
        assert got[0] <= seen + 1, f"ids {seen + 1}..{got[0] - 1} skipped"
        seen = max(seen, got[-1])
        for e in p.events:
            assert by_id.get(e["id"]) == e, f"event {e['id']} is not the store's"
    acked = {i for p in rx.acked() for i in p.ids}
    assert acked == set(ids), f"not acknowledged: {sorted(set(ids) - acked)[:10]}"
    stream = {(e["type"], e["account"], e["seq"], e["by"], e["tot"]) for e in events}
    for kind, cred, seq, by, tot in mods.acked:
        assert (kind, account_of[cred], seq, by, tot) in stream, \
            f"{kind} {cred} seq {seq} is not an event"
    return posts


def wait_delivered(rx, srv, timeout_s=WAIT_S):
    """Until the receiver has acknowledged the store's newest event."""
    last = store_events(srv)[-1]["id"]
    rx.wait_for(lambda: rx.max_id() >= last, timeout_s, f"event {last} acknowledged")


def test_every_event_arrives_in_order_across_receiver_faults_and_sigkill(start_server,
                                                                         tmp_path):
    mods = Mods()
    with Receiver(SECRET) as rx:
        rx.mode = "fail"
        srv = start(start_server, tmp_path, rx)
        mods.run(srv, 60)
        # 1. The receiver answers 500: retried, the same batch, nothing moves.
        rx.wait_for(lambda: len(rx.snapshot()) >= 3, what="three failed POSTs")
        assert rx.acked() == [] and metric(srv, "accman_webhook_cursor") == 0
        assert metric(srv, "accman_webhook_failures_total") >= 3
        assert metric(srv, "accman_webhook_lag_events") >= 60
        # 2. Down: connection refused, still retried.
        rx.down()
        failures = metric(srv, "accman_webhook_failures_total")
        mods.run(srv, 60)
        deadline = time.monotonic() + WAIT_S
        while metric(srv, "accman_webhook_failures_total") < failures + 3:
            assert time.monotonic() < deadline, "no retries while the receiver was down"
            time.sleep(0.02)
        # 3. Back, but holding POSTs without an answer: SIGKILL with one in flight.
        rx.mode = "hang"
        rx.up()
        rx.wait_for(lambda: len(rx.snapshot()) >= 4, what="a POST held")
        srv.kill()
        # 4. Restarted, the receiver good: resumes after the cursor.
        rx.mode = "ok"
        srv = start(start_server, tmp_path, rx)
        mods.run(srv, 60)
        wait_delivered(rx, srv)
        # 5. SIGKILL under load while delivering, three times.
        for _ in range(3):
            stop = threading.Event()
            worker = threading.Thread(target=mods.run, args=(srv, 10 ** 6, stop))
            worker.start()
            acked = len(rx.acked())
            rx.wait_for(lambda: len(rx.acked()) >= acked + 3,  # noqa: B023 (called here)
                        what="deliveries under load")
            srv.kill()
            stop.set()
            worker.join(30)
            srv = start(start_server, tmp_path, rx)
        mods.run(srv, 20)
        wait_delivered(rx, srv)
        events = store_events(srv)
        posts = check_delivery(rx, events, mods, accounts(srv, mods))
        assert len(mods.acked) >= 200 and len(posts) > 10
        assert {e["type"] for e in events} == {"mod", "hold", "settle", "low_balance"}
        assert metric(srv, "accman_webhook_lag_events") == 0
        assert metric(srv, "accman_webhook_cursor") == events[-1]["id"]
        log = "".join((tmp_path / d / "stderr").read_text() for d in os.listdir(tmp_path)
                      if d.startswith("server"))
        assert SECRET.decode() not in log and "/hooks/accman" not in log
        srv.stop()                  # saves the cursor
        store = start_server.store
        if store.embedded:
            cursor = tmp_path / "data" / "webhook.cursor"
            assert stat.S_IMODE(cursor.stat().st_mode) == 0o600
            assert parse_cursor("webhook", cursor.read_bytes()) == events[-1]["id"]
        else:                   # a row of the store, which its front-ends share
            row = store.pg.psql("SELECT value FROM accman_cursors WHERE name = 'webhook'",
                                store.dbname(tmp_path / "data"))
            assert int(row) == events[-1]["id"]


def test_sigterm_with_a_post_in_flight_exits_and_the_batch_is_sent_again(start_server,
                                                                          tmp_path):
    mods = Mods()
    with Receiver(SECRET) as rx:
        rx.mode = "hang"
        srv = start(start_server, tmp_path, rx, env={"ACCMAN_WEBHOOK_ATTEMPT_TIMEOUT_S": "30"})
        mods.run(srv, 5)
        rx.wait_for(lambda: len(rx.snapshot()) == 1, what="a POST held")
        t0 = time.monotonic()
        assert srv.stop(signal.SIGTERM) == 0
        assert time.monotonic() - t0 < 10, "SIGTERM waited for the receiver"
        held = rx.snapshot()[0]
        rx.mode = "ok"
        srv = start(start_server, tmp_path, rx)
        wait_delivered(rx, srv)
        again = rx.acked()[0]
        assert again.ids[0] == held.ids[0] == 1
        check_delivery(rx, store_events(srv), mods, accounts(srv, mods))


def test_a_receiver_that_never_answers_does_not_hold_up_mods(start_server, tmp_path):
    """Never on the commit path: with a POST held open by the receiver (and
    the attempt timeout far away), mods are answered as usual."""
    with Receiver(SECRET) as rx:
        rx.mode = "hang"
        srv = start(start_server, tmp_path, rx, env={"ACCMAN_WEBHOOK_ATTEMPT_TIMEOUT_S": "60"})
        mods = Mods()
        mods.run(srv, 1)
        rx.wait_for(lambda: len(rx.snapshot()) == 1, what="a POST held")
        assert mods.run(srv, 300) == 300
        with Conn(srv.host, srv.port) as c:
            c.send(request_bytes("GET", "/health"))
            assert c.response().status == 200
        assert len(rx.snapshot()) == 1 and rx.snapshot()[0].answered is None
        assert metric(srv, "accman_webhook_cursor") == 0
        assert metric(srv, "accman_webhook_lag_events") >= 301
