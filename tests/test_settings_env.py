"""The server's ACCMAN_* overrides (docs/SERVER.md, "Limits"): a variable
that names no setting of the server's, nor one another part of AccMan
reads, is said at start and ignored, never silently taken for one."""

import re
from pathlib import Path

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
