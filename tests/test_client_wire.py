"""The calling side's I/O-free core: the reply parser
(accman.calling.parser), the reply decoders (accman.calling.replies) and
the checks of a call's values before anything is sent
(accman.calling.requests).  Every parser case is run whole and one byte at
a time (h11's habit)."""

from __future__ import annotations

import json
import pickle
import re

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accman.calling import parser as parser_mod
from accman.calling import replies
from accman.client import (AccManClient, AccManSyncClient, BadReply, Entry, Forbidden,
                           NotApplied, OutcomeUnknown, PastPage, ReplyParser, ShuttingDown,
                           Unauthorized, UnexpectedReply)
from accman.errors import (BadRequest, Busy, EventsOutOfOrder, EventsTrimmed, HoldEnded,
                           Insufficient, KeyReused, NoAccount, NoHold, Overflow, TooManyHolds,
                           TransportError, Unavailable)
from accman.records import Event
from accman.calling.policy import TIMEOUT_S_MAX
from accman.limits import EVENTS_WAIT_S_MAX, INT64_MAX, INT64_MIN
from fake_accman import run


# --- the reply parser -------------------------------------------------------
OK = b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\nContent-Length: 10\r\n\r\n{\"tot\": 5}"


def feed_whole(data: bytes):
    return ReplyParser().feed(data)


def feed_bytewise(data: bytes):
    p, out = ReplyParser(), []
    for i in range(len(data)):
        out += p.feed(data[i:i + 1])
    return out


@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise])
def test_parser_reads_a_reply_whole_and_byte_by_byte(feed):
    assert feed(OK) == [(200, b'{"tot": 5}', False)]
    assert feed(OK + OK) == [(200, b'{"tot": 5}', False)] * 2


def test_parser_keeps_trailing_bytes_for_the_next_reply():
    p = ReplyParser()
    assert p.feed(OK + OK[:20]) == [(200, b'{"tot": 5}', False)]
    assert p.pending
    assert p.feed(OK[20:]) == [(200, b'{"tot": 5}', False)]
    assert not p.pending


@pytest.mark.parametrize("head,close", [
    (b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n", True),
    (b"HTTP/1.1 200 OK\r\nConnection: keep-alive, Close\r\nContent-Length: 0\r\n\r\n", True),
    (b"HTTP/1.0 200 OK\r\nContent-Length: 0\r\n\r\n", True),
    (b"HTTP/1.0 200 OK\r\nConnection: keep-alive\r\nContent-Length: 0\r\n\r\n", False),
    (b"HTTP/1.1 200\r\nContent-Length: 0\r\n\r\n", False),
    (b"HTTP/1.1 503 Service Unavailable\r\ncontent-length:   0  \r\n\r\n", False),
])
def test_parser_reads_connection_options(head, close):
    assert ReplyParser().feed(head)[0][2] is close


def test_parser_refuses_bytes_after_a_closing_reply():
    closing = b"HTTP/1.1 200 OK\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    with pytest.raises(BadReply):
        ReplyParser().feed(closing + OK)
    p = ReplyParser()
    p.feed(closing)
    with pytest.raises(BadReply):
        p.feed(b"x")


BAD_REPLIES = {
    "no content-length": b"HTTP/1.1 200 OK\r\nContent-Type: application/json\r\n\r\n",
    "two content-lengths": b"HTTP/1.1 200 OK\r\nContent-Length: 0\r\nContent-Length: 0\r\n\r\n",
    "signed content-length": b"HTTP/1.1 200 OK\r\nContent-Length: +1\r\n\r\nx",
    "chunked": b"HTTP/1.1 200 OK\r\nTransfer-Encoding: chunked\r\nContent-Length: 0\r\n\r\n",
    "obs-fold": b"HTTP/1.1 200 OK\r\nX-A: a\r\n b\r\nContent-Length: 0\r\n\r\n",
    "bare CR": b"HTTP/1.1 200 OK\r\nX-A: a\rb\r\nContent-Length: 0\r\n\r\n",
    "bare LF": b"HTTP/1.1 200 OK\nContent-Length: 0\r\n\r\n",
    "1xx": b"HTTP/1.1 100 Continue\r\n\r\n",
    "HTTP/2": b"HTTP/2 200 OK\r\nContent-Length: 0\r\n\r\n",
    "space before colon": b"HTTP/1.1 200 OK\r\nContent-Length : 0\r\n\r\n",
    "no status": b"HTTP/1.1 OK\r\nContent-Length: 0\r\n\r\n",
    "garbage": b"<html>hello</html>\r\n\r\n",
}


@pytest.mark.parametrize("name", sorted(BAD_REPLIES))
@pytest.mark.parametrize("feed", [feed_whole, feed_bytewise])
def test_parser_refuses_what_the_server_never_sends(name, feed):
    with pytest.raises(BadReply):
        feed(BAD_REPLIES[name])


def test_parser_bounds_are_reached():
    # REPLY_HEAD_BYTES_MAX: an endless head is refused without waiting for its end.
    with pytest.raises(BadReply, match="REPLY_HEAD_BYTES_MAX"):
        ReplyParser().feed(b"HTTP/1.1 200 OK\r\nX: " + b"a" * parser_mod.REPLY_HEAD_BYTES_MAX)
    many = b"".join(b"X-%d: a\r\n" % i for i in range(parser_mod.REPLY_HEADERS_MAX + 1))
    with pytest.raises(BadReply, match="REPLY_HEADERS_MAX"):
        ReplyParser().feed(b"HTTP/1.1 200 OK\r\n" + many + b"Content-Length: 0\r\n\r\n")
    big = parser_mod.REPLY_BODY_BYTES_MAX + 1
    with pytest.raises(BadReply, match="REPLY_BODY_BYTES_MAX"):
        ReplyParser().feed(b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % big)
    fits = b"HTTP/1.1 200 OK\r\nContent-Length: %d\r\n\r\n" % parser_mod.REPLY_BODY_BYTES_MAX
    assert ReplyParser().feed(fits) == []          # accepted, waiting for the body


def test_parsed_heads_are_cached_within_head_cache_max():
    for n in range(parser_mod.HEAD_CACHE_MAX * 2):
        reply = b"HTTP/1.1 200 OK\r\nX-N: %d\r\nContent-Length: 0\r\n\r\n" % n
        assert ReplyParser().feed(reply) == [(200, b"", False)]
        assert len(parser_mod._heads) <= parser_mod.HEAD_CACHE_MAX


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.sampled_from([200, 404, 409, 503]), st.binary(max_size=40)),
                min_size=1, max_size=5),
       st.lists(st.integers(min_value=0, max_value=400), max_size=8))
def test_parser_gives_the_same_replies_however_the_stream_is_cut(replies, cuts):
    stream = b"".join(b"HTTP/1.1 %d X\r\nContent-Length: %d\r\n\r\n" % (s, len(b)) + b
                      for s, b in replies)
    bounds = sorted({c % (len(stream) + 1) for c in cuts} | {0, len(stream)})
    p, out = ReplyParser(), []
    for a, b in zip(bounds, bounds[1:], strict=False):
        out += p.feed(stream[a:b])
    assert out == [(s, b, False) for s, b in replies]
    assert not p.pending


# --- requests are validated before they are sent ---------------------------
@pytest.mark.parametrize("cred", ["", "a b", "a%20b", "ä", "a\r\nX: y", "a" * 129, "a&by=5"])
def test_a_bad_cred_is_refused_locally_and_never_sent(fake, cred):
    async def go():
        async with AccManClient(fake.url) as acc:
            with pytest.raises(BadRequest) as e:
                await acc.tot(cred)
            with pytest.raises(BadRequest):
                await acc.mod(cred, 1)
            return e.value
    err = run(go())
    assert fake.requests == []
    if len(cred) > 2:
        assert cred not in str(err)        # a credential is never echoed


@pytest.mark.parametrize("kwargs,exc", [
    ({"by": 0}, BadRequest), ({"by": True}, TypeError), ({"by": 1.0}, TypeError),
    ({"by": INT64_MAX + 1}, BadRequest), ({"by": INT64_MIN - 1}, BadRequest),
    ({"by": -1, "min": INT64_MAX + 1}, BadRequest), ({"by": -1, "key": ""}, BadRequest),
    ({"by": -1, "key": "k" * 65}, BadRequest), ({"by": -1, "key": "a/b"}, BadRequest),
])
def test_bad_mod_values_are_refused_locally(fake, kwargs, exc):
    with AccManSyncClient(fake.url) as acc:
        with pytest.raises(exc):
            acc.mod("alice", **kwargs)
    assert fake.requests == []


class _Lying(int):
    """An int whose own words lie about its value (a probe's case: a
    subclass's __str__ went on the wire, and its comparisons judged it)."""

    def __str__(self):
        return "-5&min=0&key=zz"

    __repr__ = __format__ = lambda self, *_: "-5&min=0&key=zz"
    __le__ = __ge__ = __lt__ = __gt__ = lambda self, _other: True


def test_an_int_subclass_is_sent_as_its_value(fake):
    fake.fund("alice", 100)
    with AccManSyncClient(fake.url) as acc:
        assert acc.mod("alice", _Lying(-1)) == (99, 2)
        with pytest.raises(BadRequest, match="by must be between"):
            acc.mod("alice", _Lying(INT64_MAX + 1))
        hold = acc.hold("alice", _Lying(-3), ttl_s=_Lying(60), min=_Lying(0))[0]
        acc.settle("alice", hold, _Lying(2))
        acc.past("alice", limit=_Lying(5))
        acc.events(after=_Lying(0), limit=_Lying(5))
    sent = [params for _, path, params, _ in fake.requests if path != "/health"]
    assert sent[0] == {"cred": "alice", "by": "-1"}
    assert {"by": "-3", "ttl": "60", "min": "0"}.items() <= sent[1].items()
    assert sent[2]["use"] == "2" and sent[3]["limit"] == "5" and sent[4]["limit"] == "5"


def test_bad_urls_and_tokens_are_refused():
    for url in ["ftp://h", "http://", "http://h/?q=1", "http://u:p@h", "http://h/a b"]:
        with pytest.raises(ValueError):
            AccManClient(url)
    for url in ["http://bücher.example:8080", "http://h\u0435st", "http://127.0.0.%31"]:
        for cls in (AccManClient, AccManSyncClient):
            with pytest.raises(ValueError, match="host must be ASCII"):
                cls(url)
    # A label empty or over 63 characters fails in the resolver, as a bare
    # UnicodeError at each call; an empty TLS name turns asyncio's name check off.
    for url in ["https://./", "http://a..b", "https://.a:8443", "http://" + "a" * 64 + ".example"]:
        for cls in (AccManClient, AccManSyncClient):
            with pytest.raises(ValueError, match="host must be ASCII: a name .labels of 1 to 63"):
                cls(url)
    assert AccManSyncClient("https://" + "a" * 63 + ".example.").where == \
        "https://" + "a" * 63 + ".example."
    for url in ["http://h:0", "http://h:65536", "http://h:x"]:
        with pytest.raises(ValueError, match="port must be a number from 1 to 65535"):
            AccManSyncClient(url)
    for url in [123, None, b"http://h"]:
        for cls in (AccManClient, AccManSyncClient):
            with pytest.raises(TypeError, match="the AccMan url must be a str such as"):
                cls(url)
    # What urllib refuses in words that quote the URL, or takes with a part
    # of it dropped (`[::1]x:80` as [::1]:80, a tab anywhere): named, not quoted.
    for url, fault in [("http://u:secret@[::1/", "'[' without a ']'"),
                       ("http://[::1]secret:80/", "followed by something other than ':PORT'"),
                       ("http://[v1.secret]/", "not an IPv6 address"),
                       ("http://127.0.0.1:2\t3001", "a space or a control character"),
                       ("https://a b/", "a space or a control character"),
                       ("http://[fe80::1%25secret]:8080", "an IPv6 zone, which is not taken"),
                       ("http://[fe80::1%secret]/", "an IPv6 zone, which is not taken")]:
        for cls in (AccManClient, AccManSyncClient):
            with pytest.raises(ValueError, match=r"^the AccMan url cannot be used: .*" +
                               re.escape(fault)) as e:
                cls(url)
            assert "secret" not in str(e.value)
    assert AccManSyncClient("http://xn--bcher-kva.example:8080").where == \
        "http://xn--bcher-kva.example:8080"
    assert AccManSyncClient("http://[::1]:8080").where == "http://[::1]:8080"
    # "" is no token, and one not a str a TypeError (test_client.py).
    for token in ["a b", "tok\r\nX: y"]:
        with pytest.raises(ValueError) as e:
            AccManSyncClient("http://h", token)
        assert "\r\n" not in str(e.value) and "a b" not in str(e.value)



@pytest.mark.parametrize("cls", [AccManClient, AccManSyncClient])
@pytest.mark.parametrize("kwargs,exc,named", [
    ({"timeout_s": float("inf")}, ValueError, "TIMEOUT_S_MAX"),
    ({"timeout_s": 1e300}, ValueError, "TIMEOUT_S_MAX"),
    ({"timeout_s": TIMEOUT_S_MAX * 1.001}, ValueError, "TIMEOUT_S_MAX"),
    ({"timeout_s": float("nan")}, ValueError, "timeout_s"),
    ({"timeout_s": 0}, ValueError, "timeout_s"),
    ({"timeout_s": "5"}, TypeError, "timeout_s"),
    ({"timeout_s": True}, TypeError, "timeout_s"),
    ({"retries": 1.5}, TypeError, "retries"),
    ({"retries": 11}, ValueError, "retries"),
])
def test_settings_no_call_could_keep_are_refused_when_the_client_is_made(cls, kwargs, exc,
                                                                          named):
    with pytest.raises(exc, match=named):
        cls("http://127.0.0.1:1", **kwargs)


def test_connections_max_is_a_whole_number():
    for value in (2.5, True):
        with pytest.raises(TypeError, match="connections_max"):
            AccManClient("http://127.0.0.1:1", connections_max=value)


def test_calls_at_timeout_s_max_work(shared_server, cred):
    """The longest timeout allowed, also under a long poll's extra wait,
    fits every socket timeout and timer on the way."""
    with AccManSyncClient(shared_server.url, timeout_s=TIMEOUT_S_MAX) as acc:
        assert acc.mod(cred, 5)[0] == 5
        assert acc.events(0, limit=1, wait_s=EVENTS_WAIT_S_MAX).next >= 1

    async def go():
        async with AccManClient(shared_server.url, timeout_s=TIMEOUT_S_MAX) as acc:
            assert await acc.tot(cred) == 5
            assert (await acc.events(0, limit=1, wait_s=EVENTS_WAIT_S_MAX)).next >= 1
    run(go())


# --- the reply decoders -----------------------------------------------------
def body(obj) -> bytes:
    return json.dumps(obj).encode()


ENTRY = {"seq": 2, "by": -3, "tot": 7, "at": 1795610238403, "key": "k1", "hold": None}
ACCOUNT = "0f" * 16


def test_past_reads_the_account_and_each_entrys_hold():
    held = dict(ENTRY, seq=3, by=-5, tot=2, key=None, hold=3)
    page = replies.past(200, body({"account": ACCOUNT, "past": [held, ENTRY], "next": 2}))
    assert page.account == ACCOUNT and page.next == 2
    assert page.entries == [Entry(3, -5, 2, held["at"], None, 3),
                            Entry(2, -3, 7, ENTRY["at"], "k1")]


def test_a_past_page_unpacks_as_the_pair_that_past_always_returned():
    page = replies.past(200, body({"account": ACCOUNT, "past": [ENTRY], "next": None}))
    assert isinstance(page, PastPage)
    entries, nxt = page
    assert (entries, nxt) == page and page == (entries, None) and len(page) == 2
    assert isinstance(page, tuple) and page[0] is page.entries
    assert "account='" + ACCOUNT in repr(page)
    again = pickle.loads(pickle.dumps(page))
    assert again == page and again.account == ACCOUNT


def test_past_from_a_server_before_accounts_and_holds_is_still_read():
    old = {k: v for k, v in ENTRY.items() if k != "hold"}
    page = replies.past(200, body({"past": [old], "next": None}))
    assert page.account is None and page.entries[0].hold is None


@pytest.mark.parametrize("reply", [
    {"account": ACCOUNT, "past": [dict(ENTRY, hold="3")], "next": None},
    {"account": ACCOUNT, "past": [dict(ENTRY, hold=True)], "next": None},
    {"account": ACCOUNT, "past": [dict(ENTRY, seq=None)], "next": None},
    {"account": ACCOUNT, "past": [dict(ENTRY, key=5)], "next": None},
    {"account": ACCOUNT, "past": [[2, -3, 7]], "next": None},
    {"account": ACCOUNT, "past": {}, "next": None},
    {"account": ACCOUNT, "past": [], "next": "2"},
    {"account": 5, "past": [], "next": None},
    {"account": "", "past": [], "next": None},
    {"account": "0F" * 16, "past": [], "next": None},
    {"account": "alice", "past": [], "next": None},
    {"account": "a" * (replies.ACCOUNT_CHARS_MAX + 1), "past": [], "next": None},
    {"account": ACCOUNT, "past": [dict(ENTRY, seq=0)], "next": None},
    {"account": ACCOUNT, "past": [dict(ENTRY, seq=-1)], "next": None},
    {"account": ACCOUNT, "past": [dict(ENTRY, tot=2 ** 63)], "next": None},
    {"account": ACCOUNT, "past": [dict(ENTRY, by=-2 ** 63 - 1)], "next": None},
    {"account": ACCOUNT, "past": [dict(ENTRY, at=-1)], "next": None},
    {"account": ACCOUNT, "past": [dict(ENTRY, hold=0)], "next": None},
    # Not newest first, or a next that would skip or repeat entries.
    {"account": ACCOUNT, "past": [dict(ENTRY, seq=2), dict(ENTRY, seq=3)], "next": None},
    {"account": ACCOUNT, "past": [dict(ENTRY, seq=2), dict(ENTRY, seq=2)], "next": None},
    {"account": ACCOUNT, "past": [dict(ENTRY, seq=3), dict(ENTRY, seq=2)], "next": 1},
    {"account": ACCOUNT, "past": [dict(ENTRY, seq=3), dict(ENTRY, seq=2)], "next": 3},
    {"account": ACCOUNT, "past": [], "next": 2},
    {"account": ACCOUNT, "past": [dict(ENTRY, seq=1)], "next": 0},
])
def test_past_refuses_what_breaks_the_specs_shape(reply):
    with pytest.raises(BadReply):
        replies.past(200, body(reply))


def test_past_reads_a_page_and_its_next_at_the_bounds():
    """Newest first, `next` the last seq: the SPEC's page, at the 64-bit
    bounds of its numbers (a settle's `by` of 0 among them)."""
    entries = [dict(ENTRY, seq=2 ** 63 - 1, tot=2 ** 63 - 1, by=0, at=0),
               dict(ENTRY, seq=5, tot=-2 ** 63, by=-2 ** 63 + 1, hold=2 ** 63 - 1)]
    page = replies.past(200, body({"account": ACCOUNT, "past": entries, "next": 5}))
    assert [e.seq for e in page.entries] == [2 ** 63 - 1, 5] and page.next == 5


def test_an_account_id_of_account_chars_max_is_read():
    longest = "a" * replies.ACCOUNT_CHARS_MAX
    page = replies.past(200, body({"account": longest, "past": [], "next": None}))
    assert page.account == longest


@pytest.mark.parametrize("status,reply,exc", [
    (404, {"error": "no_account"}, NoAccount),
    (409, {"error": "key_reused"}, KeyReused),
    (409, {"error": "overflow"}, Overflow),
    (409, {"error": "something_new"}, UnexpectedReply),
    (401, {"error": "unauthorized"}, Unauthorized),
    (403, {"error": "forbidden"}, Forbidden),
    (503, {"error": "busy"}, Busy),
    (503, {"error": "unavailable"}, Unavailable),
    (503, {"error": "not_applied"}, NotApplied),
    (503, {"error": "shutting_down"}, ShuttingDown),
    (414, {"error": "uri_too_long"}, BadRequest),
    (404, {"error": "not_found"}, UnexpectedReply),
    (405, {"error": "method_not_allowed"}, UnexpectedReply),
    (502, {}, OutcomeUnknown),
    (409, {"error": "insufficient"}, BadReply),          # without its tot
])
def test_each_error_reply_has_its_type(status, reply, exc):
    e = replies.error(status, body(dict(reply, detail="a sentence")))
    assert type(e) is exc
    if exc is BadRequest:
        assert (e.status, e.code) == (414, "uri_too_long")


def test_an_error_s_detail_shows_its_control_characters_escaped():
    """A detail from whatever answers at the URL is shown to a person, on a
    terminal or in a log: its control characters (an escape sequence, a
    carriage return, a bell, a newline) are escaped, not passed on."""
    e = replies.error(404, body({"error": "not_found",
                                 "detail": "\u001b[2J\u001b[31mRED\rOVER\u0007\nline\u0085"}))
    assert e.detail == "\\x1b[2J\\x1b[31mRED\\x0dOVER\\x07\\x0aline\\x85"


def test_an_error_keeps_its_tot_and_at_most_detail_chars_max_of_its_detail():
    # Cut as the clients raise it (unechoed, after putting secrets out of sight).
    e = replies.error(409, body({"error": "insufficient", "tot": 4, "detail": "x" * 500}))
    e = replies.unechoed(e, b"PATCH /mod?cred=a&by=-5 HTTP/1.1\r\n\r\n")
    assert isinstance(e, Insufficient) and e.tot == 4
    assert e.detail == str(e) == "x" * replies.DETAIL_CHARS_MAX
    assert replies.error(409, b"not json").detail == "AccMan answered 409"


@pytest.mark.parametrize("decode,text", [
    (replies.tot, b'{"tot":-9223372036854775808}'), (replies.tot, b'{ "tot" : 5 }'),
    (replies.mod, b'{"tot":5,"seq":9223372036854775807}'), (replies.mod, b'{"seq":2,"tot":5}'),
])
def test_the_fast_path_and_the_json_path_agree(decode, text):
    assert decode(200, text) == decode(200, text.replace(b" ", b"") + b" ")


@pytest.mark.parametrize("decode,text", [
    (replies.tot, b'{"tot":9223372036854775808}'), (replies.tot, b'{"tot":-9223372036854775809}'),
    (replies.tot, b'{"tot":9999999999999999999}'),
    (replies.mod, b'{"tot":5,"seq":9223372036854775808}'), (replies.mod, b'{"tot":5,"seq":0}'),
    (replies.mod, b'{"tot":5,"seq":-1}'), (replies.mod, b'{"tot":-9999999999999999999,"seq":1}'),
    (replies.hold, b'{"hold":9223372036854775808,"tot":2,"seq":3}'),
    (replies.hold, b'{"hold":3,"tot":2,"seq":0}'),
    (replies.hold, b'{"hold":3,"tot":9223372036854775808,"seq":3}'),
])
def test_numbers_outside_the_specs_ranges_are_a_bad_reply(decode, text):
    """Every number on the wire is signed 64-bit (SPEC "Values"), and seqs
    and holds count from 1: anything else is no AccMan reply, on the fast
    path as on the JSON one."""
    for form in (text, text.replace(b":", b": ")):
        with pytest.raises(BadReply):
            decode(200, form)


# --- holds and events (issue 13) ----------------------------------------------
EVENT = {"id": 7, "type": "hold", "account": ACCOUNT, "seq": 3, "by": -5, "tot": 2,
         "at": 1795610238403, "key": "k-h", "hold": 3}


def test_hold_reads_its_three_integers():
    assert replies.hold(200, b'{"hold":3,"tot":2,"seq":3}') == (3, 2, 3)
    assert replies.hold(200, b'{"seq": 3, "hold": 3, "tot": -2}') == (3, -2, 3)
    assert replies.settle(200, b'{"tot":9,"seq":4}') == (9, 4)


@pytest.mark.parametrize("text", [b'{"hold":0,"tot":2,"seq":3}', b'{"hold":"3","tot":2,"seq":3}',
                                  b'{"tot":2,"seq":3}', b'{"hold":true,"tot":2,"seq":3}'])
def test_a_hold_reply_without_its_integers_is_a_bad_reply(text):
    with pytest.raises(BadReply):
        replies.hold(200, text)


def test_events_read_each_event_and_next():
    second = dict(EVENT, id=8, type="settle", by=5, tot=7, key=None, seq=4)
    page = replies.events(6)(200, body({"events": [EVENT, second], "next": 8}))
    assert isinstance(page, replies.EventsPage) and page.next == 8
    events, nxt = page
    assert events == [Event(**EVENT), Event(**second)] and nxt == 8
    assert replies.events(8)(200, body({"events": [], "next": 8})) == ([], 8)
    # `after` past the end of the stream: the server says where it ends.
    assert replies.events(20)(200, body({"events": [], "next": 8})) == ([], 8)


@pytest.mark.parametrize("reply", [
    {"events": [dict(EVENT, type=7)], "next": 7},           # a type not of the SPEC's shape
    {"events": [dict(EVENT, type=None)], "next": 7},
    {"events": [dict(EVENT, account="alice")], "next": 7},
    {"events": [dict(EVENT, account=None)], "next": 7},
    {"events": [dict(EVENT, id=0)], "next": 7},
    {"events": [dict(EVENT, by="5")], "next": 7},
    {"events": [dict(EVENT, hold=True)], "next": 7},
    {"events": [dict(EVENT, key=3)], "next": 7},
    {"events": [{k: v for k, v in EVENT.items() if k != "at"}], "next": 7},
    {"events": [[7, "hold"]], "next": 7},
    {"events": {}, "next": 7},
    {"events": [EVENT]},
    {"events": [EVENT], "next": "7"},
    {"events": [], "next": -1},
    {"events": [dict(EVENT, seq=0)], "next": 7},
    {"events": [dict(EVENT, seq=-1)], "next": 7},
    {"events": [dict(EVENT, tot=2 ** 63)], "next": 7},
    {"events": [dict(EVENT, by=-2 ** 63 - 1)], "next": 7},
    {"events": [dict(EVENT, at=-5)], "next": 7},
    {"events": [dict(EVENT, hold=0)], "next": 7},
    {"events": [dict(EVENT, id=2 ** 63)], "next": 2 ** 63},
    {"events": [], "next": 2 ** 63},
])
def test_events_refuse_what_breaks_the_specs_shape(reply):
    with pytest.raises(BadReply):
        replies.events(6)(200, body(reply))


@pytest.mark.parametrize("reply,before,words", [
    ({"events": [EVENT], "next": 6}, [7],                    # next before its last event
     "a page ending with event 7 gave next 6, not 7"),
    ({"events": [dict(EVENT, id=6)], "next": 6}, [],         # not after `after`
     "event 6 came after event 6, where 7 was due"),
    ({"events": [EVENT, dict(EVENT, id=9)], "next": 9}, [7],  # a gap
     "event 9 came after event 7, where 8 was due"),
    ({"events": [EVENT, EVENT], "next": 7}, [7],             # a repeat
     "event 7 came after event 7, where 8 was due"),
    ({"events": [dict(EVENT, id=8), dict(EVENT, id=9)], "next": 9}, [],    # 7 skipped
     "event 8 came after event 6, where 7 was due"),
    ({"events": [EVENT, dict(EVENT, id=8)], "next": 20}, [7, 8],    # next past its last event
     "a page ending with event 8 gave next 20, not 8"),
    ({"events": [], "next": 7}, [],                          # next past an empty page
     "a page of no events after event 6 gave next 7, skipping event 7"),
])
def test_events_refuse_what_breaks_the_order_naming_the_ids(reply, before, words):
    """A page of the SPEC's shape that breaks the order is AccMan's word on
    its stream, not a garbled reply: EventsOutOfOrder, never a
    TransportError, with the events that came in order before the break."""
    with pytest.raises(EventsOutOfOrder) as info:
        replies.events(6)(200, body(reply))
    assert not isinstance(info.value, TransportError)
    assert info.value.detail == f"{words}; {replies.ORDER_RULE}"
    assert [e.id for e in info.value.events] == before


@pytest.mark.parametrize("status,reply,exc", [
    (409, {"error": "hold_ended"}, HoldEnded),
    (409, {"error": "too_many_holds"}, TooManyHolds),
    (404, {"error": "no_hold"}, NoHold),
    (410, {"error": "events_trimmed", "first": 40}, EventsTrimmed),
    (410, {"error": "events_trimmed"}, BadReply),          # without its first
    (410, {"error": "gone"}, UnexpectedReply),
])
def test_each_holds_and_events_error_has_its_type(status, reply, exc):
    e = replies.error(status, body(dict(reply, detail="a sentence")))
    assert type(e) is exc
    if exc is EventsTrimmed:
        assert e.first == 40 and e.detail == "a sentence" and e.status == 410


def test_a_quoted_request_is_out_of_sight_whoever_s_it_is_and_only_where_it_stands_alone():
    """A reply behind a pipelined one may quote another call's request: any
    cred= or bearer value goes; this call's own secrets go where they stand
    alone, so that a credential "a" does not eat every "a" of the detail."""
    e = replies.error(400, body({"error": "bad_request",
                                 "detail": "the balance a; GET /tot?cred=OTHERcred HTTP/1.1 "
                                           "Authorization: Bearer OTHERtoken; a"}))
    replies.unechoed(e, b"GET /tot?cred=a HTTP/1.1\r\nAuthorization: Bearer t0k\r\n\r\n")
    assert e.detail == ("the balance <not shown>; GET /tot?cred=<not shown> HTTP/1.1 "
                        "Authorization: Bearer <not shown>; <not shown>")
    assert replies.error(404, body({"error": "x" * 41, "detail": "d"})).code == "unexpected"
    assert replies.error(404, body({"error": "not_found", "detail": "d"})).code == "not_found"


@pytest.mark.parametrize("echo", [
    "token Zm9vYmFyYmF6…",                                # cut short by what quotes it
    "...c0ffee-abc",                                       # the credential's head
    "it said Zm9vYmFyYmF6cXV4%2B%2FZm9vYmFy%3D%3D, whole",    # percent-encoded
    "token=vYmFyYmF6cXV4+/Z",                            # a piece inside a longer word
    "upstream refused Bearer%20Zm9vYmFyYmF6cXV4%2B%2FZm9v",  # encoded and cut
    "upstream refused bearer%20zm9v Zm9vYmFyYmF6cXV4%2b%2fZm9vYmFy%3d%3d",  # lower-case hex
    "Authorization: Bearer Zm9vYmF",                      # another's, cut short: any bearer value
    "Authorization: Bearer token-1f2e3d4c5b6a7980",       # another's, starting like prose
])
def test_a_piece_of_a_secret_of_eight_characters_or_more_is_out_of_sight(echo):
    cred, token = "c0ffee-abcdef0123456789", "Zm9vYmFyYmF6cXV4+/Zm9vYmFy=="
    e = replies.error(400, body({"error": "bad_request",
                                 "detail": f"the balance is short; {echo}"}))
    replies.unechoed(e, f"GET /tot?cred={cred} HTTP/1.1\r\nAuthorization: Bearer {token}"
                        "\r\n\r\n".encode())
    assert e.detail.startswith("the balance is short; ") and replies.UNSHOWN in e.detail
    n = replies.SECRET_PIECE_CHARS_MIN
    for secret in (cred, token):
        for i in range(len(secret) - n + 1):
            assert secret[i:i + n] not in e.detail, e.detail
