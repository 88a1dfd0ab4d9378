"""JAX: gradwatch's device state travels in the stateless step's state; writes are
assignments within the step's `StatelessScope`. The step: `run_step` counts and commits
it in a scope over its returned state, and `train_step` is the stock step with the
recording in it."""

from __future__ import annotations

import contextlib
import warnings
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch._backend import generic
from gradwatch._backend.generic import Ops
from gradwatch._capture.state_metric import StateMetric
from gradwatch._capture.step import Records, StepScope, model_state, own_state_hidden, scopes
from gradwatch._stats import kernels as _kernels

RECORDS = True  # GradWatch records on this backend

# The same as on the backends gradwatch does not record (`generic`).
DISTRIBUTES = generic.DISTRIBUTES
all_gather = generic.all_gather
all_reduce_sum = generic.all_reduce_sum
check_strategy = generic.check_strategy
fused = generic.fused
make_train_function = generic.make_train_function
note_stock_step = generic.note_stock_step
stock_train_function = generic.stock_train_function
num_replicas = generic.num_replicas
outside_compile = generic.outside_compile
stats_table = generic.stats_table
total_sum_of_squares = generic.total_sum_of_squares
traced_for_xla = generic.traced_for_xla
traced_once = generic.traced_once

INDEX_DTYPE = "int32"  # JAX runs without 64-bit types unless asked


def worker_of(model: Any) -> tuple[int, bool]:
    """This process's index in a multi-process JAX run (`jax.process_index()`, 0 in a
    run of one process) and whether it is the chief, process 0, which writes the log."""
    import jax

    index = jax.process_index()
    return index, index == 0


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
    value = _replicated(ops.reshape(ops.cast(value, variable.dtype), (1, *variable.shape[1:])))
    start = (slot,) + (0,) * (len(variable.shape) - 1)
    variable.assign(ops.slice_update(variable.value, start, value))


def _replicated(value: Any) -> Any:
    """`value` replicated over the devices of the current `keras.distribution`, if any.

    gradwatch's state is replicated there (Keras' layout for a variable that no
    `LayoutMap` key matches). A slot's value computed from a sharded gradient (a kept
    kernel under `ModelParallel`) would otherwise be written shard by shard and the
    whole ring buffer gathered after each step; constrained here, one slot is gathered
    (the kept tensor's size) and the write stays on each device.
    """
    distribution = keras.distribution.distribution()
    if distribution is None:
        return value
    import jax

    mesh = distribution.device_mesh.backend_mesh
    return jax.lax.with_sharding_constraint(
        value, jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())
    )


def advance(count: Any) -> None:
    count.assign(count.value + ops.ones((), count.dtype))


# Whether gradwatch's device state travels in the step's state (as metrics).
STATE_IN_STEP = True
# Not needed: the state travels in the step's state, made before training (STATE_IN_STEP).
PREMAKES_STATE = False
APPLY_METHOD = None  # the stateless step calls `stateless_apply`; gradwatch wraps the step


class StepMetric(StateMetric):
    """The step counter, a metric so that it travels in the stateless step's state."""

    def __init__(self) -> None:
        super().__init__(name="gradwatch_step")
        self.step = self.add_variable(shape=(), initializer="zeros", dtype="int32", name="step")


class Counter:
    """The step counter: reads and writes go through the current `StatelessScope`."""

    def __init__(self, start: int = 0) -> None:
        self.metric = StepMetric()
        if start:
            self.metric.step.assign(start)

    def read_value(self) -> Any:
        return self.metric.step.value

    def assign_add(self, n: int) -> None:
        self.metric.step.assign(self.metric.step.value + n)

    def numpy(self) -> np.int64:
        return np.int64(host_copy(self.metric.step.value))


def new_counter(start: int = 0) -> Counter:
    """Created at the start of training, outside the traced step."""
    return Counter(start)


def counter_metrics(counter: Counter) -> list[Any]:
    return [counter.metric]


def skipped_update(loss_scaled: Iterable[tuple[Any, Any]]) -> Any:
    # Read in a scope over the step's new state.
    return ops.any(ops.stack([ops.equal(count.value, before) for count, before in loss_scaled]))


def counter_now(counter: Any) -> Any:
    return counter.value  # a traced value from the step's state


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

    new = cond_with_tokens(
        ops.convert_to_tensor(predicate, "bool"),
        taken,
        lambda values: list(values),
        [v.value for v in variables],
    )
    for var, value in zip(variables, new, strict=True):
        var.assign(value)


# ------------------------------------------------- the array functions of the step
OPS = CHECK_OPS = Ops


def squares_by_row(grads: Sequence[Any], rows: Sequence[int], n: int) -> Any:
    """The every-step check's input: each of `n` rows' sum of squares, 0 where `rows`
    has no gradient."""
    sums = [ops.sum(ops.square(ops.cast(g, "float32"))) for g in grads]
    return ops.stack([sums[rows.index(j)] if j in rows else 0.0 for j in range(n)])


def alarm_cell(owner: Any, shape: tuple[int, ...], dtype: str, value: float, name: str) -> Any:
    """One of the every-step check's device values: a variable of the alarm metric, so
    that it travels in the stateless step's state."""
    init = keras.initializers.Constant(value)
    return owner.add_variable(shape=shape, initializer=init, dtype=dtype, name=name)


# The capture runs on host values, outside any traced step (PyTorch).
EAGER = False


def sync_state(model: Any, variable: Any) -> bool:
    """Makes the model's device state readable; False if `variable` has no value.

    Mid-epoch, Keras keeps the state off the model's variables (purged to None):
    attach it. With no state to attach, the first step failed while tracing.

    With `steps_per_execution > 1`, data that fails part-way through an execution
    ends `fit` after Keras donated the state to the execution's steps, which it
    drops: the model's variables then hold deleted arrays (its weights too), and
    the steps not drained before are gone with them.
    """
    model.jax_state_sync()
    value = variable._value
    if value is not None and value.is_deleted():
        warnings.warn(
            "GradWatch cannot read the steps still on the device: Keras deleted the "
            "model's training state (weights included) when `fit` failed part-way through "
            "an execution of `steps_per_execution` steps. The log keeps the steps drained "
            "before; `steps_per_execution=1` keeps every step.",
            stacklevel=4,
        )
        return False
    return value is not None


# Stateless: the stock step has no apply method to intercept, so while watches are
# attached gradwatch runs `train_step`, the stock step with the recording in it.
OWN_TRAIN_STEP = True

# The step gates itself (see `stateless_cond`). Two train functions cannot be had for
# host-side gating: Keras jits the same bound `train_step` for both, JAX's trace cache
# hands the second the first one's trace, and every step was recorded.
GATES_IN_STEP = True


def run_step(
    fn: Callable, model: Any, commit: Callable, state: Any, data: Any, **kwargs: Any
) -> Any:
    """Runs a stateless JAX `train_step(state, data)` and adds the count and the capture.

    Whatever the step is (gradwatch's, the stock one, or a user's), its input state is
    where `record_gradients` reads the loss scale and the weights before the update,
    and its returned state is where the step counter, the ring buffer and the alarm
    (metrics) are advanced and written, in a `StatelessScope` over that state.
    """
    counter = model_state(model).counter
    if counter is None:
        # No counter in the state (the train function was made outside `fit`): run as is.
        start = len(_TOKENS)
        try:
            return fn(model, state, data, **kwargs)
        finally:
            del _TOKENS[start:]
    refs = model.metrics_variables
    # gradwatch's own variables come last (`GradWatchMixin.metrics_variables`); the step
    # gets those of `model.metrics` alone, as a custom step that slices or iterates
    # them expects (the stock one, too, sees no others), and gradwatch writes its own
    # after it.
    with own_state_hidden(model):
        n_user = len(model.metrics_variables)
    trainable, non_trainable, optimizer_vars, metrics_in = state
    metrics_in = list(metrics_in)
    own_in = metrics_in[n_user:]
    all_scopes = scopes()
    scope = all_scopes[id(model)] = StepScope()
    scope.state = (trainable, non_trainable, optimizer_vars, metrics_in[:n_user])
    scope.data = data
    first_token = len(_TOKENS)
    try:
        with own_state_hidden(model):
            logs, new_state = fn(model, scope.state, data, **kwargs)
    finally:
        del all_scopes[id(model)]
    trainable, non_trainable, optimizer_vars, metrics_vars = new_state
    if len(metrics_vars) != n_user:
        raise RuntimeError(
            f"The `train_step` of {type(model).__name__} returned "
            f"{len(metrics_vars)} metrics variables, and the model's metrics have "
            f"{n_user}. Return the state as `(trainable_variables, "
            "non_trainable_variables, optimizer_variables, metrics_variables)`, with "
            "every variable of the metrics in `model.metrics`."
        )
    metrics_vars = [*metrics_vars, *own_in]
    optimizer = getattr(model, "optimizer", None)
    mapping = [
        *zip(refs, metrics_vars, strict=True),
        *zip(model.trainable_variables, trainable, strict=True),  # after the update
        *zip(model.non_trainable_variables, non_trainable, strict=True),
    ]
    if optimizer is not None and optimizer_vars:
        mapping += list(zip(optimizer.variables, optimizer_vars, strict=True))
    try:
        with keras.StatelessScope(state_mapping=mapping) as written:
            commit(model, scope)  # (a non-finite step's update is undone there: `undo_step`)
            tokens = _TOKENS[first_token:]
            if tokens:  # the host calls' zero tokens, kept by reaching the output
                step = counter.metric.step
                step.assign(step.value + _token_sum(tokens))
    finally:
        del _TOKENS[first_token:]

    def current(refs: Sequence[Any], values: Sequence[Any]) -> list[Any]:
        return [
            value if (new := written.get_current_value(ref)) is None else new
            for ref, value in zip(refs, values, strict=True)
        ]

    metrics_vars = current(refs, metrics_vars)
    trainable = current(model.trainable_variables, trainable)
    if optimizer is not None and optimizer_vars:
        optimizer_vars = current(optimizer.variables, optimizer_vars)
    return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)


def train_step(model: Any, state: Any, data: Any) -> Any:
    """The stock JAX `train_step(state, data)`, plus `record_gradients`, in the same step.

    The gradients, the optimizer update and the metrics are computed exactly as the
    stock step computes them. JAX differentiates a variable that the loss does not
    depend on to zeros; such variables are found while tracing, from the loss's jaxpr,
    and recorded as disconnected (`None`), as TensorFlow reports them. The optimizer
    still gets the zeros, as in the stock step.
    """
    import jax
    from keras.src.trainers.data_adapters import data_adapter_utils

    trainable, non_trainable, optimizer_vars, metrics_vars = state
    x, y, sample_weight = data_adapter_utils.unpack_x_y_sample_weight(data)
    args = (trainable, non_trainable, metrics_vars, x, y, sample_weight, optimizer_vars)

    def loss_and_updates(tv, ntv, mv, x, y, sw, ov):
        return model.compute_loss_and_updates(
            tv, ntv, mv, x, y, sw, training=True, optimizer_variables=ov
        )

    connected = _reaches_loss(loss_and_updates, args, len(trainable))
    grad_fn = jax.value_and_grad(model.compute_loss_and_updates, has_aux=True)
    (_, aux), grads = grad_fn(
        trainable,
        non_trainable,
        metrics_vars,
        x,
        y,
        sample_weight,
        training=True,
        optimizer_variables=optimizer_vars,
    )
    (unscaled_loss, y_pred, non_trainable, metrics_vars) = aux
    optimizer = model.optimizer
    recorded = [g if used else None for g, used in zip(grads, connected, strict=True)]
    model.record_gradients(recorded, model.trainable_variables, optimizer=optimizer)
    trainable, optimizer_vars = optimizer.stateless_apply(optimizer_vars, grads, trainable)
    logs, metrics_vars = model._update_metrics_variables(
        metrics_vars, unscaled_loss, x, y, y_pred, sample_weight
    )
    return logs, (trainable, non_trainable, optimizer_vars, metrics_vars)


def _reaches_loss(loss_fn: Callable, args: tuple, n: int) -> list[bool]:
    """Whether the loss (the first output of `loss_fn(*args)`) depends on each of the
    first `n` array leaves of `args`, found from its jaxpr while tracing.

    A backward walk from the loss marks every input of an equation with a used
    output as used. Higher-order primitives (`jit`, `cond`, `while`, custom
    derivatives) are taken whole, so an input is never wrongly called unused;
    only `stop_gradient` cuts the walk, as it cuts TensorFlow's gradient.
    """
    import jax
    from jax.extend.core import Var

    def spec(a: Any) -> Any:
        return jax.ShapeDtypeStruct(np.shape(a), a.dtype)

    def loss_only(*a: Any) -> Any:
        return loss_fn(*a)[0]

    closed = jax.make_jaxpr(loss_only)(*jax.tree.map(spec, args))
    jaxpr = closed.jaxpr
    used = {v for v in jaxpr.outvars if isinstance(v, Var)}
    for eqn in reversed(jaxpr.eqns):
        if eqn.primitive.name == "stop_gradient":
            continue
        if any(v in used for v in eqn.outvars):
            used.update(v for v in eqn.invars if isinstance(v, Var))
    return [v in used for v in jaxpr.invars[:n]]


def input_scope(model: Any, scope: StepScope) -> Any:
    """A scope over the input state of the step being traced (when `run_step` runs it),
    where `record_gradients` reads the loss scale, `iterations` and the weights."""
    if scope.state is None:
        return contextlib.nullcontext()
    return _step_scope(model, scope.state)


def _step_scope(model: Any, state: tuple) -> Any:
    """A `StatelessScope` that reads the optimizer's and the trainable variables from
    the input state of the JAX step being traced."""
    trainable, _, optimizer_vars, _ = state
    mapping = list(zip(model.trainable_variables, trainable, strict=True))
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer_vars:
        mapping += list(zip(optimizer.variables, optimizer_vars, strict=True))
    return keras.StatelessScope(state_mapping=mapping)


def readable_in_step(model: Any, scope: StepScope, variable: Any) -> bool:
    """Whether the step can read `variable`: in a step run by `run_step`, only the
    variables of its state."""
    return scope.state is None or _in_state(model, variable)


def _in_state(model: Any, variable: Any) -> bool:
    """JAX: whether `variable` is one of the compiled optimizer's, so in the step's state."""
    optimizer = getattr(model, "optimizer", None)
    return optimizer is not None and any(v is variable for v in optimizer.variables)


def bincount(idx: Any, length: int) -> Any:
    """How often each of `0 .. length - 1` occurs in the int32 tensor `idx`."""
    import jax.numpy as jnp

    return jnp.bincount(idx, length=length).astype("int32")


sum_of_squares = _kernels.sum_of_squares
row_sums_of_squares = _kernels.row_sums_of_squares
unscaled_float32 = _kernels.unscaled_float32
bin_index = _kernels.bin_index


# ------------------------------------- keeping a non-finite update from the model
all_finite = generic.all_finite
logical_and = generic.logical_and
logical_not = generic.logical_not
agree_across_replicas = generic.agree_across_replicas
gated_apply = generic.gated_apply
# Not used: the stateless step is gated as a whole (`undo_step`), not each `apply`.
restore_where = generic.restore_where
snapshots_free = generic.snapshots_free


# The tokens of the host calls (`to_host`) traced into the step so far: each must reach
# the step's output, or XLA drops the call (see `to_host`).
_TOKENS: list[Any] = []


def to_host(model: Any, keep: Callable[..., None], step: Any, leaves: Sequence[Any]) -> None:
    """Calls `keep(step, *leaves)` on the host with NumPy arrays, from the branch of the
    step taken where the update is skipped or the step handed over.

    A `jax.pure_callback`, not a `jax.debug.callback`: a step with an effect (a debug
    callback has one, even in a branch never taken) cannot run on JAX's C++ dispatch
    path, and every step then pays a Python dispatch that grows with the number of
    arrays in the state (5x the plain step on 500 small variables). A pure call is kept
    only where its result is used: it returns a zero token, which the branch passes out
    (`cond_with_tokens`) and `run_step` adds to the step counter.
    """
    import jax

    def call(*args: Any) -> np.ndarray:
        keep(*args)
        return np.zeros((), np.int32)

    _TOKENS.append(jax.pure_callback(call, jax.ShapeDtypeStruct((), np.int32), step, *leaves))


def cond_with_tokens(pred: Any, true_fn: Callable, false_fn: Callable, *operands: Any) -> Any:
    """`jax.lax.cond`, where the branches may call `to_host`: the tokens made inside a
    branch leave it as one more output, and join the step's tokens."""
    import jax

    made: list[bool] = []

    def branch(fn: Callable) -> Callable:
        def run(*args: Any) -> Any:
            start = len(_TOKENS)
            out = fn(*args)
            tokens, _TOKENS[start:] = _TOKENS[start:], []
            made.append(bool(tokens))
            return out, _token_sum(tokens)

        return run

    out, token = jax.lax.cond(pred, branch(true_fn), branch(false_fn), *operands)
    if any(made):
        _TOKENS.append(token)
    return out


def _token_sum(tokens: Sequence[Any]) -> Any:
    total = ops.zeros((), "int32")
    for token in tokens:
        total = total + token
    return total


def undo_step(model: Any, scope: StepScope, finite: Any, skip: Callable[[], None]) -> None:
    """Where `finite` is false, gives the trainable and the optimizer's variables the
    values of the step's input state (a stateless step's updates, all of them, are in the
    state it returns), and calls `skip()` in that branch. Runs in `commit`'s scope over
    the step's returned state, whose values it assigns."""

    trainable, _, optimizer_vars, _ = scope.state
    variables, before = list(model.trainable_variables), list(trainable)
    optimizer = getattr(model, "optimizer", None)
    if optimizer is not None and optimizer_vars:
        variables += list(optimizer.variables)
        before += list(optimizer_vars)
    after = [v.value for v in variables]

    def undone(after: list, before: list) -> list:
        skip()
        return before

    chosen = cond_with_tokens(finite, lambda after, before: after, undone, after, before)
    for variable, value in zip(variables, chosen, strict=True):
        variable.assign(value)


def new_flag() -> None:
    """None: the step's state is stateless, and `fit` polls the alarms after each
    execution on the main thread, so no flag carries a stop into the next step."""
    return None


# ------------------------------------------------- the replay of a batch (`_forensics`)
first_nonfinite_op = generic.first_nonfinite_op


def gradients_of(
    fn: Callable[[list[Any], list[Any]], Any], probes: Sequence[Any], values: Sequence[Any]
) -> tuple[list[Any], list[Any]]:
    import jax

    by_value, by_probe = jax.grad(lambda v, p: fn(p, v), argnums=(0, 1))(list(values), list(probes))
    return list(by_probe), list(by_value)


def row_gradients(
    loss_of: Callable[[list[Any], list[Any], Any], Any],
    reduce: Callable[[Any, list[Any]], Any],
    vectorized: bool,
) -> Callable[[list[Any], list[Any], Any], Any]:
    import jax

    def one(values: list[Any], others: list[Any], row: Any) -> Any:
        loss, grads = jax.value_and_grad(loss_of)(values, others, row)
        return reduce(loss, grads)

    if vectorized:
        return jax.jit(jax.vmap(one, in_axes=(None, None, 0)))
    # A compiled loop (a scan over the rows): for a model that `vmap` rejects.
    return jax.jit(lambda values, others, rows: jax.lax.map(lambda r: one(values, others, r), rows))
