"""Log lines that every refused request would say (accman.calling.repeats)."""

import asyncio
import logging

from accman.asgi import AccManMiddleware
from accman.calling import repeats as repeats_mod
from accman.calling.repeats import LINES_MAX, REPEAT_S, Repeats
from asgi_harness import call, make_app
from fake_accman import closed_port


def test_a_line_every_request_meets_is_said_at_most_once_a_repeat(caplog):
    now = [100.0]
    repeats = Repeats(logging.getLogger("accman.test"), clock=lambda: now[0])
    caplog.set_level("WARNING", logger="accman.test")
    for _ in range(3841):                       # refused requests for 30 s, 128 a second
        repeats.say(logging.WARNING, "accman: AccMan unavailable (unreachable); refusing")
        now[0] += 1 / 128
    repeats.say(logging.ERROR, "accman: AccMan refused the service (401 unauthorized)")
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "accman.test"]
    assert said[0] == (logging.WARNING, "accman: AccMan unavailable (unreachable); refusing")
    assert len(said) == 1 + int(30 / REPEAT_S) + 1, said
    assert said[1] == (logging.WARNING, "accman: AccMan unavailable (unreachable); refusing "
                                        "(1279 more times in 10 s)")
    assert said[-1] == (logging.ERROR, "accman: AccMan refused the service (401 unauthorized)")


def test_a_line_that_stopped_and_comes_back_is_said_at_once(caplog):
    now = [100.0]
    repeats = Repeats(logging.getLogger("accman.test2"), clock=lambda: now[0])
    caplog.set_level("WARNING", logger="accman.test2")
    for _ in range(5):                          # a spell of 5 over 4 s
        repeats.say(logging.WARNING, "down")
        now[0] += 1.0
    now[0] += 3600.0                            # an hour later, again
    repeats.say(logging.WARNING, "down")
    said = [r.getMessage() for r in caplog.records if r.name == "accman.test2"]
    assert said == ["down", "down (before, 4 more times in the 4 s after it was last said)"]


def test_what_accman_said_is_logged_but_does_not_make_a_new_line(caplog):
    """AccMan's words vary with what answers at the URL (a proxy may quote
    each request): they are said with the line, and the lines kept stay
    one per fixed text however many different words come."""
    now = [100.0]
    repeats = Repeats(logging.getLogger("accman.test3"), clock=lambda: now[0])
    caplog.set_level("ERROR", logger="accman.test3")
    for i in range(1000):
        repeats.say(logging.ERROR, "refused", f"quoted request {i}")
        now[0] += 0.001
    said = [r.getMessage() for r in caplog.records if r.name == "accman.test3"]
    assert said == ["refused; AccMan said: quoted request 0"]
    assert len(repeats._said) == 1


def test_the_lines_kept_are_bounded_and_the_one_met_longest_ago_goes(caplog):
    """A foreign server at a wrong URL may answer a new error code each time:
    the lines kept stay at LINES_MAX, each new one still said, and a line
    met lately is still known as said."""
    now = [100.0]
    repeats = Repeats(logging.getLogger("accman.test4"), clock=lambda: now[0])
    caplog.set_level("WARNING", logger="accman.test4")
    for i in range(10 * LINES_MAX):
        repeats.say(logging.WARNING, "steady")              # met every time: kept
        repeats.say(logging.WARNING, f"refused (code_{i})")
        now[0] += 0.001
        assert len(repeats._said) <= LINES_MAX
    def said_here():        # this test's logger only: a worker's other threads log too
        return [r.getMessage() for r in caplog.records if r.name == "accman.test4"]
    said = said_here()
    assert said.count("steady") == 1 and len(said) == 1 + 10 * LINES_MAX
    repeats.say(logging.WARNING, f"refused (code_{10 * LINES_MAX - 1})")    # kept: not said
    repeats.say(logging.WARNING, "refused (code_0)")         # forgotten: said again
    assert said_here()[len(said):] == ["refused (code_0)"]


def test_a_forgotten_line_says_the_repeats_it_had_not_said(caplog):
    """A line forgotten past LINES_MAX takes its count with it unless it is
    said as it goes: one line, at its own level, and none for a line with
    no repeats since it was last said."""
    now = [100.0]
    repeats = Repeats(logging.getLogger("accman.test5"), clock=lambda: now[0])
    caplog.set_level("WARNING", logger="accman.test5")
    for _ in range(8):                                      # said once, then 7 more in 3.5 s
        repeats.say(logging.ERROR, "refused (code_a)")
        now[0] += 0.5
    repeats.say(logging.WARNING, "refused (code_b)")        # said once, no repeats
    for i in range(LINES_MAX):                              # new codes push both out
        repeats.say(logging.WARNING, f"refused (code_{i})")
        now[0] += 0.001
    said = [(r.levelno, r.getMessage()) for r in caplog.records if r.name == "accman.test5"]
    assert said[:2] == [(logging.ERROR, "refused (code_a)"), (logging.WARNING, "refused (code_b)")]
    assert said.count((logging.ERROR, "refused (code_a) (7 more times in the 4 s after it was "
                                      "last said; no longer counted)")) == 1
    assert len(said) == 2 + LINES_MAX + 1                   # code_b had nothing more to say
    assert "refused (code_a)" not in repeats._said and "refused (code_b)" not in repeats._said
    assert len(repeats._said) == LINES_MAX


def test_a_spell_that_ends_says_its_unsaid_count_once_the_line_is_quiet(caplog):
    """999 refusals in 5 s, then the outage ends: the 998 after the first
    are said once the line has not come for REPEAT_S, though it never
    comes again, and only once; a later spell starts afresh."""
    now = [100.0]
    repeats = Repeats(logging.getLogger("accman.test6"), clock=lambda: now[0])
    caplog.set_level("WARNING", logger="accman.test6")
    for _ in range(999):
        repeats.say(logging.WARNING, "down")
        now[0] += 5 / 998
    now[0] += REPEAT_S - 5 / 998 - 0.01                     # not yet quiet for REPEAT_S
    repeats.flush()
    def said_here():
        return [r.getMessage() for r in caplog.records if r.name == "accman.test6"]
    assert said_here() == ["down"]
    now[0] += 0.01
    repeats.flush()
    repeats.flush()
    assert said_here() == ["down", "down (998 more times in the 5 s after it was last said; "
                                   "not met since)"]
    now[0] += 3600.0
    repeats.say(logging.WARNING, "down")                    # nothing left to say before it
    repeats.close()
    assert said_here()[2:] == ["down"]


def test_the_timer_is_armed_only_while_a_count_is_unsaid(caplog):
    """On the running event loop, the timer waits REPEAT_S from the last
    repeat; none while every count is said, none after close, which says
    what is left."""
    now = [100.0]
    repeats = Repeats(logging.getLogger("accman.test7"), clock=lambda: now[0])
    caplog.set_level("WARNING", logger="accman.test7")

    async def go():
        loop = asyncio.get_running_loop()
        repeats.say(logging.WARNING, "down")
        assert repeats._timer is None                       # nothing unsaid
        repeats.say(logging.WARNING, "down")
        timer = repeats._timer
        assert abs(timer.when() - loop.time() - REPEAT_S) < 1.0
        now[0] += 2.0
        repeats.say(logging.WARNING, "down")
        assert repeats._timer is timer                      # one timer, however many repeats
        now[0] += REPEAT_S - 1.0
        repeats.flush()                                     # the timer, early: waits again
        assert repeats._timer is not timer and timer.cancelled()
        assert abs(repeats._timer.when() - loop.time() - 1.0) < 0.5
        now[0] += REPEAT_S                                  # a periodic line says the count
        repeats.say(logging.WARNING, "down")
        assert repeats._timer is None
        repeats.say(logging.WARNING, "down")
        repeats.close()
        assert repeats._timer is None
    asyncio.run(go())
    said = [r.getMessage() for r in caplog.records if r.name == "accman.test7"]
    assert said == ["down", "down (before, 2 more times in the 2 s after it was last said)",
                    "down (1 more times in the 0 s after it was last said; not met since)"]


def test_the_middleware_says_an_outage_s_count_when_it_ends_and_at_shutdown(monkeypatch, caplog):
    """The middleware's timer runs on its event loop: refusals that stop
    have their count said REPEAT_S after the last, with no request; at
    shutdown, what is left is said and no timer stays."""
    monkeypatch.setattr(repeats_mod, "REPEAT_S", 0.2)
    url = f"http://127.0.0.1:{closed_port()}"
    m = AccManMiddleware(make_app(), url=url, retries=0)
    line = "accman: AccMan unavailable (unreachable); refusing with 503"

    async def go():
        for _ in range(5):
            assert (await call(m)).status == 503
        await asyncio.sleep(0.3)
        timers = [vars(m._repeats).get("_timer")]
        for _ in range(3):
            await call(m)
        await m.aclose()
        return timers + [vars(m._repeats).get("_timer")]
    with caplog.at_level(logging.WARNING, logger="accman.asgi"):
        timers = asyncio.run(go())
    said = [r.getMessage() for r in caplog.records if r.getMessage().startswith(line)]
    quiet = "more times in the 0 s after it was last said; not met since"
    assert said[1::2] == [f"{line} (4 {quiet})", f"{line} (2 {quiet})"]
    # Each spell's first line says why, in the client's words.
    assert said[0].startswith(f"{line}: cannot connect to AccMan at {url}: ")
    assert said[2] == said[0]
    assert timers == [None, None]
