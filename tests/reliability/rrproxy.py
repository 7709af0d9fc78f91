"""A round-robin TCP proxy: what a TCP load balancer does in front of
several AccMan front-ends (docs/SCALING.md, "Production layout"), for the
calling checker on two of them (test_calling_bank_pg.py).

Each new client connection goes to the next backend in turn; its bytes go
both ways untouched until either side closes or fails, and then both are
closed, as an L4 balancer closes a client's connection when its server's
breaks.  A backend that refuses the connection (SIGKILLed, not restarted
yet) gets the client's connection closed at once, unanswered.

With `checked`, the proxy polls each backend's GET /health every
HEALTH_EVERY_S, as a balancer's health check does, and sends new
connections only to those whose last answer was 200; to all of them when
none was (nginx's rule: with every server marked down, all are tried).
Without it, the client's retries meet a dead backend half the time.

It runs an event loop of its own in a thread of its own: the test's load
and its nemesis run in others.  A module, not a conftest.py: see
relhelp.py."""

import asyncio
import itertools
import threading

HEALTH_EVERY_S = 0.2
# A backend stopped (SIGSTOP) takes connections into its backlog and
# answers nothing: past this, its check has failed.
HEALTH_TIMEOUT_S = 1.0
READ_BYTES = 64 * 1024
START_TIMEOUT_S = 10.0


class RoundRobin:
    """The proxy on a free loopback port (`url`) before `backends`, a
    list of (host, port); `stats` counts, per backend, the connections it
    was given and those it refused."""

    def __init__(self, backends, checked=False):
        self.backends = list(backends)
        self.checked = checked
        self.live = set(range(len(self.backends)))
        self.stats = {"sent": [0] * len(self.backends), "refused": [0] * len(self.backends)}
        self._turn = itertools.count()
        self._pipes = set()
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._loop.run_until_complete,
                                        args=(self._main(),), daemon=True)
        self._thread.start()
        assert self._started.wait(START_TIMEOUT_S), "the proxy did not start"
        self.url = f"http://127.0.0.1:{self.port}"

    def stop(self) -> None:
        """Closes the listener and every connection, and ends the thread."""
        if self._thread.is_alive():
            self._loop.call_soon_threadsafe(self._stopping.set)
            self._thread.join(START_TIMEOUT_S)
            self._loop.close()

    async def _main(self):
        self._stopping = asyncio.Event()
        server = await asyncio.start_server(self._client, "127.0.0.1", 0)
        self.port = server.sockets[0].getsockname()[1]
        checks = asyncio.create_task(self._check()) if self.checked else None
        self._started.set()
        await self._stopping.wait()
        server.close()
        for task in [*self._pipes, *filter(None, [checks])]:
            task.cancel()
        await asyncio.gather(*self._pipes, *filter(None, [checks]), return_exceptions=True)

    def _next(self) -> int:
        candidates = sorted(self.live) or range(len(self.backends))
        return candidates[next(self._turn) % len(candidates)]

    async def _client(self, reader, writer):
        self._pipes.add(asyncio.current_task())
        n = self._next()
        self.stats["sent"][n] += 1
        try:
            up_reader, up_writer = await asyncio.open_connection(*self.backends[n])
        except OSError:
            self.stats["refused"][n] += 1
            writer.close()
            self._pipes.discard(asyncio.current_task())
            return
        ways = [asyncio.create_task(_pipe(reader, up_writer)),
                asyncio.create_task(_pipe(up_reader, writer))]
        try:
            await asyncio.wait(ways, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for way in ways:
                way.cancel()
            await asyncio.gather(*ways, return_exceptions=True)
            up_writer.close()
            writer.close()
            self._pipes.discard(asyncio.current_task())

    async def _check(self):
        while True:
            answers = await asyncio.gather(*(_healthy(b) for b in self.backends))
            self.live = {n for n, ok in enumerate(answers) if ok}
            await asyncio.sleep(HEALTH_EVERY_S)


async def _pipe(reader, writer):
    """Copies until the reader's end, or until either side fails."""
    try:
        while data := await reader.read(READ_BYTES):
            writer.write(data)
            await writer.drain()
    except OSError:
        pass


async def _healthy(backend) -> bool:
    try:
        reader, writer = await asyncio.wait_for(asyncio.open_connection(*backend),
                                                HEALTH_TIMEOUT_S)
    except (OSError, asyncio.TimeoutError):
        return False
    try:
        writer.write(b"GET /health HTTP/1.1\r\nHost: accman\r\nConnection: close\r\n\r\n")
        line = await asyncio.wait_for(reader.readline(), HEALTH_TIMEOUT_S)
        return line.split(b" ")[1:2] == [b"200"]
    except (OSError, asyncio.TimeoutError):
        return False
    finally:
        writer.close()
