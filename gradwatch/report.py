"""A self-contained HTML report of a `GradientLog`: the charts, the summary table and alerts.

The page has its images as base64 data URIs and its CSS inline, and loads
nothing else, so it opens offline and can be mailed or archived as one file.
"""

from __future__ import annotations

import base64
import html
import io
import os
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

from gradwatch.log import GradientLog

MAX_ALERT_ROWS = 200

_CSS = """
body { font-family: system-ui, -apple-system, "Segoe UI", sans-serif; margin: 2rem auto;
       max-width: 1100px; padding: 0 1rem; color: #222; }
h1 { font-size: 1.5rem; } h2 { font-size: 1.2rem; margin-top: 2rem; }
figure { margin: 1rem 0; } figure img { max-width: 100%; height: auto; border: 1px solid #ddd; }
figcaption { color: #555; font-size: 0.9rem; }
table { border-collapse: collapse; font-size: 0.85rem; }
th, td { border: 1px solid #ddd; padding: 0.25rem 0.5rem; text-align: right; }
th:first-child, td:first-child { text-align: left; }
thead th { background: #f3f3f3; }
tr.nonfinite td { color: #d62728; font-weight: 600; }
.nonfinite { color: #d62728; font-weight: 600; }
dl { display: grid; grid-template-columns: max-content auto; gap: 0.2rem 1rem; }
dt { color: #555; } dd { margin: 0; }
"""


def render_report(log: GradientLog, title: str = "gradwatch report", progress: bool = False) -> str:
    """The report as one HTML page.

    Shows an overview, the gradient-flow chart, the norms over steps, the norm
    heatmap, a histogram (where recorded) of the variable with the largest
    gradient norm, the per-variable summary table (`GradientLog.summary`) and
    the alerts. Charts come from `gradwatch.plot`, so this needs matplotlib.

    Args:
        log: A `GradientLog` that recorded the `norm` stat.
        title: The page's title. Defaults to `"gradwatch report"`.
        progress: Show a progress bar (tqdm) over the parts. Defaults to `False`.

    Returns:
        The HTML text.

    Raises:
        ImportError: If matplotlib is not installed.
        KeyError: If `norm` was not recorded.
        ValueError: If the log has no recorded steps.

    Example:

    ```python
    html = render_report(watch.log, title="run 42")
    ```
    """
    from gradwatch import plot
    from gradwatch.progress import progress_bar

    if not len(log):
        raise ValueError("The log has no recorded steps, so there is nothing to report.")
    summary = log.summary()  # raises the log's KeyError without `norm`
    charts: list[tuple[str, Any]] = [
        ("Gradient flow: median and range of each variable's norm, in model order", plot.flow),
        ("Gradient norm of each variable over the steps", plot.norms),
        ("Gradient norm heatmap (log10)", plot.heatmap),
    ]
    if log.scalars["loss"].notna().any():
        charts.append(("The loss and learning rate of each step, and the global norm", plot.loss))
    if log.bins_per_decade is not None and summary["max_norm"].notna().any():
        key = str(summary["max_norm"].idxmax())
        charts.append(
            (
                f"Gradient histogram of {key}, the variable with the largest norm",
                lambda log: plot.histogram(log, key),
            )
        )
    figures = []
    with progress_bar(len(charts) + 1, "report", unit="part", enabled=progress) as bar:
        for caption, draw in charts:
            figures.append((caption, _png(draw(log))))
            bar.update()
        page = _page(log, title, summary, figures)
        bar.update()
    return page


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
        OSError: If the file cannot be written.

    Example:

    ```python
    write_report(gradwatch.read_log("grads.parquet"), "report.html")
    ```
    """
    path = Path(path)
    if not path.parent.is_dir():
        raise FileNotFoundError(
            f"Cannot write the report to '{path}': the directory '{path.parent}' does not "
            "exist. Create it first, or choose another path."
        )
    text = render_report(log, title=title, progress=progress)
    path.write_text(text, encoding="utf-8")
    return path


def _png(fig: Any) -> str:
    buffer = io.BytesIO()
    # No "Software" text chunk: the page holds no URL, not even inside an image.
    fig.savefig(buffer, format="png", dpi=100, metadata={"Software": None})
    return base64.b64encode(buffer.getvalue()).decode("ascii")


def _page(
    log: GradientLog, title: str, summary: pd.DataFrame, figures: list[tuple[str, str]]
) -> str:
    e = html.escape
    steps = log.steps
    first = log.first_nonfinite()
    overview = {
        "recorded steps": f"{len(steps)} (steps {steps[0]} to {steps[-1]})",
        "variables": str(len(log.variables)),
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
        "<dl>",
        *(f"<dt>{e(k)}</dt><dd>{e(v)}</dd>" for k, v in overview.items()),
    ]
    if first is not None:
        parts.append(
            '<dt>first non-finite step</dt><dd class="nonfinite">'
            f"{first[0]}: {e(', '.join(first[1]))}</dd>"
        )
    if log.disconnected:
        parts.append(f"<dt>no gradient</dt><dd>{e(', '.join(log.disconnected))}</dd>")
    parts.append("</dl>")
    if first is not None:
        parts.append(
            '<p class="nonfinite">Steps with NaN or Inf gradient elements are marked in red '
            "on every chart.</p>"
        )
    parts.append("<h2>Charts</h2>")
    for caption, data in figures:
        parts.append(
            f'<figure><img alt="{e(caption)}" src="data:image/png;base64,{data}">'
            f"<figcaption>{e(caption)}</figcaption></figure>"
        )
    parts.append("<h2>Summary</h2>")
    parts.append(_summary_table(summary))
    parts.append("<h2>Alerts</h2>")
    parts.append(_alerts_table(log.alerts))
    parts.append("</body></html>")
    return "\n".join(parts)


def _summary_table(summary: pd.DataFrame) -> str:
    e = html.escape
    head = "".join(f"<th>{e(c)}</th>" for c in ["variable", *summary.columns])
    rows = []
    for key, row in summary.iterrows():
        bad = pd.notna(row["nonfinite"]) and row["nonfinite"] > 0
        cells = "".join(f"<td>{e(_fmt(v))}</td>" for v in row)
        cls = ' class="nonfinite"' if bad else ""
        rows.append(f"<tr{cls}><td>{e(str(key))}</td>{cells}</tr>")
    return f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"


def _alerts_table(alerts: pd.DataFrame) -> str:
    e = html.escape
    if not len(alerts):
        return "<p>No alerts.</p>"
    shown = alerts.head(MAX_ALERT_ROWS)
    head = "".join(f"<th>{e(c)}</th>" for c in shown.columns)
    rows = []
    for _, row in shown.iterrows():
        cls = ' class="nonfinite"' if row["kind"] == "nonfinite" else ""
        rows.append(f"<tr{cls}>" + "".join(f"<td>{e(_fmt(v))}</td>" for v in row) + "</tr>")
    more = ""
    if len(alerts) > len(shown):
        more = f"<p>and {len(alerts) - len(shown)} more; see <code>log.alerts</code>.</p>"
    table = f"<table><thead><tr>{head}</tr></thead><tbody>{''.join(rows)}</tbody></table>"
    return f"<p>{len(alerts)} alerts.</p>{table}{more}"


def _fmt(value: Any) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and np.isnan(value)):
        return "-"
    if isinstance(value, (float, np.floating)):
        return f"{value:.4g}"
    return str(value)
