"""Signed webhooks (SPEC "Events", issue 13): the URL and secret checks of
`accman serve`, the POST's bytes, the cursor file, and the deliverer against
a real receiver (tests/webhook_receiver.py) that fails, hangs, goes down and
comes back.  Here the deliverer reads a small in-process event store that
keeps the store interface's `read_events` contract (long poll included);
tests/reliability/test_webhook_delivery.py runs a real server."""

import asyncio
import hashlib
import hmac
import json
import os
import shutil
import socket
import ssl
import stat
import statistics
import subprocess
import sys
import time

import pytest
from hypothesis import given
from hypothesis import strategies as st

from accman import limits as L
from accman.errors import EventsTrimmed, StartupError, StoreCorrupt
from accman.records import Event
from accman.server.cursors import FileCursors, cursor_line, parse_cursor
from accman.server.metrics import Metrics
from accman.server.settings import ServerLimits
from accman.server.webhook_http import parse_status, parse_url
from accman.server.webhook_config import WebhookConfig, load_config, read_secret
from accman.server import webhook_http, webhooks
from accman.server.webhooks import (CURSOR_NAME, Deliverer, backoff_s, batch_body, event_json,
                                    post_bytes)
from conftest import ROOT, run_accman
from webhook_receiver import Receiver

SECRET = b"webhook-secret-0123456789abcdef"
# Small waits, so that a test sees many retries in well under a second.
FAST = ServerLimits(webhook_backoff_base_s=0.01, webhook_backoff_cap_s=0.05,
                    webhook_attempt_timeout_s=2.0, webhook_poll_wait_s=1.0)


def ev(i, key=None, hold=None, type_="mod"):
    return Event(i, type_, f"{i:032x}", i, -1 if i % 2 else 5, 100 - i, 1764070000000 + i,
                 key, hold)


class FakeEvents:
    """The store interface's read_events over a list: events oldest first,
    ids from 1 without gaps, a long poll answered when an event is added or
    its wait passes (on the loop, as a store's `deliver` does), and
    EventsTrimmed for ids under `first`."""

    def __init__(self, loop):
        self.loop = loop
        self.events = []
        self.first = 1
        self.waiters = []
        self.reads = []             # (after, limit, wait_s) of every call
        self.kept = []              # every keep_events_after(id), in order

    def keep_events_after(self, event_id):
        self.kept.append(event_id)

    def add(self, n, **kw):
        start = len(self.events) + 1
        self.events += [ev(i, **kw) for i in range(start, start + n)]
        waiters, self.waiters = self.waiters, []
        for after, limit, done, timer in waiters:
            timer.cancel()
            self.loop.call_soon(done, self._page(after, limit))

    def add_threadsafe(self, n, **kw):
        self.loop.call_soon_threadsafe(lambda: self.add(n, **kw))

    def _page(self, after, limit):
        if after < self.first - 1:
            return EventsTrimmed(self.first)
        if after > len(self.events):
            return [], len(self.events)             # past the end: told so at once
        page = [e for e in self.events if e.id > after][:limit]
        return page, (page[-1].id if page else after)

    def read_events(self, after, limit, wait_s, done):
        self.reads.append((after, limit, wait_s))
        page = self._page(after, limit)
        if isinstance(page, EventsTrimmed) or page[0] or page[1] != after or wait_s == 0:
            return page

        def expire():
            self.waiters = [w for w in self.waiters if w[2] is not done]
            done(([], after))

        self.waiters.append((after, limit, done, self.loop.call_later(wait_s, expire)))
        return None


def config_for(rx, ssl_context=None):
    return WebhookConfig(parse_url(rx.url), SECRET, ssl_context)


def run_deliverer(store_setup, rx, until, *, cursors, limits=FAST, timeout_s=20.0,
                  said=None, ssl_context=None):
    """Runs a Deliverer on a fresh loop until `until(deliverer)` holds,
    then stops it; returns the deliverer.  `store_setup(loop)` makes the
    store."""
    said = [] if said is None else said

    async def main():
        loop = asyncio.get_running_loop()
        store = store_setup(loop)
        d = Deliverer(store, cursors, config_for(rx, ssl_context), limits, loop,
                      say=said.append)
        await d.prepare()
        d.start()
        # The start is said, naming the receiver's host and port only.
        assert said.pop(0) == (f"delivering to {rx.url.split('/hooks')[0]} after event "
                               f"{d.cursor}")
        deadline = loop.time() + timeout_s
        while not until(d):
            assert loop.time() < deadline, f"not done within {timeout_s} s: {said}"
            await asyncio.sleep(0.005)
        await d.stop()
        d.store = store
        return d

    return asyncio.run(main())


def with_events(n, **kw):
    def setup(loop):
        store = FakeEvents(loop)
        store.add(n, **kw)
        return store
    return setup


@pytest.fixture
def rx():
    with Receiver(SECRET) as r:
        yield r


@pytest.fixture
def cursors(tmp_path):
    return FileCursors(str(tmp_path))


def delivered_ids(rx):
    """Every id the receiver acknowledged, deduplicated, in arrival order."""
    seen, out = set(), []
    for p in rx.acked():
        for i in p.ids:
            if i not in seen:
                seen.add(i)
                out.append(i)
    return out


# --- the URL ------------------------------------------------------------------------

@pytest.mark.parametrize("url,want", [
    ("http://127.0.0.1:9000/hook", ("http", "127.0.0.1", 9000, "/hook", "127.0.0.1:9000")),
    ("https://hooks.example.com", ("https", "hooks.example.com", 443, "/",
                                   "hooks.example.com")),
    ("HTTP://Example.COM/a?b=c&d", ("http", "example.com", 80, "/a?b=c&d", "example.com")),
    ("http://[::1]:8080/x", ("http", "::1", 8080, "/x", "[::1]:8080")),
    ("http://1password.com/", ("http", "1password.com", 80, "/", "1password.com")),
    ("http://123.example/", ("http", "123.example", 80, "/", "123.example")),
    ("https://example.com:8443/p/q/?", ("https", "example.com", 8443, "/p/q/?",
                                        "example.com:8443")),
    ("http://h.example/a%2Fb;c=d/e:f@g?h=%41&i='j'!*(k)~", (
        "http", "h.example", 80, "/a%2Fb;c=d/e:f@g?h=%41&i='j'!*(k)~", "h.example")),
])
def test_a_webhook_url_parses_into_its_target(url, want):
    assert tuple(parse_url(url)) == want


@pytest.mark.parametrize("url,why", [
    ("ftp://example.com/x", "http:// or https://"),
    ("example.com/hook", "http:// or https://"),
    ("http://", "no host"),
    ("http:///path", "no host"),
    ("http://user:pw@example.com/", "no user or password"),
    ("http://example.com:99999/", "does not parse"),
    ("http://example.com:abc/", "does not parse"),
    ("http://example.com:0/", "port 0"),
    ("http://[::1/", "does not parse"),
    ("http://exa mple.com/", "without spaces"),
    ("http://example.com/a\r\nX-Injected: 1", "control characters"),
    ("http://ex\u00e4mple.com/", "ASCII"),
    ("http://example.com/#frag", "fragment"),
    ("http://exa_mple.com/", "not a name or an address"),
    ("http://256.256.256.256/", "not an IPv4 address: 256.256.256.256"),
    ("http://127.1/", "not an IPv4 address"),
    ("http://010.0.0.1/", "not an IPv4 address"),
    ("http://0x7f000001/", "not an IPv4 address"),
    ("http://127.0.0.0x1/", "not an IPv4 address"),
    ("http://0x7f.1/", "not an IPv4 address"),
    ("http://[fe80::zz]/", "does not parse"),
    ("http://example.com:/hook", "a ':' without a port"),
    ("http://[fe80::1%25lo]/", "an IPv6 zone"),
    ("http://[::1]x:80/", "in brackets that is not an IPv6 address followed by nothing"),
    ("http://[v1.x]/", "in brackets that is not an IPv6 address followed by nothing"),
    ("http://[fe80::1%lo]/", "an IPv6 zone"),
    ("http://example.com/a%zz", "'%' not followed by two hex digits: '%zz'"),
    ("http://example.com/a?b=%4", "'%' not followed by two hex digits: '%4'"),
    ('http://example.com/a"b', "'\"' in its path or query.*%22"),
    ("http://example.com/{id}", "'{' in its path or query.*%7B"),
    ("http://example.com/a?b=c|d", "'\\|' in its path or query.*%7C"),
    ("http://example.com/a^b", "'\\^' in its path or query.*%5E"),
    ("http://example.com/a`b<c>", "'`' in its path or query.*%60"),
])
def test_a_bad_webhook_url_is_refused_saying_why(url, why):
    with pytest.raises(ValueError, match=why):
        parse_url(url)
    with pytest.raises(StartupError, match=f"^--webhook: the URL .*{why}"):
        load_config(url, "/nonexistent")


def test_serve_refuses_a_bad_url_naming_the_flag_before_opening_the_data(tmp_path):
    secret = tmp_path / "secret"
    secret.write_bytes(SECRET)
    os.chmod(secret, 0o600)
    data = tmp_path / "data"
    r = run_accman("serve", "--port", 0, "--data", data, "--webhook", "ftp://example.com/",
                   "--webhook-secret", secret)
    assert r.returncode == 2, r
    assert r.stderr.strip() == ("accman: error: --webhook: the URL must start with http:// "
                                "or https://")
    assert not data.exists()


# --- the secret -----------------------------------------------------------------------

def write_secret(path, data, mode=0o600):
    path.write_bytes(data)
    os.chmod(path, mode)
    return str(path)


def test_the_secret_is_the_files_bytes_without_surrounding_whitespace(tmp_path):
    path = write_secret(tmp_path / "s", b"\n  " + SECRET + b"\r\n")
    assert read_secret(path) == SECRET


@pytest.mark.parametrize("mode", [0o640, 0o604, 0o644, 0o660])
def test_a_secret_file_others_can_read_is_refused(tmp_path, mode):
    path = write_secret(tmp_path / "s", SECRET, mode)
    with pytest.raises(StartupError) as e:
        read_secret(path)
    text = str(e.value)
    assert text.startswith("--webhook-secret: ") and "open to other users" in text
    assert f"{mode:04o}" in text and f"chmod 600 {path}" in text
    assert SECRET.decode() not in text


@pytest.mark.parametrize("data", [b"", b"   \n", b"x" * (L.WEBHOOK_SECRET_BYTES_MIN - 1),
                                  b"y" * (L.WEBHOOK_SECRET_BYTES_MAX + 1)])
def test_a_secret_out_of_bounds_is_refused_without_quoting_it(tmp_path, data):
    path = write_secret(tmp_path / "s", data)
    with pytest.raises(StartupError, match=f"must have {L.WEBHOOK_SECRET_BYTES_MIN} to "
                                           f"{L.WEBHOOK_SECRET_BYTES_MAX} bytes") as e:
        read_secret(path)
    assert not data.strip() or data.strip().decode() not in str(e.value)


def test_secrets_at_both_bounds_are_taken(tmp_path):
    for n in (L.WEBHOOK_SECRET_BYTES_MIN, L.WEBHOOK_SECRET_BYTES_MAX):
        assert read_secret(write_secret(tmp_path / f"s{n}", b"k" * n)) == b"k" * n


def test_a_missing_or_odd_secret_file_is_refused(tmp_path):
    with pytest.raises(StartupError, match="^--webhook-secret: cannot read .*No such file"):
        read_secret(str(tmp_path / "none"))
    with pytest.raises(StartupError, match="is not a regular file"):
        read_secret(str(tmp_path))


def test_webhook_and_secret_go_together():
    assert load_config(None, None) is None
    with pytest.raises(StartupError, match="--webhook needs --webhook-secret FILE"):
        load_config("http://127.0.0.1:9/", None)
    with pytest.raises(StartupError, match="--webhook-secret needs --webhook URL"):
        load_config(None, "/x")


def test_the_config_never_shows_the_secret_or_the_urls_path(tmp_path):
    path = write_secret(tmp_path / "s", SECRET)
    config = load_config("https://example.com:8443/hook?token=receivers-own", path)
    assert config.secret == SECRET and config.ssl_context is not None
    for text in (repr(config), str(config)):
        assert "receivers-own" not in text and SECRET.decode() not in text
        assert "https://example.com:8443" in text


def test_serve_refuses_an_open_secret_file_before_opening_the_data(tmp_path):
    path = write_secret(tmp_path / "s", SECRET, 0o644)
    data = tmp_path / "data"
    r = run_accman("serve", "--port", 0, "--data", data, "--webhook", "http://127.0.0.1:9/",
                   "--webhook-secret", path)
    assert r.returncode == 2
    assert "--webhook-secret" in r.stderr and "open to other users" in r.stderr
    assert SECRET.decode() not in r.stderr + r.stdout
    assert not data.exists()


@pytest.mark.parametrize("env,said", [
    ({"ACCMAN_WEBHOOK_EVENTS_PER_POST_MAX": str(L.EVENTS_LIMIT_MAX + 1)},
     f"(ACCMAN_WEBHOOK_EVENTS_PER_POST_MAX)={L.EVENTS_LIMIT_MAX + 1}: at most "
     f"{L.EVENTS_LIMIT_MAX}"),
    ({"ACCMAN_WEBHOOK_POLL_WAIT_S": str(L.EVENTS_WAIT_S_MAX + 1)},
     f"(ACCMAN_WEBHOOK_POLL_WAIT_S)={L.EVENTS_WAIT_S_MAX + 1}: at most {L.EVENTS_WAIT_S_MAX}"),
    ({"ACCMAN_WEBHOOK_BACKOFF_BASE_S": "60"},
     "(ACCMAN_WEBHOOK_BACKOFF_BASE_S)=60 must not be over webhook_backoff_cap_s "
     "(ACCMAN_WEBHOOK_BACKOFF_CAP_S)=30"),
])
@pytest.mark.parametrize("webhook", [True, False])
def test_serve_refuses_webhook_limits_past_the_stores_before_opening_it(tmp_path, env, said,
                                                                         webhook):
    """Checked with the other settings, before the store is opened or made,
    with or without --webhook (SERVER.md: a bad override exits 2)."""
    path = write_secret(tmp_path / "s", SECRET)
    hook = ["--webhook", "http://127.0.0.1:9/", "--webhook-secret", path] if webhook else []
    r = run_accman("serve", "--port", 0, "--data", tmp_path / "d", *hook, env=env)
    assert r.returncode == 2 and said in r.stderr, r.stderr
    assert not (tmp_path / "d").exists()


# --- the POST's bytes -------------------------------------------------------------------

events_st = st.builds(
    Event, id=st.integers(1, L.INT64_MAX), type=st.sampled_from(
        ["mod", "hold", "settle", "expire", "low_balance"]),
    account=st.text("0123456789abcdef", min_size=32, max_size=64),
    seq=st.integers(1, L.INT64_MAX), by=st.integers(L.INT64_MIN, L.INT64_MAX),
    tot=st.integers(L.INT64_MIN, L.INT64_MAX), at=st.integers(0, 2 ** 50),
    key=st.none() | st.text(min_size=1, max_size=64),
    hold=st.none() | st.integers(1, L.INT64_MAX))


@given(events_st)
def test_event_json_is_the_specs_event_object(e):
    """Byte for byte what json.dumps writes (keys with any character
    included: the SPEC's keys need no escaping, others still come out as
    valid JSON)."""
    assert event_json(e) == json.dumps(e._asdict(), separators=(",", ":")).encode()


def test_a_batch_is_cut_to_webhook_body_bytes_max():
    events = [ev(i, key="k" * 64) for i in range(1, 101)]
    whole, n = batch_body(events, L.WEBHOOK_BODY_BYTES_MAX)
    assert n == 100 and json.loads(whole) == {"events": [e._asdict() for e in events]}
    limit = len(whole) // 3
    body, n = batch_body(events, limit)
    assert len(body) <= limit and 0 < n < 100
    assert [e["id"] for e in json.loads(body)["events"]] == list(range(1, n + 1))
    bigger, _ = batch_body(events[:n + 1], L.WEBHOOK_BODY_BYTES_MAX)
    assert len(bigger) > limit
    assert batch_body(events, len(whole)) == (whole, 100)


def test_a_batch_holds_one_event_even_over_the_byte_bound():
    body, n = batch_body([ev(1), ev(2)], 10)
    assert n == 1 and json.loads(body)["events"][0]["id"] == 1


def test_server_md_shows_the_post_head_the_deliverer_sends():
    """SERVER.md's example POST (Webhooks) is the head post_bytes makes for
    its URL: the same lines, each header once, in the order sent.  Only what
    depends on the body (its length, its signature) and on the version is
    left out there."""
    doc = (ROOT / "docs" / "SERVER.md").read_text()
    shown = ("POST " + doc.split("\n```\nPOST ", 1)[1].split("\n\n", 1)[0]).splitlines()
    config = WebhookConfig(parse_url("https://billing.example.com/hooks/accman"), SECRET, None)
    body, _ = batch_body([ev(41), ev(42)], L.WEBHOOK_BODY_BYTES_MAX)
    sent = post_bytes(config, body, 41, 42).split(b"\r\n\r\n")[0].decode().split("\r\n")
    assert [line.split(": ")[0] for line in shown] == [line.split(": ")[0] for line in sent]
    elided = ("Content-Length: ", "AccMan-Signature: sha256=", "User-Agent: accman/")
    for line_shown, line_sent in zip(shown, sent, strict=True):
        prefix = next((p for p in elided if line_sent.startswith(p)), None)
        if prefix is None:
            assert line_shown == line_sent
        else:
            assert line_shown.startswith(prefix), (line_shown, line_sent)


def test_backoff_grows_exponentially_up_to_its_cap_with_jitter():
    base, cap = 0.5, 30.0
    assert [backoff_s(n, base, cap, rand=lambda: 0.0) for n in range(1, 9)] == \
        [0.5, 1.0, 2.0, 4.0, 8.0, 16.0, 30.0, 30.0]
    assert backoff_s(1000, base, cap, rand=lambda: 0.0) == cap
    assert backoff_s(3, base, cap, rand=lambda: 1.0) == 1.0
    waits = {backoff_s(4, base, cap) for _ in range(200)}
    assert len(waits) > 100 and all(2.0 <= w <= 4.0 for w in waits)


@pytest.mark.parametrize("head,status", [
    (b"HTTP/1.1 200 OK\r\n\r\n", 200), (b"HTTP/1.0 204\r\nX: y\r\n\r\n", 204),
    (b"HTTP/1.1 503 Service Unavailable\r\n\r\n", 503),
])
def test_a_reply_status_line_is_read(head, status):
    assert parse_status(head) == status


@pytest.mark.parametrize("head", [b"HTTP/2 200\r\n\r\n", b"200 OK\r\n\r\n",
                                  b"HTTP/1.1 20 OK\r\n\r\n", b"\r\n\r\n",
                                  b"HTTP/1.1 999 X\r\n\r\n"])
def test_a_malformed_status_line_is_refused(head):
    with pytest.raises(Exception, match="status line"):
        parse_status(head)


# --- the cursor file --------------------------------------------------------------------

def test_a_cursor_survives_as_a_0600_file_written_whole(tmp_path, cursors):
    assert cursors.load(CURSOR_NAME) is None                    # never saved
    cursors.save(CURSOR_NAME, 41)
    cursors.save(CURSOR_NAME, 42)
    path = tmp_path / "webhook.cursor"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert sorted(os.listdir(tmp_path)) == ["webhook.cursor"]      # no temporary left
    assert path.read_bytes() == cursor_line(CURSOR_NAME, 42)
    assert FileCursors(str(tmp_path)).load(CURSOR_NAME) == 42


def test_a_cursor_never_moves_back(cursors):
    cursors.save(CURSOR_NAME, 10)

    async def back():
        await cursors.save_cursor(CURSOR_NAME, 9)

    with pytest.raises(AssertionError):
        asyncio.run(back())
    assert cursors.load(CURSOR_NAME) == 10


@pytest.mark.parametrize("damage", [
    lambda b: b.replace(b" 42 ", b" 43 "),              # a bit flip in the value
    lambda b: b[:-3] + b"x\n",                          # in the checksum
    lambda b: b[:-1],                                   # the newline lost
    lambda b: b"",                                      # empty
    lambda b: b.replace(b"webhook", b"webhuuk"),        # another cursor's name
    lambda b: b + b"junk",
])
def test_a_damaged_cursor_file_is_refused_never_guessed(tmp_path, cursors, damage):
    cursors.save(CURSOR_NAME, 42)
    path = tmp_path / "webhook.cursor"
    path.write_bytes(damage(path.read_bytes()))
    with pytest.raises(StoreCorrupt, match=f"the cursor file {path} is damaged"):
        FileCursors(str(tmp_path)).load(CURSOR_NAME)


def test_a_cursor_file_that_is_a_named_pipe_is_refused_not_waited_on(tmp_path):
    """A named pipe in the cursor file's place made the start wait for ever
    for a writer (a plain open); it is damage, refused at once."""
    os.mkfifo(tmp_path / "webhook.cursor", 0o600)
    path = tmp_path / "webhook.cursor"
    with pytest.raises(StoreCorrupt, match=f"the cursor file {path} is damaged: not a regular"):
        FileCursors(str(tmp_path)).load(CURSOR_NAME)


def test_a_damaged_cursor_stops_the_start(tmp_path, rx):
    (tmp_path / "webhook.cursor").write_bytes(b"42\n")

    async def main():
        d = Deliverer(FakeEvents(asyncio.get_running_loop()), FileCursors(str(tmp_path)),
                      config_for(rx), FAST, asyncio.get_running_loop())
        await d.prepare()

    with pytest.raises(StartupError, match="^webhook: the cursor file .* is damaged"):
        asyncio.run(main())


def test_cursor_lines_round_trip():
    for value in (0, 1, 2 ** 63 - 1):
        assert parse_cursor("webhook", cursor_line("webhook", value)) == value


# --- the deliverer against a real receiver -----------------------------------------------

def test_events_arrive_signed_in_id_order_and_the_cursor_follows(rx, cursors):
    d = run_deliverer(with_events(30, key="order-1"), rx,
                      lambda d: d.cursor == 30, cursors=cursors)
    posts = rx.snapshot()
    assert posts and all(p.answered == 200 for p in posts)
    assert [i for p in posts for i in p.ids] == list(range(1, 31))
    for p in posts:
        assert p.valid(SECRET)
        assert p.headers["content-type"] == "application/json"
        assert p.headers["accman-event-ids"] == f"{p.ids[0]}-{p.ids[-1]}"
        assert p.target == "/hooks/accman?src=test"
        assert p.headers["host"] == f"127.0.0.1:{rx.port}"
        assert p.events == [ev(i, key="order-1")._asdict() for i in p.ids]
    assert cursors.load(CURSOR_NAME) == 30 and d.events == 30 and d.failures == 0


def test_a_signature_made_with_another_secret_does_not_match(rx, cursors):
    run_deliverer(with_events(3), rx, lambda d: d.cursor == 3, cursors=cursors)
    post = rx.snapshot()[0]
    assert post.valid(SECRET) and not post.valid(SECRET + b"x")
    assert post.headers["accman-signature"] == "sha256=" + hmac.new(
        SECRET, post.body, hashlib.sha256).hexdigest()


def test_events_that_come_later_are_delivered_as_they_come(rx, cursors):
    """The long poll: the deliverer waits for events, and sends each as it
    comes, not on a timer."""
    store_box = []

    def setup(loop):
        store_box.append(FakeEvents(loop))
        return store_box[0]

    def until(d):
        store = store_box[0]
        if len(store.events) < 5 and d.cursor == len(store.events) and store.waiters:
            store.add(1)
        return d.cursor == 5

    d = run_deliverer(setup, rx, until, cursors=cursors)
    assert [p.ids for p in rx.snapshot()] == [[1], [2], [3], [4], [5]]
    # Each read waits WEBHOOK_POLL_WAIT_S for the first event.
    assert {wait for _, _, wait in d.store.reads} == {FAST.webhook_poll_wait_s}


def test_a_failing_receiver_gets_the_same_batch_again_until_it_takes_it(rx, cursors):
    rx.mode = "fail"
    said = []

    def until(d):
        if d.failures >= 5:
            rx.mode = "ok"
        return d.cursor == 8

    d = run_deliverer(with_events(8), rx, until, cursors=cursors, said=said)
    posts = rx.snapshot()
    assert [p.answered for p in posts[:5]] == [500] * 5
    assert len({p.body for p in posts}) == 1 and posts[-1].answered == 200
    assert posts[0].ids == list(range(1, 9)) and all(p.valid(SECRET) for p in posts)
    assert d.failures >= 5 and d.failing == 0
    assert cursors.load(CURSOR_NAME) == 8
    # Said once when it starts failing, once when it works again: not per retry.
    assert len(said) == 2
    assert said[0].startswith(f"delivery to http://127.0.0.1:{rx.port} failed: the receiver "
                              f"answered 500; retrying")
    assert said[1].startswith(f"delivered to http://127.0.0.1:{rx.port} after")
    assert "hooks" not in " ".join(said) and "src=test" not in " ".join(said)


@pytest.mark.parametrize("status", [301, 302, 400, 401, 404, 410, 429, 503])
def test_any_status_but_2xx_is_a_failure_and_no_redirect_is_followed(rx, cursors, status):
    rx.mode = "fail"
    rx.fail_status = status

    def until(d):
        if d.failures >= 2:
            rx.mode = "ok"
        return d.cursor == 1

    run_deliverer(with_events(1), rx, until, cursors=cursors)
    posts = rx.snapshot()
    assert [p.answered for p in posts] == [status, status, 200]
    assert {p.target for p in posts} == {"/hooks/accman?src=test"}


def test_a_receiver_that_is_down_is_retried_until_it_is_back(rx, cursors):
    rx.down()
    said = []
    state = {"up": False}

    def until(d):
        if d.failures >= 4 and not state["up"]:
            rx.up()
            state["up"] = True
        return d.cursor == 6

    d = run_deliverer(with_events(6), rx, until, cursors=cursors, said=said)
    assert d.failures >= 4 and delivered_ids(rx) == list(range(1, 7))
    assert "connection refused" in said[0]


def test_an_attempt_without_a_reply_times_out_and_is_retried(rx, cursors):
    """WEBHOOK_ATTEMPT_TIMEOUT_S reached: the receiver reads the POST and
    never answers."""
    rx.mode = "hang"
    said = []
    limits = ServerLimits(webhook_backoff_base_s=0.01, webhook_backoff_cap_s=0.02,
                          webhook_attempt_timeout_s=0.2, webhook_poll_wait_s=1.0)

    def until(d):
        if d.failures >= 2:
            rx.mode = "ok"
        return d.cursor == 2

    run_deliverer(with_events(2), rx, until, cursors=cursors, said=said, limits=limits)
    posts = rx.snapshot()
    assert [p.answered for p in posts] == [None, None, 200]
    assert "no reply within 0.2 s" in said[0]


def deliver_to(serve, cursors, limits=FAST, said=None):
    """Runs a Deliverer with one event against `serve(reader, writer)`, an
    asyncio server of the test's own, until the event is acknowledged;
    returns the deliverer."""
    said = [] if said is None else said

    async def main():
        loop = asyncio.get_running_loop()
        server = await asyncio.start_server(serve, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        store = FakeEvents(loop)
        store.add(1)
        config = WebhookConfig(parse_url(f"http://127.0.0.1:{port}/"), SECRET, None)
        d = Deliverer(store, cursors, config, limits, loop, say=said.append)
        await d.prepare()
        d.start()
        said.pop(0)
        while d.cursor < 1:
            await asyncio.sleep(0.005)
        await d.stop()
        server.close()
        return d

    return asyncio.run(main())


def test_a_reply_head_over_webhook_reply_head_bytes_max_is_a_failure(tmp_path, cursors):
    """A receiver whose reply head never ends within the bound: a failed
    attempt, said naming the bound."""
    big = b"HTTP/1.1 200 OK\r\nX: " + b"a" * L.WEBHOOK_REPLY_HEAD_BYTES_MAX + b"\r\n\r\n"
    fits = b"HTTP/1.1 200 OK\r\nX: " + b"a" * (L.WEBHOOK_REPLY_HEAD_BYTES_MAX - 30) + b"\r\n\r\n"
    said, replies = [], [big, fits]

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(replies.pop(0) if replies else fits)
        await writer.drain()
        writer.close()

    d = deliver_to(serve, cursors, said=said)
    assert d.failures == 1 and len(said) == 2
    assert said[0].startswith("delivery to http://127.0.0.1:")
    assert said[0].endswith(" failed: the reply's head is over WEBHOOK_REPLY_HEAD_BYTES_MAX "
                            f"({L.WEBHOOK_REPLY_HEAD_BYTES_MAX} bytes); retrying with backoff")


HEAD_NOT_ENDED = "the reply's head did not end (a blank line) within 0.3 s"


@pytest.mark.parametrize("start,trickle,end,why", [
    (b"HTTP/1.1 200 OK\r\n", b"X-Slow: a\r\n", b"\r\n", HEAD_NOT_ENDED),
    (b"HTTP/1.1 200", b" ", b" OK\r\n\r\n", HEAD_NOT_ENDED),
    (b"HTTP/1.1 100 Continue\r\n\r\n", b"", b"HTTP/1.1 200 OK\r\n\r\n",
     "no final reply within 0.3 s, after an interim (1xx) one"),
])
def test_the_attempt_timeout_bounds_the_whole_reply_head(cursors, start, trickle, end, why):
    """WEBHOOK_ATTEMPT_TIMEOUT_S runs to the end of the reply's head, not to
    its status line: a receiver that sends "200 OK" at once and then
    trickles headers without ending them, or trickles its status line, has
    failed the attempt, said as a head that did not end; one that sends an
    interim 100 and then nothing, as a final reply that did not come."""
    limits = ServerLimits(webhook_backoff_base_s=0.01, webhook_backoff_cap_s=0.02,
                          webhook_attempt_timeout_s=0.3, webhook_poll_wait_s=1.0)
    said, trickles = [], [True]

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(start)
        if trickles.pop() if trickles else False:
            for _ in range(20):                     # 1 s of the head, never its end
                await asyncio.sleep(0.05)
                writer.write(trickle)
        writer.write(end)
        await writer.drain()
        writer.close()

    d = deliver_to(serve, cursors, limits=limits, said=said)
    # Said as what came: a head that did not end, not a receiver that
    # never answered (which is test_an_attempt_without_a_reply_...).
    assert d.failures == 1
    assert said[0].endswith(f" failed: {why}; retrying with backoff"), said[0]


def _replying_once(reply):
    """A receiver that answers its first POST with `reply`, the next ones
    200, and closes after each."""
    replies = [reply]

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        writer.write(replies.pop() if replies else b"HTTP/1.1 200 OK\r\n\r\n")
        await writer.drain()
        writer.close()
    return serve


@pytest.mark.parametrize("reply,why", [
    (b"", "the receiver closed the connection before its reply"),
    (b"HTTP/1.1 200 OK\n\n", "the receiver's reply ends its lines in a bare LF, not CRLF"),
    (b"HTTP/1.1 200 OK\r\n", "the receiver closed the connection before its reply's head "
                             "ended (a blank line)"),
])
def test_a_reply_cut_short_is_a_failure_said_as_what_came(cursors, reply, why):
    """A receiver that closes before its reply's head ends has failed the
    attempt; the reason says whether it sent nothing, or a head whose lines
    end in a bare LF (which RFC 9112 2.2 lets a recipient refuse), or a
    head cut short, so that an operator whose receiver logs a 200 is not
    told it never answered."""
    said = []
    d = deliver_to(_replying_once(reply), cursors, said=said)
    assert d.failures == 1
    assert said[0].endswith(f" failed: {why}; retrying with backoff"), said[0]


INTERIM = b"HTTP/1.1 102 Processing\r\n\r\n"


@pytest.mark.parametrize("reply,why", [
    (INTERIM * webhook_http.INTERIM_REPLIES_MAX + b"HTTP/1.1 200 OK\r\n\r\n", None),
    (INTERIM * (webhook_http.INTERIM_REPLIES_MAX + 1) + b"HTTP/1.1 200 OK\r\n\r\n",
     f"more than {webhook_http.INTERIM_REPLIES_MAX} interim (1xx) replies"),
    (b"HTTP/1.1 101 Switching Protocols\r\n\r\n", "the receiver switched protocols"),
    (b"HTTP/2 200\r\n\r\n", "the reply does not start with an HTTP/1.1 status line"),
])
def test_interim_replies_are_bounded_and_a_reply_of_no_http11_status_fails(cursors, reply, why):
    """Interim (1xx) replies before the final one are read up to
    INTERIM_REPLIES_MAX (a receiver has no reason to send any: no request
    says Expect); one more, a 101, or a reply whose status line is not
    HTTP/1.1's is a failed attempt, said as such (SERVER.md, Webhooks)."""
    said = []
    d = deliver_to(_replying_once(reply), cursors, said=said)
    if why is None:
        assert d.failures == 0 and said == [], said
    else:
        assert d.failures == 1
        assert said[0].endswith(f" failed: {why}; retrying with backoff"), said[0]


@pytest.mark.parametrize("reply", [b"HTTP/1.1 200 OK\nContent-Length: 0\n\n",
                                   b"HTTP/1.1 200 OK\r\nContent-Length: 0\n\n",
                                   b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 200 OK\n\n",
                                   b"HTTP/1.1 200 OK\r\nX: a\nY: b\r\n\r\n"])
def test_a_bare_lf_reply_on_a_connection_kept_open_is_said_at_once(cursors, reply):
    """A receiver whose reply's lines end in a bare LF (which RFC 9112 2.2
    lets a recipient refuse), and that keeps its connection open, is told
    so as soon as the LF comes: not said as "no reply" when the attempt's
    timeout ends.  A head that ends in CRLF but has a bare LF inside is
    refused as well, never half taken."""
    # An attempt's timeout far past the bound the test waits for, so that
    # a loaded machine cannot make the two meet.
    limits = ServerLimits(webhook_backoff_base_s=0.01, webhook_backoff_cap_s=0.02,
                          webhook_attempt_timeout_s=20.0, webhook_poll_wait_s=1.0)
    said, replies = [], [reply]

    async def serve(reader, writer):
        await reader.readuntil(b"\r\n\r\n")
        if replies:
            writer.write(replies.pop())
            await reader.read()                 # open until the deliverer closes
        else:
            writer.write(b"HTTP/1.1 200 OK\r\n\r\n")
        await writer.drain()
        writer.close()

    t0 = time.monotonic()
    d = deliver_to(serve, cursors, limits=limits, said=said)
    assert time.monotonic() - t0 < 10
    assert d.failures == 1
    assert said[0].endswith(" failed: the receiver's reply ends its lines in a bare LF, not "
                            "CRLF; retrying with backoff"), said[0]


def test_a_restart_resumes_after_the_last_acknowledged_batch(rx, cursors):
    """Stopped with a batch unacknowledged, started again on the same
    cursor: it sends that batch again (at least once), and never one before
    the last acknowledged."""
    limits = ServerLimits(webhook_events_per_post_max=5, webhook_backoff_base_s=0.01,
                          webhook_backoff_cap_s=0.05, webhook_poll_wait_s=1.0)

    rx.ok_left = 2
    first = run_deliverer(with_events(23), rx, lambda d: d.failures >= 1, cursors=cursors,
                          limits=limits)
    assert first.cursor == 10 and cursors.load(CURSOR_NAME) == 10
    rx.ok_left = None
    before = len(rx.snapshot())
    second = run_deliverer(with_events(23), rx, lambda d: d.cursor == 23,
                           cursors=FileCursors(cursors.directory), limits=limits)
    assert second.store.reads[0][:2] == (10, 5)
    again = rx.snapshot()[before:]
    assert [p.ids for p in again] == [[11, 12, 13, 14, 15], [16, 17, 18, 19, 20], [21, 22, 23]]
    assert delivered_ids(rx) == list(range(1, 24))


def stream_with_linger(rx, cursors, monkeypatch, limits, build_s=lambda _i: 0.0):
    """Runs the deliverer while one event comes per poll of the test's loop
    (~5 ms), 60 in all, until all are acknowledged.  Returns `(started,
    at_start, built)`, one of each per POST: the deliverer's `_posted_at`,
    from which it spaces the next POST, as the POST starts
    (webhook_http.post called: its connection opens next); the loop's time
    then; and the loop's time once the POST's bytes were made (post_bytes
    returned), which takes `build_s(i)` seconds more for the i-th."""
    box, started, at_start, built = [], [], [], []
    post, make = webhook_http.post, webhooks.post_bytes

    async def timed_post(target, request, **kw):
        started.append(box[1]._posted_at)
        at_start.append(asyncio.get_running_loop().time())
        return await post(target, request, **kw)

    def slow_bytes(*args):
        time.sleep(build_s(len(built)))
        out = make(*args)
        built.append(asyncio.get_running_loop().time())
        return out

    monkeypatch.setattr(webhook_http, "post", timed_post)
    monkeypatch.setattr(webhooks, "post_bytes", slow_bytes)

    def setup(loop):
        box.append(FakeEvents(loop))
        return box[0]

    def until(d):
        if len(box) == 1:
            box.append(d)           # before its first POST: start() ran no round yet
        if len(box[0].events) < 60:
            box[0].add(1)
        return d.cursor == 60

    run_deliverer(setup, rx, until, cursors=cursors, limits=limits)
    assert delivered_ids(rx) == list(range(1, 61))
    assert len(started) == len(built) == len(rx.snapshot())     # no POST was retried
    return started, at_start, built


def gaps(times):
    return [b - a for a, b in zip(times, times[1:], strict=False)]


def test_under_a_steady_stream_posts_leave_at_most_once_per_linger(rx, cursors, monkeypatch):
    """WEBHOOK_LINGER_S: an event every few milliseconds goes out in a few
    larger POSTs, spaced by the linger, not in one POST per event.  The
    spacing is read where the POSTs start, as the deliverer's clock had it
    when it spaced them: the receiver's arrival times add its own
    scheduling on a busy machine."""
    limits = ServerLimits(webhook_linger_s=0.05, webhook_poll_wait_s=1.0)
    started, at_start, _ = stream_with_linger(rx, cursors, monkeypatch, limits)
    assert min(gaps(started)) >= 0.05 - 0.001, gaps(started)    # the loop's timers
    # Where the POSTs really start, within a loop turn's lateness of a
    # busy machine: the spacing the deliverer keeps is the one they have
    # (their median: a stall of the test's process between the clock read
    # and the POST's start shortens one gap alone).
    assert statistics.median(gaps(at_start)) >= 0.05 - 0.01, gaps(at_start)
    posts = rx.snapshot()
    assert 2 <= len(posts) <= 15 and max(len(p.ids) for p in posts) >= 5


def test_the_linger_counts_from_when_a_post_starts_not_before_its_bytes(rx, cursors,
                                                                        monkeypatch):
    """Every other POST takes 30 ms to make (a large body signed on a busy
    machine): the next still waits the whole linger from when that POST
    started, since the linger is counted from after its bytes are made."""
    limits = ServerLimits(webhook_linger_s=0.05, webhook_poll_wait_s=1.0)
    started, at_start, built = stream_with_linger(
        rx, cursors, monkeypatch, limits, build_s=lambda i: 0.03 if i % 2 == 0 else 0.0)
    assert all(s >= b for s, b in zip(started, built, strict=True)), (started, built)
    assert min(gaps(started)) >= 0.05 - 0.001, gaps(started)
    # Where the POSTs really start: not 30 ms early after each slow one, as
    # when the linger was counted from before the bytes were made.  The
    # median of those gaps: a stall of the test's process between the
    # deliverer's clock read and the POST's start shortens one gap alone.
    after_slow = gaps(at_start)[0::2]
    assert statistics.median(after_slow) >= 0.05 - 0.01, after_slow


class SlowCursors(FileCursors):
    """FileCursors whose saves take `delay_s` (a slow disk), counted."""

    def __init__(self, directory, delay_s):
        super().__init__(directory)
        self.delay_s = delay_s
        self.saves = []

    async def save_cursor(self, name, value):
        await asyncio.sleep(self.delay_s)
        await super().save_cursor(name, value)
        self.saves.append(value)


def test_batches_go_on_while_the_cursor_is_saved_and_a_stop_saves_the_last(rx, tmp_path):
    cursors = SlowCursors(str(tmp_path), 0.2)
    limits = ServerLimits(webhook_events_per_post_max=5, webhook_poll_wait_s=1.0)
    d = run_deliverer(with_events(30), rx, lambda d: d.cursor == 30, cursors=cursors,
                      limits=limits)
    assert [len(p.ids) for p in rx.snapshot()] == [5] * 6
    # Six batches acknowledged within the first save: it was not waited for,
    # and the saves that followed took the newest acknowledged id.
    assert len(cursors.saves) < 6 and cursors.saves == sorted(cursors.saves)
    assert cursors.saves[-1] == 30 and d.saved == 30
    assert FileCursors(str(tmp_path)).load(CURSOR_NAME) == 30


def test_the_store_keeps_the_events_after_the_saved_cursor_never_the_acknowledged(rx,
                                                                                 tmp_path):
    """What the store may trim follows the cursor as saved (durable), not
    as acknowledged: a crash before a save resumes from the saved one."""
    cursors = SlowCursors(str(tmp_path), 0.2)
    limits = ServerLimits(webhook_events_per_post_max=5, webhook_poll_wait_s=1.0)
    d = run_deliverer(with_events(30), rx, lambda d: d.cursor == 30, cursors=cursors,
                      limits=limits)
    # Six batches were acknowledged within the first save; none of their
    # ids was given to the store before it was saved.
    assert d.store.kept[0] == 0                     # loaded (none yet: 0) before the start
    assert set(d.store.kept) <= {0} | set(cursors.saves)
    assert d.store.kept == sorted(d.store.kept) and d.store.kept[-1] == 30


def test_the_cursor_is_saved_at_most_once_per_interval_and_at_once_on_stop(rx, tmp_path):
    """WEBHOOK_CURSOR_SAVE_INTERVAL_S: a busy stream does not sync a cursor
    per POST; the stop saves the last one without waiting the interval."""
    cursors = SlowCursors(str(tmp_path), 0)
    limits = ServerLimits(webhook_events_per_post_max=5, webhook_poll_wait_s=1.0,
                          webhook_cursor_save_interval_s=30.0)
    started = time.monotonic()
    d = run_deliverer(with_events(40), rx, lambda d: d.cursor == 40, cursors=cursors,
                      limits=limits)
    assert time.monotonic() - started < 15, "the stop waited for the save interval"
    assert len(rx.snapshot()) == 8
    # The first start's save marks the webhook configured; none follows
    # within the interval; the stop saves the last acknowledged id at once.
    assert cursors.saves == [0, 40]
    assert d.saved == 40 == FileCursors(str(tmp_path)).load(CURSOR_NAME)


def test_a_stop_waits_for_a_stuck_cursor_save_at_most_one_attempt_timeout(rx, tmp_path):
    cursors = SlowCursors(str(tmp_path), 3600)
    limits = ServerLimits(webhook_attempt_timeout_s=0.2, webhook_poll_wait_s=1.0)
    said = []
    d = run_deliverer(with_events(3), rx, lambda d: d.cursor == 3, cursors=cursors,
                      limits=limits, said=said)
    assert d.saved == 0 and FileCursors(str(tmp_path)).load(CURSOR_NAME) is None
    assert said == ["the cursor could not be saved past event 0: the events after it are "
                    "sent again at the next start"]


def test_a_stop_ends_a_deliverer_whose_attempt_swallowed_the_cancel(rx, cursors, monkeypatch):
    """An attempt can turn a cancel into a failure: asyncio.wait_for
    before 3.12 did with a cancel that landed as its inner call failed (a
    connection refused just then).  The
    deliverer took it for a failed attempt and retried, and the stop (so
    the server's) waited for it for ever.  The first attempt here answers
    its cancel so; the stop still ends (STOP_RECANCEL_S)."""
    attempts = []

    async def post(*_args, **_kw):
        attempts.append(time.monotonic())
        try:
            await asyncio.sleep(3600)
        except asyncio.CancelledError:
            if len(attempts) > 1:
                raise
            raise ConnectionRefusedError(111, "Connection refused") from None
    monkeypatch.setattr(webhooks.webhook_http, "post", post)
    limits = ServerLimits(webhook_poll_wait_s=1.0, webhook_backoff_base_s=0.001,
                          webhook_backoff_cap_s=0.001)

    async def main():
        loop = asyncio.get_running_loop()
        d = Deliverer(with_events(3)(loop), cursors, config_for(rx), limits, loop,
                      say=lambda _line: None)
        await d.prepare()
        d.start()
        while not attempts:
            await asyncio.sleep(0.005)
        stopping = asyncio.ensure_future(d.stop())
        done, _ = await asyncio.wait({stopping}, timeout=2)
        if not done:
            stopping.cancel()               # the old way: cancelled from outside only
            await asyncio.wait({stopping})
        return bool(done), len(attempts)
    stopped, attempts_made = asyncio.run(main())
    assert stopped, "the stop still waited 2 s after its first cancel was swallowed"
    assert attempts_made == 2               # the first cancel swallowed, a second attempt
    assert rx.snapshot() == []


def test_webhook_events_per_post_max_bounds_a_post(rx, cursors):
    limits = ServerLimits(webhook_events_per_post_max=7, webhook_poll_wait_s=1.0)
    run_deliverer(with_events(20), rx, lambda d: d.cursor == 20, cursors=cursors,
                  limits=limits)
    assert [len(p.ids) for p in rx.snapshot()] == [7, 7, 6]


def test_webhook_events_per_post_max_by_default(rx, cursors):
    limits = ServerLimits(webhook_poll_wait_s=1.0)
    n = L.WEBHOOK_EVENTS_PER_POST_MAX
    d = run_deliverer(with_events(n + 10), rx, lambda d: d.cursor == n + 10, cursors=cursors,
                      limits=limits)
    assert [len(p.ids) for p in rx.snapshot()] == [n, 10]
    assert d.store.reads[0] == (0, n, 1.0)


def test_webhook_body_bytes_max_splits_a_batch(rx, cursors):
    one = len(event_json(ev(10)))
    limits = ServerLimits(webhook_body_bytes_max=one * 3 + 20, webhook_poll_wait_s=1.0)
    run_deliverer(with_events(10), rx, lambda d: d.cursor == 10, cursors=cursors,
                  limits=limits)
    posts = rx.snapshot()
    assert all(len(p.body) <= one * 3 + 20 for p in posts)
    assert [len(p.ids) for p in posts] == [3, 3, 3, 1]


@pytest.mark.parametrize("cursor,newest,first", [
    (3, 12, 9),     # 4..8 went past the retention before the receiver acknowledged them
    # A webhook configured at an earlier start whose receiver never
    # acknowledged anything (its cursor saved at 0): the same.
    (0, 8, 6)])
def test_events_trimmed_before_delivery_are_said_and_counted(rx, cursors, cursor, newest, first):
    cursors.save(CURSOR_NAME, cursor)

    def setup(loop):
        store = FakeEvents(loop)
        store.add(newest)
        store.first = first
        return store

    said = []
    d = run_deliverer(setup, rx, lambda d: d.cursor == newest, cursors=FileCursors(
        cursors.directory), said=said)
    lost = first - 1 - cursor
    assert delivered_ids(rx) == list(range(first, newest + 1)) and d.skipped == lost
    assert said == [f"events {cursor + 1} to {first - 1} were trimmed from the store (past its "
                    f"retention) before the receiver acknowledged them: {lost} events are not "
                    f"delivered; going on from event {first}"]


def test_a_cursor_past_the_store_s_newest_event_is_said_once_and_kept(rx, cursors):
    """A store older than its receiver's acknowledgements (restored from an
    older copy): the read past its end is answered at once, said once, and
    the cursor stays; the events after it are delivered as they come."""
    cursors.save(CURSOR_NAME, 9)

    def setup(loop):
        store = FakeEvents(loop)
        store.add(5)
        loop.call_later(0.3, store.add, 6)          # events 6 to 11
        return store

    said = []
    d = run_deliverer(setup, rx, lambda d: d.cursor == 11, cursors=FileCursors(
        cursors.directory), said=said)
    assert delivered_ids(rx) == [10, 11] and d.skipped == 0
    assert said == ["the receiver acknowledged events up to 9, past the store's newest event "
                    "(5): the store is older than its receiver (restored from an older copy?); "
                    "the events it makes with ids up to 9 are not delivered, and delivery goes "
                    "on after event 9"]
    assert len(d.store.reads) < 100                 # read again after a pause, not at once


def test_a_new_webhook_starts_from_the_oldest_event_kept(rx, cursors):
    """Events trimmed before the webhook was configured were never its
    receiver's: nothing said."""
    def setup(loop):
        store = FakeEvents(loop)
        store.add(6)
        store.first = 4
        return store

    said = []
    d = run_deliverer(setup, rx, lambda d: d.cursor == 6, cursors=cursors, said=said)
    assert delivered_ids(rx) == [4, 5, 6] and d.skipped == 0 and said == []


def test_a_new_webhook_is_saved_configured_before_its_receiver_acknowledges_any(rx, cursors):
    rx.mode = "fail"
    run_deliverer(with_events(4), rx, lambda d: d.failures >= 2, cursors=cursors)
    assert FileCursors(cursors.directory).load(CURSOR_NAME) == 0       # was None


def test_the_metrics_show_cursor_lag_and_failures(rx, cursors):
    rx.mode = "fail"
    d = run_deliverer(with_events(4), rx, lambda d: d.failures >= 3, cursors=cursors)
    m = Metrics()
    m.webhook = d
    text = m.render(open_connections=0, healthy=True, stats={"events_last": 9}).decode()
    lines = set(text.splitlines())
    assert "accman_webhook_cursor 0" in lines
    assert "accman_webhook_lag_events 9" in lines
    assert f"accman_webhook_failures_total {d.failures}" in lines
    assert f"accman_webhook_failing {d.failing}" in lines and d.failing >= 3
    assert "accman_events_written_total 9" in lines
    assert "# TYPE accman_events_written_total counter" in lines
    # Without the store's count, the lag is what the deliverer has read.
    assert "accman_webhook_lag_events 4" in m.render(
        open_connections=0, healthy=True, stats={}).decode().splitlines()


def test_the_cursor_s_help_says_a_save_s_own_time_adds_to_its_bound(rx, cursors):
    """SERVER.md: the cursor is saved at most once per
    WEBHOOK_CURSOR_SAVE_INTERVAL_S, and the save under way takes its own
    time (more on a slow disk): the help says so, not "within the
    interval" alone, and so does SERVER.md's table of metrics."""
    d = run_deliverer(with_events(1), rx, lambda d: d.cursor == 1, cursors=cursors)
    m = Metrics()
    m.webhook = d
    text = m.render(open_connections=0, healthy=True, stats={}).decode()
    (help_text,) = [line.removeprefix("# HELP accman_webhook_cursor ")
                    for line in text.splitlines()
                    if line.startswith("# HELP accman_webhook_cursor ")]
    saved = ("(saved durably within WEBHOOK_CURSOR_SAVE_INTERVAL_S plus the time a save takes: "
             "more while the disk is slow to take it)")
    assert help_text == f"The id of the last event the webhook's receiver acknowledged {saved}."
    (row,) = [line for line in (ROOT / "docs" / "SERVER.md").read_text().splitlines()
              if line.startswith("| `accman_webhook_cursor` |")]
    assert saved in row.replace("`", "")


# --- https ------------------------------------------------------------------------------

def self_signed(d, name, alt):
    """(cert, key): a self-signed certificate for `name` (its subjectAltName
    `alt`, such as "IP:127.0.0.1"), made with openssl in the directory `d`."""
    openssl = shutil.which("openssl")
    assert openssl, "the https tests need the openssl command (Debian: openssl)"
    subprocess.run([openssl, "req", "-x509", "-newkey", "ec", "-pkeyopt",
                    "ec_paramgen_curve:prime256v1", "-nodes", "-days", "2", "-subj",
                    f"/CN={name}", "-addext", f"subjectAltName={alt}",
                    "-keyout", str(d / "key.pem"), "-out", str(d / "cert.pem")],
                   check=True, capture_output=True)
    return d / "cert.pem", d / "key.pem"


@pytest.fixture(scope="module")
def tls_files(tmp_path_factory):
    """A self-signed certificate for 127.0.0.1."""
    return self_signed(tmp_path_factory.mktemp("tls"), "127.0.0.1", "IP:127.0.0.1")


def test_https_to_a_trusted_receiver(tls_files, cursors):
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    client_ctx = ssl.create_default_context(cafile=str(cert))
    with Receiver(SECRET, ssl_context=server_ctx) as rx:
        run_deliverer(with_events(5), rx, lambda d: d.cursor == 5, cursors=cursors,
                      ssl_context=client_ctx)
        assert delivered_ids(rx) == [1, 2, 3, 4, 5]
        assert all(p.valid(SECRET) for p in rx.snapshot())


async def attempt_said(url, timeout_s=0.3):
    """What one attempt at `url`, which fails, is said as."""
    try:
        await webhook_http.post(parse_url(url), b"POST", timeout_s=timeout_s,
                                head_bytes_max=8192, ssl_context=ssl.create_default_context())
    except Exception as e:
        return webhook_http.describe(e, timeout_s, 8192)
    raise AssertionError(f"the attempt at {url} did not fail")


def test_a_tls_handshake_never_answered_is_said_as_no_connection():
    """A receiver's port that takes the TCP connection and never answers
    the TLS handshake (a plain-HTTP port given an https URL, a stuck TLS
    proxy) fails the attempt at WEBHOOK_ATTEMPT_TIMEOUT_S, said as no
    connection: not as a receiver that never answered a POST it never
    got."""
    async def main():
        server = await asyncio.start_server(lambda r, w: r.read(), "127.0.0.1", 0)
        try:
            return await attempt_said(f"https://127.0.0.1:{server.sockets[0].getsockname()[1]}/")
        finally:
            server.close()

    assert asyncio.run(main()) == "no TLS connection within 0.3 s"


def test_a_connection_never_made_is_said_as_no_connection():
    """A host that drops the connection's packets fails a plain-HTTP
    attempt at WEBHOOK_ATTEMPT_TIMEOUT_S, said as no connection, not as no
    reply.  Here a port whose queue of connections not yet accepted is
    full: Linux drops the SYNs that come to it."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(0)
        port = listener.getsockname()[1]
        queued = [socket.socket() for _ in range(3)]
        try:
            for q in queued:
                q.setblocking(False)
                q.connect_ex(("127.0.0.1", port))
            time.sleep(0.05)
            assert asyncio.run(attempt_said(f"http://127.0.0.1:{port}/")) == \
                "no connection within 0.3 s"
        finally:
            for q in queued:
                q.close()


_POST_ONCE = """
import asyncio, ssl, sys
from accman.server import webhook_http
target = webhook_http.parse_url(sys.argv[1])
ctx = ssl.create_default_context(cafile=sys.argv[2])
head = webhook_http.request_head(target, 2, [])
print(asyncio.run(webhook_http.post(target, head + b"[]", timeout_s=5,
                                    head_bytes_max=8192, ssl_context=ctx)))
"""


def test_https_to_a_name_with_its_root_dot_checks_the_name_without_it(tmp_path):
    """A webhook URL whose host ends in the root's dot (`hooks.test.`, a
    fully qualified name) was given to TLS as it is: sent as the SNI name,
    which RFC 6066 3 says goes without the dot, and matched against the
    certificate, which names `hooks.test`, so that every delivery failed
    as "not trusted".  The name without the dot is what TLS is given."""
    d = tmp_path
    cert, key = self_signed(d, "hooks.test", "DNS:hooks.test")
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    names = []
    server_ctx.sni_callback = lambda sock, name, ctx: names.append(name)
    (d / "hosts").write_text("127.0.0.1 localhost hooks.test.\n")
    with Receiver(SECRET, ssl_context=server_ctx) as rx:
        url = f"https://hooks.test.:{rx.port}/hooks"
        out = subprocess.run(
            ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
             str(d / "hosts"), sys.executable, "-c", _POST_ONCE, url, str(cert)],
            capture_output=True, text=True, timeout=30, cwd=ROOT)
    assert out.returncode == 0 and out.stdout == "200\n", out.stderr
    assert names == ["hooks.test"]


def test_https_to_an_untrusted_certificate_fails_and_says_so(tls_files, cursors):
    cert, key = tls_files
    server_ctx = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    server_ctx.load_cert_chain(cert, key)
    said = []
    with Receiver(SECRET, ssl_context=server_ctx) as rx:
        d = run_deliverer(with_events(1), rx, lambda d: d.failures >= 2, cursors=cursors,
                          ssl_context=ssl.create_default_context(), said=said)
        assert d.cursor == 0 and rx.snapshot() == []
    assert "TLS certificate is not trusted" in said[0]
