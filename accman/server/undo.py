"""What a start of `accman serve` adds to its --data, and its taking back
when the start is refused (a port that cannot be bound, a store that
cannot be opened): a refused start changes nothing.

- A PostgreSQL front-end's --data holds its lock and FRONTEND_MARK
  (lock_directory); left, they would have a later `serve` of the embedded
  store in the same path refuse it (the mark's rule): a trap for whoever
  mistyped the URL.
- The embedded store's new store, made in a --data that was missing or
  empty (lost+found aside) as the start began; left, a later start takes
  it for its own, and an empty directory made for it comes back 0700.

One rule for both, under the lock that the start took, which decides: the
names the directory holds that it did not hold before go, only when each
is one the start writes (the lock and the mark; a store's files), the
lock's file last, then each directory the start made, deepest first.  A
directory that holds anything else new is left whole.  Whatever goes
before LOCK goes while the lock still guards the path: once LOCK is
unlinked, a server starting there makes a new one and takes it, and what
it then finds or makes is its own.  What another start made before this
one's lock (between the first look at --data and the lock) is that
start's: a front-end's lock and mark found then, a store the open did not
make, leave it all.
"""

from __future__ import annotations

import contextlib
import os
import signal
import stat
import threading

from accman.errors import StartupError, StoreError, StoreLocked
from accman.server.say import say

# Held for the process's life, by directory: the lock is the open descriptor.
# A refused start's embedded store's lock waits here, once its store is
# closed, for the undo.
_LOCKS: dict[str, int] = {}
# What a front-end's --data held as its lock was taken (lock_directory): a
# name there that the undo's first look did not see was made meanwhile by
# another start, which may have served there and left its lock and mark.
_FOUND: dict[str, set] = {}


def lock_directory(data_path: str) -> None:
    """One server per data directory (SPEC "Durability and order"), also
    when the directory holds no store: the embedded store's own lock (a
    flock on LOCK, accman.ledger.leveldb), so that a server of either store
    and `accman verify` refuse a directory that a server of the other has."""
    from accman.ledger import datadir
    try:
        datadir.check_usable(data_path, also=datadir.CURSOR_FILE, frontend=True)
    except StoreError as e:
        raise StartupError(f"data directory {e.detail}") from None
    try:
        os.makedirs(data_path, mode=0o700, exist_ok=True)
        found = set(os.listdir(data_path))      # LOCK among them if it was there
        _LOCKS[data_path] = datadir.lock_exclusive(data_path, "LOCK")
        _FOUND[data_path] = found | (set(os.listdir(data_path)) - {"LOCK"})
    except StoreLocked:
        raise StartupError(f"data directory {data_path} is in use by another accman "
                           "server") from None
    except OSError as e:
        raise StartupError(f"data directory {data_path}: {e.strerror or e}") from None
    try:
        datadir.mark_frontend(data_path)
    except OSError as e:     # the front-end needs no room of its own: it serves on
        say(f"accman: warning: data directory {data_path}: the mark that it is a "
            f"front-end's ({datadir.FRONTEND_MARK}) could not be written: {e.strerror or e}; "
            "a restart without --store would take it for a new embedded store")


class Undo:
    """Made before the store opens, from what --data holds then; called
    when the start is refused, after its store is closed (`hold` keeps the
    embedded store's lock past its close).  Does nothing for a start that
    opens no --data (a store given to run(), a front-end without --data),
    a front-end whose directory this process locked before, or an embedded
    store in a directory that held anything."""

    def __init__(self, data_path: str | None, store_urls, store_given: bool):
        from accman.ledger import datadir
        self.path, self.frontend, self.before = data_path, bool(store_urls), None
        self.made, self.mode_acl, self.active = [], None, False
        if data_path is None or store_given or data_path in _LOCKS:
            return
        try:
            self.before = set(os.listdir(data_path))
            # What a new store's open changes (a front-end changes neither):
            # put back over a user's own chmod or ACL meanwhile, it undid them.
            self.mode_acl = None if self.frontend else _mode_acl(data_path)
        except FileNotFoundError:
            self.made = _missing(data_path)
        except OSError:         # not a directory, not readable: the start refuses it
            return
        self.active = self.frontend or self.before is None or (
            self.before <= datadir.MAY_PRECEDE_STORE)

    def hold(self, store) -> None:
        """Before a refused start's embedded store closes: its lock kept for
        the undo, when this start's open made the store (under the lock it
        holds since: no other start served it) and it holds no account.  A
        store another start made between the look at --data and the open
        is that start's, empty or not."""
        if self.active and not self.frontend and store.store.created and len(store) == 0:
            with contextlib.suppress(OSError):      # no descriptor left: the store stays
                _LOCKS[self.path] = store.store.lock_copy()

    def held(self):
        """Around a refused start's close and undo: SIGINT and SIGTERM wait
        (_stops_held) when the undo takes back a new embedded store, whose
        close a stop would hand to a thread of its own, writing into the
        directory the undo empties.  A front-end's close (PgStore's, which
        may wait on the network) stays one a stop cuts short."""
        if self.active and not self.frontend and self.path in _LOCKS:
            return _stops_held()
        return contextlib.nullcontext()

    def _written(self, name: str) -> bool:
        from accman.ledger import datadir, keyfile, wal
        if self.frontend:
            return name in ("LOCK", datadir.FRONTEND_MARK)
        # AccMan's own files by their names: STORE_FILE's accman.* takes in
        # any name of that form, a user's accman.log put there meanwhile too.
        if name.startswith("accman."):
            return name.removesuffix(".tmp") in (keyfile.KEY_NAME, keyfile.PENDING_NAME,
                                                 wal.WAL_NAME, wal.CHECKPOINT_NAME)
        return datadir.STORE_FILE.match(name) is not None

    def __call__(self) -> None:
        if not self.active:
            return
        with _stops_held():         # the lock popped inside: closed whatever lands
            fd = _LOCKS.pop(self.path, None)
            if fd is not None:      # else not locked by this start: another's directory
                self._undo(fd, _FOUND.pop(self.path, None))

    def _undo(self, fd: int, found: set | None) -> None:
        dir_fd = -1
        try:
            if self.frontend and (found is None or found - (self.before or set())):
                return      # another start's, made before this one's lock, or not known
            # All of it through the directory whose LOCK this start holds: a
            # --data (or a link on its way) turned meanwhile names another's.
            dir_fd = os.open(self.path, os.O_RDONLY | os.O_DIRECTORY)
            if os.path.samestat(os.fstat(fd), os.stat("LOCK", dir_fd=dir_fd)):
                self._take_back(dir_fd)
        except OSError:
            pass            # the refusal already said what failed; the rest stays
        finally:
            if dir_fd >= 0:
                os.close(dir_fd)
            os.close(fd)

    def _take_back(self, dir_fd: int) -> None:
        new = set(os.listdir(dir_fd)) - (self.before or set())
        if not all(self._written(n) for n in new):
            return
        for name in sorted(new - {"LOCK"}):
            with contextlib.suppress(FileNotFoundError):
                os.unlink(name, dir_fd=dir_fd)
        if self.mode_acl is not None:
            _restore_mode_acl(dir_fd, *self.mode_acl)
        if "LOCK" in new:
            os.unlink("LOCK", dir_fd=dir_fd)
        if self.made and not os.path.samestat(os.fstat(dir_fd), os.lstat(self.path)):
            return          # the path names another directory now
        for directory in self.made:     # deepest first; one not empty stops it
            os.rmdir(directory)


@contextlib.contextmanager
def _stops_held():
    """SIGINT and SIGTERM wait for the undo's end, then act as they would
    have: cut short, it would leave part of a store (its CURRENT gone, its
    log and key there), which the next start refuses as damaged.  A stop
    ignored stays ignored; a thread other than the main one hears none."""
    if threading.current_thread() is not threading.main_thread():
        yield
        return
    held, previous = [], {}
    try:
        # One by one, inside the try: a stop that lands before the second
        # is set still has the first put back.
        for s in (signal.SIGINT, signal.SIGTERM):
            if signal.getsignal(s) not in (signal.SIG_IGN, None):
                previous[s] = signal.signal(s, lambda signum, _frame: held.append(signum))
        yield
    finally:
        for s, handler in previous.items():
            signal.signal(s, handler)
        for s in dict.fromkeys(held):
            signal.raise_signal(s)


def _missing(path: str) -> list[str]:
    """`path` and each directory above it that is not there, deepest first:
    what os.makedirs makes for it."""
    missing = []
    while not os.path.lexists(path) and os.path.dirname(path) != path:
        missing.append(path)
        path = os.path.dirname(path)
    return missing


def _mode_acl(path: str) -> tuple[int, bytes | None]:
    """A directory's mode and default ACL, which a new store's open sets
    (accman.ledger.datadir.tighten)."""
    from accman.ledger import datadir
    try:
        acl = os.getxattr(path, datadir.ACL_XATTR)
    except OSError:
        acl = None
    return stat.S_IMODE(os.stat(path).st_mode), acl


def _restore_mode_acl(fd: int, mode: int, acl: bytes | None) -> None:
    """On the directory open as `fd`."""
    from accman.ledger import datadir
    os.chmod(fd, mode)
    if acl is not None:
        os.setxattr(fd, datadir.ACL_XATTR, acl)
    else:
        with contextlib.suppress(OSError):      # none set, or no ACLs here
            os.removexattr(fd, datadir.ACL_XATTR)
