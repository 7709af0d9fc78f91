"""Type stubs of accman.server._pipeline (ext/pipeline.pyx): a connection's
requests in flight, in order, and the replies made for the store's Lane."""

from typing import Any, final

from accman.server._wire import Request

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
class Pipeline:
    """The queue of one connection: routes.Slot entries and lane entries."""

    pipeline_max: int
    def __init__(self, conn: Any, routes: Any, lane: Any, stats: LaneStats,
                 tokens_on: bool, pipeline_max: int) -> None: ...
    def __len__(self) -> int: ...
    def __bool__(self) -> bool: ...
    def append(self, obj: Any) -> None: ...
    def __getitem__(self, i: int) -> Any:
        """The Python entry at the head (0) or tail (-1), None for a lane entry."""
    def pop(self) -> Any: ...
    def clear(self) -> None: ...
    def take(self, reqs: list[Request], i: int, stopping: bool) -> int:
        """Takes reqs[i:] through the lane while it can; the index of the
        first request left for the general path."""
    def drain(self, out: list[bytes]) -> int:
        """Appends the ready replies at the head to `out`, in order."""
    def __call__(self, outcome: Any) -> None:
        """A batch its entries waited for is durable (or failed)."""
