"""The calling side's layout (issue 12): a service that only calls AccMan
loads neither LevelDB (plyvel), nor uvloop, nor the ledger or the server,
and this holds by what the modules import, not by a lazy attribute; every
exception class lives in accman.errors; the import paths users already
write keep working."""

from __future__ import annotations

import ast
import importlib
import inspect
import json
import subprocess
import sys
from pathlib import Path

import pytest

import accman
from accman import errors

ROOT = Path(__file__).resolve().parents[1]
CALLING = sorted((ROOT / "accman" / "calling").glob("*.py"))
# What the calling side may import of AccMan: the leaf modules every part
# shares, itself, and the package (which imports only the leaves).
ALLOWED = ("accman.errors", "accman.limits", "accman.records", "accman.deadline",
           "accman.stdfds", "accman.calling")


def allowed(name: str) -> bool:
    return name == "accman" or name.startswith(ALLOWED)
FORBIDDEN_PREFIXES = ("plyvel", "uvloop", "accman.ledger", "accman.server")

ENTRY_POINTS = ["accman.calling.client", "accman.calling.asgi", "accman.calling.sync",
                "accman.client", "accman.asgi", "accman.cli"]


@pytest.mark.parametrize("module", ENTRY_POINTS)
def test_importing_the_calling_side_loads_no_ledger_server_plyvel_or_uvloop(module):
    code = (f"import json, sys\nimport {module}\n"
            "print(json.dumps(sorted(sys.modules)))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         cwd=ROOT, timeout=60, check=True).stdout
    loaded = json.loads(out)
    assert module in loaded                 # the probe did import it
    bad = [m for m in loaded if m.startswith(FORBIDDEN_PREFIXES)]
    assert bad == []


def accman_imports(path: Path, top_level_only: bool = False) -> list[str]:
    """The accman modules that `path` imports (module level only, when
    asked: a command may import the server inside the function that runs
    it)."""
    tree = ast.parse(path.read_text())
    nodes = tree.body if top_level_only else list(ast.walk(tree))
    names = []
    for node in nodes:
        if isinstance(node, ast.ImportFrom) and node.module:
            names.append(node.module)
            names += [f"{node.module}.{a.name}" for a in node.names if node.module == "accman"]
        elif isinstance(node, ast.Import):
            names += [a.name for a in node.names]
    return [n for n in names if n == "accman" or n.startswith("accman.")]


@pytest.mark.parametrize("path", CALLING, ids=lambda p: p.name)
def test_the_calling_side_imports_only_the_shared_leaves_and_itself(path):
    bad = [n for n in accman_imports(path) if not allowed(n)]
    assert bad == []


def test_the_cli_imports_the_ledger_and_the_server_only_to_serve_and_verify():
    cli = ROOT / "accman" / "cli.py"
    bad = [n for n in accman_imports(cli, top_level_only=True) if not allowed(n)]
    assert bad == []


def test_the_shared_leaves_and_the_package_import_no_part():
    for leaf in ("errors", "limits", "records", "deadline", "stdfds"):
        assert accman_imports(ROOT / "accman" / f"{leaf}.py") == []
    init = accman_imports(ROOT / "accman" / "__init__.py", top_level_only=True)
    assert init and all(allowed(n) for n in init)


# Every module of the calling side, and the command line: found, not listed,
# so that a new module is checked too.
CALLING_MODULES = sorted(f"accman.calling.{p.stem}" for p in
                         (ROOT / "accman" / "calling").glob("*.py")
                         if p.stem != "__init__") + ["accman.cli"]


@pytest.mark.parametrize("module", CALLING_MODULES)
def test_every_exception_class_is_in_accman_errors(module):
    mod = importlib.import_module(module)
    own = [name for name, obj in vars(mod).items()
           if inspect.isclass(obj) and issubclass(obj, BaseException)
           and obj.__module__ == mod.__name__]
    assert own == []


def test_the_import_paths_users_write_keep_working():
    from accman import AccManError, Ledger
    from accman.asgi import AccManMiddleware
    from accman.client import AccManClient, AccManSyncClient, OutcomeUnknown, Unreachable
    from accman.ledger import Ledger as LedgerItself

    assert Ledger is LedgerItself and AccManError is errors.AccManError
    assert importlib.import_module("accman.client") is importlib.import_module(
        "accman.calling.client")
    assert importlib.import_module("accman.asgi") is importlib.import_module(
        "accman.calling.asgi")
    assert AccManMiddleware.__module__ == "accman.calling.asgi"
    assert AccManSyncClient.__module__ == "accman.calling.sync" and AccManClient
    assert OutcomeUnknown is errors.OutcomeUnknown and Unreachable is errors.Unreachable
    assert accman.Entry.__module__ == "accman.records"


SIZE_LIMITS = {".py": 500}
FUNCTION_LINES_MAX = 80


@pytest.mark.parametrize("path", CALLING + [ROOT / "accman" / "cli.py",
                                            ROOT / "accman" / "__init__.py"],
                         ids=lambda p: p.name)
def test_files_and_functions_of_the_calling_side_stay_small(path):
    text = path.read_text()
    assert len(text.splitlines()) <= SIZE_LIMITS[".py"]
    long_functions = [
        node.name for node in ast.walk(ast.parse(text))
        if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))
        and node.end_lineno - node.lineno + 1 > FUNCTION_LINES_MAX]
    assert long_functions == []


def test_the_names_the_docs_say_are_importable_are():
    """CALLING.md: every error of its table is importable from accman.client;
    the client's bounds from accman.client and the middleware's from
    accman.asgi.  README: the errors it names are importable from accman."""
    import re

    import accman.asgi
    import accman.client
    calling = (ROOT / "docs" / "CALLING.md").read_text()
    table = calling.split("### Errors", 1)[1].split("\n\n", 2)[1]
    flat = set(re.findall(r"^\| `(\w+)`", table, re.MULTILINE))
    flat |= {n for pair in re.findall(r"\(`(\w+)`, `(\w+)`\)", table) for n in pair}
    assert {"NoAccount", "HoldEnded", "Unavailable", "CallTimeout"} <= flat
    for name in flat:
        assert hasattr(accman.client, name), name
    limits = calling.split("## Limits", 1)[1].split("\n## ", 1)[0]
    rows = re.findall(r"^\| `(\w+)\.(\w+)`(?: / `(\w+)`)?(?:, `(\w+)`)?", limits, re.MULTILINE)
    where = {"policy": accman.client, "client": accman.client, "parser": accman.client,
             "replies": accman.client, "asgi": accman.asgi, "owed": accman.asgi,
             "settings": accman.asgi,
             "disconnect": accman.asgi}
    checked = 0
    for module, *names in rows:
        if module in where:
            for name in filter(None, names):
                assert hasattr(where[module], name), f"{module}.{name}"
                checked += 1
    assert checked >= 25, rows
    readme = (ROOT / "README.md").read_text()
    listed = re.search(r"Errors are `AccManError` subclasses[^(]*\(([^)]*)\)", readme).group(1)
    for name in re.findall(r"`(\w+)`", listed):
        assert name in accman.__all__ and hasattr(accman, name), name
    for name in ("TooManyHolds", "HoldEnded", "NoHold", "EventsTrimmed"):
        assert name in accman.__all__, name


def test_the_node_client_keeps_the_python_client_s_redaction_bounds():
    """node/src/errors.js mirrors accman/calling/replies.py: the same detail
    cut and the same shortest piece of a secret put out of sight."""
    import re

    from accman.calling import replies
    js = (ROOT / "node" / "src" / "errors.js").read_text()
    for name in ("DETAIL_CHARS_MAX", "SECRET_PIECE_CHARS_MIN"):
        m = re.search(rf"^const {name} = (\d+)$", js, re.MULTILINE)
        assert m is not None and int(m.group(1)) == getattr(replies, name), name


def python_samples(doc: str) -> list[str]:
    """The ```python blocks of a page of the docs, in order."""
    text = (ROOT / doc).read_text()
    return [block.split("\n```", 1)[0] for block in text.split("```python\n")[1:]]


@pytest.mark.parametrize("doc", ["README.md", "docs/CALLING.md", "examples/README.md"])
def test_every_python_sample_of_the_calling_docs_compiles(doc):
    """A sample pasted into a file runs as Python: no `async with` or
    `await` outside a coroutine, which stops the file before its first
    line."""
    samples = python_samples(doc)
    assert samples
    for n, code in enumerate(samples, 1):
        compile(code, f"{doc} sample {n}", "exec")


@pytest.mark.parametrize("doc, heading", [("README.md", "## Charging per request"),
                                          ("docs/CALLING.md", "## The middleware in a service"),
                                          ("examples/README.md", "# A paid API in a dozen lines")])
def test_the_middleware_samples_build_their_app(doc, heading, monkeypatch):
    """The middleware's samples, run as written from the repository root,
    make the paid app: every name they use is defined or imported."""
    from accman.asgi import AccManMiddleware
    monkeypatch.syspath_prepend(str(ROOT))
    section = (ROOT / doc).read_text().split(heading + "\n", 1)[1]
    code = section.split("```python\n", 1)[1].split("\n```", 1)[0]
    namespace: dict = {}
    exec(compile(code, f"{doc} {heading}", "exec"), namespace)
    assert isinstance(namespace["app"], AccManMiddleware)
