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
"open") and ACCMAN_HOLD_TTL_S (reserve mode: how long a hold lives if
nothing settles it; default 90).
"""

import os

from starlette.applications import Starlette
from starlette.responses import JSONResponse, PlainTextResponse
from starlette.routing import Route

from accman.asgi import HOLD_TTL_S_DEFAULT, AccManMiddleware

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
    url=os.environ.get("ACCMAN_URL", "http://127.0.0.1:8035"),
    token=os.environ.get("ACCMAN_TOKEN") or None,     # unset or empty: no token
    cost=1,
    mode=os.environ.get("ACCMAN_MODE", "check"),
    on_unavailable=os.environ.get("ACCMAN_ON_UNAVAILABLE", "closed"),
    exempt=("/health", "/metrics"),
    prices={"/report": report_cost},
    hold_ttl_s=int(os.environ.get("ACCMAN_HOLD_TTL_S", HOLD_TTL_S_DEFAULT)),
)
