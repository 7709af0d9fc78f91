"""A 503 `not_applied` to a *later* request of a call never wipes out what
an earlier one may have done (docs/CALLING.md, "Unknown outcomes and
retries", "Failure behaviour"; docs/SERVER.md, "Errors": not_applied says
nothing of an earlier request for the same key).  Each case sends the
call once so that it applies and its reply is lost, then meets
`not_applied`: in the client's own retries, in the owed queue, and across
the reserve flow (the hold, its release by a keyed repeat, a settle in
flight when the request is cancelled); and on the command line.  Against
the fake AccMan, whose faults say what applied."""

from __future__ import annotations

import asyncio
import logging
import time

import pytest

from accman.calling import owed as owed_mod
from asgi_harness import CRED, call, entries, mw
from conftest import run_accman
from fake_accman import NOT_APPLIED, FakeAccMan, charges, run
from test_cli import one_line_error

# Owed calls retried at once, not after their pause.
pytestmark = pytest.mark.usefixtures("quick_followups")

DROPPED = ("apply_drop",)       # applied, and its reply lost
WAIT_S = 10.0
# How late the fake answers a call it applied: well after the test has
# cancelled the request waiting for it.
LATE_S = 3.0


def in_turn(matches, *actions):
    """A fault for FakeAccMan: the requests for which `matches(path,
    params)` holds meet `actions` one after another, then are handled as
    usual; every other request is handled as usual."""
    left = list(actions)

    def fault(method, path, params):
        if matches(path, params) and left:
            return left.pop(0)
    return fault


def est_then(est, cost):
    return lambda scope, status, headers: est if status is None else cost


def drained(m, **kw):
    async def go():
        r = await call(m, **kw)
        assert await m.drain(WAIT_S)
        return r
    return run(go())


async def until(condition, task=None):
    """Waits for `condition()`, `task` (if given) still running."""
    deadline = time.monotonic() + WAIT_S
    while not condition():
        assert time.monotonic() < deadline and not (task is not None and task.done())
        await asyncio.sleep(0.01)


def holds(path, _params) -> bool:
    return path == "/hold"


def settles(path, _params) -> bool:
    return path == "/settle"


# --- the client's own retries, then the owed queue -------------------------------
def test_a_hold_whose_retry_is_refused_not_applied_is_still_undone():
    """Reserve mode: the hold applied and its reply was lost; the client's
    retry (keyed) was refused not_applied.  The hold may have landed: the
    request gets 503 and an unhold is owed, which releases it."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = in_turn(holds, DROPPED, NOT_APPLIED)
        m = mw(fake, mode="reserve", cost=3, retries=1)
        assert drained(m).status == 503
        assert m.stats["owed"] == 1 and m.stats["stranded"] == 0
        assert entries(fake) == [(10, None, None), (-3, "-h", 2), (3, None, 2)]
        assert fake.tot(CRED) == 10 and fake.open_holds(CRED) == {}


def test_an_unhold_whose_repeat_is_refused_not_applied_is_sent_again_until_it_lands():
    """The owed unhold's keyed repeat of the hold is refused not_applied
    twice (the store takes no writes for a while): it stays owed, and once
    AccMan takes writes it finds the hold by its key and releases it."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = in_turn(holds, DROPPED, NOT_APPLIED, NOT_APPLIED)
        m = mw(fake, mode="reserve", cost=3, retries=0)
        assert drained(m).status == 503
        assert m.stats["owed"] == 1 and m.stats["stranded"] == 0
        assert len(fake.calls("/hold")) == 4
        assert entries(fake) == [(10, None, None), (-3, "-h", 2), (3, None, 2)]
        assert fake.tot(CRED) == 10


@pytest.mark.parametrize("retries", [0, 1], ids=["owed_at_once", "after_a_client_retry"])
def test_a_charge_that_landed_is_never_billed_though_every_later_attempt_is_not_applied(
        retries, monkeypatch, caplog):
    """Check mode: the charge applied and its reply was lost; every attempt
    after it, the client's own retry and the owed ones, is refused
    not_applied.  Stranded, it is of unknown outcome and never given to
    on_unpaid: the account paid once already."""
    monkeypatch.setattr(owed_mod, "FOLLOWUP_ATTEMPTS_MAX", 2)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = in_turn(charges, DROPPED, *[NOT_APPLIED] * 10)
        unpaid = []
        m = mw(fake, cost=2, retries=retries, on_unpaid=lambda c, a: unpaid.append(a))
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            assert drained(m).status == 200
        assert fake.tot(CRED) == 8 and unpaid == [] and m.stats["stranded"] == 1
        assert m.stats["unpaid_amount"] == 0
        assert "outcome unknown: look for key" in caplog.text


def test_a_settle_that_landed_is_never_billed_though_every_later_attempt_is_not_applied(
        monkeypatch, caplog):
    """Reserve mode: the settle applied and its reply was lost, then every
    attempt is refused not_applied: stranded of unknown outcome, not
    billed."""
    monkeypatch.setattr(owed_mod, "FOLLOWUP_ATTEMPTS_MAX", 2)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = in_turn(settles, DROPPED, *[NOT_APPLIED] * 10)
        unpaid = []
        m = mw(fake, mode="reserve", cost=est_then(5, 2), retries=1,
               on_unpaid=lambda c, a: unpaid.append(a))
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            assert drained(m).status == 200
        assert fake.tot(CRED) == 8 and unpaid == [] and m.stats["stranded"] == 1
        assert "outcome unknown: look for hold" in caplog.text


# --- a settle in flight when its request is cancelled ----------------------------
def test_a_release_stranded_after_a_settle_that_landed_at_the_cancel_says_what_is_owed(
        monkeypatch, caplog):
    """Reserve mode: the settle of the response's cost applied, and the
    request was cancelled before its reply came (the consumer gets no
    response).  The owed release (an Unsettle) then meets not_applied on
    every attempt and is stranded.  The settle it follows may have
    landed: the log must not say that nothing is lost, since the account
    may have paid 2 for a response it never got (docs/CALLING.md, "A
    request cancelled with a call in flight": the log says what the
    service owes the account)."""
    monkeypatch.setattr(owed_mod, "FOLLOWUP_ATTEMPTS_MAX", 2)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        settled = []                    # the settles the fake handled
        handle = fake._settle

        def settle(params):
            settled.append(params["use"])
            return handle(params)
        fake._settle = settle

        def fault(method, path, params):
            if path != "/settle":
                return None
            if not settled:
                settle(params)          # applied; its reply comes after the cancel
                return ("delay", LATE_S)
            return NOT_APPLIED
        fake.fault = fault
        m = mw(fake, mode="reserve", cost=est_then(5, 2), retries=0)

        async def go():
            task = asyncio.ensure_future(call(m))
            await until(lambda: settled, task)
            task.cancel()
            with pytest.raises(asyncio.CancelledError):
                await task
            assert await m.drain(WAIT_S)
            await until(lambda: len(settled) == 2)      # the late reply went out
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            run(go())
        assert fake.tot(CRED) == 8 and m.stats["stranded"] == 1
        stranded = [r.getMessage() for r in caplog.records if "stranded" in r.getMessage()]
        assert len(stranded) == 1 and "hold 2" in stranded[0], stranded
        assert "nothing is lost" not in stranded[0], stranded


# --- the command line -------------------------------------------------------------
@pytest.mark.parametrize("args", [["mod", "C", "-3", "--key", "k1"], ["settle", "C", "2", "0"]],
                         ids=["keyed_mod", "settle"])
def test_the_command_line_never_says_not_applied_after_an_attempt_that_applied(fake, args):
    """The write applied and its reply was lost; the client's retries were
    refused not_applied.  The command says that it may have applied (exit
    3), never that it was not applied."""
    fake.fund("C", 10)
    if args[0] == "settle":
        fake._in_loop(fake._hold, {"cred": "C", "by": "-4", "ttl": "60"})
    fake.fault = in_turn(lambda path, _: path in ("/mod", "/settle"), DROPPED,
                         *[NOT_APPLIED] * 5)
    err = one_line_error(run_accman(*args, "--url", fake.url), 3)
    assert "was not applied" not in err and "may have been applied" in err, err
    assert fake.tot("C") == (7 if args[0] == "mod" else 10)


@pytest.mark.parametrize("args,what", [
    (["mod", "C", "-3", "--key", "k1"], "mod"),
    (["hold", "C", "-3", "--ttl", "60", "--key", "k1"], "hold"),
    (["settle", "C", "2", "1"], "settle")], ids=["keyed_mod", "keyed_hold", "settle"])
def test_a_repeat_refused_not_applied_never_says_an_earlier_run_was_not_applied(fake, args,
                                                                               what):
    """The documented way out of an unknown outcome (exit 3: "run the same
    command again, with the same --key" or the same USE) meets a store
    that still takes no writes.  The repeat is refused not_applied, which
    says nothing of an earlier request of the same key (docs/SERVER.md,
    "Errors"): the first run's write applied, so the repeat must not say
    that the write was not applied (a script would take exit 1 and those
    words for "not charged", while the account paid)."""
    fake.fund("C", 10)
    if what == "settle":
        fake._in_loop(fake._hold, {"cred": "C", "by": "-4", "ttl": "60"})
    fake.fault = in_turn(lambda path, _: path != "/tot", DROPPED, *[NOT_APPLIED] * 2)
    first = one_line_error(run_accman(*args, "--url", fake.url), 3)
    assert "may have been applied" in first, first
    applied = fake.tot("C")
    assert applied == {"mod": 7, "hold": 7, "settle": 9}[what]
    fake.fault = lambda method, path, params: NOT_APPLIED if method == "PATCH" else None
    again = run_accman(*args, "--url", fake.url)
    err = again.stderr.strip()
    assert again.returncode != 0 and err.startswith("accman: 503 not_applied"), err
    assert f"the {what} was not applied" not in err, err
    assert fake.tot("C") == applied
