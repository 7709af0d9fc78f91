"""A PostgreSQL that does not answer (its processes stopped with SIGSTOP,
as a host cut off without a reset would look): a read is answered 503
within READ_TIMEOUT_S (SCALING.md, "Bounds"), on a pooled connection,
whose timed-out query's return to the pool waits for the cancel's
answer, and on a new one, whose connect would wait for the driver's own
timeout (60 s): each waited as long as the database was stopped."""

import asyncio
import contextlib
import os
import signal
import subprocess
import time

import pytest

from accman.errors import Unavailable
from accman.postgres import store as store_module

from .helpers import run, stored


@contextlib.contextmanager
def frozen(pg):
    """`pg`'s postmaster and its processes stopped (SIGSTOP) in the block."""
    kids = subprocess.run(["pgrep", "-P", str(pg.pid)], capture_output=True,
                          text=True).stdout.split()
    pids = [pg.pid, *map(int, kids)]
    for pid in pids:
        os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        for pid in pids:
            os.kill(pid, signal.SIGCONT)


async def unanswered(read):
    t0 = time.monotonic()
    with pytest.raises(Unavailable, match="did not answer in time"):
        await asyncio.wait_for(read(), 5)
    assert time.monotonic() - t0 < 3


def test_reads_are_503_within_read_timeout_s_when_the_database_does_not_answer(
        pg_factory, monkeypatch):
    monkeypatch.setattr(store_module, "READ_TIMEOUT_S", 1.0)
    pg = pg_factory(name="frozen")
    url = pg.create_database("f")

    async def main():
        async with stored(url) as (store, c):
            assert await c.mod("a", 5) == (5, 1)
            assert await c.tot("a") == 5
            reads = (lambda: c.tot("a"), lambda: c.past("a"), lambda: c.events(after=0))
            with frozen(pg):
                # On a connection of the pool: its query times out, and its
                # return to the pool waits for the cancel's answer.
                await unanswered(reads[0])
                # Its idle connections closed (as an upkeep round's abandoned
                # one is): each read connects anew.
                await store.clusters[0].pool.expire_connections()
                for read in reads:
                    await unanswered(read)
            assert await c.tot("a") == 5
    run(main())
