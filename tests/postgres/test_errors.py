"""What the PostgreSQL store says of the errors it meets
(accman/postgres/errors.py): a sentence of AccMan's, the same for every
error of a kind, or PostgreSQL's own message; never the driver's or the
OS's words, which name driver internals and may quote the store's URL;
and the type and place of the error, without its message, for a log line.
(The same over HTTP, with PostgreSQL stopped under a server:
test_serve.py, test_an_outage_is_said_plainly_and_once.)"""

import asyncio
import copy
import pickle
import re
import socket
import ssl

import asyncpg
import pytest

from accman.errors import StoreError, where
from accman.postgres import errors as E
from accman.postgres.complaints import COMPLAINT_REPEAT_S, Complaints
from accman.server.run import redacted

UNREACHABLE = "the PostgreSQL store cannot be reached"
LOST = "the PostgreSQL store lost its connection"


@pytest.mark.parametrize("exc,says", [
    (ConnectionRefusedError(111, "Connection refused"), f"{UNREACHABLE} (connection refused)"),
    (socket.gaierror(-2, "Name or service not known"),
     f"{UNREACHABLE} (its host name does not resolve)"),
    (asyncpg.exceptions.CannotConnectNowError("the database system is shutting down"),
     f"{UNREACHABLE} (the database is starting up or shutting down)"),
    (OSError(113, "No route to host"), UNREACHABLE),
    (FileNotFoundError(2, "No such file or directory"),
     f"{UNREACHABLE} (a file it needs is not there: a Unix-domain host's socket, or a "
     f"certificate or key the URL names)"),
    (asyncpg.exceptions.ClientCannotConnectError("could not connect"), UNREACHABLE),
    (asyncpg.InterfaceError("cannot call PreparedStatement.fetchrow(): the underlying "
                            "connection is closed"), LOST),
    (asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed in the middle "
                                                    "of operation"), LOST),
    (asyncpg.exceptions.AdminShutdownError("terminating connection due to administrator "
                                           "command"), LOST),
    (ConnectionResetError(104, "Connection reset by peer"), LOST),
    (asyncio.TimeoutError(), "the database did not answer in time"),
    (asyncpg.exceptions.ClientConfigurationError("`sslmode` parameter must be one of ..."),
     "the store URL cannot be used: check its scheme, hosts, ports and options"),
    (asyncpg.exceptions.InvalidPasswordError('password authentication failed for user "u"'),
     'PostgreSQL 28P01: password authentication failed for user "u"'),
    (RuntimeError("a message that may quote anything"), "an unexpected error (RuntimeError)"),
    (ssl.SSLCertVerificationError(1, "certificate verify failed"),
     f"{UNREACHABLE} (TLS failed: check sslmode and the certificates)"),
    (ConnectionError("PostgreSQL server at \"db:5432\" rejected SSL upgrade"),
     f"{UNREACHABLE} (TLS failed: check sslmode and the certificates)"),
    (PermissionError(13, "Permission denied"), f"{UNREACHABLE} (permission denied)"),
    (asyncpg.exceptions.TargetServerAttributeNotMatched('None of the hosts match the '
                                                        'target attribute requirement'),
     f"{UNREACHABLE} (no host of the store URL takes writes)"),
    (asyncpg.exceptions.InternalClientError("unexpected state"), LOST),
    # The driver misused by AccMan: not an outage, whatever its class.
    (asyncpg.InterfaceError("cannot perform operation: another operation is in progress"),
     "an unexpected error (InterfaceError)"),
])
def test_an_error_is_said_in_the_store_s_words(exc, says):
    assert E.describe(exc) == says


def test_a_url_the_parser_cannot_read_is_not_quoted():
    """asyncpg's URL parser quotes the piece it could not read: with a raw
    `/` in the password, that piece is the password's."""
    from accman.postgres.connecting import connect
    with pytest.raises(StoreError) as e:
        asyncio.run(connect("postgresql://accman:s3cret/pw@127.0.0.1:5432/accman"))
    assert e.value.detail == ("cannot connect to a PostgreSQL cluster of the store: the store "
                              "URL cannot be used: check its scheme, hosts, ports and options")
    assert E.describe(e.value) == E.BAD_URL         # the step is the detail's alone


def test_a_log_line_names_the_type_and_place_not_the_message():
    try:
        raise ConnectionResetError(104, "s3cret in a message")
    except ConnectionResetError as e:
        said = where(e)
    assert re.fullmatch(r"ConnectionResetError at \S+/test_errors\.py:\d+", said), said


def test_a_step_s_error_keeps_its_words_and_place_when_copied():
    """A step_error (a copy of events) names the step in its detail and its
    reason, and where the error it was made of was raised; so does a copy
    of it, or one pickled and read back."""
    try:
        raise ConnectionResetError(104, "s3cret in a message")
    except ConnectionResetError as e:
        error, place = E.step_error(e, "cluster 2 failed reading its events"), where(e)
    said = f"cluster 2 failed reading its events: {LOST}"
    for made in (error, copy.copy(error), pickle.loads(pickle.dumps(error))):
        assert isinstance(made, StoreError)
        assert (made.detail, E.describe(made), E.placed(made)) == (said, said, place)


@pytest.mark.parametrize("url,shown", [
    ("postgresql://accman:s3cret@db1,db2/accman?target_session_attrs=read-write",
     "postgresql://db1,db2/accman?target_session_attrs=read-write"),
    ("postgresql://db/accman?password=s3cret&sslmode=require",
     "postgresql://db/accman?sslmode=require"),
    ("postgresql://db/accman?sslpassword=s3cret", "postgresql://db/accman"),
    ("postgresql://accman@db/accman?a=1&PASSWORD=s3cret&b=2", "postgresql://db/accman?a=1&b=2"),
    ("postgresql:///accman?host=/run/pg&password=s3cret", "postgresql:///accman?host=/run/pg"),
    ("postgresql://db/accman?pass%77ord=s3cret&x=1", "postgresql://db/accman?x=1"),  # decoded
])
def test_a_store_url_is_shown_without_its_password(url, shown):
    assert redacted(url) == shown


def test_a_failure_that_lasts_is_said_when_it_starts_then_once_a_repeat_then_its_end(caplog):
    """COMPLAINT_REPEAT_S: upkeep that fails every round (each second) is
    not a log line a second."""
    now = [100.0]
    complaints = Complaints(clock=lambda: now[0])
    disk = asyncpg.exceptions.DiskFullError('could not extend file "base/1/2"')
    caplog.set_level("WARNING", logger="accman.postgres")
    for _ in range(int(COMPLAINT_REPEAT_S) * 2 + 1):          # one round a second
        complaints.failed("ending due holds", disk)
        now[0] += 1.0
    complaints.failed("ending due holds", ConnectionResetError())    # other words: said
    complaints.worked("trimming events")                             # never failed: silent
    complaints.worked("ending due holds")
    complaints.worked("ending due holds")                             # said once
    said = [r.getMessage() for r in caplog.records]
    words = "PostgreSQL 53100: could not extend file (a path) (DiskFullError at ?)"
    assert len(said) == 5, said
    assert said[0] == f"ending due holds failed (retried): {words}"
    assert said[1] == f"ending due holds still fails (60 more times in 60 s): {words}"
    assert said[2] == said[1]
    assert said[3].startswith("ending due holds failed (retried): the PostgreSQL store lost")
    assert said[4] == "ending due holds works again"


def test_a_copy_of_events_that_fails_names_both_clusters(caplog):
    """On a store of several, the log says which cluster's events could not
    be copied to which home, as /health names them (from 1)."""
    from types import SimpleNamespace
    from accman.postgres.merge import Merger
    store = SimpleNamespace(complaints=Complaints())
    home, first, third = (SimpleNamespace(index=i) for i in (1, 0, 2))
    merger = Merger(store, home, [first, third])
    caplog.set_level("WARNING", logger="accman.postgres")

    async def copies(fail_at):
        async def one_pass(cluster):
            if cluster is fail_at:
                raise ConnectionResetError(104, "reset")
            return 0
        merger._pass = one_pass
        await merger._run()
    for fail_at in (first, third, None):     # the failure moves on, then ends
        asyncio.run(copies(fail_at))
    said = [r.getMessage() for r in caplog.records]
    assert len(said) == 4, said
    assert said[0].startswith("copying events of cluster 1 to the home, cluster 2 failed "
                              "(retried): the PostgreSQL store lost its connection")
    assert said[1] == "copying events of cluster 1 to the home, cluster 2 works again"
    assert said[2].startswith("copying events of cluster 3 to the home, cluster 2 failed ")
    assert said[3] == "copying events of cluster 3 to the home, cluster 2 works again"
