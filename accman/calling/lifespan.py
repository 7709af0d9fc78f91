"""The middleware's lifespan (accman.calling.asgi): the app's own, with
the middleware's drain (`aclose`: releases and owed calls land) before
its shutdown completes; or, for an app that does not speak lifespan, the
middleware's own, so that owed calls still land at shutdown."""

from __future__ import annotations

import logging

log = logging.getLogger("accman.asgi")


async def lifespan(app, aclose, scope, receive, send) -> None:
    """The app's lifespan, with `await aclose()` before its shutdown
    completes.  An app that does not speak lifespan (it returns or raises
    before it reads a message, as ASGI allows) gets the middleware's own."""
    spoken = False

    async def receive_():
        nonlocal spoken
        spoken = True
        return await receive()

    async def send_(message):
        if message["type"] == "lifespan.shutdown.complete":
            await aclose()
        await send(message)
    try:
        await app(scope, receive_, send_)
    except Exception:
        if spoken:
            raise
        # ASGI's sign of an app without lifespan; logged in full, since it
        # is also what an app failing its startup before reading looks
        # like, and the server now starts.
        log.warning("accman: the app raised on the lifespan scope before reading a "
                    "message: taken as an app without lifespan, whose lifespan the "
                    "middleware answers so that owed calls land at shutdown",
                    exc_info=True)
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
