"""Cursors in the store, and the one front-end that acts on each
(accman/server/cursors.py's interface, on PostgreSQL).

The front-ends of one store share a cursor: a row of accman_cursors on the
events' home cluster, which only grows.  One front-end at a time acts on
it (the webhook's deliverer): the one holding a session advisory lock on
the home for that cursor, on a connection of its own.  The role goes with
that session, and PostgreSQL releases the lock when the session ends:
at once when the holder stops or its process dies (its socket closes);
within about 11 s when its host dies or the network between is cut
(the TCP keepalive every session of a store has: connecting.KEEPALIVE).
Another front-end then takes the role within WEBHOOK_LEAD_INTERVAL_S and
goes on from the cursor as the last holder saved it.  So while the role
stays put each event is delivered once, and across a hand-over at least
once.

A holder learns that it lost the role at its next check (`lead` returns
False once, even if the lock is free to take again at once), so that it
never goes on from its own cursor past another holder's tenure.
"""

from __future__ import annotations

import time
import zlib

from accman.postgres.backends import committed
from accman.postgres.errors import store_error
from accman.server.cursors import check_name

# pg_try_advisory_lock(key1, key2): ("accu" in ASCII, a cursor's name's CRC-32).
LOCK_CLASS = 0x61636375
# Each call to the database: one not answered by then is a failure (the
# caller retries; a role whose session does not answer is given up).
CURSOR_TIMEOUT_S = 10.0

_LOAD_SQL = "SELECT value FROM accman_cursors WHERE name = $1"
_SAVE_SQL = ("INSERT INTO accman_cursors VALUES ($1, $2) ON CONFLICT (name) "
             "DO UPDATE SET value = greatest(accman_cursors.value, excluded.value)")
_LEAD_SQL = "SELECT pg_try_advisory_lock($1, $2)"
_TARGET_SQL = "SELECT target FROM accman_cursors WHERE name = $1"
_MARK_SQL = ("INSERT INTO accman_cursors VALUES ($1, 0, $2) ON CONFLICT (name) "
             "DO UPDATE SET target = excluded.target")


def lock_key(name: str) -> int:
    """The advisory lock's second key for a cursor: its name's CRC-32, as
    PostgreSQL's signed int4."""
    crc = zlib.crc32(check_name(name).encode("ascii"))
    return crc - (1 << 32) if crc >= 1 << 31 else crc


class PgCursors:
    """The cursors of one PgStore, and the roles this front-end holds."""

    def __init__(self, store):
        self.store = store
        self._conns: dict = {}       # name -> the connection that holds or seeks the role
        self._leading: dict = {}     # name -> True while this front-end holds the role
        self._checked: dict = {}     # name -> when the held role's session last answered

    async def load_cursor(self, name: str) -> int | None:
        """The cursor as last saved by any front-end; None when never."""
        return await self._call("fetchval", _LOAD_SQL, name, "read")

    async def save_cursor(self, name: str, value: int) -> None:
        """Durable when it returns (committed as the mods are, and never
        cancelled in the database: backends.committed); a value below the
        saved one leaves the saved one."""
        assert type(value) is int and value >= 0, (name, value)
        await self._call("execute", _SAVE_SQL, name, "save", value)

    async def target(self, name: str) -> bytes | None:
        """The receiver the last holder of `name`'s role marked (`mark`);
        None when none has."""
        value = await self._call("fetchval", _TARGET_SQL, name, "read")
        return None if value is None else bytes(value)

    async def mark(self, name: str, target: bytes) -> None:
        """The holder of `name`'s role delivers to `target` (a digest)."""
        await self._call("execute", _MARK_SQL, name, "save", target)

    async def _call(self, method: str, sql: str, name: str, verb: str, *args):
        """One statement on the home cluster about cursor `name`, to
        AccMan's deadline (backends.committed: a save that waits for the
        synchronous standby is not cancelled, which would make it visible
        on the primary alone); its errors as StoreError ("cannot VERB the
        NAME cursor: ...")."""
        check_name(name)
        try:
            async with self.store.home.pool.acquire(timeout=CURSOR_TIMEOUT_S) as conn:
                return await committed(conn, getattr(conn, method)(sql, name, *args),
                                       CURSOR_TIMEOUT_S, None)
        except Exception as e:
            raise store_error(e, f"cannot {verb} the {name} cursor") from None

    async def lead(self, name: str, check_s: float) -> bool:
        """Whether this front-end holds `name`'s role, taking it if no
        front-end does.  While it holds it, its session is checked at most
        every `check_s`: a session that does not answer gives the role up
        (PostgreSQL releases its lock when the session goes)."""
        conn = self._conns.get(name)
        if conn is not None and conn.is_closed():
            held = self._leading.get(name, False)
            self._drop(name)
            if held:
                return False        # said once: another may have held it since
            conn = None
        now = time.monotonic()
        if self._leading.get(name) and now - self._checked[name] < check_s:
            return True
        try:
            if conn is None:
                from accman.postgres.connecting import connect
                home = self.store.home
                conn = self._conns[name] = await connect(home.url, said=self.store.service_said,
                                                         accept=home.accept)
            if self._leading.get(name):
                await conn.fetchval("SELECT 1", timeout=CURSOR_TIMEOUT_S)
            elif await conn.fetchval(_LEAD_SQL, LOCK_CLASS, lock_key(name),
                                     timeout=CURSOR_TIMEOUT_S):
                self._leading[name] = True
        except Exception as e:
            self._drop(name)
            raise store_error(e, f"cannot take or keep the {name} role") from None
        self._checked[name] = now
        return bool(self._leading.get(name))

    def _drop(self, name: str) -> None:
        conn = self._conns.pop(name, None)
        self._leading.pop(name, None)
        if conn is not None and not conn.is_closed():
            conn.terminate()          # its lock, if it held one, goes with it

    async def close(self) -> None:
        """Gives every role up at once: the lock goes with the socket, so
        a backend that does not answer cannot hold a stop up."""
        for name in list(self._conns):
            self._drop(name)
