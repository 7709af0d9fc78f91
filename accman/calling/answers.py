"""What the middleware itself sends the consumer (accman.calling.asgi): its
refusals, short JSON errors in the SPEC's shape, and the balance header on
the app's response start.  No I/O but the ASGI `send` it is given."""

from __future__ import annotations

import json

_JSON = (b"content-type", b"application/json")


async def refuse(send, status: int, code: str, detail: str, headers=(), extra=None):
    obj = {"error": code, "detail": detail}
    if extra:
        obj.update(extra)
    body = json.dumps(obj, separators=(",", ":")).encode()
    await send({"type": "http.response.start", "status": status,
                "headers": [_JSON, (b"content-length", str(len(body)).encode()), *headers]})
    await send({"type": "http.response.body", "body": body})


async def refuse_unavailable(send):
    # Whatever the cause (AccMan unreachable, down, or refusing this
    # service's token): the consumer can do nothing but retry, and the
    # service's log names the cause.
    await refuse(send, 503, "unavailable", "the balance service is unavailable",
                 [(b"retry-after", b"1")])


def with_tot(message, header: bytes, tot):
    """The response start `message` with `header: tot` in place of any the
    app set; without the header when `tot` is None (no reply told the
    balance): the app's own (relayed from another service metered by
    AccMan, say) would stand for a balance nobody told, and the header is
    missing rather than wrong, as the Node plugin drops the handler's."""
    headers = [h for h in message.get("headers", ()) if h[0].lower() != header]
    if tot is not None:
        headers.append((header, str(tot).encode()))
    message = dict(message)
    message["headers"] = headers
    return message


__all__ = ["refuse", "refuse_unavailable", "with_tot"]
