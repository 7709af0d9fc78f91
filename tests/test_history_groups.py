"""An account's history as LevelDB keeps it (store format 5,
ext/history.pxi): one record per account and batch, keyed by the newest
seq, its entries newest first; the one record per change of formats 2-4
read as a group of one.  /past, open and verify read both; a damaged group
is refused, never served."""

import asyncio
import json
import logging
import random
import struct
import subprocess
import sys

import plyvel
import pytest

from accman import Ledger
from accman.errors import StoreCorrupt
from accman.ledger import _ledger
from accman.ledger.leveldb import META_KEY, STORE_FORMAT
from test_open_holds import rewrite

# --- helpers ----------------------------------------------------------------


def in_batches(*batches):
    """Each list of coroutines submitted in one loop turn, so that it is one
    batch, the next once it is answered; all on one event loop, where a
    batch is sealed at the end of the turn (after a plain call, the writer
    may seal the next batch at its first change).  Returns their answers."""
    async def run():
        return [await asyncio.gather(*batch) for batch in batches]
    return asyncio.run(run())


def history_records(path) -> dict:
    """{(hid, newest seq): raw value} of every history record of a closed store."""
    db = plyvel.DB(path)
    try:
        return {(k[1:17], _ledger.history_key_seq(k)): v
                for k, v in db.iterator(prefix=_ledger.HISTORY_PREFIX)}
    finally:
        db.close()


def one_entry_record(by, tot, at, key, hold):
    """A history record of formats 2-4 (ext/records.pxi, versions 1 and 2)."""
    tail = key.encode() if key else b""
    if hold is None:
        return struct.pack(">Bqqq", 1, by, tot, at) + tail
    return struct.pack(">Bqqqq", 2, by, tot, at, hold) + tail


def as_format_4(path):
    """The store's history rewritten as formats 2-4 wrote it: a record per
    change, the format record saying 4."""
    puts, deletes = [], []
    for (hid, seq), v in history_records(path).items():
        deletes.append(_ledger.history_key(hid, seq))
        for s, *entry in _ledger.unpack_history_group(seq, v):
            puts.append((_ledger.history_key(hid, s), one_entry_record(*entry)))
    rewrite(path, puts=puts, deletes=deletes, fmt=4)


def check_pages(led, cred, full):
    """Every page of /past (several limits, every `before`) is the slice of
    `full` (newest first) that it names."""
    newest = full[0][0]
    for limit in (1, 2, 3, 7, 1000):
        for before in [None, *range(1, newest + 2)]:
            last = newest if before is None else min(newest, before - 1)
            want = [e for e in full if e[0] <= last][:limit]
            got = [tuple(e) for e in led.past(cred, limit=limit, before=before)]
            assert got == want, (cred, limit, before)


# --- the records --------------------------------------------------------------


def test_an_account_changed_in_one_batch_is_one_record_newest_first(path, clock):
    with Ledger(path, clock_ms=clock) as led:
        in_batches([led.amod("b", 5)],
                   [led.amod("a", 10), led.amod("b", 1), led.amod("a", -3, key="k1"),
                    led.ahold("a", -4, 60), led.amod("a", 2)])
        hid_a, hid_b = (led._book.account(c).hid for c in "ab")
        assert led.tot("a") == 5 and led.tot("b") == 6
    records = history_records(path)
    assert sorted(records) == sorted([(hid_a, 4), (hid_b, 1), (hid_b, 2)])
    at = clock()
    assert _ledger.unpack_history_group(4, records[(hid_a, 4)]) == [
        (4, 2, 5, at, None, None), (3, -4, 3, at, None, 3), (2, -3, 7, at, "k1", None),
        (1, 10, 10, at, None, None)]
    with Ledger(path, clock_ms=clock) as led:
        assert (led.tot("a"), led.tot("b")) == (5, 6)
        assert led.mod("a", -3, key="k1") == (7, 2)                 # the key's replay
        assert [e.seq for e in led.past("a", limit=2, before=4)] == [3, 2]
        assert led.verify()["entries"] == 6


def test_pages_of_past_across_groups_are_the_history(path, clock):
    """Random changes of three accounts (keyed mods, holds, settles) in
    batches of random sizes: every page of /past is the history's slice,
    before a restart and after it, and verify passes."""
    rng = random.Random(5)
    full = {c: [] for c in "xyz"}           # cred -> [(seq, by, tot, at, key, hold)]

    async def changes(led):
        await asyncio.gather(*[led.amod(c, 1000) for c in full])
        for n in range(40):
            creds = [rng.choice("xyz") for _ in range(rng.randint(1, 12))]
            await asyncio.gather(*[led.amod(c, rng.randint(-9, 9) or 1,
                                            key=f"k{n}-{i}" if i % 3 else None)
                                   for i, c in enumerate(creds)])
            if n % 5 == 0:
                hold, _, _ = await led.ahold("x", -7, 60)
                await asyncio.gather(led.amod("x", -1), led.asettle("x", hold, 3),
                                     led.amod("x", 2))
            clock.advance(1)

    with Ledger(path, clock_ms=clock) as led:
        asyncio.run(changes(led))
        for c in full:
            full[c] = [tuple(e) for e in led.past(c, limit=1000)]
            tots = [e[2] for e in reversed(full[c])]
            assert tots == [sum(e[1] for e in reversed(full[c][i:])) for i in
                            range(len(full[c]) - 1, -1, -1)]
            check_pages(led, c, full[c])
        assert led.verify()["entries"] == sum(map(len, full.values()))
    assert len(history_records(path)) < sum(map(len, full.values())) / 2
    with Ledger(path, clock_ms=clock) as led:
        for c in full:
            check_pages(led, c, full[c])
            assert led.tot(c) == full[c][0][2]


def test_a_format_4_store_is_read_as_it_is_and_its_format_record_upgraded(path, clock):
    """Formats 2-4's records are groups of one: nothing is rewritten but the
    format record; the new batches' groups sit beside them."""
    with Ledger(path, clock_ms=clock) as led:
        [_, [(hold, _, _)]] = in_batches([led.amod("a", 1, key=f"k{i}") for i in range(5)],
                                         [led.ahold("a", -2, 60)])
        led.settle("a", hold, 1)
    as_format_4(path)
    old = history_records(path)
    assert len(old) == 7
    with Ledger(path, clock_ms=clock) as led:
        assert json.loads(led.store.get(META_KEY))["format"] == STORE_FORMAT == 5
        [[replay], _] = in_batches([led.amod("a", 1, key="k2")],
                                   [led.amod("a", 1) for _ in range(3)])
        assert replay == (3, 3)                                     # from format 4
        full = [tuple(e) for e in led.past("a", limit=1000)]
        assert [e[0] for e in full] == list(range(10, 0, -1)) and full[0][2] == 7
        check_pages(led, "a", full)
        assert led.verify()["entries"] == 10
    records = history_records(path)
    assert {k: v for k, v in records.items() if k in old} == old
    assert len(records) == 8


# --- damage -------------------------------------------------------------------


@pytest.fixture
def grouped(path, clock):
    """Account a: seq 1 alone, seqs 2-6 in one group. Returns a's hid."""
    with Ledger(path, clock_ms=clock) as led:
        in_batches([led.amod("a", 10)], [led.amod("a", i) for i in range(1, 6)])
        return led._book.account("a").hid


def test_a_group_cut_short_is_refused_at_open(path, grouped):
    """Anywhere: a group says how many entries it holds."""
    value = history_records(path)[(grouped, 6)]
    for n in range(1, len(value)):
        rewrite(path, puts=[(_ledger.history_key(grouped, 6), value[:n])])
        with pytest.raises(StoreCorrupt, match="history|cut short|unknown format"):
            Ledger(path).close()


def test_a_damaged_older_group_is_refused_by_past_and_verify(path, grouped, clock):
    with Ledger(path, clock_ms=clock) as led:
        led.mod("a", 1)                                             # seq 7, a record of its own
    value = bytearray(history_records(path)[(grouped, 6)])
    assert value[:3] == bytes([3, 5, 10])                           # 5 entries, seq 6's by 5
    value[2] = 8                                                    # by 4
    rewrite(path, puts=[(_ledger.history_key(grouped, 6), bytes(value))])
    with Ledger(path, clock_ms=clock) as led:
        assert led.tot("a") == 26 and led.past("a", limit=1)[0].seq == 7
        with pytest.raises(StoreCorrupt, match="history entry 6: tot is not the previous"):
            led.verify()
    value[-1] = 7                                                   # a key length past the end
    rewrite(path, puts=[(_ledger.history_key(grouped, 6), bytes(value))])
    with Ledger(path, clock_ms=clock) as led:
        with pytest.raises(StoreCorrupt, match="the history record of seq 6: a history "
                                               "group is cut short"):
            led.past("a", limit=3)


def test_a_group_that_reaches_below_seq_1_is_refused(path, grouped):
    """Seqs 2-6 keyed as 4: its entries would be seqs 4, 3, 2, 1, 0."""
    value = history_records(path)[(grouped, 6)]
    rewrite(path, puts=[(_ledger.history_key(grouped, 4), value)],
            deletes=[_ledger.history_key(grouped, 6), _ledger.history_key(grouped, 1)])
    with pytest.raises(ValueError, match="a history group reaches below seq 1"):
        _ledger.unpack_history_group(4, value)
    with pytest.raises(StoreCorrupt, match="a history group reaches below seq 1"):
        Ledger(path).close()


@pytest.mark.parametrize("value,says", [
    (bytes([3, 1, 2, 2, 0, 0, 0]), None),                          # seq 1: by 1, tot 1
    (bytes([3, 1, 2, 2, 0, 0, 0, 7]), "has bytes after its entries"),
    (bytes([3, 1, 2, 2, 0]) + b"\x80" * 9 + bytes([1, 0]), "names a hold past the largest id"),
    (bytes([3, 1, 0x82]) + b"\x80" * 8 + bytes([0x7E, 2, 0, 0, 0]), "a number past 64 bits"),
    (bytes([3, 0]), "count of entries is cut short or 0"),
    (bytes([3, 2, 2, 2, 0, 0, 0]), "reaches below seq 1"),
])
def test_a_malformed_group_is_refused(value, says):
    if says is None:
        assert _ledger.unpack_history_group(1, value) == [(1, 1, 1, 0, None, None)]
    else:
        with pytest.raises(ValueError, match=says):
            _ledger.unpack_history_group(1, value)


def test_a_record_of_an_unknown_version_is_refused():
    for value in (b"", b"\x03", b"\x04\x00\x00\x00\x00\x00"):
        with pytest.raises(ValueError, match="history record of unknown format"):
            _ledger.unpack_history_group(1, value)


# --- the write-ahead log's changes into groups -----------------------------------


def varint(v):
    out = bytearray()
    while v >= 0x80:
        out.append(v & 0x7F | 0x80)
        v >>= 7
    out.append(v)
    return bytes(out)


def zigzag(v):
    return varint((v << 1) ^ (v >> 63) if v >= 0 else ((-v) << 1) - 1)


def change(hid, seq, by, tot, at_delta):
    """A mod's entry as ext/changes.pxi documents it."""
    return (bytes([1]) + hid + varint(seq) + zigzag(by) + zigzag(tot) + zigzag(at_delta)
            + varint(0) + bytes([0]))


def block(*entries):
    body = b"".join(entries)
    return b"\x00" + struct.pack(">QII", 1, len(entries), len(body)) + body


def test_a_batch_s_changes_become_one_group_per_account():
    a, b = b"A" * 16, b"A" * 8 + b"B" * 8           # one slot, told apart by the whole hid
    puts = dict(_ledger.leveldb_puts(block(change(a, 1, 5, 5, 1000), change(b, 7, 1, 8, 1),
                                           change(a, 2, -2, 3, 0), change(a, 3, 4, 7, 2))))
    assert _ledger.unpack_history_group(3, puts.pop(_ledger.history_key(a, 3))) == [
        (3, 4, 7, 1003, None, None), (2, -2, 3, 1001, None, None), (1, 5, 5, 1000, None, None)]
    assert _ledger.unpack_history_group(7, puts.pop(_ledger.history_key(b, 7))) == [
        (7, 1, 8, 1001, None, None)]
    assert list(puts) == [_ledger.events_key(4)]


def test_a_batch_whose_account_skips_a_seq_is_refused():
    a = b"A" * 16
    with pytest.raises(ValueError, match="changes skip a seq of an account"):
        _ledger.leveldb_puts(block(change(a, 1, 5, 5, 0), change(a, 3, 1, 6, 0)))


# --- an upgrade over an older AccMan's crash --------------------------------------

# An AccMan of store format 4: one history record a change (the format is
# kept at 4, and LevelDB's write batches made as formats 2-4 made them),
# its memtable written out often, crashing after 300 batches that each
# change 8 accounts 4 times.
OLDER_ACCMAN_CRASHES = """
import asyncio, os, struct, sys
from accman import Ledger
from accman.ledger import _ledger, leveldb, migrate

migrate.through_log = lambda *args: None
leveldb.WRITE_BUFFER_BYTES = 64 * 1024

def one_entry_a_record(wb, payload):
    for k, v in _ledger.leveldb_puts(payload):
        if v is None:
            wb.delete(k)
        elif k[:1] != _ledger.HISTORY_PREFIX:
            wb.put(k, v)
        else:
            for seq, by, tot, at, key, hold in _ledger.unpack_history_group(
                    _ledger.history_key_seq(k), v):
                head = (struct.pack(">Bqqq", 1, by, tot, at) if hold is None
                        else struct.pack(">Bqqqq", 2, by, tot, at, hold))
                wb.put(_ledger.history_key(k[1:17], seq), head + (key or "").encode())

_ledger.fill_write_batch = one_entry_a_record
led = Ledger(sys.argv[1])

async def run():
    for _ in range(300):
        await asyncio.gather(*[led.amod(f"c{i % 8}", 1) for i in range(32)])

asyncio.run(run())
os._exit(0)
"""


def test_an_upgrade_replaying_an_older_accman_s_log_leaves_one_record_an_entry(
        path, caplog):
    """The replay of the older AccMan's log writes each batch's history as
    format 5 does, over the one-entry records of it that LevelDB kept in its
    tables: those are checked against it and deleted in the same write, so
    that no entry is in two records (verify would see a gap)."""
    Ledger(path).close()
    rewrite(path, fmt=4)
    subprocess.run([sys.executable, "-c", OLDER_ACCMAN_CRASHES, path], check=True, timeout=120)
    with caplog.at_level(logging.INFO, logger="accman.ledger.leveldb"):
        led = Ledger(path)
    try:
        replaced = [r.getMessage() for r in caplog.records if "replaced" in r.getMessage()]
        assert len(replaced) == 1 and "history records of format 4 replaced" in replaced[0]
        assert led.verify()["entries"] == 9600
        for i in range(8):
            full = [tuple(e) for e in led.past(f"c{i}", limit=1000)] + \
                [tuple(e) for e in led.past(f"c{i}", limit=1000, before=201)]
            assert [(e[0], e[2]) for e in full] == [(s, s) for s in range(1200, 0, -1)]
    finally:
        led.close()
    records = history_records(path)
    for (hid, newest), value in records.items():
        count = len(_ledger.unpack_history_group(newest, value))
        assert not any((hid, s) in records for s in range(newest - count + 1, newest))


def test_a_replayed_batch_s_record_is_checked_against_the_older_ones_it_covers(tmp_path):
    """migrate.covered_records: an older one-entry record that the replayed
    group covers is deleted if it says the same, refused if not; one that
    is not there is nothing; the newest seq's key is overwritten, checked."""
    from accman.ledger import migrate
    hid = b"H" * 16
    group = dict(_ledger.leveldb_puts(block(change(hid, 1, 5, 5, 1000), change(hid, 2, 1, 6, 0),
                                            change(hid, 3, 2, 8, 0))))
    puts = list(group.items())
    db = plyvel.DB(str(tmp_path / "db"), create_if_missing=True)
    try:
        assert migrate.covered_records(db, "d", puts) == []
        db.put(_ledger.history_key(hid, 1), one_entry_record(5, 5, 1000, None, None))
        db.put(_ledger.history_key(hid, 3), one_entry_record(2, 8, 1000, None, None))
        assert migrate.covered_records(db, "d", puts) == [(_ledger.history_key(hid, 1), None)]
        db.put(_ledger.history_key(hid, 2), one_entry_record(1, 7, 1000, None, None))
        with pytest.raises(StoreCorrupt, match="d: history entry 2 of a replayed batch differs"):
            migrate.covered_records(db, "d", puts)
    finally:
        db.close()
