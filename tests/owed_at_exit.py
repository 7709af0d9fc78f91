"""A service process whose event loop ends with calls still owed, run by
tests/test_asgi_lifespan.py: `python owed_at_exit.py CASE`.

asyncio.run cancels the tasks it finds as the loop ends, not those made
meanwhile.  A task cancelled then owes two charges (their refusals, busy,
read as the loop ends): the queue's payer, made after the cancelling
began, sends the first to a listener that never answers, and the loop
ends under it.  CASE "sync" and "async" name the on_unpaid given (a
function, or a coroutine function that takes an hour); "billing" owes
one charge in the loop's very last turn instead, whose payer is cancelled
before its first step, so that the async on_unpaid of its stranding is
started with the loop ending and never ends.  "fork" is "sync" with a
child forked after the loop, which exits as a process does (its copy of
the queue is the parent's to pay); "thread" owes the two charges under a
loop that still runs, in a daemon thread, as the process ends; "preforked"
is "sync" run in a child forked before any loop, as a server's worker
forked from a parent that made the app (its queue is its own to say).  Each
line the middleware logs at ERROR goes to stderr; a bill made, to
stdout."""

import asyncio
import logging
import os
import socket
import sys
import threading

from accman.asgi import AccManMiddleware
from accman.calling import owed as owed_mod
from accman.errors import Busy

CRED = "owed-at-exit"


def bill(cred, amount):
    print(f"billed {amount}", flush=True)


async def bill_later(cred, amount):
    await asyncio.sleep(3600)
    bill(cred, amount)


async def app(scope, receive, send):
    raise AssertionError("no request is served")


def owe(m, by, key):
    m._owed.add(owed_mod.Mod(CRED, by, key, "charge"), Busy("full"))


async def main(m, case):
    loop = asyncio.get_running_loop()
    if case == "billing":
        loop.call_soon(owe, m, -2, "last-c")       # after main returns, as the loop stops
        return

    async def owes_as_it_is_cancelled():
        try:
            await asyncio.Event().wait()
        except asyncio.CancelledError:
            owe(m, -2, "first-c")
            owe(m, -3, "second-c")
            raise
    loop.create_task(owes_as_it_is_cancelled())
    await asyncio.sleep(0)


async def owe_both(m):
    owe(m, -2, "first-c")
    owe(m, -3, "second-c")


if __name__ == "__main__":
    logging.basicConfig(level=logging.ERROR, format="%(message)s")
    case = sys.argv[1]
    hole = socket.create_server(("127.0.0.1", 0))  # takes connections, never answers
    m = AccManMiddleware(app, url=f"http://127.0.0.1:{hole.getsockname()[1]}", cost=2,
                         retries=0, on_unpaid=bill_later if case in ("async", "billing")
                         else bill)
    if case == "thread":
        loop = asyncio.new_event_loop()
        threading.Thread(target=loop.run_forever, daemon=True).start()
        asyncio.run_coroutine_threadsafe(owe_both(m), loop).result()
        sys.exit(0)
    if case == "preforked":
        child = os.fork()
        if child == 0:
            asyncio.run(main(m, "sync"))
            sys.exit(0)                             # atexit runs in the child
        os.waitpid(child, 0)
        sys.exit(0)
    asyncio.run(main(m, case))
    if case == "fork":
        child = os.fork()
        if child == 0:
            sys.exit(0)                             # atexit runs in the child too
        os.waitpid(child, 0)
