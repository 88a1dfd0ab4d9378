"""The stats' building blocks in `keras.ops` that `gradwatch._stats.compute` and the backend
modules share: the exact path's sums and table (each stat's own formula is its spec's
kernel, `gradwatch._stats.specs.SPECS`), the bin index, and the casts and sums of squares
of the backends that have no fast path of their own.

A leaf: it imports no module that imports `gradwatch._backend`, so that the backend
modules (imported by `gradwatch._backend` when it loads) can import it.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch._stats.specs import HIST_MIN_EXP, SPECS, histogram_bin_count
from gradwatch.sparse import SparseGradient

# Tensors below this many elements are stacked with others of their size, so that
# one reduction serves many small variables; larger ones are reduced in place.
STACK_BELOW = 16384


#: The smallest normal float32; smaller non-zero magnitudes are subnormal.
SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)


def exact_sums(x: Any) -> dict[str, Any]:
    """The exact path's masked counts and sums (`EXACT_SUMS`) of each row of a 2-D
    float32 tensor, from which each stat's kernel computes its exact value."""
    finite = ops.isfinite(x)
    notnan = ops.logical_not(ops.isnan(x))
    n_finite = ops.sum(ops.cast(finite, "float32"), axis=1)
    # A size known at run time only may be 0.
    n = ops.cast(ops.shape(x)[1], "float32") if x.shape[1] is None else float(x.shape[1])
    xf = ops.where(finite, x, 0.0)
    total = ops.sum(xf, axis=1)
    # The mean of the finite elements, 0 where there are none.
    mean = total / ops.maximum(n_finite, 1.0)
    centred = ops.where(finite, x - mean[:, None], 0.0)
    return {
        "n": n,
        "n_finite": n_finite,
        "n_nonfinite": n - n_finite,
        "n_notnan": ops.sum(ops.cast(notnan, "float32"), axis=1),
        "n_zero": ops.sum(ops.cast(ops.equal(x, 0.0), "float32"), axis=1),
        "sum": total,
        "sum_sq": ops.sum(ops.square(xf), axis=1),
        "spread": ops.sum(ops.square(centred), axis=1),
        "min": ops.min(ops.where(notnan, x, math.inf), axis=1),
        "max": ops.max(ops.where(notnan, x, -math.inf), axis=1),
        "abs_max": ops.max(ops.where(notnan, ops.abs(x), -1.0), axis=1),
    }


def exact_columns(parts: list[dict[str, Any]], stats: Sequence[str]) -> Any:
    """The exact path's table: each stat's kernel over each part's `exact_sums` (rows
    in order), one column per stat, in `keras.ops`."""
    columns = []
    for name in stats:
        exact = SPECS[name].kernel.exact
        values = [ops.reshape(exact(sums, ops), (-1,)) for sums in parts]
        columns.append(values[0] if len(values) == 1 else ops.concatenate(values, axis=0))
    return ops.stack(columns, axis=1)


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
