"""The command line: `accman serve | open | tot | mod | past | hold | settle |
events | migrate | verify`.

Exit codes: 0 success (and `events --follow` stopped by SIGINT, SIGTERM or
its reader closing the pipe, and any command whose reader closed stdout
before its output: what the call did is done); 1 the server (or the
check) answered with an error (a 503 `not_applied`, `busy` or
`shutting_down` to a write among them: nothing applied, and the message
says it may be sent again), or (`events`) with events that break the
stream's order or its page size, or of a type this client does not know
(upgrade it), named; 2 bad flags or values, or a write started with stdout closed or
open for reading only (its reply would be lost), refused before anything
is sent, or `serve` could not start (busy port, data directory locked or
corrupt, bad tokens file, a non-loopback bind without tokens);
3 no answer from the server (cannot connect, timeout, cut connection), or
a 503 `unavailable` to `mod`, `hold`, `settle` or `open`: their outcome
may then be unknown, and the message says what to do; 4 the command did
its work (a write applied; a read, verify or migrate ran) but stdout
failed (a full disk, an I/O error; for a read, verify or migrate, a
stdout closed from the start): a write's reply and verify's or
migrate's verdict are on stderr instead (for `open`, the credential), and
a write is not to be repeated; 130 ^C (SIGINT) and 143 SIGTERM, which for
a write in flight say what to do too, and for one whose reply was being
written say what applied.

The client commands use AccManSyncClient against a running server; the URL
and token come from --url/--token or ACCMAN_URL/ACCMAN_TOKEN.  Values are
checked against the SPEC's rules here, before anything is sent (numbers
are plain ASCII decimals, never Python's `int()` on raw text).  A reply is
printed as one line of JSON in the SPEC's shape; `open` prints the new
credential alone, so that `cred=$(accman open --by 100)` works;
`events --follow` prints one event a line (accman.calling.follow).
"""

import contextlib
import json
import os
import stat
import sys

import accman
from accman.calling.commands import (CALL_ENDS, EXIT_INTERRUPTED, EXIT_NO_ANSWER, EXIT_OK,
                                     EXIT_OUTPUT_LOST, EXIT_REFUSED, EXIT_TERMINATED, EXIT_USAGE,
                                     OPEN_KEY, events_values, failure, hold_stops, new_cred,
                                     prepare, stdout_closed_at_start, stdout_failed,
                                     stopped_printing, stops_end_call, unprinted,
                                     unsent_without_stdout)
from accman.calling.follow import FOLLOW_OUTAGE_S_MAX, FOLLOW_WAIT_S, Followed, follow, silence
from accman.calling.output import log_to_stderr, print_ready, print_result, say, to_stdout
from accman.calling.sync import AccManSyncClient
from accman.calling.usage import ARGV_WORDS_MAX, ArgumentParser
from accman.calling.arguments import data_dir, int64, nice, nonempty, port, retention, store_url
from accman.calling.requests import endpoint_fault
from accman.errors import AccManError, BadRequest, EventsTrimmed, Terminated
from accman.limits import (EVENTS_LIMIT_MAX, EVENTS_RETENTION_S_DEFAULT,
                           EVENTS_RETENTION_S_MAX, EVENTS_RETENTION_S_MIN, EVENTS_WAIT_S_MAX,
                           HOLD_TTL_S_MAX, PAST_LIMIT_MAX)
from accman.stdfds import standard_fds_open

DEFAULT_URL = "http://127.0.0.1:8080"
DEFAULT_DATA = "./accman-data"
CLIENT_TIMEOUT_S = 30.0     # a mod waits for an fsync; a stalled server is an error


def build_parser(given=()):
    """The parser of `accman`; `given` is the command line it will parse,
    for its usage errors to leave out."""
    p = ArgumentParser(prog="accman", description="Prepaid balances for web APIs.",
                        given=tuple(given))
    p.add_argument("--version", action="version", version=f"accman {accman.__version__}")
    sub = p.add_subparsers(dest="command", metavar="COMMAND")     # none: _main says so
    p.commands = {}

    def command(name, help_text):
        p.names.add(name)
        c = p.commands[name] = sub.add_parser(name, help=help_text, description=help_text,
                                              given=p.given, names=p.names)
        return c

    _serve_arguments(command("serve", "run the HTTP service"))

    def client(name, help_text):
        c = command(name, help_text)
        c.add_argument("--url", default=None, type=nonempty,
                       help=f"server URL (default $ACCMAN_URL or {DEFAULT_URL})")
        c.add_argument("--token", type=nonempty, help="bearer token (default $ACCMAN_TOKEN)")
        return c

    o = client("open", "make a new credential funded with --by (needs the mint role)")
    o.add_argument("--by", required=True, help="the opening balance, a positive integer")

    t = client("tot", "print an account's balance (needs the read role)")
    _takes_cred(t, "accman tot -- -xYz")

    m = client("mod", "change a balance by BY (negative charges, needing the charge role; "
                    "positive funds, needing the mint role)")
    _takes_cred(m, "accman mod --min 0 -- -xYz -3")
    m.add_argument("by")
    m.add_argument("--min", default=None, help="apply only if the new balance is >= MIN")
    m.add_argument("--key", default=None,
                   help="idempotency key: the same mod with the same key applies at most once")
    m.add_argument("--low", default=None,
                   help="with a positive BY only: the account's low-balance threshold, under "
                        "which a low_balance event is emitted (not part of what --key names: "
                        "the same key sent again with another --low sets nothing)")

    pa = client("past", "print an account's history, newest first (needs the read role)")
    _takes_cred(pa, "accman past --limit 5 -- -xYz")
    pa.add_argument("--limit", default=None,
                    help=f"entries per page (1..{PAST_LIMIT_MAX}, default 100)")
    pa.add_argument("--before", default=None, help="only entries with seq < BEFORE")

    _holds_and_events(client)

    g = command("migrate", "create or upgrade the PostgreSQL schema (serve does it too)")
    g.add_argument("--store", action="append", metavar="URL", type=store_url,
                   help="a libpq URL of a cluster of the store (required): given once for "
                        "each cluster")
    # Required, and checked by cmd_migrate so that a misspelt --stor is said first.
    g.usage = "%(prog)s [-h] --store URL [--store URL ...]"

    v = command("verify", "check a data directory (the server must be stopped)")
    v.add_argument("--data", default=DEFAULT_DATA, type=data_dir,
                   help=f"data directory (default {DEFAULT_DATA})")
    return p


def _serve_arguments(s):
    s.add_argument("--host", default="127.0.0.1", type=nonempty,
                   help="address to bind (default 127.0.0.1; others need --tokens; "
                        "* for every interface, IPv4 and IPv6)")
    s.add_argument("--port", type=port, default=8080,
                   help="port (default 8080; 0 picks a free one)")
    s.add_argument("--data", default=None, type=data_dir,
                   help=f"data directory (default {DEFAULT_DATA}; created if missing): the "
                        "embedded store; with --store it holds only this server's lock")
    s.add_argument("--store", action="append", metavar="URL", default=[], type=store_url,
                   help="serve from PostgreSQL instead of the embedded store: a libpq URL "
                        "(several hosts with target_session_attrs=read-write for failover); "
                        "given more than once, accounts spread over the clusters "
                        "(docs/SCALING.md)")
    s.add_argument("--tokens", metavar="FILE", type=nonempty,
                   help="tokens file: one `ROLE[,ROLE...] TOKEN` a line")
    # Default None: given beside --store, it is refused (cmd_serve); "full" otherwise.
    s.add_argument("--verify", choices=("full", "heads"), default=None,
                   help="what to check at start: the files' checksums and every record "
                        "read (full, the default), or the files' checksums and each "
                        "account's newest entry (heads)")
    _webhook_arguments(s)
    s.add_argument("--low-balance", type=int64, metavar="L", default=None,
                   help="emit a low_balance event when a balance crosses below L, for "
                        "accounts whose funding mod set no low= of their own (default: none)")
    s.add_argument("--compaction-nice", type=nice, metavar="N", default=0,
                   help="run LevelDB's compaction at nice N (1..19; default 0, not lowered) "
                        "below the request path, for a shorter durable /mod tail: on a host "
                        "or cgroup where AccMan runs alone (docs/SERVER.md); the embedded "
                        "store only")
    s.add_argument("--events-retention", type=retention, metavar="DURATION",
                   default=EVENTS_RETENTION_S_DEFAULT,
                   help="keep events at least this long: seconds, or a number with s, m, h "
                        f"or d (default 7d; at least {EVENTS_RETENTION_S_MIN}s, at most "
                        f"{EVENTS_RETENTION_S_MAX // 86400}d)")


def _takes_cred(c, example):
    # A credential not made by `open` may start with "-"; argparse reads
    # everything after "--" as positional.
    c.cred_hint = f"a credential that starts with '-' goes after '--': {example}"
    c.add_argument("cred")


def _holds_and_events(client):
    """`hold`, `settle` and `events`; `client(name, help)` makes a client
    command's parser."""
    h = client("hold", "reserve -BY (BY < 0) until settled, or for --ttl seconds "
                       "(needs the charge role)")
    _takes_cred(h, "accman hold --ttl 60 -- -xYz -3")
    h.add_argument("by")
    h.add_argument("--ttl", required=True,
                   help=f"seconds (1..{HOLD_TTL_S_MAX}) after which the hold ends by itself, "
                        "all of it returned")
    h.add_argument("--min", default=None,
                   help="apply only if the balance left is >= MIN (the server's default: 0)")
    h.add_argument("--key", default=None,
                   help="idempotency key: the same hold with the same key applies at most once")

    st = client("settle", "end a hold: USE of it is spent, the rest returns "
                          "(needs the charge role)")
    _takes_cred(st, "accman settle -- -xYz 7 2")
    st.add_argument("hold", help="the hold's id, as `accman hold` printed it")
    st.add_argument("use", help="how much of the hold is spent: 0 to the held amount")

    e = client("events", "print the events after --after, oldest first (needs the read role)")
    e.add_argument("--after", default="0", help="an event id (default 0: from the start)")
    e.add_argument("--limit", default=None,
                   help=f"events per call (1..{EVENTS_LIMIT_MAX}, default 100)")
    e.add_argument("--wait", default=None,
                   help=f"seconds (0..{EVENTS_WAIT_S_MAX}; 1..{EVENTS_WAIT_S_MAX} with --follow) "
                        f"that a call waits for a first event (default: none, or "
                        f"{FOLLOW_WAIT_S} with --follow)")
    e.add_argument("--follow", action="store_true",
                   help="keep going: one JSON event a line, until SIGINT or SIGTERM, the "
                        "reader closes the pipe, an error, events out of their order, more "
                        "than --limit, or of a type this accman does not know (exit 1, naming "
                        "them), or "
                        f"{FOLLOW_OUTAGE_S_MAX / 60:g} minutes with no answer (exit 3)")


def _webhook_arguments(s):
    s.add_argument("--webhook", metavar="URL", type=nonempty,
                   help="POST every event, in batches in id order, to this http:// or "
                        "https:// URL (needs --webhook-secret)")
    s.add_argument("--webhook-secret", metavar="FILE", type=nonempty,
                   help="the webhook's HMAC-SHA256 key: this file's content (16 bytes at "
                        "least; only its owner may read it)")


def main(argv=None) -> int:
    standard_fds_open()
    try:
        return _main(argv)
    except KeyboardInterrupt as e:
        # A stop with no call in flight (one in flight is said by failure):
        # nothing to say.
        return EXIT_TERMINATED if isinstance(e, Terminated) else EXIT_INTERRUPTED


def _main(argv) -> int:
    argv = sys.argv[1:] if argv is None else [str(a) for a in argv]
    if len(argv) > ARGV_WORDS_MAX:
        return _fail(f"{len(argv)} words after accman, more than any command takes "
                     f"(ARGV_WORDS_MAX, {ARGV_WORDS_MAX}) (try: accman --help)")
    parser = build_parser(argv)
    args, extra = parser.parse_known_args(argv)
    if args.command is None:
        parser.no_command(extra)
    if extra:
        # Said by the command's own parser, so that it points at its --help.
        parser.commands[args.command].unrecognized(extra)
    return {"serve": cmd_serve, "verify": cmd_verify, "migrate": cmd_migrate}.get(
        args.command, cmd_call)(args)


# --- serve / verify ----------------------------------------------------------

def _fail(message, code=EXIT_USAGE):
    return say(f"accman: error: {message}", code)


def cmd_serve(args) -> int:
    try:
        from accman.errors import TokensError
        from accman.server import LimitsError, ServerLimits, StartupError, run
        from accman.server.auth import Tokens
        from accman.server.say import log_to_stderr
        from accman.server.webhook_config import load_config
    except ImportError:
        why = accman.native_missing()
        if why is None:
            raise
        return _fail(why)
    # The flags first (SERVER.md, "Order at start"), then the files they name.
    if args.compaction_nice and args.store:
        return _fail("--compaction-nice is the embedded store's: PostgreSQL compacts "
                     "nothing of AccMan's")
    if args.host == "*" and args.port == 0:
        return _fail("--host '*' needs a --port other than 0: each address family would "
                     "get a port of its own")
    if args.verify is not None and args.store:
        return _fail("--verify is the embedded store's: it says what to check of the files "
                     "in --data, and a PostgreSQL store keeps none there")
    try:
        tokens = Tokens.load(args.tokens) if args.tokens else None
        limits = ServerLimits.from_env()
        webhook = load_config(args.webhook, args.webhook_secret)
    except (TokensError, LimitsError, StartupError) as e:
        return _fail(e)
    for name in ServerLimits.ignored_names():
        say(f"accman: warning: {name} is not a setting of the server, ignored "
            "(its settings: docs/SERVER.md, \"Limits\")", None)
    log_to_stderr()
    try:
        data = args.data if args.data is not None or args.store else DEFAULT_DATA
        host = "" if args.host == "*" else args.host      # "": every interface, both families
        # Until the server's own signal handlers are set, a stop ends the
        # start as ^C does (main says its code).
        with stopped_without_copies():
            return run(host=host, port=args.port, data=data,
                       tokens=tokens, limits=limits, verify=args.verify or "full",
                       low_balance=args.low_balance, events_retention_s=args.events_retention,
                       store_urls=args.store, webhook=webhook, ready=print_ready,
                       compaction_nice=args.compaction_nice)
    except StartupError as e:
        return _fail(e)


@contextlib.contextmanager
def stopped_without_copies():
    """SIGTERM ends `serve`'s start and `verify` as ^C does (stops_end_call),
    and the private copies of a store they made (accman.ledger.datadir's
    snapshot: verify's, and serve's of a store from before the key file,
    read for its format record) are removed however they end: each holds
    the store's key."""
    from accman.ledger.copies import remove_snapshots
    try:
        with stops_end_call():
            yield
    finally:
        remove_snapshots()      # a stop may have cut a removal short


def cmd_migrate(args) -> int:
    from accman.errors import StoreError
    if not args.store:      # checked here, so that a misspelt --stor is said first
        return _fail("migrate needs --store URL (try: accman migrate --help)")
    why = accman.postgres_missing()
    if why is not None:
        return _fail(why)
    from accman.postgres import migrate_sync
    log_to_stderr()         # the schema made beside another application's tables
    try:
        done = migrate_sync(args.store)
    except StoreError as e:
        return _fail(e.detail)
    return print_result(done, EXIT_OK)


def cmd_verify(args) -> int:
    try:
        from accman.ledger import Ledger
        from accman.ledger.datadir import checked_path
        from accman.ledger.leveldb import Store
        from accman.verdict import verdict_on
    except ImportError:
        why = accman.native_missing()
        if why is None:
            raise
        return _fail(why)

    try:
        # As serve's --data: a relative path in a working directory since
        # deleted, a NUL, a name not in UTF-8 are said, not a traceback.
        path = os.path.abspath(checked_path(args.data))
    except ValueError as e:
        return _fail(f"--data: {e}")
    try:
        if not stat.S_ISDIR(os.stat(path).st_mode):
            return _fail(f"{path} is not a directory")
    except FileNotFoundError:
        return _fail(f"no data directory at {path}")
    except OSError as e:            # a loop of links, a file on the way: as serve says it
        return _fail(f"cannot open data directory {path}: {e.strerror or e}")
    with stopped_without_copies():
        verdict = verdict_on(path, Ledger, Store)
        hold_stops()            # the verdict is said whole
    line, code, is_result = verdict
    return print_result(line, code) if is_result else _fail(line, code)


# --- client commands ---------------------------------------------------------

def _connect(args):
    """The client for --url and --token (or their variables); a ValueError
    names the fault and where it is (never the token itself)."""
    url = args.url or os.environ.get("ACCMAN_URL") or DEFAULT_URL
    token = args.token or os.environ.get("ACCMAN_TOKEN") or None
    fault = endpoint_fault(url)
    if fault is not None:
        raise ValueError(f"{'--url' if args.url else 'ACCMAN_URL'}: {fault}")
    try:
        return AccManSyncClient(url, token, timeout_s=CLIENT_TIMEOUT_S)
    except (ValueError, AccManError) as e:
        raise ValueError(f"{'--token' if args.token else 'ACCMAN_TOKEN'}: {e}") from None


def _usage(args, e) -> int:
    message = e.detail if isinstance(e, BadRequest) else e
    return _fail(f"{message} (try: accman {args.command} --help)")


def cmd_call(args) -> int:
    """open, tot, mod, past, hold, settle and events: the values checked
    and the client made before anything is sent, then the call, whose end
    failure says."""
    if args.command == "events" and args.follow:
        return cmd_follow(args)
    try:
        call = prepare(args)
        acc = _connect(args)
    except (BadRequest, ValueError) as e:
        return _usage(args, e)
    refusal = unsent_without_stdout(args)
    if refusal is not None:
        acc.close()
        return _fail(refusal)
    with acc, stops_end_call():
        line = None
        try:
            out = call(acc)
            line = out if isinstance(out, str) else json.dumps(out, separators=(",", ":"))
            return _print_reply(args, line)
        except CALL_ENDS as e:
            hold_stops()            # the end is known: it is said whole
            if line is not None and isinstance(e, KeyboardInterrupt):
                # Stopped while stdout took the reply, which may never
                # drain: the rest of it is dropped (the flush at exit would
                # block again) and stderr says what the call did.
                silence(sys.stdout)
                return say(*stopped_printing(args, line, e))
            return say(*failure(args, e))


def _print_reply(args, line) -> int:
    """Prints the reply; one that stdout does not take is said by unprinted."""
    e = to_stdout(line)
    return EXIT_OK if e is None else say(*unprinted(args, line, e))


def cmd_follow(args) -> int:
    """`accman events --follow` (accman.calling.follow), its values and
    client checked as every command's.  However it ends, stderr names the
    last event written and the --after that resumes from it."""
    try:
        after, limit, wait_s = events_values(args)
        acc = _connect(args)
    except (BadRequest, ValueError) as e:
        return _usage(args, e)

    def note(text):
        say(f"accman: events: {text}", None)
    with acc:
        # Held back until the follower takes them, and again from its end:
        # a stop that came before it is not lost, and one after it does not
        # cut the line that says where to resume, nor change the exit code.
        hold_stops()
        try:
            # Started with stdout closed (Python's None): nothing asked, and
            # said as a stdout that fails, since no reader ever chose to stop.
            end = (Followed(after, "output failed", stdout_closed_at_start())
                   if sys.stdout is None else
                   follow(acc, after, limit, FOLLOW_WAIT_S if wait_s is None else wait_s,
                          note=note))
        except CALL_ENDS as e:
            return say(*failure(args, e))
    # Written, not read: lines in the pipe when the reader stopped were
    # never handled, and only the reader knows how many (docs/CALLING.md).
    resume = (f"events written up to id {end.after} (not necessarily read); to resume: "
              f"accman events --follow --after {end.after}, or --after the last id the "
              "reader handled")
    if end.error is None:
        note(f"stopped ({end.why}); {resume}")
        return EXIT_OK
    if end.why == "output failed":
        words, code = stdout_failed(end.error)
        return say(f"accman: events: {words}; {resume}", code)
    text, code = failure(args, end.error)
    return say(text if isinstance(end.error, EventsTrimmed) else f"{text}; {resume}", code)


# OPEN_KEY, new_cred and the exit codes, the commands', named as the command line's too.
__all__ = ["main", "build_parser", "OPEN_KEY", "new_cred", "EXIT_OK", "EXIT_REFUSED",
           "EXIT_USAGE", "EXIT_NO_ANSWER", "EXIT_OUTPUT_LOST", "EXIT_INTERRUPTED"]

if __name__ == "__main__":
    sys.exit(main())
