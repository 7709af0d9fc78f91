"""One webhook POST over HTTP/1.1: the receiver's URL checked, the
request's bytes, the reply's status.  The webhook deliverer
(accman/server/webhooks.py) is the only caller; this and connection.py are
the only server code that touches sockets.

A delivery is one POST at a time to one URL, and only the reply's status
counts, so this is the stdlib's asyncio streams and a few lines, not an HTTP
client library: the request is written in one piece with `Connection:
close`, the reply is read up to the end of its head (bounded), and the
connection is closed.  No redirect is followed and no proxy variable of the
environment reroutes a signed body (an HTTP library does both by default).

`parse_url` and `parse_status` do no I/O; `post` does, and `describe` is the
one place where what a failed attempt raised becomes a sentence.
"""

from __future__ import annotations

import asyncio
import ipaddress
import re
import socket
import ssl
from typing import NamedTuple
from urllib.parse import urlsplit

from accman.deadline import within
from accman.errors import WebhookBadReply

SCHEMES = {"http": 80, "https": 443}
# A host name (RFC 1123 labels) or an IPv4 address; IPv6 literals are
# checked with ipaddress.
_HOST_RE = re.compile(r"[a-z0-9]([a-z0-9-]*[a-z0-9])?(\.[a-z0-9]([a-z0-9-]*[a-z0-9])?)*\.?",
                      re.ASCII)
# A host's last label that makes it an IPv4 address, in some form
# (decimal, or hex as resolvers take it: 0x7f.1 is 127.0.0.1).
_NUMBER_LABEL_RE = re.compile(r"[0-9]+|0x[0-9a-f]*", re.ASCII)
# What a request target's path and query may hold (RFC 3986 3.3, 3.4): the
# unreserved and sub-delims characters, ":", "@", "/", "?" and %XX escapes.
# Anything else (a quote, "<", "{", "|", a backslash, a "%" without two hex
# digits) is not a URI, and a receiver may refuse it with a 400 forever.
_TARGET_RE = re.compile(r"(?:[A-Za-z0-9._~!$&'()*+,;=:@/?-]|%[0-9A-Fa-f]{2})*", re.ASCII)
_STATUS_RE = re.compile(rb"HTTP/1\.[01] ([1-5][0-9][0-9])(?: [^\r\n]*)?", re.ASCII)
# Interim (1xx) replies read before the final one: a receiver has no reason
# to send any, since no request says Expect.
INTERIM_REPLIES_MAX = 4
# A reply whose lines end in LF alone, which RFC 9112 2.2 lets a recipient
# refuse: refused, and said so.
BARE_LF = "the receiver's reply ends its lines in a bare LF, not CRLF"


class Target(NamedTuple):
    """Where a POST goes: from a URL that parse_url accepted."""

    scheme: str         # "http" or "https"
    host: str           # a name or an address, without brackets
    port: int
    path: str           # the request target: path and query
    host_header: str    # the Host header's value

    @property
    def where(self) -> str:
        """Host and port, for a log line: never the path or the query,
        which may carry the receiver's own secret."""
        host = f"[{self.host}]" if ":" in self.host else self.host
        return f"{self.scheme}://{host}:{self.port}"


# A host in brackets, and its port if any: what a URL's authority may be
# when it holds a "[".
_BRACKETED_RE = re.compile(r"\[[^\[\]]+\](?::[0-9]*)?")


def parse_url(url: str) -> Target:
    """The Target of an http:// or https:// URL; raises ValueError saying
    what is wrong with it, as the end of a sentence that starts "the URL"."""
    if not url.isascii() or any(c <= " " or c == "\x7f" for c in url):
        raise ValueError("must be ASCII, without spaces or control characters")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError:
        raise ValueError("does not parse (a bad port or IPv6 address?)") from None
    scheme = parts.scheme.lower()
    if scheme not in SCHEMES:
        raise ValueError("must start with http:// or https://")
    if "@" in parts.netloc:
        raise ValueError("must carry no user or password: the signature "
                         "authenticates AccMan to the receiver")
    if parts.fragment or url.endswith("#"):
        raise ValueError("must have no #fragment")
    host = parts.hostname or ""
    if ("[" in parts.netloc or "]" in parts.netloc) and (
            ":" not in host or _BRACKETED_RE.fullmatch(parts.netloc) is None):
        # urllib keeps the bracketed text and the port, and drops what else
        # follows the "]" without a word (`[::1]x:80` would be [::1]:80);
        # a name in brackets (`[v1.x]`) it gives as a name.
        raise ValueError("has a host in brackets that is not an IPv6 address followed by "
                         "nothing but its :PORT")
    _check_host(host)
    if port == 0:
        raise ValueError("has port 0")
    if port is None and parts.netloc.endswith(":"):
        raise ValueError("has a ':' without a port")
    path = parts.path or "/"
    if parts.query or url.endswith("?"):
        path += "?" + parts.query
    _check_target(path)
    host_header = parts.netloc.lower()
    return Target(scheme, host, port or SCHEMES[scheme], path, host_header)


def _check_target(path: str) -> None:
    bad = path[_TARGET_RE.match(path).end():]
    if bad.startswith("%"):
        raise ValueError(f"has a '%' not followed by two hex digits: {bad[:3]!r}")
    if bad:
        raise ValueError(f"has {bad[0]!r} in its path or query, which a URI does not "
                         f"take as it is: write it as %{ord(bad[0]):02X}")


def _check_host(host: str) -> None:
    if not host:
        raise ValueError("has no host")
    if ":" in host:
        if "%" in host:
            # A zone (RFC 6874 "%25eth0", or a bare "%eth0") names an
            # interface of this host, which the receiver's Host header must
            # not carry; "%25..." never resolves, so it would fail forever.
            raise ValueError(f"has an IPv6 zone, which is not taken: [{host}]")
        try:
            ipaddress.IPv6Address(host)
        except ValueError:
            raise ValueError(f"has a host that is not an IPv6 address: [{host}]") from None
    elif _HOST_RE.fullmatch(host) is None:
        raise ValueError(f"has a host that is not a name or an address: {host}")
    elif _NUMBER_LABEL_RE.fullmatch(host.rstrip(".").rsplit(".", 1)[-1]):
        # A name's last label is never a number (RFC 3696 2): this is an
        # IPv4 address, and only its four-part dotted decimal form is taken.
        try:
            ipaddress.IPv4Address(host)
        except ValueError:
            raise ValueError(f"has a host that is not an IPv4 address: {host}") from None


def request_head(target: Target, body_bytes: int, headers) -> bytes:
    """The request's head, for a body of `body_bytes`; `headers` are more
    (name, value) pairs of ASCII text."""
    lines = [f"POST {target.path} HTTP/1.1", f"Host: {target.host_header}",
             f"Content-Length: {body_bytes}", "Connection: close"]
    lines += [f"{name}: {value}" for name, value in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("ascii")


def parse_status(head: bytes) -> int:
    """The status code of a reply head (its status line first); raises
    WebhookBadReply."""
    line = head.split(b"\r\n", 1)[0]
    m = _STATUS_RE.fullmatch(line)
    if m is None:
        raise WebhookBadReply("the reply does not start with an HTTP/1.1 status line")
    return int(m.group(1))


async def post(target: Target, request: bytes, *, timeout_s: float, head_bytes_max: int,
               ssl_context: ssl.SSLContext | None) -> int:
    """Sends `request` (head and body) and returns the final reply's status.
    `timeout_s` bounds the whole attempt: the connection (TLS included),
    the request sent, and every reply head read to its end, interim ones
    too; `head_bytes_max` bounds each head.
    Raises what `describe` explains: OSError, asyncio.TimeoutError (no
    reply), WebhookBadReply (a timeout before the connection is made, or
    in the middle of a reply head, is one too), asyncio.IncompleteReadError,
    asyncio.LimitOverrunError."""
    # How far the attempt got, so that its timeout says what did not come:
    # the connection (a host that drops packets, a TLS handshake never
    # answered), the reply, or the end of a head some bytes of which came.
    progress = _Progress()
    try:
        async with within(timeout_s):
            return await _exchange(target, request, head_bytes_max, ssl_context, progress)
    except asyncio.TimeoutError:
        if not progress.connected:
            what = "no TLS connection" if target.scheme == "https" else "no connection"
            raise WebhookBadReply(f"{what} within {timeout_s:g} s") from None
        if progress.began:
            raise WebhookBadReply(f"the reply's head did not end (a blank line) within "
                                  f"{timeout_s:g} s") from None
        if progress.interim:
            raise WebhookBadReply(f"no final reply within {timeout_s:g} s, after an "
                                  f"interim (1xx) one") from None
        raise


class _Progress:
    """How far one attempt got: connected (TLS included), whether an
    interim (1xx) reply came, and whether the reply head being read has
    begun (a byte of it came)."""

    __slots__ = ("connected", "interim", "began")

    def __init__(self):
        self.connected = False
        self.interim = False
        self.began = False


async def _exchange(target, request, head_bytes_max, ssl_context, progress) -> int:
    tls = ssl_context if target.scheme == "https" else None
    # TLS names the host without the root's dot (RFC 6066 3, the SNI name;
    # a certificate names `hooks.example` for `hooks.example.`).
    tls_name = target.host.removesuffix(".") if tls else None
    reader, writer = await asyncio.open_connection(
        target.host, target.port, ssl=tls, server_hostname=tls_name, limit=head_bytes_max)
    progress.connected = True
    try:
        writer.write(request)
        await writer.drain()
        for _ in range(INTERIM_REPLIES_MAX + 1):
            status = parse_status(await _read_head(reader, head_bytes_max, progress))
            if status >= 200:
                return status
            if status == 101:
                raise WebhookBadReply("the receiver switched protocols")
            progress.interim = True
        raise WebhookBadReply(f"more than {INTERIM_REPLIES_MAX} interim (1xx) replies")
    finally:
        # Nothing more is read: the body of the reply does not matter.
        writer.close()


async def _read_head(reader: asyncio.StreamReader, head_bytes_max: int,
                     progress: _Progress) -> bytes:
    """One reply head, up to and with its blank line, of at most
    `head_bytes_max` bytes; `progress.began` once its first byte came (a
    timeout after it is a head that did not end).  Read a line at a time
    so that a line ending in a bare LF is refused as it comes (RFC 9112
    2.2 lets a recipient refuse it): a receiver that keeps its connection
    open after such a reply is told what is wrong at once, not after the
    attempt's timeout as if it never answered.  Raises WebhookBadReply,
    and what `describe` explains of a head cut short or too long."""
    lines, head_bytes = [], 0
    progress.began = False
    while True:
        first = b""
        try:
            if not progress.began:      # a status line begun and never ended has begun
                first = await reader.readexactly(1)
                progress.began = True
            line = first if first == b"\n" else first + await reader.readuntil(b"\n")
        except asyncio.IncompleteReadError as e:
            # What came of the whole head, for `describe` to say.
            raise asyncio.IncompleteReadError(b"".join(lines) + first + e.partial, None) from None
        if not line.endswith(b"\r\n"):
            raise WebhookBadReply(BARE_LF)
        lines.append(line)
        head_bytes += len(line)
        if head_bytes > head_bytes_max:
            raise asyncio.LimitOverrunError("the reply's head is over its bound", head_bytes)
        if line == b"\r\n":
            return b"".join(lines)


def describe(exc: BaseException, timeout_s: float, head_bytes_max: int) -> str:
    """What a failed attempt's exception means, in a few words that name
    no secret and no path of the receiver; a bound reached is named, as
    SERVER.md's Limits name it."""
    if isinstance(exc, asyncio.TimeoutError):
        return f"no reply within {timeout_s:g} s"
    if isinstance(exc, asyncio.LimitOverrunError):
        return f"the reply's head is over WEBHOOK_REPLY_HEAD_BYTES_MAX ({head_bytes_max} bytes)"
    if isinstance(exc, asyncio.IncompleteReadError):
        return _cut_short(exc.partial)
    if isinstance(exc, WebhookBadReply):
        return str(exc)
    if isinstance(exc, ssl.SSLCertVerificationError):
        return f"the receiver's TLS certificate is not trusted ({exc.verify_message})"
    if isinstance(exc, ssl.SSLError):
        return f"TLS failed ({exc.reason or type(exc).__name__})"
    if isinstance(exc, socket.gaierror):
        return "the receiver's host name does not resolve"
    if isinstance(exc, ConnectionRefusedError):
        return "connection refused"
    if isinstance(exc, ConnectionResetError):
        return "connection reset"
    if isinstance(exc, OSError):
        return exc.strerror or type(exc).__name__
    return type(exc).__name__


def _cut_short(partial: bytes) -> str:
    """A reply whose head did not end before the receiver closed: said as
    what came, so that an operator whose receiver logs the 200 it sent is
    not told it never answered."""
    if not partial:
        return "the receiver closed the connection before its reply"
    return "the receiver closed the connection before its reply's head ended (a blank line)"
