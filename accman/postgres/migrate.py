"""Creating and migrating the schema on one or more clusters, after the
checks a store makes before it serves (accman.postgres.shape), at
`accman migrate --store URL` and at `accman serve --store URL` start.

    accman.postgres.migrate_sync(["postgresql://…"])   # the CLI's `migrate`

Several clusters make one store: every cluster holds the same credential-
hash key (the first migration makes it; clusters added later are given
it), and each has its own random cluster id, which spreads accounts over
them (accman.postgres.store).  Clusters that disagree on the key are
refused: an account would hash to another id on each.  They also agree on
the one whose events are numbered in the store's order (events_home,
accman.postgres.merge): chosen once, when a store first has two clusters,
as the one that has numbered the most events (the one cluster it had
before: the ids already read from it stay the store's), the lowest cluster
id on a tie, so that front-ends started together choose the same.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import secrets

import asyncpg

from accman.errors import StoreError
from accman.postgres.connecting import DRIVER_ERRORS, connect, refuse_undurable
from accman.postgres.errors import store_error
from accman.postgres.schema import MIGRATIONS, SCHEMA_VERSION
from accman.postgres.serving import made_on_first, take_exclusively
from accman.postgres.shape import (CLUSTER_ID_BYTES, SETUP_PREFIX, ClusterInfo,
                                   check_before_migrating, check_homeless, check_infos,
                                   check_not_growing, check_not_pending, check_not_twice,
                                   check_setup_count, check_version, of_cluster,
                                   served_if_growing, setting_up, which)

log = logging.getLogger("accman.postgres")

HASH_KEY_BYTES = 16
# Held while a migration runs, so that front-ends started together run it
# once, and while the events' home is chosen and recorded (settle_home): a
# session advisory lock on this number ("accman" in ASCII), taken on one
# cluster at a time by a migration, on every cluster in cluster-id order by
# settle_home, so that no two holders wait on each other in a cycle.
MIGRATE_LOCK_ID = 0x6163636D616E


async def read_info(conn) -> ClusterInfo | None:
    """The cluster's schema row, None when it has no AccMan schema."""
    if await conn.fetchval("SELECT to_regclass('accman_schema') IS NULL"):
        found = await conn.fetchval("SELECT array_agg(t) FROM unnest($1::text[]) t "
                                    "WHERE to_regclass(t) IS NOT NULL", list(_TABLES))
        if found:
            # Migrating from version 0 would fail on a table that exists.
            raise StoreError(f"the database holds AccMan's tables ({', '.join(found)}) but "
                             "no accman_schema, which names their version and the "
                             "credential-hash key: a damaged store, not migrated; restore "
                             "it from a backup")
        return None
    row = await conn.fetchrow("SELECT * FROM accman_schema")   # version 1 has no events_home
    if row is None:
        raise StoreError("the accman_schema table is empty: not a store AccMan made")
    try:
        version, key, cid = row["version"], bytes(row["hash_key"]), bytes(row["cluster_id"])
    except (KeyError, TypeError):
        raise StoreError("the accman_schema table is not AccMan's: not a store AccMan "
                         "made") from None
    home = row.get("events_home")
    home = bytes(home) if home is not None else None
    members = frozenset()
    if home == cid:
        members = frozenset(bytes(r[0]) for r in
                            await conn.fetch("SELECT cluster_id FROM accman_merged"))
    return ClusterInfo(version, key, cid, home, members)


async def migrate_cluster(conn, hash_key: bytes, adopt: bool = False, setup: bytes | None = None,
                          bare: bool = False, shown: str = "") -> tuple[ClusterInfo, bool]:
    """Brings one cluster to SCHEMA_VERSION, in one transaction; a new one
    gets `hash_key`.  Refuses a newer schema, or one with another key,
    unless `adopt`: `hash_key` was made for a store that had none, and one
    made meanwhile (another front-end migrating at once) is its key.  A
    cluster with no events' home recorded gets `setup` (setting_up) there,
    in the same transaction, when given, unless it holds accounts: then it
    is a store of one already, which goes on serving alone while the setup
    is unfinished (a cluster being added to it that is cut short), and the
    accounts it opens meanwhile are moved with the others once finished.
    A cluster found `bare` before the lock, and set up meanwhile with no
    mark (by another AccMan given it alone, started at once), is refused:
    a front-end may serve it as a store of one, looking for its accounts
    there only.  Returns the cluster's row, and whether this call marked
    it (a mark found there is another setup's, or an earlier call's).
    Making the schema in a database that holds other tables is said, once
    (said_beside; `shown` names the cluster of a store of several).

    The advisory lock is the session's, taken before the transaction
    begins: a transaction that began before another migration committed
    would not see the tables it made (PostgreSQL takes in catalog changes
    at a transaction's start, and at a table's lock, not an advisory
    lock's), and would make them again."""
    await conn.execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK_ID)
    try:
        info, marked, beside = await _migrate_locked(conn, hash_key, adopt, setup, bare)
    except BaseException:
        # The connection may be gone with the lock: the first error is the one to tell.
        with contextlib.suppress(*DRIVER_ERRORS):
            await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK_ID)
        raise
    await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK_ID)
    if beside is not None:          # once committed: the schema is made
        said_beside(shown, *beside)
    return info, marked


# The tables of the database outside PostgreSQL's own schemas (a partition
# counted with its table), read before AccMan's are made: another
# application's, with the schema AccMan's go to.
_BESIDE_SQL = r"""
SELECT current_schema()::text, count(*),
       array_agg(DISTINCT n.nspname::text ORDER BY n.nspname::text)
  FROM pg_class c JOIN pg_namespace n ON n.oid = c.relnamespace
 WHERE c.relkind IN ('r', 'p', 'f') AND NOT c.relispartition
   AND n.nspname <> 'information_schema' AND n.nspname NOT LIKE 'pg\_%'
"""


def said_beside(shown: str, schema: str, count: int, schemas: list) -> None:
    """A money store made in a database that another application uses
    shares its backups and restores, its roles and its load: a warning,
    not a refusal (AccMan's objects are all named accman_*, so both may
    live there, as some do on purpose).  Names are quoted as repr does,
    so that no name can make a line of its own."""
    tables = f"{count} table{'s' * (count > 1)}"
    where = ", ".join(map(repr, schemas))
    log.warning("warning: %sAccMan's tables were made in schema %r of a database that holds "
                "%s of another application (in schema%s %s): the store shares that "
                "database's backups and restores, roles and load; a database of its own "
                "keeps it apart (docs/SCALING.md, \"The data in PostgreSQL\")",
                shown, schema, tables, "s" * (len(schemas) > 1), where)


async def _migrate_locked(conn, hash_key: bytes, adopt: bool, setup: bytes | None,
                          bare: bool) -> tuple[ClusterInfo, bool, tuple | None]:
    marked, beside = False, None
    async with conn.transaction():
        info = await read_info(conn)
        if bare and setup is not None and info is not None and info.events_home is None:
            raise StoreError("it was set up meanwhile by another AccMan, as a store of one, "
                             "which a front-end may serve: stop the front-ends given it "
                             "alone, and run `accman migrate` with every --store "
                             '(docs/SCALING.md, "Several clusters")')
        version = 0 if info is None else info.version
        check_version(version)
        if info is not None and info.hash_key != hash_key and not adopt:
            raise StoreError("the clusters disagree on the credential-hash key: they are "
                             "not one store")
        if info is None:
            schema, count, schemas = await conn.fetchrow(_BESIDE_SQL)
            beside = (schema, count, schemas) if count else None
        for v, sql in MIGRATIONS:
            if v > version:
                await conn.execute(sql)
        if info is None:
            info = ClusterInfo(SCHEMA_VERSION, hash_key, secrets.token_bytes(CLUSTER_ID_BYTES))
            await conn.execute("INSERT INTO accman_schema VALUES (true, $1, $2, $3)",
                               SCHEMA_VERSION, hash_key, info.cluster_id)
        elif version < SCHEMA_VERSION:
            # Written only when it changes: a store already at this version
            # opens with no commit, which waits for a synchronous standby,
            # so a front-end started while that standby is away serves.
            await conn.execute("UPDATE accman_schema SET version = $1", SCHEMA_VERSION)
            info = info._replace(version=SCHEMA_VERSION)
        if setup is not None and info.events_home is None and not await conn.fetchval(
                "SELECT EXISTS (SELECT 1 FROM accman_accounts)"):
            await conn.execute("UPDATE accman_schema SET events_home = $1", setup)
            info, marked = info._replace(events_home=setup), True
    return info, marked, beside


async def settle_home(conns, infos: list[ClusterInfo],
                      seen: frozenset = frozenset()) -> list[ClusterInfo]:
    """Records on every cluster of a store of several which one numbers the
    store's events, choosing it if none has been (see above), and gives the
    home a row in accman_merged for each other cluster.  The home first:
    once a cluster names the home, the home records the store's clusters,
    so that a setup cut short leaves none naming a home that does not.

    Under the migrate lock of every cluster, taken in cluster-id order (two
    front-ends settling at once wait for each other, never in a cycle),
    with the clusters' records read again: `infos`, read cluster by
    cluster, may predate a home that another front-end recorded and began
    serving since, whose event counters no longer choose it (a commit on
    another cluster not yet copied to it).  What was read again is
    refused, changing nothing, when it is not the setup of these clusters
    (check_set_up_meanwhile): `seen` are the homes recorded when this
    migrate began."""
    order = sorted(range(len(conns)), key=lambda k: infos[k].cluster_id)
    locked = []
    try:
        for k in order:
            await conns[k].execute("SELECT pg_advisory_lock($1)", MIGRATE_LOCK_ID)
            locked.append(conns[k])
        infos = [await read_info(c) for c in conns]
        check_set_up_meanwhile(infos, seen)
        return await _settle_home_locked(conns, infos)
    finally:
        for conn in reversed(locked):
            # The connection may be gone with its lock: the first error is the one to tell.
            with contextlib.suppress(*DRIVER_ERRORS):
                await conn.execute("SELECT pg_advisory_unlock($1)", MIGRATE_LOCK_ID)


def check_set_up_meanwhile(infos: list[ClusterInfo], seen: frozenset) -> None:
    """Front-ends started together on new clusters, with --store lists that
    differ (a cluster more in one's configuration), each read them bare:
    one may have marked them for its count, or recorded its store, since.
    The other, settling a store of another shape on the same clusters,
    would make two stores that front-ends serve at once, each opening
    accounts where the other does not look for them.  So a cluster marked
    by a setup of another count is refused, and a home recorded since
    `seen` that records other clusters than these."""
    check_setup_count(infos)
    given = {i.cluster_id for i in infos}
    for n, i in enumerate(infos, 1):
        store = i.members | {i.cluster_id}
        if i.home == i.cluster_id and i.cluster_id not in seen and store != given:
            raise StoreError(
                f"{which([n], len(infos))} was set up meanwhile by another AccMan as the home "
                f"of a store of {len(store)} clusters ({len(store & given)} of the "
                f"{len(given)} given), which a front-end may serve: give every cluster of the "
                "store with --store, or stop its front-ends and run `accman migrate` with "
                'all of them to add one (docs/SCALING.md, "Several clusters")')


async def _settle_home_locked(conns, infos: list[ClusterInfo]) -> list[ClusterInfo]:
    homes = {i.home for i in infos} - {None}
    if len(homes) > 1:
        raise StoreError("the clusters disagree on where the store's events are numbered: "
                         "they are not one store")
    if homes:
        home = homes.pop()
    else:
        numbered = [await c.fetchval("SELECT next_event FROM accman_counter") for c in conns]
        home = max(zip(numbered, infos, strict=True),
                   key=lambda pair: (pair[0], [-b for b in pair[1].cluster_id]))[1].cluster_id
    out = {}
    for k in sorted(range(len(infos)), key=lambda k: infos[k].cluster_id != home):
        conn = conns[k]
        async with conn.transaction():
            await conn.execute("UPDATE accman_schema SET events_home = $1 WHERE events_home "
                               "IS NULL OR substr(events_home, 1, $2) = $3", home,
                               len(SETUP_PREFIX), SETUP_PREFIX)
            if infos[k].cluster_id == home:
                await conn.executemany(
                    "INSERT INTO accman_merged VALUES ($1, 0) ON CONFLICT DO NOTHING",
                    [(i.cluster_id,) for i in infos if i.cluster_id != home])
        out[k] = await read_info(conn)
    return [out[k] for k in range(len(infos))]


async def migrate(urls: list[str], grow: bool = True) -> list[ClusterInfo]:
    """Migrates every cluster of a store; the first that has a key gives
    it to the others, or a new one is made.  Unless `grow` (`accman
    migrate`), a cluster given beside a store that holds accounts is
    refused (check_not_growing); with it, one given beside a store set up
    already is refused while front-ends serve the store (serving)."""
    if not urls:
        raise StoreError("no cluster URL given")
    conns = await _connect_all(urls)
    try:
        infos = await _read_all(conns)
        check_before_migrating(infos)
        await check_homeless(conns, infos, grow)
        if not grow:
            await check_not_growing(conns, infos)
            await check_not_pending(conns, infos)
        else:
            await take_exclusively(conns, served_if_growing(infos), len(urls))
        keys = {i.hash_key for i in infos if i is not None}
        adopt = not keys
        key = keys.pop() if keys else secrets.token_bytes(HASH_KEY_BYTES)
        setup = setting_up(len(urls)) if len(urls) > 1 else None
        try:
            # In the clusters' order, whatever order and spelling the URLs were
            # given in: front-ends migrating a new store at once all start on
            # the same cluster, and the later ones adopt the key the first made
            # there (begun on two, each would refuse the other's key, and the
            # clusters, keyed apart, would be refused by every later migrate).
            places = [await of_cluster(_place(c, u), n, len(urls))
                      for n, (c, u) in enumerate(zip(conns, urls, strict=True))]
            got, marked = {}, []
            for k in sorted(range(len(urls)), key=lambda k: places[k]):
                shown = f"{which([k + 1], len(urls))}: " if len(urls) > 1 else ""
                got[k], made = await of_cluster(_migrated(conns[k], key, adopt, setup,
                                                          infos[k] is None, shown), k, len(urls))
                key, adopt = got[k].hash_key, False
                if made:
                    marked.append(conns[k])
            out = [got[k] for k in range(len(conns))]
            await _check_not_twice_new(marked, out, setup)
            if len(out) > 1:
                seen = frozenset({i.home for i in infos if i is not None} - {None})
                out = await settle_home(conns, out, seen)
        except DRIVER_ERRORS as e:
            raise store_error(e, "cannot record the store's clusters") from None
        check_infos(out)
        return out
    finally:
        for c in conns:
            await c.close()


async def read_infos(urls: list[str]) -> list[ClusterInfo | None]:
    """Every cluster's schema row, changing nothing (a store opened without
    migrating)."""
    conns = await _connect_all(urls)
    try:
        return await _read_all(conns)
    finally:
        for c in conns:
            await c.close()


async def _connect_all(urls: list[str]) -> list:
    """A connection to each cluster, in order, to a host that holds a
    store or is its URL's first (serving.made_on_first); on a failure,
    those made are closed and the one that failed is named."""
    conns = []
    try:
        for n, url in enumerate(urls):
            conns.append(await of_cluster(connect(url, accept=made_on_first), n, len(urls)))
            await of_cluster(refuse_undurable(conns[-1]), n, len(urls))
    except BaseException:
        for c in conns:
            c.terminate()
        raise
    return conns


# Where a cluster is, alike in every front-end whatever its URL's spelling
# (a host's name or address, a service): the server's system identifier,
# the database's name, and the server's start, which tells apart servers
# cloned from one data directory (one identifier).
_PLACE_SQL = ("SELECT system_identifier::text || '/' || current_database() || '/' || "
              "pg_postmaster_start_time()::text FROM pg_control_system()")


async def _place(conn, url: str) -> tuple[str, str]:
    """The cluster's place in the order front-ends migrate a store in: its
    server's and database's names, then the URL (alone where the role may
    not read the server's control data)."""
    try:
        return await conn.fetchval(_PLACE_SQL), url
    except asyncpg.PostgresError:
        return "", url
    except DRIVER_ERRORS as e:
        raise store_error(e, "cannot read the schema of a cluster of the store") from None


async def _read_all(conns) -> list[ClusterInfo | None]:
    return [await of_cluster(_read(c), n, len(conns)) for n, c in enumerate(conns)]


async def _check_not_twice_new(marked, infos: list[ClusterInfo], setup: bytes | None) -> None:
    """A new cluster named twice is found once migrated: it is given back
    the events' home it had, none, so that it serves alone, not as a
    cluster of an unfinished setup of another count.  Only the marks this
    migrate made (on the connections `marked`) go: one of the same count
    found on a cluster is another setup's, which it keeps."""
    try:
        check_not_twice(infos)
    except StoreError:
        for conn in marked:
            await conn.execute("UPDATE accman_schema SET events_home = NULL "
                               "WHERE events_home = $1", setup)
        raise


async def _migrated(conn, key: bytes, adopt: bool, setup: bytes | None,
                    bare: bool, shown: str) -> tuple[ClusterInfo, bool]:
    try:
        return await migrate_cluster(conn, key, adopt, setup, bare, shown)
    except DRIVER_ERRORS as e:
        # A standby, a read-only database, a schema that is not ours.
        raise store_error(e, "cannot migrate the schema of a cluster of the store") from None


async def _read(conn) -> ClusterInfo | None:
    """The cluster's schema row; a schema of this AccMan's version must
    have every object it made (a damaged one is refused, not repaired)."""
    try:
        info = await read_info(conn)
        if info is not None and info.version == SCHEMA_VERSION:
            missing = await conn.fetchval(_MISSING_SQL, list(SCHEMA_TABLES),
                                          list(SCHEMA_FUNCTIONS))
            if missing:
                raise StoreError(f"the store's schema is damaged: {', '.join(missing)} "
                                 "missing; nothing was repaired")
        return info
    except DRIVER_ERRORS as e:
        raise store_error(e, "cannot read the schema of a cluster of the store") from None


# What a schema of SCHEMA_VERSION is made of (accman.postgres.schema_v*):
# each is looked for in the connection's search_path.  Its relations: the
# tables, their primary keys' indexes (PostgreSQL's names; without one an
# account's row or an entry is no longer unique, and ON CONFLICT fails every
# write), and the other indexes.
_TABLES = ("accman_schema", "accman_counter", "accman_accounts", "accman_history",
           "accman_holds", "accman_events", "accman_merged", "accman_cursors")
SCHEMA_TABLES = (_TABLES + tuple(t + "_pkey" for t in _TABLES)
                 + ("accman_holds_due", "accman_history_key", "accman_history_hold_end"))
SCHEMA_FUNCTIONS = ("accman_apply", "accman_charges", "accman_expire", "accman_number_events",
                    "accman_merge")
_MISSING_SQL = """
SELECT array_agg(name ORDER BY name) FROM (
    SELECT t AS name FROM unnest($1::text[]) AS t WHERE to_regclass(t) IS NULL
    UNION ALL
    SELECT f FROM unnest($2::text[]) AS f
     WHERE NOT EXISTS (SELECT 1 FROM pg_proc p WHERE p.proname = f
                          AND pg_function_is_visible(p.oid))) AS gone
"""


def migrate_sync(urls: list[str]) -> str:
    """`accman migrate --store URL ...`: migrates, and returns a line to
    print.  Raises StoreError."""
    infos = asyncio.run(migrate(list(urls)))
    return (f"accman: {len(infos)} cluster(s) at schema version {SCHEMA_VERSION}")
