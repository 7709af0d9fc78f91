"""Schema migrations: a store made by an older AccMan is brought to this
one's version at open, with everything in it, and goes on from there."""

import importlib

from accman.postgres import schema as S
from accman.postgres.migrate import migrate

from .helpers import opened, run

# The module (accman.postgres.migrate is also the name of its function).
migrate_module = importlib.import_module("accman.postgres.migrate")


def test_a_version_1_store_is_migrated_with_its_accounts(pg, monkeypatch):
    url = pg.create_database("v1")
    # A store as version 1 made it: its migrations alone.
    with monkeypatch.context() as m:
        m.setattr(migrate_module, "MIGRATIONS", S.MIGRATIONS[:1])
        m.setattr(migrate_module, "SCHEMA_VERSION", 1)
        run(migrate([url]))
        pg.psql("SELECT * FROM accman_apply("
                "ARRAY['\\x01'::bytea, '\\x02'::bytea], ARRAY[true, true], ARRAY[1, 1, 2, 1], "
                "ARRAY[1, 1, 1, 1]::smallint[], ARRAY[10, -3, 7, -100]::bigint[], "
                "ARRAY[NULL, NULL, NULL, 0]::bigint[], ARRAY['k1', NULL, NULL, NULL], "
                "ARRAY[NULL, NULL, NULL, NULL]::bigint[], NULL, 4096, 1000000)", "v1")
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
