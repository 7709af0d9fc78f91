"""The property of issue 11 item 16, whatever the files are: after a
SIGKILL, each file of the data directory in turn removed, emptied, or with
one byte flipped (in a copy): opening must either refuse with a clear error
(StoreError naming the directory, no file changed) or show every
acknowledged mod.

The store is a real one: tests/crash/ledger_child.py runs keyed mods from
tasks and threads with a small write-ahead log (it wraps and checkpoints
many times a second) and is killed with SIGKILL.  The flips are at seeded
random offsets of every file, and at the headers and payloads of the
records the recovery reads; ACCMAN_CRASH_LONG=1 (`just powercut`, `just
crash`) flips many more."""

import os
import random
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from accman import Ledger
from accman.errors import StoreError
from accman.ledger import fsck, keyfile, wal
from accman.ledger.leveldb import Store
from test_ledger_crash import run_round

LONG = os.environ.get("ACCMAN_CRASH_LONG") == "1"
FLIPS_PER_FILE = 40 if LONG else 6
SEED = int(os.environ.get("ACCMAN_CRASH_SEED", "20261201"))


@pytest.fixture(scope="module")
def killed(tmp_path_factory):
    """(directory, acknowledged mods) after a SIGKILL mid-run."""
    path = tmp_path_factory.mktemp("killed") / "data"
    rnd = random.Random(SEED)
    acked = []
    for round_no in range(2):
        acked += run_round(str(path), round_no, rnd, wal_bytes_max=64 * 1024)
    assert acked
    return path, acked


def flip_offsets(path: Path, rnd: random.Random) -> list[int]:
    """Where to flip a byte of `path`: seeded random offsets, the first and
    last bytes, and for the write-ahead log the header and payload of each
    record after the checkpoint (the ones recovery replays); for LevelDB's
    logs each record's header."""
    size = path.stat().st_size
    if size == 0:
        return []
    offsets = {0, size - 1} | {rnd.randrange(size) for _ in range(FLIPS_PER_FILE)}
    if path.name == wal.WAL_NAME:
        keys = wal.Keys.of(keyfile.read_key(str(path.parent)))
        ckpt = wal.read_checkpoint(str(path.parent), keys)
        off = 0
        for rec in wal.scan(str(path.parent), ckpt, keys):
            offsets |= {off + 9, off + wal.HEADER.size + rnd.randrange(len(rec.payload))}
            off += wal.record_span(len(rec.payload))
    elif fsck.LOG_NAME.match(path.name):
        physical, _ = fsck._walk(path.read_bytes())
        step = 1 if LONG else max(1, len(physical) // 8)
        offsets |= {rec.offset + rnd.randrange(7) for rec in physical[::step]}
    return sorted(offsets)


def variants(base: Path):
    rnd = random.Random(SEED)
    for f in sorted(base.iterdir()):
        yield f.name, "removed", None
        yield f.name, "emptied", None
        for offset in flip_offsets(f, rnd):
            yield f.name, "flipped", offset


def damage(path: Path, name: str, how: str, offset):
    f = path / name
    if how == "removed":
        f.unlink()
    elif how == "emptied":
        f.write_bytes(b"")
    else:
        raw = bytearray(f.read_bytes())
        raw[offset] ^= 1 << (offset % 8)
        f.write_bytes(bytes(raw))


def files_of(path):
    return {p.name: p.read_bytes() for p in Path(path).iterdir()}


def missing_acked(led, acked) -> list:
    lost = []
    for cred, seq, by, key in acked:
        page = led.past(cred, limit=1, before=seq + 1)
        if not page or (page[0].seq, page[0].by, page[0].key) != (seq, by, key):
            lost.append((cred, seq, by, key))
    return lost


def test_each_file_removed_emptied_or_flipped_is_refused_or_loses_nothing(killed, tmp_path):
    base, acked = killed
    outcomes = {"refused": 0, "opened": 0}
    broken = []
    for name, how, offset in variants(base):
        copy = tmp_path / "copy"
        shutil.rmtree(copy, ignore_errors=True)
        shutil.copytree(base, copy)
        damage(copy, name, how, offset)
        before = files_of(copy)
        try:
            led = Ledger(str(copy))
        except StoreError as e:
            outcomes["refused"] += 1
            if str(copy) not in e.detail or files_of(copy) != before:
                broken.append((name, how, offset, f"refused unclearly: {e.detail}"))
            continue
        outcomes["opened"] += 1
        try:
            lost = missing_acked(led, acked)
            if lost:
                broken.append((name, how, offset, f"opened without {len(lost)} acknowledged "
                                                  f"mods, the first {lost[0]}"))
            else:
                led.verify()
        finally:
            led.close()
    print(f"{sum(outcomes.values())} damaged copies: {outcomes}")
    assert broken == [], broken[:10]
    # Neither side may be empty: some damage is harmless (a flip in the
    # write-ahead log's zeros, LevelDB's info log) and much is refused.
    assert outcomes["refused"] > 20 and outcomes["opened"] > 5, outcomes


_WRITER = """
import os, sys
from accman import Ledger
for _ in range(int(sys.argv[5])):
    Ledger(sys.argv[1]).close()         # restarts: LevelDB's log made a table, a new log
led = Ledger(sys.argv[1])
for i in range(1, int(sys.argv[2]) + 1):
    led.mod(sys.argv[3], i)
if sys.argv[4] == "close":
    led.close()
else:
    os._exit(0)             # a crash: the log's records past its checkpoint
"""


def _written(path, mods, cred, close, restarts=0):
    subprocess.run([sys.executable, "-c", _WRITER, str(path), str(mods), cred,
                    "close" if close else "crash", str(restarts)], check=True)


OTHERS = (keyfile.KEY_NAME, wal.CHECKPOINT_NAME, wal.WAL_NAME)


@pytest.mark.parametrize("taken, restarts", [(OTHERS, 0), (OTHERS, 1), ((keyfile.KEY_NAME,), 0)],
                         ids=["key, checkpoint and log", "the same of a restarted store",
                              "key"])
def test_another_store_s_key_is_refused_before_any_file_changes(tmp_path, taken, restarts):
    """A store's key file (alone, or with the checkpoint and log it signs)
    from another store, a restore from the wrong backup: refused, naming
    the key file, with no file changed, so that the store's own files put
    back open it whole.  With all three, recovery cut LevelDB's log by the
    other checkpoint's sizes and LevelDB rewrote it before the key was
    compared: the refused store, mended, opened empty (a black-box probe).
    The key alone was said as the checkpoint failing its MAC.  The other
    store restarted: its checkpoint names a later LevelDB log than this
    store's, which holds the format record (never made a table here), and
    the cut by it emptied that log, so that no record was found to compare
    and the store opened as the other (a review)."""
    real, other, copy = tmp_path / "real", tmp_path / "other", tmp_path / "copy"
    _written(real, 10, "real", close=True)
    _written(other, 15, "other", close=False, restarts=restarts)
    shutil.copytree(real, copy)
    for name in taken:
        shutil.copy2(other / name, copy / name)
    refusal = (f"{keyfile.KEY_NAME} does not match the store's format record" if not restarts
               else f"no format record in LevelDB's files as {wal.CHECKPOINT_NAME} leaves them")
    tots = refused_unchanged_then_whole(copy, real, taken, refusal, ["real"])
    assert tots == [55]


def refused_unchanged_then_whole(copy, own, taken, refusal, creds, opens=(Ledger,)):
    """Each of `opens` refuses the directory `copy` (`refusal`) with no file
    changed; with its `taken` files from `own` put back, it opens: the tots
    of `creds`."""
    before = files_of(copy)
    for open_it in opens:
        with pytest.raises(StoreError, match=refusal):
            open_it(str(copy))
    assert files_of(copy) == before
    for name in taken:
        shutil.copy2(own / name, copy / name)
    with Ledger(str(copy)) as led:
        return [led.tot(cred) for cred in creds]


def test_the_log_of_another_copy_of_the_store_is_refused_before_any_file_changes(tmp_path):
    """Two copies of one store (a restore made twice): the key is the same,
    so the key file passes, and the other copy's checkpoint and log, put
    beside this copy's LevelDB files, held at least as many records as
    LevelDB's logs held batches past that checkpoint's lengths, which was
    all that recovery compared: it cut this copy's 10 acknowledged mods
    and replayed the other's 15 (a review).  Each batch is now compared
    with its record: refused, no file changed, and this copy's own files
    put back open it whole."""
    store, one, two = tmp_path / "store", tmp_path / "one", tmp_path / "two"
    _written(store, 1, "store", close=True)
    shutil.copytree(store, one)
    shutil.copytree(store, two)
    _written(one, 10, "one", close=True)
    _written(two, 15, "two", close=False)
    copy = tmp_path / "copy"
    shutil.copytree(one, copy)
    for name in OTHERS:
        shutil.copy2(two / name, copy / name)

    def verify(path):               # accman verify's open: in a private copy
        Store(path, create=False, read_only=True).close()
    refusal = (r"the batch at offset \d+ of LevelDB's log \d+\.log, written after the last "
               r"checkpoint, is not any of the records of accman\.wal")
    tots = refused_unchanged_then_whole(copy, one, OTHERS, refusal, ["one", "two", "store"],
                                        (Ledger, verify))
    assert tots == [55, None, 1]


_ROTATING = """
import os, sys
from accman import Ledger
from accman.ledger import leveldb
leveldb.WRITE_BUFFER_BYTES = 64 * 1024      # LevelDB moves to a new log every 64 KiB
led = Ledger(sys.argv[1])
for i in range(int(sys.argv[2])):
    led.mod(f"acct{i % 50}", 1, key=f"k{i}")
os._exit(0)                 # a crash: the log's records past its checkpoint
"""


def test_a_crash_after_leveldb_moved_to_a_new_log_opens_whole(tmp_path):
    """LevelDB moves to a new log when its memory is full, and makes a
    table of the one before: the batches written since the checkpoint are
    then partly in that table, and the first one in a log is not the
    first record's.  Such a store, crashed, was refused as two copies
    mixed (a review); it opens with every mod."""
    path = tmp_path / "data"
    subprocess.run([sys.executable, "-c", _ROTATING, str(path), "3000"], check=True,
                   timeout=120)
    ckpt = wal.read_checkpoint(str(path), wal.Keys.of(keyfile.read_key(str(path))))
    logs = sorted(p.name for p in path.iterdir() if p.name.endswith(".log"))
    assert [name for name in logs if name not in ckpt.logs], (logs, ckpt.logs)
    led = Ledger(str(path))
    try:
        assert sum(led.tot(f"acct{i}") for i in range(50)) == 3000
        led.verify()
    finally:
        led.close()
