"""accman.ledger.keyread: one key's newest value read from LevelDB's files
without LevelDB, against what LevelDB itself reads from the same files."""

import os
import random
import shutil

import plyvel
import pytest

from accman.errors import FileDamage
from accman.ledger import keyread

KEYS = [b"\x00meta", b"\x00meta\x00", b"\x00met", b"a", b"b" * 40]
SEED = 20261208


def leveldb_reads(path, keys, copy):
    """What LevelDB reads for `keys` from a copy of `path` (its open turns
    the log into a table)."""
    shutil.rmtree(copy, ignore_errors=True)
    shutil.copytree(path, copy)
    db = plyvel.DB(str(copy))
    try:
        return [db.get(key) for key in keys]
    finally:
        db.close()


def test_the_newest_value_is_leveldb_s_through_puts_deletes_flushes_and_compactions(tmp_path):
    """Puts and deletes of a few neighbouring keys, in batches, the store
    closed and opened again (its log made a table), compacted, or left
    with entries in its log: after each step every key reads as LevelDB
    reads it."""
    rnd = random.Random(SEED)
    path = tmp_path / "db"
    plyvel.DB(str(path), create_if_missing=True).close()
    seen = {"in a log": 0, "in tables alone": 0, "none": 0}
    for step in range(40):
        db = plyvel.DB(str(path), write_buffer_size=rnd.choice([64 * 1024, 4 << 20]))
        try:
            for _ in range(rnd.randrange(1, 6)):
                with db.write_batch() as wb:
                    for _ in range(rnd.randrange(1, 8)):
                        key = rnd.choice(KEYS)
                        if rnd.random() < 0.25:
                            wb.delete(key)
                        else:
                            wb.put(key, os.urandom(rnd.choice([3, 300, 5000])))
            if rnd.random() < 0.2:
                db.compact_range()
        finally:
            db.close()
        got = [keyread.newest(str(path), key) for key in KEYS]
        assert got == leveldb_reads(path, KEYS, tmp_path / "copy"), step
        logged = any(n.endswith(".log") and os.path.getsize(path / n) for n in os.listdir(path))
        seen["none"] += got.count(None)
        seen["in a log" if logged else "in tables alone"] += 1
    assert all(seen.values()), seen


def test_a_key_whose_versions_span_data_blocks_reads_its_newest(tmp_path):
    """A table made from a log (an open's) keeps every version of a key, in
    several 4 KiB data blocks when the values are large: the newest is in
    the first of them, and the reader goes on past it."""
    path = tmp_path / "db"
    db = plyvel.DB(str(path), create_if_missing=True, write_buffer_size=64 << 20)
    for i in range(6):
        db.put(b"\x00meta", bytes([i]) * 3000)
    db.put(b"\x00metb", b"after")
    db.close()
    plyvel.DB(str(path)).close()            # the log made a table
    assert not any(n.endswith(".log") and os.path.getsize(path / n) for n in os.listdir(path))
    assert keyread.newest(str(path), b"\x00meta") == bytes([5]) * 3000
    assert keyread.newest(str(path), b"\x00metb") == b"after"
    assert keyread.newest(str(path), b"\x00me") is None


def test_a_log_cut_reads_as_recovery_leaves_it(tmp_path):
    """With `cuts`, a log's bytes past them are not read: the value is the
    one before them, from the log or a table."""
    path = tmp_path / "db"
    db = plyvel.DB(str(path), create_if_missing=True)
    db.put(b"\x00meta", b"table")
    db.close()
    db = plyvel.DB(str(path))
    db.put(b"\x00meta", b"first", sync=True)
    [log] = [n for n in os.listdir(path) if n.endswith(".log")]
    synced = os.path.getsize(path / log)
    db.put(b"\x00meta", b"second")
    db.close()
    cut = os.path.getsize(path / log) - synced
    assert keyread.newest(str(path), b"\x00meta") == b"second"
    assert keyread.newest(str(path), b"\x00meta", {log: cut}) == b"first"
    whole = os.path.getsize(path / log)
    assert keyread.newest(str(path), b"\x00meta", {log: whole}) == b"table"


def test_a_table_the_manifest_lists_that_is_gone_is_damage(tmp_path):
    path = tmp_path / "db"
    db = plyvel.DB(str(path), create_if_missing=True)
    db.put(b"\x00meta", b"x")
    db.close()
    plyvel.DB(str(path)).close()
    [table] = [n for n in os.listdir(path) if n.endswith(".ldb")]
    os.unlink(path / table)
    with pytest.raises(FileDamage, match=rf"table {table}, listed in MANIFEST-\d+, is missing"):
        keyread.newest(str(path), b"\x00meta")


def test_a_table_whose_index_handle_is_past_any_size_is_damage(tmp_path):
    """A footer's index handle of 2**64 - 1 bytes (canonical varints, as
    LevelDB writes them): FileDamage, where the checksum's C sizes raised
    OverflowError (a review)."""
    from accman.ledger import tablecheck
    path = tmp_path / "db"
    db = plyvel.DB(str(path), create_if_missing=True)
    db.put(b"\x00meta", b"x")
    db.close()
    plyvel.DB(str(path)).close()
    [table] = [path / n for n in os.listdir(path) if n.endswith(".ldb")]
    raw = table.read_bytes()
    footer = raw[-tablecheck.TABLE_FOOTER_BYTES:]
    meta_off, i = tablecheck.read_varint(footer, 0)
    meta_size, i = tablecheck.read_varint(footer, i)
    handles = b"".join(map(tablecheck.varint_bytes, (meta_off, meta_size, 0, 2 ** 64 - 1)))
    table.write_bytes(raw[:-tablecheck.TABLE_FOOTER_BYTES]
                      + handles.ljust(tablecheck.TABLE_HANDLES_BYTES, b"\0") + footer[40:])
    for read in (lambda: keyread.newest(str(path), b"\x00meta"),
                 lambda: tablecheck.check_table(table.read_bytes(), table.name)):
        with pytest.raises(FileDamage, match="index block at offset 0 fails its checksum"):
            read()
