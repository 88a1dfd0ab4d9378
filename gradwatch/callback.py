"""The `GradWatch` callback: wires the capture into `model.fit` and the drained blocks
into a `GradientLog`. The work lives beside it, in `gradwatch._capture`: the argument
checks (`args`), the plan and ring buffer (`plan`), the step's capture (`in_step`),
draining (`drain`), the alarms (`alarms`) and the sinks (`sinks`); and the replay of a
step kept from the model in `gradwatch._forensics.skipped`."""

from __future__ import annotations

import inspect
import os
import re
import weakref
from collections.abc import Sequence
from typing import Any

import keras
import numpy as np

from gradwatch._backend import NAME as _BACKEND_NAME
from gradwatch._backend import current as _backend
from gradwatch._capture import args as _args
from gradwatch._capture import in_step as _in_step
from gradwatch._capture.adopt import FIT_BATCH_SIZE, adopt, guard_fit, join
from gradwatch._capture.alarms import KEEPS_MODEL, AlarmPolicy, Alarms, NonfinitePolicy
from gradwatch._capture.counting import next_step
from gradwatch._capture.drain import drain, drain_due, sink_block
from gradwatch._capture.guard import clear_halt, halt_flag
from gradwatch._capture.interrupts import deferred_interrupt
from gradwatch._capture.plan import Planner
from gradwatch._capture.sinks import Sinks
from gradwatch._capture.spikes import SpikeJudge
from gradwatch._capture.step import Records, restore_class
from gradwatch._capture.trackers import check_track
from gradwatch._doctor.spikes import SPIKE_SIGMA, SPIKE_WINDOW
from gradwatch._forensics.replays import Replays
from gradwatch._forensics.skipped import KeptStep
from gradwatch.findings import print_fit_findings
from gradwatch.keys import check_patterns
from gradwatch.log import GradientLog, store_of
from gradwatch.mixin import gate_next_step, model_state, resync_gate
from gradwatch.sinks import Sink
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
        stats: Names from `gradwatch.STATS`, or a preset by name: `"doctor"`
            (every stat the doctor reads) or `"lean"` (the norm alone). Defaults to
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
            the chief writes, in a multi-process JAX run process 0 (see
            `all_workers`). Defaults to `None` (memory only).
        flush_every: With `path`, write a part every this many recorded
            steps, and at the end of training. Defaults to `1000`.
        max_value_elements: The largest variable (in elements) whose full
            gradient `values` may keep; a larger match is a `ValueError` at the
            start of training. Defaults to `1_000_000`.
        on_nonfinite: What to do when a watched gradient has a NaN or Inf:
            `"ignore"`, `"warn"` (one warning naming the first step and the
            variables, with counts; the update is applied, as Keras applies
            it), `"skip"` (that step's update is kept from the model, as a
            `LossScaleOptimizer` skips an overflowed step: the weights and
            the optimizer's state, `iterations` included, stay as they were;
            the step is recorded and listed in `log.skipped_steps`, one
            warning names it, and training goes on), `"stop"` (skip the
            update, then set `model.stop_training` and print why, naming the
            step and the variables, as Keras' `TerminateOnNaN` does; the log
            is kept) or `"raise"` (skip the update, then a
            `FloatingPointError`, after the log is written out). With
            `"skip"`, `"stop"` and `"raise"` the model keeps the weights of
            its last finite step, and the first such step's batch is replayed
            on them, after the step, to name where its first NaN or Inf was
            born (`log.origins`; the message names it too). Checked at every
            step, also with `every > 1`. Defaults to `"warn"`.
        max_norm: Alert when a watched variable's gradient norm exceeds this.
            A non-finite gradient is never a threshold alert (`on_nonfinite`
            reports it). Defaults to `None` (no check).
        min_norm: Alert when a watched variable's gradient norm falls below
            this (vanishing). Defaults to `None` (no check).
        on_threshold: The policy for `max_norm` and `min_norm`, as
            `on_nonfinite`. Defaults to `"warn"`.
        on_spike: What to do at a spike: a recorded step whose global gradient
            norm (over the watched variables) or loss lies above the mean +
            `spike_sigma` standard deviations of its previous `spike_window`
            finite values (none is judged before 16 were seen). Each spike is in
            `log.alerts` (kinds `"spike"`, `"loss_spike"`). The policies of
            `on_nonfinite`: `"ignore"` (nothing is judged), `"warn"` (one warning
            per kind), `"skip"` (the spike's update is kept from the model, as
            `on_nonfinite="skip"` keeps it), `"stop"`, `"raise"`. Not
            `"skip"`/`"stop"`/`"raise"` under `tf.distribute`. Defaults to `"warn"`.
        spike_window: How many previous finite values a spike is judged
            against. Defaults to `128`.
        spike_sigma: How many standard deviations above their mean a spike
            lies. Defaults to `6.0`.
        examples_every: Also replay every n-th step (steps whose number is
            divisible by it) for `log.examples`: each example's loss and the
            norm of its own gradient over the watched variables, on the weights
            from before the step. Spikes and the steps kept from the model are
            replayed so without it. Defaults to `None` (those alone).
        noise_scale_every: Every n-th step, compute the gradients of the batch's
            two halves on the weights from before the step, for the gradient
            noise scale (`log.noise_scale`). Defaults to `None` (only where it
            is free: under `tf.distribute`, with `gradient_accumulation_steps`).
        tensorboard_dir: Also write the gradient norms (and histograms, with
            `histogram`) to this directory as TensorBoard summaries, at the
            log's step numbers, each time the buffer is drained; see
            `gradwatch.tensorboard`. Needs the `norm` stat or `histogram`.
            Defaults to `None`.
        sinks: Your own sinks (`gradwatch.Sink`: objects with `write(block)` and
            `close()`), in a list: each gets every drained block of recorded
            steps (a `gradwatch.SinkBlock`), in step order, and `close()` at the
            end of each `fit`, also when it raises. A sink that raises is warned
            about and gets no more blocks; training goes on. Defaults to `None`.
        track: Also send the run to an experiment tracker: `"mlflow"`,
            `"wandb"`, or a list of both. At each recorded step, into the run
            you have open (`mlflow.start_run()`, `wandb.init()`): the global
            norm, the loss, the learning rate and each layer's norm, as
            `gradwatch/global_norm`, `gradwatch/loss`,
            `gradwatch/learning_rate` and `gradwatch/norm/<layer>`; at the
            end of each `fit`, the doctor's findings and the HTML report.
            MLflow without an active run starts one (as `mlflow.log_metric`
            does); W&B needs `wandb.init()` first. Needs the tracker's
            package (`pip install 'gradwatch[mlflow]'`, `'gradwatch[wandb]'`).
            A tracker that fails is warned about once; training goes on.
            Defaults to `None`.
        per_replica: Under `tf.distribute`, also record the stats of each
            replica's local gradient (as Keras hands it to the optimizer),
            in rows with a `replica` number; the other rows hold the global
            gradient's stats. Without a strategy there is one replica, 0.
            TensorFlow only: refused on JAX (also under `keras.distribution`,
            where the log holds the global gradient) and PyTorch.
            Defaults to `False`.
        all_workers: Under `MultiWorkerMirroredStrategy`, or in a multi-process
            JAX run (`jax.distributed.initialize`), with `path`: every worker
            (process) writes its own partition (`worker=k`, k its index, as
            `jax.process_index()` on JAX) instead of the chief (worker 0)
            alone; and every worker's `track=` trackers send, not the chief's
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

    Keep the model intact through a batch that makes the gradients NaN: that
    step's update is skipped, and training goes on:

    ```python
    watch = gradwatch.GradWatch(on_nonfinite="skip")
    model.fit(x, y, callbacks=[watch])
    watch.log.skipped_steps  # the steps whose update was skipped
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
        on_nonfinite: NonfinitePolicy = "warn",
        max_norm: float | None = None,
        min_norm: float | None = None,
        on_threshold: AlarmPolicy = "warn",
        on_spike: NonfinitePolicy = "warn",
        spike_window: int = SPIKE_WINDOW,
        spike_sigma: float = SPIKE_SIGMA,
        examples_every: int | None = None,
        noise_scale_every: int | None = None,
        tensorboard_dir: str | os.PathLike | None = None,
        sinks: Sequence[Sink] | None = None,
        track: str | Sequence[str] | None = None,
        per_replica: bool = False,
        all_workers: bool = False,
        verbose: int | str = "auto",
    ):
        # The arguments as given, for the repr (read back by name from the signature).
        arguments = locals()
        super().__init__()
        # A plain model is adopted inside Keras' `fit`, which calls no callback when it
        # raises: `fit` itself must release it (see `gradwatch._capture.adopt`).
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
        self.on_spike = _args.check_policy(on_spike, "on_spike")
        self.spike_window = _args.check_count(spike_window, "spike_window")
        self.spike_sigma = _args.check_positive(spike_sigma, "spike_sigma")
        self._spikes = SpikeJudge(self.on_spike, self.spike_window, self.spike_sigma)
        self.examples_every = _args.check_optional_count(examples_every, "examples_every")
        self.noise_scale_every = _args.check_optional_count(noise_scale_every, "noise_scale_every")
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
            self._spikes,
        )
        self.checks_every_step = self._alarms.checks_every_step
        # A "stop" or "raise" ends `fit` at the step that tripped it: Keras then runs
        # `on_train_batch_end` on the main thread, before it checks `stop_training`
        # (asynchronously, one more step could start first).
        self.async_safe = type(self).async_safe and not self._alarms.ends_fit
        # "skip", "stop" and "raise" keep a non-finite step's (a spike's) update from the model.
        self.keeps_model = self.on_nonfinite in KEEPS_MODEL or self.on_spike in KEEPS_MODEL
        # The first step whose update was kept from the model, and its replay.
        self._kept = KeptStep(self._store, self.keeps_model)
        # The steps handed to the host for a replay (`_capture.handoff`), and theirs.
        self.replays = bool(
            self.keeps_model or self._spikes.active or self.examples_every or self.noise_scale_every
        )
        self._replays = Replays(self._store, bool(self.examples_every or self.noise_scale_every))
        self.needs_weights = any(s in UPDATE_STATS for s in self.stats)
        self.sinks = _args.check_sinks(sinks)
        self.track = check_track(track)  # imports each tracker's library
        self._sinks = Sinks(self, self._log, self._store)  # built-in ones, then `sinks`
        self._model_ref: weakref.ref | None = None
        self._planner = Planner(self, self._store)  # the plan and ring buffer
        self._epoch = 0
        self._epoch_start = 0
        self._since_drain = 0
        self._alarms.origin_of = lambda step: self._kept.origin_of(
            step, self._recorded_model(), self._epoch_start
        )

    def __repr__(self) -> str:
        """The settings, as a call: what is recorded (`variables`, `stats`, `every`)
        and each other argument that differs from its default.

        Example:

        ```python
        >>> import gradwatch
        >>> gradwatch.GradWatch(stats=["norm", "nonfinite"], on_nonfinite="raise")
        GradWatch(variables='*', stats=['norm', 'nonfinite'], every=1, on_nonfinite='raise')
        >>> gradwatch.GradWatch(stats=["norm"], on_nonfinite="skip")
        GradWatch(variables='*', stats=['norm'], every=1, on_nonfinite='skip')
        >>> gradwatch.GradWatch(path="runs/grads", every=10)
        GradWatch(variables='*', stats=('norm', 'mean', 'std', 'min', 'max', 'nonfinite'), every=10, path='runs/grads')

        ```
        """  # noqa: E501 (a repr is one line)
        return _args.call_repr(type(self).__name__, _PARAMETERS, self._arguments, _ALWAYS_SHOWN)

    @property
    def log(self) -> GradientLog:
        """The recorded history. With `path`, what was written there plus what was not yet."""
        # Steps still on the device, when read while training runs.
        self._drain()
        written = self._sinks.read_back()
        return self._log if written is None else written

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
        if self.on_spike in KEEPS_MODEL and _backend.num_replicas(model) > 1:
            raise NotImplementedError(
                f"GradWatch does not yet keep a spike's update from the model under "
                f"`tf.distribute`. Received: on_spike={self.on_spike!r} with "
                f"{_backend.num_replicas(model)} replicas. Use on_spike='warn' there."
            )
        plan = self._planner.prepare(model)  # JAX: made now, for the step's state
        if plan is not None and self.checks_every_step:
            self._alarms.alarm_for(len(plan.stat_index))  # in the step's state too
        if plan is not None and self._spikes.active:
            self._spikes.state_for()  # in the step's state too
        # Opens the sinks for this fit, and aligns the step count once every callback
        # has begun (`_sinks.align_fit`).
        self._sinks.begin(model, self)
        self._model_ref = weakref.ref(model)
        join(model, self)
        if plan is not None:
            halt_flag(model)  # made before the first trace too, where a watch stops
        clear_halt(model)  # a `fit` after one that "stop" ended trains again
        self._since_drain = 0
        self._kept.fit_batch_size = model.__dict__.get(FIT_BATCH_SIZE)
        self._replays.fit_batch_size = self._kept.fit_batch_size

    def on_epoch_begin(self, epoch: int, logs: dict | None = None) -> None:
        self._sinks.align(self.model, self._log.steps)
        self._epoch = int(epoch)
        self._epoch_start = next_step(self.model)
        if model_state(self.model).watches[0] is self:
            resync_gate(self.model, self._epoch_start)

    def on_train_batch_begin(self, batch: int, logs: dict | None = None) -> None:
        # `self.model` on JAX attaches the step's state to every variable of the model,
        # and Keras then takes it apart again for the next step: a cost that grows with
        # the number of variables, paid at every step. Only the first batch of a `fit`
        # (`align`), the replays and the drains (`sync_state`) read that state.
        synced = not self._sinks.aligned or bool(self._replays.queue)
        model = self.model if synced else self._model
        self._sinks.align(model, self._log.steps)
        self._kept.trace(self._recorded_model(), self._epoch_start)  # before the next execution
        self._replay()
        self._handle_alarms()
        self._raise_if_alarmed()
        # Called once per execution of `steps_per_execution` steps, on the main
        # thread, before it runs: drain now if the coming execution could
        # overwrite slots not yet copied out. (Not `on_train_batch_end`: Keras
        # runs training asynchronously only while no callback overrides it.)
        buffer = self._planner.buffer
        if buffer is not None:
            spe = int(model.steps_per_execution)
            room = self._sinks.room()
            if drain_due(self._since_drain, spe, buffer.capacity, room) or self._sinks.tail_due():
                self._drain(anchored=True)
                if _backend.STATE_IN_STEP and not self._alarms.ends_fit:
                    self._alarms.poll(self.model)  # a "warn" (see `on_train_batch_end`)
        self._since_drain += 1
        if model_state(model).watches[0] is self:
            gate_next_step(model)

    def wants_step(self, step: int) -> bool:
        """Whether the step needs capture: recorded, or kept for the next `cos_prev`."""
        if step % self.every == 0:
            return True
        return "cos_prev" in self.stats and (step + 1) % self.every == 0

    def on_epoch_end(self, epoch: int, logs: dict | None = None) -> None:
        self._kept.trace(self._recorded_model(), self._epoch_start)
        self._replay()
        self._drain(anchored=True)
        self._alarms.poll(self.model)
        self._handle_alarms()
        self._raise_if_alarmed()

    def on_train_end(self, logs: dict | None = None) -> None:
        self._kept.trace(self._recorded_model(), self._epoch_start)
        self._replay()
        self._alarms.poll(self.model)
        self._handle_alarms()
        self.release(self.model)
        self._raise_if_alarmed()
        print_fit_findings(lambda: self.log.diagnose(), self.verbose, self.params)

    # Keras may run `on_train_batch_end` on a worker thread; it only reads one small
    # counter there and sets flags, so training stays asynchronous. Where the device
    # state travels in the step's state (JAX), reading it must happen on the main thread.
    async_safe = not _backend.STATE_IN_STEP

    def on_train_batch_end(self, batch: int, logs: dict | None = None) -> None:
        # A policy that ends `fit` is polled after every execution. On JAX a "warn" is
        # polled with the drains and at the end of each epoch instead: each poll there
        # attaches the step's state to the model and waits for the step.
        if self._alarms.polls and (self._alarms.ends_fit or not _backend.STATE_IN_STEP):
            self._alarms.poll(self.model)

    def state_metrics(self) -> list[Any]:
        """The metrics carrying this watch's device state (ring buffer, JAX alarm)."""
        metrics = (self._planner.buffer, self._alarms.alarm, self._spikes.state)
        return [m for m in metrics if isinstance(m, keras.Metric)]

    def release(self, model: Any) -> None:
        """Drains what is left and detaches from the model; safe to call twice."""
        state = model_state(model)
        try:
            with deferred_interrupt():  # Ctrl-C waits until every step is written
                try:
                    self._drain()
                    if self in state.watches:  # where this fit left the model's step count
                        self._sinks.note_anchor(model)
                finally:
                    self._sinks.close()  # each sink once per fit, also after an error
        finally:
            if self in state.watches:
                state.watches.remove(self)
            if not state.watches:
                restore_class(model)  # an adopted plain model gets its class back

    def _recorded_model(self) -> Any:
        """The model this watch records, or None before its first `fit` (or once freed)."""
        return None if self._model_ref is None else self._model_ref()

    def _drain(self, anchored: bool = False) -> None:
        """Copies the recorded steps out of the device buffer into the log and the sinks;
        `anchored` (between the steps of a `fit`) also notes where the model's step
        count stands against its optimizer's, for the next part."""
        buffer, plan = self._planner.buffer, self._planner.plan
        if buffer is None or plan is None:
            return
        model = self._recorded_model()
        self._since_drain = 0
        # Ctrl-C waits until the block is in the store and the sinks (`_signals`).
        with deferred_interrupt():
            block = drain(model, buffer, plan, self._store, self._epoch, self._epoch_start)
            if anchored and model is not None:
                # Also where nothing was drained: at each epoch's end (see `_resume`).
                self._sinks.note_anchor(model)
            if block is None:
                return
            self._alarms.from_block(block, plan.stat_keys, self._store)
            if self._sinks:
                bins = self.histogram or None
                epoch, start = self._epoch, self._epoch_start
                self._sinks.write(sink_block(block, plan, epoch, start, self.stats, bins))

    def _handle_alarms(self) -> None:
        if self._alarms.spike_pending:  # its alert and message come with its block
            self._alarms.spike_pending = False
            self._drain()
        if self._planner.plan is not None:
            self._alarms.handle(self._planner.plan.stat_keys, self._store, self._nonfinite_counts)

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
        error = self._planner.take_error()
        if error is not None:
            self.release(self.model)  # detaches: the next `fit` starts clean
            raise error
        error = self._alarms.take_error()
        if error is not None:
            self._drain()
            self._sinks.write_part()
            raise error

    # ----------------------------------------------------- inside the step
    def capture_step(
        self,
        model: Any,
        step: Any,
        records: Records,
        skipped: Any,
        local: Records | None = None,
        scalars: tuple = (None, None, None),
    ) -> None:
        """Adds this watch's capture to the step being traced.

        `records` hold the global gradients, `local` (under `tf.distribute`) what
        this replica handed the optimizer; without a strategy they are the same.
        `skipped` is a bool tensor (a loss-scale optimizer skipped the update) or None.
        `scalars` are the step's `(loss, learning_rate, applies)` (None: not seen) and
        its spike verdicts by watch (`StepScope.spikes`).
        """
        _in_step.capture_step(self._planner, model, step, records, skipped, local, scalars)

    def judge_spikes(self, model: Any, scope: Any, records: Records, local: Any) -> None:
        """Adds this watch's spike verdict of the step to `scope.spikes`, once per step
        (`local`: this replica's records under `tf.distribute`, else None)."""
        if self._spikes.active and id(self) not in scope.spikes:
            _in_step.judge_spikes(self._planner, self._spikes, model, scope, records, local)

    def watched_ids(self, model: Any) -> frozenset[int]:
        """The ids of the model's variables whose gradients this watch checks (its
        `variables`), made once per set of trainable variables."""
        return self._planner.watched_ids(model)

    @property
    def skipped_batch(self) -> tuple[int, Any, Any, Any] | None:
        """`(step, x, y, sample_weight)` in NumPy of the first step whose update this
        watch kept from the model, for a replay; None where there was none, or where the
        backend cannot hand it over (TensorFlow with `jit_compile=True` or under
        `tf.distribute`)."""
        return self._kept.batch

    def queue_replay(self, replay: Any) -> None:
        """On the host, from the step: a step handed over for a replay."""
        self._replays.add(replay)

    def _replay(self) -> None:
        """Between executions: replays the steps handed over (`log.examples`,
        `log.noise_scale`), on the weights from before each."""
        plan, model = self._planner.plan, self._recorded_model()
        if self._replays.queue and plan is not None and model is not None:
            watched = [plan.variables[i] for i in plan.stat_index]
            self._replays.run(model, watched, self._epoch, self._epoch_start)

    def keep_skipped_batch(self, step: int, x: Any, y: Any, sample_weight: Any) -> None:
        """On the host, from the step: keeps the batch of the first step whose update
        this watch kept from the model (`skipped_batch`)."""
        self._kept.keep(step, x, y, sample_weight)

    def check_step(self, model: Any, step: Any, records: Records, skipped: Any) -> None:
        """Adds the every-step checks (non-finite, thresholds) to the step being traced.

        Non-finite gradients that a loss-scale optimizer skipped (`skipped`) never
        reached the weights, so they do not trip `on_nonfinite`.
        """
        if self.checks_every_step:
            _in_step.check_step(self._planner, self._alarms, model, step, records, skipped)


_PARAMETERS = {
    name: parameter
    for name, parameter in inspect.signature(GradWatch.__init__).parameters.items()
    if name != "self"
}
# What is recorded and when: shown in the repr also at their defaults.
_ALWAYS_SHOWN = ("variables", "stats", "every")
