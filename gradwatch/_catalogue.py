"""What the stats catalogue (`gradwatch.stats`) and the code that computes it share.

Kept apart from `gradwatch.stats`, which imports no Keras, so that the Keras code
(`gradwatch._compute`) reads these without importing the module that imports it.
"""

from __future__ import annotations

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

#: Decimal exponents of the smallest and largest finite bin edges on |g|.
HIST_MIN_EXP = -12
HIST_MAX_EXP = 4


def histogram_bin_count(bins_per_decade: int) -> int:
    """The number of bins of a gradient histogram (see `gradwatch.stats.histogram_bins`).

    `K = (HIST_MAX_EXP - HIST_MIN_EXP) * bins_per_decade` magnitude bins for each
    sign, one bin for zeros and one for NaN and ±Inf: `2 * K + 2`. The `"-"` and
    `"+"` halves hold `histogram_bin_count(b) // 2 - 1` bins each.

    Args:
        bins_per_decade: Number of bins per power of ten.

    Example:

    >>> histogram_bin_count(1), histogram_bin_count(4)
    (34, 130)
    """
    return 2 * (HIST_MAX_EXP - HIST_MIN_EXP) * bins_per_decade + 2
