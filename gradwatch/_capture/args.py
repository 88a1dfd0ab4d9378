"""The checks of `GradWatch`'s arguments, and of the model and strategy it is given:
each bad value gets an error that names the argument, what was received, and how to
fix it."""

from __future__ import annotations

import inspect
import os
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch._capture.alarms import NONFINITE_POLICIES, POLICIES
from gradwatch.stats import DEFAULT_BINS_PER_DECADE


def call_repr(
    name: str,
    parameters: Mapping[str, inspect.Parameter],
    given: Mapping[str, Any],
    always: Sequence[str],
) -> str:
    """`name(arg=value, ...)`, as a call reads: the `always` arguments, and each other
    one of `given` that differs from its default in `parameters`."""
    shown = []
    for arg, parameter in parameters.items():
        value = given.get(arg, parameter.default)
        if arg in always or not _same(value, parameter.default):
            shown.append(f"{arg}={_show(value)}")
    return f"{name}({', '.join(shown)})"


def _same(value: Any, default: Any) -> bool:
    if value is default:
        return True
    try:
        return bool(type(value) is type(default) and value == default)
    except Exception:  # an array-like compares elementwise: not the default
        return False


def _show(value: Any) -> str:
    """An argument as it reads in a call (a path as its string)."""
    if isinstance(value, os.PathLike):
        return repr(os.fspath(value))
    return repr(value)


def check_flag(value: Any, arg: str) -> bool:
    if not isinstance(value, (bool, np.bool_)):
        raise TypeError(f"`{arg}` must be True or False. Received: {arg}={value!r}")
    return bool(value)


def check_verbose(value: Any) -> int | str:
    """`GradWatch(verbose=...)`: 0, 1 or "auto"."""
    if value == "auto" or (value in (0, 1) and not isinstance(value, (bool, str))):
        return value if value == "auto" else int(value)
    raise ValueError(
        f'`verbose` must be 0 (silent), 1 (print the findings at the end of fit) or "auto" '
        f"(print them unless fit(verbose=0)). Received: verbose={value!r}"
    )


def check_count(value: Any, arg: str) -> int:
    """An integer >= 1 (not a bool)."""
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
        raise TypeError(f"`{arg}` must be an integer >= 1. Received: {arg}={value!r}")
    if value < 1:
        raise ValueError(f"`{arg}` must be an integer >= 1. Received: {arg}={value!r}")
    return int(value)


def check_optional_count(value: Any, arg: str) -> int | None:
    """None, or an integer >= 1 (not a bool)."""
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, np.integer)) or value < 1:
        raise ValueError(f"`{arg}` must be an integer >= 1, or None. Received: {arg}={value!r}")
    return int(value)


def check_threshold(value: Any, arg: str) -> float | None:
    number = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if value is not None and (not number or not value >= 0):
        raise ValueError(f"`{arg}` must be a number >= 0, or None. Received: {arg}={value!r}")
    return None if value is None else float(value)


def check_positive(value: Any, arg: str) -> float:
    """A finite number > 0 (not a bool)."""
    number = isinstance(value, (int, float, np.integer, np.floating))
    if isinstance(value, bool) or not number or not 0 < value < float("inf"):
        raise ValueError(f"`{arg}` must be a finite number > 0. Received: {arg}={value!r}")
    return float(value)


def check_policy(value: Any, arg: str) -> str:
    allowed = NONFINITE_POLICIES if arg in ("on_nonfinite", "on_spike") else POLICIES
    if value not in allowed:
        raise ValueError(f"`{arg}` must be one of {list(allowed)}. Received: {arg}={value!r}")
    return value


def check_path(value: Any) -> Path | None:
    if value is not None and not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            "`path` must be a directory path (str or os.PathLike), or None. "
            f"Received: path={value!r}"
        )
    return None if value is None else Path(value)


def check_histogram(histogram: Any) -> int:
    if histogram is True:
        return DEFAULT_BINS_PER_DECADE
    if histogram is False or histogram is None:
        return 0
    if isinstance(histogram, (int, np.integer)) and not isinstance(histogram, bool):
        if 1 <= histogram <= 100:
            return int(histogram)
        raise ValueError(
            "`histogram` as a number is the bins per decade of |g|, from 1 to 100. "
            f"Received: histogram={histogram!r}"
        )
    raise TypeError(
        "`histogram` must be True, False, or a number of bins per decade such as 8. "
        f"Received: histogram={histogram!r}"
    )


def check_tensorboard_dir(value: Any, stats: Sequence[str], histogram: int) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            "`tensorboard_dir` must be a directory path (str or os.PathLike), or None. "
            f"Received: tensorboard_dir={value!r}"
        )
    if "norm" not in stats and not histogram:
        raise ValueError(
            "`tensorboard_dir` writes the `norm` stat and histograms, and this GradWatch "
            f"records neither (stats={list(stats)}, histogram=False). Add 'norm' to `stats` "
            f"or pass histogram=True. Received: tensorboard_dir={str(value)!r}"
        )
    return Path(value)


def check_model(model: Any, backend: Any, backend_name: str) -> None:
    """Refuses a model whose steps gradwatch cannot see, or a backend it does not record."""
    if not getattr(type(model).train_step, "_gradwatch_counted", False):
        raise TypeError(
            f"The `train_step` of {type(model).__qualname__} comes from a class that is "
            "listed before `gradwatch.GradWatchMixin` in its bases, so gradwatch cannot "
            "see its gradients. Put the mixin first: "
            f"`class {type(model).__name__}(gradwatch.GradWatchMixin, keras.Model): ...`"
        )
    if not backend.RECORDS:
        raise NotImplementedError(
            "gradwatch records gradients with the TensorFlow, PyTorch and JAX backends of "
            f"Keras. Received: KERAS_BACKEND={backend_name!r}. "
            "Set KERAS_BACKEND to one of them before importing keras."
        )
    backend.check_strategy(model)


def unsupported_settings(watch: Any, backend: Any, backend_name: str) -> None:
    """Refuses the settings that gradwatch does not yet record on this backend."""
    if watch.per_replica and not backend.DISTRIBUTES:
        raise NotImplementedError(
            f"GradWatch does not yet record per_replica=True on the {backend_name} "
            "backend of Keras. `per_replica` records each replica's local gradient under "
            "`tf.distribute`; on this backend, also under `keras.distribution` "
            "(`DataParallel`, `ModelParallel`), the step computes the global batch's "
            "gradient as one computation, sharded over the devices, and no device's "
            "local gradient exists. That global gradient is what GradWatch records: "
            "drop per_replica=True. For each replica's local gradient, train with "
            "KERAS_BACKEND=tensorflow under `tf.distribute.MirroredStrategy`."
        )


def check_sinks(value: Any) -> list[Any]:
    """`GradWatch(sinks=...)`: a list of objects with `write(block)` and `close()`."""
    if value is None:
        return []
    if not isinstance(value, (list, tuple)):
        raise TypeError(
            "`sinks` must be a list of sinks (objects with `write(block)` and `close()`; "
            f"see `gradwatch.Sink`), or None. Received: sinks={value!r}. "
            "For one sink, pass sinks=[sink]."
        )
    seen: set[int] = set()
    for i, sink in enumerate(value):
        received = f"Received: sinks[{i}]={sink!r}"
        if isinstance(sink, type):
            raise TypeError(
                f"`sinks` takes sink objects, not classes. {received}. "
                f"Pass an instance: sinks=[{sink.__name__}()]."
            )
        missing = [m for m in ("write", "close") if not callable(getattr(sink, m, None))]
        if missing:
            raise TypeError(
                "Each of `sinks` must have the methods `write(block)` and `close()` "
                f"(see `gradwatch.Sink`); {type(sink).__name__} lacks "
                f"{' and '.join(f'`{m}`' for m in missing)}. {received}"
            )
        if not _takes_one_argument(sink.write):
            raise TypeError(
                "A sink's `write` is called with one argument, the `gradwatch.SinkBlock` "
                f"of the drained steps; {type(sink).__name__}.write cannot take it. "
                f"Define it as `def write(self, block): ...`. {received}"
            )
        if id(sink) in seen:
            raise ValueError(
                f"`sinks` lists the same sink twice, which would get every block twice. "
                f"{received}. List each sink once."
            )
        seen.add(id(sink))
    return list(value)


def _takes_one_argument(method: Any) -> bool:
    try:
        inspect.signature(method).bind(None)
    except TypeError:
        return False
    except ValueError:  # no signature to read (a builtin): called as given
        return True
    return True
