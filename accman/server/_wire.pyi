"""Type stubs of accman._wire (ext/wire.pyx): HTTP/1.1 request parsing,
bytes in, Request objects out; no I/O."""

from typing import Final, final

from accman.errors import HttpError

ROUTE_TOT: Final[int]
ROUTE_MOD: Final[int]
ROUTE_PAST: Final[int]
ROUTE_HEALTH: Final[int]
ROUTE_METRICS: Final[int]
ROUTE_HOLD: Final[int]
ROUTE_SETTLE: Final[int]
ROUTE_EVENTS: Final[int]
ROUTE_OPTIONS: Final[int]      # OPTIONS on a known path, or *: 204 with `allow`
ALLOW_GET: Final[str]
ALLOW_PATCH: Final[str]
ALLOW_ANY: Final[str]

# status -> the SPEC error code of the HttpErrors the parser makes.
CODES: Final[dict[int, str]]

@final
class Request:
    """One complete request (its body, if any, read and ignored).

    `route` is a ROUTE_* constant, or 0 when `error` is set: the reply is
    then that error and the query values keep their defaults (cred, min,
    key, before, low None; by, ttl, hold, after, wait 0; use -1; limit
    PAST_LIMIT_DEFAULT).  When error.close is set it is the last request
    the parser returns.  `head`: a HEAD, answered as its GET without the
    body.  `loopback_host`: the Host (or the absolute target's authority)
    names a loopback address, or there was none."""

    route: int
    cred: str | None
    by: int
    min: int | None
    key: str | None
    limit: int
    before: int | None
    ttl: int
    hold: int
    use: int
    after: int
    wait: int
    low: int | None
    token: bytes | None
    auth_fault: str | None
    keep_alive: bool
    http10: bool
    head: bool
    loopback_host: bool
    allow: str | None
    error: HttpError | None

@final
class Parser:
    """The request parser of one connection; limits from accman.limits."""

    def __init__(self) -> None: ...
    def feed(self, data: bytes, max_requests: int = ...) -> list[Request]:
        """The requests completed by data, in order, at most max_requests
        (the rest of data kept, unparsed, for `more`); [] when more bytes
        are needed, and always [] after a closing error was returned."""
    def more(self, max_requests: int = ...) -> list[Request]:
        """Parse on in the bytes a capped feed kept; [] when there are none."""
    @property
    def held_bytes(self) -> int:
        """Bytes fed and not yet parsed: `more` takes them."""
    @property
    def kept_bytes(self) -> int:
        """The bytes kept for `more`: at most twice `held_bytes`."""
    def take_continue(self) -> bool:
        """True once when a request's head asked Expect: 100-continue and
        its body is yet to come: answer 100 Continue."""
    @property
    def awaiting_body(self) -> Request | None:
        """The request whose head is whole and whose body is to come."""
    @property
    def pending(self) -> bool:
        """True while part of a request has been received but not returned."""
    @property
    def pending_head(self) -> bool:
        """The request being received is a HEAD: its reply has no body."""
