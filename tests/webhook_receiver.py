"""A real webhook receiver for the tests: an asyncio HTTP/1.1 server on a
loopback port (or the address given), in a thread of its own, that a test
turns bad and good:

    with Receiver(secret) as rx:            # answers 200, on a free port
        rx.mode = "fail"                    # answers 500 (status: rx.fail_status)
        rx.mode = "hang"                    # reads the request, never answers
        rx.ok_left = 2                      # two more 200s, then 500s
        rx.down()                           # the port is closed: connection refused
        rx.up()                             # listening again, on the same port
        rx.wait_for(lambda: rx.max_id() >= 40)
        rx.verify = True                    # answers 401 to a POST not signed with secret

It keeps every request it read whole (`posts`), whatever it answered, and
checks nothing itself but, with `verify`, the signature, as SERVER.md tells a
receiver to: the tests check `posts` (Post.valid, ids, order).
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import json
import os
import socket
import threading
import time
from dataclasses import dataclass, field
from functools import cached_property

HEAD_BYTES_MAX = 64 * 1024


def secret_file(directory, secret: bytes):
    """`--webhook-secret`'s file for `secret` in `directory`, 0600."""
    path = directory / "webhook.secret"
    path.write_bytes(secret + b"\n")
    os.chmod(path, 0o600)
    return path


@dataclass
class Post:
    target: str
    headers: dict               # lower-case name -> value
    body: bytes
    answered: int | None        # the status sent back; None: none was
    peer: str = ""              # the address the POST came from
    at: float = field(default_factory=time.monotonic)

    def valid(self, secret: bytes) -> bool:
        """The AccMan-Signature header is the HMAC-SHA256 of the body."""
        want = "sha256=" + hmac.new(secret, self.body, hashlib.sha256).hexdigest()
        return hmac.compare_digest(self.headers.get("accman-signature", ""), want)

    # Parsed once: a long run's checks read thousands of POSTs again and
    # again (Receiver.max_id), on the GIL the receiver's own thread needs.
    @cached_property
    def events(self) -> list:
        return json.loads(self.body)["events"]

    @cached_property
    def ids(self) -> list:
        return [e["id"] for e in self.events]


# The ports of receivers taken down, or closed, stay bound (not listening)
# for the rest of the process: a deliverer still retrying meets a refused
# connection there, never a server of another test (another xdist worker)
# that was given the freed port meanwhile.
_RETIRED: list = []


def _held(host: str, port: int):
    """A socket bound to `port` that does not listen, or None if another
    took the port first."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    try:
        sock.bind((host, port))
    except OSError:
        sock.close()
        return None
    return sock


class Receiver:
    def __init__(self, secret: bytes, port: int = 0, ssl_context=None, host="127.0.0.1"):
        self.secret = secret
        self.host = host            # the address it listens on (an IPv4 one)
        self.ssl_context = ssl_context
        self.mode = "ok"            # "ok", "fail", "hang", or "slow" (sleep_s, then 200)
        self.fail_status = 500
        self.sleep_s = 0.0
        self.ok_left = None         # when set: answer this many more 200s, then fail
        self.verify = False         # when set: a POST not signed with `secret` is a 401
        self.posts: list[Post] = []
        self.lock = threading.Lock()
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True)
        self.server = None
        self.port = port
        self._hung: list = []
        self._holding = None        # the port held while down (_held)
        self.thread.start()
        self.up()

    # --- control, from the test's thread ---

    def _call(self, coro, timeout_s=10.0):
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout_s)

    def up(self):
        self._call(self._listen())

    def down(self):
        """Stops listening and cuts the connections it holds."""
        self._call(self._close())

    def close(self):
        if self.loop.is_running():
            self.down()
            self.loop.call_soon_threadsafe(self.loop.stop)
            self.thread.join(10)
        if self._holding is not None:
            _RETIRED.append(self._holding)
            self._holding = None

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    @property
    def url(self):
        scheme = "https" if self.ssl_context is not None else "http"
        return f"{scheme}://{self.host}:{self.port}/hooks/accman?src=test"

    def snapshot(self) -> list[Post]:
        with self.lock:
            return list(self.posts)

    def acked(self) -> list[Post]:
        return [p for p in self.snapshot() if p.answered is not None and 200 <= p.answered < 300]

    def max_id(self, acked_only=True) -> int:
        posts = self.acked() if acked_only else self.snapshot()
        return max((max(p.ids) for p in posts), default=0)

    def wait_for(self, cond, timeout_s=30.0, what="the condition"):
        deadline = time.monotonic() + timeout_s
        while not cond():
            if time.monotonic() > deadline:
                raise AssertionError(f"receiver: {what} not met within {timeout_s} s; "
                                     f"{len(self.snapshot())} posts")
            time.sleep(0.01)

    # --- the server, on its own loop ---

    async def _listen(self):
        if self._holding is not None:
            self._holding.close()
            self._holding = None
        sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        sock.bind((self.host, self.port))
        self.port = sock.getsockname()[1]
        self.server = await asyncio.start_server(self._serve, sock=sock,
                                                 ssl=self.ssl_context, limit=HEAD_BYTES_MAX)

    async def _close(self):
        if self.server is not None:
            self.server.close()
            self.server = None
            self._holding = _held(self.host, self.port)
        for w in self._hung:
            w.transport.abort()
        self._hung.clear()

    async def _serve(self, reader, writer):
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            lines = head.decode("latin-1").split("\r\n")
            target = lines[0].split(" ")[1]
            headers = {}
            for line in lines[1:]:
                if line:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
            body = await reader.readexactly(int(headers.get("content-length", "0")))
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError):
            writer.close()
            return
        post = Post(target, headers, body, None, writer.get_extra_info("peername")[0])
        mode = "refuse" if self.verify and not post.valid(self.secret) else self.mode
        with self.lock:
            if self.ok_left is not None and mode == "ok":
                if self.ok_left <= 0:
                    mode = "fail"
                else:
                    self.ok_left -= 1
        with self.lock:
            self.posts.append(post)
        if mode == "hang":
            self._hung.append(writer)
            return
        if mode == "slow":
            await asyncio.sleep(self.sleep_s)
        status = {"fail": self.fail_status, "refuse": 401}.get(mode, 200)
        post.answered = status
        reply = b'{"ok":true}' if status < 300 else b'{"error":"test"}'
        writer.write(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\nConnection: close\r\n\r\n%s"
                     % (status, len(reply), reply))
        try:
            await writer.drain()
        except ConnectionError:
            pass
        writer.close()
