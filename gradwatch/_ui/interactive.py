"""The data of the HTML report's interactive charts (plotly.js): the norms, the loss and the
heatmap, read from the log, with long runs binned, and written as one JSON object.

Computes no gradient statistic: every value is the log's (`log.stat`, `log.by_layer`,
`log.global_norm`, `log.scalars`), at a recorded step. On a run of more than `MAX_POINTS`
steps a line keeps, in each bin of consecutive steps, the steps of its smallest and its
largest value (so a spike is never lost), and a heatmap cell is the largest value of its
bin.
"""

from __future__ import annotations

import base64
import json
import math
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

from gradwatch._ui.chart_parts import chart_rows, nonfinite_alerts, worst
from gradwatch.log import GradientLog

#: The most points of one line: past it, the steps are binned (two points per bin).
MAX_POINTS = 2000
#: The most columns of the heatmap: past it, the steps are binned (one column per bin).
MAX_COLUMNS = 1000
#: The lines of the norms chart shown at first (the others one click away in its legend),
#: chosen as `gradwatch.plot.norms` chooses its coloured lines.
SHOWN_LINES = 10
#: The heatmap rows shown at first (the others in its layer picker).
SHOWN_ROWS = 100
#: The most red spans of non-finite steps; past it, the spans are those of the line bins.
_MAX_SPANS = 500


@dataclass
class Line:
    """One line: its name, its label, and its points as positions in `ChartData.steps`
    and their values (NaN where the log has none, or none a log scale can draw)."""

    name: str
    label: str
    positions: np.ndarray  # int64, increasing (a bin's two points may be the same step)
    values: np.ndarray  # float64
    shown: bool = True


@dataclass
class ChartData:
    """What the interactive charts draw, as the log holds it.

    Attributes:
        steps: The recorded steps (int64).
        by: `"layer"` or `"variable"`: what a line and a heatmap row are.
        prefix: The prefix every line's name shares (left out of the labels).
        bin_size: Steps per bin of the lines (1: every step).
        norms: The norms chart's lines, in model order (`log.stat("norm")` or
            `log.by_layer("norm")`, values <= 0 as NaN: a log scale has no place for them).
        loss, learning_rate: The loss and learning rate lines, or `None` without them.
        loss_log: Whether the loss is drawn on a log scale (as `gradwatch.plot.loss`).
        global_norm: `log.global_norm()`, values <= 0 as NaN.
        heat_size: Steps per column of the heatmap (1: every step).
        heat: The heatmap, rows x columns: the largest finite |norm| of each bin (NaN
            where there is none).
        heat_bad: Rows x columns: a NaN/Inf gradient of the row in the bin.
        heat_shown: Per row, whether it is shown at first.
        spans: `(first, last)` steps of each run of steps with a NaN/Inf gradient.
    """

    steps: np.ndarray
    by: str
    prefix: str
    bin_size: int
    norms: list[Line]
    loss: Line | None
    learning_rate: Line | None
    loss_log: bool
    global_norm: Line
    heat_size: int
    heat: np.ndarray
    heat_bad: np.ndarray
    heat_shown: np.ndarray
    spans: list[tuple[int, int]]


def bin_size(n: int, most: int) -> int:
    """Steps per bin so that `n` steps make at most `most` bins (1: no binning)."""
    return 1 if n <= most else math.ceil(n / most)


def min_max_positions(values: np.ndarray, size: int) -> np.ndarray:
    """The positions a line keeps of `values` (steps x lines): all of them with `size`
    1; else, in each bin of `size` consecutive steps, the positions of each line's
    smallest and largest finite value, in step order (the bin's first step where it has
    none). Returns lines x positions, int64.

    >>> min_max_positions(np.array([[1.0], [5.0], [2.0], [0.5], [np.nan], [3.0]]), 3).tolist()
    [[0, 1, 3, 5]]
    """
    n, k = values.shape
    if size == 1:
        return np.broadcast_to(np.arange(n, dtype=np.int64), (k, n)).copy()
    count = math.ceil(n / size)
    padded = np.full((count * size, k), np.nan)
    padded[:n] = values
    cube = padded.reshape(count, size, k)
    finite = np.isfinite(cube)
    low = np.where(finite, cube, np.inf).argmin(axis=1)  # count x k; 0 where none is finite
    high = np.where(finite, cube, -np.inf).argmax(axis=1)
    start = (np.arange(count) * size)[:, None]
    pair = np.stack([np.minimum(low, high), np.maximum(low, high)], axis=1) + start[:, None]
    return pair.transpose(2, 0, 1).reshape(k, 2 * count).astype(np.int64)


def bin_largest(values: np.ndarray, size: int) -> np.ndarray:
    """Each bin's largest finite |value| (steps x rows in, bins x rows out; NaN where the
    bin has none)."""
    n, k = values.shape
    count = math.ceil(n / size)
    padded = np.full((count * size, k), np.nan)
    padded[:n] = values
    cube = padded.reshape(count, size, k)
    finite = np.isfinite(cube)
    largest = np.where(finite, np.abs(cube), -np.inf).max(axis=1)
    largest[~finite.any(axis=1)] = np.nan
    return largest


def chart_data(
    log: GradientLog,
    max_points: int | None = None,
    max_columns: int | None = None,
    shown_lines: int | None = None,
    shown_rows: int | None = None,
) -> ChartData:
    """The interactive charts' data of a log that recorded `norm`: by layer above 30
    variables, as `gradwatch.plot`'s charts (`by="auto"`). The limits default to this
    module's `MAX_POINTS`, `MAX_COLUMNS`, `SHOWN_LINES` and `SHOWN_ROWS`."""
    max_points = MAX_POINTS if max_points is None else max_points
    max_columns = MAX_COLUMNS if max_columns is None else max_columns
    shown_lines = SHOWN_LINES if shown_lines is None else shown_lines
    shown_rows = SHOWN_ROWS if shown_rows is None else shown_rows
    rows = chart_rows(log, "norm", "auto")
    wide = rows.wide.astype(np.float64)
    steps = wide.index.to_numpy(np.int64)
    n = len(steps)
    positive = wide.where(wide > 0).to_numpy()  # as `plot.norms` draws them
    size = bin_size(n, max(1, max_points // 2))
    picks = min_max_positions(positive, size)
    shown = set(range(len(rows.names)))
    if len(rows.names) > shown_lines:
        shown = set(worst(rows, wide.where(wide > 0), shown_lines))
    norms = [
        Line(name, label, picks[i], positive[picks[i], i], i in shown)
        for i, (name, label) in enumerate(zip(rows.names, rows.labels, strict=True))
    ]
    scalars = log.scalars.set_index("step").reindex(steps)
    loss = _scalar_line(scalars["loss"], "loss", size)
    rate = _scalar_line(scalars["learning_rate"], "learning rate", size)
    finite_loss = scalars["loss"].to_numpy(np.float64)
    finite_loss = finite_loss[np.isfinite(finite_loss)]
    loss_log = bool(
        len(finite_loss) and finite_loss.min() > 0 and finite_loss.max() > 100 * finite_loss.min()
    )
    global_norm = log.global_norm().reindex(steps)
    global_line = _scalar_line(global_norm.where(global_norm > 0), "global norm", size)
    # The heatmap: non-finite cells are marked red as in `plot.heatmap`, from the alerts.
    heat_size = bin_size(n, max_columns)
    heat = bin_largest(wide.to_numpy(), heat_size)
    where_bad = np.zeros((n, len(rows.names)), bool)
    at = pd.Index(steps).get_indexer(rows.bad["step"].to_numpy(np.int64))
    row = pd.Index(rows.names).get_indexer(rows.bad["name"].to_numpy(object))
    known = (at >= 0) & (row >= 0)
    where_bad[at[known], row[known]] = True
    bad_bins = bin_any(where_bad, heat_size)
    heat_shown = np.ones(len(rows.names), bool)
    if len(rows.names) > shown_rows:
        heat_shown[:] = False
        heat_shown[worst(rows, wide.where(wide > 0), shown_rows)] = True
    bad_steps = np.unique(nonfinite_alerts(log)["step"].to_numpy(np.int64))
    return ChartData(
        steps=steps,
        by=rows.by,
        prefix=rows.prefix,
        bin_size=size,
        norms=norms,
        loss=loss,
        learning_rate=rate,
        loss_log=loss_log,
        global_norm=global_line if global_line is not None else _empty_line("global norm", n),
        heat_size=heat_size,
        heat=heat.T,
        heat_bad=bad_bins.T,
        heat_shown=heat_shown,
        spans=_spans(bad_steps, steps, size),
    )


def bin_any(flags: np.ndarray, size: int) -> np.ndarray:
    """Whether each bin of `size` consecutive steps has a flag (steps x rows in, bins x
    rows out)."""
    n, k = flags.shape
    count = math.ceil(n / size) if n else 0
    padded = np.zeros((count * size, k), bool)
    padded[:n] = flags
    return padded.reshape(count, size, k).any(axis=1)


def _scalar_line(series: pd.Series, name: str, size: int) -> Line | None:
    if not series.notna().any():
        return None
    values = series.to_numpy(np.float64)
    picks = min_max_positions(values[:, None], size)[0]
    return Line(name, name, picks, values[picks])


def _empty_line(name: str, n: int) -> Line:
    return Line(name, name, np.arange(n, dtype=np.int64), np.full(n, np.nan))


def _spans(bad: np.ndarray, steps: np.ndarray, size: int) -> list[tuple[int, int]]:
    """Runs of consecutive recorded steps with a NaN/Inf gradient, as `(first, last)`;
    past `_MAX_SPANS` runs, those of the line bins that hold one."""
    bad = bad[np.isin(bad, steps)]
    if not len(bad):
        return []
    pos = np.searchsorted(steps, bad)
    if len(np.nonzero(np.diff(pos) != 1)[0]) >= _MAX_SPANS:
        bins = np.unique(pos // size)
        pos = bins * size  # a run of bins spans from its first bin's start ...
        ends = np.minimum((bins + 1) * size, len(steps)) - 1  # ... to its last bin's end
        breaks = np.nonzero(np.diff(bins) != 1)[0] + 1
        return [
            (int(steps[p[0]]), int(steps[e[-1]]))
            for p, e in zip(np.split(pos, breaks), np.split(ends, breaks), strict=True)
        ]
    breaks = np.nonzero(np.diff(pos) != 1)[0] + 1
    return [(int(run[0]), int(run[-1])) for run in np.split(bad, breaks)]


def _array(values: np.ndarray, dtype: str) -> str:
    """An array as base64 of its little-endian bytes: compact, and exactly the numbers."""
    return base64.b64encode(np.ascontiguousarray(values, dtype=dtype).tobytes()).decode("ascii")


def _line_json(line: Line, at: str) -> dict[str, Any]:
    return {
        "name": line.name,
        "label": line.label,
        "shown": line.shown,
        # Every step (no binning): the page makes the positions itself.
        "at": None if _every_step(line.positions) else _array(line.positions, at),
        "values": _array(line.values, "<f4"),
    }


def _every_step(positions: np.ndarray) -> bool:
    return bool(np.array_equal(positions, np.arange(len(positions))))


def to_json(data: ChartData) -> str:
    """The chart data as JSON, safe inside an HTML `<script>` element: the steps and
    values as base64 of little-endian arrays (the steps float64, exact to 2**53; the
    lines' positions uint16 or int32; the values float32, the precision the log records
    its stats in), decoded by the page."""
    # The positions in 2 bytes where they fit (up to 65,536 recorded steps), else 4.
    at = "<u2" if len(data.steps) <= 1 << 16 else "<i4"

    def line(x: Line | None) -> dict[str, Any] | None:
        return None if x is None else _line_json(x, at)

    out = {
        "steps": _array(data.steps, "<f8"),
        "atBytes": int(at[-1]),
        "by": data.by,
        "prefix": data.prefix,
        "binSize": data.bin_size,
        "norms": [line(x) for x in data.norms],
        "loss": line(data.loss),
        "learningRate": line(data.learning_rate),
        "lossLog": data.loss_log,
        "globalNorm": line(data.global_norm),
        "heat": {
            "size": data.heat_size,
            "columns": int(data.heat.shape[1]),
            "values": _array(data.heat, "<f4"),
            "bad": _array(data.heat_bad, "u1"),
            "shown": [bool(s) for s in data.heat_shown],
        },
        "spans": data.spans,
    }
    text = json.dumps(out, separators=(",", ":"), allow_nan=False)
    # Inside <script>: no "</script>" or "<!--" can end it early.
    return text.replace("<", "\\u003c").replace(">", "\\u003e").replace("&", "\\u0026")
