"""gradwatch: see the gradients of every Keras training step, by variable name."""

from __future__ import annotations

import importlib

from gradwatch._capture.keras_hook import register_when_keras_loads

TYPE_CHECKING = False  # not `typing`'s: `import gradwatch` imports nothing it can leave out
if TYPE_CHECKING:  # for type checkers; imported on first use, below
    from typing import Any

    from gradwatch._forensics.origin import NonfiniteOrigin
    from gradwatch._forensics.replay import trace_nonfinite
    from gradwatch.callback import GradWatch
    from gradwatch.io import read_log
    from gradwatch.log import GradientLog
    from gradwatch.mixin import GradWatchMixin, Model, Sequential, record_gradients
    from gradwatch.sinks import Sink, SinkBlock
    from gradwatch.stats import DEFAULT_STATS, STATS

__version__ = "0.1.0"

__all__ = [
    "DEFAULT_STATS",
    "STATS",
    "GradWatch",
    "GradWatchMixin",
    "GradientLog",
    "Model",
    "NonfiniteOrigin",
    "Sequential",
    "Sink",
    "SinkBlock",
    "__version__",
    "read_log",
    "record_gradients",
    "trace_nonfinite",
]

# Every public name is imported on first use, so that `import gradwatch` costs about
# nothing (`gradwatch --help` starts as fast as Python): reading a log needs NumPy,
# pandas and pyarrow, recording needs Keras. `gradwatch.Sequential` and
# `gradwatch.Model` are registered with Keras as soon as Keras is imported, so that
# `keras.models.load_model` finds them.
_LAZY_NAMES = {
    "DEFAULT_STATS": "gradwatch.stats",
    "STATS": "gradwatch.stats",
    "GradientLog": "gradwatch.log",
    "read_log": "gradwatch.io",
    "GradWatch": "gradwatch.callback",
    "GradWatchMixin": "gradwatch.mixin",
    "Model": "gradwatch.mixin",
    "Sequential": "gradwatch.mixin",
    "record_gradients": "gradwatch.mixin",
    "Sink": "gradwatch.sinks",
    "SinkBlock": "gradwatch.sinks",
    "NonfiniteOrigin": "gradwatch._forensics.origin",
    "trace_nonfinite": "gradwatch._forensics.replay",
}
# Imported on first use: `gradwatch.plot` needs matplotlib, `callback`, `mixin`,
# `buffer` and `sparse` Keras, `sinks` NumPy, the others pandas. (The command line, report and
# TensorBoard modules are imported by name.)
_LAZY_MODULES = (
    "plot",
    "callback",
    "mixin",
    "buffer",
    "sparse",
    "sinks",
    "io",
    "log",
    "stats",
    "keys",
)

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
