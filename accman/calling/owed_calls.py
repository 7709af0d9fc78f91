"""The owed calls themselves (accman.calling.owed queues them): each kind,
what it moves and names in logs, and what one attempt of it does.  A
call is sent again until it lands, so each applies at most once however
often it is sent: a mod with its idempotency key, a settle with the
same `use` (which answers the first reply, SPEC "Holds")."""

from __future__ import annotations

import hashlib
import logging

from accman.errors import HoldEnded, Insufficient, NoAccount, OutcomeUnknown

log = logging.getLogger("accman.asgi")


def fingerprint(cred: str) -> str:
    """How logs name an account: not the credential, which is a bearer
    secret, but 12 hex digits of its SHA-256."""
    return hashlib.sha256(cred.encode()).hexdigest()[:12]


class Item:
    """An owed call: `cred`, `by` (what it moves: < 0 the account owes the
    service, > 0 the service owes the account, 0 nothing is lost if it never
    lands), `what` and `ref` (for logs), `also` (what else to look for
    when its outcome is unknown), `maybe` (an attempt of it may have landed:
    sent, with no reply), `unmoved` (what a stranded one of `by` 0 leaves)
    and `run(acc)`, which returns what it charged the account (0:
    nothing)."""

    __slots__ = ("cred", "by", "what", "maybe")
    also = ""
    unmoved = "nothing is lost: a hold returns by itself at its expiry"

    def __init__(self, cred: str, by: int, what: str):
        self.cred, self.by, self.what = cred, by, what
        self.maybe = False


class Mod(Item):
    """An owed mod, retried with its key until it lands.  `what` names it
    in logs: "charge" or "refund"."""

    __slots__ = ("key",)

    def __init__(self, cred: str, by: int, key: str, what: str):
        super().__init__(cred, by, what)
        self.key = key

    @property
    def ref(self) -> str:
        return f"key {self.key}"

    async def run(self, acc) -> int:
        await acc.mod(self.cred, self.by, key=self.key)
        return max(-self.by, 0)


def charge_key(rid: str) -> str:
    """The key of the mod that charges request `rid`: in check mode, and
    in reserve mode when its hold expired first."""
    return rid + "-c"


# What a request cancelled with a call in flight (the ASGI server shutting
# down, a task group) gives as the cause of what it leaves owed.
CANCELLED = OutcomeUnknown("the request was cancelled while this call was in flight")


class Settle(Item):
    """An owed settle of hold `hold` with `use`.  Repeating it answers the
    first reply, so it needs no key.  If the hold has ended meanwhile, a
    release (use 0) has nothing left to do, and a use is charged as a keyed
    mod instead: the hold expired (the app ran past its ttl, or the settle
    could not land in time) and all of it went back."""

    __slots__ = ("hold", "use", "rid")

    def __init__(self, cred: str, hold: int, use: int, rid: str):
        super().__init__(cred, -use, "settle" if use else "release")
        self.hold, self.use, self.rid = hold, use, rid

    @property
    def ref(self) -> str:
        return f"hold {self.hold}"

    @property
    def also(self) -> str:
        # A use charged as a mod leaves the hold's history with only its
        # expiry: where that charge landed, its key alone shows it.
        if not self.use:
            return ""
        return (f"; had the hold expired first, its use was charged as a mod: look for key "
                f"{charge_key(self.rid)} too")

    async def run(self, acc) -> int:
        try:
            await acc.settle(self.cred, self.hold, self.use)
        except HoldEnded:
            if not self.use:
                return 0            # released already, or expired: nothing is held
            log.warning("accman: hold %d of account %s ended before its settle landed: "
                        "charging %d as a mod, key %s", self.hold, fingerprint(self.cred),
                        self.use, charge_key(self.rid))
            await acc.mod(self.cred, -self.use, key=charge_key(self.rid))
        return self.use


class Unhold(Item):
    """A hold whose outcome is unknown, to be undone: repeating it with its
    key answers whether it applied (the first reply, with its id) or not
    (it applies now, or is refused); a settle with use 0 then releases it.
    Left alone it would return by itself at its expiry; this returns it
    sooner.  A refused repeat holds nothing, but cannot stop an attempt
    still on its way (held by a stalled front-end): that one may apply
    later, and returns at its expiry, never charged."""

    __slots__ = ("amount", "ttl_s", "key")

    def __init__(self, cred: str, amount: int, ttl_s: int, key: str):
        super().__init__(cred, 0, "release")
        self.amount, self.ttl_s, self.key = amount, ttl_s, key

    @property
    def ref(self) -> str:
        return f"key {self.key}"

    async def run(self, acc) -> int:
        try:
            hold, _, _ = await acc.hold(self.cred, -self.amount, self.ttl_s, key=self.key)
        except (Insufficient, NoAccount):
            return 0                # nothing held now (a late attempt returns at its expiry)
        try:
            await acc.settle(self.cred, hold, 0)
        except HoldEnded:
            pass                    # expired already: nothing held
        return 0


class Unsettle(Item):
    """A settle of hold `hold` with `use` that was in flight when its
    request was cancelled, before the response started: the consumer got
    nothing, and should pay nothing.  The service's token cannot give money
    back (a positive mod needs `mint`), so this releases the hold (use 0)
    if the settle did not land, and otherwise finds out that it did: a
    settle with the same `use` answers its first reply once the hold has
    ended, and applies nothing.  Whichever of the two settles lands first
    ends the hold; a landed one is logged as an error naming the amount the
    service owes the account, to give back with a `mint` token."""

    __slots__ = ("hold", "use")

    def __init__(self, cred: str, hold: int, use: int):
        super().__init__(cred, 0, "release")
        self.hold, self.use = hold, use

    @property
    def ref(self) -> str:
        return f"hold {self.hold}"

    @property
    def unmoved(self) -> str:
        # The cancelled settle may have landed: the consumer then paid for
        # a response it did not get, and only the hold's history tells.
        return (f"the hold returns by itself at its expiry, unless the settle with use "
                f"{self.use} in flight when its request was cancelled landed (its end in the "
                f"account's history tells): the service then owes the account {self.use}")

    async def run(self, acc) -> int:
        try:
            await acc.settle(self.cred, self.hold, 0)
            return 0                # released: the cancelled settle never landed
        except HoldEnded:
            pass                    # settled before (by the cancelled call), or expired
        try:
            await acc.settle(self.cred, self.hold, self.use)
        except HoldEnded:
            return 0                # expired: all of it came back
        log.error("accman: hold %d of account %s was settled with use %d by a call in "
                  "flight when its request was cancelled: the consumer paid for a response "
                  "it did not get; the service owes the account %d", self.hold,
                  fingerprint(self.cred), self.use, self.use)
        return self.use


__all__ = ["Item", "Mod", "Settle", "Unhold", "Unsettle", "fingerprint", "charge_key",
           "CANCELLED"]
