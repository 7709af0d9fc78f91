"""Input fuzzing over the wire, against the real server (SPEC "Values",
"Errors"): what tests/test_wire.py does to the parser in-process, done here
through a socket, plus what only a live server can show.

* Every value the SPEC rejects, for `cred`, `by`, `min`, `key`, `limit` and
  `before` (and repeated, unknown or missing parameters), gets a 400 and
  changes nothing: the accounts that a sloppy server could have reached with
  it (a percent-decoded, NFKC-folded or trimmed reading of the value), and
  the ledger's own counters of accounts and committed mods, are the same
  before and after.
* Random bytes, valid pipelines and mutated pipelines, cut at random points
  and sent with pauses between the pieces: the server answers exactly the
  requests the parser finds, in order, each with the status the parser's
  verdict implies, closes after a framing error or `Connection: close`,
  and goes on serving others.
"""

import re
import socket
import time
import unicodedata
import urllib.parse

import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from accman import limits
from accman.server._wire import (ROUTE_EVENTS, ROUTE_HEALTH, ROUTE_HOLD, ROUTE_METRICS,
                                 ROUTE_MOD, ROUTE_OPTIONS, ROUTE_PAST, ROUTE_SETTLE, ROUTE_TOT,
                                 Parser)
from conftest import parse_responses, request_bytes
from relhelp import history, metrics
from test_wire import fuzz_inputs, mutated, valid_requests

NAME = re.compile(rb"[A-Za-z0-9_-]+")
NAME_CHARS = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-"
NUMBER = re.compile(rb"-?(0|[1-9][0-9]*)")
SETTINGS = settings(max_examples=120, deadline=None,
                    suppress_health_check=[HealthCheck.too_slow,
                                           HealthCheck.function_scoped_fixture])


# --- the SPEC's rules, as a model ---------------------------------------------------

def valid_name(value: bytes, max_chars) -> bool:
    return 1 <= len(value) <= max_chars and NAME.fullmatch(value) is not None


def valid_number(value: bytes, low, high) -> bool:
    if NUMBER.fullmatch(value) is None or value == b"-0":
        return False
    return low <= int(value) <= high        # int() only after the regex: plain ASCII


RULES = {
    "cred": lambda v: valid_name(v, limits.CRED_CHARS_MAX),
    "key": lambda v: valid_name(v, limits.KEY_CHARS_MAX),
    "by": lambda v: valid_number(v, limits.INT64_MIN, limits.INT64_MAX) and v != b"0",
    "min": lambda v: valid_number(v, limits.INT64_MIN, limits.INT64_MAX),
    "limit": lambda v: valid_number(v, 1, limits.PAST_LIMIT_MAX),
    "before": lambda v: valid_number(v, 1, limits.INT64_MAX),
}


def readings(value: bytes, max_chars):
    """The valid names a careless server could make of `value`: percent-
    decoded (with '+' as space or not), NFKC-folded, trimmed, stripped of
    what is not a name character, cut at the limit, case-folded."""
    text = value.decode("utf-8", "replace")
    forms = {text, urllib.parse.unquote(text), urllib.parse.unquote_plus(text)}
    forms |= {unicodedata.normalize("NFKC", f) for f in list(forms)}
    forms |= {f.strip() for f in list(forms)}
    forms |= {"".join(ch for ch in f if ch.isascii() and (ch.isalnum() or ch in "_-"))
              for f in list(forms)}
    forms |= {f[:max_chars] for f in list(forms)}
    forms |= {f.lower() for f in list(forms)} | {f.upper() for f in list(forms)}
    return {f for f in forms if valid_name(f.encode(), max_chars) and f.encode() != value}


# --- strategies of rejected values ------------------------------------------------

# Any byte but CR and LF (which end the request line: then it is another
# request, not a value) and '&' (which starts another parameter: tested as
# such below).
value_bytes = st.binary(max_size=24).map(lambda b: b.replace(b"\r", b"").replace(b"\n", b"")
                                         .replace(b"&", b""))
names = st.from_regex(rb"[A-Za-z0-9_-]{1,12}", fullmatch=True)
odd_bytes = st.sampled_from([bytes([c]) for c in range(256) if c not in NAME_CHARS + b"\r\n&"])


@st.composite
def near_names(draw):
    """A valid name with one byte that is not allowed, somewhere."""
    name = draw(names)
    at = draw(st.integers(0, len(name)))
    return name[:at] + draw(odd_bytes) + name[at:]


@st.composite
def percent_encoded(draw):
    """A valid name with some of its characters percent-encoded."""
    name = draw(names)
    flags = draw(st.lists(st.booleans(), min_size=len(name), max_size=len(name)))
    if not any(flags):
        flags[0] = True
    return b"".join(b"%%%02X" % c if f else bytes([c]) for c, f in zip(name, flags, strict=True))


unicode_lookalikes = st.text(alphabet="ａＢ１２é٣০\u00a0\u2011\uff3f\u0410ß", min_size=1,
                             max_size=6).map(lambda t: t.encode())


def names_rejected(max_chars):
    return st.one_of(
        value_bytes, near_names(), percent_encoded(), unicode_lookalikes,
        st.just(b""),
        st.integers(max_chars + 1, max_chars + 40).map(lambda n: b"n" * n),
        names.map(lambda n: b" " + n), names.map(lambda n: n + b"+"),
    ).filter(lambda v: not valid_name(v, max_chars))


number_texts = st.one_of(
    value_bytes,
    st.text(alphabet="0123456789-+_e.x %\uff11\u0663\u00b2", max_size=22).map(str.encode),
    st.integers(-(2 ** 70), 2 ** 70).map(lambda i: str(i).encode()),
    st.integers(0, 2 ** 63 + 10).map(lambda i: b"0" + str(i).encode()),
    st.sampled_from([b"0", b"-0", b"00", b"+1", b"1.0", b"1e3", b"1_000", b"0x10", b"%31",
                     b"9223372036854775808", b"-9223372036854775809", b"1001", b"- 1"]),
)


def numbers_rejected(name):
    return number_texts.filter(lambda v: not RULES[name](v))


# --- the server, its victims, and "nothing changed" -----------------------------------

class Victims:
    """Accounts that a rejected value must not reach, made on first use."""

    def __init__(self, srv):
        self.srv = srv
        self.made = set()

    def ensure(self, creds):
        for cred in creds - self.made:
            r = self.srv.mod(cred, 7, key="victim")
            assert r.status == 200, r
            self.made.add(cred)

    def snapshot(self, creds):
        counters = metrics(self.srv)
        with self.srv.connect() as c:
            tots = {}
            for cred in sorted(creds):
                c.send(request_bytes("GET", f"/tot?cred={cred}"))
                tots[cred] = c.response().json["tot"]
        return (counters["accman_accounts"], counters["accman_mods_committed_total"],
                tots, {cred: history(self.srv, cred) for cred in creds})


@pytest.fixture(scope="module")
def victims(shared_server):
    v = Victims(shared_server)
    v.ensure({"victim"})          # by=7, key "victim": what a rejected key must not replay
    return v


def send_raw(srv, method, target: bytes):
    """One request with a raw target; the reply."""
    raw = method.encode() + b" " + target + b" HTTP/1.1\r\nHost: localhost\r\n\r\n"
    with srv.connect() as c:
        c.send(raw)
        return c.response()


def assert_rejected(srv, victims, method, target, name, reached=()):
    """`target` must get a 400 naming what is wrong, and change nothing."""
    reached = set(reached) | {"victim"}
    victims.ensure(reached)
    before = victims.snapshot(reached)
    r = send_raw(srv, method, target)
    assert r.status == 400, (target, r)
    doc = r.json
    assert doc["error"] == "bad_request" and doc["detail"], doc
    if name and all(0x21 <= c <= 0x7e for c in target):
        # The detail names the parameter at fault, or the request target
        # when a byte makes it no URI.  (A space or a non-ASCII byte breaks
        # the request line itself; that detail is about the line.)
        assert name in doc["detail"] or "request target" in doc["detail"], (target, doc)
    assert victims.snapshot(reached) == before, target


# --- values ---------------------------------------------------------------------

@SETTINGS
@given(route=st.sampled_from(["tot", "past", "mod"]), value=names_rejected(limits.CRED_CHARS_MAX))
@example(route="mod", value=b"victi%6D")
@example(route="mod", value=b"victim ")
@example(route="mod", value=b"victim%20")
@example(route="mod", value=b"\xef\xbd\x96ictim")          # full-width v
def test_a_rejected_cred_is_400_and_reaches_no_account(shared_server, victims, route, value):
    method, rest = ("PATCH", b"&by=5") if route == "mod" else ("GET", b"")
    target = b"/" + route.encode() + b"?cred=" + value + rest
    assert_rejected(shared_server, victims, method, target, "cred",
                    readings(value, limits.CRED_CHARS_MAX))


def test_creds_that_differ_only_in_case_are_two_accounts(shared_server, cred):
    """The other side of "two different strings never reach the same
    account": a valid cred is taken as it is, case and all."""
    lower, upper = cred.lower(), cred.upper()
    assert shared_server.mod(lower, 7).json == {"tot": 7, "seq": 1}
    assert shared_server.mod(upper, 5).json == {"tot": 5, "seq": 1}
    assert shared_server.tot(lower) == 7
    assert [e["by"] for e in history(shared_server, lower)] == [7]


@SETTINGS
@given(name=st.sampled_from(["by", "min"]), value=st.data())
def test_a_rejected_amount_or_min_is_400_and_changes_nothing(shared_server, victims, name, value):
    text = value.draw(numbers_rejected(name))
    target = (b"/mod?cred=victim&by=" + text if name == "by"
              else b"/mod?cred=victim&by=-1&min=" + text)
    assert_rejected(shared_server, victims, "PATCH", target, name)


@SETTINGS
@given(value=names_rejected(limits.KEY_CHARS_MAX))
@example(value=b"victi%6D")
@example(value=b"victim%00")
@example(value=b"k" * (limits.KEY_CHARS_MAX + 1))
def test_a_rejected_key_is_400_and_replays_nothing(shared_server, victims, value):
    # The victim's first mod was by=7 with key "victim": a rejected key read
    # as "victim" would replay it (a 200), or applied as new (a change).
    target = b"/mod?cred=victim&by=7&key=" + value
    assert_rejected(shared_server, victims, "PATCH", target, "key")


@SETTINGS
@given(name=st.sampled_from(["limit", "before"]), value=st.data())
def test_a_rejected_page_parameter_is_400(shared_server, victims, name, value):
    text = value.draw(numbers_rejected(name))
    assert_rejected(shared_server, victims, "GET",
                    b"/past?cred=victim&" + name.encode() + b"=" + text, name)


PARAMS = {"tot": ["cred"], "past": ["cred", "limit", "before"], "mod": ["cred", "by", "min", "key"]}
GOOD = {"cred": b"victim", "by": b"-1", "min": b"-1000", "key": b"k1", "limit": b"5",
        "before": b"9"}


@SETTINGS
@given(route=st.sampled_from(sorted(PARAMS)), data=st.data())
def test_repeated_unknown_or_missing_parameters_are_400_and_change_nothing(
        shared_server, victims, route, data):
    params = [(p.encode(), GOOD[p]) for p in PARAMS[route]
              if p in ("cred", "by") or data.draw(st.booleans())]
    fault = data.draw(st.sampled_from(["repeat", "unknown", "missing", "empty"]))
    if fault == "repeat":
        name, value = data.draw(st.sampled_from(params))
        params.append((name, data.draw(st.sampled_from([value, value + b"0"]))))
    elif fault == "unknown":
        other = data.draw(st.from_regex(rb"[A-Za-z%0-9_.~-]{1,8}", fullmatch=True).filter(
            lambda n: n.decode() not in PARAMS[route]))
        params.append((other, data.draw(st.sampled_from([b"1", b"victim", b""]))))
    elif fault == "missing":
        gone = data.draw(st.sampled_from([b"cred", b"by"] if route == "mod" else [b"cred"]))
        params = [p for p in params if p[0] != gone]
    params = data.draw(st.permutations(params))
    query = b"&".join(name + b"=" + value for name, value in params)
    if fault == "empty":
        at = data.draw(st.sampled_from(["start", "end", "middle"]))
        query = {"start": b"&" + query, "end": query + b"&",
                 "middle": query.replace(b"&", b"&&", 1) if b"&" in query else query + b"&&"}[at]
    method = "PATCH" if route == "mod" else "GET"
    assert_rejected(shared_server, victims, method, b"/" + route.encode() + b"?" + query, "")


# --- byte streams: the server answers what the parser finds --------------------------------

OK_STATUSES = {ROUTE_TOT: {200, 404}, ROUTE_PAST: {200, 404}, ROUTE_MOD: {200, 404, 409},
               ROUTE_HEALTH: {200}, ROUTE_METRICS: {200}, ROUTE_OPTIONS: {204},
               ROUTE_HOLD: {200, 404, 409}, ROUTE_SETTLE: {200, 404, 409}, ROUTE_EVENTS: {200}}


def cut_at_close(raw):
    """The requests the parser finds in `raw`, up to the first one after
    which the server must close, and the bytes that hold them: nothing is
    sent after a closing request (bytes the server never reads would make
    its close a reset, and the reset could eat the reply)."""
    p = Parser()
    reqs = []
    for i in range(len(raw)):
        for req in p.feed(raw[i:i + 1]):
            reqs.append(req)
            if (req.error is not None and req.error.close) or not req.keep_alive:
                return reqs, raw[:i + 1]
    return reqs, raw


def exchange(srv, raw, cuts):
    """Send `raw` in pieces, with a pause after each, half-close, and read
    every reply until the server closes."""
    with srv.connect() as c:
        last = 0
        for cut in sorted(set(cuts)) + [len(raw)]:
            if cut > last:
                c.send(raw[last:cut])
                time.sleep(0.002)
            last = cut
        c.sock.shutdown(socket.SHUT_WR)
        assert c.closed_by_peer(10), "the server did not close after the client's EOF"
        return c.buf


def check_exchange(srv, raw, cuts):
    reqs, raw = cut_at_close(raw)
    data = exchange(srv, raw, [c for c in cuts if c < len(raw)])
    replies = parse_responses(data, [req.head for req in reqs])
    assert b"".join(r.raw for r in replies) == data, "bytes that are no whole reply"
    assert len(replies) == len(reqs), (reqs, replies)
    for req, r in zip(reqs, replies, strict=True):
        closing = req.error is not None and req.error.close
        if not req.loopback_host and not closing:
            # SPEC "Access": with no tokens, only a loopback Host is answered.
            assert r.status == 403, (req, r)
        elif req.error is not None:
            assert r.status == req.error.status, (req, r)
        else:
            assert r.status in OK_STATUSES[req.route], (req, r)
        if req.route == ROUTE_OPTIONS and r.status == 204:
            assert "allow" in r.headers
        elif req.route != ROUTE_METRICS and not req.head:
            assert r.headers["content-type"] == "application/json"
            doc = r.json
            if r.status != 200:
                assert doc["error"] and doc["detail"], doc
    if reqs and ((reqs[-1].error is not None and reqs[-1].error.close) or not reqs[-1].keep_alive):
        assert replies[-1].headers.get("connection") == "close"
    assert srv.get("/health").status == 200


cuts = st.lists(st.integers(0, 2000), max_size=8)


@SETTINGS
@given(st.lists(valid_requests(), min_size=1, max_size=5), cuts)
def test_valid_pipelines_in_pieces_are_answered_in_order(shared_server, pipeline, where):
    check_exchange(shared_server, b"".join(raw for raw, _ in pipeline), where)


@SETTINGS
@given(fuzz_inputs, cuts)
def test_random_bytes_in_pieces_are_answered_as_the_parser_reads_them(shared_server, raw, where):
    check_exchange(shared_server, raw, where)


@SETTINGS
@given(st.lists(valid_requests(), min_size=1, max_size=4), st.data())
def test_mutated_pipelines_in_pieces_are_answered_as_the_parser_reads_them(
        shared_server, pipeline, data):
    check_exchange(shared_server, mutated(pipeline, data), data.draw(cuts))
