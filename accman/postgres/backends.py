"""Commits awaited to a deadline of AccMan's, never the driver's.

The driver's timeout, like a cancelled task, sends the database a cancel
request.  A commit that waits for its synchronous standby and is cancelled
stops waiting and becomes visible on the primary alone: its readers see
it, its events may be delivered, and a failover to the standby loses it
(PostgreSQL, "Synchronous Replication").  So a statement that commits is
given a deadline of AccMan's instead, past which its connection's socket
is closed: its backend does not notice, goes on waiting, and its commit
stays unseen until the standby has it.  The backend is noted as abandoned,
and the store takes no writes on its cluster until it ends by itself
(Cluster.stalled): it holds its accounts' locks meanwhile.

A cancel from elsewhere (an operator's pg_cancel_backend) cannot be
prevented: the commit then returns success with a WARNING from the
database's synchronous replication code.  A commit hears its
connection's notices while it runs (SyncWaitWatch), and one that met
that warning raises E.Unreplicated in place of its result, so that
nothing of it is acknowledged as on two machines.
"""

from __future__ import annotations

import asyncio
import contextlib

import asyncpg

from accman.postgres import errors as E
from accman.postgres.connecting import CONNECT_TIMEOUT_S

# A backend is named by its pid and its start: a pid alone may be reused.
_BACKEND_SQL = "SELECT pid, backend_start FROM pg_stat_activity WHERE pid = pg_backend_pid()"


# Where PostgreSQL's notices of a commit's cut wait for its synchronous
# standby come from: the source file and function a notice names are not
# translated, where its message is (lc_messages).
_SYNC_WAIT_FILE = "syncrep.c"
_SYNC_WAIT_FUNCTION = "SyncRepWaitForLSN"


class Abandoned(asyncio.TimeoutError):
    """A commit given up at its deadline: its backend may go on, and commit."""


# A connection's graceful close (its Terminate sent, the database's end of
# the socket awaited) not done by then is cut short: the socket is aborted,
# which is all a close must do.  A database that answers closes within
# milliseconds; one that does not (a host gone, frozen) would hold the close
# until the kernel gives up on the socket, about 15 minutes.
CLOSE_TIMEOUT_S = 1.0


class Connection(asyncpg.Connection):
    """A connection that knows its backend, once `identify` has run, and
    whose close is bounded and raises nothing."""

    __slots__ = ("backend",)

    async def close(self, *, timeout: float | None = None) -> None:
        """asyncpg's close, for at most CLOSE_TIMEOUT_S (less if `timeout`
        is), its failure kept to itself: a pool closes a connection it
        expired (Cluster.connect) in a task no one awaits, at its next
        acquire, or in its release, where a close's error or wait would
        replace or hold up a read's answer (a release passes on the
        acquire's timeout, READ_TIMEOUT_S, 10 s).  A close that fails has
        aborted the socket."""
        bound = CLOSE_TIMEOUT_S if timeout is None else min(timeout, CLOSE_TIMEOUT_S)
        with contextlib.suppress(Exception):
            await super().close(timeout=bound)


async def identify(conn) -> None:
    """Notes the connection's backend (a pool's init, and each writer's)."""
    conn.backend = tuple(await conn.fetchrow(_BACKEND_SQL, timeout=CONNECT_TIMEOUT_S))


async def committed(conn, call, timeout_s: float, abandoned: set | None):
    """Awaits `call`, a coroutine that commits on `conn` (a Connection, or
    a pool's proxy of one; or reads, writer_read), for at most `timeout_s`,
    in a task of its own:
    cancelling the caller does not cancel it.  Past the deadline, or when
    the caller is cancelled, closes the connection's socket and adds its
    backend to `abandoned` (unless None: a commit whose locks stop no
    writer); past the deadline, raises Abandoned (the outcome unknown).
    A commit whose wait for its synchronous standby was cut raises
    E.Unreplicated (committed, on the primary alone); one whose connection
    is found closed before it starts, E.NotSent (nothing sent)."""
    watch = SyncWaitWatch()
    try:
        conn.add_log_listener(watch.heard)      # refuses a closed connection
    except asyncpg.InterfaceError:
        call.close()                            # never started: nothing was sent
        raise E.NotSent(E.LOST) from None
    task = asyncio.ensure_future(call)
    try:
        done, _ = await asyncio.wait((task,), timeout=timeout_s)
    except BaseException:
        _give_up(conn, task, abandoned)     # its listeners go with it
        raise
    if not done:
        _give_up(conn, task, abandoned)
        raise Abandoned(f"no answer in {timeout_s} s")
    # A pool's proxy of a connection the database closed refuses the call.
    with contextlib.suppress(asyncpg.InterfaceError):
        conn.remove_log_listener(watch.heard)
    result = task.result()
    if watch.cut:
        raise E.Unreplicated(E.UNREPLICATED)
    return result


class SyncWaitWatch:
    """A commit's log listener: whether the database said that it cut the
    commit's wait for its synchronous standby.  asyncpg calls it (call_soon)
    before it wakes the statement's caller, as the notice comes before the
    statement's end."""

    __slots__ = ("cut",)

    def __init__(self):
        self.cut = False

    def heard(self, _conn, message) -> None:
        if (getattr(message, "server_source_filename", None) == _SYNC_WAIT_FILE
                or getattr(message, "server_source_function", None) == _SYNC_WAIT_FUNCTION):
            self.cut = True


async def pool_read(pool, timeout_s: float, method: str, sql: str, *args):
    """`conn.<method>(sql, *args)` on a connection of `pool`, answered or
    failed within `timeout_s` in all (0 or less: at once).  The acquire
    (which may connect: else the driver's 60 s) and the query share the
    deadline; a connection whose query failed is closed_unless_answered."""
    loop = asyncio.get_running_loop()
    deadline = loop.time() + timeout_s
    conn = await pool.acquire(timeout=timeout_s)
    try:
        # A deadline passed by now: asyncpg raises TimeoutError at once.
        return await getattr(conn, method)(sql, *args, timeout=deadline - loop.time())
    except BaseException as e:
        closed_unless_answered(conn, e)
        raise
    finally:
        await pool.release(conn)


async def writer_read(conn, timeout_s: float, sql: str, *args):
    """`conn.fetch(sql, *args)` on a writer's connection, outside any
    transaction, to a deadline of AccMan's (committed's): past it the
    socket is closed, where the driver's timeout would leave the connection
    waiting for its cancel's answer, and the batch sent next on it would
    wait too.  Its caller then loses the cluster, which notes the writer's
    backend as any dropped writer's: the reconnection waits for it to end
    (Cluster.stalled), as a read that holds no lock soon does."""
    return await committed(conn, conn.fetch(sql, *args), timeout_s, None)


def closed_unless_answered(conn, exc: BaseException) -> None:
    """Closes a pool's `conn` that `exc` ended a call on, before it goes
    back, unless the database answered the error itself (its session goes
    on as before): the return of a connection whose call timed out waits
    for the cancel request's answer, as long as a database that does not
    answer."""
    if not E.answered(exc):
        # One that committed() gave up is closed already, and a pool's
        # proxy of it refuses the call: its error would replace `exc`.
        with contextlib.suppress(asyncpg.InterfaceError):
            conn.terminate()


async def no_reset(conn) -> None:
    """A read pool's reset on release (asyncpg's `reset`): none.  Its
    sessions hold no state of their own (no LISTEN, advisory lock, SET or
    cursor: those live on connections of their own), and asyncpg rolls an
    open transaction back before this runs; its default reset is a round
    trip on every release."""


def _give_up(conn, task, abandoned: set | None) -> None:
    task.add_done_callback(_retrieved)          # it ends as the socket closes
    if abandoned is not None:
        abandoned.add(conn.backend)
    conn.terminate()


def _retrieved(task) -> None:
    if not task.cancelled():
        task.exception()
