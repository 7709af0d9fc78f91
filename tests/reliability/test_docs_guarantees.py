"""docs/GUARANTEES.md names, for each promise of the SPEC, the tests that
prove it.  A name that no longer exists would make a promise look tested
when it is not; a reliability test the page does not name is a promise
nobody wrote down.  Both are checked here, by reading the files (no import:
the modules run nothing)."""

import ast
import functools
import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
DOC = ROOT / "docs" / "GUARANTEES.md"
NAMED = re.compile(r"`?(tests/[\w/]+\.py)::(\w+)`?")


@functools.cache
def top_level_names(path):
    tree = ast.parse(path.read_text())
    names = set()
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef, ast.ClassDef)):
            names.add(node.name)
        elif isinstance(node, ast.Assign):
            names |= {t.id for t in node.targets if isinstance(t, ast.Name)}
    return frozenset(names)


def test_every_test_the_page_names_exists():
    named = NAMED.findall(DOC.read_text())
    assert len(named) > 50
    missing = []
    for file, name in sorted(set(named)):
        path = ROOT / file
        if not path.exists() or name not in top_level_names(path):
            missing.append(f"{file}::{name}")
    assert missing == [], missing


def test_every_reliability_test_is_named_on_the_page():
    named = set(NAMED.findall(DOC.read_text()))
    unnamed = []
    for path in sorted((ROOT / "tests" / "reliability").glob("test_*.py")):
        if path.name == Path(__file__).name:
            continue
        file = path.relative_to(ROOT).as_posix()
        for name in sorted(top_level_names(path)):
            if name.startswith("test_") and (file, name) not in named:
                unnamed.append(f"{file}::{name}")
    assert unnamed == [], unnamed


def test_every_named_limit_has_a_row_that_names_its_tests():
    """accman/limits.py says each bound has a test that reaches it: the
    page's Limits table has a row for each, naming at least one test."""
    section = DOC.read_text().split("\n## Limits\n", 1)[1].split("\n## ", 1)[0]
    rows = {}
    for line in section.splitlines():
        cells = line.split(" | ")
        if line.startswith("| `") and len(cells) >= 3:
            for name in re.findall(r"`([A-Z][A-Z0-9_]+)`", cells[0]):
                rows[name] = NAMED.findall(cells[-1])
    limits = {name for name in top_level_names(ROOT / "accman" / "limits.py")
              if name.isupper()}
    assert sorted(limits - set(rows)) == []
    assert sorted(name for name in limits if not rows[name]) == []
