"""Power-loss emulation: record what a process wrote and synced (strace),
then build the states a power cut could leave, and check each.

Recording.  The child runs under `strace -f -y -xx` with every syscall that
changes a file or a directory traced, with its data: creat/open with
O_CREAT or O_TRUNC, write, pwrite, writev, pwritev, ftruncate, fallocate,
fsync, fdatasync, rename, unlink, mkdir; and the child's own lines on
stdout, so that each acknowledgement has its place among them.  A syscall
counts where it completed: a reply printed after it saw it done.

The model of the disk (conservative, in the spirit of ALICE and
CrashMonkey):

* File data: a write, truncate or allocation is pending until an fsync or
  fdatasync of that file, or at once on a descriptor opened O_DSYNC or
  O_SYNC (there, at the end of the call: a cut during it may tear it).
* Directories: creating, renaming and removing names are pending until an
  fsync of that directory.  Pending names change in the order they were
  made (ext4's ordered journal); a cut keeps any prefix of them.
* A state: every directory's synced names plus a prefix of the pending
  changes; every file's synced data plus a prefix of its pending writes,
  the last one torn at a 512-byte sector (or not written at all).

What it does not model: writes reaching the disk out of order within one
file (only prefixes), a sector torn inside itself, a file system that
loses synced data (a lying disk), metadata other than names and sizes
(modes, times), and reads.  See docs/GUARANTEES.md.
"""

from __future__ import annotations

import os
import random
import re
import shutil
import subprocess
from dataclasses import dataclass, field

SECTOR_BYTES = 512
STRACE_CALLS = ("open,openat,creat,write,pwrite64,writev,pwritev,pwritev2,ftruncate,truncate,"
                "fallocate,fsync,fdatasync,rename,renameat,renameat2,unlink,unlinkat,"
                "mkdir,mkdirat,close,dup,dup2,dup3,lseek")
# Strings up to this long are printed whole: more than the largest write
# (the log's 1 MiB chunks of zeros, a table).
STRACE_STRING_BYTES = 64 * 1024 * 1024

_HEX = re.compile(r"(?:\\x[0-9a-f]{2})+")
_LINE = re.compile(r"^(\d+)\s+(.*)$")


def record(argv: list[str], trace: str, env: dict,
           timeout_s: float) -> subprocess.CompletedProcess:
    """Runs `argv` under strace, writing the trace to `trace`."""
    cmd = ["strace", "-f", "-qq", "-y", "-xx", "-s", str(STRACE_STRING_BYTES),
           "-e", f"trace={STRACE_CALLS}", "-o", trace, *argv]
    return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=timeout_s)


def _unhex(text: str) -> bytes:
    return bytes.fromhex(text.replace("\\x", ""))


# --- parsing ---------------------------------------------------------------------------

def _split_args(s: str) -> list[str]:
    """Top-level comma-separated arguments (quotes, brackets, braces and
    <paths> kept whole)."""
    out, depth, cur, quoted = [], 0, [], False
    for ch in s:
        if quoted:
            cur.append(ch)
            if ch == '"':
                quoted = False
            continue
        if ch == '"':
            quoted = True
        elif ch in "[{<(":
            depth += 1
        elif ch in "]}>)":
            depth -= 1
        elif ch == "," and depth == 0:
            out.append("".join(cur).strip())
            cur = []
            continue
        cur.append(ch)
    if cur:
        out.append("".join(cur).strip())
    return out


def _string(arg: str) -> bytes:
    assert arg.startswith('"'), arg
    end = arg.rindex('"')
    assert not arg[end + 1:].startswith("..."), "strace cut a string: raise -s"
    body = arg[1:end]
    return _unhex(body) if body else b""


def _fd(arg: str) -> tuple[int, str | None]:
    """`5</path>` -> (5, "/path"); AT_FDCWD<...> -> (-100, cwd).  A file
    removed while open is `5</path>(deleted)` (LevelDB closes a log it has
    just deleted)."""
    m = re.match(r"^(-?\d+|AT_FDCWD)(?:<(.*)>)?(?:\(deleted\))?$", arg)
    assert m, arg
    fd = -100 if m.group(1) == "AT_FDCWD" else int(m.group(1))
    path = m.group(2)
    if path is not None:
        path = _unhex(path).decode("utf-8", "surrogateescape") if "\\x" in path else path
    return fd, path


_IOV_STRING = re.compile(r'"(?:\\x[0-9a-f]{2})*"(?:\.\.\.)?')


def _iov_data(arg: str) -> bytes:
    return b"".join(_string(m.group(0)) for m in _IOV_STRING.finditer(arg))


@dataclass
class Call:
    name: str
    args: list[str]
    ret: str


def parse(trace: str):
    """Yields the completed calls of a strace -f trace, in completion order."""
    pending = {}
    with open(trace, encoding="latin-1") as f:
        for line in f:
            m = _LINE.match(line.rstrip("\n"))
            if not m:
                continue
            pid, text = m.groups()
            if text.startswith(("---", "+++")):
                continue
            if text.endswith("<unfinished ...>"):
                pending[pid] = text[:-len("<unfinished ...>")].rstrip()
                continue
            r = re.match(r"^<\.\.\. \w+ resumed>(.*)$", text)
            if r:
                text = pending.pop(pid) + r.group(1)
            call = _call(text)
            if call is not None:
                yield call


def _call(text: str) -> Call | None:
    m = re.match(r"^(\w+)\((.*)\)\s+=\s+(.*)$", text)
    if not m:
        return None
    return Call(m.group(1), _split_args(m.group(2)), m.group(3))


# --- the model ---------------------------------------------------------------------------

# The calls that write file data (Disk._on_*): one the process was killed
# inside may still have written.
_WRITES = frozenset(("write", "writev", "pwrite64", "pwritev", "pwritev2"))

@dataclass
class File:
    synced: bytearray = field(default_factory=bytearray)
    current: bytearray = field(default_factory=bytearray)
    pending: list = field(default_factory=list)     # ("w", off, data) | ("t", size)


def _apply(buf: bytearray, op) -> None:
    if op[0] == "w":
        _, off, data = op
        if len(buf) < off:
            buf.extend(bytes(off - len(buf)))
        buf[off:off + len(data)] = data
    elif len(buf) < op[1] or op[0] == "t":
        size = op[1]
        if len(buf) < size:
            buf.extend(bytes(size - len(buf)))
        elif op[0] == "t":
            del buf[size:]


class Disk:
    """What the traced process did to the files under `root`, as the model
    above sees it; `state(...)` builds one power-cut state."""

    def __init__(self, root: str):
        self.root = root.rstrip("/")
        self.files: dict[int, File] = {}
        self.names: dict[str, int] = {}         # current: path -> file id ("dir": -1)
        self.synced_names: dict[str, int] = {self.root: -1}
        self.dir_ops: list = []                 # pending: (dir, op, path, target)
        self.fds: dict[int, list] = {}          # fd -> [file id, pos, sync, append]
        self.acks: list[str] = []               # the child's stdout lines, in order
        self.names[self.root] = -1
        self._next_id = 0
        # Called between an O_DSYNC write and its becoming durable: a state
        # taken there has the write pending (torn, or not there at all).
        self.on_dsync = None

    # -- names --
    def _mine(self, path: str | None) -> bool:
        return path is not None and (path == self.root or path.startswith(self.root + "/"))

    def _dir_op(self, op: str, path: str, target: str | int | None) -> None:
        self.dir_ops.append((os.path.dirname(path), op, path, target))

    def _sync_dir(self, path: str) -> None:
        keep = []
        for entry in self.dir_ops:
            if entry[0] == path:
                _name_op(self.synced_names, entry)
            else:
                keep.append(entry)
        self.dir_ops = keep

    # -- calls --
    def process_exited(self) -> None:
        """Its descriptors close; what it wrote stays in the page cache,
        pending, as after any exit."""
        self.fds = {}

    def feed(self, call: Call) -> None:
        handler = getattr(self, "_on_" + call.name, None)
        if handler is None or call.ret.startswith("-1"):
            return
        if call.ret.startswith("?") and call.name not in _WRITES:
            # Killed inside the call (strace: "= ? <unavailable>"), which
            # never returned: taken as not made.  A write is kept, below.
            return
        handler(call)

    def _path_of(self, dirfd_arg: str, name_arg: str) -> str:
        name = _string(name_arg).decode("utf-8", "surrogateescape")
        if name.startswith("/"):
            return os.path.normpath(name)
        _, base = _fd(dirfd_arg)
        return os.path.normpath(os.path.join(base, name))

    def _on_openat(self, call: Call) -> None:
        self._open(self._path_of(call.args[0], call.args[1]), call.args[2], call.ret)

    def _on_open(self, call: Call) -> None:
        self._open(self._path_of("AT_FDCWD</>", call.args[0]), call.args[1], call.ret)

    def _open(self, path: str, flags: str, ret: str) -> None:
        fd, _ = _fd(ret.split()[0])
        if not self._mine(path) or "O_DIRECTORY" in flags or self.names.get(path) == -1:
            self.fds.pop(fd, None)
            if self._mine(path):
                self.fds[fd] = [path, 0, False, False]      # a directory
            return
        fid = self.names.get(path)
        if fid is None:
            assert "O_CREAT" in flags, (path, flags)
            fid = self._next_id
            self._next_id += 1
            self.files[fid] = File()
            self.names[path] = fid
            self._dir_op("link", path, fid)
        elif "O_TRUNC" in flags:
            self._data(fid, ("t", 0), False)
        self.fds[fd] = [fid, 0, "O_DSYNC" in flags or "O_SYNC" in flags, "O_APPEND" in flags]

    def _on_creat(self, call: Call) -> None:
        self._open(self._path_of("AT_FDCWD</>", call.args[0]), "O_CREAT|O_TRUNC", call.ret)

    def _on_close(self, call: Call) -> None:
        self.fds.pop(_fd(call.args[0])[0], None)

    def _on_lseek(self, call: Call) -> None:
        entry = self.fds.get(_fd(call.args[0])[0])
        if entry is not None and isinstance(entry[0], int):
            entry[1] = int(call.ret.split()[0])

    def _data(self, fid: int, op, sync: bool) -> None:
        f = self.files[fid]
        _apply(f.current, op)
        f.pending.append(op)
        if sync:
            if self.on_dsync is not None:
                self.on_dsync()
            self._sync_file(fid)

    def _sync_file(self, fid: int) -> None:
        f = self.files[fid]
        for op in f.pending:
            _apply(f.synced, op)
        f.pending = []

    def _write_at(self, fd_arg: str, data: bytes, offset: int | None,
                  returned: bool = True) -> None:
        """`returned` False: the process was killed inside the write, which
        may have reached the page cache whole and is durable in no case
        (no ack can follow it): written, never synced."""
        fd, path = _fd(fd_arg)
        if fd == 1 and offset is None:
            if returned:
                self.acks += data.decode("latin-1").splitlines()
            return
        entry = self.fds.get(fd)
        if entry is None or not isinstance(entry[0], int) or not data:
            return
        fid, pos, sync, append = entry
        sync = sync and returned
        if offset is None:
            offset = len(self.files[fid].current) if append else pos
            entry[1] = offset + len(data)
        self._data(fid, ("w", offset, data), sync)

    def _on_write(self, call: Call) -> None:
        self._written(call, _string(call.args[1]), None)

    def _on_writev(self, call: Call) -> None:
        self._written(call, _iov_data(call.args[1]), None)

    def _on_pwrite64(self, call: Call) -> None:
        self._written(call, _string(call.args[1]), int(call.args[3]))

    def _on_pwritev(self, call: Call) -> None:
        self._written(call, _iov_data(call.args[1]), int(call.args[3]))

    def _written(self, call: Call, data: bytes, offset: int | None) -> None:
        ret = call.ret.split()[0]
        if ret == "?":
            self._write_at(call.args[0], data, offset, returned=False)
        else:
            self._write_at(call.args[0], data[:int(ret)], offset)

    _on_pwritev2 = _on_pwritev

    def _on_ftruncate(self, call: Call) -> None:
        entry = self.fds.get(_fd(call.args[0])[0])
        if entry is not None and isinstance(entry[0], int):
            self._data(entry[0], ("t", int(call.args[1])), entry[2])

    def _on_truncate(self, call: Call) -> None:
        fid = self.names.get(self._path_of("AT_FDCWD</>", call.args[0]))
        if fid is not None and fid >= 0:
            self._data(fid, ("t", int(call.args[1])), False)

    def _on_fallocate(self, call: Call) -> None:
        entry = self.fds.get(_fd(call.args[0])[0])
        if entry is not None and isinstance(entry[0], int) and call.args[1] == "0":
            end = int(call.args[2]) + int(call.args[3])
            self._data(entry[0], ("a", end), entry[2])

    def _on_fsync(self, call: Call) -> None:
        fd, path = _fd(call.args[0])
        entry = self.fds.get(fd)
        if entry is None:
            return
        if isinstance(entry[0], int):
            self._sync_file(entry[0])
        else:
            self._sync_dir(entry[0])

    _on_fdatasync = _on_fsync

    def _rename(self, src: str, dst: str) -> None:
        if not self._mine(src):
            return
        fid = self.names.pop(src)
        self.names[dst] = fid
        self._dir_op("rename", dst, src)

    def _on_rename(self, call: Call) -> None:
        self._rename(self._path_of("AT_FDCWD</>", call.args[0]),
                     self._path_of("AT_FDCWD</>", call.args[1]))

    def _on_renameat(self, call: Call) -> None:
        self._rename(self._path_of(call.args[0], call.args[1]),
                     self._path_of(call.args[2], call.args[3]))

    _on_renameat2 = _on_renameat

    def _unlink(self, path: str) -> None:
        if self._mine(path) and path in self.names:
            del self.names[path]
            self._dir_op("unlink", path, None)

    def _on_unlink(self, call: Call) -> None:
        self._unlink(self._path_of("AT_FDCWD</>", call.args[0]))

    def _on_unlinkat(self, call: Call) -> None:
        self._unlink(self._path_of(call.args[0], call.args[1]))

    def _mkdir(self, path: str) -> None:
        if self._mine(path) and path not in self.names:
            self.names[path] = -1
            self._dir_op("link", path, -1)

    def _on_mkdir(self, call: Call) -> None:
        self._mkdir(self._path_of("AT_FDCWD</>", call.args[0]))

    def _on_mkdirat(self, call: Call) -> None:
        self._mkdir(self._path_of(call.args[0], call.args[1]))

    # -- states --
    def snapshot(self, rnd: random.Random, kind: str):
        """One power-cut state now: {relative path: bytes or None (a
        directory)}.  `kind`: "synced" (nothing pending reached the disk),
        "all" (everything did: what a kill -9 leaves), "torn" (prefixes)."""
        names = dict(self.synced_names)
        ops = self.dir_ops
        if kind == "all":
            cut = len(ops)
        elif kind == "synced":
            cut = 0
        else:
            cut = rnd.randint(0, len(ops))
        for entry in ops[:cut]:
            _name_op(names, entry)
        out = {}
        for path, fid in names.items():
            if path == self.root or not self._reachable(path, names):
                continue
            rel = os.path.relpath(path, self.root)
            out[rel] = None if fid < 0 else self._content(self.files[fid], rnd, kind)
        return out

    def _reachable(self, path: str, names: dict) -> bool:
        parent = os.path.dirname(path)
        while parent.startswith(self.root):
            if parent not in names:
                return False
            parent = os.path.dirname(parent)
        return True

    @staticmethod
    def _content(f: File, rnd: random.Random, kind: str) -> bytes:
        if kind == "all":
            return bytes(f.current)
        buf = bytearray(f.synced)
        if kind == "synced" or not f.pending:
            return bytes(buf)
        k = rnd.randint(0, len(f.pending))
        for op in f.pending[:k]:
            _apply(buf, op)
        if k < len(f.pending) and f.pending[k][0] == "w":
            _, off, data = f.pending[k]
            sectors = -(-len(data) // SECTOR_BYTES)
            keep = rnd.randint(0, sectors) * SECTOR_BYTES
            if keep:
                _apply(buf, ("w", off, data[:keep]))
        return bytes(buf)


def _name_op(names: dict, entry) -> None:
    _, op, path, target = entry
    if op == "link":
        names[path] = target
    elif op == "rename":
        if target in names:
            names[path] = names.pop(target)
    else:
        names.pop(path, None)


def materialize(state: dict, where: str) -> None:
    """Writes a state under the directory `where` (which it empties)."""
    shutil.rmtree(where, ignore_errors=True)
    os.makedirs(where)
    for rel in sorted(state, key=lambda r: r.count("/")):
        path = os.path.join(where, rel)
        if state[rel] is None:
            os.makedirs(path, exist_ok=True)
        else:
            os.makedirs(os.path.dirname(path), exist_ok=True)
            with open(path, "wb") as f:
                f.write(state[rel])
