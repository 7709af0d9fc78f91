"""Child process for the ledger crash test: runs keyed mods through group
commit from asyncio tasks and plain threads until killed, printing one line
per acknowledged mod as soon as it is acknowledged:

    A <cred> <seq> <by> <key>

Usage: ledger_child.py DATA ROUND [WAL_BYTES_MAX]

Each key's amount is a function of the key, so a retried key is the same
mod.  Every round also retries the keys of the previous round: those that
were applied must be answered from their record, never applied twice."""

import asyncio
import sys
import threading
import zlib

from accman import AccManError, Ledger
from accman.ledger.leveldb import Store

TASKS = 32
THREADS = 4
CREDS = ["acct-0", "acct-1", "acct-2", "acct-3"]


def mod_of(key):
    h = zlib.crc32(key.encode())
    by = h % 997 + 1
    if h & 1:
        return CREDS[h % len(CREDS)], -by, 0       # a charge, only if covered
    return CREDS[h % len(CREDS)], by, None


out_lock = threading.Lock()


def ack(cred, tot_seq, by, key):
    with out_lock:
        sys.stdout.write(f"A {cred} {tot_seq[1]} {by} {key}\n")
        sys.stdout.flush()


def keys_for(round_no, worker):
    i = 0
    while True:
        yield f"r{round_no}-w{worker}-{i}"
        i += 1


def retried_then_new(round_no, worker):
    """The previous round's first keys of this worker, then new ones."""
    if round_no > 0:
        yield from (f"r{round_no - 1}-w{worker}-{i}" for i in range(20))
    yield from keys_for(round_no, worker)


def main():
    path, round_no = sys.argv[1], int(sys.argv[2])
    # A third argument: the write-ahead log's size, small to make it wrap
    # (and take checkpoints) many times a round.
    if len(sys.argv) > 3:
        led = Ledger(path, store=Store(path, wal_bytes_max=int(sys.argv[3])))
    else:
        led = Ledger(path)
    sys.stdout.write("READY\n")
    sys.stdout.flush()

    def thread_worker(w):
        for key in retried_then_new(round_no, w):
            cred, by, min_ = mod_of(key)
            try:
                ack(cred, led.mod(cred, by, min=min_, key=key), by, key)
            except AccManError:
                pass

    for w in range(THREADS):
        threading.Thread(target=thread_worker, args=(1000 + w,), daemon=True).start()

    async def task_worker(w):
        for key in retried_then_new(round_no, w):
            cred, by, min_ = mod_of(key)
            try:
                ack(cred, await led.amod(cred, by, min=min_, key=key), by, key)
            except AccManError:
                pass

    async def run():
        await asyncio.gather(*[task_worker(w) for w in range(TASKS)])

    asyncio.run(run())


if __name__ == "__main__":
    main()
