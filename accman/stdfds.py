"""`standard_fds_open()`: descriptors 0, 1 and 2 open before AccMan opens
anything, for the command line (accman.cli) and for a program that serves
through accman.server.run alike.  A leaf: it imports no part of AccMan."""

from __future__ import annotations

import os


def standard_fds_open() -> None:
    """Opens /dev/null on each of the descriptors 0, 1 and 2 that the process
    was started without (`accman serve <&-`), as OpenSSH's sanitise_stdfd
    and git's sanitize_stdfds do: else the next file or socket opened takes
    that number, and libuv, which leaves 0..2 to the standard streams,
    aborts when it closes it (a stopped server ended by SIGABRT, its last
    line unsaid), and any write to that stream lands in it.  Python made
    such a stream None at start, and it stays None: stdout is still said
    to be closed (accman.calling.output.to_stdout)."""
    for fd in (0, 1, 2):
        try:
            os.fstat(fd)
        except OSError:
            null = os.open(os.devnull, os.O_RDWR)
            if null != fd:
                os.dup2(null, fd)
                os.close(null)
            os.set_inheritable(fd, True)


__all__ = ["standard_fds_open"]
