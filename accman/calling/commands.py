"""The command line's client commands (accman.cli), as calls: each
command's values, from the text of its arguments, checked against the
SPEC's rules before anything is sent, and the call it then makes, which
returns what the command prints (one JSON object in the SPEC's shape).
No I/O here but the call itself."""

from __future__ import annotations

import re

from accman.calling.requests import check_name
from accman.errors import BadRequest
from accman.limits import (CRED_CHARS_MAX, EVENTS_LIMIT_MAX, EVENTS_WAIT_S_MAX, HOLD_TTL_S_MAX,
                           INT64_MAX, INT64_MIN, KEY_CHARS_MAX, PAST_LIMIT_MAX)

_DECIMAL_RE = re.compile(r"-?(?:0|[1-9][0-9]*)", re.ASCII)


def decimal(text, what: str, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    """A number from the command line, by the SPEC's rules for the wire:
    plain ASCII decimal, an optional "-", no leading zeros, no "+", "_" or
    spaces (Python's int() takes all of those)."""
    if _DECIMAL_RE.fullmatch(text) is None or text == "-0":
        raise BadRequest(f"{what} must be a plain decimal integer, like 100 or -3")
    value = int(text)
    if not low <= value <= high:
        raise BadRequest(f"{what} must be from {low} to {high}")
    return value


def by_value(text, what="by") -> int:
    by = decimal(text, what)
    if by == 0:
        raise BadRequest(f"{what} must not be 0")
    return by


def _opt(text, what: str, low: int = INT64_MIN, high: int = INT64_MAX):
    return None if text is None else decimal(text, what, low, high)


def _key(args):
    return None if args.key is None else check_name(args.key, "--key", KEY_CHARS_MAX)


def _cred(args) -> str:
    return check_name(args.cred, "cred", CRED_CHARS_MAX)


def _prepare_tot(args):
    cred = _cred(args)
    return lambda acc: {"tot": acc.tot(cred)}


def _prepare_mod(args):
    cred, by, mn, key = _cred(args), by_value(args.by), _opt(args.min, "--min"), _key(args)
    low = _opt(args.low, "--low")
    if low is not None and by < 0:
        raise BadRequest("--low is set by a funding mod only (a positive BY), not by a charge")

    def mod(acc):
        tot, seq = acc.mod(cred, by, min=mn, key=key, low=low)
        return {"tot": tot, "seq": seq}
    return mod


def _prepare_past(args):
    cred = _cred(args)
    limit = _opt(args.limit, "--limit", 1, PAST_LIMIT_MAX)
    before = _opt(args.before, "--before", 1)

    def past(acc):
        page = acc.past(cred, limit=limit, before=before)
        return {"account": page.account, "past": [e._asdict() for e in page.entries],
                "next": page.next}
    return past


def _prepare_hold(args):
    cred, by, mn, key = _cred(args), by_value(args.by), _opt(args.min, "--min"), _key(args)
    if by > 0:
        raise BadRequest("by must be negative for a hold: the amount it takes out of the "
                         "balance, like -3")
    ttl_s = decimal(args.ttl, "--ttl", 1, HOLD_TTL_S_MAX)

    def hold(acc):
        held, tot, seq = acc.hold(cred, by, ttl_s, min=mn, key=key)
        return {"hold": held, "tot": tot, "seq": seq}
    return hold


def _prepare_settle(args):
    cred, hold = _cred(args), decimal(args.hold, "hold", 1)
    use = decimal(args.use, "use", 0)

    def settle(acc):
        tot, seq = acc.settle(cred, hold, use)
        return {"tot": tot, "seq": seq}
    return settle


def events_values(args) -> tuple:
    """`(after, limit, wait_s)` of `accman events`."""
    after = decimal(args.after, "--after", 0)
    limit = _opt(args.limit, "--limit", 1, EVENTS_LIMIT_MAX)
    wait_s = _opt(args.wait, "--wait", 0, EVENTS_WAIT_S_MAX)
    return after, limit, wait_s


def _prepare_events(args):
    after, limit, wait_s = events_values(args)

    def events(acc):
        page = acc.events(after, limit=limit, wait_s=wait_s)
        return {"events": [e._asdict() for e in page.events], "next": page.next}
    return events


_PREPARE = {"tot": _prepare_tot, "mod": _prepare_mod, "past": _prepare_past,
            "hold": _prepare_hold, "settle": _prepare_settle, "events": _prepare_events}


def prepare(args):
    """The call that the command `args.command` makes, its values checked:
    a function of the client that returns what to print.  Raises
    BadRequest."""
    return _PREPARE[args.command](args)


__all__ = ["decimal", "by_value", "events_values", "prepare"]
