"""Check mode's admission until the token's `charge` role is seen: the role
probe (docs/CALLING.md).  `tot` may be read with a token that cannot
charge, and `tot` goes on answering while writes fail: admitted on it,
every request would be served with its charge owed.  So until a write has
been answered (the probe's 409), and again after any charge that may have
landed or was refused because AccMan takes no writes
(policy.writes_failing), admission is a probe.  One probe at a time on an
event loop: the requests that come while it is under way wait for it and
then read their balance, so that a transient failure under load costs one
write, not one per request in flight."""

from __future__ import annotations

import asyncio
import logging

from accman.calling.owed import fingerprint
from accman.errors import Conflict, Insufficient, NoAccount, UnexpectedReply
from accman.limits import INT64_MAX

log = logging.getLogger("accman.asgi")


class RoleProbe:
    """`seen` is True while admission reads `tot`; `lost()` sends it back
    to the probe."""

    def __init__(self):
        self.seen = False
        self._under_way: asyncio.Task | None = None
        # Counts the losses: a probe answered before a loss that ends after
        # it says nothing of the writes since, and does not set `seen`.
        self._losses = 0

    def lost(self) -> None:
        self.seen = False
        self._losses += 1

    async def admit(self, acc, cred) -> int:
        """The balance of `cred` to admit on, by a probe (one under way on
        this loop, then `tot`, if there is one).  The probe's failure is
        each waiter's, but for an account that does not exist: the prober's,
        so the waiters probe for themselves."""
        task = self._under_way
        if task is not None and not task.done() \
                and task.get_loop() is asyncio.get_running_loop():
            try:
                await asyncio.shield(task)
            except NoAccount:
                pass
            if self.seen:
                return await acc.tot(cred)
        task = asyncio.get_running_loop().create_task(self._probe(acc, cred, self._losses))
        task.add_done_callback(_retrieved)      # a prober cancelled leaves none to read it
        self._under_way = task
        return await asyncio.shield(task)

    async def _probe(self, acc, cred, losses: int) -> int:
        """A charge of 1 with `min` INT64_MAX, which no balance can meet.  A
        token without the role gets its 403 here, before the app works; a
        409 (the account judged, nothing changed) shows the role.  The
        balance: an insufficient's `tot`, or read after an overflow (at
        INT64_MIN, where a charge of 1 leaves the range, with no `tot`)."""
        try:
            tot, seq = await acc.mod(cred, -1, min=INT64_MAX)
        except Conflict as e:
            if losses == self._losses:
                self.seen = True
            return e.tot if isinstance(e, Insufficient) else await acc.tot(cred)
        # Not AccMan, or not keeping the SPEC's `min`: a configuration error.
        log.error("accman: the role probe, a charge of 1 with min %d, was applied to account "
                  "%s (seq %d, balance %d): the url does not name an AccMan that keeps `min`; "
                  "that 1 is owed back", INT64_MAX, fingerprint(cred), seq, tot)
        raise UnexpectedReply(200, "probe_applied", "a charge with min INT64_MAX applied")


def _retrieved(task: asyncio.Task) -> None:
    if not task.cancelled():
        task.exception()
