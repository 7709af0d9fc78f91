"""What the disk tools (bench/fsync_cost.py, bench/log_sketch.py) share:
the block their O_DIRECT writes come in, and a file laid out as written
zeros, so that writing over it changes neither its size nor its block map."""

import os

BLOCK_BYTES = 4096              # one page; O_DIRECT needs aligned offsets and whole blocks
ZERO_CHUNK_BYTES = 1 << 20      # zeros are written a chunk at a time, never a file's worth


def zero_filled(path, size):
    """Replaces `path` with `size` bytes of zeros, written and synced; the
    caller opens it with the flags it measures."""
    zeros = bytes(ZERO_CHUNK_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, size, ZERO_CHUNK_BYTES):
            n = min(ZERO_CHUNK_BYTES, size - offset)
            if os.pwrite(fd, zeros[:n], offset) != n:
                raise OSError(f"a short write of zeros to {path} at offset {offset}")
        os.fsync(fd)
    finally:
        os.close(fd)
