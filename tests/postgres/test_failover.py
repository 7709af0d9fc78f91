"""Failover (issue 15): a primary with a synchronous standby, a bank-style
load through two front-ends, the primary killed with SIGKILL mid-load, the
standby promoted; the front-ends find the new primary by themselves
(several hosts, target_session_attrs=read-write), every acknowledged mod
is there afterwards, nothing is doubled, and retries with keys get the
original replies."""

import time

from accman.postgres.migrate import migrate

from .bank import check_bank, read_outcomes, spawn_front_end, wait_front_end
from .helpers import run
from .test_front_ends import ACCOUNTS, LONG, fund


def test_failover_keeps_every_acknowledged_mod(pg_factory, tmp_path):
    primary = pg_factory(name="primary")
    standby = primary.add_standby("standby", sync=True)
    run(migrate([primary.create_database("bank")]))     # the store, made once
    url = (f"postgresql://postgres@127.0.0.1:{primary.port},127.0.0.1:{standby.port}/bank"
           "?target_session_attrs=read-write")
    funded, account_id = fund(url, ACCOUNTS)
    outs = [tmp_path / f"fe{i}.jsonl" for i in range(2)]
    load_s = 60.0 if LONG else 8.0
    procs = [spawn_front_end(urls=[url], seconds=load_s, callers=16, accounts=ACCOUNTS,
                             seed=i, out=str(outs[i]), retry_s=30.0) for i in range(2)]
    time.sleep(load_s * 3 / 8)
    primary.kill()
    standby.promote()
    for p in procs:
        wait_front_end(p, load_s + 180)
    outcomes = read_outcomes(outs)
    counts = check_bank(standby, "bank", account_id, outcomes, funded)
    assert counts["unknown"] == 0, "a call still unanswered after 30 s of retries"
    retried = [r for r in outcomes if r["attempts"] > 1 and r["ok"]]
    assert retried, "no call went through the failover"
    # Calls made after the failover were acknowledged by the new primary.
    assert sum(1 for r in outcomes if r["ok"]) > len(retried)
