"""The harness of the middleware's tests: an ASGI request driven by hand
(`call`), a small app that answers, raises or waits (`make_app`), the
middleware against a fake AccMan (`mw`), the account's history as the
tests compare it (`history`, `entries`), and the end of an event loop a
test stopped unclosed (`end_loop`)."""

from __future__ import annotations

import asyncio
import json

from accman.asgi import AccManMiddleware

CRED = "alice_4f9a-SECRET"


class Reply:
    def __init__(self, messages):
        start = messages[0] if messages else {"type": "http.response.start", "status": None}
        assert start["type"] == "http.response.start"
        self.status = start["status"]
        self.headers = {k.decode(): v.decode() for k, v in start.get("headers", [])}
        self.body = b"".join(m.get("body", b"") for m in messages[1:])

    def json(self):
        return json.loads(self.body)


async def call(app, path="/thing", cred=CRED, headers=(), disconnect=False, later=None):
    """One GET through `app`: after its body, receive() answers
    `http.disconnect` (`disconnect`), what `await later()` gives, or
    nothing for an hour (a consumer waiting for its response)."""
    scope = http_scope(path, cred, headers)
    sent_body = False
    messages = []

    async def receive():
        nonlocal sent_body
        if not sent_body:
            sent_body = True
            return {"type": "http.request", "body": b"", "more_body": False}
        if disconnect:
            return {"type": "http.disconnect"}
        if later is not None:
            return await later()
        await asyncio.sleep(3600)

    async def send(message):
        messages.append(message)

    await app(scope, receive, send)
    return Reply(messages)


def http_scope(path="/thing", cred=CRED, headers=()) -> dict:
    """The scope of an HTTP/1.1 GET of `path` with `cred` and `headers`."""
    hs = [(k.encode(), v.encode()) for k, v in headers]
    if cred is not None:
        hs.append((b"accman", cred.encode()))
    return {"type": "http", "asgi": {"version": "3.0"}, "http_version": "1.1",
            "method": "GET", "scheme": "http", "path": path, "raw_path": path.encode(),
            "query_string": b"", "root_path": "", "headers": hs,
            "client": ("127.0.0.1", 5000), "server": ("127.0.0.1", 80)}


def make_app(status=200, body=b"ok", headers=(), raise_exc=None, read_disconnect=False,
             respond=True, calls=None):
    async def app(scope, receive, send):
        if calls is not None:
            calls.append(scope["path"])
        await receive()
        if read_disconnect:
            assert (await receive())["type"] == "http.disconnect"
        if raise_exc is not None:
            raise raise_exc
        if not respond:
            return
        await send({"type": "http.response.start", "status": status,
                    "headers": [(b"content-type", b"text/plain"), *headers]})
        await send({"type": "http.response.body", "body": body})
    return app


async def serve_lifespan(receive, send):
    """An app's side of the lifespan protocol: each message completed, to
    its shutdown."""
    while True:
        message = await receive()
        await send({"type": message["type"] + ".complete"})
        if message["type"] == "lifespan.shutdown":
            return


def mw(fake, app=None, **kw):
    kw.setdefault("url", fake.url)
    return AccManMiddleware(app or make_app(), **kw)


def history(fake, cred=CRED):
    return [(e["by"], e["key"][-2:] if e["key"] else None) for e in fake.accounts[cred]["past"]]


def entries(fake, cred=CRED):
    """The account's history as (by, the key's suffix, hold): a reserve-mode
    request is a hold (-h) and its end, which names the same hold."""
    return [(e["by"], e["key"][-2:] if e["key"] else None, e["hold"])
            for e in fake.accounts[cred]["past"]]


def end_loop(loop, close=True) -> None:
    """Ends the tasks an event loop stopped unclosed has left, as a loop's
    owner does before closing it (cancelled, then run to their end: a
    pending connect is otherwise never awaited), and closes it."""
    left = asyncio.all_tasks(loop)
    for task in left:
        task.cancel()
    if left:
        loop.run_until_complete(asyncio.gather(*left, return_exceptions=True))
    if close:
        loop.close()
