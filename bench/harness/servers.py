"""The servers under test, each started pinned to the server's CPU on a free
loopback port and a fresh temporary directory, in a process group of its own
that is stopped by its id (SIGTERM, then SIGKILL) on the way out.

    accman   `python -m accman serve`: the subprocess and HTTP, nothing imported
    sketch   bench/plyvel_sketch.py: uvloop, a dict, one synced plyvel batch per batch
    uvicorn  bench/baseline_app.py: uvicorn + starlette + plyvel, one synced write per mod
    nginx    a static 200 (bench/nginx.conf.template): the ceiling of wrk and loopback TCP
    redis    redis-server with appendonly yes and appendfsync always, its own dir and config
"""

import contextlib
import os
import queue
import re
import signal
import socket
import subprocess
import tempfile
import threading
import time
from pathlib import Path

from .base import (BENCH_DIR, HOST, PYTHON, REPO_DIR, SERVER_CPU, START_TIMEOUT_S,
                   STOP_TIMEOUT_S, BenchError, missing, pinned, which)


def free_port():
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind((HOST, 0))
        return s.getsockname()[1]


def find_tool(name):
    """The tool's path; BenchError saying what to install if it is missing."""
    path = which(name)
    if path is None:
        raise BenchError(missing(name))
    return path


def tool_version(argv):
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10)
    except (OSError, subprocess.TimeoutExpired):
        return None
    text = (out.stdout + out.stderr).strip()
    return text.splitlines()[0] if text else None


class Proc:
    """A process started in its own group, stopped by that group's id."""

    def __init__(self, argv, *, log_path, stdout_pipe=False, cwd=None, env=None):
        self.argv = argv
        self.log_path = log_path
        self._log = open(log_path, "wb")
        self.popen = subprocess.Popen(
            argv, cwd=cwd, env=env, stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE if stdout_pipe else self._log,
            stderr=self._log, start_new_session=True)
        self.pid = self.popen.pid

    def alive(self):
        return self.popen.poll() is None

    def log_tail(self, lines=5):
        try:
            text = Path(self.log_path).read_text(errors="replace").strip().splitlines()
        except OSError:
            return ""
        return " | ".join(text[-lines:])

    def stop(self, sig=signal.SIGTERM):
        if self.alive():
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.pid, sig)
            try:
                self.popen.wait(STOP_TIMEOUT_S)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.pid, signal.SIGKILL)
                self.popen.wait(STOP_TIMEOUT_S)
        # Workers of a group whose leader exited (nginx's, say) go too.
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(self.pid, signal.SIGKILL)
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        self._log.close()


def wait_port(proc, port, deadline):
    while time.monotonic() < deadline:
        if not proc.alive():
            raise BenchError(f"exited with {proc.popen.returncode}: {proc.log_tail()}")
        try:
            with socket.create_connection((HOST, port), timeout=0.2):
                return
        except OSError:
            time.sleep(0.05)
    raise BenchError(f"not accepting on {HOST}:{port} after {START_TIMEOUT_S} s")


class Server:
    """Start in __enter__, stop in __exit__; `port`, `pid` once started."""

    name = ""
    title = ""

    def __init__(self, workdir):
        self.workdir = Path(tempfile.mkdtemp(prefix=f"{self.name}-", dir=workdir))
        self.proc = None
        self.port = None
        self.info = {}

    @property
    def pid(self):
        return self.proc.pid

    @property
    def url(self):
        return f"http://{HOST}:{self.port}/"

    def start(self, argv, **kw):
        """Start `argv` pinned to the server's CPU, logging to server.log."""
        self.proc = Proc(pinned(SERVER_CPU, argv), log_path=self.workdir / "server.log", **kw)

    def __exit__(self, *exc):
        if self.proc is not None:
            self.proc.stop()
        return False


class AccManServer(Server):
    name, title = "accman", "AccMan"
    READY_RE = re.compile(r"http://127\.0\.0\.1:(\d+)")

    def __init__(self, workdir, repo=REPO_DIR, args=()):
        super().__init__(workdir)
        self.repo = Path(repo)       # bench/ab.py serves other revisions' checkouts
        self.args = list(args)       # more flags of `accman serve` (bench/ab.py)

    def __enter__(self):
        env = dict(os.environ, PYTHONPATH=str(self.repo))
        self.start([PYTHON, "-m", "accman", "serve", "--host", HOST, "--port", "0",
                    "--data", str(self.workdir / "data"), *self.args],
                   stdout_pipe=True, cwd=self.repo, env=env)
        lines = queue.Queue()

        def read_stdout(stream):
            # Kept draining after the ready line so that the server never
            # blocks on a full pipe.
            for raw in iter(stream.readline, b""):
                lines.put(raw.decode(errors="replace"))
            lines.put(None)

        threading.Thread(target=read_stdout, args=(self.proc.popen.stdout,), daemon=True).start()
        deadline = time.monotonic() + START_TIMEOUT_S
        line = self._ready_line(lines, deadline)
        self.port = int(self.READY_RE.search(line).group(1))
        wait_port(self.proc, self.port, deadline)
        self.info = {"ready_line": line.strip()}
        return self

    def _ready_line(self, lines, deadline):
        while True:
            try:
                line = lines.get(timeout=max(0.0, deadline - time.monotonic()))
            except queue.Empty:
                raise BenchError(f"no ready line after {START_TIMEOUT_S} s") from None
            if line is None:
                self.proc.popen.wait(STOP_TIMEOUT_S)
                raise BenchError(f"exited with {self.proc.popen.returncode}: "
                                 f"{self.proc.log_tail()}")
            if self.READY_RE.search(line):
                return line


class _PythonAppServer(Server):
    """A Python server of bench/ given --host, --port and --data."""

    script = ""

    def __enter__(self):
        self.port = free_port()
        self.start([PYTHON, str(BENCH_DIR / self.script), "--host", HOST,
                    "--port", str(self.port), "--data", str(self.workdir / "data")],
                   cwd=self.workdir)
        wait_port(self.proc, self.port, time.monotonic() + START_TIMEOUT_S)
        self.info = self.describe()
        return self

    def describe(self):
        return {}


class SketchServer(_PythonAppServer):
    name, title = "sketch", "uvloop+plyvel sketch"
    script = "plyvel_sketch.py"


def uvicorn_http_impl():
    try:
        import httptools  # noqa: F401
        return "httptools"
    except ImportError:
        return "h11"


class UvicornServer(_PythonAppServer):
    name, title = "uvicorn", "uvicorn+starlette+plyvel"
    script = "baseline_app.py"

    def describe(self):
        return {"http": uvicorn_http_impl()}


class NginxServer(Server):
    name, title = "nginx", "nginx static 200"

    def __enter__(self):
        nginx = find_tool("nginx")
        self.port = free_port()
        prefix = str(self.workdir)
        conf = (BENCH_DIR / "nginx.conf.template").read_text()
        conf = conf.replace("@PREFIX@", prefix).replace("@PORT@", str(self.port))
        (self.workdir / "nginx.conf").write_text(conf)
        self.start([nginx, "-p", prefix, "-c", f"{prefix}/nginx.conf",
                    "-e", f"{prefix}/error.log"], cwd=self.workdir)
        wait_port(self.proc, self.port, time.monotonic() + START_TIMEOUT_S)
        self.info = {"version": tool_version([nginx, "-v"])}
        return self


# Redis as the durable precedent: every write appended to its append-only
# file and fsync'd before the reply (`appendfsync always`), no snapshots,
# loopback only, its files in the run's temporary directory.
REDIS_CONF = """\
bind {host}
port {port}
dir {dir}
daemonize no
protected-mode yes
appendonly yes
appendfsync always
save ""
logfile {dir}/redis.log
"""


class RedisServer(Server):
    name, title = "redis", "Redis AOF always"

    def __enter__(self):
        redis = find_tool("redis-server")
        find_tool("redis-benchmark")
        self.port = free_port()
        conf = self.workdir / "redis.conf"
        conf.write_text(REDIS_CONF.format(host=HOST, port=self.port, dir=self.workdir))
        self.start([redis, str(conf)], cwd=self.workdir)
        wait_port(self.proc, self.port, time.monotonic() + START_TIMEOUT_S)
        self.info = {"version": tool_version([redis, "--version"])}
        return self

    def command(self, *args):
        """One RESP command on a fresh connection; the raw reply."""
        payload = b"*%d\r\n" % len(args) + b"".join(
            b"$%d\r\n%s\r\n" % (len(a), a) for a in (x.encode() for x in args))
        with socket.create_connection((HOST, self.port), timeout=5) as s:
            s.sendall(payload)
            return s.recv(4096)


SERVER_KINDS = {cls.name: cls for cls in
                (AccManServer, SketchServer, UvicornServer, NginxServer, RedisServer)}
