"""A store URL that names a connection service (libpq's service file, by
the URL's service= or by PGSERVICE): its hosts and settings follow the
rule of the URL's own (accman/postgres/connecting.py, SCALING.md)."""

import asyncio
import re
import socket

import pytest
from conftest import assert_error, spawn_server

from accman.errors import StoreError
from accman.postgres import PgStore
from accman.postgres import cluster as cluster_module
from accman.postgres import connecting
from accman.postgres.migrate import migrate
from accman.postgres.service_file import ServiceFileError

from ledgerhelp import wait_for

from .helpers import run, stored
from .pgcluster import free_port

# How long a test waits for a store to reconnect and say so: its backoff
# reaches RECONNECT_BACKOFF_S_MAX (2 s) after a few refusals, and a loaded
# machine stretches each try.
RECONNECT_WAIT_S = 30.0


def _hole():
    """A host cut off: a socket that takes connections and never answers."""
    hole = socket.socket()
    hole.bind(("127.0.0.1", free_port()))
    hole.listen(16)                         # connections queue; nothing answers
    return hole


@pytest.fixture
def service_file(tmp_path, monkeypatch):
    """write(text): the service file, as PGSERVICEFILE names it."""
    path = tmp_path / "pg_service.conf"
    for name in ("PGHOST", "PGPORT", "PGSERVICE", "PGTARGETSESSIONATTRS", "PGSYSCONFDIR"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGSERVICEFILE", str(path))
    return path.write_text


def _named(url, form, monkeypatch, service="accman"):
    """`url` naming `service` by its service= (form "service="), or by PGSERVICE."""
    if form == "PGSERVICE":
        monkeypatch.setenv("PGSERVICE", service)
        return url
    return url + ("&" if "?" in url else "?") + f"service={service}"


@pytest.mark.parametrize("form", ["service=", "PGSERVICE"])
def test_a_service_s_hosts_are_tried_one_at_a_time(pg, pg_url, service_file, monkeypatch,
                                                   form):
    """A service's host list went to asyncpg whole, one connect timeout for
    all its hosts: a host cut off listed first spent it, and the next (the
    new primary, after a failover) was never tried; PGSERVICE was not read
    at all.  Its hosts are tried one at a time, as a URL's are."""
    monkeypatch.setattr(connecting, "CONNECT_TIMEOUT_S", 0.5)
    monkeypatch.setattr(cluster_module, "CONNECT_TIMEOUT_S", 0.5)
    run(migrate([pg_url]))         # made on the host that answers: not the URL's first
    dbname = pg_url.rsplit("/", 1)[1]
    with _hole() as hole:
        service_file(f"[accman]\nhost=127.0.0.1,127.0.0.1\n"
                     f"port={hole.getsockname()[1]},{pg.port}\n"
                     f"dbname={dbname}\nuser=postgres\n")
        url = _named("postgresql:///", form, monkeypatch)

        async def main():
            async with stored(url) as (_, c):
                assert await c.mod("svc", 5) == (5, 1)
                assert await c.tot("svc") == 5
        run(main())
    # The service's database: the URL's path names none.
    assert pg.psql("SELECT count(*) FROM accman_accounts", dbname) == "1"


@pytest.mark.parametrize("attrs,hosts", [("standby", 1), ("any", 2)])
@pytest.mark.parametrize("form", ["service=", "PGSERVICE"])
def test_a_service_s_target_session_attrs_is_checked_as_the_url_s(pg, pg_url, service_file,
                                                                  monkeypatch, form, attrs,
                                                                  hosts):
    """A service's target_session_attrs was overridden by the read-write
    that AccMan gives a URL naming none, without a word: it is read, and
    one that may take a standby is refused at open, as a URL's is."""
    dbname = pg_url.rsplit("/", 1)[1]
    service_file(f"[accman]\nhost={','.join(['127.0.0.1'] * hosts)}\nport={pg.port}\n"
                 f"target_session_attrs={attrs}\n")
    url = _named(f"postgresql://postgres@/{dbname}", form, monkeypatch)
    with pytest.raises(StoreError, match=rf"^cannot connect to a PostgreSQL cluster of the "
                       rf"store: target_session_attrs={attrs} cannot be used"):
        run(PgStore.open([url]))


def test_the_url_s_own_settings_come_before_the_service_s(pg, pg_url, service_file):
    """libpq's order: what the URL gives, then the service, then the
    environment.  The URL's read-write stands before the service's
    `any`, and its host before the service's host cut off."""
    dbname = pg_url.rsplit("/", 1)[1]
    with _hole() as hole:
        service_file(f"[accman]\nhost=127.0.0.1,127.0.0.1\n"
                     f"port={hole.getsockname()[1]},{pg.port}\n"
                     "target_session_attrs=any\n")
        url = (f"postgresql://postgres@127.0.0.1:{pg.port}/{dbname}"
               "?service=accman&target_session_attrs=read-write")

        async def main():
            async with stored(url) as (_, c):
                assert await c.mod("own", 3) == (3, 1)
        run(main())


@pytest.mark.parametrize("host", ["127.0.0.1", "127.0.0.1:"])
@pytest.mark.parametrize("form", ["service=", "PGSERVICE"])
def test_a_service_s_port_is_the_port_of_the_url_s_one_host_named_without_one(
        pg, pg_url, service_file, monkeypatch, form, host):
    """libpq takes the service's port for the one host of a URL named
    without a port, or with an empty one (before PGPORT), where asyncpg
    reads no port= beside the hosts of the URL's authority: the store
    reached PGPORT's port, or 5432 (checked against psql 15)."""
    monkeypatch.setenv("PGPORT", str(free_port()))      # nothing listens there
    dbname = pg_url.rsplit("/", 1)[1]
    service_file(f"[accman]\nport={pg.port}\ndbname={dbname}\n")

    async def main():
        async with stored(_named(f"postgresql://postgres@{host}/", form, monkeypatch)) as (
                _, c):
            assert await c.mod("port", 2) == (2, 1)
    run(main())
    assert pg.psql("SELECT count(*) FROM accman_accounts", dbname) == "1"


def test_a_service_s_ports_for_the_url_s_one_host_are_refused_as_libpq_refuses_them(
        pg, pg_url, service_file, monkeypatch):
    """libpq refuses a service's list of ports for the one host of a URL
    named without a port ("could not match 2 port numbers to 1 hosts"),
    where the store reached PGPORT's port, or 5432, without a word."""
    monkeypatch.setenv("PGPORT", str(pg.port))
    service_file(f"[accman]\nport={pg.port},{pg.port}\n")
    with pytest.raises(StoreError, match=r"^cannot connect to a PostgreSQL cluster of the "
                       r"store: the service accman sets 2 ports for the one host of the "
                       r"store URL, which libpq refuses: give it one port$"):
        run(PgStore.open([f"postgresql://postgres@127.0.0.1/{pg_url.rsplit('/', 1)[1]}"
                          "?service=accman"]))


@pytest.mark.parametrize("text,says", [
    ("[accman]\nhost=127.0.0.1\nconnect_timeout=3\napplication_name=x\n",
     r"the service accman sets application_name, connect_timeout, which AccMan cannot "
     r"apply from a service file: give it in the store URL, or leave it out$"),
])
def test_a_service_that_cannot_be_honoured_is_refused_at_open(pg_url, service_file, text,
                                                              says):
    """A service setting what AccMan cannot apply (asyncpg reads some of
    libpq's settings from a service, and left the others out without a
    word) is refused at open, naming it."""
    service_file(text)
    with pytest.raises(StoreError, match=r"^cannot connect to a PostgreSQL cluster of the "
                       r"store: " + says):
        run(PgStore.open([pg_url + "?service=accman"]))


@pytest.mark.parametrize("sysconfdir", [False, True])
def test_a_service_defined_nowhere_is_refused_naming_where_it_was_looked_for(
        pg_url, service_file, tmp_path, monkeypatch, sysconfdir):
    """The refusal said "PGSERVICEFILE, else ~/.pg_service.conf, else
    $PGSYSCONFDIR/pg_service.conf" whatever was set, and not that libpq
    also reads the file of a directory compiled into it, which AccMan
    cannot know.  It names the files it read, and, without PGSYSCONFDIR,
    how to make AccMan read the system's file."""
    service_file("[other]\nhost=127.0.0.1\n")
    looked = re.escape(f"{tmp_path / 'pg_service.conf'}")
    if sysconfdir:
        monkeypatch.setenv("PGSYSCONFDIR", str(tmp_path / "etc"))
        looked += ", " + re.escape(f"{tmp_path / 'etc' / 'pg_service.conf'} (none)") + "$"
    else:
        looked += "; " + re.escape(
            "libpq also reads pg_service.conf in a directory compiled into it "
            "(`pg_config --sysconfdir` names it for the libpq of that pg_config), which "
            "AccMan reads only when PGSYSCONFDIR names it") + "$"
    with pytest.raises(StoreError, match=r"^cannot connect to a PostgreSQL cluster of the "
                       r"store: the service accman \(the store URL's service=, or PGSERVICE\) "
                       r"is not defined in a service file; looked in " + looked):
        run(PgStore.open([pg_url + "?service=accman"]))


@pytest.mark.parametrize("form", ["service=", "PGSERVICE"])
def test_an_empty_service_name_is_refused_as_libpq_refuses_it(pg_url, service_file,
                                                              monkeypatch, form):
    """An empty service= fell back to PGSERVICE, and an empty PGSERVICE
    was taken for none, where libpq looks the empty name up and refuses
    it ("definition of service "" not found"): the same URL and
    environment reached a database through AccMan and not through psql."""
    service_file("[accman]\nhost=127.0.0.1\n")
    url = pg_url + "?service="
    if form == "PGSERVICE":
        monkeypatch.setenv("PGSERVICE", "")
        url = pg_url
    else:
        monkeypatch.setenv("PGSERVICE", "accman")
    with pytest.raises(StoreError, match=r"^cannot connect to a PostgreSQL cluster of the "
                       'store: the service "" \\(the store URL\'s service=, or PGSERVICE\\) '
                       r"is not defined in a service file"):
        run(PgStore.open([url]))


def _replied(srv, route, detail):
    """A poll of `route`: its 503 reply once it has `detail`."""
    def poll():
        r = srv.get(route)
        return r if r.status == 503 and r.json["detail"] == detail else None
    return poll


@pytest.mark.parametrize("change", ["edited", "removed", "standby"])
def test_a_service_file_broken_under_a_running_server_is_said_once_and_mended(
        pg, pg_url, tmp_path, change):
    """The service file edited wrong or removed under a running server: the
    next connections (the read pool's, the writer's reconnection) failed,
    and a /past page logged "a /past page failed in AccMan", as a bug, the
    503 saying how the file was read.  The log says it once, naming the
    file and the line, no traceback; the caller gets a plain 503; and the
    file is read again at each connect (libpq's rule), so mending it is
    enough: the store is back without a restart.  A service made to set
    what AccMan refuses (a target_session_attrs that may take a standby)
    is said alike: the log said only that the store lost its connection."""
    path = tmp_path / "pg_service.conf"
    good = f"[accman]\nhost=127.0.0.1\nport={pg.port}\nuser=postgres\n" \
           f"dbname={pg_url.rsplit('/', 1)[1]}\n"
    path.write_text(good)
    env = {"PGSERVICEFILE": path, "PGSYSCONFDIR": tmp_path, "PGSERVICE": None,
           "PGHOST": None, "PGPORT": None}
    srv = spawn_server(tmp_path / "data", tmp_path / "log", env=env,
                       args=["--store", "postgresql:///?service=accman"])
    try:
        assert srv.mod("a", 5).json == {"tot": 5, "seq": 1}
        if change == "edited":
            path.write_text(good + "sslmode require\n")
        elif change == "standby":
            path.write_text(good + "target_session_attrs=standby\n")
        else:
            path.unlink()
        pg.psql(f"SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                f"WHERE datname = '{pg_url.rsplit('/', 1)[1]}'")
        unusable = "the database cannot be read: " + (
            "the store's connection service cannot be used (the server's log says why)"
            if change != "standby" else "cannot connect to a PostgreSQL cluster of the store: "
            "target_session_attrs=standby cannot be used: AccMan writes on a cluster's primary "
            "and reads there what it wrote, and this may take a standby; leave it out or give "
            "read-write")
        for route in ("/past?cred=a", "/tot?cred=a"):
            # A pooled connection may meet its end first (lost connection).
            assert_error(wait_for(_replied(srv, route, unusable), RECONNECT_WAIT_S,
                                  unusable), 503,
                         "unavailable")
        wait_for(lambda: srv.get("/health").status == 503, RECONNECT_WAIT_S, "/health 503")
        path.write_text(good)
        wait_for(lambda: srv.get("/health").status == 200, RECONNECT_WAIT_S,
                 "/health 200 once mended")
        assert srv.get("/past?cred=a").status == 200
    finally:
        srv.kill()
    err = (tmp_path / "log" / "stderr").read_text()
    what = {"edited": f"the service file {path}, line 6: has no `=`",
            "removed": f"the service file {path} cannot be read: No such file or directory",
            "standby": "target_session_attrs=standby cannot be used: AccMan writes on a "
                       "cluster's primary and reads there what it wrote, and this may take a "
                       "standby; leave it out or give read-write; each new connection fails "
                       "until the file is mended"}[change]
    assert err.count(what) == 1, err
    assert err.count("the connection service accman can be read again") == 1, err
    assert "Traceback" not in err and "in AccMan" not in err, err


def test_each_store_of_a_process_says_its_own_service_file_failures(pg, pg_url, service_file,
                                                                    caplog):
    """The log's "said once" state was the process's, by service name: a
    store opened beside a running one on the same service, its open
    failing on a file broken meanwhile, was logged as the running store's
    failure ("each new connection fails ..."), and that store's own
    failure, the same, was then never said.  Each store says its own
    failures, once each, and their end; an open's failure is the open's,
    raised, not logged as a running store's."""
    caplog.set_level("WARNING", logger="accman.postgres")
    good = (f"[accman]\nhost=127.0.0.1\nport={pg.port}\nuser=postgres\n"
            f"dbname={pg_url.rsplit('/', 1)[1]}\n")
    service_file(good)
    url = "postgresql:///?service=accman"

    def said(text):
        return sum(text in r.getMessage() for r in caplog.records)

    async def until(text, count):
        deadline = asyncio.get_running_loop().time() + RECONNECT_WAIT_S
        while asyncio.get_running_loop().time() < deadline:
            if said(text) >= count:
                return
            await asyncio.sleep(0.05)
        raise AssertionError(f"{text!r} not said {count} times: {caplog.text}")

    async def main():
        async with stored(url) as (_, one), stored(url) as (_, two):
            assert await one.mod("a", 5) == (5, 1)
            service_file(good + "sslmode require\n")
            with pytest.raises(ServiceFileError, match="line 6: has no `=`"):
                await PgStore.open([url])
            assert said("line 6: has no `=`") == 0, caplog.text
            pg.psql("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                    f"WHERE datname = '{pg_url.rsplit('/', 1)[1]}'")
            # Each store's reconnection fails, try after try: said once by each.
            await until("line 6: has no `=`", 2)
            service_file(good)
            await until("the connection service accman can be read again", 2)
            assert await two.tot("a") == 5
        assert said("line 6: has no `=`") == 2, caplog.text
        assert said("the connection service accman can be read again") == 2, caplog.text
    run(main())


def test_an_open_that_fails_on_the_file_midway_logs_nothing(pg, pg_url, service_file,
                                                          monkeypatch, caplog):
    """A store's open reads the service file at each connection it makes
    (its writers', then its listener's ...): a file broken between two
    of them failed the open, raised, and was logged besides as a running
    store's failure ("each new connection fails until the file is
    mended") by a store that never served.  An open's failure is raised
    only, however far the open got."""
    from accman.postgres.events import EventReader
    caplog.set_level("WARNING", logger="accman.postgres")
    good = (f"[accman]\nhost=127.0.0.1\nport={pg.port}\nuser=postgres\n"
            f"dbname={pg_url.rsplit('/', 1)[1]}\n")
    service_file(good)
    start = EventReader.start

    async def broken_first(reader):
        service_file(good + "sslmode require\n")       # after the writers connected
        await start(reader)
    monkeypatch.setattr(EventReader, "start", broken_first)
    with pytest.raises(ServiceFileError, match="line 6: has no `=`"):
        run(PgStore.open(["postgresql:///?service=accman"]))
    assert not [r for r in caplog.records if "line 6" in r.getMessage()], caplog.text
