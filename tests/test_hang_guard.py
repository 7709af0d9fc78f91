"""The suite's guard against a hung test (conftest.TEST_SECONDS_MAX): a run
of the suite's own plugin, in workers as CI runs it, on a test that hangs."""

import subprocess
import sys
import time
from pathlib import Path

TESTS = Path(__file__).resolve().parent

HUNG = """
import time

import conftest

conftest.TEST_SECONDS_MAX = 1


def test_quick():
    pass


def test_hangs():
    time.sleep(60)
"""


def test_a_hung_test_is_named_with_its_stack_and_the_run_ends(tmp_path):
    (tmp_path / "test_inner.py").write_text(HUNG)
    began = time.monotonic()
    run = subprocess.run(
        [sys.executable, "-m", "pytest", "-p", "conftest", "-p", "no:cacheprovider",
         "-n", "2", "-q", "--rootdir", str(tmp_path), str(tmp_path / "test_inner.py")],
        cwd=tmp_path, env={"PATH": "/usr/bin:/bin", "PYTHONPATH": str(TESTS)},
        capture_output=True, text=True, timeout=50)
    out = run.stdout + run.stderr
    assert run.returncode == 1, out
    assert "crashed while running 'test_inner.py::test_hangs'" in out, out
    assert "1 failed, 1 passed" in out, out
    # The hung test's own frame is in the stack printed.
    assert 'test_inner.py", line 14 in test_hangs' in out, out
    assert time.monotonic() - began < 40
