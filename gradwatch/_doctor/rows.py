"""What the doctor's rules share: a finding's row, the row of a rule that could not run
for want of a stat, and a median over the finite values. NumPy and pandas only."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd


def median(m: np.ndarray) -> np.ndarray:
    """Per-column median over the finite values; NaN for a column with none."""
    out = np.full(m.shape[1], np.nan)
    if not m.shape[0]:
        return out
    finite = np.isfinite(m)
    full = finite.all(axis=0)
    if full.any():
        # Columns without a gap: one partition per contiguous row (nanmedian would
        # loop over the columns in Python).
        out[full] = np.median(np.ascontiguousarray(m[:, full].T), axis=1)
    part = ~full & finite.any(axis=0)
    if part.any():
        sub = np.where(finite[:, part], m[:, part], np.nan)
        out[part] = np.nanmedian(sub, axis=0)
    return out


def row(severity, finding, variables, first, last, evidence, advice) -> dict[str, Any]:
    """One finding: a row of `gradwatch.diagnose.FINDING_COLUMNS`."""
    return {
        "severity": severity,
        "finding": finding,
        "variables": list(variables),
        "first_step": first,
        "last_step": last,
        "evidence": evidence,
        "advice": advice,
    }


def not_checked(finding: str, stat: str, what: str = "") -> dict[str, Any]:
    """The `info` row of a rule that could not run (or ran in part): the log lacks `stat`."""
    return row(
        "info",
        finding,
        [],
        pd.NA,
        pd.NA,
        f"`{finding}` was {what or 'not checked'}: the log has no `{stat}` stat.",
        f"Record it to check: GradWatch(stats=[*gradwatch.DEFAULT_STATS, {stat!r}]), or "
        'GradWatch(stats="doctor") for every stat the doctor reads.',
    )
