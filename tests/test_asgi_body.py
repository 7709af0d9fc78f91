"""The middleware's disconnect watch and the request body (accman.calling.
disconnect), driven as an ASGI app against the fake AccMan of
tests/fake_accman.py: a consumer that leaves is seen though the app never
reads the body it sent, the app still gets every message in order, and
the watch reads ahead of the app by READ_AHEAD_BYTES_MAX at most, and not
at all before the app when the consumer waits for `100 Continue`.
tests/test_e2e_gone.py has the same under uvicorn and hypercorn."""

from __future__ import annotations

import asyncio

import pytest

from accman.asgi import AccManMiddleware
from accman.calling.disconnect import READ_AHEAD_BYTES_MAX
from asgi_harness import CRED, Reply, history, http_scope, mw
from fake_accman import closed_port, run

CHUNK = b"x" * (READ_AHEAD_BYTES_MAX * 5 // 8)      # two of them pass the bound

# Owed calls retried at once, not after their pause.
pytestmark = pytest.mark.usefixtures("quick_followups")


class Consumer:
    """The server's side of one POST: its body in `parts`, then, if it
    `leaves`, `http.disconnect`, else nothing until the response is
    complete; `reads` counts the server's messages taken so far."""

    def __init__(self, parts, leaves=False, headers=()):
        self.parts = list(parts)
        self.leaves = leaves
        self.reads = 0
        self.sent = []
        length = str(sum(map(len, self.parts)))
        self.scope = http_scope(headers=(("content-length", length), *headers))
        self.scope["method"] = "POST"

    async def receive(self):
        self.reads += 1
        if self.parts:
            body = self.parts.pop(0)
            return {"type": "http.request", "body": body, "more_body": bool(self.parts)}
        if not self.leaves:
            await asyncio.sleep(3600)
        return {"type": "http.disconnect"}

    async def send(self, message):
        self.sent.append(message)

    async def call(self, m):
        await m(self.scope, self.receive, self.send)
        assert await m.drain(5)
        return Reply(self.sent)


async def answer(send, after_s=0.0):
    await asyncio.sleep(after_s)
    await send({"type": "http.response.start", "status": 200, "headers": []})
    await send({"type": "http.response.body", "body": b"ok"})


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_a_consumer_gone_is_seen_though_the_app_never_reads_its_body(fake, mode):
    """A handler with no use for the JSON a consumer posted never calls
    receive(): the watch reads the body and the disconnect behind it."""
    fake.fund(CRED, 10)

    async def app(scope, receive, send):
        await answer(send, 0.05)            # the consumer has left meanwhile

    m = mw(fake, app, mode=mode, cost=3)
    run(Consumer([b'{"city": "Lisbon"}'], leaves=True).call(m))
    assert fake.tot(CRED) == 10 and m.stats["charged"] == 0
    assert history(fake) == ([(10, None)] if mode == "check" else
                             [(10, None), (-3, "-h"), (3, None)])


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_a_consumer_who_stays_is_charged_and_the_app_gets_the_body_in_order(fake, mode):
    """The app reads late, after the watch has read ahead: it gets each
    message once, in the server's order; the consumer who stays pays."""
    fake.fund(CRED, 10)
    got = []

    async def app(scope, receive, send):
        await asyncio.sleep(0.02)
        while not got or got[-1].get("more_body"):
            got.append(await receive())
        await answer(send)

    r = run(Consumer([b"ab", b"cd", b"e"]).call(mw(fake, app, mode=mode, cost=3)))
    assert r.status == 200 and r.headers["accman"] == "7" and fake.tot(CRED) == 7
    assert [(g["body"], g["more_body"]) for g in got] == [(b"ab", True), (b"cd", True),
                                                          (b"e", False)]


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_served_unpaid_a_consumer_gone_unread_is_not_recorded_unpaid(mode):
    """AccMan unreachable, on_unavailable="open": the consumer who left
    behind a body the app never read owes nothing, as with AccMan up."""
    unpaid = []
    m = AccManMiddleware(lambda scope, receive, send: answer(send, 0.05),
                         url=f"http://127.0.0.1:{closed_port()}", mode=mode, cost=4,
                         retries=0, on_unavailable="open",
                         on_unpaid=lambda cred, amount: unpaid.append((cred, amount)))
    run(Consumer([b'{"city": "Lisbon"}'], leaves=True).call(m))
    assert unpaid == [] and m.stats["unpaid_requests"] == 0


def test_the_watch_reads_ahead_of_the_app_by_its_bound_at_most(fake):
    """A large body stays the app's, streamed at its pace: the watch stops
    reading once it holds READ_AHEAD_BYTES_MAX, goes on as the app takes,
    and the app gets all of it; a disconnect behind a body it cannot
    read whole within that, which the app never reads, is not seen
    (docs/CALLING.md)."""
    fake.fund(CRED, 10)
    consumer = Consumer([CHUNK] * 4)
    reads = []

    async def app(scope, receive, send):
        await asyncio.sleep(0.02)
        reads.append(consumer.reads)        # 2 chunks pass the bound: no third read
        body = b""
        while True:
            message = await receive()
            body += message["body"]
            if not message["more_body"]:
                break
        reads.append(len(body))
        await answer(send)

    assert run(consumer.call(mw(fake, app, cost=3))).headers["accman"] == "7"
    assert reads == [2, len(CHUNK) * 4]

    fake.fund(CRED, 3)
    idle = mw(fake, lambda scope, receive, send: answer(send, 0.02), cost=3)
    run(Consumer([CHUNK] * 3, leaves=True).call(idle))
    assert fake.tot(CRED) == 7              # the disconnect went unseen: charged


def test_a_body_read_whole_past_the_bound_does_not_hide_the_disconnect(fake):
    """The bound holds the body back, not what follows it: once the watch
    has read the last of a body (here past READ_AHEAD_BYTES_MAX, in two
    parts) that the app never reads, the disconnect behind it costs no
    memory and is seen: the consumer who left is not charged."""
    fake.fund(CRED, 10)
    idle = mw(fake, lambda scope, receive, send: answer(send, 0.05), cost=3)
    run(Consumer([CHUNK] * 2, leaves=True).call(idle))
    assert fake.tot(CRED) == 10 and idle.stats["charged"] == 0


@pytest.mark.parametrize("mode", ["check", "reserve"])
def test_a_body_that_waits_for_100_continue_is_the_apps_to_ask_for(fake, mode):
    """Reading it would have the server tell the consumer to send it: the
    watch starts at the app's first read, and then sees the disconnect."""
    fake.fund(CRED, 10)
    consumer = Consumer([b"hello"], leaves=True, headers=(("expect", "100-Continue"),))
    reads = []

    async def app(scope, receive, send):
        await asyncio.sleep(0.02)
        reads.append(consumer.reads)
        assert (await receive())["body"] == b"hello"
        await answer(send, 0.02)

    m = mw(fake, app, mode=mode, cost=3)
    run(consumer.call(m))
    assert reads == [0] and fake.tot(CRED) == 10 and m.stats["charged"] == 0
