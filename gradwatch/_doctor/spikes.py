"""The spike rule, on the host: a value above the mean + `sigma` standard deviations of
the previous `window` finite values is a spike (OLMo-core's stability monitor, OLMo 2).

The step judges its global gradient norm and its loss by the same rule on the device
(`GradWatch(on_spike=...)`); this is its reference, and what the doctor reads where a
log holds a series but no judgement of it. NumPy only: no Keras.
"""

from __future__ import annotations

from collections import deque

import numpy as np

#: How many previous finite values each value is compared with.
SPIKE_WINDOW = 128
#: How many standard deviations above the mean a spike lies.
SPIKE_SIGMA = 6.0
#: No value is judged before this many finite values were seen.
SPIKE_WARMUP = 16


def spike_flags(
    values: np.ndarray,
    window: int = SPIKE_WINDOW,
    sigma: float = SPIKE_SIGMA,
    warmup: int = SPIKE_WARMUP,
) -> np.ndarray:
    """Which of `values` (in step order) are spikes.

    A finite value `x` is a spike where at least `warmup` finite values came before it
    and `x > mean + sigma * std` of the last `window` of them (all of them while fewer;
    the population standard deviation, ddof=0). A NaN or Inf is never a spike (the
    non-finite checks report it) and never enters the window; every finite value does,
    spikes included.

    Args:
        values: The series, one value per recorded step.
        window: How many previous finite values to compare with. Defaults to `128`.
        sigma: How many standard deviations above the mean. Defaults to `6.0`.
        warmup: The fewest previous finite values before a value is judged.
            Defaults to `16`.

    Returns:
        A bool array shaped like `values`.

    Example:

    >>> x = np.r_[np.ones(16), 1.0, 50.0, np.nan, 1.0]
    >>> np.flatnonzero(spike_flags(x, warmup=16))
    array([17])
    >>> np.flatnonzero(spike_flags(np.r_[np.arange(20.0) % 2, 9.0], window=4))
    array([20])
    """
    values = np.asarray(values, np.float64)
    flags = np.zeros(values.shape, bool)
    last: deque[float] = deque(maxlen=int(window))
    seen = 0  # finite values so far (the window keeps the last `window` of them)
    for i, x in enumerate(values):
        if not np.isfinite(x):
            continue
        if seen >= warmup:
            past = np.fromiter(last, np.float64, len(last))
            flags[i] = x > past.mean() + sigma * past.std()
        last.append(float(x))
        seen += 1
    return flags
