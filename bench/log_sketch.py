"""The log sketch: how this disk answers the records of a server of AccMan's shape.

    taskset -c 0 .venv/bin/python bench/log_sketch.py --port 8083 \\
        --file /tmp/log-sketch [--layout written|unwritten|append] [--writers 1|2] \\
        [--size-mib 1024]
    taskset -c 1 wrk -t1 -c16 -d5s -s bench/wrk/mod_cycle.lua \\
        http://127.0.0.1:8083 -- bench- 1000

A diagnostic, not a peer (bench/plyvel_sketch.py is the peer): a uvloop
protocol that parses `PATCH /mod?cred=C&by=N` in Python and keeps the
balances in a dict; the mods queued since the last record are one
record, 4 KiB-aligned, written `O_DIRECT|O_DSYNC` by a writer thread
while the next batch fills, and their replies go out, in the order
asked, once it is written.  It checks nothing else (`min` is ignored,
bodies are not read, heads are not bounded) and keeps no history: what
it measures is the disk under a group commit's pattern of writes, with
none of AccMan's own work.

`--layout written`: the file is written with zeros first, as AccMan's
log is (accman.ledger.walwriter), so that each record overwrites written
blocks; `unwritten`: the file is allocated only (`posix_fallocate`), so
that each record also marks its blocks written, until the records wrap
at the end of the file and overwrite their own (the report counts the
laps); `append`: the file starts empty and each record is written at its
end, so that each write also grows the file (AccMan's log as it would be
without the zeros written ahead of it), until the records reach
`--size-mib`, where the file is emptied and the next record written at
0.  `--writers 2` keeps two records in flight, written side by side by
two threads, their replies still in order (not with `append`, whose
emptying would race a write in flight).

On SIGTERM or SIGINT it prints on stderr the records written, the mods,
the laps, and the median and 90th percentile of a record's write (with
`append`, a lap's emptying is timed with the record after it), then
exits.  A failed write, or a batch too large for the file, stops it
with the cause on stderr and exit status 1.  docs/PERFORMANCE.md ("What
would move the figures") has what it showed on the development VM.
"""

import argparse
import asyncio
import mmap
import os
import queue
import signal
import sys
import threading
import time

import uvloop

from harness.base import nearest_rank
from harness.disk import BLOCK_BYTES, unwritten, zero_filled

SIZE_MIB_MAX = 64 * 1024
WRITERS_MAX = 2
SAMPLES_MAX = 1_000_000         # write times kept for the report; the count stays exact
OK = b"HTTP/1.1 200 OK\r\ncontent-length: %d\r\n\r\n%d"
NOT_FOUND = b"HTTP/1.1 404 Not Found\r\ncontent-length: 0\r\n\r\n"


def open_log(path, size, layout):
    """The file, laid out as asked, opened O_DIRECT|O_DSYNC."""
    flags = os.O_DIRECT | os.O_DSYNC
    if layout == "unwritten":
        return unwritten(path, size, flags)
    # Opened first: a file system that refuses O_DIRECT refuses before any zeros.
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | flags, 0o600)
    if layout == "append":
        return fd                       # empty: each record grows it
    try:
        zero_filled(path, size)
    except BaseException:
        os.close(fd)
        raise
    return fd


def span_of(payload):
    return (len(payload) + BLOCK_BYTES - 1) // BLOCK_BYTES * BLOCK_BYTES


class Log:
    """The records' places and the writer threads.  On the loop,
    `written(seq, seconds)` is called as each record is written, in any
    order, and `failed(error)` if a write fails (the thread then ends)."""

    def __init__(self, fd, size, loop, written, failed, append=False):
        self.fd, self.size, self.loop, self.append = fd, size, loop, append
        self.written, self.failed = written, failed
        self.offset = 0
        self.laps = 0
        self.jobs = queue.SimpleQueue()

    def start(self, writers):
        assert not (self.append and writers > 1), "a lap's emptying would race a write"
        for i in range(writers):
            threading.Thread(target=self.write_records, name=f"writer-{i}", daemon=True).start()

    def fits(self, payload):
        return 0 < span_of(payload) <= self.size

    def put(self, seq, payload):
        """Queues the record at the next place, at 0 again past the end (the
        file emptied first when each record grows it)."""
        span = span_of(payload)
        assert self.fits(payload), f"a record of {span} bytes in a log of {self.size}"
        empty_first = False
        if self.offset + span > self.size:
            self.offset = 0
            self.laps += 1
            empty_first = self.append
        self.jobs.put((seq, payload, self.offset, span, empty_first))
        self.offset += span

    def write_records(self):
        buf = mmap.mmap(-1, BLOCK_BYTES)
        while True:
            seq, payload, offset, span, empty_first = self.jobs.get()
            try:
                if span > len(buf):
                    buf = mmap.mmap(-1, span)
                buf[:len(payload)] = payload
                buf[len(payload):span] = bytes(span - len(payload))
                t0 = time.perf_counter()
                if empty_first:         # one writer: every record before is written
                    os.ftruncate(self.fd, 0)
                if os.pwritev(self.fd, [memoryview(buf)[:span]], offset) != span:
                    raise OSError(f"a short write at offset {offset}")
                elapsed = time.perf_counter() - t0
            except Exception as e:      # told to the loop, which stops: never a silent hang
                self.loop.call_soon_threadsafe(self.failed, f"{type(e).__name__}: {e}")
                return
            self.loop.call_soon_threadsafe(self.written, seq, elapsed)


class Commit:
    """Group commit on the loop: the mods queued since the last record are
    one record, at most `in_flight` records are being written, and replies
    go out in order."""

    def __init__(self, loop, in_flight):
        self.loop, self.in_flight = loop, in_flight
        self.log = None
        self.payload, self.replies = bytearray(), []
        self.seal_due = False
        self.next_seq = self.next_told = 0
        self.held = {}                  # seq -> (written, replies), until told in order
        self.mods = self.records = 0    # written
        self.times = []                 # each record's write, in seconds
        self.error = None

    def add(self, transport, record, reply):
        """A reply owed after what was asked before it; after `record` is
        written, if there is one (a request that is not a mod has none)."""
        self.payload += record
        self.replies.append((transport, reply, bool(record)))
        if not self.seal_due:
            self.seal_due = True
            self.loop.call_soon(self.seal)

    def seal(self):
        self.seal_due = False
        if (self.error is not None or not self.replies
                or self.next_seq - self.next_told >= self.in_flight):
            return                      # a record written seals what queued meanwhile
        if not self.log.fits(self.payload) and self.payload:
            self.fail(f"a batch of {len(self.payload)} bytes does not fit in the log's "
                      f"{self.log.size}: give a larger --size-mib")
            return
        seq, payload = self.next_seq, bytes(self.payload)
        self.held[seq] = (not payload, self.replies)    # nothing to write: told in turn
        self.next_seq += 1
        self.payload, self.replies = bytearray(), []
        if payload:
            self.log.put(seq, payload)
        else:
            self.tell()

    def written(self, seq, seconds):
        self.records += 1
        if len(self.times) < SAMPLES_MAX:
            self.times.append(seconds)
        self.held[seq] = (True, self.held[seq][1])
        self.tell()
        self.seal()

    def tell(self):
        """The replies of every batch written, in the order asked."""
        while self.next_told in self.held and self.held[self.next_told][0]:
            for transport, reply, is_mod in self.held.pop(self.next_told)[1]:
                self.mods += is_mod
                if not transport.is_closing():
                    transport.write(reply)
            self.next_told += 1

    def fail(self, error):
        """Nothing more is written or answered; the loop stops."""
        self.error = error
        self.loop.stop()

    def report(self):
        if not self.times:
            return f"log sketch: no records written, {self.mods} mods"
        times = sorted(self.times)
        return (f"log sketch: {self.records} records, {self.mods} mods "
                f"({self.mods / self.records:.1f} a record), {self.log.laps} laps, write "
                f"median {nearest_rank(times, 0.5) * 1e6:.0f} µs, "
                f"90th percentile {nearest_rank(times, 0.9) * 1e6:.0f} µs")


class Mods(asyncio.Protocol):
    """`PATCH /mod?cred=C&by=N`: the new balance once its record is written."""

    def __init__(self, commit, balances):
        self.commit, self.balances = commit, balances
        self.rest = b""

    def connection_made(self, transport):
        self.transport = transport

    def data_received(self, data):
        data = self.rest + data
        while (end := data.find(b"\r\n\r\n")) >= 0:
            head, data = data[:end], data[end + 4:]
            self.request(head.split(b" ", 2))
        self.rest = data

    def request(self, line):
        if len(line) < 2 or line[0] != b"PATCH" or not line[1].startswith(b"/mod?"):
            self.commit.add(self.transport, b"", NOT_FOUND)
            return
        args = dict(kv.partition(b"=")[::2] for kv in line[1][5:].split(b"&"))
        try:
            cred, by = args[b"cred"], int(args[b"by"])
        except (KeyError, ValueError):
            self.commit.add(self.transport, b"", NOT_FOUND)
            return
        tot = self.balances.get(cred, 0) + by
        self.balances[cred] = tot
        record, body = b"%s %d %d\n" % (cred, by, tot), b"%d" % tot
        self.commit.add(self.transport, record, OK % (len(body), tot))


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--port", type=int, required=True, help="0 for any free port")
    p.add_argument("--file", required=True, help="the log's file (replaced)")
    p.add_argument("--layout", choices=("written", "unwritten", "append"), default="written")
    p.add_argument("--writers", type=int, default=1, help=f"1 to {WRITERS_MAX}")
    p.add_argument("--size-mib", type=int, default=1024, help="the log's size")
    args = p.parse_args(argv)
    if not 0 <= args.port <= 65535:
        p.error(f"--port must be from 0 to 65535, not {args.port}")
    if not 1 <= args.writers <= WRITERS_MAX:
        p.error(f"--writers must be from 1 to {WRITERS_MAX}, not {args.writers}")
    if args.layout == "append" and args.writers != 1:
        p.error("--layout append takes --writers 1: emptying the file at the end of a lap "
                "would race a record in flight")
    if not 1 <= args.size_mib <= SIZE_MIB_MAX:
        p.error(f"--size-mib must be from 1 to {SIZE_MIB_MAX}, not {args.size_mib}")
    if not os.path.isdir(os.path.dirname(os.path.abspath(args.file))):
        p.error(f"--file {args.file}: its directory does not exist")
    loop = uvloop.new_event_loop()
    commit = Commit(loop, args.writers)
    balances = {}
    # Bound before the file is touched: a port in use leaves another's log as it was.
    server = loop.run_until_complete(
        loop.create_server(lambda: Mods(commit, balances), "127.0.0.1", args.port))
    size = args.size_mib << 20
    commit.log = Log(open_log(args.file, size, args.layout), size, loop,
                     commit.written, commit.fail, append=args.layout == "append")
    commit.log.start(args.writers)
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, loop.stop)
    port = server.sockets[0].getsockname()[1]
    print(f"log sketch: listening on 127.0.0.1:{port}", file=sys.stderr, flush=True)
    loop.run_forever()
    server.close()
    print(commit.report(), file=sys.stderr, flush=True)
    if commit.error is not None:
        print(f"log sketch: stopped: {commit.error}", file=sys.stderr, flush=True)
        sys.exit(1)


if __name__ == "__main__":
    main()
