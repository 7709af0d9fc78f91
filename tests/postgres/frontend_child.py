"""A front-end for the bank checker: a process with its own PgStore on
the URLs given, running keyed mods from many callers at once, and writing
every outcome as a JSON line.

    python frontend_child.py '<json args>'

args: urls, seconds, callers, accounts, seed, out, retry_s.  With retry_s
> 0 a call answered Unavailable or Busy is sent again with the same cred,
by, min and key (after a short pause) until it gets a final answer or
retry_s passes: what a client does through a failover.
"""

import asyncio
import json
import random
import sys
import time

import uvloop

from accman.errors import Busy, Insufficient, StoreError, Unavailable
from accman.postgres.store import PgStore

RETRY_PAUSE_S = 0.05


async def main(a):
    store = None
    deadline = time.monotonic() + a["retry_s"] + 30
    while store is None:
        try:
            store = await PgStore.open(a["urls"], migrate_schema=False)
        except StoreError:
            if time.monotonic() > deadline:
                raise
            await asyncio.sleep(0.2)
    rng = random.Random(a["seed"])
    loop = asyncio.get_running_loop()
    stop = time.monotonic() + a["seconds"]
    out = open(a["out"], "w")

    async def call(cred, by, key):
        fut = loop.create_future()
        try:
            store.submit(cred, by, 0 if by < 0 else None, key, done=fut.set_result)
        except (Unavailable, Busy) as e:
            return e
        return await fut

    async def caller(n):
        k = 0
        while time.monotonic() < stop:
            cred = f"acct-{rng.randrange(a['accounts'])}"
            by = rng.choice([-1, 1]) * rng.randrange(1, 60)
            key = f"{a['seed']}-{n}-{k}"
            k += 1
            attempts = 0
            give_up = time.monotonic() + a["retry_s"]
            while True:
                attempts += 1
                r = await call(cred, by, key)
                if isinstance(r, (Unavailable, Busy)) and time.monotonic() < give_up:
                    await asyncio.sleep(RETRY_PAUSE_S)
                    continue
                break
            rec = {"cred": cred, "by": by, "key": key, "attempts": attempts}
            if isinstance(r, tuple):
                rec.update(ok=True, tot=r[0], seq=r[1])
            else:
                rec.update(ok=False, error=type(r).__name__,
                           tot=r.tot if isinstance(r, Insufficient) else None)
            out.write(json.dumps(rec) + "\n")
    await asyncio.gather(*(caller(i) for i in range(a["callers"])))
    out.close()
    await store.aclose()


if __name__ == "__main__":
    uvloop.run(main(json.loads(sys.argv[1])))
