"""The front-end that delivers the webhook, cut off from the network
(SCALING.md, "Webhooks"): PostgreSQL finds its role session gone through
that session's TCP keepalive (accman.postgres.cursors.ROLE_KEEPALIVE), not
after the kernel's two hours, and the other front-end takes the role and
delivers every event from the cursor as saved.  Real PostgreSQL, two real
front-ends (one in a network namespace of its own, whose link is taken
down mid-run: tests/postgres/netns.py), a real receiver."""

import time

from accman.postgres.cursors import ROLE_KEEPALIVE
from conftest import PYTHON, request_bytes, spawn_command
from webhook_receiver import Receiver, secret_file

from .netns import namespace

SECRET = b"cut-off-webhook-secret-0123456789"
ENV = {"ACCMAN_WEBHOOK_LEAD_INTERVAL_S": "0.2", "ACCMAN_WEBHOOK_BACKOFF_BASE_S": "0.02",
       "ACCMAN_WEBHOOK_BACKOFF_CAP_S": "0.2", "ACCMAN_WEBHOOK_ATTEMPT_TIMEOUT_S": "0.5",
       "ACCMAN_WEBHOOK_POLL_WAIT_S": "1"}
# PostgreSQL ends a session whose client has gone silent after its
# keepalive's idle time and unanswered probes (a reply it sent and never
# saw acknowledged ends it at tcp_user_timeout, as soon).
FOUND_GONE_S = (int(ROLE_KEEPALIVE["tcp_keepalives_idle"])
                + int(ROLE_KEEPALIVE["tcp_keepalives_interval"])
                * int(ROLE_KEEPALIVE["tcp_keepalives_count"]))
# Beyond that, for the hand-over (the lead interval) on a loaded machine:
# far short of the two hours a session without the keepalive holds the role.
TAKE_OVER_SLACK_S = 20


def front_end(url, rx, tmp_path, name, ns=None):
    """`accman serve` on the store at `url` with the webhook to `rx`
    (inside `ns` when given), once it serves."""
    cmd = [PYTHON, "-m", "accman", "serve", "--host", "127.0.0.1", "--port", "0",
           "--data", tmp_path / name, "--store", url, "--webhook", rx.url,
           "--webhook-secret", secret_file(tmp_path, SECRET)]
    return spawn_command(ns.command(cmd) if ns else cmd, tmp_path / f"{name}-log",
                         data=tmp_path / name, env=ENV)


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


def test_a_deliverer_cut_off_gives_the_role_up_within_its_keepalive(pg_factory, tmp_path):
    with namespace() as ns:
        cluster = pg_factory(conf={"listen_addresses": f"'127.0.0.1,{ns.host_addr}'"},
                             start=False)
        cluster.trust(ns.subnet)
        cluster.start()
        url = cluster.create_database("cut").replace("127.0.0.1", ns.host_addr)
        with Receiver(SECRET, host=ns.host_addr) as rx:
            inner = front_end(url, rx, tmp_path, "inner", ns)       # first: takes the role
            outer = None
            try:
                outer = front_end(url, rx, tmp_path, "outer")
                assert outer.mod("cut-a", 10).status == 200
                rx.wait_for(lambda: rx.max_id() >= newest_event(outer), what="the first events")
                assert senders(rx) == {ns.inner_addr}       # the inner one holds the role
                ns.cut()
                t0 = time.monotonic()
                deadline = t0 + FOUND_GONE_S + TAKE_OVER_SLACK_S
                n = 0
                while ns.host_addr not in senders(rx):
                    assert time.monotonic() < deadline, "the cut-off session kept the role"
                    n += 1
                    assert outer.mod("cut-a", -1, key=f"k{n}").status == 200
                    time.sleep(0.5)
                taken_s = time.monotonic() - t0
                # Not before PostgreSQL could have found the session gone: the
                # inner one held the role until then, whatever it could send.
                assert taken_s >= FOUND_GONE_S - 1, taken_s
                last = newest_event(outer)
                rx.wait_for(lambda: rx.max_id() >= last, what=f"event {last} acknowledged")
                acked = {i for p in rx.acked() for i in p.ids}
                assert acked == set(range(1, last + 1)), sorted(set(range(1, last + 1)) - acked)
                assert all(p.valid(SECRET) for p in rx.snapshot())
            finally:
                inner.kill()
                if outer is not None:
                    outer.kill()
