"""The capture of one step: counting it, the records `record_gradients` adds, and
handing them to the watches (`commit`). The backend's step code reaches `commit`,
`before_update` and `add_records` through the `_step.Capture` protocol, as it cannot
import this module (it imports the backend)."""

from __future__ import annotations

import contextlib
import functools
import threading
import warnings
from collections.abc import Callable
from typing import Any

import keras

from gradwatch._backend import current as _backend
from gradwatch._capture.guard import (
    ApplyGuard,
    guarding,
    halt_flag,
    judge_spikes,
    judging,
    keep_batch,
    replaying,
    restore_earlier_updates,
    skipped,
    skipped_here,
    step_finite,
)
from gradwatch._capture.handoff import hand_off
from gradwatch._capture.step import Record, StepScope, model_state, record_key, scopes
from gradwatch._logdata.resume import add_anchor, restored_step
from gradwatch._stats.optimizer_state import read_before
from gradwatch._stats.specs import needs_of
from gradwatch.buffer import SKIPPED_BY


def counted(fn: Callable) -> Callable:
    """Wraps a train_step so that each step is counted and its records committed once."""

    @functools.wraps(fn)
    def train_step(self, *args, **kwargs):
        if _backend.compiling():  # PyTorch `jit_compile=True`: recorded around the compiled step
            return fn(self, *args, **kwargs)
        if id(self) in scopes():  # super().train_step() from an overriding train_step
            return fn(self, *args, **kwargs)
        if not _backend.RECORDS:  # a backend gradwatch does not record
            return fn(self, *args, **kwargs)
        # Made before the step's update, so that a new counter starts at the optimizer's
        # step count before it (an eager step counts in `commit`, after the update).
        step_counter(self)
        with contextlib.ExitStack() as stack:
            if _backend.APPLY_METHOD and (guarding(self) or judging(self) or replaying(self)):
                # Each optimizer's `apply` runs only where the watched gradients are
                # finite (a stateless JAX step is gated on its returned state).
                stack.enter_context(ApplyGuard(self))
            if model_state(self).active:
                stack.enter_context(noting_loss(self))
            return _backend.run_step(fn, self, commit, *args, **kwargs)

    train_step._gradwatch_counted = True
    return train_step


def step_counter(model: Any) -> Any:
    """The model's step counter, made on first use where the model's training stands."""
    state = model_state(model)
    if state.counter is None:
        iterations = first_step(model)
        start = iterations if state.start_at is None else state.start_at
        state.counter = _backend.new_counter(start)
        add_anchor(state.anchors, (start, iterations))
    return state.counter


def first_step(model: Any) -> int:
    """Where a new step counter starts: the optimizer's count of its steps (`iterations`,
    or with `gradient_accumulation_steps` its micro-steps; see `micro_steps`), which
    `model.save` keeps, so that a loaded (or long-trained) model goes on counting where
    it was. A loss-scale optimizer's skipped steps do not count there; a streamed log
    continues past its own last step (`align`)."""
    optimizer = getattr(model, "optimizer", None)
    counter = None if optimizer is None else micro_steps(optimizer)
    if counter is None:
        return 0
    with _backend.lift():
        return int(keras.ops.convert_to_numpy(counter))


def _innermost(optimizer: Any) -> Any:
    """The optimizer that counts the steps and accumulates: a `LossScaleOptimizer`'s inner one."""
    while isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        optimizer = optimizer.inner_optimizer
    return optimizer


def micro_steps(optimizer: Any) -> Any:
    """The variable that counts `optimizer`'s steps, one per call of its `apply`.

    That is its `iterations`, except with `gradient_accumulation_steps=n`: there
    `iterations` counts the updates alone, as a floor division by `n` of Keras' raw
    counter (`_iterations`) that the step builds (it cannot be read before the step
    is traced), while `fit` runs, and the learning-rate schedule sees, the raw count.
    A `LossScaleOptimizer` counts in its inner optimizer.
    """
    optimizer = _innermost(optimizer)
    counter = getattr(optimizer, "_iterations", None)
    return getattr(optimizer, "iterations", None) if counter is None else counter


def accumulation_steps(optimizer: Any) -> int:
    """The optimizer's `gradient_accumulation_steps`: 1 where each step applies."""
    return int(getattr(_innermost(optimizer), "gradient_accumulation_steps", None) or 1)


def anchor(model: Any) -> tuple[int, int] | None:
    """On the host, between steps: `(the model's next step, its optimizer's iterations)`,
    noted among the model's anchors (see `gradwatch._logdata.resume`); None where the device
    state cannot be read now (JAX, after a step that failed)."""
    optimizer = getattr(model, "optimizer", None)
    counter = None if optimizer is None else micro_steps(optimizer)
    state = model_state(model)
    if counter is not None and not _backend.sync_state(model, counter):
        return None
    pair = (next_step(model), first_step(model))
    add_anchor(state.anchors, pair)
    return pair


def align(model: Any, history: Any, where: Any) -> int | None:
    """At the start of a `fit`, once every callback's `on_train_begin` ran (so after
    `keras.callbacks.BackupAndRestore` restored the model): numbers the model's next
    step as its optimizer's `iterations` counts, given the model's own anchors and the
    `history` (a `_files.StreamedHistory`, or None) of the log it is appended to.

    A model restored to an earlier iteration than the history reached goes on from the
    step that stood at that iteration; the log's steps from there on are superseded,
    and that step is returned (None: nothing is superseded). Otherwise, where the log
    already holds the steps the model would number (a new model; steps that a
    loss-scale optimizer skipped), the steps are numbered on from its last step + 1,
    with a warning.
    """
    state = model_state(model)
    step, iterations = next_step(model), first_step(model)
    own = state.anchors
    restored = False
    if own and own[-1][0] == step and iterations not in (own[-1][1], 0):
        # No step ran since the last anchor, but `iterations` moved: the model was
        # restored (`load_weights`, BackupAndRestore), here or before its counter was made.
        back = restored_step(iterations, own, ())
        restored = back is not None
        step = back if back is not None else step + iterations - own[-1][1]
    superseded = None
    if history is not None:
        at = restored_step(iterations, history.anchors, history.skipped)
        last = history.last_step
        if at is not None:
            step = superseded = at
        elif restored and last is not None and step <= last:
            superseded = step
        elif last is not None and step <= last:
            _warn_numbered_on(step, last, where)
            step = last + 1
    _move_to(model, step)
    add_anchor(own, (step, iterations))
    return superseded


def _move_to(model: Any, step: int) -> None:
    """Makes `step` the number of the model's next step."""
    state = model_state(model)
    if state.counter is None:
        # Not made yet (TensorFlow makes it in the first trace, where a strategy places
        # it): it is made at `step`.
        state.start_at = step
    else:
        now = int(state.counter.numpy())
        if now != step:
            state.counter.assign_add(step - now)
    state.next_step = step  # the host's count, for gating (`mixin.setup_gate`)


def next_step(model: Any) -> int:
    """On the host: the number of the model's next step, also before its counter is made."""
    state = model_state(model)
    if state.counter is not None:
        return int(state.counter.numpy())
    return first_step(model) if state.start_at is None else state.start_at


def _warn_numbered_on(step: int, last: int, where: Any) -> None:
    warnings.warn(
        f"GradWatch numbers this run's steps from {last + 1}, not from the model's own "
        f"step count {step}: the log at '{where}' already holds steps up to {last}, and "
        "a log holds each step once. (A model's count starts at its optimizer's "
        "`iterations` (micro-steps with `gradient_accumulation_steps`), which "
        "`model.save` keeps; it leaves out the steps that a "
        "`LossScaleOptimizer` skipped.) To keep the model's own numbers, write to "
        "another `path`.",
        stacklevel=4,
    )


def commit(model: Any, scope: StepScope) -> None:
    """Hands the step's records to the watches (checks, then capture), and counts the step."""
    counter = step_counter(model)
    step = counter.read_value()
    state = model_state(model)
    watches = state.active
    # (A model with no trainable weights has no gradients: the plan warns about that.)
    if watches and not scope.grads and model.trainable_weights:
        warnings.warn(
            f"The `train_step` of {type(model).__name__} recorded no gradients, so GradWatch "
            "has nothing to log. A custom `train_step` that does not hand its gradients "
            "to `optimizer.apply` or `apply_gradients` must call "
            "`self.record_gradients(grads, variables)` (or, without GradWatchMixin, "
            "`gradwatch.record_gradients(self, grads, variables)`) with the gradients "
            "it applies.",
            stacklevel=2,
        )
    listening = state.listening
    restore_earlier_updates(model, scope)
    if not _backend.APPLY_METHOD:
        if scope.finite is None:
            # A stateless step (JAX) has no `apply` to gate: its update is undone here
            # (where a watch keeps the model: its spikes are judged there too).
            finite = step_finite(model, scope)
            if finite is not None:
                _backend.undo_step(model, scope, finite, lambda: keep_batch(model, scope))
        if listening and scope.grads:  # the other watches' spikes, before the hand-off
            judge_spikes(model, scope, scope.grads)
        if scope.state is not None:  # the weights from before the update: its input state
            hand_off(model, scope, list(scope.state[0]))
    skipped = skipped_update(scope) if listening and scope.grads else None
    local = scope.grads
    records = _backend.global_records(local) if listening and local else local
    if listening and local:  # the spikes not judged before the update
        judge_spikes(model, scope, records, None if records is local else local)
    # A step kept from the model is still checked: its gradients were the data's.
    for watch in listening:
        watch.check_step(model, step, records, skipped)
    scalars = (scope.loss, scope.learning_rate, scope.applies, batch_size(scope.data), scope.spikes)
    code = skip_code(skipped, skipped_here(scope), scope.spiked)
    for watch in watches:
        watch.capture_step(model, step, records, code, local, scalars)
    counter.assign_add(1)


def skip_code(loss_scaled: Any, kept_back: Any, spiked: Any = None) -> Any:
    """The step's `skipped` code as the ring buffer keeps it (`buffer.SKIPPED_BY`): a
    loss-scale optimizer skipped the update, and/or a watch kept it from the model, for
    its non-finite gradients or for a spike (`spiked`: a spike's gradients are finite, so
    the two do not meet). None when none could happen in the step."""
    code = None
    nonfinite = kept_back
    if kept_back is not None and spiked is not None:
        nonfinite = keras.ops.logical_and(kept_back, keras.ops.logical_not(spiked))
    flags = ((loss_scaled, "loss_scale"), (nonfinite, "on_nonfinite"), (spiked, "on_spike"))
    for flag, bit in flags:
        if flag is not None:
            part = keras.ops.cast(flag, "int32") * SKIPPED_BY[bit]
            code = part if code is None else code + part
    return code


def undo_point(model: Any) -> list[tuple[Any, Any]] | None:
    """PyTorch `jit_compile=True`, where the update runs inside the compiled step: copies
    of the trainable and optimizer variables before it, restored where the step's
    watched gradients are not finite (`undo_if_nonfinite`); None where no watch keeps
    the model (then nothing is copied)."""
    if not guarding(model):
        return None
    variables = list(model.trainable_variables)
    for optimizer in _optimizers(model):
        variables += list(optimizer.variables)
    return [(v, _backend.weights_before(v)) for v in variables]


def undo_if_nonfinite(model: Any, scope: StepScope, saved: list[tuple[Any, Any]]) -> None:
    """After a compiled PyTorch step: where its watched gradients are not finite, puts
    back the variables `undo_point` copied, and hands the batch to the host."""
    finite = step_finite(model, scope)
    halt = halt_flag(model)
    if halt is not None:
        finite = not halt.read_value() if finite is None else finite and not halt.read_value()
        scope.finite = finite
    if finite is None or finite:
        return
    for variable, value in saved:
        variable.assign(value)
    skipped(model, scope)


def _optimizers(model: Any) -> list[Any]:
    found: dict[int, Any] = {}
    for value in [getattr(model, "optimizer", None), *vars(model).values()]:
        if isinstance(value, keras.optimizers.Optimizer):
            found.setdefault(id(value), value)
    return list(found.values())


_tracker_lock = threading.Lock()


@contextlib.contextmanager
def noting_loss(model: Any):
    """While a step runs (or is traced): notes in the step's scope the loss that the step
    hands the model's loss tracker (`_loss_tracker`, Keras' `loss` metric).

    That is the loss of this step's batch, exactly as Keras averages it into
    `logs["loss"]`: the compiled loss plus regularizers and `add_loss` terms, before
    any loss scaling. The tracker is Keras' own on all three backends' stock steps,
    and a custom step that updates `self.metrics`' `loss` updates it too. The
    tracker's method is wrapped for the length of the step only, and calls through
    unchanged, so training stays the same.
    """
    tracker = getattr(model, "_loss_tracker", None)
    if tracker is None:
        yield
        return
    key = id(model)
    with _tracker_lock:
        users = tracker.__dict__.get("_gradwatch_users")
        if users is None:
            original = tracker.update_state

            def update_state(values, *args, **kwargs):
                scope = scopes().get(key)
                if scope is not None:
                    scope.loss = values
                return original(values, *args, **kwargs)

            users = [0]
            object.__setattr__(tracker, "_gradwatch_users", users)
            object.__setattr__(tracker, "update_state", update_state)
        users[0] += 1
    try:
        yield
    finally:
        with _tracker_lock:
            users[0] -= 1
            if not users[0]:
                object.__delattr__(tracker, "update_state")
                object.__delattr__(tracker, "_gradwatch_users")


def skipped_update(scope: StepScope) -> Any:
    """A bool tensor: did a loss-scale optimizer skip this step's update? None without one.

    Read after `apply_gradients`: a `LossScaleOptimizer` that finds non-finite
    gradients lowers its scale and leaves its step count (`micro_steps`) where it was.
    """
    if not scope.loss_scaled:
        return None
    return _backend.skipped_update(scope.loss_scaled.values())


def _loss_scale(optimizer: Any) -> Any:
    """The factor the loss was multiplied by, or None when the loss is not scaled."""
    if optimizer is None:
        return None
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer) or (
        getattr(optimizer, "loss_scale_factor", None) is not None
    ):
        # Read before `apply`, which may change a dynamic scale.
        return _backend.float32(optimizer.scale_loss(1.0))
    return None


def learning_rate(optimizer: Any) -> Any:
    """The learning rate that `optimizer` applies at this step, as a float32 scalar (a
    `LearningRateSchedule` at the optimizer's step count before the update, as Keras
    evaluates it: with `gradient_accumulation_steps`, its micro-step count); None
    without an optimizer. Read before the update, which advances the count."""
    if optimizer is None:
        return None
    return _backend.float32(optimizer.learning_rate)


def applies(model: Any, scope: StepScope, optimizer: Any) -> Any:
    """Whether `optimizer`'s `apply` at this step updates the weights: always, except
    with `gradient_accumulation_steps=n`, where Keras applies the accumulated gradient
    at every n-th micro-step (its raw count before the update + 1 a multiple of n) and
    only accumulates at the others. A bool (tensor); None where unknown (no
    optimizer, or one the step cannot read). Read before the update."""
    if optimizer is None:
        return None
    n = accumulation_steps(optimizer)
    if n == 1:
        return True
    counter = micro_steps(optimizer)
    if not _backend.readable_in_step(model, scope, counter):
        return None
    return keras.ops.equal((_backend.counter_now(counter) + 1) % n, 0)


def batch_size(data: Any) -> Any:
    """The number of rows of the step's batch: the first axis of its first array (a
    tensor where the traced step does not know it); None where the batch has none."""
    for leaf in keras.tree.flatten(data):
        shape = getattr(leaf, "shape", None)
        if shape is not None and len(shape):
            return shape[0] if shape[0] is not None else keras.ops.shape(leaf)[0]
    return None


def accumulated(model: Any, scope: StepScope, variables: list, optimizer: Any) -> dict[int, Any]:
    """With `gradient_accumulation_steps`, the optimizer's sum of the earlier micro-steps'
    gradients of each of `variables`, read before the update (Keras keeps the sum and
    applies `(g + sum) / n` at every n-th micro-step, then zeroes it); by `id(variable)`.
    Empty without accumulation, where the optimizer is not built, and (eager) at a
    micro-step that only accumulates."""
    optimizer = optimizer or getattr(model, "optimizer", None)
    inner = None if optimizer is None else _innermost(optimizer)
    sums = getattr(inner, "_accumulated_gradients", None)
    if inner is None or accumulation_steps(inner) == 1 or not sums:
        return {}
    if _backend.EAGER and not bool(applies(model, scope, inner)):
        return {}  # read where the step applies only: a copy on this backend
    out = {}
    for variable in variables:
        try:
            acc = sums[inner._get_variable_index(variable)]
        except KeyError:  # not among the variables the optimizer was built with
            continue
        if acc is not None and _backend.readable_in_step(model, scope, acc):
            out[id(variable)] = _backend.float32(_backend.weights_before(acc))
    return out


def before_update(
    model: Any, scope: StepScope, variables: list, optimizer: Any, watches: list
) -> tuple:
    """What is read before the optimizer applies the gradients of `variables`: the loss
    scale, the weights (for the update stats) and the optimizer's state (for the
    optimizer health stats). Notes a loss-scale optimizer's step count in `scope`, and
    the learning rate and whether the step applies (of the step's first optimizer).
    Returns `(scale, weights before or None each, optimizer, state before or None each)`."""
    scale = _loss_scale(optimizer)
    if isinstance(optimizer, keras.optimizers.LossScaleOptimizer):
        # Its micro-step counter, not `iterations`: with gradient accumulation that is
        # a floor division, made in the step, which a skipped step may leave unchanged.
        counter = micro_steps(optimizer)
        if _backend.readable_in_step(model, scope, counter):
            before = _backend.counter_now(counter)
            scope.loss_scaled.setdefault(id(optimizer), (counter, before))
    if scope.learning_rate is None:
        first = optimizer or getattr(model, "optimizer", None)
        scope.learning_rate = learning_rate(first)
        scope.applies = applies(model, scope, first)
    befores: list[Any] = [None] * len(variables)
    if any(w.needs_weights for w in watches):
        befores = [_backend.weights_before(v) for v in variables]
    scope.accumulated.update(accumulated(model, scope, variables, optimizer))
    states: list[Any] = [None] * len(variables)
    if any("optimizer_state" in needs_of(w.stats) for w in watches):
        applier = optimizer if optimizer is not None else getattr(model, "optimizer", None)

        def readable(variable: Any) -> bool:
            return _backend.readable_in_step(model, scope, variable)

        states = [read_before(applier, v, readable, _backend.weights_before) for v in variables]
    return scale, befores, optimizer, states


def add_records(
    scope: StepScope,
    grads: list,
    variables: list,
    scale: Any,
    befores: list,
    optimizer: Any,
    states: list | None = None,
) -> None:
    """Adds one step's gradients to `scope`, with what `before_update` read."""
    states = states or [None] * len(variables)
    for grad, var, before, state in zip(grads, variables, befores, states, strict=True):
        # A variable recorded again in the same step (a critic updated several times)
        # is its next update, kept beside the earlier ones.
        update = scope.updates.get(id(var), 0)
        scope.updates[id(var)] = update + 1
        grad = _backend.as_recorded(grad, var)
        scope.grads[record_key(var, update)] = Record(
            var, grad, scale, before, optimizer, update, scope.accumulated.get(id(var)), state
        )
