"""Private copies of a store (`snapshot`), to open without changing a
file of it: `accman verify` reads one (a read-only Store).  A copy holds
the store's key: every copy this process names is removed when it is
done with, at a stop, and at the interpreter's exit."""

from __future__ import annotations

import atexit
import os
import secrets
import shutil
import tempfile

from accman.errors import FileDamage, StoreCorrupt, StoreError
from accman.ledger import datadir, fsck, plyvel_errors
from accman.ledger.fsck import TABLE_NAME


# The private copies (snapshot) this process has named and not removed: a stop
# (^C, SIGTERM: raised between any two steps) may cut short a caller's way to
# remove_snapshot; remove_snapshots finds them here, as the interpreter's exit does.
_copies: set[str] = set()
# An rmtree that meets a file made meanwhile (LevelDB's own thread, still
# compacting in the copy) leaves the directory: it is tried again.
REMOVE_TRIES = 3


def scratch_path() -> str:
    """Where a private copy goes: a directory not yet made, under the
    system's temporary directory, named by 128 random bits and recorded
    before it exists, so that no stop lands between the copy's making and
    the process's knowing what to remove: the copy holds the store's key."""
    scratch = os.path.join(tempfile.gettempdir(), f"accman-verify-{secrets.token_hex(16)}")
    _copies.add(scratch)
    return scratch


def snapshot(path: str, scratch: str) -> None:
    """Makes `scratch` (from scratch_path) a private copy of the store at
    `path`, to open without changing a file of it (`accman verify` on a
    read-only copy or a live backup): the tables its MANIFEST lists as
    symbolic links (LevelDB never writes a table after making it), every
    other file copied but other tables.  Those are left-overs that
    LevelDB deletes at open, and numbers it may give a table it makes in
    the copy: a link there would be the store's own file, truncated
    through it.  The directory is 0700;
    the caller removes it (remove_snapshot), whether this returns or
    raises.  StoreCorrupt if the MANIFEST is damaged, or a store file is
    no regular file."""
    datadir.check_regular(path)
    try:
        # Without CURRENT there is no store yet (a creation cut short) or a
        # damaged one: recovery says which, from the copy.
        listed = (fsck.tables_listed(path) if os.path.exists(os.path.join(path, "CURRENT"))
                  else set())
    except FileDamage as e:
        raise StoreCorrupt(f"{path}: data files are damaged: {e}; refusing to read "
                           "it, nothing changed") from None
    except OSError as e:
        raise plyvel_errors.unreadable(path, e) from e
    try:
        os.mkdir(scratch, 0o700)
    except OSError as e:
        if isinstance(e, FileExistsError):
            _copies.discard(scratch)        # not this process's: never removed
        raise StoreError(f"{path}: cannot copy the store to read it (a directory in "
                         f"{tempfile.gettempdir()}): {e.strerror or e}") from e
    name = None
    try:
        for name in sorted(os.listdir(path)):
            src = os.path.join(path, name)
            if not datadir.STORE_FILE.match(name) or name in ("LOCK", "LOG", "LOG.old"):
                continue
            if TABLE_NAME.match(name):
                if name in listed:
                    os.symlink(src, os.path.join(scratch, name))
            else:
                shutil.copyfile(src, os.path.join(scratch, name))
                os.chmod(os.path.join(scratch, name), datadir.FILE_MODE)
    except BaseException as e:
        # Whatever ends it (a stop too): the copy holds the store's key.
        remove_snapshot(scratch)
        if not isinstance(e, OSError):
            raise
        what = name if name is not None else "its directory"
        raise StoreError(f"{path}: cannot copy the store to read it ({what}): "
                         f"{e.strerror or e}") from e


def remove_snapshot(scratch: str) -> None:
    """Removes the copy named `scratch` (none made, or not this process's:
    nothing).  A stop that lands while it does is raised once it is gone."""
    try:
        _remove(scratch)
    except BaseException:
        _remove(scratch)
        raise


def remove_snapshots() -> None:
    """Removes every copy this process made and has not removed."""
    for scratch in list(_copies):
        remove_snapshot(scratch)


def _remove(scratch: str) -> None:
    if scratch not in _copies:
        return
    for _ in range(REMOVE_TRIES):
        shutil.rmtree(scratch, ignore_errors=True)
        if not os.path.lexists(scratch):
            _copies.discard(scratch)
            return


atexit.register(remove_snapshots)
# A child made by fork() inherits the set but made none of its copies: its
# exit removes none of its parent's, which the parent is reading.
if hasattr(os, "register_at_fork"):         # not on Windows, which does not fork
    os.register_at_fork(after_in_child=_copies.clear)
