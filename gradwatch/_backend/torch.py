"""PyTorch: the step runs eagerly; gradwatch writes its device state in place, in raw
torch ops (each `keras.ops` call costs a Python layer on top of the dispatch). With
`jit_compile=True`, gradwatch records around the `torch.compile`d step (`make_train_function`)."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from keras import ops

from gradwatch._backend import generic
from gradwatch._backend.generic import Ops
from gradwatch._capture.step import Capture, Records, StepScope, model_state, run_in_scope, scopes
from gradwatch._stats import kernels as _kernels
from gradwatch._stats.kernels import SMALLEST_NORMAL, STACK_BELOW, exact_columns, exact_sums
from gradwatch._stats.specs import HIST_MIN_EXP, SPECS, histogram_bin_count

RECORDS = True  # GradWatch records on this backend

# The same as on the backends gradwatch does not record (`generic`).
DISTRIBUTES = generic.DISTRIBUTES
all_gather = generic.all_gather
all_reduce_sum = generic.all_reduce_sum
check_strategy = generic.check_strategy
restore_where = generic.restore_where
snapshots_free = generic.snapshots_free
input_scope = generic.input_scope
num_replicas = generic.num_replicas
traced_once = generic.traced_once
readable_in_step = generic.readable_in_step
worker_of = generic.worker_of

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
# Not needed: the step runs eagerly.
PREMAKES_STATE = False
APPLY_METHOD = "apply"


class HostCounter:
    """The step counter, kept on the host: the step runs eagerly."""

    def __init__(self, start: int = 0) -> None:
        self.value = start

    def read_value(self) -> int:
        return self.value

    def assign_add(self, n: int) -> None:
        self.value += n

    def numpy(self) -> np.int64:
        return np.int64(self.value)


def new_counter(start: int = 0) -> HostCounter:
    return HostCounter(start)


def counter_metrics(counter: HostCounter) -> list[Any]:
    return []


def skipped_update(loss_scaled: Iterable[tuple[Any, Any]]) -> bool:
    # Eager: a host bool.
    return any(int(host_copy(count.value)) == before for count, before in loss_scaled)


def counter_now(counter: Any) -> int:
    return int(host_copy(counter.value))


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


# ------------------------------------------------- the array functions of the step
class HostValue:
    """A host array with the `numpy()` of a device variable."""

    def __init__(self, value: np.ndarray):
        self.value = value

    def numpy(self) -> np.ndarray:
        return self.value


class HostOps:
    """The every-step check's array functions, on the host (NumPy): the check reads one
    small copy of the per-variable sums of squares (`squares_by_row`)."""

    @staticmethod
    def false() -> bool:
        return False

    @staticmethod
    def any(x: Any) -> bool:
        return bool(np.any(x))

    @staticmethod
    def isfinite(x: Any) -> Any:
        return np.isfinite(x)

    @staticmethod
    def logical_not(x: Any) -> Any:
        return np.logical_not(x)

    @staticmethod
    def logical_and(a: Any, b: Any) -> Any:
        return np.logical_and(a, b)

    @staticmethod
    def logical_or(a: Any, b: Any) -> Any:
        return np.logical_or(a, b)

    @staticmethod
    def sqrt(x: Any) -> Any:
        with np.errstate(invalid="ignore"):
            return np.sqrt(x)

    @staticmethod
    def false_like(x: Any) -> Any:
        return np.zeros(np.shape(x), bool)

    @staticmethod
    def note_first(tripped: Any, step_var: Any, sq_var: Any, step: Any, sq: Any) -> None:
        """Keeps the step and the sums of squares of the first step that `tripped`."""
        if tripped and step_var.value < 0:
            step_var.value = np.array(step, np.int64)
            sq_var.value = sq

    @staticmethod
    def count_tripped(variable: Any, flags: Sequence[Any]) -> None:
        variable.value += np.array(flags, np.int64)


OPS = Ops
CHECK_OPS = HostOps


def squares_by_row(grads: Sequence[Any], rows: Sequence[int], n: int) -> np.ndarray:
    """The every-step check's input, on the host: each of `n` rows' sum of squares, 0
    where `rows` has no gradient; one small copy of the norms, in raw torch ops (one
    pass each)."""
    sq = np.zeros(n, np.float32)
    norms = host_copy(torch.stack(torch._foreach_norm([g.float() for g in grads])))
    sq[rows] = np.square(norms.astype(np.float64))
    return sq


def alarm_cell(owner: Any, shape: tuple[int, ...], dtype: str, value: float, name: str) -> Any:
    """One of the every-step check's values, kept on the host: the step runs eagerly."""
    return HostValue(np.full(shape, value, dtype))


# The capture runs on host values, outside any traced step (PyTorch).
EAGER = True


def sync_state(model: Any, variable: Any) -> bool:
    return True


def run_step(fn: Callable, model: Any, commit: Callable, *args: Any, **kwargs: Any) -> Any:
    """Runs one counted step, eagerly, and commits its records."""
    outputs, scope = run_in_scope(fn, model, *args, **kwargs)
    # The stats read gradients and weights; they must not join autograd's graph.
    with torch.no_grad():
        commit(model, scope)
    return outputs


OWN_TRAIN_STEP = False  # the stock step is recorded at `APPLY_METHOD`


def train_step(model: Any, *args: Any) -> Any:
    """Not used: the stock step is recorded at `APPLY_METHOD` (`OWN_TRAIN_STEP` is False)."""
    raise NotImplementedError("gradwatch records the stock PyTorch step at its `apply`")


GATES_IN_STEP = False  # the host picks a train function with or without capture


def make_train_function(
    model: Any, make: Callable, force: bool, custom: bool, capture: Capture
) -> Any:
    """Keras' train function; with `jit_compile=True`, Keras' `torch.compile`d step with
    the recording done around it (`custom`: the model overrides `train_step`)."""
    if not model.jit_compile:
        return make(force)
    if model.train_function is not None and not force:
        return model.train_function
    make(force=True)
    model.train_function = _compiled_step(model, model.train_function, custom, capture)
    return model.train_function


def outside_compile(fn: Callable) -> Callable:
    """PyTorch: `fn`, run eagerly at a graph break when called from `torch.compile`d code."""
    return torch._dynamo.disable(fn)


stock_train_function = generic.stock_train_function


def note_stock_step(model: Any) -> None:
    """Notes, at a graph break, that the stock step ran inside a custom one."""
    outside_compile(_note_stock_step)(model)


def _note_stock_step(model: Any) -> None:
    """Notes that the stock step ran inside a custom one (`super().train_step`)."""
    scope = scopes().get(id(model))
    if scope is not None:
        scope.stock = True


def _compiled_step(model: Any, compiled: Callable, custom: bool, capture: Capture) -> Callable:
    """The train function on PyTorch with `jit_compile=True`: Keras' `torch.compile`d
    step, unchanged, with the recording done around it, outside the compiled code.

    The stock step hands `optimizer.apply` each variable's `.grad`, and leaves it there
    (the next step's `zero_grad` clears it); the optimizer does not change it in place.
    So the gradients are read after the step, and what must be read before the update
    (the loss scale, the weights for the update stats) is read before the step. A
    custom step's `record_gradients` runs at a graph break, on the step's tensors; if
    it calls `super().train_step`, the stock step is recorded as above.
    """

    def train_function(data: Any) -> Any:
        all_scopes = scopes()
        scope = all_scopes[id(model)] = StepScope()
        scope.stock = not custom
        scope.data = data
        try:
            watches = model_state(model).listening
            variables = list(model.trainable_weights)
            pending = None
            before = StepScope()  # what the stock step's records read before it
            if watches and variables:
                with torch.no_grad():
                    pending = capture.before_update(
                        model, before, variables, model.optimizer, watches
                    )
            sums = _tracker_sums(model) if watches else None
            saved = capture.undo_point(model)  # None unless a watch keeps the model
            outputs = compiled(data)
            if sums is not None:
                scope.loss = _step_loss(model, sums)
            if scope.learning_rate is None:
                scope.learning_rate, scope.applies = before.learning_rate, before.applies
            if pending is not None and scope.stock:
                for key, entry in before.loss_scaled.items():
                    scope.loss_scaled.setdefault(key, entry)
                scope.accumulated.update(before.accumulated)
                grads = [v.value.grad for v in variables]
                capture.add_records(scope, grads, variables, *pending)
            if saved is not None:
                with torch.no_grad():
                    capture.undo_if_nonfinite(model, scope, saved)
        finally:
            del all_scopes[id(model)]
        with torch.no_grad():
            capture.commit(model, scope)
        return outputs

    return train_function


def _tracker_sums(model: Any) -> tuple[Any, Any] | None:
    """Copies of the loss tracker's running total and count (None: no Keras `Mean`)."""
    tracker = getattr(model, "_loss_tracker", None)
    if not (hasattr(tracker, "total") and hasattr(tracker, "count")):
        return None
    return tracker.total.value.clone(), tracker.count.value.clone()


def _step_loss(model: Any, sums: tuple[Any, Any] | None) -> Any:
    """The loss of the step just run, from what it added to the loss tracker: the stock
    step adds `loss * batch_size` to the total and `batch_size` to the count. (The
    compiled step stays as Keras compiled it, so the loss is not read inside it; the
    total is a float32 sum over the epoch, so this carries its rounding, about one
    float32 ulp of the total divided by the batch size.) NaN if the step added nothing
    (0 / 0: no host sync to check)."""
    if sums is None:
        return None
    tracker = model._loss_tracker
    total = tracker.total.value.double() - sums[0].double()
    count = tracker.count.value.double() - sums[1].double()
    return total / count


def stats_table(tensors: Sequence[Any], stats: tuple[str, ...]) -> Any:
    """`compute_stats` on PyTorch, in few torch calls: the step runs eagerly there, so
    each op costs a dispatch (and a `keras.ops` call its Python layer on top).

    The same groups, kernels (`SPECS`) and exact path as the other backends, with
    raw torch reductions (`_reductions`) and one host read of a flag to choose the
    path. (Measured on the CPU: `torch._foreach_norm` was slower than one norm per
    tensor, and `torch.cat` of the gradients with segment reductions far slower.)
    """
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
    kernels = [SPECS[name].kernel for name in stats]
    raw = _reductions(groups, {read for kernel in kernels for read in kernel.reads})
    size = torch.tensor([float(flat[j].numel()) for j in order], device=raw["sq"].device)
    # One host read per step (as `ops.cond` does eagerly; Keras' loop copies each step's
    # logs to the host for the callbacks anyway): the one-pass results stand unless an
    # element is NaN or Inf, or a kernel's formula would lose digits.
    ok = torch.isfinite(raw["sq"])
    for kernel in dict.fromkeys(kernel for kernel in kernels if kernel.trust is not None):
        ok = ok & kernel.trust(raw, size, TORCH_MATH)
    if bool(ok.all()):
        table = torch.stack([kernel.fast(raw, size, TORCH_MATH) for kernel in kernels], dim=1)
    else:
        table = exact_columns(
            [exact_sums(x if x.dim() == 2 else x[None]) for _, x in groups], stats
        )
    rows = [present[j] for j in order]
    return _assemble(table.to(torch.float32), rows, constant_rows, stats, n_rows, k)


def total_sum_of_squares(grads: Sequence[Any]) -> Any:
    """The sum of squares of all of `grads`: one `torch._foreach_norm` over them all,
    where one norm each costs a dispatch per variable (504 variables: 15x the time)."""
    norms = torch.stack(torch._foreach_norm([g.float() for g in grads]))
    return torch.sum(norms * norms)


def _reductions(groups: list[tuple[list[int], Any]], reads: set[str]) -> dict[str, Any]:
    """The fast path's per-row reductions (`REDUCTIONS`) in raw torch: a norm (not a
    square and a sum), a sum, and `aminmax` (min and max in one pass) per group, each
    group's one after the other while its data is still in cache."""
    want_sum = "sum" in reads
    want_range = bool(reads & {"min", "max"})
    want_zeros = "zeros" in reads
    parts: dict[str, list[Any]] = {"l2": [], "sum": [], "min": [], "max": [], "zeros": []}
    for _, x in groups:
        flat_group = x.dim() == 1
        dim = None if flat_group else 1
        out = {"l2": torch.linalg.vector_norm(x, dim=dim)}
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
    raw = {
        name: values[0] if len(values) == 1 else torch.cat(values)
        for name, values in parts.items()
        if values
    }
    raw["sq"] = raw["l2"] * raw["l2"]
    if want_zeros:
        raw["zeros"] = raw["zeros"].float()
    return raw


class _TorchMath:
    """The array module that the stats' kernels (`SPECS`) finish their fast path with:
    raw torch for the functions the catalogue's kernels call (they run once per step on
    short vectors, where a `keras.ops` call's Python layer costs more than the op), and
    `keras.ops` for any other."""

    sqrt = staticmethod(torch.sqrt)
    abs = staticmethod(torch.abs)
    zeros_like = staticmethod(torch.zeros_like)

    @staticmethod
    def square(x: Any) -> Any:
        return x * x

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return torch.clamp(a, min=b) if isinstance(b, float) else torch.maximum(a, b)

    def __getattr__(self, name: str) -> Any:
        return getattr(ops, name)


TORCH_MATH = _TorchMath()


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
                if not math.isnan(SPECS[name].empty):
                    out[i, j] = SPECS[name].empty
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


# ------------------------------------- keeping a non-finite update from the model
def all_finite(grads: Sequence[Any]) -> bool:
    """Every element of every gradient is finite: a host bool (the step runs eagerly,
    and whether to apply is decided on the host, as a `LossScaleOptimizer` does here)."""
    return bool(torch.stack([torch.isfinite(g).all() for g in grads]).all())


def logical_and(a: Any, b: Any) -> bool:
    return bool(a) and bool(b)


def logical_not(a: Any) -> bool:
    return not a


def agree_across_replicas(finite: Any) -> Any:
    return finite  # no strategy on PyTorch


def gated_apply(
    model: Any, finite: Any, apply: Callable, args: tuple, skip: Callable[[], None]
) -> None:
    """Runs `apply(*args)` where `finite` holds, else `skip()`."""
    if finite:
        apply(*args)
    else:
        skip()


def to_host(model: Any, keep: Callable[..., None], step: Any, leaves: Sequence[Any]) -> None:
    """Calls `keep(step, *leaves)` with NumPy copies (the step runs on the host)."""
    keep(int(step), *(x if x is None else host_copy(x) for x in leaves))


def undo_step(model: Any, scope: StepScope, finite: Any, skip: Callable[[], None]) -> None:
    """Not used: each `apply` is gated (`gated_apply`), and the compiled step is undone
    from copies (`_capture.counting.undo_point`)."""


class HostFlag:
    """A bool of the step, kept on the host: the step runs eagerly."""

    def __init__(self) -> None:
        self.value = False

    def read_value(self) -> bool:
        return self.value

    def assign(self, value: Any) -> None:
        self.value = bool(value)


def new_flag() -> HostFlag:
    return HostFlag()


# ------------------------------------------------- the replay of a batch (`_forensics`)
first_nonfinite_op = generic.first_nonfinite_op


def gradients_of(
    fn: Callable[[list[Any], list[Any]], Any], probes: Sequence[Any], values: Sequence[Any]
) -> tuple[list[Any], list[Any]]:
    probes = [p.detach().requires_grad_(True) for p in probes]
    values = [v.detach().requires_grad_(True) for v in values]
    loss = fn(probes, values)
    grads = torch.autograd.grad(loss, [*probes, *values], allow_unused=True)
    return list(grads[: len(probes)]), list(grads[len(probes) :])


# `torch.func.vmap` runs an op without a batching rule (the CPU's fused attention) row by
# row, and warns that it does: the result is the same.
_NO_BATCHING_RULE = "There is a performance drop because we have not yet implemented the batching"


def row_gradients(
    loss_of: Callable[[list[Any], list[Any], Any], Any],
    reduce: Callable[[Any, list[Any]], Any],
    vectorized: bool,
) -> Callable[[list[Any], list[Any], Any], Any]:
    if vectorized:
        from torch.func import grad_and_value, vmap

        def one(values: list[Any], others: list[Any], row: Any) -> Any:
            grads, loss = grad_and_value(loss_of)(values, others, row)
            return reduce(loss, grads)

        # Each row draws its own dropout mask, as rows of a batch do.
        mapped = vmap(one, in_dims=(None, None, 0), randomness="different")

        def run(values: list[Any], others: list[Any], rows: Any) -> Any:
            import warnings

            with warnings.catch_warnings():
                warnings.filterwarnings("ignore", message=_NO_BATCHING_RULE)
                return mapped(values, others, rows)

        return run

    def loop(values: list[Any], others: list[Any], rows: Any) -> Any:
        outputs = []
        for i in range(int(rows[0].shape[0])):
            leaves = [v.detach().requires_grad_(True) for v in values]
            loss = loss_of(leaves, others, tuple(part[i] for part in rows))
            grads = torch.autograd.grad(loss, leaves, allow_unused=True)
            grads = [
                torch.zeros_like(v) if g is None else g for v, g in zip(leaves, grads, strict=True)
            ]
            with torch.no_grad():
                outputs.append(reduce(loss.detach(), grads))
        return tuple(torch.stack(parts) for parts in zip(*outputs, strict=True))

    return loop
