"""The doctor's findings as text: a table, JSON, a one-line count and the end-of-`fit` summary.

`gradwatch.diagnose` finds them; `gradwatch doctor`, `gradwatch summary`, the HTML
report and `GradWatch` show them with these. Pandas only: no Keras.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import pandas as pd

from gradwatch._ui.text import name_list
from gradwatch.diagnose import FINDING_COLUMNS, SEVERITIES

__all__ = [
    "count_line",
    "findings_json",
    "findings_text",
    "fit_summary",
]

# Names shown on one line of the end-of-`fit` summary before "and N more".
_SHOWN = 5


def count_line(findings: pd.DataFrame) -> str:
    """One line that counts the findings by severity.

    Example:

    >>> count_line(pd.DataFrame({"severity": ["error", "warning", "warning"]}))
    'Findings: 1 error, 2 warnings, 0 info.'
    """
    n = findings["severity"].value_counts()
    e, w, i = (int(n.get(s, 0)) for s in SEVERITIES)
    return f"Findings: {e} error{'s' * (e != 1)}, {w} warning{'s' * (w != 1)}, {i} info."


def _steps_text(row: Mapping[str, Any]) -> str:
    a, b = row["first_step"], row["last_step"]
    if pd.isna(a):
        return "-"
    a, b = int(a), int(b)
    return f"step {a}" if a == b else f"steps {a}..{b}"


def findings_text(findings: pd.DataFrame, severities: Sequence[str] = SEVERITIES) -> str:
    """The findings as a text table, most severe first: one block per finding.

    Args:
        findings: A frame from `GradientLog.diagnose`.
        severities: The severities to show. Defaults to all.

    Example:

    ```python
    print(findings_text(log.diagnose()))
    ```
    """
    shown = findings[findings["severity"].isin(list(severities))]
    if not len(shown):
        return "No findings."
    lines = []
    wid = max(len(f) for f in shown["finding"])
    for _, row in shown.iterrows():
        where = ", ".join(row["variables"]) or "-"
        head = f"{row['severity'].upper():<8}{row['finding']:<{wid + 2}}{_steps_text(row):<18}"
        lines.append(f"{head}{where}")
        lines.append(f"{'':8}{row['evidence']}")
        lines.append(f"{'':8}Try: {row['advice']}")
    return "\n".join(lines)


def print_fit_findings(
    diagnose: Callable[[], pd.DataFrame], verbose: int | str, fit_params: Mapping | None
) -> None:
    """What `GradWatch(verbose=...)` prints at the end of `fit`: `fit_summary` of what
    `diagnose()` finds. `"auto"` prints unless `fit(verbose=0)` asked for silence. A
    diagnosis that fails is a warning: it never costs the training its end."""
    if verbose == "auto":
        verbose = 0 if (fit_params or {}).get("verbose", 1) == 0 else 1
    if not verbose:
        return
    try:
        text = fit_summary(diagnose())
    except Exception as e:
        warnings.warn(f"GradWatch could not diagnose the run: {e!r}", stacklevel=2)
        return
    if text:
        print(text, flush=True)


def fit_summary(findings: pd.DataFrame) -> str:
    """The short summary `GradWatch` prints at the end of `fit`: the errors and warnings,
    one line each, or `""` when there are none.

    Example:

    >>> f = pd.DataFrame({"severity": ["error", "info"], "finding": ["nonfinite", "clipping"],
    ...                   "variables": [["d/kernel"], []], "first_step": [3, None],
    ...                   "last_step": [9, None]})
    >>> print(fit_summary(f))
    GradWatch found 1 error: see `watch.log.diagnose()` for the evidence and advice.
      error    nonfinite  steps 3..9  d/kernel
    """
    shown = findings[findings["severity"].isin(["error", "warning"])]
    if not len(shown):
        return ""
    n = shown["severity"].value_counts()
    e, w = int(n.get("error", 0)), int(n.get("warning", 0))
    counts = [f"{e} error{'s' * (e != 1)}"] * bool(e) + [f"{w} warning{'s' * (w != 1)}"] * bool(w)
    lines = [
        f"GradWatch found {' and '.join(counts)}: see `watch.log.diagnose()` for the evidence "
        "and advice."
    ]
    wid = max(len(f) for f in shown["finding"])
    steps = [_steps_text(row) for _, row in shown.iterrows()]
    swid = max(len(x) for x in steps)
    for (_, row), span in zip(shown.iterrows(), steps, strict=True):
        where = name_list([str(v) for v in row["variables"]], _SHOWN) if row["variables"] else ""
        lines.append(f"  {row['severity']:<8} {row['finding']:<{wid}}  {span:<{swid}}  {where}")
    return "\n".join(line.rstrip() for line in lines)


def findings_json(findings: pd.DataFrame) -> str:
    """The findings as a JSON array of objects (missing steps as `null`).

    Example:

    ```python
    json.loads(findings_json(log.diagnose()))[0]["finding"]
    ```
    """
    records = []
    for _, row in findings.iterrows():
        rec = {c: row[c] for c in FINDING_COLUMNS}
        for c in ("first_step", "last_step"):
            rec[c] = None if pd.isna(rec[c]) else int(rec[c])
        rec["variables"] = [str(v) for v in rec["variables"]]
        records.append(rec)
    return json.dumps(records, indent=2)
