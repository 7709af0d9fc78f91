"""Holds in the embedded ledger (SPEC "Holds"), through its Python API, on
an injected clock: a hold and its settle, the values and their bounds,
keys, the bounds on open holds, and the balance's range.  Expiry is in
tests/test_hold_expiry.py."""

import asyncio

import pytest

from accman import BadRequest, Insufficient, KeyReused, Ledger, NoAccount, Overflow
from accman.errors import HoldEnded, NoHold, TooManyHolds
from accman.limits import HOLD_TTL_S_MAX, HOLDS_MAX, HOLDS_PER_ACCOUNT_MAX, INT64_MAX, INT64_MIN
from ledgerhelp import GatedStore, entries, gated_ledger, wait_for



# --- a hold and its settle ---------------------------------------------------------

def test_a_hold_takes_its_amount_at_once_and_a_settle_returns_the_rest(led, clock):
    assert led.mod("a", 100) == (100, 1)
    t_hold = clock()
    assert led.hold("a", -30, 60) == (2, 70, 2)         # (hold, tot, seq): the hold is its seq
    assert led.tot("a") == 70
    assert led.open_holds == 1
    clock.advance(5)
    assert led.settle("a", 2, 12) == (88, 3)            # 12 spent, 18 back
    assert led.tot("a") == 88 and led.open_holds == 0
    assert entries(led, "a") == [(1, 100, 100, None, None), (2, -30, 70, None, 2),
                                 (3, 18, 88, None, 2)]
    past = led.past("a")
    assert (past[1].at, past[0].at) == (t_hold, t_hold + 5000)
    assert led.verify() == {"accounts": 1, "entries": 3, "keys": 0, "holds": 1,
                            "open_holds": 0, "events": 3}


@pytest.mark.parametrize("use,back", [(0, 40), (40, 0), (1, 39)])
def test_a_settle_spends_from_nothing_to_all_of_it(led, use, back):
    """use 0 returns the whole amount; use = the amount returns nothing, as
    an entry of by 0: the one place where an entry's by may be 0."""
    led.mod("a", 100)
    hold, _, _ = led.hold("a", -40, 60)
    assert led.settle("a", hold, use) == (60 + back, 3)
    assert entries(led, "a")[-1] == (3, back, 60 + back, None, hold)
    led.verify()


def test_settling_again_answers_the_first_reply_also_after_reopen(path, clock):
    with Ledger(path, clock_ms=clock) as led:
        led.mod("a", 100)
        hold, _, _ = led.hold("a", -30, 60)
        first = led.settle("a", hold, 10)
        assert led.settle("a", hold, 10) == first
        with pytest.raises(HoldEnded, match="another use"):
            led.settle("a", hold, 11)
        led.mod("a", 1)
        assert led.settle("a", hold, 10) == first           # read from its record now
    clock.advance(3600)
    with Ledger(path, clock_ms=clock) as led:
        assert led.settle("a", hold, 10) == first
        with pytest.raises(HoldEnded) as e:
            led.settle("a", hold, 30)
        assert (e.value.status, e.value.code) == (409, "hold_ended")
        assert [x[2] for x in entries(led, "a")] == [100, 70, 90, 91]


def disk_busy(led, store) -> list:
    """The disk held busy writing b's opening (store: a GatedStore): what is
    submitted from now on fills the next batch, told once the gate opens.
    Returns the list every outcome is appended to, b's first."""
    store.gate.clear()
    got = []
    led.submit("b", 1, done=got.append)
    store.writing.wait(10)
    return got


def test_a_hold_and_its_settles_in_one_batch(path, clock):
    """While the disk is busy with another batch, a hold and two settles of
    it fill the next one: the settle ends a hold that is not yet durable,
    the second answers the first's reply, and all become durable together."""
    with gated_ledger(path, clock) as (led, store):
        gate = store.gate
        led.mod("a", 100)
        got = disk_busy(led, store)
        led.submit_hold("a", -30, 60, done=got.append)
        led.submit_settle("a", 2, 5, done=got.append)
        led.submit_settle("a", 2, 5, done=got.append)
        led.submit_settle("a", 2, 6, done=got.append)
        assert got == [] and led.tot("a") == 100
        gate.set()
        wait_for(lambda: len(got) == 5)
        assert got[:4] == [(1, 1), (2, 70, 2), (95, 3), (95, 3)]
        assert isinstance(got[4], HoldEnded)
        sizes, _ = led.drain_samples()
        assert sizes[-2:] == [1, 2]
        assert led.open_holds == 0
    with Ledger(path, clock_ms=clock) as led:
        assert led.tot("a") == 95 and led.open_holds == 0
        assert led.verify()["holds"] == 1


def test_a_settle_refused_on_state_not_yet_durable_is_told_once_it_is(path, clock):
    """A settle judged on state whose batch is not durable yet, no such hold
    on an account just opened, or a use over a hold just made, is answered
    once that batch is durable, as an Insufficient is: answered at once, it
    would tell of an account or a hold that a crash could still lose."""
    with gated_ledger(path, clock) as (led, store):
        gate = store.gate
        led.mod("a", 100)
        got = disk_busy(led, store)
        led.submit("n", 10, done=got.append)              # opens n, in the next batch
        led.submit_settle("n", 5, 0, done=got.append)
        led.submit_hold("a", -30, 60, done=got.append)
        led.submit_settle("a", 2, 31, done=got.append)
        assert got == []
        gate.set()
        wait_for(lambda: len(got) == 5)
        assert got[:2] == [(1, 1), (10, 1)] and got[3] == (2, 70, 2)
        assert isinstance(got[2], NoHold)
        assert isinstance(got[4], BadRequest) and "held amount 30" in str(got[4])
        assert led.tot("a") == 70 and led.open_holds == 1
        assert led.settle("a", 2, 30) == (70, 3)


def test_an_unknown_hold_is_no_hold(led):
    led.mod("a", 100)
    led.mod("b", 100)
    hold, _, _ = led.hold("b", -5, 60)
    for cred, h in (("a", 1), ("a", 99), ("a", hold), ("a", INT64_MAX)):
        with pytest.raises(NoHold) as e:          # a mod's seq, none, another account's hold
            led.settle(cred, h, 0)
        assert (e.value.status, e.value.code) == (404, "no_hold")
    with pytest.raises(NoAccount):
        led.settle("ghost", hold, 0)
    assert led.tot("a") == 100 and led.tot("b") == 95 and len(led) == 2


@pytest.mark.parametrize("hold,use,msg", [(0, 1, "hold"), (-1, 1, "hold"), (2, -1, "use"),
                                          (2, 31, "held amount 30"), (2, 1.0, "use"),
                                          (2, True, "use"), ("2", 1, "hold"),
                                          (2, INT64_MAX + 1, "use")])
def test_bad_settles_are_refused_and_change_nothing(led, hold, use, msg):
    led.mod("a", 100)
    led.hold("a", -30, 60)
    before = entries(led, "a")
    with pytest.raises(BadRequest, match=msg):
        led.settle("a", hold, use)
    assert entries(led, "a") == before and led.open_holds == 1
    assert led.settle("a", 2, 30) == (70, 3)        # still open, still settles


# --- the hold's values ----------------------------------------------------------------

def test_min_defaults_to_0_and_a_refused_hold_changes_nothing(led):
    led.mod("a", 50)
    with pytest.raises(Insufficient) as e:
        led.hold("a", -51, 60)
    assert e.value.detail == "this hold (by -51) would take the balance 50 to -1, under min 0"
    assert e.value.tot == 50
    assert led.hold("a", -50, 60) == (2, 0, 2)
    with pytest.raises(Insufficient):
        led.hold("a", -1, 60, min=0)
    assert led.hold("a", -10, 60, min=-10) == (3, -10, 3)
    with pytest.raises(Insufficient) as e:
        led.hold("a", -1, 60, min=-10)
    assert e.value.tot == -10
    assert led.open_holds == 2 and len(entries(led, "a")) == 3


@pytest.mark.parametrize("by,min_", [(-1, None), (-5, INT64_MIN), (INT64_MIN + 1, INT64_MIN)])
def test_a_hold_on_an_unknown_cred_is_no_account_and_opens_nothing(led, by, min_):
    with pytest.raises(NoAccount) as e:
        led.hold("ghost", by, 60, min=min_, key="k")
    assert (e.value.status, e.value.code) == (404, "no_account")
    assert led.tot("ghost") is None and len(led) == 0 and led.open_holds == 0
    assert led.mod("ghost", 5, key="k") == (5, 1)      # nor did it use its key


@pytest.mark.parametrize("by,msg", [(0, "negative"), (1, "negative"), (True, "bool"),
                                    (-1.0, "float"), (INT64_MIN - 1, "64-bit"),
                                    (INT64_MIN, "-9223372036854775807")])
def test_bad_amounts_of_a_hold_are_refused_and_change_nothing(led, by, msg):
    """INT64_MIN passes the int64 check, but the amount it holds, -by, does
    not fit in one: refused like any amount out of range, before anything
    is applied (it used to apply the entry, then fail with OverflowError)."""
    led.mod("a", 5)
    with pytest.raises(BadRequest, match=msg):
        led.hold("a", by, 60, min=INT64_MIN)
    assert entries(led, "a") == [(1, 5, 5, None, None)] and led.open_holds == 0
    assert led.mod("a", 1) == (6, 2)                   # the next batch carries nothing else
    assert led.verify()["holds"] == 0


def test_the_largest_amount_a_hold_can_take(led, clock):
    led.mod("a", 5)
    hold, tot, _ = led.hold("a", -INT64_MAX, 1, min=INT64_MIN)
    assert tot == 5 - INT64_MAX
    clock.advance(1)
    assert led.expire_due() == 1
    assert led.tot("a") == 5
    led.verify()


@pytest.mark.parametrize("ttl", [0, -1, HOLD_TTL_S_MAX + 1, 1.5, True, "60", None])
def test_ttl_out_of_1_to_hold_ttl_s_max_is_refused(led, ttl):
    led.mod("a", 5)
    with pytest.raises(BadRequest, match=f"ttl must be a whole number of seconds from 1 to "
                                         f"{HOLD_TTL_S_MAX}"):
        led.hold("a", -1, ttl)
    assert led.tot("a") == 5 and led.open_holds == 0


def test_a_hold_of_hold_ttl_s_max_lasts_that_long_and_no_longer(led, clock):
    assert HOLD_TTL_S_MAX == 86400
    led.mod("a", 5)
    led.hold("a", -1, HOLD_TTL_S_MAX)
    led.hold("a", -1, 1)
    clock.advance(HOLD_TTL_S_MAX - 1)
    assert led.expire_due() == 1                       # the short one
    assert led.tot("a") == 4
    clock.advance(1)
    assert led.expire_due() == 1
    assert led.tot("a") == 5 and led.open_holds == 0


# --- keys ---------------------------------------------------------------------------------

def test_a_keyed_hold_applies_once_and_its_key_is_kept(path, clock):
    with Ledger(path, clock_ms=clock) as led:
        led.mod("a", 100)
        assert led.hold("a", -5, 60, key="h") == (2, 95, 2)
        assert led.hold("a", -5, 60, key="h") == (2, 95, 2)
        for by, ttl, min_ in ((-6, 60, None), (-5, 61, None), (-5, 60, -1)):
            with pytest.raises(KeyReused):
                led.hold("a", by, ttl, min=min_, key="h")
        assert led.hold("a", -5, 60, min=0, key="h") == (2, 95, 2)   # min 0 is the default
        with pytest.raises(KeyReused):
            led.mod("a", -5, min=0, key="h")               # a mod is not the hold
        led.mod("a", -1, key="m")
        with pytest.raises(KeyReused):
            led.hold("a", -1, 60, key="m")                 # nor a hold the mod
        led.settle("a", 2, 5)
        assert led.hold("a", -5, 60, key="h") == (2, 95, 2)   # after its settle too
        assert led.open_holds == 0
    with Ledger(path, clock_ms=clock) as led:
        assert led.hold("a", -5, 60, key="h") == (2, 95, 2)
        with pytest.raises(KeyReused):
            led.hold("a", -5, 30, key="h")
        assert led.open_holds == 0 and led.tot("a") == 94


def test_a_refused_hold_does_not_use_up_its_key(led):
    led.mod("a", 3)
    with pytest.raises(Insufficient):
        led.hold("a", -5, 60, key="h")
    led.mod("a", 10)
    assert led.hold("a", -5, 60, key="h") == (3, 8, 3)


# --- bounds --------------------------------------------------------------------------------

def test_holds_per_account_max_is_reached_and_a_settle_makes_room(path, clock):
    """The real bound: HOLDS_PER_ACCOUNT_MAX holds on one account, submitted
    together (they share batches), then one more is refused."""
    with Ledger(path, clock_ms=clock) as led:
        led.mod("a", HOLDS_PER_ACCOUNT_MAX + 10)
        led.mod("b", 10)

        async def fill():
            return await asyncio.gather(*[led.ahold("a", -1, 60)
                                          for _ in range(HOLDS_PER_ACCOUNT_MAX)])

        held = asyncio.run(fill())
        assert [h for h, _, _ in held] == list(range(2, HOLDS_PER_ACCOUNT_MAX + 2))
        with pytest.raises(TooManyHolds, match=f"HOLDS_PER_ACCOUNT_MAX \\({HOLDS_PER_ACCOUNT_MAX}"
                                               r"\) open holds") as e:
            led.hold("a", -1, 60)
        assert (e.value.status, e.value.code) == (409, "too_many_holds")
        assert led.tot("a") == 10 and led.open_holds == HOLDS_PER_ACCOUNT_MAX
        assert led.hold("b", -1, 60)[0] == 2              # another account is not bound by it
        led.settle("a", 2, 0)
        assert led.hold("a", -1, 60)[0] == HOLDS_PER_ACCOUNT_MAX + 3
        assert led.open_holds == HOLDS_PER_ACCOUNT_MAX + 1
    with Ledger(path, clock_ms=clock) as led:               # the count is rebuilt at open
        with pytest.raises(TooManyHolds):
            led.hold("a", -1, 60)


def test_holds_per_account_max_reached_by_holds_not_yet_durable_waits_for_them(path, clock):
    """The account's count takes in holds whose batch is not durable yet:
    the refusal it makes is told once they are, as an Insufficient is."""
    store = GatedStore(path)
    led = Ledger(path, clock_ms=clock, store=store, holds_per_account_max=2)
    try:
        led.mod("a", 10)
        assert led.hold("a", -1, 60)[0] == 2
        got = disk_busy(led, store)
        led.submit_hold("a", -1, 60, done=got.append)     # the second, in the next batch
        led.submit_hold("a", -1, 60, done=got.append)     # one too many
        assert got == []
        store.gate.set()
        wait_for(lambda: len(got) == 3)
        assert got[:2] == [(1, 1), (3, 8, 3)] and isinstance(got[2], TooManyHolds)
        assert led.tot("a") == 8 and led.open_holds == 2
    finally:
        store.gate.set()
        led.close()


def test_holds_max_reached_by_holds_not_yet_durable_waits_for_them(path, clock):
    """HOLDS_MAX counts the holds of every account: a refusal it makes on
    holds not durable yet, of another account too, is told once they are."""
    store = GatedStore(path)
    led = Ledger(path, clock_ms=clock, store=store, holds_max=2)
    try:
        led.mod("a", 10)
        led.mod("c", 10)
        assert led.hold("a", -1, 60)[0] == 2
        got = disk_busy(led, store)
        led.submit_hold("c", -1, 60, done=got.append)     # the second, in the next batch
        led.submit_hold("a", -1, 60, done=got.append)     # one too many, in all
        assert got == []
        store.gate.set()
        wait_for(lambda: len(got) == 3)
        assert got[:2] == [(1, 1), (2, 9, 2)] and isinstance(got[2], TooManyHolds)
        assert "HOLDS_MAX (2)" in str(got[2]) and led.open_holds == 2
    finally:
        store.gate.set()
        led.close()


def test_holds_max_bounds_all_holds_together(path, clock):
    """HOLDS_MAX itself (a million) is the default: shown below; reached
    here with holds_max=5.  Expiry makes room as a settle does."""
    with Ledger(path, clock_ms=clock) as led:
        assert led._book.holds_max == HOLDS_MAX == 1_000_000
        assert led._book.holds_per_account_max == HOLDS_PER_ACCOUNT_MAX
    with Ledger(path, clock_ms=clock, holds_max=5, holds_per_account_max=3) as led:
        led.mod("a", 100)
        led.mod("b", 100)
        for _ in range(3):
            led.hold("a", -1, 10)
        with pytest.raises(TooManyHolds, match="HOLDS_PER_ACCOUNT_MAX \\(3\\)"):
            led.hold("a", -1, 10)
        led.hold("b", -1, 60)
        led.hold("b", -1, 60)
        with pytest.raises(TooManyHolds, match="HOLDS_MAX \\(5\\)"):
            led.hold("b", -1, 60)
        assert led.tot("b") == 98
        clock.advance(10)
        assert led.expire_due() == 3
        assert led.hold("b", -1, 60)[0] == 4


# --- the balance and its range --------------------------------------------------------

def test_a_funding_mod_that_leaves_no_room_for_an_open_hold_s_return_is_overflow(led, clock):
    """What a hold took comes back at its end, which nothing can refuse (an
    expiry has no caller): so a mod may not leave the balance plus what is
    held outside signed 64-bit range.  It used to be accepted, and the
    expiry then wrapped the balance around (verify: tot is not the sum)."""
    led.mod("a", 100)
    led.hold("a", -100, 1)
    with pytest.raises(Overflow):
        led.mod("a", INT64_MAX)
    assert led.mod("a", INT64_MAX - 100) == (INT64_MAX - 100, 3)
    with pytest.raises(Overflow):
        led.mod("a", 1)
    clock.advance(1)
    assert led.expire_due() == 1
    assert led.tot("a") == INT64_MAX
    led.verify()


def test_a_charge_below_zero_with_open_holds_is_no_overflow(led):
    """The range check of the balance plus what is held must not itself
    overflow: a charge that takes a balance below zero while holds are open
    is judged like any other (a C subtraction once read it as overflow)."""
    led.mod("a", 100)
    led.hold("a", -60, 60)
    assert led.mod("a", -50) == (-10, 3)
    with pytest.raises(Insufficient):
        led.mod("a", -1, min=0)
    assert led.mod("a", INT64_MIN + 10) == (INT64_MIN, 4)
    led.verify()


def test_a_settle_never_leaves_the_range(led):
    led.mod("a", INT64_MAX)
    hold, _, _ = led.hold("a", -INT64_MAX, 60)
    led.hold("a", -INT64_MAX, 60, min=INT64_MIN)
    assert led.tot("a") == -INT64_MAX
    assert led.settle("a", hold, 0) == (0, 4)
    assert led.settle("a", 3, 0) == (INT64_MAX, 5)
    led.verify()
