"""The checks of `GradWatch`'s arguments, and of the model and strategy it is given:
each bad value gets an error that names the argument, what was received, and how to
fix it."""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch._alarms import POLICIES
from gradwatch.stats import DEFAULT_BINS_PER_DECADE


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


def check_threshold(value: Any, arg: str) -> float | None:
    number = isinstance(value, (int, float, np.floating)) and not isinstance(value, bool)
    if value is not None and (not number or not value >= 0):
        raise ValueError(f"`{arg}` must be a number >= 0, or None. Received: {arg}={value!r}")
    return None if value is None else float(value)


def check_policy(value: Any, arg: str) -> str:
    if value not in POLICIES:
        raise ValueError(f"`{arg}` must be one of {list(POLICIES)}. Received: {arg}={value!r}")
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
    out = []
    if watch.per_replica and not backend.DISTRIBUTES:
        out.append("per_replica=True")
    if out:
        raise NotImplementedError(
            f"GradWatch does not yet record {'; '.join(out)} on the "
            f"{backend_name} backend of Keras. Drop these settings, or train "
            "with KERAS_BACKEND=tensorflow, where they work."
        )
