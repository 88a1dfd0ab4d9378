"""Any other Keras backend (NumPy, OpenVINO): gradwatch does not record there
(`GradWatch` refuses it when training starts), but the public stats functions
(`gradwatch.stats.compute_stats`, `compute_histograms`) work, in `keras.ops`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np
from keras import ops

from gradwatch import _kernels

RECORDS = False  # GradWatch records on this backend
INDEX_DTYPE = "int64"
STATE_IN_STEP = False
APPLY_METHOD = None


def host_copy(x: Any) -> np.ndarray:
    return np.array(ops.convert_to_numpy(x))


def compiling() -> bool:
    return False


def cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    return ops.cond(pred, true_fn, false_fn)


def stats_table(tensors: Sequence[Any], stats: tuple[str, ...]) -> None:
    """None: `compute_stats`' shared algorithm serves this backend."""
    return None


def fused(fn: Callable[..., Any], key: Any) -> Callable[..., Any]:
    """`fn` as it is."""
    return fn


def traced_for_xla(flag: bool) -> Any:
    """No XLA step here: nothing to tell `sum_of_squares`."""
    return contextlib.nullcontext()


def bincount(idx: Any, length: int) -> Any:
    """How often each of `0 .. length - 1` occurs in the int32 tensor `idx`."""
    # Keras' other backends (NumPy): GradWatch refuses them, but `compute_histograms`
    # is public and works there too.
    return ops.segment_sum(ops.ones_like(idx), idx, num_segments=length)


sum_of_squares = _kernels.sum_of_squares
row_sums_of_squares = _kernels.row_sums_of_squares
unscaled_float32 = _kernels.unscaled_float32
bin_index = _kernels.bin_index
