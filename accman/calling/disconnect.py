"""How the middleware (accman.calling.asgi) learns that a consumer went away
before its response started, so that the request is not charged (check
mode) and its hold is released at once (reserve mode)."""

from __future__ import annotations


class DisconnectWatch:
    """Wraps an ASGI `receive` and remembers whether the client went away
    (http.disconnect), so that a request whose client left is not charged;
    `on_gone()`, if given, is called when it is seen."""

    __slots__ = ("_receive", "_on_gone", "gone")

    def __init__(self, receive, on_gone=None):
        self._receive = receive
        self._on_gone = on_gone
        self.gone = False

    async def receive(self):
        message = await self._receive()
        if message["type"] == "http.disconnect" and not self.gone:
            self.gone = True
            if self._on_gone is not None:
                self._on_gone()
        return message


__all__ = ["DisconnectWatch"]
