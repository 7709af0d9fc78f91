"""A refused `accman serve` of the embedded store changes nothing: the
store that start made in a new or empty --data (its port busy, its --host
an address of no interface here) is taken back, the directories it made
too, and the empty directory's mode and default ACL are as they were.  A
store that was there before, and one another start makes in the same path
meanwhile, stay.  Real `accman serve` processes."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys

import pytest

from accman import Ledger
from accman.cli import EXIT_USAGE
from conftest import ROOT, run_accman
from test_data_at_rest import _state


@pytest.fixture
def busy_port():
    """A port that a listening socket holds: a start binding it is refused."""
    with socket.socket() as busy:
        busy.bind(("127.0.0.1", 0))
        busy.listen()
        yield busy.getsockname()[1]


def _refused_to_listen(port, data, *more):
    proc = run_accman("serve", "--port", port, "--data", data, *more)
    assert proc.returncode == EXIT_USAGE, proc.stderr
    assert "cannot listen on " in proc.stderr, proc.stderr
    return proc


@pytest.mark.parametrize("found", [None, "parents", [], ["lost+found"]])
def test_a_start_that_cannot_listen_takes_back_the_store_it_made(tmp_path, busy_port, found):
    """The store was made (and left) before the port was found busy: a
    later start took the empty store for its own, and a directory the user
    had made empty for it came back 0700.  Now it is as it was found."""
    d = tmp_path / "a" / "b" / "d" if found == "parents" else tmp_path / "d"
    if isinstance(found, list):
        d.mkdir(mode=0o755)
        os.chmod(d, 0o755)
        for name in found:
            (d / name).mkdir()
    before = _state(d) if isinstance(found, list) else None
    _refused_to_listen(busy_port, d)
    if before is None:
        assert os.listdir(tmp_path) == []
    else:
        assert _state(d) == before


def test_a_start_on_an_address_of_no_interface_takes_back_the_store_it_made(tmp_path):
    """--host an address no interface here has (TEST-NET-1, RFC 5737)."""
    tokens = tmp_path / "tokens"
    tokens.write_text("read t0ken-of-the-test-0123456789\n")
    os.chmod(tokens, 0o600)
    proc = _refused_to_listen(0, tmp_path / "d", "--host", "192.0.2.1", "--tokens", tokens)
    assert "192.0.2.1" in proc.stderr
    assert sorted(os.listdir(tmp_path)) == ["tokens"]


def test_a_start_that_cannot_listen_leaves_a_store_that_was_there(tmp_path, busy_port):
    d = tmp_path / "d"
    with Ledger(str(d)) as led:
        led.mod("alice", 5)
    _refused_to_listen(busy_port, d)
    with Ledger(str(d), create=False) as led:
        assert led.tot("alice") == 5


@pytest.mark.parametrize("name", ["notes.txt", "accman.log"])
def test_a_start_that_cannot_listen_leaves_a_file_put_beside_its_store(tmp_path, busy_port,
                                                                      name):
    """What the directory holds that the store's creation did not write (a
    user's file, put there while the start ran) keeps it all in place: a
    name of the form of the store's own (accman.*) too."""
    d = tmp_path / "d"
    code = ("import os, sys\n"
            "from accman.server.run import run\n"
            "from accman.server import StartupError\n"
            "r = sys.modules['accman.server.run']\n"
            "opened = r.open_ledger\n"
            "def open_ledger(path, *a, **k):\n"
            "    store = opened(path, *a, **k)\n"
            "    open(os.path.join(path, sys.argv[3]), 'w').close()\n"
            "    return store\n"
            "r.open_ledger = open_ledger\n"
            "try:\n"
            "    run(port=int(sys.argv[2]), data=sys.argv[1])\n"
            "except StartupError as e:\n"
            "    print(e)\n")
    proc = subprocess.run([sys.executable, "-c", code, str(d), str(busy_port), name],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "cannot listen on" in proc.stdout, (proc.stdout, proc.stderr)
    assert name in os.listdir(d) and "CURRENT" in os.listdir(d)
    os.unlink(d / name)
    with Ledger(str(d), create=False) as led:
        assert len(led) == 0


# A refused start's undo, with another start of the embedded store in the
# same --data after each file it removes: refused while the undo holds the
# lock, it makes its own store once LOCK is gone, which stays.
_UNDO_RACED = """
import os, socket, sys
from accman import Ledger
from accman.errors import StoreLocked
from accman.server import StartupError, run
d = sys.argv[1]
met, unlink = [], os.unlink
def raced(path, *, dir_fd=None):
    unlink(path, dir_fd=dir_fd)
    if dir_fd is None and os.path.dirname(path) != d or met[-1:] == ["opened"]:
        return
    try:
        with Ledger(d) as led:
            led.mod("bob", 7)
        met.append("opened")
    except StoreLocked:
        met.append("locked")
os.unlink = raced
with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    try:
        run(port=busy.getsockname()[1], data=d)
    except StartupError as e:
        print("refused", e, file=sys.stderr)
os.unlink = unlink
with Ledger(d, create=False) as led:
    print(met.count("locked") > 0, met[-1] if met else None, led.tot("bob"))
"""


def test_a_refused_start_leaves_the_store_another_start_makes_meanwhile(tmp_path):
    proc = subprocess.run([sys.executable, "-c", _UNDO_RACED, str(tmp_path / "d")],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr
    assert "refused cannot listen on" in proc.stderr, proc.stderr
    assert proc.stdout.split() == ["True", "opened", "7"], (proc.stdout, proc.stderr)


# A refused start whose store another start made, served and closed between
# the look the undo takes at --data and the open: the open finds that store.
_MADE_MEANWHILE = """
import os, sys
from accman import Ledger
from accman.server import StartupError
from accman.server.run import run
r = sys.modules['accman.server.run']
opened = r.open_ledger
def open_ledger(path, *a, **k):
    with Ledger(path):
        pass
    return opened(path, *a, **k)
r.open_ledger = open_ledger
try:
    run(port=int(sys.argv[2]), data=sys.argv[1])
except StartupError as e:
    print(e)
"""


@pytest.mark.parametrize("found", [None, []])
def test_a_refused_start_leaves_a_store_another_start_made_before_its_open(
        tmp_path, busy_port, found):
    """The other start's store held no account: the refused start, which
    had seen --data missing or empty, removed it (and the directory the
    other start had made) as if its own open had made it.  Only a store
    this start's open made is taken back."""
    d = tmp_path / "d"
    if found is not None:
        d.mkdir()
    proc = subprocess.run([sys.executable, "-c", _MADE_MEANWHILE, str(d), str(busy_port)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "cannot listen on" in proc.stdout, (proc.stdout, proc.stderr)
    assert {"CURRENT", "accman.key"} <= set(os.listdir(d))
    with Ledger(str(d), create=False) as led:
        assert len(led) == 0


# --data a symbolic link that is turned to another directory while the
# start runs (a deployment's "current" link): the store there is another's.
_LINK_TURNED = """
import os, sys
from accman.server import StartupError
from accman.server.run import run
link, other = sys.argv[1], sys.argv[3]
r = sys.modules['accman.server.run']
opened = r.open_ledger
def open_ledger(path, *a, **k):
    store = opened(path, *a, **k)
    os.symlink(other, link + ".new")
    os.replace(link + ".new", link)
    return store
r.open_ledger = open_ledger
try:
    run(port=int(sys.argv[2]), data=link)
except StartupError as e:
    print(e)
"""


def test_a_refused_start_leaves_the_store_its_data_link_is_turned_to(tmp_path, busy_port):
    """The undo listed and removed by the path: a link turned meanwhile to
    another store's directory had that store's files (its accounts too)
    removed.  What the undo removes is in the directory its lock is in."""
    (tmp_path / "v1").mkdir()
    other = tmp_path / "v2"
    with Ledger(str(other)) as led:
        led.mod("alice", 5)
    os.symlink(tmp_path / "v1", tmp_path / "current")
    proc = subprocess.run([sys.executable, "-c", _LINK_TURNED, str(tmp_path / "current"),
                           str(busy_port), str(other)],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "cannot listen on" in proc.stdout, (proc.stdout, proc.stderr)
    with Ledger(str(other), create=False) as led:
        assert led.tot("alice") == 5


# A stop (SIGTERM, ^C) that lands while a refused start's undo removes its
# store's files: sent by the process itself once CURRENT is gone.
_STOPPED_IN_UNDO = """
import os, signal, socket, sys
from accman.cli import main
unlink = os.unlink
def stopped(path, *, dir_fd=None):
    unlink(path, dir_fd=dir_fd)
    if path == "CURRENT":
        os.kill(os.getpid(), getattr(signal, sys.argv[2]))
os.unlink = stopped
with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    code = main(["serve", "--port", str(busy.getsockname()[1]), "--data", sys.argv[1]])
os.unlink = unlink
sys.exit(code)
"""


@pytest.mark.parametrize("stop", ["SIGTERM", "SIGINT"])
def test_a_stop_during_the_undo_waits_for_its_end(tmp_path, stop):
    """Cut short after CURRENT, the undo left the store's log, checkpoint
    and key, which the next start refused as a damaged store.  The stop
    acts once the undo is done: the start ends as a stop ends it."""
    d = tmp_path / "d"
    proc = subprocess.run([sys.executable, "-c", _STOPPED_IN_UNDO, str(d), stop],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert proc.returncode == 128 + getattr(signal, stop), (proc.returncode, proc.stderr)
    assert os.listdir(tmp_path) == [], (sorted(os.listdir(d)), proc.stderr)


# A stop that lands as a refused start closes its new store: the close goes
# on in a thread of its own (accman.ledger.gate).  Here that thread closes
# the store once the undo has taken LOCK away, and the undo's rmdir waits
# for it to end: the order a slow thread may take.
_STOPPED_IN_CLOSE = """
import os, signal, socket, sys, threading, time
from accman.cli import main
from accman.ledger import leveldb
from accman.ledger.ledger import Ledger
d, close_store, close, rmdir = sys.argv[1], Ledger._close_store, leveldb.Store.close, os.rmdir
def waited(condition):
    deadline = time.monotonic() + 30
    while condition() and time.monotonic() < deadline:
        time.sleep(0.01)
def stopped(self):
    os.kill(os.getpid(), signal.SIGTERM)
    return close_store(self)
def slow(self, *a, **k):
    if threading.current_thread() is not threading.main_thread():
        waited(lambda: os.path.exists(os.path.join(d, "LOCK")))
    return close(self, *a, **k)
def after_close(path, *a, **k):
    waited(lambda: any(t.name == "accman-close" for t in threading.enumerate()))
    return rmdir(path, *a, **k)
Ledger._close_store, leveldb.Store.close, os.rmdir = stopped, slow, after_close
with socket.socket() as busy:
    busy.bind(("127.0.0.1", 0))
    busy.listen()
    code = main(["serve", "--port", str(busy.getsockname()[1]), "--data", d])
sys.exit(code)
"""


def test_a_stop_during_a_refused_starts_close_waits_for_the_undo(tmp_path):
    """The close, interrupted, went on in its thread while the undo took
    the store away: its checkpoint came after, alone in --data, which the
    next start refused as damaged (accman.key missing).  The close and the
    undo are done before the stop acts."""
    d = tmp_path / "d"
    proc = subprocess.run([sys.executable, "-c", _STOPPED_IN_CLOSE, str(d)],
                          capture_output=True, text=True, timeout=120, cwd=ROOT)
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr)
    assert os.listdir(tmp_path) == [], (sorted(os.listdir(d)), proc.stderr)

# A user's chmod of a front-end's --data while its start runs, once the lock
# is taken; its store cannot be reached, so the start is refused.
_CHMOD_MEANWHILE = """
import os, sys
from accman.server import StartupError
from accman.server.run import run
r = sys.modules["accman.server.run"]
locked = r.lock_directory
def lock_directory(path):
    locked(path)
    os.chmod(path, 0o750)
r.lock_directory = lock_directory
try:
    run(port=0, data=sys.argv[1], store_urls=[sys.argv[2]])
except StartupError as e:
    print(e)
"""


def test_a_failed_front_end_start_leaves_the_mode_a_user_gave_meanwhile(tmp_path):
    """A front-end changes no mode of --data, but its undo put back the
    mode --data had as the start began, over the user's chmod."""
    d = tmp_path / "d"
    d.mkdir()
    os.chmod(d, 0o755)
    proc = subprocess.run([sys.executable, "-c", _CHMOD_MEANWHILE, str(d),
                           "postgresql://accman@127.0.0.1:1/none"],
                          capture_output=True, text=True, timeout=60, cwd=ROOT)
    assert "cannot open the PostgreSQL store" in proc.stdout, (proc.stdout, proc.stderr)
    assert os.listdir(d) == []
    assert oct(os.stat(d).st_mode & 0o777) == oct(0o750)
