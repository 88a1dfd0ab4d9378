"""The doctor: `GradientLog.diagnose`, `gradwatch doctor` and where the findings show.

Trainings broken on purpose are each diagnosed by name with the culprit; healthy ones
give no warning and no error (a false alarm is a bug). Hand-written log files pin each
rule's formula on both sides of its default threshold.
"""

from __future__ import annotations

import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from components import HANG
from logfiles import write_log
from models import Sequential

import gradwatch
from gradwatch._doctor.rules import DIAGNOSIS_READS, READS, RULES, Diagnosis, find
from gradwatch.diagnose import FINDING_COLUMNS, FINDINGS, THRESHOLDS, Signals

ROOT = Path(__file__).resolve().parents[1]
ALL = list(gradwatch.STATS)
# What the doctor reads: the trainings below record these (fewer stats to trace per step);
# a test that also checks another stat asks for it.
DOCTOR = list(gradwatch.stats.DOCTOR_STATS)
L = keras.layers


def _fit(build, optimizer, loss, x, y, epochs=2, batch=8, stats=DOCTOR, **watch):
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    model = build()
    # No XLA: compiling the step costs more than these few steps run.
    model.compile(optimizer, loss, jit_compile=False)
    w = gradwatch.GradWatch(stats=stats, on_nonfinite="ignore", verbose=0, **watch)
    model.fit(x, y, batch_size=batch, epochs=epochs, shuffle=False, verbose=0, callbacks=[w])
    return model, w.log


def _data(n=64, features=8, seed=0):
    rng = np.random.default_rng(seed)
    return rng.normal(size=(n, features)).astype("float32"), rng.normal(size=(n, 1)).astype(
        "float32"
    )


def _rows(findings, name):
    return findings[findings["finding"] == name]


def _not_info(findings):
    return findings[findings["severity"] != "info"]


# -------------------------------------------------------------- broken trainings
@pytest.fixture(scope="module")
def sigmoid():
    """Twelve sigmoid layers: the gradient shrinks by about 4x per layer toward the input."""
    x, y = _data()

    return _fit(_sigmoid_net, keras.optimizers.SGD(0.1), "mse", x, y), x, y


def _sigmoid_net():
    return Sequential(
        [keras.Input((8,)), *[L.Dense(16, activation="sigmoid") for _ in range(12)], L.Dense(1)]
    )


def test_diagnose_names_vanishing_gradients_of_a_deep_sigmoid_net_from_the_input_side(sigmoid):
    (model, log), x, y = sigmoid
    findings = log.diagnose()
    rows = _rows(findings, "vanishing")
    assert len(rows) >= 1 and set(rows["severity"]) <= {"warning", "error"}
    first = model.layers[0].kernel.path
    named = [v for vs in rows["variables"] for v in vs]
    # From the input side: the first layer is named first, the output layer never.
    assert named[0] in (first, first.rsplit("/", 1)[0])
    assert not any(model.layers[-1].name in v for v in named)
    # The rule's RMS, by hand from the recorded norms.
    norm = log.stat("norm")[first].to_numpy(np.float64)
    rms = np.median(norm / np.sqrt(np.prod(model.layers[0].kernel.shape)))
    assert rms < THRESHOLDS["vanishing_rms"]
    # An independent reference: backpropagation by hand in NumPy, from the same starting
    # weights (the same seed) over the first batch.
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    weights = [np.asarray(w, np.float64) for w in _sigmoid_net().get_weights()]
    hs = [x[:8].astype(np.float64)]
    for w, b in zip(weights[0:-2:2], weights[1:-2:2], strict=True):
        hs.append(1 / (1 + np.exp(-(hs[-1] @ w + b))))
    out = hs[-1] @ weights[-2] + weights[-1]
    delta = 2 * (out - y[:8]) / out.size  # d mean((out - y)**2) / d out
    delta = delta @ weights[-2].T * hs[-1] * (1 - hs[-1])
    for k in range(len(hs) - 2, 0, -1):
        delta = delta @ weights[2 * k].T * hs[k] * (1 - hs[k])
    g = hs[0].T @ delta  # the first kernel's gradient
    np.testing.assert_allclose(np.sqrt(np.mean(g**2)), norm[0] / np.sqrt(g.size), rtol=1e-3)
    assert not len(findings[findings["severity"] == "error"]) or "vanishing" in set(
        findings[findings["severity"] == "error"]["finding"]
    )


@pytest.fixture(scope="module")
def dead():
    """A ReLU layer whose bias starts at -20: its units output zero for every input."""
    x, y = _data()

    def build():
        return Sequential(
            [
                keras.Input((8,)),
                L.Dense(16, activation="relu", name="hidden"),
                L.Dense(
                    16,
                    activation="relu",
                    bias_initializer=keras.initializers.Constant(-20.0),
                    name="dead",
                ),
                L.Dense(1, name="out"),
            ]
        )

    return _fit(build, keras.optimizers.Adam(1e-3), "mse", x, y), x


def test_diagnose_names_a_dead_relu_layer_and_the_layer_it_starves(dead):
    (model, log), x = dead
    # The layer is dead for real: its pre-activation is below zero on every example.
    w1, b1, w2, b2 = (np.asarray(v) for v in model.get_weights()[:4])
    assert (np.maximum(x @ w1 + b1, 0) @ w2 + b2 < 0).all()
    findings = log.diagnose()
    (row,) = _rows(findings, "dead").itertuples()
    layer = {n: model.get_layer(n).kernel.path.rsplit("/", 1)[0] for n in ("hidden", "dead", "out")}
    assert row.variables == [layer["hidden"], layer["dead"], layer["out"]]
    assert f"{layer['hidden']} is starved: {layer['dead']} above passes no gradient back" in (
        row.evidence
    )
    assert f"{layer['dead']} outputs zeros" in row.evidence
    # Exactly zero, by hand: the dead layer's kernel and bias norms at every step.
    for var in model.get_layer("dead").trainable_weights:
        assert (log.stat("norm")[var.path] == 0).all()
    # The zeros are not reported again as vanishing or as tiny updates.
    assert not len(_rows(findings, "vanishing")) and not len(_rows(findings, "update_ratio_low"))


@pytest.fixture(scope="module")
def high_lr():
    rng = np.random.default_rng(1)
    x, _ = _data()
    y = rng.integers(0, 3, size=(64,))

    def build():
        return Sequential([keras.Input((8,)), L.Dense(16, activation="relu"), L.Dense(3)])

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    return _fit(build, keras.optimizers.SGD(3.0), loss, x, y, stats=ALL)


def test_diagnose_names_the_kernels_a_far_too_high_learning_rate_moves(high_lr):
    model, log = high_lr
    (row,) = _rows(log.diagnose(), "update_ratio_high").itertuples()
    kernels = [layer.kernel.path for layer in model.layers]
    assert row.variables == kernels  # the biases are left out
    for key in kernels:
        # SGD's update is lr * g, so the recorded ratio is the real one...
        np.testing.assert_allclose(
            log.stat("update_norm")[key], 3.0 * log.stat("norm")[key], rtol=1e-4
        )
        # ... and its median is above the threshold, by hand.
        assert log.stat("update_ratio")[key].median() > THRESHOLDS["update_ratio_high"]
        assert key in row.evidence


@pytest.fixture(scope="module")
def deep_linear():
    """Seven linear layers on targets scaled by 1e4: the norms blow up, then overflow."""
    x, y = _data()

    def build():
        return Sequential([keras.Input((8,)), *[L.Dense(32) for _ in range(6)], L.Dense(1)])

    return _fit(build, keras.optimizers.SGD(0.01), "mse", x, y * 1e4)


def test_diagnose_finds_a_deep_linear_net_on_badly_scaled_targets_exploding(deep_linear):
    _, log = deep_linear
    findings = log.diagnose()
    errors = findings[findings["severity"] == "error"]
    assert {"exploding", "nonfinite"} & set(errors["finding"])
    (big,) = _rows(errors, "exploding").itertuples()
    norm = log.stat("norm")
    over = norm[(norm > THRESHOLDS["exploding_norm"]).any(axis=1)].index
    assert big.first_step == over[0]
    bad = log.stat("nonfinite")
    (nan,) = _rows(errors, "nonfinite").itertuples()
    assert nan.first_step == bad[(bad > 0).any(axis=1)].index[0]
    assert f"{int(bad.to_numpy().sum())} elements in all" in nan.evidence
    # NaN gradients (their finite rest has norm 0) are not taken for dead or vanishing ones.
    assert not len(_rows(findings, "dead")) and not len(_rows(findings, "vanishing"))


@pytest.fixture(scope="module")
def clipped():
    x, y = _data()

    def build():
        return Sequential([keras.Input((8,)), L.Dense(16, activation="relu"), L.Dense(1)])

    return _fit(build, keras.optimizers.Adam(1e-3, global_clipnorm=1e-3), "mse", x, y)


def test_diagnose_finds_clipping_and_names_the_90th_percentile_of_the_global_norm(clipped):
    _, log = clipped
    (row,) = _rows(log.diagnose(), "clipping").itertuples()
    assert row.severity == "warning"
    p90 = np.percentile(log.global_norm().to_numpy(np.float64), 90)
    assert f"global_clipnorm={p90:.3g}" in row.advice
    clipped_norm = np.sqrt((log.stat("clipped_norm").astype(np.float64) ** 2).sum(axis=1))
    np.testing.assert_allclose(clipped_norm, 1e-3, rtol=1e-3)  # what the optimizer did
    assert "100% of 16 steps" in row.evidence


@pytest.fixture(scope="module")
def overflow():
    """A loss scale of 2**127 and one batch (steps 1 and 9) of targets scaled by 1e4: the
    scaled gradients of that batch overflow float32, on every backend."""
    x, y = _data()
    y[8:16] *= 1e4

    def build():
        return Sequential([keras.Input((8,)), L.Dense(16, activation="relu"), L.Dense(1)])

    opt = keras.optimizers.LossScaleOptimizer(keras.optimizers.SGD(1e-3), initial_scale=2.0**127)
    return _fit(build, opt, "mse", x, y)


def test_diagnose_reports_loss_scale_skips_without_an_error(overflow):
    _, log = overflow
    skipped = log.skipped_steps
    assert len(skipped) >= 1 and log.stat("nonfinite").loc[skipped].to_numpy().sum() > 0
    findings = log.diagnose()
    assert not len(findings[findings["severity"] == "error"])
    (row,) = _rows(findings, "loss_scale").itertuples()
    assert row.first_step == skipped[0] and row.last_step == skipped[-1]
    assert row.evidence.startswith(f"{len(skipped)} of {len(log)} recorded steps skipped")


# -------------------------------------------------------------- healthy trainings
def _healthy(log):
    findings = log.diagnose()
    assert findings.empty, findings[["severity", "finding", "variables", "evidence"]].to_string()


def test_diagnose_finds_nothing_in_a_small_mlp_trained_with_adam():
    rng = np.random.default_rng(2)
    x, _ = _data()
    y = rng.integers(0, 3, size=(64,))

    def build():
        return Sequential(
            [
                keras.Input((8,)),
                L.Dense(32, activation="relu"),
                L.Dense(32, activation="relu"),
                L.Dense(3),
            ]
        )

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    _healthy(_fit(build, keras.optimizers.Adam(1e-3), loss, x, y, epochs=3)[1])


def test_diagnose_finds_nothing_in_a_cnn_with_batch_normalization():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(64, 16, 16, 3)).astype("float32")
    y = rng.integers(0, 10, size=(64,))

    def build():
        return Sequential(
            [
                keras.Input((16, 16, 3)),
                L.Conv2D(8, 3, padding="same"),
                L.BatchNormalization(),
                L.Activation("relu"),
                L.MaxPooling2D(),
                L.Conv2D(16, 3, padding="same"),
                L.BatchNormalization(),
                L.Activation("relu"),
                L.GlobalAveragePooling2D(),
                L.Dense(10),
            ]
        )

    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    _healthy(_fit(build, keras.optimizers.Adam(1e-3), loss, x, y, batch=16)[1])


def _bench_models():
    spec = importlib.util.spec_from_file_location("bench_models", ROOT / "benchmarks/models.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_diagnose_finds_nothing_in_the_benchmarks_transformer():
    bench = _bench_models()
    x, y = bench.data("transformer", 64)
    loss = keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    _, log = _fit(
        lambda: bench.transformer(Sequential), keras.optimizers.Adam(1e-3), loss, x, y, batch=16
    )
    assert sum("multi_head_attention" in k for k in log.variables) == 4 * 8  # 4 blocks
    _healthy(log)


# ------------------------------------------------- the rules, by hand, on log files
def _log_file(tmp_path, shapes, stats, skipped=(), disconnected=(), name="hand.csv"):
    """Writes a log file by hand: `stats` maps a stat to a (steps, variables) array."""
    keys = list(shapes)
    k = len(next(iter(stats.values())))
    header = {
        "format": "gradwatch-log",
        "version": 1,
        "variables": keys,
        "stats": list(stats),
        "shapes": {key: list(s) for key, s in shapes.items()},
        "bins_per_decade": None,
        "disconnected": list(disconnected),
        "alerts": [],
        "skipped": list(skipped),
        "per_replica": False,
    }
    rows = [
        (step, 0, step, key, stat, "", repr(float(values[step][j])))
        for step in range(k)
        for j, key in enumerate(keys)
        for stat, values in stats.items()
    ]
    lines = [f"# gradwatch-log {json.dumps(header)}", "step,epoch,batch,variable,stat,index,value"]
    lines += [",".join(map(str, r)) for r in rows]
    path = tmp_path / name
    path.write_text("\n".join(lines) + "\n")
    return gradwatch.read_log(path)


SHAPES = {"m/a/kernel": (10, 10), "m/a/bias": (10,), "m/b/kernel": (10, 10), "m/b/bias": (10,)}


def _const(values, k=10):
    return np.tile(np.asarray(values, np.float64), (k, 1))


def _found(log, name, **thresholds):
    return _rows(_not_info(log.diagnose(**thresholds)), name)


def test_vanishing_rms_is_norm_over_sqrt_elements_below_1e_7_on_kernels(tmp_path):
    # RMS of a 100-element kernel = norm / 10; the bias's tiny gradient is left out.
    log = _log_file(
        tmp_path,
        SHAPES,
        {"norm": _const([0.9e-6, 1e-12, 1.1e-6, 1.0]), "zero_frac": _const([0] * 4)},
    )
    (row,) = _found(log, "vanishing").itertuples()
    assert row.severity == "warning" and row.variables == ["m/a/kernel"]
    assert "m/a/kernel 9e-08" in row.evidence
    severe = _log_file(tmp_path, SHAPES, {"norm": _const([0.9e-9, 1, 1, 1])}, name="s.csv")
    assert _found(severe, "vanishing")["severity"].tolist() == ["error", "warning"]  # RMS, ratio
    assert not len(_found(log, "vanishing", vanishing_rms=8e-8))


def test_vanishing_ratio_of_the_first_to_the_last_kernel(tmp_path):
    # First/last = 9e-5 / 1 < 1e-3 and the first's norm 9e-5 < 1e-4 (RMS 9e-6: no RMS rule).
    log = _log_file(tmp_path, SHAPES, {"norm": _const([9e-5, 1, 1, 1])})
    (row,) = _found(log, "vanishing").itertuples()
    assert row.variables == ["m/a/kernel"] and "9e-05 times the last's" in row.evidence
    assert not len(_found(log, "vanishing", vanishing_first_norm=8e-5))


def test_exploding_norm_ratio_and_growth(tmp_path):
    log = _log_file(tmp_path, SHAPES, {"norm": _const([1.1e6, 1, 1, 1])})
    rows = _found(log, "exploding")
    assert rows["severity"].tolist() == ["error", "warning"]  # above 1e6; ratio 1.1e6 > 70
    assert rows["variables"].tolist() == [["m/a/kernel"], ["m/a/kernel"]]
    ratio = _log_file(tmp_path, SHAPES, {"norm": _const([71, 1, 1, 1])}, name="r.csv")
    assert _found(ratio, "exploding")["severity"].tolist() == ["warning"]
    level = _log_file(tmp_path, SHAPES, {"norm": _const([69, 1, 1, 1])}, name="l.csv")
    assert not len(_found(level, "exploding"))
    # The global norm grows 1e4x from the first tenth of the steps to the last.
    grow = np.tile(np.logspace(0, 4, 20)[:, None], (1, 4))
    growth = _log_file(tmp_path, SHAPES, {"norm": grow}, name="g.csv")
    (row,) = _found(growth, "exploding").itertuples()
    early, late = np.median(np.logspace(0, 4, 20)[:2]), np.median(np.logspace(0, 4, 20)[-2:])
    assert f"grew {late / early:.3g} times" in row.evidence
    assert not len(_found(growth, "exploding", exploding_growth=1e5))


def test_dead_needs_most_steps_with_most_elements_zero(tmp_path):
    zero = np.zeros((10, 4))
    zero[:6, 2] = 0.8  # b/kernel: 80% zeros at 6 of 10 steps
    log = _log_file(tmp_path, SHAPES, {"norm": _const([1, 1, 1, 1]), "zero_frac": zero})
    (row,) = _found(log, "dead").itertuples()
    # The layer's zero fraction weights by elements: (100 * 0.8) / 110 = 0.727 >= 0.7.
    assert row.variables == ["m/b"] and row.first_step == 0 and row.last_step == 5
    zero[5, 2] = 0.0  # 5 of 10 steps is not most
    half = _log_file(
        tmp_path, SHAPES, {"norm": _const([1, 1, 1, 1]), "zero_frac": zero}, name="h.csv"
    )
    assert not len(_found(half, "dead"))


def test_update_ratio_rules_judge_kernels_by_their_median(tmp_path):
    ratio = _const([0.011, 5.0, 0.9e-7, 1e-9])  # the biases' ratios are left out
    log = _log_file(tmp_path, SHAPES, {"norm": _const([1, 1, 1, 1]), "update_ratio": ratio})
    assert _found(log, "update_ratio_high")["variables"].tolist() == [["m/a/kernel"]]
    assert _found(log, "update_ratio_low")["variables"].tolist() == [["m/b/kernel"]]
    assert not len(_found(log, "update_ratio_high", update_ratio_high=0.02))


def test_clipping_more_than_half_of_the_steps(tmp_path):
    norm = _const([2.0, 1.0, 2.0, 1.0])
    clipped = norm.copy()
    clipped[:6] /= 2  # 6 of 10 steps clipped
    log = _log_file(tmp_path, SHAPES, {"norm": norm, "clipped_norm": clipped})
    (row,) = _found(log, "clipping").itertuples()
    assert "60% of 10 steps" in row.evidence and "global_clipnorm=3.16" in row.advice
    clipped[5] = norm[5]
    half = _log_file(tmp_path, SHAPES, {"norm": norm, "clipped_norm": clipped}, name="h.csv")
    assert not len(_found(half, "clipping"))


def test_clipping_leaves_out_the_steps_where_no_gradient_was_finite(tmp_path):
    # Steps 0-3: every variable has NaN/Inf elements, so the global norm there is NaN (no
    # norm to sum), not 0. Of the 6 other steps, 4 are clipped: 67% > 50%. Counting the
    # four as steps with a global norm would make it 4 of 10, 40%.
    norm = _const([2.0, 1.0, 2.0, 1.0])
    clipped = norm.copy()
    clipped[4:8] /= 2
    bad = np.zeros((10, 4))
    bad[:4] = 1
    stats = {"norm": norm, "clipped_norm": clipped, "nonfinite": bad}
    log = _log_file(tmp_path, SHAPES, stats)
    (row,) = _found(log, "clipping").itertuples()
    # Global norms: sqrt(4 + 1 + 4 + 1) = 3.16 unclipped, 1.58 clipped at 4 of the 6 steps.
    assert "clipped 67% of 6 steps" in row.evidence
    assert "median global norm 3.16, 1.58 after clipping" in row.evidence
    assert (row.first_step, row.last_step) == (4, 7)


def test_oscillation_below_a_median_cosine_of_minus_one_half(tmp_path):
    # Kernels only: the bias at -0.9 is left out; -0.49 is not below -0.5.
    cos = _const([-0.6, -0.9, -0.49, 0.2])
    log = _log_file(tmp_path, SHAPES, {"norm": _const([1, 1, 1, 1]), "cos_prev": cos})
    (row,) = _found(log, "oscillation").itertuples()
    assert row.variables == ["m/a/kernel"] and "m/a/kernel -0.6" in row.evidence


def test_nonfinite_on_applied_steps_is_an_error_and_on_skipped_steps_is_not(tmp_path):
    bad = np.zeros((10, 4))
    bad[[1, 4], 0] = [3, 5]
    stats = {"norm": _const([1, 1, 1, 1]), "nonfinite": bad}
    log = _log_file(tmp_path, SHAPES, stats)
    (row,) = _found(log, "nonfinite").itertuples()
    assert (row.severity, row.first_step, row.last_step) == ("error", 1, 4)
    assert row.variables == ["m/a/kernel"] and "8 elements in all" in row.evidence
    skipped = _log_file(tmp_path, SHAPES, stats, skipped=[1, 4], name="s.csv")
    findings = skipped.diagnose()
    assert not len(_rows(findings, "nonfinite"))
    (scale,) = _rows(findings, "loss_scale").itertuples()
    # 2 skips after the first applied step (0), among the 9 later steps: 22% > 5%.
    assert scale.severity == "warning" and "2 of the 9 steps" in scale.evidence


def test_a_log_whose_every_gradient_has_nan_still_names_the_stats_to_record(tmp_path):
    stats = {"norm": _const([1, 1, 1, 1]), "nonfinite": _const([1, 1, 1, 1])}
    findings = _log_file(tmp_path, SHAPES, stats).diagnose()
    assert findings["finding"].tolist() == [
        "nonfinite",
        "dead",
        "update_ratio_high",
        "update_ratio_low",
        "clipping",
        "oscillation",
        "epsilon",
        "second_moment",
        "warmup",
    ]
    assert findings["severity"].tolist() == ["error"] + ["info"] * 8


def test_disconnected_and_missing_stats(tmp_path):
    norm = _const([1, 1, np.nan, np.nan])
    log = _log_file(tmp_path, SHAPES, {"norm": norm}, disconnected=["m/b/kernel", "m/b/bias"])
    findings = log.diagnose()
    (row,) = _rows(findings, "disconnected").itertuples()
    assert row.severity == "warning" and row.variables == ["m/b"]
    info = findings[findings["severity"] == "info"]
    text = " ".join(info["evidence"])
    for stat in ("nonfinite", "zero_frac", "update_ratio", "clipped_norm", "cos_prev"):
        assert f"no `{stat}` stat" in text
    assert set(info["finding"]) <= set(FINDINGS)
    assert list(findings.columns) == list(FINDING_COLUMNS)
    assert list(findings["severity"]) == sorted(
        findings["severity"], key=["error", "warning", "info"].index
    )


def test_diagnose_puts_a_later_update_of_a_layer_in_its_own_layer(tmp_path):
    # A variable updated twice in a step has the keys `m/a/kernel` and `m/a/kernel@1`;
    # the second update belongs to the layer `m/a@1`, as in `log.by_layer`.
    shapes = {
        "m/a/kernel": (10, 10),
        "m/a/bias": (10,),
        "m/a/kernel@1": (10, 10),
        "m/a/bias@1": (10,),
        "m/b/kernel": (10, 10),
        "m/b/bias": (10,),
    }
    zero = np.zeros((10, 6))
    zero[:, 2] = 0.8  # m/a/kernel@1: 80% zeros at every step
    stats = {"norm": _const([1, 1, 1, 1, np.nan, np.nan]), "zero_frac": zero}
    log = _log_file(tmp_path, shapes, stats, disconnected=["m/b/kernel", "m/b/bias"])
    layers = list(log.by_layer("norm").columns)
    assert layers == ["m/a", "m/a@1", "m/b"]
    # The layer m/a@1 is 100 + 10 elements: (100 * 0.8) / 110 = 0.727 >= 0.7 at every step;
    # taken together with m/a (220 elements) it would be 80 / 220 = 0.36.
    (dead,) = _found(log, "dead").itertuples()
    assert dead.variables == ["m/a@1"] and "m/a@1 (100% of steps)" in dead.evidence
    (gone,) = _found(log, "disconnected").itertuples()
    assert gone.variables == ["m/b"]
    # The second update of a whole layer that got no gradient is named as that layer.
    norm = _const([1, 1, np.nan, np.nan, 1, 1])
    later = _log_file(
        tmp_path, shapes, {"norm": norm}, disconnected=["m/a/kernel@1", "m/a/bias@1"], name="d.csv"
    )
    (gone,) = _found(later, "disconnected").itertuples()
    assert gone.variables == ["m/a@1"] and set(gone.variables) <= set(layers)
    # A 2-D bias (as MultiHeadAttention's) is no kernel in its later update either.
    two_d = {"m/a/kernel": (10, 10), "m/a/bias": (2, 5), "m/a/kernel@1": (10, 10)}
    two_d["m/a/bias@1"] = (2, 5)
    ratio = _const([1e-3, 5.0, 1e-3, 5.0])
    log = _log_file(
        tmp_path, two_d, {"norm": _const([1, 1, 1, 1]), "update_ratio": ratio}, name="r.csv"
    )
    assert not len(_found(log, "update_ratio_high"))
    assert _found(log, "update_ratio_high", update_ratio_high=1e-4)["variables"].tolist() == [
        ["m/a/kernel", "m/a/kernel@1"]
    ]


def test_diagnose_rejects_unknown_or_bad_thresholds(tmp_path):
    log = _log_file(tmp_path, SHAPES, {"norm": _const([1, 1, 1, 1])})
    with pytest.raises(TypeError, match=r"Unknown threshold `vanish`\. Received: vanish=1"):
        log.diagnose(vanish=1)
    with pytest.raises(ValueError, match=r"`dead_steps` must be between 0 and 1.*dead_steps=2"):
        log.diagnose(dead_steps=2)
    with pytest.raises(TypeError, match=r"`exploding_norm` must be a number"):
        log.diagnose(exploding_norm="big")


# ------------------------------------------------------------- where they show
def _cli(*args):
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    return subprocess.run(
        [sys.executable, "-m", "gradwatch", *map(str, args)],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG,
    )


def test_doctor_exit_codes_json_and_a_streamed_log(deep_linear, clipped, tmp_path):
    _, broken = deep_linear
    _, warned = clipped
    broken.to_parquet(tmp_path / "broken.parquet")
    warned.to_csv(tmp_path / "warned.csv")
    result = _cli("doctor", tmp_path / "broken.parquet")
    assert result.returncode == 1, result.stderr
    assert result.stdout.splitlines()[1].startswith("ERROR")
    result = _cli("doctor", tmp_path / "warned.csv", "--json")
    assert result.returncode == 0, result.stderr
    parsed = pd.DataFrame(json.loads(result.stdout))
    expected = warned.diagnose()
    assert parsed["finding"].tolist() == expected["finding"].tolist()
    assert parsed["variables"].tolist() == expected["variables"].tolist()
    assert parsed["evidence"].tolist() == expected["evidence"].tolist()
    assert parsed["first_step"].tolist() == expected["first_step"].tolist()
    result = _cli("doctor", tmp_path / "missing.csv")
    assert result.returncode == 2 and "gradwatch doctor: error:" in result.stderr
    result = _cli("doctor", tmp_path / "warned.csv", "--threshold", "clipping_steps")
    assert result.returncode == 2 and "Received: --threshold clipping_steps" in result.stderr
    result = _cli("doctor", tmp_path / "warned.csv", "--threshold", "clipping_steps=1")
    assert result.returncode == 0 and "clipping" not in result.stdout

    # A streamed directory: the same findings as the log in memory.
    x, y = _data()
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    model = Sequential([keras.Input((8,)), L.Dense(4), L.Dense(1)])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    watch = gradwatch.GradWatch(path=tmp_path / "run", flush_every=3, on_nonfinite="ignore")
    model.fit(x, y * np.nan, batch_size=16, epochs=2, verbose=0, callbacks=[watch])
    result = _cli("doctor", tmp_path / "run", "--json")
    assert result.returncode == 1, result.stderr
    streamed = pd.DataFrame(json.loads(result.stdout))
    assert streamed["finding"].tolist() == watch.log.diagnose()["finding"].tolist()
    assert streamed["finding"].iloc[0] == "nonfinite"


def test_summary_ends_with_the_count_of_findings(clipped, tmp_path):
    _, log = clipped
    log.to_csv(tmp_path / "grads.csv")
    result = _cli("summary", tmp_path / "grads.csv")
    assert result.returncode == 0, result.stderr
    last = result.stdout.splitlines()[-1]
    assert (
        last
        == f"Findings: 0 errors, 1 warning, 0 info. Details: gradwatch doctor {tmp_path}/grads.csv"
    )


def test_report_opens_with_the_findings(clipped):
    pytest.importorskip("matplotlib")
    from gradwatch.report import render_report

    _, log = clipped
    page = render_report(log)
    assert page.index('id="findings"') < page.index("<dl>") < page.index("<h2>Charts")
    assert "1 warning" in page and "clipping" in page


def test_fit_prints_the_errors_and_warnings_unless_silenced(capsys):
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    model = Sequential([keras.Input((2,)), L.Dense(1, name="d")])
    model.compile(keras.optimizers.SGD(0.01), "mse")
    x = np.ones((8, 2), np.float32)
    y = np.full((8, 1), np.nan, np.float32)
    watch = gradwatch.GradWatch(on_nonfinite="ignore")
    assert watch.verbose == "auto"

    def fit(fit_verbose, verbose):
        watch.verbose = verbose
        capsys.readouterr()
        model.fit(x, y, batch_size=4, verbose=fit_verbose, callbacks=[watch])
        return capsys.readouterr().out

    lines = fit(0, 1).splitlines()
    assert lines[0] == (
        "GradWatch found 1 error: see `watch.log.diagnose()` for the evidence and advice."
    )
    assert lines[1].split()[:4] == ["error", "nonfinite", "steps", "0..1"]
    assert lines[1].split()[4].endswith("/d") and len(lines) == 2
    assert fit(0, "auto") == ""  # "auto" follows fit(verbose=0)
    assert "GradWatch found 1 error" in fit(2, "auto")
    assert "GradWatch" not in fit(2, 0)
    with pytest.raises(ValueError, match=r"`verbose` must be 0.*Received: verbose=2"):
        gradwatch.GradWatch(verbose=2)


# --------------------------------------- the global norm of a step with no finite element
def test_global_norm_leaves_out_a_step_with_no_finite_element_in_the_log_and_the_doctor(
    tmp_path,
):
    # Step 2: every element NaN in every variable (norm NaN, every element counted in
    # `nonfinite`). Step 4: a norm that overflowed float32 (Inf). A global_clipnorm of 1
    # clips steps 0, 1 and 3; step 5 is below it.
    nan, inf = np.nan, np.inf
    norm = np.array([[3, 4], [6, 8], [nan, nan], [5, 12], [inf, 1], [0.3, 0.4]])
    clipped = np.array([[0.6, 0.8], [0.6, 0.8], [nan, nan], [5 / 13, 12 / 13], [inf, 1], norm[5]])
    nonfinite = np.zeros((6, 2))
    nonfinite[2] = [100, 10]
    log = write_log(
        tmp_path / "log.csv",
        {"m/a/kernel": (10, 10), "m/a/bias": (10,)},
        {"norm": norm, "clipped_norm": clipped, "nonfinite": nonfinite},
        alerts=[(2, "m/a/kernel", "nonfinite", 100.0), (2, "m/a/bias", "nonfinite", 10.0)],
    )
    # log.global_norm: sqrt(sum norm**2), NaN where no variable has a norm (not 0, which
    # would read as a vanishing gradient), Inf where a norm is.
    np.testing.assert_allclose(log.global_norm(), [5, 10, nan, 13, inf, 0.5], rtol=1e-6)
    # The doctor judges clipping over the steps with a finite global norm: 0, 1, 3 and 5.
    (row,) = _rows(log.diagnose(), "clipping").itertuples()
    finite = np.array([5, 10, 13, 0.5])
    assert row.first_step == 0 and row.last_step == 3
    assert row.evidence == (
        "The optimizer clipped 75% of 4 steps (more than 50%): median global norm "
        f"{np.median(finite):.3g}, {np.median([1, 1, 1, 0.5]):.3g} after clipping."
    )
    assert f"global_clipnorm={np.percentile(finite, 90):.3g})" in row.advice


# ------------------------------------------ keys of several updates of a variable (`@n`)
def test_diagnose_names_each_update_of_a_layer_as_by_layer_does(tmp_path):
    # A critic updated twice a step: `m/d/kernel@1` and `m/d/bias@1` are the layer
    # `m/d@1`, as `log.by_layer` and the guide name it. That update is dead (90% of its
    # elements zero at every step) and has NaN elements at step 4; the first is healthy.
    shapes = {
        "m/d/kernel": (4, 3),
        "m/d/bias": (3,),
        "m/d/kernel@1": (4, 3),
        "m/d/bias@1": (3,),
        "m/o/kernel": (3, 1),
        "m/o/bias": (1,),
    }
    later = np.array([False, False, True, True, False, False])
    nonfinite = np.zeros((10, 6))
    nonfinite[4, later] = [2, 1]
    log = write_log(
        tmp_path / "log.csv",
        shapes,
        {
            "norm": np.ones((10, 6)),
            "nonfinite": nonfinite,
            "zero_frac": np.tile(np.where(later, 0.9, 0.0), (10, 1)),
        },
        alerts=[(4, "m/d/kernel@1", "nonfinite", 2.0), (4, "m/d/bias@1", "nonfinite", 1.0)],
    )
    assert list(log.by_layer("norm").columns) == ["m/d", "m/d@1", "m/o"]
    findings = log.diagnose()
    (nan,) = _rows(findings, "nonfinite").itertuples()
    assert nan.variables == ["m/d@1"] and nan.first_step == 4 == nan.last_step
    (dead,) = _rows(findings, "dead").itertuples()
    assert dead.variables == ["m/d@1"]
    assert (dead.first_step, dead.last_step) == (0, 9)  # (step 4 is NaN: not judged)


def test_diagnose_judges_each_update_of_an_embedding_table_as_a_table(tmp_path):
    # An embedding table updated twice a step, with the same small gradient each time:
    # a table is not a kernel (docs/diagnose.md), whichever update it is.
    shapes = {
        "m/emb/embeddings": (10, 4),
        "m/emb/embeddings@1": (10, 4),
        "m/o/kernel": (4, 1),
        "m/o/bias": (1,),
    }
    log = write_log(
        tmp_path / "log.csv",
        shapes,
        {"norm": _const([1e-7, 1e-7, 1.0, 1.0]), "zero_frac": _const([0.0] * 4)},
    )
    named = [v for vs in _not_info(log.diagnose())["variables"] for v in vs]
    assert not [v for v in named if "emb" in v]


def _signals(recorded, asked):
    """Signals of a healthy-looking run of three variables over 12 steps, with the stats
    `recorded`; each stat the rules ask for is noted in `asked`."""
    rng = np.random.default_rng(0)
    keys = ["m/d/kernel", "m/d/bias", "m/o/kernel"]
    shapes = {"m/d/kernel": (4, 3), "m/d/bias": (3,), "m/o/kernel": (3, 1)}
    values = {name: rng.uniform(0.1, 1.0, size=(12, 3)) for name in gradwatch.STATS}
    values["nonfinite"] = np.zeros((12, 3))

    def stat(name):
        asked.append(name)
        return values[name] if name in recorded else None

    return Signals(np.arange(12), keys, shapes, stat)


def test_doctor_stats_are_the_stats_the_rules_read():
    # Each rule asks for exactly the stats it declares (READS), beyond what the
    # diagnosis itself reads; DOCTOR_STATS is their union, in catalogue order.
    for rule in RULES:
        asked = []
        diagnosis = Diagnosis(_signals(set(gradwatch.STATS), asked), dict(THRESHOLDS))
        assert set(asked) == set(DIAGNOSIS_READS)
        rule(diagnosis)
        assert set(asked) == {*DIAGNOSIS_READS, *READS[rule]}, rule.__name__
    union = {*DIAGNOSIS_READS, *(name for reads in READS.values() for name in reads)}
    assert set(gradwatch.stats.DOCTOR_STATS) == union
    assert list(gradwatch.stats.DOCTOR_STATS) == [s for s in gradwatch.STATS if s in union]


def _not_checked(rows):
    return {(row["finding"], row["evidence"]) for row in rows if row["severity"] == "info"}


def test_doctor_stats_leave_no_rule_unchecked_and_each_is_needed():
    preset = gradwatch.stats.DOCTOR_STATS
    assert _not_checked(find(_signals(set(preset), []), dict(THRESHOLDS))) == set()
    for name in preset:
        rows = find(_signals(set(preset) - {name}, []), dict(THRESHOLDS))
        unchecked = _not_checked(rows)
        assert unchecked, name
        assert all(f"no `{name}` stat" in evidence for _, evidence in unchecked), name
