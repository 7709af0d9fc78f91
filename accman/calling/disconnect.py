"""How the middleware (accman.calling.asgi) learns that a consumer went away
before its response started, so that the request is not charged (check
mode) and its hold is released at once (reserve mode).

ASGI reports a disconnect only through `receive()`: an app that does not
read it again after the request body would never tell the middleware, and
uvicorn drops the sends of a disconnected request without a word.  Nor
does every app read the body: a handler that has no use for it (a POST
whose JSON it ignores, a GET that a consumer sent with a body) never
calls `receive()` at all.  So `DisconnectWatch` reads the server's
messages itself, in a task of its own, as the app starts, and hands them
to the app's `receive()` calls in the order the server sent them.

- The body is read ahead of the app by at most READ_AHEAD_BYTES_MAX: past
  that, the watch waits until the app has taken some, so a large body is
  still streamed at the app's pace and held in memory only that far.  A
  body that the app never reads and that the watch cannot read whole
  within that bound keeps the watch from the disconnect behind it
  (docs/CALLING.md says so); one read whole does not.
- A request with `Expect: 100-continue` is not read before the app reads
  it: reading it makes the server tell the consumer to send the body
  (uvicorn sends `100 Continue` on the first `receive()`), which is the
  app's to decide.
- After the body the server sends nothing but `http.disconnect` (ASGI
  "HTTP": sent when the connection closes or the response is complete),
  so the watch reads until that message, which every later `receive()`
  gets, and then stops.
- The watch ends with the request (`async with watch:` around the app):
  a read still waiting then is cancelled and waited for, so no task
  outlives the request or is destroyed pending, and an error of the
  server's `receive()` that the app never read is not logged as never
  retrieved."""

from __future__ import annotations

import asyncio
import collections

# The most request body the watch holds that the app has not taken yet:
# the size of uvicorn's own buffer (its flow control's high-water mark), so
# the watch adds no more memory to a request than the server already
# spends on it, and reads a JSON or form body whole.
READ_AHEAD_BYTES_MAX = 64 * 1024


class DisconnectWatch:
    """Wraps an ASGI `receive` and remembers whether the client went away
    (http.disconnect), whether the app reads it or not; `on_gone()`, if
    given, is called once, when it is seen.  `receive` is the app's; the
    app runs inside `async with watch:`, which starts the watch and closes
    it when the app has returned, raised or been cancelled.  Without a
    `scope` the watch starts at the app's first read."""

    __slots__ = ("_receive", "_on_gone", "gone", "_watcher", "_lazy", "_read", "_ahead",
                 "_more", "_room", "_closed")

    def __init__(self, receive, on_gone=None, scope=None):
        self._receive = receive
        self._on_gone = on_gone
        self.gone = False
        self._watcher = None                # the task reading the server's messages
        self._lazy = scope is None or expects_continue(scope)
        self._read = collections.deque()    # messages read, not yet the app's
        self._ahead = 0                     # body bytes in _read
        self._more = asyncio.Event()        # set once when a message is read, then replaced
        self._room = asyncio.Event()        # set once when the app takes one, then replaced
        self._closed = False

    async def receive(self):
        while True:
            if self._read:
                return self._take()
            watcher = self._watcher
            if watcher is None:
                if self._closed:
                    return {"type": "http.disconnect"}     # the request is over
                self._start()
                continue
            if watcher.done():
                if watcher.cancelled():
                    # The watch ended with the request (close): a read that
                    # outlives it is told the request is over, as ASGI's
                    # server would tell it.
                    return {"type": "http.disconnect"}
                watcher.result()            # raises the error of the server's receive()
                return await self._direct()     # past ASGI's messages: no watch
            # An app that gives up waiting (a cancelled scope) leaves the
            # watch's read running: it waits for the event, not the read.
            await self._more.wait()

    def _take(self):
        message = self._read[0]
        if message["type"] == "http.disconnect":
            return message                  # and to every later read, as the server does
        self._read.popleft()
        self._ahead -= len(message.get("body", b""))
        self._room.set()
        self._room = asyncio.Event()
        return message

    def _start(self) -> None:
        self._watcher = asyncio.get_running_loop().create_task(self._watch())
        self._watcher.add_done_callback(_retrieve)

    async def _watch(self):
        body_read = False
        try:
            while True:
                # Only body is held: once it is read whole, what follows
                # (the disconnect) costs no memory, and is read at once.
                while not body_read and self._ahead >= READ_AHEAD_BYTES_MAX:
                    await self._room.wait()
                message = await self._receive()
                self._read.append(message)
                self._ahead += len(message.get("body", b""))
                if message["type"] == "http.disconnect":
                    self._gone()
                    return
                if body_read:
                    return                  # not ASGI's after a body: handed over once
                body_read = message["type"] == "http.request" and not message.get(
                    "more_body", False)
                self._more.set()
                self._more = asyncio.Event()
        finally:
            self._more.set()                # the app's waiting read looks again

    async def _direct(self):
        message = await self._receive()
        if message["type"] == "http.disconnect":
            self._gone()
        return message

    def _gone(self) -> None:
        if not self.gone:
            self.gone = True
            if self._on_gone is not None:
                self._on_gone()

    async def gone_by_now(self) -> bool:
        """Whether the client has gone, as the server knows by now: asked
        as the response starts.  A watch still reading gets one turn of the
        loop first: an app that answers without awaiting anything gives it
        none, and a disconnect the server already knows of (the consumer
        left while the service asked AccMan) would go unseen.  A server
        answers a read at once once the client has gone (uvicorn does), so
        one turn is enough for it."""
        watcher = self._watcher
        if not self.gone and watcher is not None and not watcher.done():
            await asyncio.sleep(0)
        return self.gone

    async def __aenter__(self) -> "DisconnectWatch":
        if not self._lazy:
            self._start()
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
        self._closed = True
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


def expects_continue(scope) -> bool:
    """True for a request that asks to be told before it sends its body
    (RFC 9110 10.1.1, `Expect: 100-continue`)."""
    return any(name == b"expect" and value.strip().lower() == b"100-continue"
               for name, value in scope.get("headers", ()))


def _retrieve(watcher) -> None:
    # The watch's outcome is the app's to read; unread, an error of the
    # server's receive() is the end of the request, not a fault to log.
    if not watcher.cancelled():
        watcher.exception()


__all__ = ["DisconnectWatch", "READ_AHEAD_BYTES_MAX"]
