"""The middleware's reserve mode (accman.calling.asgi): one request between
its hold and its settle, on AccMan's holds (SPEC "Holds").

    before the app       PATCH /hold?cred=C&by=-estimate&ttl=hold_ttl_s&key=ID-h
    response starts      PATCH /settle?cred=C&hold=H&use=min(cost, estimate)
    the app raised, the  PATCH /settle?cred=C&hold=H&use=0, at once, in the
    consumer left, or    background
    no response came
    cancelled while the  owed: the hold repeated by its key, then released;
    hold or the settle   the hold released if the settle had not landed (a
    was in flight        landed one is logged: the service owes its use)

A hold that is never settled (the service crashed or lost AccMan) ends by
itself after hold_ttl_s, all of it returned: no reservation leaks.  A
settle is idempotent (the same `use` answers the first reply), so one that
fails is owed and retried (accman.calling.owed); one that meets
`hold_ended` because the hold expired first (the app ran past
hold_ttl_s) is charged as a keyed mod instead, and logged.  A consumer
that goes away before the response starts releases the hold at once
(accman.calling.disconnect)."""

from __future__ import annotations

import asyncio
import logging
from typing import Callable, NamedTuple

from accman.calling.answers import with_tot
from accman.calling.disconnect import DisconnectWatch
from accman.calling.owed import CANCELLED, Owed, Settle, Unsettle, charge_key, fingerprint
from accman.calling.repeats import Repeats
from accman.errors import AccManError, HoldEnded, Insufficient, NotApplied, Overflow

log = logging.getLogger("accman.asgi")


class Meter(NamedTuple):
    """What a Reservation uses of the middleware that admits it
    (accman.calling.asgi makes one), and nothing else of it."""

    header: bytes                   # the response header the balance goes in
    stats: dict                     # the middleware's counters
    owed: Owed                      # calls that must still land
    cost_of_response: Callable      # (price, scope, response start) -> the charge
    charge: Callable                # async (acc, cred, cost, key) -> tot, None when owed
    charged: Callable               # (cost): counted as charged
    spawn: Callable                 # (coro) -> a task the middleware waits for at shutdown
    repeats: Repeats                # the log lines every request may meet


class Reservation:
    """A reserve-mode request: `hold` is its hold's id (None when the
    estimate is 0 and nothing is held), `tot` the balance seen at
    admission, `ended` true once it is settled or released."""

    __slots__ = ("meter", "acc", "scope", "cred", "price", "rid", "est", "ttl_s", "hold", "tot",
                 "ended", "watch", "held_at", "unheld")

    def __init__(self, meter: Meter, acc, scope, cred, price, rid, est, receive):
        self.meter, self.acc, self.scope, self.cred, self.price = meter, acc, scope, cred, price
        self.rid, self.est = rid, est
        self.ttl_s = self.hold = self.tot = self.held_at = None
        self.ended = False
        self.unheld = False             # the hold is known never to have applied
        self.watch = DisconnectWatch(receive, self.release, scope)

    @property
    def hold_key(self) -> str:
        return self.rid + "-h"

    async def admit(self, ttl_s: int) -> None:
        """Holds the estimate; raises the AccManError that refuses the
        request (NoAccount, Insufficient, TooManyHolds, an outage)."""
        self.ttl_s = ttl_s
        if not self.est:
            # Nothing to hold: the balance is checked as check mode checks
            # it, so that an overdrawn one covers no estimate, 0 included.
            self.tot = await self.acc.tot(self.cred)
            if self.tot < 0:
                raise Insufficient(self.tot)
            return
        try:
            self.hold, self.tot, _ = await self.acc.hold(self.cred, -self.est, ttl_s,
                                                         key=self.hold_key)
        except Overflow:
            # Only a balance so far below 0 that the hold would leave the
            # signed 64-bit range (AccMan's 409 overflow has no `tot`): no
            # hold is made, and the estimate is not covered.
            self.unheld = True
            try:
                tot = await self.acc.tot(self.cred)
            except AccManError as e:
                raise NotApplied(f"the hold met 409 overflow, and the balance could not be "
                                 f"read: {e.detail}") from e
            raise Insufficient(tot) from None
        self.held_at = asyncio.get_running_loop().time()

    def sender(self, send):
        async def send_(message):
            if message["type"] == "http.response.start":
                message = await self.settle(message)
            await send(message)
        return send_

    async def settle(self, message):
        """Settles the hold with the response's cost, capped at the hold;
        the response start with the balance header."""
        meter = self.meter
        if await self.watch.gone_by_now() or self.ended:
            return message              # released: the consumer went away
        # A cost function that raises is a bug in the service: the caller
        # releases the hold, since `ended` is still false.
        cost = meter.cost_of_response(self.price, self.scope, message)
        self.ended = True
        if cost > self.est:
            # A cost function whose charge passes its estimate does so on
            # every request of its kind: said as the lines every refused
            # request meets are, known by the text alone.
            meter.stats["capped"] += 1
            meter.repeats.say(logging.WARNING, "accman: cost over the hold: charged the hold",
                              note=f"cost {cost}, hold {self.est}")
            cost = self.est
        if self.hold is None:
            return with_tot(message, meter.header, self.tot)   # nothing held, nothing charged
        if not cost:
            meter.stats["released"] += 1
        ran_s = asyncio.get_running_loop().time() - self.held_at
        try:
            return with_tot(message, meter.header, await self._settle(cost, ran_s))
        except asyncio.CancelledError:
            # The settle may have landed, and the response is not sent.
            meter.owed.add(Unsettle(self.cred, self.hold, cost), CANCELLED)
            raise

    async def _settle(self, use: int, ran_s: float):
        """The settle of a response that started `ran_s` after its hold."""
        meter = self.meter
        try:
            tot, _ = await self.acc.settle(self.cred, self.hold, use)
        except HoldEnded:
            if not use:
                return None             # expired: all of it came back already
            meter.stats["expired"] += 1
            key = charge_key(self.rid)
            # Said as it happened: raising hold_ttl_s helps a slow app, not
            # an AccMan that answered the settle past the ttl (stalled, or
            # restarting), which no ttl bounds.
            if ran_s >= self.ttl_s:
                why = f"expired before the response (the app ran past hold_ttl_s={self.ttl_s} s)"
            else:
                why = (f"expired before its settle landed (the response started {ran_s:.1f} s "
                       f"after the hold, within hold_ttl_s={self.ttl_s} s: AccMan answered the "
                       f"settle late)")
            log.warning("accman: hold %d of account %s %s: charging %d as a mod, key %s",
                        self.hold, fingerprint(self.cred), why, use, key)
            return await meter.charge(self.acc, self.cred, use, key)
        except AccManError as e:
            meter.owed.add(Settle(self.cred, self.hold, use, self.rid), e)
            return None
        meter.charged(use)
        return tot

    def release(self) -> None:
        """Ends the hold with use 0 at once, in the background (the app's
        exception goes on to the server, the disconnect is not delayed);
        owed if AccMan cannot take it now."""
        if self.ended:
            return
        self.ended = True
        if self.hold is not None:
            self.meter.stats["released"] += 1
            self.meter.spawn(self._release())

    async def _release(self) -> None:
        try:
            await self.acc.settle(self.cred, self.hold, 0)
        except HoldEnded:
            pass                        # expired: nothing is held
        except AccManError as e:
            self.meter.owed.add(Settle(self.cred, self.hold, 0, self.rid), e)


__all__ = ["Meter", "Reservation"]
