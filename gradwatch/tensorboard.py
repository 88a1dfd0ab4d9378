"""TensorBoard summaries of gradient norms and histograms, written without TensorFlow.

What is written, at the log's step numbers:

- `norm/<key>`: each variable's gradient norm (scalars);
- `global_norm`: `sqrt(sum_v norm_v**2)` over the variables with a norm, as
  `GradientLog.global_norm` (a scalar);
- `log10_abs_grad/<key>`: with histograms recorded, each variable's histogram
  of `log10 |g|` over its finite, non-zero gradient elements: one bucket per
  gradwatch magnitude bin, positive and negative elements together. The end
  buckets also hold `|g| < 1e-12` and `|g| >= 1e4`; exact zeros and NaN/Inf
  are left out (they are in the `zero_frac` and `nonfinite` stats).

The event files are written with TensorBoard's own record writer and protos
(`tensorboard.compat.proto`), as `torch.utils.tensorboard` writes them, so
TensorFlow is never imported: the same files come from every Keras backend.
"""

from __future__ import annotations

import itertools
import os
import socket
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch.log import GradientLog, global_norms, store_of
from gradwatch.stats import HIST_MIN_EXP, histogram_bin_count

NORM_TAG = "norm/"
GLOBAL_NORM_TAG = "global_norm"
HISTOGRAM_TAG = "log10_abs_grad/"
_HISTOGRAM_DESCRIPTION = (
    "gradwatch: histogram of log10 |g| over the finite, non-zero gradient elements; "
    "the end buckets also hold |g| < 1e-12 and |g| >= 1e4."
)


class TensorBoardWriter:
    """Writes blocks of recorded steps as TensorBoard summaries into `logdir`.

    Each block goes in with one event per step (all of that step's values in
    one `Summary`), and the file is flushed after each block, so a running
    TensorBoard sees it. Use it as a context manager, or call `close()`.

    Args:
        logdir: The TensorBoard log directory; created if missing.

    Example:

    ```python
    with TensorBoardWriter("runs/tb") as writer:
        writer.write(steps, keys, norms=norms)
    ```
    """

    def __init__(self, logdir: str | os.PathLike):
        if not isinstance(logdir, (str, os.PathLike)):
            raise TypeError(
                "`logdir` must be a directory path (str or os.PathLike). "
                f"Received: logdir={logdir!r}"
            )
        self.logdir = Path(logdir)
        self._writer: Any = None
        self._tagged: set[str] = set()  # tags whose metadata this writer has written

    def write(
        self,
        steps: Sequence[int] | np.ndarray,
        keys: Sequence[str],
        norms: np.ndarray | None = None,
        histograms: np.ndarray | None = None,
        bins_per_decade: int | None = None,
    ) -> None:
        """Writes k recorded steps.

        Args:
            steps: The k step numbers.
            keys: The n variable keys, in the column order of `norms` and
                `histograms`.
            norms: Gradient norms, shape `(k, n)`. Defaults to `None` (none).
            histograms: Counts in the bins of `gradwatch.stats.histogram_bins`,
                shape `(k, n, n_bins)`. Defaults to `None` (none).
            bins_per_decade: The histograms' resolution; needed with
                `histograms`. Defaults to `None`.
        """
        writer = self._open()  # first: it says how to install tensorboard if it is missing
        from tensorboard.compat.proto import event_pb2, summary_pb2

        steps = np.asarray(steps, np.int64)
        magnitudes = None
        if histograms is not None:
            if bins_per_decade is None:
                raise ValueError("`histograms` need `bins_per_decade`.")
            histograms = np.asarray(histograms)
            magnitudes, edges = _magnitude_counts(histograms, bins_per_decade)
            totals = histograms.sum(axis=2)
        if norms is not None:
            norms = np.asarray(norms, np.float64)
            global_norm = global_norms(norms)
        for row, step in enumerate(steps):
            summary = summary_pb2.Summary()
            # NaN norms (disconnected variables) and histograms with no element
            # (not recorded for that variable) are left out.
            if norms is not None:
                for key, value in zip(keys, norms[row], strict=True):
                    if not np.isnan(value):
                        self._scalar(summary, NORM_TAG + key, value)
                if not np.isnan(global_norm[row]):
                    self._scalar(summary, GLOBAL_NORM_TAG, global_norm[row])
            if magnitudes is not None:
                for key, counts, total in zip(keys, magnitudes[row], totals[row], strict=True):
                    if total:
                        self._histogram(summary, HISTOGRAM_TAG + key, edges, counts)
            event = event_pb2.Event(wall_time=time.time(), step=int(step), summary=summary)
            writer.write(event.SerializeToString())
        writer.flush()

    def _open(self) -> Any:
        if self._writer is None:
            try:
                from tensorboard.compat.proto import event_pb2
                from tensorboard.summary.writer.record_writer import RecordWriter
            except ImportError as e:
                raise ImportError(
                    "gradwatch.tensorboard writes event files with the tensorboard package, "
                    "which is not installed. Install it with: pip install tensorboard"
                ) from e

            self.logdir.mkdir(parents=True, exist_ok=True)
            # TensorBoard's naming: `events.out.tfevents.<time>.<host>.<pid>.<n>`; the
            # counter keeps two writers of one process apart within a second.
            name = "events.out.tfevents.%010d.%s.%s.%s" % (  # noqa: UP031
                time.time(),
                socket.gethostname(),
                os.getpid(),
                next(_file_numbers),
            )
            self._writer = RecordWriter(open(self.logdir / name, "wb"))  # noqa: SIM115
            start = event_pb2.Event(wall_time=time.time(), file_version="brain.Event:2")
            self._writer.write(start.SerializeToString())
        return self._writer

    def _metadata(self, value: Any, tag: str, plugin: str, description: str = "") -> None:
        if tag in self._tagged:  # TensorBoard reads a tag's metadata from its first value
            return
        self._tagged.add(tag)
        value.metadata.plugin_data.plugin_name = plugin
        if description:
            value.metadata.summary_description = description

    def _scalar(self, summary: Any, tag: str, number: float) -> None:
        from tensorboard.compat.proto import types_pb2

        value = summary.value.add(tag=tag)
        self._metadata(value, tag, "scalars")
        value.tensor.dtype = types_pb2.DT_FLOAT
        value.tensor.float_val.append(float(number))

    def _histogram(self, summary: Any, tag: str, edges: np.ndarray, counts: np.ndarray) -> None:
        from tensorboard.compat.proto import types_pb2

        value = summary.value.add(tag=tag)
        self._metadata(value, tag, "histograms", _HISTOGRAM_DESCRIPTION)
        buckets = np.stack([edges[:-1], edges[1:], counts.astype(np.float64)], axis=1)
        value.tensor.dtype = types_pb2.DT_DOUBLE
        value.tensor.tensor_shape.dim.add(size=buckets.shape[0])
        value.tensor.tensor_shape.dim.add(size=3)
        value.tensor.tensor_content = buckets.astype("<f8").tobytes()

    def close(self) -> None:
        """Flushes and closes the event file; a later `write` opens a new one."""
        if self._writer is not None:
            self._writer.close()
            self._writer = None
            self._tagged.clear()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


_file_numbers = itertools.count()


def _magnitude_counts(hist: np.ndarray, bins_per_decade: int) -> tuple[np.ndarray, np.ndarray]:
    """`(k, n, n_bins)` signed counts -> `(k, n, K)` counts by magnitude, and the K + 1
    edges in log10 |g|."""
    k = histogram_bin_count(bins_per_decade) // 2 - 1  # bins per sign
    negative = hist[..., :k][..., ::-1]  # "-" bins run from the most negative value up
    positive = hist[..., k + 1 : 2 * k + 1]
    edges = HIST_MIN_EXP + np.arange(k + 1) / bins_per_decade
    return negative + positive, edges


def write_tensorboard(log: GradientLog, logdir: str | os.PathLike, progress: bool = False) -> Path:
    """Writes a log's norms and histograms as TensorBoard summaries.

    The same summaries that `GradWatch(tensorboard_dir=...)` writes while
    training, at the log's step numbers.

    Args:
        log: A `GradientLog` with the `norm` stat, histograms, or both.
        logdir: The TensorBoard log directory; created if missing.
        progress: Show a progress bar (tqdm) over the steps. Defaults to `False`.

    Returns:
        The log directory.

    Raises:
        ValueError: If the log has neither `norm` nor histograms.

    Example:

    ```python
    write_tensorboard(gradwatch.read_log("grads.parquet"), "runs/tb")
    # then: tensorboard --logdir runs/tb
    ```
    """
    if "norm" not in log.stat_names and log.bins_per_decade is None:
        raise ValueError(
            "The log has neither the `norm` stat nor histograms, which is what TensorBoard "
            f"gets. Recorded stats: {list(log.stat_names)}. Record them with "
            "GradWatch(stats=[..., 'norm'], histogram=True)."
        )
    from gradwatch.progress import progress_bar

    # One write per step with all its values: TensorBoard drops the events after a
    # step that goes backwards, so norms and histograms must not go in separate passes.
    with (
        TensorBoardWriter(logdir) as writer,
        progress_bar(len(log.steps), "tensorboard", unit="step", enabled=progress) as bar,
    ):
        for steps, keys, norms, hist in _chunks(log):
            writer.write(steps, keys, norms, hist, log.bins_per_decade)
            bar.update(len(steps))
    return Path(logdir)


def _chunks(log: GradientLog, size: int = 256) -> Iterator[tuple[np.ndarray, list[str], Any, Any]]:
    """The log in runs of `size` steps: `(steps, keys, norms or None, histograms or None)`."""
    hist_blocks = store_of(log).hist_blocks
    wide = log.stat("norm") if "norm" in log.stat_names else None
    if wide is not None:
        keys = list(wide.columns)
    else:
        codes = np.unique(np.concatenate([b.codes for b in hist_blocks] or [[]]))
        keys = [log.variables[int(c)] for c in codes]
    column = {log.variables.index(k): i for i, k in enumerate(keys)}
    n_bins = None
    if log.bins_per_decade is not None:
        n_bins = histogram_bin_count(log.bins_per_decade)
    steps = log.steps
    for start in range(0, len(steps), size):
        chunk = steps[start : start + size]
        norms = None if wide is None else wide.reindex(chunk).to_numpy(np.float64)
        hist = None
        if n_bins is not None:
            hist = np.zeros((len(chunk), len(keys), n_bins), np.int64)
            for b in hist_blocks:
                rows = np.searchsorted(chunk, b.steps)
                inside = (rows < len(chunk)) & (chunk[np.minimum(rows, len(chunk) - 1)] == b.steps)
                if not inside.any():
                    continue
                cols = [column[int(c)] for c in b.codes]
                hist[np.ix_(rows[inside], cols)] = b.data[inside]
        yield chunk, keys, norms, hist
