"""The embedded ledger's clock, each reading checked before it is used."""

from __future__ import annotations

import time

from accman.limits import CLOCK_MS_MAX


def checked_clock(clock_ms):
    """`clock_ms`, each reading checked (CLOCK_MS_MAX): a wrong one, or a
    clock that raises, is a ValueError naming it, raised before anything
    is applied."""
    def read() -> int:
        try:
            ms = clock_ms()
        except Exception as e:
            raise ValueError(f"clock_ms raised {type(e).__name__}: {e}") from e
        if type(ms) is not int or not 0 <= ms <= CLOCK_MS_MAX:
            raise ValueError(f"clock_ms returned {ms!r:.80}: a clock must return an int of "
                             f"unix milliseconds from 0 to {CLOCK_MS_MAX}")
        return ms
    return read


def wall_ms() -> int:
    """Unix milliseconds: the ledger's clock unless a test gives its own."""
    return time.time_ns() // 1_000_000
