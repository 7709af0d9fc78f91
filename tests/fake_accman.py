"""A small fake AccMan for the calling side's tests: the SPEC's routes over
real sockets, in a thread of its own, with a reference model of the ledger
(balances, history, keys, holds and their expiry, the event stream, roles)
and faults injected on request: a delay, a dropped connection before or
after the call applied, a raw reply.

tests/test_client.py, tests/test_asgi.py and tests/test_cli.py use it; the
real server is tested against the clients in tests/test_e2e_asgi.py,
tests/test_e2e_holds.py and tests/test_cli.py."""

from __future__ import annotations

import asyncio
import hashlib
import json
import socket
import threading
import time
from urllib.parse import parse_qsl

from accman.limits import HOLDS_PER_ACCOUNT_MAX, INT64_MAX, INT64_MIN

REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 403: "Forbidden",
           404: "Not Found", 409: "Conflict", 410: "Gone", 503: "Service Unavailable"}
# path -> (method, role); /mod's role is by its sign.
ROUTES = {"/tot": ("GET", "read"), "/past": ("GET", "read"), "/mod": ("PATCH", None),
          "/hold": ("PATCH", "charge"), "/settle": ("PATCH", "charge"),
          "/events": ("GET", "read")}


def _error(status, code, detail, **extra):
    return status, {"error": code, **extra, "detail": detail}


class FakeAccMan:
    """The SPEC's routes over asyncio streams, in its own thread.

    `fault(method, path, params)` may return None or one action:
    ("delay", s) waits before handling; ("drop",) closes without handling;
    ("apply_drop",) handles then closes without replying (an applied call
    whose reply is lost); ("apply_reply", status, obj) handles, then answers
    that instead (an applied call whose commit failed: a plain 503);
    ("raw", bytes) writes those bytes as the reply;
    ("reply", status, obj) answers that instead of handling.

    Holds expire `ttl` seconds after they start, checked at every request
    and by `expire_due()`; `events_first` is the oldest event kept (raise it
    with `trim(first)` to make older ones 410)."""

    def __init__(self, tokens: dict | None = None):
        self.tokens = tokens            # token -> set of roles, or None for open access
        # cred -> {"tot", "past": [entry...], "keys": {key: (call, body)},
        #          "holds": {id: hold}, "low": threshold or None}
        self.accounts: dict = {}
        self.events: list = []          # every event ever, id = index + 1
        self.events_first = 1
        self.low_default = None         # the server-wide --low-balance
        self.holds_max = HOLDS_PER_ACCOUNT_MAX
        self.requests: list = []        # (method, path, params, authorization)
        self._stopping = False
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
        self._new_event = asyncio.Condition()
        self.server = self.loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0))
        self.port = self.server.sockets[0].getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        self._ready.set()
        self.loop.run_forever()

    def stop(self) -> None:
        async def shut():
            self.server.close()
            self._stopping = True
            async with self._new_event:
                self._new_event.notify_all()        # long polls end now
            for w in list(self._writers):
                w.close()
            await asyncio.sleep(0.01)
            # A request still being handled (a delay fault) is ended here, as
            # asyncio.run ends its tasks: one left pending is destroyed with
            # the loop, and asyncio logs it into whichever test runs then.
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)
        if self.loop.is_running():
            asyncio.run_coroutine_threadsafe(shut(), self.loop).result(5)
            self.loop.call_soon_threadsafe(self.loop.stop)
            self._thread.join(5)

    def _in_loop(self, fn, *args):
        """Runs `fn` on the fake's loop (its state is the loop's) and returns
        its result."""
        async def go():
            return fn(*args)
        return asyncio.run_coroutine_threadsafe(go(), self.loop).result(5)

    # helpers for tests
    def fund(self, cred: str, by: int, low: int | None = None) -> None:
        self._in_loop(self._mod, cred, by, None, None, low)

    def tot(self, cred: str):
        acct = self.accounts.get(cred)
        return None if acct is None else acct["tot"]

    def mods(self) -> list:
        """The /mod requests that could change a balance: not the
        middleware's role probes (`probes`), which never can."""
        return [r for r in self.calls("/mod") if not _is_probe(r)]

    def probes(self) -> list:
        """Check mode's role probes: a charge of 1 with min INT64_MAX."""
        return [r for r in self.calls("/mod") if _is_probe(r)]

    def calls(self, path: str) -> list:
        return [r for r in self.requests if r[1] == path]

    def open_holds(self, cred: str) -> dict:
        """The account's holds not yet ended: id -> amount."""
        acct = self.accounts.get(cred, {"holds": {}})
        return {h: v["amount"] for h, v in acct["holds"].items() if v["end"] is None}

    def expire_due(self, now: float | None = None) -> None:
        """Ends every hold whose ttl has passed (at `now`, default the
        present), as the server's expiry does."""
        self._in_loop(self._expire, time.monotonic() if now is None else now)

    def trim(self, first: int) -> None:
        self.events_first = first

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
                    status, obj = await self._handle(method, path, params, headers)
                if action and action[0] == "apply_drop":
                    return
                if action and action[0] == "apply_reply":
                    status, obj = action[1], action[2]
                body = json.dumps(obj).encode()
                close = headers.get("connection", "").lower() == "close"
                writer.write(reply_bytes(status, body, close))
                await writer.drain()
                if close:
                    return
        except ConnectionError:
            return          # the caller left before its reply (a cancelled call): not an error
        finally:
            self._writers.discard(writer)
            writer.close()

    async def _handle(self, method, path, params, headers):
        refused = self._refused(method, path, params, headers)
        if refused is not None:
            return refused
        self._expire(time.monotonic())
        if path == "/events":
            return await self._events(params)
        handler = {"/tot": self._tot, "/past": self._past, "/hold": self._hold,
                   "/settle": self._settle}.get(path)
        if handler is not None:
            return handler(params)
        return self._mod(params["cred"], int(params["by"]), _opt(params, "min"),
                         params.get("key"), _opt(params, "low"))

    def _refused(self, method, path, params, headers):
        if path not in ROUTES:
            return _error(404, "not_found", "no such path")
        want, role = ROUTES[path]
        if method != want:
            return _error(405, "method_not_allowed", "wrong method")
        if role is None:
            role = "mint" if int(params["by"]) > 0 else "charge"
        if self.tokens is None:
            return None
        auth = headers.get("authorization", "")
        roles = self.tokens.get(auth[7:]) if auth.startswith("Bearer ") else None
        if roles is None:
            return _error(401, "unauthorized", "a token is required")
        if role not in roles:
            return _error(403, "forbidden", f"the token lacks {role}")
        return None

    def _tot(self, params):
        acct = self.accounts.get(params["cred"])
        if acct is None:
            return _error(404, "no_account", "no such account")
        return 200, {"tot": acct["tot"]}

    def _past(self, params):
        cred = params["cred"]
        acct = self.accounts.get(cred)
        if acct is None:
            return _error(404, "no_account", "no such account")
        limit = int(params.get("limit", 100))
        before = int(params["before"]) if "before" in params else None
        entries = [e for e in reversed(acct["past"]) if before is None or e["seq"] < before]
        page = entries[:limit]
        nxt = page[-1]["seq"] if len(page) == limit and page and page[-1]["seq"] > 1 else None
        return 200, {"account": account_id(cred), "past": page, "next": nxt}

    def _keyed(self, acct, key, call):
        """The first reply of a keyed call applied before, a 409 for the key
        reused by another call (the route, by, min and a hold's ttl), or
        None when the key is new."""
        if acct is None or key is None or key not in acct["keys"]:
            return None
        first, body = acct["keys"][key]
        if first != call:
            return _error(409, "key_reused", "key used with another by, min or ttl")
        return 200, body

    def _mod(self, cred, by, mn, key, low=None):
        acct = self.accounts.get(cred)
        again = self._keyed(acct, key, ("mod", by, mn))
        if again is not None:
            return again
        if acct is None and by < 0:
            return _error(404, "no_account", "a charge creates no account")
        tot = (acct["tot"] if acct else 0) + by
        if mn is not None and tot < mn:
            return _error(409, "insufficient", "below min", tot=tot - by)
        if not INT64_MIN <= tot <= INT64_MAX:
            return _error(409, "overflow", "out of int64")
        if acct is None:
            acct = self.accounts[cred] = {"tot": 0, "past": [], "keys": {}, "holds": {},
                                          "low": None}
        if low is not None:
            acct["low"] = low
        body = self._apply(cred, "mod", by, key, None)
        if key is not None:
            acct["keys"][key] = (("mod", by, mn), body)
        return 200, body

    def _hold(self, params):
        cred, by, key = params["cred"], int(params["by"]), params.get("key")
        mn, ttl = _opt(params, "min"), int(params["ttl"])
        acct = self.accounts.get(cred)
        again = self._keyed(acct, key, ("hold", by, mn, ttl))
        if again is not None:
            return again
        if acct is None:
            return _error(404, "no_account", "a hold creates no account")
        if acct["tot"] + by < (0 if mn is None else mn):
            return _error(409, "insufficient", "below min", tot=acct["tot"])
        if len(self.open_holds(cred)) >= self.holds_max:
            return _error(409, "too_many_holds", "over HOLDS_PER_ACCOUNT_MAX open holds")
        seq = len(acct["past"]) + 1
        acct["holds"][seq] = {"amount": -by, "end": None,
                              "expires": time.monotonic() + ttl}
        applied = self._apply(cred, "hold", by, key, seq)
        body = {"hold": seq, **applied}
        if key is not None:
            acct["keys"][key] = (("hold", by, mn, ttl), body)
        return 200, body

    def _settle(self, params):
        cred, hold, use = params["cred"], int(params["hold"]), int(params["use"])
        acct = self.accounts.get(cred)
        h = acct["holds"].get(hold) if acct else None
        if h is None:
            return _error(404, "no_hold", "the account has no such hold")
        if h["end"] is not None:
            if h["end"][0] == use:
                return 200, h["end"][1]
            return _error(409, "hold_ended", "the hold was settled or expired")
        if use > h["amount"]:
            return _error(400, "bad_request", "use is more than the held amount")
        body = self._apply(cred, "settle", h["amount"] - use, None, hold)
        h["end"] = (use, body)
        return 200, body

    def _expire(self, now):
        for cred, acct in self.accounts.items():
            for hold, h in acct["holds"].items():
                if h["end"] is None and h["expires"] <= now:
                    h["end"] = ("expired", None)
                    self._apply(cred, "expire", h["amount"], None, hold)

    def _apply(self, cred, kind, by, key, hold):
        """Appends the history entry and its events; the reply's body."""
        acct = self.accounts[cred]
        before, tot = acct["tot"], acct["tot"] + by
        acct["tot"] = tot
        seq = len(acct["past"]) + 1
        entry = {"seq": seq, "by": by, "tot": tot, "at": int(time.time() * 1000),
                 "key": key, "hold": hold}
        acct["past"].append(entry)
        self._emit(kind, cred, entry)
        low = acct["low"] if acct["low"] is not None else self.low_default
        if low is not None and before >= low > tot:
            self._emit("low_balance", cred, entry)
        return {"tot": tot, "seq": seq}

    def _emit(self, kind, cred, entry):
        self.events.append({"id": len(self.events) + 1, "type": kind,
                            "account": account_id(cred), **entry})

        async def wake():
            async with self._new_event:
                self._new_event.notify_all()
        self.loop.create_task(wake())

    async def _events(self, params):
        after = int(params.get("after", 0))
        limit = int(params.get("limit", 100))
        wait_s = int(params.get("wait", 0))
        if after < self.events_first - 1:
            return _error(410, "events_trimmed", "older than the retention",
                          first=self.events_first)
        if len(self.events) <= after and wait_s:
            async with self._new_event:
                try:
                    await asyncio.wait_for(
                        self._new_event.wait_for(
                            lambda: len(self.events) > after or self._stopping), wait_s)
                except asyncio.TimeoutError:
                    pass
        page = self.events[after:after + limit]
        return 200, {"events": page, "next": page[-1]["id"] if page else after}


BUSY = ("reply", 503, {"error": "busy", "detail": "full"})     # refused before applying
# The store takes no writes (failed, closing, its database not reached):
# refused before applying, as AccMan says it (docs/SERVER.md, "Errors").
NOT_APPLIED = ("reply", 503, {"error": "not_applied",
                              "detail": "the store cannot commit, nothing of this call was "
                                        "applied: the PostgreSQL store cannot be reached"})


def first_then(matches, first, later=None):
    """A fault for FakeAccMan: the first request for which `matches(path,
    params)` holds meets `first`, each later one `later` (None: handled as
    usual); every other request is handled as usual."""
    seen = [0]

    def fault(method, path, params):
        if matches(path, params):
            seen[0] += 1
            return first if seen[0] == 1 else later
    return fault


def charges(path, params) -> bool:
    """The middleware's charges and settles' keyed mods: the /mod calls
    with a key."""
    return "key" in params


def _is_probe(request) -> bool:
    params = request[2]
    return params.get("by") == "-1" and params.get("min") == str(INT64_MAX)


def _opt(params, name):
    return int(params[name]) if name in params else None


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
