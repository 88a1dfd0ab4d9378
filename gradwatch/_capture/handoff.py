"""The hand-off of a step to the host, for a replay: its batch and the model's trainable
weights from before its update, at the steps a watch replays (`Replay`): a spike, a step
kept from the model, every `examples_every`-th and every `noise_scale_every`-th step.

Once per step, before its first update: in the first `apply` of the step where the step
hands its gradients to `apply` (TensorFlow, PyTorch), from the step's input state in
`commit` on JAX. A branch of the step, taken only at such a step: a step that is not
replayed pays its predicate alone. The host keeps what it gets in the watch's queue
(`GradWatch.queue_replay`), replayed between executions (`gradwatch._forensics.replays`).
Not where the backend cannot hand values to the host from the step (TensorFlow's
XLA-compiled step, `tf.distribute`): there no replay is made.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch._backend import current as _backend
from gradwatch._capture.step import StepScope, model_state

#: Why a step is replayed, in the order of `Replay.reasons`.
REASONS = ("spike", "kept", "examples", "noise_scale")


@dataclass
class Replay:
    """One step as the host gets it: its number, its batch (NumPy, as `fit` handed it
    to the step), the model's trainable weights from before its update (in the order
    of `model.trainable_variables`), and why it is replayed (`REASONS`)."""

    step: int
    x: Any
    y: Any
    sample_weight: Any
    weights: list[np.ndarray]
    reasons: frozenset[str]


def _reasons(watch: Any, step: Any, scope: StepScope) -> list[Any]:
    """The watch's reasons to replay the step, as bools of the step (`REASONS` order)."""
    verdict = scope.spikes.get(id(watch))
    spike = False if verdict is None else ops.any(verdict[2])
    kept = False
    if scope.finite is not None and getattr(watch, "keeps_model", False):
        kept = _backend.logical_not(scope.finite)
    examples = False
    if watch.examples_every:
        examples = ops.equal(step % watch.examples_every, 0)
    noise = False
    if watch.noise_scale_every:
        noise = ops.equal(step % watch.noise_scale_every, 0)
    return [spike, kept, examples, noise]


def hand_off(model: Any, scope: StepScope, weights: Sequence[Any] | None = None) -> None:
    """Hands the step to each watch that replays it, once per step, before its first
    update. `weights`: the trainable weights' values before the update (JAX: from the
    step's input state); None reads the variables, which no update changed yet."""
    if scope.handed:
        return
    scope.handed = True
    state = model_state(model)
    if scope.data is None or state.counter is None:
        return
    step = state.counter.read_value()
    structure = scope.data
    leaves = keras.tree.flatten(structure)
    variables = list(model.trainable_variables)
    for watch in state.listening:
        if not getattr(watch, "replays", False):
            continue
        reasons = _reasons(watch, step, scope)
        if all(r is False for r in reasons):
            continue
        flags = ops.stack([ops.convert_to_tensor(r, "bool") for r in reasons])

        def keep(at: Any, *arrays: Any, _watch: Any = watch) -> None:
            n = len(leaves)
            data = keras.tree.pack_sequence_as(structure, list(arrays[:n]))
            x, y, sample_weight = keras.utils.unpack_x_y_sample_weight(data)
            why = frozenset(r for r, f in zip(REASONS, arrays[-1], strict=True) if bool(f))
            values = [np.asarray(a) for a in arrays[n:-1]]
            _watch.queue_replay(Replay(int(at), x, y, sample_weight, values, why))

        def taken(flags: Any = flags, keep: Any = keep) -> None:
            values = weights if weights is not None else [_backend.OPS.read(v) for v in variables]
            _backend.to_host(model, keep, step, [*leaves, *values, flags])

        _backend.when(ops.any(flags), taken, [])
