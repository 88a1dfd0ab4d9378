"""The device-side ring buffer that the compiled step writes and the callback drains."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import keras
import numpy as np

from gradwatch._backend import current as _backend
from gradwatch._capture.state_metric import StateMetric
from gradwatch._logdata.store import NOISE_RAW, SCALARS


@dataclass
class Drained:
    """Host copies of the slots written since the last drain."""

    steps: np.ndarray  # int64, (k,)
    stats: np.ndarray  # float32, (k, n_variables, n_stats)
    values: list[np.ndarray]  # float32, (k, size) for each kept variable
    hist: np.ndarray | None  # int32, (k, n_variables, n_bins)
    replica_stats: np.ndarray | None  # float32, (k, n_replicas, n_variables, n_stats)
    skipped: np.ndarray  # bool, (k,): the update was skipped (see `SKIPPED_BY`)
    lost: int  # slots overwritten before they were drained
    scalars: np.ndarray | None = None  # float32, (k, len(SCALARS)): loss, learning rate, applied
    # bool, (k,): of those, the ones a loss-scale optimizer skipped (None: `skipped`)
    loss_scaled: np.ndarray | None = None
    # float32, (k, len(NOISE_RAW)): the step's raw noise-scale estimate, NaN without one
    noise: np.ndarray | None = None

    def __post_init__(self) -> None:
        if self.loss_scaled is None:
            self.loss_scaled = self.skipped


#: The bits of a step's `skipped` code in the buffer: who kept its update from the model.
SKIPPED_BY = {"loss_scale": 1, "on_nonfinite": 2, "on_spike": 4}


class GradientBuffer(StateMetric):
    """A ring buffer of per-step stats and kept gradients, living on the device.

    It is a `Metric` so that its variables stay out of `model.weights`, and its
    `result()` is empty and `reset_state()` a no-op, so it survives the reset of
    metrics at each epoch.

    Under `tf.distribute` its variables are SyncOnRead: each replica writes its
    own copy. Every replica writes the same slots (the global gradient's stats,
    and the per-replica stats gathered from all replicas), so the host reads
    the first replica's copy (`only_first_replica`); a summing read would add
    the replicas' copies up, and under a multi-worker strategy it would wait on
    the other workers.

    Args:
        n_variables: Number of watched variables (rows of a stats slot).
        n_stats: Number of stats per variable.
        value_sizes: Element counts of the variables whose full tensor is kept.
        capacity: Number of slots. Must cover the steps run between drains.
        n_bins: Histogram bins per variable, or 0 for no histograms.
        prev_size: Elements of the previous gradient kept for `cos_prev`, or 0.
        n_replicas: Replicas whose local-gradient stats each slot keeps, or 0.
    """

    def __init__(
        self,
        n_variables: int,
        n_stats: int,
        value_sizes: Sequence[int],
        capacity: int,
        n_bins: int = 0,
        prev_size: int = 0,
        n_replicas: int = 0,
        name: str = "gradwatch_buffer",
    ):
        super().__init__(name=name)
        self.capacity = int(capacity)
        self.stats = self.add_variable(
            shape=(capacity, n_variables, n_stats),
            initializer="zeros",
            dtype="float32",
            name="stats",
        )
        index = _backend.INDEX_DTYPE
        self.steps = self.add_variable(
            shape=(capacity,), initializer="zeros", dtype=index, name="steps"
        )
        self.count = self.add_variable(shape=(), initializer="zeros", dtype=index, name="count")
        self.skipped = self.add_variable(
            shape=(capacity,), initializer="zeros", dtype="int32", name="skipped"
        )
        self.values = [
            self.add_variable(
                shape=(capacity, size), initializer="zeros", dtype="float32", name=f"values_{i}"
            )
            for i, size in enumerate(value_sizes)
        ]
        self.hist = (
            self.add_variable(
                shape=(capacity, n_variables, n_bins),
                initializer="zeros",
                dtype="int32",
                name="hist",
            )
            if n_bins
            else None
        )
        # The last step's gradient, flattened, and its step number (-2: none yet).
        self.prev = (
            self.add_variable(shape=(prev_size,), initializer="zeros", dtype="float32", name="prev")
            if prev_size
            else None
        )
        self.prev_step = self.add_variable(
            shape=(), initializer=keras.initializers.Constant(-2), dtype=index, name="prev_step"
        )
        self.replica_stats = (
            self.add_variable(
                shape=(capacity, n_replicas, n_variables, n_stats),
                initializer="zeros",
                dtype="float32",
                name="replica_stats",
            )
            if n_replicas
            else None
        )
        # Each step's loss, learning rate and applied flag (`SCALARS`), then its raw
        # noise-scale estimate (`NOISE_RAW`), NaN where the step had none.
        self.scalars = self.add_variable(
            shape=(capacity, len(SCALARS) + len(NOISE_RAW)),
            initializer="zeros",
            dtype="float32",
            name="scalars",
        )
        # With `gradient_accumulation_steps`: the micro-steps' sum of squared norms, their
        # count and their batch sizes' sum since the last update (`_stats.derived`).
        self.noise_state = self.add_variable(
            shape=(3,), initializer="zeros", dtype="float32", name="noise_state"
        )
        self.drained = 0  # host side: slots already copied out
        self.flagged = False  # a traced step has written `skipped`

    def add_variable(self, shape, initializer, dtype=None, aggregation=None, name=None):
        # Every replica writes the same values: read the first replica's copy.
        return super().add_variable(
            shape, initializer, dtype=dtype, aggregation="only_first_replica", name=name
        )

    def write(
        self,
        step,
        stats,
        values: Sequence,
        hist=None,
        skipped=None,
        replica_stats=None,
        scalars=None,
    ) -> None:
        """Writes one step into the next slot, inside the compiled step. `scalars` is a
        float32 vector in `SCALARS` order, then `NOISE_RAW`'s."""
        slot = _backend.slot_of(self.count, self.capacity)
        _backend.write_slot(self.stats, slot, stats)
        if scalars is not None:
            _backend.write_slot(self.scalars, slot, scalars)
        _backend.write_slot(self.steps, slot, step)
        if skipped is not None or self.flagged:
            _backend.write_slot(self.skipped, slot, False if skipped is None else skipped)
            self.flagged = True
        for var, value in zip(self.values, values, strict=True):
            _backend.write_slot(var, slot, value)
        if self.hist is not None:
            _backend.write_slot(self.hist, slot, hist)
        if self.replica_stats is not None:
            _backend.write_slot(self.replica_stats, slot, replica_stats)
        _backend.advance(self.count)

    def drain(self) -> Drained:
        """Copies the slots written since the last drain to the host, oldest first."""
        read = _backend.host_copy
        count = int(read(self.count.value))
        new = count - self.drained
        lost = max(0, new - self.capacity)
        idx = np.arange(self.drained + lost, count) % self.capacity
        code = read(self.skipped.value)[idx] if self.flagged else np.zeros(len(idx), np.int32)
        scalars = read(self.scalars.value)[idx]
        block = Drained(
            steps=read(self.steps.value)[idx].astype(np.int64),
            stats=read(self.stats.value)[idx],
            values=[_backend.read_rows(v, idx) for v in self.values],
            hist=None if self.hist is None else read(self.hist.value)[idx],
            replica_stats=(
                None if self.replica_stats is None else read(self.replica_stats.value)[idx]
            ),
            skipped=code != 0,
            lost=lost,
            scalars=scalars[:, : len(SCALARS)],
            loss_scaled=(code & SKIPPED_BY["loss_scale"]) != 0,
            noise=scalars[:, len(SCALARS) :],
        )
        self.drained = count  # only once every slot is on the host
        return block
