"""What the charts of `gradwatch.plot` are built from: the rows a chart draws (variables
or layers), the colours, the panels and legends, and the red marks of non-finite steps.

Draws nothing by itself and computes no gradient statistic: it reads the log's frames.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import matplotlib as mpl
import numpy as np
import pandas as pd

from gradwatch._logdata.views import layer_of_key, leaf_of_key
from gradwatch._stats.specs import SPECS
from gradwatch._ui.figure import Figure  # matplotlib's, displayed as PNG in notebooks
from gradwatch.log import GradientLog

By = Literal["auto", "variable", "layer"]
#: `by="auto"` draws layers, not variables, when the log has more variables than this.
LAYER_THRESHOLD = 30

#: The colour of every non-finite mark; the series colours leave it out.
NONFINITE_COLOR = "#d62728"
NONFINITE_LABEL = "non-finite gradient (NaN/Inf)"
# tab10 without its red and pink, so that red means non-finite and nothing else.
SERIES_COLORS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
# The most rows of one panel of `flow` and `heatmap`, and the most panels side by side.
_MAX_ROWS = 110
_MAX_PANELS = 5
# Every figure stays within this many inches each way: 2400 px at 100 dpi.
_MAX_INCHES = 24.0


def check_log(log: Any) -> None:
    if not isinstance(log, GradientLog):
        raise TypeError(
            "`log` must be a gradwatch.GradientLog, e.g. `watch.log` or "
            f"`gradwatch.read_log(path)`. Received: log of type {type(log).__name__}"
        )
    if not len(log):
        raise ValueError("The log has no recorded steps, so there is nothing to plot.")


@dataclass
class Rows:
    """What a chart draws: one row (or line) per variable or per layer."""

    by: Literal["variable", "layer"]
    wide: pd.DataFrame  # index step, one column per name, in model order
    names: list[str]  # keys or layer names
    labels: list[str]  # the names without the prefix that all of them share
    prefix: str  # that prefix, e.g. "net/", or ""
    kinds: list[str]  # the last part of each key (kernel, bias, ...), or "layer"
    bad: pd.DataFrame  # `step, name` of every non-finite row at a step

    @property
    def axis_label(self) -> str:
        return self.by + (f" (in {self.prefix.rstrip('/')})" if self.prefix else "")

    @property
    def under(self) -> str:
        return f" of {self.prefix.rstrip('/')}" if self.prefix else ""


def chart_rows(log: GradientLog, stat: str, by: Any, keys: Sequence[str] | None = None) -> Rows:
    if by not in ("auto", "variable", "layer"):
        raise ValueError(
            "`by` must be 'auto' (by layer above 30 variables), 'variable' or 'layer'. "
            f"Received: by={by!r}"
        )
    keys = list(log.variables if keys is None else keys)
    if by == "auto":
        by = "layer" if len(keys) > LAYER_THRESHOLD and _aggregates(log, stat) else "variable"
    alerts = nonfinite_alerts(log)
    if by == "layer":
        names = list(dict.fromkeys(layer_of_key(k) for k in keys))
        wide = log.by_layer(stat)[names]
        parts: dict[str, list[str]] = {name: [] for name in names}
        for key in log.variables:
            layer = layer_of_key(key)
            if layer in parts:
                parts[layer].append(leaf_of_key(key))
        kinds = ["+".join(dict.fromkeys(parts[name])) for name in names]
        bad = pd.DataFrame(
            {"step": alerts["step"], "name": [layer_of_key(k) for k in alerts["variable"]]}
        )
    else:
        names = keys
        wide = log.stat(stat)[names]
        kinds = [leaf_of_key(k) for k in names]
        bad = pd.DataFrame({"step": alerts["step"], "name": list(alerts["variable"])})
    # The most common kinds get a colour each; the rest share one, as "other".
    common = [kind for kind, _ in pd.Series(kinds).value_counts(sort=True).items()]
    kept = (
        set(common[: len(SERIES_COLORS) - 1]) if len(common) > len(SERIES_COLORS) else set(common)
    )
    kinds = [kind if kind in kept else "other" for kind in kinds]
    bad = bad[bad["name"].isin(set(names))].drop_duplicates().reset_index(drop=True)
    prefix = _common_prefix(names)
    labels = [name[len(prefix) :] for name in names]
    return Rows(by, wide, names, labels, prefix, kinds, bad)


def _aggregates(log: GradientLog, stat: str) -> bool:
    """Whether `GradientLog.by_layer` can aggregate `stat` from what the log recorded."""
    spec = SPECS.get(stat)
    if spec is None or spec.pool is None:
        return False
    return all(name in log.stat_names for name in spec.pool_reads)


def _common_prefix(names: Sequence[str]) -> str:
    """The leading `a/b/` parts that all names share, leaving each at least one part."""
    if len(names) < 2:
        return ""
    parts = [name.split("/")[:-1] for name in names]
    shared = []
    for column in zip(*parts, strict=False):
        if len(set(column)) != 1:
            break
        shared.append(column[0])
    return "".join(f"{p}/" for p in shared)


def kind_order(kinds: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(kinds))


def extremes(
    lo: pd.Series, hi: pd.Series, median: pd.Series, most: int
) -> tuple[list[int], list[int]]:
    """Positions of the rows with the largest norms (by their largest) and the smallest
    (by their median), `most` of each, fewer on short charts."""
    k = min(most, len(hi) // 4)
    if k == 0:
        return [], []
    order = np.arange(len(hi))
    top = [
        int(i) for i in order[np.argsort(-hi.to_numpy(), kind="stable")] if np.isfinite(hi.iloc[i])
    ]
    low = [
        int(i)
        for i in order[np.argsort(median.to_numpy(), kind="stable")]
        if np.isfinite(median.iloc[i])
    ]
    return top[:k], low[:k]


def worst(rows: Rows, norm: pd.DataFrame, most: int) -> list[int]:
    """Positions of the lines worth naming, at most `most`: the non-finite ones (first
    to fail first), then the largest (by their largest norm) and the smallest (by their
    median norm)."""
    chosen: list[int] = []

    def add(positions: Sequence[int], up_to: int) -> None:
        for i in positions:
            if len(chosen) >= up_to:
                return
            if i not in chosen:
                chosen.append(i)

    first = rows.bad.groupby("name", sort=False)["step"].min().sort_values(kind="stable")
    where = {name: i for i, name in enumerate(rows.names)}
    add([where[name] for name in first.index], 4)
    finite = norm.drop(index=np.unique(rows.bad["step"].to_numpy()), errors="ignore")
    if not len(finite):
        finite = norm
    hi, median = finite.max().to_numpy(), finite.median().to_numpy()
    order = np.arange(len(rows.names))
    add(
        [int(i) for i in order[np.argsort(-hi, kind="stable")] if np.isfinite(hi[i])],
        len(chosen) + 3,
    )
    room = most - len(chosen)
    add(
        [int(i) for i in order[np.argsort(median, kind="stable")] if np.isfinite(median[i])],
        len(chosen) + min(3, room),
    )
    add([int(i) for i in order[np.argsort(-hi, kind="stable")] if np.isfinite(hi[i])], most)
    return chosen


def panel_figure(
    n: int, width: float, extra: float, colorbar: bool = False
) -> tuple[Figure, list, list[list[int]], float]:
    """A figure of side-by-side panels for `n` rows, within `_MAX_INCHES` each way: the
    figure, its axes, each panel's row positions, and the font size of the row labels."""
    count = min(_MAX_PANELS, max(1, math.ceil(n / _MAX_ROWS)))
    per = math.ceil(n / count)
    row = min(0.2, (_MAX_INCHES - extra) / max(per, 1))
    height = min(_MAX_INCHES, max(3.0, per * row + extra))
    panel_width = min(width, (_MAX_INCHES - (1.0 if colorbar else 0.0)) / count)
    fig = Figure(
        figsize=(panel_width * count + (1.0 if colorbar else 0.0), height), layout="constrained"
    )
    axes = list(fig.subplots(1, count, sharex=True, squeeze=False)[0])
    parts = [list(range(i * per, min(n, (i + 1) * per))) for i in range(count)]
    for ax, part in zip(axes, parts, strict=True):
        if not part:
            ax.set_visible(False)
    fontsize = max(4.0, min(8.0, row * 72 * 0.75))
    return fig, axes, parts, fontsize


def label_rows(
    ax: Any, labels: Sequence[str], names: Sequence[str], bad: set, fontsize: float
) -> None:
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=fontsize)
    for text, name in zip(ax.get_yticklabels(), names, strict=True):
        if name in bad:
            text.set_color(NONFINITE_COLOR)


def unique_legend(axes: Sequence[Any]) -> tuple[list, list[str]]:
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    return handles, labels


def positive_only(wide: pd.DataFrame) -> pd.DataFrame:
    """The frame as float64 with values <= 0 as NaN: a log scale has no place for them."""
    wide = wide.astype(np.float64)
    return wide.where(wide > 0)


def nonfinite_alerts(log: GradientLog) -> pd.DataFrame:
    """`step, variable` of every recorded NaN/Inf gradient, read from the log's alerts."""
    alerts = log.alerts
    return alerts.loc[alerts["kind"] == "nonfinite", ["step", "variable"]]


def check_step(log: GradientLog, step: Any, index: pd.Index) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"`step` must be a recorded step number. Received: step={step!r}")
    if int(step) not in index:
        raise KeyError(
            f"Step {step} was not recorded. Recorded: {len(index)} steps from "
            f"{index.min()} to {index.max()}."
        )
    return int(step)


def steps_text(steps: Any, most: int = 6, skipped: Any = (), kept: Any = ()) -> str:
    """`step 3`, `steps 3, 9`, or `steps 3, 9, ... (12 in all)`; with `skipped` (the
    skipped steps) and `kept` (those of them that `on_nonfinite` kept from the model;
    the others a LossScaleOptimizer skipped), who skipped how many of them."""
    steps = sorted({int(s) for s in steps})
    text = ", ".join(str(s) for s in steps[:most])
    if len(steps) > most:
        text += f", ... ({len(steps)} in all)"
    text = ("step " if len(steps) == 1 else "steps ") + text
    kept = {int(s) for s in kept}
    for who, among in (
        ("the LossScaleOptimizer", {int(s) for s in skipped} - kept),
        ("on_nonfinite", kept),
    ):
        n = len(set(steps) & among)
        if n and n == len(steps):
            text += f", skipped by {who}"
        elif n:
            text += f" ({n} skipped by {who})"
    return text


def span_text(log: GradientLog) -> str:
    steps = log.steps
    return f"steps {steps[0]}..{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"


def cell_edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each recorded step, halfway to its neighbours."""
    steps = steps.astype(np.float64)
    if len(steps) == 1:
        return np.asarray([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate(
        [[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]]
    )


def mark_steps(ax: Any, bad: np.ndarray, recorded: np.ndarray) -> None:
    """Shades runs of non-finite steps red; an edge keeps a single step visible on long runs."""
    if not len(bad):
        return
    # Runs of steps that follow each other among the recorded ones become one span.
    pos = np.searchsorted(recorded, bad)
    breaks = np.nonzero(np.diff(pos) != 1)[0] + 1
    for run in np.split(bad, breaks):
        ax.axvspan(
            run[0] - 0.5,
            run[-1] + 0.5,
            facecolor=mpl.colors.to_rgba(NONFINITE_COLOR, 0.25),
            edgecolor=NONFINITE_COLOR,
            lw=0.8,
        )
