"""The writer's choice to follow a write at once with the changes queued
during it (accman.ledger.backtoback.BackToBack): no ledger, no I/O, the
writes' times given by hand.  How the writer uses it is in
tests/test_ledger.py."""

from accman.ledger import backtoback

FAST_S, SLOW_S = 40e-6, 500e-6      # a disk that answers back to back faster


def _choices(b, n):
    return [b.follows() for _ in range(n)]


def test_a_kind_never_timed_is_tried_first():
    b = backtoback.BackToBack()
    assert b.follows()                  # nothing timed: at once first
    b.wrote(True, SLOW_S)
    assert not b.follows()              # then a write after a gap
    b.wrote(False, SLOW_S)
    assert not b.follows()              # alike: the loop's kick takes them


def test_it_follows_at_once_where_the_disk_answers_back_to_back_faster():
    b = backtoback.BackToBack()
    b.wrote(False, SLOW_S)
    b.wrote(True, FAST_S)
    every = backtoback.BACK_TO_BACK_PROBE_EVERY
    choices = _choices(b, 2 * every)
    assert choices.count(False) == 2    # the probes, one in BACK_TO_BACK_PROBE_EVERY
    assert not choices[every - 1] and not choices[2 * every - 1]


def test_it_leaves_them_to_the_loop_where_the_disk_answers_alike():
    b = backtoback.BackToBack()
    b.wrote(False, SLOW_S)
    b.wrote(True, SLOW_S * backtoback.BACK_TO_BACK_RATIO * 1.2)   # not fast enough
    choices = _choices(b, 2 * backtoback.BACK_TO_BACK_PROBE_EVERY)
    assert choices.count(True) == 2     # the probes time the other kind


def test_the_choice_follows_the_disk_as_its_answers_change():
    b = backtoback.BackToBack()
    b.wrote(False, SLOW_S)
    b.wrote(True, FAST_S)
    assert b.follows()
    for _ in range(40):                 # back-to-back writes grow as slow as the others
        b.wrote(True, SLOW_S)
    assert not b.follows()
    for _ in range(40):                 # and fast again
        b.wrote(True, FAST_S)
    assert b.follows()


def test_it_counts_the_writes_that_followed_at_once():
    b = backtoback.BackToBack()
    for at_once in (True, False, True, True):
        b.wrote(at_once, FAST_S)
    assert b.writes == 3


def test_the_first_writes_of_a_kind_weigh_alike():
    b = backtoback.BackToBack()
    b.wrote(False, 100e-6)
    b.wrote(False, 300e-6)              # the average of both: 200 µs
    b.wrote(True, 90e-6)
    assert b.follows()                  # 90 against half of 200


def test_one_stalled_write_does_not_turn_the_choice():
    """A write stalled by the machine (50 ms) counts as at most
    BACK_TO_BACK_OUTLIER times its kind's average."""
    b = backtoback.BackToBack()
    for _ in range(20):
        b.wrote(False, SLOW_S)
        b.wrote(True, FAST_S)
    b.wrote(True, 0.05)
    assert b.follows()
