"""The device-side ring buffer that the compiled step writes and the callback drains."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import keras
import numpy as np
from keras import ops

from gradwatch._lazy import tf


@dataclass
class Drained:
    """Host copies of the slots written since the last drain."""

    steps: np.ndarray  # int64, (k,)
    stats: np.ndarray  # float32, (k, n_variables, n_stats)
    values: list[np.ndarray]  # float32, (k, size) for each kept variable
    hist: np.ndarray | None  # int32, (k, n_variables, n_bins)
    replica_stats: np.ndarray | None  # float32, (k, n_replicas, n_variables, n_stats)
    skipped: np.ndarray  # bool, (k,): a loss-scale optimizer skipped the update
    lost: int  # slots overwritten before they were drained


class StateMetric(keras.metrics.Metric):
    """A metric that only carries gradwatch's device state: the train step writes its
    variables directly, it reports nothing, and Keras' per-epoch reset leaves it as it is
    (so it travels in JAX's stateless state and survives `reset_metrics`)."""

    def update_state(self, *args: Any, **kwargs: Any) -> None:
        raise NotImplementedError(f"{type(self).__name__} is written by the train step.")

    def result(self) -> dict:
        return {}

    def reset_state(self) -> None:
        pass


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
        # JAX runs without 64-bit types unless asked: count in int32 there.
        index = "int32" if keras.backend.backend() == "jax" else "int64"
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
        self.drained = 0  # host side: slots already copied out
        self.flagged = False  # a traced step has written `skipped`

    def add_variable(self, shape, initializer, dtype=None, aggregation=None, name=None):
        # Every replica writes the same values: read the first replica's copy.
        return super().add_variable(
            shape, initializer, dtype=dtype, aggregation="only_first_replica", name=name
        )

    def write(
        self, step, stats, values: Sequence, hist=None, skipped=None, replica_stats=None
    ) -> None:
        """Writes one step into the next slot, inside the compiled step."""
        if keras.backend.backend() != "tensorflow":
            self._write_eager(step, stats, values, hist, skipped)
            return
        count = self.count.value
        slot = tf.cast(count % self.capacity, tf.int32)[None]
        _write_slot(self.stats.value, slot, stats)
        _write_slot(self.steps.value, slot, tf.cast(step, tf.int64))
        if skipped is not None or self.flagged:
            flag = tf.constant(False) if skipped is None else skipped
            _write_slot(self.skipped.value, slot, tf.cast(flag, tf.int32))
            self.flagged = True
        for var, value in zip(self.values, values, strict=True):
            _write_slot(var.value, slot, tf.reshape(tf.cast(value, tf.float32), (-1,)))
        if self.hist is not None:
            _write_slot(self.hist.value, slot, tf.cast(hist, tf.int32))
        if self.replica_stats is not None:
            _write_slot(self.replica_stats.value, slot, replica_stats)
        self.count.value.assign_add(1)

    def _write_eager(self, step, stats, values: Sequence, hist=None, skipped=None) -> None:
        """`write` on an eagerly run backend (PyTorch): in-place writes of one slot.

        The slot index stays a device tensor, so writing never waits on the device.
        """
        if keras.backend.backend() == "torch":
            self._write_torch(step, stats, values, hist, skipped)
            return
        count = self.count.value
        # JAX, stateless: a dynamic-update-slice, assigned within the step's StatelessScope.
        slot = ops.cast(count % self.capacity, "int32")
        write = _write_slot_stateless
        write(self.stats, slot, stats)
        write(self.steps, slot, ops.cast(step, self.steps.dtype))
        if skipped is not None or self.flagged:
            flag = False if skipped is None else skipped
            write(self.skipped, slot, ops.cast(flag, "int32"))
            self.flagged = True
        for var, value in zip(self.values, values, strict=True):
            write(var, slot, ops.reshape(ops.cast(value, "float32"), (-1,)))
        if self.hist is not None:
            write(self.hist, slot, ops.cast(hist, "int32"))
        self.count.assign(count + ops.ones((), self.count.dtype))

    def _write_torch(self, step, stats, values: Sequence, hist=None, skipped=None) -> None:
        """`write` on PyTorch, in raw in-place torch ops (each `keras.ops` call costs a
        Python layer on top of the dispatch, and the step runs eagerly)."""
        import torch

        count = self.count.value
        slot = (count % self.capacity).reshape(1)
        self.stats.value.index_copy_(0, slot, ops.convert_to_tensor(stats).to(torch.float32)[None])
        self.steps.value.index_fill_(0, slot, int(step))
        if skipped is not None or self.flagged:
            self.skipped.value.index_fill_(0, slot, int(bool(skipped)))
            self.flagged = True
        for var, value in zip(self.values, values, strict=True):
            flat = ops.convert_to_tensor(value).reshape(1, -1).to(var.value.dtype)
            var.value.index_copy_(0, slot, flat)
        if self.hist is not None:
            counts = ops.convert_to_tensor(hist).to(self.hist.value.dtype)[None]
            self.hist.value.index_copy_(0, slot, counts)
        count.add_(1)

    def _host(self, variable) -> np.ndarray:
        # A copy: the device buffer is written again in place.
        return host_copy(variable.value)

    def drain(self) -> Drained:
        """Copies the slots written since the last drain to the host, oldest first."""
        if keras.backend.backend() != "tensorflow":
            return self._drain_eager()
        count = int(self.count.value.numpy())
        new = count - self.drained
        lost = max(0, new - self.capacity)
        first = self.drained + lost
        idx = np.arange(first, count) % self.capacity
        self.drained = count
        if len(idx) == 0:
            return Drained(
                np.zeros((0,), np.int64),
                np.zeros((0, *self.stats.shape[1:]), np.float32),
                [np.zeros((0, v.shape[1]), np.float32) for v in self.values],
                None if self.hist is None else np.zeros((0, *self.hist.shape[1:]), np.int32),
                None
                if self.replica_stats is None
                else np.zeros((0, *self.replica_stats.shape[1:]), np.float32),
                np.zeros((0,), bool),
                lost,
            )
        tidx = tf.constant(idx, tf.int32)
        return Drained(
            steps=self.steps.value.numpy()[idx],
            stats=self.stats.value.numpy()[idx],
            values=[tf.gather(v.value, tidx).numpy() for v in self.values],
            hist=None if self.hist is None else self.hist.value.numpy()[idx],
            replica_stats=(
                None if self.replica_stats is None else self.replica_stats.value.numpy()[idx]
            ),
            skipped=(
                self.skipped.value.numpy()[idx] != 0 if self.flagged else np.zeros(len(idx), bool)
            ),
            lost=lost,
        )

    def _drain_eager(self) -> Drained:
        """`drain` on an eagerly run backend, from host copies of the buffer."""
        count = int(self._host(self.count))
        new = count - self.drained
        lost = max(0, new - self.capacity)
        idx = np.arange(self.drained + lost, count) % self.capacity
        self.drained = count
        return Drained(
            steps=self._host(self.steps)[idx].astype(np.int64),
            stats=self._host(self.stats)[idx],
            values=[self._host(v)[idx] for v in self.values],
            hist=None if self.hist is None else self._host(self.hist)[idx],
            replica_stats=None,
            skipped=(
                self._host(self.skipped)[idx] != 0 if self.flagged else np.zeros(len(idx), bool)
            ),
            lost=lost,
        )


def host_copy(x) -> np.ndarray:
    """A NumPy copy of a tensor of the backend (torch: without the NumPy 2 copy warning
    that `ops.convert_to_numpy` gives on a torch tensor)."""
    if keras.backend.backend() == "torch" and hasattr(x, "detach"):
        return x.detach().cpu().numpy().copy()
    return np.array(ops.convert_to_numpy(x))


def _write_slot_stateless(var, slot, value) -> None:
    value = ops.expand_dims(ops.cast(value, var.dtype), 0)
    start = (slot,) + (0,) * (len(var.shape) - 1)
    var.assign(ops.slice_update(var.value, start, value))


def _write_slot(var: tf.Variable, slot, value) -> None:
    value = tf.convert_to_tensor(value)[None]
    if isinstance(var, tf.distribute.DistributedValues):
        # Distributed variables reject sparse updates: assign the whole buffer.
        var.assign(tf.tensor_scatter_nd_update(var, slot[:, None], value))
    else:
        # A sparse in-place update; it compiles once under XLA, whatever the slot.
        var.scatter_update(tf.IndexedSlices(value, slot))
