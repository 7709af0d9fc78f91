"""The middleware's settings, checked when it is built, each error naming
the setting (accman.calling.asgi), and its per-request ids.  No I/O."""

from __future__ import annotations

import itertools
import os
import re

from accman.calling.policy import check_settings
from accman.limits import HOLD_TTL_S_MAX, INT64_MAX


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


def split(paths: list) -> tuple:
    """Paths as (the exact ones, a set; the prefixes, each without its `*`)."""
    exact = {p for p in paths if not p.endswith("*")}
    return exact, [p[:-1] for p in paths if p.endswith("*")]


def priced(prices, exempt_exact: set, exempt_prefixes: list) -> tuple:
    """The paths of `prices` as `split` gives them.  A price that only
    exempt paths match is refused: exempt wins over any price, so it would
    never be charged, and `exempt=("/public/*",)` beside `prices=
    {"/public/premium/*": 5}` would serve the premium paths free unsaid."""
    exact, prefixes = split(paths(prices, "prices"))
    for path in [*exact, *(p + "*" for p in prefixes)]:
        stem = path[:-1] if path.endswith("*") else path
        by = next((e + "*" for e in exempt_prefixes if stem.startswith(e)), None)
        if by is None and path in exempt_exact:
            by = path
        if by is not None:
            raise ValueError(f"prices[{path!r}] is exempt (by {by!r}) and would never be "
                             f"charged: an exempt path is free whatever prices says")
    return exact, prefixes


def paths(paths, what: str) -> list:
    """`paths` as a list of URL paths, each "/..." (a prefix when it ends in
    `*`; "*" alone is every path).  A bare string is refused: `exempt=("/health")`, a missing comma,
    would otherwise exempt "/", "h", "e", ... one character each."""
    if isinstance(paths, (str, bytes)):
        raise TypeError(f"{what} must be a collection of paths, not one string: "
                        f"write ({paths!r},)")
    try:
        paths = list(paths)
    except TypeError:
        raise TypeError(f"{what} must be a collection of paths, not a "
                        f"{type(paths).__name__}") from None
    for path in paths:
        if not isinstance(path, str) or not (path.startswith("/") or path == "*"):
            raise ValueError(f"{what}: {path!r} is not a path starting with /, nor *")
    return paths


def route_path(scope) -> str:
    """The path that `exempt` and `prices` name: the request's path as the
    app routes it, without the `root_path` it is mounted at (uvicorn
    --root-path, a Starlette Mount), as Starlette's routing takes it; the
    mount's root itself is "/" (Starlette's "", which it redirects to "/"),
    so that its redirect is priced, or exempt, as "/" is."""
    path, root = scope["path"], scope.get("root_path", "")
    if root and path.startswith(root) and path[len(root):len(root) + 1] in ("", "/"):
        return path[len(root):] or "/"
    return path


def amount(value, what: str) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int, not {type(value).__name__}")
    if not 0 <= value <= INT64_MAX:
        raise ValueError(f"{what} must be between 0 and {INT64_MAX}")
    return value


__all__ = ["RequestIds", "request_ids", "check_options", "check_calls", "split", "priced", "paths",
           "route_path", "amount"]
