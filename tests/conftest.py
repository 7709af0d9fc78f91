"""Shared fixtures: the real server as a subprocess on port 0, and raw-socket
helpers that speak HTTP/1.1 byte for byte.

Every server fixture runs on each store (the `server_store` fixture): "leveldb",
the embedded store in the data directory, and "postgresql", a database of
its own on the session's PostgreSQL server for each data directory (the
data directory then holds only the server's lock), so the same data
directory started again is the same store.  A test about the embedded
store itself (its files, its log, `accman verify`), or that serves a store
of its own, is marked `@pytest.mark.embedded_only("why")` and runs on
leveldb alone; one whose subject lies between the client and the server (a
fault a proxy injects, the command line's own output) is marked
`@pytest.mark.any_one_store("why")` and runs on the first store under test.
ACCMAN_TEST_STORES=leveldb (or postgresql) picks one.

    def test_x(server):                    # a fresh server, temp data dir
        r = server.get("/tot?cred=a")      # one request on a new connection
        assert r.status == 404 and r.json["error"] == "no_account"

    def test_y(start_server, tmp_path):    # custom servers, stopped at teardown
        s = start_server(env={"ACCMAN_HEAD_TIMEOUT_S": "0.5"}, tokens="read tok...")

    with server.connect() as c:            # a raw connection
        c.send(b"GET /health HTTP/1.1\\r\\n\\r\\n")
        r = c.response()

Limits are overridden with environment variables ACCMAN_<LIMIT NAME> (see
docs/SERVER.md), passed through `env=`.

The embedded ledger in process, on a clock a test moves by hand:

    def test_z(led, clock):                # Ledger(path, clock_ms=clock)
        led.hold("a", -5, 10)
        clock.advance(10)
"""

import contextlib
import faulthandler
import itertools
import json
import os
import re
import select
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import alone

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
# The first URL of the ready line (it names every address bound).
READY_RE = re.compile(r"accman: serving http://(\S+):(\d+)(?: http://\S+)* (?:data|store)=(.+)$")
READY_TIMEOUT_S = 15.0
# A test still running after this long has hung: many times the longest
# test's run on a loaded machine (tests/test_hang_guard.py).
TEST_SECONDS_MAX = 300
# Where a hung test's stacks go: stderr as the run began, before pytest's
# capture took file descriptor 2 (a worker exits before handing it back).
_HANG_REPORT = [None]


# --- HTTP responses read off a raw socket --------------------------------------

class Response:
    def __init__(self, status, reason, headers, body, raw):
        self.status = status
        self.reason = reason
        self.headers = headers          # lower-case name -> value (last wins)
        self.header_list = []           # [(name, value)] as sent
        self.body = body
        self.raw = raw                  # the whole reply as bytes

    @property
    def json(self):
        return json.loads(self.body)

    def __repr__(self):
        return f"<Response {self.status} {self.body[:200]!r}>"


class Conn:
    """A raw client connection with a receive buffer; `response()` reads
    exactly one HTTP/1.1 response (Content-Length framed)."""

    def __init__(self, host, port, timeout=10.0, rcvbuf=None):
        if rcvbuf is None:
            self.sock = socket.create_connection((host, port), timeout=timeout)
        else:
            # Set before connect: TCP's window scale is fixed at the
            # handshake, and a buffer shrunk after it is advertised past
            # what it holds (Linux then drops what overflows it, and the
            # two sides can stop for good: TCPRcvQDrop in nstat).
            family = socket.AF_INET6 if ":" in host else socket.AF_INET
            self.sock = socket.socket(family, socket.SOCK_STREAM)
            try:
                self.sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, rcvbuf)
                self.sock.settimeout(timeout)
                self.sock.connect((host, port))
            except OSError:
                self.sock.close()
                raise
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.buf = b""

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def close(self):
        try:
            self.sock.close()
        except OSError:
            pass

    def send(self, data: bytes):
        self.sock.sendall(data)

    def send_bytewise(self, data: bytes, delay_s=0.0, stop_on_reply=False):
        """Send one byte per send() call.  With stop_on_reply, stop as soon
        as the server has answered (a framing error is answered before the
        request ends; bytes sent after the close would be reset).  Returns
        the number of bytes sent."""
        for i in range(len(data)):
            self.sock.sendall(data[i:i + 1])
            if delay_s:
                time.sleep(delay_s)
            if stop_on_reply and select.select([self.sock], [], [], 0)[0]:
                return i + 1
        return len(data)

    def _fill(self):
        chunk = self.sock.recv(65536)
        if not chunk:
            raise EOFError("connection closed by the server")
        self.buf += chunk

    def response(self, to_head=False) -> Response:
        """The next response; `to_head` true: it answers a HEAD, so it has
        no body whatever its Content-Length says."""
        while b"\r\n\r\n" not in self.buf:
            self._fill()
        head, _, rest = self.buf.partition(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        version, status, reason = (lines[0].split(" ", 2) + [""])[:3]
        assert version == "HTTP/1.1", lines[0]
        headers, header_list = {}, []
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
            header_list.append((name, value.strip()))
        length = 0 if to_head else int(headers.get("content-length", "0"))
        while len(rest) < length:
            self._fill()
            rest = self.buf.partition(b"\r\n\r\n")[2]
        body = rest[:length]
        consumed = len(head) + 4 + length
        raw = self.buf[:consumed]
        self.buf = self.buf[consumed:]
        r = Response(int(status), reason, headers, body, raw)
        r.header_list = header_list
        return r

    def responses(self, n):
        return [self.response() for _ in range(n)]

    def closed_by_peer(self, timeout_s=5.0) -> bool:
        """True when the server closes (EOF or reset) within timeout_s with
        nothing more to read."""
        self.sock.settimeout(timeout_s)
        try:
            while True:
                chunk = self.sock.recv(65536)
                if not chunk:
                    return True
                self.buf += chunk
        except ConnectionResetError:
            return True
        except socket.timeout:
            return False

    def read_all(self, timeout_s=5.0) -> bytes:
        """Everything until the server closes (or timeout_s)."""
        self.closed_by_peer(timeout_s)
        data, self.buf = self.buf, b""
        return data


def request_bytes(method, target, headers=(), body=b"", version="HTTP/1.1", host="127.0.0.1"):
    """One request as bytes; a Host header is added unless host is None or
    `headers` has one (HTTP/1.1 requires it)."""
    lines = [f"{method} {target} {version}"]
    if host is not None and not any(k.lower() == "host" for k, _ in headers):
        lines.append(f"Host: {host}")
    lines += [f"{k}: {v}" for k, v in headers]
    return ("\r\n".join(lines) + "\r\n\r\n").encode("latin-1") + body


def get(target, headers=()):
    return request_bytes("GET", target, headers)


def patch(target, headers=()):
    return request_bytes("PATCH", target, headers)


def assert_error(r, status, code=None):
    """`r` is the SPEC's error reply: status, JSON with error and detail."""
    assert r.status == status, r
    assert r.headers["content-type"] == "application/json"
    doc = r.json
    assert isinstance(doc["error"], str) and doc["error"], doc
    assert isinstance(doc["detail"], str) and doc["detail"], doc
    if code is not None:
        assert doc["error"] == code, doc
    return doc


def parse_responses(data: bytes, heads=()):
    """All complete responses in `data` (for raw replies read at once).
    `heads[i]` true: the i-th answers a HEAD, so it has no body whatever
    its Content-Length says."""
    out = []
    while data:
        head, sep, rest = data.partition(b"\r\n\r\n")
        if not sep:
            break
        m = re.search(rb"(?i)\r\ncontent-length: *(\d+)", head)
        length = int(m.group(1)) if m else 0
        if len(out) < len(heads) and heads[len(out)]:
            length = 0
        lines = head.decode("latin-1").split("\r\n")
        headers = {}
        for line in lines[1:]:
            name, _, value = line.partition(":")
            headers[name.strip().lower()] = value.strip()
        out.append(Response(int(lines[0].split(" ")[1]), lines[0].split(" ", 2)[-1],
                            headers, rest[:length], head + sep + rest[:length]))
        data = rest[length:]
    return out


def with_history(s, cred, n):
    """`n` mods of 1 on `cred`, pipelined in one write, each answered 200:
    a history long enough for /past pages of many bytes."""
    with s.connect() as c:
        c.send(patch(f"/mod?cred={cred}&by=1") * n)
        assert [r.status for r in (c.response() for _ in range(n))] == [200] * n


def read_to_the_end(c) -> list:
    """The replies on `c` until the server's orderly end (a reset raises
    ConnectionResetError), none cut short."""
    replies = []
    with pytest.raises(EOFError):
        while True:
            replies.append(c.response())
    assert c.buf == b""
    return replies


# --- the server as a subprocess -----------------------------------------------------

class ServerProc:
    def __init__(self, proc, host, port, data, log_dir):
        self.proc = proc
        self.host = host
        self.port = port
        self.data = data
        self.log_dir = log_dir
        self.url = f"http://{host}:{port}"
        self.store = None           # the StoreUnderTest it serves, when known

    @property
    def pid(self):
        return self.proc.pid

    def connect(self, timeout=10.0, rcvbuf=None) -> Conn:
        return Conn(self.host, self.port, timeout, rcvbuf)

    def request(self, method, target, headers=(), body=b"", token=None,
                version="HTTP/1.1") -> Response:
        """One request on a new connection."""
        headers = list(headers)
        if token is not None:
            headers.append(("Authorization", f"Bearer {token}"))
        with self.connect() as c:
            c.send(request_bytes(method, target, headers, body, version))
            return c.response()

    def get(self, target, **kw):
        return self.request("GET", target, **kw)

    def patch(self, target, **kw):
        return self.request("PATCH", target, **kw)

    def mod(self, cred, by, token=None, **params):
        q = f"/mod?cred={cred}&by={by}" + "".join(f"&{k}={v}" for k, v in params.items())
        return self.patch(q, token=token)

    def tot(self, cred, token=None):
        r = self.get(f"/tot?cred={cred}", token=token)
        return r.json["tot"] if r.status == 200 else r

    def rss_kib(self) -> int:
        with open(f"/proc/{self.proc.pid}/status") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1])
        raise RuntimeError("no VmRSS")

    def stderr(self) -> str:
        return (self.log_dir / "stderr").read_text(errors="replace")

    def send_signal(self, sig):
        self.proc.send_signal(sig)

    def stop(self, sig=signal.SIGTERM, timeout=15.0) -> int:
        """Signal the server and wait for it; returns its exit code."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()
                raise AssertionError(
                    f"server did not stop within {timeout} s on {sig!r}") from None
        return self.proc.returncode

    def kill(self):
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()


def server_env(env=None):
    full = dict(os.environ)
    full["PYTHONUNBUFFERED"] = "1"
    # This checkout's accman, whatever the working directory.
    full["PYTHONPATH"] = os.pathsep.join(
        p for p in (str(ROOT), full.get("PYTHONPATH")) if p)
    for k, v in (env or {}).items():
        if v is None:
            full.pop(k, None)
        else:
            full[k] = str(v)
    return full


def run_accman(*args, env=None, timeout=30.0, cwd=None):
    """Run `python -m accman ARGS` to completion; returns CompletedProcess
    with text stdout/stderr."""
    return subprocess.run([PYTHON, "-m", "accman", *map(str, args)],
                          capture_output=True, text=True, timeout=timeout,
                          env=server_env(env), cwd=cwd or ROOT)


def spawn_server(data, log_dir, *, host="127.0.0.1", port=0, tokens=None,
                 env=None, args=(), wait_ready=True, store=None) -> ServerProc:
    """Start `python -m accman serve` on `port` (0: any) and wait for its
    ready line.  `tokens` is a path or the text of a tokens file; `store`
    (a StoreUnderTest) adds its --store for `data`."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    store_args = store.serve_args(data) if store is not None else []
    cmd = [PYTHON, "-m", "accman", "serve", "--host", host, "--port", str(port),
           "--data", str(data), *store_args, *map(str, args)]
    if tokens is not None:
        if isinstance(tokens, str) and "\n" not in tokens and Path(tokens).exists():
            path = tokens
        else:
            path = log_dir / "tokens"
            Path(path).write_text(tokens if tokens.endswith("\n") else tokens + "\n")
            os.chmod(path, 0o600)       # SPEC "Access": others may not read it
        cmd += ["--tokens", str(path)]
    srv = spawn_command(cmd, log_dir, data=data, host=host, env=env,
                        wait_ready=wait_ready)
    srv.store = store
    return srv


def spawn_command(cmd, log_dir, *, data=None, host="127.0.0.1", env=None,
                  wait_ready=True) -> ServerProc:
    """Start any command that serves AccMan and prints the ready line first
    on stdout (for instance `python -c` around accman.server.run with an
    injected ledger), and wait for that line."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    out = open(log_dir / "stdout", "wb")
    err = open(log_dir / "stderr", "wb")
    proc = subprocess.Popen(cmd, stdout=out, stderr=err, stdin=subprocess.DEVNULL,
                            env=server_env(env), cwd=ROOT)
    out.close()
    err.close()
    srv = ServerProc(proc, host, None, str(data), log_dir)
    if not wait_ready:
        return srv
    deadline = time.monotonic() + READY_TIMEOUT_S
    while True:
        text = (log_dir / "stdout").read_text(errors="replace")
        m = READY_RE.search(text.split("\n", 1)[0]) if "\n" in text else None
        if m:
            srv.host = m.group(1).strip("[]")
            srv.port = int(m.group(2))
            srv.url = f"http://{m.group(1)}:{srv.port}"
            return srv
        if proc.poll() is not None:
            raise RuntimeError(f"server exited with {proc.returncode}: {srv.stderr()}")
        if time.monotonic() > deadline:
            proc.kill()
            raise RuntimeError(f"no ready line within {READY_TIMEOUT_S} s: {srv.stderr()}")
        time.sleep(0.01)


# --- the store under test ------------------------------------------------------------

STORES = ("leveldb", "postgresql")


def stores_under_test() -> list:
    """The stores the server fixtures run on: both, or ACCMAN_TEST_STORES's."""
    names = os.environ.get("ACCMAN_TEST_STORES", ",".join(STORES)).split(",")
    unknown = set(names) - set(STORES)
    if unknown:
        raise pytest.UsageError(f"ACCMAN_TEST_STORES: unknown store {sorted(unknown)}; "
                                f"known: {', '.join(STORES)}")
    return [n for n in STORES if n in names]


def pytest_configure(config):
    # The suite sends SIGINT to the commands it starts as a terminal's ^C
    # would.  Started as a background job (nohup, `cmd &` in a script) it
    # inherits SIGINT ignored, which its children would keep (the command
    # line honours an ignored SIGINT: test_cli_output), so it takes Python's
    # own handler back first.
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)
    _HANG_REPORT[0] = os.fdopen(os.dup(sys.__stderr__.fileno()), "w")
    # The suite starts accman's server and commands hundreds of times (and
    # its workers, examples and probes): they read accman's bytecode, once
    # compiled, rather than compile its source again at every start,
    # whatever PYTHONDONTWRITEBYTECODE the caller's environment sets.
    os.environ.pop("PYTHONDONTWRITEBYTECODE", None)
    # The PostgreSQL servers the tests start keep their files in memory
    # where it has room (tests/postgres/pgcluster.py says why).
    from postgres import pgcluster
    try:
        pgcluster.PARENT_DIR = pgcluster.suite_parent_dir()
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    if not hasattr(config, "workerinput"):      # the run's first process: tests/alone.py
        alone.begin_run()
    config.addinivalue_line(
        "markers", "embedded_only(why): the test is about the embedded store itself (its "
                   "data directory, write-ahead log, verify, kill -9 of LevelDB) or serves a "
                   "store of its own; it runs on leveldb only")
    config.addinivalue_line(
        "markers", "alone(why): the test measures how a core is shared, and runs with no "
                   "other test running (tests/alone.py)")
    config.addinivalue_line(
        "markers", "any_one_store(why): what the test checks lies between the client and the "
                   "server (a fault a proxy injects, the command line's own output) and "
                   "not in the store; it runs on the first store under test only")


def pytest_unconfigure(config):
    if not hasattr(config, "workerinput"):
        alone.end_run()


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_protocol(item, nextitem):
    # Setup, call and teardown (a module's shared servers' start and stop
    # too) under the run's lock: tests/alone.py.  In a worker, a test
    # still running after TEST_SECONDS_MAX has hung: the worker prints
    # every thread's stack and exits, so that the run names the test
    # ("crashed while running") instead of waiting for CI's time limit.
    # Without workers (-n 0, for --pdb) nothing is timed.
    worker = os.environ.get("PYTEST_XDIST_WORKER") is not None
    with alone.turn(item.get_closest_marker("alone") is not None):
        if worker:
            faulthandler.dump_traceback_later(TEST_SECONDS_MAX, exit=True,
                                              file=_HANG_REPORT[0])
        try:
            yield
        finally:
            if worker:
                faulthandler.cancel_dump_traceback_later()


def pytest_generate_tests(metafunc):
    """Every test that uses a server fixture runs once per store, grouped by
    store within its module (a module's shared servers start once each)."""
    if "server_store" not in metafunc.fixturenames:
        return
    embedded_only = metafunc.definition.get_closest_marker("embedded_only") is not None
    names = [n for n in stores_under_test() if n == "leveldb" or not embedded_only]
    if metafunc.definition.get_closest_marker("any_one_store") is not None:
        names = names[:1]
    metafunc.parametrize("server_store", names, indirect=True, scope="module")


class StoreUnderTest:
    """The store a test's servers keep their accounts in.  On "postgresql"
    each data directory gets a database of its own on `pg` (made at its
    first use), so a server started again on the same directory finds the
    same store, and a second one on it is refused by the directory's lock."""

    _numbers = itertools.count(1)

    def __init__(self, name, pg=None):
        self.name = name
        self.pg = pg
        self._urls: dict = {}

    @property
    def embedded(self) -> bool:
        return self.name == "leveldb"

    def url(self, data) -> str:
        """The PostgreSQL URL of the store of `data`."""
        assert not self.embedded, "the embedded store has no URL"
        key = os.path.abspath(data)
        if key not in self._urls:
            self._urls[key] = self.pg.create_database(f"s{os.getpid()}_{next(self._numbers)}")
        return self._urls[key]

    def dbname(self, data) -> str:
        return self.url(data).rsplit("/", 1)[1]

    def serve_args(self, data) -> list:
        """What `accman serve --data DATA` is given besides, to serve this store."""
        return [] if self.embedded else ["--store", self.url(data)]

    def __repr__(self):
        return self.name


@pytest.fixture(scope="session")
def pg():
    """The session's PostgreSQL server (tests/postgres/pgcluster.py), started
    at the first test that needs it."""
    from postgres.pgcluster import Cluster
    c = Cluster.create("shared")
    try:
        yield c
    finally:
        c.destroy()


@pytest.fixture(scope="module")
def server_store(request):
    """The store the server fixtures run on (parametrised: see
    pytest_generate_tests); a test may take it to start servers itself."""
    name = getattr(request, "param", "leveldb")
    yield StoreUnderTest(name, request.getfixturevalue("pg") if name == "postgresql" else None)


@pytest.fixture
def start_server(tmp_path, server_store):
    """A factory: start_server(data=None, **spawn_server kwargs) -> ServerProc,
    or start_server(cmd=[...], env=...) for any command that prints the ready
    line (see spawn_command).  Servers run on the test's `server_store`.  Every
    server it started is killed at teardown if still running."""
    started = []
    count = [0]

    def start(data=None, cmd=None, **kw):
        count[0] += 1
        data = data if data is not None else tmp_path / "data"
        log_dir = tmp_path / f"server{count[0]}"
        if cmd is not None:
            srv = spawn_command(cmd, log_dir, data=data, **kw)
            srv.store = server_store
        else:
            srv = spawn_server(data, log_dir, store=server_store, **kw)
        started.append(srv)
        return srv

    start.store = server_store
    yield start
    for srv in started:
        srv.kill()


@pytest.fixture
def server(start_server):
    """A fresh server on loopback, no tokens, default limits."""
    return start_server()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory, server_store):
    """One server for a whole test module and store (use unique creds per test)."""
    base = tmp_path_factory.mktemp(f"shared-{server_store.name}")
    srv = spawn_server(base / "data", base / "log", store=server_store)
    yield srv
    srv.kill()


_cred_counter = [0]


@pytest.fixture
def cred(request):
    """A credential unique to this test run and test."""
    _cred_counter[0] += 1
    name = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[:80]
    return f"{name}-{os.getpid()}-{_cred_counter[0]}"


# --- the embedded ledger, in process ----------------------------------------------

@pytest.fixture
def clock():
    """A clock (ms) that moves only when the test says: holds expire and
    events age by it."""
    from model import Clock
    return Clock()


@pytest.fixture
def path(tmp_path):
    """A data directory not yet made."""
    return str(tmp_path / "data")


@pytest.fixture
def led(path, clock):
    """A Ledger in `path` on `clock`, closed at teardown."""
    from accman import Ledger
    with Ledger(path, clock_ms=clock) as led:
        yield led


@contextlib.asynccontextmanager
async def served_in_process(led, limits=None):
    """The server over `led` (a Ledger) on the running loop, with `limits`
    (a ServerLimits; the defaults), on a free loopback port: `(server,
    host, port)`; its listener is closed at the end, the ledger left to
    its caller."""
    import asyncio

    from accman.server import Server
    loop = asyncio.get_running_loop()
    server = Server(led, limits=limits, loop=loop)
    led.bind_loop(loop, deliver=server.deliver)
    host, port = await server.start("127.0.0.1", 0)
    try:
        yield server, host, port
    finally:
        server.listener.close()


async def read_reply(reader) -> tuple:
    """(status, body) of the next reply on an asyncio stream, as bytes."""
    head = await reader.readuntil(b"\r\n\r\n")
    length = int(head.split(b"Content-Length: ")[1].split(b"\r\n")[0])
    return head.split(b" ")[1], await reader.readexactly(length)


@pytest.fixture
def proxy():
    """`make(server, *plan)`: a FaultProxy (tests/test_cli_faults.py) in
    front of `server`, doing `plan`'s faults; closed after the test."""
    from test_cli_faults import FaultProxy
    made = []

    def make(server, *plan):
        made.append(FaultProxy(server.port, plan))
        return made[-1]
    yield make
    for p in made:
        p.close()


# --- the calling side's fake AccMan (tests/fake_accman.py) -------------------

@pytest.fixture
def fake():
    """A fake AccMan for the calling side's unit tests, stopped after."""
    from fake_accman import FakeAccMan
    with FakeAccMan() as f:
        yield f


@pytest.fixture
def quick_followups(monkeypatch):
    """The middleware's owed calls retried at once (the ASGI tests use it)."""
    from accman.calling import owed
    monkeypatch.setattr(owed, "FOLLOWUP_PAUSE_S", 0.01)
