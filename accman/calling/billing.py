"""The middleware's calls of its `on_unpaid` biller (docs/CALLING.md,
"Failure behaviour"): a plain function is called at once; an async one
runs as a task awaited at shutdown.  Any call that fails, is cut off, or
is left unfinished by the event loop's end is logged as an error with
the account and the amount, never dropped unsaid."""

from __future__ import annotations

import asyncio
import inspect
import logging
import os
import weakref

from accman.calling.owed import fingerprint

log = logging.getLogger("accman.asgi")


class Billing:
    """A middleware's biller and its async calls under way (`tasks`, each
    with its account and amount), awaited at shutdown."""

    def __init__(self, on_unpaid):
        self._on_unpaid = on_unpaid
        self.tasks = {}
        _alive.add(self)

    def __call__(self, cred: str, amount: int) -> None:
        try:
            told = self._on_unpaid(cred, amount)
        except Exception:
            log.exception("accman: on_unpaid of %d (account %s) failed", amount,
                          fingerprint(cred))
            return
        if not inspect.isawaitable(told):
            return
        try:
            task = asyncio.get_running_loop().create_task(billed(told, cred, amount))
        except RuntimeError:                # no event loop: the process is ending
            if inspect.iscoroutine(told):
                told.close()
            log.error("accman: on_unpaid of %d (account %s) not run: the event loop has "
                      "ended: not billed", amount, fingerprint(cred))
            return
        self.tasks[task] = (cred, amount)
        task.add_done_callback(self.tasks.pop)

    def left_at_exit(self) -> None:
        """At the process's end, each call not ended is said: one whose
        loop has closed (asyncio.run does not cancel a task made while it
        cancels the others), or whose loop still runs in another thread."""
        for task, (cred, amount) in list(self.tasks.items()):
            if not task.done():
                why = ("is still under way as the process ends" if task.get_loop().is_running()
                       else "did not end before the event loop did")
                log.error("accman: on_unpaid of %d (account %s) %s: it may not have billed",
                          amount, fingerprint(cred), why)


async def billed(told, cred: str, amount: int) -> None:
    """An async on_unpaid's call, run to its end; its failure, or its cut
    at shutdown, logged with the account and the amount not billed."""
    try:
        await told
    except asyncio.CancelledError:
        log.error("accman: on_unpaid of %d (account %s) was cut off at shutdown: not billed",
                  amount, fingerprint(cred))
        raise
    except Exception:
        log.exception("accman: on_unpaid of %d (account %s) failed", amount, fingerprint(cred))


# Every biller alive, told at the process's end what is left unfinished
# (owed.py's hook calls left_at_exit_all after its queues' strandings,
# whose on_unpaid calls it may add to).
_alive = weakref.WeakSet()


def left_at_exit_all() -> None:
    for billing in list(_alive):
        billing.left_at_exit()


def forget_all() -> None:
    """In a forked child: the calls under way are its parent's to say."""
    for billing in list(_alive):
        billing.tasks.clear()


if hasattr(os, "register_at_fork"):     # not on Windows, which does not fork
    os.register_at_fork(after_in_child=forget_all)


__all__ = ["Billing", "billed", "left_at_exit_all", "forget_all"]
