"""Reply bytes: status lines, headers and bodies, made without I/O.

Every reply has an exact Content-Length and a Date (RFC 9110 6.6.1), and
says how the exchange ends: nothing on HTTP/1.1 keep-alive (the default),
`Connection: close`, or `Connection: keep-alive` to an HTTP/1.0 client that
asked for it.  A reply is one `%` of a template cached per (status, mode,
extra headers, content type): `template % (date, len(body), body)`.  A HEAD
is answered with the same head and no body.  Each success body is built
here and nowhere else.
"""

from __future__ import annotations

import json
import time
from email.utils import formatdate

from accman.records import Entry, Event

REASONS = {
    100: b"Continue", 200: b"OK", 204: b"No Content", 400: b"Bad Request",
    401: b"Unauthorized", 403: b"Forbidden", 404: b"Not Found",
    405: b"Method Not Allowed", 408: b"Request Timeout", 409: b"Conflict",
    410: b"Gone", 411: b"Length Required", 413: b"Content Too Large",
    414: b"URI Too Long", 431: b"Request Header Fields Too Large",
    500: b"Internal Server Error", 501: b"Not Implemented",
    503: b"Service Unavailable", 505: b"HTTP Version Not Supported",
}

# How the reply ends the exchange.
KEEP, CLOSE, KEEP10 = 0, 1, 2
_CONNECTION_HEADERS = (b"", b"Connection: close\r\n", b"Connection: keep-alive\r\n")

JSON = b"application/json"
CONTINUE = b"HTTP/1.1 100 Continue\r\n\r\n"


class HttpDate:
    """The Date header's value, made at most once a second: `now` is read
    per reply, `refresh` is called by the server's clock."""

    __slots__ = ("now", "_second")

    def __init__(self):
        self._second = -1
        self.now = b""
        self.refresh()

    def refresh(self, t: float | None = None) -> None:
        second = int(time.time() if t is None else t)
        if second != self._second:
            self._second = second
            self.now = formatdate(second, usegmt=True).encode("ascii")


DATE = HttpDate()


def template(status: int, mode: int, content_type: bytes = JSON, extra: bytes = b"") -> bytes:
    """`template % (date, len(body), body)` is a whole reply."""
    head = (b"HTTP/1.1 %d %s\r\nContent-Type: %s\r\n"
            % (status, REASONS[status], content_type))
    head += _CONNECTION_HEADERS[mode] + extra
    return head.replace(b"%", b"%%") + b"Date: %b\r\nContent-Length: %d\r\n\r\n%b"


# The success templates, by mode: the hot paths format these directly.
T200 = tuple(template(200, mode) for mode in (KEEP, CLOSE, KEEP10))
T200_KEEP = T200[KEEP]

_TEMPLATES: dict = {}


def reply(status: int, body: bytes, mode: int, extra: bytes = b"",
          content_type: bytes = JSON, head: bool = False) -> bytes:
    key = (status, mode, extra, content_type)
    tmpl = _TEMPLATES.get(key)
    if tmpl is None:
        tmpl = _TEMPLATES[key] = template(status, mode, content_type, extra)
    return tmpl % (DATE.now, len(body), b"" if head else body)


def closing(made: bytes) -> bytes:
    """A final reply made before the server decided to close after it (a
    stop, Lifecycle.stop), remade to say so: its own word on the
    connection replaced by `Connection: close` (RFC 9112 9.6)."""
    head, sep, body = made.partition(b"\r\n\r\n")
    assert sep and not made.startswith(b"HTTP/1.1 1"), "closing() remakes a final reply"
    status, *fields = head.split(b"\r\n")
    kept = [f for f in fields if not f.lower().startswith(b"connection:")]
    return b"\r\n".join((status, _CONNECTION_HEADERS[CLOSE][:-2], *kept)) + sep + body


def no_content(mode: int, allow: str) -> bytes:
    """204 with Allow (OPTIONS): no body, so no Content-Type nor Length."""
    return (b"HTTP/1.1 204 No Content\r\n%bAllow: %b\r\nDate: %b\r\n\r\n"
            % (_CONNECTION_HEADERS[mode], allow.encode("ascii"), DATE.now))


def _json(doc) -> bytes:
    return json.dumps(doc, separators=(",", ":")).encode()


# Error bodies made, by their fields: most errors repeat (a 404, a 401, a
# value's rule), and a client that floods one costs a dict lookup a reply,
# not a JSON encoding.  Bounded; cleared when full.
ERROR_BODIES_MAX = 4096
_ERROR_BODIES: dict = {}


def error_body(code: str, detail: str, **extra) -> bytes:
    """SPEC "Errors": {"error": CODE, ..., "detail": "a sentence"}."""
    key = (code, detail, *extra.items())
    body = _ERROR_BODIES.get(key)
    if body is None:
        if len(_ERROR_BODIES) >= ERROR_BODIES_MAX:
            _ERROR_BODIES.clear()
        body = _ERROR_BODIES[key] = _json({"error": code, **extra, "detail": detail})
    return body


# --- success bodies, one function each -------------------------------------------

TOT_BODY = b'{"tot":%d}'                # `% tot`
MOD_BODY = b'{"tot":%d,"seq":%d}'       # `% (tot, seq)`: mod and settle
HOLD_BODY = b'{"hold":%d,"tot":%d,"seq":%d}'
HEALTH_BODY = b'{"healthy":true,"open_holds":%d}'


def entry_doc(e: Entry) -> dict:
    return {"seq": e.seq, "by": e.by, "tot": e.tot, "at": e.at, "key": e.key,
            "hold": e.hold}


def past_body(account: str, entries: list[Entry], nxt: int | None) -> bytes:
    return _json({"account": account, "past": [entry_doc(e) for e in entries],
                  "next": nxt})


def event_doc(e: Event) -> dict:
    return e._asdict()


def events_body(events: list[Event], nxt: int) -> bytes:
    return _json({"events": [event_doc(e) for e in events], "next": nxt})
