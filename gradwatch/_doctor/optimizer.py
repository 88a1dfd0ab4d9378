"""The doctor's rules on the optimizer's health: `epsilon` (epsilon dominates a layer's
updates), `second_moment` (spikes of `v_ratio` that precede gradient or loss spikes) and
`warmup` (huge update ratios in a run's first steps, without a learning-rate warm-up).

Each rule is a function of one `gradwatch._doctor.rules.Diagnosis` (the signals, the
thresholds, each variable's kind and liveness), registered in that module's `RULES`;
`docs/diagnose.md` documents each one's formula, defaults and sources. NumPy only.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from gradwatch._doctor.rows import median, not_checked, row
from gradwatch._doctor.spikes import SPIKE_WARMUP, spike_flags
from gradwatch._ui.text import name_list, short_number

# Names shown in one evidence text before "and N more".
_SHOWN = 5
# The kinds of the log's spike alerts (`log.alerts`) that the `second_moment` rule reads.
SPIKE_KINDS = {"spike": "gradient", "loss_spike": "loss"}


def epsilon(diagnosis: Any) -> list[dict]:
    """`epsilon`: the median over the updating steps of a kernel's `eps_frac` above
    `epsilon_frac`."""
    frac = diagnosis.applied_rows("eps_frac")
    if frac is None:
        return [not_checked("epsilon", "eps_frac")]
    limit = diagnosis.thresholds["epsilon_frac"]
    med = median(frac)  # NaN at the steps that did not update (and for SGD)
    with np.errstate(invalid="ignore"):
        mask = diagnosis.kernel_mask() & ~diagnosis.dead & (med > limit)
    if not mask.any():
        return []
    shown = [f"{diagnosis.keys[i]} {med[i]:.0%}" for i in np.nonzero(mask)[0]]
    with np.errstate(invalid="ignore"):
        rows = (frac[:, mask] > limit).any(axis=1)
    return [
        row(
            "warning",
            "epsilon",
            diagnosis.group(mask),
            *diagnosis.span(rows),
            "Median eps_frac (the share of elements whose update denominator the "
            f"optimizer's epsilon dominates) above {limit:.0%}: {name_list(shown, _SHOWN)}. "
            "Their updates are damped below what the learning rate implies.",
            "The gradients of these layers are as small as epsilon: lower the optimizer's "
            "epsilon (Keras' default is 1e-7; Wortsman et al. 2023 go down to 1e-15), or find "
            "why the gradients are so small (a vanishing gradient, a loss scaled down).",
        )
    ]


def second_moment(diagnosis: Any) -> list[dict]:
    """`second_moment`: a spike of the run's largest `v_ratio` followed, within
    `second_moment_lag` steps, by a spike of the global gradient norm or of the loss
    (`spike_flags`, or the log's spike alerts)."""
    ratio = diagnosis.applied_rows("v_ratio")
    norm = diagnosis.applied_rows("norm")
    if ratio is None or norm is None:
        return [not_checked("second_moment", "v_ratio" if ratio is None else "norm")]
    steps = diagnosis.steps[diagnosis.applied]
    live = ratio[:, diagnosis.live]
    finite = np.isfinite(live)
    if not finite.any():
        return []  # an optimizer without a second moment, or no update yet
    top = np.where(finite.any(axis=1), np.max(np.where(finite, live, -np.inf), axis=1), np.nan)
    # A second moment of a few updates is a poor estimate: its ratios (1.8e4 at a
    # healthy MLP's second step) would hide every later spike. They are left out.
    top[np.flatnonzero(np.isfinite(top))[:SPIKE_WARMUP]] = np.nan
    v_spikes = steps[spike_flags(top)]
    if not len(v_spikes):
        return []
    later = _later_spikes(diagnosis, steps)
    lag = int(diagnosis.thresholds["second_moment_lag"])
    pairs = []
    for s in v_spikes:
        after = [(t, what) for t, what in later if s < t <= s + lag]
        if after:
            pairs.append((int(s), *after[0]))
    if not pairs:
        return []
    at = np.isin(steps, [s for s, _, _ in pairs])
    with np.errstate(invalid="ignore"):
        mask = np.zeros(diagnosis.n_variables, bool)
        sub = ratio[at]
        mask[diagnosis.live] = (sub[:, diagnosis.live] == top[at][:, None]).any(axis=0)
    shown = [f"step {s}: {what} spike at step {t}" for s, t, what in pairs]
    peak = float(np.nanmax(top[at]))
    return [
        row(
            "warning",
            "second_moment",
            diagnosis.group(mask),
            pairs[0][0],
            max(t for _, t, _ in pairs),
            f"v_ratio (g**2 over the optimizer's second moment) spiked (above mean + 6 std "
            f"of the previous values; up to {short_number(peak)}) and a spike of the "
            f"gradient norm or of the loss followed within {lag} steps: "
            f"{name_list(shown, _SHOWN)}.",
            "These gradients outran the optimizer's second-moment estimate, so their update "
            "was far larger than the learning rate intends, and training spiked after. Lower "
            "beta_2 (0.95 rather than 0.999) so that v follows the gradients sooner, clip "
            "(global_clipnorm), or lower the learning rate.",
        )
    ]


def _later_spikes(diagnosis: Any, steps: np.ndarray) -> list[tuple[int, str]]:
    """`(step, "gradient" or "loss")` of the spikes of the global gradient norm and of the
    loss, by the spike rule, and of the log's spike alerts, in step order."""
    found = [(int(s), "gradient") for s in steps[spike_flags(diagnosis.global_norm())]]
    loss = diagnosis.signals.scalars.get("loss")
    if loss is not None and len(loss) == diagnosis.n_steps:
        found += [(int(s), "loss") for s in diagnosis.steps[spike_flags(loss)]]
    found += [
        (int(s), SPIKE_KINDS[kind])
        for s, kind, *_ in diagnosis.signals.spike_alerts
        if kind in SPIKE_KINDS
    ]
    return sorted(set(found))


def warmup(diagnosis: Any) -> list[dict]:
    """`warmup`: a kernel's `update_ratio` above `warmup_update_ratio` at one of the
    run's first `warmup_steps` steps, while the learning rate did not rise over them."""
    ratio = diagnosis.applied_rows("update_ratio")
    if ratio is None:
        return [not_checked("warmup", "update_ratio")]
    thresholds = diagnosis.thresholds
    steps = diagnosis.steps[diagnosis.applied]
    first = steps < thresholds["warmup_steps"]
    accumulated = np.asarray(diagnosis.signals.accumulated, np.int64)
    first &= ~np.isin(steps, accumulated)  # those moved no weight
    if not first.any():
        return []  # the log starts later in the run
    early = ratio[first]
    with np.errstate(invalid="ignore"):
        # A zero weight (ratio +inf) has no size to compare an update with.
        big = np.isfinite(early) & (early > thresholds["warmup_update_ratio"])
    mask = big.any(axis=0) & diagnosis.kernel_mask()
    if not mask.any():
        return []
    rate = diagnosis.signals.scalars.get("learning_rate")
    if rate is not None and len(rate) == diagnosis.n_steps:
        rates = rate[diagnosis.applied][first]
        rates = rates[np.isfinite(rates)]
        if len(rates) >= 2 and rates[-1] > rates[0]:
            return []  # the learning rate rises: a warm-up
        rate_text = (
            f"the learning rate stayed at {short_number(float(rates[0]))}"
            if len(rates)
            else "the learning rate was not recorded"
        )
    else:
        rate_text = "the learning rate was not recorded"
    peak = np.where(big, early, -np.inf).max(axis=0)
    shown = [f"{diagnosis.keys[i]} {short_number(peak[i])}" for i in np.nonzero(mask)[0]]
    where = steps[first][big[:, mask].any(axis=1)]
    n = int(thresholds["warmup_steps"])
    return [
        row(
            "warning",
            "warmup",
            diagnosis.group(mask),
            int(where[0]),
            int(where[-1]),
            f"update_ratio (|update| / |weight|) above "
            f"{short_number(thresholds['warmup_update_ratio'])} in the first {n} steps, "
            f"while {rate_text}: {name_list(shown, _SHOWN)}.",
            "The first updates change these weights by a large part of their size: warm the "
            "learning rate up (e.g. linearly from 0 over the first few hundred steps: "
            "keras.optimizers.schedules.CosineDecay(..., warmup_target=..., warmup_steps=...)), "
            "or lower it.",
        )
    ]


#: The stats that each of these rules reads (`gradwatch._doctor.rules.READS`).
OPTIMIZER_READS = {
    epsilon: ("eps_frac",),
    second_moment: ("v_ratio", "norm"),
    warmup: ("update_ratio",),
}
