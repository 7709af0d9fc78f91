"""The type stubs of the native modules (accman/*/_*.pyi) say what each
module has: every class and function it defines is in its stub, every
name a stub gives exists, and a stub's class lists exactly the class's
public methods and attributes.  A stub that drifts misleads every editor
and type checker that reads it."""

import ast
import importlib
import inspect
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
MODULES = ["accman.server._wire", "accman.server._pipeline", "accman.ledger._ledger",
           "accman.ledger._check"]
# What Python gives a class by itself, never written in a stub.
IMPLICIT = set(dir(object)) | {"__init__", "__call__", "__len__", "__bool__", "__getitem__",
                               "__reduce_cython__", "__setstate_cython__", "__pyx_vtable__"}


def stub_of(name: str) -> dict:
    path = ROOT / (name.replace(".", "/") + ".pyi")
    tree = ast.parse(path.read_text())
    out = {}
    for node in tree.body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out[node.name] = node
        elif isinstance(node, ast.AnnAssign):
            out[node.target.id] = node
        elif isinstance(node, ast.Assign):
            for target in node.targets:
                out[target.id] = node
    return out


def members(node: ast.ClassDef) -> set:
    names = set()
    for item in node.body:
        if isinstance(item, ast.FunctionDef):
            names.add(item.name)
        elif isinstance(item, ast.AnnAssign):
            names.add(item.target.id)
    return names


def defined_here(mod) -> set:
    """The public classes and functions the module defines itself."""
    return {k for k, v in vars(mod).items()
            if not k.startswith("_") and (inspect.isclass(v) or callable(v))
            and getattr(v, "__module__", None) == mod.__name__}


@pytest.mark.parametrize("name", MODULES)
def test_a_stub_names_what_its_module_defines_and_nothing_else(name):
    mod = importlib.import_module(name)
    stub = stub_of(name)
    aliases = {k for k, v in stub.items() if isinstance(v, ast.Assign)}
    assert sorted(defined_here(mod) - set(stub)) == []
    assert sorted(k for k in set(stub) - aliases if not hasattr(mod, k)) == []


@pytest.mark.parametrize("name", MODULES)
def test_a_stub_s_classes_list_their_public_members(name):
    mod = importlib.import_module(name)
    for cls_name, node in stub_of(name).items():
        if not isinstance(node, ast.ClassDef):
            continue
        cls = getattr(mod, cls_name)
        runtime = {k for k in vars(cls) if not k.startswith("_")}
        listed = members(node) - IMPLICIT
        assert (cls_name, sorted(runtime - listed)) == (cls_name, [])
        assert (cls_name, sorted(listed - runtime)) == (cls_name, [])
