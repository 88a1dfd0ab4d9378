"""The stats' building blocks in `keras.ops` that `gradwatch._compute` and the backend
modules share: the exact path, the bin index, and the casts and sums of squares of the
backends that have no fast path of their own.

A leaf: it imports no module that imports `gradwatch._backend`, so that the backend
modules (imported by `gradwatch._backend` when it loads) can import it.
"""

from __future__ import annotations

import math
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch._catalogue import HIST_MIN_EXP, histogram_bin_count
from gradwatch.sparse import SparseGradient

# Tensors below this many elements are stacked with others of their size, so that
# one reduction serves many small variables; larger ones are reduced in place.
STACK_BELOW = 16384


# A disconnected variable's row is all NaN; an empty tensor has norm 0, no
# non-finite elements, and no mean, std, min, max or zero fraction.
EMPTY = {"norm": 0.0, "nonfinite": 0.0}


#: The smallest normal float32; smaller non-zero magnitudes are subnormal.
SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)


def exact_group(x: Any) -> dict[str, Any]:
    """Every stat of each row of a 2-D float32 tensor, with NaN and Inf treated as the
    catalogue defines (the exact path of `compute_stats`)."""
    nan = math.nan
    finite = ops.isfinite(x)
    notnan = ops.logical_not(ops.isnan(x))
    n_finite = ops.sum(ops.cast(finite, "float32"), axis=1)
    no_finite = n_finite == 0
    if x.shape[1] is None:  # a size known at run time only (it may be 0)
        n = ops.cast(ops.shape(x)[1], "float32")
        norm_nan = ops.logical_and(no_finite, n > 0)  # an empty tensor's norm is 0
    else:
        n = float(x.shape[1])
        norm_nan = no_finite
    none_left = ops.sum(ops.cast(notnan, "float32"), axis=1) == 0
    xf = ops.where(finite, x, 0.0)
    safe_n = ops.maximum(n_finite, 1.0)
    mean = ops.where(n_finite == 0, nan, ops.sum(xf, axis=1) / safe_n)
    centred = ops.where(finite, x - ops.nan_to_num(mean)[:, None], 0.0)
    return {
        # No finite element: NaN, not a norm of 0 that would read as a vanishing gradient.
        "norm": ops.where(norm_nan, nan, ops.sqrt(ops.sum(ops.square(xf), axis=1))),
        "mean": mean,
        "std": ops.where(
            n_finite == 0, nan, ops.sqrt(ops.sum(ops.square(centred), axis=1) / safe_n)
        ),
        "min": ops.where(none_left, nan, ops.min(ops.where(notnan, x, math.inf), axis=1)),
        "max": ops.where(none_left, nan, ops.max(ops.where(notnan, x, -math.inf), axis=1)),
        "abs_max": ops.where(none_left, nan, ops.max(ops.where(notnan, ops.abs(x), -1.0), axis=1)),
        "nonfinite": n - n_finite,
        "zero_frac": ops.sum(ops.cast(ops.equal(x, 0.0), "float32"), axis=1) / n,
    }


def bin_index(x: Any, bins_per_decade: int) -> Any:
    """The bin number of each element of a flat float32 tensor (see `histogram_bins`),
    in `keras.ops`."""
    n_bins = histogram_bin_count(bins_per_decade)
    k = n_bins // 2 - 1  # bins per sign
    a = ops.abs(x)
    finite = ops.isfinite(x)
    # Subnormal magnitudes count as zeros on every backend: XLA's CPU code (and, in some
    # kernels, TensorFlow's) flushes them to zero, and an explicit bound keeps the bins
    # the same whichever kernel runs.
    nonzero = a >= SMALLEST_NORMAL
    safe = ops.where(finite & nonzero, a, 1.0)
    # The edge nearest to |g| on the log scale is `g`; log10 is inexact, but only by far
    # less than half a bin, so |g| lies in bin g - 1 or g, and one exact comparison with
    # the float32 edge decides: binning follows `lo <= |g| < hi` exactly.
    u = (ops.log10(safe) - HIST_MIN_EXP) * bins_per_decade
    g = ops.cast(ops.clip(ops.round(u), 0, k), "int32")
    edges = ops.convert_to_tensor(
        (10.0 ** (HIST_MIN_EXP + np.arange(k + 1) / bins_per_decade)).astype("float32")
    )
    j = g - 1 + ops.cast(safe >= ops.take(edges, g), "int32")
    j = ops.clip(j, 0, k - 1)  # below the range: the lowest bin; above it: the highest
    idx = ops.where(x < 0, k - 1 - j, k + 1 + j)
    idx = ops.where(nonzero, idx, k)
    return ops.where(finite, idx, n_bins - 1)


def sum_of_squares(g: Any) -> Any:
    """`sum(g**2)` as a float32 scalar, in `keras.ops`."""
    return ops.sum(ops.square(ops.cast(g, "float32")))


def row_sums_of_squares(x: Any, source: Any = None) -> Any:
    """Each row's sum of squares of a 2-D float32 tensor, in `keras.ops`."""
    return ops.sum(ops.square(x), axis=1)


def unscaled_float32(g: Any, scale: Any = None) -> Any:
    """`g` in float32, divided by a loss scale if one is given; sparse stays sparse."""

    def fn(x):
        if scale is None and keras.backend.standardize_dtype(x.dtype) == "float32":
            return x  # eager backends: no op at all, rather than a cast to itself
        x = keras.ops.cast(x, "float32")
        return x if scale is None else x / scale

    return g.map(fn) if isinstance(g, SparseGradient) else fn(g)
