"""The loop turn's budget (accman.server._pipeline.Turn, TURN_REQUESTS_MAX):
grants, refunds, and charges for costly requests, with `spent` called once
per turn, when its budget runs out."""

import asyncio

import pytest
import uvloop
from conftest import get, patch, read_reply, served_in_process

from accman import Ledger
from accman.limits import PAGE_ENTRIES_PER_TURN_REQUEST, PASS_CHARGE_MAX
from accman.server._pipeline import Turn
from accman.server.settings import ServerLimits


def test_a_charge_ends_the_turn_once_and_renew_starts_the_next():
    spent = []
    turn = Turn(20, lambda: spent.append(1))
    assert turn.grant(5) == 5 and turn.left == 15
    turn.charge(14)
    assert turn.left == 1 and spent == []
    turn.charge(9)
    assert turn.left == -8 and spent == [1]
    turn.charge(9)
    assert turn.grant(3) == 0 and spent == [1]          # spent once a turn
    turn.renew()
    assert turn.left == 20 and turn.grant(30) == 20 and spent == [1, 1]


def test_a_refund_after_the_turn_ran_out_does_not_end_it_twice():
    """A read granted the turn's last requests ends it; a refund of those
    it did not take, then a charge that spends them, is the same turn."""
    spent = []
    turn = Turn(20, lambda: spent.append(1))
    assert turn.grant(64) == 20 and spent == [1]
    turn.refund(19)
    turn.charge(30)
    assert turn.left == -11 and spent == [1]
    turn.renew()
    turn.charge(25)
    assert spent == [1, 1]


def test_a_negative_charge_is_refused():
    with pytest.raises(AssertionError):
        Turn(20, lambda: None).charge(-1)


def test_a_pass_is_spent_by_its_own_charges_only():
    """PASS_CHARGE_MAX: a connection's pass ends once its answers have cost
    that much more than one each, or have spent the turn; the requests it
    was granted before it began, and cheap answers, never end it."""
    turn = Turn(512, lambda: None)
    turn.grant(64)
    left = turn.left
    assert not turn.pass_spent(left)                    # granted, nothing charged
    turn.charge(PASS_CHARGE_MAX - 1)
    assert not turn.pass_spent(left)
    turn.charge(1)
    assert turn.pass_spent(left)
    turn.renew()
    turn.grant(500)
    left = turn.left                                    # 12 left of the turn
    turn.charge(12)
    assert not turn.pass_spent(left)                    # the turn is used up, not overdrawn
    turn.charge(1)
    assert turn.pass_spent(left)                        # overdrawn by this pass
    assert not turn.pass_spent(turn.left)               # a pass begun now has charged nothing


def test_a_costly_read_leaves_a_quarter_of_the_turn_to_cheap_ones():
    """Turn.costly: the turn's first costly read is answered whatever it
    costs; another only if it leaves a quarter of the turn, else the turn
    ends (spent once) and the next takes it.  Cheap requests still have
    the quarter left."""
    spent = []
    turn = Turn(100, lambda: spent.append(1))
    assert turn.costly(90)                  # the first, past the quarter
    turn.charge(90)
    turn.renew()
    assert turn.costly(10) and turn.grant(1) == 1
    turn.charge(10)                         # 89 left
    assert turn.costly(64)                  # leaves 25, a quarter
    turn.charge(64)
    assert not turn.costly(1) and spent == [1]      # would leave 24
    assert not turn.costly(1) and spent == [1]      # spent once a turn
    assert turn.grant(20) == 20                     # cheap ones go on
    turn.renew()
    assert turn.costly(50) and spent == [1]


def test_a_flush_with_nothing_to_parse_spends_no_turn(tmp_path):
    """A connection's flush asked the turn for a whole pipeline's room to
    parse on even when it held nothing to parse: a grant of more than the
    turn had left ended it, counted, though the grant was refunded at
    once (on PostgreSQL, which flushes a connection as each page is
    answered, pages spent 74-76 turns where their cost was 44)."""
    async def main():
        led = Ledger(tmp_path / "led")
        try:
            async with served_in_process(led) as (server, host, port):
                reader, writer = await asyncio.open_connection(host, port)
                writer.write(get("/health"))
                assert (await read_reply(reader))[0] == b"200"
                [conn] = server.connections
                turn = server.turn
                turn.grant(turn.left - 1)           # the turn nearly spent
                was = server.metrics.turns_spent
                conn.flush()
                writer.close()
                return turn.left, server.metrics.turns_spent - was
        finally:
            led.close()

    assert uvloop.run(main()) == (1, 0)


FLOODERS = 40
PAGE = 100          # entries of each flooder's pages: a costly read
PAGE_GET = get(f"/past?cred=a&limit={PAGE}")
MOD = patch("/mod?cred=a&by=1")


async def _unread_pages(host, port, stop):
    """Pages pipelined and never read."""
    _, w = await asyncio.open_connection(host, port)
    w.write(PAGE_GET * 200)
    await stop.wait()
    w.transport.abort()


async def _reading(host, port, stop, burst, replies):
    """`burst` sent again and again, its `replies` read each time."""
    r, w = await asyncio.open_connection(host, port)
    while not stop.is_set():
        w.write(burst)
        for _ in range(replies):
            assert (await read_reply(r))[0] == b"200"
    w.transport.abort()


FLOODS = {
    # Pipelined pages, answered in the pass that takes them.
    "unread pages": _unread_pages,
    # Pages behind a write to their account: the store answers them
    # later (as PostgreSQL does every page), charged as they are taken.
    "pages behind a write": lambda h, p, stop: _reading(h, p, stop,
                                                        (MOD + PAGE_GET * 30) * 4, 124),
    # /metrics behind a write: each evaluated at its turn (Pipeline.drain);
    # few a burst, so that their charges, not their requests, spend turns.
    "metrics behind a write": lambda h, p, stop: _reading(h, p, stop,
                                                          MOD + get("/metrics") * 5, 6),
    # One page at a time: a quiet connection's one request (Connection._fast).
    "one page at a time": lambda h, p, stop: _reading(h, p, stop, PAGE_GET, 1),
}


@pytest.mark.parametrize("flood", sorted(FLOODS))
def test_a_health_check_among_clients_flooding_costly_reads_waits_no_round(tmp_path, flood):
    """Clients flood costly reads; a health check sent among them is
    answered in the turn that reads it (Turn.costly keeps a quarter of
    each turn for cheap requests), where it waited for a pass of every
    flooder (13 turns behind unread pages; up to 19-27 behind pages the
    store answers later, before they were charged as taken)."""
    async def main():
        led = Ledger(tmp_path / "led")
        try:
            for _ in range(PAGE):
                await led.amod("a", 1)
            limits = ServerLimits(turn_requests_max=100)
            async with served_in_process(led, limits) as (server, host, port):
                ends = _watch_turn_ends(server)
                stop = asyncio.Event()
                flooders = [asyncio.ensure_future(FLOODS[flood](host, port, stop))
                            for _ in range(FLOODERS)]
                while server.metrics.turns_spent < 3 * FLOODERS:
                    await asyncio.sleep(0.01)       # the flood goes round
                most = 0
                for _ in range(5):
                    reader, writer = await asyncio.open_connection(host, port)
                    was = server.metrics.turns_spent
                    writer.write(get("/health"))
                    assert (await read_reply(reader))[0] == b"200"
                    most = max(most, server.metrics.turns_spent - was)
                    writer.transport.abort()
                stop.set()
                await asyncio.gather(*flooders, return_exceptions=True)
                return most, min(ends)
        finally:
            led.close()

    turns, least_left = uvloop.run(main())
    # Its connection is accepted in one turn, its request read and answered
    # in the next; one more if a turn ends just as it is read.
    assert turns <= 3, turns
    # No turn costs more than its requests and one costly read: the first,
    # taken whatever is left.
    assert least_left >= -PAGE // PAGE_ENTRIES_PER_TURN_REQUEST, least_left


def _watch_turn_ends(server) -> list:
    """The server's Turn, replaced (before any connection takes it) by one
    that records what each turn had left when it was renewed."""
    ends = []
    loop = asyncio.get_running_loop()

    def renew():
        ends.append(turn.left)
        turn.renew()

    def spent():
        server.metrics.turns_spent += 1
        loop.call_soon(renew)
    turn = server.turn = Turn(server.turn.size, spent)
    return ends


def test_pages_read_alone_on_quiet_connections_keep_the_turn_s_quarter(tmp_path):
    """Connection._fast: a page that is the one request of a quiet
    connection is a costly read like any other (Turn.costly): quiet
    connections whose pages are all read in one turn are answered over
    several, each turn keeping a quarter of itself for cheap requests,
    where the fast path answered them all and overdrew the turn."""
    size, conns = 100, 6

    async def main():
        led = Ledger(tmp_path / "led")
        try:
            for _ in range(PAGE):
                await led.amod("a", 1)
            limits = ServerLimits(turn_requests_max=size)
            async with served_in_process(led, limits) as (server, host, port):
                ends = _watch_turn_ends(server)
                streams = [await asyncio.open_connection(host, port) for _ in range(conns)]
                for reader, writer in streams:
                    writer.write(get("/health"))
                    assert (await read_reply(reader))[0] == b"200"
                was = len(ends)
                for _, writer in streams:           # read in one loop turn
                    writer.write(PAGE_GET)
                for reader, writer in streams:
                    status, body = await read_reply(reader)
                    assert status == b"200" and body.count(b'"seq"') == PAGE, body[:80]
                    writer.transport.abort()
                return ends[was:]
        finally:
            led.close()

    ends = uvloop.run(main())
    # Two pages a turn (each costs PAGE // PAGE_ENTRIES_PER_TURN_REQUEST, 33:
    # the second leaves a quarter, less the reads' grants; the third would
    # not), so the first two turns end at their third page.
    assert len(ends) >= conns // 2 - 1, ends
    assert min(ends) >= size // 4 - conns, ends
