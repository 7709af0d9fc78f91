"""The loop turn's budget (accman.server._pipeline.Turn, TURN_REQUESTS_MAX):
grants, refunds, and charges for costly requests, with `spent` called once
per turn, when its budget runs out."""

import pytest

from accman.server._pipeline import Turn


def test_a_charge_ends_the_turn_once_and_renew_starts_the_next():
    spent = []
    turn = Turn(20, lambda: spent.append(1))
    assert turn.grant(5) == 5 and turn.left == 15
    turn.charge(14)
    assert turn.left == 1 and spent == []
    turn.charge(9)
    assert turn.left == -8 and spent == [1]
    turn.charge(9)
    assert turn.grant(3) == 0 and spent == [1]          # spent once a turn
    turn.renew()
    assert turn.left == 20 and turn.grant(30) == 20 and spent == [1, 1]


def test_a_refund_after_the_turn_ran_out_does_not_end_it_twice():
    """A read granted the turn's last requests ends it; a refund of those
    it did not take, then a charge that spends them, is the same turn."""
    spent = []
    turn = Turn(20, lambda: spent.append(1))
    assert turn.grant(64) == 20 and spent == [1]
    turn.refund(19)
    turn.charge(30)
    assert turn.left == -11 and spent == [1]
    turn.renew()
    turn.charge(25)
    assert spent == [1, 1]


def test_a_negative_charge_is_refused():
    with pytest.raises(AssertionError):
        Turn(20, lambda: None).charge(-1)
