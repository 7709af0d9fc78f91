"""Helpers shared by the reliability tests.

A module, not a conftest.py: a second conftest.py would replace
tests/conftest.py in sys.modules, and the test modules that do
`from conftest import ...` would get the wrong one.  The fixtures of
tests/conftest.py (start_server, shared_server, cred) apply here as usual.
"""

import os
import re
import signal
import subprocess
import time
from pathlib import Path

import pytest

from conftest import PYTHON, Conn, ServerProc, request_bytes, spawn_command
from postgres.pgcluster import CounterLock

HERE = Path(__file__).resolve().parent
CONTROLLED_SERVE = HERE / "controlled_serve.py"


# --- servers ---------------------------------------------------------------------

class Control:
    """The control directory of a controlled_serve.py server."""

    def __init__(self, path):
        self.path = Path(path)
        self.path.mkdir(parents=True, exist_ok=True)

    def _set(self, name, on=True):
        f = self.path / name
        if on:
            f.touch()
        elif f.exists():
            f.unlink()

    def hold(self):
        self._set("hold")

    def release(self):
        self._set("hold", False)

    def fail_before(self, on=True):
        self._set("fail-before", on)

    def fail_after(self, on=True):
        self._set("fail-after", on)

    def lose_read(self, on=True):
        self._set("lose-read", on)

    def fail_apply(self, on=True):
        self._set("fail-apply", on)

    def wait_holding(self, timeout_s=10.0):
        """Until a commit is held (the writer took a batch and waits)."""
        deadline = time.monotonic() + timeout_s
        while not (self.path / "holding").exists():
            if time.monotonic() > deadline:
                raise AssertionError(f"no commit was held within {timeout_s} s")
            time.sleep(0.005)


def spawn_controlled(data, log_dir, control, *, port=0, env=None,
                     batch_mods_max=None, queued_mods_max=None, store=None) -> ServerProc:
    """controlled_serve.py on `data`; on a PostgreSQL `store` (a conftest
    StoreUnderTest), its database for `data`."""
    cmd = [PYTHON, CONTROLLED_SERVE, "--data", data, "--control", control.path,
           "--port", port]
    if batch_mods_max is not None:
        cmd += ["--batch-mods-max", batch_mods_max]
    if queued_mods_max is not None:
        cmd += ["--queued-mods-max", queued_mods_max]
    if store is not None and not store.embedded:
        cmd += ["--store", store.url(data)]
    srv = spawn_command([str(c) for c in cmd], log_dir, data=data, env=env)
    srv.store = store
    return srv


@pytest.fixture
def controlled(tmp_path, server_store):
    """start(data=None, env=None, **kw) -> (server, Control): a
    controlled_serve.py server whose commits can be held (on PostgreSQL, in
    the database: pgcluster.CounterLock), on the test's store.  `data` names its data
    directory under tmp_path (a new one each start when not given; the same
    name again reopens it); `kw` as spawn_controlled's.  Every server is
    killed, its commits released, at teardown.  A test module imports it."""
    started = []

    def start(data=None, env=None, **kw):
        n = len(started)
        path = tmp_path / (data or f"data{n}")
        control = Control(tmp_path / f"control{n}")
        srv = spawn_controlled(path, tmp_path / f"log{n}", control, env=env,
                               store=server_store, **kw)
        if not server_store.embedded:
            control = CounterLock(server_store.pg, server_store.dbname(path))
        started.append((srv, control))
        return srv, control

    yield start
    for srv, control in started:
        control.release()
        stop_quietly(srv)


def stop_quietly(srv):
    """SIGCONT (in case it was stopped) and SIGKILL; for teardown."""
    if srv is not None and srv.proc.poll() is None:
        try:
            srv.proc.send_signal(signal.SIGCONT)
        except ProcessLookupError:
            pass
        srv.kill()


# --- reading state over the wire --------------------------------------------------

def get_json(conn: Conn, target):
    conn.send(request_bytes("GET", target))
    r = conn.response()
    return r.status, r.json


def history(srv, cred, page=1000):
    """The whole history of `cred`, oldest first, read page by page through
    /past (newest first, `next` is the `before` of the next page).  None for
    an unknown cred."""
    out = []
    before = None
    with srv.connect(timeout=30) as c:
        while True:
            target = f"/past?cred={cred}&limit={page}"
            if before is not None:
                target += f"&before={before}"
            status, doc = get_json(c, target)
            if status == 404 and before is None:
                return None
            assert status == 200, (status, doc)
            out.extend(doc["past"])
            before = doc["next"]
            if before is None:
                break
    out.reverse()
    return out


def snapshot(srv, creds):
    """{cred: (tot or None, history or None)}: what a test compares before
    and after something that must change nothing."""
    snap = {}
    with srv.connect(timeout=30) as c:
        for cred in creds:
            status, doc = get_json(c, f"/tot?cred={cred}")
            tot = doc["tot"] if status == 200 else None
            assert status in (200, 404), (status, doc)
            snap[cred] = (tot, None if tot is None else history(srv, cred))
    return snap


_SAMPLE = re.compile(r"^([a-z_]+(?:\{[^}]*\})?) (\S+)$")


def metrics(srv) -> dict:
    """The /metrics samples: {'name{labels}': value}."""
    r = srv.get("/metrics")
    assert r.status == 200, r
    out = {}
    for line in r.body.decode().splitlines():
        m = _SAMPLE.match(line)
        if m:
            out[m.group(1)] = float(m.group(2))
    return out


# --- a small filesystem that fills up -----------------------------------------------

def mount_tmpfs(path, size="2m"):
    path = Path(path)
    path.mkdir(parents=True, exist_ok=True)
    subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)],
                   check=True, capture_output=True, text=True)
    return path


def umount(path):
    # Lazy: a server killed a moment ago may still hold a file open.
    subprocess.run(["umount", "-l", str(path)], capture_output=True)


def fill(path, name="filler"):
    """Write zeros into `path/name` until the filesystem is full; returns
    the file's path (delete it to free the space)."""
    f = Path(path) / name
    fd = os.open(f, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o600)
    try:
        for chunk in (1 << 16, 1 << 12, 1 << 9, 1):
            zeros = b"\0" * chunk
            while True:
                try:
                    os.write(fd, zeros)
                except OSError:
                    break
    finally:
        os.close(fd)
    return f
