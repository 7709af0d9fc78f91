"""`accman verify`'s verdict on a stopped server's data directory: the
store read whole in a private copy (accman.ledger.leveldb.Store, read-only),
and the webhook's cursor file, which a server refuses to start with when
it is damaged (accman/server/cursors.py)."""

from __future__ import annotations

from accman.calling.commands import EXIT_OK, EXIT_REFUSED, EXIT_USAGE
from accman.errors import AccManError, StoreCorrupt, StoreLocked
from accman.server.cursors import FileCursors
from accman.server.webhooks import CURSOR_NAME


def verdict_on(path, Ledger, Store):
    """The verdict on the store at `path`, said by the caller once the stops
    are held back: (line, exit code, whether it is the result, for stdout,
    or an error, for stderr)."""
    try:
        # Read-only: recovery runs in a private copy, so that a read-only
        # copy or mount can be verified and no file of the store changes.
        store = Store(path, create=False, read_only=True)
        try:
            ledger = Ledger(path, create=False, store=store)
        except BaseException:
            store.close(checkpoint=False)
            raise
    except StoreLocked:
        return (f"data directory {path} is in use by another process (a running server, "
                "or a program with its ledger open); stop it first", EXIT_USAGE, False)
    except StoreCorrupt as e:
        return _failed(path, e), EXIT_REFUSED, True
    except AccManError as e:
        why = e.detail.removeprefix(f"{path}: ")      # the store's words name it too
        return f"cannot open data directory {path}: {why}", EXIT_USAGE, False
    try:
        counts = ledger.verify()
        cursor = FileCursors(path).load(CURSOR_NAME)
    except StoreCorrupt as e:
        return _failed(path, e), EXIT_REFUSED, True
    except AccManError as e:
        return f"cannot read data directory {path}: {e.detail}", EXIT_USAGE, False
    finally:
        ledger.close()
    if cursor is not None:
        counts["webhook_cursor"] = cursor
    described = ", ".join(f"{name}={n}" for name, n in counts.items())
    return f"accman: verify {path}: ok ({described})", EXIT_OK, True


def _failed(path, e) -> str:
    """verify's verdict on a damaged store, naming it once (the store's
    words name it too)."""
    return f"accman: verify {path}: FAILED: {e.detail.removeprefix(f'{path}: ')}"
