"""When a call may be sent again, and how long it may take: the rules both
clients keep (docs/CALLING.md, "Unknown outcomes and retries").  No I/O."""

from __future__ import annotations

import decimal
import numbers

from accman.errors import (Busy, EventsTrimmed, HoldEnded, KeyReused, NoHold, NotApplied,
                           OutcomeUnknown, ProxyUnavailable, Unavailable, Unreachable)
from accman.limits import IDLE_TIMEOUT_S

# --- bounds (TigerBeetle: a limit on everything) ------------------------------
# One attempt of a call, from picking a connection to the parsed reply.  A mod
# waits for its group commit (a few ms); 5 s is far beyond that yet short
# enough that a hung AccMan does not hang the calling service.
TIMEOUT_S_DEFAULT = 5.0
# The longest attempt a client may be given.  An AccMan that has not answered
# in an hour is hung, not slow; and every deadline stays within what socket
# timeouts and the event loop's timers accept (float('inf') or 1e300
# overflow them, and would fail every call instead of the construction).
TIMEOUT_S_MAX = 3600.0
# Extra attempts for a retryable call, with doubling pauses from the first.
RETRIES_DEFAULT = 2
RETRIES_MAX = 10
RETRY_PAUSE_S = 0.025
RETRY_PAUSE_MAX_S = 1.0
# A connection idle this long is closed instead of reused: well before the
# server's IDLE_TIMEOUT_S, so a request is never written just as the server
# closes the connection (the keep-alive race that turns a keyless mod into
# an unknown outcome).
IDLE_REUSE_S = min(30.0, IDLE_TIMEOUT_S / 2)


def check_settings(timeout_s, retries) -> None:
    """Refuses a client's settings that no call could keep, naming them."""
    if isinstance(timeout_s, bool) or not isinstance(timeout_s, (numbers.Real, decimal.Decimal)):
        raise TypeError(f"timeout_s must be a number of seconds, not {type(timeout_s).__name__}")
    if not 0 < float(timeout_s) <= TIMEOUT_S_MAX:
        raise ValueError(f"timeout_s must be more than 0 and at most TIMEOUT_S_MAX "
                         f"({TIMEOUT_S_MAX:g} s)")
    if isinstance(retries, bool) or not isinstance(retries, int):
        raise TypeError(f"retries must be an int, not {type(retries).__name__}")
    if not 0 <= retries <= RETRIES_MAX:
        raise ValueError(f"retries must be 0 to {RETRIES_MAX}")


def retryable(exc: BaseException, safe: bool) -> bool:
    """Whether a failed attempt may be repeated.  `safe` is true for reads
    and keyed mods: repeating them never changes a balance twice."""
    if isinstance(exc, (Unreachable, NotApplied)):
        # Not sent or not processed, or refused before applying (Busy and
        # ShuttingDown among them): a keyless mod too, nothing applied.
        return True
    if isinstance(exc, (OutcomeUnknown, Unavailable)):
        return safe
    return False


def takes_no_writes(exc: BaseException) -> bool:
    """Whether a write met a 503 that is neither back-pressure (Busy) nor
    the client's own (Unreachable), so that the next write may meet it
    too while reads go on: AccMan's own, its store cannot commit (a
    commit failed, or it takes no writes: NotApplied) or it is stopping
    (ShuttingDown), or a front end's (ProxyUnavailable), which may refuse
    writes while it passes reads (a maintenance mode, a rate limit on
    PATCH)."""
    return isinstance(exc, ProxyUnavailable) or (
        isinstance(exc, Unavailable) and not isinstance(exc, (Busy, Unreachable)))


def may_have_landed(exc: BaseException) -> bool:
    """Whether a failed attempt may still have applied: sent with no reply
    from AccMan (`OutcomeUnknown`, a front end's 503 among them), or
    AccMan's plain 503, a commit that failed ("not acknowledged" is not
    "not applied").  A NotApplied (Busy and ShuttingDown among them) was
    refused before applying, and an Unreachable never sent."""
    return isinstance(exc, OutcomeUnknown) or (
        takes_no_writes(exc) and not isinstance(exc, NotApplied))


def writes_failing(exc: BaseException) -> bool:
    """Whether a failed write says that the next write may fail too, while
    reads may go on: a write that may have landed (a commit that failed, a
    reply lost), or one refused because AccMan takes no writes
    (`takes_no_writes`: a NotApplied but Busy, a front end's 503).  The
    middleware's check mode then admits on a write (accman.calling.probe)
    rather than on `tot`."""
    return may_have_landed(exc) or takes_no_writes(exc)


def definite(exc: BaseException) -> bool:
    """Whether a failed attempt got a reply that settles what earlier
    attempts did, whenever they reach AccMan: a SPEC refusal judged by
    what never changes back (`key_reused`: the key is taken; `hold_ended`,
    `no_hold`; `events_trimmed`).  Had an earlier attempt applied, a
    repeat would have answered its result instead; and one still on its
    way (held by a stalled front-end or proxy) meets the same refusal
    when it arrives.  A refusal judged by a balance or a count that moves
    (`insufficient`, `overflow`, `too_many_holds`, `no_account` until the
    account is funded) settles nothing: the earlier attempt may arrive
    after it, meet a balance topped up meanwhile, and apply."""
    return isinstance(exc, (KeyReused, HoldEnded, NoHold, EventsTrimmed))


class Attempts:
    """The attempts of one call so far, for the clients' retry loops.

    Once an attempt may have applied (`may_have_landed`), the call ends
    with that attempt's kind of error unless a later attempt gets a
    definite reply (a success, or a `definite` refusal): a retry that is
    Unreachable, refused before applying (NotApplied: Busy, ShuttingDown),
    refused by a 401 or answered by something that is not AccMan says
    nothing of what the first attempt did, and reporting it would call a
    charge that may have happened "not applied"."""

    __slots__ = ("safe", "read", "retries", "made", "unknown")

    def __init__(self, safe: bool, retries: int, read: bool = False):
        self.safe = safe
        self.read = read            # a read applies nothing: it ends with its last error
        self.retries = retries
        self.made = 0
        self.unknown = None         # the first error that may have reached the server

    def failed(self, exc: BaseException, closed: bool):
        """After a failed attempt: None to try again (after `pause_s`), or
        the error the call ends with."""
        if self.unknown is None and not self.read and may_have_landed(exc):
            self.unknown = exc
        self.made += 1
        if self.made <= self.retries and not closed and retryable(exc, self.safe):
            return None
        return self.ending(exc)

    def ending(self, exc: BaseException) -> BaseException:
        unknown = self.unknown
        if unknown is None or may_have_landed(exc) or definite(exc):
            return exc
        return type(unknown)(f"{unknown.detail}; the call may have been applied (a later "
                             f"attempt failed with {getattr(exc, 'code', type(exc).__name__)}, "
                             f"which does not tell)")

    def pause_s(self) -> float:
        """The pause before the next attempt."""
        return pause_s(self.made - 1)


def pause_s(attempt: int) -> float:
    """The pause before retry `attempt + 1`."""
    return min(RETRY_PAUSE_S * (2 ** attempt), RETRY_PAUSE_MAX_S)


__all__ = ["TIMEOUT_S_DEFAULT", "TIMEOUT_S_MAX", "RETRIES_DEFAULT", "RETRIES_MAX", "RETRY_PAUSE_S",
           "RETRY_PAUSE_MAX_S", "IDLE_REUSE_S", "check_settings", "retryable", "definite",
           "takes_no_writes", "may_have_landed", "writes_failing", "Attempts", "pause_s"]
