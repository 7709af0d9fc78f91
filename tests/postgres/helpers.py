"""Driving a PgStore from a test: each call awaited for its outcome, an
AccManError raised as an exception."""

import asyncio
import contextlib
import importlib

import asyncpg
import pytest

from accman.errors import AccManError, StoreError
from accman.postgres.migrate import migrate
from accman.postgres.store import PgStore

# The module (accman.postgres's `migrate` function hides its name).
migrate_module = importlib.import_module("accman.postgres.migrate")


class Calls:
    """The store's calls as coroutines that return the outcome."""

    def __init__(self, store):
        self.store = store

    async def _call(self, fn, *args, **kw):
        fut = asyncio.get_running_loop().create_future()

        def done(outcome):
            if not fut.done():
                fut.set_result(outcome)
        now = fn(*args, done=done, **kw)
        outcome = now if now is not None else await fut
        if isinstance(outcome, AccManError):
            raise outcome
        return outcome

    def mod(self, cred, by, min=None, key=None, low=None):
        return self._call(self.store.submit, cred, by, min, key, low=low)

    def tot(self, cred, ordered=False):
        return self._call(self.store.read_tot, cred, ordered=ordered)

    def past(self, cred, limit=100, before=None, ordered=False):
        return self._call(self.store.read_past, cred, limit, before, ordered=ordered)

    def hold(self, cred, by, ttl_s, min=None, key=None):
        return self._call(self.store.submit_hold, cred, by, ttl_s, min, key)

    def settle(self, cred, hold, use):
        return self._call(self.store.submit_settle, cred, hold, use)

    def events(self, after=0, limit=100, wait_s=0):
        return self._call(self.store.read_events, after, limit, wait_s)


def run(coro):
    return asyncio.run(coro)


async def opened(urls, **kw):
    store = await PgStore.open(urls if isinstance(urls, list) else [urls], **kw)
    return store, Calls(store)


@contextlib.asynccontextmanager
async def stored(urls, **kw):
    """`opened`'s store and calls, the store closed on the way out."""
    store, calls = await opened(urls, **kw)
    try:
        yield store, calls
    finally:
        await store.aclose()


def two_clusters(pg, pg_factory, name):
    """A second cluster, and the URLs of a new database NAME_a on `pg` and
    NAME_b on it: a store of two clusters."""
    other = pg_factory(name="second")
    return other, [pg.create_database(f"{name}_a"), other.create_database(f"{name}_b")]


def far_creds(store, tries):
    """Of z0 .. z{tries-1}, the credentials whose accounts live off the
    events' home cluster."""
    return [f"z{i}" for i in range(tries) if store._locate(f"z{i}")[1] is not store.home]


@contextlib.asynccontextmanager
async def locked(url, table):
    """`table` held locked (ACCESS EXCLUSIVE: every read of it waits) by
    another session while the block runs."""
    conn = await asyncpg.connect(url)
    try:
        async with conn.transaction():
            await conn.execute(f"LOCK TABLE {table} IN ACCESS EXCLUSIVE MODE")
            yield
    finally:
        await conn.close()


async def fund(url, creds):
    """Opens an account for each of `creds` on the store at `url`."""
    async with stored(url) as (_, c):
        for cred in creds:
            await c.mod(cred, 5)


def migrate_cut_short_before_the_home(monkeypatch, urls):
    """`accman migrate` of `urls` whose connection is lost once every
    cluster has the schema, before the events' home is recorded."""
    def lost(*_):
        raise ConnectionResetError(104, "reset")
    with monkeypatch.context() as m:
        m.setattr(migrate_module, "settle_home", lost)
        with pytest.raises(StoreError, match="cannot record the store's clusters"):
            run(migrate(urls))


def schema_dump(pg, dbs) -> dict:
    """What migrating could change: each database's tables, its schema row
    and the clusters its accman_merged records."""
    return {db: (pg.psql("SELECT string_agg(relname, ',' ORDER BY relname) FROM pg_class "
                         "WHERE relname LIKE 'accman%'", db),
                 pg.psql("SELECT to_regclass('accman_schema') IS NOT NULL", db) == "t"
                 and pg.psql("SELECT row(version, events_home, (SELECT array_agg(cluster_id "
                             "ORDER BY cluster_id) FROM accman_merged)) FROM accman_schema", db))
            for db in dbs}
