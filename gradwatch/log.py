"""`GradientLog`: the recorded history, held as dense blocks, queried as tidy pandas frames."""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

from gradwatch._logdata.describe import describe, describe_html
from gradwatch._logdata.files import write_csv, write_parquet
from gradwatch._logdata.frames import (
    HISTOGRAM_COLUMNS,
    REPLICA_STAT_COLUMNS,
    STAT_COLUMNS,
    VALUE_COLUMNS,
    scalar_frame,
    stat_frame,
    values_frame,
)
from gradwatch._logdata.frames import steps as recorded_steps
from gradwatch._logdata.log_views import EventViews, HistogramViews, StatViews, find_cell
from gradwatch._logdata.store import Store
from gradwatch._logdata.views import global_norms
from gradwatch.keys import match_patterns, resolve_key
from gradwatch.stats import DEFAULT_STATS

__all__ = [
    "HISTOGRAM_COLUMNS",
    "REPLICA_STAT_COLUMNS",
    "STAT_COLUMNS",
    "VALUE_COLUMNS",
    "GradientLog",
    "global_norms",
]


class GradientLog(StatViews, HistogramViews, EventViews):
    """The gradient history of a training run: per-step stats and kept tensors.

    While training, a `GradWatch` appends dense numpy blocks; pandas frames are
    built only when asked for. Variables are named by key (the model's name and
    the layer names down to the variable, `net/hidden/kernel`, with `#1`, `#2`,
    ... on duplicates; see `gradwatch.keys.model_paths`), and anywhere a variable is named, an
    unambiguous suffix on `/` boundaries works too (`dense/kernel`).

    Args:
        stats: The stat names recorded, in column order. Defaults to the
            default stats of `GradWatch`.
        bins_per_decade: The histogram resolution, or `None` when no
            histograms are recorded. Defaults to `None`.
        per_replica: Whether the log also holds the stats of each replica's
            local gradient (`GradWatch(per_replica=True)`); then `frame` has a
            `replica` column. Defaults to `False`.

    Example:

    ```python
    watch = gradwatch.GradWatch(values="dense/kernel")
    model.fit(x, y, callbacks=[watch])
    log = watch.log
    log.stat("norm").tail()           # one column per variable
    log.gradient("dense/kernel", step=0)
    log.to_parquet("grads.parquet")
    ```
    """

    def __init__(
        self,
        stats: Sequence[str] = DEFAULT_STATS,
        bins_per_decade: int | None = None,
        per_replica: bool = False,
    ):
        self._store = Store(stats, bins_per_decade=bins_per_decade, per_replica=per_replica)

    # ---------------------------------------------------------------- metadata
    @property
    def variables(self) -> list[str]:
        """The keys of the recorded variables, in model order."""
        return list(self._store.variables)

    @property
    def stat_names(self) -> tuple[str, ...]:
        """The names of the recorded stats, in column order."""
        return self._store.stats

    @property
    def shapes(self) -> dict[str, tuple[int, ...]]:
        """The shape of each recorded variable, by key."""
        return dict(self._store.shapes)

    @property
    def steps(self) -> np.ndarray:
        """The recorded step numbers, sorted, as an int64 array."""
        return recorded_steps(self._store)

    @property
    def per_replica(self) -> bool:
        """Whether the log holds per-replica stats (`GradWatch(per_replica=True)`)."""
        return self._store.per_replica

    @property
    def replicas(self) -> list[int]:
        """The replica numbers whose local-gradient stats were recorded, in order.

        Empty without `GradWatch(per_replica=True)`.

        Example:

        ```python
        log.replicas  # [0, 1] under a MirroredStrategy over two devices
        ```
        """
        n = max((b.data.shape[1] for b in self._store.replica_blocks), default=0)
        return list(range(n))

    @property
    def disconnected(self) -> list[str]:
        """Keys of the watched variables that had no gradient (not connected to the loss).

        Their stats are recorded as NaN.
        """
        return list(self._store.disconnected)

    @property
    def bins_per_decade(self) -> int | None:
        """The histogram resolution, or `None` when no histograms were recorded."""
        return self._store.bins_per_decade

    @property
    def value_variables(self) -> list[str]:
        """The keys whose full gradient tensors were kept (`values=`), in model order."""
        codes = set()
        for b in self._store.value_blocks:
            codes.update(int(c) for c in b.codes)
        return [k for k, c in self._store.codes.items() if c in codes]

    @property
    def superseded(self) -> list[GradientLog]:
        """The steps that a resumed run superseded, one log per run they were recorded in.

        A model restored to an earlier iteration than the log had reached
        (`keras.callbacks.BackupAndRestore` after a crash, an older checkpoint)
        trains those iterations again, under the same step numbers. The log's
        history then holds the resumed run's steps; the steps it went over are
        kept here, as they were recorded (in a streamed log, in their run's part
        files). Empty when nothing was superseded.

        Example:

        ```python
        log = gradwatch.read_log("runs/grads")
        log.steps                   # each step once, numbered as the optimizer counts
        [old.steps for old in log.superseded]   # [array([ 8,  9, 10])]
        ```
        """
        return [from_store(store) for store in self._store.superseded]

    def __len__(self) -> int:
        return len(self.steps)

    def __repr__(self) -> str:
        return describe(self)

    def _repr_html_(self) -> str:  # a notebook's view of a log
        return describe_html(self)

    # ------------------------------------------------------------------ frames
    @property
    def frame(self) -> pd.DataFrame:
        """The stats as a long, tidy frame.

        Columns: `step` (int64), `epoch` (int64), `batch` (int64), `variable`
        (Categorical of keys in model order), `stat` (Categorical), `value`
        (float32). One row per step, variable and stat, sorted by step.

        With `GradWatch(per_replica=True)` there is also a `replica` column
        (nullable Int64, after `batch`): `<NA>` on the rows of the global
        gradient, the replica's number on the rows of its local gradient. Each
        step's global rows come first, then replica 0's, 1's, ...
        """
        return stat_frame(self._store)

    @property
    def scalars(self) -> pd.DataFrame:
        """The loss, the learning rate and whether the update applied, of each
        recorded step, as a frame.

        Columns: `step`, `epoch`, `batch` (int64), `loss` and `learning_rate`
        (float32), `applied` (nullable boolean). One row per recorded step, sorted
        by step.

        `loss` is the loss of that step's batch, as the step computed it inside
        `fit` (the compiled loss plus regularizers and `add_loss` terms, before
        loss scaling; under `tf.distribute`, the mean over the replicas): the
        value Keras averages into `logs["loss"]`, but for every step, also with
        `steps_per_execution > 1`. `learning_rate` is the rate the optimizer
        applied at that step (a `LearningRateSchedule` at the optimizer's count
        of its steps, as Keras evaluates it: with `gradient_accumulation_steps`,
        its micro-steps). `applied` is whether the optimizer updated the weights:
        False at a step that only accumulates a gradient, or whose update a
        `LossScaleOptimizer` skipped. A value the step did not have is NaN
        (`<NA>` for `applied`): `loss` where a custom `train_step` never updates
        the model's `loss` metric, all in a log written before gradwatch
        recorded them. Recorded at the steps the log records (every `every`-th
        step).

        Example:

        ```python
        watch = gradwatch.GradWatch()
        model.fit(x, y, callbacks=[watch])
        watch.log.scalars.tail()   # step, epoch, batch, loss, learning_rate, applied
        ```
        """
        return scalar_frame(self._store)

    @property
    def values_frame(self) -> pd.DataFrame:
        """The kept gradient tensors (`values=`) as a long, tidy frame.

        Columns: `step`, `epoch`, `batch`, `variable` (Categorical), `index`
        (int64, the element's flat position in C order), `value` (float32).
        """
        return values_frame(self._store)

    # ----------------------------------------------------------------- queries
    def key(self, name: str) -> str:
        """The full key that `name` (a key or an unambiguous suffix) refers to.

        Example:

        ```python
        log.key("dense/kernel")  # 'sequential/dense/kernel'
        ```
        """
        return resolve_key(name, self._store.variables)

    def select(
        self,
        variables: str | re.Pattern | Sequence[str | re.Pattern] | None = None,
        stats: str | Sequence[str] | None = None,
        steps: int | slice | Sequence[int] | None = None,
    ) -> pd.DataFrame:
        """A filtered copy of `frame`.

        Args:
            variables: Glob(s) or `re.Pattern`(s) matched against keys as in
                `GradWatch(variables=...)`. Defaults to `None` (all).
            stats: A stat name or a list of them. Defaults to `None` (all).
            steps: A step, a list of steps, or a `slice(start, stop, every)`
                over step numbers, half-open as in Python. Defaults to `None`
                (all).

        Returns:
            The matching rows of `frame`, with a fresh index (with per-replica
            stats, the global rows and the replicas' rows).

        Example:

        ```python
        log.select(variables="dense*", stats="norm", steps=slice(0, 100))
        ```
        """
        frame = self.frame
        mask = np.ones(len(frame), dtype=bool)
        if variables is not None:
            keys = match_patterns(variables, self._store.variables, "variables")
            mask &= frame["variable"].isin(keys).to_numpy()
        if stats is not None:
            names = [stats] if isinstance(stats, str) else stats
            if not isinstance(names, Sequence) or isinstance(names, bytes):
                raise TypeError(
                    f"`stats` must be a stat name or a list of them. Received: stats={stats!r}"
                )
            for name in names:
                self._check_stat(name)
            mask &= frame["stat"].isin(list(names)).to_numpy()
        if steps is not None:
            mask &= _step_mask(frame["step"].to_numpy(), steps)
        return frame[mask].reset_index(drop=True)

    def gradient(self, variable: str, step: int) -> np.ndarray:
        """The full gradient tensor of one variable at one step.

        Needs the variable to have been kept with `GradWatch(values=...)`.

        Args:
            variable: A key or an unambiguous suffix, e.g. `"dense/kernel"`.
            step: A recorded step number.

        Returns:
            A float32 array in the variable's shape.

        Raises:
            KeyError: If the tensor was not kept, or the step was not recorded.

        Example:

        ```python
        log.gradient("dense/kernel", step=0)
        ```
        """
        store = self._store
        key = self.key(variable)
        found, kept = find_cell(store.value_blocks, store.codes[key], step)
        if found is not None:
            b, col, row = found
            variables = store.variables
            sizes = [store.size(variables[c]) for c in b.codes]
            start = int(sum(sizes[:col]))
            return b.data[row, start : start + sizes[col]].reshape(store.shapes[key]).copy()
        if not kept:
            raise KeyError(
                f"The gradient tensor of {key!r} was not kept; only its stats were "
                f"recorded. Keep it with GradWatch(values={key!r}) (or a glob such as "
                f"values='*'). Kept: {self.value_variables}"
            )
        raise KeyError(
            f"Step {step!r} of {key!r} was not recorded. {self._range_text(store.codes[key])}"
        )

    def _range_text(self, code: int) -> str:
        steps = np.unique(
            np.concatenate(
                [b.steps for b in self._store.value_blocks if code in b.codes]
                or [np.zeros((0,), np.int64)]
            )
        )
        if not len(steps):
            return "No steps were recorded."
        every = np.unique(np.diff(steps))
        stride = f", every {every[0]} steps" if len(every) == 1 else ""
        return f"Recorded: {len(steps)} steps from {steps[0]} to {steps[-1]}{stride}."

    # ----------------------------------------------------------------- export
    def to_csv(self, path: Any) -> None:
        """Writes the log to a CSV file that `gradwatch.read_log` reads back.

        Example:

        ```python
        log.to_csv("grads.csv")
        ```
        """
        write_csv(self._store, path)

    def to_parquet(self, path: Any) -> None:
        """Writes the log to a Parquet file that `gradwatch.read_log` reads back.

        Example:

        ```python
        log.to_parquet("grads.parquet")
        ```
        """
        write_parquet(self._store, path)

    def __eq__(self, other: object) -> bool:
        if not isinstance(other, GradientLog):
            return NotImplemented
        a, b = self._store, other._store
        return (
            a.stats == b.stats
            and a.per_replica == b.per_replica
            and a.bins_per_decade == b.bins_per_decade
            and a.disconnected == b.disconnected
            and dict(a.alerts) == dict(b.alerts)
            and a.skipped == b.skipped
            and a.guarded == b.guarded
            and dict(a.origins) == dict(b.origins)
            and self.examples.equals(other.examples)
            and a.variables == b.variables
            and dict(a.shapes) == dict(b.shapes)
            and self.frame.equals(other.frame)
            and self.values_frame.equals(other.values_frame)
            and self.scalars.equals(other.scalars)
            and self.noise_scale.equals(other.noise_scale)
            and (a.bins_per_decade is None or self.histograms.equals(other.histograms))
        )

    __hash__ = None  # type: ignore[assignment]


def _step_mask(step: np.ndarray, steps: Any) -> np.ndarray:
    if isinstance(steps, slice):
        for part in ("start", "stop", "step"):
            value = getattr(steps, part)
            if value is not None and not isinstance(value, (int, np.integer)):
                raise TypeError(f"A `steps` slice takes integers. Received: steps={steps!r}")
        if steps.step is not None and steps.step < 1:
            raise ValueError(f"A `steps` slice's step must be >= 1. Received: steps={steps!r}")
        lo = -np.inf if steps.start is None else steps.start
        hi = np.inf if steps.stop is None else steps.stop
        mask = (step >= lo) & (step < hi)
        if steps.step is not None:
            base = 0 if steps.start is None else steps.start
            mask &= (step - base) % steps.step == 0
        return mask
    if isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        return step == steps
    if (
        isinstance(steps, Sequence)
        and not isinstance(steps, (str, bytes))
        and all(isinstance(s, (int, np.integer)) and not isinstance(s, bool) for s in steps)
    ):
        return np.isin(step, np.asarray(list(steps), dtype=np.int64))
    raise TypeError(
        "`steps` must be an int, a list of ints, or a slice such as slice(0, 100). "
        f"Received: steps={steps!r}"
    )


def from_store(store: Store) -> GradientLog:
    """The `GradientLog` over a store (package-internal): its queries see later writes."""
    log = GradientLog.__new__(GradientLog)
    log._store = store
    return log


def store_of(log: GradientLog) -> Store:
    """The store that a `GradientLog` queries (package-internal: what gradwatch writes)."""
    return log._store
