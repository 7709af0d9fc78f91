"""The middleware's settings, checked when it is built, each error naming
the setting (accman.calling.asgi), and its per-request ids.  No I/O."""

from __future__ import annotations

import itertools
import os
import re

from accman.calling.client import AccManClient
from accman.calling.policy import check_settings
from accman.limits import HOLD_TTL_S_MAX

# Each AccMan call from the client the middleware makes is bounded tighter
# than the client's default: a request waits at most this long per attempt
# for its admission.
TIMEOUT_S_DEFAULT = 2.0
RETRIES_DEFAULT = 1


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


def client_options(client, **options) -> dict:
    """The keywords of the AccManClient the middleware makes: its url,
    token, timeout_s, retries and ssl_context, None where not given (the
    defaults then for timeout_s and retries, which are checked here).  With
    a `client` of the caller's (an AccManClient: the middleware awaits its
    calls), {}: that client decides all five, and any
    of them given beside it would go unused unsaid (a timeout_s=0.05 would
    wait as long as the client does), so it is refused, naming it."""
    if client is not None:
        if not isinstance(client, AccManClient):
            raise TypeError(f"client must be an AccManClient, not {type(client).__name__}: "
                            f"the middleware awaits its calls")
        unused = [name for name, value in options.items() if value is not None]
        if unused:
            many = len(unused) > 1
            raise ValueError(f"{', '.join(unused)} {'are' if many else 'is'} the client's: with "
                             f"client given, set {'them' if many else 'it'} on that client "
                             f"(AccManClient({unused[0]}=...)), not on the middleware")
        return {}
    if options["url"] is None:
        raise ValueError("AccManMiddleware needs the AccMan url (or a client)")
    if options["timeout_s"] is None:
        options["timeout_s"] = TIMEOUT_S_DEFAULT
    if options["retries"] is None:
        options["retries"] = RETRIES_DEFAULT
    check_settings(options["timeout_s"], options["retries"])
    options["timeout_s"] = float(options["timeout_s"])
    return options


def check_options(mode, on_unavailable, header, charge_below, hold_ttl_s, on_unpaid) -> None:
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
    if hold_ttl_s is not None:
        if isinstance(hold_ttl_s, bool) or not isinstance(hold_ttl_s, int) or not (
                1 <= hold_ttl_s <= HOLD_TTL_S_MAX):
            raise ValueError(f"hold_ttl_s must be whole seconds from 1 to {HOLD_TTL_S_MAX}")
        # Check mode holds nothing: a ttl given to it would go unused unsaid,
        # and the operator would believe requests bounded by it.
        if mode != "reserve":
            raise ValueError(f'hold_ttl_s is the ttl of reserve mode\'s holds: with mode='
                             f'"{mode}" nothing is held; leave it out, or set mode="reserve"')
    if on_unpaid is not None and not callable(on_unpaid):
        raise TypeError("on_unpaid must be a callable on_unpaid(cred, amount), or None")


__all__ = ["RequestIds", "request_ids", "client_options", "check_options",
           "TIMEOUT_S_DEFAULT", "RETRIES_DEFAULT"]
