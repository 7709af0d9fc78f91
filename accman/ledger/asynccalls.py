"""The Ledger's calls for asyncio: `amod`, `ahold`, `asettle` and `aevents`
await their outcome on the caller's loop, where the completions of its
changes run (Committer.bind_loop)."""

from __future__ import annotations

import asyncio
import contextlib

from accman.errors import AccManError
from accman.limits import EVENTS_LIMIT_DEFAULT
from accman.store import check_cred, check_hold, check_key, check_mod, check_settle


def running_loop():
    """The event loop running in this thread, or None."""
    try:
        return asyncio.get_running_loop()
    except RuntimeError:
        return None


def result(outcome):
    """A call's value, or its AccManError raised."""
    if isinstance(outcome, AccManError):
        raise outcome
    return outcome


# Each change's values as the Book checks them (ext/ledger.pyx, ext/holds.pxi),
# in its order and words, called with the Committer method's arguments.
def _mod_values(cred, by, min_, key, low=None) -> None:
    check_cred(cred)
    check_mod(by, min_, key, low)


def _hold_values(cred, by, ttl_s, min_, key) -> None:
    check_cred(cred)
    check_hold(by, ttl_s, min_)
    check_key(key)


def _settle_values(cred, hold, use) -> None:
    check_cred(cred)
    check_settle(hold, use)


class AsyncCalls:
    """Mixed into accman.ledger.Ledger, whose `_check_open`, `_committer`
    and `read_events` these use."""

    async def amod(self, cred: str, by: int, *, min: int | None = None,
                   key: str | None = None, low: int | None = None) -> tuple[int, int]:
        """`mod` for asyncio: many concurrent amods share one fsync."""
        return await self._awaited(_mod_values, self._committer.submit, cred, by, min, key,
                                   low=low)

    async def ahold(self, cred: str, by: int, ttl_s: int, *, min: int | None = None,
                    key: str | None = None) -> tuple[int, int, int]:
        return await self._awaited(_hold_values, self._committer.submit_hold, cred, by, ttl_s,
                                   min, key)

    async def asettle(self, cred: str, hold: int, use: int) -> tuple[int, int]:
        return await self._awaited(_settle_values, self._committer.submit_settle, cred, hold,
                                   use)

    async def _awaited(self, values, submit, *args, **kw):
        self._check_open()
        loop = asyncio.get_running_loop()
        committer = self._committer
        former = None
        if committer._loop is not loop:
            # Bad values are refused before the loop is claimed: BadRequest
            # names them, whichever loop holds the ledger, and a call that
            # changes nothing binds no loop either.
            values(*args, **kw)
            former = committer.claim_loop(loop)
            if former is None:
                raise RuntimeError("this Ledger's async writes belong to another event loop, "
                                   "still running: await them there, or call mod, hold and "
                                   "settle (from any thread)")
        fut = loop.create_future()

        def done(outcome):
            if not fut.done():
                fut.set_result(outcome)

        # Not counted by the gate's `calling` (a thread-local count, paid by
        # every change): an event loop's signals arrive between its callbacks.
        try:
            submit(*args, done=done, **kw)
        except (AccManError, ValueError):
            # Refused at once by what the ledger holds (Busy, Unavailable) or
            # by its clock's reading (ValueError, a test's clock_ms): nothing
            # was submitted on the loop.  A refusal told through
            # `done` (Insufficient, a use over its hold) binds it, as a
            # change does: it is delivered there.
            if former is not None:
                committer.give_back(loop, former)
            raise
        return result(await fut)

    async def aevents(self, after: int = 0, limit: int = EVENTS_LIMIT_DEFAULT,
                      wait_s: float = 0) -> tuple:
        """`events`, waiting up to `wait_s` for the first one (long poll).
        Cancelled (a timeout around it, its loop's end), it leaves its place
        among the EVENTS_WAITERS_MAX long polls at once."""
        fut = asyncio.get_running_loop().create_future()

        def done(outcome):
            # A cancelled poll's future takes no outcome: raising here would
            # leave unanswered the polls woken after it.
            if not fut.done():
                fut.set_result(outcome)

        outcome = self.read_events(after, limit, wait_s, done)
        if outcome is not None:
            return result(outcome)
        try:
            return result(await fut)
        except asyncio.CancelledError:
            # Its place goes to another poll now: a poll whose loop has ended
            # would hold it for ever.  A closing ledger frees every place.
            with contextlib.suppress(AccManError):
                self.end_wait(done)
            raise


__all__ = ["AsyncCalls", "result", "running_loop"]
