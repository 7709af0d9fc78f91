"""Replies: a status and a JSON body turned into the call's value or its
typed error (accman.errors), checked against the SPEC's shapes.  No I/O.

A 200 whose body breaks the SPEC's shape is `BadReply`: the client cannot
tell what happened, so for a mod the outcome is unknown.  An /events page
of the SPEC's shape that the client cannot go on past is an
`EventsPageRefused`, AccMan's own word, not a garbled reply: its ids break
the stream's order (`EventsOutOfOrder`), it holds more events than the
`limit` asked (`EventsOverLimit`), or an event of a type this client does
not know (`EventTypeUnknown`, see `events`)."""

from __future__ import annotations

import json
import operator
import re
import urllib.parse
from itertools import pairwise
from typing import NamedTuple

from accman.errors import (AccManError, BadReply, BadRequest, Busy, EventsOutOfOrder,
                           EventsOverLimit, EventsTrimmed, EventTypeUnknown, Forbidden,
                           HoldEnded, Insufficient, KeyReused, NoAccount, NoHold, NotApplied,
                           OutcomeUnknown, Overflow, ProxyUnavailable, ShuttingDown,
                           TooManyHolds, Unauthorized, Unavailable, UnexpectedReply)
from accman.limits import EVENTS_LIMIT_DEFAULT, INT64_MAX, INT64_MIN
from accman.records import EVENT_TYPES, Entry, Event

# An account's public id (SPEC "Events") is the hex of the store's keyed
# hash: 32 characters for the embedded store's BLAKE2b-128.  A longer one is
# not a hash any store makes.
ACCOUNT_CHARS_MAX = 128
# How much of an error reply's detail a message keeps.
DETAIL_CHARS_MAX = 200
# What a reply's detail may quote of its request.  AccMan never does, but
# something else at the URL (a proxy, a firewall, a wrong service) may echo
# the request line and headers: the credential and the bearer token.
_QUOTABLE_RE = re.compile(rb"[?&]cred=([^&\s]+)|\nauthorization:[ \t]*bearer[ \t]+([^\r\n]+)",
                          re.IGNORECASE)
# Whatever the value: a reply behind a pipelined one (a closing 401) may
# quote another call's request.  The words after "Bearer" in AccMan's own
# 401s ("needs an Authorization: Bearer token", "the bearer token is not
# valid") and its challenge (`Bearer realm="accman"`) are not a value; a
# token that starts with them (token-1f2e...) is.
_QUOTED_RE = re.compile(r"((?:^|[?&])cred=)[^&\s\"';,]+"
                        r"|(bearer\s+)(?!tokens?(?![A-Za-z0-9_\-.~+/=])|realm=\")[^&\s\"';,]+",
                        re.IGNORECASE)
# The characters of credentials and tokens: a secret is out of sight where
# it stands alone, not inside a word ("a" is no credential inside "balance").
_SECRET_CHARS = r"A-Za-z0-9_\-.~+/="
# A piece of a secret this long or longer is out of sight too, in any word
# that holds it: what quotes a request may cut a secret short, or quote it
# percent-encoded.  Shorter pieces would hide ordinary words.
SECRET_PIECE_CHARS_MIN = 8
_SECRET_RUN_RE = re.compile(rf"[{_SECRET_CHARS}%]{{{SECRET_PIECE_CHARS_MIN},}}")  # % : encoded
_LOWER_HEX_RE = re.compile(r"%[0-9A-F]{2}")
# What a message shows in place of a secret (a reply's detail, a usage error).
UNSHOWN = "<not shown>"
# A reply's error code as AccMan writes them; anything else is "unexpected".
_CODE_RE = re.compile(r"[a-z_]{1,40}")
# Control characters of a reply's detail, shown escaped: whatever answers at
# the URL (a proxy, another server) must not move a terminal's cursor, ring
# it, or forge a line of a log that the message is written to.
_CONTROL_RE = re.compile(r"[\x00-\x1f\x7f-\x9f]")

_ACCOUNT_RE = re.compile(r"[0-9a-f]+")
# How much of an event type this client does not know its error quotes:
# enough to tell it, short enough that the detail keeps its advice whole.
TYPE_CHARS_SHOWN = 32


class PastPage(tuple):
    """One page of an account's history.  It unpacks as `(entries, next)`,
    as `past` always returned, and compares equal to that pair; `account`
    is the account's public id (SPEC "Events"), or None from a server that
    does not send it yet."""

    def __new__(cls, entries: list, next: int | None, account: str | None = None):
        page = super().__new__(cls, (entries, next))
        page.account = account
        return page

    def __getnewargs__(self):
        return (self[0], self[1], self.account)

    def __repr__(self) -> str:
        return f"PastPage(entries={self[0]!r}, next={self[1]!r}, account={self.account!r})"

    entries = property(operator.itemgetter(0), doc="the entries, newest first")
    next = property(operator.itemgetter(1), doc="the `before` of the next page, or None")


class EventsPage(NamedTuple):
    """One page of the event stream (GET /events).  It unpacks as
    `(events, next)`."""

    events: list            # accman.records.Event, oldest first
    next: int               # the `after` of the next call


def _json(body: bytes):
    try:
        return json.loads(body)
    except (ValueError, UnicodeDecodeError):
        raise BadReply("reply body is not JSON") from None


def _is_int(v) -> bool:
    """A signed 64-bit integer, as every number the SPEC puts on the wire."""
    return isinstance(v, int) and not isinstance(v, bool) and INT64_MIN <= v <= INT64_MAX


def _is_id(v) -> bool:
    """A seq, a hold, an event id: counted from 1 (SPEC "Routes", "Holds",
    "Events")."""
    return _is_int(v) and v >= 1


def ok(status: int, body: bytes) -> dict:
    """The JSON object of a 200, or the typed error of anything else."""
    if status == 200:
        obj = _json(body)
        if not isinstance(obj, dict):
            raise BadReply("reply body is not a JSON object")
        return obj
    raise error(status, body)


# Replies whose status and code name one error (SPEC "Errors"), and statuses
# that do whatever their code.
_BY_CODE = {
    (409, "key_reused"): KeyReused,
    (409, "overflow"): Overflow,
    (409, "hold_ended"): HoldEnded,
    (409, "too_many_holds"): TooManyHolds,
    (404, "no_account"): NoAccount,
    (404, "no_hold"): NoHold,
    (503, "busy"): Busy,
    (503, "not_applied"): NotApplied,
    (503, "shutting_down"): ShuttingDown,
}
_BY_STATUS = {401: Unauthorized, 403: Forbidden, 503: Unavailable}
_BAD_REQUEST_STATUSES = (400, 413, 414, 431)


def error(status: int, body: bytes) -> AccManError:
    """The typed error of a reply other than 200."""
    obj = _error_object(body)
    code = obj.get("error") if isinstance(obj.get("error"), str) else ""
    code = code if _CODE_RE.fullmatch(code) else ("unexpected" if code else "")
    detail = obj.get("detail") if isinstance(obj.get("detail"), str) else ""
    detail = _CONTROL_RE.sub(lambda m: f"\\x{ord(m.group()):02x}", detail)
    detail = detail or f"AccMan answered {status} {code}".rstrip()     # cut by unechoed
    if status == 409 and code == "insufficient":
        tot = obj.get("tot")
        if not _is_int(tot):
            return BadReply("409 insufficient without an integer tot")
        return Insufficient(tot, detail)
    if status == 410 and code == "events_trimmed":
        first = obj.get("first")
        if not _is_int(first):
            return BadReply("410 events_trimmed without an integer first")
        return EventsTrimmed(first, detail)
    if status == 503 and not _own_error(obj):
        # Not AccMan's error body: a proxy's page says nothing of AccMan's
        # store, and may come after the request went on (ProxyUnavailable).
        return ProxyUnavailable("a 503 without AccMan's error body came (a proxy's, or another "
                                "server's at the URL): the call may have been applied")
    cls = _BY_CODE.get((status, code)) or _BY_STATUS.get(status)
    if cls is not None:
        return cls(detail)
    if status in _BAD_REQUEST_STATUSES:
        e = BadRequest(detail)
        e.status = status
        if code:
            e.code = code
        return e
    if status >= 500 and status not in (501, 505):
        # A 500/502/504 comes from a proxy or a crash: the mod may have applied.
        return OutcomeUnknown(f"AccMan (or a proxy) answered {status}")
    return UnexpectedReply(status, code or "unexpected", detail)


def unechoed(e: BaseException, req: bytes) -> BaseException:
    """`e`, raised by the call of `req`, with the request's credential and
    token put out of sight in its detail and in those of the errors it
    was raised from, each then cut to DETAIL_CHARS_MAX: what a reply's
    detail says is a message to a person, never a secret."""
    quoted = {v.decode("latin-1").strip() for pair in _QUOTABLE_RE.findall(req) for v in pair}
    quoted.discard("")
    encoded = {urllib.parse.quote(s, safe="") for s in quoted}      # as a URL would quote it
    quoted |= encoded | {_LOWER_HEX_RE.sub(lambda m: m.group().lower(), s) for s in encoded}
    # A secret of a piece's length or more is found by its pieces; a shorter
    # one where it stands alone.
    alone = [re.compile(rf"(?<![{_SECRET_CHARS}]){re.escape(s)}(?![{_SECRET_CHARS}])")
             for s in quoted if len(s) < SECRET_PIECE_CHARS_MIN]
    pieces = {s[i:i + SECRET_PIECE_CHARS_MIN]
              for s in quoted for i in range(len(s) - SECRET_PIECE_CHARS_MIN + 1)}
    chain, seen = e, set()
    while isinstance(chain, AccManError) and id(chain) not in seen:
        seen.add(id(chain))
        detail = _QUOTED_RE.sub(lambda m: (m.group(1) or m.group(2)) + UNSHOWN, chain.detail)
        for secret in alone:
            detail = secret.sub(UNSHOWN, detail)
        if pieces:
            detail = _SECRET_RUN_RE.sub(lambda m: _unless_piece(m.group(), pieces), detail)
        detail = detail[:DETAIL_CHARS_MAX]
        if detail != chain.detail:
            chain.detail, chain.args = detail, (detail,)
        chain = chain.__cause__ or chain.__context__
    return e


def _unless_piece(word: str, pieces: set[str]) -> str:
    """`word`, or UNSHOWN where it holds a piece of a secret."""
    n = SECRET_PIECE_CHARS_MIN
    return UNSHOWN if any(word[i:i + n] in pieces for i in range(len(word) - n + 1)) else word


def _own_error(obj: dict) -> bool:
    """Whether an error reply's object has the shape of AccMan's own (SPEC
    "Errors"): an `error` code of its form and a `detail` sentence."""
    code = obj.get("error")
    return (isinstance(code, str) and _CODE_RE.fullmatch(code) is not None
            and isinstance(obj.get("detail"), str))


def _error_object(body: bytes) -> dict:
    try:
        obj = json.loads(body)
    except (ValueError, UnicodeDecodeError):
        return {}
    return obj if isinstance(obj, dict) else {}


# The two replies of the hot path, in the compact form AccMan writes them,
# are read without the JSON decoder; anything else goes through json.
_TOT_RE = re.compile(rb'\{"tot":(-?(?:0|[1-9][0-9]{0,18}))\}')
_MOD_RE = re.compile(rb'\{"tot":(-?(?:0|[1-9][0-9]{0,18})),"seq":([1-9][0-9]{0,18})\}')
_HOLD_RE = re.compile(
    rb'\{"hold":([1-9][0-9]{0,18}),"tot":(-?(?:0|[1-9][0-9]{0,18})),"seq":([1-9][0-9]{0,18})\}')


def tot(status: int, body: bytes) -> int:
    """GET /tot: the balance."""
    if status == 200:
        m = _TOT_RE.fullmatch(body)
        if m is not None and INT64_MIN <= (value := int(m.group(1))) <= INT64_MAX:
            return value
    value = ok(status, body).get("tot")
    if not _is_int(value):
        raise BadReply("/tot reply without an integer tot")
    return value


def mod(status: int, body: bytes) -> tuple:
    """PATCH /mod and PATCH /settle: `(tot, seq)`."""
    if status == 200:
        m = _MOD_RE.fullmatch(body)
        if m is not None:
            value, seq = int(m.group(1)), int(m.group(2))
            if INT64_MIN <= value <= INT64_MAX and seq <= INT64_MAX:
                return value, seq
    obj = ok(status, body)
    value, seq = obj.get("tot"), obj.get("seq")
    if not (_is_int(value) and _is_id(seq)):
        raise BadReply("reply without a 64-bit integer tot and a positive seq")
    return value, seq


settle = mod


def hold(status: int, body: bytes) -> tuple:
    """PATCH /hold: `(hold, tot, seq)`."""
    if status == 200:
        m = _HOLD_RE.fullmatch(body)
        if m is not None:
            held, value, seq = int(m.group(1)), int(m.group(2)), int(m.group(3))
            if held <= INT64_MAX and INT64_MIN <= value <= INT64_MAX and seq <= INT64_MAX:
                return held, value, seq
    obj = ok(status, body)
    held, value, seq = obj.get("hold"), obj.get("tot"), obj.get("seq")
    if not (_is_id(held) and _is_int(value) and _is_id(seq)):
        raise BadReply("/hold reply without a positive hold, a 64-bit integer tot and a "
                       "positive seq")
    return held, value, seq


def events(after: int, limit: int | None = None):
    """GET /events?after=`after`&limit=`limit` (left out: the SPEC's
    default): the decoder of its reply, an `EventsPage`.  Besides each
    event's shape (`BadReply`) it checks the order the SPEC promises
    (`EventsOutOfOrder`), so that a follower that resumes from `next` can
    neither skip nor repeat an event without noticing, that the page holds
    no more than `limit` events (`EventsOverLimit`), and that it knows
    each event's type (`EventTypeUnknown`; see `_check_page`).

    What the client cannot read in a page of the SPEC's shape is one of
    two things.  A field the SPEC does not name (on the page or on an
    event) is skipped: the SPEC's shapes list what a reply holds and say
    nothing against more, its replies have grown by fields before (`hold`,
    `account`) and this client reads servers from before them, so a
    server newer than the client may add one and be read as ever.  A
    `type` that is a string this client does not know is a newer server's
    type, whose fields the client cannot tell (it reads only its `id`):
    EventTypeUnknown, the same page when asked again, mended by upgrading
    the client.  A field the SPEC names, of another shape or missing (an
    id that is not a positive integer, a `type` that is not a string, a
    `by` that is text), is no newer server's (the SPEC fixes those shapes,
    and a server that changed one would break every client, old or new):
    BadReply, a reply the client cannot take for AccMan's word."""
    def decode(status: int, body: bytes) -> EventsPage:
        obj = ok(status, body)
        items, nxt = obj.get("events"), obj.get("next")
        if not isinstance(items, list) or not (_is_int(nxt) and nxt >= 0):
            raise BadReply("/events reply without an events list and an integer next")
        page = [_event(e) for e in items]
        _check_page(after, page, nxt, EVENTS_LIMIT_DEFAULT if limit is None else limit)
        return EventsPage(page, nxt)
    return decode


class _Unknown(NamedTuple):
    """An event of a type this client does not know: all that is read of
    it (a newer type's other fields are the newer server's to say)."""

    id: int
    type: str


# What every order refusal ends with: the promise broken.
ORDER_RULE = 'ids grow by one, with no gaps or repeats (SPEC "Events")'


# What every page size refusal ends with: the promise broken.
LIMIT_RULE = 'a page holds at most the limit asked, 100 when none is (SPEC "Routes")'


def _check_page(after: int, page: list, nxt: int, limit: int) -> None:
    """Ids grow by one with no gaps (SPEC "Events"), so a page after
    `after` starts at `after + 1`, goes on one by one, and its `next` is
    its last id: the embedded store and the PostgreSQL one (several
    clusters' events merged into one order first, accman.postgres.merge)
    answer EventsTrimmed rather than start later.  An empty page's `next`
    is `after`, or the newest id when `after` is past the end of the stream
    (the server says where it ends); never more than `after`, which would
    skip events unseen.  A page that breaks this is EventsOutOfOrder, with
    the events before the break, and names the ids: the shape of the page
    was AccMan's, so this is its word on its stream, not a garbled reply.
    A page of more than `limit` events breaks the SPEC's page size, and
    ends where it passes it (EventsOverLimit, with its first `limit`
    events).  An event of a type this client does not know, in its place
    in the order, ends the page the same way (EventTypeUnknown, with the
    events before it): the client cannot hand it on as an Event.  The
    first fault in the page's order is the one raised."""
    if not page:
        if nxt > after:
            skipped = f"event {nxt}" if nxt == after + 1 else f"events {after + 1} to {nxt}"
            raise EventsOutOfOrder(f"a page of no events after event {after} gave next {nxt}, "
                                   f"skipping {skipped}; {ORDER_RULE}")
        return
    last = after
    for i, e in enumerate(page):
        if i == limit:
            raise EventsOverLimit(f"a page of {len(page)} events came where limit {limit} was "
                                  f"asked; {LIMIT_RULE}", page[:i])
        if e.id != last + 1:
            raise EventsOutOfOrder(f"event {e.id} came after event {last}, where {last + 1} "
                                   f"was due; {ORDER_RULE}", page[:i])
        if type(e) is _Unknown:
            raise _type_unknown(e, page[:i])
        last = e.id
    if nxt != last:
        raise EventsOutOfOrder(f"a page ending with event {last} gave next {nxt}, not {last}; "
                               f"{ORDER_RULE}", page)


def _type_unknown(e: _Unknown, before: list) -> EventTypeUnknown:
    """The error of `e`, its type quoted in printable ASCII (any other
    character, a quote or a backslash as `?`) and cut to TYPE_CHARS_SHOWN."""
    shown = re.sub(r'[^\x21-\x7e]|["\\]', "?", e.type[:TYPE_CHARS_SHOWN])
    cut = "..." if len(e.type) > TYPE_CHARS_SHOWN else ""
    return EventTypeUnknown(f'event {e.id} is of type "{shown}"{cut}, which this client does not '
                            f"know: it is older than the server's event stream; upgrade accman",
                            before, id=e.id, type=e.type)


def past(status: int, body: bytes) -> PastPage:
    """GET /past: a `PastPage`.  `account` and each entry's `hold` are
    optional, so that a server from before they were in the SPEC is still
    understood; when present, they must have the SPEC's shape."""
    obj = ok(status, body)
    entries, nxt, account = obj.get("past"), obj.get("next"), obj.get("account")
    if not isinstance(entries, list) or not (nxt is None or _is_id(nxt)):
        raise BadReply("/past reply without a past list and a next")
    if account is not None and not _account_ok(account):
        raise BadReply("/past reply whose account is not a hex id")
    page = [_entry(e) for e in entries]
    _check_past_order(page, nxt)
    return PastPage(page, nxt, account)


def _check_past_order(page: list, nxt: int | None) -> None:
    """Newest first, each entry's seq below the one before it (SPEC
    "Routes"), and `next`, the `before` of the next page, its last seq, the
    one value that neither skips nor repeats an entry: BadReply, a page the
    client cannot take for AccMan's."""
    for newer, older in pairwise(page):
        if older.seq >= newer.seq:
            raise BadReply(f"/past reply not newest first: seq {older.seq} after {newer.seq}")
    if nxt is not None and (not page or nxt != page[-1].seq):
        last = f"its last seq {page[-1].seq}" if page else "no entries"
        raise BadReply(f"/past reply whose next {nxt} is not the before of the next page "
                       f"({last})")


def _account_ok(account) -> bool:
    return (isinstance(account, str) and len(account) <= ACCOUNT_CHARS_MAX
            and _ACCOUNT_RE.fullmatch(account) is not None)


def _event(e) -> Event | _Unknown:
    if not isinstance(e, dict):
        raise BadReply("/events event is not an object")
    eid, etype = e.get("id"), e.get("type")
    if isinstance(etype, str) and etype not in EVENT_TYPES and _is_id(eid):
        return _Unknown(eid, etype)
    ev = Event(e.get("id"), e.get("type"), e.get("account"), e.get("seq"), e.get("by"),
               e.get("tot"), e.get("at"), e.get("key"), e.get("hold"))
    if not (_is_id(ev.id) and ev.type in EVENT_TYPES and _account_ok(ev.account)
            and _is_id(ev.seq) and _is_int(ev.by) and _is_int(ev.tot) and _is_at(ev.at)
            and (ev.key is None or isinstance(ev.key, str))
            and (ev.hold is None or _is_id(ev.hold))):
        raise BadReply("/events event without a positive id, a known type, a hex account, "
                       "a positive seq, 64-bit integer by and tot, an at, a key and a hold")
    return ev


def _entry(e) -> Entry:
    if not isinstance(e, dict):
        raise BadReply("/past entry is not an object")
    seq, by, value, at = e.get("seq"), e.get("by"), e.get("tot"), e.get("at")
    key, hold = e.get("key"), e.get("hold")
    if not (_is_id(seq) and _is_int(by) and _is_int(value) and _is_at(at)
            and (key is None or isinstance(key, str)) and (hold is None or _is_id(hold))):
        raise BadReply("/past entry without a positive seq, 64-bit integer by and tot, an at, "
                       "a key and a hold")
    return Entry(seq, by, value, at, key, hold)


def _is_at(v) -> bool:
    """Unix milliseconds: not before 1970."""
    return _is_int(v) and v >= 0


__all__ = ["PastPage", "EventsPage", "ACCOUNT_CHARS_MAX", "DETAIL_CHARS_MAX", "TYPE_CHARS_SHOWN",
           "ok", "error",
           "unechoed", "tot", "mod", "past", "hold", "settle", "events"]
