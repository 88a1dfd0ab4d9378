"""The doctor: rules that turn a log's stats into findings (what is wrong, where, what to try).

`GradientLog.diagnose` runs them; `gradwatch doctor`, `gradwatch summary`, the HTML
report and `GradWatch` at the end of `fit` show what they find (`gradwatch.findings`).
Each rule, its formula, its default thresholds and the published rule it comes from
are documented in `docs/diagnose.md`; the rules themselves are in `gradwatch._doctor.rules`.
Pandas and NumPy only: no Keras.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import numpy as np
import pandas as pd

from gradwatch._doctor.rules import Signals, find

__all__ = [
    "FINDINGS",
    "FINDING_COLUMNS",
    "SEVERITIES",
    "THRESHOLDS",
    "Signals",
    "check_thresholds",
    "run_rules",
]

#: The columns of `GradientLog.diagnose`'s frame, in order.
FINDING_COLUMNS = (
    "severity",
    "finding",
    "variables",
    "first_step",
    "last_step",
    "evidence",
    "advice",
)

#: Severities, most severe first.
SEVERITIES = ("error", "warning", "info")

#: The findings' names, in catalogue order, with what each one means.
FINDINGS: dict[str, str] = {
    "nonfinite": "NaN/Inf gradients on steps whose update was applied (smdebug ExplodingTensor).",
    "loss_scale": "Steps whose update a LossScaleOptimizer skipped after an overflow.",
    "exploding": "Gradient norms that are huge, grow by orders of magnitude, or grow toward the "
    "input (DLCheck, AUTOTRAINER).",
    "vanishing": "Gradients too small to train, mostly near the input (smdebug "
    "VanishingGradient, AUTOTRAINER).",
    "dead": "Gradients exactly zero at most steps over most of a layer (AUTOTRAINER dying ReLU).",
    "disconnected": "Variables that got no gradient at all: not connected to the loss.",
    "update_ratio_high": "Kernels whose update is a large part of their weight "
    "(rule of thumb 1e-3).",
    "update_ratio_low": "Kernels whose update is a tiny part of their weight (smdebug "
    "WeightUpdateRatio, DLCheck).",
    "clipping": "The optimizer clips most steps (Google deep learning tuning playbook).",
    "oscillation": "Consecutive gradients point in opposite directions (the step overshoots).",
    "spikes": "Steps whose global gradient norm or loss jumps above the mean + 6 sigma of "
    "the previous 128 (OLMo-core's stability monitor, OLMo 2).",
    "noise_scale": "The batch size against the gradient noise scale B_simple (McCandlish et "
    "al. 2018): small batches train with noisy steps, large ones waste compute.",
    "examples": "Examples whose gradient norm is far above their batch's median in a replayed "
    "step (likely mislabelled or corrupt data).",
    "epsilon": "The optimizer's epsilon dominates a layer's update denominators (Wortsman et "
    "al. 2023).",
    "second_moment": "Spikes of g**2 over the optimizer's second moment (v_ratio) that precede "
    "gradient or loss spikes (Wortsman et al. 2023).",
    "warmup": "Huge update ratios in a run's first steps, without a learning-rate warm-up.",
}

#: Every threshold that `GradientLog.diagnose` takes by keyword, with its default.
THRESHOLDS: dict[str, float] = {
    "exploding_norm": 1e6,
    "exploding_ratio": 70.0,
    "exploding_growth": 1e3,
    "vanishing_rms": 1e-7,
    "vanishing_rms_error": 1e-10,
    "vanishing_ratio": 1e-3,
    "vanishing_first_norm": 1e-4,
    "dead_zero_frac": 0.7,
    "dead_steps": 0.5,
    "update_ratio_high": 1e-2,
    "update_ratio_low": 1e-7,
    "clipping_steps": 0.5,
    "oscillation_cos": -0.5,
    "loss_scale_steps": 0.05,
    "examples_ratio": 10.0,
    "epsilon_frac": 0.5,
    "second_moment_lag": 8.0,
    "warmup_steps": 10.0,
    "warmup_update_ratio": 0.1,
}

# Thresholds that are fractions (of steps or of elements) and cosines.
_FRACTIONS = (
    "dead_zero_frac",
    "dead_steps",
    "clipping_steps",
    "loss_scale_steps",
    "epsilon_frac",
)
_COSINES = ("oscillation_cos",)


def check_thresholds(thresholds: Mapping[str, Any]) -> dict[str, float]:
    """The defaults updated with `thresholds`, each checked.

    Raises:
        TypeError: For an unknown name, or a value that is not a number.
        ValueError: For a value out of range.

    Example:

    >>> check_thresholds({"exploding_norm": 1e5})["exploding_norm"]
    100000.0
    """
    out = dict(THRESHOLDS)
    for name, value in thresholds.items():
        if name not in THRESHOLDS:
            raise TypeError(
                f"Unknown threshold `{name}`. Received: {name}={value!r}. "
                f"The thresholds are: {', '.join(THRESHOLDS)}."
            )
        if isinstance(value, bool) or not isinstance(value, (int, float, np.integer, np.floating)):
            raise TypeError(
                f"`{name}` must be a number, e.g. {name}={THRESHOLDS[name]:g}. "
                f"Received: {name}={value!r}"
            )
        value = float(value)
        if name in _FRACTIONS:
            ok, want = 0.0 <= value <= 1.0, "between 0 and 1"
        elif name in _COSINES:
            ok, want = -1.0 <= value <= 1.0, "between -1 and 1"
        else:
            ok, want = value > 0 and math.isfinite(value), "a positive, finite number"
        if not ok:
            raise ValueError(
                f"`{name}` must be {want} (default {THRESHOLDS[name]:g}). "
                f"Received: {name}={value!r}"
            )
        out[name] = value
    return out


def run_rules(signals: Signals, **thresholds: float) -> pd.DataFrame:
    """Runs every rule over `signals`; one row per finding, most severe first.

    Args:
        signals: The log's stats and metadata (`GradientLog.diagnose` builds them).
        **thresholds: Names from `THRESHOLDS` with the values to use instead.

    Returns:
        A frame with the columns `FINDING_COLUMNS`; `first_step` and `last_step`
        are nullable Int64 (missing where a finding has no steps).

    Example:

    >>> s = Signals(np.arange(4), ["d/kernel"], {"d/kernel": (2, 2)},
    ...             lambda name: {"norm": np.full((4, 1), 1e7), "nonfinite": np.zeros((4, 1))}
    ...             .get(name))
    >>> run_rules(s).iloc[0][["severity", "finding"]].tolist()
    ['error', 'exploding']
    """
    rows = find(signals, check_thresholds(thresholds))
    frame = pd.DataFrame(rows, columns=list(FINDING_COLUMNS))
    frame["first_step"] = pd.array(frame["first_step"].tolist(), dtype="Int64")
    frame["last_step"] = pd.array(frame["last_step"].tolist(), dtype="Int64")
    rank = frame["severity"].map({s: i for i, s in enumerate(SEVERITIES)})
    order = frame["finding"].map({f: i for i, f in enumerate(FINDINGS)})
    key = pd.DataFrame({"r": rank, "o": order, "i": range(len(frame))})
    frame = frame.iloc[key.sort_values(["r", "o", "i"]).index].reset_index(drop=True)
    return frame
