"""TensorBoard summaries of gradient norms and histograms, as protos: pure functions
from arrays to `Summary` and `Event` messages, with no I/O (`_event_file` writes them).

The protos are TensorBoard's own (`tensorboard.compat.proto`), so TensorFlow is never
imported.
"""

from __future__ import annotations

import functools
from collections.abc import Collection, Sequence
from types import SimpleNamespace
from typing import Any

import numpy as np

from gradwatch.log import global_norms
from gradwatch.stats import HIST_MIN_EXP, histogram_bin_count

NORM_TAG = "norm/"
GLOBAL_NORM_TAG = "global_norm"
HISTOGRAM_TAG = "log10_abs_grad/"
HISTOGRAM_DESCRIPTION = (
    "gradwatch: histogram of log10 |g| over the finite, non-zero gradient elements; "
    "the end buckets also hold |g| < 1e-12 and |g| >= 1e4."
)


@functools.cache
def protos() -> SimpleNamespace:
    """TensorBoard's proto modules, as `event`, `summary` and `types`; without the
    tensorboard package, an ImportError that names the install line."""
    try:
        from tensorboard.compat.proto import event_pb2, summary_pb2, types_pb2
    except ImportError as e:
        raise ImportError(
            "gradwatch.tensorboard writes event files with the tensorboard package, "
            "which is not installed. Install it with: pip install tensorboard"
        ) from e
    return SimpleNamespace(event=event_pb2, summary=summary_pb2, types=types_pb2)


def magnitude_counts(hist: np.ndarray, bins_per_decade: int) -> tuple[np.ndarray, np.ndarray]:
    """gradwatch's signed histogram counts `(..., n_bins)` (the bins of
    `gradwatch.stats.histogram_bins`) -> counts by magnitude `(..., K)`, the negative
    and positive bins of each |g| added up, and the K + 1 bucket edges in log10 |g|.
    Exact zeros and NaN/Inf (the middle and last bins) are left out.

    >>> hist = np.zeros(34, np.int64)  # 1 bin per decade: 16 a sign, zeros, non-finite
    >>> hist[[15, 17, 32, 16, 33]] = [3, 2, 1, 5, 4]  # -[1e-12, 1e-11), +[1e-12, 1e-11),
    >>> counts, edges = magnitude_counts(hist, 1)  # +[1e3, 1e4), zeros, NaN
    >>> counts[0].item(), counts[15].item(), counts.sum().item(), counts.shape
    (5, 1, 6, (16,))
    >>> edges[0].item(), edges[1].item(), edges[-1].item()
    (-12.0, -11.0, 4.0)
    """
    k = histogram_bin_count(bins_per_decade) // 2 - 1  # bins per sign
    negative = hist[..., :k][..., ::-1]  # "-" bins run from the most negative value up
    positive = hist[..., k + 1 : 2 * k + 1]
    edges = HIST_MIN_EXP + np.arange(k + 1) / bins_per_decade
    return negative + positive, edges


def scalar_value(summary: Any, tag: str, number: float, metadata: bool) -> Any:
    """Adds a scalar (float32, TensorBoard's scalars plugin) to `summary`; returns it."""
    types = protos().types
    value = summary.value.add(tag=tag)
    if metadata:
        value.metadata.plugin_data.plugin_name = "scalars"
    value.tensor.dtype = types.DT_FLOAT
    value.tensor.float_val.append(float(number))
    return value


def histogram_value(
    summary: Any, tag: str, edges: np.ndarray, counts: np.ndarray, metadata: bool
) -> Any:
    """Adds a histogram (TensorBoard's histograms plugin: a `(K, 3)` float64 tensor of
    `[left edge, right edge, count]` rows) to `summary`; returns it."""
    types = protos().types
    value = summary.value.add(tag=tag)
    if metadata:
        value.metadata.plugin_data.plugin_name = "histograms"
        value.metadata.summary_description = HISTOGRAM_DESCRIPTION
    buckets = np.stack([edges[:-1], edges[1:], np.asarray(counts, np.float64)], axis=1)
    value.tensor.dtype = types.DT_DOUBLE
    value.tensor.tensor_shape.dim.add(size=buckets.shape[0])
    value.tensor.tensor_shape.dim.add(size=3)
    value.tensor.tensor_content = buckets.astype("<f8").tobytes()
    return value


def step_summaries(
    steps: Sequence[int] | np.ndarray,
    keys: Sequence[str],
    norms: np.ndarray | None = None,
    histograms: np.ndarray | None = None,
    bins_per_decade: int | None = None,
    described: Collection[str] = (),
) -> list[tuple[int, Any]]:
    """`(step, Summary)` for each of the k `steps`, from the rows of `norms` `(k, n)`
    and `histograms` `(k, n, n_bins)`, the n columns named by `keys`: `norm/<key>`
    and `global_norm` scalars, and `log10_abs_grad/<key>` histograms. A NaN norm (a
    variable without a gradient at that step) and a histogram with no element (none
    recorded for that variable at that step) are left out. TensorBoard reads a tag's
    plugin from its first value: the first value of each tag not in `described`
    carries it."""
    summary_pb2 = protos().summary
    if histograms is not None and bins_per_decade is None:
        raise ValueError("`histograms` need `bins_per_decade`.")
    steps = np.asarray(steps, np.int64)
    for name, array in (("norms", norms), ("histograms", histograms)):
        if array is not None and len(array) != len(steps):
            raise ValueError(
                f"`{name}` needs one row per step: {len(steps)} steps. "
                f"Received: {name} of shape {np.shape(array)}"
            )
    if norms is not None:
        norms = np.asarray(norms, np.float64)
        global_norm = global_norms(norms)
    if histograms is not None:
        histograms = np.asarray(histograms)
        magnitudes, edges = magnitude_counts(histograms, bins_per_decade)
        totals = histograms.sum(axis=2)
    seen = set(described)
    out = []
    for row, step in enumerate(steps.tolist()):
        summary = summary_pb2.Summary()
        if norms is not None:
            for key, number in zip(keys, norms[row], strict=True):
                if not np.isnan(number):
                    scalar_value(summary, NORM_TAG + key, number, NORM_TAG + key not in seen)
            if not np.isnan(global_norm[row]):
                scalar_value(
                    summary, GLOBAL_NORM_TAG, global_norm[row], GLOBAL_NORM_TAG not in seen
                )
        if histograms is not None:
            for key, counts, total in zip(keys, magnitudes[row], totals[row], strict=True):
                if total:
                    tag = HISTOGRAM_TAG + key
                    histogram_value(summary, tag, edges, counts, tag not in seen)
        seen.update(v.tag for v in summary.value)
        out.append((step, summary))
    return out


def summary_event(step: int, summary: Any, wall_time: float) -> Any:
    """The `Event` of a step's summary."""
    return protos().event.Event(wall_time=wall_time, step=int(step), summary=summary)


def file_version_event(wall_time: float) -> Any:
    """The `Event` an event file starts with."""
    return protos().event.Event(wall_time=wall_time, file_version="brain.Event:2")
