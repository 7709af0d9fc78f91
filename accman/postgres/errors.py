"""asyncpg's and the OS's errors, translated in this one place.

A failed call is one of three things to the store:

* RETRY: the database rolled the whole transaction back (a deadlock or a
  serialization failure): nothing of it applied, so it is sent again.
* UNKNOWN: the connection broke, timed out or was refused mid-call (a
  failover, a restart, the network): the batch may or may not have
  committed.  Nothing in it is acknowledged (Unavailable); a keyed retry
  gets the original reply.  The store reconnects.
* FAILED: the database refused the statement for another reason (a full
  disk, a bug, a schema that is not ours): the transaction rolled back,
  nothing applied.  The store takes no writes for a while, then tries
  again (SPEC "Durability": it stops taking writes rather than
  acknowledge anything it cannot make durable).

A database that takes no writes (a standby, or `transaction_read_only`)
is UNKNOWN: the store reconnects until it reaches one that does.
"""

from __future__ import annotations

import asyncio
import re

import asyncpg

from accman.errors import StoreError

RETRY = "retry"
UNKNOWN = "unknown"
FAILED = "failed"

_UNKNOWN = (
    asyncpg.PostgresConnectionError,       # class 08
    asyncpg.exceptions.OperatorInterventionError,   # 57: shutdown, cancel, not yet up
    asyncpg.exceptions.ReadOnlySQLTransactionError,  # a standby (before failover ends)
    asyncpg.InterfaceError,                # the connection is closed or busy
    asyncpg.exceptions.InternalClientError,
    asyncio.TimeoutError,
    OSError,
)


def classify(exc: BaseException) -> str:
    if isinstance(exc, asyncpg.exceptions.TransactionRollbackError):
        return RETRY
    if isinstance(exc, _UNKNOWN):
        return UNKNOWN
    return FAILED


READ_ONLY = "the database takes no writes (a standby, or read-only)"
# A quoted path in the database server's message (`could not extend file
# "base/16384/2619"`): a 503's detail names no file (SPEC "Access").
_QUOTED_PATH = re.compile(r'"[^"]*/[^"]*"')


def describe(exc: BaseException) -> str:
    """A sentence about `exc` for a log or a 503's detail: its kind and the
    server's message, never a URL, a password, the hash key or a path."""
    if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
        return f"PostgreSQL {exc.sqlstate}: {READ_ONLY}"
    if isinstance(exc, StoreError):
        return str(exc)
    if isinstance(exc, asyncpg.PostgresError):
        message = exc.args[0] if exc.args else type(exc).__name__
        return f"PostgreSQL {exc.sqlstate}: {_QUOTED_PATH.sub('(a path)', str(message))}"
    if isinstance(exc, asyncio.TimeoutError):
        return "the database did not answer in time"
    return f"{type(exc).__name__}: {exc}"


def commit_detail(exc: BaseException, kind: str) -> str:
    """The 503 detail of a batch that did not commit, by what `classify`
    made of `exc`."""
    if isinstance(exc, asyncpg.exceptions.ReadOnlySQLTransactionError):
        return (f"{READ_ONLY}: nothing in this batch was applied; the store is looking "
                "for one that does")
    if isinstance(exc, asyncio.TimeoutError):
        return ("the database did not answer the commit in time; nothing in this batch was "
                "acknowledged, retry with its key")
    if kind == UNKNOWN:
        return ("the connection to the database broke during the commit; nothing in this "
                "batch was acknowledged, retry with its key")
    if isinstance(exc, asyncpg.PostgresError):
        # The database said so itself: it rolled the transaction back.
        return f"the database refused the batch, nothing of it was applied: {describe(exc)}"
    # Raised on our side, perhaps after the database committed: unknown.
    return (f"the commit failed in AccMan ({type(exc).__name__}); nothing in this batch was "
            "acknowledged, retry with its key")


def store_error(exc: BaseException, what: str) -> StoreError:
    return StoreError(f"{what}: {describe(exc)}")
