"""The calling side through a PostgreSQL outage, all of it real: an AccMan
front-end on its own PostgreSQL server (`accman serve --store`), the
database stopped (pg_ctl) under the middleware in reserve mode and under
the command line, then started again.  While the database is down every
change is refused `503 not_applied` (never sent): a request gets the
middleware's 503 and owes nothing (no release of a hold that never
applied, docs/CALLING.md), a settle owed meanwhile lands once, when the
database is back, and the command line says the write was not applied."""

import asyncio
import json

from conftest import run_accman, spawn_server

from accman.asgi import AccManMiddleware
from accman.client import AccManSyncClient
from asgi_harness import call
from ledgerhelp import wait_for

# Within it the front-end notices the database gone, or back (its upkeep
# round, its reconnection's backoff): generous, as on a loaded machine.
NOTICED_S = 30.0
# Requests made while the database is down.
OUTAGE_REQUESTS = 20


def health(srv) -> int:
    return srv.get("/health").status


def costs(scope, status, _headers) -> int:
    """Holds 5, charges 2."""
    return 5 if status is None else 2


def gated_app(gate: asyncio.Event):
    """An app whose /slow answers once `gate` is set; any other path at once."""
    async def app(scope, receive, send):
        await receive()
        if scope["path"] == "/slow":
            await gate.wait()
        await send({"type": "http.response.start", "status": 200, "headers": []})
        await send({"type": "http.response.body", "body": b"done"})
    return app


def test_an_outage_under_reserve_mode_owes_no_release_and_its_settle_lands(pg_factory,
                                                                          tmp_path):
    pg = pg_factory(name="mwoutage")
    srv = spawn_server(tmp_path / "data", tmp_path / "log",
                       args=["--store", pg.create_database("m")])
    cred = "outage-consumer"
    try:
        with AccManSyncClient(srv.url) as funder:
            funder.mod(cred, 100)

        async def go():
            gate = asyncio.Event()
            m = AccManMiddleware(gated_app(gate), url=srv.url, mode="reserve", cost=costs)
            first = await call(m, cred=cred)
            assert first.status == 200 and first.headers["accman"] == "98"
            # Held before the outage, settled during it: the settle is owed.
            slow = asyncio.create_task(call(m, "/slow", cred=cred))
            await asyncio.to_thread(wait_for, lambda: srv.tot(cred) == 93, 10,
                                    "the slow request's hold")
            await asyncio.to_thread(pg.stop)
            await asyncio.to_thread(wait_for, lambda: health(srv) == 503, NOTICED_S,
                                    "/health 503 with PostgreSQL stopped")
            gate.set()
            r = await slow
            assert r.status == 200 and "accman" not in r.headers       # its settle owed
            for _ in range(OUTAGE_REQUESTS):
                r = await call(m, cred=cred)
                assert r.status == 503 and r.json()["error"] == "unavailable"
                assert r.headers["retry-after"] == "1"
            # Nothing owed for the refused holds: the settle alone.
            assert m.stats["owed"] == 1, m.stats
            assert m.stats["refused_unavailable"] == OUTAGE_REQUESTS
            cli = await asyncio.to_thread(run_accman, "mod", cred, "-1", "--url", srv.url)
            await asyncio.to_thread(pg.start)
            await asyncio.to_thread(wait_for, lambda: health(srv) == 200, NOTICED_S,
                                    "/health 200 with PostgreSQL back")
            assert await m.drain(60)
            stats = dict(m.stats)
            await m.aclose()
            return cli, stats
        cli, stats = asyncio.run(go())
        assert stats["owed"] == 1 and stats["stranded"] == 0 and stats["charged"] == 2
        assert cli.returncode == 1, cli.stderr
        assert cli.stderr.startswith("accman: 503 not_applied: ")
        assert "; AccMan refused this mod before applying it: nothing of this request " \
            "applied; it may be sent again once AccMan takes writes" in cli.stderr
        # Two requests held and charged 2 each; nothing else applied.
        assert srv.tot(cred) == 96
        proc = run_accman("past", cred, "--url", srv.url)
        past = json.loads(proc.stdout)["past"]
        assert [e["by"] for e in reversed(past)] == [100, -5, 3, -5, 3], past
    finally:
        srv.stop()
