"""asyncpg's and the OS's errors, translated in this one place.

A failed call is one of three things to the store:

* RETRY: the database rolled the whole transaction back (a deadlock or a
  serialization failure): nothing of it applied, so it is sent again.
* UNKNOWN: the connection broke, timed out or was refused mid-call (a
  failover, a restart, the network), or the commit's wait for its
  synchronous standby was cancelled (Unreplicated): the batch may or may
  not have committed, or is on the primary alone.  Nothing in it is
  acknowledged (Unavailable); a keyed retry gets the original reply.  The
  store reconnects.
* FAILED: the database refused the statement for another reason (a full
  disk, a bug, a schema that is not ours): the transaction rolled back,
  nothing applied.  The store takes no writes for a while, then tries
  again (SPEC "Durability": it stops taking writes rather than
  acknowledge anything it cannot make durable).

A database that takes no writes (a standby, or `transaction_read_only`)
is UNKNOWN: the store reconnects until it reaches one that does.

What a client and the log are told of an error (`describe`) is a sentence
of AccMan's own, or PostgreSQL's own message: never the driver's or the
OS's text, which names driver internals and may quote the store's URL,
and so its password (asyncpg's URL parser quotes the piece it could not
read).  An outage reads alike whatever the driver raised: the PostgreSQL
store "cannot be reached" or "lost its connection".  A log line adds the
error's type and place (`where`), as the server logs a surfaced bug
(docs/SERVER.md), never its message.
"""

from __future__ import annotations

import asyncio
import re
import socket
import ssl

import asyncpg

from accman.errors import NotApplied, StoreError, Unavailable, where

RETRY = "retry"
UNKNOWN = "unknown"
FAILED = "failed"


class NotSent(Exception):
    """A call whose connection was found closed before anything of it was
    sent (backends.committed): nothing of it applied."""


class Unreplicated(Exception):
    """A commit whose wait for its synchronous standby was cancelled in the
    database (an operator's pg_cancel_backend): PostgreSQL then returns
    success with a WARNING, the commit visible on the primary alone and
    lost in a failover to a standby that lacked it.  Raised by
    backends.committed in place of the result, so that none of its calls
    is acknowledged as on two machines."""


_UNKNOWN = (
    asyncpg.PostgresConnectionError,       # class 08
    asyncpg.exceptions.OperatorInterventionError,   # 57: shutdown, cancel, not yet up
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby (before failover ends)
    asyncpg.InterfaceError,                # the connection is closed or busy
    asyncpg.exceptions.InternalClientError,
    asyncio.TimeoutError,
    OSError,
    NotSent,
    Unreplicated,
)


def ours(exc: BaseException) -> bool:
    """Raised by AccMan's own code, not by the driver, the database or the
    network: a bug, to be logged with its traceback.  A StoreError is no
    bug: AccMan refuses something in words (a service file that cannot be
    used), and those words are logged where it is raised."""
    return not isinstance(exc, (asyncpg.PostgresError, StoreError, *_UNKNOWN))


def classify(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.exceptions.TransactionRollbackError):
        return RETRY
    if isinstance(exc, _UNKNOWN):
        return UNKNOWN
    return FAILED


def answered(exc: BaseException) -> bool:
    """Whether `exc` is the database's own answer to a statement (its
    session goes on as before), not a timeout or a broken connection."""
    return isinstance(exc, asyncpg.PostgresError)


READ_ONLY = "the database takes no writes (a standby, or read-only)"
UNREACHABLE = "the PostgreSQL store cannot be reached"
LOST = "the PostgreSQL store lost its connection"
SLOW = "the database did not answer in time"
BAD_URL = "the store URL cannot be used: check its scheme, hosts, ports and options"
TLS_FAILED = f"{UNREACHABLE} (TLS failed: check sslmode and the certificates)"
# target_session_attrs=read-write found only standbys or read-only databases
# (a failover under way): the store waits for a primary.
NO_PRIMARY = f"{UNREACHABLE} (no host of the store URL takes writes)"
UNREPLICATED = ("a commit's wait for the synchronous standby was cancelled in the "
                "database (pg_cancel_backend): it is on the primary alone")
# A quoted path in the database server's message (`could not extend file
# "base/16384/2619"`): a 503's detail names no file (SPEC "Access").
_QUOTED_PATH = re.compile(r'"[^"]*/[^"]*"')
# The errors of a connection that never came up: nothing answered, or the
# database refused to start a session.  Any other error of a connection
# (class 08, a shutdown, a closed socket or connection) lost one.
_NOT_REACHED = (
    (ConnectionRefusedError, f"{UNREACHABLE} (connection refused)"),
    # A file the connection needs is not there: a Unix-domain host's socket
    # (the directory or the port is wrong, or nothing runs there), or a
    # certificate or key the URL names (sslrootcert, sslcert, sslkey).
    (FileNotFoundError, f"{UNREACHABLE} (a file it needs is not there: a Unix-domain host's "
                        f"socket, or a certificate or key the URL names)"),
    (socket.gaierror, f"{UNREACHABLE} (its host name does not resolve)"),
    (asyncpg.exceptions.CannotConnectNowError,
     f"{UNREACHABLE} (the database is starting up or shutting down)"),
    (ssl.SSLError, TLS_FAILED),
    (PermissionError, f"{UNREACHABLE} (permission denied)"),
    ((asyncpg.exceptions.ClientCannotConnectError,
      asyncpg.exceptions.ConnectionRejectionError), UNREACHABLE),
)
# The errors said by their type alone, the first that matches.
_BY_TYPE = (
    (asyncio.TimeoutError, SLOW),
    (Unreplicated, UNREPLICATED),
    (NotSent, LOST),
    (asyncpg.exceptions.ClientConfigurationError, BAD_URL),
    (asyncpg.exceptions.TargetServerAttributeNotMatched, NO_PRIMARY),
    # Any other: the driver's state broken by a connection that went.
    (asyncpg.exceptions.InternalClientError, LOST),
    *_NOT_REACHED,
)
_LOST = (ConnectionResetError, ConnectionAbortedError, BrokenPipeError,
         asyncpg.PostgresConnectionError, asyncpg.exceptions.AdminShutdownError,
         asyncpg.exceptions.CrashShutdownError, asyncpg.exceptions.ConnectionDoesNotExistError)
# asyncpg says a connection it found closed (an InterfaceError of its own)
# and a server that will not speak TLS (a plain ConnectionError) only in
# words: recognised by them, never quoted.  Any other InterfaceError is
# AccMan's misuse of the driver: unexpected, by its type.
_CLOSED_WORDS = ("connection is closed", "connection was closed")
_TLS_REFUSED_WORDS = "SSL"


def describe(exc: BaseException) -> str:
    """A sentence about `exc` for a log or a 503's detail, the same for
    every error of its kind: never a URL, a password, the hash key, a path,
    or the driver's words."""
    if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
        return f"PostgreSQL {exc.sqlstate}: {READ_ONLY}"
    if isinstance(exc, CausedStoreError):
        # One made of another error says it as that one does.
        return exc.reason
    if isinstance(exc, StoreError):
        return exc.detail
    for kind, sentence in _BY_TYPE:
        if isinstance(exc, kind):
            return sentence
    if type(exc) is ConnectionError and _TLS_REFUSED_WORDS in str(exc):
        return TLS_FAILED
    if isinstance(exc, _LOST) or (isinstance(exc, asyncpg.InterfaceError)
                                  and any(w in str(exc) for w in _CLOSED_WORDS)):
        return LOST
    if isinstance(exc, OSError):
        return UNREACHABLE          # no route, no network: the socket never came up
    if isinstance(exc, asyncpg.PostgresError):
        message = exc.args[0] if exc.args else type(exc).__name__
        return f"PostgreSQL {exc.sqlstate}: {_QUOTED_PATH.sub('(a path)', str(message))}"
    return f"an unexpected error ({type(exc).__name__})"


def read_detail(exc: BaseException, where: str = "") -> str:
    """The 503 detail of a read (/tot, /past, /events) that failed; `where`
    names the cluster on a store of several (complaints.named)."""
    return f"{where}the database cannot be read: {describe(exc)}"


# A batch whose commit may have landed: what each of its callers can do.  A
# keyed mod or hold sent again, or a settle repeated, answers its first
# reply; one without a key has no safe retry (its account's /past tells).
MAY_HAVE_LANDED = ("nothing in this batch was acknowledged and it may have been applied: "
                   "a mod or hold sent again with its key, or a settle repeated, gets its "
                   "first reply")
CLOSED_MID_COMMIT = "the store closed during the commit; " + MAY_HAVE_LANDED


def commit_error(exc: BaseException, kind: str) -> Unavailable:
    """The 503 of a batch that did not commit, by what `classify` made of
    `exc`: NotApplied where the database said that it applied nothing."""
    if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
        return NotApplied(f"{READ_ONLY}: nothing in this batch was applied; the store is "
                          "looking for one that does")
    if isinstance(exc, asyncio.TimeoutError):
        return Unavailable("the database did not answer the commit in time; " + MAY_HAVE_LANDED)
    if isinstance(exc, Unreplicated):
        return Unavailable(f"{UNREPLICATED}, not known to be on two machines; "
                           + MAY_HAVE_LANDED)
    if isinstance(exc, NotSent):
        return NotApplied("the connection to the database was found closed before the "
                          "batch was sent: nothing of it was applied")
    if isinstance(exc, asyncpg.exceptions.QueryCanceledError):
        # A statement cancelled (an operator's cancel; AccMan's sessions
        # have no timeout of the database's) is rolled back: a cancel that
        # comes once the commit is made only cuts its wait for the standby,
        # a warning (Unreplicated).
        return NotApplied("the database cancelled the batch's statement "
                          "(pg_cancel_backend): nothing of it was applied")
    if kind == UNKNOWN:
        return Unavailable("the connection to the database broke during the commit; "
                           + MAY_HAVE_LANDED)
    if isinstance(exc, asyncpg.PostgresError):
        # The database said so itself: it rolled the transaction back.
        return NotApplied("the database refused the batch, nothing of it was applied: "
                          + describe(exc))
    # Raised on our side, perhaps after the database committed: unknown.
    return Unavailable(f"the commit failed in AccMan ({type(exc).__name__}); "
                       + MAY_HAVE_LANDED)


def store_error(exc: BaseException, what: str) -> StoreError:
    """A StoreError for `what` (the step that failed) made of `exc`: its
    detail names the step, its `reason` is `exc` described."""
    return _store_error(what, describe(exc))


def step_error(exc: BaseException, step: str) -> StoreError:
    """A StoreError for `step` of a task that works on several clusters (a
    copy of events: which cluster failed, doing what) made of `exc`: its
    reason, as well as its detail, is `step: exc described`, so that every
    sentence made of it (a complaint in the log, a 503's detail) names the
    step; its `place` is where `exc` was raised, for a log line."""
    sentence = f"{step}: {describe(exc)}"
    return CausedStoreError(sentence, sentence, where(exc))


def placed(exc: BaseException) -> str:
    """Where `exc` was raised, for a log line: a step_error's, where the
    error it was made of was."""
    if isinstance(exc, CausedStoreError) and exc.place is not None:
        return exc.place
    return where(exc)


def closed_by_the_database() -> Exception:
    """What a session that the database's side closed (a restart, a
    failover, its backend ended) is noted as when its close is heard, with
    no call in flight: raised here, so that a log line names this place."""
    try:
        raise asyncpg.exceptions.ConnectionDoesNotExistError("connection was closed")
    except asyncpg.exceptions.ConnectionDoesNotExistError as e:
        return e


def unreadable_url(what: str) -> StoreError:
    """`store_error` of a URL that asyncpg's parser refused with a plain
    ValueError, whose message quotes the piece it could not read: a piece
    of the password, when the password holds a raw `/`."""
    return _store_error(what, BAD_URL)


def _store_error(what: str, reason: str) -> StoreError:
    return CausedStoreError(f"{what}: {reason}", reason)


class CausedStoreError(StoreError):
    """A StoreError made of another error: `detail` says what failed and
    why, `reason` why alone (as `describe` says the error it was made of),
    `place` where that error was raised when it is not where this one is."""

    def __init__(self, detail: str, reason: str, place: str | None = None):
        super().__init__(detail)
        self.reason = reason
        self.place = place

    def __reduce__(self):
        # Copied or pickled whole (an exception's default is its args alone).
        return (type(self), (self.detail, self.reason, self.place))
