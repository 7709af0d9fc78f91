"""The data directory as files: made durably and private, LevelDB's first
files written and synced by us, and the private copy that a read-only open
works in.

Data at rest (SPEC "Access"): the directory is 0700 and its files 0600.
LevelDB creates its files with mode 0644 under the process umask, and a
library user of `Ledger` may not want their process umask changed (it is
process-wide: every thread's files would follow it).  So the directory gets
a default POSIX ACL (user rw, group and others nothing): a file created in
a directory with a default ACL takes its permissions from the ACL and the
mode asked for, not from the umask, so every file LevelDB makes later is
0600 too.  Where the file system has no ACLs, the 0700 directory is what
keeps others out, and the store's files are brought to 0600 at every open
(`tighten`); LevelDB's files made since are 0644 less the umask until then.
"""

from __future__ import annotations

import errno
import fcntl
import os
import re
import stat
import struct

from accman.errors import StoreCorrupt, StoreError, StoreLocked
from accman.ledger import _check
from accman.ledger.files import write_whole
from accman.ledger.fsck import LEVELDB_COMPARATOR, LOG_FULL, LOG_HEADER_BYTES
from accman.ledger.tablecheck import varint_bytes

DIR_MODE = 0o700
FILE_MODE = 0o600
# The files of a store: LevelDB's (leveldb db/filename.cc) and AccMan's,
# CURRENT.dbtmp among them (write_new_leveldb).
STORE_FILE = re.compile(r"^(CURRENT(\.dbtmp)?|LOCK|LOG|LOG\.old|MANIFEST-\d+"
                        r"|\d+\.(log|ldb|sst|dbtmp)|accman\.[a-z]+(\.tmp)?)$")
# What the directory beside --store may hold besides its LOCK: the webhook's
# cursor an AccMan before schema 3 kept there (accman.server.cursors), until
# the store adopts it.  Not a new embedded store's: a cursor with no store
# behind it would resume deliveries past events never sent.
CURSOR_FILE = re.compile(r"^[a-z][a-z0-9_-]{0,31}\.cursor(\.tmp|\.adopted)?$")
# A default ACL in Linux's xattr form (linux/posix_acl_xattr.h): version 2,
# then (tag, perm, id) entries: the owner rw, the group and others nothing.
ACL_XATTR = "system.posix_acl_default"
_ACL_OWNER_ONLY = struct.pack("<I", 2) + b"".join(
    struct.pack("<HHI", tag, perm, 0xFFFFFFFF)
    for tag, perm in ((0x01, 6), (0x04, 0), (0x20, 0)))


# What a PostgreSQL front-end leaves beside its LOCK in --data
# (accman.server.undo.lock_directory): without it a directory holding only a
# LOCK (a front-end's, or a creation cut short) would be taken for a new
# embedded store, and a restart without --store would serve an empty ledger
# beside the real one.  Not a name STORE_FILE matches: an older AccMan refuses it.
FRONTEND_MARK = "FRONTEND.accman"
# What a directory may hold besides a store's files and still be taken for
# a new store: the root of a file system made for the store has lost+found.
MAY_PRECEDE_STORE = {"lost+found"}
# A store exists once any of these does (a creation cut short has none).
_STORE_MARKS = ("CURRENT", "accman.wal", "accman.checkpoint")
_FOREIGN_NAMED_MAX = 3


def checked_path(path) -> str:
    """A data directory's path as given, before anything is touched: a str
    or an os.PathLike of one, not empty (that would be the current
    directory, made 0700 and filled with a store), without NUL, in UTF-8,
    and, when relative, in a working directory that still exists."""
    if isinstance(path, os.PathLike):
        path = os.fspath(path)
    if type(path) is not str:
        raise ValueError(f"path must be a str or a path object naming a directory, "
                         f"got {type(path).__name__}")
    if not path:
        raise ValueError("path must name a directory, got an empty one")
    if "\0" in path:       # the OS's own refusal says "embedded null byte", naming nothing
        raise ValueError("path must not hold a NUL character")
    try:
        full = os.path.abspath(path)
    except OSError as e:
        # A relative path whose working directory was deleted (os.getcwd fails):
        # nothing names the directory it would be.
        raise ValueError(f"path {path!r} is relative, and the working directory it is "
                         f"relative to cannot be found ({e.strerror or e}; deleted?): "
                         "give an absolute path") from None
    try:
        # A name os.listdir gave for non-UTF-8 bytes (surrogateescape): the OS takes
        # it, plyvel refuses it once the directory is made, a ready line may not
        # print it.  The current directory counts too: LevelDB is given the absolute
        # path.  The words fit a PostgreSQL front-end's --data too (its lock only).
        full.encode("utf-8")
    except UnicodeEncodeError:
        raise ValueError("path must be valid UTF-8: AccMan writes the data directory's name "
                         "in UTF-8 (in its ready line and messages, and to LevelDB for an "
                         "embedded store)") from None
    return path


def check_usable(path: str, also=None, frontend: bool = False) -> None:
    """Refuses, changing nothing, a data directory path that is not a
    directory, or a directory that holds no store and is not empty (but
    for names `also` matches): a mistyped `--data` (a home or system
    directory) is never made 0700 and filled with a store.  A PostgreSQL
    front-end's directory (FRONTEND_MARK) is refused unless `frontend`."""
    try:
        st = os.stat(path)
    except FileNotFoundError:
        # make() would meet a link to nothing as LevelDB's LOCK missing, or
        # one on the way as `File exists`: each is named as what it is.
        link = _dangling_link(path)
        if link == path:
            raise StoreError(f"{path}: a symbolic link to {os.readlink(path)}, which does "
                             "not exist (nothing was changed)") from None
        if link is not None:
            raise StoreError(f"{path}: on its way, {link} is a symbolic link to "
                             f"{os.readlink(link)}, which does not exist (nothing was "
                             "changed)") from None
        return                                  # make() creates it
    except OSError as e:    # a file on the way, a loop of links: said, as the store would
        raise StoreError(f"{path}: {e.strerror or e}") from None
    if not stat.S_ISDIR(st.st_mode):
        raise StoreError(f"{path}: not a directory")
    try:
        names = os.listdir(path)
    except OSError as e:
        raise StoreError(f"{path}: cannot list it: {e.strerror or e}") from None
    if any(mark in names for mark in _STORE_MARKS):
        if frontend:
            # A restart without --store would serve its balances, stale.
            raise StoreError(f"{path}: holds an embedded store: a front-end of a PostgreSQL "
                             "store needs a directory of its own (nothing was changed)")
        check_regular(path, names)
        return
    if FRONTEND_MARK in names and not frontend:
        raise StoreError(f"{path}: holds the lock of a front-end of a PostgreSQL store "
                         f"({FRONTEND_MARK}), not an embedded store: serve it with --store, "
                         "or give a new or empty directory (nothing was changed)")
    foreign = sorted(n for n in names if not STORE_FILE.match(n) and n not in MAY_PRECEDE_STORE
                     and not (also is not None and also.match(n))
                     and not (frontend and n == FRONTEND_MARK))
    if foreign:
        shown = ", ".join(foreign[:_FOREIGN_NAMED_MAX])
        more = ", ..." if len(foreign) > _FOREIGN_NAMED_MAX else ""
        raise StoreError(f"{path}: holds no AccMan store and is not empty ({shown}{more}); "
                         "give a new or empty directory (nothing was changed)")


def check_regular(path: str, names: list | None = None) -> None:
    """Each of a store's files (of `names`, the directory's by default) is
    a regular file: LevelDB and the open read them with plain opens, which
    wait for ever on a named pipe (no writer) and read a device without
    end, so a store holding one is refused as damaged, not waited on.  A name
    gone by its stat, or made again since, is no damage: the server that has
    it open (the lock, taken after this, names it) renames, deletes and makes files."""
    for name in os.listdir(path) if names is None else names:
        if not STORE_FILE.match(name):
            continue
        file = os.path.join(path, name)
        try:
            mode = os.stat(file).st_mode
        except FileNotFoundError:
            try:        # gone, made again since the stat, or a link to nothing
                mode = os.lstat(file).st_mode
            except FileNotFoundError:
                continue
            if stat.S_ISLNK(mode):
                raise StoreCorrupt(f"{path}: {name} is a symbolic link to nothing; "
                                   "refusing to serve, nothing repaired") from None
        except OSError as e:
            raise StoreCorrupt(f"{path}: {name}: {e.strerror or e}; refusing to serve, "
                               "nothing repaired") from None
        if not stat.S_ISREG(mode):
            raise StoreCorrupt(f"{path}: {name} is not a regular file; refusing to serve, "
                               "nothing repaired")


def _dangling_link(path: str) -> str | None:
    """`path`, or the nearest directory on its way, that is a symbolic link
    to nothing; None if none is."""
    while True:
        if os.path.islink(path) and not os.path.exists(path):
            return path
        parent = os.path.dirname(path)
        if parent == path or not parent:
            return None
        path = parent


def holds_nothing(path: str) -> bool:
    """True if it holds no file of a store but its lock (a creation's first, or one left)."""
    return set(os.listdir(path)) <= {"LOCK"} | MAY_PRECEDE_STORE


def mark_frontend(path: str) -> None:
    """Leaves FRONTEND_MARK, synced, in a PostgreSQL front-end's data
    directory (check_usable(frontend=True) refused one with a store)."""
    if os.path.exists(os.path.join(path, FRONTEND_MARK)):
        return
    _write_synced(path, FRONTEND_MARK, b"the lock directory of a front-end of a PostgreSQL "
                                       b"store (accman serve --store ... --data DIR)\n")
    _fsync_path(path)


def make(path: str) -> bool:
    """Makes the data directory if it is missing, 0700, and syncs its
    parent so that the new entry survives a power cut.  True if made."""
    try:
        os.mkdir(path, DIR_MODE)
    except FileExistsError:
        return False
    except FileNotFoundError:
        os.makedirs(os.path.dirname(path), exist_ok=True)
        os.mkdir(path, DIR_MODE)
    _fsync_path(os.path.dirname(path) or ".")
    return True


def tighten(path: str) -> list[str]:
    """The directory 0700 with its default ACL (where the file system has
    ACLs), the store's files in it 0600.  Returns the names it changed."""
    changed = []
    st = os.stat(path)
    if st.st_mode & 0o777 != DIR_MODE:
        os.chmod(path, DIR_MODE)
        changed.append(".")
    try:
        if os.getxattr(path, ACL_XATTR) != _ACL_OWNER_ONLY:
            raise OSError(errno.ENODATA, "another default ACL")
    except OSError:
        try:
            os.setxattr(path, ACL_XATTR, _ACL_OWNER_ONLY)
        except OSError as e:
            if e.errno not in (errno.ENOTSUP, errno.EOPNOTSUPP, errno.EPERM):
                raise
    for name in os.listdir(path):
        if not STORE_FILE.match(name):
            continue
        try:
            st = os.lstat(os.path.join(path, name))
            if st.st_mode & 0o777 != FILE_MODE and not os.path.islink(os.path.join(path, name)):
                os.chmod(os.path.join(path, name), FILE_MODE)
                changed.append(name)
        except FileNotFoundError:
            continue            # LevelDB deleted it meanwhile
    return changed


def _first_manifest() -> bytes:
    """MANIFEST-000001 as LevelDB's NewDB writes it: one version edit."""
    edit = (varint_bytes(1) + varint_bytes(len(LEVELDB_COMPARATOR)) + LEVELDB_COMPARATOR
            + varint_bytes(2) + varint_bytes(0)           # log number
            + varint_bytes(3) + varint_bytes(2)           # next file number
            + varint_bytes(4) + varint_bytes(0))          # last sequence
    crc = _check.mask(_check.crc32c(edit, _check.crc32c(bytes([LOG_FULL]))))
    record = struct.pack("<IHB", crc, len(edit), LOG_FULL) + edit
    assert len(record) == LOG_HEADER_BYTES + len(edit)
    return record


# What a creation cut short may leave besides the key file: a first
# MANIFEST (whole or a prefix of it), CURRENT's temp file, LevelDB's lock
# and info log.  Nothing was ever stored in such a directory.
_CREATION_LEFTOVERS = {"LOCK", "LOG", "LOG.old", "CURRENT.dbtmp", "MANIFEST-000001"}


def creation_cut_short(path: str) -> bool:
    """True if the directory holds only what `write_new_leveldb` and the
    key file write before a store has CURRENT: a creation that a crash cut
    short, to be made again."""
    names = {n for n in os.listdir(path)
             if not n.startswith(("accman.key", "accman.newkey")) and n not in MAY_PRECEDE_STORE}
    if not names <= _CREATION_LEFTOVERS:
        return False
    if "MANIFEST-000001" in names:
        with open(os.path.join(path, "MANIFEST-000001"), "rb") as f:
            return _first_manifest().startswith(f.read())
    return True


def write_new_leveldb(path: str) -> None:
    """Writes the files LevelDB's NewDB would (leveldb db/db_impl.cc): a
    MANIFEST-000001 with one version edit, and CURRENT naming it; each
    synced, then the directory.  LevelDB 1.22 does not sync that MANIFEST
    and its first open replaces CURRENT without syncing the directory: a
    power cut then could leave CURRENT naming an empty MANIFEST.  With
    CURRENT there, LevelDB opens these instead of making its own."""
    _write_synced(path, "MANIFEST-000001", _first_manifest())
    _write_synced(path, "CURRENT.dbtmp", b"MANIFEST-000001\n")
    os.rename(os.path.join(path, "CURRENT.dbtmp"), os.path.join(path, "CURRENT"))
    _fsync_path(path)


def sync_leveldb_current(path: str) -> None:
    """fsyncs CURRENT, the MANIFEST it names and the directory: LevelDB
    renames a new CURRENT into place at every open without syncing the
    directory."""
    with open(os.path.join(path, "CURRENT"), "rb") as f:
        manifest = f.read().strip().decode("ascii", "replace")
        os.fsync(f.fileno())
    if re.fullmatch(r"MANIFEST-\d+", manifest):
        fd = os.open(os.path.join(path, manifest), os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)
    _fsync_path(path)


# A lock taken on a LOCK unlinked meanwhile (a refused start takes back the one it
# made) guards the path no more: taken again on the file there now, at most this often.
LOCK_TRIES = 3


def lock_exclusive(path: str, name: str = "LOCK") -> int:
    """One AccMan process per directory: an exclusive flock on `name` in
    it (made if missing).  Returns the descriptor, which holds the lock
    until it is closed; StoreLocked if another process (or this one)
    holds it."""
    return _lock_named(path, name, os.O_RDWR | os.O_CREAT, fcntl.LOCK_EX,
                       " (or elsewhere in this one)")


def lock_shared(path: str) -> int:
    """For a read-only open: a shared flock on LOCK, so that no AccMan
    server (which holds it exclusively) has the directory open.  Returns
    the descriptor to close, or -1 when there is no LOCK file."""
    return _lock_named(path, "LOCK", os.O_RDONLY, fcntl.LOCK_SH, "")


def _lock_named(path: str, name: str, flags: int, op: int, elsewhere: str) -> int:
    """The descriptor of a flock `op` on the file `name` names: -1 if none (no O_CREAT)."""
    file = os.path.join(path, name)
    for _ in range(LOCK_TRIES):
        try:
            fd = os.open(file, flags, 0o600)
        except FileNotFoundError:
            if flags & os.O_CREAT:
                raise
            return -1
        try:
            fcntl.flock(fd, op | fcntl.LOCK_NB)
        except BlockingIOError:
            os.close(fd)
            break
        try:
            if os.path.samestat(os.fstat(fd), os.stat(file)):
                return fd
        except FileNotFoundError:
            pass            # unlinked, and none made since: opened again
        os.close(fd)
    raise StoreLocked(f"{path}: the data directory is open in another process{elsewhere}")


def locked_elsewhere(path: str) -> bool:
    """True if a LevelDB in this or another process holds the directory's
    LOCK.  Its files are then changing under us: not checked, and plyvel
    raises StoreLocked.  An open-file-description lock query (F_OFD_GETLK)
    sees LevelDB's fcntl lock even in this process, and takes no lock (a
    plain fcntl lock taken and closed here would drop LevelDB's)."""
    getlk = getattr(fcntl, "F_OFD_GETLK", None)
    if getlk is None:
        return False
    try:
        fd = os.open(os.path.join(path, "LOCK"), os.O_RDWR)
    except OSError:
        return False
    try:
        flock = struct.pack("hhqqi4x", fcntl.F_WRLCK, os.SEEK_SET, 0, 0, 0)
        l_type = struct.unpack("hhqqi4x", fcntl.fcntl(fd, getlk, flock))[0]
    except OSError:
        return False
    finally:
        os.close(fd)
    return l_type != fcntl.F_UNLCK


def _write_synced(path: str, name: str, data: bytes) -> None:
    fd = os.open(os.path.join(path, name), os.O_WRONLY | os.O_CREAT | os.O_TRUNC, FILE_MODE)
    try:
        write_whole(fd, data)
        os.fsync(fd)
    finally:
        os.close(fd)


def _fsync_path(path: str) -> None:
    fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)

