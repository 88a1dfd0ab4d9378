"""The package's internal contract (docs/architecture.md): the backend is asked in one
place, and modules talk through public names."""

from __future__ import annotations

import ast
from pathlib import Path

import gradwatch

PACKAGE = Path(gradwatch.__file__).parent


def _sources() -> dict[str, ast.Module]:
    out = {}
    for path in sorted(PACKAGE.rglob("*.py")):
        rel = path.relative_to(PACKAGE.parent).with_suffix("")
        name = ".".join(rel.parts).removesuffix(".__init__")
        out[name] = ast.parse(path.read_text(), filename=str(path))
    return out


def _asks_backend(tree: ast.Module) -> list[int]:
    """Lines that call `<something>.backend.backend()` or `keras.backend.backend()`."""
    return [
        node.lineno
        for node in ast.walk(tree)
        if isinstance(node, ast.Call)
        and isinstance(node.func, ast.Attribute)
        and node.func.attr == "backend"
        and isinstance(node.func.value, ast.Attribute)
        and node.func.value.attr == "backend"
    ]


def test_the_backend_is_asked_in_one_module():
    asking = {name: lines for name, tree in _sources().items() if (lines := _asks_backend(tree))}
    assert list(asking) == ["gradwatch._backend"], asking
    assert len(asking["gradwatch._backend"]) == 1


def test_shared_modules_never_compare_backend_names():
    # The chosen backend's name is for messages; behaviour comes from its module.
    names = {"tensorflow", "jax", "torch", "numpy"}
    found = []
    for name, tree in _sources().items():
        if name.startswith("gradwatch._backend"):
            continue
        for node in ast.walk(tree):
            if isinstance(node, ast.Compare):
                consts = [
                    c.value
                    for c in [node.left, *node.comparators]
                    if isinstance(c, ast.Constant) and isinstance(c.value, str)
                ]
                if names & set(consts):
                    found.append((name, node.lineno))
    assert found == []


def test_no_module_imports_another_modules_private_names():
    modules = set(_sources())
    found = []
    for name, tree in _sources().items():
        for node in ast.walk(tree):
            if not isinstance(node, ast.ImportFrom) or node.level or not node.module:
                continue
            if not node.module.startswith("gradwatch"):
                continue
            for alias in node.names:
                is_module = f"{node.module}.{alias.name}" in modules
                dunder = alias.name.startswith("__")
                if alias.name.startswith("_") and not dunder and not is_module:
                    found.append((name, node.module, alias.name))
    assert found == []


def _protocol_members() -> set[str]:
    tree = ast.parse((PACKAGE / "_backend" / "base.py").read_text())
    (cls,) = [n for n in tree.body if isinstance(n, ast.ClassDef) and n.name == "Backend"]
    out = set()
    for node in cls.body:
        if isinstance(node, ast.FunctionDef):
            out.add(node.name)
        elif isinstance(node, ast.AnnAssign):
            out.add(node.target.id)
    return out


def _module_names(path: Path) -> set[str]:
    out = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, (ast.FunctionDef, ast.ClassDef)):
            out.add(node.name)
        elif isinstance(node, ast.Assign):
            out.update(t.id for t in node.targets if isinstance(t, ast.Name))
        elif isinstance(node, ast.AnnAssign):
            out.add(node.target.id)
        elif isinstance(node, ast.ImportFrom):
            out.update(a.asname or a.name for a in node.names)
    return out


def test_each_recording_backend_implements_the_whole_protocol():
    members = _protocol_members()
    assert {"run_step", "write_slot", "OPS", "sum_of_squares", "bincount"} <= members
    for name in ("tensorflow", "jax", "torch"):
        missing = members - _module_names(PACKAGE / "_backend" / f"{name}.py")
        # Only TensorFlow makes sparse gradients (`IndexedSlices`).
        assert missing <= {"sparse_stats"}, (name, missing)
