"""A store's statements find accounts through the index, whatever the
statistics: plans cached while the tables were small (a new store, before
autoanalyze first runs) must not scan every account per batch or read as
the store grows (accman.postgres.connecting.SESSION_SETTINGS)."""

import asyncio

from .helpers import opened, run

ACCOUNTS = 3000


def seq_scans(pg, dbname) -> int:
    return int(pg.psql("SELECT seq_scan FROM pg_stat_user_tables "
                       "WHERE relname = 'accman_accounts'", dbname))


def test_batches_and_reads_of_a_grown_store_scan_no_account_table(pg, pg_url):
    dbname = pg_url.rsplit("/", 1)[1]

    async def main():
        store, c = await opened(pg_url)            # plans are made on empty tables
        try:
            for start in range(0, ACCOUNTS, 300):
                await asyncio.gather(*(c.mod(f"a{i}", 5) for i in range(start, start + 300)))
            await asyncio.sleep(0.7)                   # the statistics collector's report
            before = seq_scans(pg, dbname)
            for round_ in range(20):
                await asyncio.gather(*(c.mod(f"a{i}", -1, min=0)
                                       for i in range(round_, ACCOUNTS, 97)))
                await asyncio.gather(*(c.tot(f"a{i}") for i in range(round_, ACCOUNTS, 89)))
                await c.past(f"a{round_}")
            await asyncio.sleep(0.7)
            return seq_scans(pg, dbname) - before
        finally:
            await store.aclose()
    assert run(main()) == 0
