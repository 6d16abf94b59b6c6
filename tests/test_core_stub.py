"""python/fastspawn/_core.pyi describes the compiled module: the same names, and for every
function and method the same parameters (names, order, keyword-only, which have defaults),
read from the signatures pybind11 writes into each docstring."""

import ast
import re
from pathlib import Path
from typing import Dict, List, Tuple

import pytest

from fastspawn import _core

STUB = Path(_core.__file__).with_name("_core.pyi")
if not STUB.exists():  # an editable install keeps the compiled module elsewhere
    STUB = Path(__file__).resolve().parent.parent / "python" / "fastspawn" / "_core.pyi"

# (name, keyword-only, has a default) per parameter, self left out
Params = List[Tuple[str, bool, bool]]


def _stub_params(fn: ast.FunctionDef) -> Params:
    args = fn.args
    positional = [a.arg for a in args.args]
    defaults = [False] * (len(positional) - len(args.defaults)) + [True] * len(args.defaults)
    out = [(name, False, has) for name, has in zip(positional, defaults)]
    out += [(a.arg, True, d is not None) for a, d in zip(args.kwonlyargs, args.kw_defaults)]
    return [p for p in out if p[0] != "self"]


def _runtime_params(obj: object, name: str) -> Params:
    first = (obj.__doc__ or "").splitlines()[0]
    match = re.match(rf"{re.escape(name)}\((.*)\) ->", first)
    assert match, f"no pybind11 signature in the docstring of {name}: {first!r}"
    out: Params = []
    keyword_only = False
    depth = 0
    current = ""
    parts = []
    for ch in match.group(1):  # split on top-level commas (types hold brackets)
        depth += ch in "[(" and 1 or 0
        depth -= ch in "])" and 1 or 0
        if ch == "," and depth == 0:
            parts.append(current.strip())
            current = ""
        else:
            current += ch
    if current.strip():
        parts.append(current.strip())
    for part in parts:
        if part == "*":
            keyword_only = True
            continue
        param = part.split(":", 1)[0].strip()
        if param != "self":
            out.append((param, keyword_only, "=" in part))
    return out


def _stub() -> Tuple[Dict[str, ast.FunctionDef], Dict[str, Dict[str, ast.FunctionDef]], set]:
    tree = ast.parse(STUB.read_text())
    functions: Dict[str, ast.FunctionDef] = {}
    classes: Dict[str, Dict[str, ast.FunctionDef]] = {}
    constants = set()
    for node in tree.body:
        if isinstance(node, ast.FunctionDef):
            functions[node.name] = node
        elif isinstance(node, ast.ClassDef):
            classes[node.name] = {n.name: n for n in node.body if isinstance(n, ast.FunctionDef)}
        elif isinstance(node, ast.AnnAssign) and isinstance(node.target, ast.Name):
            constants.add(node.target.id)
    return functions, classes, constants


def _public(names):
    return {n for n in names if not n.startswith("_") or n in ("__init__", "__len__")}


def test_the_stub_names_what_the_module_has():
    functions, classes, constants = _stub()
    runtime = {n for n in dir(_core) if not n.startswith("_")}
    assert set(functions) | set(classes) | constants == runtime


@pytest.mark.parametrize("name", sorted(n for n in dir(_core) if not n.startswith("_") and callable(getattr(_core, n))
                                        and not isinstance(getattr(_core, n), type)))
def test_module_function_parameters_match(name):
    functions, _, _ = _stub()
    assert _stub_params(functions[name]) == _runtime_params(getattr(_core, name), name)


@pytest.mark.parametrize("cls", ["Chunk", "Group"])
def test_class_members_and_parameters_match(cls):
    _, classes, _ = _stub()
    runtime_cls = getattr(_core, cls)
    members = _public(n for n in vars(runtime_cls) if n != "_pybind11_conduit_v1_")
    assert set(classes[cls]) == members
    for name, node in classes[cls].items():
        attr = vars(runtime_cls)[name]
        if isinstance(attr, property):
            assert any(isinstance(d, ast.Name) and d.id == "property" for d in node.decorator_list), name
            continue
        assert _stub_params(node) == _runtime_params(attr, name), f"{cls}.{name}"
