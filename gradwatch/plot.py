"""Charts of a `GradientLog`: gradient flow, norms over steps, heatmaps and histograms.

Every function reads the log and returns a `matplotlib.figure.Figure`; none of
them computes gradient statistics or calls `show()`. Steps with a NaN or Inf
gradient element are marked in red on every chart.

The figures are made with matplotlib's object-oriented API, not `pyplot`, so
they hold no global state: save one with `fig.savefig("flow.png")`; in Jupyter
a figure returned by a cell is displayed.

Example:

```python
import gradwatch.plot

fig = gradwatch.plot.flow(watch.log)
fig.savefig("flow.png")
```
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import numpy as np
import pandas as pd

try:
    import matplotlib as mpl
    from matplotlib.figure import Figure
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "gradwatch.plot needs matplotlib, which is not installed. Install it with: "
        "pip install 'gradwatch[plot]'"
    ) from e

from gradwatch.keys import match_patterns
from gradwatch.log import GradientLog

#: The colour of every non-finite mark; the series colours leave it out.
NONFINITE_COLOR = "#d62728"
NONFINITE_LABEL = "non-finite gradient (NaN/Inf)"
# tab10 without its red and pink, so that red means non-finite and nothing else.
_SERIES_COLORS = [
    "#1f77b4",
    "#ff7f0e",
    "#2ca02c",
    "#9467bd",
    "#8c564b",
    "#7f7f7f",
    "#bcbd22",
    "#17becf",
]
_MAX_LEGEND = 12
# Stats that may be negative: the heatmap shows log10 of their magnitude.
_SIGNED_STATS = ("mean", "min", "max", "cos_prev")


def flow(log: GradientLog, step: int | None = None) -> Figure:
    """The gradient-flow chart: each variable's gradient norm, in model order.

    The median norm over the recorded steps is drawn as a line, the range
    (smallest to largest norm) as a band around it, on a log scale. Variables
    that had a NaN or Inf gradient element get a red triangle and a red tick
    label, and the legend names the steps. Norms of 0 have no place on a log scale and are left out.

    Args:
        log: A `GradientLog` that recorded the `norm` stat.
        step: Also draw the norms at this recorded step, and mark the variables
            that were non-finite at that step only. Defaults to `None`.

    Returns:
        A `matplotlib.figure.Figure` with one axes.

    Raises:
        KeyError: If `norm` was not recorded, or `step` was not recorded.

    Example:

    ```python
    fig = gradwatch.plot.flow(log)
    fig.savefig("flow.png")
    ```
    """
    _check_log(log)
    norm = _positive(log.stat("norm"))
    keys = list(norm.columns)
    x = np.arange(len(keys))
    fig = Figure(figsize=(max(6.0, 0.45 * len(keys) + 2.5), 4.8), layout="constrained")
    ax = fig.add_subplot()
    lo, hi, median = norm.min(), norm.max(), norm.median()
    color = _SERIES_COLORS[0]
    ax.fill_between(x, lo.to_numpy(), hi.to_numpy(), color=color, alpha=0.2, lw=0, label="range")
    ax.plot(x, median.to_numpy(), marker="o", color=color, label="median")
    bad = _nonfinite(log)
    if step is not None:
        step = _check_step(log, step, norm.index)
        ax.plot(
            x, norm.loc[step].to_numpy(), marker=".", color=_SERIES_COLORS[1], label=f"step {step}"
        )
        bad = bad[bad["step"] == step]
    bad_keys = set(bad["variable"])
    marked = [i for i, key in enumerate(keys) if key in bad_keys]
    if marked:
        ax.scatter(
            marked,
            np.full(len(marked), 1.0),
            marker="v",
            s=60,
            color=NONFINITE_COLOR,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            zorder=3,
        )
    ax.set_yscale("log")
    ax.set_xticks(x, keys, rotation=60, ha="right", fontsize="small")
    for label, key in zip(ax.get_xticklabels(), keys, strict=True):
        if key in bad_keys:
            label.set_color(NONFINITE_COLOR)
    ax.set_xlim(-0.6, len(keys) - 0.4)
    ax.set_ylabel("gradient norm (L2)")
    ax.set_title(
        f"Gradient flow, {_span(log)}" if step is None else f"Gradient flow at step {step}"
    )
    handles, labels = ax.get_legend_handles_labels()
    if bad_keys:
        handles.append(Line2D([], [], marker="v", ls="", color=NONFINITE_COLOR, markersize=8))
        labels.append(f"{NONFINITE_LABEL} at {_steps_text(bad['step'])}")
    ax.legend(handles, labels, fontsize="small")
    ax.grid(True, axis="y", which="major", alpha=0.3)
    return fig


def norms(
    log: GradientLog,
    variables: str | re.Pattern | Sequence[str | re.Pattern] = "*",
) -> Figure:
    """Each selected variable's gradient norm over the recorded steps, on a log scale.

    Steps with a NaN or Inf gradient element in any variable are shaded red,
    and the selected variables' own non-finite steps get a red cross. Norms of
    0 are left out of the log scale.

    Args:
        log: A `GradientLog` that recorded the `norm` stat.
        variables: Glob(s) or `re.Pattern`(s) matched against the keys, as in
            `GradWatch(variables=...)`. Defaults to `"*"` (all).

    Returns:
        A `matplotlib.figure.Figure` with one axes and one line per variable.

    Raises:
        KeyError: If `norm` was not recorded.
        ValueError: If `variables` matches no variable; the message lists them.

    Example:

    ```python
    fig = gradwatch.plot.norms(log, variables="dense*")
    ```
    """
    _check_log(log)
    norm = _positive(log.stat("norm"))
    keys = match_patterns(variables, list(norm.columns), "variables")
    fig = Figure(figsize=(9.0, 4.8), layout="constrained")
    ax = fig.add_subplot()
    steps = norm.index.to_numpy()
    bad = _nonfinite(log)
    for i, key in enumerate(keys):
        color = _SERIES_COLORS[i % len(_SERIES_COLORS)]
        ax.plot(steps, norm[key].to_numpy(), color=color, lw=1.2, label=key)
        own = np.intersect1d(bad.loc[bad["variable"] == key, "step"].to_numpy(), steps)
        if len(own):
            # Where every element was non-finite the norm is 0 and has no cross; the span shows.
            y = norm.loc[own, key].to_numpy()
            ax.scatter(own, y, marker="x", color=NONFINITE_COLOR, zorder=3)
    _mark_steps(ax, np.unique(bad["step"].to_numpy()), log.steps)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm (L2)")
    ax.set_title(f"Gradient norms, {_span(log)}")
    handles, labels = ax.get_legend_handles_labels()
    if len(keys) > _MAX_LEGEND:
        handles, labels = [], []
        ax.set_title(f"Gradient norms of {len(keys)} variables, {_span(log)}")
    if len(bad):
        handles.append(
            Patch(facecolor=mpl.colors.to_rgba(NONFINITE_COLOR, 0.25), edgecolor=NONFINITE_COLOR)
        )
        labels.append(NONFINITE_LABEL)
    if handles:
        ax.legend(handles, labels, fontsize="small", loc="best")
    ax.grid(True, which="major", alpha=0.3)
    return fig


def heatmap(log: GradientLog, stat: str = "norm") -> Figure:
    """One stat as a heatmap: recorded steps across, variables down in model order.

    Colours are `log10` of the stat; for stats that can be negative (`mean`,
    `min`, `max`, `cos_prev`) of its magnitude. Zeros and NaN are grey. Cells
    of a variable at a step with a NaN or Inf gradient element are red, and
    red triangles above the chart mark the non-finite steps.

    Args:
        log: A `GradientLog`.
        stat: A recorded stat. Defaults to `"norm"`.

    Returns:
        A `matplotlib.figure.Figure` with the heatmap's axes and its colour bar.

    Raises:
        KeyError: If `stat` was not recorded.

    Example:

    ```python
    fig = gradwatch.plot.heatmap(log, stat="norm")
    ```
    """
    _check_log(log)
    wide = log.stat(stat).astype(np.float64)
    keys = list(wide.columns)
    steps = wide.index.to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log10(np.abs(wide.to_numpy()))
    grid = np.ma.masked_invalid(values.T)  # variables x steps
    fig = Figure(figsize=(9.0, max(3.0, 0.3 * len(keys) + 1.8)), layout="constrained")
    ax = fig.add_subplot()
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    edges = _edges(steps)
    bad = _nonfinite(log)
    cells = np.zeros(grid.shape, bool)
    col = {s: j for j, s in enumerate(steps)}
    row = {k: i for i, k in enumerate(keys)}
    for s, k in zip(bad["step"], bad["variable"], strict=True):
        if s in col and k in row:
            cells[row[k], col[s]] = True
    # The colour scale spans the finite cells only: the red ones would stretch it.
    shown = grid.compressed() if not cells.any() else grid[~cells].compressed()
    limits = (shown.min(), shown.max()) if len(shown) else (None, None)
    image = ax.pcolormesh(
        edges, np.arange(len(keys) + 1) - 0.5, grid, cmap=cmap, vmin=limits[0], vmax=limits[1]
    )
    if cells.any():
        red = mpl.colors.ListedColormap([NONFINITE_COLOR])
        ax.pcolormesh(
            edges, np.arange(len(keys) + 1) - 0.5, np.ma.masked_where(~cells, cells), cmap=red
        )
    bad_steps = np.unique(bad["step"].to_numpy())
    if len(bad_steps):
        ax.scatter(
            bad_steps,
            np.full(len(bad_steps), 1.0),
            marker="v",
            color=NONFINITE_COLOR,
            transform=ax.get_xaxis_transform(),
            clip_on=False,
            zorder=3,
        )
    ax.set_ylim(len(keys) - 0.5, -0.5)  # model order, top down
    if len(keys) <= 40:
        ax.set_yticks(np.arange(len(keys)), keys, fontsize="small")
    ax.set_xlabel("step")
    label = f"log10 |{stat}|" if stat in _SIGNED_STATS else f"log10 {stat}"
    fig.colorbar(image, ax=ax, label=label)
    title = f"Gradient {stat}, {_span(log)}"
    if len(bad_steps):
        title += f"; red: {NONFINITE_LABEL}"
    ax.set_title(title)
    return fig


def histogram(log: GradientLog, variable: str, steps: int | Sequence[int] | None = None) -> Figure:
    """The gradient histogram of one variable at some recorded steps.

    Two panels share a log |g| axis: the positive elements above, the negative
    ones below, one outline per step. The legend gives each step's count of
    exact zeros; a step with NaN or Inf elements is drawn in red, dashed, with
    its NaN/Inf count.

    Args:
        log: A `GradientLog` recorded with `GradWatch(histogram=...)`.
        variable: A key or an unambiguous suffix, e.g. `"dense/kernel"`.
        steps: A recorded step or a list of them. Defaults to `None`: up to 5
            steps spread evenly over the recorded ones, first and last included.

    Returns:
        A `matplotlib.figure.Figure` with two axes.

    Raises:
        KeyError: If no histograms were recorded, the variable is unknown or had
            none, or a step was not recorded.

    Example:

    ```python
    fig = gradwatch.plot.histogram(log, "dense/kernel", steps=[0, 100])
    ```
    """
    _check_log(log)
    key = log.key(variable)
    if steps is None:
        hist = log.histograms
        recorded = np.unique(hist.loc[hist["variable"] == key, "step"].to_numpy())
        if not len(recorded):
            log.histogram(key, int(log.steps[0]))  # raises the log's own KeyError
        picks = np.unique(np.linspace(0, len(recorded) - 1, min(5, len(recorded))).round())
        chosen = [int(recorded[int(i)]) for i in picks]
    elif isinstance(steps, (int, np.integer)) and not isinstance(steps, bool):
        chosen = [int(steps)]
    elif isinstance(steps, Sequence) and not isinstance(steps, str) and len(steps):
        chosen = [int(s) for s in steps]
    else:
        raise TypeError(
            "`steps` must be a step number, a non-empty list of them, or None. "
            f"Received: steps={steps!r}"
        )
    fig = Figure(figsize=(8.0, 5.5), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True)
    ratio = 10.0 ** (1.0 / (log.bins_per_decade or 1))
    notes = []
    used = []  # the magnitudes of the non-empty bins, to zoom the shared axis on them
    for i, step in enumerate(chosen):
        h = log.histogram(key, step)
        pos = h[h["sign"] == "+"]
        neg = h[h["sign"] == "-"].iloc[::-1]  # by increasing magnitude, as `pos`
        edges = np.concatenate([pos["lo"].to_numpy(), pos["hi"].to_numpy()[-1:]])
        edges[0], edges[-1] = edges[1] / ratio, edges[-2] * ratio  # the folded ends
        zeros = int(h.loc[h["sign"] == "0", "count"].sum())
        nonfinite = int(h.loc[h["sign"] == "nonfinite", "count"].sum())
        label = f"step {step} ({zeros} zeros)"
        style: dict[str, Any] = {"color": _SERIES_COLORS[i % len(_SERIES_COLORS)], "lw": 1.5}
        if nonfinite:
            label = f"step {step} ({zeros} zeros, {nonfinite} NaN/Inf)"
            style = {"color": NONFINITE_COLOR, "lw": 1.5, "ls": "--"}
            notes.append(f"step {step}: {nonfinite} NaN/Inf")
        full = (pos["count"].to_numpy() + neg["count"].to_numpy()) > 0
        used.extend([edges[:-1][full], edges[1:][full]])
        top.stairs(pos["count"].to_numpy(), edges, label=label, **style)
        bottom.stairs(neg["count"].to_numpy(), edges, **style)
    top.set_xscale("log")
    used_edges = np.concatenate(used)
    if len(used_edges):
        top.set_xlim(used_edges.min() / 10, used_edges.max() * 10)
    top.set_ylabel("count, g > 0")
    bottom.set_ylabel("count, g < 0")
    bottom.set_xlabel("|g| (the end bins also hold |g| < 1e-12 and |g| >= 1e4)")
    bottom.invert_yaxis()  # mirrored: the negative side hangs down
    top.set_title(f"Gradient histogram of {key}")
    top.legend(fontsize="small")
    if notes:
        top.text(
            0.01,
            0.97,
            "non-finite: " + "; ".join(notes),
            color=NONFINITE_COLOR,
            transform=top.transAxes,
            va="top",
            fontsize="small",
        )
    for ax in (top, bottom):
        ax.grid(True, alpha=0.3)
    return fig


# ------------------------------------------------------------------- helpers
def _check_log(log: Any) -> None:
    if not isinstance(log, GradientLog):
        raise TypeError(
            "`log` must be a gradwatch.GradientLog, e.g. `watch.log` or "
            f"`gradwatch.read_log(path)`. Received: log of type {type(log).__name__}"
        )
    if not len(log):
        raise ValueError("The log has no recorded steps, so there is nothing to plot.")


def _positive(wide: pd.DataFrame) -> pd.DataFrame:
    """The frame as float64 with values <= 0 as NaN: a log scale has no place for them."""
    wide = wide.astype(np.float64)
    return wide.where(wide > 0)


def _nonfinite(log: GradientLog) -> pd.DataFrame:
    """`step, variable` of every recorded NaN/Inf gradient, read from the log's alerts."""
    alerts = log.alerts
    return alerts.loc[alerts["kind"] == "nonfinite", ["step", "variable"]]


def _check_step(log: GradientLog, step: Any, index: pd.Index) -> int:
    if isinstance(step, bool) or not isinstance(step, (int, np.integer)):
        raise TypeError(f"`step` must be a recorded step number. Received: step={step!r}")
    if int(step) not in index:
        raise KeyError(
            f"Step {step} was not recorded. Recorded: {len(index)} steps from "
            f"{index.min()} to {index.max()}."
        )
    return int(step)


def _steps_text(steps: Any, most: int = 6) -> str:
    """`step 3`, `steps 3, 9`, or `steps 3, 9, ... (12 in all)`."""
    steps = sorted({int(s) for s in steps})
    text = ", ".join(str(s) for s in steps[:most])
    if len(steps) > most:
        text += f", ... ({len(steps)} in all)"
    return ("step " if len(steps) == 1 else "steps ") + text


def _span(log: GradientLog) -> str:
    steps = log.steps
    return f"steps {steps[0]}..{steps[-1]}" if len(steps) > 1 else f"step {steps[0]}"


def _edges(steps: np.ndarray) -> np.ndarray:
    """Cell edges around each recorded step, halfway to its neighbours."""
    steps = steps.astype(np.float64)
    if len(steps) == 1:
        return np.asarray([steps[0] - 0.5, steps[0] + 0.5])
    mid = (steps[1:] + steps[:-1]) / 2
    return np.concatenate(
        [[steps[0] - (mid[0] - steps[0])], mid, [steps[-1] + (steps[-1] - mid[-1])]]
    )


def _mark_steps(ax: Any, bad: np.ndarray, recorded: np.ndarray) -> None:
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


def loss(log: GradientLog) -> Figure:
    """The loss of each step, with the learning rate, above the global gradient norm.

    Both panels share the step axis, so a jump in the loss lines up with the
    gradients that went with it. The loss is drawn on a linear scale (a log
    scale where it is positive and spans more than two decades), the
    learning rate (dashed, right-hand scale) beside it, and the global norm
    (`log.global_norm()`) on a log scale below. Steps with a NaN or Inf
    gradient element are shaded red on both panels.

    Args:
        log: A `GradientLog` with the `norm` stat and its steps' loss
            (`log.scalars`, recorded by `GradWatch` inside `fit`).

    Returns:
        A `matplotlib.figure.Figure` with two axes (and the learning rate's
        twin axes on the first).

    Raises:
        KeyError: If `norm` was not recorded, or the log has no loss (written
            before gradwatch recorded it, or a custom `train_step` that does
            not update the model's `loss` metric).

    Example:

    ```python
    fig = gradwatch.plot.loss(watch.log)
    fig.savefig("loss.png")
    ```
    """
    _check_log(log)
    scalars = log.scalars
    known = scalars[scalars["loss"].notna()]
    if not len(known):
        raise KeyError(
            "The log has no loss to plot: it was written before gradwatch recorded the "
            "loss, or the `train_step` never updated the model's `loss` metric. See "
            "`log.scalars`."
        )
    global_norm = log.global_norm()  # the log's KeyError without `norm`
    fig = Figure(figsize=(9.0, 6.0), layout="constrained")
    top, bottom = fig.subplots(2, 1, sharex=True, height_ratios=(3, 2))
    steps = known["step"].to_numpy()
    values = known["loss"].to_numpy(np.float64)
    top.plot(steps, values, color=_SERIES_COLORS[0], lw=1.2)
    finite = values[np.isfinite(values)]
    if len(finite) and finite.min() > 0 and finite.max() > 100 * finite.min():
        top.set_yscale("log")  # a few outlier steps would flatten the rest on a linear scale
    top.set_ylabel("loss", color=_SERIES_COLORS[0])
    handles = [Line2D([], [], color=_SERIES_COLORS[0], lw=1.2)]
    labels = ["loss"]
    rate = scalars[scalars["learning_rate"].notna()]
    if len(rate):
        twin = top.twinx()
        twin.plot(
            rate["step"].to_numpy(),
            rate["learning_rate"].to_numpy(np.float64),
            color=_SERIES_COLORS[5],
            lw=1.0,
            ls="--",
        )
        twin.set_ylabel("learning rate", color=_SERIES_COLORS[5])
        handles.append(Line2D([], [], color=_SERIES_COLORS[5], lw=1.0, ls="--"))
        labels.append("learning rate")
    norm = global_norm.where(global_norm > 0)
    bottom.plot(norm.index.to_numpy(), norm.to_numpy(np.float64), color=_SERIES_COLORS[1], lw=1.2)
    bottom.set_yscale("log")
    bottom.set_ylabel("global gradient norm")
    bottom.set_xlabel("step")
    bad = np.unique(_nonfinite(log)["step"].to_numpy())
    for ax in (top, bottom):
        _mark_steps(ax, bad, log.steps)
        ax.grid(True, which="major", alpha=0.3)
    if len(bad):
        handles.append(
            Patch(facecolor=mpl.colors.to_rgba(NONFINITE_COLOR, 0.25), edgecolor=NONFINITE_COLOR)
        )
        labels.append(NONFINITE_LABEL)
    top.legend(handles, labels, fontsize="small", loc="upper right")
    top.set_title(f"Loss and global gradient norm, {_span(log)}")
    return fig
