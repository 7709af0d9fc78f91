"""The command line's value types (argparse `type=`): each refuses what
the SPEC refuses, naming the value, before anything is sent or opened.
A value is named quoted (`{text!r}`), as argparse names one: the form in
which a usage error looks for the words given, to put them out of sight
(accman.calling.usage).  A character that their own words name is in
double quotes (`"-"`), as repr never writes a word without a "'": given as
a word too (`accman serve --low-balance 5x -`), it is left whole there."""

import argparse
import re
import urllib.parse

from accman.calling.requests import BRACKETED_HOST_RE
from accman.limits import (EVENTS_RETENTION_S_MAX, EVENTS_RETENTION_S_MIN, INT64_MAX, INT64_MIN,
                           NICE_MAX)

# The SPEC's plain ASCII decimal, as the wire's parser reads every number
# (ext/values.pxd, parse_int64): an optional "-", no leading zeros, and never
# "-0".  Each value has one spelling, so a number the command line takes is
# one the server takes too (`low=-0` is a 400, so `--low-balance -0` is
# refused as well).
_DECIMAL_RE = re.compile(r"0|-?[1-9][0-9]*", re.ASCII)
# The most digits a signed 64-bit integer has: text with more is out of
# range whatever it says, and never handed to int() (which refuses over
# 4300 digits, with words about itself).
INT64_DIGITS_MAX = len(str(INT64_MAX))
# A zero is a duration too, so that "0" and "0d" are refused as too short,
# not as something other than a duration.
_DURATION_RE = re.compile(r"(0|[1-9][0-9]*)([smhd]?)")
_DURATION_UNITS_S = {"": 1, "s": 1, "m": 60, "h": 3600, "d": 86400}


def plain_decimal(text: str) -> int | None:
    """`text` as the SPEC's plain ASCII decimal (_DECIMAL_RE), or None when
    it is any other text: how the command line reads an amount or a count
    (--low-balance, --events-retention's digits, the commands' values;
    --port and --compaction-nice have their own small ranges).  Python's int()
    also takes "+5", " 5", "1_000", "-0" and non-ASCII digits.  A number of
    more digits than INT64_DIGITS_MAX comes back as one just outside the
    signed 64-bit range, for the caller's range check to refuse."""
    if _DECIMAL_RE.fullmatch(text) is None:
        return None
    if len(text.lstrip("-")) > INT64_DIGITS_MAX:
        return INT64_MIN - 1 if text.startswith("-") else INT64_MAX + 1
    return int(text)


def int64(text):
    """The SPEC's plain ASCII decimal, in signed 64-bit range."""
    value = plain_decimal(text)
    if value is None or not INT64_MIN <= value <= INT64_MAX:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not a signed 64-bit decimal integer in plain digits "
            '(an optional "-", no leading zeros, never -0)')
    return value


def retention(text):
    """--events-retention: 3600, 90m, 7d..., from EVENTS_RETENTION_S_MIN to
    EVENTS_RETENTION_S_MAX."""
    m = _DURATION_RE.fullmatch(text) if text.isascii() else None
    if m is None:
        raise argparse.ArgumentTypeError(f"{text!r} is not a duration such as 3600, 90m or 7d")
    seconds = plain_decimal(m.group(1)) * _DURATION_UNITS_S[m.group(2)]
    if seconds < EVENTS_RETENTION_S_MIN:
        raise argparse.ArgumentTypeError(
            f"{text!r} is shorter than the shortest retention: it must be at least "
            f"{EVENTS_RETENTION_S_MIN}s (EVENTS_RETENTION_S_MIN)")
    if seconds > EVENTS_RETENTION_S_MAX:
        raise argparse.ArgumentTypeError(
            f"{text!r} is longer than the longest retention, "
            f"{EVENTS_RETENTION_S_MAX // 86400}d (EVENTS_RETENTION_S_MAX)")
    return seconds


def nonempty(text):
    """--url, --token, and serve's --host, --tokens, --webhook and
    --webhook-secret: an empty one is a mistake (an unset variable in a
    script), never a fall-back to $ACCMAN_URL, $ACCMAN_TOKEN or the default,
    nor the flag left out (no tokens; every interface)."""
    if not text:
        raise argparse.ArgumentTypeError("is empty: give a value, or leave the flag out")
    return text


# The most a port has; a URL's port is quoted back only when it is digits of
# at most PORT_DIGITS_SHOWN (other text there may be a password's part).
PORT_MAX = 65535
PORT_DIGITS_SHOWN = 8


# The schemes of a libpq URL, the only ones the driver reads (asyncpg takes
# them in any case, as urllib lowercases a scheme).
STORE_URL_SCHEMES = ("postgresql", "postgres")


def store_url(text):
    """--store: a libpq URL, read by the driver; an empty one, one of
    another scheme, or one with a port out of range, is refused here, before
    `serve` makes its --data, not met as "connection refused" (or as the
    driver's OverflowError, or its refusal once the lock is taken)."""
    if not text.strip():
        raise argparse.ArgumentTypeError("an empty URL: give a postgresql:// URL")
    # The scheme as the driver reads it (urllib), from the text before any
    # "/": the rest, unread, cannot make that raise.  Not quoted: text with
    # no scheme may be a user and password.
    if urllib.parse.urlsplit(text.partition("/")[0]).scheme not in STORE_URL_SCHEMES:
        raise argparse.ArgumentTypeError(
            "the store URL must start with postgresql:// (or postgres://): a libpq URL "
            "such as postgresql://accman@db1/accman")
    # The driver drops what follows a host's "]" but its port (`[::1]x:5433`
    # is [::1] on the default port), and refuses an unclosed "[" only once
    # serve has made its --data.
    if any(("[" in h or "]" in h) and BRACKETED_HOST_RE.fullmatch(h) is None
           for h in _url_hosts(text)):
        raise argparse.ArgumentTypeError(
            "the store URL has a host in brackets that is not closed, or is followed by more "
            "than ':PORT': an IPv6 address is written as in postgresql://[::1]:5432/accman")
    try:
        # The driver reads the URL with urllib before anything else, and
        # what urllib refuses it refuses only once serve has made its --data.
        urllib.parse.urlsplit(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            'the store URL cannot be read as a URL: a "[" or "]" of the user info is written '
            "%5B or %5D, a host in brackets is an IPv6 address, and the user info and host are "
            "plain ASCII") from None
    for p in _url_ports(text):
        if p.isascii() and p.isdigit() and 1 <= int(p) <= PORT_MAX:
            continue
        shown = repr(p) if p.isascii() and p.isdigit() and len(p) <= PORT_DIGITS_SHOWN \
            else "that is not a number"
        raise argparse.ArgumentTypeError(
            f'the store URL has a port {shown}: a port is 1..{PORT_MAX} (write a "/", ":" '
            f'or "@" of the user info as %2F, %3A or %40)')
    return text


def _url_hosts(url: str) -> list[str]:
    """The hosts of a libpq URL, each with its port: `h1:5432,[::1]:5433`."""
    authority_path = url.partition("://")[2].partition("?")[0]
    return authority_path.partition("/")[0].rpartition("@")[2].split(",")


def _url_ports(url: str) -> list[str]:
    """The ports a libpq URL names (percent-decoded): in its hosts
    (`h1:5432,[::1]:5433`) and in a `port=` parameter (a list, one a
    host).  An empty one is the default port."""
    query = url.partition("://")[2].partition("?")[2]
    ports = []
    for host in _url_hosts(url):
        tail = host.rpartition("]")[2] if host.startswith("[") else host
        if ":" in tail:
            ports.append(urllib.parse.unquote(tail.rpartition(":")[2]))
    for param in query.split("&"):
        name, _, value = param.partition("=")
        if urllib.parse.unquote(name) == "port":
            ports.extend(urllib.parse.unquote(value).split(","))
    return [p for p in ports if p]


def data_dir(text):
    """--data: a directory's path; an empty one would be the current
    directory, made 0700 and filled with a store."""
    if not text:
        raise argparse.ArgumentTypeError("an empty path: give the data directory's path")
    return text


def _plain_int(text, most: int, what: str) -> int:
    """0..most in plain ASCII digits, without leading zeros (as the SPEC
    writes its numbers): `--port 08080` is a typo, not port 8080."""
    if (not text.isascii() or not text.isdigit() or len(text) > len(str(most))
            or (text != "0" and text.startswith("0")) or int(text) > most):
        raise argparse.ArgumentTypeError(
            f"invalid {what} {text!r}: a whole number from zero to {most}, in plain digits")
    return int(text)


def port(text):
    """--port: 0 (any free port) .. PORT_MAX."""
    return _plain_int(text, PORT_MAX, "port")


def nice(text):
    """A nice value to lower a thread to: 0 (not lowered) .. NICE_MAX."""
    return _plain_int(text, NICE_MAX, "nice value")
