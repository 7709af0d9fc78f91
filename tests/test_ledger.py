"""The ledger's Python API against the SPEC's "Values" and "Durability and
order" rules."""

import asyncio
import copy
import enum
import functools
import os
import pathlib
import pickle
import random
import re
import subprocess
import sys
import threading
import time

import plyvel
import pytest

from accman import (AccManError, BadRequest, Busy, Insufficient, KeyReused, NoAccount,
                    Ledger, NotApplied, Overflow, StoreCorrupt, StoreError, StoreLocked,
                    Unavailable)
from accman.errors import EventsTrimmed, HttpError, UnexpectedReply
from accman.ledger import _ledger, backtoback, commit, fill
from accman.limits import EVENTS_RETENTION_S_MAX, INT64_MAX, INT64_MIN, PAST_LIMIT_MAX
from accman.store import check_cred, check_int64, check_key
from accman.ledger.leveldb import Store
from ledgerhelp import GatedStore, gated_ledger, outcome_within, wait_for


@pytest.fixture
def led(tmp_path):
    with Ledger(str(tmp_path / "data")) as led:
        yield led


def snapshot(led, cred):
    return led.tot(cred), led.past(cred, limit=PAST_LIMIT_MAX)


def test_first_mod_creates_the_account(led):
    assert led.tot("alice") is None
    assert led.mod("alice", 1000) == (1000, 1)
    assert led.tot("alice") == 1000
    assert led.mod("alice", -3) == (997, 2)
    assert led.tot("alice") == 997


def test_history_is_newest_first_with_all_fields(led):
    led.mod("alice", 1000)
    led.mod("alice", -3, min=0, key="req-17")
    entries = led.past("alice")
    assert [(e.seq, e.by, e.tot, e.key) for e in entries] == [
        (2, -3, 997, "req-17"), (1, 1000, 1000, None)]
    assert entries[0].at >= entries[1].at > 1_600_000_000_000


def test_past_pages_with_before_and_limit(led):
    for i in range(1, 11):
        led.mod("a", i)
    page = led.past("a", limit=4)
    assert [e.seq for e in page] == [10, 9, 8, 7]
    page = led.past("a", limit=4, before=page[-1].seq)
    assert [e.seq for e in page] == [6, 5, 4, 3]
    assert [e.seq for e in led.past("a", limit=4, before=3)] == [2, 1]
    assert led.past("a", before=1) == []
    assert [e.seq for e in led.past("a", limit=1)] == [10]
    assert [e.seq for e in led.past("a", before=1000)][:1] == [10]


class _Three(enum.IntEnum):
    X = 3


@pytest.mark.parametrize("call,says", [
    (lambda led: led.past("a", before=INT64_MAX + 1), "before must fit in a signed 64-bit"),
    (lambda led: led.past("a", before=2 ** 64), "before must fit in a signed 64-bit"),
    (lambda led: led.past("a", before=True), "before must be an int, got bool"),
    (lambda led: led.read_past("a", 10, 2 ** 64, print), "before must fit in a signed 64-bit"),
    (lambda led: led.read_past("a", 0, None, print), "limit must be an int from 1"),
    (lambda led: led.events(after=INT64_MAX + 1), "after must fit in a signed 64-bit"),
    (lambda led: led.events(after=2 ** 64), "after must fit in a signed 64-bit"),
    (lambda led: led.read_events(2 ** 64, 10, 0, print), "after must fit in a signed 64-bit"),
])
def test_a_seq_or_an_event_id_past_64_bits_is_refused_as_on_the_wire(led, call, says):
    """SPEC "Values": /past?before= and /events?after= past the signed
    64-bit range are 400 on the wire; here BadRequest, in the words of the
    check that by, min, hold and use get."""
    for by in (5, -1, -1):
        led.mod("a", by)
    with pytest.raises(BadRequest, match=f"^{says}"):
        call(led)
    assert [e.seq for e in led.past("a", before=INT64_MAX)] == [3, 2, 1]    # the bound is in
    assert led.events(after=INT64_MAX) == ([], 3)


@pytest.mark.parametrize("call,says", [
    (lambda led: led.past("a", limit="5"), "limit must be an int from 1 to 1000, got str"),
    (lambda led: led.past("a", limit=True), "limit must be an int from 1 to 1000, got bool"),
    (lambda led: led.past("a", limit=0), "limit must be an int from 1 to 1000$"),
    (lambda led: led.events(limit=5.0), "limit must be an int from 1 to 1000, got float"),
    (lambda led: led.read_events(0, 10, "1", print),
     "wait_s must be from 0 to 60 seconds, got str"),
    (lambda led: led.read_events(0, 10, 61.0, print), "wait_s must be from 0 to 60 seconds$"),
    (lambda led: led.hold("a", -1, "5"),
     "ttl must be a whole number of seconds from 1 to 86400, got str"),
    (lambda led: led.hold("a", -1, 5.0),
     "ttl must be a whole number of seconds from 1 to 86400, got float"),
    # An int subclass (an IntEnum) is said as one (a black-box probe: "must
    # be an int, got IE" read as a contradiction).
    (lambda led: led.mod("a", _Three.X), r"by must be an int, got _Three \(an int subclass: "
     r"a plain int is taken\)$"),
    (lambda led: led.past("a", limit=_Three.X), r"limit must be an int from 1 to 1000, got "
     r"_Three \(an int subclass"),
    (lambda led: led.hold("a", _Three.X, 5), r"by must be an int, got _Three \(an int subclass"),
])
def test_a_limit_wait_or_ttl_of_another_type_is_refused_naming_the_type(led, call, says):
    """As by, min and the other ints: a value of the wrong type is named by
    its type, so that a caller passing a query string's "5" sees why; a
    value out of range says the range alone."""
    led.mod("a", 5)
    with pytest.raises(BadRequest, match=f"^{says}"):
        call(led)
    assert led.tot("a") == 5 and led.open_holds == 0


def test_unknown_cred_reads_none(led):
    assert led.tot("nobody") is None
    assert led.past("nobody") is None


@pytest.mark.parametrize("cred", ["", "x" * 129, "al ice", "alice%20", "é", "a+b",
                                  "ａ", "a\x00", "a/b", b"alice", 5, None, ["alice"],
                                  {"a": 1}])
def test_bad_creds_are_refused_and_change_nothing(led, cred):
    led.mod("alice", 10)
    with pytest.raises(BadRequest, match="cred"):
        led.mod(cred, 1)
    with pytest.raises(BadRequest, match="cred"):
        led.tot(cred)
    with pytest.raises(BadRequest, match="cred"):
        led.past(cred)
    with pytest.raises(BadRequest, match="cred"):
        led.account_id(cred)
    assert snapshot(led, "alice")[0] == 10
    assert len(led) == 1


def test_cred_limits_are_inclusive(led):
    assert led.mod("x" * 128, 1) == (1, 1)
    assert led.mod("A-z_09", 1) == (1, 1)


@pytest.mark.parametrize("by,msg", [(0, "non-zero"), (True, "bool"), (1.0, "float"),
                                    ("5", "str"), (None, "NoneType"),
                                    (INT64_MAX + 1, "64-bit"), (INT64_MIN - 1, "64-bit")])
def test_bad_amounts_are_refused_and_change_nothing(led, by, msg):
    led.mod("alice", 10)
    before = snapshot(led, "alice")
    with pytest.raises(BadRequest, match=msg):
        led.mod("alice", by)
    assert snapshot(led, "alice") == before


@pytest.mark.parametrize("kw,msg", [({"min": 1.5}, "min"), ({"min": False}, "min"),
                                    ({"min": INT64_MAX + 1}, "min"),
                                    ({"key": ""}, "key"), ({"key": "k" * 65}, "key"),
                                    ({"key": "a b"}, "key"), ({"key": 7}, "key")])
def test_bad_min_and_key_are_refused(led, kw, msg):
    led.mod("alice", 10)
    before = snapshot(led, "alice")
    with pytest.raises(BadRequest, match=msg):
        led.mod("alice", -1, **kw)
    assert snapshot(led, "alice") == before


def test_min_refuses_and_reports_the_balance(led):
    led.mod("alice", 5)
    with pytest.raises(Insufficient) as e:
        led.mod("alice", -6, min=0)
    assert e.value.tot == 5 and e.value.code == "insufficient" and e.value.status == 409
    assert e.value.detail == "this mod (by -6) would take the balance 5 to -1, under min 0"
    assert led.mod("alice", -5, min=0) == (0, 2)
    assert led.mod("alice", -5, min=-5) == (-5, 3)
    assert [e.seq for e in led.past("alice")] == [3, 2, 1]


@pytest.mark.parametrize("by,min,key", [(-1, None, None), (-1, 0, None), (INT64_MIN, None, None),
                                        (-5, -100, "k1")])
def test_a_charge_on_an_unknown_account_is_no_account_and_opens_none(led, by, min, key):
    """SPEC: only a funding mod opens an account; a charge (with or without
    min) on an unknown credential is no_account and creates nothing."""
    with pytest.raises(NoAccount) as e:
        led.mod("ghost", by, min=min, key=key)
    assert e.value.status == 404 and e.value.code == "no_account"
    assert led.tot("ghost") is None and len(led) == 0 and led.past("ghost") is None
    assert led.mod("ghost", 3, key=key) == (3, 1)     # the key was not used up


def test_min_on_a_funding_mod_of_an_unknown_account_is_judged_against_zero(led):
    with pytest.raises(Insufficient) as e:
        led.mod("ghost", 5, min=10)
    assert e.value.tot == 0
    assert e.value.detail == "this mod (by 5) would take the balance 0 to 5, under min 10"
    assert led.tot("ghost") is None and len(led) == 0


def test_overflow_both_ways_changes_nothing(led):
    led.mod("hi", INT64_MAX)
    with pytest.raises(Overflow) as e:
        led.mod("hi", 1)
    assert e.value.code == "overflow"
    led.mod("lo", 1)
    led.mod("lo", -1)
    led.mod("lo", INT64_MIN)
    with pytest.raises(Overflow):
        led.mod("lo", -1)
    assert led.tot("hi") == INT64_MAX and led.tot("lo") == INT64_MIN
    assert led.mod("hi", -INT64_MAX) == (0, 2)


def test_idempotency_key_replays_and_refuses_reuse(led):
    led.mod("alice", 100)
    assert led.mod("alice", -7, min=0, key="k1") == (93, 2)
    assert led.mod("alice", -1) == (92, 3)
    # the original answer, not a new one
    assert led.mod("alice", -7, min=0, key="k1") == (93, 2)
    for kw in ({"by": -8, "min": 0}, {"by": -7, "min": 1}, {"by": -7, "min": None}):
        with pytest.raises(KeyReused):
            led.mod("alice", kw["by"], min=kw["min"], key="k1")
    assert led.tot("alice") == 92
    # keys are per account
    led.mod("bob", 10)
    assert led.mod("bob", -7, min=None, key="k1") == (3, 2)


def test_refused_mod_does_not_consume_its_key(led):
    led.mod("alice", 5)
    with pytest.raises(Insufficient):
        led.mod("alice", -10, min=0, key="k")
    led.mod("alice", 10)
    assert led.mod("alice", -10, min=0, key="k") == (5, 3)


def test_state_survives_reopen(tmp_path):
    path = str(tmp_path / "d")
    with Ledger(path) as led:
        led.mod("alice", 100)
        led.mod("alice", -1, key="k")
        led.mod("bob", 5)
    with Ledger(path) as led:
        assert led.tot("alice") == 99 and led.tot("bob") == 5
        assert led.mod("alice", -1, key="k") == (99, 2)      # key kept on disk
        with pytest.raises(KeyReused):
            led.mod("alice", -2, key="k")
        assert led.mod("alice", 1) == (100, 3)
        assert led.verify() == {"accounts": 2, "entries": 4, "keys": 1, "holds": 0,
                                "open_holds": 0, "events": 4}


def test_data_files_do_not_contain_credentials(tmp_path):
    path = tmp_path / "d"
    creds = ["Sup3rS3cretCredential_abcdefghij", "second-live-credential-0123456789"]
    with Ledger(str(path)) as led:
        for c in creds:
            led.mod(c, 10, key="a-key-value")
            led.tot(c)
    found = b""
    for root, _, files in os.walk(path):
        for f in files:
            found += open(os.path.join(root, f), "rb").read()
    assert b"a-key-value" in found      # the check itself can see plain text
    for c in creds:
        assert c.encode() not in found
        assert c.encode("utf-16-le") not in found


def test_a_second_open_is_refused_clearly(tmp_path):
    path = str(tmp_path / "d")
    with Ledger(path):
        with pytest.raises(StoreLocked, match="another process"):
            Ledger(path)


def test_closed_ledger_refuses_politely(tmp_path):
    led = Ledger(str(tmp_path / "d"))
    led.mod("a", 1)
    led.close()
    led.close()
    for call in (lambda: led.tot("a"), lambda: led.mod("a", 1), lambda: led.past("a")):
        with pytest.raises(Unavailable):
            call()
    assert not led.healthy


def test_a_ledger_is_true_empty_or_closed(tmp_path):
    """`len(led)` counts accounts, and Python took it for the ledger's
    truth: an empty ledger was false (`led = led or Ledger(path)` opened
    its directory again: StoreLocked), and a closed one raised Unavailable."""
    led = Ledger(str(tmp_path / "d"))
    assert led and len(led) == 0
    led.close()
    assert led


def test_open_without_create_on_missing_dir(tmp_path):
    with pytest.raises(StoreError, match="no such"):
        Ledger(str(tmp_path / "missing"), create=False)


def test_open_without_create_on_an_empty_dir_leaves_it_empty(tmp_path):
    """The refusal left a LOCK behind: a refused call changes nothing."""
    empty = tmp_path / "empty"
    empty.mkdir()
    with pytest.raises(StoreError, match="empty: no store in this directory$"):
        Ledger(str(empty), create=False)
    assert list(empty.iterdir()) == []


def _files(path):
    """Each file of a directory, and the directory itself, as (mode, bytes)."""
    found = {".": (os.stat(path).st_mode, None)}
    for name in os.listdir(path):
        with open(os.path.join(path, name), "rb") as f:
            found[name] = (os.stat(os.path.join(path, name)).st_mode, f.read())
    return found


@pytest.mark.parametrize("records", [0, 1, 5000])
def test_a_foreign_leveldb_is_refused_as_it_was_found(tmp_path, records):
    """Another program's LevelDB given as the data directory: refused, and
    not one of its files changed, not even a mode (its log unreplayed: a
    LevelDB open would have turned it into a table)."""
    import plyvel
    path = str(tmp_path / "d")
    db = plyvel.DB(path, create_if_missing=True)
    for i in range(records):
        db.put(b"x%05d" % i, b"y" * 100)
    db.close()
    os.chmod(path, 0o755)
    before = _files(path)
    with pytest.raises(StoreCorrupt, match="^.*/d: a LevelDB database without a format record: "
                       "not an AccMan store, or damaged; nothing was changed$"):
        Ledger(path)
    assert _files(path) == before


def test_a_leveldb_open_in_another_program_is_refused_as_it_was_found(tmp_path):
    """Another process has the LevelDB open (in this one, a closed
    descriptor of its LOCK would drop LevelDB's POSIX lock)."""
    path = str(tmp_path / "d")
    holder = subprocess.Popen(
        [sys.executable, "-c", "import plyvel, sys; db = plyvel.DB(sys.argv[1], "
         "create_if_missing=True); db.put(b'x', b'y'); print('open', flush=True); "
         "sys.stdin.read()", path], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline() == "open\n"
        os.chmod(path, 0o755)
        before = _files(path)
        with pytest.raises(StoreLocked, match="open in another process"):
            Ledger(path)
        assert _files(path) == before
    finally:
        holder.communicate("")


def _as_format_1(path, accounts):
    """Rewrites a format-2 store as format 1 wrote it: an account record
    (tot, seq) per account beside its history, and format 1 in the meta."""
    import json
    from accman.ledger.leveldb import META_KEY
    store = Store(path)
    meta = json.loads(store.db.get(META_KEY))
    for hid, (tot, seq) in accounts.items():
        store.db.put(_ledger.ACCOUNT_PREFIX + hid, _ledger.pack_account(tot, seq))
    store.db.put(META_KEY, json.dumps(dict(meta, format=1)).encode(), sync=True)
    store.close()
    return meta


def _stored(path):
    import plyvel
    db = plyvel.DB(path)
    try:
        return dict(db.iterator())
    finally:
        db.close()


def test_a_format_1_store_is_migrated_at_open(tmp_path):
    path = str(tmp_path / "d")
    with Ledger(path) as led:
        led.mod("alice", 10)
        led.mod("alice", -3, key="k1")
        led.mod("bob", 5)
        hids = {c: led._book.account(c).hid for c in ("alice", "bob")}
    meta = _as_format_1(path, {hids["alice"]: (7, 2), hids["bob"]: (5, 1)})
    with Ledger(path) as led:
        assert (led.tot("alice"), led.tot("bob")) == (7, 5)
        assert led.mod("alice", 1) == (8, 3)
        assert led.mod("alice", -3, key="k1") == (7, 2)     # the key survived
        assert led.verify()["accounts"] == 2
    records = _stored(path)
    assert not any(k.startswith(b"a") for k in records), "format-1 records left"
    import json
    from accman.ledger.leveldb import META_KEY, STORE_FORMAT
    assert json.loads(records[META_KEY]) == dict(meta, format=STORE_FORMAT)


def test_a_format_1_account_record_that_disagrees_with_history_is_refused(tmp_path):
    path = str(tmp_path / "d")
    with Ledger(path) as led:
        led.mod("alice", 10)
        hid = led._book.account("alice").hid
    _as_format_1(path, {hid: (11, 1)})
    before = _stored(path)
    with pytest.raises(StoreCorrupt, match="does not match"):
        Ledger(path)
    assert _stored(path) == before      # the migration changed nothing


@pytest.mark.parametrize("where", ["table", "log"])
def test_a_newer_store_format_is_refused_before_any_file_changes(tmp_path, where):
    """The newer format record in a table (a newer AccMan's open made one),
    or in LevelDB's log alone behind an older one in a table: refused
    before recovery or LevelDB changed a file (found.refuse_another_key
    reads the newest record, as LevelDB will).  In a log it was refused
    only after LevelDB's open had rewritten the files (the table's record
    was read first)."""
    import json
    from accman.ledger.leveldb import META_KEY, STORE_FORMAT
    path = str(tmp_path / "d")
    Ledger(path).close()
    Ledger(path).close()                # the record in a table
    store = Store(path)
    meta = json.loads(store.db.get(META_KEY))
    newer = STORE_FORMAT + 1
    store.db.put(META_KEY, json.dumps(dict(meta, format=newer)).encode(), sync=True)
    store.close()
    if where == "table":
        plyvel.DB(path).close()         # as a newer AccMan's open
    before = {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()}
    with pytest.raises(StoreCorrupt,
                       match=f"store format {newer}, this AccMan reads format {STORE_FORMAT}"):
        Ledger(path)
    assert {p.name: p.read_bytes() for p in (tmp_path / "d").iterdir()} == before


def test_accounts_load_from_the_newest_entry_of_each_history(tmp_path):
    """Open seeks from history to history backwards: neighbours in hid
    order, long and short histories, one entry, all come back exactly."""
    path = str(tmp_path / "d")
    want = {}
    with Ledger(path) as led:
        for i in range(200):
            cred = f"c{i}"
            for j in range(i % 7 + 1):
                tot, seq = led.mod(cred, i + j + 1)
            want[cred] = tot
    with Ledger(path, verify="heads") as led:
        assert len(led) == 200
        assert {c: led.tot(c) for c in want} == want
        assert led.mod("c5", 1)[1] == 5 % 7 + 2


class FailingStore(Store):
    """Fault injection: the Nth write (1-based) and all after it fail."""

    fail_from = 2
    writes = 0

    def write(self, wal_record):
        self.writes += 1
        if self.writes >= self.fail_from:
            raise StoreError(f"{self.path}: commit failed: injected fault")
        super().write(wal_record)


def test_failed_commit_acknowledges_nothing_and_stops_writes(tmp_path):
    path = str(tmp_path / "d")
    led = Ledger(path, store=FailingStore(path))
    assert led.mod("alice", 10) == (10, 1)
    with pytest.raises(Unavailable, match="failed to commit") as failed:
        led.mod("alice", 5)
    assert not isinstance(failed.value, NotApplied)     # its write may have reached the disk
    # The cause is the server's to log, never the client's to read.
    assert "injected" in led._committer.error.detail
    assert led.tot("alice") == 10            # the failed mod never shows
    assert not led.healthy
    # Every change from now on is refused before it applies.
    for change in (lambda: led.mod("bob", 1), lambda: led.hold("alice", -1, 60),
                   lambda: led.settle("alice", 1, 0)):
        with pytest.raises(NotApplied, match="takes no more writes"):
            change()
    assert led.tot("bob") is None
    led.close()
    with Ledger(path) as led:
        assert led.tot("alice") == 10 and [e.seq for e in led.past("alice")] == [1]
        assert led.mod("alice", 1) == (11, 2)   # seq continues without a gap


@pytest.mark.parametrize("where", ["after the write", "at seal"])
def test_a_fault_of_the_writer_s_own_fails_stop_and_never_hangs(tmp_path, monkeypatch, where):
    """A bug raised on the writer thread outside the store's write (its
    books after a durable write, or its housekeeping before a seal) ended
    the thread: every mod then waited for ever, the ledger still healthy.
    Now it is a failed commit: the waiting mod is told Unavailable, writes
    stop, and a reopen finds every durable change."""
    path = str(tmp_path / "d")
    led = Ledger(path)
    assert led.mod("alice", 10) == (10, 1)
    name = "_count" if where == "after the write" else "_housekeep"
    real = getattr(commit.Committer, name)

    def broken(self, *args):
        raise RuntimeError("a bug of the writer's")
    monkeypatch.setattr(commit.Committer, name, broken)
    got = outcome_within(lambda: led.mod("alice", 5), 10,
                         "the mod hung: the writer thread is gone")
    assert isinstance(got, Unavailable), got
    assert "a bug of the writer's" in led._committer.error.detail and not led.healthy
    with pytest.raises(Unavailable, match="failed to commit"):
        led.mod("bob", 1)
    monkeypatch.setattr(commit.Committer, name, real)
    led.close()
    with Ledger(path) as led:       # the first durable; the second only if it was written
        assert led.tot("alice") == (15 if where == "after the write" else 10)
        assert led.mod("alice", 1)[0] == led.tot("alice")


def test_an_open_whose_writer_cannot_start_leaves_the_directory_unlocked(tmp_path,
                                                                          monkeypatch):
    """Out of threads, the commit writer's start raises: the open fails, and
    the store it had opened is closed, so that the directory is not left
    locked for the rest of the process."""
    path = str(tmp_path / "d")
    with Ledger(path) as led:
        led.mod("alice", 3)
    real_start = threading.Thread.start

    def start(self):
        if self.name == "accman-commit":
            raise RuntimeError("can't start new thread")
        real_start(self)
    monkeypatch.setattr(threading.Thread, "start", start)
    with pytest.raises(RuntimeError, match="can't start new thread"):
        Ledger(path)
    monkeypatch.undo()
    with Ledger(path) as led:
        assert led.tot("alice") == 3


def test_failed_commit_fails_every_waiting_mod(tmp_path):
    path = str(tmp_path / "d")
    store = FailingStore(path)
    store.fail_from = 1
    led = Ledger(path, store=store)
    outcomes = []

    async def main():
        return await asyncio.gather(*[led.amod(f"c{i % 3}", i + 1) for i in range(50)],
                                    return_exceptions=True)

    outcomes = asyncio.run(main())
    assert all(isinstance(o, Unavailable) for o in outcomes)
    for c in ("c0", "c1", "c2"):
        assert led.tot(c) is None
    led.close()
    with Ledger(path) as led:
        assert len(led) == 0


def test_concurrent_threads_share_commits_and_lose_nothing(led):
    per, nthreads = 50, 8

    def work(t):
        for i in range(per):
            led.mod(f"t{t % 2}", 1, key=f"{t}-{i}")

    threads = [threading.Thread(target=work, args=(t,)) for t in range(nthreads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert led.tot("t0") + led.tot("t1") == per * nthreads
    assert led.stats["batches"] < per * nthreads      # some mods shared an fsync
    assert led.verify()["entries"] == per * nthreads


@pytest.mark.parametrize("done", [5, "print"])
def test_a_done_that_cannot_be_called_is_refused_and_changes_nothing(led, done):
    """submit took done=5: the mod was applied and made durable, the
    writer's call of 5 failed (logged), and the caller was never told.  A
    `done` neither callable nor None is TypeError naming it, before
    anything is applied; None tells nobody, also of an outcome known at
    once (it was a TypeError after the call, 'NoneType' not callable)."""
    led.mod("a", 10)
    for call in (lambda: led.submit("a", 5, done=done),
                 lambda: led.submit_hold("a", -1, 10, done=done),
                 lambda: led.submit_settle("a", 99, 0, done=done)):
        with pytest.raises(TypeError, match=f"^done must be a function taking the outcome, or "
                                            f"None; got {type(done).__name__}$"):
            call()
    led.submit("b", -1)             # NoAccount at once: nobody to tell
    led.submit("a", 5)
    assert led.mod("a", 1) == (16, 3)
    assert led.tot("b") is None


async def _told(outcome):
    raise AssertionError("a coroutine function's call runs none of its body")


class _Caller:
    async def told(self, outcome):
        raise AssertionError("never run")


class _CalledTold:
    async def __call__(self, outcome):
        raise AssertionError("never run")


async def _yields_told(outcome):
    yield outcome           # an async generator function's call runs none of its body


@pytest.mark.parametrize("done,makes", [
    (_told, "a coroutine, which nobody awaits"),
    (_Caller().told, "a coroutine, which nobody awaits"),
    (functools.partial(_told), "a coroutine, which nobody awaits"),
    (functools.partial(_Caller().told), "a coroutine, which nobody awaits"),
    (_CalledTold(), "a coroutine, which nobody awaits"),
    (_yields_told, "an async generator, which nobody iterates")])
def test_an_async_done_is_refused_and_changes_nothing(led, done, makes):
    """An `async def` done was taken: the change was applied and made
    durable, the writer's call made a coroutine that nobody awaited
    (RuntimeWarning at best), and the caller never heard its outcome.  An
    `async def` that yields (an async generator function) was still taken,
    and then was said to make a coroutine: it makes an async generator.
    A `functools.partial` of one, and an object whose `__call__` is one,
    were taken too."""
    led.mod("a", 10)
    for call in (lambda: led.submit("a", 5, done=done),
                 lambda: led.submit_hold("a", -1, 10, done=done),
                 lambda: led.submit_settle("a", 99, 0, done=done)):
        with pytest.raises(TypeError, match="^" + re.escape(
                "done must be a plain function, not an async one (its call only makes "
                f"{makes}): got ") + ".*(told|__call__)$"):
            call()
    assert led.mod("a", 1) == (11, 2) and led.open_holds == 0


class _Told:
    def __init__(self, seen=None):
        self.seen = [] if seen is None else seen

    def __call__(self, outcome):
        self.seen.append(outcome)


def test_a_plain_callable_of_any_kind_is_taken_and_told(led):
    """The async check reads a partial's function and an object's
    `__call__`: plain ones of those kinds, a bound method and a builtin are
    taken, and each is told its outcome."""
    seen = []
    led.mod("a", 10)
    for done in (functools.partial(seen.append), _Told(seen), _Told(seen).__call__,
                 seen.append):
        led.submit("a", 1, done=done)
    wait_for(lambda: len(seen) == 4, what="four outcomes")
    assert seen == [(11, 2), (12, 3), (13, 4), (14, 5)]


def test_asyncio_submits_apply_in_order_and_refuse_at_min(led):
    led.mod("acct", 100)

    async def main():
        return await asyncio.gather(*[led.amod("acct", -1, min=0) for _ in range(200)],
                                    return_exceptions=True)

    outcomes = asyncio.run(main())
    ok = [o for o in outcomes if isinstance(o, tuple)]
    refused = [o for o in outcomes if isinstance(o, Insufficient)]
    assert len(ok) == 100 and len(refused) == 100
    # applied in submission order: the first 100 won, seqs 2..101 in order
    assert ok == [(100 - i, i + 1) for i in range(1, 101)]
    assert all(r.tot == 0 for r in refused)
    assert led.tot("acct") == 0 and len(led.past("acct", limit=1000)) == 101


def test_reads_never_see_a_balance_before_it_is_durable(tmp_path):
    """While a batch is being written, tot still shows the old balance."""
    path = str(tmp_path / "d")
    gate = threading.Event()
    entered = threading.Event()

    class SlowStore(Store):
        def write(self, wal_record):
            entered.set()
            gate.wait(10)
            super().write(wal_record)

    led = Ledger(path, store=SlowStore(path))
    t = threading.Thread(target=led.mod, args=("alice", 10))
    t.start()
    assert entered.wait(10)
    assert led.tot("alice") is None and led.past("alice") is None
    gate.set()
    t.join()
    assert led.tot("alice") == 10
    led.close()


def test_refusal_judged_on_pending_state_waits_for_it(tmp_path):
    """An Insufficient judged against a not-yet-durable balance is told only
    after that balance is durable, and with it."""
    path = str(tmp_path / "d")
    gate = threading.Event()
    led = Ledger(path, store=GatedStore(path, gate))
    got = []
    led.submit("a", 5, done=got.append)
    led.submit("a", -6, min=0, done=got.append)
    assert got == []
    gate.set()
    led.close()
    assert got[0] == (5, 1) and isinstance(got[1], Insufficient) and got[1].tot == 5


def test_queued_mods_bound_gives_busy(tmp_path):
    path = str(tmp_path / "d")
    gate = threading.Event()
    led = Ledger(path, store=GatedStore(path, gate), queued_mods_max=3, batch_mods_max=2)
    got = []
    for _ in range(3):
        led.submit("a", 1, done=got.append)
    with pytest.raises(Busy, match=r"^QUEUED_MODS_MAX \(3\) changes are waiting for the disk"):
        led.submit("a", 1, done=got.append)
    gate.set()
    led.close()
    assert got == [(1, 1), (2, 2), (3, 3)]


def test_batch_size_bound_splits_batches(tmp_path):
    path = str(tmp_path / "d")
    gate = threading.Event()
    led = Ledger(path, store=GatedStore(path, gate), batch_mods_max=4)
    got = []
    for _ in range(10):
        led.submit("a", 1, done=got.append)
    gate.set()
    led.close()
    assert len(got) == 10
    sizes, _ = led.drain_samples()
    assert max(sizes) <= 4 and sum(sizes) == 10


def test_errors_carry_spec_codes():
    assert [c.code for c in (BadRequest, Insufficient, KeyReused, Overflow, Unavailable)] == [
        "bad_request", "insufficient", "key_reused", "overflow", "unavailable"]
    assert all(issubclass(c, AccManError) for c in (BadRequest, Busy, StoreLocked))


def test_an_insufficient_made_without_by_says_only_the_balance():
    """A store's refusal names by and min; one made without them (a
    caller's own) says nothing it does not know."""
    assert Insufficient(5).detail == "the balance 5 does not cover this mod"
    assert Insufficient(5, what="hold", by=-6, min_=0).detail == \
        "this hold (by -6) would take the balance 5 to -1, under min 0"


def test_a_refusal_survives_pickle_and_copy_whole(led):
    """A refusal crosses processes pickled (a ProcessPoolExecutor's worker)
    and is copied.  Each was rebuilt by calling its class with its detail:
    Insufficient and EventsTrimmed then said a garbled sentence ("the
    balance this mod (by -6) would take ... does not cover this mod"), and
    HttpError and UnexpectedReply could not be rebuilt at all (TypeError)."""
    led.mod("a", 5)
    with pytest.raises(Insufficient) as refused:
        led.mod("a", -6, min=0)
    errors = [refused.value, EventsTrimmed(5), HttpError(405, "method", "use GET", allow="GET"),
              UnexpectedReply(404, "not_found", "no such path"), Busy("retry shortly")]
    for error in errors:
        for again in (pickle.loads(pickle.dumps(error)), copy.copy(error), copy.deepcopy(error)):
            assert type(again) is type(error)
            assert (str(again), again.args, vars(again)) == (str(error), error.args, vars(error))


def test_blocking_mod_inside_an_event_loop_is_refused(led):
    async def main():
        led.bind_loop(asyncio.get_running_loop())
        with pytest.raises(RuntimeError, match="amod"):
            led.mod("a", 1)
        return await led.amod("a", 1)

    assert asyncio.run(main()) == (1, 1)
    assert led.mod("a", 1) == (2, 2)     # outside the loop it works again


def test_blocking_calls_inside_a_completion_callback_are_refused_not_hung(led):
    """A completion callback runs on the writer thread: a blocking call
    there would wait for the writer it stops, and every other caller with
    it.  It is refused, changing nothing; `submit` there works."""
    told, refusals = threading.Event(), []

    def done(outcome):
        for call in (lambda: led.mod("a", 1), lambda: led.hold("a", -1, 5),
                     lambda: led.settle("a", 1, 0), led.expire_due):
            try:
                refusals.append(call())
            except RuntimeError as e:
                refusals.append(str(e))
        led.submit("a", 2, done=lambda o: (refusals.append(o), told.set()))
    led.submit("a", 1, done=done)
    assert told.wait(10)
    assert [r[:60] for r in refusals[:4]] == ["Ledger calls block: inside a completion callback "
                                              "use `led.su"] * 4
    assert refusals[4] == (3, 2) and led.mod("a", 1) == (4, 3)


def test_a_completion_callback_that_raises_systemexit_leaves_the_writer_running(led):
    """sys.exit() in a completion callback (on the writer thread) ended the
    writer silently: the ledger still said healthy, and every later change
    waited for ever.  The callback's exception is logged, as any other's."""
    told = threading.Event()

    def done(outcome):
        told.set()
        sys.exit(3)
    led.submit("a", 5, done=done)
    assert told.wait(10)
    assert outcome_within(lambda: led.mod("a", 1), 5, "the writer is gone") == (6, 2)
    assert led.healthy


def test_async_writes_from_a_second_running_loop_are_refused_not_hung(led):
    """Completions go to the loop the ledger is bound to: a second loop,
    in another thread, while the first still runs, would wait for ever.
    It is refused, before anything is applied; once the first loop has
    ended, the next loop takes the ledger over."""
    first_running, first_may_end = threading.Event(), threading.Event()

    async def first():
        await led.amod("a", 1)
        first_running.set()
        while not first_may_end.is_set():
            await asyncio.sleep(0.01)

    thread = threading.Thread(target=asyncio.run, args=(first(),))
    thread.start()
    assert first_running.wait(10)

    async def second():
        with pytest.raises(RuntimeError, match="belong to another event loop, still running"):
            await led.amod("a", 1)

    try:
        asyncio.run(second())
        assert led.tot("a") == 1
    finally:
        first_may_end.set()
        thread.join(10)

    async def third():
        return await led.amod("a", 1)

    assert asyncio.run(third()) == (2, 2)


def test_bad_async_calls_from_a_loop_not_bound_are_badrequest_and_bind_nothing(led):
    """amod, ahold and asettle claimed the caller's loop before their values
    were checked: from a second loop while the bound one ran, bad values
    were a RuntimeError, not the BadRequest naming them; with no loop
    running bound, they bound the caller's loop, and a good call from
    another running loop was then refused."""
    bad_calls = [(lambda: led.amod("a", 0), "by must be non-zero"),
                 (lambda: led.amod("a b", 1), "cred must be a string"),
                 (lambda: led.amod("a", -1, low=5, key="b c"), "low is set by a funding"),
                 (lambda: led.ahold("a", 5, 10), "by must be negative for a hold"),
                 (lambda: led.ahold("a", -5, 10, key="b c"), "key must be a string"),
                 (lambda: led.asettle("a", 0, 0), "hold must be a hold id")]
    go, told, end = threading.Event(), [], threading.Event()

    async def first():          # runs all along; its first amod comes after the bad calls
        await asyncio.get_running_loop().run_in_executor(None, go.wait)
        told.append(await led.amod("a", 1))
        while not end.is_set():
            await asyncio.sleep(0.01)

    async def bad_ones():
        for call, says in bad_calls:
            with pytest.raises(BadRequest, match=says):
                await call()

    async def second():         # no loop bound yet: the bad calls bind none
        await bad_ones()
        go.set()
        while not told:
            await asyncio.sleep(0.01)

    thread = threading.Thread(target=asyncio.run, args=(first(),))
    thread.start()
    try:
        asyncio.run(asyncio.wait_for(second(), 5))
        assert told == [(1, 1)]
        asyncio.run(bad_ones())     # the first loop, bound, still runs: BadRequest all the same
        assert led.tot("a") == 1
    finally:
        go.set()
        end.set()
        thread.join(10)


def test_an_async_call_the_book_refuses_binds_no_loop(tmp_path):
    """A call refused at once only once the ledger's state is read (Busy,
    Unavailable) still bound the caller's loop, though it changed nothing:
    a good call from another running loop was then refused as if that loop
    had writes under way."""
    path = str(tmp_path / "d")
    gate = threading.Event()
    led = Ledger(path, store=GatedStore(path, gate), queued_mods_max=1)
    said, refused, end, durable = [], threading.Event(), threading.Event(), threading.Event()
    try:
        led.submit("a", 1, done=lambda _: durable.set())     # held: the queue is full

        async def first():          # runs all along, its one call refused
            try:
                await led.amod("a", 1)
            except Busy as e:
                said.append(type(e).__name__)
            refused.set()
            await asyncio.get_running_loop().run_in_executor(None, end.wait)

        thread = threading.Thread(target=asyncio.run, args=(first(),))
        thread.start()
        try:
            assert refused.wait(5) and said == ["Busy"]
            gate.set()
            assert durable.wait(5)

            async def second():
                return await asyncio.wait_for(led.amod("a", 2), 5)
            assert asyncio.run(second()) == (3, 2)
        finally:
            end.set()
            thread.join(10)
    finally:
        gate.set()
        led.close()


def test_a_bound_deliver_gets_each_batch_whole_on_the_loop(led):
    """bind_loop(loop, deliver): the batch's (done, outcome) pairs reach
    `deliver` on the loop's thread, and the ledger calls no `done` itself."""
    async def main():
        loop = asyncio.get_running_loop()
        batches, called = [], []

        def deliver(pairs):
            assert threading.get_ident() == loop_thread
            batches.append(list(pairs))
            if sum(map(len, batches)) == 20:
                finished.set_result(None)

        loop_thread = threading.get_ident()
        finished = loop.create_future()
        led.bind_loop(loop, deliver=deliver)
        for i in range(20):
            led.submit(f"c{i % 5}", i + 1, done=called.append)
        await asyncio.wait_for(finished, 10)
        return batches, called

    batches, called = asyncio.run(main())
    assert called == []
    pairs = [p for b in batches for p in b]
    assert [p[0] for p in pairs] == [pairs[0][0]] * 20
    assert sorted(p[1][1] for p in pairs if p[1][1]) == sorted(
        [s for c in range(5) for s in range(1, 5)])
    assert led.tot("c0") == 1 + 6 + 11 + 16


def test_a_kick_a_stopped_loop_never_ran_holds_up_neither_its_mods_nor_the_next_loop(led):
    """A mod queued on a loop goes to the writer by a kick at the end of
    that loop's turn.  A loop stopped in that very turn never runs it: its
    mod stayed queued for ever, and so did every mod of the next loop bound,
    since the ledger still counted on that kick and asked for no other."""
    first = asyncio.new_event_loop()

    def submit_then_stop():
        led.submit("a", 1)
        first.stop()            # the kick, due at the end of this turn, never runs

    led.bind_loop(first)
    first.call_soon(submit_then_stop)
    first.run_forever()
    first.close()
    assert led.stats["queued_mods"] == 1

    async def next_loop():
        led.bind_loop(asyncio.get_running_loop())
        deadline = time.monotonic() + 10
        while led.tot("a") is None and time.monotonic() < deadline:
            await asyncio.sleep(0.01)
        written = led.tot("a")
        return written, await asyncio.wait_for(led.amod("b", 2), 10)

    assert asyncio.run(next_loop()) == (1, (2, 1))



def test_a_new_loop_does_not_wait_for_the_former_loop_s_callers(led):
    """The fill target counts the callers of the loop whose batch set it:
    on another loop bound after it, the first mod goes at once."""
    led._committer.fill.wait_s = 60.0       # a wait would time the test out
    led._committer.fill.target_ttl_s = 60.0

    async def first():
        await _fill_one_batch(led, 8)       # the target: FILL_FRACTION of 8

    async def second():
        return await asyncio.wait_for(led.amod("g", 1), 10)

    asyncio.run(first())
    assert asyncio.run(second()) == (1, 1)
    assert led.drain_samples()[0] == [8, 1]

async def _short_batch_waits(led, cred, target):
    """On the running loop: 2 mods on `cred`, short of the fill target, then
    after 50 turns and 0.1 s (the writer's time to take a batch, were it
    sealed) the rest of the target; the balance read meanwhile (None while
    they wait: nothing of `cred` is durable)."""
    tasks = [asyncio.ensure_future(led.amod(cred, 1)) for _ in range(2)]
    for _ in range(50):
        await asyncio.sleep(0)
    await asyncio.sleep(0.1)
    waiting = led.tot(cred)
    tasks += [asyncio.ensure_future(led.amod(cred, 1)) for _ in range(target - 2)]
    await asyncio.wait_for(asyncio.gather(*tasks), 10)
    return waiting


def _back_to_back(c, at_once):
    """The writer's choice of accman.ledger.backtoback fixed for the test:
    always to follow a write at once with what queued during it (as on a
    disk that answers such writes faster), or never; each kind of write
    timed once beforehand (so `back_to_back_writes` starts at 1), and no
    probe."""
    b = c.back_to_back
    b.ratio = float("inf") if at_once else 0.0
    b.probe_every = 2 ** 62
    b.wrote(False, 1e-3)
    b.wrote(True, 1e-3)


def _fill_one_batch(led, n):
    """On the running loop: n concurrent amods, so one batch of n; after it
    the fill target is int(FILL_FRACTION * n)."""
    return asyncio.gather(*(led.amod(f"f{i}", 1) for i in range(n)))


def test_on_a_loop_the_next_batch_waits_for_the_mods_in_flight(led):
    """After a batch of 8 completes on the loop, the next one is handed to
    the writer only once FILL_FRACTION of 8 mods are queued: three arriving
    alone wait, turn after turn, and go with those that make the target."""
    led._committer.fill.wait_s = 60.0      # the target decides, not the clock
    led._committer.fill.target_ttl_s = 60.0   # however slow the test's turns
    target = int(fill.FILL_FRACTION * 8)
    assert 3 < target <= 8

    async def main():
        await _fill_one_batch(led, 8)
        first = [led.amod("g", 1) for _ in range(3)]
        tasks = [asyncio.ensure_future(c) for c in first]
        for _ in range(50):
            await asyncio.sleep(0)
        await asyncio.sleep(0.1)            # the writer's time to take a batch, were it sealed
        waiting = led.stats["batches"], led.tot("g")
        tasks += [asyncio.ensure_future(led.amod("g", 1)) for _ in range(target - 3)]
        results = await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return waiting, results

    waiting, results = asyncio.run(main())
    assert waiting == (1, None)             # still queued after 50 turns
    assert results == [(i, i) for i in range(1, target + 1)]
    sizes, _ = led.drain_samples()
    assert sizes == [8, target]


def test_a_batch_that_does_not_fill_is_written_after_the_fill_wait(led):
    led._committer.fill.wait_s = 0.05
    led._committer.fill.target_ttl_s = 60.0   # however slow the test's turns

    async def main():
        await _fill_one_batch(led, 8)
        t0 = time.perf_counter()
        got = await asyncio.wait_for(asyncio.gather(led.amod("g", 1), led.amod("g", 1)), 10)
        return got, time.perf_counter() - t0

    got, waited_s = asyncio.run(main())
    assert got == [(1, 1), (2, 2)]
    assert waited_s >= 0.05
    sizes, _ = led.drain_samples()
    assert sizes == [8, 2]


def test_a_fill_wait_cut_short_by_a_seal_does_not_shorten_the_next(tmp_path):
    """A fill wait that a plain thread's submit ends (its seal takes what
    waited) leaves no start time behind: the next batch below its target
    waits the whole FILL_WAIT_S again, not what is left of the old wait."""
    with gated_ledger(str(tmp_path / "data")) as (led, store):
        led._committer.fill.wait_s = 0.5        # the thread's seal comes well within it
        led._committer.fill.target_ttl_s = 60.0   # however slow the test's turns

        async def main():
            await _fill_one_batch(led, 12)              # the target: FILL_FRACTION of 12
            waiting = [asyncio.ensure_future(led.amod("g", 1)) for _ in range(4)]
            for _ in range(5):
                await asyncio.sleep(0)                  # 4, short of it: the fill wait starts
            store.gate.clear()
            thread = asyncio.ensure_future(asyncio.to_thread(led.mod, "t", 1))
            assert await asyncio.to_thread(store.writing.wait, 10)   # sealed: 4 + 1
            await asyncio.sleep(0.7)                    # past the old wait's end
            store.gate.set()
            await asyncio.wait_for(asyncio.gather(thread, *waiting), 10)   # target: of 5
            t0 = time.perf_counter()
            got = await asyncio.wait_for(led.amod("h", 1), 10)
            return got, time.perf_counter() - t0

        got, waited_s = asyncio.run(main())
        assert got == (1, 1)
        assert waited_s >= 0.5
        assert led.drain_samples()[0] == [12, 5, 1]


def test_after_a_fill_wait_runs_out_the_next_ones_are_not_begun(led):
    """Callers that do not come back in step let a fill wait run out (a
    miss): the next FILL_SKIPS_AFTER_MISS batches short of their target go
    at once; the one after waits again, and a wait that reaches its target
    is no miss."""
    led._committer.fill.wait_s = 0.05
    led._committer.fill.target_ttl_s = 60.0   # however slow the test's turns
    skips = fill.FILL_SKIPS_AFTER_MISS
    target = int(fill.FILL_FRACTION * 8)
    assert skips > 0 and 2 < target <= 8

    async def short_of_the_target():
        await _fill_one_batch(led, 8)           # the target: FILL_FRACTION of 8
        t0 = time.perf_counter()
        await asyncio.wait_for(asyncio.gather(led.amod("g", 1), led.amod("g", 1)), 10)
        return time.perf_counter() - t0

    async def waits_and_fills(cred):
        await _fill_one_batch(led, 8)
        return await _short_batch_waits(led, cred, target)

    async def main():
        missed_s = await short_of_the_target()  # the wait runs out: a miss
        led._committer.fill.wait_s = 60.0       # a wait begun now would time the test out
        for _ in range(skips):
            await short_of_the_target()
        return missed_s, await waits_and_fills("h"), await waits_and_fills("i")

    missed_s, *waiting = asyncio.run(main())
    assert missed_s >= 0.05
    assert waiting == [None, None]
    stats = led.stats                           # /metrics' counts
    assert (stats["fill_waits"], stats["fill_misses"], stats["fill_skips"]) == (3, 1, skips)
    assert led.drain_samples()[0] == [8, 2] * (1 + skips) + [8, target] * 2


class _LateWake:
    """The committer's condition, its notify reaching the writer `delay`
    seconds late: the writer slow to take a batch whose seal was asked."""

    def __init__(self, committer):
        self.committer, self.cond, self.delay = committer, committer._wake, 0.0

    def notify(self):
        if not self.delay:
            return self.cond.notify()

        def late():
            with self.committer.lock:
                self.cond.notify()
        threading.Timer(self.delay, late).start()

    def wait(self, timeout=None):
        return self.cond.wait(timeout)


def test_a_batch_whose_seal_was_asked_for_spends_no_skip(led):
    """Once its seal is asked for (here by a wait that ran out: a miss) a
    batch is the writer's, however late the writer wakes: the callers who
    queue meanwhile join it, no wait begins on it and no skip is spent."""
    c = led._committer
    c.fill.wait_s = 0.05
    c.fill.target_ttl_s = 60.0                  # however slow the test's turns
    late = c._wake = _LateWake(c)

    async def main():
        await _fill_one_batch(led, 8)           # the target: FILL_FRACTION of 8
        late.delay = 0.3
        tasks = [asyncio.ensure_future(led.amod("g", 1)) for _ in range(2)]
        await asyncio.sleep(0.1)                # the wait ran out; the writer not awake
        skips = [c.fill._skips]
        for i in range(4):                      # a caller a turn, the batch not taken
            tasks.append(asyncio.ensure_future(led.amod(f"p{i}", 1)))
            await asyncio.sleep(0.01)
            skips.append(c.fill._skips)
        late.delay = 0.0
        await asyncio.wait_for(asyncio.gather(*tasks), 10)
        return skips

    assert asyncio.run(main()) == [fill.FILL_SKIPS_AFTER_MISS] * 5
    assert led.drain_samples()[0] == [8, 6]


class _SealSeen:
    """The committer's book, its seal() setting `sealed`."""

    def __init__(self, book):
        self._book, self.sealed = book, threading.Event()

    def seal(self):
        batch = self._book.seal()
        self.sealed.set()
        return batch

    def __getattr__(self, name):
        return getattr(self._book, name)


def test_a_seal_the_writer_took_meanwhile_is_not_asked_for_again(tmp_path):
    """The loop's kick finds a seal asked for (the writer found changes
    queued at a batch's end) and, before it takes the lock, the writer
    seals them itself: the kick asks for no seal past that batch, or the
    flag would outlive it and cost the next short batch its fill wait."""
    with gated_ledger(str(tmp_path / "data")) as (led, store):
        c = led._committer
        _back_to_back(c, at_once=True)
        c.fill.wait_s = 60.0                    # a wait decides by its target here
        c.fill.target_ttl_s = 60.0              # however slow the test's turns
        book = c.book = _SealSeen(c.book)       # the writer's next look on
        in_window, handed, armed = threading.Event(), c._deliver, []

        def deliver(*args):                     # the writer, back from batch 1
            kicks = handed(*args)
            if armed and not in_window.is_set():
                assert in_window.wait(10)       # the loop's kick has looked
            return kicks

        stopped = c.fill.stop

        def stop():                             # the loop's kick, about to seal
            if armed and c._seal_now and not in_window.is_set():
                in_window.set()
                assert book.sealed.wait(10)     # the writer sealed batch 2 meanwhile
            stopped()
        c._deliver, c.fill.stop = deliver, stop

        async def main():
            store.gate.clear()
            first = [asyncio.ensure_future(led.amod(f"a{i}", 1)) for i in range(8)]
            assert await asyncio.to_thread(store.writing.wait, 10)     # batch 1 sealed
            armed.append(True)
            second = [asyncio.ensure_future(led.amod(f"b{i}", 1)) for i in range(8)]
            for _ in range(5):
                await asyncio.sleep(0)          # queued during its write
            store.gate.set()
            await asyncio.wait_for(asyncio.gather(*first, *second), 10)
            left = c._seal_now
            return in_window.is_set(), left, await _short_batch_waits(led, "g", target)

        target = int(fill.FILL_FRACTION * 8)
        assert 2 < target <= 8
        window, left, waiting = asyncio.run(main())
        assert window                           # the interleaving took place
        assert not left
        assert waiting is None                  # the short batch waited to fill
        assert led.drain_samples()[0] == [8, 8, target]


@pytest.mark.parametrize("aside", ["a_plain_thread_s_mod", "expire_due_with_none_due"])
def test_work_off_the_loop_leaves_no_seal_asked_for(led, aside):
    """A batch whose completions go to no loop (a plain thread's mod), or
    an expire_due with nothing due, asks for no seal past what it wrote:
    the loop's next short batch still waits to fill."""
    c = led._committer
    c.fill.wait_s = 60.0                        # a wait decides by its target here
    c.fill.target_ttl_s = 60.0                  # however slow the test's turns
    target = int(fill.FILL_FRACTION * 8)
    assert 2 < target <= 8

    async def main():
        await _fill_one_batch(led, 8)           # the target: FILL_FRACTION of 8
        if aside == "a_plain_thread_s_mod":
            await asyncio.to_thread(led.mod, "t", 1)
        else:
            assert await asyncio.to_thread(led.expire_due) == 0
        while c._writing:                       # the writer's step after that batch:
            await asyncio.sleep(0.001)          # what queues before it, it seals itself
        return await _short_batch_waits(led, "g", target)

    assert asyncio.run(main()) is None          # the short batch waited to fill
    plain = [1] if aside == "a_plain_thread_s_mod" else []
    assert led.drain_samples()[0] == [8, *plain, target]


def test_one_mod_at_a_time_on_a_loop_never_waits_to_fill(led):
    led._committer.fill.wait_s = 60.0      # a wait would time the test out
    led._committer.fill.target_ttl_s = 60.0   # however slow the test's turns

    async def main():
        return [await led.amod("one", 1) for _ in range(20)]

    got = asyncio.run(asyncio.wait_for(main(), 10))
    assert got == [(i, i) for i in range(1, 21)]
    sizes, _ = led.drain_samples()
    assert sizes == [1] * 20


def test_a_target_left_from_long_ago_is_not_waited_for(led):
    """A lone mod that comes FILL_TARGET_TTL_S after the completion that
    set the fill target goes at once: the callers the target counted, who
    call again within a round trip if at all, are gone."""
    led._committer.fill.wait_s = 60.0      # a wait would time the test out
    led._committer.fill.target_ttl_s = 0.05

    async def main():
        await _fill_one_batch(led, 8)           # the target: FILL_FRACTION of 8
        await asyncio.sleep(0.2)                # an idle spell past the target's ttl
        return await asyncio.wait_for(led.amod("g", 1), 10)

    assert asyncio.run(main()) == (1, 1)
    assert led.drain_samples()[0] == [8, 1]


def test_a_wait_begun_within_the_target_s_ttl_outlasts_it(led):
    """The ttl decides whether a wait begins, not how long it runs: a mod
    that comes at once after the batch waits past the ttl, and goes with
    the mods that make the target."""
    led._committer.fill.wait_s = 5.0
    led._committer.fill.target_ttl_s = 0.05
    target = int(fill.FILL_FRACTION * 8)
    assert 1 < target <= 8

    async def main():
        await _fill_one_batch(led, 8)
        first = asyncio.ensure_future(led.amod("g", 1))
        await asyncio.sleep(0.2)                # past the ttl, within the wait
        waiting = led.tot("g")
        rest = [asyncio.ensure_future(led.amod("g", 1)) for _ in range(target - 1)]
        t0 = time.perf_counter()
        got = await asyncio.wait_for(asyncio.gather(first, *rest), 10)
        return waiting, got, time.perf_counter() - t0

    waiting, got, took_s = asyncio.run(main())
    assert waiting is None
    assert got == [(i, i) for i in range(1, target + 1)]
    assert took_s < 4.0                         # the target sent it, not the wait's end
    assert led.drain_samples()[0] == [8, target]


def test_a_mod_from_another_thread_seals_a_filling_batch_now(led):
    """Mods waiting on the loop for their batch to fill are sealed at once
    when a plain thread submits: that caller is not made to wait."""
    led._committer.fill.wait_s = 60.0
    led._committer.fill.target_ttl_s = 60.0   # however slow the test's turns

    async def main():
        await _fill_one_batch(led, 8)
        tasks = [asyncio.ensure_future(led.amod("g", 1)) for _ in range(2)]
        for _ in range(10):
            await asyncio.sleep(0)
        from_thread = await asyncio.wait_for(asyncio.to_thread(led.mod, "t", 5), 10)
        return from_thread, await asyncio.wait_for(asyncio.gather(*tasks), 10)

    from_thread, got = asyncio.run(main())
    assert from_thread == (5, 1) and got == [(1, 1), (2, 2)]
    sizes, _ = led.drain_samples()
    assert sizes == [8, 3]


class _CountedWrites(GatedStore):
    """A GatedStore that counts the batches it has made durable."""

    def __init__(self, path):
        super().__init__(path)
        self.written = 0

    def write(self, wal):
        super().write(wal)
        self.written += 1


async def _queued_behind_a_write(led, store):
    """On the running loop, the store's gate closed: a's mod, its batch
    held at the gate, and b's queued behind it; their tasks."""
    store.gate.clear()
    first = asyncio.ensure_future(led.amod("a", 1))
    assert await asyncio.to_thread(store.writing.wait, 10)   # batch 1 at the gate
    second = asyncio.ensure_future(led.amod("b", 2))
    for _ in range(5):
        await asyncio.sleep(0)                  # b's mod is queued
    return first, second


def test_mods_queued_during_a_write_go_next_without_the_loop(tmp_path):
    """Where the disk answers a write that follows another faster, a write
    that ends with mods queued behind it is followed at once by theirs,
    sealed by the writer: the loop, busy with the first batch's replies
    (here, not turning at all), is not waited for.  Once both are
    answered and the writer is idle, the loop's own kick writes its next
    mod: the first batch's completion, seen after the second was sealed,
    left the loop's writing mark to the second's."""
    with gated_ledger(str(tmp_path / "data"), store_class=_CountedWrites) as (led, store):
        _back_to_back(led._committer, at_once=True)

        async def main():
            first, second = await _queued_behind_a_write(led, store)
            assert led.stats["queued_mods"] == 2 and store.written == 0
            store.gate.set()
            # The loop's thread held from here on: only the writer can move.
            deadline = time.monotonic() + 10
            while store.written < 2 and time.monotonic() < deadline:
                time.sleep(0.005)
            written = store.written
            results = await asyncio.wait_for(asyncio.gather(first, second), 10)
            return written, results + [await asyncio.wait_for(led.amod("c", 3), 10)]

        written, results = asyncio.run(main())
        assert written == 2
        assert results == [(1, 1), (2, 1), (3, 1)]
        assert led.drain_samples()[0] == [1, 1, 1]
        assert led.stats["back_to_back_writes"] == 1 + 1       # _back_to_back's, b's


def test_mods_queued_during_a_write_wait_for_the_loop_where_the_disk_answers_alike(tmp_path):
    """Where the disk answers a write that follows another no faster, the
    mods queued during a write wait for the loop's kick, once the batch is
    answered, with what its callers send next: while the loop does not
    turn, the writer writes nothing more."""
    with gated_ledger(str(tmp_path / "data"), store_class=_CountedWrites) as (led, store):
        _back_to_back(led._committer, at_once=False)

        async def main():
            first, second = await _queued_behind_a_write(led, store)
            store.gate.set()
            # The loop's thread held: the first write ends, the second waits for it.
            deadline = time.monotonic() + 10
            while store.written < 1 and time.monotonic() < deadline:
                time.sleep(0.005)
            time.sleep(0.3)
            held = store.written
            results = await asyncio.wait_for(asyncio.gather(first, second), 10)
            return held, results, store.written

        held, results, written = asyncio.run(main())
        assert held == 1
        assert results == [(1, 1), (2, 1)]
        assert written == 2
        assert led.drain_samples()[0] == [1, 1]
        assert led.stats["back_to_back_writes"] == 1           # _back_to_back's alone


def test_loop_mods_queued_behind_a_batch_no_loop_answers_are_sealed_by_the_writer(tmp_path):
    """Where the writer does not follow a write at once, a batch whose
    completions go to no loop (a plain thread's mod) brings no kick: the
    writer seals what the loop queued during its write itself."""
    with gated_ledger(str(tmp_path / "data"), store_class=_CountedWrites) as (led, store):
        _back_to_back(led._committer, at_once=False)
        store.gate.clear()

        async def main():
            store.gate.set()
            await led.amod("w", 1)                      # the loop bound
            store.gate.clear()
            plain = asyncio.ensure_future(asyncio.to_thread(led.mod, "t", 1))
            assert await asyncio.to_thread(store.writing.wait, 10)   # its batch at the gate
            queued = asyncio.ensure_future(led.amod("a", 2))
            for _ in range(5):
                await asyncio.sleep(0)                  # a's mod is queued
            store.gate.set()
            return await asyncio.wait_for(asyncio.gather(plain, queued), 10)

        assert asyncio.run(main()) == [(1, 1), (2, 1)]
        assert store.written == 3


def test_mods_queued_behind_a_batch_whose_loop_stopped_are_sealed_by_the_writer(tmp_path):
    """A bound loop that stops (not closed) with a batch's completions
    handed to it kicks nobody until it runs again: the writer seals what
    the loop queued during that write itself, and a plain thread's read
    in order sees it."""
    with gated_ledger(str(tmp_path / "data"), store_class=_CountedWrites) as (led, store):
        _back_to_back(led._committer, at_once=False)
        store.gate.clear()
        loop = asyncio.new_event_loop()
        try:
            led.bind_loop(loop)
            told = []

            async def submit(cred, by):
                led.submit(cred, by, done=told.append)

            loop.run_until_complete(submit("a", 1))
            assert store.writing.wait(10)               # a's batch at the gate
            loop.run_until_complete(submit("b", 2))     # queued during its write
            store.gate.set()                            # the loop stopped meanwhile
            wait_for(lambda: store.written == 2, what="b's batch written")
            assert told == []                           # the loop has not run since
            assert led.tot("b") == 2
        finally:
            loop.close()


def test_writes_sealed_at_another_s_asking_are_timed_as_neither_kind(tmp_path):
    """A plain thread's mod queued during a write is sealed at once at its
    asking, not by the writer's choice: that write is timed neither as one
    that followed by choice nor as one after a gap."""
    with gated_ledger(str(tmp_path / "data"), store_class=_CountedWrites) as (led, store):
        _back_to_back(led._committer, at_once=False)
        b = led._committer.back_to_back
        timed = b._after_gap[1], b._at_once[1]
        store.gate.clear()
        first = threading.Thread(target=led.mod, args=("t", 1))
        first.start()
        assert store.writing.wait(10)                   # its batch at the gate, after a gap
        second = threading.Thread(target=led.mod, args=("u", 1))
        second.start()
        wait_for(lambda: led.stats["queued_mods"] == 2, what="u's mod queued behind t's")
        store.gate.set()
        first.join(10)
        second.join(10)
        assert store.written == 2
        assert (b._after_gap[1], b._at_once[1]) == (timed[0] + 1, timed[1])   # t's alone


class _GapDisk(Store):
    """A store whose record writes are timed (Wal.write_s) as a disk's that
    answers in FAST_S a write the writer began without going idle since
    the last (back to back), and in SLOW_S one after it idled; or,
    `alike`, every one in SLOW_S.  `committer` is the ledger's."""

    FAST_S, SLOW_S = 40e-6, 500e-6
    alike = False
    committer = None

    def write(self, wal):
        super().write(wal)
        fast = not self.alike and not self.committer._idled
        self.wal.write_s = self.FAST_S if fast else self.SLOW_S


@pytest.mark.parametrize("alike", [False, True], ids=["faster_back_to_back", "alike"])
def test_the_writer_follows_a_write_at_once_by_the_disk_s_answers(tmp_path, alike):
    """16 callers on the loop, each calling again a random while (up to
    2 ms) after its answer, so that changes queue during writes: where the
    disk answers a write that follows another faster, most of those writes
    follow at once; where it answers alike, only the first try and the
    probes do."""
    class Disk(_GapDisk):
        pass
    Disk.alike = alike
    path = str(tmp_path / "data")
    pace = random.Random(7)
    with Ledger(path, store=Disk(path)) as led:
        led.store.committer = led._committer
        async def caller(n):
            for _ in range(100):
                await led.amod(f"c{n}", 1)
                await asyncio.sleep(pace.uniform(0, 0.002))

        async def main():
            await asyncio.wait_for(asyncio.gather(*(caller(n) for n in range(16))), 60)

        asyncio.run(main())
        followed = led.stats["back_to_back_writes"]
        decided = led._committer.back_to_back._decisions    # each kind timed, changes queued
    assert decided >= 10
    probes = decided // backtoback.BACK_TO_BACK_PROBE_EVERY
    # The first choice, before a write at once was ever timed, is to try one.
    assert followed == (1 + probes if alike else 1 + decided - probes)


def test_mods_the_loop_queues_once_answered_wait_for_the_batch_to_fill(tmp_path):
    """Only the mods queued during a write are taken at once by the writer
    (where it follows a write at once: accman.ledger.backtoback).
    It looked for them after handing the batch's completions to the loop,
    so mods the loop queued once answered (the next requests of the clients
    just answered) were taken at once too, not filled to the loop's target
    (FILL_*).  Here a plain thread's completion, run on the writer after the
    hand-over, holds it until the loop has queued 2 mods of a target of
    FILL_FRACTION of 9."""
    path = str(tmp_path / "data")
    gate, go, writer_back = threading.Event(), threading.Event(), threading.Event()
    armed = []

    def clock_ms():
        if armed and threading.current_thread().name == "accman-commit":
            writer_back.set()           # the writer looks for its next batch
        return time.time_ns() // 1_000_000

    led = Ledger(path, clock_ms=clock_ms, store=GatedStore(path, gate))
    _back_to_back(led._committer, at_once=True)
    led._committer.fill.wait_s = 60.0   # the target decides, not the clock
    led._committer.fill.target_ttl_s = 60.0   # however slow the test's turns
    target = int(fill.FILL_FRACTION * 9)
    assert 2 < target <= 9
    try:
        async def main():
            held = asyncio.ensure_future(led.amod("z", 1))
            assert await asyncio.to_thread(led._committer.store.writing.wait, 10)
            eight = [asyncio.ensure_future(led.amod(f"e{i}", 1)) for i in range(8)]
            await asyncio.to_thread(led.submit, "t", 1, done=lambda _: go.wait(10))
            for _ in range(5):
                await asyncio.sleep(0)          # the 8 and the thread's queued behind
            gate.set()                          # one batch of 9, then the target
            await asyncio.wait_for(asyncio.gather(held, *eight), 10)
            two = [asyncio.ensure_future(led.amod("g", 1)) for _ in range(2)]
            for _ in range(5):
                await asyncio.sleep(0)          # 2 queued: the loop waits to fill
            armed.append(True)
            go.set()
            assert await asyncio.to_thread(writer_back.wait, 10)
            two += [asyncio.ensure_future(led.amod("g", 1)) for _ in range(target - 2)]
            return await asyncio.wait_for(asyncio.gather(*two), 10)

        assert asyncio.run(main()) == [(i, i) for i in range(1, target + 1)]
        assert led.drain_samples()[0] == [1, 9, target]
    finally:
        gate.set()
        go.set()
        led.close()


def test_accounts_are_not_walked_by_the_garbage_collector(tmp_path):
    """A full collection walks every object the collector tracks: with a
    million accounts tracked it stalled the server ~0.1 s.  Accounts (and the
    dicts that hold only accounts) are not tracked, so loading or creating
    them adds nothing for it to walk."""
    import gc
    path = str(tmp_path / "d")
    with Ledger(path) as led:
        for i in range(50):
            led.mod(f"made-{i}", 1)
    book = _ledger.Book(b"k" * 16, lambda k: None)
    gc.collect()
    before = len(gc.get_objects())
    for i in range(20000):
        book.load(i.to_bytes(16, "big"), i, 1)
    assert len(gc.get_objects()) - before < 100
    with Ledger(path) as led:
        before = len(gc.get_objects())
        for i in range(2000):
            led.mod(f"new-{i}", 1)
        gc.collect()
        assert len(gc.get_objects()) - before < 100
        assert led.tot("new-1999") == 1 and len(led) == 2050


def _block_of(raw: bytes, prefix: bytes, nth: int) -> tuple[int, int]:
    """(offset, size) of the nth (from 0) data block of a LevelDB table
    whose last key starts with `prefix`, read from the table's index block."""
    from accman.ledger import tablecheck as tc
    _, _, index_off, index_size = tc.footer(raw, "table")
    index = tc.read_block(raw, memoryview(raw), index_off, index_size, len(raw), "index")
    for key, handle in tc.block_entries(index, "index"):
        if key.startswith(prefix):
            if nth == 0:
                return tc.block_handle(handle, "handle")
            nth -= 1
    raise AssertionError(f"no block of {prefix!r} records")


def _flip_a_history_byte(path):
    """Flips one byte inside a history record's block of a table file (a
    reopen first turns the log into a table).  Returns the table's name."""
    with Ledger(path):
        pass
    tables = [f for f in os.listdir(path) if f.endswith(".ldb")]
    assert tables, "expected a table file after reopen"
    name = max(tables, key=lambda f: os.path.getsize(os.path.join(path, f)))
    fp = os.path.join(path, name)
    data = bytearray(open(fp, "rb").read())
    # Data blocks come first in a table, in key order: the meta record,
    # events, history, then idempotency records; the index and footer are
    # at the end.  A byte in the second history block is in the history's
    # older entries: not the blocks of its first and newest, which every
    # open reads to load the account.
    off, length = _block_of(bytes(data), b"h", 1)
    data[off + length // 2] ^= 0x01
    open(fp, "wb").write(bytes(data))
    return name


@pytest.mark.parametrize("mode", ["full", "heads"])
def test_a_flipped_byte_in_a_table_is_refused_before_leveldb_opens(tmp_path, mode):
    path = str(tmp_path / "d")
    with Ledger(path) as led:
        for i in range(300):
            led.mod("alice", 1, key=f"hist-key-{i:04d}")
    name = _flip_a_history_byte(path)
    before = {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)}
    with pytest.raises(StoreCorrupt, match=f"damaged: table {name}"):
        Ledger(path, verify=mode)
    after = {f: open(os.path.join(path, f), "rb").read() for f in os.listdir(path)}
    assert after == before          # nothing repaired, nothing rewritten


def test_damage_met_after_open_is_refused_when_read(tmp_path):
    """With the file check skipped (verify="none"), a damaged page of
    history is refused when read, never served."""
    path = str(tmp_path / "d")
    with Ledger(path) as led:
        for i in range(300):
            led.mod("alice", 1, key=f"hist-key-{i:04d}")
    _flip_a_history_byte(path)
    with Ledger(path, verify="none") as led:
        assert led.tot("alice") == 300
        with pytest.raises(StoreCorrupt, match="damaged"):
            for before in range(301, 0, -50):
                led.past("alice", limit=50, before=before)


@pytest.mark.parametrize("option,value,says", [
    ("verify", "quick", "verify must be one of full, heads, none; got 'quick'"),
    ("verify", None, "verify must be one of full, heads, none; got None"),
    ("create", "no", "create must be True or False, got 'no'"),
    ("batch_mods_max", 0, "batch_mods_max must be an int from 1 to 4096, got 0"),
    ("batch_mods_max", 2 ** 64, "batch_mods_max must be an int from 1 to 4096"),
    ("batch_mods_max", True, "batch_mods_max must be an int from 1 to 4096, got True"),
    ("queued_mods_max", 65537, "queued_mods_max must be an int from 1 to 65536"),
    ("holds_max", -1, "holds_max must be an int from 1 to 1000000, got -1"),
    ("holds_per_account_max", 2 ** 70, "holds_per_account_max must be an int from 1 to 4096"),
    ("holds_per_account_max", 2.0, "holds_per_account_max must be an int from 1 to 4096"),
    ("events_retention_s", 0, "events_retention_s must be a number of seconds"),
    ("events_retention_s", 0.0009, "events_retention_s must be a number of seconds from "
                                   "0.001 to 3153600000, got 0.0009"),
    ("events_retention_s", float("inf"), "events_retention_s .* got inf"),
    ("events_retention_s", float("nan"), "events_retention_s .* got nan"),
    ("events_retention_s", "5", "events_retention_s .* got '5'"),
    ("events_retention_s", EVENTS_RETENTION_S_MAX + 1, "events_retention_s .* to 3153600000"),
    ("events_kept_after", -1, "events_kept_after must be an event id, "
                              "0 to 9223372036854775807, or None; got -1"),
    ("events_kept_after", 2 ** 63, "events_kept_after must be an event id, .* "
                                   "got 9223372036854775808"),
    ("events_kept_after", True, "events_kept_after must be an event id, .* got True"),
    ("events_kept_after", 3.0, "events_kept_after must be an event id, .* got 3.0"),
    ("low_balance", 2 ** 64, "low_balance must be an int in the signed 64-bit range"),
    ("low_balance", 5.0, "low_balance must be an int in the signed 64-bit range, got 5.0"),
    ("clock_ms", "now", "clock_ms must be a function returning unix milliseconds, got 'now'"),
    ("store", "data", "store must be an accman.ledger.leveldb.Store or None, got str"),
])
def test_a_wrong_option_is_refused_before_the_directory_is_touched(tmp_path, option, value,
                                                                   says):
    """Options past their bounds (limits.py) or of the wrong type are
    ValueError naming the option, before the store is made: a directory
    that was not there is still not there, one that was is unchanged."""
    with pytest.raises(ValueError, match=f"^{says}"):
        Ledger(str(tmp_path / "new"), **{option: value})
    assert not (tmp_path / "new").exists()
    path = str(tmp_path / "old")
    with Ledger(path) as led:
        led.mod("a", 5)
    before = {p: os.stat(os.path.join(path, p)).st_mtime_ns for p in os.listdir(path)}
    with pytest.raises(ValueError, match=f"^{says}"):
        Ledger(path, **{option: value})
    assert {p: os.stat(os.path.join(path, p)).st_mtime_ns for p in os.listdir(path)} == before


@pytest.mark.parametrize("event_id", [-1, 2 ** 63, True, 3.0, "3"])
def test_a_wrong_kept_event_id_is_bad_request_as_every_calls_argument(led, event_id):
    """docs/DESIGN.md: an option of the open is ValueError, an argument of a
    call BadRequest, and keep_events_after's is a call's (it was the one
    ValueError among them)."""
    with pytest.raises(BadRequest, match="^event_id must be an event id, 0 to "
                                         "9223372036854775807, or None; got "):
        led.keep_events_after(event_id)
    led.keep_events_after(INT64_MAX)
    led.keep_events_after(None)


@pytest.mark.parametrize("loop,deliver,says", [
    (1, None, "loop must be an asyncio event loop, got int"),
    (None, None, "loop must be an asyncio event loop, got NoneType"),
    ("loop", print, "loop must be an asyncio event loop, got str"),
    ("own", 5, "deliver must be a function taking a list of .*, or None; got int"),
    ("own", _told, "deliver must be a plain function, not an async one .*: got _told"),
    ("own", _yields_told, r"deliver must be a plain function, not an async one \(its call "
                          r"only makes an async generator, which nobody iterates\): got "
                          "_yields_told")])
def test_a_wrong_loop_or_deliver_is_refused_and_binds_nothing(led, loop, deliver, says):
    """bind_loop took anything: a loop that is not one made every later amod
    raise AttributeError, and a `deliver` that cannot be called, or an async
    one (its call only makes a coroutine), left every later amod waiting for
    ever, its mod applied."""
    async def bind_then_mod():
        with pytest.raises(BadRequest, match=f"^{says}$"):
            led.bind_loop(asyncio.get_running_loop() if loop == "own" else loop, deliver)
        return await asyncio.wait_for(led.amod("a", 5), 1)
    assert asyncio.run(bind_then_mod()) == (5, 1)
    assert asyncio.run(bind_then_mod()) == (10, 2)


@pytest.mark.parametrize("path,says", [
    ("", "path must name a directory, got an empty one"),
    (b"/tmp/accman-bytes-path", "path must be a str or a path object naming a directory, "
                                "got bytes"),
    (7, "path must be a str or a path object naming a directory, got int"),
    ("data\0dir", "path must not hold a NUL character"),        # was "embedded null byte"
    ("data\udcffdir", r"path must be valid UTF-8: AccMan writes the data directory's name in "
                      r"UTF-8 \(in its ready line and messages, and to LevelDB for an "
                      r"embedded store\)")])
def test_a_wrong_path_is_refused_before_anything_is_touched(tmp_path, monkeypatch, path, says):
    """An empty path would be the current directory, made 0700 and given
    a store; a bytes one left an empty directory behind, and one that is not
    UTF-8 a directory with a key and a log, refused by plyvel's words."""
    monkeypatch.chdir(tmp_path)
    mode = os.stat(tmp_path).st_mode
    with pytest.raises(ValueError, match=f"^{says}$"):
        Ledger(path)
    assert os.listdir(tmp_path) == [] and os.stat(tmp_path).st_mode == mode
    assert not os.path.exists("/tmp/accman-bytes-path")


@pytest.mark.parametrize("path", ["d", pathlib.Path("d")])
def test_a_relative_path_in_a_deleted_working_directory_is_refused_naming_it(
        tmp_path, monkeypatch, path):
    """Python's bare FileNotFoundError ("No such file or directory", naming
    nothing) came out of os.getcwd: refused, naming the path and why."""
    gone = tmp_path / "gone"
    gone.mkdir()
    monkeypatch.chdir(gone)
    gone.rmdir()
    with pytest.raises(ValueError, match=r"^path 'd' is relative, and the working directory "
                       r"it is relative to cannot be found \(No such file or directory; "
                       r"deleted\?\): give an absolute path$"):
        Ledger(path)
    assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("bounds", [
    dict(batch_mods_max=4096, queued_mods_max=65536, holds_max=1_000_000,
         holds_per_account_max=4096, events_retention_s=EVENTS_RETENTION_S_MAX,
         low_balance=INT64_MAX),
    dict(batch_mods_max=1, queued_mods_max=1, holds_max=1, holds_per_account_max=1,
         events_retention_s=0.001, low_balance=INT64_MIN)])
def test_every_option_takes_its_bounds(tmp_path, bounds):
    with Ledger(str(tmp_path / "d"), **bounds) as led:
        assert led.mod("a", 5) == (5, 1)
        assert led.hold("a", -1, 60) == (2, 4, 2)


@pytest.mark.parametrize("value", [INT64_MAX + 1, INT64_MIN - 1, 2 ** 64, True, 1.5, "5"])
def test_the_mod_path_words_a_64_bit_refusal_as_every_store_does(led, value):
    """ext's compiled check (the embedded store's mods) and
    accman.store.check_int64 (the PostgreSQL store's, and both stores'
    /past and /events) refuse the same value in the same words."""
    with pytest.raises(BadRequest) as compiled:
        led.mod("a", 1, min=value)
    with pytest.raises(BadRequest) as shared:
        check_int64(value, "min")
    assert compiled.value.detail == shared.value.detail
    assert led.tot("a") is None


class _Cred(str):
    pass


@pytest.mark.parametrize("value", [_Cred("alice"), b"alice", 5, None])
def test_a_cred_or_key_of_the_wrong_type_is_refused_naming_its_type(led, value):
    """Each was told "must be a string", the type it got unnamed.  Every
    path says the same words, the compiled one (ext/ledger.pyx: reads,
    mods, holds) and accman.store's (the PostgreSQL store's, an amod's on a
    new loop), and none quotes the value: a credential is a secret."""
    led.mod("alice", 5)
    named = type(value).__name__
    cred_says = ("cred must be a string of 1 to 128 characters from A-Z a-z 0-9 _ -, "
                 f"got {named}")
    key_says = f"key must be a string of 1 to 64 characters from A-Z a-z 0-9 _ -, got {named}"
    calls = [lambda: led.tot(value), lambda: led.past(value), lambda: led.mod(value, 1),
             lambda: led.hold(value, -1, 10), lambda: led.settle(value, 2, 0),
             lambda: led.account_id(value), lambda: asyncio.run(led.amod(value, 1)),
             lambda: check_cred(value)]
    key_calls = [lambda: led.mod("alice", 1, key=value), lambda: check_key(value)]
    told = [(call, cred_says) for call in calls]
    told += [(call, key_says) for call in key_calls] if value is not None else []
    for call, said in told:
        with pytest.raises(BadRequest) as refused:
            call()
        says = refused.value.detail
        assert says == said
        assert "alice" not in says and "b'" not in says and "5," not in says
    assert led.tot("alice") == 5 and led.past("alice")[0].seq == 1


def test_a_store_from_before_the_key_file_and_the_log_still_opens(tmp_path):
    """A LevelDB with AccMan's format record and nothing beside it (a store
    of the first AccMan, before its key file and its log) is read from a
    copy first (as another program's LevelDB is), then opened and kept."""
    from accman.ledger import keyfile
    from test_wal import as_before_the_log
    path = str(tmp_path / "d")
    with Ledger(path) as led:
        led.mod("alice", 10, key="k")
        salt = led.store.salt
    as_before_the_log(tmp_path / "d")
    with Ledger(path) as led:
        assert led.tot("alice") == 10
        assert led.mod("alice", 10, key="k") == (10, 1)        # its key record kept
        assert led.store.salt == salt
    assert keyfile.read_key(path) == salt


def test_an_account_is_counted_once_its_first_change_is_durable():
    """len() and /metrics' accman_accounts read durable state: an account
    whose funding mod is still in a batch being written is not counted,
    nor one whose batch failed."""
    book = _ledger.Book(b"k" * 16, lambda k: None)
    book.load(b"\x01" * 16, 5, 1)
    assert len(book) == 1
    book.apply("new-1", 10, None, None, None, False, 1)
    book.apply("new-1", -3, None, None, None, False, 2)       # the same account, pending
    assert len(book) == 1
    batch = book.seal()
    book.finish(batch)
    assert len(book) == 2
    book.apply("new-2", 10, None, None, None, False, 3)
    book.fail(book.seal())
    assert len(book) == 2
