"""`accman serve --store URL` and `accman migrate` as a user runs them: what
only the PostgreSQL store has (the server suite runs on it too, through the
fixtures of tests/conftest.py): /health while no primary is reachable, the
ready line's URL, several clusters, the migrate command."""

import asyncio
import re
import subprocess
import sys
import time

from conftest import (ROOT, assert_error, get, patch, request_bytes, run_accman, server_env,
                      spawn_server)

from accman.client import AccManClient
from accman.postgres.schema import SCHEMA_VERSION
from ledgerhelp import wait_for


def health(srv):
    return srv.get("/health").status


def metrics(srv) -> dict:
    out = {}
    for line in srv.get("/metrics").body.decode().splitlines():
        if line and not line.startswith("#"):
            name, value = line.rsplit(" ", 1)
            out[name] = float(value)
    return out


def test_health_is_503_while_no_primary_is_reachable(pg_factory, tmp_path):
    """SPEC "Routes": /health is 503 while the service cannot commit; an
    idle front-end notices by itself (its upkeep round is its heartbeat),
    refuses writes at once meanwhile (not_applied: never sent), and is
    back once the primary is."""
    pg = pg_factory(name="lost")
    url = pg.create_database("h")
    srv = spawn_server(tmp_path / "data", tmp_path / "log", args=["--store", url])
    try:
        assert srv.mod("a", 5).json == {"tot": 5, "seq": 1}
        assert health(srv) == 200
        pg.kill()
        wait_for(lambda: health(srv) == 503, 10, "/health 503 with the primary gone")
        assert_error(srv.get("/health"), 503, "unavailable")
        assert metrics(srv)["accman_healthy"] == 0
        assert_error(srv.mod("a", 1), 503, "not_applied")
        assert_error(srv.get("/tot?cred=a"), 503, "unavailable")
        pg.start()
        wait_for(lambda: health(srv) == 200, 20, "/health 200 with the primary back")
        assert srv.mod("a", 1).json == {"tot": 6, "seq": 2}      # the refused one never applied
    finally:
        srv.kill()


# What a client is told while PostgreSQL is down: AccMan's sentences only.
OUTAGE_DETAIL = re.compile(
    r"(the store cannot commit(, nothing of this call was applied)?|the database cannot be "
    r"read): the PostgreSQL store "
    r"(lost its connection|cannot be reached( \((connection refused|the database is starting "
    r"up or shutting down)\))?)")
OUTAGE_LOG = re.compile(
    r"accman: the PostgreSQL store (lost its connection|cannot be reached( \([a-z ]+\))?) "
    r"\(\w+ at \S+:\d+\); writes are refused until the store has reconnected")


def test_an_outage_is_said_plainly_and_once(pg_factory, tmp_path):
    """PostgreSQL stopped (pg_ctl) under a running front-end, then started:
    every 503 says in AccMan's words that the store cannot be reached or
    lost its connection, never the driver's (a class, an errno, a call), a
    long poll waiting then among them; a change, never sent, is
    not_applied, a read unavailable;
    stderr has one line when it goes (the error's type and place, not its
    message) and one when it is back, and no traceback however long it
    lasts; the URL's password is nowhere."""
    pg = pg_factory(name="outage")
    url = pg.create_database("o").replace("postgres@", "postgres:s3cret-pw@")
    srv = spawn_server(tmp_path / "data", tmp_path / "log", args=["--store", url])
    try:
        assert srv.mod("a", 5).json == {"tot": 5, "seq": 1}
        poll = srv.connect(timeout=5)
        poll.send(request_bytes("GET", "/events?after=1&wait=60"))
        time.sleep(0.5)                     # waiting when the database goes
        pg.stop()
        wait_for(lambda: health(srv) == 503, 10, "/health 503 with PostgreSQL stopped")
        # Told at once, as a poll made now is, not at its deadline.
        details = [assert_error(poll.response(), 503, "unavailable")["detail"]]
        poll.close()
        for _ in range(4):          # 4 s: asyncpg's pool retried at 1, 2 and 4 s
            for r in (srv.mod("a", 1), srv.patch("/hold?cred=a&by=-1&ttl=60"),
                      srv.patch("/settle?cred=a&hold=1&use=0")):
                details.append(assert_error(r, 503, "not_applied")["detail"])
            for r in (srv.get("/tot?cred=a"), srv.get("/past?cred=a"), srv.get("/events")):
                details.append(assert_error(r, 503, "unavailable")["detail"])
            time.sleep(1)
        assert [d for d in details if not OUTAGE_DETAIL.fullmatch(d)] == []
        pg.start()
        wait_for(lambda: health(srv) == 200, 20, "/health 200 with PostgreSQL back")
        assert srv.mod("a", 1).json == {"tot": 6, "seq": 2}
    finally:
        srv.stop()
    err = srv.stderr()
    assert "Traceback" not in err and "s3cret" not in err, err
    said = [line for line in err.splitlines() if not line.startswith("accman: SIGTERM")
            and line != "accman: stopped"]
    assert len(said) == 2 and OUTAGE_LOG.fullmatch(said[0]), err
    assert said[1] == "accman: reconnected to the PostgreSQL store; taking writes again", err
    assert "s3cret" not in (srv.log_dir / "stdout").read_text()


def test_a_database_that_takes_no_writes_is_503_until_it_does(pg_factory, tmp_path):
    """A primary turned read-only (or a standby reached through a URL of
    target_session_attrs=any): the batch is 503 and says why, and the
    front-end stays unhealthy, its reconnections finding no writable
    database (read-write, the default), until writes are back."""
    pg = pg_factory(name="ro")
    url = pg.create_database("ro")
    srv = spawn_server(tmp_path / "data", tmp_path / "log", args=["--store", url])
    try:
        assert srv.mod("a", 5).json == {"tot": 5, "seq": 1}
        pg.psql("ALTER SYSTEM SET default_transaction_read_only = on")
        pg.psql("SELECT pg_reload_conf()")
        applied = []                                # mods taken before the reload took hold

        def refused():
            r = srv.mod("a", 1)
            applied.extend([1] if r.status == 200 else [])
            return r if r.status == 503 else None
        r = wait_for(refused, 10, "a mod refused by the read-only database")
        assert "takes no writes" in assert_error(r, 503, "not_applied")["detail"]
        for _ in range(20):                         # 2 s: no reconnection passes for healthy
            assert health(srv) == 503
            time.sleep(0.1)
        proc = run_accman("migrate", "--store", url)                # one line, no traceback
        assert proc.returncode == 2 and "(no host of the store URL takes writes)" in \
            proc.stderr, proc.stderr
        assert len(proc.stderr.strip().splitlines()) == 1, proc.stderr
        pg.psql("ALTER SYSTEM RESET default_transaction_read_only")
        pg.psql("SELECT pg_reload_conf()")
        wait_for(lambda: health(srv) == 200, 20, "/health 200 with writes back")
        tot = 6 + len(applied)                      # the refused ones never applied
        assert srv.mod("a", 1).json == {"tot": tot, "seq": tot - 4}
    finally:
        srv.kill()


def test_a_batch_the_database_refuses_stops_writes_until_one_commits(pg, tmp_path):
    """SPEC "Durability": a store that fails to commit stops taking writes.
    A refusal (here a constraint that every history entry breaks, as a
    full disk refuses them) is 503; the front-end then refuses writes
    itself, unhealthy, for a wait that doubles with each refusal in a row,
    and takes them again once the database does."""
    url = pg.create_database("refused")
    srv = spawn_server(tmp_path / "data", tmp_path / "log", args=["--store", url])
    try:
        assert srv.mod("a", 5).json == {"tot": 5, "seq": 1}
        pg.psql("ALTER TABLE accman_history ADD CONSTRAINT refuse CHECK (false) NOT VALID",
                dbname="refused")
        def refused_by_the_database():
            r = srv.mod("a", 1)
            return r if b"refused the batch" in r.body else None
        for _ in range(5):                          # waits of 0.1, 0.2, 0.4, 0.8, then 1.6 s
            r = wait_for(refused_by_the_database, 10, "a batch refused by the database")
            assert r.json["detail"].startswith(
                "the database refused the batch, nothing of it was applied")
            assert r.json["error"] == "not_applied"
        assert health(srv) == 503
        detail = assert_error(srv.mod("b", 1), 503, "not_applied")["detail"]
        assert detail.startswith("the store cannot commit, nothing of this call was applied: "), \
            detail                                                      # not sent
        pg.psql("ALTER TABLE accman_history DROP CONSTRAINT refuse", dbname="refused")
        wait_for(lambda: srv.mod("a", 1).status == 200, 20, "writes back")
        assert health(srv) == 200
        assert srv.get("/tot?cred=a").json == {"tot": 6}
    finally:
        srv.kill()


def test_the_ready_line_names_the_store_without_its_password(pg, tmp_path):
    """Neither the URL's password nor a `password` parameter is shown."""
    url = pg.create_database("ready")
    secret_url = (url.replace("postgres@", "postgres:s3cret-pw@")
                  + "?password=an0ther-pw&application_name=accman")
    srv = spawn_server(tmp_path / "data", tmp_path / "log", args=["--store", secret_url])
    try:
        line = (srv.log_dir / "stdout").read_text().splitlines()[0]
        shown = url.replace("postgres@", "") + "?application_name=accman"
        assert line == f"accman: serving http://127.0.0.1:{srv.port} store={shown}"
        said = srv.stderr() + (srv.log_dir / "stdout").read_text()
        assert "s3cret" not in said and "an0ther" not in said
    finally:
        srv.kill()


def test_a_store_that_cannot_be_reached_is_one_line_and_exit_2(tmp_path):
    """Nothing answering, a host that does not resolve, a Unix-domain host
    with no socket for the port or a certificate file that is not there
    (each said as the file not there, where the driver's error named
    none), a URL that does not parse (a password with a raw `/` reads as a
    port, which the driver's error quoted; now refused with the
    arguments): one line in AccMan's words, no part of the password."""
    from postgres.pgcluster import free_port
    port = free_port()
    cannot = "accman: error: cannot open the PostgreSQL store: cannot connect to a PostgreSQL "
    for url, says in ((f"postgresql://postgres:pw@127.0.0.1:{port}/x", cannot
                       + "cluster of the store: the PostgreSQL store cannot be reached "
                       "(connection refused)"),
                      ("postgresql://postgres:pw@nohost.invalid/x", cannot
                       + "cluster of the store: the PostgreSQL store cannot be reached "
                       "(its host name does not resolve)"),
                      (f"postgresql://postgres:pw@/x?host={tmp_path}&port={port}", cannot
                       + "cluster of the store: the PostgreSQL store cannot be reached "
                       "(a file it needs is not there: a Unix-domain host's socket, or a "
                       "certificate or key the URL names)"),
                      (f"postgresql://postgres:pw@127.0.0.1:{port}/x?sslmode=verify-full&"
                       f"sslrootcert={tmp_path}/none.crt", cannot
                       + "cluster of the store: the PostgreSQL store cannot be reached "
                       "(a file it needs is not there: a Unix-domain host's socket, or a "
                       "certificate or key the URL names)"),
                      (f"postgresql://postgres:s3cret/pw@127.0.0.1:{port}/x",
                       "accman: error: argument --store: the store URL has a port that is "
                       "not a number")):
        proc = run_accman("serve", "--port", 0, "--data", tmp_path / "d", "--store", url)
        assert proc.returncode == 2, proc.stderr
        err = proc.stderr.strip()
        assert len(err.splitlines()) == 1 and "Traceback" not in err, err
        assert err.startswith(says), err
        assert ":pw@" not in err and "s3cret" not in err


def test_a_front_end_that_cannot_listen_takes_back_its_data_directory(pg, tmp_path):
    """The store opened, the port busy: the start fails after --data was
    made for the lock.  It is taken back, so that a later `serve --data`
    of the same path is not refused as a front-end's."""
    import socket
    url = pg.create_database("nolisten")
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        port = busy.getsockname()[1]
        proc = run_accman("serve", "--port", port, "--data", tmp_path / "d", "--store", url)
    assert proc.returncode == 2, proc.stderr
    assert f"cannot listen on 127.0.0.1:{port}" in proc.stderr, proc.stderr
    assert not (tmp_path / "d").exists()


def test_a_front_end_s_data_that_is_not_utf8_is_refused_in_words_that_fit_it(tmp_path):
    """A PostgreSQL front-end's --data holds only its lock, yet its refusal
    of a name that is not UTF-8 said "LevelDB opens its files by that name":
    the embedded store's reason alone.  Refused before any cluster is
    reached (nothing listens at this URL), and nothing is made."""
    proc = run_accman("serve", "--port", 0, "--data", f"{tmp_path}/d\udcff",
                      "--store", "postgresql://127.0.0.1:1/x")
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip() == (
        "accman: error: data: path must be valid UTF-8: AccMan writes the data directory's "
        "name in UTF-8 (in its ready line and messages, and to LevelDB for an embedded store)")
    assert list(tmp_path.iterdir()) == []


def test_migrate_makes_and_upgrades_the_schema_once(pg):
    url = pg.create_database("mig")
    for _ in range(2):
        proc = run_accman("migrate", "--store", url)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"accman: 1 cluster(s) at schema version {SCHEMA_VERSION}"
    assert pg.psql("SELECT version FROM accman_schema", "mig") == str(SCHEMA_VERSION)


def test_migrate_whose_stdout_fails_says_it_is_done_on_stderr_and_exits_4(pg):
    """/dev/full: every write ENOSPC.  The schema is made all the same."""
    url = pg.create_database("migfull")
    with open("/dev/full", "wb") as full:
        proc = subprocess.run([sys.executable, "-m", "accman", "migrate", "--store", url],
                              stdout=full, stderr=subprocess.PIPE, text=True, timeout=60,
                              env=server_env(), cwd=ROOT)
    assert (proc.returncode, proc.stderr) == (4, (
        "accman: error: cannot write to stdout: No space left on device (ENOSPC); "
        f"1 cluster(s) at schema version {SCHEMA_VERSION}\n"))
    assert pg.psql("SELECT version FROM accman_schema", "migfull") == str(SCHEMA_VERSION)


def test_a_store_of_two_clusters_passes_the_clients_order_check(pg, pg_factory, tmp_path):
    """Each cluster numbers its own events and the home cluster merges them
    into one order (accman.postgres.merge).  A follower paging while mods
    land on both sees ids 1..n, every page accepted by the client's check
    that a page starts at after + 1 and ends at next."""
    other = pg_factory(name="second")
    urls = [pg.create_database("order"), other.create_database("order")]
    srv = spawn_server(tmp_path / "data", tmp_path / "log",
                       args=[a for u in urls for a in ("--store", u)])

    async def go():
        async with AccManClient(srv.url) as acc:
            writes = asyncio.gather(*(acc.mod(f"two-{i}", 1 + i) for i in range(60)))
            seen, after = [], 0
            while not writes.done() or len(seen) < 60:
                events, nxt = await acc.events(after, limit=7)
                seen += [e.id for e in events]
                after = nxt if events else after
                await asyncio.sleep(0.01)
            await writes
            return seen
    try:
        assert asyncio.run(go()) == list(range(1, 61))
        held = [int(pg.psql("SELECT count(*) FROM accman_accounts", "order")),
                int(other.psql("SELECT count(*) FROM accman_accounts", "order"))]
        assert sum(held) == 60 and min(held) > 0, held       # both clusters took mods
    finally:
        srv.stop()


def test_two_clusters_serve_one_store(pg, pg_factory, tmp_path):
    """Two --store URLs: accounts spread over both, each served from its
    own; /events numbers every change of both in one gap-free order, and a
    read pipelined behind mods sees them (accman.postgres.merge)."""
    other = pg_factory(name="second")
    urls = [pg.create_database("two"), other.create_database("two")]
    srv = spawn_server(tmp_path / "data", tmp_path / "log",
                       args=[a for u in urls for a in ("--store", u)])
    try:
        creds = [f"c{i}" for i in range(40)]
        for cred in creds:
            assert srv.mod(cred, 3, key="open").json == {"tot": 3, "seq": 1}
            assert srv.mod(cred, -1).json == {"tot": 2, "seq": 2}
        assert all(srv.tot(cred) == 2 for cred in creds)
        held = [int(pg.psql("SELECT count(*) FROM accman_accounts", "two")),
                int(other.psql("SELECT count(*) FROM accman_accounts", "two"))]
        assert sum(held) == len(creds) and min(held) > 0, held
        assert metrics(srv)["accman_accounts"] == len(creds)
        doc = srv.get("/events?limit=1000").json
        assert [e["id"] for e in doc["events"]] == list(range(1, 2 * len(creds) + 1))
        m = metrics(srv)            # what was read is counted written, whatever the round
        assert (m["accman_events_first"], m["accman_events_written_total"]) == \
            (1, 2 * len(creds))
        account = srv.get("/past?cred=c7").json["account"]
        assert [(e["seq"], e["tot"]) for e in doc["events"] if e["account"] == account] == \
            [(1, 3), (2, 2)]
        with srv.connect() as c:
            c.send(b"".join(patch(f"/mod?cred={cred}&by=1") for cred in creds[:8])
                   + get(f"/events?after={2 * len(creds)}&limit=1000"))
            replies = c.responses(9)
        assert [e["id"] for e in replies[-1].json["events"]] == \
            list(range(2 * len(creds) + 1, 2 * len(creds) + 9))
    finally:
        srv.kill()


def test_a_front_end_stopped_while_it_cannot_commit_exits_1_saying_why(pg_factory, tmp_path):
    """SERVER.md, "Running it": exit 1 when the store cannot commit at the
    stop, the last line giving the store's own words, not a default."""
    pg = pg_factory(name="stopped_down")
    url = pg.create_database("d")
    srv = spawn_server(tmp_path / "data", tmp_path / "log", args=["--store", url])
    try:
        assert srv.mod("a", 5).status == 200
        pg.stop("immediate")
        wait_for(lambda: health(srv) == 503, 10, "/health 503 with PostgreSQL stopped")
    finally:
        code = srv.stop()
    last = srv.stderr().splitlines()[-1]
    # A reconnection may meet the postmaster refusing sessions as it shuts
    # down, before its port closes: said as such (errors.describe).
    assert code == 1 and re.fullmatch(r"accman: stopped; the store cannot commit \(the "
                                      r"PostgreSQL store (lost its connection|cannot be reached"
                                      r" \((connection refused|the database is starting up or "
                                      r"shutting down)\))\); the server takes no writes",
                                      last), last


# Another application's tables, in its own schema and in the one AccMan's
# tables go to (the connection's: public).
_ANOTHER_APP = ("CREATE TABLE orders (id int); CREATE TABLE customers (id int); "
                "CREATE SCHEMA billing; CREATE TABLE billing.invoices (id int)")
_BESIDE = ("accman: warning: AccMan's tables were made in schema 'public' of a database "
           "that holds 3 tables of another application (in schemas 'billing', 'public')")


def test_migrate_into_a_database_of_another_application_says_so_once(pg):
    """AccMan's schema made beside another application's tables was made
    without a word: a money store sharing that database's backups, roles
    and load.  Said on stderr when the schema is made there, not again."""
    url = pg.create_database("beside")
    pg.psql(_ANOTHER_APP, "beside")
    said = []
    for _ in range(2):
        proc = run_accman("migrate", "--store", url)
        assert proc.returncode == 0, proc.stderr
        assert proc.stdout.strip() == f"accman: 1 cluster(s) at schema version {SCHEMA_VERSION}"
        said.append(proc.stderr)
    assert said[0].startswith(_BESIDE) and said[0].count("\n") == 1, said[0]
    assert said[1] == "", said[1]
    alone = pg.create_database("alone")
    proc = run_accman("migrate", "--store", alone)
    assert (proc.returncode, proc.stderr) == (0, "")


def test_migrate_of_several_clusters_names_the_one_beside_another_application(pg):
    urls = [pg.create_database("two_alone"), pg.create_database("two_beside")]
    pg.psql("CREATE TABLE orders (id int)", "two_beside")
    proc = run_accman("migrate", "--store", urls[0], "--store", urls[1])
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr.startswith(
        "accman: warning: cluster 2 of 2: AccMan's tables were made in schema 'public' of a "
        "database that holds 1 table of another application (in schema 'public'): "), proc.stderr
    assert proc.stderr.count("\n") == 1, proc.stderr


def test_serve_that_makes_its_schema_beside_another_application_says_so_once(pg, tmp_path):
    url = pg.create_database("servebeside")
    pg.psql(_ANOTHER_APP, "servebeside")
    said = []
    for n in range(2):
        srv = spawn_server(tmp_path / "data", tmp_path / f"log{n}", args=["--store", url])
        try:
            assert srv.mod("a", 5).status == 200
        finally:
            assert srv.stop() == 0
        said.append([line for line in srv.stderr().splitlines() if "another application" in line])
    assert len(said[0]) == 1 and said[0][0].startswith(_BESIDE), said[0]
    assert said[1] == []
