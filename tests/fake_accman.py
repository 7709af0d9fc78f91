"""A small fake AccMan for the calling side's tests: the SPEC's routes over
real sockets, in a thread of its own, with a reference model of the ledger
(balances, history, keys, roles) and faults injected on request: a delay, a
dropped connection before or after the mod applied, a raw reply.

tests/test_client.py, tests/test_asgi.py and tests/test_cli.py use it; the
real server is tested against the clients in tests/test_e2e_asgi.py and
tests/test_cli.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from urllib.parse import parse_qsl

from accman.limits import INT64_MAX, INT64_MIN

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 409: "Conflict", 503: "Service Unavailable"}


class FakeAccMan:
    """The SPEC's routes over asyncio streams, in its own thread.

    `fault(method, path, params)` may return None or one action:
    ("delay", s) waits before handling; ("drop",) closes without handling;
    ("apply_drop",) handles then closes without replying (an applied mod
    whose reply is lost); ("raw", bytes) writes those bytes as the reply;
    ("reply", status, obj) answers that instead of handling."""

    def __init__(self, tokens: dict | None = None):
        self.tokens = tokens            # token -> set of roles, or None for open access
        # cred -> {"tot", "past": [entry...], "keys": {key: (by, min, body)}}
        self.accounts: dict = {}
        self.requests: list = []        # (method, path, params, authorization)
        self.connections = 0
        self.fault = None
        self.loop = asyncio.new_event_loop()
        self._writers = set()
        self._ready = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    # lifecycle
    def __enter__(self) -> "FakeAccMan":
        self._thread.start()
        self._ready.wait(5)
        return self

    def __exit__(self, *exc) -> None:
        self.stop()

    def _run(self) -> None:
        asyncio.set_event_loop(self.loop)
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        async def shut():
            self.server.close()
            for w in list(self._writers):
                w.close()
            await asyncio.sleep(0)
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    # helpers for tests
    def fund(self, cred: str, by: int) -> None:
        self._apply(cred, by, None, None)

    def tot(self, cred: str):
        acct = self.accounts.get(cred)
        return None if acct is None else acct["tot"]

    def mods(self) -> list:
        return [r for r in self.requests if r[1] == "/mod"]

    # the protocol
    async def _serve(self, reader, writer) -> None:
        self.connections += 1
        self._writers.add(writer)
        try:
            while True:
                try:
                    head = await reader.readuntil(b"\r\n\r\n")
                except (asyncio.IncompleteReadError, ConnectionError):
                    return
                lines = head[:-4].decode("latin-1").split("\r\n")
                method, target, version = lines[0].split(" ")
                headers = {}
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    headers[name.strip().lower()] = value.strip()
                path, _, query = target.partition("?")
                params = dict(parse_qsl(query, keep_blank_values=True))
                self.requests.append((method, path, params, headers.get("authorization")))
                action = self.fault(method, path, params) if self.fault else None
                if action and action[0] == "delay":
                    await asyncio.sleep(action[1])
                    action = None
                if action and action[0] == "drop":
                    return
                if action and action[0] == "raw":
                    writer.write(action[1])
                    await writer.drain()
                    continue
                if action and action[0] == "reply":
                    status, obj = action[1], action[2]
                else:
                    status, obj = self._handle(method, path, params, headers)
                if action and action[0] == "apply_drop":
                    return
                body = json.dumps(obj).encode()
                close = headers.get("connection", "").lower() == "close"
                writer.write(reply_bytes(status, body, close))
                await writer.drain()
                if close:
                    return
        finally:
            self._writers.discard(writer)
            writer.close()

    def _handle(self, method, path, params, headers):
        routes = {"/tot": ("GET", "read"), "/past": ("GET", "read"), "/mod": ("PATCH", None)}
        if path not in routes:
            return 404, {"error": "not_found", "detail": "no such path"}
        if method != routes[path][0]:
            return 405, {"error": "method_not_allowed", "detail": "wrong method"}
        cred = params.get("cred", "")
        role = routes[path][1]
        if path == "/mod":
            role = "mint" if int(params["by"]) > 0 else "charge"
        if self.tokens is not None:
            auth = headers.get("authorization", "")
            roles = self.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
            if roles is None:
                return 401, {"error": "unauthorized", "detail": "a token is required"}
            if role not in roles:
                return 403, {"error": "forbidden", "detail": f"the token lacks {role}"}
        if path == "/tot":
            if cred not in self.accounts:
                return 404, {"error": "no_account", "detail": "no such account"}
            return 200, {"tot": self.accounts[cred]["tot"]}
        if path == "/past":
            acct = self.accounts.get(cred)
            if acct is None:
                return 404, {"error": "no_account", "detail": "no such account"}
            limit = int(params.get("limit", 100))
            before = int(params["before"]) if "before" in params else None
            entries = [e for e in reversed(acct["past"]) if before is None or e["seq"] < before]
            page = entries[:limit]
            nxt = page[-1]["seq"] if len(page) == limit and page and page[-1]["seq"] > 1 else None
            return 200, {"account": account_id(cred), "past": page, "next": nxt}
        by = int(params["by"])
        mn = int(params["min"]) if "min" in params else None
        return self._apply(cred, by, mn, params.get("key"))

    def _apply(self, cred, by, mn, key):
        acct = self.accounts.get(cred)
        if acct is not None and key is not None and key in acct["keys"]:
            kby, kmin, body = acct["keys"][key]
            if (kby, kmin) != (by, mn):
                return 409, {"error": "key_reused", "detail": "key used with another by or min"}
            return 200, body
        if acct is None and by < 0:
            return 404, {"error": "no_account", "detail": "a charge creates no account"}
        tot = (acct["tot"] if acct else 0) + by
        if mn is not None and tot < mn:
            return 409, {"error": "insufficient", "detail": "below min", "tot": tot - by}
        if not INT64_MIN <= tot <= INT64_MAX:
            return 409, {"error": "overflow", "detail": "out of int64"}
        if acct is None:
            acct = self.accounts[cred] = {"tot": 0, "past": [], "keys": {}}
        acct["tot"] = tot
        seq = len(acct["past"]) + 1
        acct["past"].append({"seq": seq, "by": by, "tot": tot, "at": int(time.time() * 1000),
                             "key": key, "hold": None})
        body = {"tot": tot, "seq": seq}
        if key is not None:
            acct["keys"][key] = (by, mn, body)
        return 200, body


def account_id(cred: str) -> str:
    """The fake's public id of an account: hex of a hash, as the SPEC's."""
    return hashlib.blake2b(cred.encode(), digest_size=16, key=b"fake").hexdigest()


def reply_bytes(status: int, body: bytes, close: bool = False) -> bytes:
    return (f"HTTP/1.1 {status} {REASONS.get(status, 'X')}\r\n"
            f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n"
            + ("Connection: close\r\n" if close else "") + "\r\n").encode() + body


def run(coro):
    return asyncio.run(coro)


def closed_port() -> int:
    s = socket.socket()
    s.bind(("127.0.0.1", 0))
    port = s.getsockname()[1]
    s.close()
    return port
