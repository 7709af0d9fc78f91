"""Durable cursors: how far a reader of the event stream has got, kept
across restarts.  The webhook deliverer keeps one, named "webhook": the id
of the last event its receiver acknowledged, so that a restart resumes right
after it and never skips one.

The interface, two coroutines:

    await cursors.load_cursor(name) -> int     None when it was never saved
    await cursors.save_cursor(name, value)     durable when it returns

`value` never decreases (asserted).  A store that keeps cursors itself
has a `cursors` object with these two methods, and `lead`: the PostgreSQL
store (accman.postgres.cursors), whose front-ends share a cursor, a row
per name, and take turns acting on it.  For a store that has none, the
server keeps them with FileCursors, as files in the data directory.
A cursor that cannot be read back as written (damaged) is StoreCorrupt:
refused, never guessed, since a wrong cursor skips or repeats events.
"""

from __future__ import annotations

import asyncio
import os
import re
import stat
import zlib

from accman.errors import StoreCorrupt, StoreError

NAME_RE = re.compile(r"[a-z][a-z0-9_-]{0,31}", re.ASCII)
# One line: "accman-cursor 1 NAME VALUE CRC\n", CRC the CRC-32 (hex) of
# what precedes it.  A bit flip would otherwise make another valid number.
_LINE_RE = re.compile(rb"accman-cursor 1 ([a-z][a-z0-9_-]{0,31}) (0|[1-9][0-9]{0,18}) "
                      rb"([0-9a-f]{8})\n", re.ASCII)
FILE_BYTES_MAX = 128
FILE_MODE = 0o600


def check_name(name: str) -> str:
    if type(name) is not str or NAME_RE.fullmatch(name) is None:
        raise ValueError(f"a cursor name is 1 to 32 of a-z 0-9 _ -, starting with a "
                         f"letter: {name!r}")
    return name


def cursor_line(name: str, value: int) -> bytes:
    head = b"accman-cursor 1 %s %d" % (name.encode("ascii"), value)
    return head + b" %08x\n" % zlib.crc32(head)


def parse_cursor(name: str, data: bytes) -> int:
    """The value that cursor_line(name, value) wrote; raises ValueError."""
    m = _LINE_RE.fullmatch(data)
    if m is None:
        raise ValueError("it is not one cursor line")
    if m.group(1).decode("ascii") != name:
        raise ValueError(f"it names another cursor ({m.group(1).decode('ascii')})")
    head = data[:data.rindex(b" ")]
    if zlib.crc32(head) != int(m.group(3), 16):
        raise ValueError("its checksum does not match")
    return int(m.group(2))


class FileCursors:
    """Cursors as files NAME.cursor in `directory` (the data directory of
    the embedded store), 0600.  A save writes a temporary file, fsyncs it,
    renames it over the cursor and fsyncs the directory: a crash leaves
    the old cursor or the new one, whole.  The blocking part runs on the
    loop's default executor, off the loop's thread."""

    def __init__(self, directory: str):
        self.directory = directory
        self._saved: dict[str, int] = {}

    def path(self, name: str) -> str:
        return os.path.join(self.directory, check_name(name) + ".cursor")

    # --- the interface -------------------------------------------------------------

    async def load_cursor(self, name: str) -> int | None:
        return self.load(name)

    async def save_cursor(self, name: str, value: int) -> None:
        check_name(name)
        assert type(value) is int and value >= self._saved.get(name, 0), (name, value)
        await asyncio.get_running_loop().run_in_executor(None, self.save, name, value)

    # --- blocking ------------------------------------------------------------------

    def load(self, name: str) -> int | None:
        path = self.path(name)
        try:
            # Not blocking: a named pipe in the file's place is refused as
            # damage, not waited on for a writer.
            fd = os.open(path, os.O_RDONLY | os.O_NONBLOCK | os.O_CLOEXEC)
        except FileNotFoundError:
            return None
        except OSError as e:
            raise StoreError(f"cannot read the cursor file {path}: "
                             f"{e.strerror or type(e).__name__}") from None
        try:
            with open(fd, "rb") as f:
                if not stat.S_ISREG(os.fstat(f.fileno()).st_mode):
                    raise StoreCorrupt(f"the cursor file {path} is damaged: not a regular file")
                data = f.read(FILE_BYTES_MAX + 1)
        except OSError as e:
            raise StoreError(f"cannot read the cursor file {path}: "
                             f"{e.strerror or type(e).__name__}") from None
        else:
            try:
                value = parse_cursor(name, data)
            except ValueError as e:
                raise StoreCorrupt(f"the cursor file {path} is damaged: {e}") from None
        self._saved[name] = value
        return value

    def save(self, name: str, value: int) -> None:
        path = self.path(name)
        tmp = path + ".tmp"
        try:
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_NOFOLLOW
                         | os.O_CLOEXEC, FILE_MODE)
            try:
                os.fchmod(fd, FILE_MODE)
                data = cursor_line(name, value)
                if os.write(fd, data) != len(data):
                    raise OSError(0, "a short write")
                os.fsync(fd)
            finally:
                os.close(fd)
            os.rename(tmp, path)
            dir_fd = os.open(self.directory, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
            try:
                os.fsync(dir_fd)
            finally:
                os.close(dir_fd)
        except OSError as e:
            raise StoreError(f"cannot write the cursor file {path}: "
                             f"{e.strerror or type(e).__name__}") from None
        self._saved[name] = max(value, self._saved.get(name, 0))


ADOPTED_SUFFIX = ".adopted"


async def adopt_file_cursor(cursors, directory: str, name: str) -> int | None:
    """A cursor file of `directory` (kept there before the store kept its
    cursors: AccMan before PostgreSQL schema 3) given to the store's
    `cursors`, which keep the greater of the two, so that an upgrade sends
    nothing again; the file is then renamed NAME.cursor.adopted.  Returns
    the file's value, None when there was no file.  A damaged file is
    StoreCorrupt, as at any start."""
    files = FileCursors(directory)
    path = files.path(name)
    if not os.path.exists(path):
        return None
    value = files.load(name)
    await cursors.save_cursor(name, value)
    try:
        os.replace(path, path + ADOPTED_SUFFIX)
    except OSError as e:
        raise StoreError(f"cannot rename the cursor file {path}: "
                         f"{e.strerror or type(e).__name__}") from None
    return value
