"""A write batch for accman_apply, and its outcomes: values in, arrays out,
codes back to outcomes; the reads' queries, and their rows to pages.  No
I/O.

The server checks every value against the SPEC before it calls a store;
these checks repeat the ones the store cannot do without (types and
ranges) so that a caller of the Python API gets BadRequest, not a database
error, and nothing is queued.
"""

from __future__ import annotations

from accman.errors import (BadRequest, HoldEnded, Insufficient, KeyReused, NoAccount,
                           NoHold, NotApplied, Overflow, TooManyHolds, Unavailable)
from accman.postgres import schema as S
from accman.records import Entry
from accman.store import Page, check_key
from accman.store import check_hold as store_check_hold


def check_hold(by, ttl_s, min_, key) -> None:
    store_check_hold(by, ttl_s, min_)
    check_key(key)


class Op:
    """One call waiting for its batch.  `arg` is a mod's low, a hold's ttl
    in seconds, a settle's hold id; `by` is a settle's use."""

    __slots__ = ("kind", "hid", "by", "min", "key", "arg", "done")

    def __init__(self, kind, hid, by, min_, key, arg, done):
        self.kind = kind
        self.hid = hid
        self.by = by
        self.min = min_
        self.key = key
        self.arg = arg
        self.done = done


def arrays(ops: list[Op]) -> tuple:
    """The arguments of accman_apply for `ops`, in their order: distinct
    hids sorted (the order the database locks them in), which of them a
    funding mod may create, and one column per op field.  A column of
    NULLs only (no min, no key, no arg in the whole batch) goes as one
    NULL array, which reads as NULL at every index: each element costs
    the driver's encoding and the database's decoding."""
    fund = {}
    for op in ops:
        if op.kind == S.MOD and op.by > 0:
            fund[op.hid] = True
        else:
            fund.setdefault(op.hid, False)
    hids = sorted(fund)
    index = {hid: i for i, hid in enumerate(hids, 1)}
    mins = [op.min for op in ops]
    keys = [op.key for op in ops]
    args = [op.arg for op in ops]
    return (hids, [fund[h] for h in hids],
            [index[op.hid] for op in ops], [op.kind for op in ops],
            [op.by for op in ops], _or_null(mins), _or_null(keys), _or_null(args))


def _or_null(column: list):
    for value in column:
        if value is not None:
            return column
    return None


# What a refusal says: the embedded store's sentences, so that a client sees
# the same whichever store serves it.
_NO_ACCOUNT = {S.MOD: "no account has this cred; a charge opens none",
               S.HOLD: "no account has this cred; a hold opens none"}


def refusals(holds_per_account_max: int, holds_max: int, clusters: int) -> dict:
    """{code: (op, tot) -> AccManError} for a store of `clusters` with
    these bounds.  HOLDS_MAX bounds each cluster's open holds: each keeps
    and ends its own (SCALING.md)."""
    where = "the store has" if clusters == 1 else "the account's cluster has"
    return {
        S.NO_ACCOUNT: lambda op, _tot: NoAccount(
            _NO_ACCOUNT.get(op.kind, "no account has this cred")),
        S.INSUFFICIENT: lambda op, tot: Insufficient(
            tot, what="hold" if op.kind == S.HOLD else "mod", by=op.by,
            min_=0 if op.min is None else op.min),
        S.KEY_REUSED: lambda _op, _tot: KeyReused(
            "key was used with another route, by, min or ttl"),
        S.OVERFLOW: lambda _op, _tot: Overflow(
            "the balance would leave the signed 64-bit range"),
        S.OVERFLOW_HELD: lambda _op, _tot: Overflow(
            "the balance, with what its open holds give back when they end, would leave the "
            "signed 64-bit range"),
        S.TOO_MANY_HOLDS_ACCOUNT: lambda _op, _tot: TooManyHolds(
            f"the account has HOLDS_PER_ACCOUNT_MAX ({holds_per_account_max}) open holds; "
            "settle some first"),
        S.TOO_MANY_HOLDS_STORE: lambda _op, _tot: TooManyHolds(
            f"{where} HOLDS_MAX ({holds_max}) open holds; retry later"),
        S.NO_HOLD: lambda _op, _tot: NoHold("the account has no hold with this id"),
        S.HOLD_ENDED: lambda _op, _tot: HoldEnded("the hold was settled with another use"),
        S.HOLD_EXPIRED: lambda _op, _tot: HoldEnded(
            "the hold expired before it was settled; its amount went back to the balance"),
        S.USE_OVER_HOLD: lambda _op, tot: BadRequest(
            f"use must be from 0 to the held amount {tot}"),
    }


def outcome(op: Op, code: int, tot, seq, refused: dict):
    """The outcome of `op` from accman_apply's row; `refused` is the
    store's refusals()."""
    kind = op.kind
    if code != S.OK:
        return refused[code](op, tot)
    if kind == S.READ:
        return tot
    if kind == S.HOLD:
        return (seq, tot, seq)
    return (tot, seq)


def no_account():
    return NoAccount("no account has this cred")


# The op kind of a /past in order behind its connection's changes (on the
# writer, between batches); the kinds that read.
PAST = -1
READS = (S.READ, PAST)


def unsent(op, why: str) -> Unavailable:
    """The refusal of a call never sent, the database not reached (`why`):
    a read's, or a change's (NotApplied: a client may send it again, and
    owes nothing to undo)."""
    if op.kind in READS:
        return Unavailable(f"the database cannot be read: {why}")
    return NotApplied(f"the store cannot commit, nothing of this call was applied: {why}")


# The balances of $1's hids, in order; null for an unknown account.
TOT_SQL = ("SELECT array_agg(a.tot ORDER BY q.n) FROM unnest($1::bytea[]) WITH ORDINALITY "
           "AS q(hid, n) LEFT JOIN accman_accounts a ON a.hid = q.hid AND a.seq > 0")
# One account's /past page: $1 the hid, $2 the seq to start below, $3 the
# limit.  No row: no account; one row of nulls: an account with no history.
PAST_SQL = ("SELECT h.seq, h.by, h.tot, h.at, h.key, h.hold FROM accman_accounts a "
            "LEFT JOIN LATERAL (SELECT * FROM accman_history x WHERE x.hid = a.hid "
            "AND x.seq < $2 ORDER BY x.seq DESC LIMIT $3) h ON true "
            "WHERE a.hid = $1 AND a.seq > 0 ORDER BY h.seq DESC")


def past_query(op) -> tuple:
    """PAST_SQL and its arguments for a /past op (`min` its before, `by` its limit)."""
    return PAST_SQL, op.hid, op.min if op.min is not None else 2 ** 63 - 1, op.by


def past_page(hid: bytes, limit: int, rows):
    """A /past page from PAST_SQL's rows."""
    if not rows:
        return no_account()
    entries = [Entry(*r) for r in rows if r[0] is not None]
    nxt = entries[-1].seq if len(entries) == limit and entries[-1].seq > 1 else None
    return Page(hid.hex(), entries, nxt)
