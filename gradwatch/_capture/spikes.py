"""The spike judge of the step (`GradWatch(on_spike=...)`): each recorded step's global
gradient norm (over the watched variables) and loss against the mean + `spike_sigma`
standard deviations of their previous `spike_window` finite values, kept on the device.

It is the rule of `gradwatch._doctor.spikes.spike_flags`, written on `keras.ops` over a
window that the step updates in place: a few small ops per step, no branch. The judge
runs once per step, before the optimizer's update where the step hands its gradients
to `apply` (so that `on_spike="skip"` can keep the update back, and the examples behind
a spike are replayed on the weights from before it), else in `commit`.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
from keras import ops

from gradwatch._backend import current as _backend
from gradwatch._capture.state_metric import StateMetric
from gradwatch._doctor.spikes import SPIKE_WARMUP

array_ops = _backend.OPS

#: The series the judge keeps, in the order of `SpikeState`'s rows: the global
#: gradient norm, and the loss. The `spike` scalar of a recorded step holds
#: `1` for a gradient spike plus `2` for a loss spike.
SERIES = ("spike", "loss_spike")


class SpikeState(StateMetric):
    """The judge's device values: the last `window` finite values of each series (a
    ring, rows in `SERIES` order), how many finite values each has seen, and how many
    spikes it judged (polled after each execution, for "stop" and "raise").

    A metric, so that on JAX its variables travel in the stateless step's state. Under
    `tf.distribute` every replica judges the same global values: the host reads the
    first replica's copy.
    """

    def __init__(self, window: int):
        super().__init__(name="gradwatch_spikes")
        self.window = int(window)
        index = _backend.INDEX_DTYPE
        self.values = self.add_variable(
            shape=(len(SERIES), self.window), initializer="zeros", dtype="float32", name="values"
        )
        self.seen = self.add_variable(
            shape=(len(SERIES),), initializer="zeros", dtype=index, name="seen"
        )
        self.tripped = self.add_variable(
            shape=(len(SERIES),), initializer="zeros", dtype=index, name="tripped"
        )

    def add_variable(self, shape, initializer, dtype=None, aggregation=None, name=None):
        return super().add_variable(
            shape, initializer, dtype=dtype, aggregation="only_first_replica", name=name
        )


def judge(
    state: SpikeState, current: Sequence[Any], recorded: Any, sigma: float, count: bool = True
) -> Any:
    """Judges this step's values (`current`: a float32 scalar per `SERIES`, NaN where the
    step has none) and adds the finite ones to the window, where `recorded` holds; counts
    the spikes in `state.tripped` where `count` (the policies that stop training poll it).
    Returns a bool vector, one flag per series. Few ops: it is traced into every step."""
    window = state.window
    slots = np.arange(window, dtype=np.float32)[None, :]  # a constant, not an op
    values = array_ops.read(state.values)
    seen_count = array_ops.read(state.seen)
    seen = ops.cast(seen_count, "float32")
    x = ops.stack([ops.cast(c, "float32") for c in current])
    filled = ops.expand_dims(ops.minimum(seen, float(window)), 1)
    # Each row's filled slots: the first `filled` of the ring (it wraps once full).
    mask = ops.cast(ops.less(slots, filled), "float32")
    size = ops.maximum(filled, 1.0)
    mean = ops.sum(values * mask, axis=1, keepdims=True) / size
    spread = ops.sum(ops.square(values - mean) * mask, axis=1, keepdims=True) / size
    limit = ops.squeeze(mean + sigma * ops.sqrt(spread), 1)
    finite = ops.logical_and(ops.isfinite(x), recorded)
    judged = ops.logical_and(finite, ops.greater_equal(seen, float(SPIKE_WARMUP)))
    spikes = ops.logical_and(judged, ops.greater(x, limit))
    # The finite values enter the ring at their series' next slot.
    slot = seen - float(window) * ops.floor(seen / float(window))
    at = ops.logical_and(ops.equal(slots, ops.expand_dims(slot, 1)), ops.expand_dims(finite, 1))
    array_ops.assign(state.values, ops.where(at, ops.expand_dims(x, 1), values))
    array_ops.assign(state.seen, seen_count + ops.cast(finite, state.seen.dtype))
    if count:
        hits = ops.cast(spikes, state.tripped.dtype)
        array_ops.assign(state.tripped, array_ops.read(state.tripped) + hits)
    return spikes


def spike_code(spikes: Any) -> Any:
    """The `spike` scalar of a step: 1 for a gradient spike plus 2 for a loss spike."""
    flags = ops.cast(spikes, "float32")
    return flags[0] + 2.0 * flags[1]


def new_state(window: int) -> SpikeState:
    """A judge's state, made out of the traced step."""
    with _backend.lift():
        return SpikeState(window)


class SpikeJudge:
    """A watch's spike judge: its policy, window and sigma, its device state (made on
    first use, in or before the first traced step), the verdicts it adds to each step,
    and on the host the alerts and the polling of its count of spikes.

    Args:
        policy: `GradWatch(on_spike=...)`; `"ignore"` judges nothing.
        window: `spike_window`.
        sigma: `spike_sigma`.
    """

    def __init__(self, policy: str, window: int, sigma: float):
        self.policy = policy
        self.window = int(window)
        self.sigma = float(sigma)
        self.state: SpikeState | None = None
        self._seen = 0  # spikes already noted on the host (`poll`)

    @property
    def active(self) -> bool:
        return self.policy != "ignore"

    def state_for(self) -> SpikeState:
        """The device state, made on first use (out of the graph)."""
        if self.state is None:
            self.state = new_state(self.window)
        return self.state

    # ------------------------------------------------------------ in the step
    def in_step(self, plan: Any, records: Any, loss: Any, recorded: Any) -> tuple[Any, Any, Any]:
        """The step's verdict: `(global norm, loss, flags)` over the plan's watched
        gradients in `records` (`flags`: a bool per `SERIES`)."""
        from gradwatch._stats.compute import total_sum_of_squares
        from gradwatch._stats.derived import checked_gradients

        _, grads = checked_gradients(plan, records)
        if grads:
            norm = ops.sqrt(total_sum_of_squares(grads))
        else:
            norm = ops.convert_to_tensor(float("nan"), "float32")
        loss = ops.convert_to_tensor(float("nan"), "float32") if loss is None else loss
        counts = self.policy in ("stop", "raise")  # polled after each execution
        flags = judge(self.state_for(), [norm, loss], recorded, self.sigma, counts)
        return norm, loss, flags

    # ------------------------------------------------------------- on the host
    def poll(self, model: Any) -> bool:
        """Whether the step judged a spike since the last poll (one small read)."""
        state = self.state
        if state is None or not _backend.sync_state(model, state.tripped):
            return False
        total = int(_backend.host_copy(state.tripped.value).sum())
        new, self._seen = total > self._seen, max(total, self._seen)
        return new

    def alerts(self, steps: Any, scalars: Any, names: Sequence[str]) -> list[tuple]:
        """The alerts of a drained block: `(step, "*", kind, value)` for each recorded
        step the judge found spiking, the value its global norm (`"spike"`) or its
        loss (`"loss_spike"`)."""
        if scalars is None or "spike" not in names:
            return []
        code = scalars[:, names.index("spike")]
        rows = []
        for bit, kind, source in ((1, "spike", "global_norm"), (2, "loss_spike", "loss")):
            hit = np.isfinite(code) & ((np.nan_to_num(code).astype(np.int64) & bit) != 0)
            values = scalars[:, names.index(source)]
            rows += [
                (int(s), "*", kind, float(v)) for s, v in zip(steps[hit], values[hit], strict=True)
            ]
        return sorted(rows)

    def message(self, step: int, kind: str, value: float) -> str:
        """The one line that names a spike and what became of its update."""
        what = "global gradient norm" if kind == "spike" else "loss"
        head = "Gradient-norm" if kind == "spike" else "Loss"
        if self.policy == "skip":
            then = "Its update was skipped (on_spike='skip'), and training goes on."
        elif self.policy in ("stop", "raise"):
            then = "Its update was skipped: the model keeps the weights from before it."
        else:
            then = "The update was applied; to keep spikes from the model, pass on_spike='skip'."
        return (
            f"{head} spike at step {step}: the {what} {value:.4g} lies above the mean + "
            f"{self.sigma:g} standard deviations of its previous {self.window} finite values. "
            f"{then} See `log.alerts` and `log.diagnose()`."
        )
