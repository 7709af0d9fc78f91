"""The store's secret, `accman.key`: the key that hashes credentials (SPEC
"Values"), and from it the keys of the write-ahead log's record MACs and of
the checkpoint's MAC.

Why a file of its own beside LevelDB's: recovery reads the write-ahead log
before LevelDB opens the directory (accman.ledger.wal), and its records are
MACs under a key derived from this one.  The format record in LevelDB keeps
a copy (as every store has since format 1); the two must agree, so that a
damaged key file is refused rather than hashing every credential to an
account that does not exist.

The file is JSON, mode 0600: {"format": 1, "key": hex, "crc": crc32c of
the key}.  It is written whole (temp file, fsync, rename, fsync of the
directory) as `accman.newkey` when a store is made (or upgraded from one
without it), and renamed `accman.key` once the store's first checkpoint is
written: a store with `accman.key` has had a checkpoint, so one without a
checkpoint beside it is damaged, never a creation cut short.
"""

from __future__ import annotations

import hashlib
import json
import os
import secrets

from accman.errors import FileDamage
from accman.ledger import _check
from accman.ledger.files import write_whole

KEY_NAME = "accman.key"
PENDING_NAME = "accman.newkey"      # the key until the store's first checkpoint
KEY_FORMAT = 1
SALT_BYTES = 16              # the BLAKE2b key of credential hashes (ext/ledger.pyx)
DERIVED_KEY_BYTES = 32       # BLAKE2b's largest key
# The derived keys, each named by its use (BLAKE2b's `person`, 16 bytes at most).
PURPOSE_WAL = b"accman wal mac"
PURPOSE_CHECKPOINT = b"accman ckpt mac"


def new_salt() -> bytes:
    return secrets.token_bytes(SALT_BYTES)


def derive(salt: bytes, purpose: bytes) -> bytes:
    """A key for one use, derived from the store's secret: knowing it tells
    nothing of the secret or of the other derived keys."""
    return hashlib.blake2b(b"", key=salt, person=purpose,
                           digest_size=DERIVED_KEY_BYTES).digest()


def read_key(dir_path: str) -> bytes | None:
    """The store's secret (read_key_sealed), or None."""
    return read_key_sealed(dir_path)[0]


def read_key_sealed(dir_path: str) -> tuple[bytes | None, bool]:
    """(the store's secret, whether it is `accman.key`): from `accman.key`,
    else from the pending `accman.newkey` of a store whose first checkpoint
    is not yet written; (None, False) when there is neither (a new store, or
    one written before the file existed).  FileDamage if the file is there
    but unreadable."""
    for name, sealed in ((KEY_NAME, True), (PENDING_NAME, False)):
        try:
            with open(os.path.join(dir_path, name), "rb") as f:
                return _parse(f.read(), name), sealed
        except FileNotFoundError:
            continue
    return None, False


def _parse(raw: bytes, name: str) -> bytes:
    try:
        doc = json.loads(raw)
        salt = bytes.fromhex(doc["key"])
        ok = (doc["format"] == KEY_FORMAT and len(salt) == SALT_BYTES
              and doc["crc"] == _check.crc32c(salt))
    except (ValueError, KeyError, TypeError, RecursionError):   # JSON nested past Python's stack
        ok = False
    if not ok:
        raise FileDamage(f"{name} is unreadable (the key that hashes credentials)")
    return salt


def write_key(dir_fd: int, salt: bytes) -> None:
    """Writes the pending key file (`accman.newkey`) whole and durably, mode
    0600, in the directory open as `dir_fd`; the caller makes sure there is
    no key file yet, and seals it (seal_key) after the first checkpoint."""
    assert len(salt) == SALT_BYTES
    doc = json.dumps({"format": KEY_FORMAT, "key": salt.hex(), "crc": _check.crc32c(salt)})
    tmp = KEY_NAME + ".tmp"
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600, dir_fd=dir_fd)
    try:
        write_whole(fd, doc.encode())
        os.fsync(fd)
    finally:
        os.close(fd)
    os.rename(tmp, PENDING_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)


def seal_key(dir_fd: int) -> None:
    """The pending key becomes `accman.key`, durably: the store's first
    checkpoint is written."""
    os.rename(PENDING_NAME, KEY_NAME, src_dir_fd=dir_fd, dst_dir_fd=dir_fd)
    os.fsync(dir_fd)
