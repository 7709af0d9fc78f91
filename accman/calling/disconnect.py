"""How the middleware (accman.calling.asgi) learns that a consumer went away
before its response started, so that the request is not charged (check
mode) and its hold is released at once (reserve mode).

ASGI reports a disconnect only through `receive()`: an app that does not
read it again after the request body would never tell the middleware, and
uvicorn drops the sends of a disconnected request without a word.  So once
the app has read the body whole (the `http.request` without `more_body`),
`DisconnectWatch` reads the server's next message itself, in a task of its
own, and shares it with the app's later `receive()` calls.

- Nothing is read before the app has read the whole body: the body is the
  app's, streamed at its pace.  A request whose head says it has none (an
  HTTP/1 request without Content-Length, or with 0, and without
  Transfer-Encoding: RFC 9112 6.3) has nothing to stream: its one empty
  `http.request` is read as the app starts and handed to the app's first
  `receive()`, so that the watch starts for an app that never reads the
  body, as most GET handlers do.
- After the body the server sends nothing but `http.disconnect` (ASGI
  "HTTP": sent when the connection closes or the response is complete), so
  the message the watch takes is the one every later `receive()` gets:
  no message goes to the wrong party.
- The watch ends with the request (`async with watch:` around the app):
  a read still waiting then is cancelled and waited for, so no task
  outlives the request or is destroyed pending, and an error of the
  server's `receive()` that the app never read is not logged as never
  retrieved."""

from __future__ import annotations

import asyncio


class DisconnectWatch:
    """Wraps an ASGI `receive` and remembers whether the client went away
    (http.disconnect), whether the app reads it or not; `on_gone()`, if
    given, is called once, when it is seen.  `receive` is the app's; the
    app runs inside `async with watch:`, which closes the watch when the
    app has returned, raised or been cancelled."""

    __slots__ = ("_receive", "_on_gone", "gone", "_watcher", "_body_read", "_bodiless", "_first")

    def __init__(self, receive, on_gone=None, scope=None):
        self._receive = receive
        self._on_gone = on_gone
        self.gone = False
        self._watcher = None        # the task reading the message after the body
        self._body_read = False
        self._bodiless = scope is not None and bodiless(scope)
        self._first = None          # a bodiless request's message, read for the app

    async def receive(self):
        first = self._first
        if first is not None:
            self._first = None
            return first
        watcher = self._watcher
        if watcher is None:
            message = await self._receive()
            self._seen(message)
            return message
        # Shielded: an app that gives up waiting (a cancelled scope) must
        # not cancel the read that the watch shares.
        try:
            message = await asyncio.shield(watcher)
        except asyncio.CancelledError:
            if not watcher.cancelled() or _cancelling(asyncio.current_task()):
                raise
            # The watch ended with the request (close): a read that
            # outlives it is told the request is over, as ASGI's server
            # would tell it.
            return {"type": "http.disconnect"}
        if message["type"] != "http.disconnect":
            self._watcher = None    # not ASGI's after a body: handed over once
        return message

    def _seen(self, message) -> None:
        kind = message["type"]
        if kind == "http.disconnect":
            self._gone()
        elif kind == "http.request" and not message.get("more_body", False) \
                and not self._body_read and not self.gone:
            self._body_read = True
            self._watcher = asyncio.get_running_loop().create_task(self._watch())
            self._watcher.add_done_callback(_retrieve)

    async def _watch(self):
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self._gone()
        return message

    def _gone(self) -> None:
        if not self.gone:
            self.gone = True
            if self._on_gone is not None:
                self._on_gone()

    async def __aenter__(self) -> "DisconnectWatch":
        if self._bodiless:
            self._first = await self._receive()
            self._seen(self._first)
        return self

    async def __aexit__(self, *exc) -> None:
        await self.close()

    async def close(self) -> None:
        """Ends the watch.  A server ends the read itself once the response
        is complete (ASGI sends `http.disconnect` then), so the watch gets
        one turn of the loop to end on its own, which is cheaper than a
        cancel; a read still waiting after it (or when the request is
        cancelled meanwhile) is cancelled: the request is over, and what
        it would read concerns nobody."""
        watcher = self._watcher
        if watcher is None or watcher.done():
            return
        try:
            await asyncio.sleep(0)
        finally:
            if not watcher.done():
                watcher.cancel()
        if not watcher.done():
            await asyncio.wait((watcher,))


def _cancelling(task) -> bool:
    """True if `task` itself is being cancelled.  Python 3.10 cannot tell
    (Task.cancelling is 3.11's): there a read whose own cancel coincides
    with the request's end is told the request is over, not cancelled."""
    cancelling = getattr(task, "cancelling", None)
    return cancelling is not None and cancelling() > 0


def bodiless(scope) -> bool:
    """True for an HTTP/1 request whose head says it has no body (RFC 9112
    6.3: neither Transfer-Encoding nor a Content-Length but 0).  HTTP/2's
    requests may carry a body without Content-Length: never bodiless."""
    if scope.get("http_version") not in ("1.0", "1.1"):
        return False
    for name, value in scope.get("headers", ()):
        if name == b"transfer-encoding":
            return False
        if name == b"content-length" and value.strip() != b"0":
            return False
    return True


def _retrieve(watcher) -> None:
    # The watch's outcome is the app's to read; unread, an error of the
    # server's receive() is the end of the request, not a fault to log.
    if not watcher.cancelled():
        watcher.exception()


__all__ = ["DisconnectWatch"]
