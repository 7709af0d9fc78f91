"""The layout's bounds (issue 12): no Python module of accman/ over 500
lines, no Cython source over 650, no function over 80 lines.  A file or a
function past them is doing two jobs.  A part moved out of a module into
a .pxi names in its header the one .pyx that includes it, and
docs/DESIGN.md's module table names it."""

from __future__ import annotations

import ast
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
PY_LINES_MAX = 500
PYX_LINES_MAX = 650
FUNCTION_LINES_MAX = 80

PY = sorted((ROOT / "accman").rglob("*.py"))
PYX = sorted((ROOT / "ext").glob("*.pyx")) + sorted((ROOT / "ext").glob("*.pxi")) \
    + sorted((ROOT / "ext").glob("*.pxd"))
_DEF = re.compile(r"^(\s*)(?:async\s+def|def|cdef|cpdef)\s+(?!class\b|enum\b)[^=]*\(")


def lines(path: Path) -> int:
    return len(path.read_text().splitlines())


@pytest.mark.parametrize("path", PY, ids=lambda p: str(p.relative_to(ROOT)))
def test_python_modules_and_their_functions_are_short(path):
    assert lines(path) <= PY_LINES_MAX
    tree = ast.parse(path.read_text())
    long = [f"{node.name} ({node.end_lineno - node.lineno + 1} lines)"
            for node in ast.walk(tree)
            if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
            and node.end_lineno - node.lineno + 1 > FUNCTION_LINES_MAX]
    assert long == []


def cython_functions(text: str):
    """(name, length) of each function of a Cython file: from its `def`
    line to the next line indented no deeper (blank lines not counted)."""
    rows = text.splitlines()
    for i, row in enumerate(rows):
        m = _DEF.match(row)
        if m is None:
            continue
        indent = len(m.group(1))
        end = i + 1
        while end < len(rows) and (not rows[end].strip()
                                   or len(rows[end]) - len(rows[end].lstrip()) > indent
                                   or rows[end].lstrip().startswith(")")):
            end += 1
        while end > i + 1 and not rows[end - 1].strip():
            end -= 1
        yield row.strip()[:60], end - i


@pytest.mark.parametrize("path", PYX, ids=lambda p: str(p.relative_to(ROOT)))
def test_cython_sources_and_their_functions_are_short(path):
    assert lines(path) <= PYX_LINES_MAX
    long = [f"{name} ({n} lines)" for name, n in cython_functions(path.read_text())
            if n > FUNCTION_LINES_MAX]
    assert long == []


def test_the_function_measure_counts_a_function_whole():
    text = "cdef int f(int a,\n          int b):\n    x = 1\n\n    return x\n\ndef g():\n    pass\n"
    assert list(cython_functions(text)) == [("cdef int f(int a,", 5), ("def g():", 2)]


PXI = sorted((ROOT / "ext").glob("*.pxi"))
_INCLUDED_BY = re.compile(r"Included by\s+(\w+\.pyx)")


@pytest.mark.parametrize("path", PXI, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_include_file_is_included_by_the_module_its_header_names(path):
    # A .pxi is part of one module, moved out to keep that module short: its
    # header says which, and that module alone includes it.  An orphan would
    # pass every bound above and compile into nothing.
    rows = path.read_text().splitlines()
    header = rows[:next((i for i, row in enumerate(rows) if not row.startswith("#")), len(rows))]
    head = " ".join(row.lstrip("# ") for row in header)
    named = _INCLUDED_BY.search(head)
    assert named is not None, "the header comment must say which .pyx includes it"
    line = re.compile(rf'^include "{re.escape(path.name)}"$', re.M)
    includers = sorted(p.name for p in (ROOT / "ext").glob("*.pyx") if line.search(p.read_text()))
    assert includers == [named.group(1)]


@pytest.mark.parametrize("path", PXI, ids=lambda p: str(p.relative_to(ROOT)))
def test_each_include_file_is_named_in_the_design_s_module_table(path):
    # docs/DESIGN.md's module table is where a stranger learns which file
    # holds what; a part moved out of a module is named there beside it.
    rows = [row for row in (ROOT / "docs" / "DESIGN.md").read_text().splitlines()
            if row.startswith("| `ext/")]
    assert any(f"`{path.name}`" in row or f"`ext/{path.name}`" in row for row in rows)


def wait_for_calls(tree) -> list:
    """The lines that name asyncio's wait_for, called or imported."""
    found = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Attribute) and node.attr == "wait_for" and \
                isinstance(node.value, ast.Name) and node.value.id == "asyncio":
            found.append(node.lineno)
        elif isinstance(node, ast.ImportFrom) and node.module == "asyncio" and \
                any(alias.name == "wait_for" for alias in node.names):
            found.append(node.lineno)
    return found


def test_the_wait_for_finder_finds_a_call_and_an_import():
    text = "import asyncio\nfrom asyncio import wait_for\nasyncio.wait_for(f(), 1)\n"
    assert sorted(wait_for_calls(ast.parse(text))) == [2, 3]


@pytest.mark.parametrize("path", PY, ids=lambda p: str(p.relative_to(ROOT)))
def test_no_module_bounds_an_await_with_asyncio_wait_for(path):
    # Before Python 3.12 it loses a cancel that lands as its call
    # completes; accman.deadline's `within` bounds an await without that.
    assert wait_for_calls(ast.parse(path.read_text())) == []
