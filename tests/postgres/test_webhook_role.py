"""The webhook on a store that front-ends share: its cursor is a row of the
store, and one front-end at a time delivers, the one holding the role
(accman.postgres.cursors).  Real PostgreSQL, real front-ends, a real
receiver."""

import asyncio
import contextlib
import hashlib
import os
import signal
import time

import asyncpg
import pytest

from accman.errors import StoreError
from accman.postgres import cursors as cursors_module
from accman.postgres.connecting import KEEPALIVE
from accman.server.cursors import FileCursors
from accman.server.settings import ServerLimits
from accman.server.webhook_http import parse_url
from accman.server.webhook_config import WebhookConfig
from accman.server.webhooks import Deliverer
from conftest import spawn_server
from webhook_receiver import Receiver

from .helpers import opened, run, stored

SECRET = b"webhook-secret-0123456789abcdef"
LEAD_S = 0.2            # WEBHOOK_LEAD_INTERVAL_S for these tests


@contextlib.asynccontextmanager
async def two_front_ends(url):
    """Two stores on one database, as two front-ends hold them."""
    a, _ = await opened(url)
    b, _ = await opened(url)
    try:
        yield a, b
    finally:
        await a.aclose()
        await b.aclose()


@contextlib.contextmanager
def stopped(store):
    """The backend of `store`'s webhook role stopped (SIGSTOP): a session
    that does not answer, as a host cut off would be."""
    pid = store.cursors._conns["webhook"].get_server_pid()
    os.kill(pid, signal.SIGSTOP)
    try:
        yield
    finally:
        os.kill(pid, signal.SIGCONT)


async def terminate(url, pid):
    """Ends a backend from the server's side, as an operator would."""
    admin = await asyncpg.connect(url)
    try:
        assert await admin.fetchval("SELECT pg_terminate_backend($1)", pid)
    finally:
        await admin.close()


async def takes_the_role(store):
    """`store` takes the webhook's role once a terminated backend has let
    it go: its lock goes with the backend, which ends some time after the
    signal (pg_terminate_backend does not wait for it)."""
    deadline = time.monotonic() + 10
    while not await store.cursors.lead("webhook", LEAD_S):
        assert time.monotonic() < deadline, "the ended session kept the role"
        await asyncio.sleep(LEAD_S)


async def sees_its_session_end(store):
    """Until `store`'s client has read the end of its terminated role
    session (the server's error, then the close): only then does its next
    call say the role is lost, where one within its check interval of the
    last check answers from what it knew."""
    deadline = time.monotonic() + 10
    while not store.cursors._conns["webhook"].is_closed():
        assert time.monotonic() < deadline, "the client never saw its session end"
        await asyncio.sleep(0.01)


def test_a_cursor_is_a_row_that_only_grows(pg_url):
    async def main():
        async with two_front_ends(pg_url) as (a, b):
            assert await a.cursors.load_cursor("webhook") is None     # never saved
            await a.cursors.save_cursor("webhook", 7)
            assert await b.cursors.load_cursor("webhook") == 7      # shared by front-ends
            await b.cursors.save_cursor("webhook", 5)               # a late save of a slower one
            assert await a.cursors.load_cursor("webhook") == 7
            assert await a.cursors.load_cursor("other") is None
            with pytest.raises(ValueError, match="cursor name"):
                await a.cursors.load_cursor("Bad name")
    run(main())


def test_one_front_end_holds_the_role_until_its_session_goes(pg_url):
    async def main():
        async with two_front_ends(pg_url) as (a, b):
            assert await a.cursors.lead("webhook", LEAD_S)
            assert not await b.cursors.lead("webhook", LEAD_S)
            assert await a.cursors.lead("webhook", LEAD_S)          # held: no query
            # Its session's client is found gone within ~11 s, not 2 hours.
            # So is every other session of the store's: the writer's, the
            # read pool's and the listener's (connecting.SESSION_SETTINGS).
            role = a.cursors._conns["webhook"]
            cluster = a.clusters[0]
            async with cluster.pool.acquire() as pooled:
                for conn in (role, cluster.lanes[0].writer, pooled, cluster.events.listener):
                    for setting, value in KEEPALIVE.items():
                        assert await conn.fetchval(f"SHOW {setting}") in (value, value + "ms")
            assert await b.cursors.lead("other", LEAD_S)            # one role per cursor
            # Its session killed from the server's side: the role is free,
            # the other takes it, and the holder finds out at its next call.
            await terminate(pg_url, a.cursors._conns["webhook"].get_server_pid())
            await takes_the_role(b)
            await sees_its_session_end(a)
            assert not await a.cursors.lead("webhook", LEAD_S)      # told it lost the role
            assert not await a.cursors.lead("webhook", LEAD_S)      # reconnects, and waits
    run(main())


def test_a_holder_whose_session_does_not_answer_gives_the_role_up(pg_url, monkeypatch):
    """CURSOR_TIMEOUT_S: the holder's check is not answered in time (its
    backend stopped): it says so and lets the session go, and once that
    backend runs again and finds its client gone, the lock is free."""
    monkeypatch.setattr(cursors_module, "CURSOR_TIMEOUT_S", 0.5)

    async def main():
        async with two_front_ends(pg_url) as (a, b):
            assert await a.cursors.lead("webhook", LEAD_S)
            with stopped(a):
                await asyncio.sleep(LEAD_S)
                t0 = time.monotonic()
                with pytest.raises(StoreError, match="^cannot take or keep the webhook role"):
                    await a.cursors.lead("webhook", LEAD_S)
                assert time.monotonic() - t0 < 3
                assert not await b.cursors.lead("webhook", LEAD_S)  # the lock is still held
            deadline = time.monotonic() + 10
            while not await b.cursors.lead("webhook", LEAD_S):
                assert time.monotonic() < deadline, "the stopped session kept the role"
                await asyncio.sleep(LEAD_S)
    run(main())


def test_a_holder_that_lost_the_role_goes_on_from_the_saved_cursor(pg_url):
    """A holder whose session went while another front-end delivered is
    told so once, even when the lock is free again at once, and goes on
    from the cursor as saved, not from its own."""
    async def main():
        loop = asyncio.get_running_loop()
        a, _ = await opened(pg_url)
        b, _ = await opened(pg_url)
        config = WebhookConfig(parse_url("http://127.0.0.1:9/"), SECRET, None)
        limits = ServerLimits(webhook_lead_interval_s=LEAD_S)
        said = []
        d = Deliverer(a, a.cursors, config, limits, loop, say=said.append)
        try:
            await d.prepare()
            assert await d._lead() and d.leading and d.cursor == 0
            d.cursor = 10                       # acknowledged, not yet saved
            await terminate(pg_url, a.cursors._conns["webhook"].get_server_pid())
            await takes_the_role(b)
            await sees_its_session_end(a)
            await b.cursors.save_cursor("webhook", 500)
            await b.aclose()                    # the lock is free again
            assert not await d._lead() and not d.leading
            assert await d._lead() and d.leading and d.cursor == 500
            assert said == ["this front-end delivers now, after event 0",
                            "this front-end lost the webhook's role; it delivers again "
                            "only once it takes the role back",
                            "this front-end delivers now, after event 500"]
        finally:
            await a.aclose()
            await b.aclose()
    run(main())


def deliverer(store, url, said, secret=SECRET):
    """A deliverer on `store` for `url`, its sayings into `said`."""
    return Deliverer(store, store.cursors, WebhookConfig(parse_url(url), secret, None),
                     ServerLimits(webhook_lead_interval_s=LEAD_S),
                     asyncio.get_running_loop(), say=said.append)


def test_a_front_end_given_another_url_says_so(pg_url):
    """One cursor for the store's receiver: a front-end started, or taking
    the role, with another --webhook than the last holder's says so (the
    URL itself, which may hold the receiver's secret, is never said)."""
    async def main():
        async with two_front_ends(pg_url) as (a, b):
            said = []
            holder = deliverer(a, "http://127.0.0.1:9/hook?s=one", said)
            await holder.prepare()
            assert await holder._lead()
            same = deliverer(b, "http://127.0.0.1:9/hook?s=one", said)
            await same.prepare()
            assert said == ["this front-end delivers now, after event 0"]
            other = deliverer(b, "http://127.0.0.1:9/hook?s=two", said)
            await other.prepare()
            warning = ("the store's cursor (event 0) was last moved by a front-end "
                       "delivering to another --webhook URL; every front-end of a store "
                       "needs the same one")
            assert said[1:] == [warning]
            await a.aclose()                    # the holder goes; the other takes over
            assert await other._lead()
            assert said[2:] == ["this front-end delivers now, after event 0", warning]
            await same.prepare()                # now the other URL is the marked one
            assert said[4:] == [warning]
    run(main())


def test_a_front_end_given_another_secret_says_so(pg_url):
    """The same URL with another --webhook-secret: its POSTs fail the
    receiver's check while it holds the role, so a front-end started with
    it says so.  A mark of the URL alone (AccMan before the secret's half)
    is taken for neither secret, and the row holds neither the URL nor the
    secret in clear."""
    url = "http://127.0.0.1:9/hook?s=one"
    other = b"another-secret-0123456789"
    async def main():
        async with two_front_ends(pg_url) as (a, b):
            said = []
            holder = deliverer(a, url, said)
            await holder.prepare()
            assert await holder._lead()
            marked = await a.cursors.target("webhook")
            assert SECRET not in marked and b"hook" not in marked
            await deliverer(b, url, said).prepare()
            assert said == ["this front-end delivers now, after event 0"]
            await deliverer(b, url, said, other).prepare()
            assert said[1:] == ["the store's cursor (event 0) was last moved by a front-end "
                                "delivering to this URL with another --webhook-secret; every "
                                "front-end of a store needs the same secret"]
            await a.cursors.mark("webhook", hashlib.sha256(url.encode()).digest())  # the old mark
            await deliverer(b, url, said, other).prepare()
            await deliverer(b, url, said).prepare()
            assert len(said) == 2
    run(main())


def test_a_start_s_warning_names_the_cursor_as_saved(pg_url):
    """SERVER.md: the warning of a front-end started with another URL or
    secret names the event the store's cursor is at, not the 0 this
    front-end's cursor was before it read the saved one."""
    url = "http://127.0.0.1:9/hook?s=one"

    async def main():
        async with two_front_ends(pg_url) as (a, b):
            said = []
            holder = deliverer(a, url, said)
            await holder.prepare()
            assert await holder._lead()
            await a.cursors.save_cursor("webhook", 7)
            for other in (deliverer(b, url + "x", said),
                          deliverer(b, url, said, b"another-secret-0123456789")):
                await other.prepare()
                assert other.cursor == 7
            assert [s[:len("the store's cursor (event 7) ")] for s in said[1:]] == \
                ["the store's cursor (event 7) "] * 2
    run(main())


def test_a_stop_does_not_wait_for_a_role_session_that_does_not_answer(pg_url):
    async def main():
        a, _ = await opened(pg_url)
        assert await a.cursors.lead("webhook", LEAD_S)
        with stopped(a):
            await asyncio.wait_for(a.aclose(), 5)
    run(main())


def test_a_store_that_closes_gives_its_role_up_at_once(pg_url):
    async def main():
        async with two_front_ends(pg_url) as (a, b):
            assert await a.cursors.lead("webhook", LEAD_S)
            assert not await b.cursors.lead("webhook", LEAD_S)
            await a.aclose()
            assert await b.cursors.lead("webhook", LEAD_S)
    run(main())


def leading(srv) -> int:
    text = srv.get("/metrics").body.decode()
    line = next(x for x in text.splitlines() if x.startswith("accman_webhook_leading "))
    return int(line.split()[1])


def delivered(rx) -> list[int]:
    return [i for p in rx.acked() for i in p.ids]


def test_front_ends_deliver_each_event_once_and_hand_over_when_one_dies(pg, pg_url, tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    env = {"ACCMAN_WEBHOOK_LEAD_INTERVAL_S": str(LEAD_S)}
    with Receiver(SECRET) as rx:
        args = ["--store", pg_url, "--webhook", rx.url, "--webhook-secret", secret]
        fes = [spawn_server(tmp_path / f"d{i}", tmp_path / f"log{i}", args=args, env=env)
               for i in range(2)]
        try:
            for i in range(60):
                assert fes[i % 2].mod(f"acct-{i % 7}", 1).status == 200
            rx.wait_for(lambda: len(delivered(rx)) >= 60, what="60 events delivered")
            time.sleep(3 * LEAD_S)          # a second deliverer would have sent them too
            assert delivered(rx) == list(range(1, 61))
            assert all(p.valid(SECRET) for p in rx.snapshot())
            roles = [leading(f) for f in fes]
            assert sorted(roles) == [0, 1]
            holder, other = (fes[0], fes[1]) if roles[0] else (fes[1], fes[0])
            # The holder dies: the other takes the role and goes on from
            # the cursor as saved, sending again at most what the holder
            # acknowledged after its last save.
            holder.kill()
            for i in range(60, 90):
                assert other.mod(f"acct-{i % 7}", 1).status == 200
            rx.wait_for(lambda: set(delivered(rx)) >= set(range(1, 91)), timeout_s=30,
                        what="every event delivered after the hand-over")
            ids = delivered(rx)
            assert ids[:60] == list(range(1, 61))
            resent = ids[60:]
            assert resent == sorted(resent) and resent[-1] == 90    # in order, from the cursor
            assert leading(other) == 1
        finally:
            for f in fes:
                f.kill()


def test_a_cursor_left_in_the_data_directory_goes_to_the_store(pg, pg_url, tmp_path):
    """An AccMan before schema 3 kept the webhook's cursor in --data: the
    first start after the upgrade gives it to the store, so that nothing
    the receiver acknowledged is sent again."""
    async def fill():
        async with stored(pg_url) as (store, c):
            for _ in range(21):
                await c.mod("acct-0", 1)
    run(fill())
    data = tmp_path / "d"
    data.mkdir(mode=0o700)
    FileCursors(str(data)).save("webhook", 20)
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    with Receiver(SECRET) as rx:
        srv = spawn_server(data, tmp_path / "log", env={"ACCMAN_WEBHOOK_LEAD_INTERVAL_S": "0.2"},
                           args=["--store", pg_url, "--webhook", rx.url,
                                 "--webhook-secret", secret])
        try:
            rx.wait_for(lambda: delivered(rx), what="a delivery")
            time.sleep(0.5)
            assert delivered(rx) == [21]
            assert "(event 20) is now the store's" in srv.stderr()
            assert not (data / "webhook.cursor").exists()
            assert (data / "webhook.cursor.adopted").exists()
        finally:
            srv.kill()
