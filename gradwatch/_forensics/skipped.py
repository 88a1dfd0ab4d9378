"""The replay of the first step that `on_nonfinite` kept from the model, in `fit`: the
row of `log.origins` that names where its first NaN or Inf was born."""

from __future__ import annotations

import dataclasses
from typing import Any

from gradwatch._forensics.origin import NonfiniteOrigin
from gradwatch._forensics.replay import batch_of, data_origin, replay

_TRACE_HINT = (
    "replay a batch with `gradwatch.trace_nonfinite(model, x, y)` on weights from "
    "before the step (a checkpoint)"
)

#: The `detail` of a step whose batch did not reach the host.
NO_BATCH = (
    "Step {step} could not be replayed: its batch did not reach the host (TensorFlow "
    "keeps it on the device in an XLA-compiled step, `jit_compile=True`, and under "
    "`tf.distribute`); to find the source, " + _TRACE_HINT + "."
)
#: The `detail` of a step whose execution's later steps changed the weights.
MOVED = (
    "The input and the targets are finite; the forward pass, the loss and the "
    "gradients of step {step} could not be replayed on the weights of that step: later "
    "steps of its execution (`steps_per_execution`) updated them; to find the source, "
    + _TRACE_HINT
    + "."
)


def untraced(step: int) -> NonfiniteOrigin:
    """The origin row of a kept step whose batch did not reach the host."""
    return NonfiniteOrigin(None, None, None, (), None, NO_BATCH.format(step=step))


def trace_kept(
    model: Any,
    kept: tuple[int, Any, Any, Any],
    intact: bool,
    batch_size: int | None,
    epoch_start: int,
) -> NonfiniteOrigin:
    """Replays the kept batch `(step, x, y, sample_weight)`: in full where the model's
    weights are those from before the step (`intact`), else its input and targets only
    (they do not depend on the weights). `samples` are the rows' indices in the
    training data where `fit` batched arrays in order (`batch_size`, else None).

    Example:

    ```python
    trace_kept(model, watch.skipped_batch, True, 32, 0).stage  # 'forward'
    ```
    """
    step, x, y, sample_weight = kept
    batch = batch_of(x, y, sample_weight)
    x, y, sample_weight, n = batch.x, batch.y, batch.sample_weight, batch.n
    if intact:
        origin = replay(model, batch)
        if origin is None:
            origin = NonfiniteOrigin(
                None,
                None,
                None,
                (),
                None,
                f"The replay of step {step}'s batch on the weights from before it found "
                "its input, outputs, loss and gradients finite (a random op, such as "
                "dropout, drew otherwise in the step).",
            )
    else:
        origin = data_origin("input", {"x": x}, n) or data_origin(
            "target", {"y": y, "sample_weight": sample_weight}, n
        )
        if origin is None:
            origin = NonfiniteOrigin(None, None, None, (), None, MOVED.format(step=step))
    if batch_size is not None and origin.rows:
        first = (step - epoch_start) * batch_size
        origin = dataclasses.replace(origin, samples=tuple(first + r for r in origin.rows))
    return origin


class KeptStep:
    """A watch's first step kept from the model (`on_nonfinite` "skip", "stop" or
    "raise"): its batch, handed over on the host by the step, and its replay into the
    store's origins (`log.origins`), made once, on the main thread."""

    def __init__(self, store: Any, keeps_model: bool) -> None:
        self.store = store
        self.keeps_model = keeps_model
        #: `(step, x, y, sample_weight)` in NumPy, or None (see `GradWatch.keep_skipped_batch`).
        self.batch: tuple[int, Any, Any, Any] | None = None
        self.traced = False  # the store has the first kept step's row
        self.fit_batch_size: int | None = None  # see `adopt.FIT_BATCH_SIZE`

    def keep(self, step: int, x: Any, y: Any, sample_weight: Any) -> None:
        """Keeps the first batch handed over; later ones are dropped."""
        if self.batch is None:
            self.batch = (int(step), x, y, sample_weight)

    def trace(self, model: Any, epoch_start: int) -> None:
        """After the execution that holds the kept step and before the next one: replays
        its batch and adds where its first NaN/Inf was born to the store. Where later
        steps of the execution updated the weights, only its input and targets are
        replayed. A replay that fails is a row that says so: training goes on."""
        if self.batch is None or self.traced or model is None:
            return
        from gradwatch._backend import current as backend
        from gradwatch._capture.counting import next_step
        from gradwatch.mixin import model_state

        self.traced = True
        step = self.batch[0]
        halt = model_state(model).halt
        halted = halt is not None and bool(halt.read_value())
        intact = halted or step == next_step(model) - 1
        if model.trainable_variables:
            backend.sync_state(model, model.trainable_variables[0])  # JAX: mid-epoch
        try:
            origin = trace_kept(model, self.batch, intact, self.fit_batch_size, epoch_start)
        except Exception as e:  # the training goes on; the row says what failed
            detail = f"The replay of step {step} failed: {type(e).__name__}: {e}"
            origin = NonfiniteOrigin(None, None, None, (), None, detail)
        self._add(step, origin)

    def origin_of(self, step: int, model: Any, epoch_start: int) -> Any:
        """For the message of a step kept from the model: where its first NaN/Inf was
        born (replayed now if it was not yet), or a row saying that it could not be
        replayed. None for other steps than the first kept one."""
        self.trace(model, epoch_start)
        row = self.store.origins.get(step)
        if row is None and not self.traced and self.keeps_model:
            self.traced = True
            self._add(step, untraced(step))
            row = self.store.origins.get(step)
        return row

    def _add(self, step: int, origin: NonfiniteOrigin) -> None:
        self.store.add_origin(
            step, origin.stage, origin.layer, origin.op, origin.rows, origin.samples, origin.detail
        )
