"""The baseline for bench/load.py: what a Python user would otherwise write.

uvicorn + starlette + plyvel, with AccMan's /tot and /mod:

    /work/venv/bin/python bench/baseline_app.py --port 8081 --data /tmp/baseline

The same routes and, in spirit, the same semantics as ../shared/SPEC.md:
credentials are checked against the SPEC's alphabet and stored under a hash,
`by` and `min` are parsed strictly (never `int()` on raw input), `min` is the
atomic "charge only if the balance covers it", an idempotency key returns the
original reply, and a 200 from /mod means the LevelDB write batch (balance,
history entry, key) was written with `sync=True`.

It is written the way such a service usually is: an `async def` endpoint
that reads, checks and writes with no `await` in between (so no
check-then-act race on the event loop) and one synced write per mod.  There
is no group commit: that is the point of comparing.  It is not part of
AccMan and is not tested; it exists only to be measured.
"""

import argparse
import contextlib
import hashlib
import json
import re
import struct
import time

import plyvel
import uvicorn
from starlette.applications import Starlette
from starlette.responses import JSONResponse
from starlette.routing import Route

CRED_RE = re.compile(r"[A-Za-z0-9_-]{1,128}\Z", re.ASCII)
KEY_RE = re.compile(r"[A-Za-z0-9_-]{1,64}\Z", re.ASCII)
BY_RE = re.compile(r"-?[1-9][0-9]{0,18}\Z", re.ASCII)
MIN_RE = re.compile(r"(?:0|-?[1-9][0-9]{0,18})\Z", re.ASCII)
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1
ACCOUNT = struct.Struct(">qQ")          # balance, last seq


def error(status, code, detail, **extra):
    return JSONResponse({"error": code, **extra, "detail": detail}, status_code=status)


def parse_int(text, pattern, name):
    if text is None or not pattern.match(text):
        raise ValueError(f"{name} must be a plain decimal integer")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise ValueError(f"{name} must fit in a signed 64-bit integer")
    return value


def query(request, allowed):
    """The query's parameters and its credential, by the SPEC's rules."""
    params = request.query_params
    names = [k for k, _ in params.multi_items()]
    if len(names) != len(set(names)):
        raise ValueError("a parameter appears more than once")
    unknown = set(names) - allowed
    if unknown:
        raise ValueError(f"unknown parameter {sorted(unknown)[0]}")
    cred = params.get("cred")
    if cred is None or not CRED_RE.match(cred):
        raise ValueError("cred must be 1 to 128 of A-Z a-z 0-9 _ -")
    return params, cred


def mod_values(request):
    """(cred, by, min, key) of a /mod, or ValueError."""
    params, cred = query(request, {"cred", "by", "min", "key"})
    by = parse_int(params.get("by"), BY_RE, "by")
    min_ = params.get("min")
    min_ = None if min_ is None else parse_int(min_, MIN_RE, "min")
    key = params.get("key")
    if key is not None and not KEY_RE.match(key):
        raise ValueError("key must be 1 to 64 of A-Z a-z 0-9 _ -")
    return cred, by, min_, key


def account_key(cred):
    return b"a" + hashlib.sha256(cred.encode("ascii")).digest()


class Baseline:
    """The two routes over one plyvel database."""

    def __init__(self, path):
        self.db = plyvel.DB(path, create_if_missing=True)

    async def tot(self, request):
        try:
            _, cred = query(request, {"cred"})
        except ValueError as e:
            return error(400, "bad_request", str(e))
        raw = self.db.get(account_key(cred))
        if raw is None:
            return error(404, "no_account", "no account has this cred")
        balance, _ = ACCOUNT.unpack(raw)
        return JSONResponse({"tot": balance})

    async def mod(self, request):
        try:
            cred, by, min_, key = mod_values(request)
        except ValueError as e:
            return error(400, "bad_request", str(e))
        akey = account_key(cred)
        if key is not None:
            done = self.db.get(b"k" + akey + key.encode("ascii"))
            if done is not None:
                d_by, d_min, body = json.loads(done)
                if (d_by, d_min) != (by, min_):
                    return error(409, "key_reused", "this key was used with another by or min")
                return JSONResponse(body)
        raw = self.db.get(akey)
        balance, seq = ACCOUNT.unpack(raw) if raw is not None else (0, 0)
        new = balance + by
        if not INT64_MIN <= new <= INT64_MAX:
            return error(409, "overflow", "the balance would leave the signed 64-bit range")
        if min_ is not None and new < min_:
            return error(409, "insufficient", "the balance does not cover this mod",
                         tot=balance)
        return JSONResponse(self.write(akey, by, min_, key, new, seq + 1))

    def write(self, akey, by, min_, key, new, seq):
        """The balance, the history entry and the key in one synced batch;
        the reply body."""
        body = {"tot": new, "seq": seq}
        entry = {"seq": seq, "by": by, "tot": new, "at": int(time.time() * 1000), "key": key}
        with self.db.write_batch(sync=True) as batch:
            batch.put(akey, ACCOUNT.pack(new, seq))
            batch.put(b"h" + akey + struct.pack(">Q", seq), json.dumps(entry).encode())
            if key is not None:
                batch.put(b"k" + akey + key.encode("ascii"),
                          json.dumps([by, min_, body]).encode())
        return body


def make_app(path):
    base = Baseline(path)

    @contextlib.asynccontextmanager
    async def lifespan(app):
        yield
        base.db.close()

    return Starlette(routes=[
        Route("/tot", base.tot, methods=["GET"]),
        Route("/mod", base.mod, methods=["PATCH"]),
    ], lifespan=lifespan)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8081)
    p.add_argument("--data", required=True, help="LevelDB directory (created if missing)")
    args = p.parse_args(argv)
    # uvicorn's own choices: uvloop (installed with AccMan), and httptools
    # when it is installed, else h11 ("auto").  Access logs off, as in
    # production behind a load balancer that logs.
    uvicorn.run(make_app(args.data), host=args.host, port=args.port, loop="uvloop",
                http="auto", access_log=False, log_level="warning", backlog=1024)


if __name__ == "__main__":
    main()
