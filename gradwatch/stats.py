"""The statistics catalogue: the per-variable gradient stats, their definitions, and the
histogram bins.

Every name here derives from one registry of stat specs (`gradwatch._stats.specs.SPECS`:
each stat's definition, kernel, pooling over a layer, empty value and needs). The stats
are computed with `keras.ops` inside the training step, by `gradwatch._stats.compute`; its
functions (`compute_stats`, `compute_histograms`, `norm`, ...) are reachable here too,
and importing them imports Keras. The catalogue itself needs no Keras, so reading a
saved log never imports it.
"""

from __future__ import annotations

import importlib
from collections.abc import Callable, Sequence
from typing import Any

import numpy as np

from gradwatch._stats.specs import (
    GRADIENT_STATS,
    HIST_MAX_EXP,
    HIST_MIN_EXP,
    SPECS,
    histogram_bin_count,
)

__all__ = [
    "DEFAULT_BINS_PER_DECADE",
    "DEFAULT_STATS",
    "DOCTOR_STATS",
    "GRADIENT_STATS",
    "HIST_MAX_EXP",
    "HIST_MIN_EXP",
    "HIST_SIGNS",
    "PRESETS",
    "STATS",
    "UPDATE_STATS",
    "check_stats",
    "histogram_bin_count",
    "histogram_bins",
]

#: Every stat gradwatch computes, with its one-line definition, in catalogue order.
STATS: dict[str, str] = {name: spec.doc for name, spec in SPECS.items()}

#: Stats that need the weights before and after the update.
UPDATE_STATS: tuple[str, ...] = tuple(n for n, spec in SPECS.items() if "weights" in spec.needs)

#: The stats that `GradWatch` records unless told otherwise.
DEFAULT_STATS: tuple[str, ...] = ("norm", "mean", "std", "min", "max", "nonfinite")

#: The stats that the doctor's rules read (`GradientLog.diagnose`), in catalogue order:
#: recorded together, no rule is left unchecked for want of a stat. Derived from the
#: rules, which import pandas: made on first use (see `__getattr__` below).
DOCTOR_STATS: tuple[str, ...]


# The sets of stats that `GradWatch(stats=...)` takes by name: `"doctor"`, every stat the
# doctor's rules read (`DOCTOR_STATS`: no rule is left unchecked, made on first use);
# `"lean"`, the norm alone (one read of each gradient, the cheapest record that the
# doctor's `exploding`, `vanishing` and global-norm views can use).
_PRESETS: dict[str, Callable[[], tuple[str, ...]]] = {
    "doctor": lambda: _doctor_stats(),
    "lean": lambda: ("norm",),
}
#: The names of the presets that `GradWatch(stats=...)` takes (see `check_stats`).
PRESETS: tuple[str, ...] = tuple(_PRESETS)


def check_stats(stats: Any) -> tuple[str, ...]:
    """Checks a `stats` argument and returns it as a tuple in the order given.

    Args:
        stats: A stat name or a sequence of stat names from `STATS`, or the name of a
            preset (`PRESETS`): `"doctor"` or `"lean"`.

    Returns:
        The stat names, duplicates removed.

    Raises:
        TypeError: If `stats` is not a string or a sequence of strings.
        ValueError: If a name is not in the catalogue, or `stats` is empty.

    Example:

    >>> check_stats(["norm", "max"])
    ('norm', 'max')
    >>> check_stats("lean")
    ('norm',)
    """
    if isinstance(stats, str) and stats in _PRESETS:
        return _PRESETS[stats]()
    items = [stats] if isinstance(stats, str) else stats
    if not isinstance(items, Sequence) or not all(isinstance(s, str) for s in items):
        raise TypeError(
            "`stats` must be a stat name or a sequence of stat names, "
            f"e.g. stats=('norm', 'max'). Received: stats={stats!r}"
        )
    if not items:
        raise ValueError(
            f"`stats` must name at least one stat. Available: {list(SPECS)}. "
            f"Received: stats={stats!r}"
        )
    for s in items:
        if s not in SPECS:
            raise ValueError(
                f"Unknown stat {s!r} in `stats`. Available: {list(SPECS)}, or a preset "
                f"by name: {' or '.join(map(repr, PRESETS))}. Received: stats={list(items)!r}"
            )
    return tuple(dict.fromkeys(items))


def _doctor_stats() -> tuple[str, ...]:
    """`DOCTOR_STATS`: the stats the doctor's rules read, in catalogue order."""
    from gradwatch._doctor.rules import stats_read

    read = stats_read()
    return tuple(name for name in SPECS if name in read)


# --------------------------------------------------------------------- histograms
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
    bin for zeros (`"0"`, lo = hi = 0; it also takes the subnormal magnitudes
    below `1.18e-38`, which XLA flushes to zero, so that every backend bins
    alike), then the `"+"` bins from small to
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
    k = histogram_bin_count(bins_per_decade) // 2 - 1  # bins per sign
    edges = 10.0 ** (HIST_MIN_EXP + np.arange(k + 1) / bins_per_decade)
    mag_lo, mag_hi = edges[:-1].copy(), edges[1:].copy()
    mag_lo[0], mag_hi[-1] = 0.0, np.inf
    lo = np.concatenate([mag_lo[::-1], [0.0], mag_lo, [np.nan]])
    hi = np.concatenate([mag_hi[::-1], [0.0], mag_hi, [np.nan]])
    sign = np.asarray(["-"] * k + ["0"] + ["+"] * k + ["nonfinite"], dtype=object)
    return lo, hi, sign


# The Keras code, imported on first use: `gradwatch.stats.compute_stats` and the rest.
_COMPUTED = (
    "abs_max",
    "branch",
    "compute_histograms",
    "compute_stats",
    "max",
    "mean",
    "min",
    "nonfinite",
    "norm",
    "std",
    "sum_of_squares",
    "traced_for_xla",
    "zero_frac",
)


def __getattr__(name: str) -> Any:
    if name == "DOCTOR_STATS":
        return _doctor_stats()
    if name in _COMPUTED:
        return getattr(importlib.import_module("gradwatch._stats.compute"), name)
    raise AttributeError(f"module 'gradwatch.stats' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted({*globals(), *_COMPUTED, "DOCTOR_STATS"})
