"""The paid service of tests/reliability/test_calling_bank.py, run under
uvicorn in front of an AccMan that is SIGKILLed and restarted.

/work?a=A (a bare ASGI route behind the middleware) works for up to 20
ms (or `s` seconds) and answers 200 "done"; with `free=1` it answers
400, which is free.
Its estimate is A (the balance check mode needs, what reserve mode
holds), its charge A - 500 (FEE_BACK): the test gives every request of
an account its own A, so that a hold (by -A) or a check-mode charge (by
-(A - 500)) in the history names the request that made it.  /metrics
(exempt) answers the middleware's counters.
Each /work response's start is logged (stderr) as "calbank: response of
A=A for account F starts at T", F the credential's fingerprint and T
time.monotonic() as the app hands the start to the middleware, which
decides then whether to charge: the checker (callingcheck.py) compares T
with when a consumer that left closed its connection (the same clock:
CLOCK_MONOTONIC is the machine's, not the process's).

ACCMAN_URL, ACCMAN_TOKEN, ACCMAN_MODE, ACCMAN_ON_UNAVAILABLE and, in
reserve mode, ACCMAN_HOLD_TTL_S configure it."""

import asyncio
import os
import random
import sys
import time
from urllib.parse import parse_qs

from accman.asgi import AccManMiddleware, fingerprint

# What a request is charged under its estimate: every charge is A - 500,
# so a reserve-mode settle gives back exactly this much.
FEE_BACK = 500


def query(scope) -> dict:
    return {k: v[0] for k, v in parse_qs(scope["query_string"].decode()).items()}


def cost(scope, status, _headers) -> int:
    a = int(query(scope)["a"])
    return a if status is None else a - FEE_BACK


async def service(scope, receive, send):
    if scope["type"] != "http":
        return                      # no lifespan: the middleware answers it
    if scope["path"] == "/metrics":
        status, text = 200, app.render_metrics().encode()
    else:
        await receive()
        await asyncio.sleep(float(query(scope).get("s", random.uniform(0, 0.02))))
        status, text = (400, b"refused") if query(scope).get("free") == "1" else (200, b"done")
        cred = dict(scope["headers"]).get(b"accman", b"").decode()
        print(f"calbank: response of A={query(scope)['a']} for account {fingerprint(cred)} "
              f"starts at {time.monotonic():.6f}", file=sys.stderr, flush=True)
    await send({"type": "http.response.start", "status": status,
                "headers": [(b"content-type", b"text/plain"),
                            (b"content-length", str(len(text)).encode())]})
    await send({"type": "http.response.body", "body": text})


_mode = os.environ.get("ACCMAN_MODE", "check")
app = AccManMiddleware(service, url=os.environ["ACCMAN_URL"],
                       token=os.environ.get("ACCMAN_TOKEN") or None, cost=cost, mode=_mode,
                       exempt=("/metrics",),
                       on_unavailable=os.environ.get("ACCMAN_ON_UNAVAILABLE", "closed"),
                       hold_ttl_s=(int(os.environ["ACCMAN_HOLD_TTL_S"])
                                   if _mode == "reserve" else None))
