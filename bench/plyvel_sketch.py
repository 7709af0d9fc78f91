"""The plyvel sketch for bench/load.py: the simplest durable server there is.

    .venv/bin/python bench/plyvel_sketch.py --port 8082 --data /tmp/sketch

What a careful engineer would write in an afternoon to serve AccMan's /tot
and /mod durably from Python, and no less: an asyncio protocol on uvloop, the
balances in a dict, and group commit: the mods of a loop turn go to a writer
thread as one plyvel `write_batch(sync=True)` (the GIL is released while
LevelDB writes and fsyncs), the next batch filling meanwhile, and each
reply sent once its batch is on disk.  One LevelDB record per mod, its
history entry (cred, seq -> by, tot, at), from which the balances are read
back at open.

It keeps the contract's promises that cost time: `cred`, `by` and `min`
checked strictly; `min` the atomic "charge only if the balance covers it";
no 200 before the mod is durable; no reader shown a balance that is not yet
durable (a /tot of an account whose mods are still being written waits for
their batch); pipelined requests answered in order; a failed write stops
all answers but 503.  It leaves out what AccMan adds: hashed credentials,
idempotency keys, /past, holds, events, tokens, limits on connections and
time, and HTTP beyond keep-alive HTTP/1.1 without bodies.  It is not part of
AccMan and is not tested as AccMan is; it exists to be measured against.
"""

import argparse
import asyncio
import collections
import json
import queue
import re
import signal
import struct
import threading
import time
from email.utils import formatdate

import plyvel
import uvloop

CRED_RE = re.compile(rb"[A-Za-z0-9_-]{1,128}\Z")
BY_RE = re.compile(rb"-?[1-9][0-9]{0,18}\Z")
MIN_RE = re.compile(rb"(?:0|-?[1-9][0-9]{0,18})\Z")
CONTENT_LENGTH_RE = re.compile(rb"\r\ncontent-length:[ \t]*([0-9]+)[ \t]*(?:\r\n|$)")
INT64_MIN, INT64_MAX = -(2 ** 63), 2 ** 63 - 1

HEAD_BYTES_MAX = 8192            # a request head this long without its end: 431, closed
OWED_REPLIES_MAX = 1024          # replies owed on one connection before it stops reading

ENTRY = struct.Struct(">qqQ")    # a history entry's value: by, tot, at (unix ms)
SEQ = struct.Struct(">Q")        # after the cred and a NUL, in the entry's key

STATUS = {200: b"200 OK", 400: b"400 Bad Request", 404: b"404 Not Found",
          405: b"405 Method Not Allowed", 409: b"409 Conflict",
          431: b"431 Request Header Fields Too Large", 503: b"503 Service Unavailable"}


class Refused(Exception):
    """A request answered with an error: status, code, detail."""

    def __init__(self, status, code, detail, **extra):
        super().__init__(detail)
        self.status = status
        self.body = json.dumps({"error": code, **extra, "detail": detail}).encode()


class Clock:
    """The Date header, formatted once a second."""

    def __init__(self):
        self.second = None
        self.date = b""

    def now(self):
        second = int(time.time())
        if second != self.second:
            self.second = second
            self.date = formatdate(second, usegmt=True).encode()
        return self.date


class Slot:
    """A reply owed once a batch is durable; `acct` and `seq` for a mod."""

    __slots__ = ("conn", "reply", "key", "value", "acct", "seq", "done")

    def __init__(self, conn, reply, key=None, value=None, acct=None, seq=0):
        self.conn, self.reply, self.key, self.value = conn, reply, key, value
        self.acct, self.seq, self.done = acct, seq, False


class Committer:
    """Group commit: what a loop turn queues is sealed at the end of the turn
    and written by the writer thread as one synced batch; while it writes,
    the next batch fills, and is sealed when the write completes."""

    def __init__(self, loop, db):
        self.loop, self.db = loop, db
        self.filling = []
        self.writing = False
        self.seal_due = False
        self.failed = None
        self.batches = queue.SimpleQueue()
        self.writer = threading.Thread(target=self.write_batches, name="writer", daemon=True)
        self.writer.start()

    def add(self, slot):
        self.filling.append(slot)
        if not self.writing and not self.seal_due:
            self.seal_due = True
            self.loop.call_soon(self.seal)

    def seal(self):
        self.seal_due = False
        if self.writing or not self.filling:
            return
        batch, self.filling = self.filling, []
        self.writing = True
        self.batches.put(batch)

    def write_batches(self):
        while (batch := self.batches.get()) is not None:
            error = None
            try:
                wb = self.db.write_batch(sync=True)
                for slot in batch:
                    if slot.key is not None:
                        wb.put(slot.key, slot.value)
                wb.write()
            except Exception as e:       # any failure stops the writes: see completed
                error = f"{type(e).__name__}: {e}"
            self.loop.call_soon_threadsafe(self.completed, batch, error)

    def completed(self, batch, error):
        self.writing = False
        if error is not None:
            self.failed = error
        conns = set()
        for slot in batch:
            if error is not None:
                slot.reply = slot.conn.server.unavailable()
            elif slot.acct is not None:
                slot.acct[2] = slot.seq
            slot.done = True
            conns.add(slot.conn)
        for conn in conns:
            conn.flush()
        self.seal()

    def stop(self):
        self.batches.put(None)
        self.writer.join()


class Sketch:
    """The balances and the routes; every reply's bytes are made here."""

    def __init__(self, loop, path):
        self.db = plyvel.DB(path, create_if_missing=True)
        # cred -> [tot, seq, durable seq]: the newest entry of each cred is
        # the last of its keys.
        self.accounts = {}
        for key, value in self.db:
            seq = SEQ.unpack(key[-8:])[0]
            self.accounts[key[:-9]] = [ENTRY.unpack(value)[1], seq, seq]
        self.committer = Committer(loop, self.db)
        self.clock = Clock()

    def close(self):
        self.committer.stop()
        self.db.close()

    def reply(self, status, body):
        return b"HTTP/1.1 %s\r\nContent-Type: application/json\r\nContent-Length: %d\r\n" \
               b"Date: %s\r\n\r\n%s" % (STATUS[status], len(body), self.clock.now(), body)

    def unavailable(self):
        e = Refused(503, "unavailable", f"the store cannot commit: {self.committer.failed}")
        return self.reply(503, e.body)

    def answer(self, conn, method, target):
        """A GET /tot or PATCH /mod: reply bytes, or a Slot owed after a commit."""
        if self.committer.failed:
            return self.unavailable()
        path, _, query = target.partition(b"?")
        try:
            if path == b"/tot":
                return self.tot(conn, method, query)
            if path == b"/mod":
                return self.mod(conn, method, query)
            raise Refused(404, "not_found", "no such path: the routes are /tot and /mod")
        except Refused as e:
            return self.reply(e.status, e.body)

    def owed_after_commit(self, conn, acct, status, body):
        """A reply that shows a balance: at once if the balance is durable,
        else once the batch holding its newest mod is."""
        if acct[1] == acct[2]:
            return self.reply(status, body)
        slot = Slot(conn, self.reply(status, body))
        self.committer.add(slot)
        return slot

    def tot(self, conn, method, query):
        if method != b"GET":
            raise Refused(405, "method", "/tot is GET")
        cred = params(query, (b"cred",))[b"cred"]
        acct = self.accounts.get(cred)
        if acct is None:
            raise Refused(404, "no_account", "no account has this cred")
        return self.owed_after_commit(conn, acct, 200, b'{"tot":%d}' % acct[0])

    def mod(self, conn, method, query):
        if method != b"PATCH":
            raise Refused(405, "method", "/mod is PATCH")
        p = params(query, (b"cred", b"by", b"min"))
        cred = p[b"cred"]
        by = number(p.get(b"by"), BY_RE, "by")
        floor = None if b"min" not in p else number(p[b"min"], MIN_RE, "min")
        acct = self.accounts.get(cred)
        if acct is None:
            if by < 0:
                raise Refused(404, "no_account", "a charge needs an account: fund it first")
            acct = [0, 0, 0]
        tot = acct[0] + by
        if not INT64_MIN <= tot <= INT64_MAX:
            raise Refused(409, "overflow", "the balance would leave the signed 64-bit range")
        if floor is not None and tot < floor:
            body = Refused(409, "insufficient", "the balance does not cover this mod",
                           tot=acct[0]).body
            return self.owed_after_commit(conn, acct, 409, body)
        self.accounts[cred] = acct
        acct[0] = tot
        acct[1] = seq = acct[1] + 1
        slot = Slot(conn, self.reply(200, b'{"tot":%d,"seq":%d}' % (tot, seq)),
                    cred + b"\0" + SEQ.pack(seq), ENTRY.pack(by, tot, int(time.time() * 1000)),
                    acct, seq)
        self.committer.add(slot)
        return slot


def params(query, allowed):
    """The query's parameters, each at most once, all known, `cred` valid."""
    out = {}
    for pair in query.split(b"&") if query else ():
        name, eq, value = pair.partition(b"=")
        if name not in allowed or name in out or not eq:
            raise Refused(400, "bad_request", f"unknown or repeated parameter {name[:40]!r}; "
                          f"the parameters are {b', '.join(allowed).decode()}")
        out[name] = value
    if not CRED_RE.match(out.get(b"cred", b"")):
        raise Refused(400, "bad_request", "cred must be 1 to 128 of A-Z a-z 0-9 _ -")
    return out


def number(text, pattern, name):
    if text is None or not pattern.match(text):
        raise Refused(400, "bad_request", f"{name} must be a plain decimal integer")
    value = int(text)
    if not INT64_MIN <= value <= INT64_MAX:
        raise Refused(400, "bad_request", f"{name} must fit in a signed 64-bit integer")
    return value


class Connection(asyncio.Protocol):
    """One client: requests parsed as they come, replies written in order,
    all that is ready written at once."""

    def __init__(self, server):
        self.server = server
        self.transport = None
        self.buf = b""
        self.owed = collections.deque()   # bytes, or a Slot not yet durable
        self.out = []
        self.closing = False
        self.holds = set()                # why reading is paused: "owed", "write"

    def connection_made(self, transport):
        self.transport = transport

    def connection_lost(self, _exc):
        self.closing = True

    def data_received(self, data):
        buf = self.buf + data if self.buf else data
        start = 0
        while not self.closing:
            end = buf.find(b"\r\n\r\n", start)
            if end < 0:
                break
            self.request(buf[start:end])
            start = end + 4
        self.buf = buf[start:]
        if len(self.buf) > HEAD_BYTES_MAX:
            self.refuse(431, f"a request head is at most {HEAD_BYTES_MAX} bytes")
        self.flush()
        if len(self.owed) >= OWED_REPLIES_MAX:
            self.hold("owed", True)

    def request(self, head):
        line, _, headers = head.partition(b"\r\n")
        parts = line.split(b" ")
        if len(parts) != 3 or parts[2] != b"HTTP/1.1":
            return self.refuse(400, "the request line must be METHOD TARGET HTTP/1.1")
        headers = b"\r\n" + headers.lower()
        length = CONTENT_LENGTH_RE.search(headers)
        if (length and int(length.group(1))) or b"\r\ntransfer-encoding:" in headers:
            return self.refuse(400, "the routes take no body")
        reply = self.server.answer(self, parts[0], parts[1])
        if self.owed or reply.__class__ is not bytes:
            self.owed.append(reply)
        else:
            self.out.append(reply)
        if b"\r\nconnection: close" in headers:
            self.closing = True

    def refuse(self, status, detail):
        """A framing error: answered after what is owed, then the connection closes."""
        self.owed.append(self.server.reply(status, Refused(status, "bad_request", detail).body))
        self.closing = True

    def flush(self):
        owed, out = self.owed, self.out
        while owed:
            head = owed[0]
            if head.__class__ is bytes:
                out.append(head)
            elif head.done:
                out.append(head.reply)
            else:
                break
            owed.popleft()
        if self.transport.is_closing():
            return
        if out:
            self.transport.write(b"".join(out))
            out.clear()
        if self.closing and not owed:
            self.transport.close()
        elif "owed" in self.holds and len(owed) < OWED_REPLIES_MAX // 2:
            self.hold("owed", False)

    def hold(self, reason, on):
        """Stop reading while any reason holds: too many replies owed, or a
        client that does not read what is written to it."""
        was = bool(self.holds)
        (self.holds.add if on else self.holds.discard)(reason)
        if bool(self.holds) != was and not self.transport.is_closing():
            if self.holds:
                self.transport.pause_reading()
            else:
                self.transport.resume_reading()

    def pause_writing(self):
        self.hold("write", True)

    def resume_writing(self):
        self.hold("write", False)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8082)
    p.add_argument("--data", required=True, help="LevelDB directory (created if missing)")
    args = p.parse_args(argv)
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    sketch = Sketch(loop, args.data)
    server = loop.run_until_complete(loop.create_server(
        lambda: Connection(sketch), args.host, args.port, backlog=1024))
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    print(f"plyvel sketch: serving http://{args.host}:{args.port} data={args.data}", flush=True)
    try:
        loop.run_forever()
    finally:
        server.close()
        sketch.close()
        loop.close()


if __name__ == "__main__":
    main()
