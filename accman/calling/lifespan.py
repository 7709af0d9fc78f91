"""The middleware's lifespan (accman.calling.asgi): the app's own, with
the middleware's drain (`aclose`: releases and owed calls land) before
its shutdown ends, whether the app's own shutdown completes or fails; or,
for an app that does not speak lifespan, the middleware's own, so that
owed calls still land at shutdown."""

from __future__ import annotations

import logging

log = logging.getLogger("accman.asgi")

# The messages that end a shutdown: the drain comes before either goes out,
# since the server ends the process once it has one.
_SHUTDOWN_ENDS = ("lifespan.shutdown.complete", "lifespan.shutdown.failed")


async def lifespan(app, aclose, scope, receive, send) -> None:
    """The app's lifespan, with `await aclose()` once the server has asked
    for the shutdown and before it is told that the shutdown ended: by
    `lifespan.shutdown.complete` or `.failed` (Starlette's when the app's
    own shutdown raised), or by the app raising or returning.  A failing
    shutdown of the app's own (its database pool would not close) must not
    lose the owed calls unsaid.  An app that does not speak lifespan (it
    returns or raises before it reads a message, as ASGI allows) gets the
    middleware's own."""
    spoken = shutdown = drained = False

    async def receive_():
        nonlocal spoken, shutdown
        spoken = True
        message = await receive()
        if message["type"] == "lifespan.shutdown":
            shutdown = True
        return message

    async def drain():
        nonlocal drained
        if not drained:
            drained = True
            await aclose()

    async def send_(message):
        if message["type"] in _SHUTDOWN_ENDS:
            await drain()
        await send(message)
    try:
        await app(scope, receive_, send_)
    except Exception:
        if spoken:
            if shutdown:
                await drain()
            raise
        # ASGI's sign of an app without lifespan; logged in full, since it
        # is also what an app failing its startup before reading looks
        # like, and the server now starts.
        log.warning("accman: the app raised on the lifespan scope before reading a "
                    "message: taken as an app without lifespan, whose lifespan the "
                    "middleware answers so that owed calls land at shutdown",
                    exc_info=True)
    if shutdown:
        await drain()
    if not spoken:
        await _own(aclose, receive, send)


async def _own(aclose, receive, send) -> None:
    while True:
        message = await receive()
        if message["type"] == "lifespan.startup":
            await send({"type": "lifespan.startup.complete"})
        elif message["type"] == "lifespan.shutdown":
            await aclose()
            await send({"type": "lifespan.shutdown.complete"})
            return
