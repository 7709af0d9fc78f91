"""The head deadline across the server's own pauses of reading
(accman.server.state, Lifecycle.update_reading; HEAD_TIMEOUT_S in
docs/SERVER.md): it does not run while the server holds reading back, and
a pause neither restarts nor ends it.  A connection's reading and head
clock alone, around a real Parser; the pauses are a client that stops and
starts reading its replies (`write_paused`).  The server's end-to-end
case is test_http_basics.py's
test_a_head_begun_while_reading_is_paused_has_its_deadline_after_the_resume."""

from types import SimpleNamespace

from accman.server._wire import Parser
from accman.server.connection import Connection
from accman.server.state import OPEN, Lifecycle

HEAD_BEGUN = b"GET /tot?cred=x HTTP/1.1\r\nHost: 127.0.0.1\r\n"


class Clock:
    def __init__(self):
        self.t = 100.0

    def time(self):
        return self.t


class Reader(Lifecycle):
    """What update_reading uses of a Connection."""

    def __init__(self):
        self.clock = Clock()
        self.server = SimpleNamespace(loop=self.clock, over_budget=False, paused=set())
        self.transport = SimpleNamespace(pause_reading=lambda: None,
                                         resume_reading=lambda: None)
        self.parser = Parser()
        self.state = OPEN
        self.write_paused = False
        self.backlog = None
        self.waiting = []
        self.pipeline_max = 64
        self.buffered = 0
        self.read_paused = False
        self.read_paused_at = 0.0
        self.head_started_at = 0.0

    def begin_head(self):
        """A head's first bytes read now (Connection._partial starts the clock)."""
        assert self.parser.feed(HEAD_BEGUN) == [] and self.parser.pending
        self.head_started_at = self.clock.t

    def pause_for(self, seconds):
        self.write_paused = True
        self.update_reading()
        assert self.read_paused
        self.clock.t += seconds
        self.write_paused = False
        self.update_reading()
        assert not self.read_paused

    def ran(self) -> float:
        """The seconds the head deadline has run."""
        return self.clock.t - self.head_started_at


def test_the_stand_in_s_attributes_are_a_connection_s():
    """Connection has __slots__: what update_reading uses must be among them."""
    assert set(vars(Reader())) - {"clock"} <= set(Connection.__slots__)


def test_a_head_keeps_the_time_it_ran_before_a_pause_and_none_of_the_pause():
    r = Reader()
    r.begin_head()
    r.clock.t += 1.0
    r.pause_for(4.0)
    assert r.ran() == 1.0


def test_pauses_one_after_another_never_start_the_deadline_again():
    """A client whose reading the server holds back again and again (its
    replies unread, the server's budget swinging) still has one deadline."""
    r = Reader()
    r.begin_head()
    for _ in range(10):
        r.clock.t += 1.0
        r.pause_for(2.0)
    assert r.ran() == 10.0


def test_a_head_begun_while_reading_is_paused_starts_at_the_resume():
    """Its bytes were held, and parsed during the pause (Connection._pump)
    with no clock started: it runs from the resume."""
    r = Reader()
    r.write_paused = True
    r.update_reading()
    r.clock.t += 3.0
    assert r.parser.feed(HEAD_BEGUN) == []
    r.write_paused = False
    r.update_reading()
    assert r.head_started_at == r.clock.t


def test_a_clock_started_during_the_pause_counts_none_of_it():
    """A request ended during the pause (Connection._pump) starts the next
    head's clock then: the resume counts none of the pause for it."""
    r = Reader()
    r.write_paused = True
    r.update_reading()
    r.clock.t += 2.0
    r.begin_head()
    r.clock.t += 3.0
    r.write_paused = False
    r.update_reading()
    assert r.ran() == 0.0


def test_no_head_begun_no_clock_after_a_resume():
    r = Reader()
    r.head_started_at = 50.0            # a request ended since (Connection._partial clears it)
    r.pause_for(1.0)
    assert r.head_started_at == 0.0
