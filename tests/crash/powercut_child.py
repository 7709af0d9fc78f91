"""Child process for the power-loss emulation (tests/test_powercut.py): a
short, deterministic run of keyed mods through group commit from a few
threads, printing one line per acknowledged mod as soon as it is
acknowledged:

    A <cred> <seq> <by> <key>

Usage: powercut_child.py DATA PHASE MODS_PER_THREAD

Phase 0 makes the store and exits without closing it (as a kill would
leave it: records after the last checkpoint); later phases reopen it (the
recovery that replays them is traced too) and close it cleanly.  The
write-ahead log is small, so that it wraps and takes checkpoints."""

import os
import sys
import threading

from accman import Ledger
from accman.ledger.leveldb import Store

THREADS = 3
CREDS = ["pc-0", "pc-1"]
WAL_BYTES_MAX = 8 * 4096


def main():
    path, phase, per_thread = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    led = Ledger(path, store=Store(path, wal_bytes_max=WAL_BYTES_MAX))
    out = threading.Lock()

    def worker(w):
        for i in range(per_thread):
            key = f"p{phase}-w{w}-{i}"
            cred, by = CREDS[(w + i) % len(CREDS)], (phase + 1) * 1000 + w * 100 + i + 1
            tot, seq = led.mod(cred, by, key=key)
            with out:
                os.write(1, f"A {cred} {seq} {by} {key}\n".encode())

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(THREADS)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    if phase == 0:
        os._exit(0)         # no close: the records after the checkpoint stay
    led.close()


if __name__ == "__main__":
    main()
