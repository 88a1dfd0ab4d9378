"""The replays of the steps a watch handed to the host (`gradwatch._capture.handoff`):
the examples behind a spike, a kept step or every `examples_every`-th step
(`log.examples`), and the gradient noise scale from the batch's two halves every
`noise_scale_every`-th step (`log.noise_scale`), each on the weights from before the
step's update. Made between executions, on the main thread; a replay that fails is
warned about once, and training goes on."""

from __future__ import annotations

import warnings
from typing import Any

import numpy as np

from gradwatch._forensics.examples import example_gradients, unsupported
from gradwatch._forensics.halves import halves_sq_norms
from gradwatch._forensics.replay import Batch, batch_of


def _batch(replay: Any) -> Batch:
    return batch_of(replay.x, replay.y, replay.sample_weight)


class Replays:
    """A watch's queue of handed-over steps and their replays into its store.

    Args:
        store: The watch's store (`gradwatch._logdata.store.Store`).
    """

    def __init__(self, store: Any, asked: bool = False) -> None:
        self.store = store
        # Replays were asked for (`examples_every`, `noise_scale_every`): a model that
        # cannot be replayed is warned about, once. (Those of spikes and kept steps are
        # made where they can be, silently.)
        self.asked = asked
        self.queue: list[Any] = []
        self.fit_batch_size: int | None = None  # see `adopt.FIT_BATCH_SIZE`
        self._failed: set[str] = set()

    def add(self, replay: Any) -> None:
        """On the host, from the step: one more step to replay."""
        self.queue.append(replay)

    def run(self, model: Any, watched: list[Any], epoch: int, epoch_start: int) -> None:
        """Replays every queued step (`watched`: the watched variables, whose gradient
        norms count; `epoch` and its first step: where the queued steps were run);
        empties the queue."""
        queue, self.queue = self.queue, []
        if model is None:
            return
        reason = unsupported(model)
        if reason is not None:
            if self.asked and "model" not in self._failed:
                self._failed.add("model")
                warnings.warn(
                    f"GradWatch cannot replay the steps of this model, so `log.examples` and "
                    f"`log.noise_scale` get no replayed rows: {reason}",
                    stacklevel=2,
                )
            return
        for replay in queue:
            weights = dict(zip(map(id, model.trainable_variables), replay.weights, strict=True))
            if replay.reasons & {"spike", "kept", "examples"}:
                self._guarded(
                    "examples", self._examples, model, watched, replay, weights, epoch_start
                )
            if "noise_scale" in replay.reasons:
                self._guarded(
                    "noise_scale", self._noise, model, watched, replay, weights, epoch, epoch_start
                )

    def _guarded(self, what: str, fn: Any, *args: Any) -> None:
        try:
            fn(*args)
        except Exception as e:  # the user's model on the user's batch: training goes on
            if what not in self._failed:
                self._failed.add(what)
                warnings.warn(
                    f"GradWatch could not replay step {args[2].step} for `log.{what}`: "
                    f"{type(e).__name__}: {e}. Training goes on; later steps are tried too.",
                    stacklevel=2,
                )

    def _examples(
        self, model: Any, watched: list[Any], replay: Any, weights: dict, epoch_start: int
    ) -> None:
        batch = _batch(replay)
        losses, norms = example_gradients(model, batch, watched, weights)
        rows = np.arange(batch.n)
        samples = None
        if self.fit_batch_size is not None:
            samples = (replay.step - epoch_start) * self.fit_batch_size + rows
        self.store.add_examples(replay.step, rows, samples, losses, norms)

    def _noise(
        self,
        model: Any,
        watched: list[Any],
        replay: Any,
        weights: dict,
        epoch: int,
        epoch_start: int,
    ) -> None:
        row = halves_sq_norms(model, _batch(replay), watched, weights)
        if row is not None:
            step = replay.step
            self.store.add_noise_rows([step], [epoch], [step - epoch_start], [list(row)])
