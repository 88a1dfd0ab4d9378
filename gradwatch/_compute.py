"""The stats of the catalogue (`gradwatch.stats`), computed with `keras.ops` inside the step."""

from __future__ import annotations

import contextlib
import math
import threading
from collections.abc import Iterator, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch._backend import current as _backend
from gradwatch._catalogue import GRADIENT_STATS, HIST_MIN_EXP, histogram_bin_count
from gradwatch.sparse import SparseGradient


def compute_stats(tensors: Sequence[Any], stats: Sequence[str]) -> Any:
    """Computes the stats of several tensors at once, in a few passes over the data.

    Small tensors of equal size are stacked so that one reduction serves them
    all; large ones are reduced in place. The stats come from one pass each of
    sum of squares, sum, min and max (as the stats need them). Where an element
    is NaN or Inf (any makes the sum of squares non-finite), or where the mean
    so dominates the spread that the one-pass variance would lose digits, one
    branch per step takes an exact path that masks non-finite elements and
    computes `std` in two passes. Works inside a compiled (and XLA-compiled)
    step. A `None` entry (a disconnected variable) gives a row of NaN.

    Args:
        tensors: Gradients (any float dtype; computed in float32) or `None`.
        stats: Names from `GRADIENT_STATS`.

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
    if keras.backend.backend() == "torch":
        return _torch_stats(tensors, stats)
    # A sparse gradient (touched rows of a table) is reduced on its own, over its rows.
    sparse = [i for i, t in enumerate(tensors) if isinstance(t, SparseGradient)]
    groups, constant_rows = _groups([None if i in sparse else t for i, t in enumerate(tensors)])
    for i in sparse:
        del constant_rows[i]
    n_rows = len(tensors)
    if sparse:
        parts = [_exact_sparse(tensors[i]) for i in sparse]
        sparse_table = ops.stack(
            [ops.stack([p[name] for p in parts], axis=0) for name in stats], axis=1
        )
    if not groups:
        table = sparse_table if sparse else None
        return ops.reshape(
            _assemble(table, sparse, constant_rows, stats, n_rows), (n_rows, len(stats))
        )
    order = [i for rows, _ in groups for i in rows]
    sources = {rows[0]: tensors[rows[0]] for rows, x in groups if x.shape[0] == 1}
    raw = _one_pass([(x, sources.get(rows[0])) for rows, x in groups], stats)
    size = ops.convert_to_tensor(
        np.asarray([float(np.prod(tuple(tensors[i].shape))) for i in order], "float32")
    )
    sq = raw["sq"]
    # One branch per step: the one-pass results stand unless an element is NaN or
    # Inf (then its sum of squares is non-finite) or the mean so dominates the
    # spread that the one-pass variance would lose digits; then the exact path.
    fine = ops.all(ops.isfinite(sq))
    cols: dict[str, Any] = {"norm": ops.sqrt(sq)}
    if "sum" in raw:
        cols["mean"] = raw["sum"] / size
    if "std" in stats:
        var = ops.maximum(sq / size - ops.square(cols["mean"]), 0.0)
        cols["std"] = ops.sqrt(var)
        fine = ops.logical_and(fine, ops.all(ops.square(cols["mean"]) <= 16.0 * var))
    for name in ("min", "max"):
        if name in raw:
            cols[name] = raw[name]
    if "abs_max" in stats:
        cols["abs_max"] = ops.maximum(ops.abs(raw["min"]), ops.abs(raw["max"]))
    if "nonfinite" in stats:
        cols["nonfinite"] = ops.zeros_like(sq)
    if "zero_frac" in stats:
        cols["zero_frac"] = raw["zeros"] / size

    fast = ops.stack([cols[name] for name in stats], axis=1)

    def exact():
        parts = [_exact_group(x) for _, x in groups]
        return ops.stack(
            [ops.concatenate([p[name] for p in parts], axis=0) for name in stats], axis=1
        )

    table = branch(fine, lambda: fast, exact)
    if sparse:
        table = ops.concatenate([table, sparse_table], axis=0)
        order = order + sparse
    return ops.reshape(_assemble(table, order, constant_rows, stats, n_rows), (n_rows, len(stats)))


def _torch_stats(tensors: Sequence[Any], stats: tuple[str, ...]) -> Any:
    """`compute_stats` on PyTorch, in few torch calls: the step runs eagerly there, so
    each op costs a dispatch (and a `keras.ops` call its Python layer on top).

    The same groups, one-pass formulas and exact path as the other backends, with
    raw torch reductions: a norm (not a square and a sum), a sum, and `aminmax`
    (min and max in one pass) per group, and one host read of a flag to choose the
    path. (Measured on the CPU: `torch._foreach_norm` was slower than one norm per
    tensor, and `torch.cat` of the gradients with segment reductions far slower.)
    """
    import torch

    wanted = set(stats)
    present: list[int] = []
    flat: list[Any] = []
    constant_rows: dict[int, str] = {}
    for i, t in enumerate(tensors):
        if t is None:
            constant_rows[i] = "none"
            continue
        if not isinstance(t, torch.Tensor):
            t = ops.convert_to_tensor(t)
        if t.numel() == 0:
            constant_rows[i] = "empty"
            continue
        present.append(i)
        flat.append(t.reshape(-1) if t.dtype == torch.float32 else t.reshape(-1).float())
    n_rows = len(tensors)
    k = len(stats)
    if not present:
        return _torch_assemble(None, [], constant_rows, stats, n_rows)
    # Small tensors of one size are stacked, so that one reduction serves them all;
    # large ones are reduced flat (torch's reductions over a dim of a single row are
    # many times slower than over the whole tensor).
    by_size: dict[int, list[int]] = {}
    groups: list[tuple[list[int], Any]] = []
    for j, x in enumerate(flat):
        if x.numel() >= _STACK_BELOW:
            groups.append(([j], x))
        else:
            by_size.setdefault(x.numel(), []).append(j)
    for rows in by_size.values():
        x = flat[rows[0]] if len(rows) == 1 else torch.stack([flat[j] for j in rows])
        groups.append((rows, x))
    order = [j for rows, _ in groups for j in rows]
    # Each group's reductions one after the other, while its data is still in cache.
    want_sum = bool(wanted & {"mean", "std"})
    want_range = bool(wanted & {"min", "max", "abs_max"})
    want_zeros = "zero_frac" in wanted
    parts: dict[str, list[Any]] = {"norm": [], "sum": [], "min": [], "max": [], "zeros": []}
    for _, x in groups:
        flat_group = x.dim() == 1
        dim = None if flat_group else 1
        out = {"norm": torch.linalg.vector_norm(x, dim=dim)}
        if want_sum:
            out["sum"] = x.sum() if flat_group else x.sum(dim=1)
        if want_range:
            if flat_group or x.shape[1] <= 1024:
                out["min"], out["max"] = torch.aminmax(x, dim=dim)
            else:  # `aminmax` over long rows is many times slower than these two
                out["min"], out["max"] = x.amin(dim=1), x.amax(dim=1)
        if want_zeros:
            out["zeros"] = (x == 0).sum() if flat_group else (x == 0).sum(dim=1)
        for name, value in out.items():
            parts[name].append(value[None] if flat_group else value)

    def joined(name: str) -> Any:
        return parts[name][0] if len(parts[name]) == 1 else torch.cat(parts[name])

    norm = joined("norm")
    sq = norm * norm
    size = torch.tensor([float(flat[j].numel()) for j in order], device=norm.device)
    cols: dict[str, Any] = {"norm": norm}
    ok = torch.isfinite(sq)
    if want_sum:
        cols["mean"] = joined("sum") / size
    if "std" in wanted:
        var = torch.clamp(sq / size - cols["mean"] * cols["mean"], min=0.0)
        cols["std"] = torch.sqrt(var)
        ok = ok & (cols["mean"] * cols["mean"] <= 16.0 * var)
    if want_range:
        cols["min"], cols["max"] = joined("min"), joined("max")
        if "abs_max" in wanted:
            cols["abs_max"] = torch.maximum(cols["min"].abs(), cols["max"].abs())
    if "nonfinite" in wanted:
        cols["nonfinite"] = torch.zeros_like(norm)
    if want_zeros:
        cols["zero_frac"] = joined("zeros").float() / size
    # One host read per step (as `ops.cond` does eagerly; Keras' loop copies each step's
    # logs to the host for the callbacks anyway): the one-pass results stand unless an
    # element is NaN or Inf, or the mean so dominates the spread that the one-pass
    # variance loses digits.
    if bool(ok.all()):
        table = torch.stack([cols[name] for name in stats], dim=1)
    else:
        parts = [_exact_group(x if x.dim() == 2 else x[None]) for _, x in groups]
        table = torch.stack(
            [torch.cat([torch.reshape(p[name], (-1,)) for p in parts]) for name in stats], dim=1
        )
    rows = [present[j] for j in order]
    return _torch_assemble(table.to(torch.float32), rows, constant_rows, stats, n_rows, k)


def _torch_assemble(
    table: Any,
    rows: list[int],
    constant_rows: dict[int, str],
    stats: tuple[str, ...],
    n_rows: int,
    k: int | None = None,
) -> Any:
    """`_assemble` in torch: puts the computed rows and the constant ones in order."""
    import torch

    k = len(stats) if k is None else k
    if table is not None and not constant_rows and rows == list(range(n_rows)):
        return table
    out = torch.full(
        (n_rows, k), math.nan, dtype=torch.float32, device=None if table is None else table.device
    )
    if table is not None:
        out[torch.tensor(rows, device=out.device)] = table
    for i, kind in constant_rows.items():
        if kind == "empty":
            for j, name in enumerate(stats):
                if name in _EMPTY:
                    out[i, j] = _EMPTY[name]
    return out


def branch(pred: Any, true_fn: Any, false_fn: Any) -> Any:
    """`ops.cond`; on TensorFlow graphs an unlowered branch, so that the branch not
    taken costs nothing (see the backend's `cond`)."""
    return _backend.cond(pred, true_fn, false_fn)


# Tensors below this many elements are stacked with others of their size, so that
# one reduction serves many small variables; larger ones are reduced in place.
_STACK_BELOW = 16384


def _groups(tensors: Sequence[Any]) -> tuple[list[tuple[list[int], Any]], dict[int, str]]:
    """Groups of (row indices, 2-D float32 tensor with one row per tensor).

    Also returns the rows that need no computing: `None` ("none") and empty
    tensors ("empty").
    """
    constant: dict[int, str] = {}
    by_size: dict[int, list[int]] = {}
    groups = []
    for i, t in enumerate(tensors):
        if t is None:
            constant[i] = "none"
            continue
        size = int(np.prod(tuple(t.shape)))
        if size == 0:
            constant[i] = "empty"
        elif size >= _STACK_BELOW:
            groups.append(([i], ops.reshape(ops.cast(t, "float32"), (1, size))))
        else:
            by_size.setdefault(size, []).append(i)
    for size, rows in by_size.items():
        flat = [ops.reshape(ops.cast(tensors[i], "float32"), (size,)) for i in rows]
        groups.append((rows, flat[0][None, :] if len(rows) == 1 else ops.stack(flat, axis=0)))
    return groups, constant


def _one_pass(xs: list[tuple[Any, Any]], stats: tuple[str, ...]) -> dict[str, Any]:
    """One pass per reduction over each group's rows, joined into one vector per reduction."""
    wanted = set(stats)
    parts: dict[str, list[Any]] = {"sq": []}
    for x, source in xs:
        # On a single tensor, L2Loss reads the tensor itself, so that the same op in
        # GradWatch's every-step check is the same node and computed once.
        parts["sq"].append(_sum_of_squares(x, source))
        if wanted & {"mean", "std"}:
            parts.setdefault("sum", []).append(ops.sum(x, axis=1))
        if wanted & {"min", "abs_max"}:
            parts.setdefault("min", []).append(ops.min(x, axis=1))
        if wanted & {"max", "abs_max"}:
            parts.setdefault("max", []).append(ops.max(x, axis=1))
        if "zero_frac" in wanted:
            parts.setdefault("zeros", []).append(
                ops.sum(ops.cast(ops.equal(x, 0.0), "float32"), axis=1)
            )
    return {k: v[0] if len(v) == 1 else ops.concatenate(v, axis=0) for k, v in parts.items()}


def _sum_of_squares(x: Any, source: Any = None) -> Any:
    if keras.backend.backend() == "tensorflow" and x.shape[0] == 1:
        return ops.reshape(sum_of_squares(x if source is None else source), (1,))
    return ops.sum(ops.square(x), axis=1)


_xla = threading.local()


@contextlib.contextmanager
def traced_for_xla(flag: bool) -> Iterator[None]:
    """Tells `sum_of_squares` that the step being traced is compiled with XLA."""
    before = getattr(_xla, "on", False)
    _xla.on = bool(flag)
    try:
        yield
    finally:
        _xla.on = before


def sum_of_squares(g: Any) -> Any:
    """`sum(g**2)` as a scalar; on TensorFlow one L2Loss op (one pass, XLA-compatible)."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        g = tf.cast(g, tf.float32)
        if getattr(_xla, "on", False):
            # XLA's CPU backend runs a reduction with the square fused into it several
            # times slower than a plain sum: keep the square a separate pass (the MLP's
            # jit row measured 1.36x -> 1.23x).
            try:
                from tensorflow.compiler.tf2xla.python import xla
            except ImportError:  # pragma: no cover - private module moved
                return 2.0 * tf.nn.l2_loss(g)
            (squares,) = xla.optimization_barrier([tf.square(g)])
            return tf.reduce_sum(squares)
        return 2.0 * tf.nn.l2_loss(g)
    return ops.sum(ops.square(ops.cast(g, "float32")))


def _exact_group(x: Any) -> dict[str, Any]:
    """Every stat, with NaN and Inf treated as the catalogue defines."""
    n = float(x.shape[1])
    nan = math.nan
    finite = ops.isfinite(x)
    notnan = ops.logical_not(ops.isnan(x))
    n_finite = ops.sum(ops.cast(finite, "float32"), axis=1)
    none_left = ops.sum(ops.cast(notnan, "float32"), axis=1) == 0
    xf = ops.where(finite, x, 0.0)
    safe_n = ops.maximum(n_finite, 1.0)
    mean = ops.where(n_finite == 0, nan, ops.sum(xf, axis=1) / safe_n)
    centred = ops.where(finite, x - ops.nan_to_num(mean)[:, None], 0.0)
    return {
        "norm": ops.sqrt(ops.sum(ops.square(xf), axis=1)),
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


def _exact_sparse(g: SparseGradient) -> dict[str, Any]:
    """Every stat of a sparse gradient's dense equivalent, from its touched rows alone:
    the untouched elements are zeros that count in `n` but add nothing to the sums."""
    import tensorflow as tf

    nan = math.nan
    x = tf.reshape(tf.cast(g.rows, tf.float32), (-1,))
    valid = tf.reshape(g.valid(), (-1,))
    zeros = g.implicit_zeros()
    n = float(g.size)
    finite = ops.isfinite(x) & valid
    notnan = ops.logical_not(ops.isnan(x)) & valid
    n_finite = ops.sum(ops.cast(finite, "float32")) + zeros
    none_left = ops.sum(ops.cast(notnan, "float32")) + zeros == 0
    xf = ops.where(finite, x, 0.0)
    safe_n = ops.maximum(n_finite, 1.0)
    mean = ops.where(n_finite == 0, nan, ops.sum(xf) / safe_n)
    m0 = ops.nan_to_num(mean)
    spread = ops.sum(ops.square(ops.where(finite, x - m0, 0.0))) + zeros * ops.square(m0)
    # tf's reductions: Keras' refuse an empty tensor (a step that touched no row).
    lo = tf.reduce_min(ops.where(notnan, x, math.inf))
    hi = tf.reduce_max(ops.where(notnan, x, -math.inf))
    some_zero = zeros > 0
    lo = ops.where(some_zero, ops.minimum(lo, 0.0), lo)
    hi = ops.where(some_zero, ops.maximum(hi, 0.0), hi)
    abs_max = tf.reduce_max(ops.where(notnan, ops.abs(x), -1.0))
    abs_max = ops.where(some_zero, ops.maximum(abs_max, 0.0), abs_max)
    n_valid = ops.sum(ops.cast(valid, "float32"))
    return {
        "norm": ops.sqrt(ops.sum(ops.square(xf))),
        "mean": mean,
        "std": ops.where(n_finite == 0, nan, ops.sqrt(spread / safe_n)),
        "min": ops.where(none_left, nan, lo),
        "max": ops.where(none_left, nan, hi),
        "abs_max": ops.where(none_left, nan, abs_max),
        "nonfinite": n_valid - (n_finite - zeros),
        "zero_frac": (ops.sum(ops.cast(ops.equal(x, 0.0) & valid, "float32")) + zeros) / n,
    }


# A disconnected variable's row is all NaN; an empty tensor has norm 0, no
# non-finite elements, and no mean, std, min, max or zero fraction.
_EMPTY = {"norm": 0.0, "nonfinite": 0.0}


def _assemble(
    table: Any, order: list[int], constant_rows: dict[int, str], stats: tuple[str, ...], n_rows: int
) -> Any:
    """Adds the constant rows to `table` (rows in `order`) and puts all rows in order."""
    blocks = [] if table is None else [table]
    order = list(order)
    for i, kind in constant_rows.items():
        values = [math.nan if kind == "none" else _EMPTY.get(n, math.nan) for n in stats]
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
            idx = ops.where(ops.reshape(g.valid(), (-1,)), _bin_index(x, bins_per_decade), n_bins)
            c = _count(idx, n_bins + 1)[:n_bins]
            zero_bin = ops.one_hot(k, n_bins, dtype="int32")
            rows.append(c + zero_bin * ops.cast(g.implicit_zeros(), "int32"))
        counts = ops.concatenate([counts, ops.stack(rows, axis=0)], axis=0)
        present = present + sorted(sparse)
    if present == list(range(out_rows)):
        return counts
    rows = ops.concatenate([counts, ops.zeros((1, n_bins), dtype="int32")], axis=0)
    where = {j: r for r, j in enumerate(present)}
    return ops.take(rows, np.asarray([where.get(i, len(present)) for i in range(out_rows)]), axis=0)


_COUNTERS: dict[tuple[tuple[int, ...], int], Any] = {}


def _dense_counter(rows: tuple[int, ...], bins_per_decade: int) -> Any:
    """A function counting the bins of 2-D tensors of `rows` rows each: one row of bins
    per row, in order.

    On TensorFlow it is compiled with XLA, also inside a step that is not: XLA fuses
    the dozen elementwise ops of the binning into one pass over the elements, which
    measured 5x faster on the CPU than running them one by one.
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
            j = ops.reshape(_bin_index(ops.reshape(x, (-1,)), bins_per_decade), x.shape)
            idx.append(ops.reshape(j + offset, (-1,)))
        return _count(idx[0] if len(idx) == 1 else ops.concatenate(idx, axis=0), total * n_bins)

    if keras.backend.backend() != "tensorflow":
        return count
    key = (rows, bins_per_decade)
    if key not in _COUNTERS:
        import tensorflow as tf

        _COUNTERS[key] = tf.function(count, jit_compile=True, autograph=False)
    return _COUNTERS[key]


def _count(idx: Any, length: int) -> Any:
    """How often each of `0 .. length - 1` occurs in the int32 tensor `idx`."""
    if keras.backend.backend() == "tensorflow":
        import tensorflow as tf

        # A bincount: on the CPU an unsorted segment sum of ones was 20x slower.
        return tf.raw_ops.DenseBincount(
            input=idx, size=length, weights=tf.zeros([0], tf.int32), binary_output=False
        )
    if keras.backend.backend() == "torch":
        import torch

        # One pass, in int64: Keras' segment_sum adds in float32 on torch, which stops
        # counting exactly past 2**24 elements in a bin.
        return torch.bincount(idx, minlength=length).to(torch.int32)
    if keras.backend.backend() == "jax":
        import jax.numpy as jnp

        return jnp.bincount(idx, length=length).astype("int32")
    # Keras' other backends (NumPy): GradWatch refuses them, but `compute_histograms`
    # is public and works there too.
    return ops.segment_sum(ops.ones_like(idx), idx, num_segments=length)


def _bin_index(x: Any, bins_per_decade: int) -> Any:
    """The bin number of each element of a flat float32 tensor (see `histogram_bins`)."""
    if keras.backend.backend() == "torch":
        return _bin_index_torch(x, bins_per_decade)
    n_bins = histogram_bin_count(bins_per_decade)
    k = n_bins // 2 - 1  # bins per sign
    a = ops.abs(x)
    finite = ops.isfinite(x)
    # Subnormal magnitudes count as zeros on every backend: XLA's CPU code (and, in some
    # kernels, TensorFlow's) flushes them to zero, and an explicit bound keeps the bins
    # the same whichever kernel runs.
    nonzero = a >= _SMALLEST_NORMAL
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


#: The smallest normal float32; smaller non-zero magnitudes are subnormal.
_SMALLEST_NORMAL = float(np.finfo(np.float32).tiny)


def _bin_index_torch(x: Any, bins_per_decade: int) -> Any:
    """`_bin_index` on PyTorch, where each op is a pass over the elements and each new
    tensor an allocation: the same arithmetic, in place where it can be."""
    import torch

    k = histogram_bin_count(bins_per_decade) // 2 - 1  # bins per sign
    edges = torch.as_tensor(
        (10.0 ** (HIST_MIN_EXP + np.arange(k + 1) / bins_per_decade)).astype("float32"),
        device=x.device,
    )
    a = torch.abs(x)
    nonzero = a >= _SMALLEST_NORMAL  # False for NaN too
    a.masked_fill_(~nonzero, 1.0)  # zeros and NaN; Inf goes to the top edge, then out
    g = torch.log10(a).sub_(HIST_MIN_EXP).mul_(bins_per_decade).round_().clamp_(0, k)
    g = g.to(torch.int32)
    j = (a >= edges[g]).to(torch.int32).add_(g).sub_(1).clamp_(0, k - 1)
    j = torch.where(x < 0, k - 1 - j, j.add_(k + 1))
    j.masked_fill_(~nonzero, k)
    return j.masked_fill_(~torch.isfinite(x), 2 * k + 1)
