"""TensorFlow, imported on first use, so that other Keras backends never load it."""

from __future__ import annotations

import importlib
from typing import Any


class _LazyModule:
    """A module that is imported when one of its attributes is first read."""

    def __init__(self, name: str) -> None:
        self._name = name

    def __getattr__(self, attr: str) -> Any:
        # Only reached for names not set on the instance; `importlib` caches the module.
        return getattr(importlib.import_module(self._name), attr)


tf: Any = _LazyModule("tensorflow")
