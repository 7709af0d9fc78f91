"""Tests that run with no other test running.

The suite runs in parallel workers (pytest-xdist, pyproject.toml).  A test
that measures how the scheduler shares a core between its own threads
would measure the other workers' tests too: it is marked
`@pytest.mark.alone("why")`.  Every test runs holding a lock of the run's
(flock on a file in a directory the run makes, named to the workers in
PYTEST_ACCMAN_LOCKS): shared, or exclusive for an `alone` one.  A
turnstile, taken before the lock and given back once it is held, keeps
new tests from starting while one waits to run alone, so that it is not
starved by the others' shared holds.

Alone means no other test running, not no other process: the workers'
shared servers and PostgreSQL clusters stay up, idle, meanwhile, and
another run on the same machine is not seen.
"""

import contextlib
import fcntl
import os
import shutil
import tempfile

# Not ACCMAN_*: a server warns of an ACCMAN_ variable it does not know.
LOCKS_ENV = "PYTEST_ACCMAN_LOCKS"


def begin_run() -> None:
    """In the process that starts the workers (they inherit the variable):
    the run's lock directory."""
    os.environ[LOCKS_ENV] = tempfile.mkdtemp(prefix="accman-tests-")


def end_run() -> None:
    shutil.rmtree(os.environ.pop(LOCKS_ENV, ""), ignore_errors=True)


@contextlib.contextmanager
def turn(alone: bool):
    """Held while one test runs (its setup, call and teardown).  Without
    workers (-n 0) every test runs alone: nothing to hold."""
    locks = os.environ.get(LOCKS_ENV)
    if locks is None or os.environ.get("PYTEST_XDIST_WORKER") is None:
        yield
        return
    fds = [os.open(os.path.join(locks, name), os.O_RDWR | os.O_CREAT, 0o600)
           for name in ("turnstile", "lock")]
    turnstile, lock = fds
    try:
        fcntl.flock(turnstile, fcntl.LOCK_EX)
        fcntl.flock(lock, fcntl.LOCK_EX if alone else fcntl.LOCK_SH)
        fcntl.flock(turnstile, fcntl.LOCK_UN)
        yield
    finally:
        for fd in fds:
            os.close(fd)        # gives the locks back
