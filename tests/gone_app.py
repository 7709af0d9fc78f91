"""A bare ASGI app behind the middleware, for tests/test_e2e_gone.py, run
under uvicorn: consumers that go away before the response.  ACCMAN_URL,
ACCMAN_TOKEN and ACCMAN_MODE configure it.

Every route but /seen takes `id` (the test's name for the request):

- /work?s=S reads the request body whole (noting each message: "body N
  more" for N bytes with more to come, "body N" for the last), works S
  seconds and answers, never reading `receive()` again;
- /listen?s=S reads the body, works S seconds, reads `receive()` once
  more and answers (to nobody, once the consumer has gone);
- /idle?s=S never reads `receive()` at all, not even the body: notes
  "started", works S seconds and answers;
- /at_once answers as it starts, awaiting nothing before its response
  (notes "started"): the middleware's watch gets no turn from it.

/seen?id=ID (exempt) answers, as a JSON list, what the app did for that
request so far: its body messages, the type of each later message it
read, "answered" once its response has gone to the server."""

import asyncio
import json
import os
from urllib.parse import parse_qs

from accman.asgi import AccManMiddleware

SEEN: dict = {}


async def body(receive, seen: list) -> None:
    while True:
        message = await receive()
        assert message["type"] == "http.request", message
        more = message.get("more_body", False)
        seen.append(f"body {len(message.get('body', b''))}" + (" more" if more else ""))
        if not more:
            return


async def answer(send, status=200, text=b"done") -> None:
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(text)).encode())]})
    await send({"type": "http.response.body", "body": text})


async def service(scope, receive, send):
    if scope["type"] != "http":
        return                      # no lifespan: the middleware answers it
    query = {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}
    if scope["path"] == "/seen":
        return await answer(send, text=json.dumps(SEEN.get(query["id"], [])).encode())
    seen = SEEN.setdefault(query["id"], [])
    if scope["path"] == "/at_once":
        seen.append("started")
        await answer(send)
        seen.append("answered")
        return
    if scope["path"] == "/idle":
        seen.append("started")
    else:
        await body(receive, seen)
    await asyncio.sleep(float(query.get("s", "0")))
    if scope["path"] == "/listen":
        seen.append((await receive())["type"])
    await answer(send)
    seen.append("answered")


app = AccManMiddleware(service, url=os.environ["ACCMAN_URL"],
                       token=os.environ.get("ACCMAN_TOKEN") or None, cost=2,
                       mode=os.environ.get("ACCMAN_MODE", "check"), exempt=("/seen",))
