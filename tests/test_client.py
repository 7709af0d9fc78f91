"""The calling side's clients (accman.client), against the fake AccMan of
tests/fake_accman.py: calls, errors, retries, timeouts, the pool's bounds."""

from __future__ import annotations

import asyncio
import time

import pytest

from accman.calling import client as client_mod
from accman.calling import policy
from accman.client import (AccManClient, AccManSyncClient, BadReply, CallTimeout, Entry,
                           Forbidden, OutcomeUnknown, TransportError, Unauthorized,
                           UnexpectedReply, Unreachable)
from accman.errors import (Busy, HoldEnded, Insufficient, KeyReused, NoAccount, NoHold,
                           NotApplied, Overflow, ShuttingDown, TooManyHolds, Unavailable)
from accman.limits import INT64_MAX
from fake_accman import NOT_APPLIED, FakeAccMan, account_id, closed_port, first_then, run


# --- the async client against the fake -------------------------------------
def test_tot_mod_past(fake):
    async def go():
        async with AccManClient(fake.url) as acc:
            assert await acc.mod("alice", 100) == (100, 1)
            assert await acc.mod("alice", -30, min=0, key="k1") == (70, 2)
            assert await acc.tot("alice") == 70
            entries, nxt = await acc.past("alice", limit=1)
            assert entries == [Entry(2, -30, 70, entries[0].at, "k1")] and nxt == 2
            page = await acc.past("alice", before=nxt)
            assert [e.seq for e in page.entries] == [1] and page.next is None
            assert page.account == account_id("alice")
    run(go())
    assert [r[0] for r in fake.requests] == ["PATCH", "PATCH", "GET", "GET", "GET"]


def test_errors_carry_the_spec_codes(fake):
    fake.fund("bob", 5)
    fake.fund("max", INT64_MAX)

    async def go():
        async with AccManClient(fake.url) as acc:
            with pytest.raises(NoAccount):
                await acc.tot("nobody")
            with pytest.raises(NoAccount):
                await acc.past("nobody")
            with pytest.raises(Insufficient) as e:
                await acc.mod("bob", -6, min=0)
            assert e.value.tot == 5 and e.value.code == "insufficient"
            await acc.mod("bob", -1, key="once")
            with pytest.raises(KeyReused):
                await acc.mod("bob", -2, key="once")
            with pytest.raises(Overflow):
                await acc.mod("max", 1)
    run(go())
    assert fake.tot("bob") == 4


def test_token_is_sent_and_roles_map_to_401_and_403():
    with FakeAccMan(tokens={"svc-tok": {"read", "charge"}}) as fake:
        fake.fund("alice", 10)

        async def go():
            async with AccManClient(fake.url, "svc-tok") as acc:
                assert await acc.mod("alice", -1) == (9, 2)
                with pytest.raises(Forbidden) as e:
                    await acc.mod("alice", 1)
                assert e.value.status == 403
                assert "svc-tok" not in repr(acc)
            async with AccManClient(fake.url, "wrong") as acc:
                with pytest.raises(Unauthorized) as e:
                    await acc.tot("alice")
                assert e.value.status == 401
            async with AccManClient(fake.url) as acc:
                with pytest.raises(Unauthorized):
                    await acc.tot("alice")
        run(go())
        assert fake.requests[0][3] == "Bearer svc-tok"


def test_an_empty_token_is_no_token_as_none_is(fake):
    """ACCMAN_TOKEN set but empty names a server without tokens (the Node
    client agrees): both clients send no Authorization header."""
    fake.fund("alice", 10)

    async def go():
        async with AccManClient(fake.url, "") as acc:
            return await acc.tot("alice")
    assert run(go()) == 10
    with AccManSyncClient(fake.url, "") as acc:
        assert acc.tot("alice") == 10
    assert [r[3] for r in fake.requests] == [None, None]
    with pytest.raises(ValueError, match=r"b64token: letters, digits and - \. _ ~ \+ /, "
                                         r"with = only at its end \(an empty token is none\)"):
        AccManClient(fake.url, " ")


@pytest.mark.parametrize("token", [5, b"token-abc", True])
def test_a_token_that_is_not_a_str_is_a_type_error_naming_its_type(token):
    """A token of another type is named as such, not judged as a b64token
    (`AccManSyncClient(url, 5)`: a timeout passed where the token goes)."""
    for make in (AccManClient, AccManSyncClient):
        with pytest.raises(TypeError, match=f"the token must be a str or None, not "
                                            f"{type(token).__name__}"):
            make("http://127.0.0.1:8035", token)


def test_503_and_busy_and_unexpected_replies(fake):
    fake.fund("alice", 10)

    async def go():
        async with AccManClient(fake.url, retries=1) as acc:
            fake.fault = lambda m, p, q: ("reply", 503, {"error": "unavailable", "detail": "down"})
            with pytest.raises(Unavailable) as e:
                await acc.mod("alice", -1)
            assert type(e.value) is Unavailable
            fake.fault = lambda m, p, q: ("reply", 503, {"error": "busy", "detail": "later"})
            with pytest.raises(Busy):
                await acc.tot("alice")
            fake.fault = lambda m, p, q: ("reply", 405, {"error": "method_not_allowed",
                                                          "detail": "no"})
            with pytest.raises(UnexpectedReply) as e:
                await acc.tot("alice")
            assert e.value.status == 405 and e.value.code == "method_not_allowed"
            fake.fault = lambda m, p, q: ("reply", 502, {})
            with pytest.raises(OutcomeUnknown):
                await acc.tot("alice")
    run(go())
    mods = fake.mods()
    # a keyless mod answered 503 is not retried; busy (refused before
    # applying) and reads are.
    assert len(mods) == 1
    assert sum(1 for r in fake.requests if r[1] == "/tot") == 2 + 1 + 2


@pytest.mark.parametrize("code,error", [("not_applied", NotApplied),
                                        ("shutting_down", ShuttingDown)])
def test_a_503_refused_before_applying_is_retried_for_a_keyless_mod_too(fake, code, error):
    """503 `not_applied` (the store takes no writes) and `shutting_down`
    say that nothing of the call applied: each is its own error, an
    Unavailable and a NotApplied, and any call is sent again, a keyless
    mod too (a plain 503 never retries one), which then applies once."""
    fake.fund("alice", 10)
    refusal = ("reply", 503, {"error": code, "detail": "nothing of this call was applied"})
    fake.fault = first_then(lambda path, _: path == "/mod", refusal)

    async def go():
        async with AccManClient(fake.url, retries=1) as acc:
            return await acc.mod("alice", -1)
    assert run(go())[0] == 9
    assert len(fake.mods()) == 2 and fake.tot("alice") == 9
    fake.fault = lambda m, p, q: refusal
    with AccManSyncClient(fake.url, retries=2) as acc:
        with pytest.raises(error) as e:
            acc.mod("alice", -1)
    assert type(e.value) is error and isinstance(e.value, (NotApplied, Unavailable))
    assert (e.value.status, e.value.code) == (503, code)
    assert len(fake.mods()) == 2 + 3 and fake.tot("alice") == 9


def test_a_hold_refused_not_applied_is_retried_without_its_key(fake):
    """A keyless hold is a write that a plain 503 leaves unknown; one
    refused not_applied held nothing, and is sent again."""
    fake.fund("alice", 10)
    fake.fault = first_then(lambda path, _: path == "/hold", NOT_APPLIED)
    with AccManSyncClient(fake.url, retries=1) as acc:
        assert acc.hold("alice", -4, 60)[1:] == (6, 2)
    assert len(fake.calls("/hold")) == 2 and fake.open_holds("alice") == {2: 4}


def test_a_keyless_mod_whose_reply_is_lost_is_not_retried(fake):
    fake.fund("alice", 10)
    fake.fault = lambda m, p, q: ("apply_drop",) if p == "/mod" else None

    async def go():
        async with AccManClient(fake.url, retries=3) as acc:
            with pytest.raises(OutcomeUnknown) as e:
                await acc.mod("alice", -1)
            return e.value
    err = run(go())
    assert not isinstance(err, Unavailable)     # it may have applied: not "nothing happened"
    assert len(fake.mods()) == 1 and fake.tot("alice") == 9


def test_a_keyed_mod_whose_reply_is_lost_is_retried_and_applies_once(fake):
    fake.fund("alice", 10)
    lost = []

    def fault(m, p, q):
        if p == "/mod" and len(lost) < 2:
            lost.append(1)
            return ("apply_drop",)
    fake.fault = fault

    async def go():
        async with AccManClient(fake.url, retries=3) as acc:
            return await acc.mod("alice", -3, min=0, key="req1-r")
    assert run(go()) == (7, 2)
    assert len(fake.mods()) == 3 and fake.tot("alice") == 7


def test_a_timeout_fails_the_call_within_its_deadline(fake):
    fake.fund("alice", 10)
    fake.fault = lambda m, p, q: ("delay", 1.5) if p == "/mod" else None

    async def go():
        async with AccManClient(fake.url, timeout_s=0.1, retries=2) as acc:
            t = time.monotonic()
            with pytest.raises(CallTimeout):
                await acc.mod("alice", -1)
            elapsed = time.monotonic() - t
            # Before the reply (1.5 s late), after one attempt's 0.1 s: a keyless
            # mod is not retried (one mod reached the server: below).
            assert 0.09 < elapsed < 1.2
            fake.fault = None
            assert await acc.tot("alice") == 10   # a fresh connection; the late one was closed
    run(go())
    assert len(fake.mods()) == 1


def test_timed_out_reads_are_retried(fake):
    fake.fund("alice", 10)
    slow = [1]

    def fault(m, p, q):
        if slow:
            slow.pop()
            return ("delay", 0.5)
    fake.fault = fault

    async def go():
        async with AccManClient(fake.url, timeout_s=0.1, retries=1) as acc:
            return await acc.tot("alice")
    assert run(go()) == 10
    assert len(fake.requests) == 2


def test_unreachable_means_nothing_applied_and_even_keyless_mods_retry():
    url = f"http://127.0.0.1:{closed_port()}"

    async def go():
        async with AccManClient(url, retries=2) as acc:
            t = time.monotonic()
            with pytest.raises(Unreachable) as e:
                await acc.mod("alice", -1)
            return e.value, time.monotonic() - t
    err, elapsed = run(go())
    assert isinstance(err, Unavailable) and isinstance(err, TransportError)
    # retried twice: pauses of RETRY_PAUSE_S and 2 * RETRY_PAUSE_S
    assert elapsed >= 3 * policy.RETRY_PAUSE_S * 0.9
    assert "alice" not in str(err)


def test_garbage_reply_is_a_bad_reply(fake):
    def raw(text: bytes):
        return lambda m, p, q: ("raw", b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n%s"
                                % (len(text), text))
    fake.fault = raw(b"xyz")

    async def go():
        async with AccManClient(fake.url, retries=0) as acc:
            with pytest.raises(BadReply):
                await acc.tot("alice")
            fake.fault = raw(b'{"tot":1}')
            assert await acc.tot("alice") == 1
            fake.fault = raw(b'{"tot":true}')
            with pytest.raises(BadReply):
                await acc.tot("alice")
            fake.fault = lambda m, p, q: ("raw", b"junk\r\n\r\n")
            with pytest.raises(BadReply):
                await acc.tot("alice")
    run(go())


def test_a_reply_nobody_asked_for_drops_the_connection(fake):
    two = b"HTTP/1.1 200 OK\r\nContent-Length: 9\r\n\r\n{\"tot\":1}" * 2
    fake.fault = lambda m, p, q: ("raw", two) if not fake.connections > 1 else None
    fake.fund("alice", 5)

    async def go():
        async with AccManClient(fake.url, retries=0) as acc:
            assert await acc.tot("alice") == 1
            await asyncio.sleep(0.05)
            assert acc._conns == []             # closed: its framing cannot be trusted
            assert await acc.tot("alice") == 5  # a fresh connection
    run(go())
    assert fake.connections == 2


def test_many_calls_in_flight_share_a_bounded_pool(fake):
    fake.fund("alice", 10_000)
    fake.fault = lambda m, p, q: ("delay", 0.001)

    async def go():
        async with AccManClient(fake.url, connections_max=4) as acc:
            results = await asyncio.gather(*(acc.mod("alice", -1, key=f"k{i}") for i in range(500)))
            reads = await asyncio.gather(*(acc.tot("alice") for _ in range(200)))
            return results, reads
    results, reads = run(go())
    assert sorted(seq for _, seq in results) == list(range(2, 502))
    assert reads == [9500] * 200 and fake.tot("alice") == 9500
    assert fake.connections <= 4


def test_pipeline_depth_and_waiting_calls_are_bounded(fake, monkeypatch):
    monkeypatch.setattr(client_mod, "CALLS_WAITING_MAX", 5)
    fake.fund("alice", 10)
    depth = client_mod.PIPELINE_DEPTH_MAX

    async def go():
        async with AccManClient(fake.url, connections_max=1, retries=0) as acc:
            await acc.tot("alice")
            # The first pipelined call's reply comes a second late, and the
            # replies come in order: none is back while the bounds are read.
            late = [1]
            fake.fault = lambda m, p, q: ("delay", 1.0) if late and late.pop() else None
            tasks = [asyncio.create_task(acc.tot("alice")) for _ in range(depth + 5)]
            await asyncio.sleep(0.01)
            conn = acc._conns[0]
            assert len(conn.waiting) == depth and len(acc._waiters) == 5
            with pytest.raises(Busy, match="CALLS_WAITING_MAX"):
                await acc.tot("alice")
            assert await asyncio.gather(*tasks) == [10] * (depth + 5)
    run(go())
    assert fake.connections == 1


def test_idle_connections_are_not_reused_past_idle_reuse_s(fake, monkeypatch):
    # Long enough that the two calls back to back reuse the connection
    # on a busy machine too.
    monkeypatch.setattr(policy, "IDLE_REUSE_S", 0.5)
    fake.fund("alice", 1)

    async def go():
        async with AccManClient(fake.url) as acc:
            await acc.tot("alice")
            await acc.tot("alice")
            assert fake.connections == 1
            await asyncio.sleep(0.55)
            await acc.tot("alice")
            assert fake.connections == 2
    run(go())


def test_a_closed_client_refuses_calls(fake):
    async def go():
        acc = AccManClient(fake.url)
        await acc.aclose()
        with pytest.raises(Unreachable):
            await acc.tot("alice")
    run(go())


def test_cancelled_calls_leave_the_connection_usable(fake):
    fake.fund("alice", 3)
    fake.fault = lambda m, p, q: ("delay", 0.05) if p == "/past" else None

    async def go():
        async with AccManClient(fake.url, connections_max=1) as acc:
            t = asyncio.create_task(acc.past("alice"))
            await asyncio.sleep(0.01)
            t.cancel()
            assert await acc.tot("alice") == 3      # pipelined behind the cancelled one
    run(go())


# --- the blocking client ----------------------------------------------------
def test_sync_client_calls_and_errors(fake):
    with AccManSyncClient(fake.url) as acc:
        assert acc.mod("alice", 10, key="fund-1") == (10, 1)
        assert acc.mod("alice", 10, key="fund-1") == (10, 1)       # idempotent
        assert acc.tot("alice") == 10
        with pytest.raises(Insufficient) as e:
            acc.mod("alice", -11, min=0)
        assert e.value.tot == 10
        with pytest.raises(NoAccount):
            acc.tot("bob")
        entries, nxt = acc.past("alice")
        assert [e.by for e in entries] == [10] and nxt is None
        assert acc.past("alice").account == account_id("alice")
    assert fake.connections == 1


def test_sync_client_reconnects_when_the_server_closed_the_idle_connection(fake):
    fake.fund("alice", 10)
    with AccManSyncClient(fake.url) as acc:
        acc.tot("alice")
        # the server closes the idle keep-alive connection
        asyncio.run_coroutine_threadsafe(_close_all(fake), fake.loop).result(2)
        time.sleep(0.05)
        # a keyless mod goes out on a fresh connection instead of into a dead one
        assert acc.mod("alice", -1) == (9, 2)
    assert fake.connections == 2 and len(fake.mods()) == 1


async def _close_all(fake):
    for w in list(fake._writers):
        w.close()


def test_sync_client_timeout_and_retry_rules(fake):
    fake.fund("alice", 10)
    fake.fault = lambda m, p, q: ("delay", 1.2) if p == "/mod" else None
    with AccManSyncClient(fake.url, timeout_s=0.1, retries=2) as acc:
        t = time.monotonic()
        with pytest.raises(CallTimeout):
            acc.mod("alice", -1)
        assert time.monotonic() - t < 1.0         # before the reply: timed out
        assert len(fake.mods()) == 1                # one attempt
        with pytest.raises(CallTimeout):
            acc.mod("alice", -1, key="k")
        assert len(fake.mods()) == 1 + 3
    time.sleep(1.2 + 0.5)               # every delayed mod has been handled
    assert fake.tot("alice") == 8       # the late keyless one, and the keyed one once


def test_sync_client_unreachable():
    with AccManSyncClient(f"http://127.0.0.1:{closed_port()}", retries=0) as acc:
        with pytest.raises(Unreachable):
            acc.tot("alice")


def test_a_call_that_may_have_reached_the_server_ends_unknown_unless_settled():
    """policy.Attempts: after an attempt that may have reached the server,
    a later one that is Unreachable, Busy or 401 leaves the call an
    OutcomeUnknown of the first attempt's type, and so does a refusal
    judged by a balance or a count that moves, which the first attempt,
    arriving later, may not meet; a definite reply (a refusal the first
    attempt meets too, whenever it arrives) or another unknown ends it as
    is."""
    def ends(*errors, safe=True, retries=5):
        attempts = policy.Attempts(safe, retries)
        for e in errors:
            ending = attempts.failed(e, False)
        return ending

    first = CallTimeout("no reply")
    for later in (Unreachable("down"), Busy("full"), Unauthorized("bad token"),
                  NotApplied("the store takes no writes"), ShuttingDown("stopping")):
        err = ends(first, later, retries=1)
        assert type(err) is CallTimeout and "may have been applied" in err.detail
    assert type(ends(Unreachable("down"), first, Unreachable("down"), retries=2)) is CallTimeout
    for later in (Insufficient(5), Overflow("full"), TooManyHolds("many"), NoAccount("none")):
        err = ends(first, later)
        assert type(err) is CallTimeout and "may have been applied" in err.detail, later
    for later in (KeyReused("taken"), HoldEnded("ended"), NoHold("gone")):
        assert ends(first, later) is later
    assert ends(first, OutcomeUnknown("again"), retries=1).detail == "again"
    assert type(ends(Unreachable("down"), Unreachable("down"), retries=1)) is Unreachable
    assert ends(first, safe=False) is first             # a keyless mod is not retried
    # A plain 503 (a commit that failed: not acknowledged) may have applied
    # too; so may an attempt a proxy answered in place of AccMan.
    failed = Unavailable("the store cannot commit")
    for later in (Unreachable("down"), Busy("full"), NotApplied("the store takes no writes")):
        err = ends(failed, later, retries=1)
        assert type(err) is Unavailable and "may have been applied" in err.detail
    # Refused before applying, then a timeout: only the timeout may have
    # applied; refused before applying each time, nothing did.
    assert ends(NotApplied("no writes"), first, safe=False) is first
    refused = NotApplied("no writes")
    assert ends(NotApplied("no writes"), refused, safe=False, retries=1) is refused
    err = ends(first, UnexpectedReply(404, "not_found", "a proxy's"), retries=1)
    assert type(err) is CallTimeout


def test_what_each_503_says_of_the_call_and_of_the_writes_after_it():
    """policy: a 503 refused before applying (NotApplied: not_applied,
    busy, shutting_down) never may have landed, and any call retries it;
    a plain 503 may have (a commit that failed).  Every 503 of AccMan's
    but back-pressure says the next write may fail too (writes_failing:
    check mode then admits on a write), and so does one that may have
    landed."""
    cases = [(NotApplied("x"), False, True), (ShuttingDown("x"), False, True),
             (Busy("x"), False, False), (Unavailable("x"), True, True),
             (Unreachable("x"), False, False), (CallTimeout("x"), True, True)]
    for exc, landed, failing in cases:
        assert policy.may_have_landed(exc) is landed, exc
        assert policy.writes_failing(exc) is failing, exc
    for exc in (NotApplied("x"), ShuttingDown("x"), Busy("x")):
        assert policy.retryable(exc, safe=False), exc
    assert not policy.retryable(Unavailable("x"), safe=False)


def test_a_read_ends_with_its_last_error_never_may_have_been_applied():
    """A read applies nothing: a timeout then a refused connection (AccMan
    restarting) ends as the refused connection, not as "the call may have
    been applied"."""
    attempts = policy.Attempts(True, 1, read=True)
    assert attempts.failed(CallTimeout("no reply"), False) is None
    down = Unreachable("down")
    assert attempts.failed(down, False) is down


def test_every_read_of_both_clients_is_made_as_a_read(server):
    """What each client's reads send starts with GET, which is how a call
    is told to be a read (policy.Attempts' `read`)."""
    made = []
    real = policy.Attempts.__init__

    def noting(self, safe, retries, read=False):
        made.append(read)
        real(self, safe, retries, read)
    policy.Attempts.__init__ = noting
    try:
        with AccManSyncClient(server.url) as acc:
            acc.mod("r", 5)
            acc.tot("r"), acc.past("r"), acc.events()
    finally:
        policy.Attempts.__init__ = real
    assert made == [False, True, True, True]
