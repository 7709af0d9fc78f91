"""bench/log_sketch.py's own behaviour, never its timings: it answers each
mod with the new balance and anything else with 404, in the order asked,
and only once the records before it are written (in process, with the
records completed out of order); each mod's record is in its file; the
records wrap at the end of the file, which the append layout empties
first; each layout is opened O_DIRECT|O_DSYNC, the written one over
zeros; a failed write or a batch too large for the file stops it,
named; a bad argument is refused naming it."""

import fcntl
import os
import select
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

import pytest

BENCH = Path(__file__).resolve().parents[1] / "bench"
SCRIPT = BENCH / "log_sketch.py"
sys.path.insert(0, str(BENCH))

import log_sketch  # noqa: E402
from harness import disk  # noqa: E402

START_TIMEOUT_S = 20.0
REPLY_TIMEOUT_S = 10.0


# --- the sketch as a process ---------------------------------------------------------

def start(tmp_path, *args):
    """The sketch on a port of its choosing; (process, port)."""
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--port", "0",
                             "--file", str(tmp_path / "log"), "--size-mib", "1", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    ready, _, _ = select.select([proc.stderr], [], [], START_TIMEOUT_S)
    if not ready:
        proc.kill()
        pytest.fail(f"the sketch did not say it listens within {START_TIMEOUT_S} s")
    line = proc.stderr.readline()
    assert "listening on 127.0.0.1:" in line, line + proc.stderr.read()
    return proc, int(line.rsplit(":", 1)[1])


def stop(proc):
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.communicate(timeout=START_TIMEOUT_S)[1]
    except subprocess.TimeoutExpired:
        proc.kill()
        raise


def read_replies(sock, n):
    """n replies of the sketch's one shape: status line, length, body."""
    data, replies = b"", []
    while len(replies) < n:
        chunk = sock.recv(65536)
        assert chunk, f"closed after {replies}"
        data += chunk
        while (end := data.find(b"\r\n\r\n")) >= 0:
            head = data[:end]
            length = int(head.rsplit(b"content-length: ", 1)[1])
            if len(data) < end + 4 + length:
                break
            replies.append((head.split(b" ", 2)[1], data[end + 4:end + 4 + length]))
            data = data[end + 4 + length:]
    return replies


@pytest.mark.parametrize("layout, writers",
                         [("written", "2"), ("unwritten", "1"), ("append", "1")])
def test_each_request_is_answered_in_order_and_each_mod_is_in_the_file(tmp_path, layout, writers):
    proc, port = start(tmp_path, "--layout", layout, "--writers", writers)
    try:
        asked = [(b"a", 5), (b"a", -2), (b"b", 7), (b"a", 10)] * 5
        with socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S) as sock:
            sock.sendall(b"".join(b"PATCH /mod?cred=%s&by=%d&min=0 HTTP/1.1\r\nhost: x\r\n\r\n"
                                  % mod for mod in asked) + b"GET /tot?cred=a HTTP/1.1\r\n\r\n")
            replies = read_replies(sock, len(asked) + 1)
            log = (tmp_path / "log").read_bytes()
    finally:
        err = stop(proc)
    balances, expected = {}, []
    for cred, by in asked:
        balances[cred] = balances.get(cred, 0) + by
        expected.append((b"200", b"%d" % balances[cred]))
        assert b"%s %d %d\n" % (cred, by, balances[cred]) in log, "a mod's record is missing"
    assert replies == expected + [(b"404", b"")]
    assert proc.returncode == 0, err
    assert f" records, {len(asked)} mods (" in err, err


@pytest.mark.parametrize("layout", ["written", "unwritten", "append"])
def test_each_layout_wraps_at_the_end_of_its_file_end_to_end(tmp_path, layout):
    """One mod at a time, so that each is a record of one block: a 1 MiB
    file holds 256, and the 257th starts the next lap at 0."""
    block = log_sketch.BLOCK_BYTES
    proc, port = start(tmp_path, "--layout", layout)
    mods = (1 << 20) // block + 44
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=REPLY_TIMEOUT_S) as sock:
            for i in range(mods):
                sock.sendall(b"PATCH /mod?cred=w&by=1 HTTP/1.1\r\n\r\n")
                assert read_replies(sock, 1) == [(b"200", b"%d" % (i + 1))]
            log = (tmp_path / "log").read_bytes()
    finally:
        err = stop(proc)
    assert proc.returncode == 0, err
    assert f"{mods} records, {mods} mods (1.0 a record), 1 laps" in err, err
    size = 44 * block if layout == "append" else 1 << 20
    assert len(log) == size, "append empties the file for its next lap; the others keep it"
    assert log[:block].startswith(b"w 1 257\n"), "the 257th record is written at 0"
    assert log[43 * block:].startswith(b"w 1 %d\n" % mods), "the last record is the lap's 44th"


@pytest.mark.parametrize("layout", ["written", "unwritten", "append"])
def test_each_layout_is_opened_direct_and_dsync(tmp_path, layout):
    fd = log_sketch.open_log(str(tmp_path / "log"), 1 << 20, layout)
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
    finally:
        os.close(fd)
    assert flags & os.O_DIRECT and flags & os.O_DSYNC == os.O_DSYNC, oct(flags)


def test_a_bad_argument_is_refused_by_name(tmp_path):
    for args, named in ((("--writers", "3"), "--writers must be from 1 to 2, not 3"),
                        (("--size-mib", "0"), "--size-mib must be from 1 to 65536, not 0"),
                        (("--port", "70000"), "--port must be from 0 to 65535, not 70000"),
                        (("--layout", "zeros"), "--layout: invalid choice: 'zeros'"),
                        (("--layout", "append", "--writers", "2"),
                         "--layout append takes --writers 1"),
                        (("--file", str(tmp_path / "no" / "log")),
                         f"--file {tmp_path / 'no' / 'log'}: its directory does not exist")):
        argv = [sys.executable, str(SCRIPT), "--port", "0", "--file", str(tmp_path / "log"),
                *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        assert done.returncode == 2, (args, done.stderr)
        assert named in done.stderr, (args, done.stderr)
    assert list(tmp_path.iterdir()) == [], "a refused start wrote nothing"


# --- the group commit in process, its records completed by hand ----------------------

class Loop:
    """What Commit asks of a loop: call_soon (run by `turn`) and stop."""

    def __init__(self):
        self.soon, self.stopped = [], False

    def call_soon(self, f, *args):
        self.soon.append((f, args))

    def stop(self):
        self.stopped = True

    def turn(self):
        soon, self.soon = self.soon, []
        for f, args in soon:
            f(*args)


class Transport:
    def __init__(self, told):
        self.told = told

    def is_closing(self):
        return False

    def write(self, reply):
        self.told.append(reply)


class Records:
    """A log that keeps what is put, for the test to complete."""

    def __init__(self, size=1 << 20):
        self.size, self.laps, self.put_seqs = size, 0, []

    def fits(self, payload):
        return 0 < log_sketch.span_of(payload) <= self.size

    def put(self, seq, payload):
        self.put_seqs.append(seq)


def commit_of(in_flight, size=1 << 20):
    loop = Loop()
    commit = log_sketch.Commit(loop, in_flight)
    commit.log = Records(size)
    return loop, commit


def test_replies_wait_for_every_record_before_theirs():
    loop, commit = commit_of(in_flight=2)
    told = []
    a, b = Transport(told), Transport(told)
    commit.add(a, b"a 1 1\n", b"r1")
    commit.add(b, b"", b"404")          # not a mod: still told after r1
    loop.turn()
    commit.add(a, b"a 1 2\n", b"r2")
    loop.turn()
    commit.add(b, b"b 1 1\n", b"r3")
    loop.turn()
    assert commit.log.put_seqs == [0, 1], "more than two records in flight"
    commit.written(1, 0.001)            # the second record first: nothing may be told
    assert told == []
    assert commit.log.put_seqs == [0, 1], "room is made by records told, not written"
    commit.written(0, 0.002)
    assert told == [b"r1", b"404", b"r2"]
    assert commit.log.put_seqs == [0, 1, 2], "what queued is sealed once there is room"
    commit.written(2, 0.001)
    assert told == [b"r1", b"404", b"r2", b"r3"]
    assert (commit.records, commit.mods) == (3, 3)
    assert "3 records, 3 mods (1.0 a record)" in commit.report()


def test_a_batch_too_large_for_the_log_stops_it_unanswered():
    loop, commit = commit_of(in_flight=1, size=log_sketch.BLOCK_BYTES)
    told = []
    for i in range(log_sketch.BLOCK_BYTES // 8 + 1):
        commit.add(Transport(told), b"c %5d\n" % i, b"r")
    loop.turn()
    assert loop.stopped and "does not fit in the log's 4096: give a larger --size-mib" \
        in commit.error
    assert told == [] and commit.log.put_seqs == []


def test_records_wrap_at_the_end_of_the_file():
    log = log_sketch.Log(-1, 3 * log_sketch.BLOCK_BYTES, None, None, None)
    for seq, size in enumerate((10, 5000, 10, 10)):
        log.put(seq, b"x" * size)
    places = [log.jobs.get()[2] for _ in range(4)]
    block = log_sketch.BLOCK_BYTES
    assert places == [0, block, 0, block] and log.laps == 1


class Threadsafe:
    """What a writer thread asks of the loop, kept for the test."""

    def __init__(self):
        self.calls = []
        self.told = threading.Event()

    def call_soon_threadsafe(self, f, *args):
        self.calls.append((f, args))
        self.told.set()


def test_the_written_layout_is_zeros_over_the_whole_size_of_the_file(tmp_path):
    path = tmp_path / "log"
    path.write_bytes(b"an older log" * 700_000)      # replaced, longer than asked
    size = 2 * disk.ZERO_CHUNK_BYTES + disk.BLOCK_BYTES     # whole chunks and a part
    os.close(log_sketch.open_log(str(path), size, "written"))
    assert path.read_bytes() == bytes(size)


def test_the_append_layout_empties_the_file_before_its_next_lap(tmp_path):
    block = log_sketch.BLOCK_BYTES
    fd = log_sketch.open_log(str(tmp_path / "log"), 2 * block, "append")
    loop, written = Threadsafe(), []
    log = log_sketch.Log(fd, 2 * block, loop, written.append, None, append=True)
    try:
        assert os.fstat(fd).st_size == 0, "the file starts empty"
        for seq, payload in enumerate((b"first\n", b"second\n", b"third\n")):
            log.put(seq, payload)
        threading.Thread(target=log.write_records, daemon=True).start()
        while len(loop.calls) < 3:
            assert loop.told.wait(REPLY_TIMEOUT_S), f"written: {loop.calls}"
            loop.told.clear()
        content = (tmp_path / "log").read_bytes()     # fd is O_DIRECT: not for pread
    finally:
        os.close(fd)
    assert [f for f, _ in loop.calls] == [written.append] * 3, loop.calls
    assert log.laps == 1
    assert len(content) == block, "the second lap starts from an empty file"
    assert content.startswith(b"third\n") and b"second" not in content


def test_a_failed_write_is_told_to_the_loop():
    loop = Threadsafe()
    failures = []
    log = log_sketch.Log(-1, 1 << 20, loop, None, failures.append)   # fd -1: EBADF
    log.put(0, b"a 1 1\n")
    writer = threading.Thread(target=log.write_records, daemon=True)
    writer.start()
    writer.join(REPLY_TIMEOUT_S)
    assert not writer.is_alive(), "the writer goes on after a failed write"
    assert [(f, args[0].split(":")[0]) for f, args in loop.calls] == [(failures.append, "OSError")]
