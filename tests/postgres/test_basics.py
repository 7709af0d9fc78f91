"""The store's calls on one real PostgreSQL: tot, mod, past, keys, min,
overflow, seq (SPEC "Routes", "Values")."""

import asyncio

import pytest

from accman.errors import (BadRequest, Insufficient, KeyReused, NoAccount, Overflow)
from accman.limits import INT64_MAX, INT64_MIN

from .helpers import run, stored


def test_fund_charge_read(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            with pytest.raises(NoAccount):
                await c.tot("alice")
            assert await c.mod("alice", 100) == (100, 1)
            assert await c.mod("alice", -30) == (70, 2)
            assert await c.tot("alice") == 70
            assert await c.tot("alice", ordered=True) == 70
            page = await c.past("alice")
            assert page.account == store.account_id("alice")
            assert [(e.seq, e.by, e.tot, e.key, e.hold) for e in page.entries] == [
                (2, -30, 70, None, None), (1, 100, 100, None, None)]
            assert page.next is None
    run(main())


def test_charge_of_unknown_cred_creates_nothing(pg_url, pg):
    async def main():
        async with stored(pg_url) as (store, c):
            with pytest.raises(NoAccount):
                await c.mod("bob", -1)
            with pytest.raises(NoAccount):
                await c.hold("bob", -1, 10)
            with pytest.raises(Insufficient):
                await c.mod("bob", 5, min=10)      # a refused funding mod
            with pytest.raises(NoAccount):
                await c.past("bob")
    run(main())
    dbname = pg_url.rsplit("/", 1)[1]
    assert pg.psql("SELECT count(*) FROM accman_accounts", dbname) == "0"
    assert pg.psql("SELECT count(*) FROM accman_history", dbname) == "0"


def test_min_judges_the_balance_after(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 10)
            with pytest.raises(Insufficient) as e:
                await c.mod("a", -11, min=0)
            assert e.value.tot == 10
            assert await c.mod("a", -10, min=0) == (0, 2)
            assert await c.mod("a", -5) == (-5, 3)        # no min: may go below 0
    run(main())


def test_overflow_changes_nothing(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", INT64_MAX)
            with pytest.raises(Overflow):
                await c.mod("a", 1)
            await c.mod("b", 1)
            await c.mod("b", INT64_MIN + 1)     # tot INT64_MIN + 2
            with pytest.raises(Overflow):
                await c.mod("b", -3)
            assert await c.tot("a") == INT64_MAX
            assert (await c.past("a")).entries[0].seq == 1
    run(main())


def test_keys(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            assert await c.mod("a", 100, key="k1") == (100, 1)
            await c.mod("a", 1)
            assert await c.mod("a", 100, key="k1") == (100, 1)    # the original reply
            with pytest.raises(KeyReused):
                await c.mod("a", 101, key="k1")
            with pytest.raises(KeyReused):
                await c.mod("a", 100, min=0, key="k1")
            # A refused mod does not use up its key.
            with pytest.raises(Insufficient):
                await c.mod("a", -1000, min=0, key="k2")
            assert await c.mod("a", -1, min=0, key="k2") == (100, 3)
            # Keys are per account.
            assert await c.mod("b", 5, key="k1") == (5, 1)
            assert (await c.past("a")).entries[0].key == "k2"
    run(main())


def test_keyed_mods_in_one_batch(pg_url):
    """The same key twice in one batch: applied once, both answered alike."""
    import asyncio

    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 1)
            got = await asyncio.gather(c.mod("a", 7, key="x"), c.mod("a", 7, key="x"),
                                       c.mod("a", 8, key="x"), return_exceptions=True)
            assert got[0] == got[1] == (8, 2)
            assert isinstance(got[2], KeyReused)
    run(main())


def test_seq_gap_free_and_pages(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            import asyncio
            await c.mod("a", 1000)
            await asyncio.gather(*(c.mod("a", -1) for _ in range(250)))
            p1 = await c.past("a", limit=100)
            assert [e.seq for e in p1.entries] == list(range(251, 151, -1))
            assert p1.next == 152
            p2 = await c.past("a", limit=100, before=p1.next)
            assert p2.entries[0].seq == 151
            p3 = await c.past("a", limit=100, before=52)
            assert [e.seq for e in p3.entries] == list(range(51, 0, -1))
            assert p3.next is None
            assert p2.entries[-1].tot == 1000 - (p2.entries[-1].seq - 1)
    run(main())


def test_bad_values_queue_nothing(pg_url):
    async def main():
        async with stored(pg_url) as (store, c):
            for args in [("a b", 1), ("", 1), ("é", 1), ("a" * 129, 1), ("a", 0),
                         ("a", 2 ** 63), ("a", True), ("a", 1.0)]:
                with pytest.raises(BadRequest):
                    store.submit(*args, done=print)
            with pytest.raises(BadRequest):
                store.submit("a", 1, None, "bad key", done=print)
            with pytest.raises(BadRequest):
                store.submit("a", -1, None, None, done=print, low=5)
            with pytest.raises(BadRequest):
                store.submit_hold("a", 5, 10, None, None, done=print)
            with pytest.raises(BadRequest):
                store.submit_hold("a", -5, 86401, None, None, done=print)
            assert store.queued_mods == 0
    run(main())


@pytest.mark.parametrize("loop,deliver,says", [
    (1, None, "loop must be an asyncio event loop, got int"),
    (None, None, "loop must be an asyncio event loop, got NoneType"),
    ("own", 5, "deliver must be a function taking a list of .*, or None; got int")])
def test_a_wrong_loop_or_deliver_is_refused_and_binds_nothing(pg_url, loop, deliver, says):
    """As the embedded store's bind_loop: a `deliver` that cannot be called
    was taken, and every later outcome was lost in it (the change applied,
    its caller never told); a loop that is not one was a RuntimeError."""
    async def main():
        async with stored(pg_url) as (store, c):
            with pytest.raises(BadRequest, match=f"^{says}$"):
                store.bind_loop(asyncio.get_running_loop() if loop == "own" else loop, deliver)
            assert await asyncio.wait_for(c.mod("a", 5), 5) == (5, 1)
    run(main())


def test_credentials_hashed_at_rest(pg, pg_url):
    """Accounts are named by BLAKE2b-128 of the credential keyed with the
    store's 16-byte key, as in the embedded store; no credential is stored."""
    import hashlib

    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("secret-cred-123", 5, key="k")
            return store.account_id("secret-cred-123")
    account = run(main())
    db = pg_url.rsplit("/", 1)[1]
    key = bytes.fromhex(pg.psql("SELECT encode(hash_key, 'hex') FROM accman_schema", db))
    assert len(key) == 16
    assert account == hashlib.blake2b(b"secret-cred-123", digest_size=16, key=key).hexdigest()
    assert pg.psql("SELECT encode(hid, 'hex') FROM accman_accounts", db) == account
    dump = pg.psql("SELECT string_agg(t::text, ' ') FROM accman_history t", db)
    dump += pg.psql("SELECT string_agg(t::text, ' ') FROM accman_events t", db)
    assert "secret-cred" not in dump


def test_ordered_reads_see_exactly_the_calls_before_them(pg_url):
    """A read pipelined behind mods (ordered=True) sees those mods and none
    made after it, though all are made in one loop turn."""
    import asyncio

    async def main():
        async with stored(pg_url) as (store, c):
            await c.mod("a", 10)
            got = await asyncio.gather(c.mod("a", 1), c.tot("a", ordered=True), c.mod("a", 1),
                                       c.past("a", ordered=True), c.mod("a", 1),
                                       c.tot("a", ordered=True))
            assert got[1] == 11
            assert got[3].entries[0].seq == 3 and got[3].entries[0].tot == 12
            assert got[5] == 13
    run(main())
