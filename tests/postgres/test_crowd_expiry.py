"""A crowd of holds due at once on a PostgreSQL store served by two
front-ends, whose upkeep rounds end it concurrently (accman_expire: at most
EXPIRE_HOLDS_MAX a call, the accounts locked SKIP LOCKED so that each due
hold ends once), and one of them killed inside its call, the other
finishing.  Afterwards, tests/crowd.py's check_books: every hold has
exactly one end, balances exact, seq and event ids gap-free, no hold open.

The two front-ends' rounds come every EXPIRE_INTERVAL_S each, at phases
of their own: left alone, one of them often ends the whole crowd before
the other's round comes, and a call that starts with part of the crowd
due takes it all (a call locks, one after the other, the accounts of the
oldest EXPIRE_HOLDS_MAX due holds whose accounts it can lock: one that
starts with fewer due locks every one of them, and the other's call finds
none due that it can lock).  So the test stops both front-ends
(SIGSTOP) from before the crowd is due until all of it is, holds the
counter row's lock (which a call takes last, to number its events), lets
both go on, and waits until a call of each waits for that lock with the
accounts it locked and the holds it ended: the two calls run at once by
construction, and commit once the lock is let go.  The crowd is of 200
accounts and the front-ends end EXPIRE_HOLDS_MAX = 500 holds a call, so
that a call locks a part of the crowd's accounts and the other's call the
next part.
"""

import contextlib
import signal
import time

from conftest import PYTHON, spawn_command

from crowd import check_books, make_crowd, wait_all_ended
from .pgcluster import CounterLock

ACCOUNTS = 200
PER_ACCOUNT = 20            # 4,000 holds
EXPIRE_HOLDS_MAX = 500      # a call's, in the front-ends: the crowd takes eight calls
TTL_S = 4                   # the crowd is made, and the front-ends stopped, before it is due
SERVE = ("import sys; from accman.postgres import upkeep; "
         "upkeep.EXPIRE_HOLDS_MAX = int(sys.argv[1]); "
         "from accman.cli import main; sys.exit(main(sys.argv[2:]))")


def front_ends(url, tmp_path):
    """Two `accman serve` on the database of `url` (EXPIRE_HOLDS_MAX a call
    of accman_expire), each with its own data directory, their sessions
    named fe0 and fe1 in pg_stat_activity."""
    return [spawn_command([PYTHON, "-c", SERVE, str(EXPIRE_HOLDS_MAX), "serve",
                           "--port", "0", "--data", str(tmp_path / f"d{i}"),
                           "--store", f"{url}?application_name=fe{i}"],
                          tmp_path / f"log{i}", data=tmp_path / f"d{i}")
            for i in range(2)]


def wait_both_expiring(pg, dbname, timeout_s=10.0):
    """Until a call of accman_expire of each front-end waits for a lock."""
    sql = ("SELECT count(DISTINCT application_name) FROM pg_stat_activity "
           "WHERE query LIKE 'SELECT accman_expire%' AND wait_event_type = 'Lock'")
    deadline = time.monotonic() + timeout_s
    while pg.psql(sql, dbname) != "2":
        assert time.monotonic() < deadline, (
            f"not both calls waiting within {timeout_s} s: " + pg.psql(
                "SELECT application_name, state, wait_event_type, wait_event, left(query, 40) "
                "FROM pg_stat_activity WHERE datname = current_database()", dbname))
        time.sleep(0.01)


@contextlib.contextmanager
def both_expiring(pg, dbname, fes):
    """The block runs while a call of accman_expire of each front-end,
    with the accounts it locked and the holds it ended, waits for the
    counter row's lock; the calls commit after it (see the module's doc)."""
    for fe in fes:
        fe.send_signal(signal.SIGSTOP)
    stopped_ms = time.time() * 1000
    try:
        first_ms, last_ms = due_ms(pg, dbname)
        assert stopped_ms < first_ms, \
            "the crowd fell due before both front-ends were stopped: made slower than TTL_S"
        time.sleep(max(0.0, last_ms / 1000 + 0.1 - time.time()))
        with CounterLock(pg, dbname):
            for fe in fes:
                fe.send_signal(signal.SIGCONT)
            wait_both_expiring(pg, dbname)
            yield
    finally:
        for fe in fes:
            fe.send_signal(signal.SIGCONT)


def metric(srv, name) -> float:
    for line in srv.get("/metrics").body.decode().splitlines():
        if line.startswith(name + " "):
            return float(line.split()[1])
    raise AssertionError(f"no {name} in /metrics")


def due_ms(pg, dbname) -> tuple[int, int]:
    """When the first and the last open hold fall due, in ms since the epoch."""
    first, last = pg.psql("SELECT min(expires_at), max(expires_at) FROM accman_holds",
                          dbname).split("|")
    return int(first), int(last)


def open_in_db(pg, dbname) -> int:
    return int(pg.psql("SELECT count(*) FROM accman_holds", dbname))


@contextlib.contextmanager
def crowd_on_two_front_ends(pg_url, tmp_path, prefix):
    """(front-ends, database name, {cred: [hold ids]}): front_ends, and a
    crowd made through both on ACCOUNTS credentials named from `prefix`;
    the front-ends killed on the way out."""
    fes = front_ends(pg_url, tmp_path)
    try:
        creds = [f"{prefix}{i}" for i in range(ACCOUNTS)]
        holds = make_crowd(fes[0], creds, PER_ACCOUNT, via=fes, ttl_s=TTL_S)
        yield fes, pg_url.rsplit("/", 1)[1], holds
    finally:
        for fe in fes:
            fe.kill()


def test_two_front_ends_end_a_crowd_of_holds_each_once(pg, pg_url, tmp_path):
    """Both front-ends' calls end holds of the crowd at once (each one's
    mods committed counts the ends it wrote), and every hold ends once."""
    with crowd_on_two_front_ends(pg_url, tmp_path, "c") as (fes, dbname, holds):
        with both_expiring(pg, dbname, fes):
            assert open_in_db(pg, dbname) == ACCOUNTS * PER_ACCOUNT
        wait_all_ended(fes[0])
        wait_all_ended(fes[1])
        check_books(fes[0], holds, {})
        check_books(fes[1], holds, {})
        made = [ACCOUNTS, 0]                # the funding mods, all through fes[0]
        for i in range(ACCOUNTS):
            made[i % 2] += PER_ACCOUNT
        ended = [metric(fe, "accman_mods_committed_total") - n
                 for fe, n in zip(fes, made, strict=True)]
        assert sum(ended) == ACCOUNTS * PER_ACCOUNT
        assert min(ended) > 0, f"one front-end ended none of the crowd: {ended}"


def test_a_front_end_killed_inside_its_call_leaves_the_rest_to_the_other(
        pg, pg_url, tmp_path):
    """fe0 SIGKILLed while its call of accman_expire has ended holds but
    not committed, and its sessions ended as PostgreSQL ends a dead
    client's: its call rolls back, and fe1 ends the rest, each hold once."""
    with crowd_on_two_front_ends(pg_url, tmp_path, "k") as (fes, dbname, holds):
        with both_expiring(pg, dbname, fes):
            fes[0].kill()
            pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    "WHERE application_name = 'fe0'", dbname)
        wait_all_ended(fes[1])
        check_books(fes[1], holds, {})
