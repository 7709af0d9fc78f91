"""accman.fsck and accman._check: the integrity check of a data directory's
LevelDB files that the store runs before LevelDB opens it.

The stores are real ones, written by the Ledger; the damage is one flipped
byte (or a truncation, for a torn write).  check_dir must refuse exactly
when the files are damaged, and accept a clean store and a torn tail."""

import random
import re
import shutil
import struct
from pathlib import Path

import pytest

from accman import Ledger
from accman.ledger import _check, fsck, tablecheck
from accman.errors import FileDamage, StoreCorrupt
from accman.ledger import leveldb as leveldb_module
from accman.ledger.leveldb import Store
from test_wal import as_before_the_log

LOG_BLOCK_BYTES = 32768
LOG_HEADER_BYTES = 7
TABLE_FOOTER_BYTES = 48


# --- CRC-32C ------------------------------------------------------------------------

def crc32c_reference(data: bytes) -> int:
    """Bit by bit, from the definition (reflected polynomial 0x82F63B78)."""
    crc = 0xFFFFFFFF
    for b in data:
        crc ^= b
        for _ in range(8):
            crc = (crc >> 1) ^ 0x82F63B78 if crc & 1 else crc >> 1
    return crc ^ 0xFFFFFFFF


def test_crc32c_known_vectors():
    # RFC 3720 B.4 (iSCSI) and the check value of the CRC catalogue.
    assert _check.crc32c(b"123456789") == 0xE3069283
    assert _check.crc32c(bytes(32)) == 0x8A9136AA
    assert _check.crc32c(b"\xff" * 32) == 0x62A8AB43
    assert _check.crc32c(bytes(range(32))) == 0x46DD794E
    assert _check.crc32c(bytes(range(31, -1, -1))) == 0x113FDB5C
    assert _check.crc32c(b"") == 0


def test_crc32c_matches_the_definition_at_every_length_and_alignment():
    rng = random.Random(7)
    data = bytes(rng.randrange(256) for _ in range(300))
    for start in range(9):
        for length in list(range(0, 40)) + [100, 291 - start]:
            chunk = data[start:start + length]
            assert _check.crc32c(memoryview(data)[start:start + length]) == crc32c_reference(chunk)


def test_crc32c_continues_and_takes_any_buffer():
    whole = _check.crc32c(b"123456789")
    assert _check.crc32c(b"6789", _check.crc32c(b"12345")) == whole
    assert _check.crc32c(bytearray(b"123456789")) == whole
    assert _check.crc32c(memoryview(b"xx123456789")[2:]) == whole


def test_leveldb_masking():
    crc = _check.crc32c(b"foo")
    masked = _check.mask(crc)
    assert masked == (((crc >> 15) | (crc << 17)) + 0xA282EAD8) & 0xFFFFFFFF
    assert masked != crc and _check.unmask(masked) == crc
    assert _check.mask(0xFFFFFFFF) == 0xA282EAD7          # wraps mod 2**32
    for crc in (0, 1, 0x80000000, 0xDEADBEEF, 0xFFFFFFFF):
        assert _check.unmask(_check.mask(crc)) == crc


# --- stores made by the ledger ---------------------------------------------------------

def build(path, mods, accounts=3, reopen=False):
    with Ledger(str(path)) as led:
        for i in range(mods):
            led.mod(f"acct-{i % accounts}", i + 1, key=f"key-{i}")
    if reopen:                          # LevelDB turns the log into a table
        Ledger(str(path)).close()
    return Path(path)


@pytest.fixture(scope="module")
def log_store(tmp_path_factory):
    """Everything in one log: 60 mods, a few KiB."""
    return build(tmp_path_factory.mktemp("log") / "data", 60)


@pytest.fixture(scope="module")
def big_log_store(tmp_path_factory):
    """A log of several 32 KiB blocks, with records that span blocks."""
    path = tmp_path_factory.mktemp("biglog") / "data"
    with Ledger(str(path)) as led:
        for i in range(60):
            for j in range(20):
                led.submit(f"acct-{j}", i + 1, key=f"k-{i}-{j}", done=lambda outcome: None)
            led.mod("acct-x", 1)
    return path


@pytest.fixture(scope="module")
def table_store(tmp_path_factory):
    """One table big enough for many data blocks, and an empty log."""
    return build(tmp_path_factory.mktemp("table") / "data", 1500, 2, reopen=True)


def copy_of(base, tmp_path):
    dst = tmp_path / "copy"
    shutil.copytree(base, dst)
    return dst


def the_log(path):
    (log,) = [p for p in Path(path).glob("*.log") if p.stat().st_size]
    return log


def log_records(raw):
    """(offset, length, type) of every physical record, walked by hand."""
    out, i = [], 0
    while i + LOG_HEADER_BYTES <= len(raw):
        left = LOG_BLOCK_BYTES - i % LOG_BLOCK_BYTES
        if left < LOG_HEADER_BYTES:
            i += left
            continue
        length, kind = struct.unpack_from("<HB", raw, i + 4)
        if kind == 0:
            break
        out.append((i, length, kind))
        i += LOG_HEADER_BYTES + length
    return out


def flipped(raw, offset, mask=0x01):
    b = bytearray(raw)
    b[offset] ^= mask
    return bytes(b)


def flip(path, offset, mask=0x01):
    Path(path).write_bytes(flipped(Path(path).read_bytes(), offset, mask))


def files_of(path):
    return {p.name: p.read_bytes() for p in Path(path).iterdir()}


def refused(path, match):
    """check_dir refuses, with a message that names the directory and the
    damage, and changes no file."""
    before = files_of(path)
    with pytest.raises(StoreCorrupt, match=match) as info:
        fsck.check_dir(str(path))
    assert str(path) in info.value.detail and "damaged" in info.value.detail
    assert "refusing to serve" in info.value.detail
    assert files_of(path) == before
    return info.value.detail


# --- clean stores ---------------------------------------------------------------------------

def test_a_clean_store_passes(log_store, table_store, big_log_store):
    done = fsck.check_dir(str(log_store))
    assert done.logs == 1 and done.log_records > 60 and done.tables == 0
    done = fsck.check_dir(str(big_log_store))
    kinds = {k for _, _, k in log_records(the_log(big_log_store).read_bytes())}
    assert {2, 3, 4} <= kinds or {2, 4} <= kinds, "expected records that span blocks"
    assert done.log_records > 60
    done = fsck.check_dir(str(table_store))
    assert done.tables == 1 and done.table_blocks > 10 and done.bytes > 60_000


def test_a_new_empty_directory_passes(tmp_path):
    assert fsck.check_dir(str(tmp_path)) == fsck.Checked(0, 0, 0, 0, 0)


# --- logs -----------------------------------------------------------------------------------

@pytest.mark.parametrize("field,at", [("crc", 0), ("crc", 3), ("length low", 4),
                                      ("length high", 5), ("type", 6), ("payload", 7)])
def test_a_flipped_byte_in_a_record_in_the_middle_of_the_log_is_refused(
        log_store, tmp_path, field, at):
    data = copy_of(log_store, tmp_path)
    log = the_log(data)
    records = log_records(log.read_bytes())
    assert len(records) > 20
    offset, length, _ = records[len(records) // 2]
    flip(log, offset + (at if field != "payload" else LOG_HEADER_BYTES + length // 2),
         0x80 if field == "length high" else 0x01)
    detail = refused(data, f"log {log.name}: record at offset {offset} ")
    assert "not a torn write" in detail


def test_every_flipped_byte_of_the_log_but_its_last_record_is_refused(log_store):
    """In memory, every byte of every record but the last: refused.  The
    last record is where a torn write ends, and a flip there looks the same
    (the next test)."""
    raw = the_log(log_store).read_bytes()
    last = log_records(raw)[-1][0]
    for offset in range(0, last, 3):
        for mask in (0x01, 0x80):
            with pytest.raises(FileDamage):
                fsck.check_log(flipped(raw, offset, mask), "000003.log", torn_tail_ok=True)


def test_a_flip_in_the_last_record_is_taken_for_a_torn_tail(log_store):
    """The limit of any log check: a bad last record with nothing after it
    cannot be told from a torn write; LevelDB drops it the same way."""
    raw = the_log(log_store).read_bytes()
    offset, length, _ = log_records(raw)[-1]
    for at in (0, 6, LOG_HEADER_BYTES + length // 2):
        damaged = flipped(raw, offset + at)
        _, count = fsck.check_log(damaged, "000003.log", torn_tail_ok=True)
        assert count == len(log_records(raw)) - 1
        with pytest.raises(FileDamage, match="only the newest log"):
            fsck.check_log(damaged, "000003.log", torn_tail_ok=False)


def test_a_log_cut_in_the_middle_of_its_last_record_is_a_torn_tail(log_store, tmp_path):
    data = copy_of(log_store, tmp_path)
    log = the_log(data)
    raw = log.read_bytes()
    offset, length, _ = log_records(raw)[-1]
    for cut in (offset + 3, offset + LOG_HEADER_BYTES + length // 2, len(raw) - 1):
        log.write_bytes(raw[:cut])
        assert fsck.check_dir(str(data)).log_records == len(log_records(raw)) - 1
    # ...and LevelDB reads it the same way: every mod but the torn one.  In
    # a store written before AccMan's own write-ahead log, that is: with a
    # checkpoint, the cut log has lost synced bytes and is refused
    # (tests/test_wal.py), since a torn write cannot reach below it.
    as_before_the_log(data)
    with Ledger(str(data)) as led:
        assert led.tot("acct-2") + led.tot("acct-1") + led.tot("acct-0") == sum(range(1, 60))


def test_a_torn_tail_of_zeros_is_accepted_and_one_with_a_record_after_it_is_not(
        big_log_store, tmp_path):
    data = copy_of(big_log_store, tmp_path)
    log = the_log(data)
    raw = log.read_bytes()
    # A filesystem may leave the unwritten end of a torn write as zeros.
    log.write_bytes(raw + bytes(LOG_BLOCK_BYTES + 100))
    fsck.check_dir(str(data))
    # Zeros in the middle, with whole records in the blocks after them.
    records = log_records(raw)
    offset, length, _ = next(r for r in records if r[0] < LOG_BLOCK_BYTES // 2 and r[1] > 20)
    log.write_bytes(raw[:offset] + bytes(LOG_HEADER_BYTES + length)
                    + raw[offset + LOG_HEADER_BYTES + length:])
    refused(data, "is zeros, and a valid record follows")


def test_damage_in_an_early_block_of_a_long_log_is_refused(big_log_store, tmp_path):
    data = copy_of(big_log_store, tmp_path)
    log = the_log(data)
    raw = log.read_bytes()
    assert len(raw) > 3 * LOG_BLOCK_BYTES
    # The last record of block 0 spans into block 1: the flip makes its
    # length run past the end of the block.
    offset, _, kind = [r for r in log_records(raw) if r[0] < LOG_BLOCK_BYTES][-1]
    flip(log, offset + 5, 0x80)
    refused(data, "past the end of its 32 KiB block|fails its checksum")


def test_a_bad_record_at_the_end_of_an_older_log_is_refused(log_store, tmp_path):
    """Only the newest log may end in a torn write: a newer one means the
    writer went on after it."""
    data = copy_of(log_store, tmp_path)
    log = the_log(data)
    raw = log.read_bytes()
    offset, _, _ = log_records(raw)[-1]
    log.write_bytes(raw[:offset + 3])
    fsck.check_dir(str(data))                           # the newest: a torn tail
    (data / f"{int(log.stem) + 1:06d}.log").write_bytes(b"")
    refused(data, f"log {log.name}: record at offset {offset} .*only the newest log")


def log_record(payload, kind=1):
    """One physical log record, as LevelDB writes it."""
    crc = _check.mask(_check.crc32c(bytes([kind]) + payload))
    return struct.pack("<IHB", crc, len(payload), kind) + payload


def test_a_non_zero_block_trailer_is_refused():
    # A record that leaves 3 bytes of block 0, the zero trailer, a record
    # in block 1.
    first = log_record(b"a" * (LOG_BLOCK_BYTES - 3 - LOG_HEADER_BYTES))
    raw = first + bytes(3) + log_record(b"b" * 20)
    assert fsck.check_log(raw, "000003.log", torn_tail_ok=False)[1] == 2
    with pytest.raises(FileDamage, match="trailer is not zeros, and a valid record follows"):
        fsck.check_log(flipped(raw, len(first) + 1), "000003.log", torn_tail_ok=True)


def test_records_that_span_blocks_are_read_whole():
    payload = bytes(range(256)) * 300                   # 76800 bytes: three blocks
    chunks, raw, at = [], b"", 0
    while at < len(payload):
        room = LOG_BLOCK_BYTES - len(raw) % LOG_BLOCK_BYTES - LOG_HEADER_BYTES
        chunks.append(payload[at:at + room])
        at += room
    kinds = [2] + [3] * (len(chunks) - 2) + [4]
    raw = b"".join(log_record(c, k) for c, k in zip(chunks, kinds, strict=True))
    records, count = fsck.check_log(raw, "MANIFEST-000002", torn_tail_ok=False, keep=True)
    assert records == [payload] and count == 3
    # Cut inside the LAST fragment: a torn tail, the record dropped whole.
    assert fsck.check_log(raw[:-5], "x.log", torn_tail_ok=True, keep=True) == ([], 2)
    with pytest.raises(FileDamage):
        fsck.check_log(raw[:-5], "x.log", torn_tail_ok=False)
    # Cut right after the MIDDLE fragment: ends inside the record.
    with pytest.raises(FileDamage, match="ends inside a fragmented record"):
        fsck.check_log(raw[:2 * LOG_BLOCK_BYTES], "x.log", torn_tail_ok=False)


def test_records_out_of_sequence_are_refused(log_store):
    raw = bytearray(the_log(log_store).read_bytes())
    offset, length, kind = log_records(bytes(raw))[5]
    assert kind == 1                                    # FULL
    raw[offset + 6] = 3                                 # MIDDLE, CRC made to match
    crc = _check.mask(_check.crc32c(bytes(raw[offset + 6:offset + LOG_HEADER_BYTES + length])))
    struct.pack_into("<I", raw, offset, crc)
    with pytest.raises(FileDamage, match=f"offset {offset} is out of sequence"):
        fsck.check_log(bytes(raw), "000003.log", torn_tail_ok=True)


# --- MANIFEST and CURRENT --------------------------------------------------------------------

def test_a_flipped_byte_in_the_manifest_is_refused(table_store, tmp_path):
    data = copy_of(table_store, tmp_path)
    manifest = data / (data / "CURRENT").read_text().strip()
    raw = manifest.read_bytes()
    records = log_records(raw)
    assert len(records) >= 2
    for offset, length, _ in records[:-1]:
        for at in (0, 4, 6, LOG_HEADER_BYTES + length // 2):
            manifest.write_bytes(flipped(raw, offset + at))
            refused(data, f"{manifest.name}: record at offset {offset} ")


def test_current_must_name_an_existing_manifest(table_store, tmp_path):
    data = copy_of(table_store, tmp_path)
    (data / "CURRENT").write_text("MANIFEST-999999\n")
    refused(data, "CURRENT names MANIFEST-999999, which is missing")
    (data / "CURRENT").write_text("MANIFEST-000004")
    refused(data, "CURRENT does not name a MANIFEST: it holds 'MANIFEST-000004'")
    (data / "CURRENT").write_bytes(b"MANIFEST\xff\n")     # as text, not a bytes repr
    refused(data, re.escape(r"CURRENT does not name a MANIFEST: it holds 'MANIFEST\xff\n'"))
    (data / "CURRENT").unlink()
    refused(data, "CURRENT is missing")


def test_a_listed_table_that_is_missing_or_resized_is_refused(table_store, tmp_path):
    data = copy_of(table_store, tmp_path)
    (table,) = data.glob("*.ldb")
    raw = table.read_bytes()
    table.write_bytes(raw + b"\0")
    refused(data, f"table {table.name} has {len(raw) + 1} bytes")
    table.unlink()
    refused(data, f"table {table.name}, listed in MANIFEST-\\d+, is missing")


def test_a_table_the_manifest_does_not_list_is_left_to_leveldb(table_store, tmp_path):
    """A partial table from an interrupted compaction: LevelDB deletes it
    at open, so it is not checked (refusing it would refuse a store for a
    crash that lost nothing)."""
    data = copy_of(table_store, tmp_path)
    (data / "999999.ldb").write_bytes(b"half a table")
    fsck.check_dir(str(data))


# --- tables ----------------------------------------------------------------------------------

def table_layout(raw):
    """(metaindex offset, index offset, index size) from the footer."""
    values, i = [], len(raw) - TABLE_FOOTER_BYTES
    for _ in range(4):
        v, i = tablecheck.read_varint(raw, i)
        values.append(v)
    return values[0], values[2], values[3]


def test_every_part_of_a_table_is_covered(table_store):
    """A flip every 7 bytes of the data blocks, and every byte of the last
    data block's end, the metaindex and index blocks and the footer:
    each is refused (no byte of a table is outside a checked block)."""
    (table,) = table_store.glob("*.ldb")
    raw = table.read_bytes()
    size = len(raw)
    meta_offset, index_offset, index_size = table_layout(raw)
    assert 0 < meta_offset < index_offset < size - TABLE_FOOTER_BYTES
    offsets = sorted(set(range(0, meta_offset, 7))
                     | set(range(meta_offset - 300, size)))
    assert tablecheck.check_table(raw, table.name) > 10
    for offset in offsets:
        with pytest.raises(FileDamage):
            tablecheck.check_table(flipped(raw, offset, 0x01 if offset % 2 else 0x80), table.name)


@pytest.mark.parametrize("part", ["first data block", "last data block", "metaindex block",
                                  "index block", "footer handles", "footer padding",
                                  "footer magic"])
def test_a_flipped_byte_in_a_table_is_refused_with_its_place(table_store, tmp_path, part):
    data = copy_of(table_store, tmp_path)
    (table,) = data.glob("*.ldb")
    size = table.stat().st_size
    meta_offset, index_offset, index_size = table_layout(table.read_bytes())
    footer = size - TABLE_FOOTER_BYTES
    at, match = {
        "first data block": (10, "data block at offset 0 fails its checksum"),
        "last data block": (meta_offset - 6, "data block at offset \\d+ fails its checksum"),
        "metaindex block": (meta_offset, f"metaindex block at offset {meta_offset} fails"),
        "index block": (index_offset + index_size // 2,
                        f"index block at offset {index_offset} fails"),
        "footer handles": (footer + 1, "fails its checksum|does not follow|blocks end"),
        "footer padding": (footer + 30, "padding is not zeros"),
        "footer magic": (size - 1, "magic number is wrong"),
    }[part]
    flip(data / table.name, at)
    refused(data, f"table {table.name}: .*({match})")


def test_the_last_data_block_is_refused_at_open(table_store, tmp_path):
    """The case LevelDB's own iterator misses: it stops early, silently."""
    data = copy_of(table_store, tmp_path)
    (table,) = data.glob("*.ldb")
    meta_offset, _, _ = table_layout(table.read_bytes())
    flip(table, meta_offset - 60)
    with pytest.raises(StoreCorrupt, match="damaged"):
        Ledger(str(data))


# --- the store --------------------------------------------------------------------------------

def test_the_store_checks_before_leveldb_opens_and_only_when_asked(log_store, tmp_path):
    data = copy_of(log_store, tmp_path)
    log = the_log(data)
    offset, _, _ = log_records(log.read_bytes())[10]
    flip(log, offset + 5, 0x80)
    before = files_of(data)
    # Every byte of the log was synced at the last checkpoint (the clean
    # close): no torn tail is possible there.
    damaged = r"data files are damaged: log 000003.log: record at offset \d+ has length"
    with pytest.raises(StoreCorrupt, match=damaged):
        Ledger(str(data))
    with pytest.raises(StoreCorrupt, match=damaged):
        Ledger(str(data), verify="heads")
    assert files_of(data) == before, "a refused open changed a file"
    # Not asked (verify="none"): LevelDB opens it, and loses the records
    # after the damage without a word; this is what the check is for.
    store = Store(str(data), check_files=False)
    store.close()
    assert files_of(data) != before


def test_a_store_open_in_this_process_is_not_checked_but_refused_as_locked(log_store, tmp_path):
    from accman.errors import StoreLocked
    data = copy_of(log_store, tmp_path)
    with Ledger(str(data)):
        with pytest.raises(StoreLocked):
            Store(str(data))


def test_a_manifest_that_leveldb_would_refuse_is_refused_before_anything_changes(
        table_store, tmp_path):
    """A whole last record that fails its checksum is not a torn write in
    the MANIFEST (LevelDB reports it and refuses the open), nor is an empty
    MANIFEST: refused here, before recovery cuts anything."""
    data = copy_of(table_store, tmp_path)
    manifest = data / (data / "CURRENT").read_text().strip()
    raw = manifest.read_bytes()
    offset = log_records(raw)[-1][0]
    manifest.write_bytes(flipped(raw, offset + LOG_HEADER_BYTES))
    refused(data, rf"{manifest.name}: record at offset {offset} fails its checksum")
    manifest.write_bytes(b"")
    refused(data, f"{manifest.name} has no next file number, log number, last sequence")


# --- a MANIFEST that lost its last edits -----------------------------------------------------

@pytest.fixture(scope="module")
def flushed_store(tmp_path_factory):
    """A store whose LevelDB made tables of its memtable while it ran (a
    small write buffer): its MANIFEST ends in edits that each name a new
    log, the log before deleted.  Its tables are then compacted, so that
    nothing is left for a compaction to start on, and its last edit is a
    flush of the memtable that names a new log, not a compaction's,
    however the writes fell (a compaction at the end, under a busy
    machine's timing, made the cut version name a deleted table)."""
    path = tmp_path_factory.mktemp("flushed") / "data"
    saved = leveldb_module.WRITE_BUFFER_BYTES
    leveldb_module.WRITE_BUFFER_BYTES = 64 * 1024
    try:
        build(path, 3000, 50)
        with Ledger(str(path)) as led:
            for i in range(600):
                led.mod(f"acct-{i % 50}", 1, key=f"more-{i}")
            led.store.apply()               # LevelDB catches up with the log
            led.store.db.compact_range()
            for i in range(20):             # less than a memtable
                led.mod(f"acct-{i}", 1, key=f"last-{i}")
            led.store.apply()
            led.store.db.compact_range(start=b"\xff" * 16)   # past every key: a flush alone
    finally:
        leveldb_module.WRITE_BUFFER_BYTES = saved
    return path


@pytest.mark.parametrize("damage", ["cut at its last record", "last record's length raised"])
def test_a_manifest_that_lost_its_last_edit_is_refused_by_its_missing_log(
        flushed_store, tmp_path, damage):
    """Its last edit made a table of the log and named a new log; without
    it LevelDB would open the version before, whose log it had deleted:
    the table's writes lost, the table itself deleted.  Both damages read
    as a torn tail of the MANIFEST; the log that its last version names is
    not there, which no crash leaves."""
    data = copy_of(flushed_store, tmp_path)
    manifest = data / (data / "CURRENT").read_text().strip()
    raw = manifest.read_bytes()
    assert len(log_records(raw)) >= 3
    offset = log_records(raw)[-1][0]
    if damage == "cut at its last record":
        manifest.write_bytes(raw[:offset])
    else:
        manifest.write_bytes(flipped(raw, offset + 5, 0x10))   # the length's high byte
    refused(data, rf"LevelDB log \d{{6}}\.log, which {manifest.name} names as its newest, "
                  "is missing")
    before = files_of(data)
    with pytest.raises(StoreCorrupt, match="names as its newest, is missing"):
        Ledger(str(data))
    assert files_of(data) == before
    with pytest.raises(StoreCorrupt, match="names as its newest, is missing"):
        Store(str(data), read_only=True)
    assert files_of(data) == before


def test_a_read_only_open_leaves_the_store_s_left_over_tables_alone(log_store, tmp_path):
    """Tables the MANIFEST does not list are not linked into the private
    copy: LevelDB there gives their numbers to the tables it makes, and
    would truncate the store's own file through a link."""
    data = copy_of(log_store, tmp_path)
    for n in range(1, 40):
        if not list(data.glob(f"{n:06d}.*")):
            (data / f"{n:06d}.ldb").write_bytes(b"left over")
    before = files_of(data)
    store = Store(str(data), read_only=True)
    try:
        assert store.get(b"\x00nothing") is None
    finally:
        store.close()
    assert files_of(data) == before
