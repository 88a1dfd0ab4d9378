"""The stat specs: one entry per stat, the single source of what each stat is.

A `StatSpec` holds a stat's name and definition, its kernel (for a stat of the
gradient alone), how it pools over a layer's variables, its value for an empty
tensor, and what it needs beyond the gradient. The public catalogue
(`gradwatch.stats`), the code that computes the stats in the step
(`gradwatch._stats.compute`, the backends' fast paths), the per-layer views
(`GradientLog.by_layer`) and the charts all read `SPECS`. Adding a stat is one
entry here (and its tests).

This module imports no Keras: a kernel's formulas are written on an array module
`m` that the capture side hands them (`keras.ops`, or a backend's own), so that
reading a saved log never imports a backend.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np

#: What a stat may need beyond this step's gradient: the weights before and after the
#: update, the optimizer that applies it (its clipping), the previous step's gradient,
#: the optimizer's state (its step count and slots) before and after the update.
Need = Literal["weights", "optimizer", "previous", "optimizer_state"]

#: The per-row reductions of the fast path that a kernel may read (`Kernel.reads`):
#: `sq` the sum of squares and `l2` its root (the backend computes whichever is cheaper
#: and derives the other), `sum`, `min`, `max`, and `zeros` the count of exact zeros.
REDUCTIONS = ("sq", "l2", "sum", "min", "max", "zeros")

#: What the exact path hands a kernel (`Kernel.exact`), each per row, over one tensor:
#: `n` elements, `n_finite`, `n_nonfinite` (NaN and ±Inf), `n_notnan`, `n_zero` (exact
#: zeros); `sum` and `sum_sq` of the finite elements; `spread`, the sum of squared
#: deviations of the finite elements from their mean; and `min`, `max` and `abs_max` of
#: the elements that are not NaN (meaningless where `n_notnan` is 0).
EXACT_SUMS = (
    "n",
    "n_finite",
    "n_nonfinite",
    "n_notnan",
    "n_zero",
    "sum",
    "sum_sq",
    "spread",
    "min",
    "max",
    "abs_max",
)

# A function of the per-row reductions, the row sizes and the array module.
FastFormula = Callable[[Mapping[str, Any], Any, Any], Any]
# A function of the exact path's sums and the array module.
ExactFormula = Callable[[Mapping[str, Any], Any], Any]
# A layer's values of one stat (one column per variable), their element counts, and the
# same layer's columns of another recorded stat, to the layer's value at each step.
Pool = Callable[[Any, Any, Callable[[str], Any]], Any]


@dataclass(frozen=True)
class Kernel:
    """How a stat of the gradient alone is computed in the step, in two paths.

    The fast path reads one pass per reduction (`reads`, from `REDUCTIONS`) over
    many tensors at once and finishes with `fast(reductions, size, m)`. It stands
    unless an element is NaN or Inf, or `trust(reductions, size, m)` is False for
    a row (a formula that loses digits there); then every stat of the step takes
    the exact path, `exact(sums, m)` over the masked sums of `EXACT_SUMS`. Each
    value is a float32 vector with one entry per tensor (`n` may be a number), and
    `m` is `keras.ops` (or a backend's stand-in with the same functions).
    """

    reads: tuple[str, ...]
    fast: FastFormula
    exact: ExactFormula
    trust: FastFormula | None = None


@dataclass(frozen=True)
class StatSpec:
    """One stat: everything gradwatch knows about it.

    Args:
        name: The stat's name, as recorded.
        doc: Its one-line definition (`gradwatch.stats.STATS`).
        kernel: How the step computes it from the gradient alone; `None` for a stat
            that needs more (`needs`), which the capture computes with what it needs.
        pool: How the layer's value follows from its variables' values
            (`GradientLog.by_layer`); `None` where it does not.
        pool_reads: Other stats that `pool` reads, which must be recorded too.
        empty: Its value for a tensor with no elements.
        needs: What it needs beyond the step's gradient (`Need`).
        signed: Whether it may be negative (the charts show its magnitude).
    """

    name: str
    doc: str
    kernel: Kernel | None
    pool: Pool | None
    pool_reads: tuple[str, ...] = ()
    empty: float = math.nan
    needs: frozenset[str] = frozenset()
    signed: bool = False


# ------------------------------------------------------------------------ pooling
def root_sum_squares(values: Any, sizes: Any, other: Callable[[str], Any]) -> Any:
    """A norm over the layer: `sqrt(sum_v x_v**2)`; NaN where no variable has one."""
    return np.sqrt((values**2).sum(axis=1, min_count=1))


def smallest(values: Any, sizes: Any, other: Callable[[str], Any]) -> Any:
    """The layer's smallest value."""
    return values.min(axis=1)


def largest(values: Any, sizes: Any, other: Callable[[str], Any]) -> Any:
    """The layer's largest value."""
    return values.max(axis=1)


def total(values: Any, sizes: Any, other: Callable[[str], Any]) -> Any:
    """A count over the layer: the sum over its variables."""
    return values.sum(axis=1, min_count=1)


def size_weighted_mean(values: Any, sizes: Any, other: Callable[[str], Any]) -> Any:
    """A mean over the layer's elements: each variable's weighted by its element count."""
    return (values * sizes).sum(axis=1, min_count=1) / sizes.sum()


def pooled_std(values: Any, sizes: Any, other: Callable[[str], Any]) -> Any:
    """The standard deviation of the layer's elements, from each variable's `std` and
    `mean`: the pooled second moment less the square of the pooled mean."""
    means = other("mean")
    n = sizes.sum()
    mean = (means * sizes).sum(axis=1) / n
    second = ((values**2 + means**2) * sizes).sum(axis=1) / n
    return np.sqrt(np.maximum(second - mean**2, 0.0))


def layer_update_ratio(values: Any, sizes: Any, other: Callable[[str], Any]) -> Any:
    """The layer's `update_norm / weight_norm`; 0 where nothing was updated (also for
    zero weights: not 0 / 0)."""
    update = root_sum_squares(other("update_norm"), sizes, other)
    weight = root_sum_squares(other("weight_norm"), sizes, other)
    return (update / weight).mask(update == 0, 0.0)


# ------------------------------------------------------------------------ kernels
_NAN = math.nan


def _safe_n(q: Mapping[str, Any], m: Any) -> Any:
    return m.maximum(q["n_finite"], 1.0)


def _no_finite(q: Mapping[str, Any], m: Any) -> Any:
    return q["n_finite"] == 0


def _all_nan(q: Mapping[str, Any], m: Any) -> Any:
    return q["n_notnan"] == 0


def _fast_variance(r: Mapping[str, Any], size: Any, m: Any) -> Any:
    return m.maximum(r["sq"] / size - m.square(r["sum"] / size), 0.0)


def _norm_exact(q: Mapping[str, Any], m: Any) -> Any:
    # No finite element: NaN, not a norm of 0 that would read as a vanishing gradient
    # (an empty tensor's norm is 0).
    undefined = m.logical_and(_no_finite(q, m), q["n"] > 0)
    return m.where(undefined, _NAN, m.sqrt(q["sum_sq"]))


def _spec(*args: Any, **kwargs: Any) -> tuple[str, StatSpec]:
    spec = StatSpec(*args, **kwargs)
    return spec.name, spec


#: Every stat, in catalogue order.
SPECS: dict[str, StatSpec] = dict(
    [
        _spec(
            "norm",
            "L2 norm over the finite elements: sqrt(sum(g_i**2)); NaN where none is finite.",
            Kernel(("l2",), lambda r, size, m: r["l2"], _norm_exact),
            root_sum_squares,
            empty=0.0,
        ),
        _spec(
            "mean",
            "Mean of the finite elements: sum(g_i) / n_finite.",
            Kernel(
                ("sum",),
                lambda r, size, m: r["sum"] / size,
                lambda q, m: m.where(_no_finite(q, m), _NAN, q["sum"] / _safe_n(q, m)),
            ),
            size_weighted_mean,
            signed=True,
        ),
        _spec(
            "std",
            "Population standard deviation of the finite elements (ddof=0).",
            Kernel(
                ("sq", "sum"),
                lambda r, size, m: m.sqrt(_fast_variance(r, size, m)),
                lambda q, m: m.where(_no_finite(q, m), _NAN, m.sqrt(q["spread"] / _safe_n(q, m))),
                # The one-pass variance loses digits where the mean dominates the spread.
                trust=lambda r, size, m: (
                    m.square(r["sum"] / size) <= 16.0 * _fast_variance(r, size, m)
                ),
            ),
            pooled_std,
            pool_reads=("mean",),
        ),
        _spec(
            "min",
            "Smallest element, NaN ignored, -Inf counted.",
            Kernel(
                ("min",),
                lambda r, size, m: r["min"],
                lambda q, m: m.where(_all_nan(q, m), _NAN, q["min"]),
            ),
            smallest,
            signed=True,
        ),
        _spec(
            "max",
            "Largest element, NaN ignored, +Inf counted.",
            Kernel(
                ("max",),
                lambda r, size, m: r["max"],
                lambda q, m: m.where(_all_nan(q, m), _NAN, q["max"]),
            ),
            largest,
            signed=True,
        ),
        _spec(
            "abs_max",
            "Largest absolute value, NaN ignored, Inf counted.",
            Kernel(
                ("min", "max"),
                lambda r, size, m: m.maximum(m.abs(r["min"]), m.abs(r["max"])),
                lambda q, m: m.where(_all_nan(q, m), _NAN, q["abs_max"]),
            ),
            largest,
        ),
        _spec(
            "nonfinite",
            "Number of NaN and +/-Inf elements.",
            # The fast path stands only where every element is finite.
            Kernel(
                ("sq",), lambda r, size, m: m.zeros_like(r["sq"]), lambda q, m: q["n_nonfinite"]
            ),
            total,
            empty=0.0,
        ),
        _spec(
            "zero_frac",
            "Fraction of elements that are exactly zero: n_zero / n.",
            Kernel(
                ("zeros",),
                lambda r, size, m: r["zeros"] / size,
                lambda q, m: q["n_zero"] / q["n"],
            ),
            size_weighted_mean,
        ),
        _spec(
            "weight_norm",
            "L2 norm of the variable before the update (opt-in: keeps a copy of w).",
            None,
            root_sum_squares,
            empty=0.0,
            needs=frozenset({"weights"}),
        ),
        _spec(
            "update_norm",
            "L2 norm of w_after - w_before, the update the optimizer applied (opt-in).",
            None,
            root_sum_squares,
            empty=0.0,
            needs=frozenset({"weights"}),
        ),
        _spec(
            "update_ratio",
            "update_norm / weight_norm (opt-in).",
            None,
            layer_update_ratio,
            pool_reads=("update_norm", "weight_norm"),
            empty=0.0,
            needs=frozenset({"weights"}),
        ),
        _spec(
            "cos_prev",
            "Cosine similarity with the previous step's gradient (opt-in: keeps it).",
            None,
            None,
            needs=frozenset({"previous"}),
            signed=True,
        ),
        _spec(
            "clipped_norm",
            "L2 norm of the gradient after the optimizer's clipping (clipnorm, clipvalue or "
            "global_clipnorm); equal to norm without clipping, for finite gradients (opt-in).",
            None,
            root_sum_squares,
            empty=0.0,
            needs=frozenset({"optimizer"}),
        ),
        _spec(
            "v_ratio",
            "Largest g**2 / v_hat over the elements, v_hat the optimizer's bias-corrected "
            "second moment before the update (Adam, AdamW, Nadam, Lamb; Adamax: g**2 / u**2; "
            "RMSprop: g**2 / v); NaN at the first update and for other optimizers (opt-in).",
            None,
            largest,
            needs=frozenset({"optimizer_state"}),
        ),
        _spec(
            "eps_frac",
            "Share of the elements whose update denominator epsilon dominates, as the "
            "optimizer computes it (Adam: sqrt(v) < epsilon after the update); NaN for "
            "optimizers without a second moment (opt-in).",
            None,
            size_weighted_mean,
            needs=frozenset({"optimizer_state"}),
        ),
        _spec(
            "update_cos",
            "Cosine between the applied update w_after - w_before and -g, g the gradient "
            "the optimizer applied (opt-in).",
            None,
            None,
            needs=frozenset({"weights", "optimizer_state"}),
            signed=True,
        ),
    ]
)


def gradient_stats(stats: Iterable[str]) -> list[str]:
    """Those of `stats` that are functions of the gradient alone (they have a kernel)."""
    return [s for s in stats if SPECS[s].kernel is not None]


def needs_of(stats: Iterable[str]) -> set[str]:
    """Everything that `stats` need beyond the step's gradient (`Need`)."""
    return {need for s in stats for need in SPECS[s].needs}


#: Stats that are functions of the gradient alone (`compute_stats` computes these).
GRADIENT_STATS: tuple[str, ...] = tuple(gradient_stats(SPECS))

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
