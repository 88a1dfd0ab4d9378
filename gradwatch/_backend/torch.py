"""PyTorch: the step runs eagerly; gradwatch writes its device state in place, in raw
torch ops (each `keras.ops` call costs a Python layer on top of the dispatch)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from keras import ops

from gradwatch import _kernels
from gradwatch._catalogue import HIST_MIN_EXP, histogram_bin_count
from gradwatch._kernels import EMPTY, SMALLEST_NORMAL, STACK_BELOW, exact_group
from gradwatch._step import Records

RECORDS = True  # GradWatch records on this backend
INDEX_DTYPE = "int64"


def host_copy(x: Any) -> np.ndarray:
    # Without the NumPy 2 copy warning that `ops.convert_to_numpy` gives on a torch tensor.
    if hasattr(x, "detach"):
        return x.detach().cpu().numpy().copy()
    return np.array(ops.convert_to_numpy(x))


def read_rows(variable: Any, idx: np.ndarray) -> np.ndarray:
    return host_copy(variable.value)[idx]


def lift() -> Any:
    return contextlib.nullcontext()


def slot_of(count: Any, capacity: int) -> Any:
    # Stays a device tensor, so that writing never waits on the device.
    return (count.value % capacity).reshape(1)


def write_slot(variable: Any, slot: Any, value: Any) -> None:
    var = variable.value
    if isinstance(value, (bool, int, np.integer, np.bool_)):  # a host number (step, flag)
        var.index_fill_(0, slot, int(value))
        return
    value = ops.convert_to_tensor(value).to(var.dtype)
    var.index_copy_(0, slot, value.reshape(1, *var.shape[1:]))


def advance(count: Any) -> None:
    count.value.add_(1)


# Whether gradwatch's device state travels in the step's state (as metrics).
STATE_IN_STEP = False
APPLY_METHOD = "apply"


class HostCounter:
    """The step counter, kept on the host: the step runs eagerly."""

    def __init__(self) -> None:
        self.value = 0

    def read_value(self) -> int:
        return self.value

    def assign_add(self, n: int) -> None:
        self.value += n

    def numpy(self) -> np.int64:
        return np.int64(self.value)


def new_counter() -> HostCounter:
    return HostCounter()


def counter_metrics(counter: HostCounter) -> list[Any]:
    return []


def skipped_update(loss_scaled: Iterable[tuple[Any, Any]]) -> bool:
    # Eager: a host bool.
    return any(int(host_copy(opt.iterations.value)) == before for opt, before in loss_scaled)


def iterations_now(optimizer: Any) -> int:
    return int(host_copy(optimizer.iterations.value))


def weights_before(variable: Any) -> Any:
    return ops.copy(variable.value)  # updated in place by the optimizer: keep a copy


def as_recorded(grad: Any, variable: Any) -> Any:
    return grad


def float32(x: Any) -> Any:
    return ops.cast(x, "float32")


def global_records(records: Records) -> Records:
    return records  # no strategy on PyTorch


def cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    return ops.cond(pred, true_fn, false_fn)


def when(predicate: Any, fn: Callable[[], None], variables: Sequence[Any]) -> None:
    """Runs `fn` only where `predicate` holds: the step runs eagerly, on a host int."""
    if predicate:
        fn()


# True while `torch.compile` traces (`jit_compile=True`): gradwatch then stays out of the
# traced step, and records around it.
compiling = torch.compiler.is_compiling


def stats_table(tensors: Sequence[Any], stats: tuple[str, ...]) -> Any:
    """`compute_stats` on PyTorch, in few torch calls: the step runs eagerly there, so
    each op costs a dispatch (and a `keras.ops` call its Python layer on top).

    The same groups, one-pass formulas and exact path as the other backends, with
    raw torch reductions: a norm (not a square and a sum), a sum, and `aminmax`
    (min and max in one pass) per group, and one host read of a flag to choose the
    path. (Measured on the CPU: `torch._foreach_norm` was slower than one norm per
    tensor, and `torch.cat` of the gradients with segment reductions far slower.)
    """
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
        return _assemble(None, [], constant_rows, stats, n_rows)
    # Small tensors of one size are stacked, so that one reduction serves them all;
    # large ones are reduced flat (torch's reductions over a dim of a single row are
    # many times slower than over the whole tensor).
    by_size: dict[int, list[int]] = {}
    groups: list[tuple[list[int], Any]] = []
    for j, x in enumerate(flat):
        if x.numel() >= STACK_BELOW:
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
        parts = [exact_group(x if x.dim() == 2 else x[None]) for _, x in groups]
        table = torch.stack(
            [torch.cat([torch.reshape(p[name], (-1,)) for p in parts]) for name in stats], dim=1
        )
    rows = [present[j] for j in order]
    return _assemble(table.to(torch.float32), rows, constant_rows, stats, n_rows, k)


def _assemble(
    table: Any,
    rows: list[int],
    constant_rows: dict[int, str],
    stats: tuple[str, ...],
    n_rows: int,
    k: int | None = None,
) -> Any:
    """`_compute`'s `_assemble` in torch: puts the computed rows and the constant ones in order."""
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
                if name in EMPTY:
                    out[i, j] = EMPTY[name]
    return out


def bin_index(x: Any, bins_per_decade: int) -> Any:
    """The bin index on PyTorch, where each op is a pass over the elements and each new
    tensor an allocation: the same arithmetic, in place where it can be."""
    k = histogram_bin_count(bins_per_decade) // 2 - 1  # bins per sign
    edges = torch.as_tensor(
        (10.0 ** (HIST_MIN_EXP + np.arange(k + 1) / bins_per_decade)).astype("float32"),
        device=x.device,
    )
    a = torch.abs(x)
    nonzero = a >= SMALLEST_NORMAL  # False for NaN too
    a.masked_fill_(~nonzero, 1.0)  # zeros and NaN; Inf goes to the top edge, then out
    g = torch.log10(a).sub_(HIST_MIN_EXP).mul_(bins_per_decade).round_().clamp_(0, k)
    g = g.to(torch.int32)
    j = (a >= edges[g]).to(torch.int32).add_(g).sub_(1).clamp_(0, k - 1)
    j = torch.where(x < 0, k - 1 - j, j.add_(k + 1))
    j.masked_fill_(~nonzero, k)
    return j.masked_fill_(~torch.isfinite(x), 2 * k + 1)


def bincount(idx: Any, length: int) -> Any:
    """How often each of `0 .. length - 1` occurs in the int32 tensor `idx`."""
    # One pass, in int64: Keras' segment_sum adds in float32 on torch, which stops
    # counting exactly past 2**24 elements in a bin.
    return torch.bincount(idx, minlength=length).to(torch.int32)


def fused(fn: Callable[..., Any], key: Any) -> Callable[..., Any]:
    """`fn` as it is (eager: nothing to fuse)."""
    return fn


def traced_for_xla(flag: bool) -> Any:
    """No XLA here: nothing to tell `sum_of_squares`."""
    return contextlib.nullcontext()


sum_of_squares = _kernels.sum_of_squares
row_sums_of_squares = _kernels.row_sums_of_squares
unscaled_float32 = _kernels.unscaled_float32
