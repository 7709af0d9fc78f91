"""`within(timeout_s)`: bounds the awaits of a block in time without
losing a cancel.  Every part uses it where it would use
`asyncio.wait_for`, which on Python before 3.12 returns the result of a
call that completes in the same loop step as the waiting task is
cancelled, and so loses the cancel: the task goes on (a client sends
its call as the loop tears down, a deliverer retries instead of
stopping).  tests/test_deadline.py; no module of accman/ calls
`asyncio.wait_for` (tests/test_layout.py).

    async with within(timeout_s):       # None: no bound
        reply = await call()            # asyncio.TimeoutError past the bound

It is `asyncio.timeout` (Python 3.11 and later): it tells its own cancel
from any other by the task's count of cancels asked (`Task.cancelling`),
so it never takes one for the other.  The block's awaits run in the
calling task, not in a task of their own: a cancel of the caller reaches
them as it comes, and leaves the block as `CancelledError`.
"""

from __future__ import annotations

import asyncio

within = asyncio.timeout

__all__ = ["within"]
