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
    assert {"gradients_of", "first_nonfinite_op"} <= members  # the replay (`_forensics`)
    for name in ("tensorflow", "jax", "torch"):
        missing = members - _module_names(PACKAGE / "_backend" / f"{name}.py")
        # Only TensorFlow makes sparse gradients (`IndexedSlices`).
        assert missing <= {"sparse_sums"}, (name, missing)


# The read side: what reads, queries, diagnoses, draws and reports a saved log, and what it
# stands on: every module of the read side's subpackages (the log's data and files, the
# doctor, what the charts, report and CLI share), the stat specs, and these public modules.
READ_PACKAGES = ("gradwatch._logdata", "gradwatch._doctor", "gradwatch._ui")
READ_PUBLIC = {
    "gradwatch.__main__",
    "gradwatch._stats.specs",
    "gradwatch.cli",
    "gradwatch.diagnose",
    "gradwatch.findings",
    "gradwatch.io",
    "gradwatch.keys",
    "gradwatch.log",
    "gradwatch.plot",
    "gradwatch.progress",
    "gradwatch.report",
    "gradwatch.sinks",
    "gradwatch.stats",
    "gradwatch.tensorboard",
}
#: The private subpackages, by domain; a private module sits in one of them.
SUBPACKAGES = {"_backend", "_capture", "_doctor", "_forensics", "_logdata", "_stats", "_ui"}
READ_SIDE = READ_PUBLIC | {
    name for name in _sources() if name.startswith(tuple(p + "." for p in READ_PACKAGES))
}
_FRAMEWORKS = {"keras", "tensorflow", "jax", "torch"}


def _imported(tree: ast.Module, modules: set[str]) -> set[str]:
    """The modules an `import` statement anywhere in the file names (lazy ones too): the
    gradwatch module itself where one is named, else the top-level package."""
    out = set()
    for node in ast.walk(tree):
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
            names = [f"{node.module}.{a.name}" for a in node.names]
            names = [n if n in modules else node.module for n in names]
        else:
            continue
        out.update(n if n in modules else n.split(".")[0] for n in names)
    return out


def test_the_read_side_never_imports_the_capture_the_backends_or_keras():
    # Reading a log needs neither Keras nor a backend: every gradwatch module the read
    # side imports is itself on the read side, so the rule holds at any depth.
    sources = _sources()
    modules = set(sources)
    assert modules >= READ_SIDE, READ_SIDE - modules
    found = {}
    for name in sorted(READ_SIDE):
        imported = _imported(sources[name], modules)
        outside = {m for m in imported if m.startswith("gradwatch.") and m not in READ_SIDE}
        if bad := outside | (imported & _FRAMEWORKS):
            found[name] = sorted(bad)
    assert found == {}
    # `gradwatch.stats` reaches its Keras code (`_compute`) through `importlib` on first use
    # of a computing function only (PEP 562); no other read-side module imports by name.
    dynamic = {
        name
        for name in READ_SIDE
        for node in ast.walk(sources[name])
        if isinstance(node, ast.Call) and getattr(node.func, "attr", "") == "import_module"
    }
    assert dynamic == {"gradwatch.stats"}


def test_private_modules_live_in_domain_subpackages_with_empty_inits():
    # The tree shows the architecture: at the top, the public modules (and `_lazy`, the
    # lazy loader `__init__` uses); every private module in a domain's subpackage, whose
    # `__init__.py` stays empty, so that importing one module loads no other.
    top = {p.stem for p in PACKAGE.glob("_*.py")} - {"__init__", "__main__"}
    assert top == {"_lazy"}
    packages = {p.name for p in PACKAGE.iterdir() if (p / "__init__.py").exists()}
    assert packages == SUBPACKAGES
    for name in SUBPACKAGES - {"_backend"}:
        assert (PACKAGE / name / "__init__.py").read_text() == "", name
    for package in READ_PACKAGES:
        assert any(m.startswith(package + ".") for m in READ_SIDE), package
