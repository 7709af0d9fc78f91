"""An example paid API: a Starlette app charged per request through AccMan.
examples/README.md runs it; in short, from the repository root:

    .venv/bin/accman serve --port 8035 --data ./example-data &
    ACCMAN_URL=http://127.0.0.1:8035 .venv/bin/uvicorn examples.app:app --port 8000
    curl -H "ACCMAN: $CRED" localhost:8000/weather           # 1 per call
    curl -H "ACCMAN: $CRED" "localhost:8000/report?rows=25"  # 1 per started 10 rows

Configuration comes from the environment: ACCMAN_URL (default
http://127.0.0.1:8035), ACCMAN_TOKEN (unset: no token, for a server without
tokens on loopback; else a token with the read and charge roles),
ACCMAN_MODE ("check" or "reserve"), ACCMAN_ON_UNAVAILABLE ("closed" or
"open") and ACCMAN_HOLD_TTL_S (reserve mode only: how long a hold lives if
nothing settles it; default 90; set in check mode, which holds nothing, it
stops the app at start).  A variable set but empty is unset.
"""

import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from accman.asgi import AccManMiddleware
from accman.calling.arguments import plain_decimal

REPORT_ROWS_MAX = 100       # a report has at most 100 rows, so costs at most 10


async def health(_request):
    return PlainTextResponse("ok")


async def weather(_request):
    return JSONResponse({"city": "Lisbon", "temp_c": 21})


async def report(request):
    text = request.query_params.get("rows", "10")
    if not (text.isascii() and text.isdigit() and 1 <= int(text) <= REPORT_ROWS_MAX):
        return JSONResponse({"error": f"rows must be 1 to {REPORT_ROWS_MAX}"}, status_code=400)
    rows = int(text)
    return JSONResponse({"rows": list(range(rows))}, headers={"x-rows": str(rows)})


def report_cost(_scope, status, headers):
    """Before the app runs (status None): the most a report can cost, which
    is what the balance must cover and what reserve mode holds.  After: 1 per
    started 10 rows.  A refused request (400) is not charged at all: the
    middleware charges only responses under 400 (`charge_below`)."""
    if status is None:
        return REPORT_ROWS_MAX // 10
    rows = int(dict(headers).get(b"x-rows", b"0"))
    return (rows + 9) // 10


def env(name: str, default: str) -> str:
    """An environment variable; an empty one is unset, as the command line
    and the Node example take it (`ACCMAN_MODE=` in an env file)."""
    return os.environ.get(name) or default


def hold_ttl_s() -> int | None:
    """ACCMAN_HOLD_TTL_S in plain digits, read as the command line reads a
    number (int() would take "+90", " 90" and "9_0"), or None when unset:
    the middleware's default.  The middleware checks its range, and refuses
    it in check mode, where it would go unused."""
    text = env("ACCMAN_HOLD_TTL_S", "")
    if not text:
        return None
    value = plain_decimal(text)
    if value is None:
        raise ValueError(f"ACCMAN_HOLD_TTL_S must be whole seconds in plain digits, not {text!r}")
    return value


async def metrics(_request):
    return PlainTextResponse(app.render_metrics())


# The service as it was before it was paid for (bench/bench_asgi.py times
# both), and the paid one.
service = Starlette(routes=[
    Route("/health", health),
    Route("/metrics", metrics),
    Route("/weather", weather),
    Route("/report", report),
])

app = AccManMiddleware(
    service,
    url=env("ACCMAN_URL", "http://127.0.0.1:8035"),
    token=os.environ.get("ACCMAN_TOKEN") or None,     # unset or empty: no token
    cost=1,
    mode=env("ACCMAN_MODE", "check"),
    on_unavailable=env("ACCMAN_ON_UNAVAILABLE", "closed"),
    exempt=("/health", "/metrics"),
    prices={"/report": report_cost},
    hold_ttl_s=hold_ttl_s(),
)
