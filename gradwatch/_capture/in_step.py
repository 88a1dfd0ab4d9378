"""What a watch adds to the training step: its stats, kept tensors and histograms
written into the ring buffer, gated by `every`; written once, on the backend's array
functions (`current.OPS`)."""

from __future__ import annotations

import math
import warnings
import weakref
from collections.abc import Callable
from typing import Any

from keras import ops

from gradwatch._backend import current as _backend
from gradwatch._capture.counting import step_counter
from gradwatch._capture.plan import Plan, Planner
from gradwatch._capture.spikes import spike_code
from gradwatch._capture.step import Records, record_key
from gradwatch._logdata.store import NOISE_RAW, Store
from gradwatch._stats import derived as _derived
from gradwatch._stats import optimizer_health as _health
from gradwatch._stats.compute import compute_histograms, compute_stats, traced_for_xla
from gradwatch._stats.specs import gradient_stats, needs_of
from gradwatch.buffer import GradientBuffer
from gradwatch.sparse import dense

# The backend's array functions in the step (`stack`, `full`, `nan`, ...).
array_ops = _backend.OPS


def capture_step(
    planner: Planner,
    model: Any,
    step: Any,
    records: Records,
    skipped: Any,
    local: Records | None,
    scalars: tuple[Any, ...],
) -> None:
    """Adds the capture of the planner's watch to the step being traced
    (`GradWatch.capture_step`): its plan, made in the step, and its ring buffer."""
    with traced_for_xla(model.jit_compile):
        plan = planner.in_step(model, records)
        if plan is None:
            return
        buffer = planner.buffer_for(model, plan)
        local = records if local is None else local
        capture(
            planner.watch,
            model,
            plan,
            buffer,
            planner.store,
            step,
            records,
            skipped,
            local,
            scalars,
        )


def judge_spikes(
    planner: Planner, judge: Any, model: Any, scope: Any, records: Records, local: Any
) -> None:
    """Adds the watch's spike verdict of the step to `scope.spikes` (`GradWatch.judge_spikes`):
    its global norm over the watched gradients in `records` and the step's loss (the
    global batch's, under `tf.distribute`) against its judge's window, at recorded steps."""
    with traced_for_xla(model.jit_compile):
        plan = planner.in_step(model, records)
        if plan is None:
            return
        loss = _scalar(scope.loss)
        if loss is not None and local is not None:
            loss = _backend.all_reduce_sum([loss])[0] / _backend.num_replicas(model)
        every = planner.watch.every
        recorded = True
        if every > 1:
            recorded = ops.equal(step_counter(model).read_value() % every, 0)
        scope.spikes[id(planner.watch)] = judge.in_step(plan, records, loss, recorded)


def check_step(
    planner: Planner, alarms: Any, model: Any, step: Any, records: Records, skipped: Any
) -> None:
    """Adds the every-step checks (non-finite, thresholds) to the step being traced
    (`GradWatch.check_step`)."""
    with traced_for_xla(model.jit_compile):
        plan = planner.in_step(model, records)
        if plan is None:
            return
        alarm = alarms.alarm_for(len(plan.stat_index))
        _derived.every_step_check(plan, records, step, skipped, alarm, alarms)


def capture(
    watch: Any,
    model: Any,
    plan: Plan,
    buffer: GradientBuffer,
    store: Store,
    step: Any,
    records: Records,
    skipped: Any,
    local: Records,
    scalars: tuple[Any, ...] = (None, None, None, None, None),
) -> None:
    """Adds the capture of `watch` (its `stats`, `every`, `histogram`, `per_replica`) to
    the step being traced or run.

    `records` hold the global gradients, `local` (under `tf.distribute`) what this
    replica handed the optimizer; without a strategy they are the same object.
    `scalars` are the step's `(loss, learning_rate, applies, batch_size, spikes)`: the
    first three written into the same slot (`SCALARS`; the step applied where its optimizer
    applies and no loss-scale optimizer skipped the update), with the watch's spike
    verdict from `spikes` (`StepScope.spikes`, by watch: its global norm and code), then the
    step's raw noise-scale estimate (`NOISE_RAW`, `_derived.noise_estimate`), NaN without one.
    """
    _check_known(model, plan, records)
    entries = [records.get(k) for k in plan.ids]
    _note_disconnected(plan, entries, store)
    needs = needs_of(watch.stats)
    if "optimizer" in needs:
        _note_unknown_clipping(watch, plan, entries)

    def gradient(i: int) -> Any:
        entry = entries[i]
        if entry is None or entry.grad is None:
            return None
        return _backend.unscaled_float32(entry.grad, entry.scale)

    flat_gradients = _flat_gradients(plan, gradient)
    # Collectives stay out of the branch below: under tf.distribute a cross-replica
    # call inside a conditional branch fails to trace.
    clipped = (
        _derived.clipped_norms_across_replicas(plan, local)
        if local is not records and "optimizer" in needs
        else None
    )
    replica_stats = _derived.replica_stats(plan, local, watch.stats) if watch.per_replica else None
    loss, learning_rate, applied, batch, spikes = (*scalars, None, None)[:5]
    noise = _derived.noise_estimate(model, plan, records, local, buffer, batch, applied)
    loss, learning_rate, applied = (_scalar(x) for x in (loss, learning_rate, applied))
    if applied is not None and skipped is not None:
        # `skipped` is a code (`buffer.SKIPPED_BY`): any bit set kept the update back.
        applied = applied * (1 - _backend.float32(ops.not_equal(skipped, 0)))
    if loss is not None and local is not records:
        # Each replica's loss is its own batch's mean: the global batch's is their mean.
        loss = _backend.all_reduce_sum([loss])[0] / _backend.num_replicas(model)
    # The spike judge's verdict (`judge_spikes`), where the watch judged the step.
    global_norm = spike = None
    verdict = (spikes or {}).get(id(watch))
    if verdict is not None:
        global_norm, spike = _backend.float32(verdict[0]), spike_code(verdict[2])

    def record() -> None:
        grads = {i: gradient(i) for i in dict.fromkeys(plan.stat_index + plan.value_index)}
        stat_grads = [grads[i] for i in plan.stat_index]
        only_kernels = len(gradient_stats(watch.stats)) == len(watch.stats)
        if plan.stat_index and not array_ops.restack and only_kernels:
            # The table as computed, without slicing and restacking.
            stats = compute_stats(stat_grads, watch.stats)
        elif plan.stat_index:
            cols = stat_columns(
                watch, plan, entries, stat_grads, step, buffer, flat_gradients, records, clipped
            )
            stats = array_ops.stack([cols[name] for name in watch.stats], axis=1)
        else:
            stats = array_ops.zeros((0, len(watch.stats)))
        values = [
            dense(grads[i])
            if grads[i] is not None
            else array_ops.full(plan.variables[i].shape, math.nan)
            for i in plan.value_index
        ]
        hist = compute_histograms(stat_grads, watch.histogram) if watch.histogram else None
        row = array_ops.stack(
            [
                array_ops.nan() if x is None else x
                for x in (
                    *(loss, learning_rate, applied, global_norm, spike),
                    *(noise or [None] * len(NOISE_RAW)),
                )
            ]
        )
        buffer.write(step, stats, values, hist, skipped, replica_stats, row)

    def keep_previous() -> None:
        _derived.keep_previous(buffer, flat_gradients(), step)

    if watch.every == 1:
        record()
    else:
        _backend.when(step % watch.every == 0, record, buffer.variables)
    if buffer.prev is not None:
        # cos_prev at step s needs step s - 1: keep it only where s is recorded.
        if watch.every == 1:
            keep_previous()
        else:
            _backend.when((step + 1) % watch.every == 0, keep_previous, buffer.variables)


def _scalar(x: Any) -> Any:
    """A float32 scalar: the mean of what the step handed (a loss is one already)."""
    if x is None:
        return None
    x = _backend.float32(x)
    return ops.mean(x) if len(x.shape) else x


def stat_columns(
    watch, plan, entries, stat_grads, step, buffer, flat_gradients, records, clipped=None
) -> dict[str, Any]:
    """The stats of the selected variables, one float32 column per stat name: those of
    the gradient alone from their kernels, the others from what they need (`needs`)."""
    cols = {}
    needs = needs_of(watch.stats)
    if "optimizer" in needs:  # the optimizer's clipping
        cols["clipped_norm"] = _derived.clipped_norms(plan, records) if clipped is None else clipped
    grad_stats = gradient_stats(watch.stats)
    if grad_stats:
        table = compute_stats(stat_grads, grad_stats)
        cols.update({name: table[:, j] for j, name in enumerate(grad_stats)})
    if {"weights", "optimizer_state"} & needs:
        # (A stateless step reads every update's weights from the step's input state,
        # so the update stats of a variable updated more than once are NaN there.)
        before = [
            None
            if entries[i] is None
            or (_backend.STATE_IN_STEP and id(plan.variables[i]) in plan.counts)
            else entries[i].before
            for i in plan.stat_index
        ]
        afters = _afters(plan, records)
        if set(_derived.UPDATE_STATS) & set(watch.stats):
            cols.update(_derived.update_stats(plan, before, afters))
        if "optimizer_state" in needs:
            cols.update(_health.health_stats(watch, plan, entries, records, before, afters))
    if "previous" in needs:
        cols["cos_prev"] = _derived.cosines_with_previous(plan, buffer, flat_gradients(), step)
    return cols


def _afters(plan: Plan, records: Records) -> list[Any]:
    """The weights after each selected row's update, where a later update of the same
    variable in the step read them (its `before`); None: the weights now, after the step."""
    afters = []
    for i in plan.stat_index:
        entry = records.get(plan.ids[i])
        later = None if entry is None else records.get(record_key(entry.variable, entry.update + 1))
        afters.append(None if later is None else later.before)
    return afters


def _check_known(model: Any, plan: Plan, records: Records) -> None:
    known = set(plan.signature)
    for record in records.values():
        var = record.variable
        if id(var) not in known:
            raise ValueError(
                f"`record_gradients` got the variable {var.path!r}, which is not among "
                f"the trainable weights of {type(model).__name__}. Record only the "
                "model's own trainable variables."
            )


def _note_disconnected(plan: Plan, entries: list, store: Store) -> None:
    """Known while tracing: variables recorded with a gradient of None are disconnected.
    One the step did not record at all (a custom step that updates some variables
    only) is not: its stats are NaN at that step, with no warning."""
    disconnected = [
        plan.keys[i]
        for i in dict.fromkeys(plan.stat_index + plan.value_index)
        if entries[i] is not None and entries[i].grad is None
    ]
    new = store.add_disconnected(disconnected)
    if new:
        warnings.warn(
            f"GradWatch: {new} have no gradient (they are not connected to the loss); "
            "their stats are recorded as NaN. See `log.disconnected`.",
            stacklevel=4,
        )


_warned_clipping: weakref.WeakSet = weakref.WeakSet()


def _note_unknown_clipping(watch: Any, plan: Plan, entries: list) -> None:
    """Warns once per watch where `clipped_norm` cannot follow the optimizer's clipping:
    gradients recorded without `optimizer=` on a model with several optimizers."""
    unknown = [
        plan.keys[i]
        for i in plan.stat_index
        if entries[i] is not None and entries[i].grad is not None and entries[i].optimizer is None
    ]
    if not unknown or watch in _warned_clipping:
        return
    _warned_clipping.add(watch)
    warnings.warn(
        f"GradWatch: `clipped_norm` of {unknown} equals `norm`, as their gradients were "
        "recorded without `optimizer=` and the model has several optimizers, so which one "
        "clips them is unknown. Pass the optimizer that applies them: "
        "`record_gradients(grads, variables, optimizer=...)`.",
        stacklevel=4,
    )


def _flat_gradients(plan: Plan, gradient: Callable[[int], Any]) -> Callable[[], Any]:
    """A function giving the selected gradients as one vector; a missing one is NaN.

    Made once per step where the capture runs eagerly (PyTorch); on TensorFlow and
    JAX each branch (tf.cond, lax.cond) builds its own, as a value traced in one
    cannot leave it.
    """
    cache: list[Any] = []

    def flat_gradients() -> Any:
        if cache:
            return cache[0]
        parts = []
        for i in plan.stat_index:
            g = gradient(i)
            if g is None:
                g = array_ops.full(plan.variables[i].shape, math.nan)
            parts.append(array_ops.flat(dense(g)))
        flat = array_ops.concat(parts)
        if _backend.EAGER:
            cache.append(flat)
        return flat

    return flat_gradients
