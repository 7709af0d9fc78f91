"""The command line's client commands when things go wrong, against a real
AccMan: a URL whose host cannot be used, a 503 from a store that cannot
commit, ^C while a call is in flight, a closed stdout, a mistyped flag.
Faults a real server does not make on demand come from FaultProxy, a TCP
proxy in front of it.  Every message is one line, never a traceback, and
never shows a credential."""

from __future__ import annotations

import pytest

from conftest import run_accman
from test_cli import one_line_error

# --- a URL whose host cannot be used ----------------------------------------------------

@pytest.mark.parametrize("host", ["bücher.example", "a..b", "x" * 64 + ".example"])
@pytest.mark.parametrize("args", [["tot", "abc"], ["mod", "abc", "-1"], ["open", "--by", "5"],
                                  ["events", "--follow"]])
def test_a_host_that_cannot_be_used_is_one_line_and_exit_2(host, args):
    """Non-ASCII (Python cannot encode it for the request) or not IDNA
    labels (nor for the connection): either way nothing is sent."""
    err = one_line_error(run_accman(*args, "--url", f"http://{host}:8080"))
    assert "the host in the URL cannot be used" in err and "xn--" in err
    assert f"accman {args[0]} --help" in err
