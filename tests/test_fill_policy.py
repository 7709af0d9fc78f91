"""The loop's fill policy alone (accman.ledger.fill.Fill): no ledger, no
I/O, its turns driven by hand.  How it serves the committer is in
tests/test_ledger.py."""

import time

from accman.ledger import fill

WAIT_S = 0.05
IN_FLIGHT = 10                      # the target: FILL_FRACTION of it
CAP = 1000


def _policy():
    f = fill.Fill()
    f.wait_s = WAIT_S
    f.target_ttl_s = 60.0           # however slow the test's turns
    return f


def _run_out(f, turns):
    """A wait begun and run out after `turns` more turns: whether it
    ended, as a wait that runs out does."""
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)               # short of the target: the wait begins
    for _ in range(turns):
        assert f.waits(2)
    time.sleep(WAIT_S * 1.5)
    return not f.waits(2)


def test_a_wait_that_runs_out_over_idle_turns_skips_the_next_ones():
    f = _policy()
    assert 2 < int(fill.FILL_FRACTION * IN_FLIGHT) and fill.FILL_SKIPS_AFTER_MISS > 0
    assert _run_out(f, fill.FILL_MISS_TURNS_MIN)
    for _ in range(fill.FILL_SKIPS_AFTER_MISS):
        f.aim(IN_FLIGHT, CAP)
        assert not f.waits(2)       # skipped: the batch goes
        f.stop()
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)               # the next one waits again
    assert f.counts() == {"fill_waits": 2, "fill_misses": 1,
                          "fill_skips": fill.FILL_SKIPS_AFTER_MISS}


def test_a_wait_that_runs_out_over_few_turns_is_no_miss():
    """Few, long turns: the loop spent the wait reading, and the callers
    came (pipelining, a loaded loop); the next batch waits as before."""
    f = _policy()
    assert _run_out(f, fill.FILL_MISS_TURNS_MIN - 1)
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)
    assert f.counts() == {"fill_waits": 2, "fill_misses": 0, "fill_skips": 0}


def test_a_stale_target_spends_no_skip():
    """A target past its ttl is not waited for, and the skip is kept for
    a batch that would have waited."""
    f = _policy()
    f.skips_after_miss = 1
    assert _run_out(f, fill.FILL_MISS_TURNS_MIN)
    f.target_ttl_s = WAIT_S
    f.aim(IN_FLIGHT, CAP)
    time.sleep(WAIT_S * 1.5)
    assert not f.waits(2)           # stale: goes, the skip kept
    f.target_ttl_s = 60.0
    f.aim(IN_FLIGHT, CAP)
    assert not f.waits(2)           # the skip spent here
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)


def test_another_loop_keeps_no_wait_nor_miss_of_the_former():
    f = _policy()
    assert _run_out(f, fill.FILL_MISS_TURNS_MIN)        # a miss: skips due
    f.forget()
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)               # not skipped: the miss was the former loop's
    time.sleep(WAIT_S * 1.5)        # a wait left behind by a loop that stopped in it
    f.forget()
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)               # a wait of its own, not the old one run out
    assert f.waits(2)


def test_the_target_is_a_fraction_of_the_changes_in_flight_and_at_most_the_cap():
    f = _policy()
    f.aim(IN_FLIGHT, CAP)
    assert f.target == int(fill.FILL_FRACTION * IN_FLIGHT)
    f.aim(IN_FLIGHT, 3)
    assert f.target == 3
    assert not f.waits(3)
