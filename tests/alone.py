"""Tests that run with no other test running.

The suite runs in parallel workers (pytest-xdist, pyproject.toml).  A test
that measures how the scheduler shares a core between its own threads
would measure the other workers' tests too: it is marked
`@pytest.mark.alone("why")`.  Every test runs holding a lock of the run's
(flock on a file named by xdist's run id): shared, or exclusive for an
`alone` one.  A turnstile, taken before the lock and given back once it is
held, keeps new tests from starting while one waits to run alone, so that
it is not starved by the others' shared holds.
"""

import contextlib
import fcntl
import os
import tempfile


def _lock_files() -> tuple[str, str] | None:
    run = os.environ.get("PYTEST_XDIST_TESTRUNUID")
    if run is None:
        return None         # not in parallel workers: every test runs alone
    base = os.path.join(tempfile.gettempdir(), f"accman-tests-{run}")
    return base + ".turnstile", base + ".lock"


@contextlib.contextmanager
def turn(alone: bool):
    """Held while one test runs (its setup, call and teardown)."""
    files = _lock_files()
    if files is None:
        yield
        return
    fds = [os.open(path, os.O_RDWR | os.O_CREAT, 0o600) for path in files]
    turnstile, lock = fds
    try:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield
    finally:
        for fd in fds:
            os.close(fd)        # gives the locks back
