"""The loop turn's budget (accman.server._pipeline.Turn, TURN_REQUESTS_MAX):
grants, refunds, and charges for costly requests, with `spent` called once
per turn, when its budget runs out."""

import pytest

from accman.limits import PASS_CHARGE_MAX
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


def test_a_pass_is_spent_by_its_own_charges_only():
    """PASS_CHARGE_MAX: a connection's pass ends once its answers have cost
    that much more than one each, or have spent the turn; the requests it
    was granted before it began, and cheap answers, never end it."""
    turn = Turn(512, lambda: None)
    turn.grant(64)
    left = turn.left
    assert not turn.pass_spent(left)                    # granted, nothing charged
    turn.charge(PASS_CHARGE_MAX - 1)
    assert not turn.pass_spent(left)
    turn.charge(1)
    assert turn.pass_spent(left)
    turn.renew()
    turn.grant(500)
    left = turn.left                                    # 12 left of the turn
    turn.charge(12)
    assert not turn.pass_spent(left)                    # the turn is used up, not overdrawn
    turn.charge(1)
    assert turn.pass_spent(left)                        # overdrawn by this pass
    assert not turn.pass_spent(turn.left)               # a pass begun now has charged nothing
