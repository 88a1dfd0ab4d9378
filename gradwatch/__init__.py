"""gradwatch: see the gradients of every Keras training step, by variable name."""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

from gradwatch._keras_hook import register_when_keras_loads
from gradwatch.io import read_log
from gradwatch.log import GradientLog
from gradwatch.stats import DEFAULT_STATS, STATS

if TYPE_CHECKING:  # for type checkers; imported on first use, below
    from gradwatch.callback import GradWatch
    from gradwatch.mixin import GradWatchMixin, Model, Sequential, record_gradients

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
    "record_gradients",
]

# Recording needs Keras; reading a saved log does not. The recording side is imported
# on first use, and `gradwatch.Sequential` and `gradwatch.Model` are registered with
# Keras as soon as Keras is imported, so that `keras.models.load_model` finds them.
_LAZY_NAMES = {
    "GradWatch": "gradwatch.callback",
    "GradWatchMixin": "gradwatch.mixin",
    "Model": "gradwatch.mixin",
    "Sequential": "gradwatch.mixin",
    "record_gradients": "gradwatch.mixin",
}
# Imported on first use: `gradwatch.plot` needs matplotlib, the others Keras. (The
# command line, report and TensorBoard modules are imported by name.)
_LAZY_MODULES = ("plot", "callback", "mixin", "buffer", "sparse")

register_when_keras_loads()


def __getattr__(name: str) -> Any:
    if name in _LAZY_NAMES:
        value = getattr(importlib.import_module(_LAZY_NAMES[name]), name)
        globals()[name] = value
        return value
    if name in _LAZY_MODULES:
        return importlib.import_module(f"gradwatch.{name}")
    raise AttributeError(f"module 'gradwatch' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_LAZY_NAMES, *_LAZY_MODULES})
