"""Optimizer health: `v_ratio`, `eps_frac` and `update_cos` of real trainings against a
NumPy re-implementation of Keras' Adam, AdamW, Nadam, Adamax, Lamb and RMSprop updates
(written out from `keras/src/optimizers/*.py`), run over the gradients that the same
training recorded (`values="*"`) from the weights it started with."""

from __future__ import annotations

import math
import warnings

import keras
import numpy as np
import pytest
from models import Sequential
from reference import skip_on_jax, skip_unless_supported, spe
from test_custom_steps import CriticLoop

import gradwatch

HEALTH = ["v_ratio", "eps_frac", "update_cos"]
LR = 0.01
# Input features of very different scales: the first kernel's rows get gradients
# orders of magnitude apart, so that some elements' second moments fall below an
# epsilon of 1e-3 and others do not (eps_frac strictly between 0 and 1).
SCALES = np.asarray([1e-5, 1e-4, 1e-3, 1e-2, 1.0], np.float32)
EPS = 1e-3


def _data(n=48, seed=0):
    rng = np.random.default_rng(seed)
    x = (rng.normal(size=(n, 5)) * SCALES).astype("float32")
    y = rng.normal(size=(n, 2)).astype("float32")
    return x, y


def _model():
    return Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(6, activation="tanh", name="hidden"),
            keras.layers.Dense(2, name="out"),
        ],
        name="net",
    )


class NumpyOptimizer:
    """Keras' update of one optimizer, in float64, with the three stats of each update
    written out from their definitions (docs/reference.md)."""

    def __init__(self, kind, lr=LR, beta_1=0.9, beta_2=0.999, epsilon=EPS, weight_decay=None):
        self.kind, self.lr, self.b1, self.b2, self.eps = kind, lr, beta_1, beta_2, epsilon
        self.wd = weight_decay
        self.iterations = 0
        self.u_product = 1.0  # Nadam's
        self.slots: dict[int, dict[str, np.ndarray]] = {}

    def apply(self, weights, grads):
        """Updates `weights` (a list, in place) with `grads`; returns each variable's
        (v_ratio, eps_frac, update_cos)."""
        t = self.iterations + 1
        if self.kind == "nadam":
            self.u_product *= self.b1 * (1.0 - 0.5 * 0.96**t)
        stats = []
        for j, (w, g) in enumerate(zip(weights, grads, strict=True)):
            g = np.asarray(g, np.float64)
            s = self.slots.setdefault(j, {"m": np.zeros_like(g), "v": np.zeros_like(g)})
            v_before = s["v"].copy()
            before = w.copy()
            if self.wd:
                w -= w * self.wd * self.lr
            w -= self._update(s, g, w, t)
            stats.append(
                (self._v_ratio(g, v_before), self._eps_frac(s["v"], t), _cos(w - before, -g))
            )
        self.iterations = t
        return stats

    def _update(self, s, g, w, t):
        b1, b2, lr, eps = self.b1, self.b2, self.lr, self.eps
        if self.kind == "sgd":
            return lr * g
        if self.kind == "rmsprop":  # rho is b2
            s["v"] = b2 * s["v"] + (1 - b2) * g**2
            return lr * g / np.sqrt(s["v"] + eps)
        s["m"] += (g - s["m"]) * (1 - b1)
        if self.kind == "adamax":
            s["v"] = np.maximum(b2 * s["v"], np.abs(g))
            return lr * s["m"] / ((1 - b1**t) * (s["v"] + eps))
        s["v"] += (g**2 - s["v"]) * (1 - b2)
        if self.kind == "adam":
            alpha = lr * math.sqrt(1 - b2**t) / (1 - b1**t)
            return s["m"] * alpha / (np.sqrt(s["v"]) + eps)
        v_hat = s["v"] / (1 - b2**t)
        if self.kind == "lamb":
            r = (s["m"] / (1 - b1**t)) / (np.sqrt(v_hat) + eps)
            wn, rn = np.linalg.norm(w), np.linalg.norm(r)
            return (wn / rn if wn > 0 and rn > 0 else 1.0) * lr * r
        # nadam
        u_t = b1 * (1 - 0.5 * 0.96**t)
        u_t1 = b1 * (1 - 0.5 * 0.96 ** (t + 1))
        m_hat = u_t1 * s["m"] / (1 - self.u_product * u_t1) + (1 - u_t) * g / (1 - self.u_product)
        return m_hat * lr / (np.sqrt(v_hat) + eps)

    def _v_ratio(self, g, v_before):
        """max(g**2 / v_hat_(t-1)), v_hat the bias-corrected second moment; NaN at t = 1."""
        if self.kind == "sgd" or self.iterations == 0:
            return np.nan
        if self.kind == "adamax":
            v_hat = v_before**2
        elif self.kind == "rmsprop":
            v_hat = v_before
        else:
            v_hat = v_before / (1 - self.b2**self.iterations)
        with np.errstate(divide="ignore", invalid="ignore"):
            ratio = np.where(g == 0, 0.0, g**2 / v_hat)
        return float(ratio.max())

    def _eps_frac(self, v, t):
        """The share of elements whose denominator term is below epsilon."""
        term = {
            "sgd": None,
            "adam": np.sqrt(v),
            "adamax": v,
            "rmsprop": v,
        }.get(self.kind, np.sqrt(v / (1 - self.b2**t)))
        if term is None:
            return np.nan
        # No element may sit at the threshold, where float32 and float64 could differ.
        assert not np.any(np.isclose(term, self.eps, rtol=1e-4, atol=0)), "eps on an element"
        return float(np.mean(term < self.eps))


def _cos(a, b):
    a, b = a.ravel(), b.ravel()
    return float(a @ b / (np.linalg.norm(a) * np.linalg.norm(b)))


def _reference(log, start, reference):
    """Runs `reference` over the recorded gradients of every step from the weights
    `start`; returns `(expected stats {stat: {step: [per variable]}}, final weights)`."""
    weights = [np.asarray(w, np.float64).copy() for w in start]
    expected = {s: {} for s in HEALTH}
    for step in log.steps:
        grads = [log.gradient(key, step) for key in log.variables]
        by_variable = reference.apply(weights, grads)
        for k, s in enumerate(HEALTH):
            expected[s][int(step)] = [row[k] for row in by_variable]
    return expected, weights


def _fit(optimizer, stats=HEALTH, epochs=2, batch=8, steps_per_execution=1, jit=False, x=None):
    keras.utils.set_random_seed(3)
    model = _model()
    model.compile(optimizer, "mse", steps_per_execution=steps_per_execution, jit_compile=jit)
    x, y = _data() if x is None else x
    model(x[:1])
    start = [np.array(w) for w in model.get_weights()]
    watch = gradwatch.GradWatch(stats=stats, values="*")
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, callbacks=[watch], verbose=0)
    return watch.log, model, start


def _check(log, expected, model, weights, cos_tol=1e-4):
    for w, ref in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-6)  # the reference is Keras'
    for j, key in enumerate(log.variables):
        for step in log.steps:
            got = {s: float(log.stat(s).loc[step, key]) for s in HEALTH}
            want = {s: expected[s][int(step)][j] for s in HEALTH}
            where = (key, int(step))
            assert got["v_ratio"] == pytest.approx(want["v_ratio"], rel=1e-4, nan_ok=True), where
            assert got["eps_frac"] == pytest.approx(want["eps_frac"], abs=1e-6, nan_ok=True), where
            assert got["update_cos"] == pytest.approx(want["update_cos"], abs=cos_tol), where


OPTIMIZERS = {
    "adam": (lambda: keras.optimizers.Adam(LR, epsilon=EPS), lambda: NumpyOptimizer("adam")),
    "adamw": (
        lambda: keras.optimizers.AdamW(LR, weight_decay=0.1, epsilon=EPS),
        lambda: NumpyOptimizer("adam", weight_decay=0.1),
    ),
    "nadam": (lambda: keras.optimizers.Nadam(LR, epsilon=EPS), lambda: NumpyOptimizer("nadam")),
    "adamax": (
        lambda: keras.optimizers.Adamax(LR, epsilon=EPS),
        lambda: NumpyOptimizer("adamax"),
    ),
    "lamb": (lambda: keras.optimizers.Lamb(LR, epsilon=EPS), lambda: NumpyOptimizer("lamb")),
    "rmsprop": (
        lambda: keras.optimizers.RMSprop(LR, rho=0.9, epsilon=EPS**2),
        lambda: NumpyOptimizer("rmsprop", beta_2=0.9, epsilon=EPS**2),
    ),
}


# Every optimizer on TensorFlow; Adam and Adamax (its own second moment) under JAX and
# PyTorch too, where the slots are read from the step's state.
@pytest.mark.parametrize(
    "name",
    [
        pytest.param(n, marks=pytest.mark.backends) if n in ("adam", "adamax") else n
        for n in OPTIMIZERS
    ],
)
def test_health_stats_match_a_numpy_reimplementation_of_the_optimizer(name):
    make, make_reference = OPTIMIZERS[name]
    log, model, start = _fit(make(), steps_per_execution=spe(2))
    expected, weights = _reference(log, start, make_reference())
    _check(log, expected, model, weights)
    v_ratio, eps_frac = log.stat("v_ratio"), log.stat("eps_frac")
    assert v_ratio.loc[0].isna().all() and v_ratio.loc[1:].notna().all().all()
    # The test can fail: epsilon dominates some elements of the first kernel, not all.
    assert 0 < eps_frac["net/hidden/kernel"].mean() < 1


@pytest.mark.parametrize(("name", "jit"), [("adam", True), ("nadam", True)])
def test_health_stats_under_xla_and_several_steps_per_execution(name, jit):
    skip_unless_supported(spe=3, jit=jit)
    make, make_reference = OPTIMIZERS[name]
    log, model, start = _fit(make(), steps_per_execution=3, jit=jit)
    expected, weights = _reference(log, start, make_reference())
    _check(log, expected, model, weights)


def _gradients(log, step):
    return [log.gradient(key, step) for key in log.variables]


@pytest.mark.backends
def test_sgd_moves_along_its_clipped_gradient_and_notes_once_that_it_keeps_no_second_moment():
    # clipvalue clips some elements: the update is -lr * clip(g), and update_cos follows
    # the clipped gradient (with the recorded g it would be below 1).
    optimizer = keras.optimizers.SGD(0.1, clipvalue=0.05)
    with pytest.warns(UserWarning, match=r"`v_ratio` and `eps_frac` as NaN for SGD") as caught:
        log, _, _ = _fit(optimizer)
    notes = [w for w in caught if "second moment" in str(w.message)]
    assert len(notes) == 1  # once, over 12 steps and 2 epochs
    assert log.stat("v_ratio").isna().all().all() and log.stat("eps_frac").isna().all().all()
    np.testing.assert_allclose(log.stat("update_cos").to_numpy(), 1.0, atol=1e-4)
    clipped = sum(int((np.abs(g) > 0.05).sum()) for g in _gradients(log, 0))
    assert clipped > 0
    raw = _cos(np.clip(_gradients(log, 0)[2], -0.05, 0.05), _gradients(log, 0)[2])
    assert raw < 0.999  # the raw gradient's direction differs


def test_adam_gives_no_note():
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        log, _, _ = _fit(OPTIMIZERS["adam"][0](), epochs=1)
    assert not [w for w in caught if "second moment" in str(w.message)]
    assert log.stat("eps_frac").notna().all().all()


@pytest.mark.backends
def test_health_stats_follow_gradient_accumulation_and_are_nan_where_it_only_accumulates():
    n = 3
    log, model, start = _fit(
        keras.optimizers.Adam(LR, epsilon=EPS, gradient_accumulation_steps=n), epochs=2
    )
    reference, weights = NumpyOptimizer("adam"), [np.array(w, np.float64) for w in start]
    summed = None
    for step in log.steps:
        grads = _gradients(log, step)
        summed = grads if summed is None else [a + g for a, g in zip(summed, grads, strict=True)]
        got = {s: log.stat(s).loc[step].to_numpy() for s in HEALTH}
        if (step + 1) % n:
            for s in HEALTH:
                assert np.isnan(got[s]).all(), (s, step)
            continue
        rows = reference.apply(weights, [g / n for g in summed])
        summed = None
        for k, s in enumerate(HEALTH):
            want = np.asarray([row[k] for row in rows])
            np.testing.assert_allclose(got[s], want, rtol=1e-4, atol=1e-4, err_msg=f"{s} {step}")
    for w, ref in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-6)
    assert log.stat("v_ratio").loc[n - 1].isna().all()  # the first update
    assert log.stat("v_ratio").loc[2 * n - 1].notna().all()


@pytest.mark.backends
def test_health_stats_read_a_loss_scale_optimizers_inner_slots_and_skip_its_skipped_steps():
    # A scale of 2**127 overflows the first steps' gradients: the loss-scale optimizer
    # skips them (halving its scale) and its inner Adam neither counts nor moves them.
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(LR, epsilon=EPS), initial_scale=2.0**127
    )
    x, y = _data()
    log, model, start = _fit(optimizer, x=(x, y * 100))
    skipped = set(log.skipped_steps)
    assert skipped and len(skipped) < len(log.steps) - 2
    reference, weights = NumpyOptimizer("adam"), [np.array(w, np.float64) for w in start]
    for step in log.steps:
        got = {s: log.stat(s).loc[step].to_numpy() for s in HEALTH}
        if step in skipped:
            for s in HEALTH:
                assert np.isnan(got[s]).all(), (s, step)
            continue
        rows = reference.apply(weights, _gradients(log, step))
        for k, s in enumerate(HEALTH):
            want = np.asarray([row[k] for row in rows])
            np.testing.assert_allclose(got[s], want, rtol=1e-4, atol=1e-4, err_msg=f"{s} {step}")
    for w, ref in zip(model.get_weights(), weights, strict=True):
        np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-6)


def test_each_update_of_a_variable_in_one_step_has_its_own_health_stats():
    # A critic updated 3 times a step by its own Adam, the generator once by another:
    # each update's stats follow the slots that update left for the next.
    skip_on_jax("a stateful custom step")
    x, y = _data(n=24)
    x = x[:, :3]
    model = CriticLoop(name="gan")
    model(x[:1])
    start = [np.array(w, np.float64) for w in model.get_weights()]  # g's, then d's
    model.compile(keras.optimizers.Adam(LR, epsilon=EPS), keras.optimizers.Adam(LR, epsilon=EPS))
    watch = gradwatch.GradWatch(stats=HEALTH, values="*")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    log = watch.log
    d_ref, g_ref = NumpyOptimizer("adam"), NumpyOptimizer("adam")
    g_w, d_w = start[:2], start[2:]
    for step in log.steps:
        expected = {}
        for k in range(3):
            suffix = f"@{k}" if k else ""
            keys = [f"gan/d/kernel{suffix}", f"gan/d/bias{suffix}"]
            rows = d_ref.apply(d_w, [log.gradient(key, step) for key in keys])
            expected.update(zip(keys, rows, strict=True))
        keys = ["gan/g/kernel", "gan/g/bias"]
        expected.update(
            zip(keys, g_ref.apply(g_w, [log.gradient(k, step) for k in keys]), strict=True)
        )
        for key, want in expected.items():
            for s, value in zip(HEALTH, want, strict=True):
                got = log.stat(s).loc[step, key]
                assert got == pytest.approx(value, rel=1e-4, abs=1e-4, nan_ok=True), (s, key)
    for w, ref in zip(model.get_weights(), g_w + d_w, strict=True):
        np.testing.assert_allclose(w, ref, rtol=1e-4, atol=1e-6)
    # The second update of the first step already has a history: the first's.
    assert np.isnan(log.stat("v_ratio").loc[0, "gan/d/kernel"])
    assert np.isfinite(log.stat("v_ratio").loc[0, "gan/d/kernel@1"])


# ------------------------------------------------------------------ the doctor's rules
def _findings(log, name):
    found = log.diagnose()
    return found[found["finding"] == name]


def _trained(optimizer, x, y, epochs=1):
    keras.utils.set_random_seed(0)
    model = Sequential(
        [
            keras.Input((5,)),
            keras.layers.Dense(16, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ],
        name="net",
    )
    model.compile(optimizer, "mse")
    # The outlier batches spike: the rules judge the recorded series themselves here.
    watch = gradwatch.GradWatch(stats="doctor", on_spike="ignore")
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, callbacks=[watch], verbose=0)
    return watch.log


def _regression(n_steps=64, outliers=()):
    """A linear target with a little noise; `(step, shift)` adds `shift` to the targets
    of that step's batch (an outlier batch)."""
    rng = np.random.default_rng(0)
    x = rng.normal(size=(8 * n_steps, 5)).astype("float32")
    y = x @ rng.normal(size=(5, 1)) + 0.1 * rng.normal(size=(8 * n_steps, 1))
    for step, shift in outliers:
        y[8 * step : 8 * step + 8] += shift
    return x, y.astype("float32")


def test_epsilon_rule_finds_layers_whose_updates_epsilon_dominates():
    x, y = _regression(24)
    log = _trained(keras.optimizers.Adam(0.01, epsilon=1.0), x, y)
    (row,) = _findings(log, "epsilon").itertuples()
    assert row.severity == "warning"
    assert set(row.variables) == {"net/hidden/kernel", "net/out/kernel"}
    # What the rule read: the kernels' median eps_frac, near 1 with gradients far below 1.
    assert log.stat("eps_frac")["net/hidden/kernel"].median() > 0.9
    healthy = _trained(keras.optimizers.Adam(0.01), x, y)
    assert _findings(healthy, "epsilon").empty
    assert healthy.stat("eps_frac")["net/hidden/kernel"].median() == 0


def test_warmup_rule_finds_huge_first_updates_without_a_rising_learning_rate():
    x, y = _regression(24)
    # Adam's first update moves each element by about the learning rate: 0.1 against
    # kernel elements of RMS 0.3-0.5 (Glorot) is a ratio near 0.2-0.3.
    log = _trained(keras.optimizers.Adam(0.1), x, y)
    (row,) = _findings(log, "warmup").itertuples()
    assert "net/hidden/kernel" in row.variables and row.first_step == 0
    assert log.stat("update_ratio")["net/hidden/kernel"].iloc[0] > 0.1
    # The same peak rate, reached by a linear warm-up over the first 10 steps.
    warm = keras.optimizers.schedules.CosineDecay(
        0.0, decay_steps=100, warmup_target=0.1, warmup_steps=10
    )
    warmed = _trained(keras.optimizers.Adam(warm), x, y)
    assert _findings(warmed, "warmup").empty
    assert warmed.scalars["learning_rate"].iloc[9] > warmed.scalars["learning_rate"].iloc[0]
    assert _findings(_trained(keras.optimizers.Adam(1e-3), x, y), "warmup").empty


def test_second_moment_rule_needs_a_v_ratio_spike_before_a_gradient_or_loss_spike():
    # An outlier batch at step 40: its own gradient, loss and v_ratio spike together
    # (the same step: no v_ratio spike *precedes* anything), and training recovers.
    x, y = _regression(64, [(40, 30.0)])
    alone = _trained(keras.optimizers.Adam(0.01), x, y)
    assert _findings(alone, "second_moment").empty
    top = alone.stat("v_ratio").max(axis=1)
    assert top.loc[40] > 100 * top.loc[20:39].median()
    # A second, larger outlier three steps later spikes the gradient and the loss again.
    x, y = _regression(64, [(40, 30.0), (43, 300.0)])
    log = _trained(keras.optimizers.Adam(0.01), x, y)
    (row,) = _findings(log, "second_moment").itertuples()
    assert (row.first_step, row.last_step) == (40, 43)
    assert "step 40: gradient spike at step 43" in row.evidence


def test_second_moment_rule_reads_the_logs_spike_alerts():
    from gradwatch._doctor.rules import Signals, find
    from gradwatch.diagnose import THRESHOLDS

    n, keys = 48, ["m/d/kernel"]
    ratio = np.full((n, 1), 2.0, np.float32)
    ratio[::3] = 3.0
    ratio[36] = 500.0  # judged: 16 values after the first 16, which are left out
    stats = {"v_ratio": ratio, "norm": np.ones((n, 1), np.float32), "nonfinite": np.zeros((n, 1))}

    def rows(alerts):
        signals = Signals(
            np.arange(n), keys, {"m/d/kernel": (4, 4)}, stats.get, spike_alerts=alerts
        )
        return [r for r in find(signals, dict(THRESHOLDS)) if r["finding"] == "second_moment"]

    # `(step, kind, value)`: the value (the global norm, the loss) does not matter here.
    assert rows([]) == [] and rows([(45, "loss_spike", 9.0)]) == []  # 9 steps later: too late
    assert rows([(36, "spike", 9.0)]) == []  # the same step: it does not precede
    (row,) = rows([(39, "loss_spike", 9.0), (41, "spike", 9.0)])
    assert (row["first_step"], row["last_step"]) == (36, 39)
    assert "loss spike at step 39" in row["evidence"]
