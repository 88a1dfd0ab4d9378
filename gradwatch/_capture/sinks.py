"""Where a watch's drained blocks go besides memory: the streamed Parquet dataset
(`path=`), TensorBoard summaries (`tensorboard_dir=`) and the user's own sinks
(`sinks=`), all behind one `Sinks` fan-out.

Each is a `gradwatch.Sink`: it takes each drained `SinkBlock` (`write(block)`) and is
closed at the end of each `fit` (`close()`). A failed write warns once and stops that
sink; training goes on, and the in-memory log keeps every step.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch import io
from gradwatch._backend import current as _backend
from gradwatch._capture.counting import align, anchor, first_step, next_step
from gradwatch._capture.interrupts import deferred_interrupt
from gradwatch._capture.live_tail import LiveTail
from gradwatch._capture.trackers import make_trackers
from gradwatch._logdata import files as _files
from gradwatch._logdata.resume import Anchor, add_anchor
from gradwatch._logdata.store import Store
from gradwatch.sinks import Sink, SinkBlock


class ParquetSink:
    """Streams the log to `path` as a hive-partitioned Parquet dataset: a part every
    `flush_every` recorded steps, and at the end. One run per sink, across its fits.

    Under `MultiWorkerMirroredStrategy` only the chief writes, unless `all_workers`.
    """

    def __init__(self, path: Path, flush_every: int, all_workers: bool, log: Any, store: Store):
        self.path = path
        self.flush_every = flush_every
        self.all_workers = all_workers
        self.log, self.store = log, store  # the in-memory log that the parts are cut from
        self.worker, self.writes = 0, True  # this process's worker index; does it write?
        self.run: str | None = None  # the run id of this sink's parts under `path`
        self.failed = False
        self.pending = 0  # recorded steps not yet written
        # What `path` held at `open`: its last step, anchors and skipped steps.
        self.history: _files.StreamedHistory | None = None
        self.anchors: list[Anchor] = []  # read since the last part; written with the next
        # `[step, iteration]` where this run went on from a model restored to an earlier
        # iteration: the earlier runs' rows from `step` on are superseded.
        self.resumed: list[int] | None = None
        self.read: tuple[int, Any] | None = None  # (parts, the log read from them)
        self.tail = LiveTail()  # the steps since the last part, for `gradwatch serve`

    def open(self, model: Any, stats: list[str], bins_per_decade: int | None, per_replica: bool):
        """Prepares `path` at the start of training; refuses a log it cannot continue."""
        path = self.path
        self.worker, chief = _backend.worker_of(model)
        # Every worker records the same global gradients; one copy on disk is enough.
        self.writes = chief or self.all_workers
        if not self.writes:
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
        meta = io.streamed_metadata(path, self.worker)
        if meta is not None and (
            meta["stats"] != list(stats)
            or meta.get("bins_per_decade") != bins_per_decade
            or bool(meta.get("per_replica", False)) != per_replica
        ):
            raise ValueError(
                f"'{path}' already holds a gradwatch log with stats={meta['stats']}, "
                f"histogram bins per decade {meta.get('bins_per_decade')} and "
                f"per_replica={bool(meta.get('per_replica', False))}, which this GradWatch "
                f"(stats={list(stats)}, histogram={bins_per_decade}, "
                f"per_replica={per_replica}) cannot continue. "
                "Use another `path`, or the same settings to append to it."
            )
        self.history = _files.streamed_history(path, self.worker)
        if self.run is None:
            self.run = io.new_run_id()
        target = io.run_directory(path, self.worker, self.run)
        try:
            target.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise OSError(f"Cannot create the log directory '{target}': {e.strerror or e}.") from e

    def read_back(self) -> Any:
        """The log this worker wrote to `path` (after writing what memory holds as a
        part), or None where memory holds it all (no part, or the writes failed)."""
        if not self.active:
            return None
        self.close()
        parts = io.dataset_parts(self.path).get(self.worker, []) if self.path.is_dir() else []
        if self.failed or not parts:
            return None
        if self.read is None or self.read[0] != len(parts):
            self.read = (len(parts), io.read_log(self.path, worker=self.worker))
        return self.read[1]

    @property
    def active(self) -> bool:
        """Whether this process writes parts (not failed, and the chief or all workers)."""
        return self.writes and not self.failed

    def note(self, anchor: Anchor) -> None:
        """Keeps an anchor (see `gradwatch._logdata.resume`) for the next part's metadata."""
        add_anchor(self.anchors, anchor)

    def resume(self, step: int, iteration: int) -> None:
        """Marks this run as resumed at `step` from a model at optimizer `iteration`, so
        that the rows of the runs before it from `step` on are superseded. A run that
        wrote parts already (a `GradWatch` used again after a crash) goes on as a new
        run: one run never holds a step twice."""
        if not self.active:
            return
        self.close()
        directory = io.run_directory(self.path, self.worker, self.run)
        if io.part_files(directory):
            self.run = io.new_run_id()
            directory = io.run_directory(self.path, self.worker, self.run)
            try:
                directory.mkdir(parents=True, exist_ok=True)
            except OSError as e:
                self._failed(e)
                return
        self.resumed = [int(step), int(iteration)]

    def room(self) -> int:
        """Recorded steps that may still be drained before a part is due."""
        return self.flush_every - self.pending

    def write(self, block: SinkBlock) -> None:
        """Counts the block (already in the store); writes a part once `flush_every` are
        held, else the live tail where it is due."""
        self.pending += len(block)
        if self.active and self.pending >= self.flush_every:
            self.close()
        elif self.active and self.tail.ready():
            directory = io.run_directory(self.path, self.worker, self.run)
            with deferred_interrupt():  # never half a frame
                self.tail.write(self.store, directory, self._extra(), self.log.steps)

    def _extra(self) -> dict[str, Any]:
        """A part's metadata beyond the store's: the anchors and the `resumed` mark."""
        extra: dict[str, Any] = {"anchors": [list(a) for a in self.anchors]}
        if self.resumed is not None:
            extra["resumed"] = self.resumed
        return extra

    def close(self) -> None:
        """Writes the steps (and examples) held in memory as the next part, then forgets
        them."""
        if not self.active or not (len(self.log) or self.store.examples):
            return
        extra = self._extra()
        # Ctrl-C waits until the part is written and its steps counted as written.
        with deferred_interrupt():
            try:
                _files.append_part(
                    self.store, io.run_directory(self.path, self.worker, self.run), extra
                )
            except OSError as e:
                self._failed(e)
                return
            self.store.clear_blocks()
            self.pending = 0
            self.anchors = []
            self.tail.drop()  # the part holds its steps

    def _failed(self, e: OSError) -> None:
        # Training goes on; the in-memory log keeps every step from here on.
        self.failed = True
        warnings.warn(
            f"GradWatch could not write to '{self.path}' ({e}); it keeps recording in "
            "memory only, and `watch.log` holds every step not written before.",
            stacklevel=3,
        )


def align_fit(model: Any, store: Store, steps: np.ndarray, sink: ParquetSink | None) -> None:
    """Before the first step of a `fit`, after every callback's `on_train_begin` (a
    `keras.callbacks.BackupAndRestore` restores the model there): numbers the steps as
    the optimizer counts them, and supersedes the recorded `steps` that a model restored
    to an earlier iteration trains again (see `gradwatch._logdata.resume`): in the streamed
    run's parts where `sink` writes them, else in the store."""
    active = sink is not None and sink.active
    history = sink.history if active else None
    superseded = align(model, history, None if sink is None else sink.path)
    step, iteration = next_step(model), first_step(model)
    mine = len(steps) > 0 and steps[-1] >= step  # this watch's, not yet written
    if active:
        if mine:
            superseded = step if superseded is None else min(superseded, step)
        if superseded is not None:
            sink.resume(superseded, iteration)
        sink.note((step, iteration))
    elif mine:
        store.add_superseded(store.split_from(step))


class TensorBoardSink:
    """Writes each drained block as TensorBoard summaries, at its step numbers: the
    `norm` stat (where recorded) and the histograms (where recorded)."""

    def __init__(self, logdir: Path):
        self.logdir = logdir
        self.writer: Any = None  # a gradwatch.tensorboard.TensorBoardWriter once used
        self.failed = False

    def write(self, block: SinkBlock) -> None:
        if self.failed:
            return
        if self.writer is None:
            from gradwatch.tensorboard import TensorBoardWriter

            self.writer = TensorBoardWriter(self.logdir)
        norms = block.stats.get("norm")
        try:
            self.writer.write(
                block.steps, block.keys, norms, block.histograms, block.bins_per_decade
            )
        except OSError as e:
            # As with `path`: training goes on, and the log keeps every step.
            self.failed = True
            warnings.warn(
                f"GradWatch could not write TensorBoard summaries to '{self.logdir}' "
                f"({e}); it stops writing them, and `watch.log` keeps every step.",
                stacklevel=2,
            )

    def close(self) -> None:
        if self.writer is not None:
            with contextlib.suppress(OSError):
                self.writer.close()


class UserSink:
    """A sink from `GradWatch(sinks=...)`, guarded: its first error (in `write` or
    `close`) warns and stops it, and training goes on. Its `close` is called all the same."""

    def __init__(self, sink: Sink):
        self.sink = sink
        self.failed = False

    def write(self, block: SinkBlock) -> None:
        if self.failed:
            return
        try:
            self.sink.write(block)
        except Exception as e:  # the user's code: training goes on without it
            self._failed("write", e)

    def close(self) -> None:
        try:
            self.sink.close()
        except Exception as e:
            self._failed("close", e)

    def _failed(self, method: str, e: Exception) -> None:
        if self.failed:  # warned once already: this error likely follows from that one
            return
        self.failed = True
        warnings.warn(
            f"GradWatch's sink {self.sink!r} raised {type(e).__name__} in `{method}`: {e}. "
            "It gets no further blocks; training goes on, and `watch.log` keeps every step.",
            stacklevel=3,
        )


class Sinks:
    """A watch's sinks, in order: TensorBoard and the streamed Parquet log where asked
    for, then the user's own. Each drained block goes to each sink, and each is closed
    once at the end of a `fit`. Also the streamed run's bookkeeping: its anchors and
    the alignment of the step count at the start of a `fit` (`align`). The trackers of
    `track=` (`gradwatch._capture.trackers`) come last."""

    def __init__(self, watch: Any, log: Any, store: Store):
        self.store = store
        self.parquet = (
            None
            if watch.path is None
            else ParquetSink(watch.path, watch.flush_every, watch.all_workers, log, store)
        )
        tensorboard = (
            None if watch.tensorboard_dir is None else TensorBoardSink(watch.tensorboard_dir)
        )
        builtin = [s for s in (tensorboard, self.parquet) if s is not None]
        # The experiment trackers of `track=` come last: at the end of a `fit` they read
        # the whole log (the streamed part written) for the findings and the report.
        self.trackers = make_trackers(watch, lambda: watch.log)
        self.sinks: list[Sink] = [*builtin, *(UserSink(s) for s in watch.sinks), *self.trackers]
        self.open = False  # between the start of a `fit` and the sinks' `close`
        self.aligned = True  # the step count, once a `fit` has begun (`align`)

    def __bool__(self) -> bool:
        return bool(self.sinks)

    def begin(self, model: Any, watch: Any) -> None:
        """At the start of a `fit`: prepares `path` (refusing a log it cannot continue)."""
        if self.parquet is not None:
            self.parquet.open(model, watch.stats, watch.histogram or None, watch.per_replica)
        # Every worker of a multi-worker run records the same global gradients: as the
        # streamed log, the trackers get them from the chief alone, unless `all_workers`.
        _, chief = _backend.worker_of(model)
        for tracker in self.trackers:  # finds the run to log into (W&B: refuses none)
            if chief or watch.all_workers:
                tracker.begin()
        self.open, self.aligned = True, False

    def align(self, model: Any, steps: np.ndarray) -> None:
        """Once per `fit`, before its first step: see `align_fit`."""
        if not self.aligned:
            self.aligned = True
            align_fit(model, self.store, steps, self.parquet)

    def tail_due(self) -> bool:
        """Whether the streamed log's live tail wants the recorded steps drained now."""
        sink = self.parquet
        return sink is not None and sink.active and sink.tail.due()

    def room(self) -> int | None:
        """Recorded steps that may still be drained before a part is due (None: no parts)."""
        sink = self.parquet
        return sink.room() if sink is not None and sink.writes else None

    def note_anchor(self, model: Any) -> None:
        """Notes where the model's step count stands against its optimizer's, for the
        next part (see `gradwatch._logdata.resume`)."""
        pair = anchor(model)
        if pair is not None and self.parquet is not None:
            self.parquet.note(pair)

    def write_part(self) -> None:
        """Writes what memory holds to `path`, where streaming."""
        if self.parquet is not None:
            self.parquet.close()

    def read_back(self) -> Any:
        """The log written to `path`, or None where memory holds it (`ParquetSink.read_back`)."""
        return None if self.parquet is None else self.parquet.read_back()

    def write(self, block: SinkBlock) -> None:
        for sink in self.sinks:
            sink.write(block)

    def close(self) -> None:
        """Closes every sink once per `fit` (a second call does nothing); an error of
        one is raised after the others are closed."""
        if not self.open:
            return
        self.open = False
        error: Exception | None = None
        for sink in self.sinks:
            try:
                sink.close()
            except Exception as e:
                error = error or e
        if error is not None:
            raise error
