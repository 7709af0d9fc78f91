"""Shared fixtures: the real server as a subprocess on port 0, and raw-socket
helpers that speak HTTP/1.1 byte for byte.

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
"""

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

ROOT = Path(__file__).resolve().parents[1]
PYTHON = sys.executable
READY_RE = re.compile(r"accman: serving http://(\S+):(\d+) data=(.+)$")
READY_TIMEOUT_S = 15.0


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

    def __init__(self, host, port, timeout=10.0):
        self.sock = socket.create_connection((host, port), timeout=timeout)
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

    def response(self) -> Response:
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
        length = int(headers.get("content-length", "0"))
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


# --- the server as a subprocess -----------------------------------------------------

class ServerProc:
    def __init__(self, proc, host, port, data, log_dir):
        self.proc = proc
        self.host = host
        self.port = port
        self.data = data
        self.log_dir = log_dir
        self.url = f"http://{host}:{port}"

    @property
    def pid(self):
        return self.proc.pid

    def connect(self, timeout=10.0) -> Conn:
        return Conn(self.host, self.port, timeout)

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
                raise AssertionError(f"server did not stop within {timeout} s on {sig!r}")
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
                 env=None, args=(), wait_ready=True) -> ServerProc:
    """Start `python -m accman serve` on `port` (0: any) and wait for its
    ready line.  `tokens` is a path or the text of a tokens file."""
    log_dir = Path(log_dir)
    log_dir.mkdir(parents=True, exist_ok=True)
    cmd = [PYTHON, "-m", "accman", "serve", "--host", host, "--port", str(port),
           "--data", str(data), *map(str, args)]
    if tokens is not None:
        if isinstance(tokens, str) and "\n" not in tokens and Path(tokens).exists():
            path = tokens
        else:
            path = log_dir / "tokens"
            Path(path).write_text(tokens if tokens.endswith("\n") else tokens + "\n")
            os.chmod(path, 0o600)       # SPEC "Access": others may not read it
        cmd += ["--tokens", str(path)]
    return spawn_command(cmd, log_dir, data=data, host=host, env=env,
                         wait_ready=wait_ready)


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


@pytest.fixture
def start_server(tmp_path):
    """A factory: start_server(data=None, **spawn_server kwargs) -> ServerProc,
    or start_server(cmd=[...], env=...) for any command that prints the ready
    line (see spawn_command).  Every server it started is killed at teardown
    if still running."""
    started = []
    count = [0]

    def start(data=None, cmd=None, **kw):
        count[0] += 1
        data = data if data is not None else tmp_path / "data"
        log_dir = tmp_path / f"server{count[0]}"
        if cmd is not None:
            srv = spawn_command(cmd, log_dir, data=data, **kw)
        else:
            srv = spawn_server(data, log_dir, **kw)
        started.append(srv)
        return srv

    yield start
    for srv in started:
        srv.kill()


@pytest.fixture
def server(start_server):
    """A fresh server on loopback, no tokens, default limits."""
    return start_server()


@pytest.fixture(scope="module")
def shared_server(tmp_path_factory):
    """One server for a whole test module (use unique creds per test)."""
    base = tmp_path_factory.mktemp("shared")
    srv = spawn_server(base / "data", base / "log")
    yield srv
    srv.kill()


_cred_counter = [0]


@pytest.fixture
def cred(request):
    """A credential unique to this test run and test."""
    _cred_counter[0] += 1
    name = re.sub(r"[^A-Za-z0-9_-]", "_", request.node.name)[:80]
    return f"{name}-{os.getpid()}-{_cred_counter[0]}"
