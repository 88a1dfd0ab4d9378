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

import math
import re
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import pandas as pd

try:
    import matplotlib as mpl
    from matplotlib.lines import Line2D
    from matplotlib.patches import Patch

    from gradwatch._figure import Figure  # matplotlib's, displayed as PNG in notebooks
except ImportError as e:  # pragma: no cover - exercised in a subprocess test
    raise ImportError(
        "gradwatch.plot needs matplotlib, which is not installed. Install it with: "
        "pip install 'gradwatch[plot]'"
    ) from e

from gradwatch._views import layer_of_key
from gradwatch.keys import match_patterns
from gradwatch.log import GradientLog

By = Literal["auto", "variable", "layer"]
#: `by="auto"` draws layers, not variables, when the log has more variables than this.
LAYER_THRESHOLD = 30

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
_RANGE_COLOR = "#8c8c8c"
_STEP_COLOR = "#000000"
_OTHER_COLOR = "#b0b0b0"
# The most lines `norms` draws in colour, each named in the legend; with the count of the
# grey others and the non-finite entry the legend stays within 12 entries.
_MAX_LINES = 10
# The most rows of one panel of `flow` and `heatmap`, and the most panels side by side.
_MAX_ROWS = 110
_MAX_PANELS = 5
# Every figure stays within this many inches each way: 2400 px at 100 dpi.
_MAX_INCHES = 24.0
# Stats that may be negative: the heatmap shows log10 of their magnitude.
_SIGNED_STATS = ("mean", "min", "max", "cos_prev")


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
    _check_log(log)
    rows = _rows(log, "norm", by)
    norm = _positive(rows.wide)
    if step is not None:
        step = _check_step(log, step, norm.index)
    finite = norm.drop(index=np.unique(rows.bad["step"].to_numpy()), errors="ignore")
    if not len(finite):  # every step was non-finite: the band spans them all
        finite = norm
    lo, hi, median = finite.min(), finite.max(), finite.median()
    bad = rows.bad if step is None else rows.bad[rows.bad["step"] == step]
    bad_names = set(bad["name"])
    kinds = _kind_order(rows.kinds)
    colors = {kind: _SERIES_COLORS[i % len(_SERIES_COLORS)] for i, kind in enumerate(kinds)}
    largest, smallest = _extremes(lo, hi, median, 3)
    fig, axes, panels, fontsize = _panels(len(rows.names), 7.0, 2.6)
    for ax, part in zip(axes, panels, strict=True):
        y = np.arange(len(part))
        names = [rows.names[i] for i in part]
        ax.hlines(
            y,
            lo.iloc[part].to_numpy(),
            hi.iloc[part].to_numpy(),
            color=_RANGE_COLOR,
            lw=4,
            alpha=0.35,
            label="range",
        )
        for kind in kinds:
            mine = [j for j, i in enumerate(part) if rows.kinds[i] == kind]
            if mine:
                ax.plot(
                    median.iloc[[part[j] for j in mine]].to_numpy(),
                    y[mine],
                    marker="o",
                    ms=4,
                    lw=1,
                    color=colors[kind],
                    label="median"
                    if len(kinds) == 1
                    else f"median, {kind}" + (" layers" if rows.by == "layer" else ""),
                )
        if step is not None:
            ax.plot(
                norm.loc[step].iloc[part].to_numpy(),
                y,
                ls="",
                marker="D",
                ms=3.5,
                color=_STEP_COLOR,
                label=f"step {step}",
            )
        marked = [j for j, name in enumerate(names) if name in bad_names]
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
            (largest, "^", f"the {len(largest)} largest (by their largest norm)"),
            (smallest, "v", f"the {len(smallest)} smallest (by their median norm)"),
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
        _label_rows(ax, [rows.labels[i] for i in part], names, bad_names, fontsize)
        for j, text in enumerate(ax.get_yticklabels()):
            if part[j] in largest or part[j] in smallest:
                text.set_fontweight("bold")
        ax.set_ylim(len(part) - 0.5, -0.5)
        ax.set_xscale("log")
        ax.set_xlabel("gradient norm (L2)")
        ax.grid(True, axis="x", which="major", alpha=0.3)
    axes[0].set_ylabel(rows.axis_label)
    what = "layer" if rows.by == "layer" else "variable"
    title = f"Gradient flow by {what}, {_span(log)}"
    if step is not None:
        title = f"Gradient flow by {what} at step {step}"
    fig.suptitle(title)
    handles, labels = _unique_legend(axes)
    if len(rows.bad) and step is None:
        labels[labels.index("range")] = "range over the finite steps"
    if bad_names:
        handles.append(Line2D([], [], marker="<", ls="", color=NONFINITE_COLOR, markersize=7))
        labels.append(f"{NONFINITE_LABEL} at {_steps_text(bad['step'], skipped=log.skipped_steps)}")
    fig.legend(
        handles, labels, loc="outside lower center", ncols=min(3, len(axes)), fontsize="small"
    )
    return fig


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
    _check_log(log)
    keys = match_patterns(variables, log.variables, "variables")
    rows = _rows(log, "norm", by, keys)
    norm = _positive(rows.wide)
    fig = Figure(figsize=(10.0, 6.0), layout="constrained")
    ax = fig.add_subplot()
    steps = norm.index.to_numpy()
    n = len(rows.names)
    if n <= _MAX_LINES:
        shown = list(range(n))
    else:
        shown = _worst(rows, norm, _MAX_LINES)
        for i in range(n):
            if i not in shown:
                ax.plot(steps, norm.iloc[:, i].to_numpy(), color=_OTHER_COLOR, lw=0.6, alpha=0.6)
    for rank, i in enumerate(shown):
        name = rows.names[i]
        color = _SERIES_COLORS[rank % len(_SERIES_COLORS)]
        ls = "-" if rank < len(_SERIES_COLORS) else "--"
        ax.plot(steps, norm[name].to_numpy(), color=color, ls=ls, lw=1.4, label=rows.labels[i])
        own = np.intersect1d(rows.bad.loc[rows.bad["name"] == name, "step"].to_numpy(), steps)
        if len(own):
            # Where every element was non-finite the norm is NaN and has no cross; the span shows.
            ax.scatter(
                own, norm.loc[own, name].to_numpy(), marker="x", color=NONFINITE_COLOR, zorder=3
            )
    all_bad = _nonfinite(log)
    _mark_steps(ax, np.unique(all_bad["step"].to_numpy()), log.steps)
    ax.set_yscale("log")
    ax.set_xlabel("step")
    ax.set_ylabel("gradient norm (L2)")
    what = "layers" if rows.by == "layer" else "variables"
    ax.set_title(f"Gradient norms of {n} {what}{rows.under}, {_span(log)}")
    handles, labels = ax.get_legend_handles_labels()
    if n > len(shown):
        handles.append(Line2D([], [], color=_OTHER_COLOR, lw=0.8))
        labels.append(f"{n - len(shown)} other {what}")
    if len(all_bad):
        handles.append(
            Patch(facecolor=mpl.colors.to_rgba(NONFINITE_COLOR, 0.25), edgecolor=NONFINITE_COLOR)
        )
        labels.append(
            f"{NONFINITE_LABEL} at {_steps_text(all_bad['step'], skipped=log.skipped_steps)}"
        )
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
    _check_log(log)
    rows = _rows(log, stat, by)
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
    edges = _edges(steps)
    bad_steps = np.unique(_nonfinite(log)["step"].to_numpy())
    bad_steps = bad_steps[np.isin(bad_steps, steps)]
    fig, axes, panels, fontsize = _panels(len(rows.names), 8.0, 1.2, colorbar=True)
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
        _label_rows(ax, [rows.labels[i] for i in part], names, bad_rows, fontsize)
        ax.set_ylim(len(part) - 0.5, -0.5)  # model order, top down
        ax.set_xlabel("step")
    axes[0].set_ylabel(rows.axis_label)
    label = f"log10 |{stat}|" if stat in _SIGNED_STATS else f"log10 {stat}"
    height = fig.get_size_inches()[1]
    # On a tall chart a full-height bar would be as wide as a panel: keep it about 5 in.
    fig.colorbar(
        image, ax=axes, label=label, fraction=0.05, pad=0.02, shrink=min(1.0, 5.0 / height)
    )
    what = "layer" if rows.by == "layer" else "variable"
    title = f"Gradient {stat} by {what}, {_span(log)}"
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


@dataclass
class _Rows:
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


def _rows(log: GradientLog, stat: str, by: Any, keys: Sequence[str] | None = None) -> _Rows:
    if by not in ("auto", "variable", "layer"):
        raise ValueError(
            "`by` must be 'auto' (by layer above 30 variables), 'variable' or 'layer'. "
            f"Received: by={by!r}"
        )
    keys = list(log.variables if keys is None else keys)
    if by == "auto":
        by = "layer" if len(keys) > LAYER_THRESHOLD and _aggregates(log, stat) else "variable"
    alerts = _nonfinite(log)
    if by == "layer":
        names = list(dict.fromkeys(layer_of_key(k) for k in keys))
        wide = log.by_layer(stat)[names]
        parts: dict[str, list[str]] = {name: [] for name in names}
        for key in log.variables:
            layer = layer_of_key(key)
            if layer in parts:
                parts[layer].append(_kind_of(key))
        kinds = ["+".join(dict.fromkeys(parts[name])) for name in names]
        bad = pd.DataFrame(
            {"step": alerts["step"], "name": [layer_of_key(k) for k in alerts["variable"]]}
        )
    else:
        names = keys
        wide = log.stat(stat)[names]
        kinds = [_kind_of(k) for k in names]
        bad = pd.DataFrame({"step": alerts["step"], "name": list(alerts["variable"])})
    # The most common kinds get a colour each; the rest share one, as "other".
    common = [kind for kind, _ in pd.Series(kinds).value_counts(sort=True).items()]
    kept = (
        set(common[: len(_SERIES_COLORS) - 1]) if len(common) > len(_SERIES_COLORS) else set(common)
    )
    kinds = [kind if kind in kept else "other" for kind in kinds]
    bad = bad[bad["name"].isin(set(names))].drop_duplicates().reset_index(drop=True)
    prefix = _common_prefix(names)
    labels = [name[len(prefix) :] for name in names]
    return _Rows(by, wide, names, labels, prefix, kinds, bad)


def _aggregates(log: GradientLog, stat: str) -> bool:
    """Whether `GradientLog.by_layer` can aggregate `stat` from what the log recorded."""
    needs = {"cos_prev": None, "std": ("mean",), "update_ratio": ("update_norm", "weight_norm")}
    if stat not in needs:
        return True
    return needs[stat] is not None and all(n in log.stat_names for n in needs[stat])


def _kind_of(key: str) -> str:
    """The kind of variable a key names: its last part (`kernel`, `bias`, `gamma`)."""
    return key.rsplit("/", 1)[-1].split("#", 1)[0]


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


def _kind_order(kinds: Sequence[str]) -> list[str]:
    return list(dict.fromkeys(kinds))


def _extremes(
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


def _worst(rows: _Rows, norm: pd.DataFrame, most: int) -> list[int]:
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


def _panels(
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


def _label_rows(
    ax: Any, labels: Sequence[str], names: Sequence[str], bad: set, fontsize: float
) -> None:
    ax.set_yticks(np.arange(len(labels)), labels, fontsize=fontsize)
    for text, name in zip(ax.get_yticklabels(), names, strict=True):
        if name in bad:
            text.set_color(NONFINITE_COLOR)


def _unique_legend(axes: Sequence[Any]) -> tuple[list, list[str]]:
    handles, labels = [], []
    for ax in axes:
        for handle, label in zip(*ax.get_legend_handles_labels(), strict=True):
            if label not in labels:
                handles.append(handle)
                labels.append(label)
    return handles, labels


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


def _steps_text(steps: Any, most: int = 6, skipped: Any = ()) -> str:
    """`step 3`, `steps 3, 9`, or `steps 3, 9, ... (12 in all)`; with `skipped` (the
    steps a LossScaleOptimizer skipped), how many of them were skipped."""
    steps = sorted({int(s) for s in steps})
    text = ", ".join(str(s) for s in steps[:most])
    if len(steps) > most:
        text += f", ... ({len(steps)} in all)"
    text = ("step " if len(steps) == 1 else "steps ") + text
    n = len(set(steps) & {int(s) for s in skipped})
    if n and n == len(steps):
        text += ", skipped by the LossScaleOptimizer"
    elif n:
        text += f" ({n} skipped by the LossScaleOptimizer)"
    return text


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
