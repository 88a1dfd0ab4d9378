"""The `GradWatch` callback: schedules capture in `model.fit` and drains it into a `GradientLog`."""

from __future__ import annotations

import contextlib
import math
import os
import re
import warnings
import weakref
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal

import keras
import numpy as np
from keras import ops

from gradwatch import io
from gradwatch._backend import current as _backend
from gradwatch._compute import (
    compute_histograms,
    compute_stats,
    sum_of_squares,
    traced_for_xla,
    unscaled_float32,
)
from gradwatch._lazy import tf
from gradwatch._state import StateMetric
from gradwatch._step import Records
from gradwatch.buffer import GradientBuffer
from gradwatch.keys import check_patterns, match_patterns, variable_keys
from gradwatch.log import GradientLog, store_of
from gradwatch.mixin import (
    GradWatchMixin,
    gate_next_step,
    model_state,
    setup_gate,
    step_counter,
)
from gradwatch.sparse import dense, elements
from gradwatch.stats import (
    DEFAULT_BINS_PER_DECADE,
    DEFAULT_STATS,
    GRADIENT_STATS,
    UPDATE_STATS,
    check_stats,
    histogram_bin_count,
)

Policy = Literal["ignore", "warn", "stop", "raise"]
_POLICIES = ("ignore", "warn", "stop", "raise")
_SLOTS = 256  # ring-buffer slots when memory allows; drained every ~_SLOTS steps
_BUFFER_BYTES = 64 * 2**20  # cap on one buffer's size when full tensors are kept


@dataclass
class _Plan:
    """Which of the model's trainable variables get stats and kept tensors."""

    signature: tuple[int, ...]
    variables: list[Any]  # model.trainable_weights
    keys: list[str]
    stat_index: list[int]
    value_index: list[int]
    stat_codes: np.ndarray  # codes in the log
    value_codes: np.ndarray


class _Alarm:
    """Device variables for the checks run at every step: how many steps tripped each
    check, and the first such step with each variable's sum of squares there."""

    def __init__(self, n: int):
        def var(value, dtype, name):
            return tf.Variable(value, dtype=dtype, trainable=False, name=name)

        self.tripped = var([0, 0], tf.int64, "gradwatch_tripped")  # [nonfinite, threshold]
        self.nonfinite_step = var(-1, tf.int64, "gradwatch_nonfinite_step")
        self.nonfinite_sq = var(tf.zeros([n]), tf.float32, "gradwatch_nonfinite_sq")
        self.threshold_step = var(-1, tf.int64, "gradwatch_threshold_step")
        self.threshold_sq = var(tf.zeros([n]), tf.float32, "gradwatch_threshold_sq")


class _MetricAlarm(StateMetric):
    """`_Alarm` on JAX: a metric, so that its variables travel in the stateless step's
    state (int32 steps: JAX runs without 64-bit types unless asked)."""

    def __init__(self, n: int):
        super().__init__(name="gradwatch_alarm")

        def var(shape, dtype, name, value=0):
            init = keras.initializers.Constant(value)
            return self.add_variable(shape=shape, initializer=init, dtype=dtype, name=name)

        self.tripped = var((2,), "int32", "tripped")  # [nonfinite, threshold]
        self.nonfinite_step = var((), "int32", "nonfinite_step", -1)
        self.nonfinite_sq = var((n,), "float32", "nonfinite_sq")
        self.threshold_step = var((), "int32", "threshold_step", -1)
        self.threshold_sq = var((n,), "float32", "threshold_sq")


class _HostValue:
    """A host array with the `numpy()` of a device variable."""

    def __init__(self, value: Any, dtype: Any):
        self.value = np.array(value, dtype)

    def numpy(self) -> np.ndarray:
        return self.value


class _HostAlarm:
    """`_Alarm` on an eagerly run backend (PyTorch), kept on the host."""

    def __init__(self, n: int):
        self.tripped = _HostValue([0, 0], np.int64)
        self.nonfinite_step = _HostValue(-1, np.int64)
        self.nonfinite_sq = _HostValue(np.zeros(n), np.float32)
        self.threshold_step = _HostValue(-1, np.int64)
        self.threshold_sq = _HostValue(np.zeros(n), np.float32)

    def note_first(self, tripped: bool, kind: str, step: int, sq: np.ndarray) -> None:
        step_var, sq_var = getattr(self, f"{kind}_step"), getattr(self, f"{kind}_sq")
        if tripped and step_var.value < 0:
            step_var.value = np.array(step, np.int64)
            sq_var.value = sq


class GradWatch(keras.callbacks.Callback):
    """Records the gradients of every training step of `model.fit`, by variable.

    The model must mix in `gradwatch.GradWatchMixin` (or be a
    `gradwatch.Sequential` / `gradwatch.Model`). The stats are computed inside
    the compiled step, written to a ring buffer on the device, and drained into
    `self.log` (a `GradientLog`) in blocks, so every selected step is recorded,
    also with `steps_per_execution > 1` and `jit_compile=True`.

    Args:
        variables: Which variables get stats: a glob, an `re.Pattern`, or a
            list of them, matched against variable keys (`variable.path`, or
            any suffix of it on `/` boundaries). Defaults to `"*"` (all).
        stats: Names from `gradwatch.STATS`. Defaults to
            `("norm", "mean", "std", "min", "max", "nonfinite")`.
        values: Also keep the full gradient tensor of these variables (same
            pattern forms as `variables`). Defaults to `None` (none).
        every: Record every n-th step (steps whose number is divisible by
            `every`); the others skip the work. Defaults to `1`.
        histogram: Also record a histogram of each selected variable's
            gradient at each recorded step: `True` for 4 bins per decade of
            |g|, or a number of bins per decade. See
            `gradwatch.stats.histogram_bins` for the bins. Defaults to `False`.
        path: Stream the log to this directory while training runs, as a
            hive-partitioned Parquet dataset,
            `path/worker=<k>/run=<id>/part-*.parquet`, that `gradwatch.read_log`,
            `pyarrow.dataset`, pandas or DuckDB can read. Each `GradWatch` is
            one run; a later one appends a new run. Memory then holds at most
            about `flush_every` steps. Under `MultiWorkerMirroredStrategy` only
            the chief writes (see `all_workers`). Defaults to `None` (memory only).
        flush_every: With `path`, write a part every this many recorded
            steps, and at the end of training. Defaults to `1000`.
        max_value_elements: The largest variable (in elements) whose full
            gradient `values` may keep; a larger match is a `ValueError` at the
            start of training. Defaults to `1_000_000`.
        on_nonfinite: What to do when a watched gradient has a NaN or Inf:
            `"ignore"`, `"warn"` (one warning naming the first step and the
            variables, with counts), `"stop"` (set `model.stop_training`; the
            log is kept) or `"raise"` (a `FloatingPointError`, after the log is
            written out). Checked at every step, also with `every > 1`.
            Defaults to `"warn"`.
        max_norm: Alert when a watched variable's gradient norm exceeds this.
            Defaults to `None` (no check).
        min_norm: Alert when a watched variable's gradient norm falls below
            this (vanishing). Defaults to `None` (no check).
        on_threshold: The policy for `max_norm` and `min_norm`, as
            `on_nonfinite`. Defaults to `"warn"`.
        tensorboard_dir: Also write the gradient norms (and histograms, with
            `histogram`) to this directory as TensorBoard summaries, at the
            log's step numbers, each time the buffer is drained; see
            `gradwatch.tensorboard`. Needs the `norm` stat or `histogram`.
            Defaults to `None`.
        per_replica: Under `tf.distribute`, also record the stats of each
            replica's local gradient (as Keras hands it to the optimizer),
            in rows with a `replica` number; the other rows hold the global
            gradient's stats. Without a strategy there is one replica, 0.
            Defaults to `False`.
        all_workers: Under `MultiWorkerMirroredStrategy` with `path`, every
            worker writes its own partition (`worker=k`) instead of the chief
            alone. Defaults to `False`.

    The stats `weight_norm`, `update_norm` and `update_ratio` keep a copy of
    the selected weights from before the update, and `cos_prev` keeps the
    previous step's gradient: each costs memory the size of the selected
    variables, so they are not in the default set.

    Example:

    ```python
    model = gradwatch.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
    model.compile(optimizer="sgd", loss="mse")
    watch = gradwatch.GradWatch(values="dense/kernel")
    model.fit(x, y, epochs=2, callbacks=[watch])
    watch.log.stat("norm")
    watch.log.gradient("dense/kernel", step=0)
    ```

    Under `tf.distribute` the log holds the global gradient; ask for each
    replica's local one too:

    ```python
    with tf.distribute.MirroredStrategy().scope():
        model = gradwatch.Sequential([keras.Input((4,)), keras.layers.Dense(1)])
        model.compile(optimizer="sgd", loss="mse")
    watch = gradwatch.GradWatch(per_replica=True)
    model.fit(x, y, batch_size=64, callbacks=[watch])
    watch.log.stat("norm", replica=0)
    ```
    """

    def __init__(
        self,
        variables: str | re.Pattern | Sequence[str | re.Pattern] = "*",
        stats: str | Sequence[str] = DEFAULT_STATS,
        values: str | re.Pattern | Sequence[str | re.Pattern] | None = None,
        every: int = 1,
        histogram: bool | int = False,
        path: str | os.PathLike | None = None,
        flush_every: int = 1000,
        max_value_elements: int = 1_000_000,
        on_nonfinite: Policy = "warn",
        max_norm: float | None = None,
        min_norm: float | None = None,
        on_threshold: Policy = "warn",
        tensorboard_dir: str | os.PathLike | None = None,
        per_replica: bool = False,
        all_workers: bool = False,
    ):
        super().__init__()
        for arg, value in (("per_replica", per_replica), ("all_workers", all_workers)):
            if not isinstance(value, (bool, np.bool_)):
                raise TypeError(f"`{arg}` must be True or False. Received: {arg}={value!r}")
        self.per_replica = bool(per_replica)
        self.all_workers = bool(all_workers)
        self.variables = check_patterns(variables, "variables")
        self.stats = check_stats(stats)
        self.values = None if values is None else check_patterns(values, "values")
        if isinstance(every, bool) or not isinstance(every, (int, np.integer)):
            raise TypeError(f"`every` must be an integer >= 1. Received: every={every!r}")
        if every < 1:
            raise ValueError(f"`every` must be an integer >= 1. Received: every={every!r}")
        self.every = int(every)
        self.histogram = _check_histogram(histogram)
        self._log = GradientLog(
            self.stats, bins_per_decade=self.histogram or None, per_replica=self.per_replica
        )
        self._store = store_of(self._log)  # what the drained blocks are written to
        if path is not None and not isinstance(path, (str, os.PathLike)):
            raise TypeError(
                "`path` must be a directory path (str or os.PathLike), or None. "
                f"Received: path={path!r}"
            )
        self.path = None if path is None else Path(path)
        if isinstance(flush_every, bool) or not isinstance(flush_every, (int, np.integer)):
            raise TypeError(
                f"`flush_every` must be an integer >= 1. Received: flush_every={flush_every!r}"
            )
        if flush_every < 1:
            raise ValueError(
                f"`flush_every` must be an integer >= 1. Received: flush_every={flush_every!r}"
            )
        self.flush_every = int(flush_every)
        if isinstance(max_value_elements, bool) or not isinstance(
            max_value_elements, (int, np.integer)
        ):
            raise TypeError(
                "`max_value_elements` must be an integer >= 1. "
                f"Received: max_value_elements={max_value_elements!r}"
            )
        if max_value_elements < 1:
            raise ValueError(
                "`max_value_elements` must be an integer >= 1. "
                f"Received: max_value_elements={max_value_elements!r}"
            )
        self.max_value_elements = int(max_value_elements)
        self.on_nonfinite = _check_policy(on_nonfinite, "on_nonfinite")
        self.on_threshold = _check_policy(on_threshold, "on_threshold")
        for arg, value in (("max_norm", max_norm), ("min_norm", min_norm)):
            if value is not None and (
                isinstance(value, bool)
                or not isinstance(value, (int, float, np.floating))
                or not value >= 0
            ):
                raise ValueError(
                    f"`{arg}` must be a number >= 0, or None. Received: {arg}={value!r}"
                )
        self.max_norm = None if max_norm is None else float(max_norm)
        self.min_norm = None if min_norm is None else float(min_norm)
        self._thresholds = self.max_norm is not None or self.min_norm is not None
        # Where the recorded stats see every step, a warning can come from them, at no
        # cost in the step; stop and raise, and steps that `every` skips, need the
        # check that runs in every step.
        self._nonfinite_from_stats = self.every == 1 and "nonfinite" in self.stats
        self._threshold_from_stats = self.every == 1 and "norm" in self.stats
        self.checks_every_step = (
            self.on_nonfinite in ("stop", "raise")
            or (self.on_nonfinite == "warn" and not self._nonfinite_from_stats)
            or (
                self._thresholds
                and (
                    self.on_threshold in ("stop", "raise")
                    or (self.on_threshold == "warn" and not self._threshold_from_stats)
                )
            )
        )
        self._warned: set[str] = set()
        self._alarm: _Alarm | None = None
        self._alarm_seen = {"nonfinite": 0, "threshold": 0}
        self._error: FloatingPointError | None = None
        self._alarm_pending: list[str] = []
        self._pending = 0  # recorded steps not yet written to `path`
        self._worker, self._writes = 0, True  # this process's worker index; does it write?
        self._run: str | None = None  # the run id of this watch's parts under `path`
        self._write_failed = False
        self._read_cache: tuple[int, GradientLog] | None = None
        self.needs_weights = any(s in UPDATE_STATS for s in self.stats)
        self._model_ref: weakref.ref | None = None
        self.tensorboard_dir = _check_tensorboard_dir(tensorboard_dir, self.stats, self.histogram)
        self._tensorboard: Any = None  # a gradwatch.tensorboard.TensorBoardWriter once used
        self._tensorboard_failed = False
        self._plan: _Plan | None = None
        self._buffer: GradientBuffer | None = None
        self._epoch = 0
        self._epoch_start = 0
        self._since_drain = 0

    @property
    def log(self) -> GradientLog:
        """The recorded history. With `path`, what was written there plus what was not yet."""
        if self.path is None or self._write_failed or not self._writes:
            return self._log
        self._flush()
        parts = io.dataset_parts(self.path).get(self._worker, []) if self.path.is_dir() else []
        if self._write_failed or not parts:
            return self._log
        if self._read_cache is None or self._read_cache[0] != len(parts):
            self._read_cache = (len(parts), io.read_log(self.path, worker=self._worker))
        return self._read_cache[1]

    # ------------------------------------------------------------- host side
    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        _check_model(model)
        _check_strategy(model)
        unsupported = [] if keras.backend.backend() == "tensorflow" else _unsupported_on_eager(self)
        if keras.backend.backend() == "jax" and not unsupported:
            # The ring buffer, the step counter and the alarm travel in the stateless
            # step's state: they must exist before Keras gathers it.
            plan = self._plan_for(model)
            self._buffer_for(model, plan)
            step_counter(model)
            if self.checks_every_step and self._alarm is None:
                self._alarm = _MetricAlarm(len(plan.stat_index))
        elif keras.backend.backend() == "torch" and not unsupported:
            # A PyTorch step runs eagerly and applies the update before it records: match
            # the patterns now, so that one matching nothing fails before any step.
            self._plan_for(model)
        if unsupported:
            raise NotImplementedError(
                f"GradWatch does not yet record {'; '.join(unsupported)} on the "
                f"{keras.backend.backend()} backend of Keras. Drop these settings, or train "
                "with KERAS_BACKEND=tensorflow, where they work."
            )
        if self.path is not None:
            self._prepare_path()
        if self._model_ref is not None and self._model_ref() is not model:
            raise ValueError(
                "This GradWatch already records another model, and one log holds one "
                "model's history. Create a new `gradwatch.GradWatch()` for each model."
            )
        self._model_ref = weakref.ref(model)
        state = model_state(model)
        if self not in state.watches:
            # Reached only when the model's own `fit` did not attach this watch.
            state.watches.append(self)
            state.traced_with = tuple(state.watches)
            model.make_train_function(force=True)
        if state.watches[0] is self:
            setup_gate(model)
        self._since_drain = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._epoch = int(epoch)
        counter = model_state(self.model).counter
        self._epoch_start = 0 if counter is None else int(counter.numpy())

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._handle_alarms()
        self._raise_if_alarmed()
        # Called once per execution of `steps_per_execution` steps, on the main
        # thread, before it runs: drain now if the coming execution could
        # overwrite slots not yet copied out. (Not `on_train_batch_end`: Keras
        # runs training asynchronously only while no callback overrides it.)
        if self._buffer is not None:
            spe = int(self.model.steps_per_execution)
            limit = self._buffer.capacity
            if self.path is not None and self._writes:  # drain in time to write a part
                limit = min(limit, max(self.flush_every - self._pending, spe))
            if (self._since_drain + 1) * spe > limit:
                self._drain()
        self._since_drain += 1
        if model_state(self.model).watches[0] is self:
            gate_next_step(self.model)

    def wants_step(self, step: int) -> bool:
        """Whether the step needs capture: recorded, or kept for the next `cos_prev`."""
        if step % self.every == 0:
            return True
        return "cos_prev" in self.stats and (step + 1) % self.every == 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._drain()
        self._poll_alarm()
        self._handle_alarms()
        self._raise_if_alarmed()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._poll_alarm()
        self._handle_alarms()
        self.release(self.model)
        self._raise_if_alarmed()

    def state_metrics(self) -> list[Any]:
        """The metrics carrying this watch's device state (ring buffer, JAX alarm)."""
        return [m for m in (self._buffer, self._alarm) if isinstance(m, keras.Metric)]

    def release(self, model: Any) -> None:
        """Drains what is left and detaches from the model; safe to call twice."""
        state = model_state(model)
        try:
            self._drain()
            self._flush()
        finally:
            if self in state.watches:
                state.watches.remove(self)
            if self._tensorboard is not None:
                with contextlib.suppress(OSError):
                    self._tensorboard.close()

    def _drain(self) -> None:
        buffer, plan = self._buffer, self._plan
        if buffer is None or plan is None:
            return
        if keras.backend.backend() == "jax" and self._model_ref is not None:
            # Mid-epoch, Keras keeps the state off the model's variables (purged to
            # None): attach it, and copy the buffer out at once (its arrays are donated
            # to the next step).
            model = self._model_ref()
            if model is not None:
                model.jax_state_sync()
            if buffer.count._value is None:
                # Purged, with no state to attach: the first step failed while tracing.
                return
        self._since_drain = 0
        out = buffer.drain()
        if out.lost:
            warnings.warn(
                f"GradWatch lost {out.lost} recorded steps that were overwritten in the "
                "ring buffer before they were copied out.",
                stacklevel=2,
            )
        k = len(out.steps)
        if k == 0:
            return
        values = np.concatenate(out.values, axis=1) if out.values else np.zeros((k, 0), np.float32)
        self._store.append(
            out.steps,
            np.full(k, self._epoch, np.int64),
            out.steps - self._epoch_start,
            plan.stat_codes,
            out.stats,
            plan.value_codes,
            values,
            hist=out.hist,
            replica_stats=out.replica_stats,
        )
        keys = [plan.keys[i] for i in plan.stat_index]
        self._store.add_skipped(out.steps[out.skipped])
        if self.tensorboard_dir is not None:
            self._write_tensorboard(out, keys)
        if "nonfinite" in self.stats:  # every recorded step with NaN/Inf is an alert
            # ...but one that a loss-scale optimizer skipped never reached the weights.
            first, found = self._stat_alerts(
                out, keys, "nonfinite", lambda v: v > 0, "nonfinite", acted=~out.skipped
            )
            if found and self.on_nonfinite == "warn" and self._nonfinite_from_stats:
                counts = {k: int(v) for k, v in found.items()}
                self._act("warn", _nonfinite_message(first, counts))
        if self._thresholds and "norm" in self.stats:
            beyond = np.vectorize(self._beyond, otypes=[bool])
            first, found = self._stat_alerts(out, keys, "norm", beyond, self._kind)
            if found and self.on_threshold == "warn" and self._threshold_from_stats:
                self._act("warn", self._threshold_message(first, found))
        self._pending += k
        if self.path is not None and self._writes and self._pending >= self.flush_every:
            self._flush()

    def _write_tensorboard(self, out, keys) -> None:
        """Writes the drained block as TensorBoard summaries, at its step numbers."""
        if self._tensorboard_failed:
            return
        if self._tensorboard is None:
            from gradwatch.tensorboard import TensorBoardWriter

            self._tensorboard = TensorBoardWriter(self.tensorboard_dir)
        norms = out.stats[:, :, self.stats.index("norm")] if "norm" in self.stats else None
        try:
            self._tensorboard.write(out.steps, keys, norms, out.hist, self.histogram or None)
        except OSError as e:
            # As with `path`: training goes on, and the log keeps every step.
            self._tensorboard_failed = True
            warnings.warn(
                f"GradWatch could not write TensorBoard summaries to '{self.tensorboard_dir}' "
                f"({e}); it stops writing them, and `watch.log` keeps every step.",
                stacklevel=2,
            )

    def _stat_alerts(
        self, out, keys, stat, tripped, kind, acted=None
    ) -> tuple[int, dict[str, float]]:
        """Adds an alert for each drained (step, variable) whose `stat` trips; returns the
        first such step among the `acted` ones (a bool per step; default all) and its values
        by variable (empty when none tripped)."""
        values = out.stats[:, :, self.stats.index(stat)]
        step_i, var_i = np.nonzero(tripped(values))
        rows = [
            (int(out.steps[a]), keys[b], kind(v) if callable(kind) else kind, v)
            for a, b in zip(step_i, var_i, strict=True)
            for v in [float(values[a, b])]
        ]
        self._store.add_alerts(rows)
        if acted is not None:
            rows = [r for r, a in zip(rows, step_i, strict=True) if acted[a]]
        if not rows:
            return -1, {}
        first = rows[0][0]
        return first, {r[1]: r[3] for r in rows if r[0] == first}

    def _prepare_path(self) -> None:
        path = self.path
        self._worker, chief = _worker_of(self.model)
        # Every worker records the same global gradients; one copy on disk is enough.
        self._writes = chief or self.all_workers
        if not self._writes:
            return
        if path.exists() and not path.is_dir():
            raise ValueError(
                f"`path` must be a directory for the streamed log, but '{path}' is a file. "
                "Choose a directory path."
            )
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"Cannot create the log directory '{path}': {e.strerror or e}.") from e
        meta = io.streamed_metadata(path, self._worker)
        if meta is not None and (
            meta["stats"] != list(self.stats)
            or meta.get("bins_per_decade") != (self.histogram or None)
            or bool(meta.get("per_replica", False)) != self.per_replica
        ):
            raise ValueError(
                f"'{path}' already holds a gradwatch log with stats={meta['stats']}, "
                f"histogram bins per decade {meta.get('bins_per_decade')} and "
                f"per_replica={bool(meta.get('per_replica', False))}, which this GradWatch "
                f"(stats={list(self.stats)}, histogram={self.histogram or None}, "
                f"per_replica={self.per_replica}) cannot continue. "
                "Use another `path`, or the same settings to append to it."
            )
        if self._run is None:  # one run per GradWatch, across its fits
            self._run = io.new_run_id()
        target = io.run_directory(path, self._worker, self._run)
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"Cannot create the log directory '{target}': {e.strerror or e}.") from e

    def _flush(self) -> None:
        """Writes the steps held in memory as the next part under `path`, then forgets them."""
        if self.path is None or self._write_failed or not self._writes or not len(self._log):
            return
        try:
            io.append_part(self._log, io.run_directory(self.path, self._worker, self._run))
        except OSError as e:
            # Training goes on; the in-memory log keeps every step from here on.
            self._write_failed = True
            warnings.warn(
                f"GradWatch could not write to '{self.path}' ({e}); it keeps recording in "
                "memory only, and `watch.log` holds every step not written before.",
                stacklevel=2,
            )
            return
        self._store.clear_blocks()
        self._pending = 0

    # ----------------------------------------------------- inside the step
    def capture_step(
        self,
        model: Any,
        step: Any,
        records: Records,
        skipped: Any,
        local: Records | None = None,
    ) -> None:
        """Adds this watch's capture to the step being traced.

        `records` hold the global gradients, `local` (under `tf.distribute`) what
        this replica handed the optimizer; without a strategy they are the same.
        `skipped` is a bool tensor (a loss-scale optimizer skipped the update) or None.
        """
        with traced_for_xla(model.jit_compile):
            self._capture_traced(model, step, records, skipped, local)

    def _capture_traced(self, model, step, records, skipped, local) -> None:
        local = records if local is None else local
        plan = self._plan_for(model)
        buffer = self._buffer_for(model, plan)
        known = set(plan.signature)
        for record in records.values():
            var = record.variable
            if id(var) not in known:
                raise ValueError(
                    f"`record_gradients` got the variable {var.path!r}, which is not among "
                    f"the trainable weights of {type(model).__name__}. Record only the "
                    "model's own trainable variables."
                )
        entries = [records.get(id(v)) for v in plan.variables]
        stat_vars = [plan.variables[i] for i in plan.stat_index]
        # Known while tracing: variables whose gradient is None are disconnected.
        # (A step that recorded nothing at all has warned about that instead.)
        disconnected = [
            plan.keys[i]
            for i in dict.fromkeys(plan.stat_index + plan.value_index)
            if records and (entries[i] is None or entries[i].grad is None)
        ]
        new = self._store.add_disconnected(disconnected)
        if new:
            warnings.warn(
                f"GradWatch: {new} have no gradient (they are not connected to the loss); "
                "their stats are recorded as NaN. See `log.disconnected`.",
                stacklevel=2,
            )

        def gradient(i):
            entry = entries[i]
            if entry is None or entry.grad is None:
                return None
            return unscaled_float32(entry.grad, entry.scale)

        flat_cache: list[Any] = []

        def flat_gradients():
            # The selected gradients as one vector; a missing one is NaN.
            graph = keras.backend.backend() == "tensorflow"
            # Once per step on PyTorch; on TensorFlow and JAX each branch (tf.cond,
            # lax.cond) builds its own, as a value traced in one cannot leave it.
            cached = keras.backend.backend() == "torch"
            if flat_cache and cached:
                return flat_cache[0]
            parts = []
            for i, var in zip(plan.stat_index, stat_vars, strict=True):
                g = gradient(i)
                if g is None and graph:
                    g = tf.fill(var.shape, tf.constant(math.nan, tf.float32))
                elif g is None:
                    g = ops.full(var.shape, math.nan, "float32")
                parts.append(tf.reshape(dense(g), (-1,)) if graph else ops.reshape(g, (-1,)))
            if graph:
                return tf.concat(parts, axis=0)
            flat = ops.concatenate(parts, axis=0)
            if cached:
                flat_cache.append(flat)
            return flat

        # Collectives stay out of the branch below: under tf.distribute a cross-replica
        # call inside a conditional branch fails to trace.
        distributed = local is not records
        clipped = (
            _clipped_norms_distributed(plan, local)
            if distributed and "clipped_norm" in self.stats
            else None
        )
        replica_stats = self._replica_stats(plan, local) if self.per_replica else None

        def record():
            grads = {i: gradient(i) for i in dict.fromkeys(plan.stat_index + plan.value_index)}
            stat_grads = [grads[i] for i in plan.stat_index]
            n_stats = len(self.stats)
            graph = keras.backend.backend() == "tensorflow"
            if plan.stat_index and not graph and set(self.stats) <= set(GRADIENT_STATS):
                # Eager backends: the table as computed, without slicing and restacking.
                stats = compute_stats(stat_grads, self.stats)
            elif plan.stat_index:
                cols = self._stat_columns(
                    plan, entries, stat_grads, step, buffer, flat_gradients, records, clipped
                )
                stack = tf.stack if graph else ops.stack
                stats = stack([cols[name] for name in self.stats], axis=1)
            else:
                stats = tf.zeros((0, n_stats), tf.float32) if graph else ops.zeros((0, n_stats))
            values = [
                dense(grads[i])
                if grads[i] is not None
                else (
                    tf.fill(plan.variables[i].shape, tf.constant(math.nan, tf.float32))
                    if graph
                    else ops.full(plan.variables[i].shape, math.nan, "float32")
                )
                for i in plan.value_index
            ]
            hist = compute_histograms(stat_grads, self.histogram) if self.histogram else None
            buffer.write(step, stats, values, hist, skipped, replica_stats)

        def keep_previous():
            if keras.backend.backend() != "tensorflow":
                # Through the variables' `assign`: in place on PyTorch, and into the
                # step's StatelessScope on JAX (the buffer travels in the metrics state).
                buffer.prev.assign(flat_gradients())
                buffer.prev_step.assign(ops.cast(step, buffer.prev_step.dtype))
                return
            buffer.prev.value.assign(flat_gradients())
            buffer.prev_step.value.assign(step)

        if self.every == 1:
            record()
        else:
            _backend.when(step % self.every == 0, record, buffer.variables)
        if buffer.prev is not None:
            # cos_prev at step s needs step s - 1: keep it only where s is recorded.
            if self.every == 1:
                keep_previous()
            else:
                _backend.when((step + 1) % self.every == 0, keep_previous, buffer.variables)

    def _replica_stats(self, plan: _Plan, local: Records) -> Any:
        """The stats of each replica's local gradient, gathered from all replicas:
        `(n_replicas, n_variables, n_stats)` in replica order, NaN for the stats that
        are not functions of the gradient alone. Every replica gets the same tensor."""
        grads = []
        for i in plan.stat_index:
            entry = local.get(id(plan.variables[i]))
            if entry is None or entry.grad is None:
                grads.append(None)
                continue
            grads.append(unscaled_float32(entry.grad, entry.scale))
        names = [s for s in self.stats if s in GRADIENT_STATS]
        n = len(plan.stat_index)
        table = compute_stats(grads, names) if names and n else tf.zeros((n, 0), tf.float32)
        nan = tf.fill((n,), tf.constant(math.nan, tf.float32))
        cols = [table[:, names.index(s)] if s in names else nan for s in self.stats]
        mine = tf.stack(cols, axis=1)[None] if cols else tf.zeros((1, n, 0), tf.float32)
        context = tf.distribute.get_replica_context()
        if context is None or context.num_replicas_in_sync == 1:
            return mine
        return context.all_gather(mine, axis=0)

    def _stat_columns(
        self, plan, entries, stat_grads, step, buffer, flat_gradients, records, clipped=None
    ):
        """The stats of the selected variables, one float32 column per stat name."""
        cols = {}
        if "clipped_norm" in self.stats:
            cols["clipped_norm"] = _clipped_norms(plan, records) if clipped is None else clipped
        grad_stats = [s for s in self.stats if s in GRADIENT_STATS]
        if grad_stats:
            table = compute_stats(stat_grads, grad_stats)
            cols.update({name: table[:, j] for j, name in enumerate(grad_stats)})
        if self.needs_weights:
            before = [None if entries[i] is None else entries[i].before for i in plan.stat_index]
            # Read after `apply_gradients`: this runs after the stock step returns.
            read = (
                tf.convert_to_tensor
                if keras.backend.backend() == "tensorflow"
                else lambda v: ops.convert_to_tensor(v.value)
            )
            delta = [
                None if b is None else read(plan.variables[i]) - b
                for i, b in zip(plan.stat_index, before, strict=True)
            ]
            weight = compute_stats(before, ["norm"])[:, 0]
            update = compute_stats(delta, ["norm"])[:, 0]
            cols.update(weight_norm=weight, update_norm=update, update_ratio=update / weight)
        if "cos_prev" in self.stats and keras.backend.backend() != "tensorflow":
            cols["cos_prev"] = _cosines_with_previous(plan, buffer, flat_gradients(), step)
        elif "cos_prev" in self.stats:
            # Per-variable reductions: segment ops over the flat vector are far slower on CPU.
            sizes = [int(np.prod(plan.variables[i].shape)) for i in plan.stat_index]
            gs = tf.split(flat_gradients(), sizes)
            ps = tf.split(buffer.prev.value.read_value(), sizes)
            dot = tf.stack([tf.reduce_sum(g * p) for g, p in zip(gs, ps, strict=True)])
            gg = tf.stack([sum_of_squares(g) for g in gs])
            pp = tf.stack([sum_of_squares(p) for p in ps])
            cos = dot / (tf.sqrt(gg) * tf.sqrt(pp))
            follows = tf.equal(buffer.prev_step.value, step - 1)
            cols["cos_prev"] = tf.where(follows, cos, tf.constant(math.nan, tf.float32))
        return cols

    # Keras may run `on_train_batch_end` on a worker thread; it only reads one small
    # counter there and sets flags, so training stays asynchronous.
    # On JAX it reads the alarm from the model's state, which must happen on the main thread.
    async_safe = keras.backend.backend() != "jax"

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._poll_alarm()

    def _poll_alarm(self) -> None:
        """Reads the check counters (one small read). May run on Keras' worker thread, so
        it only notes what tripped and sets `stop_training`; `_handle_alarms` does the rest."""
        alarm = self._alarm
        if alarm is None:
            return
        if keras.backend.backend() == "jax":
            self.model.jax_state_sync()  # mid-epoch, the state is off the variables
        tripped = alarm.tripped.numpy()
        for kind, n, policy in (
            ("nonfinite", tripped[0], self.on_nonfinite),
            ("threshold", tripped[1], self.on_threshold),
        ):
            if n and not self._alarm_seen[kind]:
                self._alarm_seen[kind] = int(n)
                self._alarm_pending.append(kind)
                if policy in ("stop", "raise"):
                    self.model.stop_training = True

    def _handle_alarms(self) -> None:
        """On the main thread: records the alerts noted by `_poll_alarm` and acts on them."""
        alarm, plan = self._alarm, self._plan
        if alarm is None or plan is None:
            return
        keys = [plan.keys[i] for i in plan.stat_index]
        while self._alarm_pending:
            kind = self._alarm_pending.pop(0)
            if kind == "nonfinite":
                step = int(alarm.nonfinite_step.numpy())
                sq = alarm.nonfinite_sq.numpy()
                bad = [k for k, v in zip(keys, sq, strict=True) if not np.isfinite(v)]
                counts = self._nonfinite_counts(step, bad)
                self._store.add_alerts([(step, k, "nonfinite", counts.get(k, np.nan)) for k in bad])
                self._act(self.on_nonfinite, _nonfinite_message(step, counts or bad))
            else:
                step = int(alarm.threshold_step.numpy())
                norms = np.sqrt(alarm.threshold_sq.numpy().astype(np.float64))
                out = {k: float(v) for k, v in zip(keys, norms, strict=True) if self._beyond(v)}
                self._store.add_alerts([(step, k, self._kind(v), v) for k, v in out.items()])
                self._act(self.on_threshold, self._threshold_message(step, out))

    def _threshold_message(self, step: int, norms: dict) -> str:
        return (
            f"Gradient norms beyond max_norm={self.max_norm}/min_norm={self.min_norm} "
            f"at step {step}: {norms}."
        )

    def _nonfinite_counts(self, step: int, keys: list[str]) -> dict[str, int]:
        """The NaN/Inf counts of a step, from the recorded `nonfinite` stat where there is one."""
        if "nonfinite" not in self.stats:
            return {}
        self._drain()  # the step may still sit in the device buffer
        try:
            row = self._log.stat("nonfinite").loc[step]
        except KeyError:
            return {}
        return {k: int(row[k]) for k in keys if k in row.index and np.isfinite(row[k])}

    def _beyond(self, norm: float) -> bool:
        return (self.max_norm is not None and norm > self.max_norm) or (
            self.min_norm is not None and norm < self.min_norm
        )

    def _kind(self, norm: float) -> str:
        return "max_norm" if self.max_norm is not None and norm > self.max_norm else "min_norm"

    def _act(self, policy: str, message: str) -> None:
        if policy == "warn":
            kind = message.split(" ", 1)[0]  # one warning per kind of alert
            if kind not in self._warned:
                self._warned.add(kind)
                warnings.warn("GradWatch: " + message, stacklevel=2)
        elif policy == "raise":
            self._error = FloatingPointError("GradWatch: " + message)

    def _raise_if_alarmed(self) -> None:
        """On the main thread: write the log out, then raise a pending alarm."""
        error, self._error = self._error, None
        if error is not None:
            self._drain()
            self._flush()
            raise error

    def check_step(self, model: Any, step: Any, records: Records, skipped: Any) -> None:
        """Adds the every-step checks (non-finite, thresholds) to the step being traced.

        Non-finite gradients that a loss-scale optimizer skipped (`skipped`) never
        reached the weights, so they do not trip `on_nonfinite`.
        """
        with traced_for_xla(model.jit_compile):
            self._check_traced(model, step, records, skipped)

    def _check_traced(self, model, step, records, skipped) -> None:
        if not self.checks_every_step:
            return
        if keras.backend.backend() == "jax":
            self._check_stateless(model, step, records, skipped)
            return
        if keras.backend.backend() != "tensorflow":
            self._check_eager(model, step, records, skipped)
            return
        plan = self._plan_for(model)
        if self._alarm is None:
            with tf.init_scope():
                self._alarm = _Alarm(len(plan.stat_index))
        alarm = self._alarm
        rows, grads = _checked_gradients(plan, records)
        if not grads:
            return
        n = len(plan.stat_index)
        index = tf.constant([[j] for j in rows], tf.int32)
        # The same L2Loss ops as the stats kernel's, so that grappler computes them once.
        sq = tf.scatter_nd(index, tf.stack([sum_of_squares(g) for g in grads]), [n])

        def note_first(tripped, step_var, sq_var):
            # Branchless: a branch taking every gradient costs more than these small ops.
            first = tripped & (step_var.read_value() < 0)
            step_var.assign(tf.where(first, step, step_var.read_value()))
            sq_var.assign(tf.where(first, sq, sq_var.read_value()))

        bad = over = tf.constant(False)
        if self.on_nonfinite != "ignore":
            bad = tf.reduce_any(tf.logical_not(tf.math.is_finite(sq)))
            if skipped is not None:
                bad = bad & tf.logical_not(skipped)
            note_first(bad, alarm.nonfinite_step, alarm.nonfinite_sq)
        if self._thresholds and self.on_threshold != "ignore":
            norm = tf.sqrt(sq)
            out = tf.zeros_like(norm, tf.bool)
            if self.max_norm is not None:
                out = out | (norm > self.max_norm)
            if self.min_norm is not None:
                out = out | (norm < self.min_norm)
            over = tf.reduce_any(out)
            note_first(over, alarm.threshold_step, alarm.threshold_sq)
        alarm.tripped.assign_add(tf.cast(tf.stack([bad, over]), tf.int64))

    def _check_stateless(self, model, step, records, skipped) -> None:
        """`_check_traced` on JAX, in `keras.ops`, writing the alarm metric's variables
        (created at the start of training) within the step's `StatelessScope`."""
        plan = self._plan_for(model)
        alarm = self._alarm
        n = len(plan.stat_index)
        rows, grads = _checked_gradients(plan, records)
        if not grads:
            return
        sums = [sum_of_squares(g) for g in grads]
        sq = ops.stack([sums[rows.index(j)] if j in rows else 0.0 for j in range(n)])

        def note_first(tripped, step_var, sq_var):
            first = ops.logical_and(tripped, step_var.value < 0)
            step_var.assign(ops.where(first, ops.cast(step, step_var.dtype), step_var.value))
            sq_var.assign(ops.where(first, sq, sq_var.value))

        bad = over = ops.convert_to_tensor(False)
        if self.on_nonfinite != "ignore":
            bad = ops.any(ops.logical_not(ops.isfinite(sq)))
            if skipped is not None:
                bad = ops.logical_and(bad, ops.logical_not(skipped))
            note_first(bad, alarm.nonfinite_step, alarm.nonfinite_sq)
        if self._thresholds and self.on_threshold != "ignore":
            norm = ops.sqrt(sq)
            out = ops.zeros_like(norm, "bool")
            if self.max_norm is not None:
                out = ops.logical_or(out, norm > self.max_norm)
            if self.min_norm is not None:
                out = ops.logical_or(out, norm < self.min_norm)
            over = ops.any(out)
            note_first(over, alarm.threshold_step, alarm.threshold_sq)
        alarm.tripped.assign(alarm.tripped.value + ops.cast(ops.stack([bad, over]), "int32"))

    def _check_eager(self, model, step, records, skipped) -> None:
        """`_check_traced` on an eagerly run backend (PyTorch): the same checks, on the
        host, from one small copy of the per-variable sums of squares."""
        plan = self._plan_for(model)
        n = len(plan.stat_index)
        if self._alarm is None:
            self._alarm = _HostAlarm(n)
        alarm = self._alarm
        rows, grads = _checked_gradients(plan, records)
        if not grads:
            return
        import torch

        # One small copy to the host: the norms, in raw torch ops (one pass each).
        sq = np.zeros(n, np.float32)
        norms = _backend.host_copy(
            torch.stack([torch.linalg.vector_norm(g.float()) for g in grads])
        )
        sq[rows] = np.square(norms.astype(np.float64))
        bad = over = False
        if self.on_nonfinite != "ignore":
            bad = not np.all(np.isfinite(sq)) and not skipped
            alarm.note_first(bad, "nonfinite", step, sq)
        if self._thresholds and self.on_threshold != "ignore":
            with np.errstate(invalid="ignore"):
                norm = np.sqrt(sq)
                out = np.zeros(n, bool)
                if self.max_norm is not None:
                    out |= norm > self.max_norm
                if self.min_norm is not None:
                    out |= norm < self.min_norm
            over = bool(out.any())
            alarm.note_first(over, "threshold", step, sq)
        alarm.tripped.value += np.array([bad, over], np.int64)

    def _plan_for(self, model: Any) -> _Plan:
        variables = list(model.trainable_weights)
        signature = tuple(id(v) for v in variables)
        if self._plan is not None and self._plan.signature == signature:
            return self._plan
        keys = variable_keys([v.path for v in variables])
        stat_keys = set(match_patterns(self.variables, keys, "variables"))
        value_keys = (
            set(match_patterns(self.values, keys, "values")) if self.values is not None else set()
        )
        floats = [_is_float(v) for v in variables]
        skipped = [k for k, f in zip(keys, floats, strict=True) if not f]
        if skipped:
            warnings.warn(
                f"GradWatch skips the trainable variables {skipped}: they are not floating "
                "point, so they have no gradient to record.",
                stacklevel=2,
            )
        stat_index = [i for i, k in enumerate(keys) if k in stat_keys and floats[i]]
        value_index = [i for i, k in enumerate(keys) if k in value_keys and floats[i]]
        too_big = {
            keys[i]: int(np.prod(variables[i].shape))
            for i in value_index
            if np.prod(variables[i].shape) > self.max_value_elements
        }
        if too_big:
            raise ValueError(
                f"`values` would keep the full gradient of {too_big} (elements), above "
                f"max_value_elements={self.max_value_elements} per variable. Each kept "
                "tensor costs its size in memory at every recorded step. Narrow `values`, "
                "or raise the limit with GradWatch(max_value_elements=...)."
            )
        used = sorted(set(stat_index) | set(value_index))
        codes = dict(
            zip(
                used,
                self._store.add_variables(
                    [keys[i] for i in used], [tuple(variables[i].shape) for i in used]
                ),
                strict=True,
            )
        )
        self._plan = _Plan(
            signature=signature,
            variables=variables,
            keys=keys,
            stat_index=stat_index,
            value_index=value_index,
            stat_codes=np.asarray([codes[i] for i in stat_index], np.int32),
            value_codes=np.asarray([codes[i] for i in value_index], np.int32),
        )
        self._buffer = None  # a new plan needs a buffer of its own shape
        return self._plan

    def _buffer_for(self, model: Any, plan: _Plan) -> GradientBuffer:
        if self._buffer is None:
            sizes = [int(np.prod(plan.variables[i].shape)) for i in plan.value_index]
            slot_bytes = 8 + 4 * (len(plan.stat_index) * len(self.stats) + sum(sizes))
            spe = int(model.steps_per_execution)
            n_bins = histogram_bin_count(self.histogram) if self.histogram else 0
            slot_bytes = slot_bytes + 4 * len(plan.stat_index) * n_bins
            if self.per_replica:
                slot_bytes += 4 * _num_replicas(model) * len(plan.stat_index) * len(self.stats)
            capacity = max(2 * spe, min(_SLOTS, _BUFFER_BYTES // slot_bytes))
            prev_size = 0
            if "cos_prev" in self.stats:
                prev_size = sum(int(np.prod(plan.variables[i].shape)) for i in plan.stat_index)
            lift = (
                tf.init_scope if keras.backend.backend() == "tensorflow" else contextlib.nullcontext
            )
            with lift():
                self._buffer = GradientBuffer(
                    len(plan.stat_index),
                    len(self.stats),
                    sizes,
                    capacity,
                    n_bins=n_bins,
                    prev_size=prev_size,
                    n_replicas=_num_replicas(model) if self.per_replica else 0,
                )
        return self._buffer


def _clipping(records: Records, view: Any) -> tuple[dict, dict, Any]:
    """Keras' clipping, written out over gradwatch's own reductions rather than by
    calling the optimizer's: sharing its ops lets grappler rewrite the training
    computation, and training must stay bitwise the same.

    Returns each recorded gradient (unscaled, float32, through `view`), its sum of
    squares, and `rule(key) -> (factor, clipvalue)`: the clipped gradient is
    `factor * g` or `clip(g, -clipvalue, clipvalue)` (both None: not clipped).
    """
    grads, sq, optimizers = {}, {}, {}
    for record in records.values():
        if record.grad is None:
            continue
        key, optimizer = id(record.variable), record.optimizer
        grads[key] = view(unscaled_float32(record.grad, record.scale))
        sq[key] = sum_of_squares(grads[key])
        # A LossScaleOptimizer unscales, then its inner optimizer clips.
        optimizers[key] = getattr(optimizer, "inner_optimizer", optimizer)
    # Each optimizer's global norm, over every gradient it applies.
    total: dict[int, Any] = {}
    for key, opt in optimizers.items():
        total[id(opt)] = total.get(id(opt), 0.0) + sq[key]

    # tf's own ops on TensorFlow (the graph the TensorFlow tests pin), keras.ops elsewhere.
    xp = tf if keras.backend.backend() == "tensorflow" else ops

    def rule(key: int) -> tuple[Any, Any]:
        opt = optimizers[key]
        clipnorm = getattr(opt, "clipnorm", None)
        global_clipnorm = getattr(opt, "global_clipnorm", None)
        clipvalue = getattr(opt, "clipvalue", None)
        if clipnorm and clipnorm > 0:  # g * c / max(|g|, c)
            return clipnorm / xp.maximum(xp.sqrt(sq[key]), clipnorm), None
        if global_clipnorm and global_clipnorm > 0:  # all g * c * min(1/|G|, 1/c)
            gn = xp.sqrt(total[id(opt)])
            return global_clipnorm * xp.minimum(1.0 / gn, 1.0 / global_clipnorm) + (gn - gn), None
        if clipvalue and clipvalue > 0:
            return None, clipvalue
        return None, None

    return grads, sq, rule


def _clipped_norms(plan: _Plan, records: Records) -> Any:
    """The norms of the selected gradients after the clipping of the optimizer applying them."""
    grads, sq, rule = _clipping(records, elements)
    graph = keras.backend.backend() == "tensorflow"
    nan = tf.constant(math.nan, tf.float32) if graph else ops.convert_to_tensor(math.nan, "float32")
    clip = tf.clip_by_value if graph else ops.clip
    sqrt = tf.sqrt if graph else ops.sqrt
    out = []
    for i in plan.stat_index:
        key = id(plan.variables[i])
        if key not in grads:
            out.append(nan)
            continue
        factor, clipvalue = rule(key)
        if clipvalue is not None:
            clipped = clip(grads[key], -clipvalue, clipvalue)
            out.append(sqrt(sum_of_squares(clipped)))
        else:
            norm = sqrt(sq[key])
            out.append(norm if factor is None else norm * factor)
    return tf.stack(out) if graph else ops.stack(out)


def _clipped_norms_distributed(plan: _Plan, local: Records) -> Any:
    """`_clipped_norms` under tf.distribute, where each replica's optimizer clips its
    local gradient and then sums the clipped gradients over the replicas.

    The norm of that sum needs the clipped tensors, so they are built here and
    all-reduced (outside any branch). Dense: replicas touch different rows.
    """
    grads, _, rule = _clipping(local, dense)
    keys = [id(plan.variables[i]) for i in plan.stat_index if id(plan.variables[i]) in grads]
    nan = tf.constant(math.nan, tf.float32)
    if not keys:
        return tf.fill((len(plan.stat_index),), nan)
    clipped = []
    for key in keys:
        factor, clipvalue = rule(key)
        g = grads[key]
        if clipvalue is not None:
            g = tf.clip_by_value(g, -clipvalue, clipvalue)
        elif factor is not None:
            g = g * factor
        clipped.append(g)
    context = tf.distribute.get_replica_context()
    summed = context.all_reduce(tf.distribute.ReduceOp.SUM, clipped)
    norms = dict(zip(keys, (tf.sqrt(sum_of_squares(c)) for c in summed), strict=True))
    return tf.stack([norms.get(id(plan.variables[i]), nan) for i in plan.stat_index])


def _checked_gradients(plan: _Plan, records: Records) -> tuple[list[int], list[Any]]:
    """The every-step checks' inputs: the rows (among the selected variables) that have a
    gradient this step, and those gradients' elements, unscaled, in float32."""
    rows, grads = [], []
    for j, i in enumerate(plan.stat_index):
        entry = records.get(id(plan.variables[i]))
        if entry is not None and entry.grad is not None:
            rows.append(j)
            grads.append(elements(unscaled_float32(entry.grad, entry.scale)))
    return rows, grads


def _cosines_with_previous(plan: _Plan, buffer: GradientBuffer, flat: Any, step: Any) -> Any:
    """`cos_prev` in `keras.ops` (PyTorch, JAX): the cosine of each selected gradient
    with the one kept in the buffer, NaN unless that one is from step `step - 1`."""
    prev = buffer.prev.value
    dots, gg, pp = [], [], []
    start = 0
    for i in plan.stat_index:
        size = int(np.prod(plan.variables[i].shape))
        g, p = flat[start : start + size], prev[start : start + size]
        start += size
        dots.append(ops.sum(g * p))
        gg.append(ops.sum(ops.square(g)))
        pp.append(ops.sum(ops.square(p)))
    cos = ops.stack(dots) / (ops.sqrt(ops.stack(gg)) * ops.sqrt(ops.stack(pp)))
    follows = ops.equal(buffer.prev_step.value, ops.cast(step, buffer.prev_step.dtype) - 1)
    return ops.where(follows, cos, math.nan)


def _check_model(model: Any) -> None:
    if not isinstance(model, GradWatchMixin):
        raise TypeError(
            "GradWatch records gradients inside the training step, so the model must "
            "mix in `gradwatch.GradWatchMixin`. Received: a model of type "
            f"{type(model).__module__}.{type(model).__qualname__}. Build it with "
            "`gradwatch.Sequential([...])` instead of `keras.Sequential([...])`, "
            "`gradwatch.Model(inputs, outputs)` instead of `keras.Model(inputs, outputs)`, "
            "or for a subclassed model put the mixin first: "
            f"`class {type(model).__name__}(gradwatch.GradWatchMixin, keras.Model): ...`"
        )
    if not getattr(type(model).train_step, "_gradwatch_counted", False):
        raise TypeError(
            f"The `train_step` of {type(model).__qualname__} comes from a class that is "
            "listed before `gradwatch.GradWatchMixin` in its bases, so gradwatch cannot "
            "see its gradients. Put the mixin first: "
            f"`class {type(model).__name__}(gradwatch.GradWatchMixin, keras.Model): ...`"
        )
    if keras.backend.backend() not in ("tensorflow", "torch", "jax"):
        raise NotImplementedError(
            "gradwatch records gradients with the TensorFlow, PyTorch and JAX backends of "
            f"Keras. Received: KERAS_BACKEND={keras.backend.backend()!r}. "
            "Set KERAS_BACKEND to one of them before importing keras."
        )


def _worker_of(model: Any) -> tuple[int, bool]:
    """This process's worker index in the cluster and whether it is the chief.

    Without a multi-worker strategy: worker 0, the chief. With one, the index of
    `TF_CONFIG`'s task among all tasks, a `chief` task first, then the `worker`
    tasks; without a `chief` task, worker 0 is the chief (as in Keras).
    """
    if keras.backend.backend() != "tensorflow":
        return 0, True
    strategy = model.distribute_strategy
    if not isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        return 0, True
    resolver = strategy.cluster_resolver
    task_type, task_id = resolver.task_type, resolver.task_id
    if task_type in (None, "chief"):
        return 0, True
    has_chief = "chief" in resolver.cluster_spec().as_dict()
    index = int(task_id or 0) + (1 if has_chief else 0)
    return index, index == 0


def _num_replicas(model: Any) -> int:
    if keras.backend.backend() != "tensorflow":
        return 1
    return int(model.distribute_strategy.num_replicas_in_sync)


def _sync_strategies() -> tuple[type, ...]:
    """Strategies whose replicas run the step in sync and sum their gradients; gradwatch
    records the global gradient under these."""
    return (tf.distribute.MirroredStrategy, tf.distribute.MultiWorkerMirroredStrategy)


def _check_strategy(model: Any) -> None:
    """Refuses, before any step runs, what gradwatch cannot record correctly under
    `tf.distribute`, and what Keras itself cannot train (it would fail mid-step;
    across workers, a failed worker can leave the others waiting)."""
    if keras.backend.backend() != "tensorflow":
        return  # no tf.distribute; `per_replica` is refused in `on_train_begin`
    strategy = model.distribute_strategy
    name = type(strategy).__name__
    if isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy):
        name = "MultiWorkerMirroredStrategy"  # not its internal class's name
    if not isinstance(strategy, _sync_strategies()):
        if isinstance(strategy, tf.distribute.OneDeviceStrategy) or (
            strategy is tf.distribute.get_strategy() and not tf.distribute.has_strategy()
        ):
            return  # one replica: its gradient is the global one
        raise NotImplementedError(
            "gradwatch records the global gradient under MirroredStrategy and "
            "MultiWorkerMirroredStrategy (and without a strategy, or with "
            f"OneDeviceStrategy). Received: a model built under {name}. Train it "
            "without a GradWatch, or under one of those strategies."
        )
    spe = int(model.steps_per_execution)
    jit = bool(model.jit_compile)
    if spe > 1 or jit:
        raise ValueError(
            f"Keras {keras.version()} cannot train a model under {name} with "
            "`steps_per_execution > 1` or `jit_compile=True`: the compiled step fails "
            "inside Keras, with or without gradwatch. Received: "
            f"steps_per_execution={spe}, jit_compile={jit}. Compile the model with "
            "`steps_per_execution=1, jit_compile=False` to train it with a GradWatch."
        )


def _unsupported_on_eager(watch: Any) -> list[str]:
    """The settings of `watch` that gradwatch does not yet record on the PyTorch or JAX
    backend."""
    out = []
    if watch.per_replica:
        out.append("per_replica=True")
    return out


def _check_histogram(histogram: Any) -> int:
    if histogram is True:
        return DEFAULT_BINS_PER_DECADE
    if histogram is False or histogram is None:
        return 0
    if isinstance(histogram, (int, np.integer)) and not isinstance(histogram, bool):
        if 1 <= histogram <= 100:
            return int(histogram)
        raise ValueError(
            "`histogram` as a number is the bins per decade of |g|, from 1 to 100. "
            f"Received: histogram={histogram!r}"
        )
    raise TypeError(
        "`histogram` must be True, False, or a number of bins per decade such as 8. "
        f"Received: histogram={histogram!r}"
    )


def _is_float(variable: Any) -> bool:
    return "float" in str(getattr(variable, "dtype", "float32"))


def _check_tensorboard_dir(value: Any, stats: Sequence[str], histogram: int) -> Path | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)):
        raise TypeError(
            "`tensorboard_dir` must be a directory path (str or os.PathLike), or None. "
            f"Received: tensorboard_dir={value!r}"
        )
    if "norm" not in stats and not histogram:
        raise ValueError(
            "`tensorboard_dir` writes the `norm` stat and histograms, and this GradWatch "
            f"records neither (stats={list(stats)}, histogram=False). Add 'norm' to `stats` "
            f"or pass histogram=True. Received: tensorboard_dir={str(value)!r}"
        )
    return Path(value)


def _check_policy(value: Any, arg: str) -> str:
    if value not in _POLICIES:
        raise ValueError(f"`{arg}` must be one of {list(_POLICIES)}. Received: {arg}={value!r}")
    return value


def _nonfinite_message(step: int, found: dict | list) -> str:
    what = (
        f"{found} (NaN/Inf element counts)"
        if isinstance(found, dict)
        else f"{found} (record the `nonfinite` stat at that step for element counts)"
    )
    return f"Non-finite gradients at step {step}: {what}."
