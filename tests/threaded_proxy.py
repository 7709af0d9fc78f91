"""A TCP proxy before a real AccMan, for the calling side's tests: a
thread of its own with an event loop of its own, `_serve` each
connection's handler (a subclass's: pass through, refuse, answer).
Given an `ssl.SSLContext` it terminates TLS (`https://` in `url`), as the
proxy before AccMan of a deployment that crosses machines does."""

from __future__ import annotations

import asyncio
import threading


class Proxy:
    """Listens on 127.0.0.1 at a free port (`url`) until `close()`."""

    def __init__(self, upstream_port: int, tls=None):
        self.upstream_port = upstream_port
        self.tls = tls
        self.connections = 0
        self.loop = asyncio.new_event_loop()
        ready = threading.Event()
        self.thread = threading.Thread(target=self._run, args=(ready,), daemon=True)
        self.thread.start()
        assert ready.wait(5)
        self.url = f"{'https' if tls else 'http'}://127.0.0.1:{self.port}"

    def _run(self, ready) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, ssl=self.tls))
        self.port = self.server.sockets[0].getsockname()[1]
        ready.set()
        self.loop.run_forever()

    def close(self) -> None:
        asyncio.run_coroutine_threadsafe(self._stop(), self.loop).result(5)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(5)
        self.loop.close()

    async def _stop(self) -> None:
        self.server.close()
        tasks = asyncio.all_tasks() - {asyncio.current_task()}
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)

    async def _serve(self, reader, writer) -> None:
        raise NotImplementedError
