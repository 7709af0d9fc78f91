"""What the disk tools (bench/fsync_cost.py, bench/log_sketch.py) share:
the block their O_DIRECT writes come in, and the two layouts a file's
blocks are measured in: written with zeros (writing over them changes
neither the file's size nor its block map) or allocated and never
written (unwritten extents on ext4 and XFS: each write also marks its
blocks written)."""

import os

BLOCK_BYTES = 4096              # one page; O_DIRECT needs aligned offsets and whole blocks
ZERO_CHUNK_BYTES = 1 << 20      # zeros are written a chunk at a time, never a file's worth


def zero_filled(path, size):
    """Replaces `path` with `size` bytes of zeros, written and synced, and
    drops them from the page cache, so that O_DIRECT writes over them
    meet no cached pages (as AccMan's log, written ahead O_DIRECT, does
    not); the caller opens it with the flags it measures."""
    zeros = bytes(ZERO_CHUNK_BYTES)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for offset in range(0, size, ZERO_CHUNK_BYTES):
            n = min(ZERO_CHUNK_BYTES, size - offset)
            if os.pwrite(fd, zeros[:n], offset) != n:
                raise OSError(f"a short write of zeros to {path} at offset {offset}")
        os.fsync(fd)
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
    finally:
        os.close(fd)


def unwritten(path, size, flags):
    """`path` replaced by a file of `size` bytes allocated and never
    written, synced; opened read-write with `flags` (the open comes first,
    so that flags the file system refuses leave no allocation behind)."""
    fd = os.open(path, os.O_RDWR | os.O_CREAT | os.O_TRUNC | flags, 0o600)
    try:
        os.posix_fallocate(fd, 0, size)
        os.fsync(fd)
    except BaseException:
        os.close(fd)
        raise
    return fd
