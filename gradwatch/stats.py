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
}

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
