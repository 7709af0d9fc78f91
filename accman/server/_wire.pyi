"""Type stubs of accman._wire (ext/wire.pyx): HTTP/1.1 request parsing,
bytes in, Request objects out; no I/O."""

from typing import Final, final

from accman.errors import HttpError

ROUTE_TOT: Final[int]
ROUTE_MOD: Final[int]
ROUTE_PAST: Final[int]
ROUTE_HEALTH: Final[int]
ROUTE_METRICS: Final[int]

# status -> the SPEC error code of the HttpErrors the parser makes.
CODES: Final[dict[int, str]]

@final
class Request:
    """One complete request (its body, if any, read and ignored).

    `route` is a ROUTE_* constant, or 0 when `error` is set: the reply is
    then that error and the query values keep their defaults (cred, min,
    key, before None; by 0; limit PAST_LIMIT_DEFAULT).  When error.close is
    set it is the last request the parser returns."""

    route: int
    cred: str | None
    by: int
    min: int | None
    key: str | None
    limit: int
    before: int | None
    token: bytes | None
    keep_alive: bool
    http10: bool
    error: HttpError | None

@final
class Parser:
    """The request parser of one connection; limits from accman.limits."""

    def __init__(self) -> None: ...
    def feed(self, data: bytes) -> list[Request]:
        """The requests completed by data, in order; [] when more bytes are
        needed, and always [] after a closing error was returned."""
    @property
    def pending(self) -> bool:
        """True while part of a request has been received but not returned."""
