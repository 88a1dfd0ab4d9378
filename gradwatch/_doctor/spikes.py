"""The spike rule, on the host: a value above the mean + `sigma` standard deviations of
the previous `window` finite values is a spike (OLMo-core's stability monitor, OLMo 2).

The step judges its global gradient norm and its loss by the same rule on the device
(`GradWatch(on_spike=...)`); this is its reference, and what the doctor reads where a
log holds a series but no judgement of it. NumPy only: no Keras.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradwatch._doctor.rows import row
from gradwatch._logdata.views import global_norms
from gradwatch._ui.text import name_list

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


def spike_findings(diagnosis: Any) -> list[dict]:
    """The doctor's `spikes` finding over one diagnosis (`gradwatch._doctor.rules.Diagnosis`):
    the spike score, the spiking steps, the layers whose norms rose with the global norm,
    and what to try; none where no step spiked."""
    signals = diagnosis.signals
    steps = diagnosis.steps
    judged_code = signals.scalars.get("spike")
    judged_any = judged_code is not None and np.isfinite(judged_code).any()
    alerts = list(signals.spike_alerts)
    if alerts:
        judged = int(np.isfinite(judged_code).sum()) if judged_any else len(steps)
        grad = sorted({s for s, kind, _ in alerts if kind == "spike"})
        loss = sorted({s for s, kind, _ in alerts if kind == "loss_spike"})
        how = "judged in the step (`on_spike`)"
    elif judged_any:
        return []  # the step judged every recorded step, and none spiked
    else:  # not judged in the step: the same rule over the recorded series
        norm = diagnosis.applied_rows("norm")
        values = signals.scalars.get("loss")
        grad, loss = [], []
        if norm is not None:
            flags = spike_flags(global_norms(norm))
            grad = diagnosis.steps[diagnosis.applied][flags].tolist()
        if values is not None:
            loss = steps[spike_flags(values)].tolist()
        judged = max(len(steps) - SPIKE_WARMUP, 0)
        how = "judged over the recorded steps (the step judged none: `on_spike='ignore'`)"
    if not grad and not loss:
        return []
    spiking = sorted(set(grad) | set(loss))
    score = len(spiking) / max(judged, 1)
    parts = []
    if grad:
        parts.append(f"gradient-norm spikes at steps {name_list([str(s) for s in grad], 8)}")
    if loss:
        parts.append(f"loss spikes at steps {name_list([str(s) for s in loss], 8)}")
    layers = _spiking_layers(diagnosis, grad)
    evidence = (
        f"{len(spiking)} of {judged} judged steps spiked (spike score {score:.3g}), {how}: "
        f"{'; '.join(parts)}."
    )
    if layers:
        evidence += f" The layers whose norms rose with the global norm: {name_list(layers, 5)}."
    return [
        row(
            "warning",
            "spikes",
            layers,
            int(spiking[0]),
            int(spiking[-1]),
            evidence,
            "Try a learning-rate warmup, a lower learning rate, gradient clipping "
            "(e.g. `global_clipnorm=1.0`), or with Adam a lower `beta_2` (0.95); and look at "
            "the data behind the spiking steps (`log.examples`). "
            "`GradWatch(on_spike='skip')` keeps a spike's update from the model.",
        )
    ]


def _spiking_layers(diagnosis: Any, spike_steps: Sequence[int]) -> list[str]:
    """The layers whose gradient norm at the gradient-spike steps rose, over its median
    at the other steps, by at least half as many times as the global norm did."""
    # Every recorded row: a spike whose update was kept back is recorded as it was.
    norm = diagnosis.signals.get("norm")
    if norm is None or not len(spike_steps):
        return []
    at = np.isin(diagnosis.steps, spike_steps)
    if not at.any() or at.all():
        return []
    names = list(dict.fromkeys(diagnosis.layer))
    squares = np.where(np.isfinite(norm), norm.astype(np.float64) ** 2, 0.0)
    by_layer = np.stack(
        [
            np.sqrt(squares[:, [i for i, x in enumerate(diagnosis.layer) if x == n]].sum(1))
            for n in names
        ],
        axis=1,
    )
    total = np.sqrt(squares.sum(1))
    with np.errstate(divide="ignore", invalid="ignore"):
        rise = by_layer[at].max(0) / np.median(by_layer[~at], axis=0)
        global_rise = total[at].max() / np.median(total[~at])
    picked = [(r, n) for r, n in zip(rise, names, strict=True) if r >= 0.5 * global_rise]
    return [n for _, n in sorted(picked, key=lambda rn: -rn[0])]
