"""The loop's fill policy alone (accman.ledger.fill.Fill): no ledger, no
I/O, its clock and turns driven by hand.  How it serves the committer is
in tests/test_ledger.py."""

from accman.ledger import fill

WAIT_S = 0.05
IN_FLIGHT = 10                      # the target: FILL_FRACTION of it
CAP = 1000


class Clock:
    def __init__(self):
        self.now = 100.0

    def __call__(self):
        return self.now


def _policy():
    clock = Clock()
    f = fill.Fill(clock)
    f.wait_s = WAIT_S
    f.target_ttl_s = 60.0
    return f, clock


def _run_out(f, clock, idle, busy=0):
    """A wait begun, then `idle` turns that queue nothing new and `busy`
    that each queue one more, then run out: whether it ended there."""
    f.aim(IN_FLIGHT, CAP)
    queued = 2
    assert f.waits(queued)          # short of the target: the wait begins
    for _ in range(idle):
        assert f.waits(queued)
    for _ in range(busy):
        queued += 1
        assert f.waits(queued)
    clock.now += WAIT_S * 1.5
    return not f.waits(queued)


def test_a_wait_that_runs_out_over_idle_turns_skips_the_next_ones():
    f, clock = _policy()
    assert 2 + 1 < int(fill.FILL_FRACTION * IN_FLIGHT) and fill.FILL_SKIPS_AFTER_MISS > 0
    assert _run_out(f, clock, fill.FILL_MISS_IDLE_TURNS - 1)    # and the last look's
    for _ in range(fill.FILL_SKIPS_AFTER_MISS):
        f.aim(IN_FLIGHT, CAP)
        assert not f.waits(2)       # skipped: the batch goes
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)               # the next one waits again
    assert f.counts() == {"fill_waits": 2, "fill_misses": 1,
                          "fill_skips": fill.FILL_SKIPS_AFTER_MISS}


def test_a_wait_that_runs_out_over_turns_that_read_is_no_miss():
    """Turns that each queue more: the callers came, more of them than the
    loop reads in the wait (pipelining); the next batch waits as before."""
    f, clock = _policy()
    assert _run_out(f, clock, fill.FILL_MISS_IDLE_TURNS - 2, busy=6)
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)
    assert f.counts() == {"fill_waits": 2, "fill_misses": 0, "fill_skips": 0}


def test_idle_turns_after_turns_that_read_still_make_a_miss():
    """Each look is judged against the one before it, not the wait's
    start: callers who came early and then stayed away are a miss."""
    f, clock = _policy()
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)
    for queued in (3, 4, 5):
        assert f.waits(queued)      # turns that read
    for _ in range(fill.FILL_MISS_IDLE_TURNS - 1):
        assert f.waits(5)           # then turns that find nothing
    clock.now += WAIT_S * 1.5
    assert not f.waits(5)           # the last look's, idle too: 32
    assert f.counts()["fill_misses"] == 1


def test_a_wait_lasts_its_time_and_ends_at_its_target():
    f, clock = _policy()
    target = int(fill.FILL_FRACTION * IN_FLIGHT)
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)
    clock.now += WAIT_S * 0.99
    assert f.waits(2)
    assert not f.waits(target)      # reached: goes, and no miss
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)               # a wait of its own, from now
    clock.now += WAIT_S * 0.99
    assert f.waits(2)
    assert f.counts()["fill_misses"] == 0


def test_a_stale_target_spends_no_skip():
    """A target past its ttl is not waited for, and the skip is kept for
    a batch that would have waited."""
    f, clock = _policy()
    f.skips_after_miss = 1
    assert _run_out(f, clock, fill.FILL_MISS_IDLE_TURNS)
    f.aim(IN_FLIGHT, CAP)
    clock.now += f.target_ttl_s * 1.5
    assert not f.waits(2)           # stale: goes, the skip kept
    f.aim(IN_FLIGHT, CAP)
    assert not f.waits(2)           # the skip spent here
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)


def test_another_loop_keeps_no_wait_nor_miss_of_the_former():
    f, clock = _policy()
    assert _run_out(f, clock, fill.FILL_MISS_IDLE_TURNS)   # a miss: skips due
    f.forget()
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)               # not skipped: the miss was the former loop's
    clock.now += WAIT_S * 1.5       # a wait left behind by a loop that stopped in it
    f.forget()
    f.aim(IN_FLIGHT, CAP)
    assert f.waits(2)               # a wait of its own, not the old one run out
    assert f.waits(2)


def test_the_target_is_a_fraction_of_the_changes_in_flight_and_at_most_the_cap():
    f, _ = _policy()
    f.aim(IN_FLIGHT, CAP)
    assert f.target == int(fill.FILL_FRACTION * IN_FLIGHT)
    f.aim(IN_FLIGHT, 3)
    assert f.target == 3
    assert not f.waits(3)
