"""Storage faults (SPEC "Durability and order"): a disk that fills up, a
commit that fails after its write, and data files with a flipped bit.

* A full disk, for real: the data directory is on an 8 MiB tmpfs that a
  filler file fills.  The batch that cannot be written is answered 503,
  nothing in it is acknowledged, the server takes no more writes (even once
  the space is back), /health says 503; restarted on a healthy disk, the
  server has every acknowledged mod, and a 503'd mod sent again with its key
  applies exactly once.
* A commit whose write reached the disk but then failed (a failed fsync),
  injected with tests/reliability/controlled_serve.py: the 503 is an unknown
  outcome, so a retry with the key after the restart must answer from the
  record and never apply twice.
* A damaged data file: a flipped bit in the write-ahead log or in a table.
  The server must refuse to start with a clear message, never serve wrong
  balances, never repair silently.
"""

import os
import re
import shutil
import struct
import time
from pathlib import Path

import pytest

from accman import Ledger
from accman.errors import AccManError, StoreCorrupt, StoreError
from accman.ledger import _ledger, wal
from accman.ledger.leveldb import Store
from conftest import request_bytes, run_accman, spawn_server
from ledgerhelp import wait_for
from relhelp import (Control, fill, history, metrics, mount_tmpfs, spawn_controlled,
                     stop_quietly, umount)

CREDS = ["disk-0", "disk-1", "disk-2"]


def patch(target):
    return request_bytes("PATCH", target)


def keys_after_restart(data, log_dir, cred):
    """The keys of `cred`'s history, oldest first, as a server started
    again on `data` reads them."""
    srv = spawn_server(data, log_dir)
    try:
        return [e["key"] for e in history(srv, cred)]
    finally:
        stop_quietly(srv)


def mod_target(cred, by, key):
    return f"/mod?cred={cred}&by={by}&key={key}"


@pytest.fixture
def small_disk(tmp_path):
    """An 8 MiB tmpfs (root only, as in CI), and the servers started on it,
    killed before it is unmounted.  The filler takes whatever is free; the
    size only has to leave room, once the filler is gone, for the
    write-ahead log (written up to 3 MiB ahead of its records: accman.wal
    GROW_*) and LevelDB's files at the restart."""
    if os.geteuid() != 0:
        pytest.skip("mounting a tmpfs needs root (CI runs as root)")
    disk = mount_tmpfs(tmp_path / "disk", "8m")
    servers = []
    yield disk, servers
    for srv in servers:
        stop_quietly(srv)
    umount(disk)


class Rounds:
    """Rounds of keyed mods, each connection pipelining some of its cred's;
    what was acknowledged and what was answered 503."""

    def __init__(self):
        self.acked = {}             # key -> (cred, by, tot, seq)
        self.refused = {}           # key -> (cred, by): answered 503
        self.codes = {}             # key -> the 503's error code
        self.n = 0

    def send(self, conns, per_conn):
        """Returns the statuses, per connection, in order."""
        sent = []
        for cred, c in conns:
            batch = []
            for _ in range(per_conn):
                self.n += 1
                batch.append((f"k{self.n}", self.n))
            c.send(b"".join(patch(mod_target(cred, by, key)) for key, by in batch))
            sent.append((cred, c, batch))
        return [[self._answer(cred, key, by, c.response()) for key, by in batch]
                for cred, c, batch in sent]

    def _answer(self, cred, key, by, r):
        if r.status == 200:
            self.acked[key] = (cred, by, r.json["tot"], r.json["seq"])
        else:
            assert r.status == 503, r
            # unavailable: in a batch that failed, or behind one; not_applied:
            # refused by a store that had stopped taking writes.
            assert r.json["error"] in ("unavailable", "not_applied") and r.json["detail"], r
            self.codes[key] = r.json["error"]
            # The cause is the server's log's, never the client's: no file
            # path of the server, no OS error (SPEC "Access").
            assert "/" not in r.json["detail"] and "space" not in r.json["detail"], r
            self.refused[key] = (cred, by)
        return r.status


def fill_until_refused(srv, disk, rounds):
    """Fills the disk and sends rounds until a mod is answered 503; then
    checks that writes stay refused, even once the space is back."""
    conns = [(cred, srv.connect()) for cred in CREDS]
    try:
        assert rounds.send(conns, 5) == [[200] * 5] * len(CREDS)
        filler = fill(disk)
        # LevelDB appends to its log in place: the first mods still fit in the
        # log's last page; a few rounds later one needs a page there is not.
        sent = []
        for _ in range(300):
            sent.append(rounds.send(conns, 8))
            if rounds.refused:
                break
        assert rounds.refused, "the disk is full, yet every mod was acknowledged"
        print(f"full disk: {len(rounds.acked)} acknowledged, {len(rounds.refused)} "
              f"answered 503, after {len(sent)} rounds")
        for statuses in sent[-1]:
            # Per connection, mods apply in order: once one failed, every
            # later one was in that batch or a later one.
            assert statuses == sorted(statuses), statuses
        # Writes stop, even for new accounts, even once the space is back:
        # refused before they apply (not_applied).
        stopped = rounds.n
        assert rounds.send(conns, 3) == [[503] * 3] * len(CREDS)
        filler.unlink()
        assert rounds.send(conns, 3) == [[503] * 3] * len(CREDS)
        assert {rounds.codes[f"k{n}"] for n in range(stopped + 1, rounds.n + 1)} == \
            {"not_applied"}
        with srv.connect() as c:
            c.send(patch("/mod?cred=disk-new&by=5"))
            r = c.response()
            assert (r.status, r.json["error"]) == (503, "not_applied"), r
    finally:
        for _, c in conns:
            c.close()


def check_restarted(srv, rounds):
    """Nothing acknowledged is lost, and nothing is there that was not
    sent; the 503s sent again with their keys apply once."""
    acked, refused = rounds.acked, rounds.refused
    sent = {**{k: (c, by) for k, (c, by, _, _) in acked.items()}, **refused}
    for cred in CREDS:
        entries = history(srv, cred)
        assert [e["seq"] for e in entries] == list(range(1, len(entries) + 1))
        by_key = {e["key"]: e for e in entries}
        assert len(by_key) == len(entries)
        for key, (c, _by, tot, seq) in acked.items():
            if c == cred:
                assert (by_key[key]["seq"], by_key[key]["tot"]) == (seq, tot)
        for key, e in by_key.items():
            assert sent[key] == (cred, e["by"]), e
            assert rounds.codes.get(key) != "not_applied", e     # it said it was not
    # The 503s were not acknowledged: sent again with their keys, each
    # applies once (or answers from its record, had it reached the disk).
    with srv.connect() as c:
        for key, (cred, by) in refused.items():
            for _ in range(2):
                c.send(patch(mod_target(cred, by, key)))
                assert c.response().status == 200
    for cred in CREDS:
        keys = [e["key"] for e in history(srv, cred)]
        assert len(keys) == len(set(keys))
        assert sorted(keys) == sorted(k for k, v in sent.items() if v[0] == cred)
        assert srv.tot(cred) == sum(e["by"] for e in history(srv, cred))


def test_a_full_disk_acknowledges_nothing_stops_writes_and_loses_nothing(small_disk, tmp_path):
    disk, servers = small_disk
    data = disk / "data"
    srv = spawn_server(data, tmp_path / "log1")
    servers.append(srv)
    rounds = Rounds()
    fill_until_refused(srv, disk, rounds)
    health = srv.get("/health")
    assert health.status == 503 and health.json["error"] == "unavailable"
    assert metrics(srv)["accman_healthy"] == 0
    # Reads go on, and show acknowledged state only.
    for cred in CREDS:
        mine = sorted((seq, by, tot) for c, by, tot, seq in rounds.acked.values() if c == cred)
        assert srv.tot(cred) == mine[-1][2]
        assert [(e["seq"], e["by"], e["tot"]) for e in history(srv, cred)] == mine
    assert srv.get("/tot?cred=disk-new").status == 404
    assert srv.stop() == 1                  # docs/SERVER.md: 1 after a failed commit
    # The cause is in the log above the exit line.
    assert "could not be made durable" in srv.stderr() and "No space left" in srv.stderr()

    # A restart on a healthy disk (the filler is gone).
    srv = spawn_server(data, tmp_path / "log2")
    servers.append(srv)
    assert srv.get("/health").status == 200
    check_restarted(srv, rounds)
    assert srv.stop() == 0
    done = run_accman("verify", "--data", data)
    assert done.returncode == 0, done.stdout + done.stderr


def test_a_leveldb_write_torn_by_a_full_disk_is_never_checkpointed_over(small_disk):
    """LevelDB's write of a durable batch, behind its answer, that a full
    disk cuts short leaves part of the batch in LevelDB's log; a retry once
    space is back would write the whole batch after that part, and LevelDB's
    log would no longer read back.  The log's records since the last
    checkpoint are then the only whole copy: with space back, the store
    writes nothing more, neither LevelDB (no retry) nor the log, naming why,
    and takes no checkpoint that would make them redundant (the store would
    be refused as damaged at every open after), not even at close; the next
    open cuts LevelDB's log back and replays every record."""
    disk, _ = small_disk
    path = str(disk / "data")
    lap_records = 64
    store = Store(path, wal_bytes_max=lap_records * wal.BLOCK_BYTES)
    ckpt_before = Path(path, wal.CHECKPOINT_NAME).read_bytes()

    def record(i):      # ~1.5 KB a batch: a few of them cross a page of LevelDB's log
        return _ledger.wal_record([(b"\xfefull-%04d-%d" % (i, j), b"%d" % i * 50)
                                   for j in range(7)])

    def leveldb_logs():
        return {n: os.path.getsize(os.path.join(path, n)) for n in os.listdir(path)
                if n.endswith(".log")}
    written = []
    try:
        # The log's file is written ahead of its records to its size: that
        # first, then the disk fills, for LevelDB alone to meet.
        wal_file = os.path.join(path, wal.WAL_NAME)
        wait_for(lambda: os.path.getsize(wal_file) == lap_records * wal.BLOCK_BYTES)
        filler = fill(disk)
        with pytest.raises(StoreError, match=r"commit failed: IO error: .*\.log: No space"):
            for i in range(1, lap_records):
                store.write(record(i))
                written.append(i)
                store.apply()
        filler.unlink()
        torn = leveldb_logs()
        with pytest.raises(StoreError, match="refused, since a write before it failed"):
            store.write(record(written[-1] + 1))
        assert store.apply() == len(written) - 1, "the torn batch was retried"
        assert leveldb_logs() == torn
        with pytest.raises(OSError, match="no checkpoint after a failed write"):
            store.wal.checkpoint()
    finally:
        store.close()
    assert leveldb_logs() == torn
    assert Path(path, wal.CHECKPOINT_NAME).read_bytes() == ckpt_before
    store = Store(path)
    try:
        for i in written:
            assert store.get(b"\xfefull-%04d-6" % i) == b"%d" % i * 50, i
    finally:
        store.close()


def test_history_lost_after_the_open_is_refused_and_said_in_the_log_only(tmp_path):
    """A history entry of a durable account missing from LevelDB's answer
    (its iterator stops short at a block damaged after the open, which the
    open's checks could not see) is damage: /past is 503 store_corrupt, not
    an assertion's 500.  The detail, which names the server's files, goes to
    the log once; the client's names none."""
    control = Control(tmp_path / "control")
    data = tmp_path / "data"
    srv = spawn_controlled(data, tmp_path / "log1", control)
    try:
        with srv.connect() as c:
            for i in range(5):
                c.send(patch(mod_target("rot", 10 + i, f"r{i}")))
                assert c.response().status == 200
        assert len(history(srv, "rot")) == 5
        control.lose_read()
        for _ in range(2):
            r = srv.get("/past?cred=rot")
            assert r.status == 503 and r.json["error"] == "store_corrupt", r.body
            assert str(data) not in r.body.decode() and "log" in r.json["detail"]
        assert srv.tot("rot") == sum(range(10, 15))        # balances are not reads of it
        said = [line for line in srv.stderr().splitlines() if "in no data file" in line]
        assert len(said) == 1 and str(data) in said[0], said
    finally:
        stop_quietly(srv)
    control.lose_read(False)


def test_the_changes_behind_a_failed_batch_are_answered_not_applied(tmp_path):
    """A batch's write held (a stalled disk) while changes queue behind it
    on another connection, then failed without writing: the held batch is
    answered unavailable (its outcome is the disk's), the changes behind,
    never handed to the disk, not_applied; none of them is in the history
    after the restart."""
    control = Control(tmp_path / "control")
    data = tmp_path / "data"
    srv = spawn_controlled(data, tmp_path / "log1", control)
    try:
        assert srv.mod("stalled", 10).status == 200
        control.hold()
        with srv.connect() as first, srv.connect() as behind:
            first.send(patch(mod_target("stalled", -1, "held")))
            control.wait_holding()
            behind.send(b"".join(patch(mod_target("stalled", -2 - i, f"behind{i}"))
                                 for i in range(3)))
            wait_for(lambda: metrics(srv)["accman_queued_mods"] >= 4, 10,
                     "the changes behind queued (and the held one)")
            control.fail_before()
            control.release()
            held = first.response()
            after = [behind.response() for _ in range(3)]
        assert (held.status, held.json["error"]) == (503, "unavailable"), held
        assert [(r.status, r.json["error"]) for r in after] == [(503, "not_applied")] * 3, after
        assert srv.stop() == 1
    finally:
        stop_quietly(srv)
    control.fail_before(False)
    assert keys_after_restart(data, tmp_path / "log2", "stalled") == [None]


def test_the_changes_after_a_failed_leveldb_write_are_answered_not_applied(tmp_path):
    """LevelDB's write of a durable batch fails, behind its answer (200):
    the batches after it are never handed to the disk, so their changes,
    alone on a connection or pipelined, are not_applied, not the
    unavailable of a batch that may have landed; the restart replays the
    answered one from its log record."""
    control = Control(tmp_path / "control")
    data = tmp_path / "data"
    srv = spawn_controlled(data, tmp_path / "log1", control)
    try:
        assert srv.mod("leveldb", 10).status == 200
        # The loop writes a small batch into LevelDB once its replies are
        # out, in the same turn: a request answered after it finds it done.
        assert srv.tot("leveldb") == 10
        control.fail_apply()
        assert srv.mod("leveldb", -1, key="answered").status == 200
        wait_for(lambda: srv.get("/health").status == 503, 10, "the store failed")
        alone = srv.mod("leveldb", -2, key="alone")
        with srv.connect() as conn:
            conn.send(b"".join(patch(mod_target("leveldb", -3 - i, f"piped{i}"))
                               for i in range(3)))
            piped = [conn.response() for _ in range(3)]
        assert (alone.status, alone.json["error"]) == (503, "not_applied"), alone
        assert [(r.status, r.json["error"]) for r in piped] == [(503, "not_applied")] * 3
        assert srv.stop() == 1
    finally:
        stop_quietly(srv)
    control.fail_apply(False)
    assert keys_after_restart(data, tmp_path / "log2", "leveldb") == [None, "answered"]


def test_a_commit_that_fails_after_its_write_is_retried_exactly_once(tmp_path):
    """The worst failed commit: the batch reached the disk, then the store
    reported an error (a failed fsync).  The server cannot know; it answers
    503 and stops taking writes.  After a restart the mods may be there: a
    retry with the key must answer from the record, never apply again.  The
    batch written is answered unavailable (never not_applied, which would
    have a client send it again without its key); only those behind it,
    never written, may be not_applied."""
    control = Control(tmp_path / "control")
    data = tmp_path / "data"
    srv = spawn_controlled(data, tmp_path / "log1", control)
    try:
        with srv.connect() as c:
            for i in range(3):
                c.send(patch(mod_target("fsync", 100 + i, f"ok{i}")))
                assert c.response().status == 200
            control.fail_after()
            c.send(b"".join(patch(mod_target("fsync", 200 + i, f"lost{i}")) for i in range(5)))
            replies = [c.response() for _ in range(5)]
        assert [r.status for r in replies] == [503] * 5
        codes = [r.json["error"] for r in replies]
        assert codes[0] == "unavailable" and set(codes) <= {"unavailable", "not_applied"}, codes
        assert srv.get("/health").status == 503
        assert srv.stop() == 1
    finally:
        stop_quietly(srv)
    control.fail_after(False)

    srv = spawn_server(data, tmp_path / "log2")
    try:
        before = history(srv, "fsync")
        landed = [e["key"] for e in before if e["key"].startswith("lost")]
        # The first failed batch held at least the first mod; it was written.
        assert "lost0" in landed
        assert [k for k, code in zip([f"lost{i}" for i in range(5)], codes, strict=True)
                if code == "not_applied" and k in landed] == [], (codes, landed)
        with srv.connect() as c:
            for i in range(5):
                c.send(patch(mod_target("fsync", 200 + i, f"lost{i}")))
                r = c.response()
                assert r.status == 200
                if f"lost{i}" in landed:
                    e = next(e for e in before if e["key"] == f"lost{i}")
                    assert r.json == {"tot": e["tot"], "seq": e["seq"]}
        after = history(srv, "fsync")
        keys = [e["key"] for e in after]
        assert sorted(keys) == sorted([f"ok{i}" for i in range(3)] + [f"lost{i}" for i in range(5)])
        assert after[:len(before)] == before
        assert srv.tot("fsync") == sum(e["by"] for e in after)
    finally:
        stop_quietly(srv)


# --- damaged data files ---------------------------------------------------------------

LOG_BLOCK_BYTES = 32768          # LevelDB's log format: 32 KiB blocks,
LOG_HEADER_BYTES = 7             # each record: crc32c:4, length:2 (LE), type:1


def log_records(path):
    """(offset, payload length) of every physical record of a LevelDB log."""
    raw = Path(path).read_bytes()
    out = []
    i = 0
    while i + LOG_HEADER_BYTES <= len(raw):
        left_in_block = LOG_BLOCK_BYTES - i % LOG_BLOCK_BYTES
        if left_in_block < LOG_HEADER_BYTES:
            i += left_in_block          # the block's zero trailer
            continue
        length, kind = struct.unpack_from("<HB", raw, i + 4)
        if kind == 0:
            break
        out.append((i, length))
        i += LOG_HEADER_BYTES + length
    return out


TABLE_FOOTER_BYTES = 48          # LevelDB's table format: metaindex and index
                                 # handles (varints), padding, magic


def table_handles(path):
    """(metaindex offset, index offset, index size) from a table's footer.
    With no filter block, the metaindex block comes right after the last
    data block, so the last data block ends 5 bytes (type, crc) before it."""
    footer = Path(path).read_bytes()[-TABLE_FOOTER_BYTES:]
    values, shift, value = [], 0, 0
    for b in footer:
        value |= (b & 0x7F) << shift
        shift += 7
        if not b & 0x80:
            values.append(value)
            value, shift = 0, 0
            if len(values) == 4:
                break
    meta_offset, _, index_offset, index_size = values
    return meta_offset, index_offset, index_size


def flip(path, offset, mask=0x01):
    with open(path, "r+b") as f:
        f.seek(offset)
        b = f.read(1)[0]
        f.seek(offset)
        f.write(bytes([b ^ mask]))


def build_store(path, mods, accounts, reopen):
    """A store made by the ledger itself: `mods` keyed mods over `accounts`
    accounts.  With `reopen`, opened once more, so that LevelDB turns its
    log into a table; without, everything is in the log.  Returns what every
    read must show: {cred: (tot, entries)}."""
    creds = [f"acct-{i}" for i in range(accounts)]
    with Ledger(str(path)) as led:
        for cred, by, key in mods_of(mods, accounts):
            led.mod(cred, by, key=key)
    if reopen:
        Ledger(str(path)).close()
    return truth_of(path, creds)


def mods_of(mods, accounts):
    # Each account's first mod funds it: only a funding mod opens one.
    return [(f"acct-{i % accounts}", (i + 1) * (-1) ** i if i >= accounts else i + 1,
             f"key-{i}") for i in range(mods)]


def truth_of(path, creds):
    copy = Path(str(path) + "-truth")
    shutil.copytree(path, copy)
    try:
        with Ledger(str(copy)) as led:
            return {c: (led.tot(c), led.past(c, limit=1000)) for c in creds}
    finally:
        shutil.rmtree(copy)


def data_files(path):
    """The bytes of every file that holds records: the tables and the
    non-empty logs.  (Every open of LevelDB writes a new MANIFEST and an
    empty log, and drops the old ones: housekeeping, not repair.)"""
    return {f.name: f.read_bytes() for f in Path(path).iterdir()
            if f.suffix == ".ldb" or (f.suffix == ".log" and f.stat().st_size)}


def start_or_refuse(tmp_path, data, truth):
    """Start `accman serve` on `data`; returns None when it refused to
    start as it should (checked: exit 2, one line naming the directory, the
    data files untouched), or else what it did: the tots it served for
    the creds of `truth` (or their status) and whether the record files
    are still as they were."""
    before = data_files(data)
    srv = spawn_server(data, tmp_path / "refused", wait_ready=False)
    out_file = srv.log_dir / "stdout"
    deadline = time.monotonic() + 20
    try:
        while srv.proc.poll() is None and "serving" not in out_file.read_text():
            assert time.monotonic() < deadline, "neither served nor exited"
            time.sleep(0.02)
        if srv.proc.poll() is None:
            srv.port = int(re.search(r":(\d+) data=", out_file.read_text()).group(1))
            served = {}
            for c in truth:
                tot = srv.tot(c)
                served[c] = tot if isinstance(tot, int) else tot.status
            return {"served": served, "records kept": data_files(data) == before}
    finally:
        stop_quietly(srv)
    err = srv.stderr()
    assert srv.proc.returncode == 2, (srv.proc.returncode, err)
    assert len(err.strip().splitlines()) == 1 and "Traceback" not in err, err
    assert str(data) in err and "refusing to serve" in err, err
    assert data_files(data) == before, "the refused start changed the data files"
    return None


def test_a_flipped_bit_in_a_table_stops_the_server_from_starting(tmp_path):
    data = tmp_path / "data"
    truth = build_store(data, 300, 3, reopen=True)
    tables = sorted(data.glob("*.ldb"))
    assert tables, os.listdir(data)
    # Byte 10 is in the first data block: the format record and the
    # first histories, read by every start.
    flip(tables[0], 10)
    assert start_or_refuse(tmp_path, data, truth) is None


def test_a_flipped_bit_in_a_log_record_stops_the_server_from_starting(tmp_path):
    data = tmp_path / "data"
    truth = build_store(data, 60, 3, reopen=False)
    (log,) = data.glob("*.log")
    records = log_records(log)
    assert len(records) > 20
    offset, length = records[len(records) // 2]
    flip(log, offset + LOG_HEADER_BYTES + length // 2)
    assert start_or_refuse(tmp_path, data, truth) is None


def test_a_flipped_bit_in_a_log_record_length_stops_the_server_from_starting(tmp_path):
    """The length field of a record in the middle of the log, made to point
    past the end of the file, with whole records after it: not a torn
    write, damage."""
    data = tmp_path / "data"
    truth = build_store(data, 60, 3, reopen=False)
    (log,) = data.glob("*.log")
    records = log_records(log)
    offset, _ = records[len(records) // 2]
    flip(log, offset + 5, 0x80)          # the length's high byte: +32 KiB
    started = start_or_refuse(tmp_path, data, truth)
    true = {c: t for c, (t, _) in truth.items()}
    assert started is None, (f"the server started on a damaged log: {started}; the "
                             f"acknowledged tots are {true}")


def _state(led, creds):
    return {c: (led.tot(c), led.past(c, limit=1000)) for c in creds}


def sweep(tmp_path, base, name, offsets, truth, mask=0x01):
    """Flip one bit at each offset of file `name` in a copy of `base` and
    open it as the server does.  Returns the offsets where the store opened
    although the damage was not harmless (a full verify fails or a read
    differs), with what happened."""
    creds = sorted(truth)
    bad = []
    for offset in offsets:
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        flip(copy / name, offset, mask)
        try:
            led = Ledger(str(copy))
        except StoreError:
            continue                    # refused at start: what we want
        try:
            try:
                led.verify()
                state = _state(led, creds)
            except StoreCorrupt as e:
                found = e.detail.replace(str(copy), "DATA")
                bad.append((offset, f"started; the damage was found only later: {found}"))
                continue
            if state != truth:
                wrong = {c: (state[c][0], truth[c][0]) for c in creds if state[c] != truth[c]}
                bad.append((offset, f"started and serves wrong state (tot, true tot): {wrong}"))
        finally:
            led.close()
    return bad


def test_a_flipped_bit_in_a_log_record_checksum_type_or_payload_is_refused_at_start(tmp_path):
    """Every record's checksum and type bytes, and its payload every 11
    bytes, each bit 0 and bit 7 (the length has a test of its own)."""
    base = tmp_path / "base"
    truth = build_store(base, 40, 2, reopen=False)
    (log,) = base.glob("*.log")
    offsets = []
    for off, length in log_records(log):
        offsets += [off, off + 1, off + 2, off + 3, off + 6]
        offsets += range(off + LOG_HEADER_BYTES, off + LOG_HEADER_BYTES + length, 11)
    assert len(offsets) > 200
    for mask in (0x01, 0x80):
        assert sweep(tmp_path, base, log.name, offsets, truth, mask) == []


def test_a_flipped_bit_anywhere_in_a_table_is_refused_at_start(tmp_path):
    """A bit every 797 bytes, in the last data block, the index block and
    the footer: every part of a table, the format record, the newest and
    the older history entries, the idempotency records, the index.  Refused
    at start, or harmless: the full verify passes and every read is true."""
    base = tmp_path / "base"
    truth = build_store(base, 1500, 2, reopen=True)
    (table,) = base.glob("*.ldb")
    size = table.stat().st_size
    # Older history and idempotency records sit in blocks of their own only
    # in a big enough table.
    assert size > 60_000
    meta_offset, index_offset, index_size = table_handles(table)
    assert 0 < meta_offset < index_offset < size - TABLE_FOOTER_BYTES
    offsets = sorted(set(range(0, size - TABLE_FOOTER_BYTES, 797))
                     | {meta_offset - 6, meta_offset - 60}                 # the last data block
                     | set(range(index_offset, index_offset + index_size, 41))
                     | set(range(size - TABLE_FOOTER_BYTES, size, 7)))
    bad = sweep(tmp_path, base, table.name, offsets, truth)
    assert bad == [], (f"{len(bad)} of {len(offsets)} flipped bits in a {size}-byte "
                       f"table were not refused at start, at offsets {bad[0][0]}.."
                       f"{bad[-1][0]}; the first: {bad[0]}; the last: {bad[-1]}")


def test_no_flipped_bit_in_a_table_makes_the_server_serve_wrong_balances(tmp_path):
    """The weaker promise, which holds even where the start does not find
    the damage.  A bit every 71 bytes of a table (bit 0 or bit 7), one at a
    time: the store refuses to open, or finds the damage when it reads it,
    or serves exactly the true state; never a wrong balance or history, and
    a mod sent again with its key is answered from its record or refused,
    never applied again."""
    base = tmp_path / "base"
    truth = build_store(base, 600, 2, reopen=True)
    creds = sorted(truth)
    entry_of = {e.key: e for _, entries in truth.values() for e in entries}
    replays = mods_of(600, 2)[::10]
    (table,) = base.glob("*.ldb")
    wrong = []
    for offset in range(0, table.stat().st_size, 71):
        mask = 0x01 if offset % 2 else 0x80
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        flip(copy / table.name, offset, mask)
        try:
            led = Ledger(str(copy))
        except StoreError:
            continue
        try:
            for c in creds:
                try:
                    got = (led.tot(c), led.past(c, limit=1000))
                except StoreCorrupt:
                    continue
                if got != truth[c]:
                    wrong.append((offset, mask, c, got[0], truth[c][0]))
            for cred, by, key in replays:
                try:
                    got = led.mod(cred, by, key=key)
                except AccManError:
                    continue
                e = entry_of[key]
                if got != (e.tot, e.seq):
                    wrong.append((offset, mask, key, got, (e.tot, e.seq)))
        finally:
            led.close()
    assert wrong == [], (f"{len(wrong)} flipped bits made the store serve a wrong state "
                         f"(offset, mask, cred or key, served, true): {wrong[:8]}")
