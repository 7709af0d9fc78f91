"""Many front-ends on one database, all correct at once (issue 15): two
processes, each with its own store, mod the same accounts concurrently;
the bank checker finds nothing lost, nothing doubled, seq gap-free and
`min` exact."""

import asyncio
import os

from .bank import check_bank, read_outcomes, spawn_front_end, wait_front_end
from .helpers import run, stored

ACCOUNTS = 20           # few accounts: the front-ends contend on each
FUNDING = 500
# `just pg-long` (ACCMAN_PG_LONG=1) runs the loads for a minute, not seconds.
LONG = os.environ.get("ACCMAN_PG_LONG") == "1"
LOAD_S = 60.0 if LONG else 3.0


def fund(url, accounts):
    async def main():
        async with stored(url) as (store, c):
            await asyncio.gather(*(c.mod(f"acct-{i}", FUNDING, key=f"fund-acct-{i}")
                                   for i in range(accounts)))
            return {f"acct-{i}": FUNDING for i in range(accounts)}, store.account_id
    return run(main())


def test_two_front_ends_bank(pg, pg_url, tmp_path):
    funded, account_id = fund(pg_url, ACCOUNTS)
    outs = [tmp_path / f"fe{i}.jsonl" for i in range(2)]
    procs = [spawn_front_end(urls=[pg_url], seconds=LOAD_S, callers=32, accounts=ACCOUNTS,
                             seed=i, out=str(outs[i]), retry_s=0) for i in range(2)]
    for p in procs:
        wait_front_end(p, LOAD_S + 120)
    outcomes = read_outcomes(outs)
    counts = check_bank(pg, pg_url.rsplit("/", 1)[1], account_id, outcomes, funded)
    assert counts["unknown"] == 0
    assert counts["acked"] > 500                # both ran, and contended
    refused = sum(1 for r in outcomes if not r["ok"])
    assert refused > 0                          # min 0 was reached and held
