"""Schema version 5's set path (accman_charges): a batch of charges on
distinct accounts, none keyed, gives exactly what accman_apply's op-by-op
judgement gives, refusals, low_balance events and event ids included; it is
taken for every batch of that shape and for no other; it locks accounts in
hid order, as the op-by-op path does."""

import asyncio
import random

import asyncpg
import pytest

from accman.errors import Insufficient
from accman.limits import HOLDS_MAX, HOLDS_PER_ACCOUNT_MAX, INT64_MIN
from accman.postgres import batch as B
from accman.postgres import schema as S
from accman.postgres.connecting import SESSION_SETTINGS
from accman.postgres.migrate import migrate

from .helpers import run, stored

APPLY = ("SELECT r_code, r_tot, r_seq, r_state "
         "FROM accman_apply($1, $2, $3, $4, $5, $6, $7, $8, $9, $10, $11)")
SET_PATH_CALLS = ("SELECT coalesce(sum(calls), 0) FROM pg_stat_xact_user_functions "
                  "WHERE funcname = 'accman_charges'")
STATE_SQL = {
    "accounts": "SELECT hid, tot, seq, low, holds FROM accman_accounts ORDER BY hid",
    "history": "SELECT hid, seq, kind, by, tot, key, min, hold, ttl FROM accman_history "
               "ORDER BY hid, seq",
    "events": "SELECT id, type, hid, seq, by, tot, key, hold FROM accman_events ORDER BY id",
    "counter": "SELECT next_event, open_holds, accounts, holds_expired FROM accman_counter",
}


def hid(n: int) -> bytes:
    return n.to_bytes(16, "big")


async def connect(url):
    conn = await asyncpg.connect(url, server_settings={**SESSION_SETTINGS,
                                                       "track_functions": "pl"})
    await migrate([url])
    return conn


async def apply(conn, ops, *, low_default=None, op_by_op=False):
    """One batch of (hid, kind, by, min, low) through accman_apply, as the
    store sends it; `op_by_op` sends the key column as an array of NULLs,
    which the set path does not take.  Returns the row and whether the set
    path was called."""
    args = list(B.arrays([B.Op(kind, h, by, min_, None, low, None)
                          for h, kind, by, min_, low in ops]))
    if op_by_op:
        args[6] = [None] * len(ops)
    async with conn.transaction():
        # The view counts the backend's calls not yet reported: a difference.
        before = await conn.fetchval(SET_PATH_CALLS)
        row = await conn.fetchrow(APPLY, *args, low_default, HOLDS_PER_ACCOUNT_MAX, HOLDS_MAX)
        called = await conn.fetchval(SET_PATH_CALLS) - before
    return tuple(row), called


async def state(conn):
    return {name: [tuple(r) for r in await conn.fetch(sql)] for name, sql in STATE_SQL.items()}


def random_charges(rng, creds):
    """Charges on distinct accounts, refused now and then for each reason."""
    batch = []
    for n in rng.sample(creds, rng.randint(1, 4)):
        by = rng.choice([-5, -30, -60, -120])
        min_ = rng.choice([None, None, 0, -100, 50])
        batch.append((hid(n), S.MOD, by, min_, None))
    return batch


def test_charges_match_the_op_by_op_judgement(pg, pg_url):
    """The same batches on two stores, one eligible for the set path and one
    judged op by op, leave the same answers, rows and events."""
    twin = pg.create_database("charges_twin")
    rng = random.Random(1205)
    creds = list(range(1, 15))               # 13 and 14 never funded: no_account

    async def main():
        a, b = await connect(pg_url), await connect(twin)
        try:
            funding = [(hid(n), S.MOD, rng.choice([150, 300]), None,
                        rng.choice([None, 100, 250])) for n in creds[:12]]
            funding += [(hid(12), S.MOD, INT64_MIN, None, None)]    # near INT64_MIN: overflow
            for conn in (a, b):
                await apply(conn, funding[:12])
                await apply(conn, funding[12:])
            seen = {"all applied": 0, "refused": 0}
            codes = set()
            lows = 0
            for i in range(150):
                if i % 10 == 0:                      # funded again: balances cross lows again
                    for conn in (a, b):
                        await apply(conn, [(hid(n), S.MOD, 100, None, None) for n in creds[:11]])
                ops = random_charges(rng, creds)
                low = rng.choice([None, 200])
                got, called = await apply(a, ops, low_default=low)
                want, called_b = await apply(b, ops, low_default=low, op_by_op=True)
                # A refused batch's set path rolls back its subtransaction, and
                # the view's count of the call with it: counted when it applied.
                assert called_b == 0 and (any(got[0]) or called == 1)
                assert got == want, ops
                if any(got[0]):
                    seen["refused"] += 1
                else:
                    seen["all applied"] += 1
                    lows += await a.fetchval("SELECT count(*) FROM accman_events "
                                             "WHERE id > $1::bigint - $2::int AND type = $3",
                                             got[3][0], len(ops) * 2, S.LOW_BALANCE)
                codes |= set(got[0])
            # The edges of int64: a balance charged to exactly INT64_MIN,
            # charges of INT64_MIN, and one more below either.
            tot_sql = "SELECT tot FROM accman_accounts WHERE hid = $1"
            t11, t12 = await a.fetchval(tot_sql, hid(11)), await a.fetchval(tot_sql, hid(12))
            assert t11 > 0 and t12 > INT64_MIN
            landing = [(hid(11), S.MOD, INT64_MIN, None, None),
                       (hid(12), S.MOD, INT64_MIN - t12, INT64_MIN, None)]
            below = [(hid(11), S.MOD, INT64_MIN, INT64_MIN, None),
                     (hid(12), S.MOD, -1, None, None)]
            got, _called = await apply(a, landing)
            assert got == (await apply(b, landing, op_by_op=True))[0]
            assert (got[0], got[1]) == ([S.OK, S.OK], [t11 + INT64_MIN, INT64_MIN])
            got, _called = await apply(a, below)
            assert got == (await apply(b, below, op_by_op=True))[0]
            assert got[0] == [S.OVERFLOW, S.OVERFLOW]
            assert await state(a) == await state(b)
            # Both outcomes of the set path, every refusal a charge can get,
            # and low_balance events of batches it applied were among them.
            assert min(seen.values()) >= 10, seen
            assert codes == {S.OK, S.NO_ACCOUNT, S.INSUFFICIENT, S.OVERFLOW}
            assert lows >= 3
        finally:
            await a.close()
            await b.close()
    run(main())


@pytest.mark.parametrize("ops, taken", [
    ([(1, S.MOD, -5, 0, None), (2, S.MOD, -5, None, None)], True),
    ([(2, S.MOD, -5, 0, None)], True),
    ([(1, S.MOD, -5, 0, None), (1, S.MOD, -5, 0, None)], False),   # one account twice
    ([(1, S.MOD, -5, 0, None), (2, S.MOD, 5, None, None)], False),  # a funding mod
    ([(1, S.MOD, 5, None, 50)], False),                               # with a low
    ([(1, S.READ, 0, None, None), (2, S.MOD, -5, 0, None)], False),   # a read
    ([(1, S.HOLD, -5, 0, 60)], False),
])
def test_the_set_path_is_taken_for_unkeyed_charges_on_distinct_accounts(pg_url, ops, taken):
    async def main():
        conn = await connect(pg_url)
        try:
            await apply(conn, [(hid(1), S.MOD, 100, None, None), (hid(2), S.MOD, 100, None, None)])
            (codes, _tots, _seqs, _state), called = await apply(
                conn, [(hid(h), kind, by, min_, low) for h, kind, by, min_, low in ops])
            assert called == int(taken)
            assert set(codes) == {S.OK}
        finally:
            await conn.close()
    run(main())


def test_a_keyed_charge_takes_the_op_by_op_path(pg_url):
    async def main():
        conn = await connect(pg_url)
        try:
            await apply(conn, [(hid(1), S.MOD, 100, None, None)])
            args = list(B.arrays([B.Op(S.MOD, hid(1), -5, 0, "k1", None, None)]))
            async with conn.transaction():
                before = await conn.fetchval(SET_PATH_CALLS)
                row = await conn.fetchrow(APPLY, *args, None, HOLDS_PER_ACCOUNT_MAX, HOLDS_MAX)
                assert await conn.fetchval(SET_PATH_CALLS) == before
            assert (row["r_code"], row["r_tot"], row["r_seq"]) == ([S.OK], [95], [2])
        finally:
            await conn.close()
    run(main())


async def waiting_for_account_1(url, batch):
    """Accounts 1 and 2 funded with 100; `batch` sent while another
    transaction holds account 1.  Once the batch waits for account 1, it
    must not hold account 2 (a probe locks it with NOWAIT): a batch that
    held 2 while it waited for 1 would close a cycle with one that holds 1
    and then locks 2 (a deadlock, found only after deadlock_timeout).
    Returns the batch's row and set-path calls once account 1 is free."""
    conns = [await connect(url) for _ in range(3)]
    holder, charger, prober = conns
    try:
        await apply(holder, [(hid(1), S.MOD, 100, None, None), (hid(2), S.MOD, 100, None, None)])
        lock = "SELECT 1 FROM accman_accounts WHERE hid = $1 FOR UPDATE"
        tx = holder.transaction()
        await tx.start()
        await holder.execute(lock, hid(1))
        pid = charger.get_server_pid()
        charging = asyncio.ensure_future(apply(charger, batch))
        for _ in range(500):                      # until it waits for account 1
            if await prober.fetchval("SELECT wait_event_type FROM pg_stat_activity "
                                     "WHERE pid = $1", pid) == "Lock":
                break
            await asyncio.sleep(0.01)
        else:
            pytest.fail("the batch never waited for account 1's lock")
        async with prober.transaction():          # account 2 is not held
            assert await prober.fetchval(lock + " NOWAIT", hid(2)) == 1
        await tx.commit()
        return await asyncio.wait_for(charging, 30)
    finally:
        for conn in conns:
            await conn.close()


def test_the_set_path_locks_accounts_in_hid_order(pg_url):
    """A batch charging accounts 2 then 1 locks 1 first."""
    (codes, tots, seqs, _state), called = run(waiting_for_account_1(
        pg_url, [(hid(2), S.MOD, -5, 0, None), (hid(1), S.MOD, -5, 0, None)]))
    assert (codes, tots, seqs, called) == ([0, 0], [95, 95], [2, 2], 1)


def test_a_refused_charge_leaves_the_rest_of_its_batch_applied_once(pg_url):
    """Through the store: one loop turn's charges are one batch; one of them
    refused, the others are charged once each, with gap-free history."""
    async def main():
        async with stored(pg_url) as (store, c):
            await asyncio.gather(*(c.mod(f"a{i}", 100) for i in range(8)))
            batches = store.batches
            outcomes = await asyncio.gather(
                *(c.mod(f"a{i}", -150 if i == 5 else -10, min=0) for i in range(8)),
                return_exceptions=True)
            assert store.batches == batches + 1
            assert isinstance(outcomes[5], Insufficient) and outcomes[5].tot == 100
            assert [o for i, o in enumerate(outcomes) if i != 5] == [(90, 2)] * 7
            for i in range(8):
                past = [(e.seq, e.tot) for e in (await c.past(f"a{i}")).entries]
                assert past == ([(1, 100)] if i == 5 else [(2, 90), (1, 100)])
    run(main())


def test_a_refused_batch_holds_no_account_while_it_locks_in_hid_order(pg_url):
    """A batch whose charge on account 1 is refused by the set path (on the
    balance it reads without waiting) and whose charge on account 2 applied
    there is judged op by op: it waits for account 1 holding nothing."""
    (codes, tots, seqs, _state), _called = run(waiting_for_account_1(
        pg_url, [(hid(1), S.MOD, -150, 0, None), (hid(2), S.MOD, -5, 0, None)]))
    assert (codes, tots, seqs) == ([S.INSUFFICIENT, S.OK], [100, 95], [None, 2])
