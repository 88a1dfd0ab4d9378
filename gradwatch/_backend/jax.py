"""JAX: gradwatch's device state travels in the stateless step's state; writes are
assignments within the step's `StatelessScope`."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch import _kernels
from gradwatch._state import StateMetric
from gradwatch._step import Records

RECORDS = True  # GradWatch records on this backend
INDEX_DTYPE = "int32"  # JAX runs without 64-bit types unless asked


def host_copy(x: Any) -> np.ndarray:
    return np.array(ops.convert_to_numpy(x))


def read_rows(variable: Any, idx: np.ndarray) -> np.ndarray:
    return host_copy(variable.value)[idx]


def lift() -> Any:
    return contextlib.nullcontext()


def slot_of(count: Any, capacity: int) -> Any:
    return ops.cast(count.value % capacity, "int32")


def write_slot(variable: Any, slot: Any, value: Any) -> None:
    # Stateless: a dynamic-update-slice, assigned within the step's StatelessScope.
    value = ops.reshape(ops.cast(value, variable.dtype), (1, *variable.shape[1:]))
    start = (slot,) + (0,) * (len(variable.shape) - 1)
    variable.assign(ops.slice_update(variable.value, start, value))


def advance(count: Any) -> None:
    count.assign(count.value + ops.ones((), count.dtype))


# Whether gradwatch's device state travels in the step's state (as metrics).
STATE_IN_STEP = True
APPLY_METHOD = None  # the stateless step calls `stateless_apply`; gradwatch wraps the step


class StepMetric(StateMetric):
    """The step counter, a metric so that it travels in the stateless step's state."""

    def __init__(self) -> None:
        super().__init__(name="gradwatch_step")
        self.step = self.add_variable(shape=(), initializer="zeros", dtype="int32", name="step")


class Counter:
    """The step counter: reads and writes go through the current `StatelessScope`."""

    def __init__(self) -> None:
        self.metric = StepMetric()

    def read_value(self) -> Any:
        return self.metric.step.value

    def assign_add(self, n: int) -> None:
        self.metric.step.assign(self.metric.step.value + n)

    def numpy(self) -> np.int64:
        return np.int64(host_copy(self.metric.step.value))


def new_counter() -> Counter:
    """Created at the start of training, outside the traced step."""
    return Counter()


def counter_metrics(counter: Counter) -> list[Any]:
    return [counter.metric]


def skipped_update(loss_scaled: Iterable[tuple[Any, Any]]) -> Any:
    # Read in a scope over the step's new state.
    return ops.any(
        ops.stack([ops.equal(opt.iterations.value, before) for opt, before in loss_scaled])
    )


def iterations_now(optimizer: Any) -> Any:
    return optimizer.iterations.value  # a traced value from the step's state


def weights_before(variable: Any) -> Any:
    return ops.copy(variable.value)


def as_recorded(grad: Any, variable: Any) -> Any:
    return grad


def float32(x: Any) -> Any:
    return ops.cast(x, "float32")


def global_records(records: Records) -> Records:
    return records  # no strategy on JAX


def compiling() -> bool:
    """Whether `torch.compile` is tracing (never, here)."""
    return False


def cond(pred: Any, true_fn: Callable[[], Any], false_fn: Callable[[], Any]) -> Any:
    return ops.cond(pred, true_fn, false_fn)


def when(predicate: Any, fn: Callable[[], None], variables: Sequence[Any]) -> None:
    """Runs `fn`, which assigns some of `variables`, only where `predicate` holds:
    in the step, on the traced step number."""
    stateless_cond(predicate, fn, variables)


def stateless_cond(predicate: Any, fn: Callable[[], Any], variables: Sequence[Any]) -> None:
    """JAX: runs `fn`, which assigns some of `variables`, only where `predicate` holds.

    Inside the step's `StatelessScope`, a Python branch cannot depend on a traced
    value, and assignments made inside `jax.lax.cond` must leave it as outputs: the
    branch runs `fn` in a scope of its own (the outer mapping, plus `variables` at
    their current values) and returns the new values, which are assigned here.
    """
    import jax
    from keras.src.backend.common.stateless_scope import get_stateless_scope

    outer = get_stateless_scope()
    variables = list(variables)

    def taken(values: list) -> list:
        with keras.StatelessScope() as inner:
            if outer is not None:
                inner.state_mapping.update(outer.state_mapping)
            inner.state_mapping.update(
                {id(v): value for v, value in zip(variables, values, strict=True)}
            )
            fn()
        return [inner.get_current_value(v) for v in variables]

    new = jax.lax.cond(
        ops.convert_to_tensor(predicate, "bool"),
        taken,
        lambda values: list(values),
        [v.value for v in variables],
    )
    for var, value in zip(variables, new, strict=True):
        var.assign(value)


def stats_table(tensors: Sequence[Any], stats: tuple[str, ...]) -> None:
    """None: `compute_stats`' shared algorithm serves JAX."""
    return None


def fused(fn: Callable[..., Any], key: Any) -> Callable[..., Any]:
    """`fn` as it is (XLA fuses it within the step)."""
    return fn


def traced_for_xla(flag: bool) -> Any:
    """The step's XLA compilation is JAX's own: nothing to tell `sum_of_squares`."""
    return contextlib.nullcontext()


def bincount(idx: Any, length: int) -> Any:
    """How often each of `0 .. length - 1` occurs in the int32 tensor `idx`."""
    import jax.numpy as jnp

    return jnp.bincount(idx, length=length).astype("int32")


sum_of_squares = _kernels.sum_of_squares
row_sums_of_squares = _kernels.row_sums_of_squares
unscaled_float32 = _kernels.unscaled_float32
bin_index = _kernels.bin_index
