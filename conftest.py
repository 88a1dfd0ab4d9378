"""Collection rules for the whole tree (`testpaths` holds `tests` and the package, whose
doctests are collected): a backend module whose library is not installed is not collected.

The README's test command installs only the test extra, without PyTorch or JAX; their
backend modules import them at the top, so collecting them there would stop pytest before
any test ran. The tests that need a missing backend skip with the line that installs it
(`tests/test_backends.py`), or fail in CI, where `.ci/run` installs every backend."""

import importlib.util

collect_ignore = [
    f"gradwatch/_backend/{module}.py"
    for module, library in (("torch", "torch"), ("jax", "jax"))
    if importlib.util.find_spec(library) is None
]
