"""The statistics catalogue: per-variable gradient summaries, computed with `keras.ops`."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

#: Every stat gradwatch computes, with its one-line definition, in catalogue order.
STATS: dict[str, str] = {
    "norm": "L2 norm over the finite elements: sqrt(sum(g_i**2)).",
    "mean": "Mean of the finite elements: sum(g_i) / n_finite.",
    "std": "Population standard deviation of the finite elements (ddof=0).",
    "min": "Smallest element, NaN ignored, -Inf counted.",
    "max": "Largest element, NaN ignored, +Inf counted.",
    "abs_max": "Largest absolute value, NaN ignored, Inf counted.",
    "nonfinite": "Number of NaN and +/-Inf elements.",
    "zero_frac": "Fraction of elements that are exactly zero: n_zero / n.",
    "weight_norm": "L2 norm of the variable before the update (opt-in: keeps a copy of w).",
    "update_norm": "L2 norm of w_after - w_before, the update the optimizer applied (opt-in).",
    "update_ratio": "update_norm / weight_norm (opt-in).",
    "cos_prev": "Cosine similarity with the previous step's gradient (opt-in: keeps it).",
}

#: Stats that are functions of the gradient alone (`compute_stats` computes these).
GRADIENT_STATS: tuple[str, ...] = (
    "norm",
    "mean",
    "std",
    "min",
    "max",
    "abs_max",
    "nonfinite",
    "zero_frac",
)

#: Stats that need the weights before and after the update.
UPDATE_STATS: tuple[str, ...] = ("weight_norm", "update_norm", "update_ratio")

#: The stats that `GradWatch` records unless told otherwise.
DEFAULT_STATS: tuple[str, ...] = ("norm", "mean", "std", "min", "max", "nonfinite")


def check_stats(stats: Any) -> tuple[str, ...]:
    """Checks a `stats` argument and returns it as a tuple in the order given.

    Args:
        stats: A stat name or a sequence of stat names from `STATS`.

    Returns:
        The stat names, duplicates removed.

    Raises:
        TypeError: If `stats` is not a string or a sequence of strings.
        ValueError: If a name is not in the catalogue, or `stats` is empty.

    Example:

    >>> check_stats(["norm", "max"])
    ('norm', 'max')
    """
    items = [stats] if isinstance(stats, str) else stats
    if not isinstance(items, Sequence) or not all(isinstance(s, str) for s in items):
        raise TypeError(
            "`stats` must be a stat name or a sequence of stat names, "
            f"e.g. stats=('norm', 'max'). Received: stats={stats!r}"
        )
    if not items:
        raise ValueError(
            f"`stats` must name at least one stat. Available: {list(STATS)}. "
            f"Received: stats={stats!r}"
        )
    for s in items:
        if s not in STATS:
            raise ValueError(
                f"Unknown stat {s!r} in `stats`. Available: {list(STATS)}. "
                f"Received: stats={list(items)!r}"
            )
    return tuple(dict.fromkeys(items))


def compute_stats(tensors: Sequence[Any], stats: Sequence[str]) -> Any:
    """Computes the stats of several tensors at once, fused into a few kernels.

    The tensors are flattened and concatenated, and every stat is a segment
    reduction over that one vector, so the number of kernels does not grow
    with the number of tensors. A `None` entry (a disconnected variable) gives
    a row of NaN. Works inside a compiled (and XLA-compiled) step.

    Args:
        tensors: Gradients (any float dtype; computed in float32) or `None`.
        stats: Names from `STATS`.

    Returns:
        A float32 tensor of shape `(len(tensors), len(stats))`.

    Example:

    >>> out = compute_stats([np.array([3.0, -4.0]), np.array([0.0, 1.0, np.nan])],
    ...                     ["norm", "nonfinite", "zero_frac"])
    >>> np.asarray(out, dtype=np.float64).round(3).tolist()
    [[5.0, 0.0, 0.0], [1.0, 1.0, 0.333]]
    """
    stats = tuple(stats)
    for name in stats:
        if name not in GRADIENT_STATS:
            raise ValueError(
                f"`compute_stats` computes stats of a gradient alone: {list(GRADIENT_STATS)}. "
                f"Received: {name!r}"
            )
    present = [i for i, t in enumerate(tensors) if t is not None]
    n = len(present)
    if n == 0:
        return ops.full((len(tensors), len(stats)), math.nan, dtype="float32")
    flats = [ops.reshape(ops.cast(tensors[i], "float32"), (-1,)) for i in present]
    sizes = [int(np.prod(tuple(tensors[i].shape))) for i in present]
    x = flats[0] if n == 1 else ops.concatenate(flats, axis=0)
    seg = ops.convert_to_tensor(np.repeat(np.arange(n, dtype="int32"), sizes))
    size = ops.convert_to_tensor(np.asarray(sizes, dtype="float32"))
    nan = ops.full((n,), math.nan, dtype="float32")

    def ssum(v: Any) -> Any:
        return ops.segment_sum(ops.cast(v, "float32"), seg, num_segments=n)

    def smax(v: Any) -> Any:
        return ops.segment_max(v, seg, num_segments=n)

    cache: dict[str, Any] = {}

    def get(name: str) -> Any:
        if name not in cache:
            cache[name] = _PARTS[name](x, get, ssum, smax, size, seg, nan)
        return cache[name]

    cols = ops.stack([get(s) for s in stats], axis=1)
    if n == len(tensors):
        return cols
    # Disconnected variables: pick a NaN row for them.
    rows = ops.concatenate([cols, ops.full((1, len(stats)), math.nan, dtype="float32")], axis=0)
    where = {j: k for k, j in enumerate(present)}
    index = np.asarray([where.get(j, n) for j in range(len(tensors))], dtype="int32")
    return ops.take(rows, index, axis=0)


def _nan_if(cond: Any, value: Any, nan: Any) -> Any:
    return ops.where(cond, nan, value)


# Each part is a function of (x, get, ssum, smax, size, seg, nan), so that shared
# intermediates (the finite mask, the finite count, the mean) are computed once.
_PARTS = {
    "finite": lambda x, get, ssum, smax, size, seg, nan: ops.isfinite(x),
    "notnan": lambda x, get, ssum, smax, size, seg, nan: ops.logical_not(ops.isnan(x)),
    "n_finite": lambda x, get, ssum, smax, size, seg, nan: ssum(get("finite")),
    "n_notnan": lambda x, get, ssum, smax, size, seg, nan: ssum(get("notnan")),
    "x_finite": lambda x, get, ssum, smax, size, seg, nan: ops.where(get("finite"), x, 0.0),
    "norm": lambda x, get, ssum, smax, size, seg, nan: ops.sqrt(ssum(ops.square(get("x_finite")))),
    "mean": lambda x, get, ssum, smax, size, seg, nan: _nan_if(
        get("n_finite") == 0, ssum(get("x_finite")) / ops.maximum(get("n_finite"), 1.0), nan
    ),
    "std": lambda x, get, ssum, smax, size, seg, nan: _nan_if(
        get("n_finite") == 0,
        ops.sqrt(
            ssum(
                ops.where(
                    get("finite"), ops.square(x - ops.take(ops.nan_to_num(get("mean")), seg)), 0.0
                )
            )
            / ops.maximum(get("n_finite"), 1.0)
        ),
        nan,
    ),
    "min": lambda x, get, ssum, smax, size, seg, nan: _nan_if(
        get("n_notnan") == 0, -smax(ops.where(get("notnan"), -x, -math.inf)), nan
    ),
    "max": lambda x, get, ssum, smax, size, seg, nan: _nan_if(
        get("n_notnan") == 0, smax(ops.where(get("notnan"), x, -math.inf)), nan
    ),
    "abs_max": lambda x, get, ssum, smax, size, seg, nan: _nan_if(
        get("n_notnan") == 0, smax(ops.where(get("notnan"), ops.abs(x), -math.inf)), nan
    ),
    "nonfinite": lambda x, get, ssum, smax, size, seg, nan: size - get("n_finite"),
    "zero_frac": lambda x, get, ssum, smax, size, seg, nan: _nan_if(
        size == 0, ssum(x == 0.0) / ops.maximum(size, 1.0), nan
    ),
}


def _one(name: str, g: Any) -> float:
    return float(np.asarray(compute_stats([g], (name,)))[0, 0])


def norm(g: Any) -> float:
    """L2 norm of the finite elements.

    `norm = sqrt(sum_i g_i**2)` over the elements that are neither NaN nor
    ±Inf; 0.0 for an empty tensor.

    Example:

    >>> norm(np.array([3.0, 4.0, np.nan]))
    5.0
    """
    return _one("norm", g)


def mean(g: Any) -> float:
    """Mean of the finite elements.

    `mean = sum_i g_i / n_finite` over the finite elements; NaN when there
    are none.

    Example:

    >>> mean(np.array([1.0, 2.0, np.inf]))
    1.5
    """
    return _one("mean", g)


def std(g: Any) -> float:
    """Population standard deviation of the finite elements.

    `std = sqrt(sum_i (g_i - mean)**2 / n_finite)` (ddof=0, as `np.std`);
    NaN when there are no finite elements.

    Example:

    >>> std(np.array([1.0, 3.0, np.nan]))
    1.0
    """
    return _one("std", g)


def min(g: Any) -> float:
    """Smallest element, ignoring NaN.

    `min = min_i g_i` over the elements that are not NaN, so `-Inf` counts;
    NaN when every element is NaN or the tensor is empty.

    Example:

    >>> min(np.array([2.0, -1.0, np.nan]))
    -1.0
    """
    return _one("min", g)


def max(g: Any) -> float:
    """Largest element, ignoring NaN.

    `max = max_i g_i` over the elements that are not NaN, so `+Inf` counts;
    NaN when every element is NaN or the tensor is empty.

    Example:

    >>> max(np.array([2.0, -1.0, np.nan]))
    2.0
    """
    return _one("max", g)


def abs_max(g: Any) -> float:
    """Largest absolute value, ignoring NaN.

    `abs_max = max_i |g_i|` over the elements that are not NaN; NaN when there
    are none.

    Example:

    >>> abs_max(np.array([2.0, -3.0]))
    3.0
    """
    return _one("abs_max", g)


def nonfinite(g: Any) -> float:
    """Number of NaN and ±Inf elements.

    `nonfinite = #{i : g_i is NaN or ±Inf}`, stored as a float.

    Example:

    >>> nonfinite(np.array([np.nan, np.inf, -np.inf, 1.0]))
    3.0
    """
    return _one("nonfinite", g)


def zero_frac(g: Any) -> float:
    """Fraction of elements that are exactly zero.

    `zero_frac = #{i : g_i == 0} / n`, over all `n` elements; NaN for an empty
    tensor.

    Example:

    >>> zero_frac(np.array([0.0, 0.0, 1.0, 2.0]))
    0.5
    """
    return _one("zero_frac", g)


# --------------------------------------------------------------------- histograms
#: Decimal exponents of the smallest and largest finite bin edges on |g|.
HIST_MIN_EXP = -12
HIST_MAX_EXP = 4
#: Bins per decade that `histogram=True` means.
DEFAULT_BINS_PER_DECADE = 4
#: The `sign` labels of the bins, in the order they are stored.
HIST_SIGNS = ("-", "0", "+", "nonfinite")


def histogram_bins(bins_per_decade: int) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The bins of a gradient histogram: `(lo, hi, sign)`, one entry per bin.

    The magnitude |g| of each finite, non-zero element falls in one of
    `K = 16 * bins_per_decade` log-spaced bins with edges
    `10**(-12 + j / bins_per_decade)`, `j = 0..K`. The lowest bin also takes
    everything below `1e-12` (its `lo` is 0) and the highest everything at or
    above `1e+4` (its `hi` is inf), so no element is dropped. Negative elements
    go to the `"-"` bins, ordered from the most negative value up, then one
    bin for exact zeros (`"0"`, lo = hi = 0), then the `"+"` bins from small to
    large, then one bin for NaN and ±Inf (`"nonfinite"`, lo = hi = NaN). Every
    element lands in exactly one of the `2 * K + 2` bins.

    Args:
        bins_per_decade: Number of bins per power of ten.

    Returns:
        float64 arrays `lo` and `hi` (bounds on |g|, `lo <= |g| < hi`), and a
        string array `sign`.

    Example:

    >>> lo, hi, sign = histogram_bins(1)
    >>> len(lo), lo[17].item(), hi[17].item(), sign[17]
    (34, 0.0, 1e-11, '+')
    """
    k = (HIST_MAX_EXP - HIST_MIN_EXP) * bins_per_decade
    edges = 10.0 ** (HIST_MIN_EXP + np.arange(k + 1) / bins_per_decade)
    mag_lo, mag_hi = edges[:-1].copy(), edges[1:].copy()
    mag_lo[0], mag_hi[-1] = 0.0, np.inf
    lo = np.concatenate([mag_lo[::-1], [0.0], mag_lo, [np.nan]])
    hi = np.concatenate([mag_hi[::-1], [0.0], mag_hi, [np.nan]])
    sign = np.asarray(["-"] * k + ["0"] + ["+"] * k + ["nonfinite"], dtype=object)
    return lo, hi, sign


def compute_histograms(tensors: Sequence[Any], bins_per_decade: int) -> Any:
    """Counts the elements of each tensor in the bins of `histogram_bins`.

    One scatter-add over all tensors at once; compiles under XLA. A `None`
    entry gives a row of zeros.

    Args:
        tensors: Gradients or `None`.
        bins_per_decade: Number of bins per power of ten.

    Returns:
        An int32 tensor of shape `(len(tensors), 2 * K + 2)`.

    Example:

    >>> counts = np.asarray(compute_histograms([np.array([-12.0, 0.0, 3e-3, np.nan])], 1))
    >>> lo, hi, sign = histogram_bins(1)
    >>> [(sign[i], lo[i].item(), counts[0, i].item()) for i in np.nonzero(counts[0])[0]]
    [('-', 10.0, 1), ('0', 0.0, 1), ('+', 0.001, 1), ('nonfinite', nan, 1)]
    """
    k = (HIST_MAX_EXP - HIST_MIN_EXP) * bins_per_decade
    n_bins = 2 * k + 2
    present = [i for i, t in enumerate(tensors) if t is not None]
    out_rows = len(tensors)
    if not present:
        return ops.zeros((out_rows, n_bins), dtype="int32")
    flats = [ops.reshape(ops.cast(tensors[i], "float32"), (-1,)) for i in present]
    sizes = [int(np.prod(tuple(tensors[i].shape))) for i in present]
    x = flats[0] if len(flats) == 1 else ops.concatenate(flats, axis=0)
    seg = ops.convert_to_tensor(np.repeat(np.arange(len(present), dtype="int32"), sizes))
    a = ops.abs(x)
    finite = ops.isfinite(x)
    safe = ops.where(finite & (a > 0), a, 1.0)
    j = ops.floor((ops.log10(safe) - HIST_MIN_EXP) * bins_per_decade)
    j = ops.cast(ops.clip(j, 0, k - 1), "int32")
    # log10 is inexact near an edge: move to the neighbouring bin where the
    # float32 edges say so, so that binning follows `lo <= |g| < hi` exactly.
    edges = ops.convert_to_tensor(
        (10.0 ** (HIST_MIN_EXP + np.arange(k + 1) / bins_per_decade)).astype("float32")
    )
    j = ops.where((j > 0) & (safe < ops.take(edges, j)), j - 1, j)
    j = ops.where((j < k - 1) & (safe >= ops.take(edges, j + 1)), j + 1, j)
    idx = ops.where(x < 0, k - 1 - j, k + 1 + j)
    idx = ops.where(a == 0, k, idx)
    idx = ops.where(finite, idx, n_bins - 1)
    flat_counts = ops.segment_sum(
        ops.ones_like(idx), seg * n_bins + idx, num_segments=len(present) * n_bins
    )
    counts = ops.reshape(flat_counts, (len(present), n_bins))
    if len(present) == out_rows:
        return counts
    rows = ops.concatenate([counts, ops.zeros((1, n_bins), dtype="int32")], axis=0)
    where = {j: r for r, j in enumerate(present)}
    return ops.take(rows, np.asarray([where.get(i, len(present)) for i in range(out_rows)]), axis=0)
