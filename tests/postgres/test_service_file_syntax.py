"""A connection service file means to AccMan what it means to libpq: each
file below is given to psql (the installed libpq) and to AccMan's
connect, and both connect to the same database, or both refuse the file
at the same line (accman/postgres/service_file.py)."""

import os
import pathlib
import pwd
import re
import subprocess

import pytest

from accman.errors import StoreError
from accman.postgres import connecting
from accman.postgres.service_file import ServiceFileError

from .helpers import run
from .pgcluster import pg_bin

# The service's first lines, {port} the session server's.
HEAD = "[accman]\nhost=127.0.0.1\nport={port}\nuser=postgres\n"

# (file text, what both do): ("db", NAME) connects to the database NAME
# ({db} is the test's own); ("line", N) refuses line N, ("ldap", N) too, as
# an LDAP lookup (an LDAP URL malformed, for psql), ("long", N) too, as a
# line too long; ("nowhere",) finds no definition of the service.
READ = [
    (HEAD + "dbname={db}\ndbname=postgres\n", ("db", "{db}")),          # a key's first value
    (HEAD + "dbname={db}\n[accman]\ndbname=postgres\n", ("db", "{db}")),  # the first section
    (HEAD + "dbname={db}\ndbname=\n", ("db", "{db}")),   # an empty value after: not taken
    ("[accman] the rest is not read\n" + HEAD[9:] + "dbname={db}\n", ("db", "{db}")),
    ("  [accman]\t\r\n" + HEAD[9:] + " \t dbname={db} \r\n  # indented\n", ("db", "{db}")),
    ("[other]\nno equals here\nPORT:1\n" + HEAD + "dbname={db}", ("db", "{db}")),
    ("#" + "x" * 1020 + "\n" + HEAD + "dbname={db}\n", ("db", "{db}")),  # 1022 bytes: read
    ("#" + "x" * 1021 + "\n" + HEAD + "dbname={db}\n", ("long", 1)),     # 1023: too long
    (HEAD + "dbname={db}\npassword=" + "x" * 1013 + "\n", ("long", 6)),  # in the section
    (HEAD + "dbname={db}\n[" + "x" * 1020 + "]\n", ("long", 6)),         # the header after it
    (HEAD + "dbname={db}\n[other]\n#" + "x" * 1100 + "\n", ("db", "{db}")),  # after: not read
    (HEAD + "dbname={db}\n[Accman]\nHOST:x\n", ("db", "{db}")),           # after: not read
    # A line ends at a NUL, and libpq reads a line of over 1022 bytes by
    # its first 1023: what follows them is a line of its own.
    (HEAD + "#\0" + "x" * 1021 + "dbname={db}\n", ("db", "{db}")),
    (HEAD + "dbname={db}\n#\0" + "x" * 1021 + "Bad\n", ("line", 7)),
    (HEAD + "#\0" + "x" * 1021 + "#\ndbname:{db}\n", ("line", 7)),
    (HEAD + "dbname={db}\n#\0" + "x" * 1021 + "y" * 1023 + "\n", ("long", 7)),
    (HEAD + "dbname={db}\n#\0x\n", ("db", "{db}")),
    (HEAD + "Dbname={db}\n", ("line", 5)),                 # keys are lower case
    (HEAD + "dbname:{db}\n", ("line", 5)),                 # `=` only
    (HEAD + "dbname = {db}\n", ("line", 5)),               # the key "dbname "
    (HEAD + "; a comment?\ndbname={db}\n", ("line", 5)),   # `#` only
    (HEAD + "dbname=x\n  {db}\n", ("line", 6)),            # no continuation lines
    (HEAD + "database={db}\n", ("line", 5)),               # libpq's keyword is dbname
    (HEAD + "service=other\n", ("line", 5)),               # no nesting
    (HEAD + "ldapx\n", ("ldap", 5)),                      # an LDAP lookup
    ("[Accman]\n" + HEAD[9:] + "dbname={db}\n", ("nowhere",)),   # names are case-sensitive
    ("[accman\n" + HEAD[9:] + "dbname={db}\n", ("nowhere",)),
]


@pytest.fixture
def service(tmp_path, monkeypatch):
    """write(text): the service file (PGSERVICEFILE), no other."""
    path = tmp_path / "pg_service.conf"
    for name in ("PGHOST", "PGPORT", "PGUSER", "PGDATABASE", "PGSERVICE",
                 "PGTARGETSESSIONATTRS"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("PGSERVICEFILE", str(path))
    monkeypatch.setenv("PGSYSCONFDIR", str(tmp_path))     # no pg_service.conf there
    return path


def _psql(url) -> tuple:
    """What psql does with the service: ("db", NAME) or its error."""
    done = subprocess.run([str(pg_bin() / "psql"), "-X", "-A", "-t", "-d", url,
                           "-c", "SELECT current_database()"],
                          capture_output=True, text=True, env=dict(os.environ), timeout=30)
    return ("db", done.stdout.strip()) if done.returncode == 0 else ("error", done.stderr)


async def _accman(url) -> tuple:
    try:
        conn = await connecting.connect(url)
    except StoreError as e:
        return "error", e
    try:
        return "db", await conn.fetchval("SELECT current_database()")
    finally:
        await conn.close()


@pytest.mark.parametrize("text,does", READ)
def test_psql_and_accman_read_a_service_file_alike(pg, pg_url, service, text, does):
    """configparser read what libpq refuses (upper-case keys, `:`, spaces
    around `=`, `;` comments, continuation lines, `database`) and refused
    what libpq reads (a key twice, a section twice).  Each file now
    means the same to both: the same database, or a refusal at the same
    line, AccMan's naming the file."""
    db = pg_url.rsplit("/", 1)[1]
    service.write_text(text.format(port=pg.port, db=db))
    url = "postgresql:///?service=accman"
    libpq, ours = _psql(url), run(_accman(url))
    if does[0] == "db":
        assert libpq == ours == ("db", does[1].format(db=db))
        return
    assert libpq[0] == ours[0] == "error"
    assert isinstance(ours[1], ServiceFileError)
    if does[0] in ("line", "ldap", "long"):
        assert {"line": f'service file "{service}", line {does[1]}',
                "ldap": "invalid LDAP URL",
                "long": f'line {does[1]} too long in service file "{service}"'}[does[0]] \
            in libpq[1]
        assert str(ours[1]).startswith(
            "cannot connect to a PostgreSQL cluster of the store: the service file "
            f"{service}, line {does[1]}: ")
    else:
        assert 'definition of service "accman" not found' in libpq[1]
        assert "the service accman (the store URL's service=, or PGSERVICE) is not " \
               "defined in a service file" in str(ours[1])


def test_an_empty_value_is_refused_where_libpq_takes_its_default(pg, service, monkeypatch):
    """libpq takes `host=` as its built-in default, over PGHOST; the driver
    would take PGHOST: AccMan refuses the line, naming it, rather than
    reach another server than psql does.  psql's failure is its own
    words for the default, a Unix socket of the port where no server
    listens (the session server's socket is in a directory of its own):
    any error of psql's was taken for it."""
    monkeypatch.setenv("PGHOST", "127.0.0.1")
    url = "postgresql:///postgres?service=accman"
    service.write_text(HEAD.format(port=pg.port).replace("host=127.0.0.1\n", ""))
    assert _psql(url) == ("db", "postgres")             # without the line: PGHOST's server
    service.write_text(HEAD.format(port=pg.port).replace("host=127.0.0.1", "host="))
    libpq = _psql(url)
    assert libpq[0] == "error"
    assert re.match(rf'psql: error: connection to server on socket "[^"]+/\.s\.PGSQL\.{pg.port}" '
                    r"failed: No such file or directory$", libpq[1], re.MULTILINE), libpq[1]
    with pytest.raises(ServiceFileError, match=rf"the service file {service}, line 2: sets "
                       "host to nothing, which libpq reads as its built-in default and "
                       "AccMan cannot: give a value, or leave the line out$"):
        connecting.with_service(url)


@pytest.mark.parametrize("empty", [False, True])
def test_a_missing_pgservicefile_is_refused_naming_it(service, monkeypatch, empty):
    """libpq refuses a PGSERVICEFILE that does not exist, or set empty
    (service file not found), and looks no further; AccMan went on to
    ~/.pg_service.conf and the next file."""
    if empty:
        monkeypatch.setenv("PGSERVICEFILE", "")
    assert f'service file "{"" if empty else service}" not found' in \
        _psql("postgresql:///?service=accman")[1]
    says = ("PGSERVICEFILE is set but empty, which libpq refuses" if empty
            else f"the service file {service} cannot be read: No such file or directory$")
    with pytest.raises(ServiceFileError, match=says):
        connecting.with_service("postgresql:///?service=accman")


def test_a_service_file_that_is_a_pipe_a_device_or_too_big_is_refused(service, monkeypatch):
    """The file is read on the server's event loop at each new connection:
    a named pipe there (no writer) held it, and every request, for ever;
    /dev/zero was read without end.  Both are refused at once, as is a
    file over SERVICE_FILE_BYTES_MAX.  (libpq waits on a pipe too: here
    AccMan refuses what libpq reads, as it does an LDAP line.)"""
    from accman.postgres.service_file import SERVICE_FILE_BYTES_MAX
    os.mkfifo(service, 0o600)
    with pytest.raises(ServiceFileError, match=f"the service file {service} is not a regular"):
        connecting.with_service("postgresql:///?service=accman")
    monkeypatch.setenv("PGSERVICEFILE", "/dev/zero")
    with pytest.raises(ServiceFileError, match="/dev/zero is not a regular file"):
        connecting.with_service("postgresql:///?service=accman")
    big = service.with_name("big.conf")
    big.write_bytes(b"#" * SERVICE_FILE_BYTES_MAX + b"\n")
    monkeypatch.setenv("PGSERVICEFILE", str(big))
    too_big = rf"is over SERVICE_FILE_BYTES_MAX \({SERVICE_FILE_BYTES_MAX} bytes\)"
    with pytest.raises(ServiceFileError, match=too_big):
        connecting.with_service("postgresql:///?service=accman")


@pytest.mark.parametrize("given,section", [("a+b", "a+b"), ("a%2Bb%20c", "a+b c")])
def test_a_service_name_in_the_url_is_decoded_as_libpq_decodes_it(pg, pg_url, service,
                                                                   given, section):
    """libpq decodes a URL's `%XX` and nothing else: service=a+b names the
    service "a+b".  AccMan decoded the query as a form's, `+` for a space,
    and looked up "a b", which no file defines."""
    db = pg_url.rsplit("/", 1)[1]
    service.write_text(f"[{section}]\n" + HEAD[9:].format(port=pg.port) + f"dbname={db}\n")
    url = f"postgresql:///?service={given}"
    assert _psql(url) == run(_accman(url)) == ("db", db)


def test_an_empty_home_names_the_user_s_home_as_libpq_s(service, monkeypatch):
    """libpq's ~ is HOME when it is set and not empty, else the user's home
    of the password file (pqGetHomeDirectory); Python's Path.home() takes
    an empty HOME for the root, and AccMan read /.pg_service.conf where
    psql reads the user's."""
    monkeypatch.delenv("PGSERVICEFILE")
    monkeypatch.setenv("HOME", "")
    home = pathlib.Path(pwd.getpwuid(os.geteuid()).pw_dir) / ".pg_service.conf"
    if home.exists():
        pytest.skip(f"{home} exists: the service might be defined there")
    assert 'definition of service "accman" not found' in _psql("postgresql:///?service=accman")[1]
    with pytest.raises(ServiceFileError, match=f"looked in {re.escape(str(home))} \\(none\\), "):
        connecting.with_service("postgresql:///?service=accman")


@pytest.mark.parametrize("place", ["PGSERVICEFILE", "~/.pg_service.conf"])
def test_a_directory_in_a_service_file_s_place_is_read_as_empty(pg, pg_url, service,
                                                                 tmp_path, monkeypatch, place):
    """libpq opens a directory named as a service file and meets the end of
    it at once: an empty file, and the $PGSYSCONFDIR file is read next.
    AccMan refused the directory ("Is a directory") where psql connected
    to the service of the $PGSYSCONFDIR file."""
    db = pg_url.rsplit("/", 1)[1]
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "pg_service.conf").write_text(HEAD.format(port=pg.port) + f"dbname={db}\n")
    monkeypatch.setenv("PGSYSCONFDIR", str(etc))
    if place == "PGSERVICEFILE":
        service.mkdir()
    else:
        monkeypatch.delenv("PGSERVICEFILE")
        (tmp_path / "home" / ".pg_service.conf").mkdir(parents=True)
        monkeypatch.setenv("HOME", str(tmp_path / "home"))
    url = "postgresql:///?service=accman"
    assert _psql(url) == run(_accman(url)) == ("db", db)


def test_a_service_file_s_directories_are_named_where_the_service_was_looked_for(
        service, tmp_path, monkeypatch):
    """Directories in the place of every service file define no service:
    libpq and AccMan refuse it as defined nowhere, AccMan naming each
    directory as one, read as empty."""
    service.mkdir()
    (tmp_path / "etc" / "pg_service.conf").mkdir(parents=True)
    monkeypatch.setenv("PGSYSCONFDIR", str(tmp_path / "etc"))
    assert 'definition of service "accman" not found' in _psql("postgresql:///?service=accman")[1]
    looked = [f"{service} (a directory, read as empty)",
              f"{tmp_path / 'etc' / 'pg_service.conf'} (a directory, read as empty)"]
    with pytest.raises(ServiceFileError, match=re.escape(f"looked in {', '.join(looked)}") + "$"):
        connecting.with_service("postgresql:///?service=accman")
