"""Where a watch's drained blocks go besides memory: the streamed Parquet dataset
(`path=`) and TensorBoard summaries (`tensorboard_dir=`).

A sink takes each drained block (`write(block, keys)`) and is closed at the end
(`close()`). A failed write warns once; training goes on, and the in-memory log
keeps every step.
"""

from __future__ import annotations

import contextlib
import warnings
from pathlib import Path
from typing import Any

from gradwatch import _files, io
from gradwatch._backend import current as _backend
from gradwatch._resume import Anchor, add_anchor
from gradwatch._signals import deferred_interrupt
from gradwatch._store import Store
from gradwatch.buffer import Drained


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

    @property
    def active(self) -> bool:
        """Whether this process writes parts (not failed, and the chief or all workers)."""
        return self.writes and not self.failed

    def note(self, anchor: Anchor) -> None:
        """Keeps an anchor (see `gradwatch._resume`) for the next part's metadata."""
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

    def write(self, block: Drained, keys: list[str]) -> None:
        """Counts the block (already in the store); writes a part once `flush_every` are held."""
        self.pending += len(block.steps)
        if self.active and self.pending >= self.flush_every:
            self.close()

    def close(self) -> None:
        """Writes the steps held in memory as the next part, then forgets them."""
        if not self.active or not len(self.log):
            return
        extra: dict[str, Any] = {"anchors": [list(a) for a in self.anchors]}
        if self.resumed is not None:
            extra["resumed"] = self.resumed
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

    def _failed(self, e: OSError) -> None:
        # Training goes on; the in-memory log keeps every step from here on.
        self.failed = True
        warnings.warn(
            f"GradWatch could not write to '{self.path}' ({e}); it keeps recording in "
            "memory only, and `watch.log` holds every step not written before.",
            stacklevel=3,
        )


class TensorBoardSink:
    """Writes each drained block as TensorBoard summaries, at its step numbers: the
    `norm` stat (where recorded) and the histograms (with `histogram`)."""

    def __init__(self, logdir: Path, stats: list[str], bins_per_decade: int | None):
        self.logdir = logdir
        self.stats = list(stats)
        self.bins_per_decade = bins_per_decade
        self.writer: Any = None  # a gradwatch.tensorboard.TensorBoardWriter once used
        self.failed = False

    def write(self, block: Drained, keys: list[str]) -> None:
        if self.failed:
            return
        if self.writer is None:
            from gradwatch.tensorboard import TensorBoardWriter

            self.writer = TensorBoardWriter(self.logdir)
        norms = block.stats[:, :, self.stats.index("norm")] if "norm" in self.stats else None
        try:
            self.writer.write(block.steps, keys, norms, block.hist, self.bins_per_decade)
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
