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

import os
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np

from gradwatch._logdata.event_file import EventFile
from gradwatch._logdata.tb_summary import (
    GLOBAL_NORM_TAG,
    HISTOGRAM_TAG,
    NORM_TAG,
    step_summaries,
    summary_event,
)
from gradwatch.log import GradientLog, store_of
from gradwatch.stats import histogram_bin_count

__all__ = ["GLOBAL_NORM_TAG", "HISTOGRAM_TAG", "NORM_TAG", "TensorBoardWriter", "write_tensorboard"]


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
        self._writer = EventFile(self.logdir)
        self._tagged: set[str] = set()  # tags whose metadata this file has

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
        summaries = step_summaries(steps, keys, norms, histograms, bins_per_decade, self._tagged)
        now = time.time()
        self._writer.write(summary_event(step, summary, now) for step, summary in summaries)
        for _, summary in summaries:
            self._tagged.update(v.tag for v in summary.value)

    def close(self) -> None:
        """Flushes and closes the event file; a later `write` opens a new one."""
        self._writer.close()
        self._tagged.clear()

    def __enter__(self) -> TensorBoardWriter:
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()


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
