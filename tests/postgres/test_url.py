"""A store URL reaches the database, host and role that libpq (psql) reaches
with it: where the URL gives a setting both in its own parts and in its
query, libpq takes the query's and the driver the part's
(accman/postgres/connecting.py, as_libpq_reads)."""

import pytest

from accman.errors import StoreError
from accman.postgres import PgStore
from accman.postgres.connecting import as_libpq_reads
from accman.postgres.hosts import one_host_urls

from .helpers import run, stored


def _charged_in(pg, url, dbname):
    """Charges through a store opened on `url`; the account is in `dbname`."""
    async def main():
        async with stored(url) as (_, c):
            assert await c.mod("where", 4) == (4, 1)
    run(main())
    assert pg.psql("SELECT count(*) FROM accman_accounts", dbname) == "1"


@pytest.mark.parametrize("path", ["/", "/elsewhere"])
def test_dbname_in_the_query_names_the_database(pg, pg_url, path):
    """`postgresql://h/?dbname=x` is x to libpq; asyncpg took the path "/"
    for the empty name (the user's database) and left dbname= unread, and a
    path's name before dbname=."""
    dbname = pg_url.rsplit("/", 1)[1]
    _charged_in(pg, f"{pg_url.rsplit('/', 1)[0]}{path}?dbname={dbname}", dbname)
    assert "accman_accounts" not in pg.psql("SELECT tablename FROM pg_tables")


def test_a_plus_in_the_query_is_a_plus_as_libpq_reads_it(pg, pg_url):
    """libpq decodes a query's `%XX` and nothing else: `dbname=a+b` is the
    database "a+b" to psql, where the driver reads a form's encoding, "a b"
    (and so a user= or password= with a `+`)."""
    dbname = f"{pg_url.rsplit('/', 1)[1]}+plus"
    pg.create_database(dbname)
    _charged_in(pg, f"{pg_url.rsplit('/', 1)[0]}/?dbname={dbname}", dbname)


@pytest.mark.parametrize("query,pghost", [("?host=127.0.0.1", None), ("", "127.0.0.1")])
def test_an_authority_of_a_port_alone_names_no_host(pg, pg_url, monkeypatch, query, pghost):
    """`postgresql://:5433/d` is port 5433 of the host= or PGHOST (else the
    socket directory) to libpq, which reads the empty host as none named;
    the store refused the host= as given twice, and asyncpg took the empty
    host for a name to look up (gaierror)."""
    monkeypatch.delenv("PGPORT", raising=False)
    if pghost:
        monkeypatch.setenv("PGHOST", pghost)
    dbname = pg_url.rsplit("/", 1)[1]
    _charged_in(pg, f"postgresql://postgres@:{pg.port}/{dbname}{query}", dbname)


def test_the_query_s_user_is_the_one_used(pg, pg_url):
    scheme, rest = pg_url.split("://")
    dbname = pg_url.rsplit("/", 1)[1]
    _charged_in(pg, f"{scheme}://nobody@{rest.partition('@')[2]}?user=postgres", dbname)


@pytest.mark.parametrize("url,read", [
    ("postgresql:///?dbname=x", "postgresql://?dbname=x"),
    ("postgresql://h/y?dbname=x", "postgresql://h?dbname=x"),
    ("postgresql://h/", "postgresql://h"),
    ("postgresql://u:p@h/d?user=v", "postgresql://:p@h/d?user=v"),
    ("postgresql://u:p@h/d?password=q", "postgresql://u@h/d?password=q"),
    ("postgresql://u:p@h/d?user=v&password=q", "postgresql://h/d?user=v&password=q"),
    ("postgresql:///d?host=/run&port=5", "postgresql:///d?host=/run&port=5"),
    ("postgresql://h/d?user=u+v&password=p+q%2B", "postgresql://h/d?user=u%2Bv&password=p%2Bq%2B"),
    ("postgresql://:5/d", "postgresql:///d?port=5"),
    ("postgresql://u@:5/d?port=6", "postgresql://u@/d?port=6"),
    ("postgresql://u:p@h:1,[::1]:2/d?sslmode=require",
     "postgresql://u:p@h:1,[::1]:2/d?sslmode=require"),
])
def test_a_part_the_query_gives_again_is_left_out(url, read):
    assert as_libpq_reads(url) == read


@pytest.mark.parametrize("query,named", [("host=/tmp", "host="), ("port=1", "port="),
                                         ("host=/tmp&port=1", "host and port=")])
def test_hosts_given_before_the_path_and_in_the_query_are_refused(pg, pg_url, query, named):
    """asyncpg leaves host= and port= unread beside the authority's hosts,
    where libpq takes them: the two would reach different servers."""
    with pytest.raises(StoreError) as e:
        run(PgStore.open([f"{pg_url}?{query}"]))
    assert e.value.detail == (
        "cannot connect to a PostgreSQL cluster of the store: the store URL names hosts "
        f"before its path and gives {named} as well, which libpq and the driver read "
        "differently: give the hosts and their ports in one of the two")
    assert pg.psql("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'accman%'",
                   pg_url.rsplit("/", 1)[1]) == "0"


def test_database_in_the_query_is_refused_as_libpq_refuses_it(pg, pg_url):
    """asyncpg reads database= as dbname=; libpq refuses the URL ("invalid
    URI query parameter"), so psql could not use it: it is refused."""
    with pytest.raises(StoreError) as e:
        run(PgStore.open([f"{pg_url.rsplit('/', 1)[0]}/?database={pg_url.rsplit('/', 1)[1]}"]))
    assert e.value.detail == (
        "cannot connect to a PostgreSQL cluster of the store: the store URL gives database=, "
        "which libpq refuses: a URL names its database by its path or dbname=")
    assert pg.psql("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'accman%'",
                   pg_url.rsplit("/", 1)[1]) == "0"


@pytest.mark.parametrize("query,said", [
    ("password=a=b", "password= has a second `=` (one inside a value is written %3D)"),
    ("sslmode", "part 1 has no `=`"),
    ("sslmode=disable&&port=1", "part 2 has no `=`"),
    ("=x", "part 1 has no name"),
    ("Xy9=a=b", "part 1 has a second `=` (one inside a value is written %3D)"),
    ("dbname=", "dbname= is empty, which libpq reads as its own default and the driver as "
                "PGDATABASE: give a value or leave it out"),
    ("sslmode=disable&user=", "user= is empty, which libpq reads as its own default and the "
                              "driver as PGUSER: give a value or leave it out"),
    ("db%6Eame=", "dbname= is empty, which libpq reads as its own default and the driver as "
                  "PGDATABASE: give a value or leave it out"),
])
def test_a_query_part_that_is_not_name_value_is_refused_as_libpq_refuses_it(pg, pg_url,
                                                                            query, said):
    """libpq refuses such a URL (psql: "extra key/value separator", "missing
    key/value separator", "invalid URI query parameter"), where the driver
    took `password=a=b` as the password "a=b": a URL that psql cannot use
    is refused, naming the part by its place unless it is a setting of libpq.
    An empty dbname= or user= is libpq's default but PGDATABASE or PGUSER
    to the driver: refused too."""
    with pytest.raises(StoreError) as e:
        run(PgStore.open([f"{pg_url}?{query}"]))
    assert e.value.detail == (
        "cannot connect to a PostgreSQL cluster of the store: the store URL's query is "
        f"name=value pairs, as libpq reads it, and its {said}")
    assert pg.psql("SELECT count(*) FROM pg_tables WHERE tablename LIKE 'accman%'",
                   pg_url.rsplit("/", 1)[1]) == "0"


def test_a_trailing_ampersand_is_taken_as_libpq_takes_it():
    assert as_libpq_reads("postgresql://h/d?sslmode=disable&") == \
        "postgresql://h/d?sslmode=disable&"


def test_a_part_is_named_only_by_a_settings_name_never_by_a_piece_of_a_value():
    """A password with an unescaped `&` splits into parts: the piece after
    it (`secret` of `Tr0ub&secret=x=y`) is no setting's name, and is said
    by its place, as a secret pasted there would be."""
    with pytest.raises(StoreError) as e:
        as_libpq_reads("postgresql://u@h/d?sslmode=disable&password=Tr0ub&secret=x=y")
    assert e.value.detail.endswith("its part 3 has a second `=` (one inside a value is "
                                   "written %3D)")
    assert "secret" not in e.value.detail


@pytest.mark.parametrize("url,each", [
    ("postgresql://u@h1,h2:6/d?sslmode=disable",
     ["postgresql://u@h1:5432/d?sslmode=disable", "postgresql://u@h2:6/d?sslmode=disable"]),
    ("postgresql://[::1],[::2]:7/d", ["postgresql://[::1]:5432/d", "postgresql://[::2]:7/d"]),
    ("postgresql://h1:,[::2]:/d", ["postgresql://h1:5432/d", "postgresql://[::2]:5432/d"]),
    ("postgresql:///d?host=h1,h2",
     ["postgresql:///d?host=h1&port=1", "postgresql:///d?host=h2&port=1"]),
    ("postgresql:///d?host=h1,h2&port=5,",
     ["postgresql:///d?host=h1&port=5", "postgresql:///d?host=h2&port=5432"]),
])
def test_a_host_of_several_with_no_port_gets_the_port_libpq_gives_it(monkeypatch, url, each):
    """Of several hosts before the path, one with no port is 5432 to libpq,
    whatever PGPORT says (psql 15: `PGPORT=1 psql postgresql://a,b/d` tries
    port 5432 on both); the store took PGPORT there.  So is one whose port
    is empty (`h1:`), which the driver would fill from PGPORT.  A host=
    list's hosts take PGPORT, as libpq gives it them, and 5432 for an empty
    port of a list (`port=5,`: psql 15 tries 5432 on the second)."""
    monkeypatch.setenv("PGPORT", "1")
    assert one_host_urls(url) == each


@pytest.mark.parametrize("url", ["postgresql://u@:5433,h2/d", "postgresql://h1,/d",
                                 "postgresql://h1,,h2/d"])
def test_an_empty_host_in_a_list_of_several_is_refused(url):
    """libpq takes an empty host of a list before the path for its socket
    directory (psql 15: `postgresql://:5433,h2/d` tries the socket
    /var/run/postgresql/.s.PGSQL.5433 first), where the driver got a host
    named "" for it: refused, naming the way to write one."""
    with pytest.raises(StoreError) as e:
        as_libpq_reads(url)
    assert e.value.detail == (
        "cannot connect to a PostgreSQL cluster of the store: the store URL's list of hosts "
        "before its path has an empty one, which libpq reads as its socket directory: name "
        "each host (a socket directory as %2Fvar%2Frun%2Fpostgresql)")
