"""A bare ASGI 3 app behind the middleware, for tests/test_e2e_asgi.py: it
speaks no lifespan (it raises on any scope but http, as ASGI allows), and
its one route works for `s` seconds.  ACCMAN_URL and ACCMAN_TOKEN
configure it."""

import asyncio
import os
from urllib.parse import parse_qs

from accman.asgi import AccManMiddleware


async def work(scope, receive, send):
    assert scope["type"] == "http", "this app speaks http only"
    await receive()
    seconds = parse_qs(scope["query_string"].decode()).get("s", ["0"])[0]
    await asyncio.sleep(float(seconds))
    await send({"type": "http.response.start", "status": 200,
                "headers": [(b"content-type", b"text/plain")]})
    await send({"type": "http.response.body", "body": b"done"})


app = AccManMiddleware(work, url=os.environ["ACCMAN_URL"],
                       token=os.environ.get("ACCMAN_TOKEN") or None, cost=1)
