"""The doctor's rules: each turns the dense per-stat matrices of a log (`Signals`) into
findings, rows of what is wrong, where, and what to try.

`gradwatch.diagnose` holds the catalogue (the findings' names, the thresholds) and runs
these (`run_rules`); `docs/diagnose.md` documents each rule's formula, defaults and source.
Pandas and NumPy only: no Keras.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import pandas as pd

from gradwatch._doctor.examples import examples_findings
from gradwatch._doctor.noise import noise_scale_findings
from gradwatch._doctor.optimizer import OPTIMIZER_READS, epsilon, second_moment, warmup
from gradwatch._doctor.rows import median as _median
from gradwatch._doctor.rows import not_checked as _not_checked
from gradwatch._doctor.rows import row as _row
from gradwatch._doctor.spikes import spike_findings
from gradwatch._logdata.views import global_norms, layer_of_key, leaf_of_key
from gradwatch._ui.text import name_list, origin_text, short_number

# Relative drop of a norm that counts as clipped (float32 rounding stays far below it).
_CLIP_TOLERANCE = 1e-3
# The shortest run on which the global norm's growth is judged, in recorded steps.
_MIN_GROWTH_STEPS = 10
# Kinds of variable (`leaf_of_key`) that are not kernels even with 2 dimensions.
_NOT_KERNELS = ("bias", "embeddings")
# Names shown in one evidence text before "and N more".
_SHOWN = 5


@dataclass
class Signals:
    """What the rules read from a log: dense per-stat matrices and the log's metadata.

    Args:
        steps: The recorded step numbers, sorted, shape `(k,)`.
        variables: The keys, in model order.
        shapes: The shape of each key.
        stat: A function from a stat name to its `(k, len(variables))` matrix
            (NaN where not recorded), or `None` when the stat was not recorded.
        skipped: The steps whose update was skipped: by a loss-scale optimizer, or by
            `on_nonfinite` (those also in `guarded`).
        guarded: Of `skipped`, the steps that `on_nonfinite` kept from the model.
        origins: `(step, stage, layer, op, rows, samples, detail)` of the replayed
            steps (`log.origins`).
        accumulated: The steps that only accumulated a gradient, without an update
            (`gradient_accumulation_steps`): left out of the `update_ratio` rules.
        disconnected: The keys that had no gradient.
        nonfinite_alerts: `(step, key, count)` of the recorded NaN/Inf alerts
            (these also cover steps that `every` did not record).
        spike_alerts: `(step, kind, value)` of the spikes the step judged (`kind`
            `"spike"` or `"loss_spike"`).
        noise_scale: The gradient noise scale by step (`log.noise_scale`), or `None`.
        examples: Each example's loss and gradient norm in the replayed steps
            (`log.examples`), or `None`.
        scalars: The recorded steps' scalars by name (`loss`, `learning_rate`, `spike`), each
            aligned with `steps` (NaN where a step had none).

    Example:

    >>> s = Signals(np.arange(3), ["d/kernel"], {"d/kernel": (2, 2)},
    ...             lambda name: np.ones((3, 1)) if name == "norm" else None)
    >>> s.get("norm").dtype, s.get("nonfinite")
    (dtype('float32'), None)
    """

    steps: np.ndarray
    variables: Sequence[str]
    shapes: Mapping[str, tuple[int, ...]]
    stat: Callable[[str], np.ndarray | None]
    skipped: Sequence[int] = ()
    guarded: Sequence[int] = ()
    origins: Sequence[tuple] = ()
    accumulated: Sequence[int] = ()
    disconnected: Sequence[str] = ()
    nonfinite_alerts: Sequence[tuple[int, str, float]] = ()
    spike_alerts: Sequence[tuple[int, str, float]] = ()
    noise_scale: pd.DataFrame | None = None
    examples: pd.DataFrame | None = None
    scalars: Mapping[str, np.ndarray] = field(default_factory=dict)
    _cache: dict[str, np.ndarray | None] = field(default_factory=dict, repr=False)

    def get(self, name: str) -> np.ndarray | None:
        """The stat's matrix as float32, rows of skipped steps kept, or `None`."""
        if name not in self._cache:
            m = self.stat(name)
            self._cache[name] = None if m is None else np.asarray(m, np.float32)
        return self._cache[name]


class Diagnosis:
    """The shared, vectorised pieces of one diagnosis: the signals, the thresholds, and
    what each variable is (its layer, kind and size, whether it is live or dead)."""

    def __init__(self, signals: Signals, thresholds: dict[str, float]):
        self.signals, self.thresholds = signals, thresholds
        self.keys = list(signals.variables)
        self.n_variables = len(self.keys)
        self.steps = np.asarray(signals.steps, np.int64)
        self.n_steps = len(self.steps)
        shapes = [signals.shapes[key] for key in self.keys]
        self.size = np.asarray([max(1, int(np.prod(shape))) for shape in shapes], np.float64)
        self.ndim = np.asarray([len(shape) for shape in shapes])
        self.layer = [layer_of_key(k) for k in self.keys]
        self.leaf = [leaf_of_key(k) for k in self.keys]
        skipped = np.asarray(sorted(signals.skipped), np.int64)
        self.applied = ~np.isin(self.steps, skipped)  # rows whose update reached the weights
        self._rows: dict[str, np.ndarray | None] = {}
        gone = set(signals.disconnected)
        self.live = np.asarray([k not in gone for k in self.keys], bool)
        norm = self.applied_rows("norm")
        if norm is not None:
            self.live &= np.isfinite(norm).any(axis=0) if self.n_steps else False
        self.dead = np.zeros(self.n_variables, bool)  # set by the dead rule, read by later rules

    def applied_rows(self, name: str) -> np.ndarray | None:
        """A stat's rows of the applied steps; NaN where the gradient had NaN/Inf elements
        (the stats of the finite rest, such as a norm of 0, say nothing there)."""
        if name in self._rows:
            return self._rows[name]
        m = self.signals.get(name)
        if m is not None:
            m = m if self.applied.all() else m[self.applied]
            bad = self.applied_rows("nonfinite") if name != "nonfinite" else None
            if bad is not None:
                hit = bad > 0  # NaN compares False
                if hit.any():
                    m = np.where(hit, np.float32(np.nan), m)
        self._rows[name] = m
        return m

    def group(self, mask: np.ndarray) -> list[str]:
        """Keys where `mask`, in model order; a layer's name where all its live keys are."""
        out: list[str] = []
        for layer in dict.fromkeys(self.layer):
            idx = [i for i, x in enumerate(self.layer) if x == layer]
            members = [i for i in idx if self.live[i]] or idx
            flagged = [i for i in idx if mask[i]]
            if not flagged:
                continue
            if all(mask[i] for i in members) and self.keys[idx[0]] != layer:
                out.append(layer)
            else:
                out.extend(self.keys[i] for i in flagged)
        return out

    def global_norm(self) -> np.ndarray:
        """The global gradient norm of each applied step, over the live variables."""
        if "global" not in self._rows:
            norm = self.applied_rows("norm")
            self._rows["global"] = global_norms(norm if self.live.all() else norm[:, self.live])
        return self._rows["global"]

    def kernel_mask(self) -> np.ndarray:
        """The live kernels: 2 or more dimensions, and neither a bias nor an embedding table.

        Keras names biases `bias` (some, as in MultiHeadAttention, have 2 dimensions)
        and tables `embeddings`; see docs/diagnose.md for why they are left out.
        """
        named = np.asarray([x not in _NOT_KERNELS for x in self.leaf], bool)
        return (self.ndim >= 2) & named & self.live

    def kernels(self) -> np.ndarray:
        """Indices of `kernel_mask`, in model order."""
        return np.nonzero(self.kernel_mask())[0]

    def span(self, rows: np.ndarray) -> tuple[Any, Any]:
        """(first, last) applied step of the boolean `rows` over applied rows."""
        steps = self.steps[self.applied][rows]
        return (int(steps.min()), int(steps.max())) if len(steps) else (pd.NA, pd.NA)


def _nonfinite(diagnosis: Diagnosis) -> list[dict]:
    counts = diagnosis.signals.get("nonfinite")
    code = {k: i for i, k in enumerate(diagnosis.keys)}
    # A step a loss-scale optimizer skipped is no fault of the model's; one that
    # `on_nonfinite` kept from the model is (its NaN came from the data or the model).
    guarded = set(int(x) for x in diagnosis.signals.guarded)
    skipped = set(int(x) for x in diagnosis.signals.skipped) - guarded
    recorded = set(diagnosis.steps.tolist()) if counts is not None else set()
    # Alerts cover the steps that `every` did not record; the recorded ones are in `counts`.
    extra = [
        (int(s), code[k], float(v))
        for s, k, v in diagnosis.signals.nonfinite_alerts
        if int(s) not in skipped and int(s) not in recorded and k in code
    ]
    mask = np.zeros(diagnosis.n_variables, bool)
    steps_bad: list[np.ndarray] = []
    total = 0.0
    at: dict[int, dict[int, float]] = {}
    if counts is not None:
        with np.errstate(invalid="ignore"):
            acted = diagnosis.applied | np.isin(diagnosis.steps, sorted(guarded))
            bad = (counts > 0) & acted[:, None]
        rows = np.nonzero(bad.any(axis=1))[0]
        if len(rows):
            mask |= bad.any(axis=0)
            steps_bad.append(diagnosis.steps[rows])
            total += float(counts[bad].sum())
            first_row = rows[0]
            cols = np.nonzero(bad[first_row])[0]
            at[int(diagnosis.steps[first_row])] = {
                int(v): float(counts[first_row, v]) for v in cols
            }
    for s, v, value in extra:
        mask[v] = True
        total += value
        at.setdefault(s, {})[v] = value
    if extra:
        steps_bad.append(np.asarray([s for s, _, _ in extra], np.int64))
    if not mask.any():
        return [] if counts is not None else [_not_checked("nonfinite", "nonfinite")]
    steps = np.unique(np.concatenate(steps_bad))
    first = int(steps[0])
    shown = [f"{diagnosis.keys[v]} ({n:.0f})" for v, n in sorted(at[first].items())]
    kept = len(guarded & set(steps.tolist()))
    what = "applied step(s)" if not kept else f"step(s) ({kept} kept from the model)"
    evidence = (
        f"NaN/Inf gradient elements at {len(steps)} {what}, the first at step {first}: "
        f"{name_list(shown, _SHOWN)}; {total:.0f} elements in all."
    )
    origin = next(iter(o for o in diagnosis.signals.origins if o[1] is not None), None)
    if origin is not None:
        evidence += f" Replayed, step {origin[0]}'s first NaN/Inf was {origin_text(origin[1:])}."
        advice = _SOURCE_ADVICE[origin[1]].format(
            layer=origin[2] or "the loss function", op=origin[3] or "its ops"
        )
        advice += " Details: log.origins."
    else:
        advice = (
            "Look at the first step's batch and at what runs before these variables. Lower "
            "the learning rate, clip gradients (global_clipnorm), check inputs and targets "
            "for NaN/Inf and the loss for log(0) or a division by zero; under float16 use a "
            "LossScaleOptimizer. GradWatch(on_nonfinite='skip') keeps the model and "
            "replays that step's batch to name the layer (log.origins)."
        )
    return [
        _row("error", "nonfinite", diagnosis.group(mask), first, int(steps[-1]), evidence, advice)
    ]


# What to do about a NaN born at each stage (`log.origins`).
_SOURCE_ADVICE = {
    "input": "Clean the input: drop or impute the rows with NaN/Inf (their samples are in "
    "log.origins) before fit.",
    "target": "Clean the targets and sample weights: drop or fix the rows with NaN/Inf.",
    "forward": "Guard {op} in layer {layer}: its input makes it non-finite on those rows "
    "(clip or add an epsilon before log, sqrt or a division; check the rows' data). If "
    "the layer's weights hold NaN/Inf, an earlier update put it there.",
    "loss": "Guard the loss: it is non-finite on those rows though the predictions are "
    "finite (log(0) or a division by zero; clip, or add an epsilon).",
    "backward": "Guard the gradient of {op} in layer {layer}: its output is finite but its "
    "gradient is not (sqrt or a power at 0; add an epsilon).",
}


def _loss_scale(diagnosis: Diagnosis) -> list[dict]:
    # Only the loss-scale optimizer's skips: those `on_nonfinite` kept are `nonfinite`'s.
    guarded = set(int(x) for x in diagnosis.signals.guarded)
    skipped = np.asarray(
        sorted(int(x) for x in diagnosis.signals.skipped if int(x) not in guarded), np.int64
    )
    if not len(skipped):
        return []
    applied = diagnosis.steps[diagnosis.applied]
    # The scale starts high and is halved at each overflow: the skips before the first
    # applied step are that calibration. Judge the rest of the run.
    settle = int(applied[0]) if len(applied) else int(skipped[-1]) + 1
    later = skipped[skipped > settle]
    rest = int((diagnosis.steps > settle).sum())
    frac = len(later) / rest if rest else 0.0
    frequent = frac > diagnosis.thresholds["loss_scale_steps"]
    evidence = (
        f"{len(skipped)} of {diagnosis.n_steps} recorded steps skipped "
        f"({len(skipped) / max(diagnosis.n_steps, 1):.1%}); "
        f"{len(later)} of the {rest} steps after the first applied one (step {settle}): "
        f"{frac:.1%}."
    )
    if frequent:
        advice = (
            "The loss scale overflows often: float16 cannot hold these gradients. Look at the "
            "skipped steps' batches (log.skipped_steps) for outliers, lower the learning rate, "
            "or keep the layers that overflow in float32 (dtype='float32')."
        )
    else:
        advice = (
            "Normal under mixed precision: after an overflow the LossScaleOptimizer halves its "
            "scale and skips that update. Nothing to do."
        )
    severity = "warning" if frequent else "info"
    return [_row(severity, "loss_scale", [], int(skipped[0]), int(skipped[-1]), evidence, advice)]


def _exploding(diagnosis: Diagnosis) -> list[dict]:
    norm = diagnosis.applied_rows("norm")
    if norm is None:
        return [_not_checked("exploding", "norm")]
    out = []
    thresholds = diagnosis.thresholds
    with np.errstate(invalid="ignore"):
        big = norm > thresholds["exploding_norm"]
    if big.any():
        mask = big.any(axis=0) & diagnosis.live
        peak = np.nanmax(np.where(np.isfinite(norm), norm, np.nan)[:, mask], axis=0)
        order = np.argsort(-peak)
        shown = [f"{diagnosis.keys[np.nonzero(mask)[0][i]]} {short_number(peak[i])}" for i in order]
        first, last = diagnosis.span(big.any(axis=1))
        out.append(
            _row(
                "error",
                "exploding",
                diagnosis.group(mask),
                first,
                last,
                f"Gradient norm above {short_number(thresholds['exploding_norm'])} at "
                f"{int(big.any(axis=1).sum())} "
                f"step(s), the first at step {first}; largest: {name_list(shown, _SHOWN)}.",
                "Lower the learning rate, clip gradients (global_clipnorm=1.0 is a common "
                "start), normalise inputs and targets, and check the initialisation; "
                "BatchNormalization or residual connections help deep nets.",
            )
        )
    kern = [i for i in diagnosis.kernels() if not diagnosis.dead[i]]
    if len(kern) >= 2:
        first_k, last_k = kern[0], kern[-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = _median(norm[:, [first_k]] / norm[:, [last_k]])[0]
        if ratio > thresholds["exploding_ratio"]:
            with np.errstate(divide="ignore", invalid="ignore"):
                each = _median(norm[:, kern] / norm[:, [last_k]])
            mask = np.zeros(diagnosis.n_variables, bool)
            mask[np.asarray(kern)[each > thresholds["exploding_ratio"]]] = True
            out.append(
                _row(
                    "warning",
                    "exploding",
                    diagnosis.group(mask),
                    int(diagnosis.steps[diagnosis.applied][0]),
                    int(diagnosis.steps[diagnosis.applied][-1]),
                    f"The first kernel's gradient norm is {short_number(ratio)} times the last's "
                    "(median "
                    f"over the steps; {diagnosis.keys[first_k]} / {diagnosis.keys[last_k]}), above "
                    f"{short_number(thresholds['exploding_ratio'])}: the gradient grows on its way "
                    "to the input.",
                    "Lower the learning rate or clip gradients; check the initialisation of the "
                    "layers near the input, and add normalisation (BatchNormalization, "
                    "LayerNormalization) between them.",
                )
            )
    g = diagnosis.global_norm()
    g = g[np.isfinite(g) & (g > 0)]
    if len(g) >= _MIN_GROWTH_STEPS:
        w = max(1, len(g) // 10)
        early, late = float(np.median(g[:w])), float(np.median(g[-w:]))
        if late / early > thresholds["exploding_growth"]:
            applied = diagnosis.steps[diagnosis.applied]
            out.append(
                _row(
                    "warning" if not big.any() else "error",
                    "exploding",
                    [],
                    int(applied[0]),
                    int(applied[-1]),
                    f"The global gradient norm grew {short_number(late / early)} times over the "
                    "run "
                    f"(median of the first {w} steps {short_number(early)}, of the last {w} "
                    f"{short_number(late)}), more than "
                    f"{short_number(thresholds['exploding_growth'])}.",
                    "Training is diverging: lower the learning rate, or add a warm-up, "
                    "gradient clipping (global_clipnorm) or weight decay.",
                )
            )
    return out


def _vanishing(diagnosis: Diagnosis) -> list[dict]:
    norm = diagnosis.applied_rows("norm")
    if norm is None:
        return [_not_checked("vanishing", "norm")]
    thresholds = diagnosis.thresholds
    zero = diagnosis.applied_rows("zero_frac")
    # Kernels only: a bias that feeds a normalisation (a conv bias before
    # BatchNormalization, an attention key bias before the softmax) has an exact
    # gradient of zero, and only its rounding error is recorded.
    considered = diagnosis.kernel_mask() & ~diagnosis.dead
    cols = np.nonzero(considered)[0]
    # RMS over the elements that have a gradient: an embedding's untouched rows are
    # zero by design; with `zero_frac` they do not dilute it.
    size = diagnosis.size[cols].astype(np.float32)
    n_eff = size if zero is None else np.maximum(size * (1 - zero[:, cols]), np.float32(1))
    rms = np.full(diagnosis.n_variables, np.nan)
    with np.errstate(invalid="ignore"):
        rms[cols] = _median(norm[:, cols] / np.sqrt(n_eff))
    mask = considered & (rms < thresholds["vanishing_rms"])
    out = []
    if mask.any():
        severe = bool((rms[mask] < thresholds["vanishing_rms_error"]).any())
        idx = np.nonzero(mask)[0]
        shown = [f"{diagnosis.keys[i]} {short_number(rms[i])}" for i in idx]
        applied = diagnosis.steps[diagnosis.applied]
        out.append(
            _row(
                "error" if severe else "warning",
                "vanishing",
                diagnosis.group(mask),
                int(applied[0]),
                int(applied[-1]),
                "Median gradient RMS (norm / sqrt(elements)) below "
                f"{short_number(thresholds['vanishing_rms'])}, "
                f"from the input side: {name_list(shown, _SHOWN)}"
                + (
                    f"; below {short_number(thresholds['vanishing_rms_error'])} is severe."
                    if severe
                    else "."
                ),
                _VANISHING_ADVICE,
            )
        )
    kern = [i for i in diagnosis.kernels() if not diagnosis.dead[i]]
    if len(kern) >= 2:
        first_k, last_k = kern[0], kern[-1]
        with np.errstate(divide="ignore", invalid="ignore"):
            each = _median(norm[:, kern] / norm[:, [last_k]])
        first_norm = _median(norm[:, [first_k]])[0]
        if (
            each[0] < thresholds["vanishing_ratio"]
            and first_norm < thresholds["vanishing_first_norm"]
        ):
            small = np.zeros(diagnosis.n_variables, bool)
            small[np.asarray(kern)[each < thresholds["vanishing_ratio"]]] = True
            applied = diagnosis.steps[diagnosis.applied]
            out.append(
                _row(
                    "warning",
                    "vanishing",
                    diagnosis.group(small),
                    int(applied[0]),
                    int(applied[-1]),
                    f"The first kernel's gradient norm is {short_number(each[0])} times the last's "
                    f"(median; {diagnosis.keys[first_k]} / {diagnosis.keys[last_k]}), below "
                    f"{short_number(thresholds['vanishing_ratio'])}, and "
                    f"{short_number(first_norm)} itself, below "
                    f"{short_number(thresholds['vanishing_first_norm'])}: the layers near the "
                    "input hardly learn.",
                    _VANISHING_ADVICE,
                )
            )
    return out


_VANISHING_ADVICE = (
    "Use ReLU/GELU instead of sigmoid/tanh in deep stacks, He or Glorot initialisation, "
    "BatchNormalization or LayerNormalization between layers, residual connections, or "
    "fewer layers."
)


def _dead(diagnosis: Diagnosis) -> list[dict]:
    norm = diagnosis.applied_rows("norm")
    zero = diagnosis.applied_rows("zero_frac")
    if norm is None and zero is None:
        return [_not_checked("dead", "zero_frac")]
    thresholds = diagnosis.thresholds
    shape = (int(diagnosis.applied.sum()), diagnosis.n_variables)
    with np.errstate(invalid="ignore"):
        whole = (norm == 0) if norm is not None else np.zeros(shape, bool)
        zf = np.where(whole, np.float32(1), np.float32(0) if zero is None else zero)
        zf[np.isnan(zf)] = 0
    valid = np.isfinite(norm) if norm is not None else np.isfinite(zero)
    # An embedding table's untouched rows get no gradient by design: only a table that
    # is zero as a whole counts.
    table = np.asarray([x == "embeddings" for x in diagnosis.leaf], bool)
    if table.any():
        zf[:, table] = whole[:, table]
    rows = max(shape[0], 1)
    with np.errstate(invalid="ignore"):
        zeroish = (zf >= thresholds["dead_zero_frac"]) & valid
    var_dead = (zeroish.sum(axis=0) / rows > thresholds["dead_steps"]) & diagnosis.live
    live = np.nonzero(diagnosis.live)[0]
    if not len(live):
        return [] if zero is not None else [_not_checked("dead", "zero_frac")]
    # Each layer's zero fraction, weighted by its variables' sizes, for all layers at
    # once: the live variables sorted by layer, then summed per layer (reduceat).
    names = list(dict.fromkeys(diagnosis.layer[i] for i in live))
    ids = {name: j for j, name in enumerate(names)}
    lid = np.asarray([ids[diagnosis.layer[i]] for i in live])
    perm = np.argsort(lid, kind="stable")
    order, sorted_lid = live[perm], lid[perm]
    starts = np.r_[0, np.nonzero(np.diff(sorted_lid))[0] + 1]
    sizes = diagnosis.size[order]
    per_layer = np.add.reduceat(sizes, starts)
    w = (sizes / per_layer[sorted_lid]).astype(np.float32)
    lz = np.add.reduceat(zf[:, order] * w, starts, axis=1)
    ok = np.logical_or.reduceat(valid[:, order], starts, axis=1)
    frac_steps = ((lz >= thresholds["dead_zero_frac"]) & ok).sum(axis=0) / rows
    fully_all = np.logical_and.reduceat(var_dead[order], starts)
    is_dead = frac_steps > thresholds["dead_steps"]
    dead_layers = [names[j] for j in np.nonzero(is_dead)[0]]
    fully = [bool(fully_all[j]) for j in np.nonzero(is_dead)[0]]
    frac = {names[j]: float(frac_steps[j]) for j in np.nonzero(is_dead)[0]}
    in_dead = np.zeros(diagnosis.n_variables, bool)
    in_dead[order[is_dead[sorted_lid]]] = True
    diagnosis.dead = var_dead | in_dead
    out = []
    if dead_layers:
        stop = max((i for i, f in enumerate(fully) if f), default=None)
        parts = [f"{layer} ({frac[layer]:.0%} of steps)" for layer in dead_layers]
        text = (
            f"At least {thresholds['dead_zero_frac']:.0%} of the gradient elements are exactly "
            "zero at "
            f"most steps in: {name_list(parts, _SHOWN)}."
        )
        if stop is not None:
            top = dead_layers[stop]
            below = dead_layers[:stop]
            above = [x for i, x in enumerate(dead_layers) if i > stop]
            if below:
                text += (
                    f" {name_list(below, _SHOWN)} {'is' if len(below) == 1 else 'are'} starved: "
                    f"{top} above passes no gradient back."
                )
            if above:
                text += (
                    f" {name_list(above, _SHOWN)} still {'gets' if len(above) == 1 else 'get'} a "
                    "gradient "
                    f"in part, but {'its' if len(above) == 1 else 'their'} kernel's input "
                    f"is zero: {top} outputs zeros."
                )
            where = f"Start with {top}: "
        else:
            where = ""
        any_zero = zeroish[:, diagnosis.dead].any(axis=1)
        first, last = diagnosis.span(any_zero)
        out.append(
            _row(
                "warning",
                "dead",
                dead_layers,
                first,
                last,
                text,
                where + "dying ReLU units output zero for every input. Check the "
                "initialisation (a bias far below zero), lower the learning rate, or use "
                "LeakyReLU, ELU or GELU.",
            )
        )
    if zero is None:
        out.append(
            _not_checked("dead", "zero_frac", "checked only for wholly zero gradients (norm 0)")
        )
    return out


def _disconnected(diagnosis: Diagnosis) -> list[dict]:
    gone = list(diagnosis.signals.disconnected)
    if not gone:
        return []
    mask = np.asarray([k in set(gone) for k in diagnosis.keys], bool)
    return [
        _row(
            "warning",
            "disconnected",
            diagnosis.group(mask) if mask.any() else gone,
            pd.NA,
            pd.NA,
            f"No gradient reached {len(gone)} variable(s) at any step: {name_list(gone, _SHOWN)}.",
            "They are not connected to the loss: check the model's call for an unused layer "
            "or branch, or freeze them with trainable=False.",
        )
    ]


def _update_ratio(diagnosis: Diagnosis) -> list[dict]:
    ratio = diagnosis.applied_rows("update_ratio")
    if ratio is None:
        return [
            _not_checked("update_ratio_high", "update_ratio"),
            _not_checked("update_ratio_low", "update_ratio"),
        ]
    thresholds = diagnosis.thresholds
    applied = diagnosis.steps[diagnosis.applied]
    if len(diagnosis.signals.accumulated):
        # A step that only accumulated a gradient moved no weight: its ratio of 0 says
        # nothing about the size of the updates.
        updated = ~np.isin(applied, np.asarray(diagnosis.signals.accumulated, np.int64))
        ratio, applied = ratio[updated], applied[updated]
    med = _median(ratio)
    kern = diagnosis.kernel_mask()
    out = []
    span = (int(applied[0]), int(applied[-1])) if len(applied) else (pd.NA, pd.NA)
    high = kern & (med > thresholds["update_ratio_high"])
    if high.any():
        shown = [f"{diagnosis.keys[i]} {short_number(med[i])}" for i in np.nonzero(high)[0]]
        out.append(
            _row(
                "warning",
                "update_ratio_high",
                diagnosis.group(high),
                *span,
                f"Median update_ratio (|update| / |weight|) of a kernel above "
                f"{short_number(thresholds['update_ratio_high'])}, ten times the 1e-3 rule of "
                "thumb: "
                f"{name_list(shown, _SHOWN)}.",
                "Each step changes these weights by more than 1% of their size: lower the "
                "learning rate (aim for a median update_ratio near 1e-3).",
            )
        )
    low = kern & ~diagnosis.dead & (med < thresholds["update_ratio_low"])
    if low.any():
        shown = [f"{diagnosis.keys[i]} {short_number(med[i])}" for i in np.nonzero(low)[0]]
        out.append(
            _row(
                "warning",
                "update_ratio_low",
                diagnosis.group(low),
                *span,
                "Median update_ratio of a kernel below "
                f"{short_number(thresholds['update_ratio_low'])}: "
                f"{name_list(shown, _SHOWN)}.",
                "These weights hardly move: raise the learning rate, or look for a vanishing "
                "gradient or a weight norm that has grown very large.",
            )
        )
    return out


def _clipping(diagnosis: Diagnosis) -> list[dict]:
    clipped = diagnosis.applied_rows("clipped_norm")
    norm = diagnosis.applied_rows("norm")
    if clipped is None or norm is None:
        return [_not_checked("clipping", "clipped_norm" if norm is not None else "norm")]
    thresholds = diagnosis.thresholds
    live = diagnosis.live
    with np.errstate(invalid="ignore"):
        cut = (clipped[:, live] < norm[:, live] * (1 - _CLIP_TOLERANCE)).any(axis=1)
    g = diagnosis.global_norm()
    ok = np.isfinite(g)
    if not ok.any():
        return []
    frac = float(cut[ok].mean())
    if frac <= thresholds["clipping_steps"]:
        return []
    p90 = float(np.percentile(g[ok], 90))
    gc = global_norms(clipped[:, live])
    first, last = diagnosis.span(cut)
    with np.errstate(invalid="ignore"):
        var_cut = (clipped < norm * (1 - _CLIP_TOLERANCE)).mean(axis=0) > thresholds[
            "clipping_steps"
        ]
    return [
        _row(
            "warning",
            "clipping",
            diagnosis.group(var_cut & live),
            first,
            last,
            f"The optimizer clipped {frac:.0%} of {int(ok.sum())} steps (more than "
            f"{thresholds['clipping_steps']:.0%}): median global norm "
            f"{short_number(float(np.nanmedian(g[ok])))}, "
            f"{short_number(float(np.nanmedian(gc[ok])))} after clipping.",
            f"Clipping this often is 'extremely aggressive' (the deep learning tuning playbook) "
            f"and changes the optimizer: raise the threshold to about {short_number(p90)}, the "
            "90th "
            f"percentile of the recorded global norm (global_clipnorm={short_number(p90)}), or "
            "remove it.",
        )
    ]


def _oscillation(diagnosis: Diagnosis) -> list[dict]:
    cos = diagnosis.applied_rows("cos_prev")
    if cos is None:
        return [_not_checked("oscillation", "cos_prev")]
    thresholds = diagnosis.thresholds
    # Kernels only: a converged bias of a few elements that an adaptive optimizer
    # (Adam, RMSprop) moves by about the learning rate at every step zig-zags around
    # its optimum by design; a kernel's cosine averages over many elements.
    considered = diagnosis.kernel_mask() & ~diagnosis.dead
    med = _median(cos)
    mask = considered & (med < thresholds["oscillation_cos"])
    if not mask.any():
        return []
    shown = [f"{diagnosis.keys[i]} {short_number(med[i])}" for i in np.nonzero(mask)[0]]
    applied = diagnosis.steps[diagnosis.applied]
    return [
        _row(
            "warning",
            "oscillation",
            diagnosis.group(mask),
            int(applied[0]),
            int(applied[-1]),
            "Median cosine between consecutive gradients below "
            f"{short_number(thresholds['oscillation_cos'])}: "
            f"{name_list(shown, _SHOWN)}. Each step overshoots and the next comes back.",
            "Lower the learning rate, or add momentum (SGD(momentum=0.9)) or use Adam to "
            "damp the zig-zag.",
        )
    ]


def _spikes(diagnosis: Diagnosis) -> list[dict]:
    return spike_findings(diagnosis)


def _noise_scale(diagnosis: Diagnosis) -> list[dict]:
    return noise_scale_findings(diagnosis.signals.noise_scale)


def _examples(diagnosis: Diagnosis) -> list[dict]:
    examples = diagnosis.signals.examples
    if examples is None or not len(examples):
        return []
    return examples_findings(examples, diagnosis.thresholds["examples_ratio"])


# Dead first: the later rules leave out the variables it finds.
RULES: tuple[Callable[[Diagnosis], list[dict]], ...] = (
    _nonfinite,
    _loss_scale,
    _dead,
    _exploding,
    _vanishing,
    _disconnected,
    _update_ratio,
    _clipping,
    _oscillation,
    _spikes,
    _noise_scale,
    _examples,
    epsilon,
    second_moment,
    warmup,
)

#: The stats that each rule reads; without one, the rule says what it could not check.
READS: dict[Callable[[Diagnosis], list[dict]], tuple[str, ...]] = {
    _nonfinite: ("nonfinite",),
    _loss_scale: (),
    _dead: ("norm", "zero_frac"),
    _exploding: ("norm",),
    _vanishing: ("norm", "zero_frac"),
    _disconnected: (),
    _update_ratio: ("update_ratio",),
    _clipping: ("clipped_norm", "norm"),
    _oscillation: ("cos_prev",),
    _spikes: (),
    _noise_scale: (),
    _examples: (),
    **OPTIMIZER_READS,
}
#: What `Diagnosis` itself reads: `norm` (which variables are live) and `nonfinite` (the
#: rows whose other stats say nothing).
DIAGNOSIS_READS = ("norm", "nonfinite")


def stats_read() -> set[str]:
    """Every stat that the doctor reads: the union of the rules' `READS`
    (`gradwatch.stats.DOCTOR_STATS`, in catalogue order).

    Example:

    >>> " ".join(sorted(stats_read()))
    'clipped_norm cos_prev eps_frac nonfinite norm update_ratio v_ratio zero_frac'
    """
    return {*DIAGNOSIS_READS, *(name for rule in RULES for name in READS[rule])}


def find(signals: Signals, thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """Every rule's findings over `signals`, as rows of `FINDING_COLUMNS`, rule by rule.

    Args:
        signals: The log's stats and metadata.
        thresholds: Every threshold, checked (`gradwatch.diagnose.check_thresholds`).

    Example:

    >>> s = Signals(np.arange(0), ["d/kernel"], {"d/kernel": (2, 2)}, lambda name: None,
    ...             disconnected=["d/kernel"])
    >>> [(row["severity"], row["finding"]) for row in find(s, {})]
    [('warning', 'disconnected')]
    """
    diagnosis = Diagnosis(signals, thresholds)
    if len(signals.steps):
        return [row for rule in RULES for row in rule(diagnosis)]
    # No recorded step: what needs none (a replayed step's examples need no stats).
    return [*(_disconnected(diagnosis) if signals.disconnected else []), *_examples(diagnosis)]
