"""A Ledger's own clock (`clock_ms=`, unix milliseconds) and its bound,
CLOCK_MS_MAX: a wrong reading is refused where it is read and changes
nothing; the writer's housekeeping waits for a right one and the ledger
goes on."""

import asyncio
import logging
import os
import re
import threading
import time

import pytest

from accman import Ledger
from accman.errors import HoldEnded
from accman.ledger import housekeeping as housekeeping_module
from accman.limits import CLOCK_MS_MAX, HOLD_TTL_S_MAX
from ledgerhelp import outcome_within, wait_for
from model import Clock

WRONG = [CLOCK_MS_MAX + 1, 2 ** 63 - 1, -1, 1.5, None, True, "1700000000000"]


def within(call, timeout_s=10.0):
    """call()'s result, made on a thread of its own: a change whose writer
    thread is gone would wait for ever."""
    box = []
    threading.Thread(target=lambda: box.append(call()), daemon=True).start()
    wait_for(lambda: box, timeout_s, what="the change's answer (is the writer thread gone?)")
    return box[0]


def refused(reading):
    return pytest.raises(ValueError, match="^" + re.escape(
        f"clock_ms returned {reading!r}: a clock must return an int of unix milliseconds "
        f"from 0 to {CLOCK_MS_MAX}") + "$")


def test_a_clock_that_raises_is_refused_as_a_wrong_reading(path):
    def clock_ms():
        raise RuntimeError("the clock's source is gone")
    with pytest.raises(ValueError, match="^clock_ms raised RuntimeError: the clock's source "
                                         "is gone$"):
        Ledger(path, clock_ms=clock_ms)


def test_a_huge_wrong_reading_is_named_in_a_line(led, clock):
    clock.set(10 ** 200)
    with pytest.raises(ValueError, match=r"^clock_ms returned 1000000000\d{70}: a clock must"):
        led.mod("a", 1)


@pytest.mark.parametrize("reading", WRONG)
def test_a_wrong_reading_is_refused_and_changes_nothing(led, clock, reading):
    led.mod("a", 100)
    hold, _, _ = led.hold("a", -5, 60)
    clock.set(reading)
    for call in (lambda: led.mod("a", -1), lambda: led.mod("b", 1),
                 lambda: led.hold("a", -1, 60), lambda: led.settle("a", hold, 1),
                 led.expire_due):
        with refused(reading):
            call()
    clock.set(Clock.START_MS)
    assert led.tot("a") == 95 and led.tot("b") is None and led.open_holds == 1
    assert [e.seq for e in led.past("a")] == [2, 1]
    assert led.settle("a", hold, 1) == (99, 3)
    led.verify()


def test_an_async_change_refused_by_a_wrong_reading_binds_no_loop(led, clock):
    """docs/DESIGN.md: a call refused at once binds no loop.  An amod from
    a loop not bound, refused by the clock's reading, left its loop bound:
    while it ran, every other loop's amod was RuntimeError."""
    async def refused_then_another_loop():
        clock.set(-1)
        with refused(-1):
            await led.amod("a", 1)
        clock.set(Clock.START_MS)
        return outcome_within(lambda: asyncio.run(led.amod("a", 1)), 5,
                              "the other loop's amod hung")

    assert asyncio.run(refused_then_another_loop()) == (1, 1)


def test_the_bounds_of_a_reading_are_taken(led, clock):
    """0 and CLOCK_MS_MAX are right readings: a hold of HOLD_TTL_S_MAX that
    ends in the bound's last second ends by its last reading, and one taken
    at it is kept (its expiry, past the bound, inside int64)."""
    last_second = CLOCK_MS_MAX + 1 - 1000
    clock.set(0)
    assert led.mod("a", 10) == (10, 1)
    clock.set(last_second - HOLD_TTL_S_MAX * 1000)
    led.hold("a", -3, HOLD_TTL_S_MAX)
    clock.set(CLOCK_MS_MAX)
    led.expire_due()                # it, or the writer on its own clock, ends the hold
    assert led.tot("a") == 10 and led.open_holds == 0
    led.hold("a", -2, HOLD_TTL_S_MAX)
    assert led.tot("a") == 8 and led.open_holds == 1
    assert [e.at for e in led.past("a")] == [CLOCK_MS_MAX] * 2 + [
        last_second - HOLD_TTL_S_MAX * 1000, 0]
    led.verify()


def test_a_ledger_whose_clock_reads_wrong_at_open_is_not_opened(path, clock):
    with Ledger(path, clock_ms=clock) as led:
        led.mod("a", 1)
    clock.set(-5)
    with refused(-5):
        Ledger(path, clock_ms=clock)
    clock.set(Clock.START_MS)
    with Ledger(path, clock_ms=clock) as led:           # the directory was let go
        assert led.tot("a") == 1


@pytest.mark.parametrize("clock_ms", [time.time, time.time_ns])
def test_a_clock_that_reads_wrong_is_refused_before_the_directory_is_touched(tmp_path, clock_ms):
    """`clock_ms=time.time` (seconds, a float) was refused only once the
    store was open: a directory not there was left made, with a key, a log
    and a LevelDB; one that was there had LevelDB's files rewritten."""
    with pytest.raises(ValueError, match="^clock_ms returned "):
        Ledger(str(tmp_path / "new"), clock_ms=clock_ms)
    assert not (tmp_path / "new").exists()
    path = str(tmp_path / "old")
    with Ledger(path) as led:
        led.mod("a", 5)
    before = {p: os.stat(os.path.join(path, p)).st_mtime_ns for p in os.listdir(path)}
    with pytest.raises(ValueError, match="^clock_ms returned "):
        Ledger(path, clock_ms=clock_ms)
    assert {p: os.stat(os.path.join(path, p)).st_mtime_ns for p in os.listdir(path)} == before


def test_the_open_ends_the_due_holds_by_one_reading(path, clock):
    """At open, holds that expired while the ledger was closed end in
    batches, all by one reading: a later wrong one cannot leave them half
    ended, nor refuse an open whose work is done."""
    with Ledger(path, clock_ms=clock, batch_mods_max=2) as led:
        led.mod("a", 100)
        for _ in range(5):
            led.hold("a", -1, 1)
    readings = iter([clock.ms + 2000])
    with Ledger(path, clock_ms=lambda: next(readings, -1), batch_mods_max=2) as led:
        assert led.open_holds == 0 and led.tot("a") == 100
        assert [e.seq for e in led.past("a")] == list(range(11, 0, -1))


def test_the_writer_waits_out_a_wrong_reading_and_goes_on(path, monkeypatch, caplog):
    """The writer reads the clock on its own thread to end due holds: a
    wrong reading there is said once, ends nothing, and stops nothing: the
    callers' changes are written, and due holds end once it reads right."""
    monkeypatch.setattr(housekeeping_module, "CLOCK_RETRY_S", 0.02)
    caplog.set_level(logging.INFO, logger="accman.commit")
    callers, writer = Clock(), [Clock.START_MS]

    def clock_ms():
        if threading.current_thread().name != "accman-commit":
            return callers()
        if writer[0] is None:
            raise RuntimeError("the clock's source is gone")
        return writer[0]

    with Ledger(path, clock_ms=clock_ms) as led:
        led.mod("a", 10)
        hold, _, _ = led.hold("a", -4, 1)
        writer[0] = 2 ** 63 - 1
        for n in range(5):
            assert within(lambda: led.mod("a", -1)) == (5 - n, 3 + n)
        wait_for(lambda: any("holds do not expire" in r.getMessage() for r in caplog.records),
                 what="the writer's word on the wrong reading")
        writer[0] = None                      # a clock that raises: the same
        assert within(lambda: led.mod("a", 1)) == (2, 8)
        assert within(lambda: led.mod("a", -1)) == (1, 9)
        assert led.open_holds == 1
        callers.advance(2)
        writer[0] = callers()
        wait_for(lambda: led.open_holds == 0, what="the due hold's end")
        assert led.tot("a") == 1 + 4
        with pytest.raises(HoldEnded):
            led.settle("a", hold, 1)
        led.verify()
    said = [r.getMessage() for r in caplog.records if r.name == "accman.commit"]
    assert said == [
        "holds do not expire and events are not trimmed while clock_ms returned "
        f"{2 ** 63 - 1}: a clock must return an int of unix milliseconds from 0 to "
        f"{CLOCK_MS_MAX}",
        "clock_ms reads right again: holds expire and events are trimmed"]


def test_the_server_s_lane_reads_the_checked_clock(tmp_path):
    """The server's compiled path (the Lane) reads a ledger's injected clock
    through the same check: a mod read with a wrong reading is a 500 with
    nothing applied, and the next, with a right one, is served."""
    import asyncio

    import uvloop

    from conftest import read_reply, request_bytes, served_in_process

    clock = Clock()

    async def main():
        with Ledger(str(tmp_path / "d"), clock_ms=clock) as led:
            async with served_in_process(led) as (_, host, port):
                got = [await one(host, port, "/mod?cred=a&by=5")]
                clock.set(-1)
                got.append(await one(host, port, "/mod?cred=a&by=5"))
                clock.set(Clock.START_MS)
                got.append(await one(host, port, "/mod?cred=a&by=1"))
                return got

    async def one(host, port, target):
        reader, writer = await asyncio.open_connection(host, port)
        writer.write(request_bytes("PATCH", target))
        reply = await read_reply(reader)
        writer.close()
        return reply

    got = uvloop.run(asyncio.wait_for(main(), 20))
    assert got[0] == (b"200", b'{"tot":5,"seq":1}')
    assert got[1][0] == b"500" and b'"error":"internal"' in got[1][1]
    assert got[2] == (b"200", b'{"tot":6,"seq":2}')
