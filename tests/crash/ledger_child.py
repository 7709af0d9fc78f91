"""Child process for the ledger crash test: runs keyed mods through group
commit from asyncio tasks and plain threads until killed, printing one line
per acknowledged mod as soon as it is acknowledged:

    A <cred> <seq> <by> <key>

With --holds, some keys are holds instead (some settled, the others left
to expire: their ttl is 1 to 3 s), and the child prints those too:

    H <cred> <hold> <tot> <by> <ttl> <key>     a hold acknowledged
    S <cred> <hold> <use> <tot> <seq> <key>    its settle acknowledged

Usage: ledger_child.py DATA ROUND [WAL_BYTES_MAX] [--holds]

Each key's change is a function of the key, so a retried key is the same
change.  Every round also retries the keys of the previous round: those
that were applied must be answered from their record, never applied
twice (a retried hold's settle is answered its first reply, or
hold_ended when the hold expired meanwhile)."""

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


def hold_of(key):
    """None for a mod's key; else (cred, by, ttl, use or None: left to
    expire), a function of the key as mod_of's."""
    h = zlib.crc32(key.encode())
    if (h >> 12) % 3 != 0:
        return None
    amount = h % 97 + 1
    use = (h >> 16) % (amount + 1) if (h >> 14) & 1 else None
    return CREDS[h % len(CREDS)], -amount, 1 + (h >> 20) % 3, use


out_lock = threading.Lock()


def say(line):
    with out_lock:
        sys.stdout.write(line + "\n")
        sys.stdout.flush()


def ack(cred, tot_seq, by, key):
    say(f"A {cred} {tot_seq[1]} {by} {key}")


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


def change(led, key, holds):
    """The key's change, blocking; prints what is acknowledged."""
    spec = hold_of(key) if holds else None
    if spec is None:
        cred, by, min_ = mod_of(key)
        ack(cred, led.mod(cred, by, min=min_, key=key), by, key)
        return
    cred, by, ttl, use = spec
    hold, tot, _ = led.hold(cred, by, ttl, key=key)
    say(f"H {cred} {hold} {tot} {by} {ttl} {key}")
    if use is not None:
        tot, seq = led.settle(cred, hold, use)
        say(f"S {cred} {hold} {use} {tot} {seq} {key}")


async def achange(led, key, holds):
    spec = hold_of(key) if holds else None
    if spec is None:
        cred, by, min_ = mod_of(key)
        ack(cred, await led.amod(cred, by, min=min_, key=key), by, key)
        return
    cred, by, ttl, use = spec
    hold, tot, _ = await led.ahold(cred, by, ttl, key=key)
    say(f"H {cred} {hold} {tot} {by} {ttl} {key}")
    if use is not None:
        tot, seq = await led.asettle(cred, hold, use)
        say(f"S {cred} {hold} {use} {tot} {seq} {key}")


def main():
    args = [a for a in sys.argv[1:] if a != "--holds"]
    holds = "--holds" in sys.argv
    path, round_no = args[0], int(args[1])
    # A third argument: the write-ahead log's size, small to make it wrap
    # (and take checkpoints) many times a round.
    if len(args) > 2:
        led = Ledger(path, store=Store(path, wal_bytes_max=int(args[2])))
    else:
        led = Ledger(path)
    sys.stdout.write("READY\n")
    sys.stdout.flush()

    def thread_worker(w):
        for key in retried_then_new(round_no, w):
            try:
                change(led, key, holds)
            except AccManError:
                pass

    for w in range(THREADS):
        threading.Thread(target=thread_worker, args=(1000 + w,), daemon=True).start()

    async def task_worker(w):
        for key in retried_then_new(round_no, w):
            try:
                await achange(led, key, holds)
            except AccManError:
                pass

    async def run():
        await asyncio.gather(*[task_worker(w) for w in range(TASKS)])

    asyncio.run(run())


if __name__ == "__main__":
    main()
