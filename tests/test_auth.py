"""Tokens files and the one token grammar (SPEC "Access"): a token that a
tokens file accepts is one a request can carry, and the reverse."""

import contextlib
import os
import signal
import threading
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from accman.server._wire import Parser
from accman.server.auth import (CHARGE, MINT, READ, TOKEN_CHARS, TOKENS_FILE_BYTES_MAX, Tokens,
                                TokensError)
from conftest import request_bytes

GOOD = "abcdefghijklmnop"


def wire_token(token: str):
    [req] = Parser().feed(b"GET /tot?cred=a HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer "
                          + token.encode("latin-1") + b"\r\n\r\n")
    return req.token


def file_accepts(token: str) -> bool:
    try:
        Tokens.parse(f"read {token}")
    except TokensError:
        return False
    return True


@pytest.mark.parametrize("token,ok", [
    (GOOD, True), (GOOD + "==", True), ("A-._~+/9" * 2, True),
    ("abc=defghijklmnop", False),       # "=" only at the end (RFC 6750 b64token)
    ("=" + GOOD, False), (GOOD + ",", False), (GOOD[:15], False), ("a" * 257, False)])
def test_file_and_wire_agree(token, ok):
    assert file_accepts(token) is ok
    if 16 <= len(token) <= 256:
        assert (wire_token(token) == token.encode()) is ok


@settings(max_examples=300)
@given(st.text(alphabet=TOKEN_CHARS + "=,; \t\"\\é", min_size=16, max_size=40))
def test_one_grammar(token):
    """Within the length bounds, the tokens file and the request parser
    accept exactly the same tokens."""
    if token != token.strip() or " " in token or "\t" in token:
        return          # split into fields by the file format, by the header's OWS
    assert file_accepts(token) == (wire_token(token) == token.encode("latin-1"))


def test_roles_and_errors_name_the_line_not_the_token():
    tokens = Tokens.parse(f"# comment\n\nread,charge {GOOD}\nmint {GOOD}X\n")
    assert tokens.roles(GOOD.encode()) == READ | CHARGE
    assert tokens.roles((GOOD + "X").encode()) == MINT
    assert tokens.roles(b"nope" * 4) == 0 and tokens.roles(None) == 0
    for text, message in [(f"read {GOOD} extra", "line 1: expected"),
                          (f"admin {GOOD}", "line 1: unknown role 'admin'"),
                          (f"read {GOOD}\nread {GOOD}", "line 2: a token appears twice"),
                          ("read abc=defghijklmnop", "may end in one or more ="),
                          (f"read,read {GOOD}", "line 1: the role read is named twice")]:
        with pytest.raises(TokensError, match=message) as e:
            Tokens.parse(text)
        assert "abc=def" not in str(e.value) and GOOD not in str(e.value)


def test_a_tokens_file_that_is_not_utf8_is_said_so_by_its_line(tmp_path):
    """It was `cannot read tokens file F: UnicodeDecodeError`, an exception's
    name for a person to decode."""
    path = tmp_path / "tokens"
    path.write_bytes(f"# roles\nread {GOOD}\n".encode() + b"mint \xff" + GOOD.encode())
    path.chmod(0o600)
    with pytest.raises(TokensError) as e:
        Tokens.load(str(path))
    assert str(e.value) == f"tokens file {path} line 3 is not UTF-8 text"


def test_a_tokens_path_that_is_no_file_or_too_long_is_refused_without_reading_on(tmp_path):
    """`--tokens /dev/zero` read without end (a MemoryError's traceback, or
    the OOM killer); a file over TOKENS_FILE_BYTES_MAX is no tokens file
    either.  A pipe stays a tokens file (`--tokens <(...)`)."""
    with pytest.raises(TokensError) as e:
        Tokens.load("/dev/zero")
    assert str(e.value) == "tokens file /dev/zero is not a regular file"
    big = tmp_path / "tokens"
    big.write_bytes(f"read {GOOD}\n".encode() + b"#" * TOKENS_FILE_BYTES_MAX)
    big.chmod(0o600)
    with pytest.raises(TokensError) as e:
        Tokens.load(str(big))
    assert str(e.value) == (f"tokens file {big} is over TOKENS_FILE_BYTES_MAX "
                            f"({TOKENS_FILE_BYTES_MAX} bytes)")
    at_most = tmp_path / "at_most"
    line = f"read {GOOD}\n".encode()
    at_most.write_bytes(line + b"#" * (TOKENS_FILE_BYTES_MAX - len(line)))
    at_most.chmod(0o600)
    assert Tokens.load(str(at_most)).roles(GOOD.encode()) == READ
    r, w = os.pipe()
    os.write(w, f"mint {GOOD}\n".encode())
    os.close(w)
    try:
        assert Tokens.load(f"/dev/fd/{r}").roles(GOOD.encode()) == MINT
    finally:
        os.close(r)


def test_a_tokens_path_that_is_a_directory_is_refused_and_keeps_no_descriptor(tmp_path):
    """SIGHUP reads the file again for as long as the server runs: each
    refusal closes what it opened."""
    fds = len(os.listdir("/proc/self/fd"))
    for _ in range(3):
        with pytest.raises(TokensError) as e:
            Tokens.load(str(tmp_path), wait=False)
        assert str(e.value) == f"tokens file {tmp_path} is not a regular file"
    assert len(os.listdir("/proc/self/fd")) == fds


# --- reading the tokens file again (SIGHUP) -------------------------------------------------

A_TOKEN = "first-token-0123456789"
B_TOKEN = "second-token-0123456789"


def wait_said(srv, text, timeout_s=10.0):
    deadline = time.monotonic() + timeout_s
    while text not in srv.stderr():
        assert time.monotonic() < deadline, f"never said {text!r}: {srv.stderr()[-500:]}"
        time.sleep(0.02)


@pytest.mark.any_one_store("what is checked is the server's tokens, not the store")
def test_sighup_reads_the_tokens_file_again_and_revokes_at_the_next_request(start_server,
                                                                            tmp_path):
    """A token is revoked or added without a restart: SIGHUP reads the file
    again, all or none; a keep-alive connection's token is checked again
    at its next request."""
    path = tmp_path / "tokens"
    path.write_text(f"read,charge,mint {A_TOKEN}\n")
    path.chmod(0o600)
    srv = start_server(tokens=str(path))
    with srv.connect() as c:
        auth = [("Authorization", f"Bearer {A_TOKEN}")]
        c.send(request_bytes("PATCH", "/mod?cred=h&by=5", auth))
        assert c.response().status == 200
        path.write_text(f"read {B_TOKEN}\n")            # A revoked, B added
        srv.send_signal(signal.SIGHUP)
        wait_said(srv, f"accman: SIGHUP: 1 token read again from {path}")
        c.send(request_bytes("GET", "/tot?cred=h", auth))
        assert c.response().status == 401                 # the same connection
    assert srv.tot("h", token=B_TOKEN) == 5
    assert srv.get("/tot?cred=h", token=A_TOKEN).status == 401
    path.write_text("admin x\n")                          # wrong: nothing taken
    srv.send_signal(signal.SIGHUP)
    wait_said(srv, "accman: SIGHUP: the tokens were not read again, the previous ones stay: "
                   f"{path} line 1: unknown role 'admin'")
    assert srv.tot("h", token=B_TOKEN) == 5
    path.chmod(0o644)                                     # open to others: refused too
    path.write_text(f"read {A_TOKEN}\n")
    srv.send_signal(signal.SIGHUP)
    wait_said(srv, "is open to other users")
    assert srv.get("/tot?cred=h", token=A_TOKEN).status == 401
    assert srv.proc.poll() is None and srv.stop() == 0


@pytest.mark.any_one_store("what is checked is the server's tokens, not the store")
def test_sighup_on_a_named_pipe_that_nothing_writes_leaves_the_server_serving(start_server,
                                                                             tmp_path):
    """A named pipe is a tokens file (read as it is written); read again by
    SIGHUP with no writer, its open waited for one inside the event loop:
    the server stopped answering, SIGTERM included."""
    path = tmp_path / "tokens"
    os.mkfifo(path, 0o600)
    writer = threading.Thread(target=path.write_text, args=(f"read,mint {A_TOKEN}\n",))
    writer.start()
    srv = start_server(tokens=str(path))
    writer.join()
    srv.send_signal(signal.SIGHUP)
    try:
        wait_said(srv, "accman: SIGHUP: the tokens were not read again, the previous ones "
                       f"stay: tokens file {path} is a pipe that nothing writes to", 3)
    finally:
        with contextlib.suppress(OSError):      # ENXIO: no open waits for a writer
            os.close(os.open(path, os.O_WRONLY | os.O_NONBLOCK))   # else the open ends
    assert srv.mod("x", 5, token=A_TOKEN).status == 200 and srv.stop() == 0


@pytest.mark.any_one_store("what is checked is the server's tokens, not the store")
def test_sighup_without_tokens_is_ignored_and_the_server_goes_on(start_server):
    srv = start_server()
    srv.send_signal(signal.SIGHUP)
    wait_said(srv, "accman: SIGHUP: this server has no tokens file to read again; ignored")
    assert srv.mod("x", 5).status == 200 and srv.stop() == 0


def test_the_clients_keep_the_servers_own_401_words_whole(start_server, tmp_path):
    """The calling side puts quoted secrets out of sight, and "Bearer token"
    in AccMan's own 401 is no secret: its words reach the caller whole."""
    from accman.client import AccManSyncClient
    from accman.errors import Unauthorized
    path = tmp_path / "tokens"
    path.write_text(f"read {A_TOKEN}\n")
    path.chmod(0o600)
    srv = start_server(tokens=str(path))
    for token, words in ((None, "this call needs an Authorization: Bearer token"),
                         ("wrong" * 4, "the bearer token is not valid")):
        with AccManSyncClient(srv.url, token, retries=0) as acc, \
                pytest.raises(Unauthorized) as e:
            acc.tot("h")
        assert words in e.value.detail, e.value.detail
