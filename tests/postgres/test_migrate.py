"""Schema migrations: a store made by an older AccMan is brought to this
one's version at open, with everything in it, and goes on from there."""

import importlib

from accman.postgres import schema as S
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


def _as_version_1(monkeypatch, url):
    """`url` migrated as version 1 made a store: its migrations alone."""
    with monkeypatch.context() as m:
        m.setattr(migrate_module, "MIGRATIONS", S.MIGRATIONS[:1])
        m.setattr(migrate_module, "SCHEMA_VERSION", 1)
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
