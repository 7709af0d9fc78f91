"""asyncpg's and the OS's errors, translated in this one place.

A failed call is one of three things to the store:

* RETRY: the database rolled the whole transaction back (a deadlock or a
  serialization failure): nothing of it applied, so it is sent again.
* UNKNOWN: the connection broke, timed out or was refused mid-call (a
  failover, a restart, the network): the batch may or may not have
  committed.  Nothing in it is acknowledged (Unavailable); a keyed retry
  gets the original reply.  The store reconnects.
* FAILED: the database refused the statement for another reason (a bug,
  a schema that is not ours): the transaction rolled back, nothing
  applied.
"""

from __future__ import annotations

import asyncio

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


def describe(exc: BaseException) -> str:
    """A sentence about `exc` for a log or a 503's detail: its kind and the
    server's message, never a URL, a password or the hash key."""
    if isinstance(exc, asyncpg.PostgresError):
        return f"PostgreSQL {exc.sqlstate}: {exc.args[0] if exc.args else type(exc).__name__}"
    if isinstance(exc, asyncio.TimeoutError):
        return "the database did not answer in time"
    return f"{type(exc).__name__}: {exc}"


def store_error(exc: BaseException, what: str) -> StoreError:
    return StoreError(f"{what}: {describe(exc)}")
