"""Sinks: where `GradWatch` sends each block of recorded steps as it drains them.

A sink is any object with two methods (the `Sink` protocol): `write(block)`, called
with each drained `SinkBlock` in step order, and `close()`, called once at the end
of each `fit`, however it ends. Pass your own with `GradWatch(sinks=[...])`; the
streamed Parquet log (`path=`) and the TensorBoard summaries (`tensorboard_dir=`)
are sinks too. NumPy only: this module imports neither Keras nor a backend.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from types import MappingProxyType
from typing import Protocol, runtime_checkable

import numpy as np


@dataclass(frozen=True, eq=False)
class SinkBlock:
    """k recorded steps, as `GradWatch` drains them from the device: one dense array
    per quantity, the steps along the first axis. The arrays are read-only; copy what
    you keep beyond the call of `write`.

    The numbers are those that `watch.log` gets: `block.stats["norm"][i, j]` is
    `watch.log.stat("norm").loc[block.steps[i], block.keys[j]]`.

    Attributes:
        steps: The step numbers, int64 `(k,)`, increasing; the steps that `every`
            selects only.
        epoch: The epoch of these steps (counted from 0, as Keras' `epoch`).
        batches: Each step's batch within its epoch, int64 `(k,)`.
        keys: The n variable keys, in the column order of `stats` and `histograms`.
        stats: Each recorded stat by name (`GradWatch(stats=...)`'s order): float32
            `(k, n)`, NaN where a variable got no gradient at that step.
        scalars: The steps' `"loss"`, `"learning_rate"` and `"applied"` (1.0 where the
            optimizer updated the weights, 0.0 where it did not): float32 `(k,)`,
            NaN where the step had none.
        skipped: Whether a `LossScaleOptimizer` skipped the step's update, bool `(k,)`.
        values: With `GradWatch(values=...)`, the full gradient of each kept variable
            by key: float32 `(k, *shape)`. Empty otherwise.
        histograms: With `histogram`, each variable's gradient counts in the bins of
            `gradwatch.stats.histogram_bins(bins_per_decade)`: int32 `(k, n, n_bins)`.
            None otherwise.
        bins_per_decade: The histograms' resolution, or None without histograms.
        replica_stats: With `per_replica`, each stat of each replica's local
            gradient by name: float32 `(k, n_replicas, n)`. None otherwise.

    Example:

    ```python
    >>> import numpy as np
    >>> from gradwatch.sinks import SinkBlock
    >>> block = SinkBlock(
    ...     steps=np.array([4, 5]), epoch=1, batches=np.array([0, 1]),
    ...     keys=("net/out/kernel",), stats={"norm": np.array([[0.5], [0.25]], "float32")},
    ... )
    >>> len(block), dict(zip(block.steps.tolist(), block.stats["norm"][:, 0].tolist()))
    (2, {4: 0.5, 5: 0.25})

    ```
    """

    steps: np.ndarray
    epoch: int
    batches: np.ndarray
    keys: tuple[str, ...]
    stats: Mapping[str, np.ndarray]
    scalars: Mapping[str, np.ndarray] | None = None
    skipped: np.ndarray | None = None
    values: Mapping[str, np.ndarray] | None = None
    histograms: np.ndarray | None = None
    bins_per_decade: int | None = None
    replica_stats: Mapping[str, np.ndarray] | None = None

    def __post_init__(self) -> None:
        k = len(self.steps)
        nan = np.full(k, np.nan, np.float32)
        set_ = object.__setattr__  # a frozen dataclass fills in its defaults here
        set_(self, "keys", tuple(self.keys))
        if self.scalars is None:
            set_(self, "scalars", {"loss": nan, "learning_rate": nan, "applied": nan})
        if self.skipped is None:
            set_(self, "skipped", np.zeros(k, bool))
        if self.values is None:
            set_(self, "values", {})
        for name in ("stats", "scalars", "values", "replica_stats"):
            if getattr(self, name) is not None:
                set_(self, name, MappingProxyType(dict(getattr(self, name))))
        # One sink must not change what the next one, or the log, gets.
        for array in (self.steps, self.batches, self.skipped, self.histograms):
            _read_only(array)
        for mapping in (self.stats, self.scalars, self.values, self.replica_stats or {}):
            for array in mapping.values():
                _read_only(array)

    def __len__(self) -> int:
        """The number of steps in the block."""
        return len(self.steps)


def _read_only(array: np.ndarray | None) -> None:
    if isinstance(array, np.ndarray):
        array.flags.writeable = False


@runtime_checkable
class Sink(Protocol):
    """What `GradWatch(sinks=[...])` takes: an object with `write(block)` and `close()`.

    `GradWatch` calls `write` with each `SinkBlock` it drains, in step order (about
    every 256 recorded steps, at the end of each epoch, at the end of training, and
    when `watch.log` is read), and `close` once at the end of each `fit`, also when
    `fit` raises. A later `fit` with the same `GradWatch` writes again: open files or
    connections on the first `write` after a `close`. Nothing need subclass `Sink`:
    any object with these two methods is one.

    A sink that raises gets a warning naming the error and no further blocks;
    training goes on, and `watch.log` keeps every step. Its `close` is still called.

    Example:

    ```python
    class PrintNorms:
        def write(self, block):
            for step, norms in zip(block.steps, block.stats["norm"]):
                print(step, dict(zip(block.keys, norms.round(4))))

        def close(self):
            print("done")

    model.fit(x, y, callbacks=[gradwatch.GradWatch(sinks=[PrintNorms()])])
    ```
    """

    def write(self, block: SinkBlock) -> None:
        """Takes k recorded steps (see `SinkBlock`)."""
        ...

    def close(self) -> None:
        """Ends a `fit`: flush and release what `write` opened."""
        ...
