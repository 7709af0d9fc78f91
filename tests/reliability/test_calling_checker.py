"""The calling-side bank checker's own checks (callingcheck.py, run by
test_calling_bank.py): a made-up correct run of one account passes, and
each fault the checker exists to find, planted in it, is found."""

import pytest

from accman.calling.owed import fingerprint
from accman.records import Entry
from callingcheck import (Account, Request, ServiceLog, TopUp, check_account, log_problems,
                          overdrawn)

SCENE_CRED = "scene"


def scene(mode):
    """A correct made-up run of one account: [requests], [top-ups], the
    history as [(by, key, hold label)], the log's lines.  A hold's label
    stands for its seq; a check-mode charge is A - 500, as the app's."""
    fp = fingerprint(SCENE_CRED)
    reqs = [Request(SCENE_CRED, 1000, False, status=200, header=4500),
            Request(SCENE_CRED, 1001, False, status=200),
            Request(SCENE_CRED, 1002, False, status=402, header=4500),
            Request(SCENE_CRED, 1003, False, status=503),
            Request(SCENE_CRED, 1004, True, status=400, header=3999),
            Request(SCENE_CRED, 1005, False, gone=True, sent_at=10.0, closed_at=10.03),
            Request(SCENE_CRED, 1006, False, status=200)]             # served unpaid
    topups = [TopUp(SCENE_CRED, "top-0", 3000, True)]
    if mode == "check":
        spec = [(5000, "open", None), (-500, "x1-c", None), (-501, "x2-c", None),
                (3000, "top-0", None)]
        log = [f"accman: charge of 501 for account {fp} queued (after outcome_unknown), "
               f"key x2-c"]
    else:
        spec = [(5000, "open", None), (-1000, "x1-h", "h1"), (500, None, "h1"),
                (-1001, "x2-h", "h2"), (None, "owed", "h2"),
                (-1003, "x4-h", "h4"), (1003, None, "h4"), (-1004, "x5-h", "h5"),
                (1004, None, "h5"), (-1005, "x6-h", "h6"), (1005, None, "h6"),
                (3000, "top-0", None)]
        # The free response's release refused not_applied is owed: its
        # hold applied, and the release is named by the hold.
        log = [f"accman: settle of 501 for account {fp} queued (after unreachable), hold h2",
               f"accman: release of 0 for account {fp} queued (after outcome_unknown), "
               f"key x4-h",
               f"accman: release of 0 for account {fp} queued (after not_applied), hold h5"]
    log.append(f"accman: unpaid 506 (account {fp}): unreachable")
    log.append(f"calbank: response of A=1005 for account {fp} starts at 10.300000")
    return reqs, topups, spec, log


def judge(mode, reqs, topups, spec, log, final_delta=0) -> list:
    entries, seqs, tot = [], {}, 0
    for seq, (by, key, hold) in enumerate(spec, 1):
        if hold is not None and hold not in seqs:
            seqs[hold] = seq
        if by is None:          # the settle of a hold of 1001 that used 501
            by, key = 500, None
        tot += by
        entries.append(Entry(seq, by, tot, 0, key, seqs.get(hold)))
    text = "\n".join(log)
    for label, seq in seqs.items():
        text = text.replace(f"hold {label}", f"hold {seq}")
    log = ServiceLog(text)
    return log_problems(log) + check_account(mode, Account(SCENE_CRED, entries), reqs, topups,
                                             5000, log, tot + final_delta)


def _lost_charge(mode, reqs, topups, spec, log):
    del spec[1:3 if mode == "reserve" else 2]


def _doubled_charge(mode, reqs, topups, spec, log):
    spec.append((-500, "x9-c", None))


def _charged_refusal(mode, reqs, topups, spec, log):
    spec.append((-502, "x3-c", None))


def _held_refusal(mode, reqs, topups, spec, log):
    """Held though refused, the hold released whole: it moved nothing."""
    spec += [(-1002, "x3-h", "h3"), (1002, None, "h3")]


def _charge_of_no_request(mode, reqs, topups, spec, log):
    spec.append((-700, "x7-c", None))


def _gone_charged(mode, reqs, topups, spec, log):
    if mode == "check":
        spec.append((-505, "x6-c", None))
    else:
        spec[spec.index((1005, None, "h6"))] = (500, None, "h6")


def _gone_charged_unstarted(mode, reqs, topups, spec, log):
    """Charged, though its response never started."""
    log[:] = [line for line in log if not line.startswith("calbank:")]
    _gone_charged(mode, reqs, topups, spec, log)


def _gone_started_first_charged_wrong(mode, reqs, topups, spec, log):
    """The response started before the consumer left, so a charge is
    allowed: its own, not the whole estimate."""
    reqs[5].closed_at = 10.4
    if mode == "check":
        spec += [(-1005, "x6-h", "h6"), (0, None, "h6")]
    else:
        spec[spec.index((1005, None, "h6"))] = (0, None, "h6")


def _unpaid_not_logged(mode, reqs, topups, spec, log):
    log[:] = [line for line in log if "accman: unpaid" not in line]


def _unpaid_charged(mode, reqs, topups, spec, log):
    spec += [(-506, "x7-c", None)] if mode == "check" else [(-1006, "x7-h", "h7"),
                                                           (500, None, "h7")]


def _free_without_hold(mode, reqs, topups, spec, log):
    """The app ran for a free request with nothing held, though AccMan
    admitted it (a balance header)."""
    spec[:] = [x for x in spec if x[2] != "h5"]


def _end_of_no_hold(mode, reqs, topups, spec, log):
    spec.append((700, None, "h9"))


def _wrong_header(mode, reqs, topups, spec, log):
    reqs[0].header = 4000


def _wrong_header_of_a_refusal(mode, reqs, topups, spec, log):
    reqs[2].header = 4501


def _wrong_header_of_a_free_response(mode, reqs, topups, spec, log):
    reqs[4].header = 5001


def _owed_not_logged(mode, reqs, topups, spec, log):
    del log[0]


def _owed_stranded_yet_landed(mode, reqs, topups, spec, log):
    ref = "key x2-c" if mode == "check" else "hold h2"
    log.append(f"accman: stranded charge: the account owes 501 (account "
               f"{fingerprint(SCENE_CRED)}, {ref}): still unreachable after 20 attempts")


def _top_up_lost(mode, reqs, topups, spec, log):
    spec.pop()


def _traceback_logged(mode, reqs, topups, spec, log):
    log.append("Traceback (most recent call last):")


def _unhold_not_logged(mode, reqs, topups, spec, log):
    spec += [(-1003, "x4-h", "h4"), (1003, None, "h4")] if mode == "check" else []
    log[:] = [line for line in log if "key x4-h" not in line]


def _unhold_after_not_applied(mode, reqs, topups, spec, log):
    """A hold refused 503 not_applied (never applied) owed a release."""
    log.append(f"accman: release of 0 for account {fingerprint(SCENE_CRED)} queued (after "
               f"not_applied), key x7-h")


def _overdrawn(mode, reqs, topups, spec, log):
    """A request of 9000 served last, charged 8500, on a balance under
    9000: reserve mode holds no more than the balance."""
    left = sum(500 if by is None else by for by, _, _ in spec) - 8500
    reqs.append(Request(SCENE_CRED, 9000, False, status=200, header=left))
    spec += [(-8500, "x0-c", None)] if mode == "check" else [(-9000, "x0-h", "h0"),
                                                            (500, None, "h0")]


# Each planted fault with the problem the checker's own check for it says
# (`{mode}` the mode's name; a pair where the modes differ), so that a
# fault found only by another check fails; None where the mode allows it.
FAULTS = {
    _lost_charge: "{mode} scene: A=1000 (answered 200, header 4500): served as paid, moved 0, "
                  "not -500",
    _doubled_charge: ("check scene: A=1000 (answered 200, header 4500): held 0 times, "
                      "charged 2 times",
                      "reserve scene: A=1000 (answered 200, header 4500): served as paid, "
                      "moved -1000, not -500"),
    _charged_refusal: "{mode} scene: A=1002 (answered 402, header 4500): moved -502, though "
                      "nothing is charged for it",
    _held_refusal: "{mode} scene: A=1002 (answered 402, header 4500): refused, yet its hold "
                   "applied",
    _gone_charged: "{mode} scene: A=1005 (gone answered None, header None): its consumer left "
                   "before its response started (sent at 10.000, its connection closed 0.030 s "
                   "later, its response started 0.300 s after sending), yet it moved -505",
    _gone_charged_unstarted: "{mode} scene: A=1005 (gone answered None, header None): its "
                             "consumer left before its response started (sent at 10.000, its "
                             "connection closed 0.030 s later, no response started), yet it "
                             "moved -505",
    _gone_started_first_charged_wrong: "{mode} scene: A=1005 (gone answered None, header "
                                       "None): its response started before its consumer left "
                                       "(sent at 10.000, its connection closed 0.400 s later, "
                                       "its response started 0.300 s after sending), and it "
                                       "moved -1005, not its charge -505",
    _unpaid_not_logged: "{mode} scene: A=1006 (answered 200, header None): served without a "
                        "balance, and the log neither queued a call for it nor said it unpaid",
    _unpaid_charged: "{mode} scene: A=1006 (answered 200, header None): served unpaid, yet it "
                     "moved -506",
    _free_without_hold: (None, "reserve scene: A=1004 (free answered 400, header 3999): the "
                               "app ran with nothing held"),
    _end_of_no_hold: "{mode} scene: the balance 7699 is not the funding less what the "
                     "requests moved (-1001)",
    _wrong_header_of_a_refusal: "{mode} scene: A=1002 (answered 402, header 4501): its header "
                                "is a balance the history never had",
    _wrong_header_of_a_free_response: ("check scene: A=1004 (free answered 400, header 5001): "
                                       "its header is a balance the history never had",
                                       "reserve scene: A=1004 (free answered 400, header "
                                       "5001): its header is not the balance 3999 after its "
                                       "release"),
    _charge_of_no_request: "{mode} scene: A=1200 was held or charged, but no request of that "
                           "amount was sent",
    _wrong_header: "{mode} scene: A=1000 (answered 200, header 4000): its header is not the "
                   "balance after its charge [4500]",
    _owed_not_logged: "{mode} scene: A=1001 (answered 200, header None): served without a "
                      "balance, and the log neither queued a call for it nor said it unpaid",
    _owed_stranded_yet_landed: ("check scene: A=1001 (answered 200, header None): owed as key "
                                "x2-c, moved -501, stranded [('charge', None, 'key x2-c', "
                                "False)]",
                                "reserve scene: A=1001 (answered 200, header None): owed as "
                                "hold 4, moved -501, stranded [('charge', None, 'hold 4', "
                                "False)]"),
    _top_up_lost: "{mode} scene: funding [(('open', 5000), 1)] is not what was sent "
                  "[(('open', 5000), 1), (('top-0', 3000), 1)]",
    _traceback_logged: "the service's log says 'Traceback'",
    _unhold_not_logged: "{mode} scene: A=1003 (answered 503, header None): its hold applied "
                        "and no owed unhold names key x4-h",
    _unhold_after_not_applied: "a hold refused 503 not_applied (never applied) owed a "
                               "release: key x7-h",
    _overdrawn: (None, "reserve scene: overdrawn by Entry(seq=13, by=-9000, tot=-2001, at=0, "
                       "key='x0-h', hold=13)"),
}


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_the_calling_checker_passes_a_correct_run(mode):
    assert judge(mode, *scene(mode)) == []
    assert judge(mode, *scene(mode), final_delta=1) != []       # the balance told is not its sum


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_the_calling_checker_says_when_a_gone_consumer_left_and_the_response_started(mode):
    """A charge of a consumer that left is judged by the times: after its
    close, the response started too late to be charged (said with the
    times); before it, the disconnect does not refund."""
    made = scene(mode)
    _gone_charged(mode, *made)
    assert judge(mode, *made) == [
        f"{mode} {SCENE_CRED}: A=1005 (gone answered None, header None): its consumer left "
        f"before its response started (sent at 10.000, its connection closed 0.030 s later, "
        f"its response started 0.300 s after sending), yet it moved -505"]
    made[0][5].closed_at = 10.31
    assert judge(mode, *made) == []


@pytest.mark.parametrize("mode", ["check", "reserve"])
@pytest.mark.parametrize("fault", FAULTS, ids=[f.__name__.strip("_") for f in FAULTS])
def test_the_calling_checker_finds(mode, fault):
    """Each planted fault is found by its own check: the problem FAULTS
    names for it is among those said."""
    made = scene(mode)
    fault(mode, *made)
    said = FAULTS[fault]
    said = said[mode == "reserve"] if isinstance(said, tuple) else said.format(mode=mode)
    if said is None:
        # Check mode may overdraw (docs/CALLING.md), and holds nothing.
        assert judge(mode, *made) == []
        return
    assert said in judge(mode, *made)


def test_the_overdraft_check_excuses_an_expired_hold_s_charge_alone():
    """Reserve mode: the charge of a hold that expired first (a keyed mod
    without `min`) may take the balance under 0, docs/CALLING.md; it
    excuses itself only.  A hold (`min` 0) that takes the balance further
    under 0 after it is an overdraft AccMan must never make."""
    entries = [Entry(1, 2000, 2000, 0, "open", None),
               Entry(2, -1200, 800, 0, "x1-h", 2),
               Entry(3, -800, 0, 0, "x2-h", 3),
               Entry(4, 1200, 1200, 0, None, 2),          # hold 2 expires
               Entry(5, -1100, 100, 0, "x3-h", 5),
               Entry(6, -700, -600, 0, "x1-c", None)]     # its use charged as a mod
    assert overdrawn(Account(SCENE_CRED, entries)) == []
    entries.append(Entry(7, -900, -1500, 0, "x4-h", 7))
    assert overdrawn(Account(SCENE_CRED, entries)) == [f"overdrawn by {entries[-1]}"]


# The scene's entry whose tot is planted, which no header or balance reads:
# the funding (the chain's start) and, in reserve mode, a hold's settle.
@pytest.mark.parametrize("mode, index", [("check", 0), ("reserve", 0), ("reserve", 4)])
def test_the_calling_checker_finds_a_tot_that_does_not_follow_from_the_bys(mode, index,
                                                                            monkeypatch):
    """Each entry's tot is the one before it plus its by, from 0 (SPEC: a
    mod's tot is the balance right after it; a hold, its settle and its
    expiry move it by their by).  The scene's history with one tot one too
    high is found by that rule alone."""
    planted = []

    class Planted(Account):
        def __init__(self, cred, entries):
            entries[index] = entries[index]._replace(tot=entries[index].tot + 1)
            planted.append(entries[index])
            super().__init__(cred, entries)

    monkeypatch.setitem(globals(), "Account", Planted)
    problems = judge(mode, *scene(mode))
    e = planted[0]
    assert problems == [f"{mode} {SCENE_CRED}: a tot that does not follow from the bys: entry "
                        f"{e.seq} (by {e.by}) has tot {e.tot}, the tot before it plus its by "
                        f"is {e.tot - 1}"]
