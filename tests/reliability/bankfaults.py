"""Made-up histories for the bank checker's own tests
(tests/reliability/test_bank.py::test_the_checker_finds): one correct
scene, and each fault the checker exists to find, as a function that
puts it into the scene."""

from bankcheck import Attempt, Checker, Op, Read, SettleOp

CRED = "bank-0"
FUND = 500          # its opening balance, as test_bank.FUND gives it


def _entry(seq, by, tot, key=None, hold=None, at=0):
    return {"seq": seq, "by": by, "tot": tot, "at": at, "key": key, "hold": hold}


def scene():
    """bank-0 opened with 500; a deposit of 1000 acknowledged (t 1..2), a
    charge of 1001 at min 0 acknowledged (t 3..4), a charge of 5000 at
    min 0 refused on 499 (t 5..6); a /tot read 499 at t 7..8; a deposit of
    3000 (t 9..10); a hold of 1002 (t 11..12), settled with use 500 (t
    13..14); a hold of 1003 for 1 s (t 15..16), expired 1.5 s after it;
    and the events of all that."""
    c = CRED
    fund = FUND
    ops = [Op(0, c, 1000, None, "a", attempts=[Attempt(1, 2, "ok", fund + 1000, 2)]),
           Op(0, c, -1001, 0, "b", attempts=[Attempt(3, 4, "ok", fund - 1, 3)]),
           Op(1, c, -5000, 0, "c", attempts=[Attempt(5, 6, "refused", fund - 1)]),
           Op(1, c, 3000, None, "d", attempts=[Attempt(9, 10, "ok", fund + 2999, 4)]),
           Op(1, c, -1002, 0, "h1", 60, [Attempt(11, 12, "ok", fund + 1997, 5)]),
           Op(1, c, -1003, 0, "h2", 1, [Attempt(15, 16, "ok", fund + 1496, 7)])]
    settles = [SettleOp(1, c, 5, 500, [Attempt(13, 14, "ok", fund + 2499, 6)])]
    reads = [Read(c, 7, 8, tot=fund - 1)]
    hist = {c: [_entry(1, fund, fund, f"fund-{c}"), _entry(2, 1000, fund + 1000, "a"),
                _entry(3, -1001, fund - 1, "b"), _entry(4, 3000, fund + 2999, "d"),
                _entry(5, -1002, fund + 1997, "h1", hold=5, at=11_000),
                _entry(6, 502, fund + 2499, hold=5, at=13_000),
                _entry(7, -1003, fund + 1496, "h2", hold=7, at=15_000),
                _entry(8, 1003, fund + 2499, hold=7, at=16_500)]}
    kinds = ["mod", "mod", "mod", "mod", "hold", "settle", "hold", "expire"]
    events = [{"id": i, "type": kind, "account": "acct-0", **e}
              for i, (kind, e) in enumerate(zip(kinds, hist[c], strict=True), start=1)]
    return ops, reads, hist, settles, events, {c: "acct-0"}


def find(ops, reads, hist, settles, events, accounts):
    return Checker(ops, reads, hist, settles, events, accounts, all_ended=True).run()


def _lose_an_acknowledged_mod(ops, reads, h, *_):
    del h[CRED][2]


def _apply_a_mod_twice(ops, reads, h, *_):
    h[CRED].append(_entry(9, -1001, FUND + 1498, "b"))


def _apply_a_refused_mod(ops, reads, h, *_):
    h[CRED].append(_entry(9, -5000, FUND - 2501, "c"))


def _leave_a_gap(ops, reads, h, *_):
    h[CRED][2]["seq"] = 4


def _break_a_sum(ops, reads, h, *_):
    h[CRED][2]["tot"] += 1


def _read_a_stale_balance(ops, reads, h, *_):
    reads[0].tot = FUND + 1000


def _read_the_future(ops, reads, h, *_):
    reads[0].t0, reads[0].t1 = 0.5, 0.6


def _answer_out_of_order(ops, reads, h, *_):
    ops[1].attempts[0] = Attempt(3, 4, "ok", FUND - 1, 1)


def _apply_a_change_said_not_applied(ops, reads, h, settles, events):
    ops.append(Op(1, CRED, -1004, 0, "e", attempts=[Attempt(17, 18, "unapplied")]))
    h[CRED].append(_entry(9, -1004, FUND + 1495, "e", at=17_000))
    events.append({"id": 9, "type": "mod", "account": "acct-0", **h[CRED][-1]})


def _refuse_wrongly(ops, reads, h, *_):
    ops[2].by = -10


def _show_a_lost_entry(ops, reads, h, *_):
    reads.append(Read(CRED, 9, 10, entries=[_entry(3, -1001, 0, "b")]))


def _end_a_hold_twice(ops, reads, h, settles, events):
    h[CRED].append(_entry(9, 1003, FUND + 3502, hold=7, at=17_000))


def _lose_an_acknowledged_settle(ops, reads, h, settles, events):
    settles[0].attempts[0] = Attempt(13, 14, "ok", FUND + 2499, 9)


def _expire_a_hold_before_its_ttl(ops, reads, h, settles, events):
    h[CRED][7]["at"] = events[7]["at"] = 15_500


def _end_a_hold_as_no_call_asked(ops, reads, h, settles, events):
    h[CRED][7].update(by=1000, tot=FUND + 2496)
    events[7].update(by=1000, tot=FUND + 2496)


def _answer_hold_ended_to_the_settle_that_ended_it(ops, reads, h, settles, events):
    settles[0].attempts.append(Attempt(20, 21, "ended"))


def _leave_a_hold_open(ops, reads, h, settles, events):
    del h[CRED][7], events[7]


def _skip_an_event_id(ops, reads, h, settles, events):
    for e in events[3:]:
        e["id"] += 1


def _lose_an_event(ops, reads, h, settles, events):
    del events[3]
    for e in events[3:]:
        e["id"] -= 1


def _give_an_expiry_a_settle_event(ops, reads, h, settles, events):
    events[7]["type"] = "settle"


FAULTS = [_lose_an_acknowledged_mod, _apply_a_mod_twice, _apply_a_refused_mod, _leave_a_gap,
          _break_a_sum, _read_a_stale_balance, _read_the_future, _answer_out_of_order,
          _apply_a_change_said_not_applied, _refuse_wrongly, _show_a_lost_entry,
          _end_a_hold_twice, _lose_an_acknowledged_settle,
          _expire_a_hold_before_its_ttl, _end_a_hold_as_no_call_asked,
          _answer_hold_ended_to_the_settle_that_ended_it, _leave_a_hold_open,
          _skip_an_event_id, _lose_an_event, _give_an_expiry_a_settle_event]
