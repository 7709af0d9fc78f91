"""The middleware's lifespan (accman.calling.asgi): the app's own, with
the middleware's drain (`aclose`: releases and owed calls land) when the
server asks for the shutdown, before the app's own shutdown runs; or, for
an app that does not speak lifespan, the middleware's own, so that owed
calls still land at shutdown."""

from __future__ import annotations

import logging

log = logging.getLogger("accman.asgi")


async def lifespan(app, aclose, scope, receive, send) -> None:
    """The app's lifespan, with `await aclose()` once the server has asked
    for the shutdown and before the app is handed that message: what the
    app's own shutdown closes (the AccManClient it gave the middleware, the
    database an `on_unpaid` biller writes to) is still open while the
    releases and owed calls land, and a shutdown of the app's that fails
    or hangs cannot keep them from landing.  An app that does not speak
    lifespan (it returns or raises before it reads a message, as ASGI
    allows) gets the middleware's own; so does the rest of the lifespan of
    an app that returns or raises once its startup is complete (the
    server would otherwise take that for the shutdown's end, or skip the
    shutdown, and stop with no drain)."""
    spoken = shut = started = False

    async def receive_():
        nonlocal spoken, shut
        spoken = True
        message = await receive()
        if message["type"] == "lifespan.shutdown":
            shut = True
            await aclose()
        return message

    async def send_(message):
        nonlocal started
        started = started or message["type"] == "lifespan.startup.complete"
        await send(message)
    try:
        await app(scope, receive_, send_)
    except Exception:
        if spoken and not (started and not shut):
            raise
        if spoken:
            # Between its startup and the shutdown: the server would log it
            # and skip the shutdown, the drain with it.
            log.error("accman: the app's lifespan raised after its startup: the middleware "
                      "answers the rest of it, so that owed calls land at shutdown",
                      exc_info=True)
        else:
            # ASGI's sign of an app without lifespan; logged in full, since
            # it is also what an app failing its startup before reading
            # looks like, and the server now starts.
            log.warning("accman: the app raised on the lifespan scope before reading a "
                        "message: taken as an app without lifespan, whose lifespan the "
                        "middleware answers so that owed calls land at shutdown",
                        exc_info=True)
    if not spoken or (started and not shut):
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
