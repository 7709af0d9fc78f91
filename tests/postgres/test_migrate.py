"""Schema migrations: a store made by an older AccMan is brought to this
one's version at open, with everything in it, and goes on from there."""

import importlib

import pytest

from accman.postgres import schema as S
from accman.postgres import shape
from accman.postgres.connecting import connect
from accman.postgres.migrate import migrate

from .helpers import opened, run

# The module (accman.postgres.migrate is also the name of its function).
migrate_module = importlib.import_module("accman.postgres.migrate")


# Version 1's accman_apply: accounts \x01 (10, -3) and \x02 (7), a charge refused.
_V1_APPLY = ("SELECT * FROM accman_apply("
             "ARRAY['\\x01'::bytea, '\\x02'::bytea], ARRAY[true, true], ARRAY[1, 1, 2, 1], "
             "ARRAY[1, 1, 1, 1]::smallint[], ARRAY[10, -3, 7, -100]::bigint[], "
             "ARRAY[NULL, NULL, NULL, 0]::bigint[], ARRAY['k1', NULL, NULL, NULL], "
             "ARRAY[NULL, NULL, NULL, NULL]::bigint[], NULL, 4096, 1000000)")


def _as_version_1(monkeypatch, url, version=1):
    """`url` migrated as `version` made a store: its migrations alone."""
    with monkeypatch.context() as m:
        m.setattr(migrate_module, "MIGRATIONS", S.MIGRATIONS[:version])
        for module in (migrate_module, shape):
            m.setattr(module, "SCHEMA_VERSION", version)
        run(migrate([url]))


def test_a_version_1_store_is_migrated_with_its_accounts(pg, monkeypatch):
    url = pg.create_database("v1")
    _as_version_1(monkeypatch, url)
    pg.psql(_V1_APPLY, "v1")
    assert pg.psql("SELECT version FROM accman_schema", "v1") == "1"
    assert pg.psql("SELECT string_agg(tot || ':' || seq, ' ' ORDER BY hid) "
                   "FROM accman_accounts", "v1") == "7:2 7:1"

    async def main():
        store, c = await opened(url)          # migrates to this version
        try:
            assert await c.mod("new", 5) == (5, 1)
            assert store.stats["accounts"] == 3     # the two of version 1, and this one
            assert store.stats["events_last"] == 4  # 3 events of version 1 (one refused)
            page = await c.events(after=0)
            assert [(e.id, e.type, e.by) for e in page[0]] == \
                [(1, "mod", 10), (2, "mod", -3), (3, "mod", 7), (4, "mod", 5)]
        finally:
            await store.aclose()
    run(main())
    assert pg.psql("SELECT version FROM accman_schema", "v1") == str(S.SCHEMA_VERSION)
    assert pg.psql("SELECT accounts FROM accman_counter", "v1") == "3"


def test_a_version_1_store_of_two_clusters_holding_accounts_gets_its_home(pg, monkeypatch):
    """Version 1 numbered events on each cluster of a store of several: both
    hold accounts and none is the home, as two separate stores would, which
    migrate refuses.  Such a store is one store, from before the home, and
    migrating it chooses its home as ever."""
    urls = [pg.create_database("v1two_a"), pg.create_database("v1two_b")]
    for url in urls:
        _as_version_1(monkeypatch, url)
    key = pg.psql("SELECT encode(hash_key, 'hex') FROM accman_schema", "v1two_a")
    pg.psql(f"UPDATE accman_schema SET hash_key = '\\x{key}'", "v1two_b")     # one store's
    pg.psql(_V1_APPLY, "v1two_a")
    pg.psql(_V1_APPLY.replace("\\x0", "\\x1"), "v1two_b")
    infos = run(migrate(urls))
    assert infos[0].events_home == infos[1].events_home is not None


# An older front-end's calls, as it prepares them on its writer connections
# (accman.postgres.cluster, upkeep) before a newer one migrates the store:
# the same text since version 1.  The batch: a funding mod of account \x01
# and a hold on it, both keyed, with the store's bounds.
_APPLY_SQL = "SELECT * FROM accman_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)"
_EXPIRE_SQL = "SELECT accman_expire($1)"
_BOUNDS = (None, 4096, 1000000)
_BATCH = ([b"\x01"], [True], [1, 1], [S.MOD, S.HOLD], [100, -30], [None, 0], ["f", "h"],
          [None, 60], *_BOUNDS)
_CHARGE = ([b"\x01"], [False], [1], [S.MOD], [-10], None, None, None, *_BOUNDS)


async def _prepared(url):
    conn = await connect(url)
    return conn, await conn.prepare(_APPLY_SQL), await conn.prepare(_EXPIRE_SQL)


@pytest.mark.parametrize("version", [2, 5, 6, 7])
def test_an_older_front_end_goes_on_through_a_rolling_upgrade(pg, monkeypatch, version):
    """SCALING.md: a front-end of version 2 or later still running after a
    newer one migrated the store goes on through the statements it had
    prepared: every migration since keeps the functions' arguments and
    results.  A keyed retry answers the first reply, seq and event ids go
    on without a gap, and its call of accman_expire ends a due hold."""
    db = f"older_v{version}"
    url = pg.create_database(db)
    _as_version_1(monkeypatch, url, version)

    async def main():
        conn, apply, expire = await _prepared(url)
        try:
            first = await apply.fetchrow(*_BATCH)
            assert list(first["r_code"]) == [S.OK, S.OK]
            await migrate([url])            # the first new front-end's start
            again = await apply.fetchrow(*_BATCH)
            assert [list(again[c]) for c in ("r_code", "r_tot", "r_seq")] == \
                [[S.OK, S.OK], [100, 70], [1, 2]]
            charge = await apply.fetchrow(*_CHARGE)
            assert [list(charge[c]) for c in ("r_code", "r_tot", "r_seq")] == [[S.OK], [60], [3]]
            await conn.execute("UPDATE accman_holds SET expires_at = 0")
            assert await expire.fetchval(4096) == 1
        finally:
            await conn.close()
    run(main())
    assert pg.psql("SELECT version FROM accman_schema", db) == str(S.SCHEMA_VERSION)
    assert pg.psql("SELECT string_agg(concat_ws(':', seq, kind, by, tot), ' ' ORDER BY seq) "
                   "FROM accman_history", db) == "1:1:100:100 2:2:-30:70 3:1:-10:60 4:4:30:90"
    assert pg.psql("SELECT string_agg(concat_ws(':', id, type, seq), ' ' ORDER BY id) "
                   "FROM accman_events", db) == "1:1:1 2:2:2 3:1:3 4:4:4"

