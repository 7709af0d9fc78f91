"""The server's ACCMAN_* overrides (docs/SERVER.md, "Limits"): a variable
that names no setting of the server's, nor one another part of AccMan
reads, is said at start and ignored, never silently taken for one; a
setting's value is plain digits, finite and bounded, or the start is
refused naming it."""

import re
from pathlib import Path

import pytest

from accman.errors import LimitsError
from accman.server.settings import OTHER_NAMES, ServerLimits

ROOT = Path(__file__).resolve().parent.parent
READ = re.compile(r"""(?:environ(?:\.get)?[\[(]|getenv\(|process\.env\.|process\.env\[)\s*"""
                  r"""['"]?(ACCMAN_[A-Z0-9_]+)""")


def test_a_variable_that_is_no_setting_is_named_at_start_and_ignored(start_server):
    s = start_server(env={"ACCMAN_HOLDS_MAX": "5", "ACCMAN_IDLE_TIMEOUT": "3",
                          "ACCMAN_URL": "http://127.0.0.1:1", "ACCMAN_IDLE_TIMEOUT_S": "30"})
    assert s.get("/health").status == 200
    said = [line for line in s.stderr().splitlines() if "warning" in line]
    assert said == [f'accman: warning: {name} is not a setting of the server, ignored (its '
                    'settings: docs/SERVER.md, "Limits")'
                    for name in ("ACCMAN_HOLDS_MAX", "ACCMAN_IDLE_TIMEOUT")]


def test_ignored_names_are_those_nothing_reads():
    env = {"ACCMAN_HOLDS_MAX": "1", "ACCMAN_TOKEN": "t", "ACCMAN_LINGER_S": "1",
           "ACCMAN_": "x", "PATH": "/bin", "accman_linger_s": "1"}
    assert ServerLimits.ignored_names(env) == ["ACCMAN_", "ACCMAN_HOLDS_MAX"]


def test_every_accman_variable_the_project_reads_is_known_to_the_server():
    """OTHER_NAMES is the list of what the rest of the project reads: a new
    variable read anywhere must be added there, or every server started
    beside it would warn of it."""
    read = set(READ.findall((ROOT / "setup.py").read_text()))
    for top in ("accman", "tests", "bench", "examples", "node"):
        for path in (ROOT / top).rglob("*"):
            if (path.suffix in (".py", ".js", ".ts", ".mjs") and path.is_file()
                    and "node_modules" not in path.parts):
                read.update(READ.findall(path.read_text(errors="replace")))
    assert "ACCMAN_URL" in read and "ACCMAN_ONLY" in read
    assert read == OTHER_NAMES
    assert not OTHER_NAMES & set(ServerLimits.names())


def test_every_variable_the_project_reads_is_documented():
    """A user meets the calling side's variables in CALLING.md, the
    examples' README or node/README.md, a developer the build's and the
    tests' in DESIGN.md."""
    docs = "".join((ROOT / p).read_text() for p in ("docs/CALLING.md", "docs/DESIGN.md",
                                                    "examples/README.md", "node/README.md"))
    assert sorted(n for n in OTHER_NAMES if not re.search(rf"\b{n}\b", docs)) == []


@pytest.mark.parametrize("name,raw", [
    ("ACCMAN_WEBHOOK_LINGER_S", "inf"), ("ACCMAN_WEBHOOK_BACKOFF_CAP_S", "1e400"),
    ("ACCMAN_HEAD_TIMEOUT_S", "nan"), ("ACCMAN_WEBHOOK_ATTEMPT_TIMEOUT_S", "1_0"),
    ("ACCMAN_IDLE_TIMEOUT_S", " 5"), ("ACCMAN_IDLE_TIMEOUT_S", "0"),
    ("ACCMAN_IDLE_TIMEOUT_S", "-1"), ("ACCMAN_IDLE_TIMEOUT_S", "1e3"),
    ("ACCMAN_LINGER_S", "604801"), ("ACCMAN_CONNECTIONS_MAX", "5.0"),
    ("ACCMAN_CONNECTIONS_MAX", "010"), ("ACCMAN_CONNECTIONS_MAX", "+5"),
    ("ACCMAN_CONNECTIONS_MAX", "2147483648"), ("ACCMAN_CONNECTIONS_MAX", "\u0665"),
    ("ACCMAN_CONNECTIONS_MAX", "9" * 5000),     # past int()'s digits limit: no ValueError
    ("ACCMAN_IDLE_TIMEOUT_S", "00.5"), ("ACCMAN_IDLE_TIMEOUT_S", "0.0001"),
    ("ACCMAN_IDLE_TIMEOUT_S", "604800.0000000001"),
])
def test_a_limit_override_is_plain_finite_and_bounded(name, raw):
    with pytest.raises(LimitsError, match=f"^{name}="):
        ServerLimits.from_env({name: raw})


def test_limit_overrides_in_plain_digits_are_taken():
    limits = ServerLimits.from_env({"ACCMAN_HEAD_TIMEOUT_S": ".5", "ACCMAN_IDLE_TIMEOUT_S": "5.",
                                    "ACCMAN_LINGER_S": "604800", "ACCMAN_CONNECTIONS_MAX": "64"})
    assert (limits.head_timeout_s, limits.idle_timeout_s, limits.linger_s,
            limits.connections_max) == (0.5, 5.0, 604800.0, 64)


@pytest.mark.parametrize("field,value", [
    ("head_timeout_s", 0), ("head_timeout_s", -1.0), ("idle_timeout_s", float("nan")),
    ("idle_timeout_s", float("inf")), ("linger_s", "5"), ("linger_s", True),
    ("connections_max", 0), ("connections_max", 5.0), ("connections_max", True),
    ("pipeline_requests_max", 2 ** 31), ("webhook_linger_s", None),
])
def test_a_limit_given_in_code_holds_to_an_overrides_range(field, value):
    """ServerLimits(...) from Python (accman.server.run's `limits`) is
    checked as the environment's overrides are: a timeout of 0 or NaN would
    make the sweep spin or never fire.  The message names the field and
    its variable."""
    with pytest.raises(LimitsError, match=rf"^{field} \(ACCMAN_{field.upper()}\)="):
        ServerLimits(**{field: value})


def test_the_defaults_and_limits_in_range_given_in_code_are_taken():
    limits = ServerLimits(head_timeout_s=0.001, idle_timeout_s=5, connections_max=2 ** 31 - 1)
    assert (limits.head_timeout_s, limits.idle_timeout_s, limits.connections_max) == (
        0.001, 5, 2 ** 31 - 1)
    assert ServerLimits() == ServerLimits.from_env({})
