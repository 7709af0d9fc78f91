"""What a request costs under the middleware (accman.calling.asgi): its
`cost`, `exempt` and `prices` settings, checked when it is built, each
error naming the setting, and the price of a path.  No I/O."""

from __future__ import annotations

from collections.abc import Mapping

from accman.limits import INT64_MAX


class Prices:
    """The price of each path: None for an exempt one, else an int or a
    cost function `cost(scope, status, headers) -> int`.  Exempt wins over
    any price; among prices the exact path wins, then the longest prefix,
    then `cost`."""

    __slots__ = ("cost", "_exempt_exact", "_exempt_prefixes", "_exact", "_prefixes")

    def __init__(self, cost, exempt, prices):
        self.cost = price_value(cost, "cost")
        self._exempt_exact, self._exempt_prefixes = split(
            paths(() if exempt is None else exempt, "exempt"))
        if prices is not None and not isinstance(prices, Mapping):
            raise TypeError(f"prices must map paths to prices, not be a {type(prices).__name__}")
        prices = {path: price_value(price, f"prices[{path!r}]")
                  for path, price in (prices or {}).items()}
        exact, prefixes = priced(prices, self._exempt_exact, self._exempt_prefixes)
        self._exact = {path: prices[path] for path in exact}
        self._prefixes = sorted(((p, prices[p + "*"]) for p in prefixes),
                                key=lambda p: len(p[0]), reverse=True)

    def of(self, path: str):
        """The price of `path` (a route path), None when it is exempt."""
        if path in self._exempt_exact:
            return None
        for prefix in self._exempt_prefixes:
            if path.startswith(prefix):
                return None
        price = self._exact.get(path)
        if price is not None:
            return price
        for prefix, price in self._prefixes:
            if path.startswith(prefix):
                return price
        return self.cost


def charge_of(price, scope, status, headers) -> int:
    """What `price` comes to for a request: the estimate with status and
    headers None, the charge with the response's.  A cost function's
    result that is not an amount raises: a bug of the service's, never
    something to charge around."""
    if callable(price):
        return amount(price(scope, status, headers), "the cost function's result")
    return price


def price_value(value, what: str):
    return value if callable(value) else amount(value, what)


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
    `*`, the only `*` it may have; "*" alone is every path; no `{}`, `?`
    or `#`).  A bare string is refused: `exempt=("/health")`, a missing
    comma, would otherwise exempt "/", "h", "e", ... one character each."""
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
        # A glob or a Starlette route template matches no request's path:
        # a price would go unused, the default charged instead, unsaid.
        if "*" in path[:-1]:
            raise ValueError(f"{what}: {path!r} has a * before its end: a pattern is a path, "
                             f"or a prefix ending in * ('/users/*'), never a glob")
        if "{" in path or "}" in path:
            raise ValueError(f"{what}: {path!r} is a route template: a pattern is a request's "
                             f"path, or a prefix ending in * ('/users/*')")
        # A query string (the server hands it apart, in scope["query_string"])
        # or a fragment (never sent) matches none either: a path holds a ? or
        # a # only percent-encoded, which no link to a route is.
        if "?" in path or "#" in path:
            raise ValueError(f"{what}: {path!r} has a query string or a fragment: a pattern "
                             f"is the path alone (a cost function reads the query, "
                             f"scope['query_string'])")
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


__all__ = ["Prices", "charge_of", "price_value", "split", "priced", "paths", "route_path",
           "amount"]
