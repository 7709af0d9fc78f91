"""Helpers shared by the tests of holds and events (the embedded ledger's,
tests/test_holds.py, test_hold_expiry.py, test_events.py,
test_events_long_poll.py; and the server's), and `wait_for`."""

import asyncio
import contextlib
import threading
import time

from accman.ledger import Ledger
from accman.ledger.leveldb import Store
from accman.limits import EVENTS_LIMIT_MAX


def wait_for(predicate, timeout_s=10.0, what="the condition"):
    """The first true value of predicate(), polled; fails after timeout_s."""
    deadline = time.monotonic() + timeout_s
    while True:
        value = predicate()
        if value:
            return value
        assert time.monotonic() < deadline, f"not within {timeout_s} s: {what}"
        time.sleep(0.01)


def outcome_within(call, timeout_s, hung):
    """What `call()` returns or raises (an exception is returned), run in a
    thread; fails with `hung` if it has not ended within `timeout_s` (a
    wait for a thread that is gone would never end)."""
    outcome = []

    def run():
        try:
            outcome.append(call())
        except Exception as e:
            outcome.append(e)
    caller = threading.Thread(target=run, daemon=True)
    caller.start()
    caller.join(timeout_s)
    assert outcome, hung
    return outcome[0]


def entries(led, cred):
    """The history, oldest first, as (seq, by, tot, key, hold)."""
    return [(e.seq, e.by, e.tot, e.key, e.hold) for e in reversed(led.past(cred, limit=1000))]


def all_events(led, after=0):
    """Every event after `after`, read page by page; checks each `next`."""
    out = []
    while True:
        page, nxt = led.events(after=after, limit=EVENTS_LIMIT_MAX)
        if not page:
            assert nxt == after
            return out
        assert nxt == page[-1].id
        out += page
        after = nxt


def fund_many(led, cred, n, chunk=4096):
    """n mods of +1 on `cred`, submitted together a chunk at a time (they
    share batches): n events."""
    async def run():
        for i in range(0, n, chunk):
            await asyncio.gather(*[led.amod(cred, 1) for _ in range(min(chunk, n - i))])
    asyncio.run(run())


class GatedStore(Store):
    """A store whose writes wait for `gate` (open unless given closed);
    `writing` is set while one waits."""

    def __init__(self, path, gate=None):
        super().__init__(path)
        if gate is None:
            gate = threading.Event()
            gate.set()
        self.gate = gate
        self.writing = threading.Event()

    def write(self, wal):
        self.writing.set()
        self.gate.wait()
        self.writing.clear()
        super().write(wal)


@contextlib.contextmanager
def gated_ledger(path, clock=None, store_class=None):
    """A Ledger on a GatedStore (its gate open; or on `store_class`, one),
    yielded with the store; the gate is opened and the ledger closed on the
    way out."""
    store = (store_class or GatedStore)(path)
    led = Ledger(path, clock_ms=clock, store=store)
    try:
        yield led, store
    finally:
        store.gate.set()
        led.close()
