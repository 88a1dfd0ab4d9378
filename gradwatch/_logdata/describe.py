"""A log described in a few lines, for `repr` and for notebooks (`_repr_html_`)."""

from __future__ import annotations

import html
from typing import Any

from gradwatch._ui.text import name_list

# Names listed before "and N more" in the notebook view.
_MOST_NAMES = 6


def describe(log: Any) -> str:
    """The one-line summary `GradientLog.__repr__` returns: the recorded steps, the
    variables, the stats and the first non-finite step."""
    facts = [_steps_text(log), f"{len(log.variables)} variables", f"stats={list(log.stat_names)}"]
    first = _first_nonfinite_text(log)
    if first is not None:
        facts.append(first)
    return f"GradientLog({', '.join(facts)})"


def describe_html(log: Any) -> str:
    """The notebook view `GradientLog._repr_html_` returns: a small table of the same
    facts, plus the skipped steps, histograms, kept tensors, replicas and alerts
    where there are any."""
    variables = log.variables
    rows = [
        ("steps", _steps_text(log)),
        (
            "variables",
            f"{len(variables)}: {name_list(variables, _MOST_NAMES)}" if variables else "none",
        ),
        ("stats", ", ".join(log.stat_names)),
    ]
    first = log.first_nonfinite()
    if first is not None:
        step, keys = first
        rows.append(
            (
                "first non-finite step",
                f"{step}{_skipped_note(log, step)}: {name_list(keys, _MOST_NAMES)}",
            )
        )
    elif "nonfinite" in log.stat_names:
        rows.append(("first non-finite step", "none"))
    skipped = log.skipped_steps
    if len(skipped):
        rows.append(
            (
                "skipped steps",
                f"{len(skipped)}: {name_list([str(s) for s in skipped], _MOST_NAMES)}",
            )
        )
    if log.bins_per_decade is not None:
        rows.append(("histograms", f"{log.bins_per_decade} bins per decade"))
    kept = log.value_variables
    if kept:
        rows.append(("kept tensors", f"{len(kept)}: {name_list(kept, _MOST_NAMES)}"))
    if log.replicas:
        rows.append(("replicas", ", ".join(map(str, log.replicas))))
    alerts = log.alerts
    if len(alerts):
        counts = alerts["kind"].value_counts()
        rows.append(("alerts", ", ".join(f"{n} {kind}" for kind, n in counts.items())))
    body = "".join(
        f"<tr><th style='text-align:left;padding-right:1em'>{html.escape(name)}</th>"
        f"<td style='text-align:left'>{html.escape(text)}</td></tr>"
        for name, text in rows
    )
    return f"<div><strong>GradientLog</strong><table>{body}</table></div>"


def _steps_text(log: Any) -> str:
    steps = log.steps
    if not len(steps):
        return "0 recorded steps, no steps"
    return f"{len(steps)} recorded steps, steps {steps[0]}..{steps[-1]}"


def _first_nonfinite_text(log: Any) -> str | None:
    first = log.first_nonfinite()
    if first is None:
        return "no non-finite step" if "nonfinite" in log.stat_names else None
    step, keys = first
    return f"first non-finite step {step}{_skipped_note(log, step)} in {len(keys)} variables"


def _skipped_note(log: Any, step: int) -> str:
    # A step a LossScaleOptimizer skipped never reached the weights: say so.
    return " (skipped by the LossScaleOptimizer)" if step in set(log.skipped_steps) else ""
