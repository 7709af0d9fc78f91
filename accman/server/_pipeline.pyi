"""Type stubs of accman.server._pipeline (ext/pipeline.pyx): a connection's
requests in flight, in order, and the replies made for the store's Lane."""

from typing import Any, final

from accman.server._wire import Parser, Request

@final
class LaneStats:
    """Counters of the replies the Pipelines made, folded into the server's
    Metrics when rendered."""

    mods_ok: int
    tots_ok: int
    def __init__(self, bounds: tuple[float, ...]) -> None: ...
    def take(self) -> tuple[int, int, list[int], float, int]:
        """(mods_ok, tots_ok, latency bucket counts, latency sum, latency
        count) since the last call; zeroes them."""

@final
class Turn:
    """The requests the connections may still take in this loop turn."""

    left: int
    size: int
    one_each: bool
    def __init__(self, size: int, spent: Any) -> None: ...
    def grant(self, n: int) -> int:
        """How many of `n` requests a connection may take now."""
    def charge(self, n: int) -> int:
        """`n` requests' worth more, for a request that is more work."""
    def costly(self, n: int) -> bool:
        """Whether a read that may cost `n` requests' worth more is answered now."""
    def pass_spent(self, left_at_start: int) -> bool:
        """A pass begun with `left_at_start` left has had its share of the turn."""
    def refund(self, n: int) -> int:
        """Requests granted and not taken."""
    def renew(self) -> None: ...

@final
class Pipeline:
    """The queue of one connection: routes.Slot entries and lane entries."""

    pipeline_max: int
    activity: int
    held: bool
    pass_left: int
    def __init__(self, conn: Any, parser: Parser, turn: Turn, routes: Any, lane: Any,
                 stats: LaneStats, tokens_on: bool, pipeline_max: int) -> None: ...
    def made(self, transport: Any, reads: bytearray) -> None:
        """The connection is made: `quick` takes its reads from `reads` and
        writes to `transport`."""
    def __len__(self) -> int: ...
    def __bool__(self) -> bool: ...
    def append(self, obj: Any) -> None: ...
    def __getitem__(self, i: int) -> Any:
        """The Python entry at the head (0) or tail (-1), None for a lane entry."""
    def pop(self) -> Any: ...
    def clear(self) -> None: ...
    def close_tail(self) -> None:
        """The last reply owed says `Connection: close` (a stop)."""
    def take(self, reqs: list[Request], i: int, stopping: bool) -> int:
        """Takes reqs[i:] through the lane while it can; the index of the
        first request left for the general path."""
    def quick(self, n: int, plain: bool) -> list[Request] | None:
        """Feeds the read's `n` bytes (in `reads`) within the turn's grant;
        None when it was one lane request, taken whole; else the requests
        for the general path."""
    def drain(self, out: list[bytes]) -> int:
        """Appends the ready replies at the head to `out`, in order."""
    def __call__(self, outcome: Any) -> None:
        """A batch its entries waited for is durable (or failed)."""
