"""Registers gradwatch's models with Keras once Keras is imported, so that `import gradwatch`
alone imports no Keras.

`keras.models.load_model` finds the class of a saved `gradwatch.Sequential` or
`gradwatch.Model` only among the registered serializable objects (it imports no
module outside Keras), and `gradwatch.mixin` registers them when it is imported.
`register_when_keras_loads` imports it at once if Keras is already imported, and
otherwise right after Keras finishes importing: a finder on `sys.meta_path` hands
the import of `keras` to the other finders and wraps the loader they return.
"""

from __future__ import annotations

import contextlib
import importlib
import sys

# `typing`, `types` and `importlib.abc` are left out at run time: `import gradwatch` (and so
# `gradwatch --help`) stays about as fast as a bare Python start.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from types import ModuleType
    from typing import Any

_KERAS = "keras"
_REGISTERS = "gradwatch.mixin"


def register_when_keras_loads() -> None:
    """Imports `gradwatch.mixin` now if Keras is imported, else once Keras is.

    Example:

    ```python
    register_when_keras_loads()  # in gradwatch/__init__.py
    ```
    """
    if _KERAS in sys.modules:
        importlib.import_module(_REGISTERS)
    elif not any(isinstance(f, KerasFinder) for f in sys.meta_path):
        sys.meta_path.insert(0, KerasFinder())


class KerasFinder:  # an `importlib.abc.MetaPathFinder`
    """Finds `keras` with the finders after it, and wraps the loader they give."""

    def find_spec(self, name: str, path: Any = None, target: Any = None) -> Any:
        if name != _KERAS:
            return None
        for finder in list(sys.meta_path):
            find = getattr(finder, "find_spec", None)
            if finder is self or find is None:
                continue
            spec = find(name, path, target)
            if spec is not None:
                if spec.loader is not None and hasattr(spec.loader, "exec_module"):
                    spec.loader = ThenRegister(spec.loader, self)
                return spec
        return None


class ThenRegister:  # an `importlib.abc.Loader`
    """Keras' own loader, then the import of `gradwatch.mixin`.

    Keras' module sees only its own loader (`__loader__`, `__spec__.loader`): this
    one is called by the import system, once.
    """

    def __init__(self, loader: Any, finder: KerasFinder):
        self.loader = loader
        self.finder = finder

    def create_module(self, spec: Any) -> ModuleType | None:
        create = getattr(self.loader, "create_module", None)
        return None if create is None else create(spec)

    def exec_module(self, module: ModuleType) -> None:
        if getattr(module, "__loader__", None) is self:
            module.__loader__ = self.loader
        spec = getattr(module, "__spec__", None)
        if spec is not None and spec.loader is self:
            spec.loader = self.loader
        self.loader.exec_module(module)  # Keras, whole
        # Keras is in: the finder's work is done (a failed import above keeps it, to retry).
        with contextlib.suppress(ValueError):
            sys.meta_path.remove(self.finder)
        # The import of Keras must not fail for gradwatch: if the mixin cannot be
        # imported, `gradwatch.Sequential` raises the same error when first used.
        with contextlib.suppress(Exception):
            importlib.import_module(_REGISTERS)
