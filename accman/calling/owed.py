"""Owed mods: what the middleware must still get into AccMan after the
response went out (a charge or a refund that met a failure, a reservation
whose outcome is unknown), retried in the background with the same
idempotency key, so each applies at most once however often it is sent.

The queue is bounded, and so are the attempts: what cannot land is
**stranded**, logged as an error with the amount, the key and who owes
whom, never dropped silently.  docs/CALLING.md, "Failure behaviour"."""

from __future__ import annotations

import asyncio
import collections
import hashlib
import logging

from accman.errors import AccManError, Insufficient, TransportError, Unavailable

log = logging.getLogger("accman.asgi")

# Mods owed at once.  Beyond the bound a new one is stranded at once rather
# than held in memory without limit.
FOLLOWUPS_MAX = 10_000
# Attempts per owed mod, pausing FOLLOWUP_PAUSE_S doubling up to
# FOLLOWUP_PAUSE_MAX_S (about three minutes in all) before it is stranded.
FOLLOWUP_ATTEMPTS_MAX = 20
FOLLOWUP_PAUSE_S = 0.1
FOLLOWUP_PAUSE_MAX_S = 10.0
# On shutdown, how long owed mods get to land before the rest are stranded.
SHUTDOWN_DRAIN_S = 5.0


def fingerprint(cred: str) -> str:
    """How logs name an account: not the credential, which is a bearer
    secret, but 12 hex digits of its SHA-256."""
    return hashlib.sha256(cred.encode()).hexdigest()[:12]


class Mod:
    """An owed mod, retried with its key until it lands.  `what` names it
    in logs: "charge", "refund" or "release"."""

    __slots__ = ("cred", "by", "key", "what")

    def __init__(self, cred: str, by: int, key: str, what: str):
        self.cred, self.by, self.key, self.what = cred, by, key, what

    async def run(self, acc) -> None:
        await acc.mod(self.cred, self.by, key=self.key)


class Unreserve:
    """A reservation whose outcome is unknown, to be undone: repeating it
    with its key answers whether it applied (the original 200) or not
    (insufficient, or it applies now); either way the release then makes
    the net change zero."""

    __slots__ = ("cred", "amount", "rid", "key", "by", "what")

    def __init__(self, cred: str, amount: int, rid: str):
        self.cred, self.amount, self.rid = cred, amount, rid
        self.key, self.by, self.what = rid + "-s", amount, "release"

    async def run(self, acc) -> None:
        try:
            await acc.mod(self.cred, -self.amount, min=0, key=self.rid + "-r")
        except Insufficient:
            return              # it never applied and now cannot: nothing held
        await acc.mod(self.cred, self.amount, key=self.key)


class Owed:
    """The queue of owed mods and the task that pays them, oldest first.

    `acc()` gives the client to pay with; `stats` is the middleware's
    counters ("owed", "stranded"); `unpaid(cred, amount, why)` records a
    stranded charge as unpaid."""

    def __init__(self, acc, stats: dict, unpaid):
        self._acc = acc
        self._stats = stats
        self._unpaid = unpaid
        self._items = collections.deque()
        self._task = None

    def __len__(self) -> int:
        return len(self._items)

    def add(self, item, cause) -> None:
        """`item` (a Mod or an Unreserve) must still land; `cause` is the
        error that kept it from landing now."""
        code = getattr(cause, "code", type(cause).__name__)
        if len(self._items) >= FOLLOWUPS_MAX:
            self._strand(item, "FOLLOWUPS_MAX owed mods already queued")
            return
        self._stats["owed"] += 1
        log.info("accman: %s of %d for account %s queued (after %s), key %s",
                 item.what, abs(item.by), fingerprint(item.cred), code, item.key)
        self._items.append(item)
        if self._task is None or self._task.done():
            self._task = asyncio.get_running_loop().create_task(self._pay())

    async def _pay(self) -> None:
        acc = self._acc()
        attempt = 0
        while self._items:
            item = self._items[0]
            try:
                await item.run(acc)
            except (TransportError, Unavailable) as e:
                attempt += 1
                if attempt < FOLLOWUP_ATTEMPTS_MAX:
                    await asyncio.sleep(_pause_s(attempt))
                    continue
                self._strand(item, f"still {e.code} after {attempt} attempts")
            except AccManError as e:
                self._strand(item, e.code)
            self._items.popleft()
            attempt = 0

    def _strand(self, item, why: str) -> None:
        self._stats["stranded"] += 1
        owed_by = "the account owes" if item.by < 0 else "the service owes the account"
        log.error("accman: stranded %s: %s %d (account %s, key %s): %s",
                  item.what, owed_by, abs(item.by), fingerprint(item.cred), item.key, why)
        if item.by < 0:
            self._unpaid(item.cred, -item.by, why)

    async def drain(self, timeout_s: float | None = None) -> bool:
        """Wait until every owed mod has landed or been stranded; False if
        `timeout_s` passed first."""
        task = self._task
        if task is None or task.done():
            return True
        try:
            await asyncio.wait_for(asyncio.shield(task), timeout_s)
        except asyncio.TimeoutError:
            return False
        return True

    async def close(self) -> None:
        """Let owed mods land (SHUTDOWN_DRAIN_S at most), strand the rest."""
        if not await self.drain(SHUTDOWN_DRAIN_S):
            self._task.cancel()
            while self._items:
                self._strand(self._items.popleft(), "shutting down")


def _pause_s(attempt: int) -> float:
    return min(FOLLOWUP_PAUSE_S * 2 ** (attempt - 1), FOLLOWUP_PAUSE_MAX_S)


__all__ = ["Owed", "Mod", "Unreserve", "fingerprint", "FOLLOWUPS_MAX", "FOLLOWUP_ATTEMPTS_MAX",
           "FOLLOWUP_PAUSE_S", "FOLLOWUP_PAUSE_MAX_S", "SHUTDOWN_DRAIN_S"]
