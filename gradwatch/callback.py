"""The `GradWatch` callback: wires the capture into `model.fit` and the drained blocks
into a `GradientLog`. The work lives beside it: the argument checks (`_args`), the
plan (`_plan`), the step's capture (`_in_step`, `_derived`), draining (`_drain`),
the alarms (`_alarms`) and the sinks (`_sinks`)."""

from __future__ import annotations

import inspect
import os
import re
import warnings
import weakref
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from gradwatch import _args, _derived, _in_step, io
from gradwatch._adopt import adopt, guard_fit
from gradwatch._alarms import AlarmPolicy, Alarms
from gradwatch._backend import NAME as _BACKEND_NAME
from gradwatch._backend import current as _backend
from gradwatch._capture import align, anchor, first_step, next_step
from gradwatch._compute import traced_for_xla
from gradwatch._drain import drain, drain_due
from gradwatch._plan import Plan, make_buffer, make_plan, signature_of
from gradwatch._signals import deferred_interrupt
from gradwatch._sinks import ParquetSink, TensorBoardSink
from gradwatch._step import Records, restore_class, update_counts
from gradwatch.buffer import GradientBuffer
from gradwatch.findings import fit_summary
from gradwatch.keys import check_patterns
from gradwatch.log import GradientLog, store_of
from gradwatch.mixin import (
    gate_next_step,
    model_state,
    resync_gate,
    setup_gate,
    step_counter,
)
from gradwatch.stats import DEFAULT_STATS, UPDATE_STATS, check_stats


class GradWatch(keras.callbacks.Callback):
    """Records the gradients of every training step of `model.fit`, by variable.

    Works on any Keras 3 model (`keras.Sequential`, a functional or subclassed
    `keras.Model`, one from `keras.applications` or `load_model`), and on models
    that mix in `gradwatch.GradWatchMixin`. It records the gradients the
    optimizer applies, also from a custom `train_step` that hands them to
    `optimizer.apply` or `apply_gradients`. The stats are computed inside
    the compiled step, written to a ring buffer on the device, and drained into
    `self.log` (a `GradientLog`) in blocks, so every selected step is recorded,
    also with `steps_per_execution > 1` and `jit_compile=True`.

    Args:
        variables: Which variables get stats: a glob, an `re.Pattern`, or a
            list of them, matched against variable keys (`net/hidden/kernel`:
            the model's name, the layer names down to the variable and its
            name), or any suffix of one on `/` boundaries. Defaults to `"*"` (all).
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
            variables, with counts), `"stop"` (set `model.stop_training` and
            print why, naming the step and the variables, as Keras'
            `TerminateOnNaN` does; the log is kept) or `"raise"` (a
            `FloatingPointError`, after the log is written out). Checked at
            every step, also with `every > 1`. Defaults to `"warn"`.
        max_norm: Alert when a watched variable's gradient norm exceeds this.
            A non-finite gradient is never a threshold alert (`on_nonfinite`
            reports it). Defaults to `None` (no check).
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
        verbose: At the end of `fit`, print the errors and warnings that
            `log.diagnose()` finds, one line each (nothing when there are
            none): `1` prints, `0` is silent, and `"auto"` prints unless
            `fit(verbose=0)` asked Keras for silence. Defaults to `"auto"`.

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
        on_nonfinite: AlarmPolicy = "warn",
        max_norm: float | None = None,
        min_norm: float | None = None,
        on_threshold: AlarmPolicy = "warn",
        tensorboard_dir: str | os.PathLike | None = None,
        per_replica: bool = False,
        all_workers: bool = False,
        verbose: int | str = "auto",
    ):
        # The arguments as given, for the repr (read back by name from the signature).
        arguments = locals()
        super().__init__()
        # A plain model is adopted inside Keras' `fit`, which calls no callback when it
        # raises: `fit` itself must release it (see `gradwatch._adopt`).
        guard_fit()
        self._arguments = {n: arguments[n] for n in _PARAMETERS if n in arguments}
        self.verbose = _args.check_verbose(verbose)
        self.per_replica = _args.check_flag(per_replica, "per_replica")
        self.all_workers = _args.check_flag(all_workers, "all_workers")
        self.variables = check_patterns(variables, "variables")
        self.stats = check_stats(stats)
        self.values = None if values is None else check_patterns(values, "values")
        self.every = _args.check_count(every, "every")
        self.histogram = _args.check_histogram(histogram)
        self._log = GradientLog(
            self.stats, bins_per_decade=self.histogram or None, per_replica=self.per_replica
        )
        self._store = store_of(self._log)  # what the drained blocks are written to
        self.path = _args.check_path(path)
        self.flush_every = _args.check_count(flush_every, "flush_every")
        self.max_value_elements = _args.check_count(max_value_elements, "max_value_elements")
        self.on_nonfinite = _args.check_policy(on_nonfinite, "on_nonfinite")
        self.on_threshold = _args.check_policy(on_threshold, "on_threshold")
        self.max_norm = _args.check_threshold(max_norm, "max_norm")
        self.min_norm = _args.check_threshold(min_norm, "min_norm")
        self.tensorboard_dir = _args.check_tensorboard_dir(
            tensorboard_dir, self.stats, self.histogram
        )
        self._alarms = Alarms(
            self.on_nonfinite,
            self.on_threshold,
            self.max_norm,
            self.min_norm,
            self.every,
            self.stats,
        )
        self.checks_every_step = self._alarms.checks_every_step
        self.needs_weights = any(s in UPDATE_STATS for s in self.stats)
        self._parquet = (
            None
            if self.path is None
            else ParquetSink(self.path, self.flush_every, self.all_workers, self._log, self._store)
        )
        self._tensorboard_sink = (
            None
            if self.tensorboard_dir is None
            else TensorBoardSink(self.tensorboard_dir, self.stats, self.histogram or None)
        )
        self._read_cache: tuple[int, GradientLog] | None = None
        self._model_ref: weakref.ref | None = None
        self._plan: Plan | None = None
        # An argument that the model's variables refuse (a `variables` pattern matching
        # none), found inside the traced step: raised on the host, after the step.
        self._plan_error: ValueError | None = None
        self._buffer: GradientBuffer | None = None
        # id(variable) -> its updates in one step, where a step updates it more than once.
        self._update_counts: dict[int, int] = {}
        self._epoch = 0
        self._epoch_start = 0
        self._since_drain = 0
        self._aligned = True  # until a `fit` begins

    def __repr__(self) -> str:
        """The settings, as a call: what is recorded (`variables`, `stats`, `every`)
        and each other argument that differs from its default.

        Example:

        ```python
        >>> import gradwatch
        >>> gradwatch.GradWatch(stats=["norm", "nonfinite"], on_nonfinite="raise")
        GradWatch(variables='*', stats=['norm', 'nonfinite'], every=1, on_nonfinite='raise')
        >>> gradwatch.GradWatch(path="runs/grads", every=10)
        GradWatch(variables='*', stats=('norm', 'mean', 'std', 'min', 'max', 'nonfinite'), every=10, path='runs/grads')

        ```
        """  # noqa: E501 (a repr is one line)
        shown = []
        for name, parameter in _PARAMETERS.items():
            value = self._arguments.get(name, parameter.default)
            if name in _ALWAYS_SHOWN or not _same(value, parameter.default):
                shown.append(f"{name}={_show(value)}")
        return f"{type(self).__name__}({', '.join(shown)})"

    @property
    def log(self) -> GradientLog:
        """The recorded history. With `path`, what was written there plus what was not yet."""
        # Steps still on the device, when read while training runs.
        self._drain()
        sink = self._parquet
        if sink is None or not sink.active:
            return self._log
        sink.close()
        parts = io.dataset_parts(self.path).get(sink.worker, []) if self.path.is_dir() else []
        if sink.failed or not parts:
            return self._log
        if self._read_cache is None or self._read_cache[0] != len(parts):
            self._read_cache = (len(parts), io.read_log(self.path, worker=sink.worker))
        return self._read_cache[1]

    @property
    def _tensorboard(self) -> Any:
        """The TensorBoard writer, once used."""
        return None if self._tensorboard_sink is None else self._tensorboard_sink.writer

    # ------------------------------------------------------------- host side
    def on_train_begin(self, logs: dict | None = None) -> None:
        model = self.model
        if self._model_ref is not None and self._model_ref() is not model:
            raise ValueError(
                "This GradWatch already records another model, and one log holds one "
                "model's history. Create a new `gradwatch.GradWatch()` for each model."
            )
        adopted = adopt(model)  # a plain Keras model records as if it mixed in the mixin
        try:
            self._attach(model)
        except BaseException:
            if adopted and not model_state(model).watches:
                restore_class(model)
            raise

    def _attach(self, model: Any) -> None:
        _args.check_model(model, _backend, _BACKEND_NAME)
        _args.unsupported_settings(self, _backend, _BACKEND_NAME)
        if _backend.STATE_IN_STEP:
            # The ring buffer, the step counter and the alarm travel in the stateless
            # step's state: they must exist before Keras gathers it.
            plan = self._plan_for(model)
            self._buffer_for(model, plan)
            step_counter(model)
            if self.checks_every_step:
                self._alarms.alarm_for(len(plan.stat_index))
        elif _backend.EAGER and (self._plan is None or self._plan.signature != signature_of(model)):
            # The step runs eagerly and applies the update before it records: match
            # the patterns now, so that one matching nothing fails before any step; and
            # make the counter, which starts at `iterations` before any update. (The plan
            # itself is made at the first step, which shows how many times it updates
            # each variable.)
            make_plan(model, self, None)
            step_counter(model)
        elif model.trainable_weights:
            # Built before training: match the patterns now too, so that one matching
            # nothing fails before any step. (A model built in its first step is matched
            # in that trace; see `_plan_in_step`.)
            make_plan(model, self, None)
        if self._parquet is not None:
            self._parquet.open(model, self.stats, self.histogram or None, self.per_replica)
        self._aligned = False  # the step count is aligned once every callback has begun
        self._model_ref = weakref.ref(model)
        state = model_state(model)
        joined = self not in state.watches
        if joined:
            # Reached when the model's own `fit` did not attach this watch (a plain
            # model, or `fit` of a class that overrides it).
            state.watches.append(self)
            state.traced_with = tuple(state.watches)
            adopted = state.adopted_from is not None
            if adopted and state.traced_with in state.captured:
                model.train_function = state.captured[state.traced_with]  # traced before
            else:
                model.make_train_function(force=True)
                if adopted:
                    state.captured[state.traced_with] = model.train_function
        if state.watches[0] is self or joined:
            setup_gate(model)  # again when a watch joins: the gate serves them all
        self._since_drain = 0

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._align()
        self._epoch = int(epoch)
        self._epoch_start = next_step(self.model)
        if model_state(self.model).watches[0] is self:
            resync_gate(self.model, self._epoch_start)

    def _align(self) -> None:
        """Before the first step of a `fit`, after every callback's `on_train_begin` (a
        `keras.callbacks.BackupAndRestore` restores the model there): numbers the steps
        as the optimizer counts them, and supersedes the recorded steps that a model
        restored to an earlier iteration trains again (see `gradwatch._resume`)."""
        if self._aligned:
            return
        self._aligned = True
        model, sink = self.model, self._parquet
        active = sink is not None and sink.active
        history = sink.history if active else None
        superseded = align(model, history, self.path)
        step, iteration = next_step(model), first_step(model)
        steps = self._log.steps
        mine = len(steps) > 0 and steps[-1] >= step  # this watch's, not yet written
        if active:
            if mine:
                superseded = step if superseded is None else min(superseded, step)
            if superseded is not None:
                sink.resume(superseded, iteration)
            sink.note((step, iteration))
        elif mine:
            self._store.add_superseded(self._store.split_from(step))

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        self._align()
        self._handle_alarms()
        self._raise_if_alarmed()
        # Called once per execution of `steps_per_execution` steps, on the main
        # thread, before it runs: drain now if the coming execution could
        # overwrite slots not yet copied out. (Not `on_train_batch_end`: Keras
        # runs training asynchronously only while no callback overrides it.)
        if self._buffer is not None:
            sink = self._parquet
            room = sink.room() if sink is not None and sink.writes else None
            spe = int(self.model.steps_per_execution)
            if drain_due(self._since_drain, spe, self._buffer.capacity, room):
                self._drain(anchored=True)
        self._since_drain += 1
        if model_state(self.model).watches[0] is self:
            gate_next_step(self.model)

    def wants_step(self, step: int) -> bool:
        """Whether the step needs capture: recorded, or kept for the next `cos_prev`."""
        if step % self.every == 0:
            return True
        return "cos_prev" in self.stats and (step + 1) % self.every == 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._drain(anchored=True)
        self._alarms.poll(self.model)
        self._handle_alarms()
        self._raise_if_alarmed()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._alarms.poll(self.model)
        self._handle_alarms()
        self.release(self.model)
        self._raise_if_alarmed()
        self._print_findings()

    def _print_findings(self) -> None:
        verbose = self.verbose
        if verbose == "auto":
            verbose = 0 if (self.params or {}).get("verbose", 1) == 0 else 1
        if not verbose:
            return
        try:
            text = fit_summary(self.log.diagnose())
        except Exception as e:  # a diagnosis never costs the training its end
            warnings.warn(f"GradWatch could not diagnose the run: {e!r}", stacklevel=2)
            return
        if text:
            print(text, flush=True)

    # Keras may run `on_train_batch_end` on a worker thread; it only reads one small
    # counter there and sets flags, so training stays asynchronous. Where the device
    # state travels in the step's state (JAX), reading it must happen on the main thread.
    async_safe = not _backend.STATE_IN_STEP

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        self._alarms.poll(self.model)

    def state_metrics(self) -> list[Any]:
        """The metrics carrying this watch's device state (ring buffer, JAX alarm)."""
        return [m for m in (self._buffer, self._alarms.alarm) if isinstance(m, keras.Metric)]

    def release(self, model: Any) -> None:
        """Drains what is left and detaches from the model; safe to call twice."""
        state = model_state(model)
        try:
            with deferred_interrupt():  # Ctrl-C waits until every step is written
                self._drain()
                if self in state.watches:  # where this fit left the model's step count
                    self._note_anchor(model)
                if self._parquet is not None:
                    self._parquet.close()
        finally:
            if self in state.watches:
                state.watches.remove(self)
            if not state.watches:
                restore_class(model)  # an adopted plain model gets its class back
            if self._tensorboard_sink is not None:
                self._tensorboard_sink.close()

    def _drain(self, anchored: bool = False) -> None:
        """Copies the recorded steps out of the device buffer into the log and the sinks;
        `anchored` (between the steps of a `fit`) also notes where the model's step
        count stands against its optimizer's, for the next part."""
        buffer, plan = self._buffer, self._plan
        if buffer is None or plan is None:
            return
        model = None if self._model_ref is None else self._model_ref()
        self._since_drain = 0
        # Ctrl-C waits until the block is in the store and the sinks (`_signals`).
        with deferred_interrupt():
            block = drain(model, buffer, plan, self._store, self._epoch, self._epoch_start)
            if anchored and model is not None:
                # Also where nothing was drained: at each epoch's end (see `_resume`).
                self._note_anchor(model)
            if block is None:
                return
            keys = plan.stat_keys
            self._alarms.from_block(block, keys, self._store)
            for sink in (self._tensorboard_sink, self._parquet):
                if sink is not None:
                    sink.write(block, keys)

    def _note_anchor(self, model: Any) -> None:
        pair = anchor(model)
        if pair is not None and self._parquet is not None:
            self._parquet.note(pair)

    def _handle_alarms(self) -> None:
        if self._plan is not None:
            self._alarms.handle(self._plan.stat_keys, self._store, self._nonfinite_counts)

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

    def _raise_if_alarmed(self) -> None:
        """On the main thread: write the log out, then raise a pending alarm."""
        if self._plan_error is not None:
            error, self._plan_error = self._plan_error, None
            self.release(self.model)  # detaches: the next `fit` starts clean
            raise error
        error = self._alarms.take_error()
        if error is not None:
            self._drain()
            if self._parquet is not None:
                self._parquet.close()
            raise error

    # ----------------------------------------------------- inside the step
    def capture_step(
        self,
        model: Any,
        step: Any,
        records: Records,
        skipped: Any,
        local: Records | None = None,
        scalars: tuple[Any, Any, Any] = (None, None, None),
    ) -> None:
        """Adds this watch's capture to the step being traced.

        `records` hold the global gradients, `local` (under `tf.distribute`) what
        this replica handed the optimizer; without a strategy they are the same.
        `skipped` is a bool tensor (a loss-scale optimizer skipped the update) or None.
        `scalars` are the step's `(loss, learning_rate, applies)` (None: not seen).
        """
        with traced_for_xla(model.jit_compile):
            plan = self._plan_in_step(model, records)
            if plan is None:
                return
            buffer = self._buffer_for(model, plan)
            local = records if local is None else local
            _in_step.capture(
                self, model, plan, buffer, self._store, step, records, skipped, local, scalars
            )

    def check_step(self, model: Any, step: Any, records: Records, skipped: Any) -> None:
        """Adds the every-step checks (non-finite, thresholds) to the step being traced.

        Non-finite gradients that a loss-scale optimizer skipped (`skipped`) never
        reached the weights, so they do not trip `on_nonfinite`.
        """
        if not self.checks_every_step:
            return
        with traced_for_xla(model.jit_compile):
            plan = self._plan_in_step(model, records)
            if plan is None:
                return
            alarm = self._alarms.alarm_for(len(plan.stat_index))
            _derived.every_step_check(plan, records, step, skipped, alarm, self._alarms)

    def _plan_in_step(self, model: Any, records: Records) -> Plan | None:
        """The plan, made inside the step being traced; None if the model's variables
        refuse the arguments. A model built in its first step (a `Sequential` without
        an `Input`) creates its variables in that trace, and they are initialized only
        once the trace completes: an error raised there would leave them so for the
        session. The trace therefore completes without this watch's capture, and the
        error is raised on the host after that step (`_raise_if_alarmed`)."""
        if self._plan_error is not None:
            return None
        try:
            return self._plan_for(model, records)
        except ValueError as e:
            self._plan_error = e
            return None

    def _plan_for(self, model: Any, records: Records | None = None) -> Plan:
        """The plan for the model's trainable variables and, from the step's `records`,
        the number of times the step updates each (the counts only grow: an update
        that a later step lacks is NaN there)."""
        counts = self._update_counts
        grown = {
            k: n for k, n in update_counts(records or {}).items() if n > max(counts.get(k, 1), 1)
        }
        if grown:
            counts = self._update_counts = {**counts, **grown}
        plan = self._plan
        if plan is not None and plan.signature == signature_of(model) and plan.counts == counts:
            return plan
        if (
            _backend.STATE_IN_STEP
            and records is not None
            and plan is not None
            and plan.signature == signature_of(model)
            and self._buffer is not None
        ):
            # JAX: the ring buffer travels in the step's state, which Keras gathered
            # before this trace; the next `fit` makes the plan with every update.
            if grown:
                _warn_updates_next_fit(plan, grown)
            return plan
        self._plan = make_plan(model, self, self._store, counts)
        self._buffer = None  # a new plan needs a buffer of its own shape
        return self._plan

    def _buffer_for(self, model: Any, plan: Plan) -> GradientBuffer:
        if self._buffer is None:
            self._buffer = make_buffer(model, plan, self)
        return self._buffer


_PARAMETERS = {
    name: parameter
    for name, parameter in inspect.signature(GradWatch.__init__).parameters.items()
    if name != "self"
}
# What is recorded and when: shown in the repr also at their defaults.
_ALWAYS_SHOWN = ("variables", "stats", "every")


def _same(value: Any, default: Any) -> bool:
    if value is default:
        return True
    try:
        return bool(type(value) is type(default) and value == default)
    except Exception:  # an array-like compares elementwise: not the default
        return False


def _show(value: Any) -> str:
    """An argument as it reads in a call (a path as its string)."""
    if isinstance(value, os.PathLike):
        return repr(os.fspath(value))
    return repr(value)


def _warn_updates_next_fit(plan: Plan, grown: dict[int, int]) -> None:
    keys = [k for v, k in zip(plan.variables, plan.keys, strict=True) if id(v) in grown]
    warnings.warn(
        f"GradWatch: the train step updates {keys} more than once. This `fit` records "
        "their first update only, as the log's layout travels in the step's state, which "
        "was made before the step was traced; a later `fit` with this GradWatch records "
        "every update (`key`, `key@1`, ...).",
        stacklevel=4,
    )
