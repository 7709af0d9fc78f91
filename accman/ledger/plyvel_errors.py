"""plyvel's errors, and the OS's met beside them, in the ledger's words:
the one place they are translated (STYLE: foreign errors at one border).
No I/O."""

from __future__ import annotations

import contextlib
import os

import plyvel

from accman.errors import StoreCorrupt, StoreError, StoreLocked, Unavailable
from accman.ledger.gate import CLOSED_DETAIL


@contextlib.contextmanager
def translated(path: str, action: str):
    """Turns plyvel and OS errors into StoreLocked / StoreCorrupt /
    StoreError, naming the directory and what was being done; plyvel's
    refusal of a closed database into the ledger's Unavailable."""
    try:
        yield
    except RuntimeError as e:
        # plyvel's only RuntimeErrors: "Database is closed", "Database or
        # iterator is closed" (and snapshot); anything else is a bug here.
        if "closed" not in message(e):
            raise
        raise Unavailable(CLOSED_DETAIL) from e
    except plyvel.CorruptionError as e:
        raise StoreCorrupt(f"{path}: data files are damaged ({action}): "
                           f"{message(e)}; refusing to serve, nothing repaired") from e
    except plyvel.IOError as e:
        msg = message(e)
        if "lock" in msg.lower():
            raise StoreLocked(f"{path}: the data directory is open in another "
                              f"process (LevelDB lock held)") from e
        raise StoreError(f"{path}: {action} failed: {msg}") from e
    except plyvel.Error as e:
        raise StoreError(f"{path}: {action} failed: {message(e)}") from e
    except OSError as e:
        # The file, when the OS names one (an immutable or unreadable file
        # among the store's: which one is what a person needs to know).
        where = f" ({os.path.basename(e.filename)})" if isinstance(e.filename, str) else ""
        raise StoreError(f"{path}: {action} failed{where}: {e.strerror or e}") from e


def unreadable(shown: str, e: OSError) -> StoreError:
    """A file of the store at `shown` that a read of ours could not read,
    named as the OS names it."""
    what = os.path.basename(e.filename) if isinstance(e.filename, str) else "the store"
    return StoreError(f"{shown}: cannot read {what}: {e.strerror or e}")


def message(e: BaseException) -> str:
    """plyvel's message (bytes from LevelDB's Status) as text."""
    arg = e.args[0] if e.args else e
    return arg.decode("utf-8", "replace") if isinstance(arg, bytes) else str(arg)
