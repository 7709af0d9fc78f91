"""A follower of the event stream against a server that breaks its order
(SPEC "Events": ids grow by one, with no gaps, across restarts): a real
`accman events --follow` subprocess, and the importable clients, against
a small fake HTTP server written here, whose pages are scripted per
`after` (a real AccMan cannot be made to break its order).

A broken promise ends the follower at once with exit 1 and a line naming
the ids, after the events before the break; a reply that is not AccMan's
word (garbled, cut) is an outage, ridden out (accman.calling.follow)."""

from __future__ import annotations

import asyncio
import io
import json
import select
import signal
import socket
import subprocess
import sys
import threading
import time

import pytest

from accman.calling import client as client_mod
from accman.calling import follow as follow_mod
from accman.client import AccManClient, AccManSyncClient
from accman.errors import EventsOutOfOrder, TransportError
from conftest import ROOT, server_env
from test_calling_layout import python_samples

ACCOUNT = "0f" * 16
# Long enough for a loaded machine to start a Python process and follow
# a few pages; the tests wait for conditions, this is only their bound.
DEADLINE_S = 60.0


def event(i: int) -> dict:
    return {"id": i, "type": "mod", "account": ACCOUNT, "seq": i, "by": i, "tot": i,
            "at": 1_700_000_000_000 + i, "key": None, "hold": None}


def page(ids, nxt) -> bytes:
    body = json.dumps({"events": [event(i) for i in ids], "next": nxt}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


class Stream:
    """GET /events over real sockets: each `after` is answered with the
    next of its scripted replies (bytes, or `("close", bytes)`: those
    bytes, then the connection closed).  A request beyond the script (an `after` it does
    not name, or one asked more often than it has replies for) sets
    `strayed` and is answered as a long poll with nothing new: the
    follower went on where it should have ended, or asked again."""

    def __init__(self, script: dict):
        self.script = {after: list(replies) for after, replies in script.items()}
        self.asked = []                 # the `after` of every request, in order
        self.strayed = threading.Event()
        self.closing = threading.Event()
        self.listener = socket.create_server(("127.0.0.1", 0))
        self.url = f"http://127.0.0.1:{self.listener.getsockname()[1]}"
        threading.Thread(target=self._accept, daemon=True).start()

    def _accept(self) -> None:
        while True:
            try:
                conn, _ = self.listener.accept()
            except OSError:
                return
            threading.Thread(target=self._serve, args=(conn,), daemon=True).start()

    def _serve(self, conn) -> None:
        with conn:
            buf = b""
            while True:
                while b"\r\n\r\n" not in buf:
                    chunk = conn.recv(65536)
                    if not chunk:
                        return
                    buf += chunk
                head, _, buf = buf.partition(b"\r\n\r\n")
                target = head.split(b" ")[1].decode()
                params = dict(p.split("=") for p in target.partition("?")[2].split("&"))
                after = int(params["after"])
                self.asked.append(after)
                replies = self.script.get(after)
                if not replies:
                    self.strayed.set()
                    self.closing.wait(int(params.get("wait", "0")))
                    conn.sendall(page([], after))
                    continue
                reply = replies.pop(0)
                if isinstance(reply, tuple):
                    conn.sendall(reply[1])
                    return
                conn.sendall(reply)

    def close(self) -> None:
        self.closing.set()
        self.listener.close()


@pytest.fixture
def streams():
    made = []

    def make(script):
        s = Stream(script)
        made.append(s)
        return s
    yield make
    for s in made:
        s.close()


def follow_to_its_end(stream: Stream, *args) -> tuple:
    """`accman events --follow` until it ends by itself: `(exit code,
    stdout, stderr)`.  One that rides the reply out instead ("trying
    again" on stderr), or goes on asking past it (`stream.strayed`), is
    stopped there, failing the test."""
    proc = subprocess.Popen([sys.executable, "-m", "accman", "events", "--follow", "--wait", "1",
                             "--url", stream.url, *args], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=server_env(), cwd=ROOT)
    err = b""
    deadline = time.monotonic() + DEADLINE_S
    try:
        while True:
            assert time.monotonic() < deadline, f"the follower did not end: {err!r}"
            assert not stream.strayed.is_set(), f"asked on past the break: {stream.asked}"
            if select.select([proc.stderr], [], [], 0.1)[0]:
                chunk = proc.stderr.read1(65536)
                err += chunk
                assert b"trying again" not in err, f"ridden out as an outage: {err!r}"
                if not chunk:
                    break
        out, rest = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, out.decode(), (err + rest).decode()


RESUME = ("events written up to id {0} (not necessarily read); to resume: accman events "
          "--follow --after {0}, or --after the last id the reader handled")
RULE = '; ids grow by one, with no gaps or repeats (SPEC "Events")'

# (the broken reply to after=2, the ids written, what the error says)
BROKEN = {
    "a gap": (page([3, 5, 6], 6), [1, 2, 3], "event 5 came after event 3, where 4 was due"),
    "a repeat": (page([3, 3], 3), [1, 2, 3], "event 3 came after event 3, where 4 was due"),
    "out of place": (page([4, 3], 4), [1, 2], "event 4 came after event 2, where 3 was due"),
    "an old event": (page([1, 2, 3], 3), [1, 2], "event 1 came after event 2, where 3 was due"),
    "next past its last": (page([3, 4], 9), [1, 2, 3, 4],
                           "a page ending with event 4 gave next 9, not 4"),
    "next before its last": (page([3, 4], 3), [1, 2, 3, 4],
                             "a page ending with event 4 gave next 3, not 4"),
    "next that skips": (page([], 5), [1, 2],
                        "a page of no events after event 2 gave next 5, skipping events 3 to 5"),
    "the stream gone back": (page([], 1), [1, 2],
                             "the stream went back from event 2 to event 1: ids up to 2 would "
                             "come again, for other events (a store restored from an older "
                             "copy?)"),
}


@pytest.mark.parametrize("broken", BROKEN, ids=list(BROKEN))
def test_a_follower_ends_at_once_naming_the_broken_order(streams, broken):
    """A page that breaks the order is no outage to ride out, and a `next`
    that goes back is not followed (ids already written would come
    again): the events before the break, whole lines, then exit 1 and a
    line naming the ids, the broken page asked once and nothing after it."""
    reply, written, words = BROKEN[broken]
    s = streams({0: [page([1, 2], 2)], 2: [reply]})
    code, out, err = follow_to_its_end(s, "--limit", "2")
    assert code == 1, err
    assert out.endswith("\n") and [json.loads(line)["id"] for line in out.splitlines()] == written
    assert err.splitlines() == [
        f"accman: error: the event stream broke its order: {words}{RULE}; "
        + RESUME.format(written[-1])]
    assert s.asked == [0, 2] and not s.strayed.is_set()


def test_an_after_past_the_end_is_followed_and_a_later_step_back_ends_it(streams):
    """The first reply may put `next` before the `--after` given (a store
    restored from an older copy: said, and followed); once the follower
    has reached an id from the stream, a step back is a broken promise."""
    s = streams({9: [page([], 1)], 1: [page([2], 2)], 2: [page([], 1)]})
    code, out, err = follow_to_its_end(s, "--after", "9")
    assert code == 1
    assert [json.loads(line)["id"] for line in out.splitlines()] == [2]
    assert err.splitlines()[0] == ("accman: events: event 9 is past the stream's end (the "
                                   "newest is 1): following from event 1")
    assert "the stream went back from event 2 to event 1" in err.splitlines()[1]
    assert s.asked == [9, 1, 2] and not s.strayed.is_set()


def test_one_page_out_of_order_is_said_as_such_once_asked(streams):
    """`accman events` without --follow: exit 1 naming the ids, not exit 3
    "no answer" after the client's retries."""
    s = streams({0: [page([1, 3], 3)] * 3})        # the same, were it asked again
    proc = subprocess.run([sys.executable, "-m", "accman", "events", "--url", s.url],
                          capture_output=True, text=True, timeout=DEADLINE_S, env=server_env(),
                          cwd=ROOT)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == ("accman: error: the event stream broke its order: event 3 came "
                           f"after event 1, where 2 was due{RULE}\n")
    assert s.asked == [0]


GARBLED = {
    "no Content-Length": b"HTTP/1.1 200 OK\r\n\r\n{}",
    "not JSON": b"HTTP/1.1 200 OK\r\nContent-Length: 6\r\n\r\n<html>",
    "cut mid-reply": page([1, 2], 2)[:-20],
}


@pytest.mark.parametrize("garbled", GARBLED, ids=list(GARBLED))
def test_a_garbled_or_cut_reply_is_ridden_out_as_an_outage(streams, garbled):
    """Not AccMan's word on its stream (a restart mid-reply, something
    else answering): said on stderr, asked again, and the follower goes
    on with the events once the reply is whole."""
    bad = GARBLED[garbled]
    # Each closes its connection, as a client does after a BadReply; the
    # client's own retries (RETRIES_DEFAULT) come first, then the follower's.
    s = streams({0: [("close", bad)] * 3 + [page([1, 2], 2)]})
    code, lines, err = follow_for(s, 2)
    assert [line["id"] for line in lines] == [1, 2] and code == 0
    assert "no answer (" in err and "trying again in 1 s" in err


def follow_for(stream: Stream, lines: int) -> tuple:
    """`accman events --follow` until it has written `lines` lines, then
    SIGINT: `(exit code, the lines as objects, stderr)`."""
    proc = subprocess.Popen([sys.executable, "-m", "accman", "events", "--follow", "--wait", "1",
                             "--url", stream.url], stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, env=server_env(), cwd=ROOT)
    try:
        out = b""
        deadline = time.monotonic() + DEADLINE_S
        while out.count(b"\n") < lines:
            assert time.monotonic() < deadline, f"not all lines written: {out!r}"
            if select.select([proc.stdout], [], [], 0.1)[0]:
                chunk = proc.stdout.read1(65536)
                assert chunk, "the follower ended"
                out += chunk
        proc.send_signal(signal.SIGINT)
        rest, err = proc.communicate(timeout=DEADLINE_S)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.communicate()
    return proc.returncode, [json.loads(line) for line in (out + rest).splitlines()], err.decode()

# --- the importable followers -------------------------------------------------------
def raised_by_the_clients(url, kind, after, **kw) -> list:
    """The `kind` errors that AccManSyncClient.events(after, **kw) and
    AccManClient.events(after, wait_s=1, **kw) raise, each with 2
    retries: [the sync client's, the async client's]."""
    with AccManSyncClient(url, retries=2) as acc:
        with pytest.raises(kind) as sync_error:
            acc.events(after, **kw)

    async def call():
        async with AccManClient(url, retries=2) as acc:
            with pytest.raises(kind) as async_error:
                await acc.events(after, wait_s=1, **kw)
            return async_error
    return [sync_error.value, asyncio.run(call()).value]


def test_the_clients_raise_it_at_once_with_the_events_before_the_break(streams):
    """AccManClient.events and AccManSyncClient.events: EventsOutOfOrder,
    no TransportError, never retried (the same store says the same), with
    the events that came in order."""
    s = streams({3: [page([4, 5, 7], 7)] * 3})
    for e in raised_by_the_clients(s.url, EventsOutOfOrder, 3):
        assert not isinstance(e, TransportError) and e.code == "events_out_of_order"
        assert e.detail == f"event 7 came after event 5, where 6 was due{RULE}"
        assert [x.id for x in e.events] == [4, 5]
    assert s.asked == [3, 3] and not s.strayed.is_set()


def test_follow_as_a_library_call_ends_with_it_and_writes_what_came_before(streams,
                                                                            monkeypatch):
    # A short outage window: were the page taken for no answer, the
    # follower would end within it, with another error, after notes.
    monkeypatch.setattr(follow_mod, "FOLLOW_OUTAGE_S_MAX", 0.5)
    monkeypatch.setattr(follow_mod, "FOLLOW_PAUSE_S", 0.02)
    s = streams({0: [page([1, 2], 2)], 2: [page([3, 4, 4], 4)] * 100})
    out, notes = io.StringIO(), []
    with AccManSyncClient(s.url) as acc:
        end = follow_mod.follow(acc, 0, None, 1, out=out, note=notes.append)
    assert end.why == "error" and isinstance(end.error, EventsOutOfOrder) and end.after == 4
    assert "event 4 came after event 4" in end.error.detail
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == [1, 2, 3, 4]
    assert notes == [] and s.asked == [0, 2] and not s.strayed.is_set()
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL       # put back


# AccMan's own 503 (its store cannot commit, or it is stopping), the same
# to each of the client's retries of a read.
STOPPING = (b'HTTP/1.1 503 Service Unavailable\r\nContent-Type: application/json\r\n'
            b'Content-Length: 57\r\n\r\n{"error":"unavailable","detail":"the server is stopping"}')


def test_the_calling_docs_follower_rides_out_accman_s_own_503(streams):
    """docs/CALLING.md's follower, run as written: AccMan's 503, which the
    client's retries meet each time, is an outage to ask again after, as
    the CLI's follower takes it; a page out of order ends it."""
    (sample,) = [s for s in python_samples("docs/CALLING.md") if "async def follow(acc)" in s]
    handled, saved = [], []
    names = {n: getattr(client_mod, n) for n in client_mod.__all__}
    names.update(asyncio=asyncio, load_cursor=lambda: 0, handle=handled.append,
                 save_cursor=saved.append)
    exec(compile(sample, "docs/CALLING.md's follower", "exec"), names)
    s = streams({0: [STOPPING] * 3 + [page([1, 2], 2)], 2: [page([4], 4)]})

    async def main():
        async with AccManClient(s.url) as acc:
            with pytest.raises(EventsOutOfOrder):
                await asyncio.wait_for(names["follow"](acc), DEADLINE_S)
    asyncio.run(main())
    assert [e.id for e in handled] == [1, 2] and saved == [2]
    assert s.asked == [0, 0, 0, 0, 2] and not s.strayed.is_set()
