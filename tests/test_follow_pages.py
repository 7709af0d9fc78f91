"""A follower of the event stream against pages of the SPEC's shape that
it cannot go past, yet that are no outage: an event of a type this client
does not know (a server newer than the client), and a page of more events
than the `limit` asked (SPEC "Routes").  And the other fields a client
cannot read: one the SPEC does not name is skipped (a newer server
may add one), one it names with another shape is a garbled reply, ridden
out (accman.calling.replies.events says why).

Through a real `accman events --follow` subprocess, the clients'
`events()` and `follow()` as a library, against tests/test_follow_order.py's
fake server, whose pages are scripted per `after`."""

from __future__ import annotations

import asyncio
import io
import json
import signal
import subprocess
import sys

import pytest

from accman.calling import follow as follow_mod
from accman.calling import replies
from accman.client import (AccManClient, AccManSyncClient, BadReply, EventsOutOfOrder,
                           EventsOverLimit, EventsPage, EventTypeUnknown, TransportError)
from accman.records import Event
from conftest import ROOT, server_env
from test_follow_order import (DEADLINE_S, RESUME, event, follow_to_its_end, page,
                               follow_for, raised_by_the_clients)
import test_follow_order


def page_of(events: list, nxt: int, **extra) -> bytes:
    """A 200 of these event objects, as given, and `extra` fields on the page."""
    body = json.dumps({"events": events, "next": nxt, **extra}).encode()
    return (b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n"
            b"Content-Length: %d\r\n\r\n%s" % (len(body), body))


# The fake servers' fixture, shared with test_follow_order.
streams = test_follow_order.streams


def newer(i: int, kind: str = "refund") -> dict:
    """An event of a type added after this client: it may carry fields of
    its own, and not the SPEC's."""
    return {"id": i, "type": kind, "refund": {"of": i - 1, "amount": 5}}


def unknown_words(i: int, kind: str) -> str:
    return (f'event {i} is of type "{kind}", which this client does not know: it is older '
            f"than the server's event stream; upgrade accman")


# --- an event of a type this client does not know ------------------------------------
NEWER = {
    "with the SPEC's fields": dict(event(4), type="refund"),
    "with fields of its own": newer(4),
}


@pytest.mark.parametrize("newer_event", NEWER, ids=list(NEWER))
def test_a_follower_ends_at_once_on_a_type_it_does_not_know(streams, newer_event):
    """A newer server's type is no outage to ride out (the same page comes
    again, and only upgrading mends it): the events before it, whole
    lines, then exit 1 and one line naming the event and its type and
    saying to upgrade, the page asked once."""
    s = streams({0: [page([1, 2], 2)],
                 2: [page_of([event(3), NEWER[newer_event], event(5)], 5)]})
    code, out, err = follow_to_its_end(s, "--limit", "3")
    assert code == 1, err
    assert out.endswith("\n") and [json.loads(line)["id"] for line in out.splitlines()] == [1, 2, 3]
    assert err.splitlines() == [
        f"accman: error: {unknown_words(4, 'refund')}; " + RESUME.format(3)]
    assert s.asked == [0, 2] and not s.strayed.is_set()


def test_one_page_with_a_type_it_does_not_know_is_said_as_such_once_asked(streams):
    """`accman events` without --follow: exit 1 and the line, not exit 3
    "no answer" after the client's retries."""
    s = streams({0: [page_of([event(1), newer(2, "low_balance_v2")], 2)] * 3})
    proc = subprocess.run([sys.executable, "-m", "accman", "events", "--url", s.url],
                          capture_output=True, text=True, timeout=DEADLINE_S, env=server_env(),
                          cwd=ROOT)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == f"accman: error: {unknown_words(2, 'low_balance_v2')}\n"
    assert s.asked == [0]


def test_the_clients_raise_it_at_once_with_the_events_before_it(streams):
    """AccManClient.events and AccManSyncClient.events: EventTypeUnknown,
    no TransportError, never retried (the same server sends the same
    page), naming the event and its type."""
    s = streams({3: [page_of([event(4), newer(5)], 5)] * 3})
    for e in raised_by_the_clients(s.url, EventTypeUnknown, 3):
        assert not isinstance(e, TransportError) and e.code == "event_type_unknown"
        assert e.detail == unknown_words(5, "refund")
        assert (e.id, e.type, [x.id for x in e.events]) == (5, "refund", [4])
    assert s.asked == [3, 3] and not s.strayed.is_set()


def test_follow_as_a_library_call_reads_extra_fields_and_ends_on_a_newer_type(streams,
                                                                               monkeypatch):
    """Fields the SPEC does not name (on the page, on an event) are
    skipped and the events written as ever; a type it does not know ends
    it, within no outage."""
    # A short outage window: were the page taken for no answer, the
    # follower would end within it, with another error, after notes.
    monkeypatch.setattr(follow_mod, "FOLLOW_OUTAGE_S_MAX", 0.5)
    monkeypatch.setattr(follow_mod, "FOLLOW_PAUSE_S", 0.02)
    # Each page scripted over and over: a follower that took one for no
    # answer ends within the window, never long-polls past the script.
    s = streams({0: [page_of([dict(event(1), region="eu"), event(2)], 2, server="3.0")] * 100,
                 2: [page_of([event(3), newer(4), newer(5)], 5)] * 100})
    out, notes = io.StringIO(), []
    with AccManSyncClient(s.url) as acc:
        end = follow_mod.follow(acc, 0, None, 1, out=out, note=notes.append)
    assert end.why == "error" and isinstance(end.error, EventTypeUnknown) and end.after == 3
    assert end.error.detail == unknown_words(4, "refund")
    assert [json.loads(line) for line in out.getvalue().splitlines()] == [event(1), event(2),
                                                                         event(3)]
    assert notes == [] and s.asked == [0, 2] and not s.strayed.is_set()
    assert signal.getsignal(signal.SIGALRM) == signal.SIG_DFL       # put back


# --- the decoder's cases --------------------------------------------------------------
def decode(after: int, events: list, nxt: int, **extra) -> EventsPage:
    body = json.dumps({"events": events, "next": nxt, **extra}).encode()
    return replies.events(after)(200, body)


@pytest.mark.parametrize("events,nxt,before", [
    ([newer(7)], 7, []),
    ([event(7), event(8), newer(9), event(10)], 10, [7, 8]),
    ([event(7), {"id": 8, "type": "refund"}], 8, [7]),          # none of the SPEC's fields
])
def test_a_type_it_does_not_know_ends_the_page_with_the_events_before_it(events, nxt, before):
    with pytest.raises(EventTypeUnknown) as info:
        decode(6, events, nxt)
    assert [e.id for e in info.value.events] == before and info.value.type == "refund"


@pytest.mark.parametrize("events,words", [
    ([event(7), newer(9)], "event 9 came after event 7, where 8 was due"),
    ([event(8), newer(9)], "event 8 came after event 6, where 7 was due"),
])
def test_the_order_is_checked_up_to_and_with_the_unknown_event(events, words):
    """Its id is read, and its place in the order checked: a break before
    it, or at it, is the stream's broken order."""
    with pytest.raises(EventsOutOfOrder) as info:
        decode(6, events, 9)
    assert info.value.detail.startswith(words)


@pytest.mark.parametrize("events", [
    [{"id": "7", "type": "refund"}],                # its id not of the SPEC's shape
    [{"id": 0, "type": "refund"}],
    [{"type": "refund"}],
    [newer(7), dict(event(8), by="5")],             # a garbled event after it
    [dict(event(7), type=["mod"])],                 # a type that is not a string
])
def test_a_field_the_spec_names_of_another_shape_is_still_a_bad_reply(events):
    with pytest.raises(BadReply):
        decode(6, events, 8)


def test_the_type_is_quoted_short_and_printable():
    """However long the type, and whatever it holds, the detail keeps its
    advice whole (the clients cut details at DETAIL_CHARS_MAX)."""
    kind = 'a"b\\c\n\x00' + "é" * 1000
    after = 2 ** 63 - 2
    with pytest.raises(EventTypeUnknown) as info:
        decode(after, [newer(after + 1, kind)], after + 1)
    shown = 'a?b?c??' + "?" * (replies.TYPE_CHARS_SHOWN - 7)
    assert info.value.detail == unknown_words(after + 1, shown).replace(f'"{shown}"',
                                                                        f'"{shown}"...')
    assert len(info.value.detail) <= replies.DETAIL_CHARS_MAX and info.value.type == kind


def test_fields_the_spec_does_not_name_are_skipped():
    plain = decode(6, [event(7), event(8)], 8)
    assert decode(6, [dict(event(7), region="eu", v=[1]), event(8)], 8, cursor="x") == plain
    assert plain == EventsPage([Event(**event(7)), Event(**event(8))], 8)


# --- the other fields, through the follower and the clients ---------------------------
def test_a_follower_reads_fields_the_spec_does_not_name_as_ever(streams):
    s = streams({0: [page_of([dict(event(1), region="eu"), event(2)], 2, server="3.0")]})
    code, lines, err = follow_for(s, 2)
    assert code == 0 and lines == [event(1), event(2)]
    assert "no answer" not in err and "error" not in err


def test_the_clients_read_fields_the_spec_does_not_name_as_ever(streams):
    s = streams({0: [page_of([dict(event(1), region="eu"), event(2)], 2, server="3.0")] * 2})
    with AccManSyncClient(s.url, retries=0) as acc:
        got = acc.events(0)

    async def call():
        async with AccManClient(s.url, retries=0) as acc:
            return await acc.events(0, wait_s=1)
    assert got == asyncio.run(call()) == EventsPage([Event(**event(1)), Event(**event(2))], 2)
    assert s.asked == [0, 0]


def test_a_field_the_spec_names_of_another_shape_is_ridden_out_as_before(streams):
    """Not a newer server's (the SPEC fixes that field's shape): a reply the
    follower cannot take for AccMan's word, an outage, said and asked
    again, and the clients retry it."""
    bad = page_of([dict(event(1), by="5")], 1)
    s = streams({0: [bad] * 3 + [page([1, 2], 2)]})
    code, lines, err = follow_for(s, 2)
    assert code == 0 and [line["id"] for line in lines] == [1, 2]
    assert "no answer (" in err and "trying again in 1 s" in err
    s = streams({0: [bad] * 3})
    with AccManSyncClient(s.url, retries=2) as acc:
        with pytest.raises(BadReply):
            acc.events(0)
    assert s.asked == [0, 0, 0]


# --- a page of more events than asked -------------------------------------------------
LIMIT_RULE = '; a page holds at most the limit asked, 100 when none is (SPEC "Routes")'

# (the flags, the pages, the ids written, what the error says)
OVER = {
    "--limit 2": (["--limit", "2"], {0: [page([1, 2], 2)], 2: [page([3, 4, 5], 5)]},
                  [1, 2, 3, 4], "a page of 3 events came where limit 2 was asked"),
    "no --limit": ([], {0: [page(range(1, 102), 101)]}, list(range(1, 101)),
                   "a page of 101 events came where limit 100 was asked"),
}


@pytest.mark.parametrize("over", OVER, ids=list(OVER))
def test_a_follower_ends_at_once_on_a_page_longer_than_asked(streams, over):
    """A page longer than asked is neither written whole nor followed on:
    its first `limit` events, whole lines, then exit 1 and a line naming
    the count and the limit, the page asked once."""
    flags, script, written, words = OVER[over]
    s = streams(script)
    code, out, err = follow_to_its_end(s, *flags)
    assert code == 1, err
    assert out.endswith("\n") and [json.loads(line)["id"] for line in out.splitlines()] == written
    assert err.splitlines() == [
        f"accman: error: the event stream broke its page size: {words}{LIMIT_RULE}; "
        + RESUME.format(written[-1])]
    assert s.asked == sorted(script) and not s.strayed.is_set()


def test_one_page_longer_than_asked_is_said_as_such_once_asked(streams):
    s = streams({0: [page([1, 2, 3], 3)] * 3})
    proc = subprocess.run([sys.executable, "-m", "accman", "events", "--limit", "2", "--url",
                           s.url], capture_output=True, text=True, timeout=DEADLINE_S,
                          env=server_env(), cwd=ROOT)
    assert (proc.returncode, proc.stdout) == (1, "")
    assert proc.stderr == ("accman: error: the event stream broke its page size: a page of 3 "
                           f"events came where limit 2 was asked{LIMIT_RULE}\n")
    assert s.asked == [0]


def test_the_clients_raise_it_at_once_with_the_first_limit_events(streams):
    """EventsOverLimit, no TransportError, never retried; a page of
    exactly `limit` events is read."""
    s = streams({3: [page([4, 5, 6], 6)] * 4, 0: [page(range(1, 102), 101)]})
    with AccManSyncClient(s.url, retries=2) as acc:
        assert [e.id for e in acc.events(3, limit=3).events] == [4, 5, 6]
        with pytest.raises(EventsOverLimit) as default_error:
            acc.events(0)
    for e in raised_by_the_clients(s.url, EventsOverLimit, 3, limit=2):
        assert not isinstance(e, TransportError) and e.code == "events_over_limit"
        assert e.detail == f"a page of 3 events came where limit 2 was asked{LIMIT_RULE}"
        assert [x.id for x in e.events] == [4, 5]
    assert [x.id for x in default_error.value.events] == list(range(1, 101))
    assert s.asked == [3, 0, 3, 3] and not s.strayed.is_set()


def test_follow_as_a_library_call_ends_on_a_page_longer_than_asked(streams, monkeypatch):
    monkeypatch.setattr(follow_mod, "FOLLOW_OUTAGE_S_MAX", 0.5)
    monkeypatch.setattr(follow_mod, "FOLLOW_PAUSE_S", 0.02)
    # A follower that went on past the page would meet a stream gone
    # back after it, and end there, not long-poll past the script.
    s = streams({0: [page([1, 2], 2)] * 100, 2: [page([3, 4, 5], 5)] * 100, 5: [page([], 1)]})
    out, notes = io.StringIO(), []
    with AccManSyncClient(s.url) as acc:
        end = follow_mod.follow(acc, 0, 2, 1, out=out, note=notes.append)
    assert end.why == "error" and isinstance(end.error, EventsOverLimit) and end.after == 4
    assert [json.loads(line)["id"] for line in out.getvalue().splitlines()] == [1, 2, 3, 4]
    assert notes == [] and s.asked == [0, 2] and not s.strayed.is_set()


@pytest.mark.parametrize("events,error,before", [
    ([event(7), event(9), event(10)], EventsOutOfOrder, [7]),      # a break within the limit
    ([event(7), newer(8), event(9)], EventTypeUnknown, [7]),       # a newer type within it
    ([event(7), event(8), newer(9)], EventsOverLimit, [7, 8]),     # past it: the size first
    ([event(7), event(8), event(10)], EventsOverLimit, [7, 8]),
])
def test_the_first_fault_in_the_page_s_order_is_the_one_raised(events, error, before):
    with pytest.raises(error) as info:
        replies.events(6, 2)(200, json.dumps({"events": events, "next": 10}).encode())
    assert [e.id for e in info.value.events] == before
