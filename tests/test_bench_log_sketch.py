"""bench/log_sketch.py's own behaviour, never its timings: it answers each
mod with the new balance and anything else with 404, in the order asked,
and each mod's record is in its file, on each layout and with one or two
writers; it reports what it wrote when stopped; a bad argument is
refused naming it."""

import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest

SCRIPT = Path(__file__).resolve().parents[1] / "bench" / "log_sketch.py"
START_TIMEOUT_S = 20.0
REPLY_TIMEOUT_S = 10.0


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start(tmp_path, *args):
    port = free_port()
    proc = subprocess.Popen([sys.executable, str(SCRIPT), "--port", str(port),
                             "--file", str(tmp_path / "log"), "--size-mib", "1", *args],
                            stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    line = proc.stderr.readline()       # written once it listens (or its error)
    assert "listening" in line, line + proc.stderr.read()
    return proc, port


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


@pytest.mark.parametrize("layout, writers", [("written", "2"), ("unwritten", "1")])
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
        proc.send_signal(signal.SIGTERM)
        _, err = proc.communicate(timeout=START_TIMEOUT_S)
    balances, expected = {}, []
    for cred, by in asked:
        balances[cred] = balances.get(cred, 0) + by
        expected.append((b"200", b"%d" % balances[cred]))
        assert b"%s %d %d\n" % (cred, by, balances[cred]) in log, "a mod's record is missing"
    assert replies == expected + [(b"404", b"")]
    assert proc.returncode == 0, err
    records = int(err.split("log sketch: ", 1)[1].split(" records")[0])
    assert 1 <= records <= len(asked), err


def test_a_bad_argument_is_refused_by_name(tmp_path):
    for args, named in ((("--writers", "3"), "--writers must be from 1 to 2, not 3"),
                        (("--size-mib", "0"), "--size-mib must be from 1 to 65536, not 0"),
                        (("--layout", "zeros"), "--layout: invalid choice: 'zeros'"),
                        (("--file", str(tmp_path / "no" / "log")),
                         f"--file {tmp_path / 'no' / 'log'}: its directory does not exist")):
        argv = [sys.executable, str(SCRIPT), "--port", "1", "--file", str(tmp_path / "log"), *args]
        done = subprocess.run(argv, capture_output=True, text=True, timeout=START_TIMEOUT_S)
        assert done.returncode == 2, (args, done.stderr)
        assert named in done.stderr, (args, done.stderr)
    assert list(tmp_path.iterdir()) == [], "a refused start wrote nothing"
