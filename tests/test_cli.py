"""The command line: `accman serve`'s refusals (one line, no traceback, exit
code 2) and the client commands against a real server."""

import json
import secrets
import socket

import pytest

from accman.cli import new_cred
from conftest import run_accman

TOKENS = {
    "mint": "mint-token-0123456789abcdef",
    "service": "service-token-0123456789abcdef",
}


def one_line_error(proc, code=2):
    assert proc.returncode == code, (proc.returncode, proc.stdout, proc.stderr)
    err = proc.stderr.strip()
    assert "Traceback" not in err
    assert len(err.splitlines()) == 1, err
    assert err.startswith("accman: ")
    return err


# --- serve refuses to start ---------------------------------------------------------

@pytest.mark.parametrize("args", [
    ["serve", "--bogus"],
    ["serve", "--port", "http"],
    ["serve", "--port", "70000"],
    ["serve", "--port", "-1"],
    ["frobnicate"],
    [],
])
def test_bad_flags_are_one_line_and_exit_2(args, tmp_path):
    one_line_error(run_accman(*args, cwd=tmp_path))
    assert not (tmp_path / "accman-data").exists()


def test_busy_port_is_one_line_and_exit_2(start_server, tmp_path):
    first = start_server()
    proc = run_accman("serve", "--port", first.port, "--data", tmp_path / "other")
    err = one_line_error(proc)
    assert "cannot listen" in err and str(first.port) in err


def test_locked_data_dir_is_one_line_and_exit_2(start_server, tmp_path):
    data = tmp_path / "data"
    start_server(data)
    err = one_line_error(run_accman("serve", "--port", 0, "--data", data))
    assert "in use" in err


def test_corrupt_data_dir_is_one_line_and_exit_2(tmp_path):
    data = tmp_path / "data"
    data.mkdir()
    (data / "CURRENT").write_text("garbage\n")      # not a LevelDB directory
    err = one_line_error(run_accman("serve", "--port", 0, "--data", data))
    assert str(data) in err


def test_non_loopback_without_tokens_refuses_and_says_what_to_do(tmp_path):
    for host in ("0.0.0.0", "::"):
        err = one_line_error(run_accman("serve", "--host", host, "--port", 0,
                                        "--data", tmp_path / "d"))
        assert "--tokens" in err
    assert not (tmp_path / "d").exists()         # refused before touching the store


@pytest.mark.parametrize("text,needle", [
    ("read short\n", "16"),
    ("admin 0123456789abcdef0123\n", "unknown role"),
    ("read 0123456789abcdef0123 extra\n", "line 1"),
    ("# only a comment\n", "no tokens"),
    ("read 0123456789abcdef0123\nmint 0123456789abcdef0123\n", "twice"),
])
def test_bad_tokens_file_is_one_line_and_exit_2(tmp_path, text, needle):
    path = tmp_path / "tokens"
    path.write_text(text)
    err = one_line_error(run_accman("serve", "--port", 0, "--data", tmp_path / "d",
                                    "--tokens", path))
    assert needle in err
    assert "0123456789abcdef0123" not in err        # never echo a token


def test_missing_tokens_file(tmp_path):
    err = one_line_error(run_accman("serve", "--port", 0, "--data", tmp_path / "d",
                                    "--tokens", tmp_path / "nope"))
    assert "tokens" in err


def test_bad_limit_override(tmp_path):
    err = one_line_error(run_accman("serve", "--port", 0, "--data", tmp_path / "d",
                                    env={"ACCMAN_HEAD_TIMEOUT_S": "soon"}))
    assert "ACCMAN_HEAD_TIMEOUT_S" in err


def test_ready_line_names_the_real_port_and_absolute_data_dir(start_server, tmp_path):
    s = start_server(tmp_path / "data")
    line = (s.log_dir / "stdout").read_text().splitlines()[0]
    assert line == f"accman: serving http://127.0.0.1:{s.port} data={tmp_path / 'data'}"
    assert s.port > 0


# --- client commands ----------------------------------------------------------------

def test_open_tot_mod_past_round_trip(start_server):
    s = start_server()
    url = ["--url", s.url]
    proc = run_accman("open", "--by", 50, *url)
    assert proc.returncode == 0, proc.stderr
    cred = proc.stdout.strip()
    assert len(cred) == 32 and all(c.isascii() and (c.isalnum() or c in "-_") for c in cred)

    proc = run_accman("tot", cred, *url)
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"tot": 50}

    proc = run_accman("mod", cred, "-20", "--min", "0", "--key", "k1", *url)
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"tot": 30, "seq": 2}

    proc = run_accman("mod", cred, "-100", "--min", "0", *url)
    assert proc.returncode == 1 and proc.stdout == ""
    assert "409" in proc.stderr and "insufficient" in proc.stderr and "30" in proc.stderr

    proc = run_accman("past", cred, "--limit", "1", *url)
    page = json.loads(proc.stdout)
    assert [e["seq"] for e in page["past"]] == [2] and page["next"] == 2
    proc = run_accman("past", cred, "--before", "2", *url)
    assert [e["by"] for e in json.loads(proc.stdout)["past"]] == [50]

    # ACCMAN_URL instead of --url
    proc = run_accman("tot", cred, env={"ACCMAN_URL": s.url})
    assert json.loads(proc.stdout) == {"tot": 30}


def test_client_errors_exit_1_with_the_error(start_server):
    s = start_server()
    proc = run_accman("tot", "nobody", "--url", s.url)
    assert proc.returncode == 1 and "no_account" in proc.stderr
    proc = run_accman("mod", "abc", "+5", "--url", s.url)
    assert proc.returncode == 1 and "400" in proc.stderr
    proc = run_accman("tot", "a&by=1", "--url", s.url)     # cannot smuggle parameters
    assert proc.returncode == 1 and "400" in proc.stderr


def test_new_credentials_never_start_with_a_dash(monkeypatch):
    # One token_urlsafe draw in 64 starts with "-", which any command line,
    # this one's included, reads as an option.
    creds = {new_cred() for _ in range(5000)}
    assert len(creds) == 5000
    assert all(len(c) == 32 and not c.startswith("-") for c in creds)
    draws = iter(["-" + "a" * 31, "b" * 32])
    monkeypatch.setattr(secrets, "token_urlsafe", lambda n: next(draws))
    assert new_cred() == "b" * 32


def test_a_credential_that_starts_with_a_dash_goes_after_double_dash(start_server):
    s = start_server()
    s.mod("-dash", 10)
    err = one_line_error(run_accman("tot", "-dash", "--url", s.url))
    assert "starts with '-' goes after '--'" in err
    proc = run_accman("mod", "--min", "0", "--url", s.url, "--", "-dash", "-4")
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout) == {"tot": 6, "seq": 2}
    proc = run_accman("tot", "--url", s.url, "--", "-dash")
    assert json.loads(proc.stdout) == {"tot": 6}
    proc = run_accman("past", "--limit", "1", "--url", s.url, "--", "-dash")
    assert [e["by"] for e in json.loads(proc.stdout)["past"]] == [-4]


def test_no_server_exits_3(tmp_path):
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]       # bound but not listening: refused
        proc = run_accman("tot", "abc", "--url", f"http://127.0.0.1:{port}")
    assert proc.returncode == 3 and "no answer" in proc.stderr
    proc = run_accman("open", "--by", 5, "--url", f"http://127.0.0.1:{port}")
    assert proc.returncode == 3 and proc.stdout == ""


def test_tokens_from_flag_and_environment(start_server):
    s = start_server(tokens=f"mint {TOKENS['mint']}\nread,charge {TOKENS['service']}\n")
    proc = run_accman("open", "--by", 10, "--url", s.url)
    assert proc.returncode == 1 and "401" in proc.stderr
    proc = run_accman("open", "--by", 10, "--url", s.url, "--token", TOKENS["service"])
    assert proc.returncode == 1 and "403" in proc.stderr
    proc = run_accman("open", "--by", 10, "--url", s.url, "--token", TOKENS["mint"])
    assert proc.returncode == 0
    cred = proc.stdout.strip()
    env = {"ACCMAN_URL": s.url, "ACCMAN_TOKEN": TOKENS["service"]}
    proc = run_accman("mod", cred, "-4", env=env)
    assert proc.returncode == 0, (proc.stdout, proc.stderr, s.stderr())
    assert json.loads(proc.stdout) == {"tot": 6, "seq": 2}
    proc = run_accman("tot", cred, env=env)
    assert json.loads(proc.stdout) == {"tot": 6}
    assert TOKENS["mint"] not in s.stderr() and cred not in s.stderr()


def test_verify(start_server, tmp_path):
    data = tmp_path / "data"
    s = start_server(data)
    for by in (10, -3):
        s.mod("acct", by, key=f"k{by}")
    err = one_line_error(run_accman("verify", "--data", data))   # still open
    assert "in use" in err
    assert s.stop() == 0
    proc = run_accman("verify", "--data", data)
    assert proc.returncode == 0, proc.stderr
    assert "ok" in proc.stdout and "entries=2" in proc.stdout
    err = one_line_error(run_accman("verify", "--data", tmp_path / "missing"))
    assert "no data directory" in err
