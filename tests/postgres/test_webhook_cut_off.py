"""The front-end that delivers the webhook, cut off from the network
(SCALING.md, "Webhooks"): PostgreSQL finds its role session gone through
the sessions' TCP settings (accman.postgres.connecting.KEEPALIVE), not
after the kernel's two hours, and the other front-end takes the role and
delivers every event from the cursor as saved; every other session of the
cut-off front-end goes as soon, its slot of max_connections with it.  Real PostgreSQL, two real
front-ends (one in a network namespace of its own, whose link is taken
down mid-run: tests/postgres/netns.py), a real receiver."""

import time

from accman.postgres.connecting import KEEPALIVE
from conftest import PYTHON, request_bytes, spawn_command
from webhook_receiver import Receiver, secret_file

from .netns import namespace

SECRET = b"cut-off-webhook-secret-0123456789"
# An idle deliverer's round is one wait for events (WEBHOOK_POLL_WAIT_S),
# then a check of its role, its session queried at most every
# WEBHOOK_LEAD_INTERVAL_S: short ones, so that the role's session is
# seldom silent before the cut and the other front-end tries often.
POLL_WAIT_S = 1.0
LEAD_S = 0.2
ENV = {"ACCMAN_WEBHOOK_POLL_WAIT_S": str(POLL_WAIT_S),
       "ACCMAN_WEBHOOK_LEAD_INTERVAL_S": str(LEAD_S)}
# PostgreSQL ends a session whose client has not answered for
# tcp_user_timeout once a keepalive probe is out (Linux: the timeout, when
# set, decides instead of the probes' count).  The keepalive's own idle
# time and probes are chosen to come to the same.
FOUND_GONE_S = int(KEEPALIVE["tcp_user_timeout"]) / 1000
KEEPALIVE_S = (int(KEEPALIVE["tcp_keepalives_idle"])
               + int(KEEPALIVE["tcp_keepalives_interval"])
               * int(KEEPALIVE["tcp_keepalives_count"]))
# Beyond that, for the hand-over on a loaded machine: far short of the two
# hours a session without those settings keeps the role.
TAKE_OVER_SLACK_S = 20.0
# Before it: the role's session was last heard up to a round before the
# cut, and a second more for the checks' own pace.
EARLY_SLACK_S = POLL_WAIT_S + LEAD_S + 1.0
SESSIONS_MIN = 3
CHARGE_EVERY_S = 0.5        # through the outer front-end, while the role moves
START_WAIT_S = 30.0


def front_end(url, rx, tmp_path, name, ns=None):
    """`accman serve` on the store at `url` with the webhook to `rx`
    (inside `ns` when given), once it serves."""
    cmd = [PYTHON, "-m", "accman", "serve", "--host", "127.0.0.1", "--port", "0",
           "--data", tmp_path / name, "--store", url, "--webhook", rx.url,
           "--webhook-secret", secret_file(tmp_path, SECRET)]
    return spawn_command(ns.command(cmd) if ns else cmd, tmp_path / f"{name}-log",
                         data=tmp_path / name, env=ENV)


def wait_until(cond, what, timeout_s=START_WAIT_S):
    deadline = time.monotonic() + timeout_s
    while not cond():
        assert time.monotonic() < deadline, f"{what}: not within {timeout_s} s"
        time.sleep(0.05)


def newest_event(srv) -> int:
    """The store's newest event id, read through `srv`'s /events."""
    after = 0
    with srv.connect() as c:
        while True:
            c.send(request_bytes("GET", f"/events?after={after}&limit=1000"))
            page = c.response().json
            if not page["events"]:
                return after
            after = page["next"]


def senders(rx) -> set:
    """The addresses the receiver's acknowledged POSTs came from."""
    return {p.peer for p in rx.acked()}


def test_a_front_end_cut_off_gives_its_role_and_sessions_up_within_the_keepalive(
        pg_factory, tmp_path):
    assert KEEPALIVE_S == FOUND_GONE_S, "KEEPALIVE's probes and timeout disagree"
    with namespace() as ns:
        cluster = pg_factory(conf={"listen_addresses": f"'127.0.0.1,{ns.host_addr}'"},
                             start=False)
        cluster.trust(ns.subnet)
        cluster.start()
        cluster.create_database("cut")
        url = cluster.url("cut", host=ns.host_addr)
        with Receiver(SECRET, host=ns.host_addr) as rx:
            inner = front_end(url, rx, tmp_path, "inner", ns)
            outer = None
            try:
                wait_until(lambda: "this front-end delivers now" in inner.stderr(),
                           "the inner front-end takes the role")
                outer = front_end(url, rx, tmp_path, "outer")
                assert outer.mod("cut-a", 10).status == 200
                rx.wait_for(lambda: rx.max_id() >= newest_event(outer), what="the first event")
                assert senders(rx) == {ns.inner_addr}
                # Its writer, listener and role at least: the count below
                # must have something to fall from.
                assert cluster.sessions_from(ns.inner_addr) >= SESSIONS_MIN
                ns.cut()
                t0 = time.monotonic()
                while ns.host_addr not in senders(rx):
                    assert time.monotonic() - t0 < FOUND_GONE_S + TAKE_OVER_SLACK_S, \
                        "the cut-off session kept the role"
                    assert outer.mod("cut-a", -1).status == 200
                    time.sleep(CHARGE_EVERY_S)
                taken_s = time.monotonic() - t0
                assert taken_s >= FOUND_GONE_S - EARLY_SLACK_S, taken_s
                last = newest_event(outer)
                rx.wait_for(lambda: rx.max_id() >= last, what=f"event {last} acknowledged")
                acked = {i for p in rx.acked() for i in p.ids}
                assert acked == set(range(1, last + 1)), sorted(set(range(1, last + 1)) - acked)
                assert all(p.valid(SECRET) for p in rx.snapshot())
                # Idle ones found by their probes, the listener (sent
                # notifications the cut link never acknowledges) by
                # tcp_user_timeout: none waits for the kernel's two hours.
                cluster.until_no_sessions_from(ns.inner_addr,
                                               t0 + FOUND_GONE_S + TAKE_OVER_SLACK_S)
            finally:
                inner.kill()
                if outer is not None:
                    outer.kill()
