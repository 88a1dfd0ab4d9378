"""PyTorch: the step runs eagerly; gradwatch writes its device state in place, in raw
torch ops (each `keras.ops` call costs a Python layer on top of the dispatch). With
`jit_compile=True`, gradwatch records around the `torch.compile`d step (`make_train_function`)."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import numpy as np
import torch
from keras import ops

from gradwatch._backend.generic import Ops
from gradwatch._step import Capture, Records, StepScope, model_state, run_in_scope, scopes

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
    def logical_and(a: Any, b: Any) -> bool:
        return bool(np.logical_and(a, b))

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
    norms = host_copy(torch.stack([torch.linalg.vector_norm(g.float()) for g in grads]))
    sq[rows] = np.square(norms.astype(np.float64))
    return sq


def alarm_cell(owner: Any, shape: tuple[int, ...], dtype: str, value: float, name: str) -> Any:
    """One of the every-step check's values, kept on the host: the step runs eagerly."""
    return HostValue(np.full(shape, value, dtype))


# The capture runs on host values, outside any traced step (PyTorch).
EAGER = True
# `per_replica`: tf.distribute runs the step once per replica.
DISTRIBUTES = False


def sync_state(model: Any, variable: Any) -> bool:
    return True


def all_gather(x: Any) -> Any:
    return x  # one replica


def all_reduce_sum(xs: list[Any]) -> list[Any]:
    return xs


def num_replicas(model: Any) -> int:
    return 1


def worker_of(model: Any) -> tuple[int, bool]:
    return 0, True


def check_strategy(model: Any) -> None:
    """No tf.distribute here."""


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


def input_scope(model: Any, scope: StepScope) -> Any:
    """No scope: the step reads the variables themselves."""
    return contextlib.nullcontext()


def readable_in_step(model: Any, scope: StepScope, variable: Any) -> bool:
    """Every variable: the step runs eagerly, on the variables themselves."""
    return True


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
            outputs = compiled(data)
            if pending is not None and scope.stock:
                for key, entry in before.loss_scaled.items():
                    scope.loss_scaled.setdefault(key, entry)
                grads = [v.value.grad for v in variables]
                capture.add_records(scope, grads, variables, *pending)
        finally:
            del all_scopes[id(model)]
        with torch.no_grad():
            capture.commit(model, scope)
        return outputs

    return train_function
