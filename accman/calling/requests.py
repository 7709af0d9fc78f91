"""Requests: the values of a call checked against the SPEC before anything
is sent, and the request bytes built from them.  No I/O.

A value outside the SPEC's rules is refused here with `BadRequest` (or a
`TypeError` for a value of the wrong type), so nothing odd ever reaches the
wire; a credential is never echoed in the message, since it is a secret."""

from __future__ import annotations

import ipaddress
import re
import ssl
from urllib.parse import urlsplit

from accman.errors import BadRequest
from accman.limits import (CRED_CHARS_MAX, EVENTS_LIMIT_MAX, EVENTS_WAIT_S_MAX, HOLD_TTL_S_MAX,
                           INT64_MAX, INT64_MIN, KEY_CHARS_MAX, PAST_LIMIT_MAX)

_NAME_RE = re.compile(r"[A-Za-z0-9_-]+")
_TOKEN_RE = re.compile(r"[A-Za-z0-9._~+/-]+=*")     # RFC 6750 b64token
_PREFIX_RE = re.compile(r"(/[A-Za-z0-9._~-]+)+")
# A host as it goes into the Host header and to the resolver: a DNS name, an
# IPv4 address, or an IPv6 one (without a zone: url_fault).  ASCII only: the
# request line and headers are ASCII, so an internationalized name is written
# in its IDNA form (xn--...); a "%" is no part of any (`127.0.0.%31`).
_HOST_RE = re.compile(r"[A-Za-z0-9._:-]+")
# A name's labels: 1 to 63 characters each (RFC 1035 2.3.4), the root's dot
# at most at its end.  The resolver's IDNA step refuses anything else with a
# bare UnicodeError, and a name of only the root's dot would reach TLS as ""
# (asyncio then checks no name at all).  An IPv6 literal has no labels.
_LABELS_RE = re.compile(r"(?:[^.]{1,63}\.)*[^.]{1,63}\.?")


def check_name(value, what: str, chars_max: int) -> str:
    """A credential or key: 1 to `chars_max` of A-Z a-z 0-9 _ -."""
    if not isinstance(value, str):
        raise TypeError(f"{what} must be a str")
    if not 1 <= len(value) <= chars_max or _NAME_RE.fullmatch(value) is None:
        # The value is never echoed: it may be a live credential.
        raise BadRequest(f"{what} must be 1 to {chars_max} characters from A-Z a-z 0-9 _ -")
    return value


def check_int(value, what: str, low: int = INT64_MIN, high: int = INT64_MAX) -> int:
    """An int (not a bool) from `low` to `high`, as a plain int: what an
    int subclass's own comparisons or __str__ say never reaches the wire
    (`int.__index__` of the base type reads the value itself)."""
    if isinstance(value, bool) or not isinstance(value, int):
        raise TypeError(f"{what} must be an int")
    value = int.__index__(value)
    if not low <= value <= high:
        raise BadRequest(f"{what} must be between {low} and {high}")
    return value


def target_tot(cred) -> str:
    return "/tot?cred=" + check_name(cred, "cred", CRED_CHARS_MAX)


def target_mod(cred, by, min, key, low=None) -> str:
    target = "/mod?cred=" + check_name(cred, "cred", CRED_CHARS_MAX)
    by = check_int(by, "by")
    if by == 0:
        raise BadRequest("by must not be 0")
    target += f"&by={by}"
    if min is not None:
        target += f"&min={check_int(min, 'min')}"
    if key is not None:
        target += "&key=" + check_name(key, "key", KEY_CHARS_MAX)
    if low is not None:
        low = check_int(low, "low")
        if by < 0:
            # SPEC "Routes": the threshold is the funding side's to set.
            raise BadRequest("low is set by a funding mod only (by > 0), not by a charge")
        target += f"&low={low}"
    return target


def check_hold_amount(by: int) -> None:
    """A hold's negative `by` is not -2^63: its end would give back 2^63,
    past the range (the server's 400, said before sending)."""
    if by == INT64_MIN:
        raise BadRequest(f"by must be from {-INT64_MAX} to -1 for a hold: the amount it "
                         "takes is a signed 64-bit integer")


def target_hold(cred, by, ttl_s, min, key) -> str:
    """SPEC "Holds": `by` is negative, the amount taken out of the balance."""
    target = "/hold?cred=" + check_name(cred, "cred", CRED_CHARS_MAX)
    by = check_int(by, "by")
    if by >= 0:
        raise BadRequest("by must be negative for a hold: the amount it takes out of "
                         "the balance")
    check_hold_amount(by)
    target += f"&by={by}&ttl={check_int(ttl_s, 'ttl_s', 1, HOLD_TTL_S_MAX)}"
    if min is not None:
        target += f"&min={check_int(min, 'min')}"
    if key is not None:
        target += "&key=" + check_name(key, "key", KEY_CHARS_MAX)
    return target


def target_settle(cred, hold, use) -> str:
    """SPEC "Holds": `use` is 0 to the held amount, which only the server
    knows; here it is checked to be 0 or more."""
    return (f"/settle?cred={check_name(cred, 'cred', CRED_CHARS_MAX)}"
            f"&hold={check_int(hold, 'hold', 1)}&use={check_int(use, 'use', 0)}")


def target_events(after, limit, wait_s) -> str:
    """SPEC "Events": `wait_s` is whole seconds (the wire's numbers are
    integers)."""
    target = f"/events?after={check_int(after, 'after', 0)}"
    if limit is not None:
        target += f"&limit={check_int(limit, 'limit', 1, EVENTS_LIMIT_MAX)}"
    if wait_s is not None:
        target += f"&wait={check_int(wait_s, 'wait_s', 0, EVENTS_WAIT_S_MAX)}"
    return target


def target_past(cred, limit, before) -> str:
    target = "/past?cred=" + check_name(cred, "cred", CRED_CHARS_MAX)
    if limit is not None:
        target += f"&limit={check_int(limit, 'limit', 1, PAST_LIMIT_MAX)}"
    if before is not None:
        target += f"&before={check_int(before, 'before', 1)}"
    return target


# The authority of a URL: what follows "scheme://" up to its path, query or
# fragment (urllib's split); its host and port, what follows any user info.
_AUTHORITY_RE = re.compile(r"[^:/?#]*://([^/?#]*)")
# A host in brackets, and the port after it if any: nothing else may follow
# the "]" (urllib, and so asyncpg for a store URL, keeps only the bracketed
# text and the port, and drops the rest without a word: `[::1]x:80` would
# call [::1]:80).
BRACKETED_HOST_RE = re.compile(r"\[([^\[\]]+)\](?::[^:]*)?")
# A space, or an ASCII or Latin-1 control character.
_SPACE_OR_CONTROL_RE = re.compile(r"[\x00-\x20\x7f-\x9f]")
# An example of what the client's URL looks like, for its refusals.
CLIENT_URL_EXAMPLE = "http://127.0.0.1:8080 or http://[::1]:8080"


def url_fault(url: str) -> str | None:
    """What is wrong with the text of an AccMan URL that urllib would
    refuse in its own words, some of which quote the URL, user info and
    password included, or take with part of it dropped; None when
    Endpoint's own checks are next.  The words never quote the URL."""
    if _SPACE_OR_CONTROL_RE.search(url):
        return ("it holds a space or a control character: urllib drops a tab or a line break "
                "wherever it is (`:2<TAB>3001` would be port 23001) and leading spaces")
    m = _AUTHORITY_RE.match(url)
    authority = m.group(1) if m else ""
    host = authority.rpartition("@")[2]
    if ("[" in authority) != ("]" in authority):
        return ("its host has a '[' without a ']' or a ']' without a '[': an IPv6 address is "
                f"written in brackets, as in {CLIENT_URL_EXAMPLE}")
    if "[" in host:
        b = BRACKETED_HOST_RE.fullmatch(host)
        if b is None:
            return ("its host in brackets is followed by something other than ':PORT', as in "
                    f"{CLIENT_URL_EXAMPLE}")
        if "%" in b.group(1):
            # A zone (RFC 6874 "%25eth0") is an interface of this machine: the
            # resolver is given "%25..." undecoded, and every call would fail.
            return ("its host names an IPv6 zone, which is not taken (nor by the Node client "
                    "or --webhook): give the address alone")
        try:
            ipaddress.IPv6Address(b.group(1))
        except ValueError:
            return f"its host in brackets is not an IPv6 address, as in {CLIENT_URL_EXAMPLE}"
    try:
        urlsplit(url)
    except ValueError:
        if not authority.isascii():     # a character that NFKC makes one of "/?#@:"
            return ("its host and user info must be plain ASCII: write an internationalized "
                    "name in its xn-- (IDNA) form")
        return f"it is not a URL such as {CLIENT_URL_EXAMPLE}"
    return None


class Endpoint:
    """The parsed base URL, the name TLS is given (`tls_name`, None for
    http), and the constant tail of every request (the Host header and the
    token).  `where` names the server in messages; it never
    holds the token."""

    def __init__(self, url: str, token: str | None):
        if not isinstance(url, str):
            raise TypeError(f"the AccMan url must be a str such as 'http://127.0.0.1:8035', "
                            f"not {type(url).__name__}")
        fault = url_fault(url)
        if fault is not None:
            raise ValueError(f"the AccMan url cannot be used: {fault}")
        parts = urlsplit(url)
        if parts.scheme not in ("http", "https"):
            raise ValueError("the AccMan url must start with http:// or https://")
        if parts.query or parts.fragment or parts.username or parts.password:
            raise ValueError("the AccMan url takes no query, fragment or userinfo")
        if not parts.hostname:
            raise ValueError("the AccMan url has no host")
        if _HOST_RE.fullmatch(parts.hostname) is None or (
                ":" not in parts.hostname and _LABELS_RE.fullmatch(parts.hostname) is None):
            raise ValueError("the AccMan url's host must be ASCII: a name (labels of 1 to 63 "
                             "characters), or an IP address; write an internationalized name "
                             "in its xn-- (IDNA) form")
        self.host = parts.hostname
        self.tls = parts.scheme == "https"
        # The name TLS is given, as the SNI name and the name the certificate
        # is checked for: the host without the root's dot (RFC 6066 3; a
        # certificate names `accman.example` for `accman.example.`).  The
        # connection and the Host header keep the host as written.
        self.tls_name = self.host.removesuffix(".") if self.tls else None
        self.port = _port(parts) or (443 if self.tls else 80)
        self.prefix = parts.path.rstrip("/")
        if self.prefix and _PREFIX_RE.fullmatch(self.prefix) is None:
            raise ValueError("the AccMan url path must be plain ASCII segments")
        host = f"[{self.host}]" if ":" in self.host else self.host
        if _port(parts) is not None:
            host += f":{self.port}"
        self.where = f"{parts.scheme}://{host}{self.prefix}"
        tail = f" HTTP/1.1\r\nHost: {host}\r\n"
        # An empty token is no token, as None is: ACCMAN_TOKEN set but empty
        # names a server without tokens (docs/CALLING.md; the Node client agrees).
        if token is not None and not isinstance(token, str):
            raise TypeError(f"the token must be a str or None, not {type(token).__name__}")
        if token is not None and token != "":
            if _TOKEN_RE.fullmatch(token) is None:
                raise ValueError("the token must be an RFC 6750 b64token: letters, digits and "
                                 "- . _ ~ + /, with = only at its end (an empty token is none)")
            tail += f"Authorization: Bearer {token}\r\n"
        self.tail = tail + "\r\n"

    def request(self, method: str, target: str) -> bytes:
        """`method` ends with its space: "GET " or "PATCH "."""
        return (method + self.prefix + target + self.tail).encode("ascii")


def endpoint_fault(url: str) -> str | None:
    """What is wrong with `url` as an AccMan URL, urllib's faults
    (`url_fault`) and Endpoint's alike, in words that never quote it; None
    when nothing is."""
    fault = url_fault(url)
    if fault is None:
        try:
            Endpoint(url, None)
        except ValueError as e:
            fault = str(e)
    return fault


def check_ssl_context(ssl_context, ep: Endpoint) -> None:
    """A caller's own TLS trust: an `ssl.SSLContext`, used as given for an
    https url (None: the default context).  With an http url it would be
    silently unused, so it is refused."""
    if ssl_context is None:
        return
    if not isinstance(ssl_context, ssl.SSLContext):
        raise TypeError(f"ssl_context must be an ssl.SSLContext or None, "
                        f"not {type(ssl_context).__name__}")
    if not ep.tls:
        raise ValueError(f"ssl_context is for an https:// url; {ep.where} is http://, "
                         f"where it would not be used")


def _port(parts):
    """The URL's port, or None when it names none."""
    try:
        port = parts.port
    except ValueError:
        port = 0
    if port == 0:
        raise ValueError("the AccMan url's port must be a number from 1 to 65535")
    return port


__all__ = ["Endpoint", "check_ssl_context", "check_name", "check_int", "target_tot", "target_mod",
           "target_past", "target_hold", "target_settle", "target_events"]
