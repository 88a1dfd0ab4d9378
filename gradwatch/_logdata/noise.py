"""The gradient noise scale B_simple (McCandlish et al. 2018, "An Empirical Model of
Large-Batch Training", appendix A.1), from the squared norms of a small-batch and a
big-batch gradient at each step. NumPy and pandas only: no Keras.

Per step, from a gradient over `b` samples (`g_small_sq`: the mean of the squared norms
of such gradients) and one over `B > b` samples (`g_big_sq`), both unbiased:

- `g_sq = (B * g_big_sq - b * g_small_sq) / (B - b)` estimates |G|^2, the true
  gradient's squared norm;
- `s = (g_small_sq - g_big_sq) / (1/b - 1/B)` estimates tr(Sigma), the trace of the
  per-example gradients' covariance;
- `b_simple = EMA(s) / EMA(g_sq)`: each estimate alone is noisy (`g_sq` may be
  negative), their moving averages are not.

The averages are those of k-diffusion's `GradientNoiseScale.update`
(`k_diffusion/gns.py`), to the operation: both start at 0, each new estimate updates
them (`ema = beta * ema + (1 - beta) * x`) before they are divided, and the division
is `max(EMA(s), eps) / max(EMA(g_sq), eps)`. No bias correction: it would divide both
averages by the same `1 - beta**t`, which the ratio cancels.
"""

from __future__ import annotations

import math

import numpy as np
import pandas as pd

from gradwatch._logdata.store import NOISE_RAW, Store

#: The decay of the moving averages, per estimate (not per step): their window is
#: about `1 / (1 - beta)` = 200 estimates. k-diffusion's default is 0.9998 (5000),
#: for runs of hundreds of thousands of steps; a log of a few thousand steps, or
#: one estimate every N-th step, would then show little more than a plain average.
NOISE_BETA = 0.995
#: The floor of both moving averages before the division (k-diffusion's `eps`).
NOISE_EPS = 1e-8
#: The columns of `GradientLog.noise_scale`, in order.
NOISE_COLUMNS = ("step", *NOISE_RAW, "g_sq", "s", "b_simple")


def noise_scale(
    steps: np.ndarray,
    raw: np.ndarray,
    beta: float = NOISE_BETA,
    eps: float = NOISE_EPS,
) -> pd.DataFrame:
    """The noise scale frame (`NOISE_COLUMNS`) from the raw estimates of each step.

    A row whose `g_sq` or `s` is not finite (NaN/Inf gradients, or `small_batch` not
    below `big_batch`) leaves the moving averages as they were: its `b_simple` is the
    one before it (NaN before the first finite row).

    Args:
        steps: The steps, shape `(k,)`, in the order the averages take them (by step).
        raw: `(k, 4)`: `small_batch`, `big_batch`, `g_small_sq`, `g_big_sq` (`NOISE_RAW`).
        beta: The moving averages' decay per row. Defaults to `NOISE_BETA`.
        eps: The floor of both averages before the division. Defaults to `NOISE_EPS`.

    Returns:
        A frame with the columns `NOISE_COLUMNS`: `step` (int64), `small_batch` and
        `big_batch` (int64), the others float64.

    Example:

    Batches of 2 and 4 rows: the estimates are `g_sq` 1 then 3 and `s` 4 then 12.
    With `beta=0.5` the averages are `s`: 0.5 * 4 = 2, then 0.5 * 2 + 0.5 * 12 = 7, and
    `g_sq`: 0.5 * 1 = 0.5, then 0.5 * 0.5 + 0.5 * 3 = 1.75, so `b_simple` is 4, then 4:

    >>> frame = noise_scale(np.array([0, 1]), np.array([[2, 4, 3.0, 2.0], [2, 4, 9.0, 6.0]]),
    ...                     beta=0.5)
    >>> frame[["step", "g_sq", "s", "b_simple"]].to_numpy().tolist()
    [[0.0, 1.0, 4.0, 4.0], [1.0, 3.0, 12.0, 4.0]]
    """
    steps = np.asarray(steps, np.int64)
    raw = np.asarray(raw, np.float64).reshape(len(steps), len(NOISE_RAW))
    small, big, g_small_sq, g_big_sq = raw.T
    with np.errstate(divide="ignore", invalid="ignore"):
        usable = (small > 0) & (big > small)
        g_sq = np.where(usable, (big * g_big_sq - small * g_small_sq) / (big - small), np.nan)
        s = np.where(usable, (g_small_sq - g_big_sq) / (1 / small - 1 / big), np.nan)
    b_simple = np.full(len(steps), np.nan)
    ema_s = ema_g = 0.0
    seen = False
    for i, (si, gi) in enumerate(zip(s.tolist(), g_sq.tolist(), strict=True)):
        if math.isfinite(si) and math.isfinite(gi):
            ema_s = beta * ema_s + (1 - beta) * si
            ema_g = beta * ema_g + (1 - beta) * gi
            seen = True
        if seen:
            b_simple[i] = max(ema_s, eps) / max(ema_g, eps)
    return pd.DataFrame(
        {
            "step": steps,
            "small_batch": _counts(small),
            "big_batch": _counts(big),
            "g_small_sq": g_small_sq,
            "g_big_sq": g_big_sq,
            "g_sq": g_sq,
            "s": s,
            "b_simple": b_simple,
        },
        columns=list(NOISE_COLUMNS),
    )


def _counts(x: np.ndarray) -> np.ndarray:
    """Batch sizes as int64 (stored as float32, exact below 2**24 samples)."""
    return np.nan_to_num(x, nan=0).astype(np.int64)


def noise_rows(store: Store) -> tuple[np.ndarray, np.ndarray]:
    """The store's raw estimates `(steps, (k, 4))`, by step; where a step has several
    (written by two sources), the last one written."""
    blocks = store.noise_blocks
    if not blocks:
        return np.zeros((0,), np.int64), np.zeros((0, len(NOISE_RAW)), np.float32)
    steps = np.concatenate([b.steps for b in blocks])
    data = np.concatenate([b.data for b in blocks])
    # The last row written per step: unique on the reversed rows finds the last ones.
    _, last = np.unique(steps[::-1], return_index=True)
    keep = len(steps) - 1 - last
    return steps[keep], data[keep]


def noise_frame(store: Store, beta: float = NOISE_BETA) -> pd.DataFrame:
    """`GradientLog.noise_scale`: the noise scale of the store's raw estimates."""
    if beta != NOISE_BETA:
        return noise_scale(*noise_rows(store), beta=beta)
    return store.cached("noise_scale", lambda: noise_scale(*noise_rows(store)))
