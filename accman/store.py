"""The store interface: what the server asks of the store that keeps the
accounts, whichever store it is.

Two stores keep it: the embedded ledger (accman.ledger.Ledger: LevelDB on
this machine, the default) and PostgreSQL (accman.postgres, for more than
one machine).  The server knows only this interface.

Calls and outcomes
------------------
Every call that reads or changes accounts takes `done`, a callable of one
argument, and returns either its outcome at once or None.  When it returns
None, `done(outcome)` is called later on the loop given to `bind_loop`
(through its `deliver`), once the outcome is final and everything it shows
is durable.  A store may also return None and call `done` for an outcome
it knew at once, even before it returns.  An outcome is the call's value
(below) or an AccManError instance.  A call raises only BadRequest,
Unavailable or Busy, and only when it changed nothing and queued nothing;
a `done` that may be called later (a change's, an ordered read's, a long
poll's) that is neither callable nor None, or is an async function, is
TypeError (check_done), and None tells nobody.

Order (SPEC "Durability and order", and pipelined requests): calls apply in
the order they are made.  A read made with `ordered=True` sees the effect
of every call made before it, and of none made after it; the server asks
for that when the read is pipelined behind writes of its connection that
are not yet answered.  A read with `ordered=False` sees durable state only,
of any moment between its call and its outcome.

Values
------
    read_tot         tot: int                       NoAccount
    read_past        Page                           NoAccount
    submit (a mod)   (tot, seq)                     Insufficient, KeyReused,
                                                    Overflow, NoAccount
    submit_hold      (hold, tot, seq)               as a mod, and TooManyHolds
    submit_settle    (tot, seq)                     NoHold, HoldEnded,
                                                    BadRequest (use over the hold)
    read_events      (events, next)                 EventsTrimmed

`events` is a list of accman.records.Event, oldest first, and `next` the
`after` of the next call.

`Page` is (account, entries, next): the account's public id, the history
entries (accman.records.Entry) newest first, and the `before` of the next
page or None.

A store may also have a `lane` (the embedded ledger has one: an
accman.ledger._ledger.Lane): the same mods and /tot reads as `submit` and
`read_tot`, with the same outcomes, order and durability, called from the
server's compiled code (ext/pipeline.pyx) without a Python call, an
outcome object or a callback per request.  A store without one (PostgreSQL)
is called through the methods below alone.

A store that keeps no cursors of its own has `keep_events_after(id)`: the
events after `id` are kept past the retention (the webhook's saved cursor,
accman.server.webhooks).  One that keeps them (PostgreSQL's `cursors`)
keeps the events after each cursor by itself.
"""

from __future__ import annotations

import asyncio
import logging
import re
from functools import partial
from inspect import CO_ASYNC_GENERATOR, CO_COROUTINE
from types import FunctionType, MethodType
from typing import Any, Callable, NamedTuple, Protocol

from accman.errors import BadRequest
from accman.limits import (BATCH_MODS_MAX, CRED_CHARS_MAX, EVENTS_LIMIT_MAX,
                           EVENTS_RETENTION_S_API_MIN, EVENTS_RETENTION_S_MAX, EVENTS_WAIT_S_MAX,
                           HOLD_TTL_S_MAX, HOLDS_MAX, HOLDS_PER_ACCOUNT_MAX, INT64_MAX, INT64_MIN,
                           KEY_CHARS_MAX, PAST_LIMIT_MAX, QUEUED_MODS_MAX)
from accman.records import Entry

log = logging.getLogger("accman.store")

_CRED = re.compile(r"[A-Za-z0-9_-]{1,%d}\Z" % CRED_CHARS_MAX, re.ASCII)
_KEY = re.compile(r"[A-Za-z0-9_-]{1,%d}\Z" % KEY_CHARS_MAX, re.ASCII)

Done = Callable[[Any], None]


class Page(NamedTuple):
    """One page of an account's history (GET /past)."""

    account: str            # the account's public id (SPEC "Events")
    entries: list[Entry]    # newest first
    next: int | None        # the `before` of the next page, None at the end


def run_callbacks(pairs: list, catching: type = Exception) -> None:
    """Tells each `done` its outcome: a store's `deliver` when the server
    gave it none.  One caller's broken callback must not keep the others
    from hearing theirs.  `catching` is BaseException on a store's own
    thread, which no callback may end (a SystemExit there would end it
    silently, and every later change with it); on a caller's thread (an
    event loop's), a SystemExit or ^C goes on to that caller."""
    for done, outcome in pairs:
        try:
            done(outcome)
        except catching:
            log.exception("a call's completion callback failed")


def page_next(entries: list[Entry], limit: int) -> int | None:
    """The SPEC's `next`: the seq of the oldest entry of a full page, unless
    that entry is the account's first."""
    if entries and len(entries) == limit and entries[-1].seq > 1:
        return entries[-1].seq
    return None


def check_int64(value, name: str) -> None:
    """An integer the Python API takes, held to the wire's signed 64-bit
    range.  bool is an int subclass and float is not an amount: both are
    refused.  ext/ledger.pyx's `_check_int64` says the same words (a test
    holds them equal)."""
    if type(value) is not int:
        raise BadRequest(f"{name} must be an int{_got(value, int)}")
    if not INT64_MIN <= value <= INT64_MAX:
        raise BadRequest(f"{name} must fit in a signed 64-bit integer")


def check_cred(cred) -> None:
    """A credential, as every store checks it (ext/ledger.pyx's
    `_check_cred` says it with name_refused too)."""
    if type(cred) is not str or not _CRED.match(cred):
        raise name_refused("cred", CRED_CHARS_MAX, cred)


def check_key(key) -> None:
    """An idempotency key or None, as every store checks it (ext/ledger.pyx's
    `_key_bytes` says it with name_refused too)."""
    if key is not None and (type(key) is not str or not _KEY.match(key)):
        raise name_refused("key", KEY_CHARS_MAX, key)


def name_refused(what: str, most: int, value) -> BadRequest:
    """The refusal of `value` as a credential or key (`what`, of at most
    `most` characters), in every store's words: a wrong type is named,
    never the value (a credential is a secret, SPEC "Access")."""
    got = "" if type(value) is str else f", got {type(value).__name__}"
    return BadRequest(f"{what} must be a string of 1 to {most} characters from "
                      f"A-Z a-z 0-9 _ -{got}")


def check_mod(by, min_, key, low) -> None:
    """A mod's values, as every store checks them, in the order the
    embedded store does (ext/ledger.pyx, Book.apply)."""
    check_int64(by, "by")
    if by == 0:
        raise BadRequest("by must be non-zero")
    if min_ is not None:
        check_int64(min_, "min")
    if low is not None:
        check_int64(low, "low")
        if by < 0:
            raise BadRequest("low is set by a funding mod only (by > 0)")
    check_key(key)


def check_hold(by, ttl_s, min_) -> None:
    """A hold's values, as every store checks them (its key is the store's
    own check)."""
    check_int64(by, "by")
    if by >= 0:
        raise BadRequest("by must be negative for a hold: the amount it takes")
    if by == INT64_MIN:
        # Its amount, -by, would not fit in a signed 64-bit integer.
        raise BadRequest(f"by must be from {-INT64_MAX} to -1 for a hold: the amount it "
                         "takes is a signed 64-bit integer")
    if type(ttl_s) is not int or not 1 <= ttl_s <= HOLD_TTL_S_MAX:
        raise BadRequest(f"ttl must be a whole number of seconds from 1 to {HOLD_TTL_S_MAX}"
                         f"{_got(ttl_s, int)}")
    if min_ is not None:
        check_int64(min_, "min")


def check_settle(hold, use) -> None:
    """A settle's values, as every store checks them."""
    check_int64(hold, "hold")
    check_int64(use, "use")
    if hold < 1:
        raise BadRequest("hold must be a hold id: a positive int")
    if use < 0:
        raise BadRequest("use must be from 0 to the held amount")


def check_past(limit, before) -> None:
    """A /past read's values, as every store checks them."""
    if type(limit) is not int or not 1 <= limit <= PAST_LIMIT_MAX:
        raise BadRequest(f"limit must be an int from 1 to {PAST_LIMIT_MAX}{_got(limit, int)}")
    if before is not None:
        check_int64(before, "before")
        if before < 1:
            raise BadRequest("before must be a positive int (a seq)")


def check_events(after, limit, wait_s) -> None:
    """An /events read's values, as every store checks them."""
    check_int64(after, "after")
    if after < 0:
        raise BadRequest("after must be an event id: an int, 0 or more")
    if type(limit) is not int or not 1 <= limit <= EVENTS_LIMIT_MAX:
        raise BadRequest(f"limit must be an int from 1 to {EVENTS_LIMIT_MAX}{_got(limit, int)}")
    if type(wait_s) not in (int, float) or not 0 <= wait_s <= EVENTS_WAIT_S_MAX:
        raise BadRequest(f"wait_s must be from 0 to {EVENTS_WAIT_S_MAX} seconds"
                         f"{_got(wait_s, int, float)}")


def _got(value, *types) -> str:
    """", got TYPE" when `value` is none of `types` (a bool is not an int
    here), as the int64 checks say it, an int subclass said as such;
    nothing for a value out of range."""
    if type(value) in types:
        return ""
    subclass = isinstance(value, int) and type(value) is not bool
    return f", got {type(value).__name__}" + (
        " (an int subclass: a plain int is taken)" if subclass else "")


def check_binding(loop, deliver) -> None:
    """bind_loop's values, checked before anything is bound: a loop bound
    that is not one, or a `deliver` that cannot be called, would break
    every later completion (each `done` never told, its caller waiting for
    ever)."""
    if not isinstance(loop, asyncio.AbstractEventLoop):
        raise BadRequest(f"loop must be an asyncio event loop, got {type(loop).__name__}")
    if deliver is not None and not callable(deliver):
        raise BadRequest(f"deliver must be a function taking a list of (done, outcome), "
                         f"or None; got {type(deliver).__name__}")
    _refuse_async(deliver, "deliver", BadRequest)


_ASYNC_FLAGS = CO_COROUTINE | CO_ASYNC_GENERATOR


# The class last found to make plain calls: a store is given the same kind
# of `done` call after call (the server's slots), whose class's `__call__`
# is read once, not on every change.
_plain_kind: type | None = None


def _refuse_async(fn, name: str, error: type) -> None:
    """`error` naming the argument `name` when `fn` is an `async def`
    function or method, whose call only makes a coroutine (or, when it
    yields, an async generator) and runs none of its body: the words say
    which.  A `functools.partial` (which flattens nested ones itself) is
    judged by the function it wraps, and an object by its class's
    `__call__`.  Only flags of code are read, cheap on every change; a
    callable of neither kind (a builtin, a compiled slot) has no code to
    read."""
    global _plain_kind
    kind = type(fn)
    if kind is _plain_kind:
        return
    if kind is partial:
        fn = fn.func
        kind = type(fn)
    if kind is MethodType:
        fn = fn.__func__
    elif kind is not FunctionType and fn is not None:
        call = kind.__call__        # callable (checked before): its type has one
        if type(call) is not FunctionType or not call.__code__.co_flags & _ASYNC_FLAGS:
            _plain_kind = kind
            return
        fn = call
    if type(fn) is FunctionType and fn.__code__.co_flags & _ASYNC_FLAGS:
        made = ("an async generator, which nobody iterates"
                if fn.__code__.co_flags & CO_ASYNC_GENERATOR
                else "a coroutine, which nobody awaits")
        raise error(f"{name} must be a plain function, not an async one (its call only "
                    f"makes {made}): got {fn.__qualname__}")


def check_done(done) -> None:
    """A `done` that may be called later: a callable, or None (nobody is
    told), checked before anything is applied or queued: one that cannot be
    called would fail only once the change is durable (or the read's
    outcome known), and its caller would never hear of it.  So would an
    `async def` one, whose call only makes a coroutine or an async generator
    (_refuse_async)."""
    if done is not None and not callable(done):
        raise TypeError(f"done must be a function taking the outcome, or None; "
                        f"got {type(done).__name__}")
    _refuse_async(done, "done", TypeError)


def told(done):
    """`done` checked (check_done) as a store keeps it to call later: None,
    telling nobody, is a function that does nothing, since a kept `done` is
    called once the outcome is known."""
    check_done(done)
    return nobody if done is None else done


def nobody(outcome) -> None:
    """The `done` of a call whose caller asked to be told nothing."""


# What a store may be opened with: each bound of limits.py may be lowered
# (tests do), never raised past what the rest of AccMan is sized for.
_OPTION_BOUNDS = {
    "batch_mods_max": BATCH_MODS_MAX,
    "queued_mods_max": QUEUED_MODS_MAX,
    "holds_max": HOLDS_MAX,
    "holds_per_account_max": HOLDS_PER_ACCOUNT_MAX,
}


def check_options(*, low_balance, events_retention_s, **bounds) -> None:
    """A store's options, as both stores check them before the store is
    opened or made, so that a wrong one changes nothing: ValueError naming
    the option and what it may be.  `bounds` are the limits above, each an
    int or None (the default)."""
    if low_balance is not None and (type(low_balance) is not int
                                    or not INT64_MIN <= low_balance <= INT64_MAX):
        raise ValueError(f"low_balance must be an int in the signed 64-bit range, "
                         f"got {low_balance!r}")
    if (type(events_retention_s) not in (int, float)
            or not EVENTS_RETENTION_S_API_MIN <= events_retention_s <= EVENTS_RETENTION_S_MAX):
        raise ValueError(f"events_retention_s must be a number of seconds from "
                         f"{EVENTS_RETENTION_S_API_MIN} to {EVENTS_RETENTION_S_MAX}, "
                         f"got {events_retention_s!r}")
    for name, value in bounds.items():
        most = _OPTION_BOUNDS[name]
        if value is not None and (type(value) is not int or not 1 <= value <= most):
            raise ValueError(f"{name} must be an int from 1 to {most}, got {value!r}")


class Store(Protocol):
    """What the server calls.  Calls are made from the bound loop's thread."""

    # True when `tot` answers from memory (the embedded store): the server
    # then answers a /tot in line, with no callback.
    inline_reads: bool

    # The data directory that holds the store's files, or None for a store
    # that keeps none on this machine (PostgreSQL): what the ready line
    # names, and where the webhook's cursor file goes without `cursors`.
    path: str | None

    # The webhook's cursors when the store keeps them, shared by its
    # front-ends (PostgreSQL's, accman/server/cursors.py), else None.
    cursors: Any

    def bind_loop(self, loop, deliver: Callable[[list], None] | None = None) -> None:
        """Later outcomes are delivered on `loop`: `deliver(pairs)` is called
        there with a list of (done, outcome), and must see every `done`
        told its outcome."""

    def tot(self, cred: str) -> int | None:
        """The durable balance at once, None for an unknown credential
        (stores with `inline_reads` only)."""

    def read_tot(self, cred: str, done: Done, ordered: bool = False) -> Any: ...

    def read_past(self, cred: str, limit: int, before: int | None, done: Done,
                  ordered: bool = False) -> Any: ...

    def submit(self, cred: str, by: int, min: int | None, key: str | None,  # noqa: A002
               done: Done, low: int | None = None) -> Any:
        """A mod (PATCH /mod).  `low`, on a funding mod only, sets the
        account's low-balance threshold (SPEC "Events")."""

    def submit_hold(self, cred: str, by: int, ttl_s: int, min: int | None,  # noqa: A002
                    key: str | None, done: Done) -> Any:
        """A hold (PATCH /hold): `by` < 0 leaves the balance now; the hold
        ends by itself after `ttl_s` seconds.  Its id is the seq of the
        history entry that starts it."""

    def submit_settle(self, cred: str, hold: int, use: int, done: Done) -> Any:
        """Ends a hold (PATCH /settle): `use` of it is spent, the rest
        returns to the balance."""

    def read_events(self, after: int, limit: int, wait_s: float, done: Done) -> Any:
        """Up to `limit` events with ids after `after`, oldest first, as
        (events, next); waits up to `wait_s` for the first one (long poll:
        no thread and no timer per waiter beyond one entry in a bounded
        list)."""

    def end_wait(self, done: Done) -> None:
        """The long poll whose callback is `done` is answered now, with what
        there is (its client has left: its place goes to another); nothing
        when it is not waiting."""

    def end_waits(self) -> None:
        """Every long poll is answered now, with what it has (the server is
        stopping)."""

    @property
    def healthy(self) -> bool:
        """True while the store can commit (GET /health)."""

    @property
    def unhealthy_detail(self) -> str | None:
        """While not `healthy`: why, in words fit for a client (GET /health's
        503 says them), or None for the server's own words."""

    @property
    def failure(self) -> str | None:
        """While not `healthy`: why, for the operator's log (it may name
        files and OS errors, never said to a client), or None when
        `unhealthy_detail` says it.  `accman serve` exits with it."""

    @property
    def open_holds(self) -> int:
        """Holds open now, as durable (GET /health)."""

    @property
    def stats(self) -> dict:
        """Numbers for /metrics (accman.server.metrics names the known ones)."""

    def drain_samples(self) -> tuple[list[int], list[float]]:
        """Batch sizes and commit times since the last call."""

    def close(self) -> None:
        """Commits what is queued and releases the store."""


def missing_names(store) -> list[str]:
    """The names of the Store interface that `store` lacks (`tot` only
    where it has `inline_reads`), sorted: a store served without one
    would fail mid-run, where a refusal at start names them."""
    names = {n for n in vars(Store) if not n.startswith("_")} | set(Store.__annotations__)
    if not getattr(store, "inline_reads", False):
        names.discard("tot")
    return sorted(n for n in names if not hasattr(store, n))
