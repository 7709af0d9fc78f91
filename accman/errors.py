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
    was judged against (durable when this error is delivered)."""

    code = "insufficient"

    def __init__(self, tot: int, detail: str = ""):
        super().__init__(detail or f"the balance {tot} does not cover this mod")
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
        super().__init__(detail or f"events before {first} are past the retention "
                                   f"and were trimmed; the oldest kept is {first}")
        self.first = first


class Unavailable(AccManError):
    """The store cannot commit (fail-stop), the ledger is closed, or the
    server is shutting down.  Nothing in the refused call was acknowledged."""

    code = "unavailable"
    status = 503


class Busy(Unavailable):
    """Too many mods are waiting for durability: back-pressure, retry."""

    code = "busy"


class StoreError(AccManError):
    """The data directory cannot be opened or used."""

    code = "store_error"
    status = 503


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
