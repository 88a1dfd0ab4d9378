"""The stats that are more than a function of one gradient, computed in the step
beside the others (`gradwatch._stats.compute`): the clipped norm (the optimizer's
clipping), `cos_prev`, the update stats, each replica's stats, and the every-step
check. Written once, on the backend's array functions (`current.OPS`)."""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import Any

from gradwatch._backend import current as _backend
from gradwatch._capture.counting import accumulation_steps
from gradwatch._capture.plan import Plan
from gradwatch._capture.step import Records
from gradwatch._stats.compute import compute_stats, sum_of_squares
from gradwatch._stats.specs import gradient_stats
from gradwatch.buffer import GradientBuffer
from gradwatch.sparse import dense, elements

# The backend's array functions in the step (`stack`, `sqrt`, `where`, `read`, ...).
array_ops = _backend.OPS


def clipping(records: Records, view: Callable[[Any], Any]) -> tuple[dict, dict, Any]:
    """Keras' clipping, written out over gradwatch's own reductions rather than by
    calling the optimizer's: sharing its ops lets grappler rewrite the training
    computation, and training must stay bitwise the same.

    Returns each recorded gradient (unscaled, float32, through `view`), its sum of
    squares, and `rule(key) -> (factor, clipvalue)`: the clipped gradient is
    `factor * g` or `clip(g, -clipvalue, clipvalue)` (both None: not clipped).
    """
    grads, sq, optimizers, applies = {}, {}, {}, {}
    for key, record in records.items():
        if record.grad is None:
            continue
        optimizer = record.optimizer
        grads[key] = view(_backend.unscaled_float32(record.grad, record.scale))
        sq[key] = sum_of_squares(grads[key])
        # A LossScaleOptimizer unscales, then its inner optimizer clips.
        optimizers[key] = getattr(optimizer, "inner_optimizer", optimizer)
        # Several updates in one step (a critic's loop) are separate applies.
        applies[key] = (id(optimizers[key]), record.update)
    # Each apply's global norm, over every gradient the optimizer applies there.
    total: dict[tuple[int, int], Any] = {}
    for key, apply in applies.items():
        total[apply] = total.get(apply, 0.0) + sq[key]

    def rule(key: Any) -> tuple[Any, Any]:
        opt = optimizers[key]
        clipnorm = getattr(opt, "clipnorm", None)
        global_clipnorm = getattr(opt, "global_clipnorm", None)
        clipvalue = getattr(opt, "clipvalue", None)
        if clipnorm and clipnorm > 0:  # g * c / max(|g|, c)
            return clipnorm / array_ops.maximum(array_ops.sqrt(sq[key]), clipnorm), None
        if global_clipnorm and global_clipnorm > 0:  # all g * c * min(1/|G|, 1/c)
            gn = array_ops.sqrt(total[applies[key]])
            factor = global_clipnorm * array_ops.minimum(1.0 / gn, 1.0 / global_clipnorm)
            return factor + (gn - gn), None
        if clipvalue and clipvalue > 0:
            return None, clipvalue
        return None, None

    return grads, sq, rule


def clipped_norms(plan: Plan, records: Records) -> Any:
    """The norms of the selected gradients after the clipping of the optimizer applying them."""
    grads, sq, rule = clipping(records, elements)
    nan = array_ops.nan()
    out = []
    for i in plan.stat_index:
        key = plan.ids[i]
        if key not in grads:
            out.append(nan)
            continue
        factor, clipvalue = rule(key)
        if clipvalue is not None:
            clipped = array_ops.clip(grads[key], -clipvalue, clipvalue)
            out.append(array_ops.sqrt(sum_of_squares(clipped)))
        else:
            norm = array_ops.sqrt(sq[key])
            out.append(norm if factor is None else norm * factor)
    return array_ops.stack(out)


def clipped_norms_across_replicas(plan: Plan, local: Records) -> Any:
    """`clipped_norms` under tf.distribute, where each replica's optimizer clips its
    local gradient and then sums the clipped gradients over the replicas.

    The norm of that sum needs the clipped tensors, so they are built here and
    all-reduced (outside any branch). Dense: replicas touch different rows.
    """
    grads, _, rule = clipping(local, dense)
    keys = [plan.ids[i] for i in plan.stat_index if plan.ids[i] in grads]
    nan = array_ops.nan()
    if not keys:
        return array_ops.full((len(plan.stat_index),), math.nan)
    clipped = []
    for key in keys:
        factor, clipvalue = rule(key)
        g = grads[key]
        if clipvalue is not None:
            g = array_ops.clip(g, -clipvalue, clipvalue)
        elif factor is not None:
            g = g * factor
        clipped.append(g)
    summed = _backend.all_reduce_sum(clipped)
    norms = dict(zip(keys, (array_ops.sqrt(sum_of_squares(c)) for c in summed), strict=True))
    return array_ops.stack([norms.get(plan.ids[i], nan) for i in plan.stat_index])


def replica_stats(plan: Plan, local: Records, stats: Sequence[str]) -> Any:
    """The stats of each replica's local gradient, gathered from all replicas:
    `(n_replicas, n_variables, n_stats)` in replica order, NaN for the stats that
    are not functions of the gradient alone. Every replica gets the same tensor."""
    grads = []
    for i in plan.stat_index:
        entry = local.get(plan.ids[i])
        if entry is None or entry.grad is None:
            grads.append(None)
            continue
        grads.append(_backend.unscaled_float32(entry.grad, entry.scale))
    names = gradient_stats(stats)
    n = len(plan.stat_index)
    table = compute_stats(grads, names) if names and n else array_ops.zeros((n, 0))
    nan = array_ops.full((n,), math.nan)
    cols = [table[:, names.index(s)] if s in names else nan for s in stats]
    mine = array_ops.stack(cols, axis=1)[None] if cols else array_ops.zeros((1, n, 0))
    return _backend.all_gather(mine)


#: The stats that `update_stats` computes.
UPDATE_STATS = ("weight_norm", "update_norm", "update_ratio")


def update_stats(plan: Plan, befores: list[Any], afters: list[Any] | None = None) -> dict[str, Any]:
    """`weight_norm`, `update_norm` and `update_ratio` of the selected rows, from the
    weights before the update (`befores`, one per selected row or None) and after it:
    `afters` where a later update in the same step read them, else read now, after
    `apply_gradients`, as this runs after the stock step returns."""
    afters = afters or [None] * len(befores)
    delta = [
        None if b is None else (array_ops.read(plan.variables[i]) if a is None else a) - b
        for i, b, a in zip(plan.stat_index, befores, afters, strict=True)
    ]
    weight = compute_stats(befores, ["norm"])[:, 0]
    update = compute_stats(delta, ["norm"])[:, 0]
    # No update is a ratio of 0, also of zero weights (a step that only accumulates a
    # gradient leaves a zero bias at 0): not 0 / 0.
    ratio = array_ops.where(array_ops.equal(update, 0), update, update / weight)
    return {"weight_norm": weight, "update_norm": update, "update_ratio": ratio}


def cosines_with_previous(plan: Plan, buffer: GradientBuffer, flat: Any, step: Any) -> Any:
    """`cos_prev`: the cosine of each selected gradient with the one kept in the buffer,
    NaN unless that one is from step `step - 1`. Per-variable reductions: segment ops
    over the flat vector are far slower on the CPU."""
    sizes = plan.stat_sizes
    gs = array_ops.split(flat, sizes)
    ps = array_ops.split(array_ops.read(buffer.prev), sizes)
    dot = array_ops.stack([array_ops.sum(g * p) for g, p in zip(gs, ps, strict=True)])
    gg = array_ops.stack([sum_of_squares(g) for g in gs])
    pp = array_ops.stack([sum_of_squares(p) for p in ps])
    cos = dot / (array_ops.sqrt(gg) * array_ops.sqrt(pp))
    follows = array_ops.equal(
        array_ops.read(buffer.prev_step), array_ops.cast(step, buffer.prev_step.dtype) - 1
    )
    return array_ops.where(follows, cos, array_ops.nan())


def keep_previous(buffer: GradientBuffer, flat: Any, step: Any) -> None:
    """Keeps this step's flat gradient for the next step's `cos_prev`."""
    array_ops.assign(buffer.prev, flat)
    array_ops.assign(buffer.prev_step, array_ops.cast(step, buffer.prev_step.dtype))


def checked_gradients(plan: Plan, records: Records) -> tuple[list[int], list[Any]]:
    """The every-step checks' inputs: the rows (among the selected variables) that have a
    gradient this step, and those gradients' elements, unscaled, in float32."""
    rows, grads = [], []
    for j, i in enumerate(plan.stat_index):
        entry = records.get(plan.ids[i])
        if entry is not None and entry.grad is not None:
            rows.append(j)
            grads.append(elements(_backend.unscaled_float32(entry.grad, entry.scale)))
    return rows, grads


def every_step_check(
    plan: Plan, records: Records, step: Any, skipped: Any, alarm: Any, policy: Any
) -> None:
    """Checks one step's gradients for NaN/Inf and against the norm thresholds, and
    notes in `alarm` how many steps tripped each check, and the first such step with
    each variable's sum of squares there (`policy`: the watch's `Alarms`, with its
    `on_nonfinite`, `on_threshold`, `max_norm` and `min_norm`).

    Non-finite gradients that a loss-scale optimizer skipped (`skipped`) never reached
    the weights, so they do not trip `on_nonfinite`.
    """
    rows, grads = checked_gradients(plan, records)
    if not grads:
        return
    check_ops = _backend.CHECK_OPS
    sq = _backend.squares_by_row(grads, rows, len(plan.stat_index))
    bad = over = check_ops.false()
    if policy.on_nonfinite != "ignore":
        bad = check_ops.any(check_ops.logical_not(check_ops.isfinite(sq)))
        if skipped is not None:
            bad = check_ops.logical_and(bad, check_ops.logical_not(skipped))
        check_ops.note_first(bad, alarm.nonfinite_step, alarm.nonfinite_sq, step, sq)
    if policy.thresholds and policy.on_threshold != "ignore":
        norm = check_ops.sqrt(sq)
        out = check_ops.false_like(norm)
        if policy.max_norm is not None:
            out = check_ops.logical_or(out, norm > policy.max_norm)
        if policy.min_norm is not None:
            out = check_ops.logical_or(out, norm < policy.min_norm)
        # A non-finite gradient is `on_nonfinite`'s to report, not beyond a threshold.
        out = check_ops.logical_and(out, check_ops.isfinite(norm))
        over = check_ops.any(out)
        check_ops.note_first(over, alarm.threshold_step, alarm.threshold_sq, step, sq)
    check_ops.count_tripped(alarm.tripped, [bad, over])


def noise_estimate(
    model: Any,
    plan: Plan,
    records: Records,
    local: Records,
    buffer: GradientBuffer,
    batch: Any,
    applies: Any,
) -> list[Any] | None:
    """The step's raw gradient-noise-scale estimate, `NOISE_RAW`'s four float32 scalars
    (NaN where the step has none), over the watched variables (`plan.stat_index`, first
    updates), from what the step has at no extra pass: each replica's gradient against
    the global one under `tf.distribute`, else the micro-batch gradients against their
    mean with `gradient_accumulation_steps`. None where neither exists.

    Collectives run here, outside any branch (see `capture`).
    """
    if batch is None:
        return None
    rows = [
        i
        for i in plan.stat_index
        if (e := records.get(plan.ids[i])) is not None and e.grad is not None and not e.update
    ]
    if not rows:
        return None
    if local is not records:
        return _noise_across_replicas(model, plan, rows, records, local, batch)
    steps = {accumulation_steps(records[plan.ids[i]].optimizer) for i in rows}
    if len(steps) != 1 or applies is None or next(iter(steps)) == 1:
        return None
    return _noise_of_accumulation(plan, rows, records, buffer, batch, applies, steps.pop())


def _unscaled(record: Any) -> Any:
    return _backend.unscaled_float32(record.grad, record.scale)


def _noise_across_replicas(
    model: Any, plan: Plan, rows: list[int], records: Records, local: Records, batch: Any
) -> list[Any]:
    """Small: one replica's batch and its local gradient; big: the global batch and
    gradient. Each replica's local gradient is its batch's mean-loss gradient divided
    by the number of replicas R (the optimizer sums them), so `g_small_sq`, the mean
    over the replicas of |R g_r|^2, is R times the sum of the |g_r|^2. A step whose
    replicas had batches of different sizes (a last, partial batch) has no estimate."""
    local_sq = array_ops.stack(
        [
            sum_of_squares(elements(_unscaled(local[plan.ids[i]])))
            for i in rows
            if plan.ids[i] in local and local[plan.ids[i]].grad is not None
        ]
    )
    b = _backend.float32(batch)
    summed = _backend.all_reduce_sum([array_ops.stack([array_ops.sum(local_sq), b, b * b])])[0]
    r = float(_backend.num_replicas(model))
    total_b = summed[1]
    same = array_ops.equal(r * summed[2], total_b * total_b)
    small = array_ops.where(same, total_b / r, array_ops.nan())
    big_sq = array_ops.sum(
        array_ops.stack([sum_of_squares(elements(_unscaled(records[plan.ids[i]]))) for i in rows])
    )
    return [small, total_b, r * summed[0], big_sq]


def _noise_of_accumulation(
    plan: Plan,
    rows: list[int],
    records: Records,
    buffer: GradientBuffer,
    batch: Any,
    applies: Any,
    n: int,
) -> list[Any]:
    """At a micro-step that applies: small, the micro-batch and the mean of the squared
    norms of the micro-batch gradients; big, the n micro-batches and the squared norm
    of the mean that the optimizer applies, `(g + sum) / n` from Keras' running sum.

    The squared norms of the earlier micro-steps are summed in the buffer's
    `noise_state` (with their count and batch sizes) at each micro-step that runs the
    capture; one that did not (`every > 1` gated on the host) is left out of the mean,
    which stays an unbiased estimate. A window whose micro-batches differ in size (a
    partial batch) has no estimate."""
    grads = [_unscaled(records[plan.ids[i]]) for i in rows]
    sq = array_ops.sum(array_ops.stack([sum_of_squares(elements(g)) for g in grads]))
    b = _backend.float32(batch)
    total = array_ops.read(buffer.noise_state) + array_ops.stack([sq, 1.0, b])
    sums = [records[plan.ids[i]].accumulated for i in rows]
    nan = array_ops.nan()
    if all(s is not None for s in sums):

        def big_sq() -> Any:
            means = [(dense(g) + s) / n for g, s in zip(grads, sums, strict=True)]
            return array_ops.sum(array_ops.stack([sum_of_squares(m) for m in means]))

        big = _backend.cond(applies, big_sq, lambda: nan)
    else:  # (eager: read only where the step applies)
        big = nan
    same = array_ops.equal(total[2], total[1] * b)
    estimate = [array_ops.where(same, b, nan), b * n, total[0] / total[1], big]
    applies = array_ops.cast(applies, "bool")
    array_ops.assign(buffer.noise_state, array_ops.where(applies, array_ops.zeros((3,)), total))
    return [array_ops.where(applies, x, nan) for x in estimate]
