"""The doctor's reading of the gradient noise scale: the training batch against B_simple,
in the terms of McCandlish et al. 2018 ("An Empirical Model of Large-Batch Training").

To reach a given loss, training at batch size B takes about `S_min * (1 + B_noise / B)`
steps and `E_min * (1 + B / B_noise)` examples (their equations 2.11 and 2.12), where
B_simple estimates B_noise (exactly so where the Hessian is a multiple of the identity).
Below B_simple, a bigger batch cuts the steps nearly in proportion for little more data;
above it, it costs data nearly in proportion and saves few steps. Pandas and NumPy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from gradwatch._ui.text import short_number

#: Batches below `1 / NOISE_BAND` times B_simple are small for the noise, above
#: `NOISE_BAND` times it large: within, steps and data are both within 1.5x and 3x of
#: their minimum (at B = B_simple, both are 2x).
NOISE_BAND = 2.0


def noise_scale_findings(frame: pd.DataFrame | None) -> list[dict[str, Any]]:
    """The `noise_scale` finding (info): the latest batch against the latest B_simple,
    from `GradientLog.noise_scale`; none without a finite B_simple.

    Example:

    >>> frame = pd.DataFrame({"step": [3, 9], "small_batch": [16, 16],
    ...                       "big_batch": [32, 32], "b_simple": [np.nan, 320.0]})
    >>> row = noise_scale_findings(frame)[0]
    >>> row["severity"], row["first_step"], row["last_step"]
    ('info', 9, 9)
    >>> row["evidence"][:60]
    'B_simple, the gradient noise scale, is 320 samples at step 9'
    """
    if frame is None or not len(frame):
        return []
    b_simple = frame["b_simple"].to_numpy(np.float64)
    finite = np.isfinite(b_simple) & (b_simple > 0)
    if not finite.any():
        return []
    last = np.nonzero(finite)[0][-1]
    first = np.nonzero(finite)[0][0]
    noise = float(b_simple[last])
    batch = int(frame["big_batch"].iloc[last])
    step = int(frame["step"].iloc[last])
    ratio = batch / noise
    steps_factor, data_factor = 1 + noise / batch, 1 + ratio
    evidence = (
        f"B_simple, the gradient noise scale, is {short_number(noise)} samples at step "
        f"{step} (a moving average of the estimates from step {int(frame['step'].iloc[first])} "
        f"on); the batch is {batch} samples, {short_number(ratio)}x B_simple. McCandlish et "
        f"al. (2018): at this batch, reaching a given loss takes about "
        f"{short_number(steps_factor)}x the fewest possible steps and "
        f"{short_number(data_factor)}x the fewest possible samples."
    )
    target = short_number(noise)
    if ratio < 1 / NOISE_BAND:
        advice = (
            "The batch is small for this gradient noise: each step follows a noisy "
            f"gradient. A larger batch, toward {target}, cuts the number of steps nearly "
            "in proportion for little more data (raise the learning rate with it)."
        )
    elif ratio > NOISE_BAND:
        advice = (
            "The batch is large for this gradient noise: past B_simple a larger batch "
            "saves few steps while its cost in data and compute grows in proportion. "
            f"A smaller batch, toward {target}, reaches the same loss on less compute, "
            "in few more steps."
        )
    else:
        advice = (
            "The batch is near B_simple, the paper's balance between the number of steps "
            "and the data used. Nothing to change."
        )
    advice += " B_simple grows as the loss falls: look again later in training."
    return [
        {
            "severity": "info",
            "finding": "noise_scale",
            "variables": [],
            "first_step": step,
            "last_step": step,
            "evidence": evidence,
            "advice": advice,
        }
    ]
