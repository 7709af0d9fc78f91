"""The command line: `accman serve | open | tot | mod | past | verify`.

Exit codes: 0 success; 1 the server (or the check) answered with an error;
2 bad flags, or `serve` could not start (busy port, data directory locked or
corrupt, bad tokens file, a non-loopback bind without tokens); 3 no answer
from the server (cannot connect, timeout, cut connection: for `mod` and
`open` the outcome is then unknown).

Client commands use plain http.client against a running server; the URL and
token come from --url/--token or ACCMAN_URL/ACCMAN_TOKEN.  Values are sent as
given (percent-encoded only where they leave the SPEC's alphabet), so the
server, not this tool, decides what is valid.
"""

import argparse
import http.client
import json
import os
import secrets
import sys
import urllib.parse

DEFAULT_URL = "http://127.0.0.1:8080"
CLIENT_TIMEOUT_S = 30.0     # a mod waits for an fsync; a stalled server is an error

EXIT_OK, EXIT_REFUSED, EXIT_USAGE, EXIT_NO_ANSWER = 0, 1, 2, 3


class _ArgumentParser(argparse.ArgumentParser):
    """argparse, but a usage error is one line and exit code 2."""

    # Said with every usage error of a command that takes a credential.
    cred_hint = None

    def error(self, message):
        hint = f"; {self.cred_hint}" if self.cred_hint else ""
        sys.stderr.write(f"accman: error: {message} (try: {self.prog} --help{hint})\n")
        sys.exit(EXIT_USAGE)


def _port(text):
    if not text.isascii() or not text.isdigit() or not 0 <= int(text) <= 65535:
        raise argparse.ArgumentTypeError(f"invalid port {text!r} (0..65535)")
    return int(text)


def build_parser():
    p = _ArgumentParser(prog="accman", description="Prepaid balances for web APIs.")
    sub = p.add_subparsers(dest="command", metavar="COMMAND", required=True)

    s = sub.add_parser("serve", help="run the HTTP service")
    s.add_argument("--host", default="127.0.0.1",
                   help="address to bind (default 127.0.0.1; others need --tokens)")
    s.add_argument("--port", type=_port, default=8080,
                   help="port (default 8080; 0 picks a free one)")
    s.add_argument("--data", default="./accman-data",
                   help="data directory (default ./accman-data; created if missing)")
    s.add_argument("--tokens", metavar="FILE",
                   help="tokens file: one `ROLE[,ROLE...] TOKEN` a line")
    s.add_argument("--verify", choices=("full", "heads"), default="full",
                   help="what to check at start: the files' checksums and every record "
                        "read (full, the default), or the files' checksums and each "
                        "account's newest entry (heads)")

    def client(name, help_text):
        c = sub.add_parser(name, help=help_text)
        c.add_argument("--url", default=None,
                       help=f"server URL (default $ACCMAN_URL or {DEFAULT_URL})")
        c.add_argument("--token", default=None, help="bearer token (default $ACCMAN_TOKEN)")
        return c

    o = client("open", "make a new credential funded with --by")
    o.add_argument("--by", required=True, help="the opening balance, a positive integer")

    def takes_cred(c, example):
        # A credential not made by `open` may start with "-"; argparse reads
        # everything after "--" as positional.
        c.cred_hint = f"a credential that starts with '-' goes after '--': {example}"
        c.add_argument("cred")

    t = client("tot", "print an account's balance")
    takes_cred(t, "accman tot -- -xYz")

    m = client("mod", "change a balance by BY (negative charges)")
    takes_cred(m, "accman mod --min 0 -- -xYz -3")
    m.add_argument("by")
    m.add_argument("--min", default=None, help="apply only if the new balance is >= MIN")
    m.add_argument("--key", default=None, help="idempotency key")

    h = client("past", "print an account's history, newest first")
    takes_cred(h, "accman past --limit 5 -- -xYz")
    h.add_argument("--limit", default=None, help="entries per page (1..1000, default 100)")
    h.add_argument("--before", default=None, help="only entries with seq < BEFORE")

    v = sub.add_parser("verify", help="check a data directory (the server must be stopped)")
    v.add_argument("--data", default="./accman-data")
    return p


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    if args.command == "serve":
        return cmd_serve(args)
    if args.command == "verify":
        return cmd_verify(args)
    if args.command == "open":
        return cmd_open(args)
    if args.command == "tot":
        return _print_call(args, "GET", "/tot", [("cred", args.cred)])
    if args.command == "mod":
        return _print_call(args, "PATCH", "/mod", [
            ("cred", args.cred), ("by", args.by), ("min", args.min), ("key", args.key)])
    if args.command == "past":
        return _print_call(args, "GET", "/past", [
            ("cred", args.cred), ("limit", args.limit), ("before", args.before)])
    raise AssertionError(args.command)


# --- serve / verify ----------------------------------------------------------

def _fail(message, code=EXIT_USAGE):
    print(f"accman: error: {message}", file=sys.stderr, flush=True)
    return code


def cmd_serve(args) -> int:
    from accman.server.auth import Tokens, TokensError
    from accman.server import LimitsError, ServerLimits, StartupError, run

    try:
        tokens = Tokens.load(args.tokens) if args.tokens else None
        limits = ServerLimits.from_env()
    except (TokensError, LimitsError) as e:
        return _fail(e)
    try:
        return run(host=args.host, port=args.port, data=args.data,
                   tokens=tokens, limits=limits, verify=args.verify)
    except StartupError as e:
        return _fail(e)
    except KeyboardInterrupt:       # ^C before the signal handlers were set
        return 130


def cmd_verify(args) -> int:
    from accman.errors import AccManError, StoreCorrupt, StoreLocked
    from accman.ledger import Ledger
    from accman.ledger.leveldb import Store

    path = os.path.abspath(args.data)
    if not os.path.isdir(path):
        return _fail(f"no data directory at {path}")
    try:
        # Read-only: recovery runs in a private copy, so that a read-only
        # copy or mount can be verified and no file of the store changes.
        ledger = Ledger(path, create=False, store=Store(path, create=False, read_only=True))
    except StoreLocked:
        return _fail(f"data directory {path} is in use by a running server; stop it first")
    except StoreCorrupt as e:
        print(f"accman: verify {path}: FAILED: {e.detail}", flush=True)
        return EXIT_REFUSED
    except AccManError as e:
        return _fail(f"cannot open data directory {path}: {e.detail}")
    try:
        result = ledger.verify()
    except StoreCorrupt as e:
        print(f"accman: verify {path}: FAILED: {e.detail}", flush=True)
        return EXIT_REFUSED
    finally:
        ledger.close()
    print(f"accman: verify {path}: ok{_describe(result)}", flush=True)
    return EXIT_OK


def _describe(result):
    if isinstance(result, dict) and result:
        return " (" + ", ".join(f"{k}={v}" for k, v in result.items()) + ")"
    if result not in (None, True):
        return f" ({result})"
    return ""


# --- client commands ---------------------------------------------------------

class NoAnswer(Exception):
    pass


def call(url, token, method, path, params, timeout=CLIENT_TIMEOUT_S):
    """One request; returns (status, body bytes).  Raises NoAnswer."""
    parts = urllib.parse.urlsplit(url)
    if parts.scheme not in ("http", "https") or not parts.hostname:
        raise NoAnswer(f"not an http URL: {url!r}")
    query = "&".join(f"{name}={urllib.parse.quote(str(value), safe='-_')}"
                     for name, value in params if value is not None)
    target = parts.path.rstrip("/") + path + ("?" + query if query else "")
    cls = http.client.HTTPSConnection if parts.scheme == "https" else http.client.HTTPConnection
    headers = {"Authorization": f"Bearer {token}"} if token else {}
    conn = cls(parts.hostname, parts.port, timeout=timeout)
    try:
        conn.request(method, target, headers=headers)
        resp = conn.getresponse()
        return resp.status, resp.read()
    except (OSError, http.client.HTTPException) as e:
        raise NoAnswer(f"no answer from {url}: {e or type(e).__name__}") from None
    finally:
        conn.close()


def _endpoint(args):
    return (args.url or os.environ.get("ACCMAN_URL") or DEFAULT_URL,
            args.token or os.environ.get("ACCMAN_TOKEN") or None)


def _report_error(status, body):
    try:
        doc = json.loads(body)
        text = f"{doc.get('error', 'error')}: {doc.get('detail', '')}"
        if "tot" in doc:
            text += f" (tot {doc['tot']})"
    except (ValueError, AttributeError):
        text = body[:200].decode("utf-8", "replace")
    print(f"accman: {status} {text}", file=sys.stderr, flush=True)


def _print_call(args, method, path, params) -> int:
    url, token = _endpoint(args)
    try:
        status, body = call(url, token, method, path, params)
    except NoAnswer as e:
        return _fail(e, EXIT_NO_ANSWER)
    if status == 200:
        print(body.decode("utf-8", "replace"), flush=True)
        return EXIT_OK
    _report_error(status, body)
    return EXIT_REFUSED


def new_cred() -> str:
    """192 random bits less one draw in 64; token_urlsafe's alphabet is the
    SPEC's A-Z a-z 0-9 _ -.  Drawn again when it starts with "-": a command
    line (this one's included) would take such a credential for an option."""
    while True:
        cred = secrets.token_urlsafe(24)
        if not cred.startswith("-"):
            return cred


def cmd_open(args) -> int:
    url, token = _endpoint(args)
    cred = new_cred()
    try:
        status, body = call(url, token, "PATCH", "/mod", [("cred", cred), ("by", args.by)])
    except NoAnswer as e:
        # Unknown outcome: if the mod applied, its account has a credential
        # nobody was told, so nothing can be spent from it; run open again.
        return _fail(f"{e}; no credential was issued, run open again", EXIT_NO_ANSWER)
    if status != 200:
        _report_error(status, body)
        return EXIT_REFUSED
    print(cred, flush=True)
    return EXIT_OK


if __name__ == "__main__":
    sys.exit(main())
