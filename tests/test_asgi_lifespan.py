"""The middleware's drain at the lifespan shutdown, against the app's own
shutdown: what the app's shutdown closes (the AccManClient it shares with
the middleware, the database its `on_unpaid` bills into) is still open
while the middleware's releases and owed calls land; and what fails only
as the shutdown closes the middleware's client, or is cut off as the
event loop ends.  Against the fake AccMan of tests/fake_accman.py, with a
real Starlette app, or a real AccMan behind the fault proxy of
tests/test_cli_faults.py."""

from __future__ import annotations

import asyncio
import collections
import contextlib
import logging
import os
import re
import subprocess
import sys
import threading
import time

import pytest

from starlette.applications import Starlette
from starlette.responses import PlainTextResponse
from starlette.routing import Route

from accman.asgi import AccManMiddleware
from accman.calling import asgi as asgi_mod
from accman.calling import owed as owed_mod
from accman.client import AccManClient
from accman.errors import Busy
from asgi_harness import CRED, call, end_loop, make_app
from fake_accman import BUSY, FakeAccMan, charges, first_then


async def thing(request):
    return PlainTextResponse("ok")


def test_an_owed_charge_lands_on_a_shared_client_its_owner_closes_at_shutdown(monkeypatch):
    """The owner of a client given with `client=` closes it in the app's
    own lifespan shutdown, as CALLING.md leaves it to do: the owed charge
    is drained before that shutdown runs, so it lands, and is not stranded
    against a closed client and billed as unpaid."""
    monkeypatch.setattr(owed_mod, "FOLLOWUP_PAUSE_S", 0.2)     # the retry comes at shutdown
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 1.0)
    monkeypatch.setattr(owed_mod, "SHUTDOWN_LAST_CALL_S", 0.5)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = first_then(charges, ("drop",))        # the charge's reply is lost: owed

        async def main():
            acc = AccManClient(fake.url, retries=0)

            @contextlib.asynccontextmanager
            async def lifespan(app):
                yield
                await acc.aclose()                          # the owner's to close

            m = AccManMiddleware(Starlette(routes=[Route("/thing", thing)], lifespan=lifespan),
                                 client=acc, cost=2)
            queue = asyncio.Queue()
            sent = []

            async def send(message):
                sent.append(message["type"])
            await queue.put({"type": "lifespan.startup"})
            life = asyncio.ensure_future(m({"type": "lifespan", "asgi": {"version": "3.0"},
                                            "state": {}}, queue.get, send))
            assert (await call(m)).status == 200 and m.stats["owed"] == 1
            await queue.put({"type": "lifespan.shutdown"})
            await asyncio.wait_for(life, 5)
            assert sent == ["lifespan.startup.complete", "lifespan.shutdown.complete"]
            return m.stats
        stats = asyncio.run(main())
        assert fake.tot(CRED) == 8
        assert stats["stranded"] == 0 and stats["unpaid_requests"] == 0



def test_an_owed_charge_lands_before_the_apps_own_shutdown_which_hangs(monkeypatch):
    """The app's own shutdown never ends (a pool that will not close): the
    drain runs before the app is handed the shutdown, so the owed charge
    has landed when that shutdown starts, however long the server then
    lets it hang."""
    monkeypatch.setattr(owed_mod, "FOLLOWUP_PAUSE_S", 0.2)     # the retry comes at shutdown
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        dropped = []

        def fault(method, path, params):
            # The charge and its first owed attempt are lost: owed, paused.
            if charges(path, params) and len(dropped) < 2:
                dropped.append(path)
                return ("drop",)
        fake.fault = fault
        at_shutdown = []

        async def main():
            hung = asyncio.Event()

            @contextlib.asynccontextmanager
            async def lifespan(app):
                yield
                at_shutdown.append(fake.tot(CRED))
                hung.set()
                await asyncio.Event().wait()                # never ends

            m = AccManMiddleware(Starlette(routes=[Route("/thing", thing)], lifespan=lifespan),
                                 url=fake.url, retries=0, cost=2)
            queue = asyncio.Queue()
            await queue.put({"type": "lifespan.startup"})
            life = asyncio.ensure_future(m({"type": "lifespan", "asgi": {"version": "3.0"},
                                            "state": {}}, queue.get, _ignore))
            assert (await call(m)).status == 200 and m.stats["owed"] == 1
            await queue.put({"type": "lifespan.shutdown"})
            await asyncio.wait_for(hung.wait(), 5)
            life.cancel()
            return m.stats
        stats = asyncio.run(main())
        assert at_shutdown == [8]
        assert stats["charged"] == 1 and stats["stranded"] == 0


@pytest.mark.parametrize("ends", ["returns", "raises"])
def test_an_app_that_ends_after_its_startup_still_has_its_owed_charge_drained(
        monkeypatch, caplog, ends):
    """An app whose lifespan answers the startup and returns, or raises:
    the server would take a return for the end of the shutdown too, and
    skip the shutdown after a raise, and stop with the owed charge unpaid.
    The middleware answers the rest of the lifespan itself (a raise logged
    in full): the shutdown's answer comes after the drain."""
    monkeypatch.setattr(owed_mod, "FOLLOWUP_PAUSE_S", 0.2)     # the retry comes at shutdown
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = first_then(charges, ("drop",))        # the charge's reply is lost: owed

        async def app(scope, receive, send):
            if scope["type"] == "lifespan":
                assert (await receive())["type"] == "lifespan.startup"
                await send({"type": "lifespan.startup.complete"})
                if ends == "raises":
                    raise RuntimeError("the app's background task failed")
                return
            await PlainTextResponse("ok")(scope, receive, send)

        async def main():
            m = AccManMiddleware(app, url=fake.url, retries=0, cost=2)
            queue = asyncio.Queue()
            sent = []

            async def send(message):
                sent.append((message["type"], fake.tot(CRED)))
            await queue.put({"type": "lifespan.startup"})
            life = asyncio.ensure_future(m({"type": "lifespan", "asgi": {"version": "3.0"},
                                            "state": {}}, queue.get, send))
            assert (await call(m)).status == 200 and m.stats["owed"] == 1
            await asyncio.sleep(0)
            assert not life.done()
            await queue.put({"type": "lifespan.shutdown"})
            await asyncio.wait_for(life, 5)
            return sent
        sent = asyncio.run(main())
        assert sent == [("lifespan.startup.complete", 10), ("lifespan.shutdown.complete", 8)]
    raised = [r for r in caplog.records if "raised after its startup" in r.getMessage()]
    assert len(raised) == (ends == "raises")
    assert all(r.exc_info[1].args == ("the app's background task failed",) for r in raised)


async def _ignore(message):
    pass


def test_a_charge_owed_as_the_client_closes_is_stranded_not_dropped(
        start_server, proxy, cred, monkeypatch, caplog):
    """A check-mode charge still in flight when the shutdown's drain has
    ended fails as the middleware closes its client: sent, its reply never
    came (it landed).  It is owed after the drain, to a task that no
    shutdown waits for; when the event loop ends, cancelling that task
    with the charge's retry under way, the charge is stranded, of unknown
    outcome, its key named: never dropped with the loop, unsaid."""
    monkeypatch.setattr(asgi_mod, "SHUTDOWN_DRAIN_S", 0.3)
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.1)
    srv = start_server()
    srv.mod(cred, 10)
    # The role probe is answered; the charge and its owed retry never are.
    p = proxy(srv, "pass", "hang", "hang")
    unpaid = []
    m = AccManMiddleware(make_app(), url=p.url, cost=2, timeout_s=30, retries=0,
                         on_unpaid=lambda c, a: unpaid.append(a))

    async def sent(n):
        deadline = time.monotonic() + 30
        while p.seen < n and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        assert p.seen == n

    async def main():
        request = asyncio.ensure_future(call(m, cred=cred))
        await sent(2)                   # the charge is sent, and hangs
        await m.aclose()
        reply = await asyncio.wait_for(request, 30)
        await sent(3)                   # its owed retry too, as the loop ends
        return reply
    with caplog.at_level(logging.ERROR, logger="accman.asgi"):
        assert asyncio.run(main()).status == 200
    assert srv.tot(cred) == 8           # it landed
    assert m.stats["stranded"] == 1 and unpaid == []
    key = re.search(r"[?&]key=([\w-]+)", p.lines[1]).group(1)
    assert f"outcome unknown: look for key {key} " in caplog.text


def test_a_retry_cut_off_as_the_loop_ends_is_of_unknown_outcome_not_billed(caplog):
    """A charge owed after a refusal that says it never applied (busy) is
    retried, and the event loop ends with that retry sent and unanswered:
    it may have landed (here it does, late), so the charge is stranded of
    unknown outcome, its key named, and not given to on_unpaid, which
    would bill the consumer a second time."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = first_then(charges, BUSY, ("delay", 3.0))
        unpaid = []
        m = AccManMiddleware(make_app(), url=fake.url, cost=2, timeout_s=30, retries=0,
                             on_unpaid=lambda c, a: unpaid.append(a))

        async def main():
            assert (await call(m)).status == 200 and m.stats["owed"] == 1
            await until(lambda: len(fake.mods()) == 2)          # the retry is under way

        async def until(done):
            deadline = time.monotonic() + 30
            while not done() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert done()
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            asyncio.run(main())
        asyncio.run(until(lambda: fake.tot(CRED) == 8))             # it landed
    assert m.stats["stranded"] == 1 and unpaid == [] and m.stats["unpaid_requests"] == 0
    key = fake.mods()[1][2]["key"]
    assert f"outcome unknown: look for key {key} " in caplog.text


def test_a_charge_owed_in_the_loops_last_turn_is_stranded_though_never_tried(caplog):
    """A charge owed in the event loop's last turn, once asyncio.run has
    been told to stop (its refusal, busy, read as the loop ends): the task
    made to pay it is cancelled before its first step.  The charge, which
    never landed, is stranded as the account owing it and given to
    on_unpaid: never dropped with the loop, unsaid."""
    with FakeAccMan() as fake:
        unpaid = []
        m = AccManMiddleware(make_app(), url=fake.url, cost=2, retries=0,
                             on_unpaid=lambda c, a: unpaid.append(a))

        async def main():
            # Run after main has returned, in the turn that stops the loop.
            asyncio.get_running_loop().call_soon(
                m._owed.add, owed_mod.Mod(CRED, -2, "late-c", "charge"), Busy("full"))
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            asyncio.run(main())
    assert m.stats["owed"] == 1 and m.stats["stranded"] == 1 and unpaid == [2]
    assert "stranded charge: the account owes 2" in caplog.text and "key late-c" in caplog.text


@pytest.mark.parametrize("case", ["sync", "async", "billing", "fork", "thread",
                                  "preforked"])
def test_what_the_event_loops_end_leaves_owed_is_said_at_the_process_s_end(case):
    """asyncio.run cancels the tasks it finds as the loop ends, not one
    made meanwhile: a payer made for calls owed by a cancelled task, or an
    async on_unpaid started by a stranding then, is left unfinished with
    the loop (tests/owed_at_exit.py).  At the process's end what is still
    owed is stranded, the call under way as of unknown outcome and the
    next as the account owing it, given to a plain on_unpaid; an async
    on_unpaid that cannot run now is said not billed, one that did not
    end said as one that may not have billed.  A forked child leaves its
    parent's queue to the parent, and says its own (a worker forked
    from the parent that made the app); a loop still running (in a daemon
    thread) as the process ends has its calls said as of unknown outcome,
    none taken from under its payer nor billed."""
    got = subprocess.run([sys.executable, os.path.join(os.path.dirname(__file__),
                                                       "owed_at_exit.py"), case],
                         capture_output=True, text=True, timeout=60)
    assert got.returncode == 0, got.stderr
    fp = owed_mod.fingerprint("owed-at-exit")
    if case == "billing":
        assert (f"stranded charge: the account owes 2 (account {fp}, key last-c): cancelled "
                f"with the event loop") in got.stderr, got.stderr
        assert (f"on_unpaid of 2 (account {fp}) did not end before the event loop did: it "
                f"may not have billed") in got.stderr, got.stderr
        assert got.stdout == ""
        return
    if case == "thread":            # its payer may still land them: said, not billed
        for by, key in ((2, "first-c"), (3, "second-c")):
            assert (f"charge of {by} still owed as the process ends, its event loop still "
                    f"running: outcome unknown: look for key {key} in the history of account "
                    f"{fp}") in got.stderr, got.stderr
        assert "stranded" not in got.stderr and got.stdout == ""
        return
    assert got.stderr.count("stranded charge of 2") == 1, got.stderr   # not by a child too
    assert (f"stranded charge of 2, outcome unknown: look for key first-c in the history of "
            f"account {fp} before settling it (the event loop ended with it owed)"
            ) in got.stderr, got.stderr
    assert (f"stranded charge: the account owes 3 (account {fp}, key second-c): the event "
            f"loop ended with it owed") in got.stderr, got.stderr
    if case in ("sync", "fork", "preforked"):
        assert got.stdout == "billed 3\n"
    else:
        assert got.stdout == ""
        assert (f"on_unpaid of 3 (account {fp}) not run: the event loop has ended: not "
                f"billed") in got.stderr, got.stderr


def test_a_payer_an_ended_loop_left_unfinished_does_not_hold_up_the_next_loop():
    """A payer made as asyncio.run cancels the tasks it found (a call
    owed by one of them) is left unfinished with the loop, never done.  A
    middleware used again under a new event loop pays what it still owes,
    and what it owes there, through a payer of that loop: drain() waits
    for it, and every charge lands once, by its key."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        unpaid = []
        m = AccManMiddleware(make_app(), url=fake.url, cost=2, retries=0,
                             on_unpaid=lambda c, a: unpaid.append(a))

        async def owes_as_it_is_cancelled():
            try:
                await asyncio.Event().wait()
            except asyncio.CancelledError:
                m._owed.add(owed_mod.Mod(CRED, -2, "first-c", "charge"), Busy("full"))
                raise

        async def first():
            asyncio.get_running_loop().create_task(owes_as_it_is_cancelled())
            await asyncio.sleep(0)

        async def second():
            m._owed.add(owed_mod.Mod(CRED, -3, "second-c", "charge"), Busy("full"))
            assert await m.drain(30)
        asyncio.run(first())
        asyncio.run(second())
        assert fake.tot(CRED) == 5
    assert m.stats["stranded"] == 0 and unpaid == [] and len(m._owed) == 0


def test_an_on_unpaid_an_ended_loop_left_unfinished_does_not_hold_up_the_next_loop():
    """An async on_unpaid started by a stranding as asyncio.run ends (a
    charge owed in the loop's last turn) is left unfinished with that loop,
    and can never end: the middleware used again under a new event loop
    does not wait for it (it is said at the process's end), so drain()
    there is done as soon as what it owes there has landed."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)

        async def bill(cred, amount):
            await asyncio.Event().wait()
        m = AccManMiddleware(make_app(), url=fake.url, cost=2, retries=0, on_unpaid=bill)

        async def first():
            # Run after first has returned, in the turn that stops the loop.
            asyncio.get_running_loop().call_soon(
                m._owed.add, owed_mod.Mod(CRED, -2, "late-c", "charge"), Busy("full"))

        async def second():
            m._owed.add(owed_mod.Mod(CRED, -3, "next-c", "charge"), Busy("full"))
            return await m.drain(30)
        asyncio.run(first())
        assert m.stats["stranded"] == 1 and len(m._billing.tasks) == 1
        assert asyncio.run(second())
        assert fake.tot(CRED) == 7


def test_a_close_cancelled_while_its_payer_pauses_bills_the_call_known_unlanded(
        monkeypatch, caplog):
    """A payer pausing between attempts has no call under way: when the
    close is cancelled then (the shutdown itself cut off), the call whose
    every attempt was refused before applying (busy) is stranded as the
    account owing it and given to on_unpaid, not as of unknown outcome."""
    monkeypatch.setattr(owed_mod, "FOLLOWUP_PAUSE_S", 30.0)
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = lambda meth, p, q: BUSY if "key" in q else None   # known not landed
        unpaid = []
        m = AccManMiddleware(make_app(), url=fake.url, cost=2, retries=0,
                             on_unpaid=lambda c, a: unpaid.append(a))

        def pausing():              # the payer's awaits lead to its _pause
            coro = m._owed._task.get_coro()
            while coro is not None and getattr(coro, "__name__", "") != "_pause":
                coro = getattr(coro, "cr_await", None)
            return coro is not None

        async def main():
            m._owed.add(owed_mod.Mod(CRED, -2, "paused-c", "charge"), Busy("full"))
            deadline = time.monotonic() + 30
            while not pausing() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)
            assert pausing()
            closing = asyncio.get_running_loop().create_task(m._owed.close())
            await asyncio.sleep(0)
            closing.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await closing
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            asyncio.run(main())
        assert fake.tot(CRED) == 10
    assert m.stats["stranded"] == 1 and unpaid == [2]
    assert "stranded charge: the account owes 2" in caplog.text and "key paused-c" in caplog.text


def test_a_payer_of_a_loop_stopped_unclosed_does_not_hold_up_the_next_loop():
    """A payer made under an event loop that was stopped and not closed
    (run_until_complete, then a new loop) never runs again there.  The
    middleware used under a new loop pays what it owed and what it owes
    there through a payer of that loop: drain() waits for it, and every
    charge lands once, by its key."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        unpaid = []
        m = AccManMiddleware(make_app(), url=fake.url, cost=2, retries=0,
                             on_unpaid=lambda c, a: unpaid.append(a))

        async def first():
            m._owed.add(owed_mod.Mod(CRED, -2, "first-c", "charge"), Busy("full"))

        async def second():
            m._owed.add(owed_mod.Mod(CRED, -3, "second-c", "charge"), Busy("full"))
            return await m.drain(30)
        stopped = asyncio.new_event_loop()
        try:
            stopped.run_until_complete(first())     # its payer made, never run to its end
            assert asyncio.run(second())
        finally:
            # Its old payer ended there, as a loop's owner ends its tasks
            # before closing it (else its pending connect is never awaited).
            end_loop(stopped)
        assert fake.tot(CRED) == 5
    assert m.stats["stranded"] == 0 and unpaid == [] and len(m._owed) == 0


class _GatedQueue(collections.deque):
    """An owed queue's deque that, once armed, stops the loop's thread at
    its first look at what is left with the payer gone (close() about to
    strand the queue) and runs the process's end hook of that queue on
    another thread there, to its end: the moment a process ends while its
    server's loop, in a daemon thread, is inside close()."""

    def __init__(self, owed, loop_thread):
        super().__init__()
        self.owed, self.loop_thread = owed, loop_thread
        self.armed = self.fired = False

    def __len__(self):
        n = super().__len__()
        if (self.armed and not self.fired and self.owed._task is None
                and threading.get_ident() == self.loop_thread):
            self.fired = True
            ending = threading.Thread(target=self.owed.left_at_exit)
            ending.start()
            ending.join()
        return n


def test_a_queue_stranded_by_close_and_the_process_s_end_at_once_strands_each_once(
        monkeypatch, caplog):
    """A server's loop runs in a daemon thread and is inside close(), its
    payer done, as the process ends: close() on the loop's thread and the
    process's end hook on the main thread strand the same queue.  Each
    call is stranded once, by one of them, and close() ends without error."""
    monkeypatch.setattr(owed_mod, "FOLLOWUP_PAUSE_S", 30.0)
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.05)
    tried = threading.Event()

    class Refused(owed_mod.Mod):
        async def run(self, acc) -> int:
            tried.set()
            raise Busy("full")                      # known unlanded: the payer pauses

    stats, unpaid = {"owed": 0, "stranded": 0}, []
    owed = owed_mod.Owed(lambda: None, stats, lambda c: None,
                         lambda c, a, w: unpaid.append(a))
    loop = asyncio.new_event_loop()
    server = threading.Thread(target=loop.run_forever, daemon=True)
    server.start()
    try:
        owed._items = gate = _GatedQueue(owed, server.ident)

        async def owe():
            owed.add(Refused(CRED, -2, "first-c", "charge"), Busy("full"))
            owed.add(Refused(CRED, -3, "second-c", "charge"), Busy("full"))
        asyncio.run_coroutine_threadsafe(owe(), loop).result(30)
        assert tried.wait(30)
        gate.armed = True
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            asyncio.run_coroutine_threadsafe(owed.close(), loop).result(30)
            owed.left_at_exit()                     # the process's end, once it has
    finally:
        loop.call_soon_threadsafe(loop.stop)
        server.join(30)
        loop.close()
    assert sorted(unpaid) == [2, 3] and stats["stranded"] == 2 and len(owed) == 0
    for key in ("first-c", "second-c"):
        assert caplog.text.count(f"key {key})") == 1, caplog.text


class _GatedLock:
    """An owed queue's lock whose first taking by a thread other than the
    loop's, once armed, first has the loop owe `item` (a call owed as the
    process ends) and waits until a payer has sent it: the moment a
    server's loop, in a daemon thread, starts a payer as the process's
    end hook, on the main thread, is about to take the queue."""

    def __init__(self, loop, loop_thread, owed, item, sent):
        self.lock = threading.Lock()
        self.loop, self.loop_thread, self.owed = loop, loop_thread, owed
        self.item, self.sent = item, sent
        self.armed = self.fired = False

    def __enter__(self):
        if self.armed and not self.fired and threading.get_ident() != self.loop_thread:
            self.fired = True
            self.loop.call_soon_threadsafe(self.owed.add, self.item, Busy("full"))
            assert self.sent.wait(30)
        return self.lock.__enter__()

    def __exit__(self, *exc):
        return self.lock.__exit__(*exc)


def test_the_process_s_end_takes_no_call_from_under_a_payer_started_meanwhile(caplog):
    """A server's loop runs in a daemon thread, its payer done, as the
    process ends; a call owed then gets a new payer, which sends it while
    the end hook on the main thread is deciding.  The hook takes nothing
    from under that payer: the call is said as of unknown outcome, not
    billed, and lands once, by its payer."""
    sent, land = threading.Event(), threading.Event()

    class Landing(owed_mod.Mod):
        async def run(self, acc) -> int:
            sent.set()
            while not land.is_set():
                await asyncio.sleep(0.01)
            return max(-self.by, 0)                 # landed

    stats, unpaid, charged = {"owed": 0, "stranded": 0}, [], []
    owed = owed_mod.Owed(lambda: None, stats, charged.append,
                         lambda c, a, w: unpaid.append(a))
    loop = asyncio.new_event_loop()
    server = threading.Thread(target=loop.run_forever, daemon=True)
    server.start()
    try:
        owed._lock = gate = _GatedLock(loop, server.ident, owed,
                                       Landing(CRED, -2, "late-c", "charge"), sent)
        gate.armed = True
        with caplog.at_level(logging.ERROR, logger="accman.asgi"):
            owed.left_at_exit()                     # the process's end
        land.set()

        async def drained():
            return await owed.drain(30)
        assert asyncio.run_coroutine_threadsafe(drained(), loop).result(30)
    finally:
        loop.call_soon_threadsafe(loop.stop)
        server.join(30)
        loop.close()
    assert gate.fired and charged == [2] and unpaid == [] and stats["stranded"] == 0
    assert "charge of 2 still owed as the process ends, its event loop still running: " \
        "outcome unknown: look for key late-c" in caplog.text, caplog.text


def test_a_call_sent_under_a_stopped_loop_is_of_unknown_outcome_when_the_next_ends(caplog):
    """A charge sent by a payer of an event loop stopped unclosed before
    its reply came (it lands) has that payer replaced under the next
    loop; that loop ends in the turn a new payer is made, which is
    cancelled before its first step.  The charge sent is stranded as of
    unknown outcome, its key named, not given to on_unpaid (it landed);
    the charge owed behind it, never sent, as the account owing it."""
    with FakeAccMan() as fake:
        fake.fund(CRED, 10)
        fake.fault = lambda meth, p, q: ("delay", 1.0) if q.get("key") == "sent-c" else None
        unpaid = []
        m = AccManMiddleware(make_app(), url=fake.url, cost=2, retries=0,
                             on_unpaid=lambda c, a: unpaid.append(a))

        async def first():
            m._owed.add(owed_mod.Mod(CRED, -2, "sent-c", "charge"), Busy("full"))
            deadline = time.monotonic() + 30
            while not fake.mods() and time.monotonic() < deadline:
                await asyncio.sleep(0.01)           # sent; its reply is 1 s away
            assert fake.mods()

        async def second():
            # Run after second has returned, in the turn that stops the loop.
            asyncio.get_running_loop().call_soon(
                m._owed.add, owed_mod.Mod(CRED, -3, "behind-c", "charge"), Busy("full"))
        stopped = asyncio.new_event_loop()
        try:
            stopped.run_until_complete(first())     # stopped with the reply awaited
            with caplog.at_level(logging.ERROR, logger="accman.asgi"):
                asyncio.run(second())
            deadline = time.monotonic() + 30
            while fake.tot(CRED) != 8 and time.monotonic() < deadline:
                time.sleep(0.02)                    # the charge sent lands
        finally:
            end_loop(stopped)
        assert fake.tot(CRED) == 8 and [r[2].get("key") for r in fake.mods()] == ["sent-c"]
    assert m.stats["stranded"] == 2 and unpaid == [3], caplog.text
    assert "outcome unknown: look for key sent-c" in caplog.text
    assert "the account owes 3 (account" in caplog.text


async def _closing_on(owed, item) -> None:
    """Owes `item` and starts a close(), returned from once the close is past
    its drain (SHUTDOWN_DRAIN_S), waiting for the call under way."""
    owed.add(item, Busy("full"))
    asyncio.get_running_loop().create_task(owed.close())
    deadline = time.monotonic() + 30
    while owed._closing is None and time.monotonic() < deadline:
        await asyncio.sleep(0.01)
    assert owed._closing is not None


def test_a_close_its_stopped_loop_left_under_way_does_not_stop_the_next_loop_s_payer(
        monkeypatch):
    """An event loop stopped unclosed while close() waits for the call
    under way (SHUTDOWN_LAST_CALL_S) leaves that close() unfinished.  The
    middleware used under a new loop is not closing there: what it owed
    and what it owes anew is paid by a payer of that loop, and drain()
    waits for it rather than saying nothing is owed."""
    runs = []

    class Twice(owed_mod.Mod):
        async def run(self, acc) -> int:
            runs.append(self.key)
            if len(runs) == 1:                      # under the stopped loop: never answered
                await asyncio.Event().wait()
            return max(-self.by, 0)

    stats, unpaid, charged = {"owed": 0, "stranded": 0}, [], []
    owed = owed_mod.Owed(lambda: None, stats, charged.append,
                         lambda c, a, w: unpaid.append(a))

    async def second():
        owed.add(Twice(CRED, -3, "second-c", "charge"), Busy("full"))
        return await owed.drain(30)
    stopped = asyncio.new_event_loop()
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.05)
    try:
        stopped.run_until_complete(_closing_on(owed, Twice(CRED, -2, "first-c", "charge")))
        assert asyncio.run(second())
        assert len(owed) == 0 and runs == ["first-c", "first-c", "second-c"]
        assert charged == [2, 3] and unpaid == [] and stats["stranded"] == 0
    finally:
        end_loop(stopped)


def test_a_close_its_stopped_loop_left_ends_later_without_cutting_the_next_loop_s_payer(
        monkeypatch):
    """A close() an event loop stopped unclosed left waiting for the call
    under way ends only later, as that loop's leftover tasks are cancelled
    and run; a payer of the next loop, stopped in turn with its call under
    way, is not its to cut off: that call is not stranded, and lands once
    the next loop runs again."""
    runs = []

    class FirstHangs(owed_mod.Mod):
        async def run(self, acc) -> int:
            runs.append(self.key)
            if self.key == "first-c" and runs.count("first-c") == 1:
                await asyncio.Event().wait()        # under the stopped loop: never answered
            if self.key == "second-c":
                await asyncio.sleep(0.3)            # under way as the next loop stops
            return max(-self.by, 0)

    stats, unpaid, charged = {"owed": 0, "stranded": 0}, [], []
    owed = owed_mod.Owed(lambda: None, stats, charged.append,
                         lambda c, a, w: unpaid.append(a))

    async def second():
        owed.add(FirstHangs(CRED, -3, "second-c", "charge"), Busy("full"))
        deadline = time.monotonic() + 30
        while runs.count("second-c") == 0 and time.monotonic() < deadline:
            await asyncio.sleep(0.01)               # second-c under way
        assert runs == ["first-c", "first-c", "second-c"]
    monkeypatch.setattr(owed_mod, "SHUTDOWN_DRAIN_S", 0.05)
    stopped, following = asyncio.new_event_loop(), asyncio.new_event_loop()
    try:
        stopped.run_until_complete(_closing_on(owed, FirstHangs(CRED, -2, "first-c", "charge")))
        following.run_until_complete(second())  # stopped with second-c under way
        end_loop(stopped, close=False)             # the close() left unfinished ends
        assert following.run_until_complete(owed.drain(30))
        assert runs == ["first-c", "first-c", "second-c"] and len(owed) == 0
        assert charged == [2, 3] and unpaid == [] and stats["stranded"] == 0
    finally:
        for loop in (stopped, following):
            end_loop(loop)
