"""AccMan's write-ahead log (accman/wal.py) and the store's recovery from it.

A crash is simulated in-process by copying the data directory of an open
ledger whose mods are all acknowledged: the copy is what a kill -9 leaves
(the records written since the last checkpoint, LevelDB's logs unsynced).
Power cuts with garbage in LevelDB's unsynced logs are in
tests/test_ledger_crash.py."""

import json
import logging
import os
import shutil
import struct
from pathlib import Path

import plyvel
import pytest

from accman import Ledger
from accman.ledger import (_check, _ledger, datadir, fsck, keyfile, migrate, plyvel_errors, wal,
                           walsectors, walwriter)
from accman.errors import FileDamage, StoreCorrupt, StoreError, StoreLocked, Unavailable
from accman.ledger.leveldb import STORE_FORMAT, Store
from ledgerhelp import outcome_within


SECTOR = walsectors.SECTOR_BYTES


def crash_copy(led, tmp_path, name="crashed"):
    dst = tmp_path / name
    shutil.copytree(led.path, dst)
    return dst


def files_of(path):
    return {p.name: p.read_bytes() for p in Path(path).iterdir()}


def keys_of(path):
    return wal.Keys.of(keyfile.read_key(str(path)))


def records_of(path):
    keys = keys_of(path)
    return wal.scan(str(path), wal.read_checkpoint(str(path), keys), keys)


def checkpoint_of(path):
    return wal.read_checkpoint(str(path), keys_of(path))


def offsets_of(path):
    """(lsn, offset) of each record after the checkpoint, walked by hand."""
    out, off = [], 0
    for rec in records_of(path):
        out.append((rec.lsn, off))
        off += wal.record_span(len(rec.payload))
    return out


def refused(path, match):
    """The open refuses, names the damage, and changes no file."""
    before = files_of(path)
    with pytest.raises(StoreCorrupt, match=match) as info:
        Ledger(str(path))
    assert "refusing to serve" in info.value.detail
    assert files_of(path) == before


@pytest.fixture
def crashed(tmp_path):
    """A copy of a store with 20 acknowledged mods after its last
    checkpoint, one batch each, and the ledger's answers."""
    led = Ledger(str(tmp_path / "data"))
    acked = [led.mod("alice" if i % 2 else "bob", i + 1, key=f"k{i}") for i in range(20)]
    path = crash_copy(led, tmp_path)
    led.close()
    return path, acked


def test_a_crash_replays_every_batch_after_the_checkpoint(crashed, caplog):
    path, acked = crashed
    ckpt = checkpoint_of(path)
    assert [r.lsn for r in records_of(path)] == list(range(ckpt.lsn, ckpt.lsn + 20))
    with caplog.at_level(logging.INFO, logger="accman.ledger.leveldb"):
        led = Ledger(str(path))
    with led:
        assert "replayed 20 batches" in caplog.text
        assert led.tot("bob") == sum(range(1, 21, 2)) and led.tot("alice") == sum(range(2, 21, 2))
        assert [e.key for e in reversed(led.past("alice"))] == [f"k{i}" for i in range(1, 20, 2)]
        led.verify()
        assert led.mod("bob", 1, key="k0") == acked[0]      # answered from its record
        assert led.mod("bob", 1) == (acked[-2][0] + 1, 11)
    # Replayed, then a checkpoint: the next open has nothing to replay.
    assert records_of(path) == []


def test_unsynced_leveldb_log_bytes_are_cut_and_replayed(crashed, caplog):
    """What LevelDB wrote after the checkpoint is not trusted: cut, then
    written again from the log's records."""
    path, _ = crashed
    ckpt = checkpoint_of(path)
    logs = {p.name: p.stat().st_size for p in path.glob("*.log")}
    assert any(size > ckpt.logs.get(name, 0) for name, size in logs.items())
    with caplog.at_level(logging.INFO, logger="accman.ledger.leveldb"):
        Ledger(str(path)).close()
    assert "cut" in caplog.text and "unsynced bytes" in caplog.text


def leveldb_log_without_its_last_batch(path):
    """Cuts the newest batch from LevelDB's log, as a power cut may leave it
    (written there without sync), and returns the batch count left."""
    (log,) = [p for p in Path(path).glob("*.log") if p.stat().st_size]
    raw = log.read_bytes()
    records, _ = fsck._walk(raw)
    os.truncate(log, records[-1].offset)
    return len(records) - 1


def newest_record_unapplied(tmp_path, damage):
    """A store whose newest record (lsn, offset) LevelDB never got, as when
    a crash comes after the record's write and before LevelDB's (the
    replies go out between): written by the log alone here, 1200 bytes of
    payload over three sectors.  `damage(raw, off, lsn)` is then done to
    the log's bytes.  Returns the path and what the ledger acknowledged."""
    led = Ledger(str(tmp_path / "data"))
    acked = [led.mod("alice", by, key=f"k{by}") for by in (100, 20, 3)]
    lsn = led.store.wal.next_lsn
    led.store.wal.append(b"\x09" * 1200)          # not what a sector held before
    path = crash_copy(led, tmp_path)
    led.close()
    assert [r.lsn for r in records_of(path)][-1] == lsn
    off = offsets_of(path)[-1][1]
    f = path / wal.WAL_NAME
    raw = bytearray(f.read_bytes())
    damage(raw, off, lsn)
    f.write_bytes(bytes(raw))
    return path, acked, lsn


def zero_sector(i):
    def damage(raw, off, lsn):
        raw[off + i * SECTOR:off + (i + 1) * SECTOR] = bytes(SECTOR)
    return damage


def other_sector(i, dlsn):
    """What a previous write left in sector i: an older lap's sector (a
    lower lsn), or an older format's unstamped bytes, which may read as
    any stamp (a later lsn)."""
    def damage(raw, off, lsn):
        at = off + i * SECTOR
        raw[at:at + SECTOR] = b"\x07" * walsectors.SECTOR_DATA_BYTES + walsectors.STAMP.pack(
            max(0, lsn + dlsn), 40)
    return damage


@pytest.mark.parametrize("damage", [zero_sector(0), zero_sector(1), zero_sector(2),
                                    other_sector(0, -1), other_sector(1, -7), other_sector(2, -1),
                                    other_sector(1, 10**12)],
                         ids=["first-zeros", "middle-zeros", "last-zeros", "first-older",
                              "middle-older", "last-older", "middle-amw2-bytes"])
def test_a_torn_last_record_is_dropped_and_the_rest_replayed(tmp_path, damage):
    """A power cut during the newest record's write: a sector of it did not
    land (it holds zeros, or an older lap's sector), and LevelDB never got
    its batch.  Never acknowledged (its write never returned): dropped, the
    rest replayed."""
    path, acked, _ = newest_record_unapplied(tmp_path, damage)
    with Ledger(str(path)) as led:
        assert led.tot("alice") == 123
        assert led.mod("alice", 3, key="k3") == acked[-1]
        led.verify()


def flip(at):
    def damage(raw, off, lsn):
        raw[off + at] ^= 0x01
    return damage


@pytest.mark.parametrize("damage,why", [
    (flip(wal.HEADER.size + 7), "every sector of its write landed, yet it fails its check"),
    (flip(SECTOR + 100), "every sector of its write landed, yet it fails its check"),
    (flip(2 * SECTOR + 10), "every sector of its write landed, yet it fails its check"),
    (flip(12), "its header and its first sector's stamp disagree on its length"),
    (flip(20), "every sector of its write landed, yet it fails its check"),
], ids=["header-data", "middle-data", "last-data", "header-length", "header-mac"])
def test_a_damaged_newest_record_that_landed_whole_is_refused(tmp_path, damage, why):
    """The probe's case: the newest record's write had landed (and been
    acknowledged, perhaps) but LevelDB never got its batch; then a byte of
    it was damaged.  It used to be taken for a torn write and dropped, with
    the mods it held; every sector bears its stamp: damage, refused."""
    path, _, _ = newest_record_unapplied(tmp_path, damage)
    refused(path, rf"{wal.WAL_NAME}: record \d+ at offset \d+, the newest, is damaged: {why}")


def three_mods_then_kill(tmp_path):
    """Issue 11's reproduction: 3 mods acknowledged (tot 123), then what a
    kill -9 leaves."""
    led = Ledger(str(tmp_path / "data"))
    assert [led.mod("alice", by) for by in (100, 20, 3)] == [(100, 1), (120, 2), (123, 3)]
    path = crash_copy(led, tmp_path)
    led.close()
    return path


def test_a_damaged_newest_record_that_leveldb_has_is_refused_not_dropped(tmp_path):
    """Issue 11 item 15: one payload byte of the newest record flipped after
    a kill -9.  Its batch is in LevelDB's log, so the record was whole when
    written, and may have been acknowledged (it was): refused, nothing cut."""
    path = three_mods_then_kill(tmp_path)
    last_lsn, off = offsets_of(path)[-1]
    f = path / wal.WAL_NAME
    raw = bytearray(f.read_bytes())
    raw[off + wal.HEADER.size + 5] ^= 0x01
    f.write_bytes(bytes(raw))
    refused(path, rf"{wal.WAL_NAME}: record \d+ at offset \d+, the newest, is damaged")


@pytest.mark.parametrize("how", ["removed", "emptied", "zeroed"])
def test_a_missing_or_emptied_log_is_refused(tmp_path, how):
    """Issue 11 item 14: the log removed or emptied after a kill -9 used to
    open as a store without the 3 acknowledged mods."""
    path = three_mods_then_kill(tmp_path)
    f = path / wal.WAL_NAME
    if how == "removed":
        f.unlink()
        match = f"{wal.WAL_NAME} is missing, but {wal.CHECKPOINT_NAME} names it"
    elif how == "emptied":
        os.truncate(f, 0)
        match = rf"{wal.WAL_NAME} has 0 bytes, {wal.CHECKPOINT_NAME} recorded \d+"
    else:
        f.write_bytes(bytes(f.stat().st_size))
        match = "LevelDB's logs hold 3 batches"
    refused(path, match)


def test_a_removed_log_after_a_clean_close_is_refused_too(tmp_path):
    path = tmp_path / "data"
    with Ledger(str(path)) as led:
        led.mod("alice", 1)
    (path / wal.WAL_NAME).unlink()
    refused(path, f"{wal.WAL_NAME} is missing")


def test_bytes_a_client_chose_never_pass_for_a_record(tmp_path):
    """A record's header with a plain CRC, built from bytes a client could
    put in a payload, at a block boundary past the log's end: with a keyed
    MAC it is not a record (before, it was taken for damage)."""
    path = three_mods_then_kill(tmp_path)
    f = path / wal.WAL_NAME
    raw = bytearray(f.read_bytes())
    end = offsets_of(path)[-1][1] + wal.BLOCK_BYTES
    lsn = records_of(path)[-1].lsn + 1
    payload = b"\x01\x01ab"
    forged = struct.pack("<4sQI", wal.MAGIC, lsn, len(payload))
    crc = _check.crc32c(payload, _check.crc32c(forged[4:]))
    forged += struct.pack("<I", crc) + bytes(12) + payload
    raw[end + wal.BLOCK_BYTES:end + wal.BLOCK_BYTES + len(forged)] = forged
    f.write_bytes(bytes(raw))
    with Ledger(str(path)) as led:
        assert led.tot("alice") == 123


@pytest.mark.parametrize("offset", [2, 10, 30, -3])
def test_a_flipped_byte_in_the_checkpoint_is_refused(crashed, offset):
    """The checkpoint's lsn and lengths are JSON: a flipped digit would
    still parse.  Its MAC refuses it."""
    path, _ = crashed
    f = path / wal.CHECKPOINT_NAME
    raw = bytearray(f.read_bytes())
    raw[offset] ^= 0x01
    f.write_bytes(bytes(raw))
    refused(path, f"{wal.CHECKPOINT_NAME} (fails its MAC|is unreadable)")


@pytest.mark.parametrize("how", ["removed", "emptied", "flipped"])
def test_a_damaged_key_file_is_refused(crashed, how):
    path, _ = crashed
    f = path / keyfile.KEY_NAME
    if how == "removed":
        f.unlink()
        match = f"{keyfile.KEY_NAME} is missing"
    elif how == "emptied":
        f.write_bytes(b"")
        match = f"{keyfile.KEY_NAME} is unreadable"
    else:
        raw = bytearray(f.read_bytes())
        raw[raw.index(b'"key": "') + 12] ^= 0x01
        f.write_bytes(bytes(raw))
        match = f"{keyfile.KEY_NAME} is unreadable"
    refused(path, match)


def test_a_key_file_that_disagrees_with_the_format_record_is_refused(tmp_path):
    path = tmp_path / "data"
    with Ledger(str(path)) as led:
        led.mod("alice", 1)
    with Ledger(str(tmp_path / "other")):
        pass
    shutil.copy(tmp_path / "other" / keyfile.KEY_NAME, path / keyfile.KEY_NAME)
    # The checkpoint fails its MAC under the other key: said as the key's
    # damage, which the format record shows (found.name_the_key).
    refused(path, f"{keyfile.KEY_NAME} does not match the store's format record")


def test_a_synced_leveldb_log_ending_in_a_bad_record_is_refused_not_taken_for_torn(tmp_path):
    """After recovery cuts LevelDB's logs to their synced lengths, every
    byte left was synced: a bad last record there is damage."""
    path = tmp_path / "data"
    with Ledger(str(path)) as led:
        for i in range(5):
            led.mod("alice", i + 1)
    # The clean close took a checkpoint naming the log's whole length.
    log_name, synced = max(checkpoint_of(path).logs.items(), key=lambda kv: kv[1])
    raw = bytearray((path / log_name).read_bytes())
    assert synced == len(raw) > 0
    raw[-2] ^= 0x01                                     # the last synced record
    (path / log_name).write_bytes(bytes(raw))
    refused(path, rf"log {log_name}: record at offset \d+ fails its checksum")


@pytest.mark.parametrize("where", ["header", "payload", "zeros"])
def test_damage_before_the_last_record_is_refused(crashed, where):
    path, _ = crashed
    lsn, off = offsets_of(path)[5]
    f = path / wal.WAL_NAME
    raw = bytearray(f.read_bytes())
    if where == "header":
        raw[off + 9] ^= 0x01            # its lsn
    elif where == "payload":
        raw[off + wal.HEADER.size] ^= 0x80
    else:
        raw[off:off + wal.BLOCK_BYTES] = bytes(wal.BLOCK_BYTES)
    f.write_bytes(bytes(raw))
    refused(path, rf"{wal.WAL_NAME}: record {lsn + 1} at offset \d+ follows the end of "
                  rf"the log at offset {off} \(record {lsn} is missing or damaged\)")


def test_records_without_their_checkpoint_are_refused(crashed):
    path, _ = crashed
    (path / wal.CHECKPOINT_NAME).unlink()
    refused(path, f"{wal.WAL_NAME} holds records but {wal.CHECKPOINT_NAME} is missing")


@pytest.mark.parametrize("text", [b"", b"{", b'{"format": 1, "lsn": 0, "logs": {}}',
                                  b'{"format": 1, "lsn": 3, "logs": {"x.log": 5}}',
                                  b'{"format": 1, "lsn": 3}'])
def test_an_unreadable_checkpoint_is_refused(crashed, text):
    path, _ = crashed
    (path / wal.CHECKPOINT_NAME).write_bytes(text)
    refused(path, f"{wal.CHECKPOINT_NAME} is unreadable")


def test_a_checkpoint_flipped_to_format_1_is_refused_not_read_without_its_mac(crashed):
    """Format 1 (before the key file) has no MAC: a later checkpoint
    whose one digit turned into 1 would be taken without one, its log read
    as AMW1 and every batch after the checkpoint lost."""
    path, _ = crashed
    raw = (path / wal.CHECKPOINT_NAME).read_bytes()
    now = b'"format": %d' % wal.CHECKPOINT_FORMAT
    assert raw.count(now) == 1
    (path / wal.CHECKPOINT_NAME).write_bytes(raw.replace(now, b'"format": 1'))
    refused(path, f"{wal.CHECKPOINT_NAME} says format 1 but has mac, wal_bytes, which "
                  "format 1 has not")


@pytest.mark.parametrize("name", [wal.CHECKPOINT_NAME, keyfile.KEY_NAME])
def test_a_checkpoint_or_key_nested_past_the_stack_is_refused_plainly(crashed, name):
    path, _ = crashed
    (path / name).write_bytes(b"[" * 100_000 + b"]" * 100_000)
    refused(path, f"{name} is unreadable")


SEALED_WITHOUT_CHECKPOINT = (f"{wal.CHECKPOINT_NAME} is missing, but {keyfile.KEY_NAME} is "
                             "here, which a store has only once its first checkpoint is written: "
                             "damaged")
ALL_THREE_GONE = (f"{keyfile.KEY_NAME}, {wal.CHECKPOINT_NAME} and {wal.WAL_NAME} are missing, "
                  f"but the store is at format {STORE_FORMAT}, written with them: damaged")


@pytest.mark.parametrize("how", ["crashed", "closed", "power cut"])
@pytest.mark.parametrize("gone,says", [
    ((wal.CHECKPOINT_NAME, wal.WAL_NAME), SEALED_WITHOUT_CHECKPOINT),
    ((keyfile.KEY_NAME, wal.CHECKPOINT_NAME, wal.WAL_NAME), ALL_THREE_GONE)])
def test_a_store_whose_checkpoint_and_log_are_gone_is_refused(crashed, how, gone, says):
    """With the key file there, no checkpoint (and no log) would read as a
    store from before the log, or as a creation cut short: every batch
    LevelDB lacked silently gone (after a power cut, all that its unsynced
    logs held).  The key file is named accman.key only once the first
    checkpoint is written.  Without the key file either, the format record
    tells a store from before the key file (format 1 or 2) from one
    written with it.  Serve and verify alike."""
    path, _ = crashed
    if how == "closed":
        Ledger(str(path)).close()
    elif how == "power cut":
        for log, synced in checkpoint_of(path).logs.items():
            os.truncate(path / log, synced)
    for name in gone:
        (path / name).unlink()
    refused(path, says)
    with pytest.raises(StoreCorrupt, match=says):
        Store(str(path), read_only=True)


def power_goes_at_the_first_checkpoint(monkeypatch):
    """The next open stops where its first checkpoint would be written."""
    def crash(self, after):
        raise KeyboardInterrupt("the power went")
    monkeypatch.setattr(Store, "checkpoint_at_open", crash)


def test_an_upgrade_cut_short_before_its_first_checkpoint_opens_again(tmp_path, monkeypatch):
    """A store from before the key file gets its key, pending, before
    LevelDB's first change: an upgrade cut short (after format 1's
    migration, say) is never a store of a later format without a key file."""
    path = tmp_path / "data"
    with Ledger(str(path)) as led:
        led.mod("alice", 7)
    as_before_the_log(path)

    power_goes_at_the_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        Ledger(str(path))
    assert (path / keyfile.PENDING_NAME).exists() and not (path / keyfile.KEY_NAME).exists()
    monkeypatch.undo()
    with Ledger(str(path)) as led:
        assert led.tot("alice") == 7
    assert keyfile.read_key_sealed(str(path))[1]


def test_a_new_store_s_key_is_pending_until_its_first_checkpoint(tmp_path, monkeypatch):
    """A creation cut short before its first checkpoint holds nothing
    acknowledged: it is made again with its pending key."""
    path = tmp_path / "data"
    power_goes_at_the_first_checkpoint(monkeypatch)
    with pytest.raises(KeyboardInterrupt):
        Ledger(str(path))
    assert (path / keyfile.PENDING_NAME).exists() and not (path / keyfile.KEY_NAME).exists()
    pending = keyfile.read_key(str(path))
    monkeypatch.undo()
    with Ledger(str(path)) as led:
        assert led.store.salt == pending and led.mod("alice", 3) == (3, 1)
    assert keyfile.read_key_sealed(str(path)) == (pending, True)
    assert not (path / keyfile.PENDING_NAME).exists()


def test_verify_of_a_creation_cut_short_says_there_is_no_store(tmp_path):
    """Before CURRENT, a directory holds no store: a read-only open says
    so, as it did before it read the MANIFEST for its private copy."""
    path = tmp_path / "data"
    path.mkdir()
    keyfile.write_key(os.open(path, os.O_RDONLY | os.O_DIRECTORY), keyfile.new_salt())
    (path / "MANIFEST-000001").write_bytes(datadir._first_manifest()[:10])
    with pytest.raises(StoreError, match="no store in this directory"):
        Store(str(path), read_only=True)


def test_a_checkpoint_of_another_format_is_refused(crashed):
    path, _ = crashed
    (path / wal.CHECKPOINT_NAME).write_bytes(b'{"format": 4, "lsn": 3, "logs": {}}')
    refused(path, f"{wal.CHECKPOINT_NAME} is of format 4, this AccMan reads formats 1, 2, 3")


def test_a_leveldb_log_shorter_than_its_synced_length_is_refused(crashed):
    path, _ = crashed
    ckpt = checkpoint_of(path)
    name, synced = next((n, s) for n, s in ckpt.logs.items() if s > 0)
    os.truncate(path / name, synced - 1)
    refused(path, f"LevelDB log {name} has {synced - 1} bytes, but {synced} were "
                  "synced at the last checkpoint")


def test_a_record_that_does_not_parse_is_refused_before_anything_is_cut(tmp_path):
    """A record with a valid CRC whose puts do not parse: a bug or forged
    damage, never replayed in part."""
    led = Ledger(str(tmp_path / "data"))
    led.mod("alice", 1)
    store = led.store
    store.wal.append(b"\x05\x01abc")            # says 5 + 1 bytes, holds 3
    path = crash_copy(led, tmp_path)
    led.close()
    refused(path, r"record \d+: a write-ahead log record ends inside a put")


def test_the_log_wraps_at_its_size_with_a_checkpoint_and_loses_nothing(tmp_path):
    size = 4 * wal.BLOCK_BYTES                  # four one-block records a lap
    path = str(tmp_path / "data")
    led = Ledger(path, store=Store(path, wal_bytes_max=size))
    first = checkpoint_of(path).lsn
    for i in range(1, 31):
        assert led.mod("alice", i) == (i * (i + 1) // 2, i)
    ckpt = checkpoint_of(path)
    # 30 records, a checkpoint before every fifth: 7 laps, 2 records since.
    assert ckpt.lsn == first + 28
    assert led.stats["checkpoints"] == 1 + 7       # the open's, and the laps
    assert os.path.getsize(os.path.join(path, wal.WAL_NAME)) == size
    copy = crash_copy(led, tmp_path)
    led.close()
    assert [r.lsn for r in records_of(copy)] == [first + 28, first + 29]
    with Ledger(str(copy)) as led:
        assert led.tot("alice") == 465 and len(led.past("alice")) == 30
        led.verify()


def test_a_batch_bigger_than_the_log_still_fits(tmp_path):
    path = str(tmp_path / "data")
    led = Ledger(path, store=Store(path, wal_bytes_max=wal.BLOCK_BYTES))
    done = []
    for i in range(200):                        # one batch of ~12 KiB
        led.submit(f"c{i}", 1, key=f"key-{i:03d}", done=done.append)
    led.mod("c0", 1)
    copy = crash_copy(led, tmp_path)
    led.close()
    assert len(done) == 200 and all(d == (1, 1) for d in done)
    with Ledger(str(copy)) as led:
        assert led.tot("c0") == 2 and led.tot("c199") == 1


def as_before_the_log(path, pending_key=False):
    """The store at `path` made as an AccMan before its write-ahead log left
    its stores: no log, no checkpoint, no key file (or with `pending_key`,
    the one an upgrade writes before its first checkpoint), at store format
    2.  Its LevelDB logs are left as they are."""
    for name in (wal.WAL_NAME, wal.CHECKPOINT_NAME):
        (path / name).unlink()
    if pending_key:
        (path / keyfile.KEY_NAME).rename(path / keyfile.PENDING_NAME)
    else:
        (path / keyfile.KEY_NAME).unlink()
    db = plyvel.DB(str(path))
    meta = json.loads(db.get(migrate.META_KEY))
    db.put(migrate.META_KEY, json.dumps(dict(meta, format=2)).encode(), sync=True)
    db.close()


@pytest.mark.parametrize("key_file", ["none yet", "written by an upgrade cut short"])
def test_a_store_written_before_the_log_opens_and_gets_a_checkpoint(tmp_path, key_file):
    """Store format 2, no log, no checkpoint and no key file, as an AccMan
    before the log left it; or with the key file that an upgrade writes
    before its first checkpoint, cut short there."""
    path = tmp_path / "data"
    with Ledger(str(path)) as led:
        led.mod("alice", 7)
    as_before_the_log(path, pending_key=key_file != "none yet")
    with Ledger(str(path)) as led:
        assert led.tot("alice") == 7
        assert checkpoint_of(path) is not None
        assert led.mod("alice", 1) == (8, 2)


def test_a_second_open_in_this_process_is_refused_before_it_touches_a_file(crashed):
    path, _ = crashed
    before = files_of(path)
    # The Store's own lock: held from before recovery reads anything.
    with Ledger(str(path)):
        after_open = files_of(path)
        with pytest.raises(StoreLocked, match="open in another process"):
            Ledger(str(path))
        assert files_of(path) == after_open
    assert before != after_open             # the first open did recover


def test_a_write_that_raises_a_bug_fails_the_batch_instead_of_hanging(tmp_path):
    class BuggyStore(Store):
        def write(self, wal_record):
            raise TypeError("a bug")

    path = str(tmp_path / "data")
    led = Ledger(path, store=BuggyStore(path))
    with pytest.raises(Unavailable, match="the store failed to commit"):
        led.mod("alice", 1)
    assert not led.healthy
    assert "unexpected TypeError: a bug" in led._committer.error.detail
    led.close()


def test_a_failed_commit_logs_its_cause_and_tells_the_client_no_path_or_os_error(
        tmp_path, caplog):
    """Issue 11 item 3: the cause goes to the log (and Committer.error, for
    the server's exit line); the client's detail names no file of the server
    and no OS error (SPEC "Access")."""
    class NoSpace(Store):
        def write(self, wal_record):
            with plyvel_errors.translated(self.path, "commit"):
                raise OSError(28, "No space left on device")

    path = str(tmp_path / "data")
    led = Ledger(path, store=NoSpace(path))
    with caplog.at_level(logging.ERROR, logger="accman.commit"):
        with pytest.raises(Unavailable) as info:
            led.mod("alice", 1)
    led.close()
    detail = info.value.detail
    assert "nothing in this batch was acknowledged" in detail
    assert path not in detail and "No space" not in detail and "/" not in detail
    assert f"{path}: commit failed: No space left on device" in caplog.text
    assert led._committer.error.detail == f"{path}: commit failed: No space left on device"


def test_a_failed_write_takes_no_checkpoint_so_the_batch_is_replayed_whole(tmp_path):
    """The record reached the log, LevelDB's write then failed: the mod was
    answered Unavailable (unknown outcome), and the next open has it whole."""
    class FailsAfterTheLog(Store):
        def write(self, wal_record):
            self.wal.append(wal_record)
            self.wal.broken = True
            raise StoreError(f"{self.path}: commit failed: injected after the log")

    path = str(tmp_path / "data")
    with Ledger(path) as led:
        led.mod("alice", 1, key="a")
    store = FailsAfterTheLog(path)
    led = Ledger(path, store=store)
    with pytest.raises(Unavailable):
        led.mod("alice", 2, key="b")
    ckpt_before = checkpoint_of(path)
    led.close()
    assert checkpoint_of(path) == ckpt_before     # none at close
    with Ledger(path) as led:
        assert [e.key for e in led.past("alice")] == ["b", "a"]
        assert led.mod("alice", 2, key="b") == (3, 2)


def test_the_file_is_written_ahead_of_the_records_not_to_its_size_at_once(tmp_path):
    path = str(tmp_path / "data")
    with Ledger(path) as led:
        led.mod("alice", 1)
        size = os.path.getsize(os.path.join(path, wal.WAL_NAME))
    # The first record's block at least (its write waited for it), and at
    # most the lead after it, in whole chunks (the grower writes those in
    # the background: how far it got is timing).
    assert wal.BLOCK_BYTES <= size <= walwriter.GROW_LEAD_BYTES + walwriter.GROW_BYTES
    assert size < wal.WAL_BYTES_MAX


def test_a_full_disk_while_growing_the_file_fails_the_batch_and_stops_writes(
        tmp_path, monkeypatch):
    """Only the thread that writes the file ahead calls fdatasync; the disk
    refusing it is a failed commit (fail-stop), named in the log.  A new
    log's first chunk is written at open; the disk fills after it."""
    real_fdatasync = os.fdatasync
    calls = []

    def no_space_after_the_first(fd):
        calls.append(fd)
        if len(calls) > 1:
            raise OSError(28, "No space left on device")
        real_fdatasync(fd)

    path = str(tmp_path / "data")
    monkeypatch.setattr(os, "fdatasync", no_space_after_the_first)
    led = Ledger(path)
    acked = 0
    with pytest.raises(Unavailable, match="the store failed to commit"):
        for _ in range(walwriter.GROW_BYTES // wal.BLOCK_BYTES + 1):
            led.mod("alice", 1)
            acked += 1
    assert "growing accman.wal: No space left on device" in led._committer.error.detail
    assert not led.healthy
    led.close()
    monkeypatch.undo()
    with Ledger(path) as led:
        assert led.tot("alice") == acked
        assert led.mod("alice", 2) == (acked + 2, acked + 1)


def test_a_grower_that_cannot_start_fails_the_open_and_never_hangs_it(tmp_path, monkeypatch):
    """The thread that writes the file ahead maps its buffer of zeros
    first; the OS refusing it (ENOMEM) is its failure, told to the writer
    waiting for the file, as a full disk is.  It used to end the thread
    before its `try`: the writer waited for ever (a new store's open hung;
    a young store's first batch past the written file hung every mod, the
    ledger still healthy)."""
    import mmap
    import threading
    real_mmap = mmap.mmap

    def no_memory_for_the_grower(*args, **kw):
        if threading.current_thread().name == "accman-wal-grow":
            raise OSError(12, "Cannot allocate memory")
        return real_mmap(*args, **kw)

    monkeypatch.setattr(mmap, "mmap", no_memory_for_the_grower)
    path = str(tmp_path / "data")
    got = outcome_within(lambda: Ledger(path).close(), 10,
                         "the open hung: the writer waits for a grower that has ended")
    assert isinstance(got, StoreError), got
    # A new store: nothing to replay; its log's start failed.
    assert got.detail == (f"{path}: start the write-ahead log failed: growing accman.wal: "
                          "Cannot allocate memory"), got.detail
    monkeypatch.undo()
    with Ledger(path) as led:               # nothing was left open or half made
        assert led.mod("alice", 1) == (1, 1)


def test_a_file_system_that_refuses_o_direct_gets_the_same_log_through_the_cache(
        tmp_path, monkeypatch):
    real_open = os.open
    opened = []

    def no_direct(file, flags, *args, **kw):
        if flags & os.O_DIRECT:
            raise OSError(22, "Invalid argument")
        if str(file).endswith(wal.WAL_NAME):
            opened.append(flags)
        return real_open(file, flags, *args, **kw)

    monkeypatch.setattr(os, "open", no_direct)
    path = str(tmp_path / "data")
    led = Ledger(path)
    assert [led.mod("alice", i) for i in (1, 2)] == [(1, 1), (3, 2)]
    copy = crash_copy(led, tmp_path)
    led.close()
    # The writer's descriptor (O_DSYNC) and the grower's, neither direct.
    assert any(f & os.O_DSYNC for f in opened) and len(opened) >= 2
    monkeypatch.undo()
    with Ledger(str(copy)) as led:
        assert led.tot("alice") == 3


FIXTURES = Path(__file__).parent / "fixtures"


def test_a_store_of_the_previous_log_format_opens_and_moves_to_the_keyed_one(tmp_path):
    """tests/fixtures/amw1-store was written by the AccMan before keyed
    records (AMW1, a format-1 checkpoint, no key file), killed with six
    acknowledged batches in its log.  It opens with all six, gets its key
    file from its format record, and writes the current format from then on."""
    path = tmp_path / "data"
    shutil.copytree(FIXTURES / "amw1-store", path)
    assert not (path / keyfile.KEY_NAME).exists()
    assert wal.read_checkpoint(str(path), None).format == 1
    led = Ledger(str(path))
    assert led.tot("bob") == 90 and led.tot("alice") == 120
    assert led.mod("alice", 40, key="k3") == (60, 2)       # answered from its record
    led.verify()
    assert keyfile.read_key(str(path)) == led.store.salt
    assert checkpoint_of(path).format == wal.CHECKPOINT_FORMAT
    led.mod("alice", 5, key="new")
    copy = crash_copy(led, tmp_path)
    led.close()
    # The mod's record alone follows the open's checkpoint (the open may
    # have written records of its own before it: a store format upgrade).
    lsns = [r.lsn for r in records_of(copy)]
    assert lsns == [checkpoint_of(copy).lsn] and lsns[0] > 6
    assert (copy / wal.WAL_NAME).read_bytes()[:4] == wal.MAGIC
    with Ledger(str(copy)) as led:
        assert led.tot("alice") == 125 and led.tot("bob") == 90
        led.verify()


def test_a_damaged_stamp_alone_leaves_a_record_that_passes_its_check(tmp_path):
    """The stamps only judge a record that fails its MAC: one whose data
    is whole is replayed whatever a stamp says."""
    path = three_mods_then_kill(tmp_path)
    last_lsn, off = offsets_of(path)[-1]
    f = path / wal.WAL_NAME
    raw = bytearray(f.read_bytes())
    walsectors.STAMP.pack_into(raw, off + SECTOR - walsectors.STAMP.size, last_lsn + 9, 7)
    f.write_bytes(bytes(raw))
    with Ledger(str(path)) as led:
        assert led.tot("alice") == 123


def test_a_store_of_the_unstamped_log_format_opens_and_moves_to_the_stamped_one(tmp_path):
    """tests/fixtures/amw2-store was written by the AccMan before stamped
    sectors (AMW2, a format-2 checkpoint), killed with six acknowledged
    batches in its log, the last of three mods.  It opens with all of
    them, and writes AMW3 from then on."""
    path = tmp_path / "data"
    shutil.copytree(FIXTURES / "amw2-store", path)
    assert checkpoint_of(path).format == 2
    assert (path / wal.WAL_NAME).read_bytes()[:4] == wal.MAGIC_AMW2
    led = Ledger(str(path))
    assert (led.tot("bob"), led.tot("alice"), led.tot("carol")) == (90, 60, 6)
    assert led.mod("carol", 2, key="c2") == (3, 2)           # answered from its record
    led.verify()
    assert checkpoint_of(path).format == wal.CHECKPOINT_FORMAT == 3
    led.mod("carol", 4, key="new")
    copy = crash_copy(led, tmp_path)
    led.close()
    assert [r.lsn for r in records_of(copy)] == [checkpoint_of(copy).lsn]
    assert (copy / wal.WAL_NAME).read_bytes()[:4] == wal.MAGIC
    with Ledger(str(copy)) as led:
        assert (led.tot("carol"), led.tot("bob")) == (10, 90)
        led.verify()


def test_the_lsn_due_where_the_records_ended_is_never_written(tmp_path):
    """A review's case: a torn record dropped, its lsn written again at the
    same offset and torn too, would make one record of the two writes'
    landed sectors, all bearing its stamp, and be refused.  An open skips
    the lsn due where the records ended, so no two writes share one."""
    path, _, torn = newest_record_unapplied(tmp_path, zero_sector(2))
    with Ledger(str(path)) as led:
        assert led.store.wal.next_lsn == torn + 1
        led.mod("alice", 1)
        copy = crash_copy(led, tmp_path, "again")
    assert [r.lsn for r in records_of(copy)] == [torn + 1]
    with Ledger(str(copy)) as led:
        assert led.tot("alice") == 124


@pytest.mark.parametrize("payload_bytes", [0, 1, 467, 468, 469, 968, 3968, 3969, 4064, 70000])
def test_a_record_of_any_size_is_laid_out_over_stamped_sectors_and_read_back(payload_bytes):
    """The sector arithmetic at its edges (500 bytes of record a sector,
    the 32-byte header, whole blocks): laid out, gathered back, its span
    whole blocks that hold every sector, every sector stamped."""
    record = bytes(range(256)) * (payload_bytes // 256 + 1)
    record = bytes(wal.HEADER.size) + record[:payload_bytes]
    span = wal.record_span(payload_bytes)
    buf = bytearray(span + 4096)
    used = walsectors.lay_out(buf, record, 9, payload_bytes)
    k = walsectors.sectors(len(record))
    assert used == k * SECTOR <= span < used + wal.BLOCK_BYTES and span % wal.BLOCK_BYTES == 0
    assert walsectors.gather(memoryview(buf), 0, len(record)) == record
    assert all(walsectors.STAMP.unpack_from(buf, i * SECTOR + walsectors.SECTOR_DATA_BYTES)
               == (9, payload_bytes) for i in range(k))
    with pytest.raises(ValueError, match="do not fit"):
        walsectors.lay_out(bytearray(used - 1), record, 9, payload_bytes)


def test_a_newest_record_cut_by_the_file_s_end_is_damage():
    """The file is written ahead of every record, so a record whose first
    sector is there and whose rest is past the end was cut: damage."""
    record = bytes(wal.HEADER.size) + b"\x05" * 1200
    buf = bytearray(4096)
    walsectors.lay_out(buf, record, 4, 1200)
    view = memoryview(buf)[:2 * SECTOR]
    assert "the file ends inside it" in walsectors.damage_at_end(view, 0, 4, None)


def test_each_batch_past_the_checkpoint_is_its_record_s():
    """Recovery's check of LevelDB's logs against the records: the first
    batch past the synced lengths is any record's (those before it may be
    in a table LevelDB made since), each later one the record its sequence
    number places it at (a power cut may have lost those between), its
    puts and deletes as a batch lays them out or in another order.  Any
    other batch, or a batch more than the records, is refused, naming the
    batch and the record.  A store an older AccMan wrote (no `body_of`)
    has its batches counted only."""
    body_of = _ledger.leveldb_batch_body
    ckpt = wal.Checkpoint(7, {})
    puts = [(b"a", b"1"), (b"b", None)]
    other = [(b"a", b"2"), (b"c", b"")]
    third = [(b"d", b"4")]
    records = [(7, puts), (8, other), (9, third)]

    def batch(ops, seq, off=0):
        return fsck.Batch("000005.log", off, seq, body_of(ops))

    def check(batches, body=body_of):
        wal.check_leveldb_tail(ckpt, records, batches, body)

    check([batch(puts, 100), batch(other, 102, 40), batch(third, 104, 80)])
    check([batch(other, 500), batch(third, 502, 40)])           # the first in a table
    check([batch(puts, 100), batch(third, 104, 40)])            # the one between lost
    check([batch(puts[::-1], 100), batch(other[::-1], 102, 40)])    # another layout
    not_any = r"is not any of the records of accman\.wal from record 7 on"
    misplaced = r"is not a record of accman\.wal: its sequence number places it"
    for batches, said in [
            ([batch([(b"a", b"1"), (b"x", None)], 100)], not_any),
            ([batch(puts + [(b"h", None)], 100)], not_any),
            ([batch(puts, 100), batch(other, 103, 40)], misplaced),
            ([batch(puts, 100), batch(third, 106, 40)], misplaced),
            ([batch(puts, 100), batch(third, 102, 40)],
             r"is not record 8 of accman\.wal, where its sequence number places it"),
            ([batch(puts, 100), batch(other[:1] + [(b"c", b"x")], 102, 40)], r"is not record 8")]:
        with pytest.raises(FileDamage, match=r"^the batch at offset (0|40) of LevelDB's log "
                                             r"000005\.log, written after the last "
                                             rf"checkpoint, {said}"):
            check(batches)
        check(batches, None)
    for body in (body_of, None):
        with pytest.raises(FileDamage, match=r"LevelDB's logs hold 4 batches written after "
                                             r"the last checkpoint \(4 in 000005\.log\), but "
                                             r"accman\.wal holds 3 records from record 7 on"):
            check([batch(puts, 100)] * 4, body)


def test_an_open_reads_the_format_record_without_a_copy_of_the_store(tmp_path, monkeypatch):
    """A start reads the format record from LevelDB's files (keyread), where
    it read it from a private copy under $TMPDIR: a copy of the LevelDB log
    of a store never restarted held the store's key, and a SIGKILL left it
    there (a review).  A store from before the key file (its key from the
    record), a crashed store never restarted (its record in its LevelDB log
    alone, read as recovery cuts the logs) and one restarted (in a table)
    open with no copy made, and whole."""
    from accman.ledger import copies
    copied = []

    def no_copy(path, *args, **kwargs):
        copied.append(path)
        raise RuntimeError("copied")
    monkeypatch.setattr(copies, "snapshot", no_copy)
    before = tmp_path / "before"
    with Ledger(str(before)) as led:
        led.mod("alice", 7)
    as_before_the_log(before)
    crashed = {}
    for restarts in (0, 1):
        path = tmp_path / f"store{restarts}"
        for _ in range(restarts):
            Ledger(str(path)).close()
        led = Ledger(str(path))
        led.mod("alice", 7)
        crashed[restarts] = crash_copy(led, tmp_path, f"crashed{restarts}")
        led.close()
    assert any(p.name.endswith(".ldb") for p in crashed[1].iterdir())
    assert not any(p.name.endswith(".ldb") for p in crashed[0].iterdir())
    for path in (before, crashed[0], crashed[1]):
        with Ledger(str(path)) as led:
            assert led.tot("alice") == 7
    assert copied == []
