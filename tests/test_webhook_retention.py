"""A webhook's receiver down for longer than the events' retention loses
nothing (SPEC "Events": "never losing one across restarts"): the store
keeps every event after the webhook's saved cursor whatever its age, and
trims them by the retention once the receiver has acknowledged them.  Real
servers on both stores, a real receiver (tests/webhook_receiver.py)."""

import os
import re
import time

import pytest

from accman.errors import StartupError
from accman.server.cursors import FileCursors
from accman.server.run import webhook_hold
from webhook_receiver import Receiver, secret_file

SECRET = b"retention-webhook-secret-0123456789"
ENV = {"ACCMAN_WEBHOOK_BACKOFF_BASE_S": "0.02", "ACCMAN_WEBHOOK_BACKOFF_CAP_S": "0.2",
       "ACCMAN_WEBHOOK_POLL_WAIT_S": "1"}
RETENTION = "1s"
# A retention pass (one a second at this retention) or two after the
# events are past it.
PAST_RETENTION_S = 2.5
WAIT_S = 30.0


def serve(start_server, tmp_path, rx, webhook=True):
    args = ["--events-retention", RETENTION]
    if webhook:
        args += ["--webhook", rx.url, "--webhook-secret", secret_file(tmp_path, SECRET)]
    return start_server(data=tmp_path / "data", env=ENV, args=args)


def event_ids(srv):
    r = srv.get("/events?after=0")
    assert r.status == 200, r
    return [e["id"] for e in r.json["events"]]


def wait_for(check, what):
    deadline = time.monotonic() + WAIT_S
    while not check():
        assert time.monotonic() < deadline, what
        time.sleep(0.1)


def delivered(rx):
    seen = []
    for post in rx.posts:
        if post.answered == 200:
            seen += [i for i in post.ids if i not in seen]
    return seen


def metric(srv, name):
    m = re.search(rf"(?m)^{name} (\d+)$", srv.get("/metrics").body.decode())
    return int(m.group(1))


def test_a_receiver_down_past_the_retention_and_restarts_lose_nothing(start_server,
                                                                      tmp_path):
    """Kept by the cursor (saved at 0 as the webhook started) across a
    restart without --webhook (a flag forgotten loses the receiver
    nothing) and one with it; all delivered once the receiver is back."""
    with Receiver(SECRET) as rx:
        rx.down()
        srv = serve(start_server, tmp_path, rx)
        for _ in range(5):
            assert srv.mod("a", 1).status == 200
        time.sleep(PAST_RETENTION_S)
        assert event_ids(srv) == [1, 2, 3, 4, 5]
        assert srv.stop() == 0
        srv = serve(start_server, tmp_path, rx, webhook=False)
        time.sleep(PAST_RETENTION_S)
        assert event_ids(srv) == [1, 2, 3, 4, 5]
        assert srv.stop() == 0
        if srv.store.embedded:              # the operator is told why
            assert (f"accman: webhook: the cursor in {tmp_path / 'data'} (event 0) keeps the "
                    f"events after it past the retention, and no --webhook is given"
                    ) in srv.stderr()
        srv = serve(start_server, tmp_path, rx)
        rx.up()
        wait_for(lambda: delivered(rx) == [1, 2, 3, 4, 5], "the events delivered")
        assert all(post.valid(SECRET) for post in rx.posts)
        assert metric(srv, "accman_webhook_events_skipped_total") == 0
        assert "trimmed" not in srv.stderr()
        # Acknowledged and saved: the retention trims them again (the
        # newest event always stays).
        wait_for(lambda: srv.get("/events?after=0").status == 410, "the events trimmed")
        assert srv.get("/events?after=0").json["first"] == 5


def test_events_acknowledged_are_trimmed_and_the_rest_kept(start_server, tmp_path):
    with Receiver(SECRET) as rx:
        srv = serve(start_server, tmp_path, rx)
        for _ in range(3):
            assert srv.mod("a", 1).status == 200
        wait_for(lambda: delivered(rx) == [1, 2, 3], "the first events delivered")
        rx.down()
        for _ in range(3):
            assert srv.mod("a", 1).status == 200
        # 1 to 3 acknowledged go by the retention; 4 to 6 wait for the receiver.
        wait_for(lambda: srv.get("/events?after=0").status == 410, "1 to 3 trimmed")
        time.sleep(PAST_RETENTION_S)
        r = srv.get("/events?after=0")
        assert r.status == 410 and r.json["first"] == 4
        assert [e["id"] for e in srv.get("/events?after=3").json["events"]] == [4, 5, 6]
        rx.up()
        wait_for(lambda: delivered(rx) == [1, 2, 3, 4, 5, 6], "the rest delivered")
        assert metric(srv, "accman_webhook_events_skipped_total") == 0


def test_a_cursor_given_up_lets_the_retention_trim(start_server, tmp_path):
    """Deleting the cursor (the file in --data, or the store's row) gives
    its receiver up: the retention alone trims, as with no webhook ever."""
    with Receiver(SECRET) as rx:
        rx.down()
        srv = serve(start_server, tmp_path, rx)
        for _ in range(3):
            assert srv.mod("a", 1).status == 200
        assert srv.stop() == 0
        store = srv.store
        if store.embedded:
            os.unlink(tmp_path / "data" / "webhook.cursor")
        else:
            store.pg.psql("DELETE FROM accman_cursors WHERE name = 'webhook'",
                          store.dbname(tmp_path / "data"))
        srv = serve(start_server, tmp_path, rx, webhook=False)
        wait_for(lambda: srv.get("/events?after=0").status == 410, "the events trimmed")
        assert srv.get("/events?after=0").json["first"] == 3
        assert "webhook" not in srv.stderr()


def test_the_embedded_store_s_hold_at_open_is_the_cursor_file_s(tmp_path):
    data = tmp_path / "data"
    assert webhook_hold(str(data), webhook=False) is None       # no directory yet
    assert webhook_hold(str(data), webhook=True) == 0           # everything waits
    data.mkdir()
    assert webhook_hold(str(data), webhook=True) == 0
    FileCursors(str(data)).save("webhook", 41)
    assert webhook_hold(str(data), webhook=True) == 41
    assert webhook_hold(str(data), webhook=False) == 41         # the flag forgotten
    (data / "webhook.cursor").write_bytes(b"garbage\n")
    with pytest.raises(StartupError, match="^webhook: the cursor file .* is damaged"):
        webhook_hold(str(data), webhook=False)


def test_a_data_directory_accman_cannot_enter_is_said_so_not_blamed_on_the_cursor(tmp_path):
    """A probe's case: serve as a user who cannot enter the directory said
    "webhook: cannot read the cursor file", with no webhook in use."""
    data = tmp_path / "data"
    data.mkdir(mode=0o700)
    os.chmod(data, 0o000)           # root may still enter: it runs as another user below
    euid = os.geteuid()
    try:
        if euid == 0:
            os.seteuid(65534)
        with pytest.raises(StartupError, match="^cannot open data directory .*: permission "
                                               "denied .accman must be able to enter"):
            webhook_hold(str(data), webhook=False)
    finally:
        if euid == 0:
            os.seteuid(0)
        os.chmod(data, 0o700)


def test_a_damaged_cursor_file_stops_a_start_without_the_webhook_and_leaves_no_loop(
        tmp_path):
    """Refused, never guessed (a guess could trim what its receiver
    lacks); run() leaves no event loop open behind the refusal."""
    import asyncio

    from accman.server.run import run
    data = tmp_path / "data"
    data.mkdir()
    (data / "webhook.cursor").write_bytes(b"garbage\n")
    asyncio.set_event_loop(None)
    with pytest.raises(StartupError, match="^webhook: the cursor file .* is damaged"):
        run(data=str(data), port=0)
    # The policy's own slot: asyncio.get_event_loop() would make a loop.
    assert asyncio.get_event_loop_policy()._local._loop is None
    assert os.listdir(data) == ["webhook.cursor"]           # the store not made
