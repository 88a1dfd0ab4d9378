"""Keeping a non-finite step's update from the model (`on_nonfinite="skip"`, `"stop"`,
`"raise"`): each optimizer's `apply` runs only where the watched gradients of the step
so far are finite, and the batch of such a step is handed to the host, for a replay.

Where the step hands its gradients to `apply` (TensorFlow, PyTorch), `ApplyGuard` gates
that call in a branch of the step (`current.gated_apply`); a stateless JAX step is gated
as a whole, on its returned state (`current.run_step`, through `step_finite`). The
check is one `isfinite` reduction per watched gradient, and the branch; the batch
reaches the host only in the branch taken when the update is skipped.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import keras

from gradwatch._backend import current as _backend
from gradwatch._capture.alarms import KEEPS_MODEL
from gradwatch._capture.handoff import hand_off
from gradwatch._capture.step import StepScope, model_state, scopes

_patch_lock = threading.Lock()
_HOOKS = "_gradwatch_guard_hooks"


def guarding(model: Any) -> list[Any]:
    """The watches of `model`'s step that keep a step's update from it (a non-finite
    step's, or a spike's)."""
    return [w for w in model_state(model).listening if getattr(w, "keeps_model", False)]


def _nan_guarding(model: Any) -> list[Any]:
    """Of `guarding`, the watches that keep a non-finite step's update from the model."""
    return [w for w in guarding(model) if w.on_nonfinite in KEEPS_MODEL]


def judging(model: Any) -> list[Any]:
    """The watches of `model`'s step that judge its global norm and loss for spikes."""
    return [w for w in model_state(model).listening if getattr(w, "on_spike", "ignore") != "ignore"]


def _either(a: Any, b: Any) -> Any:
    """`a or b`, on bools of the step (from the backend's `and` and `not`)."""
    return _backend.logical_not(
        _backend.logical_and(_backend.logical_not(a), _backend.logical_not(b))
    )


def replaying(model: Any) -> list[Any]:
    """The watches of `model`'s step that replay some of its steps on the host."""
    return [w for w in model_state(model).listening if getattr(w, "replays", False)]


def judge_spikes(model: Any, scope: StepScope, records: Any, local: Any = None) -> None:
    """Judges the step for spikes, once per watch and step (before the first update
    where the step hands its gradients to `apply`); where a watch keeps a spike's update
    from the model, a spike makes the step's update skipped (`scope.finite`), noted in
    `scope.spiked`."""
    spiked = None
    for watch in judging(model):
        if id(watch) in scope.spikes:
            continue
        watch.judge_spikes(model, scope, records, local)
        verdict = scope.spikes.get(id(watch))
        if verdict is None or watch.on_spike not in KEEPS_MODEL:
            continue
        flags = verdict[2]
        hit = _either(flags[0], flags[1])
        spiked = hit if spiked is None else _either(spiked, hit)
    if spiked is not None:
        scope.spiked = spiked if scope.spiked is None else _either(scope.spiked, spiked)
        note_finite(scope, _backend.logical_not(spiked))


def _left_to_itself(optimizer: Any) -> bool:
    """A `LossScaleOptimizer` skips a non-finite update itself (and lowers its scale,
    which a skipped `apply` would not): its gradients are left to it."""
    return isinstance(optimizer, keras.optimizers.LossScaleOptimizer)


def checked_gradients(
    model: Any, watches: Sequence[Any], grads: Sequence[Any], variables: Sequence[Any]
) -> list[Any]:
    """The gradients among `grads` whose variables any of `watches` watches."""
    ids: set[int] = set()
    for watch in watches:
        ids |= watch.watched_ids(model)
    return [g for g, v in zip(grads, variables, strict=True) if g is not None and id(v) in ids]


def note_finite(scope: StepScope, finite: Any) -> Any:
    """ANDs `finite` into the step's finiteness so far (`scope.finite`); returns it."""
    scope.finite = finite if scope.finite is None else _backend.logical_and(scope.finite, finite)
    return scope.finite


def keep_batch(model: Any, scope: StepScope) -> None:
    """In the branch taken when the step's update is skipped: hands the step's batch
    (`scope.data`) and number to each guarding watch on the host, where the backend can
    (`current.to_host`; not inside an XLA-compiled TensorFlow step, nor under
    `tf.distribute`)."""
    watches = guarding(model)
    counter = model_state(model).counter
    if not watches or scope.data is None or counter is None:
        return
    structure = scope.data

    leaves = keras.tree.flatten(structure)
    spiked = scope.spiked

    def keep(step: Any, *arrays: Any) -> None:
        data = keras.tree.pack_sequence_as(structure, list(arrays[: len(leaves)]))
        x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
        # A step kept back for a spike has no NaN to trace (`spiked`, the last leaf).
        if spiked is not None and bool(arrays[-1]):
            return
        for watch in watches:
            watch.keep_skipped_batch(int(step), x, y, sample_weight)

    extra = [] if spiked is None else [spiked]
    _backend.to_host(model, keep, counter.read_value(), [*leaves, *extra])


def halt_flag(model: Any) -> Any:
    """Where a watch stops training at a non-finite step ("stop", "raise"): the flag that
    keeps the later steps of the `fit` from the model once one was kept (made on first
    use, cleared by `clear_halt`); None otherwise, or where the backend has none."""
    ends = ("stop", "raise")
    if not any(w.on_nonfinite in ends or w.on_spike in ends for w in guarding(model)):
        return None
    state = model_state(model)
    if state.halt is None:
        state.halt = _backend.new_flag()
    return state.halt


def clear_halt(model: Any) -> None:
    """At the start of a `fit`: the steps run again."""
    halt = model_state(model).halt
    if halt is not None:
        halt.assign(False)


def skipped(model: Any, scope: StepScope) -> None:
    """In the branch taken where the step's update is kept from the model: the later
    steps stop too where a watch stops training, and the batch goes to the host."""
    halt = halt_flag(model)
    if halt is not None:
        ends = ("stop", "raise")
        by_nan = any(w.on_nonfinite in ends for w in _nan_guarding(model))
        by_spike = any(w.on_spike in ends for w in guarding(model))
        spiked = scope.spiked
        if spiked is None or (by_nan and by_spike):
            halt.assign(by_nan or by_spike)
        else:  # only the policy of what kept this step back stops the fit
            halt.assign(spiked if by_spike else _backend.logical_not(spiked))
    keep_batch(model, scope)


class ApplyGuard:
    """Gates each optimizer's `apply` on the finiteness of the step's watched gradients
    so far, while a step of `model` runs (or is traced) and a watch keeps the model.

    `apply` is what every path reaches: `apply_gradients` calls it, the stock PyTorch
    step and custom steps call it. A later non-finite gradient (a generator's, after the
    critic's update) skips its own update and every later one in the step, and the
    updates applied before it are put back at the step's end (`restore_earlier_updates`,
    from the snapshot each `apply` but the last takes): all of them are skipped together.
    """

    def __init__(self, model: Any):
        self.model = model
        self.optimizers = [o for o in _optimizers_of(model) if not _left_to_itself(o)]

    def __enter__(self) -> ApplyGuard:
        with _patch_lock:
            for opt in self.optimizers:
                hooks = opt.__dict__.get(_HOOKS)
                if hooks is None:
                    hooks = {}
                    prior = opt.__dict__.get("apply")
                    original = opt.apply

                    def apply(grads, trainable_variables=None, *args, _h=hooks, _o=original, **kw):
                        hook = _h.get(threading.get_ident())
                        if hook is None:
                            return _o(grads, trainable_variables, *args, **kw)
                        return hook(_o, list(grads), trainable_variables, args, kw)

                    object.__setattr__(opt, _HOOKS, hooks)
                    object.__setattr__(opt, "_gradwatch_guard_prior", prior)
                    object.__setattr__(opt, "apply", apply)
                hooks[threading.get_ident()] = self._apply
        return self

    def _apply(self, original: Any, grads: list, variables: Any, args: tuple, kw: dict) -> Any:
        model = self.model
        scope = scopes().get(id(model))
        if scope is None or scope.guarding:
            return original(grads, variables, *args, **kw)
        # Once per step, before its first update: the spike verdicts (of the gradients
        # recorded so far: a stock step's, all of them). Under `tf.distribute` the
        # records are each replica's own: the step judges the global ones in `commit`.
        if _backend.num_replicas(model) == 1:
            judge_spikes(model, scope, scope.grads)
        if not guarding(model):  # the watches judge spikes (and replay) only
            hand_off(model, scope)
            return original(grads, variables, *args, **kw)
        optimizer = getattr(original, "__self__", None)
        known = variables if variables is not None else _known_variables(optimizer)
        checked = (
            checked_gradients(model, _nan_guarding(model), grads, known)
            if known is not None
            else []
        )
        if checked:
            note_finite(scope, _backend.all_finite(checked))
        halt = halt_flag(model)
        if halt is not None and not scope.halt_read:
            # "stop", "raise": no update after the first non-finite step of the fit, also
            # before `fit` sees `stop_training` (the next step of an execution, or one
            # begun while Keras ran the batch-end callbacks on another thread).
            scope.halt_read = True
            note_finite(scope, _backend.logical_not(halt.read_value()))
        if optimizer is not None and not optimizer.built and variables is not None:
            # As `apply` builds it, but outside the branch: a traced branch cannot make
            # the optimizer's variables (and the snapshot reads them).
            with keras.name_scope(optimizer.name, caller=optimizer):
                optimizer.build(variables)
            optimizer.built = True
        scope.snapshots.append(self._snapshot(optimizer, known, len(scope.snapshots)))
        hand_off(model, scope)  # before the step's first update
        if scope.finite is None:  # nothing watched so far: applied, and put back if need be
            return original(grads, variables, *args, **kw)
        scope.finite = _backend.agree_across_replicas(scope.finite)
        scope.guarding = True
        try:
            _backend.gated_apply(
                model,
                scope.finite,
                lambda g, v: original(g, v, *args, **kw),
                (grads, variables),
                lambda: skipped(model, scope),
            )
        finally:
            scope.guarding = False
        return None

    def _snapshot(self, optimizer: Any, variables: Any, index: int) -> list[tuple[Any, Any]] | None:
        """The values before the `index`-th gated `apply` of the step of what it updates
        (its variables and its optimizer's), for `restore_earlier_updates` to put back
        where a later gradient of the step is not finite. In a traced TensorFlow step it
        is free unless a later `apply` needs it; an eager step takes it where its earlier
        steps had a later `apply` (and, on its first step, at every `apply`)."""
        learned = model_state(self.model).applies_per_step
        if not _backend.snapshots_free() and learned is not None and index >= learned - 1:
            return None
        touched = list(variables or ())
        if optimizer is not None:
            touched += list(optimizer.variables)
        return [(v, _backend.weights_before(v)) for v in touched]

    def __exit__(self, *exc: Any) -> None:
        with _patch_lock:
            for opt in self.optimizers:
                hooks = opt.__dict__[_HOOKS]
                hooks.pop(threading.get_ident(), None)
                if not hooks:
                    prior = opt.__dict__["_gradwatch_guard_prior"]
                    object.__delattr__(opt, _HOOKS)
                    object.__delattr__(opt, "_gradwatch_guard_prior")
                    if prior is None:
                        object.__delattr__(opt, "apply")
                    else:
                        object.__setattr__(opt, "apply", prior)


def restore_earlier_updates(model: Any, scope: StepScope) -> None:
    """At the end of a step that several optimizers' `apply` calls update (a custom
    step, a GAN's): where the step's watched gradients are not all finite, the updates
    applied before the first non-finite gradient are put back too, so that all of a
    step's updates are skipped together. Learns how many `apply` calls the step makes."""
    count = len(scope.snapshots)
    if count:
        model_state(model).applies_per_step = count
    if count < 2 or scope.finite is None:
        return
    saved = [pair for snapshot in scope.snapshots[:-1] if snapshot for pair in snapshot]
    if saved:
        _backend.restore_where(model, _backend.logical_not(scope.finite), saved)


def _optimizers_of(model: Any) -> list[Any]:
    """The model's optimizers: `model.optimizer` and any among its attributes."""
    found: dict[int, Any] = {}
    for value in [getattr(model, "optimizer", None), *vars(model).values()]:
        if isinstance(value, keras.optimizers.Optimizer):
            found.setdefault(id(value), value)
    return list(found.values())


def _known_variables(optimizer: Any) -> list[Any] | None:
    """The variables `apply(grads)` without `trainable_variables` updates: those the
    optimizer was built with."""
    return getattr(optimizer, "_trainable_variables", None)


def step_finite(model: Any, scope: StepScope) -> Any:
    """The finiteness of the step's watched gradients as recorded (JAX's stateless step,
    PyTorch's compiled one), noted in `scope`; None where no watch keeps the model or
    nothing watched was recorded (a loss-scale optimizer's gradients are its own)."""
    watches = guarding(model)
    if not watches:
        return None
    judge_spikes(model, scope, scope.grads)
    records = [r for r in scope.grads.values() if not _left_to_itself(r.optimizer)]
    checked = checked_gradients(
        model, _nan_guarding(model), [r.grad for r in records], [r.variable for r in records]
    )
    if checked:
        note_finite(scope, _backend.all_finite(checked))
    return scope.finite


def skipped_here(scope: StepScope) -> Any:
    """Whether the step's update was kept from the model (a bool, or tensor); None when
    no guard ran in the step."""
    if scope.finite is None:
        return None
    return _backend.logical_not(scope.finite)
