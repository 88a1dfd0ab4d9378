"""A self-contained HTML report of a `GradientLog`: the verdict, then the charts, the
summary table and alerts.

The page has its CSS, its scripts (plotly.js, from the `plotly` package), its chart data
(JSON) and its images (base64 data URIs) inline, and loads nothing else, so it opens
offline and can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path
from typing import TYPE_CHECKING, Any, Literal

import numpy as np
import pandas as pd

from gradwatch._logdata.store import ORIGIN_COLUMNS
from gradwatch._logdata.views import layer_of_key
from gradwatch._ui import long_runs
from gradwatch._ui.paths import as_path, writable_file
from gradwatch._ui.plotly_js import plotly_js
from gradwatch._ui.text import name_list, origin_text, short_number
from gradwatch.log import GradientLog

if TYPE_CHECKING:
    from gradwatch._ui.interactive import ChartData

MAX_ALERT_ROWS = 200
# Names shown in one fact of the verdict before "and N more".
_SHOWN = 3
# The verdict's levels, least severe first.
LEVELS = ("ok", "note", "warning", "problem")

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 1.5rem auto;
       max-width: 2000px; padding: 0 2vw; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
.verdict { border-left: 0.4rem solid #2ca02c; background: #f2f8f2; padding: 0.6rem 1rem;
           margin: 1rem 0; }
.verdict p { font-size: 1.15rem; margin: 0.2rem 0 0.4rem; font-weight: 600; }
.verdict ul { margin: 0.2rem 0; padding-left: 1.2rem; }
.verdict.note { border-color: #1f77b4; background: #f1f6fb; }
.verdict.warning { border-color: #ff7f0e; background: #fff6ec; }
.verdict.problem { border-color: #d62728; background: #fdf0f0; }
.charts { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 560px), 1fr));
          gap: 1rem 2rem; align-items: start; }
.charts figure.wide { grid-column: 1 / -1; }
figure { margin: 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figure.wide img { width: 100%; }
figcaption { color: #555; font-size: 0.9rem; }
.plot { width: 100%; border: 1px solid #ddd; }
.picker { display: flex; gap: 0.5rem; align-items: flex-start; margin: 0.3rem 0;
          font-size: 0.9rem; }
.picker select { min-width: 18rem; max-width: 100%; }
.tables { display: grid; grid-template-columns: repeat(auto-fit, minmax(min(100%, 720px), 1fr));
          gap: 0 2rem; align-items: start; }
.scroll { max-height: 80vh; overflow: auto; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; position: sticky; top: 0; }
tr.nonfinite td { color: #d62728; font-weight: 600; }
tr.skipped td, dd.skipped { color: #8a5a00; }
.nonfinite { color: #d62728; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dt { color: #555; } dd { margin: 0; }
"""


@dataclass(frozen=True)
class Verdict:
    """What the report leads with: one sentence, its level, and the facts behind it.

    Attributes:
        level: `"ok"`, `"note"`, `"warning"` or `"problem"`, the most severe
            of the facts.
        sentence: One sentence that says what happened, in plain words.
        facts: The evidence, one short sentence each, most severe first.
    """

    level: Literal["ok", "note", "warning", "problem"]
    sentence: str
    facts: list[str] = field(default_factory=list)


def verdict(log: GradientLog, findings: pd.DataFrame | None = None) -> Verdict:
    """The verdict on a log: one clear sentence and the facts behind it.

    From the log alone it reads the recorded facts: NaN/Inf gradients (and
    which of those steps a `LossScaleOptimizer` skipped, so that their update
    never reached the weights), the `max_norm`/`min_norm` alerts, and the
    variables that got no gradient. The sentence names the most severe:
    NaN/Inf gradients that reached the weights are a problem; norm alerts and
    missing gradients a warning; steps that the optimizer skipped only a note,
    as mixed precision skips a step whenever it lowers its loss scale.

    Args:
        log: A `GradientLog`.
        findings: Findings to lead with, most severe first: a frame with the
            columns `severity` (one of `LEVELS`; others count as
            `"warning"`) and `finding` (a sentence). The first one becomes the
            sentence and each one a fact, before the log's own facts.
            Defaults to `None`.

    Returns:
        A `Verdict`.

    Example:

    ```python
    v = gradwatch.report.verdict(log)
    print(v.sentence)
    # No problem found: the 2 steps with NaN/Inf gradients (steps 3, 9) were skipped
    # by the LossScaleOptimizer, and their updates never reached the weights.
    ```
    """
    found, was_skipped = _recorded_facts(log)
    found.sort(key=lambda f: -LEVELS.index(f[0]))
    facts = [fact for _, fact in found]
    extremes = _extremes_fact(log)
    if extremes:
        facts.append(extremes)
    lead: tuple[str, str] | None = None
    if findings is not None and len(findings):
        rows = list(zip(findings["severity"], findings["finding"], strict=True))
        leveled = [(str(v) if str(v) in LEVELS else "warning", str(f)) for v, f in rows]
        facts = [f for _, f in leveled] + facts
        lead = max(leveled, key=lambda f: LEVELS.index(f[0]))
    if lead is None and found and found[0][0] != "note":
        lead = found[0]
    if lead is not None:
        level, sentence = lead
        return Verdict(level, sentence, facts)  # type: ignore[arg-type]
    if was_skipped:
        sentence = (
            f"No problem found: the {_count(was_skipped, 'step')} with NaN/Inf gradients "
            f"({_steps(was_skipped)}) {'was' if len(was_skipped) == 1 else 'were'} skipped by "
            "the LossScaleOptimizer, and their updates never reached the weights."
        )
        return Verdict("note", sentence, facts)
    sentence = (
        f"No problem found: every recorded gradient of the {_count(range(len(log)), 'step')} "
        "was finite, and no alert was raised."
    )
    return Verdict("ok", sentence, facts)


def _recorded_facts(log: GradientLog) -> tuple[list[tuple[str, str]], list[int]]:
    """The facts the log records, each with its level (`(level, fact)`), and the steps
    with NaN/Inf gradients that a `LossScaleOptimizer` skipped."""
    alerts = log.alerts
    variables = log.variables
    order = {k: i for i, k in enumerate(variables)}
    kept = {int(s) for s in log.kept_steps}  # by `on_nonfinite`: the model's fault
    skipped = {int(s) for s in log.skipped_steps} - kept  # by a LossScaleOptimizer
    nonfinite = alerts[alerts["kind"] == "nonfinite"]
    bad_steps = sorted({int(s) for s in nonfinite["step"]})
    reached = [s for s in bad_steps if s not in skipped and s not in kept]
    was_kept = [s for s in bad_steps if s in kept]
    was_skipped = [s for s in bad_steps if s in skipped]
    found: list[tuple[str, str]] = []  # (level, fact)
    if was_kept:
        first = was_kept[0]
        keys = _in_order(nonfinite.loc[nonfinite["step"] == first, "variable"], order)
        origins = log.origins
        source = ""
        traced = origins[origins["stage"].notna()]
        if len(traced):
            row = traced.iloc[0]
            where = origin_text(tuple(row[c] for c in ORIGIN_COLUMNS[1:]))
            source = f" Step {int(row['step'])}'s first NaN/Inf was {where}."
        found.append(
            (
                "problem",
                f"NaN/Inf gradients at {_count(was_kept, 'step')} ({_steps(was_kept)}), "
                f"first at step {first} in {name_list(keys, _SHOWN)}; on_nonfinite kept "
                f"{'its update' if len(was_kept) == 1 else 'their updates'} from the "
                f"model.{source}",
            )
        )
    if reached:
        first = reached[0]
        keys = _in_order(nonfinite.loc[nonfinite["step"] == first, "variable"], order)
        found.append(
            (
                "problem",
                f"NaN/Inf gradients reached the weights at {_count(reached, 'step')}"
                f" ({_steps(reached)}), first at step {first} in {name_list(keys, _SHOWN)}.",
            )
        )
    for kind, word in (("max_norm", "above `max_norm`"), ("min_norm", "below `min_norm`")):
        rows = alerts[alerts["kind"] == kind]
        if len(rows):
            steps = sorted({int(s) for s in rows["step"]})
            keys = _in_order(rows.loc[rows["step"] == steps[0], "variable"], order)
            found.append(
                (
                    "warning",
                    f"Gradient norms {word} at {_count(steps, 'step')} ({_steps(steps)}), "
                    f"first at step {steps[0]} in {name_list(keys, _SHOWN)}.",
                )
            )
    if log.disconnected:
        found.append(
            (
                "warning",
                f"{_count(log.disconnected, 'variable')} got no gradient (not connected to "
                f"the loss): {name_list(log.disconnected, _SHOWN)}.",
            )
        )
    if was_skipped:
        hit = nonfinite.loc[nonfinite["step"].isin(was_skipped), "variable"]
        found.append(
            (
                "note",
                f"Skipped by the LossScaleOptimizer: {_steps(was_skipped)} "
                f"({len(was_skipped)} of {len(log)} recorded steps), with NaN/Inf gradients "
                f"in {_count(sorted(set(hit)), 'variable')}; their updates never reached "
                "the weights.",
            )
        )
    return found, was_skipped


def _count(items: Sequence[Any], word: str) -> str:
    n = len(items)
    return f"{n} {word}" + ("" if n == 1 else "s")


def _steps(steps: Sequence[int], most: int = 6) -> str:
    text = ", ".join(str(s) for s in steps[:most])
    if len(steps) > most:
        text += ", ..."
    return ("step " if len(steps) == 1 else "steps ") + text


def _in_order(keys: Any, order: dict[str, int]) -> list[str]:
    return sorted(set(keys), key=lambda k: order.get(k, len(order)))


def _extremes_fact(log: GradientLog) -> str | None:
    """Which layer had the largest and which the smallest median gradient norm, over the
    steps without NaN/Inf gradients."""
    if "norm" not in log.stat_names or len(log.variables) < 2:
        return None
    by_layer = len({layer_of_key(k) for k in log.variables}) > 1
    wide = log.by_layer("norm") if by_layer else log.stat("norm").astype(np.float64)
    bad = log.alerts
    bad = bad.loc[bad["kind"] == "nonfinite", "step"].unique()
    finite = wide.drop(index=bad, errors="ignore")
    median = (finite if len(finite) else wide).median().dropna()
    if len(median) < 2:
        return None
    what = "layer" if by_layer else "variable"
    top, low = median.idxmax(), median.idxmin()
    largest = f"Largest median gradient norm: {short_number(median[top])} in {what} {top}"
    if median[low] > 0:
        times = short_number(median[top] / median[low])
        return f"{largest}; smallest: {short_number(median[low])} in {low} ({times} times smaller)."
    return f"{largest}; smallest: 0 in {low}."


def render_report(log: GradientLog, title: str = "gradwatch report", progress: bool = False) -> str:
    """The report as one HTML page.

    Leads with the verdict (`verdict`): one sentence and the facts behind it,
    with the steps that a `LossScaleOptimizer` skipped named as such. Then
    the evidence: an overview, the charts, the per-variable summary table
    (`GradientLog.summary`) and the alerts. A model of more than 30 variables
    is drawn by layer (`by="auto"` of `gradwatch.plot`).

    The norms over steps, the loss (with the learning rate and the global norm)
    and the norm heatmap are interactive (plotly.js, inline): hovering shows
    the layer or variable, the step and the value; dragging zooms a step range;
    the norms chart's legend shows and hides layers, and the heatmap's picker
    chooses its rows. On a run of more than 2000 recorded steps the lines keep
    each bin's smallest and largest value, and the heatmap's cells are bins of
    steps (at most 1000 columns), each the largest norm of its bin. The
    gradient-flow chart and a histogram (where recorded) of the variable with
    the largest gradient norm are pictures from `gradwatch.plot`. The charts
    sit side by side in a wide window and one below the other in a narrow one.

    Args:
        log: A `GradientLog` that recorded the `norm` stat.
        title: The page's title. Defaults to `"gradwatch report"`.
        progress: Show a progress bar (tqdm) over the parts. Defaults to `False`.

    Returns:
        The HTML text.

    Raises:
        ImportError: If matplotlib or plotly is not installed (both come with
            `pip install 'gradwatch[plot]'`).
        KeyError: If `norm` was not recorded.
        ValueError: If the log has no recorded steps.

    Example:

    ```python
    html = render_report(watch.log, title="run 42")
    ```
    """
    from gradwatch import plot  # matplotlib's ImportError, naming the extra
    from gradwatch._ui import interactive
    from gradwatch.progress import progress_bar

    script = plotly_js()  # the ImportError that names the extra, before any work
    if not len(log):
        raise ValueError("The log has no recorded steps, so there is nothing to report.")
    summary = log.summary()  # raises the log's KeyError without `norm`
    what = "layer" if len(log.variables) > plot.LAYER_THRESHOLD else "variable"
    # (caption, draw, wide, dpi) of the pictures.
    charts: list[tuple[str, Any, bool, int]] = [
        (
            f"Gradient flow: median and range of each {what}'s norm, in model order",
            plot.flow,
            False,
            100,
        ),
    ]
    if log.bins_per_decade is not None and summary["max_norm"].notna().any():
        key = str(summary["max_norm"].idxmax())
        charts.append(
            (
                f"Gradient histogram of {key}, the variable with the largest norm",
                lambda log: plot.histogram(log, key),
                False,
                100,
            )
        )
    figures = []
    with progress_bar(len(charts) + 2, "report", unit="part", enabled=progress) as bar:
        data = interactive.chart_data(log)
        plots = _interactive_figures(data)
        bar.update()
        for caption, draw, wide, dpi in charts:
            figures.append((caption, _png(draw(log), dpi), wide))
            bar.update()
        findings = log.diagnose()
        lead = verdict(log, _leads(findings))
        page = _page(log, title, summary, figures, lead, findings, plots, script, data)
        bar.update()
    return page


def _interactive_figures(data: ChartData) -> str:
    """The figures of the interactive charts: their places on the page, captions and the
    heatmap's row picker; the script draws into them."""
    e = html.escape
    what = data.by
    n = len(data.steps)
    binned = ""
    if data.bin_size > 1:
        binned = (
            f" The {n} steps are in bins of {data.bin_size}: each line keeps each bin's "
            "smallest and largest value, at their steps."
        )
    nav = "Hover for the values; drag to zoom a step range, double-click to zoom out."
    shown = sum(line.shown for line in data.norms)
    legend = (
        f" The {shown} {what}s with NaN/Inf, the largest or the smallest norms are shown "
        f"(as in gradwatch.plot.norms); click a name in the legend to show or hide it, "
        "double-click to show it alone."
        if shown < len(data.norms)
        else " Click a name in the legend to show or hide it, double-click to show it alone."
    )
    parts = [
        '<figure class="wide interactive"><div class="plot" id="gw-norms" style="height:520px">'
        f"</div><figcaption>{e(f'Gradient norm of each {what} over the steps. {nav}')}"
        f"{e(legend + binned)}</figcaption></figure>"
    ]
    if data.loss is not None:
        parts.append(
            '<figure class="wide interactive"><div class="plot" id="gw-loss" '
            'style="height:480px"></div><figcaption>'
            f"{e('The loss and learning rate of each step, and the global norm. ' + nav)}"
            f"{e(binned)}</figcaption></figure>"
        )
    options = "".join(
        f'<option value="{i}"{" selected" if data.heat_shown[i] else ""}>{e(line.name)}</option>'
        for i, line in enumerate(data.norms)
    )
    size = min(10, len(data.norms))
    heat_binned = ""
    if data.heat_size > 1:
        heat_binned = (
            f" The {n} steps are in bins of {data.heat_size}: each cell is the largest "
            "norm of its bin."
        )
    picked = int(data.heat_shown.sum())
    first = (
        f" The {picked} {what}s with NaN/Inf, the largest or the smallest norms are shown first."
        if picked < len(data.norms)
        else ""
    )
    parts.append(
        '<figure class="wide interactive"><div class="picker">'
        f'<label for="gw-heatmap-layers">{e(what.capitalize())}s shown (Ctrl/Shift-click to '
        f'pick several):</label><select multiple size="{size}" id="gw-heatmap-layers">'
        f"{options}</select>"
        '<button type="button" id="gw-heatmap-all">all</button>'
        '<button type="button" id="gw-heatmap-first">as first shown</button></div>'
        '<div class="plot" id="gw-heatmap"></div><figcaption>'
        f"{e(f'Gradient norm heatmap by {what} (log10). {nav} Red: NaN/Inf gradient.')}"
        f"{e(first + heat_binned)}</figcaption></figure>"
    )
    return "".join(parts)


def _charts_script() -> str:
    return (resources.files("gradwatch._ui") / "report_charts.js").read_text(encoding="utf-8")


def write_report(
    log: GradientLog,
    path: str | os.PathLike,
    title: str = "gradwatch report",
    progress: bool = False,
) -> Path:
    """Writes the report of `render_report` to an HTML file.

    Args:
        log: A `GradientLog` that recorded the `norm` stat.
        path: The `.html` file to write.
        title: The page's title. Defaults to `"gradwatch report"`.
        progress: Show a progress bar (tqdm). Defaults to `False`.

    Returns:
        The path written.

    Raises:
        TypeError: If `path` is not a str or os.PathLike.
        OSError: If the file cannot be written (its directory does not exist, or it is
            a directory).

    Example:

    ```python
    write_report(gradwatch.read_log("grads.parquet"), "report.html")
    ```
    """
    path = writable_file(as_path(path), "the report")
    text = render_report(log, title=title, progress=progress)
    path.write_text(text, encoding="utf-8")
    return path


def _png(fig: Any, dpi: int = 100) -> str:
    buffer = io.BytesIO()
    # No "Software" text chunk: the page holds no URL, not even inside an image.
    fig.savefig(buffer, format="png", dpi=dpi, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _page(
    log: GradientLog,
    title: str,
    summary: pd.DataFrame,
    figures: list[tuple[str, str, bool]],
    lead: Verdict,
    findings: pd.DataFrame,
    plots: str,
    script: str,
    chart_data: ChartData,
) -> str:
    from gradwatch._ui.interactive import to_json

    e = html.escape
    steps = log.steps
    first = log.first_nonfinite()
    skipped = [int(s) for s in log.skipped_steps]
    overview = {
        "recorded steps": f"{len(steps)} (steps {steps[0]} to {steps[-1]})",
        "variables": f"{len(log.variables)} in {len({layer_of_key(k) for k in log.variables})} "
        "layers",
        "stats": ", ".join(log.stat_names),
        "histograms": "none"
        if log.bins_per_decade is None
        else f"{log.bins_per_decade} bins per decade",
    }
    parts = [
        "<!DOCTYPE html>",
        '<html lang="en"><head><meta charset="utf-8">',
        '<meta name="viewport" content="width=device-width, initial-scale=1">',
        f"<title>{e(title)}</title><style>{_CSS}</style></head><body>",
        f"<h1>{e(title)}</h1>",
        f'<section class="verdict {lead.level}" id="verdict"><p>{e(lead.sentence)}</p>',
    ]
    evidence = [f for f in lead.facts if f != lead.sentence]
    if evidence:
        parts.append("<ul>" + "".join(f"<li>{e(f)}</li>" for f in evidence) + "</ul>")
    parts.append("</section>")
    parts.append(_findings_section(findings))
    parts.append("<dl>")
    parts.extend(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in overview.items())
    if first is not None:
        # A step that the optimizer skipped is a fact, not an alarm: not in red.
        cls, note = ("skipped", " (skipped)") if first[0] in skipped else ("nonfinite", "")
        parts.append(
            f'<dt>first non-finite step</dt><dd class="{cls}">'
            f"{first[0]}{note}: {e(', '.join(first[1]))}</dd>"
        )
    if skipped:
        parts.append(
            "<dt>skipped steps</dt>"
            f"<dd>{e(', '.join(str(s) for s in skipped))} (by the LossScaleOptimizer)</dd>"
        )
    if log.disconnected:
        parts.append(f"<dt>no gradient</dt><dd>{e(', '.join(log.disconnected))}</dd>")
    parts.append("</dl>")
    if first is not None:
        parts.append(
            '<p class="nonfinite">Steps with NaN or Inf gradient elements are marked in red '
            "on every chart.</p>"
        )
    parts.append('<h2>Charts</h2><div class="charts">')
    parts.append(plots)
    for caption, data, wide in figures:
        cls = ' class="wide"' if wide else ""
        parts.append(
            f'<figure{cls}><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )
    parts.append('</div><div class="tables"><section><h2>Summary</h2>')
    reached = log.alerts
    reached = reached[(reached["kind"] == "nonfinite") & ~reached["step"].isin(set(skipped))]
    table = _summary_table(summary, set(reached["variable"]))
    parts.append(f'<div class="scroll">{table}</div></section>')
    parts.append("<section><h2>Alerts</h2>")
    parts.append(_alerts_table(log.alerts, skipped))
    parts.append("</section>")
    parts.append(_long_run_section(log))
    parts.append("</div>")
    # The scripts last: the page reads before the charts are drawn. plotly.js holds no
    # "</script>"; the data's JSON escapes every "<".
    parts.append(f"<script>{script}</script>")
    parts.append(
        f'<script type="application/json" id="gradwatch-chart-data">{to_json(chart_data)}</script>'
    )
    parts.append(f"<script>{_charts_script()}</script>")
    parts.append("</body></html>")
    return "\n".join(parts)


# The doctor's severities as the verdict's levels; its `info` rows (a stat to record for a
# rule) are not facts about the training, and stay in the findings table.
_LEVEL_OF = {"error": "problem", "warning": "warning"}


def _leads(findings: pd.DataFrame) -> pd.DataFrame:
    """The doctor's errors and warnings as `verdict` findings: a level and a sentence."""
    rows = findings[findings["severity"].isin(list(_LEVEL_OF))]
    sentences = [
        f"{finding} in {name_list(list(variables), _SHOWN)}: {evidence}"
        if len(variables)
        else f"{finding}: {evidence}"
        for finding, variables, evidence in zip(
            rows["finding"], rows["variables"], rows["evidence"], strict=True
        )
    ]
    return pd.DataFrame({"severity": rows["severity"].map(_LEVEL_OF), "finding": sentences})


def _findings_section(findings: pd.DataFrame) -> str:
    """The doctor's findings (`GradientLog.diagnose`), most severe first, after the verdict."""
    from gradwatch.findings import count_line

    e = html.escape
    colour = {"error": "#d62728", "warning": "#b8860b", "info": "#555"}
    rows = []
    for _, row in findings.iterrows():
        steps = "-" if pd.isna(row["first_step"]) else f"{row['first_step']}..{row['last_step']}"
        cells = [
            f'<td style="color:{colour[row["severity"]]};font-weight:600">'
            f"{e(row['severity'])}</td>",
            f"<td>{e(row['finding'])}</td>",
            f"<td>{e(steps)}</td>",
            f'<td style="text-align:left">{e(", ".join(row["variables"]) or "-")}</td>',
            f'<td style="text-align:left">{e(row["evidence"])}<br><em>Try:</em> '
            f"{e(row['advice'])}</td>",
        ]
        rows.append(f"<tr>{''.join(cells)}</tr>")
    head = "".join(
        f"<th>{c}</th>" for c in ("severity", "finding", "steps", "variables", "evidence")
    )
    table = (
        f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
        if rows
        else ""
    )
    return (
        f'<section id="findings"><h2>Findings</h2><p>{e(count_line(findings))}</p>{table}</section>'
    )


def _summary_table(summary: pd.DataFrame, reached: set[str]) -> str:
    """The summary; rows with NaN/Inf are red where some reached the weights (`reached`),
    and marked as skipped where all of theirs were at steps the optimizer skipped."""
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in ["variable", *summary.columns])
    rows = []
    for key, row in summary.iterrows():
        bad = pd.notna(row["nonfinite"]) and row["nonfinite"] > 0
        cells = "".join(f"<td>{e(_fmt(v))}</td>" for v in row)
        cls = ""
        if bad:
            cls = ' class="nonfinite"' if key in reached else ' class="skipped"'
        rows.append(f"<tr{cls}><td>{e(str(key))}</td>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _alerts_table(alerts: pd.DataFrame, skipped: Sequence[int] = ()) -> str:
    """The alerts, with the non-finite alerts of each skipped step folded into one row."""
    e = html.escape
    if not len(alerts):
        return "<p>No alerts.</p>"
    folded = alerts["step"].isin(set(skipped)) & (alerts["kind"] == "nonfinite")
    rows: list[tuple[int, str, list[Any]]] = []  # (step, class, cells)
    for _, row in alerts[~folded].iterrows():
        cls = "nonfinite" if row["kind"] == "nonfinite" else ""
        rows.append((int(row["step"]), cls, list(row)))
    for step, group in alerts[folded].groupby("step"):
        cells = [
            step,
            f"{_count(list(group['variable']), 'variable')}",
            "nonfinite, step skipped by the LossScaleOptimizer",
            group["value"].sum(),
        ]
        rows.append((int(step), "skipped", cells))
    rows.sort(key=lambda r: r[0])
    shown = rows[:MAX_ALERT_ROWS]
    head = "".join(f"<th>{e(c)}</th>" for c in alerts.columns)
    body = []
    for _, cls, cells in shown:
        attr = f' class="{cls}"' if cls else ""
        body.append(f"<tr{attr}>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in cells) + "</tr>")
    more = ""
    if len(rows) > len(shown):
        more = f"<p>and {len(rows) - len(shown)} more rows; see <code>log.alerts</code>.</p>"
    text = f"{_count(range(len(alerts)), 'alert')}"
    if folded.any():
        text += (
            f", {int(folded.sum())} of them at the "
            f"{_count(sorted(set(alerts.loc[folded, 'step'])), 'step')} that "
            "the LossScaleOptimizer skipped (one row each)"
        )
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}</tbody></table>"
    return f'<p>{e(text)}.</p><div class="scroll">{table}</div>{more}'


def _frame_table(frame: pd.DataFrame) -> str:
    e = html.escape
    head = "".join(f"<th>{e(str(c))}</th>" for c in frame.columns)
    body = "".join(
        "<tr>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in row) + "</tr>"
        for row in frame.itertuples(index=False)
    )
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{body}</tbody></table>"
    return f'<div class="scroll">{table}</div>'


def _long_run_section(log: GradientLog) -> str:
    """The spikes, the examples behind the replayed steps, and the gradient noise scale;
    empty for a log with none of them."""
    e = html.escape
    parts = []
    found = long_runs.spikes(log)
    if len(found):
        parts.append(f"<h3>Spikes</h3><p>{e(_count(range(len(found)), 'spike'))}.</p>")
        parts.append(_frame_table(found.head(MAX_ALERT_ROWS)))
    top = long_runs.top_examples(log)
    if len(top):
        replayed = log.examples["step"].nunique()
        parts.append(
            f"<h3>Examples</h3><p>{e(_count(range(len(log.examples)), 'example'))} at "
            f"{e(_count(range(replayed), 'replayed step'))}; the highest gradient norms "
            "against their step's median (<code>log.examples</code>):</p>"
        )
        parts.append(_frame_table(top))
    noise = long_runs.noise_line(log)
    if noise is not None:
        frame = log.noise_scale
        parts.append(f"<h3>Gradient noise scale</h3><p>{e(noise)}.</p>")
        parts.append(_frame_table(frame.tail(10)))
    if not parts:
        return ""
    return '<section id="long-runs"><h2>Long runs</h2>' + "".join(parts) + "</section>"


def _fmt(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)
