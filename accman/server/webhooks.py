"""Signed webhooks for the event stream (SPEC "Events"; issue 13):
`accman serve --webhook URL --webhook-secret FILE`.

The deliverer is one task on the server's loop.  It long-polls the store
for the events after its cursor (`read_events`), POSTs them to the URL as
one batch, `{"events": [event, ...]}` in id order, and moves its cursor to
the batch's last id once the receiver answers 2xx.  The cursor is saved
durably (accman/server/cursors.py) while the next batches go, at most once
per WEBHOOK_CURSOR_SAVE_INTERVAL_S, each save of the newest acknowledged
id; a stop saves it at once.  So every event reaches the receiver at least
once, in id order, and a restart resumes after the last acknowledged batch:
after a crash, the batches acknowledged since the last save (at most the
interval's worth) are sent again with the one in flight, and the receiver
dedupes by event id.

Each POST carries

    Content-Type: application/json
    AccMan-Signature: sha256=<hex HMAC-SHA256 of the body, keyed by the secret>
    AccMan-Event-Ids: <first id>-<last id>

A failed attempt (no connection, no reply within the attempt timeout, any
status but 2xx, redirects included) is retried, with the same body, after a
capped exponential backoff with jitter, for as long as it fails.

Front-ends that share a store (PostgreSQL) share its cursor, and one of
them delivers: the one holding the webhook's role (accman.postgres.cursors,
`lead`).  The others try to take it every WEBHOOK_LEAD_INTERVAL_S; the one
that takes it reads the cursor as the last holder saved it, and the holder
checks before each round and each POST that it still holds it.  A store of
one front-end's own (the embedded one) has no roles: its deliverer always
delivers.

Never on the commit path: mods neither wait for the deliverer nor share
anything with it but the loop; the deliverer waits on its own long poll,
sockets and timers, and its cursor is written on another thread.  A slow or
dead receiver costs one connection and one timer.
"""

from __future__ import annotations

import asyncio
import hashlib
import hmac
import random
import re

import accman
from accman.deadline import within
from accman.errors import AccManError, EventsTrimmed, StartupError, StoreError, where
from accman.limits import WEBHOOK_REPLY_HEAD_BYTES_MAX
from accman.records import Event
from accman.server import webhook_http
from accman.server.say import say
from accman.server.webhook_config import MARK_HALF_BYTES, WebhookConfig, target_mark

CURSOR_NAME = "webhook"
SIGNATURE_HEADER = "AccMan-Signature"
IDS_HEADER = "AccMan-Event-Ids"
USER_AGENT = f"accman/{accman.__version__}"
# A stop cancels the deliverer again this often until it ends: the first
# cancel ends it (accman.deadline never takes a cancel for its timeout),
# and this is a guard against any call that turns a cancel into a
# failure, which the deliverer would retry.
STOP_RECANCEL_S = 0.05


# --- the POST's bytes (no I/O) ------------------------------------------------------

def sign(secret: bytes, body: bytes) -> str:
    """The AccMan-Signature header's value."""
    return "sha256=" + hmac.new(secret, body, hashlib.sha256).hexdigest()


_EVENT_JSON = (b'{"id":%d,"type":"%s","account":"%s","seq":%d,"by":%d,"tot":%d,"at":%d,'
               b'"key":%s,"hold":%s}')
# The SPEC's key, account and type characters need no JSON escaping.
_PLAIN = re.compile(r"[A-Za-z0-9_-]*", re.ASCII)


def _json_text(text: str) -> bytes:
    if _PLAIN.fullmatch(text):
        return b'"%s"' % text.encode("ascii")
    import json
    return json.dumps(text).encode("ascii")


def event_json(e: Event) -> bytes:
    """The SPEC's event object, as json.dumps(e._asdict()) writes it
    without spaces, at a sixth of its cost: this runs per event."""
    return _EVENT_JSON % (e.id, _json_text(e.type)[1:-1], _json_text(e.account)[1:-1],
                          e.seq, e.by, e.tot, e.at,
                          b"null" if e.key is None else _json_text(e.key),
                          b"null" if e.hold is None else b"%d" % e.hold)


def batch_body(events: list[Event], body_bytes_max: int) -> tuple[bytes, int]:
    """(body, n): the first n events as `{"events":[...]}`, as many as fit
    in body_bytes_max, and at least one."""
    assert events
    parts = []
    size = len(b'{"events":[]}') - 1       # less the comma the first one does not need
    for e in events:
        doc = event_json(e)
        size += len(doc) + 1
        if size > body_bytes_max and parts:
            break
        parts.append(doc)
    return b'{"events":[' + b",".join(parts) + b"]}", len(parts)


def post_bytes(config: WebhookConfig, body: bytes, first: int, last: int) -> bytes:
    head = webhook_http.request_head(config.target, len(body), [
        ("Content-Type", "application/json"),
        ("User-Agent", USER_AGENT),
        (SIGNATURE_HEADER, sign(config.secret, body)),
        (IDS_HEADER, f"{first}-{last}"),
    ])
    return head + body


def backoff_s(failures: int, base_s: float, cap_s: float, rand=random.random) -> float:
    """The wait after the `failures`-th failure in a row: base * 2^(n-1),
    at most cap, less a random part of up to half of it."""
    assert failures >= 1
    full = min(cap_s, base_s * 2.0 ** min(failures - 1, 62))
    return full * (1.0 - 0.5 * rand())


# --- the deliverer ------------------------------------------------------------------

def _say(message: str) -> None:
    say(f"accman: webhook: {message}")


class Deliverer:
    """The task that delivers the store's events to the webhook.  Its
    counters are read by /metrics (accman/server/metrics.py)."""

    def __init__(self, store, cursors, config: WebhookConfig, limits, loop, say=_say):
        self.store = store
        self.cursors = cursors
        self.config = config
        self.limits = limits
        self.loop = loop
        self.say = say
        self.cursor = 0             # the last event id the receiver acknowledged
        self.saved = 0              # the cursor as durably saved: at most `cursor`
        self.seen = 0               # the newest event id read from the store
        self.batches = 0            # POSTs acknowledged
        self.events = 0             # events in them
        self.failures = 0           # attempts that failed, ever
        self.failing = 0            # attempts that failed since the last success
        self.skipped = 0            # events trimmed from the store before delivery
        # The webhook was there before the events after its cursor: set by a
        # cursor saved before this start, and by the first read of the
        # store.  Only then are events trimmed before the receiver
        # acknowledged them lost to it, and said so (_trimmed).
        self._known = False
        self._unmarked = False      # no cursor saved yet: the first start saves 0
        self._ahead_said = False    # a cursor past the store's newest event, said
        # Whether this front-end delivers: always without roles (see above).
        self.leading = not hasattr(cursors, "lead")
        # The store keeps the events after the saved cursor past its
        # retention, told so at each save; a store that keeps the cursor
        # itself (PostgreSQL) keeps them by it and has no such call.
        self._keep = getattr(store, "keep_events_after", None)
        self._task = None
        self._saver = None          # the task saving the cursor, while one runs
        self._saved_at = None       # loop time the last save started
        self._stopping = asyncio.Event()    # a stop: save now, no more waiting
        self._posted_at = None      # loop time the last POST started
        # The receiver's mark, on a store whose front-ends share the cursor.
        self._url_digest, self.target_id = (target_mark(config) if hasattr(cursors, "target")
                                            else (b"", b""))

    async def prepare(self) -> None:
        """Loads the cursor; raises StartupError if it cannot be read.  On a
        shared store, says so when the cursor was last moved for another
        receiver (`_check_target`)."""
        try:
            loaded = await self.cursors.load_cursor(CURSOR_NAME)
            marked = (await self.cursors.target(CURSOR_NAME)
                      if hasattr(self.cursors, "target") else None)
        except StoreError as e:
            raise StartupError(f"webhook: {e.detail}") from None
        self.cursor = self.seen = self.saved = loaded or 0
        self._check_target(marked)      # after the cursor is read: its warning names it
        if self._keep is not None:
            self._keep(self.saved)
        self._known = loaded is not None
        # Configured for the first time: its cursor is saved (0) as it starts,
        # so that a later start knows its receiver was waiting for what is kept.
        self._unmarked = loaded is None

    def _check_target(self, marked: bytes | None) -> None:
        """The front-ends of a store share one cursor: one given another
        --webhook or --webhook-secret than the front-end that last delivered
        would move it past events its own receiver never got, or accepted."""
        if marked is None:
            return
        if marked[:MARK_HALF_BYTES] != self.target_id[:MARK_HALF_BYTES]:
            what, same = "another --webhook URL", "one"
        elif marked[MARK_HALF_BYTES:] in (self.target_id[MARK_HALF_BYTES:],
                                          self._url_digest[MARK_HALF_BYTES:]):
            return          # this receiver; or a mark of its URL alone, its secret unknown
        else:
            what, same = "this URL with another --webhook-secret", "secret"
        self.say(f"the store's cursor (event {self.cursor}) was last moved by a "
                 f"front-end delivering to {what}; every front-end of a store "
                 f"needs the same {same}")

    def start(self) -> None:
        if self.leading:
            self.say(f"delivering to {self.config.target.where} after event {self.cursor}")
        else:
            self.say(f"delivering to {self.config.target.where} while this front-end "
                     f"holds the role (one front-end of the store delivers)")
        if self._keep is None and not hasattr(self.store, "cursors"):
            self.say("this store does not keep the events the receiver has not acknowledged "
                     "past its retention: a receiver down for longer may miss some")
        self._task = self.loop.create_task(self._run())
        if self._unmarked:
            self._saver = self.loop.create_task(self._save())

    async def stop(self) -> None:
        """Stops at once: a batch not yet acknowledged is sent again at the
        next start.  The cursor of the last acknowledged one is saved first
        (waiting at most one attempt's timeout for the disk)."""
        task, self._task = self._task, None
        while task is not None and not task.done():
            task.cancel()
            await asyncio.wait({task}, timeout=STOP_RECANCEL_S)
        if task is not None and not task.cancelled():
            task.result()               # an error of its own is raised, not dropped
        self._stopping.set()
        saver = self._saver
        if saver is not None and not saver.done():
            try:
                async with within(self.limits.webhook_attempt_timeout_s):
                    await saver
            except asyncio.TimeoutError:
                self.say(f"the cursor could not be saved past event {self.saved}: the "
                         f"events after it are sent again at the next start")

    async def _run(self) -> None:
        while True:
            try:
                await self._round()
            except asyncio.CancelledError:
                raise
            except Exception as e:       # a bug: said, then retried; the server goes on
                self.say(f"internal error {where(e)}; retrying")
                await asyncio.sleep(self.limits.webhook_backoff_cap_s)

    async def _round(self) -> None:
        """One batch: read, POST until acknowledged, move the cursor."""
        if not await self._lead():
            return
        if self._posted_at is not None:
            # Under a steady stream, POSTs leave at most once per linger, each
            # carrying what came meanwhile: fewer, larger batches, at a cost
            # of at most the linger in latency.  After a quiet spell the first
            # event leaves at once.  The linger counts from when the last POST
            # started (_post), so the time spent making a POST's bytes is not
            # taken off the next one's wait.
            wait_s = self._posted_at + self.limits.webhook_linger_s - self.loop.time()
            if wait_s > 0:
                await asyncio.sleep(wait_s)
        started = self.loop.time()
        events = await self._read()
        if not events:
            if self.loop.time() - started < self.limits.webhook_poll_wait_s / 2:
                # A store that answers an empty read early (closing, say)
                # is not asked again at once: no busy loop on the loop.
                await asyncio.sleep(self.limits.webhook_backoff_base_s)
            return
        if not await self._lead():
            return                  # the role went while the read waited
        body, n = batch_body(events, self.limits.webhook_body_bytes_max)
        first, last = events[0].id, events[n - 1].id
        if not await self._post(post_bytes(self.config, body, first, last)):
            return                  # the role went while the receiver failed
        self.batches += 1
        self.events += n
        self.cursor = last
        if self._saver is None or self._saver.done():
            self._saver = self.loop.create_task(self._save())

    async def _lead(self) -> bool:
        """Whether this front-end delivers now (see the module's doc).  One
        that takes the role goes on from the cursor as saved, when that is
        further than its own; one that does not hold it follows the saved
        cursor (its /metrics show the store's lag) and waits
        WEBHOOK_LEAD_INTERVAL_S before it tries again."""
        lead = getattr(self.cursors, "lead", None)
        if lead is None:
            return True
        interval_s = self.limits.webhook_lead_interval_s
        try:
            leading = await lead(CURSOR_NAME, interval_s)
            if not (leading and self.leading):
                # Taking the role, or following: the cursor as saved.
                self._follow(await self.cursors.load_cursor(CURSOR_NAME) or 0)
            if leading and not self.leading:
                self.say(f"this front-end delivers now, after event {self.cursor}")
                self._check_target(await self.cursors.target(CURSOR_NAME))
                await self.cursors.mark(CURSOR_NAME, self.target_id)
            elif self.leading and not leading:
                self.say("this front-end lost the webhook's role; it delivers again "
                         "only once it takes the role back")
        except StoreError as e:
            if self.leading:
                self.say(f"{e.detail}; this front-end stops delivering")
            leading = False
        self.leading = leading
        if not leading:
            await asyncio.sleep(interval_s)
        return leading

    def _follow(self, saved: int) -> None:
        """The cursor as the store has it saved, when that is further."""
        self.cursor = max(self.cursor, saved)
        self.saved = max(self.saved, saved)
        self.seen = max(self.seen, self.cursor)

    async def _read(self) -> list[Event]:
        """The events after the cursor, waiting for the first (long poll);
        retried with backoff while the store refuses."""
        failures = 0
        while True:
            try:
                events, nxt = await self._read_once(self.cursor)
                self._known = True      # what comes after this read is its receiver's
                break
            except EventsTrimmed as e:
                self._trimmed(e.first)
                self._known = True
            except AccManError as e:
                failures += 1
                if failures == 1:
                    self.say(f"the store does not serve events ({e.code}); retrying")
                await asyncio.sleep(backoff_s(failures, self.limits.webhook_backoff_base_s,
                                              self.limits.webhook_backoff_cap_s))
                if not await self._lead():
                    return []
        if events:
            assert events[0].id > self.cursor, (events[0].id, self.cursor)
            self.seen = max(self.seen, events[-1].id)
        elif nxt < self.cursor:
            self._ahead(nxt)
        self.seen = max(self.seen, nxt)
        return events

    def _ahead(self, newest: int) -> None:
        """The cursor is past the store's newest event: the store is older
        than the receiver's acknowledgements (restored from an older copy,
        or another store under the same cursor).  The cursor stays (it never
        moves back, and the receiver dedupes by id, so it would drop new
        events under ids it acknowledged): said once, loudly."""
        if not self._ahead_said:
            self._ahead_said = True
            self.say(f"the receiver acknowledged events up to {self.cursor}, past the store's "
                     f"newest event ({newest}): the store is older than its receiver (restored "
                     f"from an older copy?); the events it makes with ids up to {self.cursor} "
                     f"are not delivered, and delivery goes on after event {self.cursor}")

    def _read_once(self, after: int):
        fut = self.loop.create_future()

        def done(outcome):
            if not fut.done():       # cancelled by stop(): the store answers anyway
                fut.set_result(outcome)

        try:
            outcome = self.store.read_events(after, self.limits.webhook_events_per_post_max,
                                             self.limits.webhook_poll_wait_s, done)
        except AccManError as e:
            outcome = e
        if outcome is not None:
            done(outcome)
        return _unwrap(fut)

    def _trimmed(self, first: int) -> None:
        """The events after the cursor are gone from the store (past its
        retention): delivery goes on from the oldest kept.  Said loudly and
        counted, unless the webhook is new (configured at this start, before
        its first read: it starts from the oldest event kept)."""
        assert first - 1 > self.cursor, (first, self.cursor)
        if self._known:
            lost = first - 1 - self.cursor
            self.skipped += lost
            self.say(f"events {self.cursor + 1} to {first - 1} were trimmed from the store "
                     f"(past its retention) before the receiver acknowledged them: {lost} "
                     f"events are not delivered; going on from event {first}")
        self.cursor = first - 1

    async def _post(self, request: bytes) -> bool:
        """POSTs until the receiver answers 2xx (True), or until this
        front-end no longer holds the webhook's role (False): it checks
        before each retry."""
        limits = self.limits
        while True:
            try:
                # The moment the POST starts: its bytes are made, its
                # connection opens next.  The linger is counted from here.
                self._posted_at = self.loop.time()
                status = await webhook_http.post(
                    self.config.target, request, timeout_s=limits.webhook_attempt_timeout_s,
                    head_bytes_max=WEBHOOK_REPLY_HEAD_BYTES_MAX,
                    ssl_context=self.config.ssl_context)
                if 200 <= status < 300:
                    break
                why = f"the receiver answered {status}"
            except asyncio.CancelledError:
                raise
            except Exception as e:
                why = webhook_http.describe(e, limits.webhook_attempt_timeout_s,
                                            WEBHOOK_REPLY_HEAD_BYTES_MAX)
            self.failures += 1
            self.failing += 1
            if self.failing == 1:
                self.say(f"delivery to {self.config.target.where} failed: {why}; "
                         f"retrying with backoff")
            await asyncio.sleep(backoff_s(self.failing, limits.webhook_backoff_base_s,
                                          limits.webhook_backoff_cap_s))
            if not await self._lead():
                self.failing = 0
                return False
        if self.failing:
            self.say(f"delivered to {self.config.target.where} after {self.failing} "
                     f"failed attempts")
            self.failing = 0
        return True

    async def _save(self) -> None:
        """Saves the cursor until the saved one is the acknowledged one.
        Delivery goes on meanwhile: one save at a time, at most one per
        WEBHOOK_CURSOR_SAVE_INTERVAL_S (a stop saves at once), each of the
        newest acknowledged id.  Retried while it fails."""
        failures = 0
        while self.saved < self.cursor or self._unmarked:
            await self._save_interval()
            value = self.cursor
            self._saved_at = self.loop.time()
            try:
                await self.cursors.save_cursor(CURSOR_NAME, value)
            except StoreError as e:
                failures += 1
                if failures == 1:
                    self.say(f"{e.detail}; retrying")
                await asyncio.sleep(backoff_s(failures, self.limits.webhook_backoff_base_s,
                                              self.limits.webhook_backoff_cap_s))
                continue
            self.saved = value
            self._unmarked = False
            if self._keep is not None:
                self._keep(value)

    async def _save_interval(self) -> None:
        """Until WEBHOOK_CURSOR_SAVE_INTERVAL_S after the last save started,
        or a stop."""
        if self._saved_at is None or self._stopping.is_set():
            return
        wait_s = self._saved_at + self.limits.webhook_cursor_save_interval_s - self.loop.time()
        if wait_s > 0:
            try:
                async with within(wait_s):
                    await self._stopping.wait()
            except asyncio.TimeoutError:
                pass

    def lag(self, stats) -> int:
        """Events written and not yet acknowledged: exact when the store
        reports its newest event id (stats "events_last"), else as far as
        the deliverer has read."""
        newest = stats.get("events_last") if isinstance(stats, dict) else None
        if type(newest) is not int:
            newest = self.seen
        return max(0, max(newest, self.seen) - self.cursor)


async def _unwrap(fut):
    outcome = await fut
    if isinstance(outcome, AccManError):
        raise outcome
    return outcome
