"""The front-ends serving a store, as `accman migrate` adding a cluster must
see them: a front-end runs with the clusters it was started with, and one
left running while a cluster is added would open accounts, and look for
them, where the store of more clusters does not (docs/SCALING.md, "Several
clusters": the front-ends are stopped first).

Each front-end's writer session holds a shared advisory lock on every
cluster of its store (FRONTEND_LOCK_ID), taken at each connection, before
the front-end serves through it.  A migrate that adds a cluster takes the
same lock exclusively on the store's clusters before it changes any, and
holds it to its end: it is refused while a front-end holds the lock, and a
front-end that connects meanwhile is refused in turn.  A front-end's writer
that reconnects (a failover, a restart of the database) checks that the
store is still the one it opened: a cluster added while it was cut off
makes it refuse the connection, and so stop taking writes there.

And every connection of a front-end's (writers, read pool, listener, the
webhook's role) reaches the cluster it opened, or none: a host of the URL
that answers with another store, or with no store, after a failover or a
name moved, is turned down as a host that does not answer (`same_store`),
where the front-end would read and write another store's accounts with
its own credential-hash key.

    await join(writer, expected_home, expected_members)   # a front-end's writer
    await take_exclusively(conns, numbers, count)         # a migrate adding one
    conn = await connect(url, accept=same_store(cluster_id))
"""

from __future__ import annotations

import asyncpg

from accman.errors import StoreError
from accman.postgres.connecting import CONNECT_TIMEOUT_S

# "accmanF" in ASCII: the migration's own lock is "accman" (migrate.py).
FRONTEND_LOCK_ID = 0x6163636D616E46

_JOIN_SQL = "SELECT pg_try_advisory_lock_shared($1)"
_SHAPE_SQL = ("SELECT events_home, ARRAY(SELECT cluster_id FROM accman_merged) "
              "FROM accman_schema")
# The front-ends holding the lock in this database (an advisory lock is a
# database's own): their addresses (local for a socket), and how many.
_HOLDERS_SQL = ("SELECT array_agg(DISTINCT coalesce(host(a.client_addr), 'local')), "
                "count(DISTINCT l.pid) FROM pg_locks l JOIN pg_stat_activity a USING (pid) "
                "WHERE l.locktype = 'advisory' AND l.objsubid = 1 AND l.granted "
                "AND (l.classid::bigint << 32 | l.objid::bigint) = $1 AND l.pid <> "
                "pg_backend_pid() AND l.database = (SELECT oid FROM pg_database "
                "WHERE datname = current_database())")

_CLUSTER_ID_SQL = "SELECT cluster_id FROM accman_schema"

OTHER_STORE = ("a host of the URL answered with another store than the one this front-end "
               "opened (its accman_schema names another cluster, or it has none): no copy "
               "of the store, after a failover or a name moved; nothing is read or written "
               "there")
GROWING = ("`accman migrate` is adding a cluster to the store: start this front-end "
           "once it has ended, with every --store of the store")
RESHAPED = ("the store's clusters changed since this front-end started (`accman migrate` "
            "added one): it takes no writes there; restart it with every --store of the store")


async def join(writer, home: bytes | None, members: frozenset | None) -> None:
    """Holds the front-end's lock on `writer`'s session, and checks that the
    cluster records the store this front-end opened: its events' `home`
    (None for a store of one) and, on the home, the other clusters
    (`members`; None elsewhere)."""
    if not await writer.fetchval(_JOIN_SQL, FRONTEND_LOCK_ID, timeout=CONNECT_TIMEOUT_S):
        raise StoreError(GROWING)
    recorded, others = await writer.fetchrow(_SHAPE_SQL, timeout=CONNECT_TIMEOUT_S)
    if recorded != home or (members is not None and frozenset(others) != members):
        raise StoreError(RESHAPED)


def same_store(cluster_id: bytes):
    """connect_each_host's `accept` for the cluster `cluster_id`: a
    connection whose database records another cluster, or none, is
    refused (StoreError OTHER_STORE).  A standby promoted, or a restored
    copy, records the same: its accman_schema is the store's."""
    async def accept(conn, _first: bool) -> None:
        try:
            found = await conn.fetchval(_CLUSTER_ID_SQL, timeout=CONNECT_TIMEOUT_S)
        except asyncpg.exceptions.UndefinedTableError:
            found = None
        if found != cluster_id:
            raise StoreError(OTHER_STORE)
    return accept


NO_STORE = ("a host of the store URL other than its first answered with no AccMan store: "
            "a store is made only on the first host of its URL (one made while the store's "
            "primary is away would be a new, empty store on another host); nothing was "
            "changed")


async def made_on_first(conn, first: bool) -> None:
    """migrate's `accept` (a start's too): a host other than the URL's first
    whose database holds no store is turned down (StoreError NO_STORE), the
    next tried, as a host that does not answer is.  A promoted standby
    holds the store; only a host that is no copy of it holds none."""
    if not first and await conn.fetchval("SELECT to_regclass('accman_schema') IS NULL",
                                         timeout=CONNECT_TIMEOUT_S):
        raise StoreError(NO_STORE)


async def take_exclusively(conns, numbers: list[int], count: int) -> None:
    """Takes the front-ends' lock exclusively on the clusters `numbers`
    (1-based among `count`) of `conns`, held until the connections close;
    refuses, having changed nothing, while front-ends hold it."""
    for n in numbers:
        conn = conns[n - 1]
        if await conn.fetchval("SELECT pg_try_advisory_lock($1)", FRONTEND_LOCK_ID):
            continue
        hosts, many = await conn.fetchrow(_HOLDERS_SQL, FRONTEND_LOCK_ID)
        shown = ", ".join(sorted(hosts or ())) or "hosts not known"
        raise StoreError(
            f"{many or 'some'} AccMan front-end{'s' * (many != 1)} serve{'s' * (many == 1)} "
            f"the store on cluster {n} of {count} (from {shown}): stop every front-end of "
            "the store before adding a cluster (docs/SCALING.md, \"Several clusters\"); "
            "nothing was changed")
