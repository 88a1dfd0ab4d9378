"""The stats of the catalogue (`gradwatch.stats`), computed with `keras.ops` inside the step."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

from gradwatch._backend import current as _backend
from gradwatch._stats.kernels import STACK_BELOW, exact_columns, exact_sums
from gradwatch._stats.specs import SPECS, gradient_stats, histogram_bin_count
from gradwatch.sparse import SparseGradient


def compute_stats(tensors: Sequence[Any], stats: Sequence[str]) -> Any:
    """Computes the stats of several tensors at once, in a few passes over the data.

    Small tensors of equal size are stacked so that one reduction serves them
    all; large ones are reduced in place. The stats come from one pass each of
    the reductions their kernels read (sum of squares, sum, min, max, ...; see
    `gradwatch._stats.specs.SPECS`). Where an element is NaN or Inf (any makes the
    sum of squares non-finite), or where a kernel does not trust its one-pass
    formula (the mean so dominates the spread that the one-pass variance would
    lose digits), one branch per step takes an exact path that masks non-finite
    elements and computes `std` in two passes. Works inside a compiled (and
    XLA-compiled) step. A `None` entry (a disconnected variable) gives a row of
    NaN. A tensor whose size the traced graph does not know is reduced on its
    own, at its run-time size.

    Args:
        tensors: Gradients (any float dtype; computed in float32) or `None`.
        stats: Names of stats of the gradient alone (`GRADIENT_STATS`).

    Returns:
        A float32 tensor of shape `(len(tensors), len(stats))`.

    Example:

    >>> out = compute_stats([np.array([3.0, -4.0]), np.array([0.0, 1.0, np.nan])],
    ...                     ["norm", "nonfinite", "zero_frac"])
    >>> np.asarray(out, dtype=np.float64).round(3).tolist()
    [[5.0, 0.0, 0.0], [1.0, 1.0, 0.333]]
    """
    stats = tuple(stats)
    _check_gradient_stats(stats)
    # A backend with a kernel of its own (PyTorch) computes the table there.
    table = _backend.stats_table(tensors, stats)
    if table is not None:
        return table
    # A sparse gradient (touched rows of a table) is reduced on its own, over its rows.
    sparse = [i for i, t in enumerate(tensors) if isinstance(t, SparseGradient)]
    groups, constant_rows = _groups([None if i in sparse else t for i, t in enumerate(tensors)])
    for i in sparse:
        del constant_rows[i]
    n_rows = len(tensors)
    order: list[int] = []
    table = None
    if groups:
        order = [i for rows, _ in groups for i in rows]
        table = _dense_table(tensors, groups, order, stats)
    if sparse:
        sums = [_backend.sparse_sums(tensors[i]) for i in sparse]
        sparse_table = exact_columns(sums, stats)
        table = sparse_table if table is None else ops.concatenate([table, sparse_table], axis=0)
        order = order + sparse
    return ops.reshape(_assemble(table, order, constant_rows, stats, n_rows), (n_rows, len(stats)))


def _check_gradient_stats(stats: tuple[str, ...]) -> None:
    for name in stats:
        if name not in SPECS or SPECS[name].kernel is None:
            raise ValueError(
                "`compute_stats` computes stats of a gradient alone: "
                f"{gradient_stats(SPECS)}. Received: {name!r}"
            )


def _dense_table(
    tensors: Sequence[Any], groups: list[tuple[list[int], Any]], order: list[int], stats: tuple
) -> Any:
    """The table of the grouped rows (in `order`): the one-pass formulas, or the exact
    path where an element is not finite or a kernel does not trust its formula."""
    kernels = [SPECS[name].kernel for name in stats]
    sources = {rows[0]: tensors[rows[0]] for rows, x in groups if x.shape[0] == 1}
    reads = {read for kernel in kernels for read in kernel.reads}
    raw = _one_pass([(x, sources.get(rows[0])) for rows, x in groups], reads)
    sizes = [_size(tensors[i]) for i in order]
    # One branch per step: the one-pass results stand unless an element is NaN or
    # Inf (then its sum of squares is non-finite) or a kernel's formula would lose
    # digits; then the exact path.
    fine = ops.all(ops.isfinite(raw["sq"]))
    if None in sizes:
        # Sizes known at run time only: each such group is a single row.
        size = ops.concatenate(
            [
                ops.full((len(rows),), float(x.shape[1]))
                if x.shape[1] is not None
                else ops.reshape(ops.cast(ops.shape(x)[1], "float32"), (1,))
                for rows, x in groups
            ],
            axis=0,
        )
        # A tensor empty at run time has no min or max: the exact path says so.
        fine = ops.logical_and(fine, ops.all(size > 0))
    else:
        size = ops.convert_to_tensor(np.asarray(sizes, "float32"))
    for kernel in dict.fromkeys(kernel for kernel in kernels if kernel.trust is not None):
        fine = ops.logical_and(fine, ops.all(kernel.trust(raw, size, ops)))
    fast = ops.stack([kernel.fast(raw, size, ops) for kernel in kernels], axis=1)
    # The exact path of one group: on TensorFlow one function, traced once for all
    # groups, steps and traces (a few ops each, where the ops of its sums were dozens).
    exact = _backend.traced_once(
        ("exact_columns", stats), lambda x: exact_columns([exact_sums(x)], stats)
    )

    def exact_path() -> Any:
        tables = [exact(x) for _, x in groups]
        return tables[0] if len(tables) == 1 else ops.concatenate(tables, axis=0)

    return branch(fine, lambda: fast, exact_path)


def branch(pred: Any, true_fn: Any, false_fn: Any) -> Any:
    """`ops.cond`; on TensorFlow graphs an unlowered branch, so that the branch not
    taken costs nothing (see the backend's `cond`)."""
    return _backend.cond(pred, true_fn, false_fn)


def _size(t: Any) -> int | None:
    """The number of elements of `t`, or None where the traced graph knows it only at
    run time (a dimension of `None`, or an unknown rank)."""
    try:
        dims = tuple(t.shape)
    except ValueError:  # TensorFlow: a shape of unknown rank
        return None
    if any(d is None for d in dims):
        return None
    return int(np.prod(dims))


def _groups(tensors: Sequence[Any]) -> tuple[list[tuple[list[int], Any]], dict[int, str]]:
    """Groups of (row indices, 2-D float32 tensor with one row per tensor).

    Also returns the rows that need no computing: `None` ("none") and empty
    tensors ("empty"). A tensor of a size known at run time only is a group of
    its own, of shape `(1, None)`.
    """
    constant: dict[int, str] = {}
    by_size: dict[int, list[int]] = {}
    groups = []
    for i, t in enumerate(tensors):
        if t is None:
            constant[i] = "none"
            continue
        size = _size(t)
        if size is None:
            groups.append(([i], ops.reshape(ops.cast(t, "float32"), (1, -1))))
        elif size == 0:
            constant[i] = "empty"
        elif size >= STACK_BELOW:
            groups.append(([i], ops.reshape(ops.cast(t, "float32"), (1, size))))
        else:
            by_size.setdefault(size, []).append(i)
    for size, rows in by_size.items():
        flat = [ops.reshape(ops.cast(tensors[i], "float32"), (size,)) for i in rows]
        groups.append((rows, flat[0][None, :] if len(rows) == 1 else ops.stack(flat, axis=0)))
    return groups, constant


def _one_pass(xs: list[tuple[Any, Any]], reads: set[str]) -> dict[str, Any]:
    """One pass per reduction (`REDUCTIONS`: the sum of squares always, the others as
    `reads` asks) over each group's rows, joined into one vector per reduction."""
    parts: dict[str, list[Any]] = {"sq": []}
    for x, source in xs:
        # `source`: the tensor a single row was made from (TensorFlow's L2Loss reads it).
        parts["sq"].append(_backend.row_sums_of_squares(x, source))
        if "sum" in reads:
            parts.setdefault("sum", []).append(ops.sum(x, axis=1))
        if "min" in reads:
            parts.setdefault("min", []).append(ops.min(x, axis=1))
        if "max" in reads:
            parts.setdefault("max", []).append(ops.max(x, axis=1))
        if "zeros" in reads:
            parts.setdefault("zeros", []).append(
                ops.sum(ops.cast(ops.equal(x, 0.0), "float32"), axis=1)
            )
    raw = {k: v[0] if len(v) == 1 else ops.concatenate(v, axis=0) for k, v in parts.items()}
    if "l2" in reads:
        raw["l2"] = ops.sqrt(raw["sq"])
    return raw


def sum_of_squares(g: Any) -> Any:
    """`sum(g**2)` as a scalar; on TensorFlow one L2Loss op (one pass, XLA-compatible)."""
    return _backend.sum_of_squares(g)


def total_sum_of_squares(grads: Sequence[Any]) -> Any:
    """The sum of squares of all of `grads` (a non-empty list), as a float32 scalar: the
    backend's own kernel where it has one (PyTorch), else a `sum_of_squares` each."""
    total = _backend.total_sum_of_squares(grads)
    if total is None:
        total = ops.sum(ops.stack([sum_of_squares(g) for g in grads]))
    return total


def traced_for_xla(flag: bool) -> Any:
    """Tells `sum_of_squares` that the step being traced is compiled with XLA (a
    context manager)."""
    return _backend.traced_for_xla(flag)


def _assemble(
    table: Any, order: list[int], constant_rows: dict[int, str], stats: tuple[str, ...], n_rows: int
) -> Any:
    """Adds the constant rows to `table` (rows in `order`) and puts all rows in order."""
    blocks = [] if table is None else [table]
    order = list(order)
    for i, kind in constant_rows.items():
        values = [math.nan if kind == "none" else SPECS[n].empty for n in stats]
        blocks.append(ops.convert_to_tensor(np.asarray([values], dtype="float32")))
        order.append(i)
    table = blocks[0] if len(blocks) == 1 else ops.concatenate(blocks, axis=0)
    if order == list(range(n_rows)):
        return table
    inverse = np.empty(n_rows, dtype="int32")
    inverse[np.asarray(order)] = np.arange(n_rows, dtype="int32")
    return ops.take(table, inverse, axis=0)


def _one(name: str, g: Any) -> float:
    return float(np.asarray(compute_stats([g], (name,)))[0, 0])


def norm(g: Any) -> float:
    """L2 norm of the finite elements.

    `norm = sqrt(sum_i g_i**2)` over the elements that are neither NaN nor
    ±Inf; NaN when there are none (an all-NaN gradient is not a vanishing
    one); 0.0 for an empty tensor.

    Example:

    >>> norm(np.array([3.0, 4.0, np.nan]))
    5.0
    >>> norm(np.array([np.nan, np.inf]))
    nan
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


def compute_histograms(tensors: Sequence[Any], bins_per_decade: int) -> Any:
    """Counts the elements of each tensor in the bins of `histogram_bins`.

    One bincount over all tensors at once; compiles under XLA. A `None`
    entry gives a row of zeros.

    Args:
        tensors: Gradients or `None`.
        bins_per_decade: Number of bins per power of ten.

    Returns:
        An int32 tensor of shape `(len(tensors), 2 * K + 2)`.

    Example:

    >>> from gradwatch.stats import histogram_bins
    >>> counts = np.asarray(compute_histograms([np.array([-12.0, 0.0, 3e-3, np.nan])], 1))
    >>> lo, hi, sign = histogram_bins(1)
    >>> [(sign[i], lo[i].item(), counts[0, i].item()) for i in np.nonzero(counts[0])[0]]
    [('-', 10.0, 1), ('0', 0.0, 1), ('+', 0.001, 1), ('nonfinite', nan, 1)]
    """
    n_bins = histogram_bin_count(bins_per_decade)
    k = n_bins // 2 - 1  # bins per sign
    sparse = {i for i, t in enumerate(tensors) if isinstance(t, SparseGradient)}
    present = [i for i, t in enumerate(tensors) if t is not None and i not in sparse]
    out_rows = len(tensors)
    if not present and not sparse:
        return ops.zeros((out_rows, n_bins), dtype="int32")
    if present:
        # Rows of equal-size small tensors are stacked, so that the count takes few inputs.
        # (Empty tensors are left out: their row of zeros is added below.)
        groups, _ = _groups([tensors[i] for i in present])
        present = [present[r] for rows, _ in groups for r in rows]
    if present:
        sizes = tuple(int(x.shape[0]) for _, x in groups)
        flat_counts = _dense_counter(sizes, bins_per_decade)(*[x for _, x in groups])
        counts = ops.reshape(flat_counts, (len(present), n_bins))
    else:
        counts = ops.zeros((0, n_bins), dtype="int32")
    if sparse:
        # Touched rows are binned; padding goes to a bin past the end, dropped; the
        # untouched elements are zeros.
        rows = []
        for i in sorted(sparse):
            g = tensors[i]
            x = ops.reshape(ops.cast(g.rows, "float32"), (-1,))
            idx = ops.where(
                ops.reshape(g.valid(), (-1,)), _backend.bin_index(x, bins_per_decade), n_bins
            )
            c = _backend.bincount(idx, n_bins + 1)[:n_bins]
            zero_bin = ops.one_hot(k, n_bins, dtype="int32")
            rows.append(c + zero_bin * ops.cast(g.implicit_zeros(), "int32"))
        counts = ops.concatenate([counts, ops.stack(rows, axis=0)], axis=0)
        present = present + sorted(sparse)
    if present == list(range(out_rows)):
        return counts
    rows = ops.concatenate([counts, ops.zeros((1, n_bins), dtype="int32")], axis=0)
    where = {j: r for r, j in enumerate(present)}
    return ops.take(rows, np.asarray([where.get(i, len(present)) for i in range(out_rows)]), axis=0)


def _dense_counter(rows: tuple[int, ...], bins_per_decade: int) -> Any:
    """A function counting the bins of 2-D tensors of `rows` rows each: one row of bins
    per row, in order.

    The backend may compile it (`fused`): TensorFlow does, with XLA, also inside a
    step that is not.
    """
    n_bins = histogram_bin_count(bins_per_decade)

    starts = np.cumsum((0, *rows))
    total = int(starts[-1])

    def count(*groups):
        idx = []
        for start, x in zip(starts, groups, strict=False):
            offset = ops.convert_to_tensor(
                ((start + np.arange(x.shape[0])) * n_bins).astype("int32")[:, None]
            )
            j = ops.reshape(
                _backend.bin_index(ops.reshape(x, (-1,)), bins_per_decade), ops.shape(x)
            )
            idx.append(ops.reshape(j + offset, (-1,)))
        return _backend.bincount(
            idx[0] if len(idx) == 1 else ops.concatenate(idx, axis=0), total * n_bins
        )

    return _backend.fused(count, (rows, bins_per_decade))
