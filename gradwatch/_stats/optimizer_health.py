"""Optimizer health in the step: `v_ratio`, `eps_frac` and `update_cos`, from the
optimizer's state before its update (`StateBefore`, read where the weights before it are
read) and after it, and from the weights.

Each stat follows Keras' own update of the optimizer that applies the variable: its
second-moment slot, its bias correction and where its epsilon enters the denominator
(`keras/src/optimizers/adam.py`, `nadam.py`, `lamb.py`, `adamax.py`, `rmsprop.py`).
The gradient `g` is the one the optimizer's update step sees: unscaled (a
`LossScaleOptimizer`), the mean of the accumulated micro-steps
(`gradient_accumulation_steps`) and clipped (`clipnorm`, `clipvalue`,
`global_clipnorm`). At a step whose update did not run (a micro-step that only
accumulates, a step a loss-scale optimizer or `on_nonfinite` skipped), all three are NaN.
"""

from __future__ import annotations

import dataclasses
import math
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import keras
from keras import ops

from gradwatch._backend import current as _backend
from gradwatch._capture.plan import Plan
from gradwatch._capture.step import Records, record_key
from gradwatch._stats.derived import clipping
from gradwatch._stats.optimizer_state import StateBefore, innermost
from gradwatch.sparse import dense

#: The stats this module computes; those that read a second moment.
HEALTH_STATS = ("v_ratio", "eps_frac", "update_cos")
MOMENT_STATS = ("v_ratio", "eps_frac")


def health_stats(
    watch: Any,
    plan: Plan,
    entries: Sequence[Any],
    records: Records,
    befores: Sequence[Any],
    afters: Sequence[Any],
) -> dict[str, Any]:
    """`v_ratio`, `eps_frac` and `update_cos` of the selected rows (those of them that
    `watch.stats` names), one float32 column each.

    `befores` and `afters` are each selected row's weights before and after its update
    (`update_cos`; None: not read, or after the step). A row without a `StateBefore`
    (or, on a stateless step, a variable updated several times, whose every update
    reads the step's input state) is NaN.
    """
    wanted = [s for s in HEALTH_STATS if s in watch.stats]
    states = _states(plan, entries)
    _note_no_second_moment(watch, states, wanted)
    grads = _applied_gradients(records)
    nan = _backend.OPS.nan()
    cols: dict[str, list[Any]] = {s: [] for s in wanted}
    ran: list[Any] = []
    # Whether the update ran, and t - 1: one per apply of an optimizer, not per variable.
    clocks: dict[tuple[int, int, bool], tuple[Any, Any]] = {}
    for j, i in enumerate(plan.stat_index):
        state, entry = states[j], entries[i]
        size = math.prod(plan.variables[i].shape)
        if state is None or entry.grad is None or size == 0:
            for s in wanted:
                cols[s].append(nan)
            ran.append(ops.zeros((), "bool"))
            continue
        later = records.get(record_key(entry.variable, entry.update + 1))
        later = None if later is None else later.state
        key = (id(state.optimizer), entry.update, later is None)
        if key not in clocks:
            clocks[key] = _clock(state, later)
        updated, t_prev = clocks[key]
        ran.append(updated)
        g = grads[plan.ids[i]]
        row = _row(state, g, later, t_prev, befores[j], afters[j], plan.variables[i], wanted)
        for s in wanted:
            cols[s].append(row[s])
    ran_rows = _backend.OPS.stack(ran)
    return {s: ops.where(ran_rows, _backend.OPS.stack(cols[s]), nan) for s in wanted}


def _states(plan: Plan, entries: Sequence[Any]) -> list[StateBefore | None]:
    states = []
    for i in plan.stat_index:
        entry = entries[i]
        # A stateless step reads every update's state from its input state: only the
        # first update of a variable updated several times could be right, so none is.
        several = _backend.STATE_IN_STEP and id(plan.variables[i]) in plan.counts
        states.append(None if entry is None or several else entry.state)
    return states


def _applied_gradients(records: Records) -> dict[Any, Any]:
    """Each record's gradient as the optimizer's update step sees it: unscaled, float32,
    dense, the mean of the accumulated micro-steps at an applying step, and clipped."""
    grads: dict[Any, Any] = {}
    accumulated: Records = {}
    for key, record in records.items():
        if record.grad is None:
            continue
        g = dense(_backend.unscaled_float32(record.grad, record.scale))
        state = record.state
        if state is not None and state.accumulated is not None:
            n = state.optimizer.gradient_accumulation_steps
            g = (g + ops.cast(state.accumulated, "float32")) / n
            accumulated[key] = dataclasses.replace(record, grad=g, scale=None)
        grads[key] = g
    if not any(_clips(r.optimizer) for r in records.values() if r.grad is not None):
        return grads
    clipped_records = {k: accumulated.get(k, r) for k, r in records.items()}
    _, _, rule = clipping(clipped_records, lambda g: g)
    for key, g in grads.items():
        factor, clipvalue = rule(key)
        if clipvalue is not None:
            grads[key] = ops.clip(g, -clipvalue, clipvalue)
        elif factor is not None:
            grads[key] = g * factor
    return grads


def _clips(optimizer: Any) -> bool:
    opt = innermost(optimizer)
    return any(getattr(opt, a, None) for a in ("clipnorm", "clipvalue", "global_clipnorm"))


def _value(x: Any) -> Any:
    return x() if callable(x) else x


def _clock(state: StateBefore, later: StateBefore | None) -> tuple[Any, Any]:
    """Whether the optimizer's update ran (its step count moved, which a skipped update
    leaves, at a step that applies) and its `iterations` before the update, t - 1."""
    opt = state.optimizer
    step_after = _backend.OPS.read(opt._iterations) if later is None else later.step
    n = int(opt.gradient_accumulation_steps or 1)
    step = ops.cast(state.step, "int32")
    updated = ops.logical_and(
        ops.not_equal(ops.cast(step_after, "int32"), step), ops.equal((step + 1) % n, 0)
    )
    return updated, ops.cast(ops.floor_divide(step, n), "float32")


def _row(
    state: StateBefore,
    g: Any,
    later: StateBefore | None,
    t_prev: Any,
    w_before: Any,
    w_after: Any,
    variable: Any,
    wanted: Sequence[str],
) -> dict[str, Any]:
    """One variable's `wanted` stats at one update, as if the update ran."""
    g2 = ops.square(g)
    out = {}
    if "v_ratio" in wanted:
        out["v_ratio"] = _v_ratio(state, g2, t_prev)
    if "eps_frac" in wanted:
        read = _backend.OPS.read
        after = tuple(read(s) for s in state.slots()) if later is None else later.values
        out["eps_frac"] = _eps_frac(state, after, t_prev)
    if "update_cos" in wanted:
        out["update_cos"] = _update_cos(g, g2, w_before, w_after, variable)
    return out


def _beta_2(opt: Any) -> Any:
    return _value(opt.rho if isinstance(opt, keras.optimizers.RMSprop) else opt.beta_2)


def _v_ratio(state: StateBefore, g2: Any, t_prev: Any) -> Any:
    """max(g**2 / v_hat_(t-1)); NaN at the optimizer's first update (v is all zeros)."""
    if state.family is None:
        return _backend.OPS.nan()
    v = ops.cast(state.values[0], "float32")
    if state.family in ("adam", "amsgrad", "nadam"):
        v = v / (1.0 - ops.power(ops.cast(_beta_2(state.optimizer), "float32"), t_prev))
    elif state.family == "adamax":
        v = ops.square(v)
    # An element with no gradient now and none ever (0 / 0) is no spike.
    ratio = ops.where(ops.equal(g2, 0.0), 0.0, g2 / v)
    return ops.where(ops.equal(t_prev, 0.0), math.nan, ops.max(ratio))


def _eps_frac(state: StateBefore, after: tuple[Any, ...], t_prev: Any) -> Any:
    """The share of elements where epsilon is larger than the term it is added to in the
    optimizer's denominator, after the update."""
    if state.family is None:
        return _backend.OPS.nan()
    opt = state.optimizer
    v = ops.cast(after[0], "float32")
    kind = state.family
    if kind == "adam":
        term = ops.sqrt(v)
    elif kind == "amsgrad":
        term = ops.sqrt(ops.cast(after[1], "float32"))
    elif kind == "nadam":
        b2 = ops.cast(_beta_2(opt), "float32")
        term = ops.sqrt(v / (1.0 - ops.power(b2, t_prev + 1.0)))
    elif kind == "centered":
        term = v - ops.square(ops.cast(after[1], "float32"))
    else:  # adamax: u; rmsprop: v (epsilon inside the square root)
        term = v
    return ops.mean(ops.cast(ops.less(term, _value(opt.epsilon)), "float32"))


def _update_cos(g: Any, g2: Any, w_before: Any, w_after: Any, variable: Any) -> Any:
    """cos(w_after - w_before, -g); NaN without the weights before."""
    if w_before is None:
        return _backend.OPS.nan()
    after = _backend.OPS.read(variable) if w_after is None else w_after
    u = ops.cast(after, "float32") - ops.cast(w_before, "float32")
    dot = -ops.sum(u * g)
    return dot / (ops.sqrt(ops.sum(ops.square(u))) * ops.sqrt(ops.sum(g2)))


_warned: weakref.WeakSet = weakref.WeakSet()


def _note_no_second_moment(
    watch: Any, states: Sequence[StateBefore | None], wanted: Sequence[str]
) -> None:
    """Warns once per watch where `v_ratio` or `eps_frac` is NaN because the optimizer
    keeps no second moment."""
    names = [s for s in MOMENT_STATS if s in wanted]
    if not names or watch in _warned:
        return
    none = sorted(
        {type(s.optimizer).__name__ for s in states if s is not None and s.family is None}
    )
    if not none:
        return
    _warned.add(watch)
    stats = " and ".join(f"`{s}`" for s in names)
    warnings.warn(
        f"GradWatch records {stats} as NaN for {', '.join(none)}, which keeps no second moment "
        "of the gradient; they are defined for Adam, AdamW, Nadam, Lamb, Adamax and "
        "RMSprop. `update_cos` is recorded for any optimizer.",
        stacklevel=5,
    )
