"""Connecting to a cluster of the store: the session's settings, and the
URL's hosts (its service's among them) tried one at a time, as libpq
tries them.

    conn = await connect("postgresql://h1,h2/accman?target_session_attrs=read-write")
"""

from __future__ import annotations

import asyncio
import logging
import os
import urllib.parse

import asyncpg

from accman.errors import StoreError
from accman.postgres.errors import store_error, unreadable_url
from accman.postgres.hosts import name_and_port, one_host_urls, query_value, split_url
from accman.postgres.service_file import LIBPQ_KEYWORDS, ServiceFileError, service_settings

log = logging.getLogger("accman.postgres")

CONNECT_TIMEOUT_S = 10.0

# Every connection of a store plans its statements for an index, whatever
# the statistics say: a plan made while a table was small (a new store, or
# before autoanalyze first ran) is cached for the connection's life, and a
# hash join over a sequential scan of accman_accounts then costs each batch
# and each /tot a scan of every account (measured: 2.7k charges/s instead
# of 14-16k, with 100k accounts).  A scan that no index can serve (the one-row
# counter) still runs, at a cost the planner only counts high; JIT, which
# such a cost would wake on every call, is off (these statements are small).
#
# And a commit AccMan makes is durable before anyone hears of it (SPEC
# "Durability and order"): synchronous_commit is `on` on its connections
# whatever the database, role or server sets (a connection's own setting
# comes first).  `off` loses recent commits in a crash, `local` does not
# wait for a synchronous standby; `remote_apply` (a standby's readers see
# the commit) is not needed either, since AccMan reads the primary only.
# client_min_messages is `warning` likewise: the WARNING of a commit whose
# wait for its standby was cancelled is how AccMan knows that commit is on
# the primary alone (backends.SyncWaitWatch), and at `error` it is not sent.
# statement_timeout and lock_timeout are 0: AccMan's own deadlines bound
# every call (COMMIT_TIMEOUT_S and the others, which close a connection
# rather than cancel in the database).  A timeout of the database's that
# fires as a statement ends is raised at the session's next command, after
# the commit: read as the next batch's error, that batch would be told
# not_applied while the database went on to commit it.  The idle timeouts
# are 0 too: a writer idle between batches that the database ends loses
# its cluster until the store has reconnected (writes 503, /health 503),
# every few seconds on a front-end with little traffic.  (PostgreSQL 14
# brought idle_session_timeout: an older server refuses these sessions.)
#
# And PostgreSQL finds a session's client gone about 11 s after that
# client last answered (KEEPALIVE), not after the kernel's two hours: a
# front-end whose host dies, or that is cut off for longer than its
# kernel retransmits the closes it makes meanwhile (a couple of minutes),
# or whose address changes, otherwise leaves its sessions on the server,
# each holding a slot of max_connections until the slots run out for
# every front-end; and the webhook's role (cursors.py) is a session's
# advisory lock.  Idle 5 s, then probes 2 s apart, until tcp_user_timeout,
# which on Linux decides for probes as for data sent and not acknowledged
# (a listener's notifications to a client cut off: 11 s from the first
# one sent) and for a zero window; the probes' count comes to the same,
# for systems without it.  A live front-end's kernel answers the probes
# whatever its loop does; only a loop stalled for 11 s with a session's
# receive buffer full loses that session (the listener is made again,
# EventReader._closed; a writer's call gives up at COMMIT_TIMEOUT_S, 10 s,
# itself).  A backend in a statement, waiting for a lock or for its
# synchronous standby, reads and writes nothing on its socket: a client
# found gone does not end that wait (its slot is kept until it ends).
# Sessions a cut ended are not told to the front-end: it makes its pool's
# connections anew once it reconnects (Cluster.connect).
KEEPALIVE = {"tcp_keepalives_idle": "5", "tcp_keepalives_interval": "2",
             "tcp_keepalives_count": "3", "tcp_user_timeout": "11000"}
SESSION_SETTINGS = {"enable_seqscan": "off", "enable_hashjoin": "off",
                    "enable_mergejoin": "off", "jit": "off", "synchronous_commit": "on",
                    "client_min_messages": "warning", "statement_timeout": "0",
                    "lock_timeout": "0", "idle_session_timeout": "0",
                    "idle_in_transaction_session_timeout": "0", **KEEPALIVE}


_CONNECT = "cannot connect to a PostgreSQL cluster of the store"
# What the driver raises when a database is lost, refuses, or does not answer.
DRIVER_ERRORS = (asyncpg.PostgresError, asyncpg.InterfaceError,
                 asyncpg.exceptions.InternalClientError, OSError, asyncio.TimeoutError)


async def connect(url: str, settings: dict | None = None,
                  connection_class=asyncpg.Connection, said: ServiceSaid | None = None,
                  accept=None):
    """A connection with SESSION_SETTINGS, and `settings` besides; `said`
    and `accept` as connect_each_host's."""
    try:
        return await connect_each_host(url, timeout=CONNECT_TIMEOUT_S, said=said,
                                       server_settings={**SESSION_SETTINGS, **(settings or {})},
                                       connection_class=connection_class, accept=accept)
    except DRIVER_ERRORS as e:
        raise store_error(e, _CONNECT) from None
    except ValueError:
        raise unreadable_url(_CONNECT) from None


# Server settings under which a commit does not survive a crash of the
# database's machine, whatever a session sets (SPEC "Durability and
# order": a 200 is on disk): AccMan writes nothing on such a server, its
# schema included (migrate.py asks before it changes anything).
_UNDURABLE_SQL = ("SELECT ARRAY[current_setting('fsync'), "
                  "current_setting('full_page_writes')]")


async def refuse_undurable(conn) -> None:
    """StoreError, naming the setting, when `conn`'s server runs with fsync
    or full_page_writes off."""
    try:
        fsync, full_pages = await conn.fetchval(_UNDURABLE_SQL, timeout=CONNECT_TIMEOUT_S)
    except DRIVER_ERRORS as e:
        raise store_error(e, "cannot read the server's settings") from None
    for name, value in (("fsync", fsync), ("full_page_writes", full_pages)):
        if value != "on":
            raise StoreError(f"the PostgreSQL server runs with {name} = {value}: its commits "
                             "do not survive a crash of its machine, and AccMan writes "
                             "nothing there; set it on")


# What makes connect_each_host try the next host, as asyncpg's own loop
# does: nothing answered, or the database is starting up or shutting down.
_NEXT_HOST = (OSError, asyncio.TimeoutError, asyncpg.exceptions.CannotConnectNowError)
# A host of a URL of several that has not answered within this long has the
# next host tried beside it, its own attempt going on to its whole timeout:
# a host cut off (the old primary, mid-failover) never answers, and waiting
# out its timeout first would delay each start and each new connection by it
# (a read needing one would be 503 at READ_TIMEOUT_S).  A database that is up
# answers well within it, and one slower than this is still taken.
NEXT_HOST_AFTER_S = 1.0


async def connect_each_host(dsn: str, *, timeout: float, said: ServiceSaid | None = None,
                            accept=None, **kw):
    """asyncpg.connect on each host of `dsn` in the URL's order, as libpq
    tries them, each attempt with the whole `timeout` of its own: asyncpg's
    timeout spans every host of a URL, so a host that does not answer would
    spend it all, and the hosts after it, the new primary among them, would
    never be tried.  The next host is tried once the last one tried has
    failed, or has not answered within NEXT_HOST_AFTER_S; the first
    connection taken (the earlier begun on a tie) ends the other attempts.
    A host that answered but takes no writes (target_session_attrs) beside
    one that did not answer is said as no host taking writes, not as the
    unanswered one's error, as if no database were up.  `said` (a store's)
    logs its service file's failures, as with_service's.  `accept(conn,
    first)`, if given, vets each connection taken (`first`: its host is the
    URL's first, or its only): a StoreError it raises turns that host down
    as a failed connection does (the next is tried), and is what is raised
    when no host is left, being the most telling."""
    dsn = with_service(as_libpq_reads(dsn), said)
    urls = one_host_urls(dsn)
    kw.setdefault("target_session_attrs", target_session_attrs(dsn))
    if urls is None:
        return await _connect_one(dsn, timeout, accept, kw, True)
    given_first = urls[0]
    # The host that last took a connection is tried first: the others
    # before it may be the old primary, which does not answer.
    first = _last_host.get(dsn)
    if first in urls:
        urls.insert(0, urls.pop(urls.index(first)))
    trying: dict = {}           # attempt -> its host's URL, in the order begun
    failed: list = []
    try:
        for k, one in enumerate(urls):
            newest = asyncio.ensure_future(_connect_one(one, timeout, accept, kw,
                                                        one == given_first))
            trying[newest] = one
            taken = await _taken(trying, failed, newest if k < len(urls) - 1 else None)
            if taken is not None:
                _last_host[dsn] = trying.pop(taken)
                return taken.result()
    finally:
        for attempt in trying:
            attempt.cancel()
            attempt.add_done_callback(_left)
    refused = [e for e in failed if isinstance(e, StoreError)]
    turned_down = [e for e in failed
                   if isinstance(e, asyncpg.exceptions.TargetServerAttributeNotMatched)]
    raise (refused or turned_down or failed)[-1]


async def _connect_one(url: str, timeout: float, accept, kw, first: bool):
    """asyncpg.connect to `url`'s host, the connection then vetted by
    `accept` (closed if it refuses)."""
    conn = await asyncpg.connect(url, timeout=timeout, **kw)
    if accept is not None:
        try:
            await accept(conn, first)
        except BaseException:
            conn.terminate()
            raise
    return conn


async def _taken(trying: dict, failed: list, newest):
    """The attempt of `trying` that took a connection; None once every
    attempt has failed, or `newest` (unless None) has failed or has not
    answered within NEXT_HOST_AFTER_S.  A failed attempt leaves `trying`,
    its error for `failed`; an error that no other host could mend (a
    password refused) is raised, as libpq tries no further host then."""
    loop = asyncio.get_running_loop()
    end = None if newest is None else loop.time() + NEXT_HOST_AFTER_S
    while trying:
        left = None if end is None else max(0.0, end - loop.time())
        done, _ = await asyncio.wait(trying, timeout=left, return_when=asyncio.FIRST_COMPLETED)
        for attempt in [a for a in trying if a in done]:
            error = attempt.exception()
            if error is None:
                return attempt
            del trying[attempt]
            if not isinstance(error, (*_NEXT_HOST, StoreError,
                                      asyncpg.exceptions.TargetServerAttributeNotMatched)):
                raise error
            failed.append(error)
        if not done or (newest is not None and newest.done()):
            return None
    return None


# AccMan writes on a cluster's primary and reads there what it wrote (a
# standby's reads lag its commits), so each of its connections, the read
# pool's too, must reach a host that takes writes.  libpq's default, `any`,
# takes whichever host answers first, a standby perhaps (of several hosts,
# or behind one name that resolves to several): a URL asks for read-write
# unless it names one of these.  The values that never reach a primary are
# refused, and `any` of several hosts; `any` of one is the user's to give.
TAKES_WRITES = ("read-write", "primary")
_NEVER_A_PRIMARY = ("read-only", "standby", "prefer-standby")


def target_session_attrs(dsn: str) -> str:
    """What to connect to `dsn` with: the URL's target_session_attrs (or
    PGTARGETSESSIONATTRS), read-write when it names none; a value that can
    take a host other than the primary raises StoreError."""
    given = query_value(dsn, "target_session_attrs") or os.environ.get("PGTARGETSESSIONATTRS")
    # The hosts are the authority's, else the host= parameter's, else
    # PGHOST's (libpq's order, and asyncpg's): each may list several.
    hosts = split_url(dsn)[2] or query_value(dsn, "host") or os.environ.get("PGHOST", "")
    several = "," in hosts
    if given in _NEVER_A_PRIMARY or (given == "any" and several):
        raise StoreError(
            f"{_CONNECT}: target_session_attrs={given} cannot be used: AccMan writes on a "
            "cluster's primary and reads there what it wrote, and this may take a standby; "
            "leave it out or give read-write")
    return given or TAKES_WRITES[0]


def as_libpq_reads(dsn: str) -> str:
    """`dsn` made to read the same to asyncpg as to libpq.  Where a URL
    gives a setting both in its own parts and in its query, libpq takes the
    query's and asyncpg the part's: the part is left out for the database
    (dbname= over the path; a path of "/", which names none to libpq, is
    the empty name to asyncpg, which then leaves dbname= unread), the user
    and the password.  A `+` of the query, itself to libpq (which decodes
    `%XX` alone) and a space to asyncpg (a form's encoding), goes as `%2B`.
    An authority of a port alone (`//:5433/`) names no host to libpq, a
    host "" to asyncpg: its port goes into the query, unless that has one.
    A host= or port= beside hosts in the authority, which asyncpg leaves
    unread, raises StoreError: the two would take different hosts or
    ports, and a host list cannot be moved whole; so does database=,
    asyncpg's alone, and an empty host in a list of several."""
    scheme, user_at, hosts, tail = split_url(dsn)
    if not scheme:
        return dsn
    path, mark, query = tail.partition("?")
    _check_pairs(query)
    query = query.replace("+", "%2B")
    given = {k for k, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)}
    if "," in hosts and any(not h or h.startswith(":") for h in hosts.split(",")):
        # libpq takes its socket directory for it, not PGHOST: the driver
        # has no such host of a list.
        raise StoreError(f"{_CONNECT}: the store URL's list of hosts before its path has "
                         "an empty one, which libpq reads as its socket directory: name "
                         "each host (a socket directory as %2Fvar%2Frun%2Fpostgresql)")
    if hosts.startswith(":") and "," not in hosts:
        if hosts[1:] and "port" not in given:
            query, mark = f"{query}{'&' if query else ''}port={hosts[1:]}", "?"
            given.add("port")
        hosts = ""
    if "database" in given:
        # asyncpg's name for dbname=, which libpq (and so psql) refuses.
        raise StoreError(f"{_CONNECT}: the store URL gives database=, which libpq refuses: "
                         "a URL names its database by its path or dbname=")
    if hosts and given & {"host", "port"}:
        raise StoreError(
            f"{_CONNECT}: the store URL names hosts before its path and gives "
            f"{' and '.join(sorted(given & {'host', 'port'}))}= as well, which libpq and the "
            "driver read differently: give the hosts and their ports in one of the two")
    user, _, password = user_at[:-1].partition(":")
    user = "" if "user" in given else user
    password = "" if "password" in given else password
    user_at = user + (":" + password if password else "") + ("@" if user or password else "")
    if path == "/" or "dbname" in given:
        path = ""
    return f"{scheme}://{user_at}{hosts}{path}{mark}{query}"


# The settings the driver takes from the environment when a URL gives
# them empty, where libpq takes its built-in default.
_FROM_ENV = {"dbname": "PGDATABASE", "user": "PGUSER", "password": "PGPASSWORD",
             "host": "PGHOST", "port": "PGPORT"}


# The names a refused query part is said by: libpq's settings.
_NAMED = LIBPQ_KEYWORDS | {"service"}


def _check_pairs(query: str) -> None:
    """Each part of a URL's query is `name=value`, as libpq requires: a
    part without `=`, with no name, or with a second `=` (`password=a=b`)
    raises StoreError, where the driver would take it (a second `=` into
    the value); so does an empty value of a setting of _FROM_ENV.  A part
    is named by its name when that is libpq's name of a setting, else by
    its place: it may be a secret pasted there, or the piece of a value
    after an unescaped `&`."""
    parts = query.split("&")
    for place, part in enumerate(parts, 1):
        if not part and place == len(parts):
            continue                            # a trailing `&`, libpq's too
        name, eq, value = part.partition("=")
        name = urllib.parse.unquote(name)       # as both read it: db%6Eame is dbname
        wrong = ("has no `=`" if not eq else "has no name" if not name else
                 "has a second `=` (one inside a value is written %3D)" if "=" in value else
                 f"is empty, which libpq reads as its own default and the driver as "
                 f"{_FROM_ENV[name]}: give a value or leave it out"
                 if not value and name in _FROM_ENV else "")
        if wrong:
            said = f"{name}=" if eq and name in _NAMED else f"part {place}"
            raise StoreError(f"{_CONNECT}: the store URL's query is name=value pairs, as libpq "
                             f"reads it, and its {said} {wrong}")


# What a service file may set (libpq's connection service file, named by the
# URL's service= or PGSERVICE): the settings asyncpg reads from a URL, and
# no other, since a setting read by libpq but not by the driver would be
# left out without a word.
SERVICE_SETTINGS = ("host", "port", "dbname", "user", "password", "passfile",
                    "sslmode", "sslcert", "sslkey", "sslrootcert", "sslnegotiation", "sslcrl",
                    "sslpassword", "ssl_min_protocol_version", "ssl_max_protocol_version",
                    "target_session_attrs", "krbsrvname", "gsslib")


def with_service(dsn: str, said: ServiceSaid | None = None) -> str:
    """`dsn` with the settings of its service (its service= parameter, else
    PGSERVICE) in its query, each where the URL gives none, the service=
    itself left out: a service's hosts, ports and target_session_attrs then
    follow the rule of the URL's own (each host tried on its own, read-write
    unless one is named), as libpq takes a service's settings in place of
    those a URL leaves out and before the environment's.  The service file
    is read at each call, as libpq reads it at each connect.  A service
    file that libpq refuses, a service that no service file defines, or one
    that sets what AccMan cannot apply, raises ServiceFileError: libpq
    refuses the first two, and the other would be half-honoured.  One
    whose target_session_attrs may take a standby raises StoreError
    (target_session_attrs), said in the log as a broken file is: by
    `said`, a store's, once the store serves; a failure before, or
    without it, is its caller's to say (the open's)."""
    scheme, user_at, hosts, tail = split_url(dsn)
    name = _service_name(dsn)
    if name is None:
        # libpq's order; an empty value is a name too (`service=`, or
        # PGSERVICE set empty): libpq looks it up, and refuses it.
        name = os.environ.get("PGSERVICE")
    if not scheme or name is None:
        return dsn
    try:
        settings = _applicable(name, service_settings(name))
        dsn = _with_settings(name, scheme, user_at, hosts, tail, settings)
        # Checked here too, where a service file edited under a running
        # server is said: a value it sets may take a standby.
        target_session_attrs(dsn)
    except StoreError as e:
        if said is not None:
            said.failed(name, e)
        raise
    if said is not None:
        said.worked(name)
    return dsn


def _with_settings(name: str, scheme: str, user_at: str, hosts: str, tail: str,
                   settings: dict[str, str]) -> str:
    """The URL of `scheme`, `user_at`, `hosts` and `tail` (its split_url),
    its service= left out, with the settings of the service `name` where
    its query gives none (its port where _with_port says).  A path of "/"
    is left out before (as_libpq_reads), so that a service's dbname is read."""
    path, _, query = tail.partition("?")
    given = {k for k, _ in urllib.parse.parse_qsl(query, keep_blank_values=True)}
    head = f"{scheme}://{user_at}{_with_port(name, hosts, given, settings)}{path}"
    kept = [p for p in query.split("&")
            if p and urllib.parse.unquote_plus(p.partition("=")[0]) != "service"]
    added = [(k, v) for k, v in settings.items() if k not in given]
    query = "&".join(kept + ([urllib.parse.urlencode(added)] if added else []))
    return head + ("?" + query if query else "")


def _with_port(name: str, hosts: str, given: set, settings: dict[str, str]) -> str:
    """The `hosts` of a URL's authority with the port of the service `name`
    where libpq gives it to them: to one host named without a port, or
    with an empty one (`h:`, `[::1]:`: libpq leaves its port unset either
    way), when the query names none, since asyncpg reads no port= beside
    the authority's hosts.  A list of ports for that one host raises
    ServiceFileError, as libpq refuses it."""
    port = settings.get("port", "")
    host, own = name_and_port(hosts)
    if not port or "port" in given or not host or "," in hosts or own:
        return hosts
    if "," in port:
        raise ServiceFileError(
            f"{_CONNECT}: the service {name} sets {port.count(',') + 1} ports for the one "
            "host of the store URL, which libpq refuses: give it one port")
    return f"{host}:{port}"


def _applicable(name: str, settings: dict[str, str]) -> dict[str, str]:
    """`settings` of the service `name`, if AccMan can apply each."""
    unknown = sorted(set(settings) - set(SERVICE_SETTINGS))
    if unknown:
        raise ServiceFileError(
            f"{_CONNECT}: the service {name} sets {', '.join(unknown)}, which AccMan cannot "
            "apply from a service file: give it in the store URL, or leave it out")
    return settings


class ServiceSaid:
    """A store's log lines of a service file that fails once the store
    serves (edited or removed under a running server): each new failure
    said once, with its file and line, and its end once.  A failure before
    the store's open is done (`serving`, which the open sets last) is the
    open's, raised to its caller, however many connections the open made
    before it: a store that never served is not said to fail "until the
    file is mended".  Each store has its own: another store of the
    process, on the same service, says its own failures, and its open's
    failure is not worded as this running store's."""

    def __init__(self):
        self.serving = False
        self._failing: dict[str, str] = {}      # service -> the failure last said

    def failed(self, name: str, e: StoreError) -> None:
        if self.serving and self._failing.get(name) != e.detail:
            self._failing[name] = e.detail
            log.error("%s; each new connection fails until the file is mended", e.detail)

    def worked(self, name: str) -> None:
        if self._failing.pop(name, None) is not None:
            log.warning("the connection service %s can be read again", name)


def _service_name(url: str) -> str | None:
    """The last service= of `url`'s query, decoded as libpq decodes a URL:
    `%XX` and nothing else, a `+` kept (a form's encoding, which
    query_value reads, makes it a space, and names another service)."""
    names = [urllib.parse.unquote(v) for k, _, v in
             (p.partition("=") for p in url.partition("?")[2].split("&"))
             if urllib.parse.unquote(k) == "service"]
    return names[-1] if names else None


def _left(attempt) -> None:
    """An attempt ended unused: the connection it may have taken is closed."""
    if not attempt.cancelled() and attempt.exception() is None:
        attempt.result().terminate()


# For each URL of several hosts, the one of them that last took a
# connection (a URL's hosts are few, and a store has few URLs).
_last_host: dict[str, str] = {}
