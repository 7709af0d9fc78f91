"""The events checker under the retention's trimming (test_events_bank.py
runs its server with a retention of RETENTION_S, a trim pass each second
under the faults): what the store kept, the webhook's whole stream, and
the receiver taken down past the retention.  What the docs promise and
these checks hold the run to:

* the webhook loses nothing: the events after its saved cursor are kept
  whatever their age (SERVER.md, Webhooks, "Retention"), so its receiver
  has every id 1..N, and that stream is the whole history the store and
  the readers are judged against (eventscheck.py);
* what the store keeps is a suffix first..N of that stream, without a gap,
  and a read from before it is 410 events_trimmed naming `first`;
* a reader told of a gap by a 410 skipped only ids past the retention
  then (eventscheck.reader_problems).

A module, not a conftest.py: see relhelp.py."""

import random
import threading

from conftest import request_bytes
from test_bank import CLIENT_TIMEOUT_S

RETENTION_S = 1                 # the shortest --events-retention: a trim pass each second
# The receiver down this long (longer than the retention, so that events
# waiting for it are past it): first at once, while the first server lives
# through trim passes, then again after each wait (drawn from) while the
# run lasts.
RECEIVER_DOWN_S = 2.5 * RETENTION_S
RECEIVER_DOWN_FIRST_S = (0.0, 0.2)
RECEIVER_UP_S = (1.0, 4.0)


def store_kept(srv):
    """The store's events as GET /events serves them: (the oldest id kept
    as its 410 names it, or 1; every event from there on, in order)."""
    out, first, after = [], 1, 0
    with srv.connect(timeout=CLIENT_TIMEOUT_S) as c:
        while True:
            c.send(request_bytes("GET", f"/events?after={after}&limit=1000"))
            r = c.response()
            if r.status == 410:
                assert not out, f"a 410 after event {after}, which the store served: {r.json}"
                first, after = r.json["first"], r.json["first"] - 1
                continue
            assert r.status == 200, r
            if not r.json["events"]:
                return first, out
            out += r.json["events"]
            after = r.json["next"]


def webhook_stream(posts):
    """Every event the receiver got, once each, in id order (the POSTs are
    checked against it by test_webhook_delivery.check_delivery)."""
    by_id = {}
    for p in posts:
        for e in p.events:
            by_id.setdefault(e["id"], e)
    return [by_id[i] for i in sorted(by_id)]


def kept_problems(first, kept, stream):
    """The webhook's stream: ids 1..N without a gap (its cursor kept every
    event for it).  What the store kept: ids first..N without a gap, each
    event the stream's of that id."""
    got = [e["id"] for e in stream]
    n = got[-1] if got else 0
    if got != list(range(1, n + 1)):
        return [f"the webhook's receiver lacks ids {sorted(set(range(1, n + 1)) - set(got))[:10]}"
                f" of 1..{n}: trimmed past its cursor?"]
    ids = [e["id"] for e in kept]
    problems = []
    if ids != list(range(first, n + 1)):
        problems.append(f"the store keeps ids {ids[:3]}..{ids[-3:]}, not {first}..{n} "
                        "without a gap")
    problems += [f"the store's event {e['id']} is {e}, the webhook got "
                 f"{stream[e['id'] - 1] if e['id'] <= n else None}"
                 for e in kept if e["id"] > n or stream[e["id"] - 1] != e][:5]
    return problems


class ReceiverDown(threading.Thread):
    """Takes the receiver down for RECEIVER_DOWN_S, again and again until
    told to end (`end`: a down cut short, it is left up), counting the times."""

    def __init__(self, rx, seed):
        super().__init__(name="receiver down", daemon=True)
        self.rx = rx
        self.rnd = random.Random(seed)
        self.times = 0
        self.ending = threading.Event()

    def run(self):
        while not self.ending.wait(self.rnd.uniform(
                *(RECEIVER_UP_S if self.times else RECEIVER_DOWN_FIRST_S))):
            self.rx.down()
            self.ending.wait(RECEIVER_DOWN_S)
            self.rx.up()
            self.times += 1

    def end(self):
        self.ending.set()
        self.join(RECEIVER_DOWN_S + 10)
        assert not self.is_alive(), "the receiver's downs did not end"
