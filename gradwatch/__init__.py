"""gradwatch: see the gradients of every Keras training step, by variable name."""

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
