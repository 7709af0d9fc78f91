"""A front-end cut off from PostgreSQL with a batch in flight (SCALING.md,
"Failover"; SPEC "Durability and order"): the batch reached the database
and commits there after the cut, its reply lost on the way back.  The
front-end answers its caller 503 unavailable, its outcome unknown, at
COMMIT_TIMEOUT_S: never 200, never "not applied".  The same mod sent
again with its key through another front-end gets the first reply and is
applied once; and the cut-off sessions, the writer's reply never
acknowledged, leave the database within the sessions' keepalive
(accman.postgres.connecting.KEEPALIVE).  Once the link is back, the
front-end reconnects by itself and answers its reads and writes, none of
them on a session the database ended meanwhile.  Real PostgreSQL, two
real front-ends (one in a network namespace of its own whose link is
taken down: tests/postgres/netns.py), real clients inside it."""

import json
import subprocess
import time

from accman.postgres import committing
from accman.postgres.cluster import READ_POOL_CONNECTIONS_MAX
from accman.postgres.connecting import KEEPALIVE
from conftest import PYTHON, parse_responses, spawn_command

from .netns import namespace
from .pgcluster import CounterLock

# The cut-off front-end gives a commit up after this long (its own
# COMMIT_TIMEOUT_S, 10 s in production), for a shorter test: long enough
# that the cut, which takes a client's start, psql's looks and `ip`, comes
# before it on a loaded machine, and short enough to tell from 10 s.
COMMIT_TIMEOUT_S = 5.0
# How long before the test sees the batch waiting in the database the
# batch may have been sent: psql's looks every 10 ms, each a process.
SEEN_WITHIN_S = 1.0
SERVE = ("import sys; from accman.postgres import committing; "
         "committing.COMMIT_TIMEOUT_S = float(sys.argv[1]); "
         "from accman.cli import main; sys.exit(main(sys.argv[2:]))")
# One request from inside the namespace, to the front-end there; its reply
# as read to the connection's end.
CLIENT = ("import socket, sys\n"
          "s = socket.create_connection(('127.0.0.1', int(sys.argv[1])), 60)\n"
          "s.sendall(sys.argv[2].encode() + b' ' + sys.argv[3].encode()\n"
          "          + b' HTTP/1.1\\r\\nHost: localhost\\r\\nConnection: close\\r\\n\\r\\n')\n"
          "got = b''\n"
          "while chunk := s.recv(65536):\n"
          "    got += chunk\n"
          "sys.stdout.buffer.write(got)\n")
# Reads sent at once on connections of their own, from inside the
# namespace: each /past takes a connection of the read pool, so that a
# burst meets every connection the pool holds (one at a time, reads would
# take the one last given back, again and again: asyncpg's pool is LIFO).
BURST_READS = 8
BURST = ("import socket, sys\n"
         f"conns = [socket.create_connection(('127.0.0.1', int(sys.argv[1])), 60) "
         f"for _ in range({BURST_READS})]\n"
         "for s in conns:\n"
         "    s.sendall(b'GET /past?cred=cb HTTP/1.1\\r\\nHost: localhost\\r\\n'\n"
         "              b'Connection: close\\r\\n\\r\\n')\n"
         "for s in conns:\n"
         "    print(s.makefile('rb').readline().split()[1].decode())\n")
FOUND_GONE_S = int(KEEPALIVE["tcp_user_timeout"]) / 1000
SLACK_S = 20.0              # for a loaded machine
FUNDS = 100
KEY = "cut-k1"
ROUNDS_AFTER_S = 3.0        # the upkeep rounds after the reads (EXPIRE_INTERVAL_S: 1 s)


def front_end(url, tmp_path, name, ns=None):
    """`accman serve` on the store at `url`, COMMIT_TIMEOUT_S its
    commits' deadline (inside `ns` when given), once it serves."""
    cmd = [PYTHON, "-c", SERVE, str(COMMIT_TIMEOUT_S), "serve", "--host", "127.0.0.1",
           "--port", "0", "--data", tmp_path / name, "--store", url]
    return spawn_command(ns.command(cmd) if ns else cmd, tmp_path / f"{name}-log",
                         data=tmp_path / name)


def inside(ns, srv, method: str, target: str) -> subprocess.Popen:
    """CLIENT run inside `ns` against `srv` (a front-end there)."""
    return subprocess.Popen(ns.command([PYTHON, "-c", CLIENT, srv.port, method, target]),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE)


def answer(client: subprocess.Popen, timeout_s: float = SLACK_S):
    """The one reply `client` (inside's) got."""
    out, err = client.communicate(timeout=timeout_s)
    replies = parse_responses(out)
    assert len(replies) == 1, (out, err)
    return replies[0]


def burst(ns, srv) -> list:
    """BURST run inside `ns` against `srv`: the status of each read."""
    run = subprocess.run(ns.command([PYTHON, "-c", BURST, srv.port]), capture_output=True,
                         text=True, timeout=SLACK_S)
    assert run.returncode == 0, run
    return run.stdout.split()


def test_a_batch_cut_off_mid_commit_is_unknown_and_its_key_replays_it(pg_factory, tmp_path):
    with namespace() as ns:
        pg = pg_factory(conf={"listen_addresses": f"'127.0.0.1,{ns.host_addr}'"}, start=False)
        pg.trust(ns.subnet)
        pg.start()
        pg.create_database("cutb")
        url = pg.url("cutb", host=ns.host_addr)
        inner = outer = client = None
        try:
            inner = front_end(url, tmp_path, "inner", ns)
            outer = front_end(url, tmp_path, "outer")
            assert outer.mod("cb", FUNDS).json == {"tot": FUNDS, "seq": 1}
            # Reads at once until the read pool holds all its connections
            # (with the writer's and the listener's), so that some of them
            # are still held, idle, when the link comes back.
            deadline = time.monotonic() + SLACK_S
            while pg.sessions_from(ns.inner_addr) < 2 + READ_POOL_CONNECTIONS_MAX:
                assert time.monotonic() < deadline, pg.sessions_from(ns.inner_addr)
                assert burst(ns, inner) == ["200"] * BURST_READS
            with CounterLock(pg, "cutb") as lock:
                client = inside(ns, inner, "PATCH", f"/mod?cred=cb&by=-1&key={KEY}")
                sent = time.monotonic()         # or later: the client starts first
                lock.wait_holding()
                held = time.monotonic()         # the batch was sent by now
                # The batch is in the database, waiting for the lock.
                assert pg.sessions_from(ns.inner_addr, "wait_event_type = 'Lock'") == 1
                ns.cut()
                t0 = time.monotonic()
                # Else the writer gave up over a live link: no cut was tested.
                assert t0 - sent < COMMIT_TIMEOUT_S, f"cut {t0 - sent:.1f} s after the send"
            # The lock let go: the batch commits, its reply lost in the cut.
            reply = answer(client, COMMIT_TIMEOUT_S + SLACK_S)
            answered = time.monotonic()
            assert reply.status == 503, reply
            # At the front-end's own deadline, counted from the batch's
            # send (between `sent` and `held`): not before it, and not at
            # the production one.
            assert answered - held >= COMMIT_TIMEOUT_S - SEEN_WITHIN_S, answered - held
            assert answered - sent < committing.COMMIT_TIMEOUT_S, answered - sent
            doc = json.loads(reply.body)
            assert doc["error"] == "unavailable", doc
            assert "may have been applied" in doc["detail"], doc
            # It was applied, and once: the key gives the first reply, and
            # the history has the one charge.
            deadline = time.monotonic() + SLACK_S
            while outer.tot("cb") != FUNDS - 1:
                assert time.monotonic() < deadline, "the cut-off batch did not commit"
                time.sleep(0.1)
            again = outer.mod("cb", -1, key=KEY)
            assert again.status == 200 and again.json == {"tot": FUNDS - 1, "seq": 2}, again
            past = outer.get("/past?cred=cb").json
            assert [e["by"] for e in past["past"]] == [-1, FUNDS], past
            pg.until_no_sessions_from(ns.inner_addr, t0 + FOUND_GONE_S + SLACK_S)
            # The link back: the front-end takes writes again by itself, and
            # its reads are answered, none on a session ended in the cut.
            ns.mend()
            deadline = time.monotonic() + SLACK_S
            while answer(inside(ns, inner, "GET", "/health")).status != 200:
                assert time.monotonic() < deadline, "the front-end did not come back"
                time.sleep(0.2)
            for _ in range(2):
                assert burst(ns, inner) == ["200"] * BURST_READS, inner.stderr()
            assert json.loads(answer(inside(ns, inner, "GET", "/tot?cred=cb")).body) == \
                {"tot": FUNDS - 1}
            assert answer(inside(ns, inner, "PATCH", "/mod?cred=cb&by=-1")).status == 200
            # And the store was lost once, in the cut: not again by an upkeep
            # round (one a second) meeting a session ended in it.
            time.sleep(ROUNDS_AFTER_S)
            said = inner.stderr()
            assert said.count("writes are refused until the store has reconnected") == 1, said
            assert said.count("reconnected to the PostgreSQL store") == 1, said
            # The connections closed as stale said nothing of their own.
            assert inner.stop() == 0
            assert "Traceback" not in inner.stderr() and "exception" not in inner.stderr(), \
                inner.stderr()
        finally:
            if client is not None and client.poll() is None:
                client.kill()
            for fe in (inner, outer):
                if fe is not None:
                    fe.kill()
