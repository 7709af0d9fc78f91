"""A paid service for tests/test_e2e_holds.py, run under uvicorn: reserve
mode with a short hold ttl, and a route that works for as long as it is
asked to, so that the service can be SIGKILLed mid-request with a hold
open.  ACCMAN_URL, ACCMAN_TOKEN and ACCMAN_HOLD_TTL_S configure it."""

import asyncio
import os

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from accman.asgi import AccManMiddleware


async def work(request):
    await asyncio.sleep(float(request.query_params.get("s", "0")))
    return PlainTextResponse("done")


app = AccManMiddleware(
    Starlette(routes=[Route("/work", work)]),
    url=os.environ["ACCMAN_URL"],
    token=os.environ.get("ACCMAN_TOKEN") or None,
    cost=3,
    mode="reserve",
    hold_ttl_s=int(os.environ["ACCMAN_HOLD_TTL_S"]),
)
