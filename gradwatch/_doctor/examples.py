"""The doctor's `examples` finding: the examples whose gradient norm is far above their
batch's median in the replayed steps (`log.examples`), and the samples that are so at
more than one step; likely mislabelled or corrupt data. Pandas and NumPy only."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from gradwatch._ui.text import name_list, short_number

#: A sample is said to recur once it is an outlier at this many replayed steps.
RECUR_STEPS = 2
# Outliers named in the evidence before "and N more".
_SHOWN = 5


def outliers(examples: pd.DataFrame, ratio: float) -> pd.DataFrame:
    """The rows of `examples` (`log.examples`) whose `grad_norm` is over `ratio` times
    the median of their step's finite `grad_norm`s, or not finite, with that multiple
    (`times`: Inf for a non-finite norm, NaN where the median is 0 or has no finite
    value to be taken from).

    Example:

    >>> ex = pd.DataFrame({"step": [3] * 5, "row": range(5), "sample": pd.array([None] * 5,
    ...                    dtype="Int64"), "loss": [1.0] * 5, "grad_norm": [1, 2, 1, 40, 1.5]})
    >>> outliers(ex, 10.0)[["step", "row", "times"]].values.tolist()
    [[3.0, 3.0, 26.666666666666668]]
    """
    norm = examples["grad_norm"].to_numpy(np.float64)
    finite = pd.Series(np.where(np.isfinite(norm), norm, np.nan), index=examples.index)
    median = finite.groupby(examples["step"]).transform("median").to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        times = np.where(median > 0, norm / median, np.nan)
    out = ~np.isfinite(norm) | (times > ratio)
    found = examples[out].copy()
    found["times"] = np.where(np.isfinite(norm[out]), times[out], np.inf)
    return found


def examples_findings(examples: pd.DataFrame | None, ratio: float) -> list[dict[str, Any]]:
    """The `examples` finding (a warning) where some replayed step has an outlier
    (`outliers`); none where no step was replayed or none has one.

    Example:

    >>> ex = pd.DataFrame({"step": [3] * 4 + [9] * 4, "row": [0, 1, 2, 3] * 2,
    ...                    "sample": pd.array([0, 1, 2, 3, 7, 1, 5, 6], dtype="Int64"),
    ...                    "loss": [1.0] * 8, "grad_norm": [1, 90, 1, 2] + [2, 50, 2, 1]})
    >>> row = examples_findings(ex, 10.0)[0]
    >>> row["severity"], row["first_step"], row["last_step"]
    ('warning', 3, 9)
    >>> print(row["evidence"])
    2 examples in 2 of the 2 replayed steps have a gradient norm over 10x their batch's median: step 3 row 1 (sample 1, 60x), step 9 row 1 (sample 1, 25x). Sample 1 is such an outlier at 2 replayed steps (3, 9).
    """  # noqa: E501 (a doctest's output is one line)
    if examples is None or not len(examples):
        return []
    found = outliers(examples, ratio)
    if not len(found):
        return []
    steps = found["step"].to_numpy(np.int64)
    replayed = examples["step"].nunique()
    shown = [_example_text(row) for row in found.sort_values("times", ascending=False).itertuples()]
    evidence = (
        f"{len(found)} example{'s' if len(found) > 1 else ''} in {len(np.unique(steps))} of "
        f"the {replayed} replayed steps {'have' if len(found) > 1 else 'has'} a gradient "
        f"norm over {ratio:g}x their batch's median: {name_list(shown, _SHOWN)}."
    )
    recurring = _recurring(found)
    if len(recurring) == 1:
        sample, at = recurring[0]
        evidence += (
            f" Sample {sample} is such an outlier at {len(at)} replayed steps "
            f"({name_list([str(s) for s in at], 3)})."
        )
    elif recurring:
        texts = [f"{sample} ({len(at)} steps)" for sample, at in recurring]
        evidence += (
            f" Samples {name_list(texts, _SHOWN)} are such outliers at {RECUR_STEPS} "
            "replayed steps or more."
        )
    advice = (
        "Likely mislabelled or corrupt data: inspect those rows (log.examples: `sample` is "
        "the row of the training data where fit had arrays with shuffle=False) and fix or "
        "drop them. A recurring sample is the strongest suspect. If the rows are right but "
        "hard, a robust loss (Huber) or gradient clipping (global_clipnorm) keeps them from "
        "dominating a step."
    )
    return [
        {
            "severity": "warning",
            "finding": "examples",
            "variables": [],
            "first_step": int(steps.min()),
            "last_step": int(steps.max()),
            "evidence": evidence,
            "advice": advice,
        }
    ]


def _example_text(row: Any) -> str:
    sample = "" if pd.isna(row.sample) else f"sample {int(row.sample)}, "
    times = "non-finite" if np.isinf(row.times) else f"{short_number(row.times)}x"
    if np.isnan(row.times):
        times = "median 0"
    return f"step {row.step} row {row.row} ({sample}{times})"


def _recurring(found: pd.DataFrame) -> list[tuple[int, list[int]]]:
    """The samples (known ones) that are outliers at `RECUR_STEPS` steps or more, with
    those steps; the most frequent first."""
    known = found[found["sample"].notna()]
    at = known.groupby(known["sample"].astype(np.int64))["step"].unique()
    out = [(int(s), sorted(int(x) for x in steps)) for s, steps in at.items()]
    out = [item for item in out if len(item[1]) >= RECUR_STEPS]
    return sorted(out, key=lambda item: (-len(item[1]), item[0]))
