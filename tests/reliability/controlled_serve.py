"""`accman serve`, but over a store whose commits a test controls, through
files in a control directory (the server is a subprocess; files are the
simplest channel that survives SIGSTOP and needs no protocol):

    CONTROL/hold         while it exists, every commit waits before writing
                         (a stalled disk: mods pile up behind the batch)
    CONTROL/fail-before  the next commits fail without writing anything
    CONTROL/fail-after   the next commits are written, then fail (a failed
                         fsync whose data reached the disk anyway)
    CONTROL/holding      written by the store while a commit is held
    CONTROL/lose-read    history reads miss their oldest entry (an iterator
                         that stopped short at a block damaged after open)
    CONTROL/fail-apply   LevelDB's writes of durable batches fail (behind
                         their answers), as Store.apply marks a failed one

Usage: python controlled_serve.py --data DIR --control DIR [--port N]
           [--batch-mods-max N] [--queued-mods-max N] [--store URL]

It serves through `accman.server.run(store=...)`, the hook the server keeps
for injected stores, with the same ready line as `accman serve`; limits come
from the same ACCMAN_* environment variables.  Nothing here changes AccMan:
the store is AccMan's own Store with `write` wrapped.

With --store it serves that PostgreSQL store with the bounds given, and the
control directory is not read: a test holds that store's commits from the
database itself (pgcluster.CounterLock locks the counter row every batch
takes last, as a stalled database would).
"""

import argparse
import os
import sys
import time

from accman.errors import StoreError
from accman.ledger import Ledger
from accman.server import ServerLimits, StartupError, run
from accman.ledger.leveldb import Store

POLL_S = 0.002


class ControlledStore(Store):
    def __init__(self, path, control):
        self.control = control          # the open applies, before __init__ returns
        super().__init__(path)

    def _flag(self, name):
        return os.path.exists(os.path.join(self.control, name))

    def history(self, hid, first_seq, last_seq):
        page = super().history(hid, first_seq, last_seq)
        if self._flag("lose-read") and page:
            del page[min(page)]
        return page

    def apply(self):
        if self._flag("fail-apply"):
            self.wal.broken = True
            raise StoreError(f"{self.path}: commit failed: injected LevelDB write error")
        return super().apply()

    def write(self, wal_record):
        if self._flag("hold"):
            marker = os.path.join(self.control, "holding")
            with open(marker, "w"):
                pass
            while self._flag("hold"):
                time.sleep(POLL_S)
            os.unlink(marker)
        if self._flag("fail-before"):
            raise StoreError(f"{self.path}: commit failed: injected write error")
        super().write(wal_record)
        if self._flag("fail-after"):
            # As Store.write after a failure: no checkpoint from now on, so
            # the restart replays the batch from the write-ahead log.
            self.wal.broken = True
            raise StoreError(f"{self.path}: commit failed: injected fsync error "
                             "after the write")


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--data", required=True)
    p.add_argument("--control", required=True)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0)
    p.add_argument("--batch-mods-max", type=int, default=None)
    p.add_argument("--queued-mods-max", type=int, default=None)
    p.add_argument("--store", default=None)
    args = p.parse_args()
    data = os.path.abspath(args.data)
    if args.store is not None:
        return serve_postgres(args, data)
    ledger = Ledger(data, store=ControlledStore(data, args.control),
                    batch_mods_max=args.batch_mods_max,
                    queued_mods_max=args.queued_mods_max)
    try:
        return run(host=args.host, port=args.port, data=data, store=ledger,
                   limits=ServerLimits.from_env())
    except StartupError as e:
        print(f"accman: error: {e}", file=sys.stderr, flush=True)
        return 2


def serve_postgres(args, data):
    bounds = {name: value for name, value in (("batch_mods_max", args.batch_mods_max),
                                              ("queued_mods_max", args.queued_mods_max))
              if value is not None}
    try:
        return run(host=args.host, port=args.port, data=data, store_urls=[args.store],
                   limits=ServerLimits.from_env(), store_options=bounds)
    except StartupError as e:
        print(f"accman: error: {e}", file=sys.stderr, flush=True)
        return 2


if __name__ == "__main__":
    sys.exit(main())
