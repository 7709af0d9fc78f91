"""Owed calls: what the middleware must still get into AccMan after the
response went out (a charge or a settle that met a failure, a hold whose
outcome is unknown), retried in the background so that each applies at
most once however often it is sent: a mod with its idempotency key, a
settle with the same `use` (which answers the first reply, SPEC "Holds").

The queue is bounded, and so are the attempts: what cannot land is
**stranded**, logged as an error with the amount, the key or hold and who
owes whom, never dropped silently.  docs/CALLING.md, "Failure
behaviour".  Each kind of owed call is in accman.calling.owed_calls."""

from __future__ import annotations

import asyncio
import atexit
import collections
import logging
import os
import threading
import weakref

from accman.calling.owed_calls import (CANCELLED, Mod, Settle, Unhold, Unsettle, charge_key,
                                       fingerprint)
from accman.calling.policy import definite, may_have_landed
from accman.deadline import within
from accman.errors import AccManError, TransportError, Unavailable

log = logging.getLogger("accman.asgi")

# Mods owed at once.  Beyond the bound a new one is stranded at once rather
# than held in memory without limit.
FOLLOWUPS_MAX = 10_000
# Attempts per owed mod, pausing FOLLOWUP_PAUSE_S doubling up to
# FOLLOWUP_PAUSE_MAX_S (over two minutes of pauses in all) before it is stranded.
FOLLOWUP_ATTEMPTS_MAX = 20
FOLLOWUP_PAUSE_S = 0.1
FOLLOWUP_PAUSE_MAX_S = 10.0
# On shutdown, how long owed mods get to land before the rest are stranded.
SHUTDOWN_DRAIN_S = 5.0
# Then how long the call under way may still take to end: cut off, nobody
# would know whether it landed.  Past this bound it is cut off all the same,
# and stranded as of unknown outcome.
SHUTDOWN_LAST_CALL_S = 10.0


class Owed:
    """The queue of owed mods and the task that pays them, oldest first.

    `acc()` gives the client to pay with; `stats` is the middleware's
    counters ("owed", "stranded"); `charged(amount)` counts a charge or
    settle that landed late, `unpaid(cred, amount, why)` one stranded."""

    def __init__(self, acc, stats: dict, charged, unpaid):
        self._acc = acc
        self._stats = stats
        self._charged = charged
        self._unpaid = unpaid
        self._items = collections.deque()
        # Held while the queue's calls are added or taken off: close() on the
        # loop's thread and the process's end on the main thread may strand
        # the same queue (a server's loop in a daemon thread).
        self._lock = threading.Lock()
        self._task = None
        self._closing = None            # while close() cuts off: done once it has stranded
        self._cut = None                # a drain()'s: done once a close() has stranded
        self._wake = None               # set to cut a pause short when closing
        self._running = None            # the item whose call is under way
        _alive.add(self)

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item, cause) -> None:
        """`item` (an Item: Mod, Settle, Unhold, Unsettle) must still land;
        `cause` is the error that kept it from landing now."""
        code = getattr(cause, "code", type(cause).__name__)
        item.maybe = may_have_landed(cause)
        if len(self._items) >= FOLLOWUPS_MAX:
            self._strand(item, "FOLLOWUPS_MAX owed mods already queued", item.maybe)
            return
        self._stats["owed"] += 1
        log.warning("accman: %s of %d for account %s queued (after %s), %s",
                    item.what, abs(item.by), fingerprint(item.cred), code, item.ref)
        with self._lock:
            self._items.append(item)
        self._paying()

    def _paying(self) -> None:
        """Starts a task to pay the queue unless one is under way.  One
        of another event loop pays nothing more: asyncio.run leaves
        unfinished a task made while it cancels the others, never done,
        and a loop stopped without closing it runs it no more.  Its queue
        is paid under the loop running now, the call it had under way
        sent again (with its key: applied at most once) and, as it may
        have landed, never billed if it is stranded."""
        task = self._task
        loop = asyncio.get_running_loop()
        if task is None or task.done() or task.get_loop() is not loop:
            if task is not None and not task.done() and self._running is not None:
                self._running.maybe = True  # sent by the old payer, maybe: never billed
            self._wake = asyncio.Event()    # close() may set it before the payer's first step
            self._task = loop.create_task(self._pay())
            self._task.add_done_callback(self._ended)

    def _ended(self, task) -> None:
        """Strands what is left once the task that pays the queue has been
        cancelled other than by close() (which strands what is left
        itself), as when the event loop ends with calls still owed:
        asyncio.run cancels every task left, one not started yet among
        them (a call that failed as the shutdown closed the client is owed
        after the drain); or once it has died of a BaseException other
        than a cancel (an Exception, a defect, _pay meets where it is
        raised).  A call cut off under way is of unknown outcome: _attempt
        marks it; one that a payer of a loop stopped unclosed had under
        way, which that payer never marks, is still `_running` when its
        replacement is cancelled before its first step.  Left in the queue,
        it would end with the loop, neither paid nor stranded, and nothing
        would say so.  A callback, not the task's own code, which a task
        cancelled before its first step never runs; a task a newer one
        replaced leaves it the queue."""
        if task is not self._task:
            if not task.cancelled() and task.exception() is not None:
                # A payer let go (close() stranded its call) that died after.
                log.error("accman: an owed calls' payer let go failed",
                          exc_info=task.exception())
            return
        if task.cancelled():
            why = "cancelled with the event loop"
        elif task.exception() is not None:
            why = f"its payer failed: {task.exception()!r}"
            log.error("accman: the owed calls' payer failed", exc_info=task.exception())
        else:
            return
        self._strand_all(why, self._running)

    def left_at_exit(self) -> None:
        """At the process's end: what is still queued is stranded, the call
        under way as of unknown outcome.  The event loop that would pay it
        is gone: asyncio.run cancels the tasks it finds as it ends, not one
        made meanwhile (a call owed by a task it cancelled), which is left
        unfinished with the loop.  While the payer's loop still runs (in
        another thread) nothing is taken from under it, nor billed: each
        call is said as of unknown outcome.  Whether a payer is alive and
        what is taken are seen under the lock at once, for each batch: a
        payer that loop starts meanwhile is set before its first step,
        so either it is seen alive or its queue was taken before it sent."""
        while True:
            with self._lock:
                task = self._task
                alive = (task is not None and not task.done()
                         and task.get_loop().is_running())
                if alive:
                    items = list(self._items)
                else:
                    items, self._items = self._items, collections.deque()
                running = self._running
            if alive:
                break
            if not items:
                return
            for item in items:
                self._strand(item, "the event loop ended with it owed",
                             item.maybe or item is running)
        for item in items:
            log.error("accman: %s of %d still owed as the process ends, its event loop "
                      "still running: outcome unknown: look for %s in the history of "
                      "account %s%s", item.what, abs(item.by), item.ref,
                      fingerprint(item.cred), item.also)

    async def _pay(self) -> None:
        """Pays the queue (_pay_as).  A defect (an error no AccMan call
        raises) is met where it is raised: the queue's payer strands what
        it held in that same step, the call under way of unknown outcome
        (_attempt marks it), and ends.  Left to its done callback, the
        queue would stay as it was until that ran, and an add() or drain()
        meanwhile would start a payer that sends the failed call again."""
        me = asyncio.current_task()
        try:
            await self._pay_as(me)
        except Exception as e:
            if self._task is not me:
                log.error("accman: an owed calls' payer let go failed", exc_info=e)
                return
            log.error("accman: the owed calls' payer failed", exc_info=e)
            self._strand_all(f"its payer failed: {e!r}", self._running)

    async def _pay_as(self, me) -> None:
        """Pays the queue, oldest first, while `me` is the queue's payer: one
        close() let go (its cancel swallowed by a call) leaves the queue, and the call
        it had under way, which close() has stranded, to the new one."""
        acc = self._acc()
        attempt = 0
        while self._items and not self._cutting() and self._task is me:
            item = self._items[0]
            self._running = item
            try:
                attempt = await self._attempt(item, acc, attempt, me)
            finally:
                if self._task is me and self._running is item:
                    self._running = None
            if self._task is not me:
                return                        # let go: the queue is the new payer's
            if attempt:
                continue                      # tried again, unless closing
            with self._lock:
                if self._items and self._items[0] is item:     # not stranded meanwhile
                    self._items.popleft()

    async def _attempt(self, item, acc, attempt: int, me) -> int:
        """One attempt of `item` by the payer `me`: 0 once it has landed or
        been stranded, else the attempts made so far (paused before the
        next).  What a payer no longer the queue's meets is not its to say."""
        try:
            charged = await item.run(acc)
        except (TransportError, Unavailable) as e:
            attempt += 1
            item.maybe = item.maybe or may_have_landed(e)
            if self._cutting() or self._task is not me:
                return attempt          # close() strands it (or has)
            if attempt < FOLLOWUP_ATTEMPTS_MAX:
                self._running = None    # no call under way while it pauses
                await self._pause(_pause_s(attempt))
                return attempt
            self._strand(item, f"still {e.code} after {attempt} attempts", item.maybe)
            return 0
        except AccManError as e:
            # Only a SPEC refusal that every attempt meets, whenever it
            # arrives, says that no earlier attempt landed (policy.definite).
            if self._task is me:
                self._strand(item, e.code, item.maybe and not definite(e))
            return 0
        except BaseException:
            item.maybe = True           # cut off under way, or failed: it may have landed
            raise
        if charged and self._task is me:
            self._charged(charged)
        return 0

    async def _pause(self, seconds: float) -> None:
        try:
            async with within(seconds):
                await self._wake.wait()
        except asyncio.TimeoutError:
            pass

    def _strand_all(self, why: str, running=None) -> None:
        """Strands every call queued, `running` (the call under way, if
        any) and those whose attempts may have landed as of unknown
        outcome, and any that a stranding adds (an on_unpaid that owes
        again).  Each batch is taken off the queue at once, under the lock:
        whichever of two threads takes a call strands it, once."""
        while True:
            with self._lock:
                items, self._items = self._items, collections.deque()
            if not items:
                return
            for item in items:
                self._strand(item, why, item.maybe or item is running)

    def _strand(self, item, why: str, unknown: bool = False) -> None:
        """Logs `item` as stranded, and an amount the account owes as unpaid
        unless an attempt of it may have landed (`unknown`): billed later,
        it could be billed twice, so the log says where to look."""
        self._stats["stranded"] += 1
        if unknown and item.by:
            log.error("accman: stranded %s of %d, outcome unknown: look for %s in the history "
                      "of account %s before settling it (%s)%s", item.what, abs(item.by),
                      item.ref, fingerprint(item.cred), why, item.also)
            return
        if item.by < 0:
            owed_by = f"the account owes {-item.by}"
        elif item.by > 0:
            owed_by = f"the service owes the account {item.by}"
        else:
            owed_by = item.unmoved
        log.error("accman: stranded %s: %s (account %s, %s): %s",
                  item.what, owed_by, fingerprint(item.cred), item.ref, why)
        if item.by < 0:
            self._unpaid(item.cred, -item.by, why)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every owed mod has landed or been stranded (by a
        close() under way too, which it waits for); False if `timeout_s`
        passed first.  It waits on the payer without taking its outcome:
        the cancel of a payer close() cuts off, or a payer's defect (said
        where it happened), is not the waiter's to raise.  Nor does it wait
        for a payer close() lets go (its cancel lost), which may go on
        after close() has stranded its call: `_cut` ends the wait then."""
        loop = asyncio.get_running_loop()
        end = None if timeout_s is None else loop.time() + timeout_s
        while True:
            cutting = self._cutting()
            if self._items and not cutting:
                self._paying()      # not a task of another loop
            waited = self._closing if cutting else self._task
            if waited is None or waited.done() or waited.get_loop() is not loop:
                return True         # nothing owed: another loop's payer has nothing to pay
            if self._cut is None or self._cut.get_loop() is not loop:
                self._cut = loop.create_future()
            left_s = None if end is None else max(end - loop.time(), 0)
            done, _ = await asyncio.wait({waited, self._cut}, timeout=left_s,
                                         return_when=asyncio.FIRST_COMPLETED)
            if not done:
                return False

    async def close(self) -> None:
        """Let owed mods land (SHUTDOWN_DRAIN_S at most), strand the rest.
        The call under way when the time is up gets SHUTDOWN_LAST_CALL_S
        more to end, and nothing new starts.  Whatever is left, even when
        close itself is cancelled, is stranded: the first item as of
        unknown outcome if its last attempt may have landed; unless a payer
        of another loop has it (this loop stopped unclosed, then went on).
        A drain() or a close() waiting meanwhile ends once it has."""
        try:
            if await self.drain(SHUTDOWN_DRAIN_S):
                return
            if not self._cutting():
                self._closing = asyncio.get_running_loop().create_future()
            self._wake.set()
            task = self._task
            if task is not None and not task.done():
                await asyncio.wait({task}, timeout=SHUTDOWN_LAST_CALL_S)
        finally:
            self._end()

    def _cutting(self) -> bool:
        """Whether a close() under way cuts the payer off: one of the
        running loop.  One that a loop stopped unclosed left unfinished
        cuts nothing under the next loop, whose payer pays the queue."""
        closing = self._closing
        return closing is not None and closing.get_loop() is asyncio.get_running_loop()

    def forget(self) -> None:
        """In a forked child: what the copy holds is its parent's to pay
        and say; what the child owes from now on is its own."""
        self._items = collections.deque()
        self._lock = threading.Lock()       # the parent's may be held by a thread not copied
        self._task = self._wake = self._running = self._closing = self._cut = None

    def _end(self) -> None:
        # The task cut off is no longer the payer: a call owed before it
        # has ended gets a new one (the queue works after close), and what
        # it strands below is not stranded again as cancelled with the loop.
        # A close() a loop stopped unclosed left unfinished, ending later
        # (its leftover tasks cancelled), leaves a payer of another loop,
        # and a close() there, be: the queue is theirs to pay or strand.
        loop = asyncio.get_running_loop()
        task = self._task
        own = task is None or task.done() or task.get_loop() is loop
        if own:
            self._task = None
            if task is not None and not task.done():
                task.cancel()
            self._strand_all("shutting down", self._running)
            self._running = None
        for name in ("_closing", "_cut"):           # the waiters of a close() under way end
            ends = getattr(self, name)
            if ends is None or not (own or ends.get_loop() is loop):
                continue
            if not ends.done() and not ends.get_loop().is_closed():
                ends.set_result(None)
            setattr(self, name, None)


def _pause_s(attempt: int) -> float:
    return min(FOLLOWUP_PAUSE_S * 2 ** (attempt - 1), FOLLOWUP_PAUSE_MAX_S)


# Every queue alive, told at the process's end what the event loop left
# (Owed.left_at_exit); then the billers, whose calls the strandings may add to.
_alive = weakref.WeakSet()


def _forked() -> None:
    for owed in list(_alive):
        owed.forget()


# A child forked from a process with calls owed (a server's worker forked
# from the parent that made the app) starts with none of its own; billing.py
# does the same for its calls under way.
if hasattr(os, "register_at_fork"):     # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_forked)


@atexit.register
def _at_exit() -> None:
    from accman.calling.billing import left_at_exit_all
    for owed in list(_alive):
        owed.left_at_exit()
    left_at_exit_all()


__all__ = ["Owed", "Mod", "Settle", "Unhold", "Unsettle", "fingerprint",
           "charge_key", "CANCELLED",
           "FOLLOWUPS_MAX", "FOLLOWUP_ATTEMPTS_MAX", "FOLLOWUP_PAUSE_S", "FOLLOWUP_PAUSE_MAX_S",
           "SHUTDOWN_DRAIN_S", "SHUTDOWN_LAST_CALL_S"]
