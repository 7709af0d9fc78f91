"""The command line's client commands (accman.cli), as calls: each
command's values, from the text of its arguments, checked against the
SPEC's rules before anything is sent, and the call it then makes, which
returns what the command prints (one JSON object in the SPEC's shape, or
`open`'s new credential); and `failure`, what a command says when its
call ends otherwise, with its exit code.  No I/O here but the call
itself."""

from __future__ import annotations

import contextlib
import errno
import fcntl
import io
import os
import re
import secrets
import signal
import sys

from accman.calling.arguments import plain_decimal
from accman.calling.requests import check_hold_amount, check_name
from accman.errors import (AccManError, BadRequest, EventsOutOfOrder, EventsOverLimit,
                           EventsPageRefused, EventsTrimmed, Forbidden, Insufficient, NotApplied,
                           Terminated, TransportError, Unauthorized, Unavailable, Unreachable,
                           going_on)
from accman.limits import (CRED_CHARS_MAX, EVENTS_LIMIT_MAX, EVENTS_WAIT_S_MAX, HOLD_TTL_S_MAX,
                           INT64_MAX, INT64_MIN, KEY_CHARS_MAX, PAST_LIMIT_MAX)

# The exit codes (accman.cli says what each means).
EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3
EXIT_INTERRUPTED = 130      # 128 + SIGINT: what a shell reports for a command ^C ended
EXIT_TERMINATED = 143       # 128 + SIGTERM
# The call was made (a write applied) but what the command prints could not
# be written to stdout (a full disk, an I/O error); stderr has it instead.
EXIT_OUTPUT_LOST = 4
# What a bad host in the URL is, whichever way the client finds it: Python
# encodes a host as ASCII for the request and as IDNA labels to connect.
BAD_HOST = ("the host in the URL cannot be used: a host name is plain ASCII labels of 1 to 63 "
            "characters (an international name goes in its xn-- form)")

# OpenSSL's reasons for a certificate whose issuer is not trusted: most
# often a private CA that the command line was not told of, which it trusts
# only through SSL_CERT_FILE (it has no flag), so the line says so.  A
# certificate for another host is not one: its CA is trusted.
UNTRUSTED_ISSUER = re.compile(r"self.signed certificate|unable to get (?:local )?issuer "
                              r"certificate")
PRIVATE_CA_HINT = " (a private CA is trusted by naming its PEM file in SSL_CERT_FILE)"
# OpenSSL's reason when what answered an https:// URL does not speak TLS:
# most often an http:// server (AccMan serves plain HTTP behind its proxy).
NOT_TLS = re.compile(r"wrong version number|record layer failure|packet length too long")
NOT_TLS_HINT = " (what answered does not speak TLS: is it an http:// URL?)"

# The idempotency key of the mod that opens an account: the credential is
# new, so one key suffices, and it makes the opening safe to repeat.
OPEN_KEY = "accman-open"
# The commands that change a balance: when one of them gets no whole
# answer, it may or may not have applied.
WRITES = ("open", "mod", "hold", "settle")


def decimal(text, what: str, low: int = INT64_MIN, high: int = INT64_MAX,
            like: str | None = None) -> int:
    """A number from the command line, by the SPEC's rules for the wire
    (accman.calling.arguments.plain_decimal): plain ASCII decimal, an
    optional "-", no leading zeros, no "-0", no "+", "_" or spaces.  `like`
    is the example the refusal gives (by default, from `low`)."""
    value = plain_decimal(text)
    if value is None:
        like = like or ("100" if low >= 0 else "100 or -3")
        raise BadRequest(f"{what} must be a plain decimal integer, like {like}")
    if not low <= value <= high:
        raise BadRequest(f"{what} must be from {low} to {high}")
    return value


def by_value(text, what="by") -> int:
    by = decimal(text, what)
    if by == 0:
        raise BadRequest(f"{what} must not be 0")
    return by


def _opt(text, what: str, low: int = INT64_MIN, high: int = INT64_MAX):
    return None if text is None else decimal(text, what, low, high)


def _key(args):
    return None if args.key is None else check_name(args.key, "--key", KEY_CHARS_MAX)


def _cred(args) -> str:
    return check_name(args.cred, "cred", CRED_CHARS_MAX)


def new_cred() -> str:
    """192 random bits less one draw in 64; token_urlsafe's alphabet is the
    SPEC's A-Z a-z 0-9 _ -.  Drawn again when it starts with "-": a command
    line (this one's included) would take such a credential for an option."""
    while True:
        cred = secrets.token_urlsafe(24)
        if not cred.startswith("-"):
            return cred


def _prepare_open(args):
    """A funding mod of a new credential, keyed OPEN_KEY; it prints the
    credential alone.  The credential is drawn here, before anything is sent,
    and kept as `args.cred`, so that every message about this call can hand
    it over."""
    by = decimal(args.by, "--by", like="100")
    if by <= 0:
        raise BadRequest("--by must be a positive integer: the opening balance "
                         "(only a funding mod opens an account)")
    cred = args.cred = new_cred()

    def open_account(acc):
        acc.mod(cred, by, key=OPEN_KEY)
        return cred
    return open_account


def _prepare_tot(args):
    cred = _cred(args)
    return lambda acc: {"tot": acc.tot(cred)}


def _prepare_mod(args):
    cred, by, mn, key = _cred(args), by_value(args.by), _opt(args.min, "--min"), _key(args)
    low = _opt(args.low, "--low")
    if low is not None and by < 0:
        raise BadRequest("--low is set by a funding mod only (a positive BY), not by a charge")

    def mod(acc):
        tot, seq = acc.mod(cred, by, min=mn, key=key, low=low)
        return {"tot": tot, "seq": seq}
    return mod


def _prepare_past(args):
    cred = _cred(args)
    limit = _opt(args.limit, "--limit", 1, PAST_LIMIT_MAX)
    before = _opt(args.before, "--before", 1)

    def past(acc):
        page = acc.past(cred, limit=limit, before=before)
        return {"account": page.account, "past": [e._asdict() for e in page.entries],
                "next": page.next}
    return past


def _prepare_hold(args):
    cred, by, mn, key = _cred(args), by_value(args.by), _opt(args.min, "--min"), _key(args)
    if by > 0:
        raise BadRequest("by must be negative for a hold: the amount it takes out of the "
                         "balance, like -3")
    check_hold_amount(by)
    ttl_s = decimal(args.ttl, "--ttl", 1, HOLD_TTL_S_MAX)

    def hold(acc):
        held, tot, seq = acc.hold(cred, by, ttl_s, min=mn, key=key)
        return {"hold": held, "tot": tot, "seq": seq}
    return hold


def _prepare_settle(args):
    cred, hold = _cred(args), decimal(args.hold, "hold", 1)
    use = decimal(args.use, "use", 0)

    def settle(acc):
        tot, seq = acc.settle(cred, hold, use)
        return {"tot": tot, "seq": seq}
    return settle


def events_values(args) -> tuple:
    """`(after, limit, wait_s)` of `accman events`."""
    after = decimal(args.after, "--after", 0)
    limit = _opt(args.limit, "--limit", 1, EVENTS_LIMIT_MAX)
    if args.follow and args.wait is not None and plain_decimal(args.wait) == 0:
        # A follower asks again as soon as a reply comes: without a wait,
        # it would flood AccMan with empty reads while nothing happens.
        raise BadRequest(f"--wait 0 with --follow would ask again at once after every empty "
                         f"reply: give 1 to {EVENTS_WAIT_S_MAX} seconds, or leave it out")
    # Its range says 1 with --follow, where 0 is refused.
    wait_s = _opt(args.wait, "--wait", 1 if args.follow else 0, EVENTS_WAIT_S_MAX)
    return after, limit, wait_s


def _prepare_events(args):
    after, limit, wait_s = events_values(args)

    def events(acc):
        page = acc.events(after, limit=limit, wait_s=wait_s)
        return {"events": [e._asdict() for e in page.events], "next": page.next}
    return events


_PREPARE = {"open": _prepare_open, "tot": _prepare_tot, "mod": _prepare_mod, "past": _prepare_past,
            "hold": _prepare_hold, "settle": _prepare_settle, "events": _prepare_events}


def prepare(args):
    """The call that the command `args.command` makes, its values checked:
    a function of the client that returns what to print.  Raises
    BadRequest."""
    return _PREPARE[args.command](args)


def unknown_hint(args, replied: bool = False) -> str:
    """What to do when the outcome of the write `args.command` is unknown
    (no whole reply, a 503 that acknowledged nothing, or ^C while it was in
    flight), as the tail of a message: "" for a read.  A keyed write and a
    settle are repeated safely; a keyless one is not, so its credential's
    history comes first (docs/CALLING.md, "Unknown outcomes and retries").
    `replied`: a plain 503 `unavailable`, whose words, just before, may
    say that nothing was applied (a server from before `not_applied`,
    whose PostgreSQL store refused so while it had no database)."""
    what = args.command
    doubt = ("may have applied, unless AccMan's words say nothing was" if replied
             else "may or may not have applied")
    if what == "open":
        opened = ("may have been opened, unless AccMan's words say nothing was" if replied
                  else "may or may not have been opened")
        return (f"; the account {opened}: its credential is "
                f"{args.cred}; to finish opening it, run: "
                f"accman mod {args.cred} {args.by} --key {OPEN_KEY}")
    if what == "settle":
        return (f"; the settle {doubt}: run the same command again (with "
                "the same USE it applies at most once and answers its result)")
    if what not in ("mod", "hold"):
        return ""
    if args.key is not None:
        hint = (f"; the {what} {doubt}: run the same command again, with "
                "the same --key, to apply it at most once and see its result")
        moving = "insufficient or too_many_holds" if what == "hold" else (
            "insufficient" if args.min is not None else None)
        if moving is not None:
            # A refusal judged by a balance or a count that moves settles
            # nothing of an attempt still on its way (policy.definite).
            hint += (f" (a repeat refused {moving} does not say that this one never applied: "
                     f"it may still be on its way to AccMan, and apply later)")
        return hint
    hint = (f"; the {what} {doubt}: read `accman past` for this credential "
            f"before you try again (a {what} with --key is safe to repeat)")
    if what == "hold":
        hint += f"; a hold never settled ends by itself after --ttl {args.ttl} s"
    return hint


def role_hint(args) -> tuple[str, str]:
    """The role a token needs for `args.command`, for a 401 or 403, and
    why when the command does not say it ("" otherwise)."""
    if args.command == "open":
        return "mint", "opening an account funds it"
    if args.command in ("hold", "settle"):
        return "charge", ""
    if args.command != "mod":
        return "read", ""
    return ("mint", "a positive by funds") if by_value(args.by) > 0 else ("charge", "")


# What may end a client command's call, each said by failure: the client's
# errors, a host that Python cannot encode for the request or resolve (both
# before anything is sent, so no write's outcome is in doubt), and ^C.
CALL_ENDS = (AccManError, UnicodeError, KeyboardInterrupt)


STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@contextlib.contextmanager
def stops_end_call():
    """While a call is in flight, SIGTERM ends it as ^C does (Terminated):
    killed silently, a write that may have reached the server would leave
    no word of what to do.  Only the first stop ends it: from then on both
    are held back (hold_stops), so that a second SIGTERM or a ^C while the
    command says how the call ended neither cuts that line nor changes the
    exit code.  Two stops that land together end it once.  A stop the
    command was started ignoring (a background job's SIGINT) stays ignored."""
    ended = []

    def stop(signum, _frame):
        hold_stops()
        if not ended:
            ended.append(signum)
            raise Terminated() if signum == signal.SIGTERM else KeyboardInterrupt()
    previous = {s: signal.signal(s, stop) for s in STOP_SIGNALS
                if signal.getsignal(s) is not signal.SIG_IGN}
    try:
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)


def hold_stops() -> None:
    """Holds SIGINT and SIGTERM back for the rest of the process, once a
    command's end is known: what it says then is written whole, however
    slow its reader, and its exit code is that end's.  A stop held back
    dies with the process (SIGKILL still ends one whose stderr nobody
    reads)."""
    signal.pthread_sigmask(signal.SIG_BLOCK, STOP_SIGNALS)


def failure(args, e) -> tuple:
    """`(line, exit code)` for what ended the call of the client command
    `args`: the one place where the client's errors become what the command
    says and its code.  ^C says nothing for a read, and what to do for a
    write, which may have reached the server."""
    if isinstance(e, KeyboardInterrupt):
        hint = unknown_hint(args)
        word, code = (("terminated", EXIT_TERMINATED) if isinstance(e, Terminated)
                      else ("interrupted", EXIT_INTERRUPTED))
        return (f"accman: {word}{hint}" if hint else None), code
    if isinstance(e, UnicodeError):
        where = "--url" if getattr(args, "url", None) else "ACCMAN_URL"
        return f"accman: error: {where}: {BAD_HOST} (try: accman {args.command} --help)", EXIT_USAGE
    if isinstance(e, Unreachable):
        nothing = "nothing was opened" if args.command == "open" else "nothing was sent"
        ca = (PRIVATE_CA_HINT if UNTRUSTED_ISSUER.search(e.detail or "") else
              NOT_TLS_HINT if NOT_TLS.search(e.detail or "") else "")
        return f"accman: error: no answer: {e.detail}{ca}; {nothing}", EXIT_NO_ANSWER
    if isinstance(e, (EventsOutOfOrder, EventsOverLimit)):
        # AccMan's own page broke the stream's order or its page size: a
        # server's fault that asking again would not mend, said as such
        # rather than as no answer.
        broke = "order" if isinstance(e, EventsOutOfOrder) else "page size"
        return f"accman: error: the event stream broke its {broke}: {e.detail}", EXIT_REFUSED
    if isinstance(e, EventsPageRefused):
        # A page of AccMan's that this client cannot go past (an event of a
        # type newer than the client): its detail says what and what to do;
        # asking again would not mend it.
        return f"accman: error: {e.detail}", EXIT_REFUSED
    if isinstance(e, TransportError) or (
            isinstance(e, Unavailable) and getattr(args, "follow", False)):
        # events --follow rode out every 503 for FOLLOW_OUTAGE_S_MAX: an outage
        return f"accman: error: no answer: {e.detail}{unknown_hint(args)}", EXIT_NO_ANSWER
    if isinstance(e, NotApplied) and args.command in WRITES:
        # Refused before it applied (not_applied, busy, shutting_down): a
        # refusal like any other, and one that may be sent again as it is.
        return f"{_refusal(e, role_hint(args))}; {unapplied_hint(args)}", EXIT_REFUSED
    if isinstance(e, Unavailable) and args.command in WRITES:
        # A plain 503 says "not acknowledged", never "not applied" (a commit
        # may fail after it was written): an unknown outcome.
        return (f"{_refusal(e, role_hint(args))}; not acknowledged{unknown_hint(args, True)}",
                EXIT_NO_ANSWER)
    return _refusal(e, role_hint(args)), EXIT_REFUSED


def unapplied_hint(args) -> str:
    """What a write refused before it applied (a 503 `not_applied`, `busy`
    or `shutting_down`, the client's own retries spent) says: nothing of
    this request applied, and it may be sent again once AccMan takes
    writes.  An earlier run of the same write that got no answer is not
    settled by it (the server refuses before it looks up the key): a keyed
    write and a settle, repeated, answer that run's result; a keyless one
    may be sent again only if no such run was made."""
    what = args.command
    done = f"AccMan refused this {what} before applying it: nothing of this request applied"
    later = "once AccMan takes writes"
    if what == "open":
        # Each run makes a credential of its own: an earlier run's is its own.
        return (f"{done}, no account was opened; run the same command again {later} (it "
                f"makes a new credential; an earlier run that got no answer said how to "
                f"finish opening its own)")
    if what == "settle" or getattr(args, "key", None) is not None:
        same = "USE" if what == "settle" else "--key"
        return (f"{done}; run the same command again {later}: it applies at most once, and "
                f"if an earlier run with the same {same} got no answer, which may have "
                f"applied, it answers that run's result")
    return (f"{done}; it may be sent again {later}, but if an earlier run of it got no "
            f"answer, which may have applied, read `accman past` for this credential first")


def _refusal(e: AccManError, role: tuple[str, str]) -> str:
    text = f"accman: {e.status} {e.code}: {e.detail}"
    if isinstance(e, Insufficient):
        text += f" (tot {e.tot})"
    elif isinstance(e, EventsTrimmed):
        # AccMan's detail says what was trimmed and what is kept; how to go
        # on is said with the command's flag, not the query's after=.
        text = (f"{text.removesuffix(f'; {going_on(e.first)}')}; go on from event {e.first} "
                f"with --after {e.first - 1}")
    elif isinstance(e, (Unauthorized, Forbidden)):
        name, why = role
        why = f" ({why})" if why else ""
        if isinstance(e, Unauthorized):
            text += f"; this server needs a token (--token or ACCMAN_TOKEN) with the {name} role"
        elif re.search(rf"\b{name}\b", e.detail):    # AccMan's detail names it: said once
            text += "; the token given (--token or ACCMAN_TOKEN) does not have it"
        else:
            text += f"; this needs a token (--token or ACCMAN_TOKEN) with the {name} role"
        text += why
    return text


def stdout_closed_at_start() -> OSError:
    """The error of a write to a stdout that the command was started without
    (`>&-`; Python's None sys.stdout): unlike a reader that closed the pipe,
    nobody chose to read no more, and what the command prints goes nowhere."""
    return OSError(errno.EBADF, "the command was started with stdout closed")


def unsent_without_stdout(args) -> str | None:
    """The refusal of the write `args.command` when the command was started
    with stdout closed (`>&-`) or open for reading only (`1</dev/null`),
    None otherwise.  Its reply could only go nowhere, and this is known
    before anything is sent: applied, then a failing code, a script that
    repeats a failing command would charge on every turn, and `open ...
    >&- 2>&-` would fund a credential that nobody ever learns.  A read is
    asked and said as any stdout that fails."""
    if args.command not in WRITES:
        return None
    if sys.stdout is None:
        how = "with stdout closed (>&-)"
    elif _read_only(sys.stdout):
        how = "with stdout open for reading only"
    else:
        return None
    return (f"{args.command}: the command was started {how}, where its reply would be lost; "
            "nothing was sent (to drop the reply: >/dev/null)")


def _read_only(stream) -> bool:
    """Whether `stream`'s descriptor is open for reading only (a write to it
    fails EBADF); False when that cannot be told (not a descriptor)."""
    try:
        return fcntl.fcntl(stream.fileno(), fcntl.F_GETFL) & os.O_ACCMODE == os.O_RDONLY
    except (OSError, ValueError, AttributeError, io.UnsupportedOperation):
        return False


def stdout_failed(e: OSError) -> tuple:
    """`(words, exit code)` for a write to stdout that raised `e`: the one
    place where such an error becomes what a command says.  A reader that
    closed stdout (a broken pipe) chose to read no more, as `| head` does:
    exit 0, and a failing code would invite a second mod.  Any other error
    (ENOSPC, EIO, a stdout closed from the start: stdout_closed_at_start) lost
    output that someone asked for: EXIT_OUTPUT_LOST, with the OS's words
    and the errno's name."""
    if isinstance(e, BrokenPipeError):
        return "stdout is closed", EXIT_OK
    return f"error: cannot write to stdout: {os_reason(e)}", EXIT_OUTPUT_LOST


def os_reason(e: OSError) -> str:
    """The OS's words for `e` and its errno's name: "No space left on
    device (ENOSPC)"."""
    name = errno.errorcode.get(e.errno)
    return f"{e.strerror} ({name})" if e.strerror and name else str(e)


def stopped_printing(args, line: str, e: KeyboardInterrupt) -> tuple:
    """`(line or None, exit code)` when a stop ended the client command
    `args` while its reply `line` was being written to stdout (a full pipe,
    a stopped terminal: a write that may block for good).  The call's
    outcome is known: a write's reply goes on stderr, so that what it did
    is not lost; a read says nothing more, as for ^C during its call."""
    word, code = (("terminated", EXIT_TERMINATED) if isinstance(e, Terminated)
                  else ("interrupted", EXIT_INTERRUPTED))
    if args.command == "open":
        return f"accman: {word}; the account was opened: its credential is {line}", code
    if args.command in WRITES:
        return f"accman: {word}; the {args.command} applied: {line}", code
    return None, code


def unprinted(args, line: str, e: OSError) -> tuple:
    """`(line or None, exit code)` when the reply `line` of the client
    command `args` could not be written to stdout (stdout_failed says how,
    and the code).  A write's reply goes on stderr instead, so that what it
    did (for open, the new credential) is not lost; a read's is not said
    again: a broken pipe says nothing, another error that the reply is lost."""
    words, code = stdout_failed(e)
    if args.command == "open":
        return f"accman: {words}; the account was opened: its credential is {line}", code
    if args.command in WRITES:
        return f"accman: {words}; the {args.command} applied: {line}", code
    return (None if code == EXIT_OK else f"accman: {words}; the reply was not written"), code


__all__ = ["OPEN_KEY", "WRITES", "EXIT_OK", "EXIT_REFUSED", "EXIT_USAGE", "EXIT_NO_ANSWER",
           "EXIT_OUTPUT_LOST", "EXIT_INTERRUPTED", "EXIT_TERMINATED", "BAD_HOST", "CALL_ENDS",
           "decimal", "by_value", "events_values", "new_cred", "prepare", "failure", "role_hint",
           "unknown_hint", "unapplied_hint", "stdout_failed", "stdout_closed_at_start",
           "unsent_without_stdout",
           "os_reason", "unprinted", "stopped_printing", "stops_end_call", "hold_stops",
           "STOP_SIGNALS"]
