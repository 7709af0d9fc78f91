"""The exception hierarchy.  Every error AccMan raises carries the SPEC's
error code and the HTTP status it implies, so the server maps errors to
responses without guessing (h11's habit: errors know their status)."""


class AccManError(Exception):
    """Base class of every AccMan error.  `code` is the SPEC's error code."""

    code = "error"
    status = 500

    def __init__(self, detail: str = ""):
        super().__init__(detail or self.code)
        self.detail = detail or self.code

    def __reduce__(self):
        # pickle and copy (a process pool's worker sends its errors pickled):
        # rebuilt from its attributes.  Exception's own way calls the class
        # with `args`, the detail, which a subclass with other parameters
        # (Insufficient's tot, HttpError's status) misreads or refuses.
        return _rebuilt, (type(self), self.args, self.__dict__)


def _rebuilt(cls, args, state):
    error = cls.__new__(cls)
    error.args = args
    error.__dict__.update(state)
    return error


class BadRequest(AccManError):
    """A value outside the SPEC's rules: nothing was changed."""

    code = "bad_request"
    status = 400


class NoAccount(AccManError):
    code = "no_account"
    status = 404


class Conflict(AccManError):
    """A 409: the request was well-formed but could not apply."""

    status = 409


class Insufficient(Conflict):
    """The mod would leave the balance under `min`.  `tot` is the balance it
    was judged against (durable when this error is delivered).  A store's
    refusal names `by` and `min`, the two values at fault; a client's is
    the detail the server sent."""

    code = "insufficient"

    def __init__(self, tot: int, detail: str = "", *, what: str = "mod",
                 by: int | None = None, min_: int = 0):
        if not detail:
            detail = (f"the balance {tot} does not cover this {what}" if by is None else
                      f"this {what} (by {by}) would take the balance {tot} to {tot + by}, "
                      f"under min {min_}")
        super().__init__(detail)
        self.tot = tot


class KeyReused(Conflict):
    code = "key_reused"


class Overflow(Conflict):
    code = "overflow"


class HoldEnded(Conflict):
    """A settle of a hold that has ended: settled with another `use`, or
    expired."""

    code = "hold_ended"


class TooManyHolds(Conflict):
    """The account, or the store, is at its bound of open holds
    (limits.HOLDS_PER_ACCOUNT_MAX, limits.HOLDS_MAX)."""

    code = "too_many_holds"


class NoHold(AccManError):
    """A settle naming a hold the account never had."""

    code = "no_hold"
    status = 404


class EventsTrimmed(AccManError):
    """GET /events asked for events older than the retention keeps.
    `first` is the oldest event id still kept."""

    code = "events_trimmed"
    status = 410

    def __init__(self, first: int, detail: str = ""):
        super().__init__(detail or f"events before {first} are past the retention and were "
                                   f"trimmed; the oldest kept is {first}; {going_on(first)}")
        self.first = first


def going_on(first: int) -> str:
    """How an EventsTrimmed's detail, whose oldest kept event is `first`,
    says to go on (the command line says it with its own flag instead)."""
    return f"after={first - 1} goes on from there"


class Unavailable(AccManError):
    """The store cannot commit (fail-stop), the ledger is closed, or the
    server is shutting down.  Nothing in the refused call was acknowledged."""

    code = "unavailable"
    status = 503


class NotApplied(Unavailable):
    """A change refused before it was applied: the store takes no writes
    now (a commit failed before it, the store is closing, its database is
    not reached or refused the batch).  Nothing of this request applied
    (a plain Unavailable may have: a commit failed).  A closed Ledger
    refuses its reads so too: it does nothing of any call.  It says nothing of an
    earlier request for the same change, with the same key, that is still
    unanswered or got a plain Unavailable: that one may still apply."""

    code = "not_applied"


class Busy(NotApplied):
    """Too many mods are waiting for durability: back-pressure, retry."""

    code = "busy"


class ShuttingDown(NotApplied):
    """The server is stopping: a change refused before it was applied, or
    /health (the server answers it itself: accman.server.routes)."""

    code = "shutting_down"


class StoreError(AccManError):
    """The data directory cannot be opened or used."""

    code = "store_error"
    status = 503


class WriteRefused(StoreError):
    """A batch's write refused before anything of it reached the disk, since
    a write before it failed (accman.ledger.leveldb): its changes are not
    applied, which the committer tells them (NotApplied)."""


class StoreLocked(StoreError):
    """Another process has the data directory open."""

    code = "store_locked"


class StoreCorrupt(StoreError):
    """The data files fail their checks: refuse, never repair silently."""

    code = "store_corrupt"


class FileDamage(Exception):
    """One file of a data directory fails its checks (accman.ledger.wal,
    accman.ledger.fsck, accman.ledger.keyfile): the message names the file
    and the place.  Internal: the store adds the directory and raises
    StoreCorrupt, refusing to serve."""


class CheckpointPostponed(Exception):
    """A write-ahead log checkpoint could not be taken for a reason that
    lost nothing (no descriptor free to open a file, no space for the new
    checkpoint file): the log keeps every record and the checkpoint is
    tried again later.  Internal to accman.ledger.wal."""


class HttpError(AccManError):
    """An error found while reading an HTTP request.  `close` is true for
    framing errors, after which the connection cannot be trusted; `allow`
    is the Allow header of a 405."""

    def __init__(self, status: int, code: str, detail: str,
                 close: bool = False, allow: str = ""):
        super().__init__(detail)
        self.status = status
        self.code = code
        self.close = close
        self.allow = allow


# --- the server ----------------------------------------------------------------

class Terminated(KeyboardInterrupt):
    """SIGTERM while a client command's call is in flight: it ends as ^C
    does, saying what to do for a write that may have reached the server,
    with the shell's code for SIGTERM (accman.calling.commands)."""


class StartupError(Exception):
    """`accman serve` cannot start; the message is one line for a person."""


class LimitsError(ValueError):
    """A limit override (ACCMAN_<LIMIT>) that cannot be used; one line."""


class TokensError(ValueError):
    """The tokens file cannot be used; the message is one line, token-free."""


# --- the calling side ----------------------------------------------------------
# What the clients (accman.calling) raise beyond the codes above: the replies
# the server builds as an HttpError, and what goes wrong on the way.  What a
# failure means for a mod is in the type: see docs/CALLING.md, "Errors".

class Unauthorized(AccManError):
    """401: the client's token is missing or wrong (a configuration error)."""

    code = "unauthorized"
    status = 401


class Forbidden(AccManError):
    """403: the token's role does not allow this call (for example a
    positive mod without the `mint` role)."""

    code = "forbidden"
    status = 403


class UnexpectedReply(AccManError):
    """A well-framed reply the SPEC does not describe for this call (a 404
    `not_found` or a 405 from a wrong base URL, say).  `status` and `code`
    are the reply's."""

    def __init__(self, status: int, code: str, detail: str):
        super().__init__(detail)
        self.status = status
        self.code = code


class TransportError(AccManError):
    """No usable reply came from AccMan.  See the subclasses for what that
    means for a mod."""

    code = "transport"
    status = 503


class Unreachable(TransportError, Unavailable):
    """Nothing reached the server (connection refused, connect timeout, no
    connection free in time, the client closed), or the server closed the
    connection before taking the request (it was pipelined behind a closing
    reply of AccMan's, which it gives before it takes anything more: a 503
    `busy` or `shutting_down`, a framing error, the last reply a stop owes;
    conn.untaken_behind): nothing was applied, any call can be retried."""

    code = "unreachable"


class OutcomeUnknown(TransportError):
    """The request was sent, or may have been, and no complete reply came:
    the connection broke, the reply was malformed, or the call timed out.

    For a mod this is the one case where the caller does not know whether
    the balance changed.  With a `key`, repeat the mod with the same key
    (possibly much later): it applies at most once and answers the result.
    Without a key, read the account's `past` before doing anything else."""

    code = "outcome_unknown"


class CallTimeout(OutcomeUnknown):
    """The call's `timeout_s` passed before the reply."""

    code = "timeout"


class BadReply(OutcomeUnknown):
    """The reply broke HTTP/1.1 framing or the SPEC's JSON shapes.  The
    connection is closed: its framing can no longer be trusted."""

    code = "bad_reply"


class ProxyUnavailable(OutcomeUnknown):
    """A 503 without AccMan's error body (SPEC "Errors": a JSON object with
    an `error` code and a `detail`): a proxy's or another server's at the
    URL, such as nginx's HTML page when its upstream is down.  Not AccMan's
    word on its store.  Some front ends answer 503 after they sent the
    request on (Envoy's "upstream connect error or disconnect/reset before
    headers", Varnish's "Backend fetch failed" past its first-byte
    timeout), and no page tells which: a mod may have been applied."""

    code = "proxy_unavailable"


class EventsPageRefused(AccManError):
    """A well-framed /events page of the SPEC's JSON shape that the client
    cannot go on past: AccMan's own word on its stream, which asking again
    would not change, so it is no outage (no TransportError) and is never
    retried.  `events` are the page's events before the point at fault,
    in order (a follower may hand them on, and resume after the last of
    them).  The subclasses say what is at fault."""

    code = "events_page_refused"
    status = 502        # what a gateway says of an upstream's invalid reply

    def __init__(self, detail: str, events: list = ()):
        super().__init__(detail)
        self.events = list(events)


class EventsOutOfOrder(EventsPageRefused):
    """A page that breaks the stream's order (SPEC "Events": ids grow by
    one, with no gaps, across restarts): an event that is not the one
    after the last (a gap, a repeat, one out of place), a `next` that is
    not the page's last id or that skips events, or a stream that goes
    back below an id it had reached.  The detail names the ids."""

    code = "events_out_of_order"


class EventsOverLimit(EventsPageRefused):
    """A page of more events than the `limit` asked for (SPEC "Routes":
    1..1000, default 100), a promise broken as an order break is.
    `events` are its first `limit` events, when they came in order; the
    detail names the count and the limit."""

    code = "events_over_limit"


class EventTypeUnknown(EventsPageRefused):
    """A page that holds an event of a type this client does not know
    (not in accman.records.EVENT_TYPES): a server newer than the client,
    whose stream has a type added since.  The same page comes again, and
    upgrading the client is the cure.  `id` and `type` are the event's;
    the detail names both."""

    code = "event_type_unknown"

    def __init__(self, detail: str, events: list = (), *, id: int = 0, type: str = ""):
        super().__init__(detail, events)
        self.id = id
        self.type = type


class WebhookBadReply(Exception):
    """A webhook receiver's reply is not an HTTP/1.1 status line and head
    (accman.server.webhook_http): that attempt failed, and is retried."""


def where(exc: BaseException) -> str:
    """`exc`'s type and the place it was raised, for a log line: never its
    message, which could quote a credential or a store's URL (the server's
    logs, docs/SERVER.md)."""
    tb = exc.__traceback__
    while tb is not None and tb.tb_next is not None:
        tb = tb.tb_next
    place = f"{tb.tb_frame.f_code.co_filename}:{tb.tb_lineno}" if tb is not None else "?"
    return f"{type(exc).__name__} at {place}"
