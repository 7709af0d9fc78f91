"""AccMan: prepaid balances for web APIs.

    from accman import Ledger, AccManError

Importing the package loads only the errors and the records, which every
part shares.  `Ledger` (the embedded store: LevelDB through plyvel) is
imported on first use of the name; the calling side (accman.client,
accman.asgi) never uses it, so a service that only calls AccMan loads
neither LevelDB nor the server (tests/test_calling_layout.py).
"""

from accman.errors import (AccManError, BadRequest, Busy, EventsTrimmed, HoldEnded, Insufficient,
                           KeyReused, NoAccount, NoHold, NotApplied, Overflow, ShuttingDown,
                           StoreCorrupt, StoreError, StoreLocked, TooManyHolds, Unavailable)
from accman.records import Entry, Event

# The one place the version is written: pyproject.toml reads it from here.
__version__ = "0.1.0"

__all__ = [
    "Ledger", "Entry", "Event", "AccManError", "BadRequest", "Busy", "Insufficient",
    "KeyReused", "NoAccount", "Overflow", "StoreCorrupt", "StoreError", "StoreLocked",
    "Unavailable", "NotApplied", "ShuttingDown", "TooManyHolds", "HoldEnded", "NoHold",
    "EventsTrimmed", "__version__",
]

# The compiled modules (setup.py builds them from ext/), by package.
_NATIVE = (("ledger", "_ledger"), ("ledger", "_check"), ("server", "_wire"))


def __getattr__(name):
    if name == "Ledger":
        try:
            from accman.ledger import Ledger
        except ImportError:
            why = native_missing()
            if why is None:
                raise
            raise ImportError(why) from None
        return Ledger
    raise AttributeError(f"module 'accman' has no attribute {name!r}")


def native_missing() -> str | None:
    """When the compiled modules are missing from this copy of accman: one
    line saying why and what to run.  None when they are all here.

    The usual cause is a source tree without a build (a fresh clone after
    `pip install .`): `python -m accman` or `python -c` run from its root
    find it before the installed accman, because Python looks in the
    current directory first."""
    import os

    here = os.path.dirname(os.path.abspath(__file__))
    if not _lacks_native(here):
        return None
    build = "build it with `pip install -e .` (or `python setup.py build_ext --inplace`)"
    other = _installed_elsewhere(here)
    if other is not None:
        return (f"{here} is a source tree without its compiled modules, and Python finds it "
                f"before the installed accman ({other}) because it looks in the current "
                f"directory first: run the installed `accman` command, or run from another "
                f"directory; to use this tree, {build}")
    return f"accman's compiled modules are not built in {here}: {build}"


def postgres_missing() -> str | None:
    """When the PostgreSQL store's driver (asyncpg, the `postgres` extra)
    is not installed: one line saying what to install.  None when it is."""
    import importlib.util

    if importlib.util.find_spec("asyncpg") is not None:
        return None
    return "the PostgreSQL store needs asyncpg: pip install 'accman[postgres]'"


def _lacks_native(package_dir: str) -> bool:
    import importlib.machinery
    import os

    suffixes = importlib.machinery.EXTENSION_SUFFIXES
    return not all(any(os.path.exists(os.path.join(package_dir, sub, name + suffix))
                       for suffix in suffixes)
                   for sub, name in _NATIVE)


def _installed_elsewhere(here: str) -> str | None:
    """Another accman that the import system would find if this one were
    not in the way, and that has its compiled modules."""
    import importlib.machinery
    import os
    import sys

    parent = os.path.dirname(here)
    paths = [p for p in sys.path if os.path.realpath(p or ".") != os.path.realpath(parent)]
    for finder in sys.meta_path:
        try:
            if finder is importlib.machinery.PathFinder:
                spec = finder.find_spec("accman", paths)
            else:
                spec = finder.find_spec("accman", None)
        except (ImportError, AttributeError, TypeError, ValueError):
            continue
        origin = getattr(spec, "origin", None)
        if not origin:
            continue
        other = os.path.dirname(os.path.abspath(origin))
        if os.path.realpath(other) != os.path.realpath(here) and not _lacks_native(other):
            return other
    return None
