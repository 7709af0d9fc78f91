"""Small files of the store's own (the key, the checkpoint, the format
record) written whole.  `os.write` may write fewer bytes than it is given
(a disk that fills mid-write, a signal): one call's count unchecked would
leave such a file short, then synced and put in place, and the next open
would refuse the store as damaged."""

from __future__ import annotations

import errno
import os


def write_whole(fd: int, data: bytes) -> None:
    """Writes all of `data` to `fd`, in as many calls as it takes; OSError
    if the OS takes none of what is left."""
    view = memoryview(data)
    while view:
        n = os.write(fd, view)
        if n <= 0:
            raise OSError(errno.EIO, f"a write took {n} of {len(view)} bytes left")
        view = view[n:]
