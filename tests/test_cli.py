"""The command line: `accman serve`'s refusals (one line, no traceback, exit
code 2), the client commands against a real server, and against the fake
AccMan of tests/fake_accman.py where a reply must be lost on purpose."""

import argparse
import asyncio
import importlib.metadata
import json
import os
import re
import secrets
import shutil
import signal
import socket
import subprocess
import sys
import time

import pytest

import accman
from accman.calling.commands import failure, prepare
from accman.cli import OPEN_KEY, build_parser, new_cred
from accman.errors import BadReply, CallTimeout, OutcomeUnknown, Unreachable
from conftest import PYTHON, ROOT, run_accman, server_env
from fake_accman import account_id

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
    ["serve", "--port", "08080"],
    ["serve", "--port", "+8080"],
    ["serve", "--port", "٨٠٨٠"],
    ["serve", "--port", "65536"],
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
    srv = start_server(data)
    err = one_line_error(run_accman("serve", "--port", 0, "--data", data))
    if getattr(srv.store, "embedded", True):
        assert "in use" in err
    else:       # an embedded server on a front-end's directory: its mark refuses it first
        assert "holds the lock of a front-end of a PostgreSQL store" in err


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


def test_host_star_serves_every_interface_of_both_families_with_tokens(start_server,
                                                                          tmp_path):
    """`--host '*'` binds every interface, IPv4 and IPv6 (`::` alone is IPv6
    only); like any address not loopback it needs tokens.  An empty
    --host, which did the same, is a usage error (an unset variable)."""
    err = one_line_error(run_accman("serve", "--host", "*", "--port", 8080,
                                    "--data", tmp_path / "d"))
    assert "refusing to serve on all interfaces without tokens" in err
    tokens = "read 0123456789abcdef0123\n"
    err = one_line_error(run_accman("serve", "--host", "*", "--port", 0,
                                    "--data", tmp_path / "d"))
    assert "--host '*' needs a --port other than 0" in err     # a port for each family
    with socket.socket(socket.AF_INET6) as probe:   # a port free in both families
        probe.setsockopt(socket.IPPROTO_IPV6, socket.IPV6_V6ONLY, 0)
        probe.bind(("::", 0))
        port = probe.getsockname()[1]
    srv = start_server(host="*", port=port, tokens=tokens)
    # The ready line names both families' addresses: it said only 0.0.0.0.
    line = (srv.log_dir / "stdout").read_text().splitlines()[0]
    assert line.split()[:-1] == ["accman:", "serving", f"http://0.0.0.0:{port}",
                                 f"http://[::]:{port}"]             # and then the store
    for addr, family in (("127.0.0.1", socket.AF_INET), ("::1", socket.AF_INET6)):
        with socket.socket(family) as s:
            s.settimeout(10)
            s.connect((addr, srv.port))
            s.sendall(b"GET /health HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n")
            assert s.recv(64).startswith(b"HTTP/1.1 200 "), addr


@pytest.mark.parametrize("host,with_tokens", [("accman-test.invalid", False),
                                               ("accman-test.invalid", True),
                                               ("a" * 64 + ".invalid", True),
                                               ("[::1]", False)])
def test_a_host_that_does_not_resolve_is_said_so_before_the_store(tmp_path, host,
                                                                   with_tokens):
    """Without tokens it was refused as a non-loopback bind (`pass --tokens
    FILE`, which would not help); with them the store was made, then the
    bind said `Unknown error -2`; a label over 63 characters (no name for
    IDNA) was a traceback."""
    args = ["--tokens", tmp_path / "tokens"] if with_tokens else []
    (tmp_path / "tokens").write_text("read 0123456789abcdef0123\n")
    (tmp_path / "tokens").chmod(0o600)
    err = one_line_error(run_accman("serve", "--host", host, "--port", 0,
                                    "--data", tmp_path / "d", *args))
    assert err.startswith(f"accman: error: cannot resolve --host {host}: "), err
    assert ("an IPv6 address goes without brackets: --host ::1" in err) == ("[" in host)
    assert "--tokens" not in err and "Unknown error" not in err
    assert not (tmp_path / "d").exists()


def in_hosts_of_its_own(tmp_path, hosts: str, *args) -> list[str]:
    """A command run where /etc/hosts is `hosts` (a mount namespace of its
    own, the file bind-mounted over the system's): a name of several
    addresses, which this machine's own hosts file has none of."""
    (tmp_path / "hosts").write_text(hosts)
    return ["unshare", "--mount", "sh", "-c", 'mount --bind "$0" /etc/hosts && exec "$@"',
            str(tmp_path / "hosts"), PYTHON, "-m", "accman", *map(str, args)]


def serve_line(cmd) -> str:
    """The ready line of `accman serve` run as `cmd`, which is then stopped."""
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=server_env(None), cwd=ROOT)
    try:
        line = proc.stdout.readline()
    finally:
        proc.terminate()
        _, err = proc.communicate(timeout=30)
    assert line, err
    return line


@pytest.mark.parametrize("fixed", [False, True])
def test_a_name_of_several_addresses_is_served_on_one_port(tmp_path, fixed):
    """With `--port 0` each address got a port of its own, and a client told
    the first URL missed the others: one port serves them all, picked free
    on the first address (a fixed port is taken on each)."""
    port = 0
    if fixed:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    line = serve_line(in_hosts_of_its_own(
        tmp_path, "127.0.0.1 twice\n127.0.0.2 twice\n",
        "serve", "--host", "twice", "--port", port, "--data", tmp_path / "d"))
    m = re.fullmatch(r"accman: serving http://127\.0\.0\.1:(\d+) http://127\.0\.0\.2:(\d+) "
                     r"data=.*\n", line)
    assert m and m[1] == m[2], line
    assert not fixed or int(m[1]) == port


@pytest.mark.parametrize("fixed", [False, True])
def test_a_name_that_lists_one_address_twice_is_served_on_it_once(tmp_path, fixed):
    """A hosts file may list one address twice for a name: bound as the
    name, it was bound twice, on two ports with `--port 0` (the first URL
    missed half the connections), and with a fixed port the second bind
    failed into a traceback after the store was made."""
    port = 0
    if fixed:
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            port = s.getsockname()[1]
    cmd = in_hosts_of_its_own(tmp_path, "127.0.0.1 twice\n127.0.0.1 twice\n",
                              "serve", "--host", "twice", "--port", port, "--data", tmp_path / "d")
    line = serve_line(cmd)
    assert re.fullmatch(r"accman: serving http://127\.0\.0\.1:(\d+) data=.*\n", line), line
    assert not fixed or f":{port} " in line


@pytest.mark.parametrize("host,hint", [
    ("[::1]:8080", "(an IPv6 address goes without brackets: --host ::1 --port 8080)"),
    ("localhost:8080", "(a port goes in --port: --host localhost --port 8080)")])
def test_a_host_written_with_its_port_is_told_the_flags_to_give(tmp_path, host, hint):
    """`[::1]:8080`, the ready line's form, was told `--host ::1]:8080`."""
    err = one_line_error(run_accman("serve", "--host", host, "--port", 0,
                                    "--data", tmp_path / "d"))
    assert err.startswith(f"accman: error: cannot resolve --host {host}: "), err
    assert err.endswith(hint), err
    assert not (tmp_path / "d").exists()


@pytest.mark.parametrize("text,needle", [
    ("read short\n", "16"),
    ("admin 0123456789abcdef0123\n", "unknown role 'admin'"),
    ("0123456789abcdef0123 read\n", "unknown role (20 characters"),    # swapped: not shown
    ("read,0123456789abcdef0123 mint,0123456789abcdef01234\n", "unknown role (20 char"),
    ("read 0123456789abcdef0123 extra\n", "line 1"),
    ("# only a comment\n", "no tokens"),
    ("read 0123456789abcdef0123\nmint 0123456789abcdef0123\n", "twice"),
])
def test_bad_tokens_file_is_one_line_and_exit_2(tmp_path, text, needle):
    path = tmp_path / "tokens"
    path.write_text(text)
    path.chmod(0o600)
    err = one_line_error(run_accman("serve", "--port", 0, "--data", tmp_path / "d",
                                    "--tokens", path))
    assert needle in err
    assert "0123456789abcdef0123" not in err        # never echo a token


def test_a_tokens_file_open_to_others_is_refused(tmp_path):
    """SPEC "Access": tokens move money; a file others can read is refused."""
    path = tmp_path / "tokens"
    path.write_text("read 0123456789abcdef0123\n")
    path.chmod(0o640)
    err = one_line_error(run_accman("serve", "--port", 0, "--data", tmp_path / "d",
                                    "--tokens", path))
    assert "open to other users" in err and "chmod 600" in err
    assert "0123456789abcdef0123" not in err


def test_missing_tokens_file(tmp_path):
    err = one_line_error(run_accman("serve", "--port", 0, "--data", tmp_path / "d",
                                    "--tokens", tmp_path / "nope"))
    assert "tokens" in err


def test_bad_limit_override(tmp_path):
    err = one_line_error(run_accman("serve", "--port", 0, "--data", tmp_path / "d",
                                    env={"ACCMAN_HEAD_TIMEOUT_S": "soon"}))
    assert "ACCMAN_HEAD_TIMEOUT_S" in err
    # An infinite linger stopped the webhook's delivery after its first POST.
    err = one_line_error(run_accman("serve", "--port", 0, "--data", tmp_path / "d",
                                    env={"ACCMAN_WEBHOOK_LINGER_S": "inf"}))
    assert err == ("accman: error: ACCMAN_WEBHOOK_LINGER_S='inf': must be a number of seconds "
                   "from 0.001 to 604800, in plain digits without leading zeros (a fraction "
                   "allowed)")


@pytest.mark.embedded_only("the ready line names the data directory when it holds the store")
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
    assert proc.returncode == 1 and "404 no_account" in proc.stderr
    proc = run_accman("mod", "abc", "-5", "--min", "0", "--url", s.url)
    assert proc.returncode == 1 and "404 no_account" in proc.stderr     # a charge opens none
    assert run_accman("mod", "abc", "3", "--url", s.url).returncode == 0
    proc = run_accman("mod", "abc", "-5", "--min", "0", "--url", s.url)
    assert proc.returncode == 1 and "409 insufficient" in proc.stderr and "(tot 3)" in proc.stderr


@pytest.mark.parametrize("args,names", [
    (["mod", "abc", "+5"], "by"),
    (["mod", "abc", "05"], "by"),
    (["mod", "abc", "1_000"], "by"),
    (["mod", "abc", "1e3"], "by"),
    (["mod", "abc", " 5"], "by"),
    (["mod", "abc", "\u0663"], "by"),                 # an Arabic-Indic 3: int() takes it
    (["mod", "abc", "0"], "by must not be 0"),
    (["mod", "abc", "9223372036854775808"], "by must be from"),
    (["mod", "abc", "-3", "--min", "-0"], "--min"),
    (["mod", "abc", "-3", "--key", "a/b"], "--key"),
    (["mod", "abc", "-3", "--key", "k" * 65], "--key"),
    (["tot", "a&by=1"], "cred"),                       # cannot smuggle parameters
    (["tot", "x" * 129], "cred"),
    (["past", "abc", "--limit", "1001"], "--limit"),
    (["past", "abc", "--limit", "0"], "--limit"),
    (["past", "abc", "--before", "0"], "--before"),
    (["open", "--by", "-5"], "--by must be a positive integer"),
    (["open", "--by", "0"], "--by must be a positive integer"),
    (["open", "--by", "ten"], "--by must be a plain decimal integer, like 100 ("),
    (["hold", "abc", "-3", "--ttl", "1.5"], "--ttl must be a plain decimal integer, like 100 ("),
])
def test_bad_values_are_refused_before_anything_is_sent(fake, args, names):
    err = one_line_error(run_accman(*args, "--url", fake.url))
    assert names in err and f"accman {args[0]} --help" in err
    assert "a&by=1" not in err and "x" * 129 not in err       # a credential is not echoed
    assert fake.requests == []


@pytest.mark.parametrize("flags,env,names", [
    (["--url", "ftp://h"], {}, "--url: the AccMan url must start with http://"),
    (["--url", "http://h/?q=1"], {}, "--url: the AccMan url takes no query"),
    ([], {"ACCMAN_URL": "http://h:0"}, "ACCMAN_URL: the AccMan url's port"),
    (["--token", "bad token secret"], {}, "--token: the token must be"),
    ([], {"ACCMAN_TOKEN": "bad token secret"}, "ACCMAN_TOKEN: the token must be"),
])
def test_a_bad_url_or_token_is_a_usage_error(flags, env, names):
    """Each names its source, the flag or the variable, and only it."""
    err = one_line_error(run_accman("tot", "abc", *flags, env=env))
    assert names in err and "secret" not in err
    assert ("token" in err) == ("token" in names), err


BRACKETS = "its host has a '[' without a ']' or a ']' without a '['"


@pytest.mark.parametrize("url,fault", [
    ("http://[::1", BRACKETS), ("http://u:secret@[::1/", BRACKETS), ("http://::1]:8080", BRACKETS),
    ("http://[::1]secret:80/", "its host in brackets is followed by something other than ':PORT'"),
    ("http://[v1.secret]/", "its host in brackets is not an IPv6 address"),
    ("http://[secret]:8080", "its host in brackets is not an IPv6 address"),
    ("http://u:secret\uff03@h/", "its host and user info must be plain ASCII"),
    ("http://127.0.0.1:2\t3001", "it holds a space or a control character"),
    (" http://127.0.0.1:8080/secret", "it holds a space or a control character"),
    ("http://127.0.0.1:8080/secret\n", "it holds a space or a control character"),
])
def test_a_url_that_urllib_refuses_or_cuts_is_named_and_not_quoted(url, fault):
    """urllib said "Invalid IPv6 URL" and named no flag; quoted a URL that
    NFKC changes, password and all; took `[::1]x:80` as [::1]:80, and
    `:2<TAB>3001` as port 23001."""
    err = one_line_error(run_accman("tot", "abc", "--url", url))
    assert err.startswith(f"accman: error: --url: {fault}")
    assert err.endswith("(try: accman tot --help)") and "Invalid" not in err
    assert "secret" not in err and "\uff03" not in err
    err = one_line_error(run_accman("events", env={"ACCMAN_URL": url}))
    assert err.startswith(f"accman: error: ACCMAN_URL: {fault}") and "secret" not in err


@pytest.mark.parametrize("flag", ["--url", "--token"])
def test_an_empty_url_or_token_is_a_usage_error_not_the_default(fake, flag):
    """An unset variable in a script (--token "$T") is a mistake, never a
    fall-back to the environment's token or the default URL."""
    env = {"ACCMAN_URL": fake.url, "ACCMAN_TOKEN": "t" * 20}
    err = one_line_error(run_accman("tot", "abc", flag, "", env=env))
    assert f"argument {flag}: is empty" in err
    assert fake.requests == []


@pytest.mark.parametrize("detail,said", [
    ("this call needs a token with the role mint", "; the token given (--token or ACCMAN_TOKEN) "
                                                   "does not have it (a positive by funds)"),
    ("forbidden", "; this needs a token (--token or ACCMAN_TOKEN) with the mint role (a "
                  "positive by funds)"),
])
def test_a_403_names_the_role_once_whatever_the_server_said(detail, said):
    from accman.calling.commands import failure
    from accman.errors import Forbidden
    args = argparse.Namespace(command="mod", by="5", key=None, cred="c")
    assert failure(args, Forbidden(detail)) == (f"accman: 403 forbidden: {detail}{said}", 1)


@pytest.mark.parametrize("url,where", [("http://h", "--url"), (None, "ACCMAN_URL")])
def test_a_host_the_resolver_refuses_is_named_by_its_source(url, where):
    """A host name the resolver refuses at the call (a UnicodeError) is the
    URL's fault, named by where the URL came from, as Endpoint's are."""
    from accman.calling.commands import BAD_HOST, EXIT_USAGE
    args = argparse.Namespace(command="tot", url=url)
    assert failure(args, UnicodeError("label empty or too long")) == (
        f"accman: error: {where}: {BAD_HOST} (try: accman tot --help)", EXIT_USAGE)


@pytest.mark.parametrize("follow", [False, True])
def test_events_trimmed_says_the_oldest_kept_once_and_the_after_that_goes_on(follow):
    """The server's detail names the oldest event kept; the command adds
    only where to go on, without saying it again."""
    from accman.errors import EventsTrimmed
    args = argparse.Namespace(command="events", follow=follow)
    assert failure(args, EventsTrimmed(4)) == (
        "accman: 410 events_trimmed: events before 4 are past the retention and were "
        "trimmed; the oldest kept is 4; go on from event 4 with --after 3", 1)


def test_migrate_without_store_is_a_usage_error_and_a_misspelt_one_is_named():
    err = one_line_error(run_accman("migrate"))
    assert "migrate needs --store URL" in err
    err = one_line_error(run_accman("migrate", "--stor", "postgresql:///x"))
    assert "did you mean --store?" in err and "postgresql" not in err


def test_an_abbreviated_flag_is_not_taken_for_the_flag(fake):
    """A later flag would make an abbreviation mean another one."""
    err = one_line_error(run_accman("mod", "abc", "-3", "--ke", "k1", "--url", fake.url))
    assert "unrecognized arguments" in err and "did you mean --key?" in err
    assert fake.requests == []


@pytest.mark.parametrize("args,flag", [
    (["mod", "abc", "-3", "--key", "k1", "--key", "k2"], "--key"),
    (["mod", "abc", "-3", "--min", "0", "--min=-100"], "--min"),
    (["tot", "abc", "--url", "http://127.0.0.1:9"], "--url"),
    (["events", "--limit", "5", "--limit", "7"], "--limit"),
])
def test_a_flag_given_twice_is_refused_not_its_last_value_taken(fake, args, flag):
    """argparse kept the last of a flag given twice without a word: a
    charge with `--min 0 ... --min -100` could take the balance under 0."""
    err = one_line_error(run_accman(*args, "--url", fake.url))
    assert f"argument {flag}: given more than once: give it once" in err
    assert fake.requests == []


@pytest.mark.parametrize("command", ["serve", "verify"])
def test_a_data_directory_given_twice_is_refused_and_neither_is_made(command, tmp_path):
    err = one_line_error(run_accman(command, "--data", tmp_path / "a", "--data", tmp_path / "b",
                                    *(["--port", "0"] if command == "serve" else []),
                                    timeout=10))
    assert "argument --data: given more than once: give it once" in err
    assert list(tmp_path.iterdir()) == []


def test_past_prints_the_account_and_each_entrys_hold(fake):
    fake.fund("abc", 7)
    proc = run_accman("past", "abc", "--url", fake.url)
    assert proc.returncode == 0, proc.stderr
    page = json.loads(proc.stdout)
    assert page["account"] == account_id("abc") and page["next"] is None
    assert [(e["by"], e["hold"], e["key"]) for e in page["past"]] == [(7, None, None)]


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
        proc = run_accman("mod", "abc", "-1", "--url", f"http://127.0.0.1:{port}")
        assert proc.returncode == 3 and "nothing was sent" in proc.stderr
        proc = run_accman("open", "--by", 5, "--url", f"http://127.0.0.1:{port}")
    assert proc.returncode == 3 and proc.stdout == ""
    assert "nothing was opened" in proc.stderr


def test_open_repeats_its_keyed_mod_when_the_reply_is_lost(fake):
    lost = []

    def fault(method, path, params):
        if path == "/mod" and not lost:
            lost.append(params["cred"])
            return ("apply_drop",)
    fake.fault = fault
    proc = run_accman("open", "--by", 40, "--url", fake.url)
    assert proc.returncode == 0, proc.stderr
    cred = proc.stdout.strip()
    assert lost == [cred] and len(fake.mods()) == 2
    assert fake.tot(cred) == 40                         # applied once
    assert [e["key"] for e in fake.accounts[cred]["past"]] == [OPEN_KEY]


def test_open_whose_outcome_stays_unknown_hands_over_the_credential(fake):
    fake.fault = lambda method, path, params: ("apply_drop",)
    proc = run_accman("open", "--by", 40, "--url", fake.url)
    err = one_line_error(proc, 3)
    assert proc.stdout == "" and "may or may not have been opened" in err
    (cred,) = fake.accounts                             # applied, once, by its key
    assert fake.tot(cred) == 40 and len(fake.mods()) == 3
    finish = err.split("run: ", 1)[1].split()
    assert finish == ["accman", "mod", cred, "40", "--key", OPEN_KEY]
    fake.fault = None
    proc = run_accman(*finish[1:], "--url", fake.url)
    assert proc.returncode == 0 and json.loads(proc.stdout) == {"tot": 40, "seq": 1}
    assert fake.tot(cred) == 40


@pytest.mark.parametrize("error", [OutcomeUnknown("the connection broke"),
                                   CallTimeout("no reply in 30 s"), BadReply("bad framing")])
def test_open_says_every_unknown_outcome_with_the_credential_and_unreachable_without(error):
    """docs/CALLING.md: "If the outcome stays unknown, it prints the
    credential"; every OutcomeUnknown is one (the client ends a call any
    attempt of which may have reached the server so, never Unreachable),
    while Unreachable means no attempt reached it: nothing was opened."""
    args = build_parser().parse_args(["open", "--by", "40"])
    prepare(args)                                      # draws args.cred
    line, code = failure(args, error)
    assert code == 3 and line.startswith(f"accman: error: no answer: {error.detail}; ")
    assert line.endswith(f"its credential is {args.cred}; to finish opening it, run: "
                         f"accman mod {args.cred} 40 --key {OPEN_KEY}")
    line, code = failure(args, Unreachable("cannot connect to AccMan"))
    assert code == 3 and line == ("accman: error: no answer: cannot connect to AccMan; "
                                  "nothing was opened")


@pytest.mark.parametrize("key,hint", [(None, "accman past"), ("k1", "same --key")])
def test_a_mod_whose_reply_is_lost_says_what_to_do(fake, key, hint):
    fake.fund("abc", 10)
    fake.fault = lambda method, path, params: ("apply_drop",) if path == "/mod" else None
    args = ["mod", "abc", "-3", "--url", fake.url] + (["--key", key] if key else [])
    err = one_line_error(run_accman(*args), 3)
    assert "may or may not have applied" in err and hint in err
    assert fake.tot("abc") == 7                         # it did, once


def test_tokens_from_flag_and_environment(start_server):
    s = start_server(tokens=f"mint {TOKENS['mint']}\nread,charge {TOKENS['service']}\n")
    proc = run_accman("open", "--by", 10, "--url", s.url)
    assert proc.returncode == 1 and "401" in proc.stderr and "--token" in proc.stderr
    assert "mint role" in proc.stderr
    proc = run_accman("open", "--by", 10, "--url", s.url, "--token", TOKENS["service"])
    assert proc.returncode == 1 and "403" in proc.stderr
    assert proc.stdout == "" and proc.stderr.count("mint") == 1, proc.stderr   # said once
    assert ("needs a token with the role mint; the token given (--token or ACCMAN_TOKEN) "
            "does not have it (opening an account funds it)") in proc.stderr
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


@pytest.mark.embedded_only("accman verify checks the embedded store's files")
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
    err = one_line_error(run_accman("verify", "--data", data / "accman.key"))
    assert err == f"accman: error: {data / 'accman.key'} is not a directory"
    (tmp_path / "dangling").symlink_to(tmp_path / "gone")
    err = one_line_error(run_accman("verify", "--data", tmp_path / "dangling"))
    assert err == f"accman: error: no data directory at {tmp_path / 'dangling'}"
    (tmp_path / "loop").symlink_to(tmp_path / "loop")     # said as serve says it
    err = one_line_error(run_accman("verify", "--data", tmp_path / "loop"))
    assert err == (f"accman: error: cannot open data directory {tmp_path / 'loop'}: "
                   "Too many levels of symbolic links")


@pytest.mark.parametrize("name", ["CURRENT", "MANIFEST"])
def test_verify_names_an_unreadable_file_of_leveldb(tmp_path, name):
    """SERVER.md: a store that cannot be read is said with the file that
    cannot be, as for the key, checkpoint, logs and tables; CURRENT and
    the MANIFEST were said as `the store` (a black-box probe).  Root reads
    any file: verify runs without the capability that lets it."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        pytest.skip("needs root and setpriv (CI runs as root)")
    from accman import Ledger
    data = tmp_path / "data"
    with Ledger(str(data)) as led:
        led.mod("acct", 5)
    [file] = [p for p in data.iterdir() if p.name.startswith(name)]
    file.chmod(0)
    proc = subprocess.run(["setpriv", "--bounding-set=-dac_override,-dac_read_search",
                           PYTHON, "-m", "accman", "verify", "--data", str(data)],
                          capture_output=True, text=True, timeout=30, env=server_env(None),
                          cwd=ROOT)
    assert proc.returncode == 2, proc
    assert proc.stderr == (f"accman: error: cannot open data directory {data}: cannot read "
                           f"{file.name}: Permission denied\n"), proc.stderr


def test_verify_reads_the_webhook_s_cursor_as_a_start_does(tmp_path):
    """The webhook's cursor file is the data directory's too: damaged, a
    server refuses to start, so verify fails it, where it said ok (a
    black-box probe); whole, its value is in the verdict."""
    from accman import Ledger
    from accman.calling.commands import EXIT_REFUSED
    from accman.server.cursors import cursor_line
    data = tmp_path / "data"
    with Ledger(str(data)) as led:
        led.mod("acct", 5)
    cursor = data / "webhook.cursor"
    cursor.write_bytes(cursor_line("webhook", 7))
    proc = run_accman("verify", "--data", data)
    assert proc.returncode == 0 and "webhook_cursor=7" in proc.stdout, proc
    cursor.write_bytes(b"garbage\n")
    proc = run_accman("verify", "--data", data)
    assert proc.returncode == EXIT_REFUSED, proc
    assert proc.stdout == (f"accman: verify {data}: FAILED: the cursor file {cursor} is "
                           "damaged: it is not one cursor line\n"), proc


def test_verify_stopped_by_sigterm_leaves_no_copy_of_the_store(tmp_path):
    """Its private copy holds the store's key: a SIGTERM ends it as ^C
    does, and the copy is removed on the way out."""
    from accman import Ledger
    from accman.calling.commands import EXIT_TERMINATED
    from conftest import PYTHON, server_env
    data = tmp_path / "data"
    with Ledger(str(data)) as led:
        async def fill():           # in batches: big enough that verify takes a while
            for start in range(0, 20000, 1000):
                await asyncio.gather(*(led.amod(f"acct{i % 2000}", 1 + i)
                                       for i in range(start, start + 1000)))
        asyncio.run(fill())
    scratch = tmp_path / "tmp"
    scratch.mkdir()
    proc = subprocess.Popen([PYTHON, "-m", "accman", "verify", "--data", str(data)],
                            env=server_env({"TMPDIR": scratch}), stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE)
    deadline = time.monotonic() + 30
    # Only its copy: other scratch (tempfile's own probe of TMPDIR) comes and goes.
    while (not any(scratch.glob("accman-verify-*")) and proc.poll() is None
           and time.monotonic() < deadline):
        time.sleep(0.001)
    assert any(scratch.glob("accman-verify-*")), ("verify made no copy", proc.poll())
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == EXIT_TERMINATED, proc.stderr.read()
    assert list(scratch.iterdir()) == []


def test_version_is_the_packages():
    proc = run_accman("--version")
    assert proc.returncode == 0 and proc.stdout == f"accman {accman.__version__}\n"
    assert importlib.metadata.version("accman") == accman.__version__


@pytest.mark.parametrize("command", ["serve", "migrate"])
@pytest.mark.parametrize("url,port", [
    ("postgresql://postgres:secret@127.0.0.1:99999/a", "'99999'"),
    ("postgresql://h1:5432,h2:65536/a?target_session_attrs=read-write", "'65536'"),
    ("postgresql://[::1]:-1/a", "that is not a number"),
    ("postgresql:///a?host=/tmp&port=5432,0", "'0'"),
    ("postgresql://?host=/tmp&port=99999", "'99999'"),
    # An unencoded "/" in a password: libpq reads its part as a port, not shown.
    ("postgresql://u:pa:ss/cret@h/a", "that is not a number"),
])
def test_a_store_url_with_a_port_out_of_range_is_a_usage_error(command, url, port):
    """Not a traceback (the driver's OverflowError), nor "connection refused"."""
    proc = run_accman(command, "--store", url)
    assert proc.returncode == 2, proc.stderr
    assert f"--store: the store URL has a port {port}: a port is 1..65535" in proc.stderr
    assert 'or "@" of the user info as %2F, %3A or %40' in proc.stderr
    assert "Traceback" not in proc.stderr
    assert "secret" not in proc.stderr and "ss" not in proc.stderr.split(":", 2)[-1]


@pytest.mark.parametrize("url", ["mysql://accman:secret@127.0.0.1:1/a",
                                 "host=127.0.0.1 port=1 password=secret",
                                 "accman:secret@127.0.0.1:1/a", "http://127.0.0.1:1/a"])
def test_a_store_url_of_another_scheme_is_a_usage_error_and_makes_no_directory(url, tmp_path):
    """The driver reads postgresql:// and postgres:// only: its refusal
    came once serve had made --data for its lock."""
    err = one_line_error(run_accman("serve", "--port", "0", "--data", tmp_path / "d",
                                    "--store", url))
    assert "argument --store: the store URL must start with postgresql:// (or postgres://)" \
        in err and "secret" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["postgresql://u:secret@[::1/db", "postgresql://h1,[::1/db",
                                 "postgresql://::1]:5432/db", "postgresql://[::1]secret:5432/db",
                                 "postgresql://[]/db"])
def test_a_store_url_whose_brackets_the_driver_refuses_or_cuts_makes_no_directory(url, tmp_path):
    """An unclosed "[" was refused by the driver once serve had made --data,
    in words that named no flag; text after the "]" other than a port was
    dropped, as urllib drops it."""
    err = one_line_error(run_accman("serve", "--port", "0", "--data", tmp_path / "d",
                                    "--store", url))
    assert err.startswith("accman: error: argument --store: the store URL has a host in "
                          "brackets that is not closed, or is followed by more than ':PORT'")
    assert "secret" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["postgresql://u:SECRET[x@127.0.0.1:1/db",
                                 "postgresql://u:SECRET]x@127.0.0.1:1/db",
                                 "postgresql://[SECRET]:1/db",
                                 "postgresql://u:SECRET\uff03@127.0.0.1:1/db"])
def test_a_store_url_the_drivers_parser_refuses_makes_no_directory(url, tmp_path):
    """The driver parses the URL with urllib before it connects: a bracket
    in the user info, a host in brackets that is no IP address, a character
    that NFKC makes one of /?#@: were refused once serve had made --data,
    in words that named no flag."""
    err = one_line_error(run_accman("serve", "--port", "0", "--data", tmp_path / "d",
                                    "--store", url))
    assert err.startswith("accman: error: argument --store: the store URL cannot be read "
                          "as a URL: ")
    assert "SECRET" not in err and "\uff03" not in err
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("url", ["PostgreSQL://h/db", "postgres://h/db", "postgresql:///db",
                                 "postgresql://u:p@[::1]:5433,h2,[fe80::1]/db"])
def test_a_store_url_of_a_scheme_the_driver_reads_is_taken(url):
    from accman.calling.arguments import store_url
    assert store_url(url) == url


@pytest.mark.parametrize("url", [
    "postgresql://h:5432?sslrootcert=/etc/ssl/ca.pem",
    "postgresql://localhost:5432?host=/var/run/postgresql",
    "postgresql://u:p@h1:5432,h2:5433/db?target_session_attrs=read-write",
    "postgresql://[::1]:5432/db", "postgresql://h:/db", "postgresql://h/db?port=5432%2C5433",
])
def test_a_store_url_s_ports_are_read_as_libpq_reads_them(url):
    from accman.calling.arguments import store_url
    assert store_url(url) == url


@pytest.mark.parametrize("command", ["serve", "verify"])
def test_help_names_the_default_data_directory(command):
    proc = run_accman(command, "--help")
    assert proc.returncode == 0 and "default ./accman-data" in proc.stdout


def test_serve_help_is_the_one_server_md_shows():
    """docs/SERVER.md shows `accman serve --help` whole, as 80 columns wrap
    it: a flag's help and its documentation change together."""
    proc = run_accman("serve", "--help", env={"COLUMNS": "80"})
    assert proc.returncode == 0 and proc.stdout.startswith("usage: accman serve")
    assert f"```\n{proc.stdout}```\n" in (ROOT / "docs" / "SERVER.md").read_text()


def command_flags():
    """Each command of the parser with the flags it takes, --help aside."""
    return {name: {o for a in parser._actions for o in a.option_strings
                   if o.startswith("--") and o != "--help"}
            for name, parser in command_parsers().items()}


def command_parsers():
    sub = next(a for a in build_parser()._actions if isinstance(a, argparse._SubParsersAction))
    return sub.choices


def command_positionals():
    """Each command with its positional values' names as the docs write
    them (`mod CRED BY`)."""
    return {name: [a.dest.upper() for a in parser._actions if not a.option_strings]
            for name, parser in command_parsers().items()}


# A code span of Markdown: from a backtick to the next, never across one.
CODE_SPAN_RE = re.compile(r"`([^`]+)`")
# A code span that starts with a command (`past CRED [--limit N]`,
# `accman verify --data DIR`) or lists them (`accman open | tot | mod`).
SPAN_COMMANDS_RE = re.compile(r"(?:accman )?([a-z]+(?: \| [a-z]+)*)(?: |$)")
FLAG_RE = re.compile(r"(?<![\w-])--[a-z0-9][a-z0-9-]*")


def documents_command(span, command, positionals) -> bool:
    """Whether `span`, which starts with `command`, writes it as its
    synopsis does: its values before the first flag are the command's
    positional values by name, in order (`mod CRED BY [--min M]`), or
    "..." for them (`mod ... --low L`).  An example of a mistake (`tot C
    --key K`, a usage error's) documents no flag."""
    words = span.removeprefix("accman ").split()[1:]
    first_flag = next((i for i, w in enumerate(words) if w.lstrip("[").startswith("-")),
                      len(words))
    values = words[:first_flag]
    return values in (positionals, ["..."])


def documented_flags(section, positionals) -> dict:
    """The flags that each command's own part of a page's section names:
    the code spans that start with the command's name and write it as its
    synopsis does (documents_command: `past CRED [--limit N] [--before S]`,
    `mod ... --low L`), and for the commands a span lists (`accman open |
    tot | ...`), the spans that start with a flag in the paragraph or list
    item it is in (`--url`, `--token`): the flags they share, named once.
    A flag counts only inside one code span; fenced blocks (examples) are
    left out."""
    prose = "".join(section.split("```")[::2])
    flags = {}
    for block in re.split(r"\n\s*\n|\n(?=- )", prose):
        spans = [" ".join(span.split()) for span in CODE_SPAN_RE.findall(block)]
        shared = {flag for span in spans if span.startswith("--")
                  for flag in FLAG_RE.findall(span)}
        for span in spans:
            m = SPAN_COMMANDS_RE.match(span)
            commands = m.group(1).split(" | ") if m else []
            for command in commands:
                if len(commands) > 1:
                    flags.setdefault(command, set()).update(shared)
                elif documents_command(span, command, positionals.get(command, [])):
                    flags.setdefault(command, set()).update(FLAG_RE.findall(span))
    return flags


def test_a_flag_named_only_in_an_example_of_a_mistake_is_not_documented():
    """`tot C --key K` (the usage error for another command's flag) is no
    part of tot's synopsis: it credits tot with no --key; the synopsis and
    the commands a span lists do."""
    section = ("- `tot CRED` and `mod CRED BY [--min M]`; `mod ... --low L`; another\n"
               "  command's flag (`tot C --key K`, `mod C 5 --ttl S`) is said as such.\n"
               "- `accman open | tot` take `--url`.\n")
    assert documented_flags(section, command_positionals()) == {
        "tot": {"--url"}, "mod": {"--min", "--low"}, "open": {"--url"}}


def test_every_flag_of_a_command_is_named_where_its_page_documents_the_command():
    """A flag the command line takes is named in its command's own part of
    the page that documents it: the client commands in CALLING.md's "The
    command line", `verify` and `migrate` in SERVER.md's (serve's help is
    shown whole above), so that a flag added, or one the docs never named,
    is seen, also when another command's part names a flag of that name,
    or an example of a mistake does (documents_command)."""
    def section(doc):
        text = (ROOT / "docs" / doc).read_text()
        text = text.split("\n## The command line\n", 1)[1].split("\n## ", 1)[0]
        assert text.count("```") % 2 == 0 and text.replace("```", "").count("`") % 2 == 0
        return documented_flags(text, command_positionals())
    calling, server = section("CALLING.md"), section("SERVER.md")
    flags = command_flags()
    assert set(flags) == {"serve", "open", "tot", "mod", "past", "hold", "settle", "events",
                          "migrate", "verify"}
    unsaid = []
    for command, names in flags.items():
        if command == "serve":
            continue
        said = (server if command in ("verify", "migrate") else calling).get(command, set())
        unsaid += [f"{command} {flag}" for flag in sorted(names - said)]
    assert unsaid == []


@pytest.mark.parametrize("command,said", [
    ("tot", "(needs the read role)"), ("past", "(needs the read role)"),
    ("mod", "needing the charge role"), ("mod", "needing the mint role"),
    ("open", "(needs the mint role)"), ("hold", "charge role"), ("settle", "charge role"),
    ("events", "read role"), ("migrate", "usage: accman migrate [-h] --store URL [--store"),
])
def test_help_names_the_role_a_command_needs_and_what_is_required(command, said):
    proc = run_accman(command, "--help")
    assert proc.returncode == 0 and said in " ".join(proc.stdout.split()), proc.stdout


@pytest.mark.parametrize("args", [["serve", "--bogus"], ["verify", "--bogus"],
                                  ["tot", "abc", "--bogus"], ["open", "--by", "5", "extra"]])
def test_an_unknown_argument_points_at_its_commands_help(args, tmp_path):
    err = one_line_error(run_accman(*args, cwd=tmp_path))
    assert f"(try: accman {args[0]} --help" in err
    assert "unrecognized arguments: <not shown>" in err and args[-1] not in err


COMMANDS = "serve, open, tot, mod, past, hold, settle, events, migrate, verify"


@pytest.mark.parametrize("args,said", [
    (["--token=SECRETtoken"], "unrecognized arguments: --token; --token is not an option of "
                              f"accman; a COMMAND is required: {COMMANDS} ("),
    (["--url=SECRETurl", "--key=SECRETkey"],
     "unrecognized arguments: --url --key; --url and --key are not options of "
     f"accman; a COMMAND is required: {COMMANDS} ("),
    (["--SECRETflag"], f"unrecognized arguments: <not shown>; a COMMAND is required: {COMMANDS} ("),
    (["--verison"], "unrecognized arguments: <not shown>; a COMMAND is required: "
                    f"{COMMANDS}; did you mean --version? ("),
])
def test_a_flag_without_a_command_is_said_and_so_is_the_command_required(args, said,
                                                                          tmp_path):
    """`accman --token=T`: a command's flag given before any command is no
    option of accman, and the mistake may as well be the command left out:
    the usage error says both, naming the commands, and shows no value (a
    flag's value may be a token)."""
    err = one_line_error(run_accman(*args, cwd=tmp_path))
    assert err.startswith(f"accman: error: {said}"), err
    assert err.endswith("(a value that may be a credential is not shown) (try: accman --help)")
    assert "SECRET" not in err


# --- a source tree without its build (issue 11, item 10) ------------------------------

@pytest.fixture
def unbuilt_tree(tmp_path):
    """A copy of accman's sources without the compiled modules, as a fresh
    clone is before a build."""
    tree = tmp_path / "tree"
    shutil.copytree(ROOT / "accman", tree / "accman",
                    ignore=shutil.ignore_patterns("*.so", "*.pyd", "__pycache__"))
    return tree


def run_in(tree, *args, python_flags=()):
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    return subprocess.run([sys.executable, *python_flags, *map(str, args)], cwd=tree, env=env,
                          capture_output=True, text=True, timeout=60)


@pytest.mark.parametrize("command", [["serve", "--port", "0"], ["verify"]])
def test_a_tree_that_shadows_the_installed_accman_says_what_to_run(unbuilt_tree, command):
    proc = run_in(unbuilt_tree, "-m", "accman", *command, "--data", unbuilt_tree / "d")
    err = one_line_error(proc)
    assert str(unbuilt_tree / "accman") in err and "installed `accman` command" in err
    assert "pip install -e ." in err and str(ROOT / "accman") in err
    assert not (unbuilt_tree / "d").exists()


def test_a_tree_without_its_build_says_how_to_build(unbuilt_tree):
    # -S: no site-packages, so no other accman anywhere
    proc = run_in(unbuilt_tree, "-m", "accman", "serve", "--port", "0",
                  python_flags=["-S"])
    err = one_line_error(proc)
    assert "not built" in err and "pip install -e ." in err


def test_importing_ledger_from_a_tree_without_its_build_says_what_to_run(unbuilt_tree):
    proc = run_in(unbuilt_tree, "-c", "from accman import Ledger")
    assert proc.returncode == 1
    last = proc.stderr.strip().splitlines()[-1]
    assert last.startswith("ImportError: ") and "pip install -e ." in last
    proc = run_in(unbuilt_tree, "-c", "from accman import AccManError, Entry; import accman.client")
    assert proc.returncode == 0, proc.stderr         # the calling side needs no build


@pytest.mark.parametrize("args", [["serve", "--store", ""], ["migrate", "--store", " "]])
def test_an_empty_store_url_is_a_usage_error_not_a_refused_connection(args):
    proc = run_accman(*args)
    assert proc.returncode == 2
    assert "--store: an empty URL: give a postgresql:// URL" in proc.stderr


@pytest.mark.parametrize("mode", ["full", "heads"])
def test_verify_is_refused_beside_a_postgresql_store(mode, tmp_path):
    """`--verify heads` beside `--store` was taken and did nothing (the
    embedded store's checks at open), as --compaction-nice is refused."""
    err = one_line_error(run_accman("serve", "--port", "0", "--verify", mode, "--data",
                                    tmp_path / "d", "--store", "postgresql://127.0.0.1:1/x"))
    assert err == ("accman: error: --verify is the embedded store's: it says what to check "
                   "of the files in --data, and a PostgreSQL store keeps none there")
    assert not (tmp_path / "d").exists()


# `python -m accman ARGS` on a Python where asyncpg cannot be imported.
WITHOUT_ASYNCPG = ("import runpy, sys; sys.modules['asyncpg'] = None; "
                   "sys.argv[0] = 'accman'; runpy.run_module('accman', run_name='__main__')")


@pytest.mark.parametrize("command", ["serve", "migrate"])
def test_the_postgresql_store_without_its_driver_is_one_line_and_touches_nothing(command,
                                                                                tmp_path):
    data = tmp_path / "d"
    args = [command, "--store", "postgresql://127.0.0.1:1/x"]
    args += ["--data", str(data), "--port", "0"] if command == "serve" else []
    proc = run_in(ROOT, "-c", WITHOUT_ASYNCPG, *args)
    err = one_line_error(proc)
    assert err == ("accman: error: the PostgreSQL store needs asyncpg: "
                   "pip install 'accman[postgres]'")
    assert not data.exists()


@pytest.mark.parametrize("command", ["serve", "verify"])
def test_an_empty_data_path_is_a_usage_error_not_the_current_directory(command, tmp_path):
    """`--data ""` would be the current directory: made 0700 and given a
    store by serve, read by verify."""
    mode = tmp_path.stat().st_mode
    proc = run_accman(command, "--data", "", cwd=tmp_path)
    assert proc.returncode == 2
    assert "--data: an empty path: give the data directory's path" in proc.stderr
    assert list(tmp_path.iterdir()) == [] and tmp_path.stat().st_mode == mode


@pytest.mark.parametrize("flag,beside", [
    ("--tokens", []),
    ("--host", ["--tokens", "TOKENS"]),
    ("--webhook", ["--webhook-secret", "TOKENS"]),
    ("--webhook-secret", ["--webhook", "http://127.0.0.1:9/"]),
])
def test_an_empty_serve_flag_is_a_usage_error_not_its_absence(flag, beside, tmp_path):
    """`--tokens "$TOKENS"` with TOKENS unset served without tokens, and
    `--host "$HOST"` (with tokens) on every interface: an empty value was
    taken for the flag left out.  An empty webhook URL or secret file was
    refused for its form, not for being empty."""
    tokens = tmp_path / "tokens"
    tokens.write_text("read 0123456789abcdef0123\n")
    tokens.chmod(0o600)
    beside = [tokens if a == "TOKENS" else a for a in beside]
    proc = run_accman("serve", "--port", "0", "--data", tmp_path / "d", *beside, flag, "",
                      timeout=10)
    err = one_line_error(proc)
    assert f"argument {flag}: is empty: give a value, or leave the flag out" in err
    assert not (tmp_path / "d").exists()


def test_verify_from_a_deleted_working_directory_says_so(tmp_path):
    """`verify --data d` in a working directory since deleted ended in a
    traceback (os.path.abspath's FileNotFoundError); it is said as serve
    says it."""
    gone = tmp_path / "gone"
    gone.mkdir()
    proc = subprocess.run(
        ["bash", "-c", f'cd "{gone}" && rmdir "{gone}" && exec "$0" -m accman verify --data d',
         PYTHON], capture_output=True, text=True, timeout=30, env=server_env(None))
    assert proc.returncode == 2, proc.stderr
    assert "Traceback" not in proc.stderr
    assert one_line_error(proc).startswith(
        "accman: error: --data: path 'd' is relative, and the working directory it is "
        "relative to cannot be found")
