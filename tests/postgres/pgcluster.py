"""Real PostgreSQL servers for the tests and the benchmarks, from Debian's
binaries: under root, `initdb` and `pg_ctl` run as the `postgres` user
(PostgreSQL refuses to run as root) in a temporary directory chowned to
it; under another user, as that user in a directory it owns.  Each server
is on a free loopback port; `pg_basebackup` makes a streaming standby.

    with Cluster.create() as pg:                 # initdb + start
        url = pg.url("postgres")
        standby = pg.add_standby("s1", sync=True)  # synchronous_standby_names
        pg.kill()                                # SIGKILL the postmaster
        standby.promote()

Every server listens on 127.0.0.1 only, runs with `synchronous_commit=on`
and `fsync=on` (what a durable 200 means), and trusts local connections
(the directory is private to the test run).  Its directory is made under
PARENT_DIR: the disk by default (the benchmarks'), memory for the test
suite where there is room (suite_parent_dir).
"""

from __future__ import annotations

import atexit
import contextlib
import fcntl
import glob
import os
import pwd
import random
import re
import shutil
import signal
import socket
import subprocess
import tempfile
import time
from pathlib import Path

PG_USER = "postgres"
# Where each cluster's directory is made (tempfile's `dir`); None is the
# system's temporary directory, where the benchmarks' clusters are made, to
# be measured beside pgbench on the same file system.  The test suite sets
# it (tests/conftest.py, suite_parent_dir).
PARENT_DIR: str | None = None
# The suite's clusters are in memory where it has room: what the suite
# tests of PostgreSQL is what outlives its processes (SIGKILL, immediate
# stops, failover), which memory keeps as a disk does; what outlives the
# machine is fsync's, kept on, and no test can cut the power.  The room is
# a whole run's clusters at their largest; ACCMAN_TEST_PG_DIR chooses.
MEMORY_DIR = "/dev/shm"
MEMORY_FREE_MIN_BYTES = 8 << 30
# A directory's name: DIR_PREFIX, its kind, and tempfile's 8 characters.
DIR_PREFIX = "accman-pg-"
DIR_NAME_BYTES = len(DIR_PREFIX + "initdb-") + 8
SOCKET_PATH_BYTES_MAX = 107         # Linux's sun_path, less its terminating 0
# Debian's layout: /usr/lib/postgresql/<major>/bin.  15 is what the issue
# names; a newer major works too.
PG_BIN_GLOB = "/usr/lib/postgresql/*/bin"
START_TIMEOUT_S = 60
STOP_TIMEOUT_S = 60

# What every test server runs with.  Small shared memory (many servers may
# run at once on a 2-core, shared machine), replication on for standbys,
# durability as in production.
BASE_CONF = {
    "listen_addresses": "'127.0.0.1'",
    "max_connections": "200",
    "shared_buffers": "'128MB'",
    "synchronous_commit": "on",
    "fsync": "on",
    "full_page_writes": "on",
    "wal_level": "replica",
    "max_wal_senders": "8",
    "max_replication_slots": "8",
    "hot_standby": "on",
    "wal_keep_size": "'256MB'",
    "log_min_messages": "warning",
    "logging_collector": "off",
    "max_locks_per_transaction": "256",
}


def pg_bin() -> Path:
    """The newest installed PostgreSQL's bin directory."""
    found = sorted(glob.glob(PG_BIN_GLOB), key=lambda p: int(p.split("/")[-2]))
    if not found:
        raise RuntimeError("PostgreSQL's server binaries are not installed "
                           "(Debian: apt-get install postgresql)")
    return Path(found[-1])


# The clusters' ports are taken below the kernel's ephemeral ports, which
# the servers the tests start on port 0 are given, so that a port found
# free stays free while its cluster is made, or stopped and started again.
# Each is claimed for the life of the process that found it (an abstract
# Unix socket named after it: no file, gone with the process), so that
# another worker, or another run on the machine, never takes it too.
PORTS_FIRST = 20000
_claims: list[socket.socket] = []


def claim(name: str) -> socket.socket | None:
    """Claims `name` for the life of this process (tests/postgres/netns.py
    claims its subnets so too), or None if another process holds it."""
    sock = socket.socket(socket.AF_UNIX)
    try:
        sock.bind(f"\0accman-tests-{name}")
    except OSError:
        sock.close()
        return None
    _claims.append(sock)
    return sock


def release(sock: socket.socket) -> None:
    _claims.remove(sock)
    sock.close()


def free_port() -> int:
    last = _ephemeral_first() - 1
    span = last - PORTS_FIRST + 1
    if span <= 0:
        raise RuntimeError(f"the kernel's ephemeral ports begin at {last + 1}, not above "
                           f"{PORTS_FIRST}: no ports for the test clusters")
    start = random.randrange(span)
    for k in range(span):
        port = PORTS_FIRST + (start + k) % span
        held = claim(f"port-{port}")
        if held is None:
            continue                # claimed by another test process
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                release(held)
                continue            # taken by another program
        return port
    raise RuntimeError(f"no free port in {PORTS_FIRST}..{last}")


def _ephemeral_first() -> int:
    try:
        with open("/proc/sys/net/ipv4/ip_local_port_range") as f:
            return int(f.read().split()[0])
    except (OSError, ValueError, IndexError):
        return 32768


def suite_parent_dir() -> str | None:
    """Where the test suite makes its clusters: ACCMAN_TEST_PG_DIR if set
    (checked: PostgreSQL must be able to use it), else MEMORY_DIR if it is
    a tmpfs with MEMORY_FREE_MIN_BYTES free and as much memory available,
    and we are root, else None.  MEMORY_DIR's orphans are removed first:
    they would count against the room.  Not as another user: systemd's
    logind removes a user's files there at the user's last logout
    (RemoveIPC), in the middle of a run under nohup or tmux."""
    chosen = os.environ.get("ACCMAN_TEST_PG_DIR")
    if chosen:
        return _checked_parent(chosen)
    if os.geteuid() != 0 or not os.path.isdir(MEMORY_DIR):
        return None
    remove_orphans(Path(MEMORY_DIR))
    room = MEMORY_FREE_MIN_BYTES
    return MEMORY_DIR if in_memory(MEMORY_DIR, room) and _memory_available() >= room else None


def _checked_parent(path: str) -> str:
    """ACCMAN_TEST_PG_DIR, absolute; ValueError naming what is wrong.  A
    cluster's Unix socket is made in its directory (DIR_NAME_BYTES under
    `path`), and a socket's path is at most SOCKET_PATH_BYTES_MAX."""
    path = os.path.abspath(path)
    longest = len(path) + 1 + DIR_NAME_BYTES + len("/.s.PGSQL.65535")
    if not os.path.isdir(path):
        raise ValueError(f"ACCMAN_TEST_PG_DIR: {path} is not a directory")
    if longest > SOCKET_PATH_BYTES_MAX:
        raise ValueError(f"ACCMAN_TEST_PG_DIR: {path} is too long: the clusters' Unix "
                         f"sockets under it would need {longest} bytes, past "
                         f"{SOCKET_PATH_BYTES_MAX}")
    return path


def in_memory(path: str, free_min: int) -> bool:
    """Whether `path` is a tmpfs this process may write, with at least
    `free_min` bytes free in it."""
    try:
        st = os.statvfs(path)
    except OSError:
        return False
    return (_fs_type(path) == "tmpfs" and os.access(path, os.W_OK | os.X_OK)
            and st.f_bavail * st.f_frsize >= free_min)


def _memory_available() -> int:
    """The kernel's estimate of the memory available (MemAvailable); 0 when
    unknown.  A tmpfs's free space may be more than that."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return 0


def _fs_type(path: str) -> str | None:
    """The type of the file system that holds `path` (its mount's, the
    longest mount point above it), or None if the mounts cannot be read."""
    real = os.path.realpath(path)
    found, kind = "", None
    try:
        with open("/proc/self/mounts") as f:
            mounts = [line.split()[1:3] for line in f]
    except OSError:
        return None
    for point, fstype in mounts:
        # The table writes a space, tab, newline and backslash as octal.
        point = re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), point)
        above = real == point or real.startswith(point.rstrip("/") + "/")
        if above and len(point) >= len(found):
            found, kind = point, fstype
    return kind


# Each directory made here holds OWNER_NAME, locked (flock) by the process
# that made it for as long as it lives: a directory whose lock can be
# taken is an orphan.  A lock, not a pid: a pid is reused, and names
# another process in another pid namespace sharing the directory.
OWNER_NAME = ".owner"
_owned: dict[Path, int] = {}
_swept = False


def make_dir(kind: str = "") -> Path:
    """A new directory under PARENT_DIR, owned by this process.  The first
    one a process makes removes the orphans there first (a run killed
    before its clean-up): in memory they would hold their room until the
    machine restarts.  A postmaster of such a run, still up, shuts down
    once its lock file is gone (PostgreSQL looks every minute)."""
    global _swept
    if not _swept:
        _swept = True
        remove_orphans(Path(PARENT_DIR or tempfile.gettempdir()))
    d = Path(tempfile.mkdtemp(prefix=f"{DIR_PREFIX}{kind}", dir=PARENT_DIR))
    # Locked before it has its name: a sweeper that finds it finds it held.
    fd = os.open(d / (OWNER_NAME + ".tmp"), os.O_RDONLY | os.O_CREAT, 0o644)
    fcntl.flock(fd, fcntl.LOCK_EX)
    os.rename(d / (OWNER_NAME + ".tmp"), d / OWNER_NAME)
    _owned[d] = fd
    return d


def remove_dir(d: Path) -> None:
    """Removes a directory make_dir made, then gives up its ownership."""
    shutil.rmtree(d, ignore_errors=True)
    fd = _owned.pop(d, None)
    if fd is not None:
        os.close(fd)


def remove_orphans(parent: Path) -> list[str]:
    """Removes the directories under `parent` that make_dir made for a
    process that has ended; returns the names of those removed.  One with
    no OWNER_NAME (being made, or not make_dir's) is left alone."""
    gone = []
    for d in parent.glob(DIR_PREFIX + "*"):
        try:
            fd = os.open(d / OWNER_NAME, os.O_RDONLY)
        except OSError:
            continue
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError:
            continue                # its maker lives
        else:
            shutil.rmtree(d, ignore_errors=True)
        finally:
            os.close(fd)
        if not d.exists():
            gone.append(d.name)
    return gone


def _chown_tree(path: Path) -> None:
    """The tree given to the postgres user, as whom root runs the binaries
    (_as_postgres).  Another user runs them as itself, owns the tree
    already, and may not give it away."""
    if os.geteuid() != 0:
        return
    pw = pwd.getpwnam(PG_USER)
    for root, dirs, files in os.walk(path):
        for name in dirs + files:
            os.chown(os.path.join(root, name), pw.pw_uid, pw.pw_gid)
    os.chown(path, pw.pw_uid, pw.pw_gid)


def _as_postgres(args: list, **kw) -> subprocess.CompletedProcess:
    """Runs a PostgreSQL binary as the postgres user (runuser when we are
    root, directly otherwise)."""
    cmd = [str(pg_bin() / args[0]), *args[1:]]
    if os.geteuid() == 0:
        cmd = ["runuser", "-u", PG_USER, "--", *cmd]
    return _run(cmd, **kw)


class CommandFailed(subprocess.CalledProcessError):
    """A command that failed, said with what it wrote to stderr (PostgreSQL's
    own words: a full disk, a socket path too long), not its status alone."""

    def __str__(self) -> str:
        said = (self.stderr or "").strip()[-STDERR_CHARS_MAX:]
        return f"{super().__str__()}: {said}"


STDERR_CHARS_MAX = 4000         # the end of a failed command's stderr, in its error


def _run(cmd: list, **kw) -> subprocess.CompletedProcess:
    try:
        return subprocess.run(cmd, check=True, capture_output=True, text=True, **kw)
    except subprocess.CalledProcessError as e:
        raise CommandFailed(e.returncode, e.cmd, e.output, e.stderr) from None


# initdb's own work (its bootstrap: ~1.7 s of CPU on these machines, more
# than the rest of a cluster's start) is done once per process: each
# cluster's directory is a copy of one that initdb made, as it left it,
# before the cluster's own settings are added.  The copies share initdb's
# system identifier, as clones of one directory do in production (AccMan
# tells such clusters apart: accman/postgres/migrate.py, _PLACE_SQL).
_made_once: Path | None = None


def _initdb(data: Path) -> None:
    """`data` made as initdb makes a cluster's directory."""
    global _made_once
    if _made_once is None:
        base = make_dir("initdb-")
        os.chmod(base, 0o755)
        _chown_tree(base)
        atexit.register(remove_dir, base)
        _as_postgres(["initdb", "-D", str(base / "data"), "-U", PG_USER, "--auth=trust",
                      "--no-instructions", "-E", "UTF8", "--locale=C"])
        _made_once = base / "data"
    # cp -a keeps the files' owner (the postgres user's, under root) and modes.
    _run(["cp", "-a", str(_made_once), str(data)])


def _memory_conf(base: Path) -> dict:
    """A cluster kept in memory keeps its dynamic shared memory in its own
    directory (pg_dynshmem), removed with it: the POSIX segments of the
    default outlive a server that a test kills with SIGKILL, in /dev/shm,
    for good.  On a disk, the default: there mmap's files would be written
    back (PostgreSQL's documentation advises against it)."""
    return {"dynamic_shared_memory_type": "mmap"} if _fs_type(str(base)) == "tmpfs" else {}


# Where Linux lists its System V shared memory segments.
SYSV_SHM_LIST = "/proc/sysvipc/shm"
# How long a killed postmaster's backends may take to see it gone and end.
KILLED_BACKENDS_END_S = 10


def _lock_file_segment(data: Path) -> tuple[int, int] | None:
    """The System V segment (key, id) the postmaster's lock file names (its
    seventh line), or None: no lock file (a clean or immediate stop
    removes it), or none named."""
    try:
        key, shmid = (data / "postmaster.pid").read_text().splitlines()[6].split()
        return int(key), int(shmid)
    except (OSError, IndexError, ValueError):
        return None


def _lock_file_pid(data: Path) -> int | None:
    """The postmaster's pid, the lock file's first line; None without one."""
    try:
        return int((data / "postmaster.pid").read_text().split()[0])
    except (OSError, ValueError, IndexError):
        return None


def _attached(key: int, shmid: int) -> int | None:
    """How many processes the segment has attached; None once it is gone
    (or its id now names another key's)."""
    try:
        with open(SYSV_SHM_LIST) as f:
            rows = [line.split() for line in f.readlines()[1:]]
    except OSError:
        return None
    for row in rows:
        # PostgreSQL writes the key unsigned, /proc signed: compared as 32 bits.
        if int(row[1]) == shmid and int(row[0]) % 2**32 == key % 2**32:
            return int(row[6])
    return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def remove_killed_segment(data: Path, timeout_s: float = KILLED_BACKENDS_END_S) -> None:
    """A postmaster killed with SIGKILL leaves the small System V segment
    its lock file names, which only a later start in the same directory
    removes: a run of the suite left dozens, and each holds one of the
    machine's SHMMNI ids until it restarts.  Removed once its backends have
    ended (nothing attached); one still attached at the timeout, or whose
    postmaster lives (a stop that failed), is left, as it is where
    `ipcrm` is missing."""
    seg = _lock_file_segment(data)
    pid = _lock_file_pid(data)
    if seg is None or pid is None or _alive(pid):
        return
    deadline = time.monotonic() + timeout_s
    while (n := _attached(*seg)) and time.monotonic() < deadline:
        time.sleep(0.05)
    if n == 0:
        with contextlib.suppress(OSError):
            subprocess.run(["ipcrm", "-m", str(seg[1])], capture_output=True, check=False)


class Cluster:
    """One PostgreSQL server (a primary or a standby) in `base/name`."""

    def __init__(self, base: Path, name: str, port: int, owns_base: bool = False):
        self.base = base
        self.name = name
        self.port = port
        self.data = base / name
        self.log = base / f"{name}.log"
        self.owns_base = owns_base
        self.standbys: list[Cluster] = []
        self.killed = False             # by kill(), and not started since

    # -- making and starting -------------------------------------------------

    @classmethod
    def create(cls, name: str = "primary", base: Path | None = None,
               conf: dict | None = None, start: bool = True) -> "Cluster":
        """A new cluster, as initdb makes it (_initdb), started unless not
        `start`."""
        owns = base is None
        if base is None:
            # Not under pytest's tmp_path: that is private to root and the
            # postgres user could not reach it.
            base = make_dir()
            os.chmod(base, 0o755)
            _chown_tree(base)
        c = cls(base, name, free_port(), owns_base=owns)
        try:
            _initdb(c.data)
            c.configure({**BASE_CONF, **_memory_conf(base), "port": str(c.port),
                         "unix_socket_directories": f"'{base}'", **(conf or {})})
            with open(c.data / "pg_hba.conf", "a") as f:
                f.write("host replication all 127.0.0.1/32 trust\n")
            if start:
                c.start()
        except BaseException:
            c.destroy()         # its directory too, if it made it
            raise
        return c

    def configure(self, settings: dict) -> None:
        """Appends settings to postgresql.auto.conf's neighbour (the last
        one read wins); takes effect at the next start or reload."""
        with open(self.data / "postgresql.conf", "a") as f:
            for k, v in settings.items():
                f.write(f"{k} = {v}\n")

    def trust(self, subnet: str) -> None:
        """Lets clients from `subnet` (besides loopback) in without a
        password, at the next start or reload."""
        with open(self.data / "pg_hba.conf", "a") as f:
            f.write(f"host all all {subnet} trust\n")

    def start(self) -> None:
        """Starts the server; a failure says why in the server's own words,
        which pg_ctl leaves in the log."""
        self.killed = False
        try:
            _as_postgres(["pg_ctl", "-D", str(self.data), "-l", str(self.log), "-w",
                          "-t", str(START_TIMEOUT_S), "start"])
        except CommandFailed as e:
            try:
                log = self.log.read_text(errors="replace")
            except OSError as read_error:
                log = f"(its log could not be read: {read_error})"
            e.stderr = f"{e.stderr or ''}\n{self.log}:\n{log[-STDERR_CHARS_MAX:]}"
            raise

    def stop(self, mode: str = "fast") -> None:
        if self.killed:
            return      # pg_ctl would signal whatever has the killed postmaster's pid now
        with contextlib.suppress(subprocess.CalledProcessError):
            _as_postgres(["pg_ctl", "-D", str(self.data), "-m", mode, "-w",
                          "-t", str(STOP_TIMEOUT_S), "stop"])

    def reload(self) -> None:
        _as_postgres(["pg_ctl", "-D", str(self.data), "reload"])

    @property
    def pid(self) -> int | None:
        return _lock_file_pid(self.data)

    def kill(self) -> None:
        """SIGKILL the postmaster, as a machine or process crash would; its
        backends notice and exit (they do not finish their work)."""
        pid = self.pid
        if pid is None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.kill(pid, signal.SIGKILL)
        self.killed = True
        deadline = time.monotonic() + STOP_TIMEOUT_S
        while time.monotonic() < deadline:
            try:
                os.kill(pid, 0)
            except ProcessLookupError:
                break
            time.sleep(0.02)
        # The backends exit when they see the postmaster gone; wait until
        # none answers on the port.
        while time.monotonic() < deadline and self.accepting():
            time.sleep(0.05)

    def accepting(self) -> bool:
        try:
            with socket.create_connection(("127.0.0.1", self.port), timeout=0.2):
                return True
        except OSError:
            return False

    # -- replication -----------------------------------------------------------

    def add_standby(self, name: str, sync: bool = True) -> "Cluster":
        """A streaming standby from pg_basebackup; with `sync` the primary
        waits for it at every commit (synchronous_standby_names)."""
        s = Cluster(self.base, name, free_port())
        _as_postgres(["pg_basebackup", "-h", "127.0.0.1", "-p", str(self.port),
                      "-U", PG_USER, "-D", str(s.data), "-X", "stream",
                      "-c", "fast"])
        # Not `-R`: it writes primary_conninfo to postgresql.auto.conf, which
        # would override the application_name that synchronous_standby_names
        # matches.
        (s.data / "standby.signal").touch()
        _chown_tree(s.data)
        s.configure({"port": str(s.port),
                     "primary_conninfo": f"'host=127.0.0.1 port={self.port} "
                                         f"user={PG_USER} application_name={name}'"})
        s.start()
        self.standbys.append(s)
        if sync:
            names = ",".join(x.name for x in self.standbys)
            self.configure({"synchronous_standby_names": f"'FIRST 1 ({names})'"})
            self.reload()
        return s

    def promote(self) -> None:
        _as_postgres(["pg_ctl", "-D", str(self.data), "-w", "promote"])

    # -- use -----------------------------------------------------------------------

    def url(self, dbname: str = "postgres", host: str = "127.0.0.1") -> str:
        return f"postgresql://{PG_USER}@{host}:{self.port}/{dbname}"

    def psql(self, sql: str, dbname: str = "postgres") -> str:
        """Runs SQL through psql; returns its unaligned output."""
        out = _run(
            [str(pg_bin() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.port), "-U", PG_USER, "-d", dbname,
             "-c", sql])
        return out.stdout.strip()

    def sessions_from(self, addr: str, where: str = "true") -> int:
        """How many of this server's sessions have their client at `addr`
        and match `where` (SQL over pg_stat_activity)."""
        return int(self.psql("SELECT count(*) FROM pg_stat_activity "
                             f"WHERE client_addr = '{addr}' AND {where}"))

    def until_no_sessions_from(self, addr: str, deadline: float) -> None:
        """Until none of this server's sessions has its client at `addr`,
        failing once time.monotonic() passes `deadline`."""
        while (left := self.sessions_from(addr)) > 0:
            assert time.monotonic() < deadline, f"{left} sessions from {addr} stayed"
            time.sleep(0.5)

    def create_database(self, dbname: str) -> str:
        self.psql(f'CREATE DATABASE "{dbname}"')
        return self.url(dbname)

    def destroy(self) -> None:
        """Stops this server and its standbys, removes what a SIGKILL of
        either left in System V memory, and the directory if this cluster
        made it."""
        for s in self.standbys:
            s.stop("immediate")
        self.stop("immediate")
        for c in (*self.standbys, self):
            remove_killed_segment(c.data)
        if self.owns_base:
            remove_dir(self.base)

    def __enter__(self) -> "Cluster":
        return self

    def __exit__(self, *exc) -> None:
        self.destroy()


class CounterLock:
    """A transaction of the test's own, in psql, holding the lock of the
    counter row of the store in `dbname` on `pg`: every write batch takes
    that lock last, so batches wait in the database as they would for a
    stalled disk (reads do not: they take no lock).  `with lock:` holds it
    for the block."""

    def __init__(self, pg: Cluster, dbname: str):
        self.pg = pg
        self.dbname = dbname
        self.psql = None
        self.holder_pid = None

    def hold(self) -> None:
        assert self.psql is None, "already held"
        self.psql = subprocess.Popen(
            [str(pg_bin() / "psql"), "-X", "-q", "-A", "-t", "-v", "ON_ERROR_STOP=1",
             "-h", "127.0.0.1", "-p", str(self.pg.port), "-U", PG_USER, "-d", self.dbname],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
        self.psql.stdin.write("BEGIN;\nSELECT pg_backend_pid();\n"
                              "SELECT 1 FROM accman_counter FOR UPDATE;\n\\echo held\n")
        self.psql.stdin.flush()
        self.holder_pid = int(self.psql.stdout.readline())
        lines = [self.psql.stdout.readline().strip() for _ in range(2)]
        assert lines == ["1", "held"], lines

    def release(self) -> None:
        if self.psql is None:
            return
        self.psql.stdin.write("COMMIT;\n")
        self.psql.stdin.close()
        self.psql.wait(10)
        self.psql = None

    def wait_holding(self, timeout_s: float = 10.0) -> None:
        """Until a write batch waits for the held lock."""
        deadline = time.monotonic() + timeout_s
        sql = (f"SELECT count(*) FROM pg_stat_activity "
               f"WHERE {self.holder_pid} = ANY(pg_blocking_pids(pid))")
        while self.pg.psql(sql, self.dbname) == "0":
            if time.monotonic() > deadline:
                raise AssertionError(f"no commit was held within {timeout_s} s")
            time.sleep(0.01)

    def __enter__(self) -> "CounterLock":
        self.hold()
        return self

    def __exit__(self, *exc) -> None:
        self.release()
