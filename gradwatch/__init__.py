"""gradwatch: see the gradients of every Keras training step, by variable name."""

from __future__ import annotations

import importlib
from typing import Any

from gradwatch.callback import GradWatch
from gradwatch.io import read_log
from gradwatch.log import GradientLog
from gradwatch.mixin import GradWatchMixin, Model, Sequential
from gradwatch.stats import DEFAULT_STATS, STATS

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_STATS",
    "STATS",
    "GradWatch",
    "GradWatchMixin",
    "GradientLog",
    "Model",
    "Sequential",
    "__version__",
    "read_log",
]


def __getattr__(name: str) -> Any:
    # `gradwatch.plot` is imported on first use, so that `import gradwatch` needs no
    # matplotlib. The command line, report and TensorBoard modules are imported by name.
    if name == "plot":
        return importlib.import_module("gradwatch.plot")
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")
