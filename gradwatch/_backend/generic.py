"""Any other Keras backend (NumPy, OpenVINO): gradwatch does not record there
(`GradWatch` refuses it when training starts), but the public stats functions
(`gradwatch.stats.compute_stats`, `compute_histograms`) work, in `keras.ops`."""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Hashable, Sequence
from typing import Any

import numpy as np
from keras import ops

from gradwatch._stats import kernels as _kernels

RECORDS = False  # GradWatch records on this backend
INDEX_DTYPE = "int64"
STATE_IN_STEP = False
# gradwatch's state is made where the step first needs it.
PREMAKES_STATE = False
APPLY_METHOD = None


def host_copy(x: Any) -> np.ndarray:
    return np.array(ops.convert_to_numpy(x))


def compiling() -> bool:
    return False


def cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    return ops.cond(pred, true_fn, false_fn)


def traced_once(key: Hashable, fn: Callable[[Any], Any]) -> Callable[[Any], Any]:
    return fn


# ------------------------------------------------- the array functions of the step
class Ops:
    """The array functions that shared code computes its derived stats and checks
    with (`gradwatch._stats.derived`), in `keras.ops`."""

    # The stats table is handed on as computed (no slicing into columns and restacking).
    restack = False

    @staticmethod
    def stack(xs: Sequence[Any], axis: int = 0) -> Any:
        return ops.stack(xs, axis=axis)

    @staticmethod
    def concat(xs: Sequence[Any]) -> Any:
        return ops.concatenate(xs, axis=0)

    @staticmethod
    def flat(x: Any) -> Any:
        return ops.reshape(x, (-1,))

    @staticmethod
    def split(x: Any, sizes: Sequence[int]) -> list[Any]:
        out, start = [], 0
        for size in sizes:
            out.append(x[start : start + size])
            start += size
        return out

    @staticmethod
    def sum(x: Any) -> Any:
        return ops.sum(x)

    @staticmethod
    def sqrt(x: Any) -> Any:
        return ops.sqrt(x)

    @staticmethod
    def maximum(a: Any, b: Any) -> Any:
        return ops.maximum(a, b)

    @staticmethod
    def minimum(a: Any, b: Any) -> Any:
        return ops.minimum(a, b)

    @staticmethod
    def clip(x: Any, lo: float, hi: float) -> Any:
        return ops.clip(x, lo, hi)

    @staticmethod
    def full(shape: Sequence[int], value: float) -> Any:
        return ops.full(shape, value, "float32")

    @staticmethod
    def zeros(shape: Sequence[int]) -> Any:
        return ops.zeros(shape)

    @staticmethod
    def nan() -> Any:
        return ops.convert_to_tensor(math.nan, "float32")

    @staticmethod
    def where(cond: Any, a: Any, b: Any) -> Any:
        return ops.where(cond, a, b)

    @staticmethod
    def equal(a: Any, b: Any) -> Any:
        return ops.equal(a, b)

    @staticmethod
    def cast(x: Any, dtype: Any) -> Any:
        return ops.cast(x, dtype)

    @staticmethod
    def read(variable: Any) -> Any:
        """A variable's value, read in the step (after the update, where it ran)."""
        return ops.convert_to_tensor(variable.value)

    @staticmethod
    def assign(variable: Any, value: Any) -> None:
        # Through the variable's `assign`: in place on PyTorch, and into the step's
        # StatelessScope on JAX (gradwatch's state travels in the metrics state).
        variable.assign(value)

    # The every-step check.
    @staticmethod
    def false() -> Any:
        return ops.convert_to_tensor(False)

    @staticmethod
    def any(x: Any) -> Any:
        return ops.any(x)

    @staticmethod
    def isfinite(x: Any) -> Any:
        return ops.isfinite(x)

    @staticmethod
    def logical_not(x: Any) -> Any:
        return ops.logical_not(x)

    @staticmethod
    def logical_and(a: Any, b: Any) -> Any:
        return ops.logical_and(a, b)

    @staticmethod
    def logical_or(a: Any, b: Any) -> Any:
        return ops.logical_or(a, b)

    @staticmethod
    def false_like(x: Any) -> Any:
        return ops.zeros_like(x, "bool")

    @staticmethod
    def note_first(tripped: Any, step_var: Any, sq_var: Any, step: Any, sq: Any) -> None:
        """Keeps the step and the sums of squares of the first step that `tripped`."""
        first = ops.logical_and(tripped, step_var.value < 0)
        step_var.assign(ops.where(first, ops.cast(step, step_var.dtype), step_var.value))
        sq_var.assign(ops.where(first, sq, sq_var.value))

    @staticmethod
    def count_tripped(variable: Any, flags: Sequence[Any]) -> None:
        variable.assign(variable.value + ops.cast(ops.stack(flags), variable.dtype))


OPS = CHECK_OPS = Ops


OWN_TRAIN_STEP = False
GATES_IN_STEP = False


def make_train_function(model: Any, make: Callable, force: bool, custom: bool, capture: Any) -> Any:
    """Keras' train function, as it is."""
    return make(force)


def stats_table(tensors: Sequence[Any], stats: tuple[str, ...]) -> None:
    """None: `compute_stats`' shared algorithm serves this backend."""
    return None


def total_sum_of_squares(grads: Sequence[Any]) -> None:
    """None: the sum of each gradient's `sum_of_squares` serves this backend."""
    return None


def fused(fn: Callable[..., Any], key: Any) -> Callable[..., Any]:
    """`fn` as it is."""
    return fn


def traced_for_xla(flag: bool) -> Any:
    """No XLA step here: nothing to tell `sum_of_squares`."""
    return contextlib.nullcontext()


def bincount(idx: Any, length: int) -> Any:
    """How often each of `0 .. length - 1` occurs in the int32 tensor `idx`."""
    # Keras' other backends (NumPy): GradWatch refuses them, but `compute_histograms`
    # is public and works there too.
    return ops.segment_sum(ops.ones_like(idx), idx, num_segments=length)


sum_of_squares = _kernels.sum_of_squares
row_sums_of_squares = _kernels.row_sums_of_squares
unscaled_float32 = _kernels.unscaled_float32
bin_index = _kernels.bin_index


# ------------------------------------------------- defaults the backends share
# One replica: no tf.distribute (JAX, PyTorch, and here).
DISTRIBUTES = False  # `per_replica`: the step runs once per replica


def all_gather(x: Any) -> Any:
    return x  # one replica


def all_reduce_sum(xs: list[Any]) -> list[Any]:
    return xs


def num_replicas(model: Any) -> int:
    return 1


def worker_of(model: Any) -> tuple[int, bool]:
    return 0, True


def check_strategy(model: Any) -> None:
    """No tf.distribute: nothing to refuse."""


# A step that reads the variables themselves (TensorFlow, PyTorch).
def input_scope(model: Any, scope: Any) -> Any:
    """No scope: the step reads the variables themselves."""
    return contextlib.nullcontext()


def readable_in_step(model: Any, scope: Any, variable: Any) -> bool:
    """Every variable: the step reads the variables themselves."""
    return True


# Nothing compiles around the step (TensorFlow, JAX).
def outside_compile(fn: Callable) -> Callable:
    """`fn` itself: nothing compiles around the step (`compiling()` is False)."""
    return fn


def note_stock_step(model: Any) -> None:
    """Nothing to note: the stock step is recorded in the step."""


def stock_train_function(model: Any, fn: Any) -> Any:
    """Keras' train function, as it is."""
    return fn


# ------------------------------------- keeping a non-finite update from the model
def all_finite(grads: Sequence[Any]) -> Any:
    """Whether every element of every gradient is finite (a bool tensor)."""
    return ops.all(ops.stack([ops.all(ops.isfinite(g)) for g in grads]))


def logical_and(a: Any, b: Any) -> Any:
    return ops.logical_and(a, b)


def logical_not(a: Any) -> Any:
    return ops.logical_not(a)


def agree_across_replicas(finite: Any) -> Any:
    """The same on every replica: there is one."""
    return finite


def gated_apply(
    model: Any, finite: Any, apply: Callable, args: tuple, skip: Callable[[], None]
) -> None:
    """Runs `apply(*args)` where `finite` holds, else `skip()` (`ops.cond`)."""

    def taken() -> None:
        apply(*args)

    ops.cond(finite, taken, skip)


def snapshots_free() -> bool:
    """Whether a snapshot of variables costs nothing unless restored: no, it is a copy."""
    return False


def restore_where(model: Any, predicate: Any, saved: Sequence[tuple[Any, Any]]) -> None:
    """Where `predicate` holds (the step runs eagerly), puts each variable of `saved`
    back to its value there."""
    if bool(predicate):
        for variable, value in saved:
            variable.assign(value)


def to_host(model: Any, keep: Callable[..., None], step: Any, leaves: Sequence[Any]) -> None:
    """Calls `keep(step, *leaves)` with NumPy copies."""
    keep(int(host_copy(step)), *(x if x is None else host_copy(x) for x in leaves))


def undo_step(model: Any, scope: Any, finite: Any, skip: Callable[[], None]) -> None:
    """Not used: gradwatch does not record on this backend."""


def new_flag() -> None:
    """None: the step's state is stateless, and `fit` polls the alarms after each
    execution on the main thread, so no flag carries a stop into the next step."""
    return None


# ------------------------------------------------- the replay of a batch (`_forensics`)
def gradients_of(
    fn: Callable[[list[Any], list[Any]], Any], probes: Sequence[Any], values: Sequence[Any]
) -> None:
    return None  # no autodiff in `keras.ops` alone


def first_nonfinite_op(fn: Callable[[], Any]) -> None:
    return None  # op types are TensorFlow's


def row_gradients(
    loss_of: Callable[[list[Any], list[Any], Any], Any],
    reduce: Callable[[Any, list[Any]], Any],
    vectorized: bool,
) -> None:
    return None  # no autodiff in `keras.ops` alone
