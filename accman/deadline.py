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

The block's awaits run in the calling task, not in a task of their own:
a cancel of the caller reaches them as it comes, and leaves the block as
`CancelledError`.

- Python 3.11 and later: `asyncio.timeout`.  It tells its own cancel from
  any other by the task's count of cancels asked (`Task.cancelling`), so
  it never takes one for the other.
- Python 3.10, which has no such count: `TimerWithin`, a timer that
  cancels the task at the deadline, the `CancelledError` leaving the
  block as `asyncio.TimeoutError` once the timer has fired.  Its limit:
  a cancel from elsewhere that reaches the task once the timer has fired
  and before the block has ended (in the loop step in which it fires, or
  later while the block still unwinds: awaits in its cleanup, or a task
  it awaits, cancelled with it, still ending, as Deliverer.stop's saver)
  cannot be told from the timer's, and leaves as the timeout (the
  caller's timeout error, not a cancel); so a loop that cancels a task
  to stop it cancels it again until it ends (accman.server.webhooks,
  STOP_RECANCEL_S).
"""

from __future__ import annotations

import asyncio


class TimerWithin:
    """Python 3.10's `within`: see the module's doc.  One use per
    instance, as `asyncio.timeout`."""

    __slots__ = ("_timeout_s", "_timer", "_expired")

    def __init__(self, timeout_s: float | None):
        self._timeout_s = timeout_s
        self._timer = None
        self._expired = False

    async def __aenter__(self) -> "TimerWithin":
        if self._timeout_s is not None:
            task = asyncio.current_task()
            self._timer = asyncio.get_running_loop().call_later(
                max(self._timeout_s, 0), self._expire, task)
        return self

    def _expire(self, task) -> None:
        self._expired = True
        task.cancel()

    async def __aexit__(self, exc_type, exc, tb) -> bool:
        if self._timer is not None:
            self._timer.cancel()
        if self._expired and exc_type is not None and issubclass(exc_type,
                                                                 asyncio.CancelledError):
            raise asyncio.TimeoutError from exc
        return False


within = getattr(asyncio, "timeout", TimerWithin)

__all__ = ["within", "TimerWithin"]
