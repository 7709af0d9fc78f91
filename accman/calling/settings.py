"""The middleware's settings, checked when it is built, each error naming
the setting (accman.calling.asgi), and its per-request ids.  No I/O."""

from __future__ import annotations

import itertools
import os
import re

from accman.calling.policy import check_settings
from accman.limits import HOLD_TTL_S_MAX


class RequestIds:
    """Per-request ids: 96 random bits, then a counter.  A forked child
    draws its own bits: a server that builds the app before it forks its
    workers (gunicorn --preload) would otherwise give every worker the same
    ids, and AccMan would answer a second request's charge with the first
    one's reply, charging once for two."""

    def __init__(self):
        self.reseed()

    def reseed(self) -> None:
        self._base = os.urandom(12).hex()
        self._next = itertools.count(1).__next__

    def __call__(self) -> str:
        return f"{self._base}{self._next():x}"


request_ids = RequestIds()
if hasattr(os, "register_at_fork"):         # not on Windows, which does not fork
    os.register_at_fork(after_in_child=request_ids.reseed)


def check_options(mode, on_unavailable, header, charge_below, hold_ttl_s) -> None:
    """Refuses a setting of the middleware's own, naming it."""
    if mode not in ("check", "reserve"):
        raise ValueError('mode must be "check" or "reserve"')
    if on_unavailable not in ("closed", "open"):
        raise ValueError('on_unavailable must be "closed" or "open"')
    if not isinstance(header, str) or re.fullmatch(r"[A-Za-z0-9-]+", header) is None:
        raise ValueError("header must be a plain header name")
    if charge_below is not None and (isinstance(charge_below, bool) or not isinstance(
            charge_below, int) or not 200 <= charge_below <= 600):
        raise ValueError("charge_below must be a status from 200 to 600, or None")
    if isinstance(hold_ttl_s, bool) or not isinstance(hold_ttl_s, int) or not (
            1 <= hold_ttl_s <= HOLD_TTL_S_MAX):
        raise ValueError(f"hold_ttl_s must be whole seconds from 1 to {HOLD_TTL_S_MAX}")


def check_calls(timeout_s, retries, on_unpaid) -> float:
    """Refuses a setting of its calls to AccMan, naming it: checked here,
    since the client itself is made at the first request.  `timeout_s`
    as a float."""
    check_settings(timeout_s, retries)
    if on_unpaid is not None and not callable(on_unpaid):
        raise TypeError("on_unpaid must be a callable on_unpaid(cred, amount), or None")
    return float(timeout_s)


__all__ = ["RequestIds", "request_ids", "check_options", "check_calls"]
