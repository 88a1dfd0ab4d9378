"""Charts of a `GradientLog`: gradient flow, norms over steps, heatmaps and histograms.

Every function reads the log and returns a `matplotlib.figure.Figure`; none of
them computes gradient statistics or calls `show()`. Steps with a NaN or Inf
gradient element are marked in red on every chart.

The figures are made with matplotlib's object-oriented API, not `pyplot`, so
they hold no global state: save one with `fig.savefig("flow.png")`; in Jupyter
a figure returned by a cell is displayed as an image, with no `%matplotlib` magic.

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
from dataclasses import dataclass
from typing import Any

import numpy as np
import pandas as pd

try:
    import matplotlib as mpl
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from gradwatch._ui.figure import Figure  # matplotlib's, displayed as PNG in notebooks
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "gradwatch.plot needs matplotlib, which is not installed. Install it with: "
        "pip install 'gradwatch[plot]'"
    ) from e

from gradwatch._stats.specs import SPECS
from gradwatch._ui.chart_parts import (
    LAYER_THRESHOLD,
    NONFINITE_COLOR,
    NONFINITE_LABEL,
    SERIES_COLORS,
    By,
    Rows,
    cell_edges,
    chart_rows,
    check_log,
    check_step,
    extremes,
    kind_order,
    label_rows,
    mark_steps,
    nonfinite_alerts,
    panel_figure,
    positive_only,
    span_text,
    steps_text,
    unique_legend,
    worst,
)
from gradwatch.keys import match_patterns
from gradwatch.log import GradientLog

__all__ = [
    "LAYER_THRESHOLD",
    "NONFINITE_COLOR",
    "NONFINITE_LABEL",
    "By",
    "Figure",
    "flow",
    "heatmap",
    "histogram",
    "loss",
    "norms",
]

_RANGE_COLOR = "#8c8c8c"
_STEP_COLOR = "#000000"
_OTHER_COLOR = "#b0b0b0"
# The most lines `norms` draws in colour, each named in the legend; with the count of the
# grey others and the non-finite entry the legend stays within 12 entries.
_MAX_LINES = 10


def flow(log: GradientLog, step: int | None = None, by: By = "auto") -> Figure:
    """The gradient-flow chart: each variable's (or layer's) gradient norm, in model order.

    One row per variable or layer, top down in model order, every row
    labelled. The median norm over the finite steps is a dot, and the range
    (smallest to largest norm) a bar through it, on a log scale; steps with a
    NaN or Inf gradient element are left out of both, so that one overflow
    does not stretch every bar. The dots of the same kind of variable
    (`kernel`, `bias`, `gamma`, ...) are joined, each kind in its own colour,
    so kernels and biases do not zig-zag. Rows that had a NaN or Inf gradient
    element get a red triangle and a red label, and the legend names the
    steps and the largest and smallest rows. Norms of 0 have no place on a log
    scale and are left out. Past 110 rows the chart continues in side-by-side
    panels, so that the figure stays within 2400 pixels each way at 100 dpi.

    Args:
        log: A `GradientLog` that recorded the `norm` stat.
        step: Also draw the norms at this recorded step, and mark the rows
            that were non-finite at that step only. Defaults to `None`.
        by: `"variable"`, `"layer"` (the norm of the layer's variables taken
            together, as `GradientLog.by_layer`), or `"auto"`: by layer when
            the log has more than 30 variables. Defaults to `"auto"`.

    Returns:
        A `matplotlib.figure.Figure` with one axes per panel.

    Raises:
        KeyError: If `norm` was not recorded, or `step` was not recorded.
        ValueError: If `by` is not one of the above.

    Example:

    ```python
    fig = gradwatch.plot.flow(log)
    fig.savefig("flow.png")
    ```
    """
    check_log(log)
    rows = chart_rows(log, "norm", by)
    norm = positive_only(rows.wide)
    if step is not None:
        step = check_step(log, step, norm.index)
    finite = norm.drop(index=np.unique(rows.bad["step"].to_numpy()), errors="ignore")
    if not len(finite):  # every step was non-finite: the band spans them all
        finite = norm
    band = _FlowBand(finite.min(), finite.max(), finite.median(), step, norm)
    bad = rows.bad if step is None else rows.bad[rows.bad["step"] == step]
    bad_names = set(bad["name"])
    fig, axes, panels, fontsize = panel_figure(len(rows.names), 7.0, 2.6)
    for ax, part in zip(axes, panels, strict=True):
        _draw_flow_norms(ax, part, rows, band)
        _mark_flow_rows(ax, part, rows, band, bad_names)
        label_rows(
            ax, [rows.labels[i] for i in part], [rows.names[i] for i in part], bad_names, fontsize
        )
        for j, text in enumerate(ax.get_yticklabels()):
            if part[j] in band.largest or part[j] in band.smallest:
                text.set_fontweight("bold")
        ax.set_ylim(len(part) - 0.5, -0.5)
        ax.set_xscale("log")
        ax.set_xlabel("gradient norm (L2)")
        ax.grid(True, axis="x", which="major", alpha=0.3)
    axes[0].set_ylabel(rows.axis_label)
    what = "layer" if rows.by == "layer" else "variable"
    title = f"Gradient flow by {what}, {span_text(log)}"
    if step is not None:
        title = f"Gradient flow by {what} at step {step}"
    fig.suptitle(title)
    handles, labels = unique_legend(axes)
    if len(rows.bad) and step is None:
        labels[labels.index("range")] = "range over the finite steps"
    if bad_names:
        handles.append(Line2D([], [], marker="<", ls="", color=NONFINITE_COLOR, markersize=7))
        labels.append(f"{NONFINITE_LABEL} at {_bad_steps(log, bad)}")
    fig.legend(
        handles, labels, loc="outside lower center", ncols=min(3, len(axes)), fontsize="small"
    )
    return fig


@dataclass
class _FlowBand:
    """What `flow` draws of each row's norm: its range and median over the finite steps,
    the rows with the largest and the smallest norms, and the norms at `step`."""

    lo: pd.Series
    hi: pd.Series
    median: pd.Series
    step: int | None
    norm: pd.DataFrame  # every step's norms, rows as columns

    def __post_init__(self) -> None:
        self.largest, self.smallest = extremes(self.lo, self.hi, self.median, 3)


def _draw_flow_norms(ax: Any, part: list[int], rows: Rows, band: _FlowBand) -> None:
    """One panel's range bars, median dots joined by kind, and the norms at the step."""
    y = np.arange(len(part))
    ax.hlines(
        y,
        band.lo.iloc[part].to_numpy(),
        band.hi.iloc[part].to_numpy(),
        color=_RANGE_COLOR,
        lw=4,
        alpha=0.35,
        label="range",
    )
    kinds = kind_order(rows.kinds)
    for color_index, kind in enumerate(kinds):
        mine = [j for j, i in enumerate(part) if rows.kinds[i] == kind]
        if mine:
            ax.plot(
                band.median.iloc[[part[j] for j in mine]].to_numpy(),
                y[mine],
                marker="o",
                ms=4,
                lw=1,
                color=SERIES_COLORS[color_index % len(SERIES_COLORS)],
                label="median"
                if len(kinds) == 1
                else f"median, {kind}" + (" layers" if rows.by == "layer" else ""),
            )
    if band.step is not None:
        ax.plot(
            band.norm.loc[band.step].iloc[part].to_numpy(),
            y,
            ls="",
            marker="D",
            ms=3.5,
            color=_STEP_COLOR,
            label=f"step {band.step}",
        )


def _mark_flow_rows(
    ax: Any, part: list[int], rows: Rows, band: _FlowBand, bad_names: set[str]
) -> None:
    """One panel's marks beside the rows: red on the right for the non-finite ones, black
    on the left for the largest and the smallest."""
    marked = [j for j, i in enumerate(part) if rows.names[i] in bad_names]
    if marked:
        ax.scatter(
            np.full(len(marked), 1.0),
            np.asarray(marked),
            marker="<",
            s=40,
            color=NONFINITE_COLOR,
            transform=ax.get_yaxis_transform(),
            clip_on=False,
            zorder=3,
        )
    for chosen, marker, word in (
        (band.largest, "^", f"the {len(band.largest)} largest (by their largest norm)"),
        (band.smallest, "v", f"the {len(band.smallest)} smallest (by their median norm)"),
    ):
        here = [j for j, i in enumerate(part) if i in chosen]
        if here:
            ax.scatter(
                np.full(len(here), 0.0),
                np.asarray(here),
                marker=marker,
                s=30,
                color=_STEP_COLOR,
                transform=ax.get_yaxis_transform(),
                clip_on=False,
                zorder=3,
                label=word,
            )


def norms(
    log: GradientLog,
    variables: str | re.Pattern | Sequence[str | re.Pattern] = "*",
    by: By = "auto",
) -> Figure:
    """Each selected variable's (or layer's) gradient norm over the recorded steps, log scale.

    Up to 10 lines are drawn in colour and named in the legend. With more,
    the worst few are: the rows with a non-finite gradient (first to fail
    first), the largest (by their largest norm) and the smallest (by their
    median norm); the others are thin grey lines, counted in the legend. Steps
    with a NaN or Inf gradient element in any variable are shaded red, and the
    coloured lines' own non-finite steps get a red cross. Norms of 0 are left
    out of the log scale.

    Args:
        log: A `GradientLog` that recorded the `norm` stat.
        variables: Glob(s) or `re.Pattern`(s) matched against the keys, as in
            `GradWatch(variables=...)`. Defaults to `"*"` (all).
        by: `"variable"`, `"layer"` (the layers of the selected variables, each
            the norm of all its variables, as `GradientLog.by_layer`), or
            `"auto"`: by layer when more than 30 variables are selected.
            Defaults to `"auto"`.

    Returns:
        A `matplotlib.figure.Figure` with one axes.

    Raises:
        KeyError: If `norm` was not recorded.
        ValueError: If `variables` matches no variable (the message lists
            them), or `by` is not one of the above.

    Example:

    ```python
    fig = gradwatch.plot.norms(log, variables="dense*")
    ```
    """
    check_log(log)
    keys = match_patterns(variables, log.variables, "variables")
    rows = chart_rows(log, "norm", by, keys)
    norm = positive_only(rows.wide)
    fig = Figure(figsize=(10.0, 6.0), layout="constrained")
    ax = fig.add_subplot()
    steps = norm.index.to_numpy()
    n = len(rows.names)
    if n <= _MAX_LINES:
        shown = list(range(n))
    else:
        shown = worst(rows, norm, _MAX_LINES)
        for i in range(n):
            if i not in shown:
                ax.plot(steps, norm.iloc[:, i].to_numpy(), color=_OTHER_COLOR, lw=0.6, alpha=0.6)
    for rank, i in enumerate(shown):
        name = rows.names[i]
        color = SERIES_COLORS[rank % len(SERIES_COLORS)]
        ls = "-" if rank < len(SERIES_COLORS) else "--"
        ax.plot(steps, norm[name].to_numpy(), color=color, ls=ls, lw=1.4, label=rows.labels[i])
        own = np.intersect1d(rows.bad.loc[rows.bad["name"] == name, "step"].to_numpy(), steps)
        if len(own):
            # Where every element was non-finite the norm is NaN and has no cross; the span shows.
            ax.scatter(
                own, norm.loc[own, name].to_numpy(), marker="x", color=NONFINITE_COLOR, zorder=3
            )
    all_bad = nonfinite_alerts(log)
    mark_steps(ax, np.unique(all_bad["step"].to_numpy()), log.steps)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm (L2)")
    what = "layers" if rows.by == "layer" else "variables"
    ax.set_title(f"Gradient norms of {n} {what}{rows.under}, {span_text(log)}")
    handles, labels = ax.get_legend_handles_labels()
    if n > len(shown):
        handles.append(Line2D([], [], color=_OTHER_COLOR, lw=0.8))
        labels.append(f"{n - len(shown)} other {what}")
    if len(all_bad):
        handles.append(
            Patch(facecolor=mpl.colors.to_rgba(NONFINITE_COLOR, 0.25), edgecolor=NONFINITE_COLOR)
        )
        labels.append(f"{NONFINITE_LABEL} at {_bad_steps(log, all_bad)}")
    fig.legend(handles, labels, fontsize="small", loc="outside lower center", ncols=3)
    ax.grid(True, which="major", alpha=0.3)
    return fig


def heatmap(log: GradientLog, stat: str = "norm", by: By = "auto") -> Figure:
    """One stat as a heatmap: recorded steps across, variables (or layers) down in model order.

    Colours are `log10` of the stat; for stats that can be negative (`mean`,
    `min`, `max`, `cos_prev`) of its magnitude. Zeros and NaN are grey. Cells
    of a row at a step with a NaN or Inf gradient element are red, and red
    triangles above the chart mark the non-finite steps. Every row is
    labelled; past 110 rows the heatmap continues in side-by-side panels that
    share one colour scale, so that the figure stays within 2400 pixels each
    way at 100 dpi.

    Args:
        log: A `GradientLog`.
        stat: A recorded stat. Defaults to `"norm"`.
        by: `"variable"`, `"layer"` (the stat aggregated per layer, as
            `GradientLog.by_layer`), or `"auto"`: by layer when the log has
            more than 30 variables and `by_layer` can aggregate the stat (not
            `cos_prev`; `std` with `mean` recorded, `update_ratio` with
            `update_norm` and `weight_norm`). Defaults to `"auto"`.

    Returns:
        A `matplotlib.figure.Figure` with one axes per panel and the colour bar's axes, last.

    Raises:
        KeyError: If `stat` was not recorded.
        ValueError: If `by` is not one of the above, or is `"layer"` for `cos_prev`.

    Example:

    ```python
    fig = gradwatch.plot.heatmap(log, stat="norm")
    ```
    """
    check_log(log)
    rows = chart_rows(log, stat, by)
    wide = rows.wide.astype(np.float64)
    steps = wide.index.to_numpy()
    with np.errstate(divide="ignore", invalid="ignore"):
        values = np.log10(np.abs(wide.to_numpy()))
    grid = np.ma.masked_invalid(values.T)  # rows x steps
    col = {s: j for j, s in enumerate(steps)}
    row = {k: i for i, k in enumerate(rows.names)}
    cells = np.zeros(grid.shape, bool)
    for s, k in zip(rows.bad["step"], rows.bad["name"], strict=True):
        if s in col and k in row:
            cells[row[k], col[s]] = True
    # The colour scale spans the finite cells only: the red ones would stretch it.
    shown = grid.compressed() if not cells.any() else grid[~cells].compressed()
    limits = (shown.min(), shown.max()) if len(shown) else (None, None)
    cmap = mpl.colormaps["viridis"].with_extremes(bad="#d9d9d9")
    edges = cell_edges(steps)
    bad_steps = np.unique(nonfinite_alerts(log)["step"].to_numpy())
    bad_steps = bad_steps[np.isin(bad_steps, steps)]
    fig, axes, panels, fontsize = panel_figure(len(rows.names), 8.0, 1.2, colorbar=True)
    for ax, part in zip(axes, panels, strict=True):
        y_edges = np.arange(len(part) + 1) - 0.5
        image = ax.pcolormesh(edges, y_edges, grid[part], cmap=cmap, vmin=limits[0], vmax=limits[1])
        if cells[part].any():
            red = mpl.colors.ListedColormap([NONFINITE_COLOR])
            ax.pcolormesh(edges, y_edges, np.ma.masked_where(~cells[part], cells[part]), cmap=red)
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
        names = [rows.names[i] for i in part]
        bad_rows = {rows.names[i] for i in part if cells[i].any()}
        label_rows(ax, [rows.labels[i] for i in part], names, bad_rows, fontsize)
        ax.set_ylim(len(part) - 0.5, -0.5)  # model order, top down
        ax.set_xlabel("step")
    axes[0].set_ylabel(rows.axis_label)
    # A stat that may be negative: the heatmap shows log10 of its magnitude.
    signed = stat not in SPECS or SPECS[stat].signed
    label = f"log10 |{stat}|" if signed else f"log10 {stat}"
    height = fig.get_size_inches()[1]
    # On a tall chart a full-height bar would be as wide as a panel: keep it about 5 in.
    fig.colorbar(
        image, ax=axes, label=label, fraction=0.05, pad=0.02, shrink=min(1.0, 5.0 / height)
    )
    what = "layer" if rows.by == "layer" else "variable"
    title = f"Gradient {stat} by {what}, {span_text(log)}"
    if len(bad_steps):
        title += f"; red: {NONFINITE_LABEL}"
    fig.suptitle(title)
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
    check_log(log)
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
        style: dict[str, Any] = {"color": SERIES_COLORS[i % len(SERIES_COLORS)], "lw": 1.5}
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
    check_log(log)
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
    top.plot(steps, values, color=SERIES_COLORS[0], lw=1.2)
    finite = values[np.isfinite(values)]
    if len(finite) and finite.min() > 0 and finite.max() > 100 * finite.min():
        top.set_yscale("log")  # a few outlier steps would flatten the rest on a linear scale
    top.set_ylabel("loss", color=SERIES_COLORS[0])
    handles = [Line2D([], [], color=SERIES_COLORS[0], lw=1.2)]
    labels = ["loss"]
    rate = scalars[scalars["learning_rate"].notna()]
    if len(rate):
        twin = top.twinx()
        twin.plot(
            rate["step"].to_numpy(),
            rate["learning_rate"].to_numpy(np.float64),
            color=SERIES_COLORS[5],
            lw=1.0,
            ls="--",
        )
        twin.set_ylabel("learning rate", color=SERIES_COLORS[5])
        handles.append(Line2D([], [], color=SERIES_COLORS[5], lw=1.0, ls="--"))
        labels.append("learning rate")
    norm = global_norm.where(global_norm > 0)
    bottom.plot(norm.index.to_numpy(), norm.to_numpy(np.float64), color=SERIES_COLORS[1], lw=1.2)
    bottom.set_yscale("log")
    bottom.set_ylabel("global gradient norm")
    bottom.set_xlabel("step")
    bad = np.unique(nonfinite_alerts(log)["step"].to_numpy())
    for ax in (top, bottom):
        mark_steps(ax, bad, log.steps)
        ax.grid(True, which="major", alpha=0.3)
    if len(bad):
        handles.append(
            Patch(facecolor=mpl.colors.to_rgba(NONFINITE_COLOR, 0.25), edgecolor=NONFINITE_COLOR)
        )
        labels.append(NONFINITE_LABEL)
    top.legend(handles, labels, fontsize="small", loc="upper right")
    top.set_title(f"Loss and global gradient norm, {span_text(log)}")
    return fig


def _bad_steps(log: GradientLog, bad: pd.DataFrame) -> str:
    """The steps of the non-finite alerts `bad`, with who skipped them."""
    return steps_text(bad["step"], skipped=log.skipped_steps, kept=log.kept_steps)
