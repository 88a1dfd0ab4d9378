"""The gradient noise scale (`log.noise_scale`): B_simple against k-diffusion's update, a
linear regression whose gradient noise is known in closed form, each source (gradient
accumulation, tf.distribute, the batch's halves) against norms computed by hand from a
plain gradient loop, the files, and the doctor's finding."""

import os
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from components import HANG
from keras import ops
from models import Sequential, data, layers, pair
from reference import BACKEND, batches_of, grads_of, mse, no_grad, spe

import gradwatch
from gradwatch._forensics.halves import halves_sq_norms
from gradwatch._forensics.replay import Batch
from gradwatch._logdata.noise import NOISE_BETA, NOISE_COLUMNS, noise_scale
from gradwatch._ui.text import short_number
from gradwatch.log import store_of

HERE = Path(__file__).resolve().parent


# ------------------------------------------------------------------ the math
class KDiffusionGNS:
    """k-diffusion's `GradientNoiseScale` (k_diffusion/gns.py), transcribed: the reference."""

    def __init__(self, beta, eps=1e-8):
        self.beta, self.eps = beta, eps
        self.ema_sq_norm = self.ema_var = 0.0

    def update(self, sq_norm_small_batch, sq_norm_large_batch, n_small_batch, n_large_batch):
        est_sq_norm = (
            n_large_batch * sq_norm_large_batch - n_small_batch * sq_norm_small_batch
        ) / (n_large_batch - n_small_batch)
        est_var = (sq_norm_small_batch - sq_norm_large_batch) / (
            1 / n_small_batch - 1 / n_large_batch
        )
        self.ema_sq_norm = self.beta * self.ema_sq_norm + (1 - self.beta) * est_sq_norm
        self.ema_var = self.beta * self.ema_var + (1 - self.beta) * est_var
        return max(self.ema_var, self.eps) / max(self.ema_sq_norm, self.eps)


@pytest.mark.parametrize("beta", [NOISE_BETA, 0.9])
def test_noise_scale_is_k_diffusions_update_row_by_row(beta):
    rng = np.random.default_rng(0)
    k = 50
    small = rng.integers(1, 9, size=k)
    big = small * rng.integers(2, 5, size=k)
    g_big_sq = rng.uniform(0.5, 2, size=k)
    g_small_sq = g_big_sq + rng.uniform(-0.2, 3, size=k)  # some rows give a negative g_sq
    raw = np.stack([small, big, g_small_sq, g_big_sq], axis=1)
    frame = noise_scale(np.arange(k) * 3, raw, beta=beta)
    reference = KDiffusionGNS(beta)
    expected = [reference.update(gs, gb, b, B) for b, B, gs, gb in raw]
    assert list(frame.columns) == list(NOISE_COLUMNS)
    assert (frame["g_sq"] < 0).any()  # the floor and the signs are exercised
    np.testing.assert_allclose(frame["b_simple"], expected, rtol=1e-12)
    np.testing.assert_array_equal(frame["step"], np.arange(k) * 3)
    np.testing.assert_array_equal(frame["small_batch"], small)
    np.testing.assert_allclose(frame["g_sq"], (big * g_big_sq - small * g_small_sq) / (big - small))
    np.testing.assert_allclose(frame["s"], (g_small_sq - g_big_sq) / (1 / small - 1 / big))


def test_noise_scale_rows_without_a_finite_estimate_leave_the_averages_alone():
    raw = np.array(
        [
            [2, 4, np.nan, 1.0],  # NaN gradients: before any finite row
            [2, 4, 3.0, 2.0],  # g_sq 1, s 4
            [4, 4, 3.0, 2.0],  # small not below big: no estimate
            [2, 4, np.inf, 2.0],
            [2, 4, 9.0, 6.0],  # g_sq 3, s 12
        ]
    )
    frame = noise_scale(np.arange(5), raw, beta=0.5)
    assert np.isnan(frame["b_simple"][0]) and np.isnan(frame["g_sq"][2])
    assert frame["b_simple"][1] == frame["b_simple"][2] == frame["b_simple"][3] == 4.0
    # 0.5 * 2 + 0.5 * 12 = 7 over 0.5 * 0.5 + 0.5 * 3 = 1.75: the middle rows did not count.
    assert frame["b_simple"][4] == 7 / 1.75


# ------------------------------------------------------- the closed form
D, SIGMA2 = 4, 1.0
W_STAR = np.array([0.5, -1.0, 0.25, 2.0])
DELTA = np.array([1.0, 0.0, 0.0, 0.0])  # the fixed weights are W_STAR + DELTA


def true_noise_scale():
    """tr(Sigma) / |G|^2 of y = x.w* + e, x ~ N(0, I_D), e ~ N(0, SIGMA2), with the
    per-example loss (x.w - y)^2 at w = w* + delta: the gradient is 2 (x.delta - e) x, so
    G = 2 delta and, with Gaussian fourth moments, E[g g^T] = 4 ((|delta|^2 + SIGMA2) I +
    2 delta delta^T), Sigma = 4 ((|delta|^2 + SIGMA2) I + delta delta^T)."""
    d2 = float(DELTA @ DELTA)
    return (D * (d2 + SIGMA2) + d2) / d2


def regression_data(n, seed):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D)).astype("float32")
    y = (x @ W_STAR + rng.normal(scale=np.sqrt(SIGMA2), size=n))[:, None].astype("float32")
    return x, y


def regression_model(optimizer):
    model = Sequential([keras.Input((D,)), keras.layers.Dense(1, use_bias=False)], name="lin")
    model.set_weights([(W_STAR + DELTA)[:, None].astype("float32")])
    model.compile(optimizer, "mse", steps_per_execution=spe(16))
    return model


def assert_near_the_truth(frame):
    """B_simple's last value against the truth, within 4 standard errors: the moving
    averages weigh row i by beta**(k-1-i), and the ratio's error is, to first order (the
    delta method), that weighted mean of each row's (s - B g_sq) / EMA(g_sq)."""
    s, g = frame["s"].to_numpy(), frame["g_sq"].to_numpy()
    w = NOISE_BETA ** np.arange(len(s))[::-1]
    mean_s, mean_g = (w * s).sum() / w.sum(), (w * g).sum() / w.sum()
    b = mean_s / mean_g
    np.testing.assert_allclose(frame["b_simple"].iloc[-1], b, rtol=1e-9)
    influence = (s - b * g) / mean_g
    se = np.sqrt((w**2).sum()) / w.sum() * influence.std(ddof=1)
    truth = true_noise_scale()
    assert se < 0.1 * truth, se  # enough rows that a factor of 2 anywhere would show
    assert abs(b - truth) < 4 * se, (b, truth, se)


def test_accumulation_noise_scale_recovers_a_linear_regressions_closed_form():
    keras.utils.set_random_seed(0)
    x, y = regression_data(400 * 32, seed=1)  # 400 updates of 4 micro-batches of 8
    model = regression_model(keras.optimizers.SGD(0.0, gradient_accumulation_steps=4))
    # 1600 micro-batches of 8: their heavy-tailed norms pass 6 sigma now and then.
    watch = gradwatch.GradWatch(stats=["norm"], on_spike="ignore")
    model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)
    frame = watch.log.noise_scale
    assert len(frame) == 400
    assert (frame["small_batch"] == 8).all() and (frame["big_batch"] == 32).all()
    assert_near_the_truth(frame)


def test_halves_noise_scale_recovers_a_linear_regressions_closed_form():
    keras.utils.set_random_seed(0)
    x, y = regression_data(400 * 32, seed=2)
    model = regression_model(keras.optimizers.SGD(0.0))
    # In `fit`: each step's batch, replayed on the host at the weights before its update.
    watch = gradwatch.GradWatch(stats=["norm"], noise_scale_every=1, on_spike="ignore")
    model.fit(x, y, batch_size=32, shuffle=False, callbacks=[watch], verbose=0)
    frame = watch.log.noise_scale
    np.testing.assert_array_equal(frame["step"], np.arange(400))
    assert (frame["small_batch"] == 16).all() and (frame["big_batch"] == 32).all()
    assert_near_the_truth(frame)
    # Each row is the halves' function over that step's batch (the weights never move).
    rows = [
        halves_sq_norms(model, Batch(xb, yb, None, len(xb)), model.trainable_variables)
        for xb, yb, _ in batches_of(x[: 32 * 5], y[: 32 * 5], 32)
    ]
    np.testing.assert_allclose(
        frame[["g_small_sq", "g_big_sq"]][:5], np.asarray(rows)[:, 2:], rtol=1e-6
    )


# ------------------------------------------------------- each source by hand
def sq_norm(grads, watched):
    return sum(float(np.sum(np.square(grads[i], dtype=np.float64))) for i in watched)


def numpy_grads(loss_fn, variables):
    _, grads = grads_of(loss_fn, variables)
    return [np.asarray(ops.convert_to_numpy(g), np.float64) for g in grads]


@pytest.mark.backends
def test_accumulation_noise_scale_is_the_micro_batches_against_their_mean():
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(11)
    x, y = data(n=24)  # 6 micro-steps an epoch: the window of steps 4-7 spans two epochs
    model, _ = pair()
    reference, _ = pair()
    reference.set_weights(model.get_weights())
    model.compile(
        keras.optimizers.SGD(0.1, gradient_accumulation_steps=4), "mse", steps_per_execution=spe(2)
    )
    watch = gradwatch.GradWatch(stats=["norm"], variables="net/hidden/*")
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    assert watch.log.variables == ["net/hidden/kernel", "net/hidden/bias"]

    variables = reference.trainable_weights
    watched = [0, 1]  # the hidden layer's kernel and bias
    expected, micro = [], []
    for step, (xb, yb, _) in enumerate(batches_of(x, y, 4) * 2):

        def loss_of(xb=xb, yb=yb):
            loss = mse(yb, reference(xb, training=True))
            return loss + sum(reference.losses)

        micro.append(numpy_grads(loss_of, variables))
        if (step + 1) % 4:
            continue
        mean = [sum(m[i] for m in micro) / 4 for i in range(len(variables))]
        small_sq = np.mean([sq_norm(m, watched) for m in micro])
        expected.append((step, 4, 16, small_sq, sq_norm(mean, watched)))
        with no_grad():
            for v, g in zip(variables, mean, strict=True):
                v.assign((np.asarray(ops.convert_to_numpy(v)) - 0.1 * g).astype("float32"))
        micro = []
    frame = watch.log.noise_scale
    expected = pd.DataFrame(expected, columns=["step", "small_batch", "big_batch", "gs", "gb"])
    np.testing.assert_array_equal(frame["step"], [3, 7, 11])
    np.testing.assert_array_equal(frame[["step", "small_batch", "big_batch"]], expected.iloc[:, :3])
    np.testing.assert_allclose(frame["g_small_sq"], expected["gs"], rtol=1e-5)
    np.testing.assert_allclose(frame["g_big_sq"], expected["gb"], rtol=1e-5)


@pytest.mark.backends
def test_halves_sq_norms_are_a_tape_of_each_half_at_the_weights_given():
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(4)
    x, y = data(n=7)  # odd: halves of 3 rows; the last row is in the whole batch only
    model, reference = pair()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    rng = np.random.default_rng(9)
    moved = [w + rng.normal(scale=0.1, size=w.shape).astype("float32") for w in model.get_weights()]
    weights = {id(v): w for v, w in zip(model.trainable_variables, moved, strict=True)}
    reference.set_weights(moved)
    before = [np.array(w) for w in model.get_weights()]
    watched = model.trainable_variables[2:]  # the output layer's kernel and bias

    got = halves_sq_norms(model, Batch(x, y, None, 7), watched, weights)

    for a, b in zip(before, model.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)  # nothing of the model changed

    def norm_of(rows):
        def loss_of():
            return mse(y[rows], reference(x[rows], training=True)) + sum(reference.losses)

        return sq_norm(numpy_grads(loss_of, reference.trainable_weights), [2, 3])

    first, second, whole = norm_of(slice(0, 3)), norm_of(slice(3, 6)), norm_of(slice(0, 7))
    assert got[:2] == (3, 7)
    np.testing.assert_allclose(got[2:], [(first + second) / 2, whole], rtol=1e-5)
    # At the model's own weights (weights=None) the norms differ.
    assert not np.isclose(halves_sq_norms(model, Batch(x, y, None, 7), watched)[3], whole)


@pytest.mark.backends
def test_halves_sq_norms_of_one_row_is_none_and_a_custom_step_is_refused():
    model, _ = pair()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    x, y = data(n=1)
    assert halves_sq_norms(model, Batch(x, y, None, 1), model.trainable_variables) is None
    other, _ = pair()
    with pytest.raises(ValueError, match="trainable variables of"):
        halves_sq_norms(model, Batch(x, y, None, 1), other.trainable_variables)

    class Custom(keras.Sequential):
        def train_step(self, data):
            return super().train_step(data)

    custom = Custom(layers())
    custom.compile(keras.optimizers.SGD(0.1), "mse")
    with pytest.raises(ValueError, match="its own `train_step`"):
        halves_sq_norms(custom, Batch(x, y, None, 1), custom.trainable_variables)


@pytest.mark.skipif(BACKEND != "tensorflow", reason="tf.distribute is TensorFlow's")
def test_mirrored_noise_scale_is_each_replicas_half_against_the_global_batch(tmp_path):
    env = {**os.environ, "PYTHONPATH": str(HERE.parent), "TF_CPP_MIN_LOG_LEVEL": "3"}
    done = subprocess.run(
        [sys.executable, str(HERE / "distributed_run.py"), "noise", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    with np.load(tmp_path / "noise_weights.npz") as saved:
        start = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    reference = keras.Sequential(layers(regularize=True))
    reference.set_weights(start)  # the learning rate is 0: every step is at these weights
    variables = reference.trainable_weights
    x, y = data(n=29)
    expected = []
    for step, (xb, yb, _) in enumerate(batches_of(x, y, 8)[:3]):  # step 3 splits 3 + 2

        def half(rows, xb=xb, yb=yb):
            return numpy_grads(
                lambda: mse(yb[rows], reference(xb[rows])) + sum(reference.losses), variables
            )

        g0, g1 = half(slice(0, 4)), half(slice(4, 8))
        glob = [(a + b) / 2 for a, b in zip(g0, g1, strict=True)]
        everything = range(len(variables))
        small_sq = (sq_norm(g0, everything) + sq_norm(g1, everything)) / 2
        expected.append((step, 4, 8, small_sq, sq_norm(glob, everything)))
    expected = np.asarray(expected)
    for log in (
        gradwatch.read_log(tmp_path / "noise.csv"),
        gradwatch.read_log(tmp_path / "noise_log"),
    ):
        frame = log.noise_scale
        np.testing.assert_array_equal(log.steps, [0, 1, 2, 3])
        np.testing.assert_array_equal(frame[["step", "small_batch", "big_batch"]], expected[:, :3])
        np.testing.assert_allclose(frame[["g_small_sq", "g_big_sq"]], expected[:, 3:], rtol=1e-5)


# ------------------------------------------------------------------ the files
def accumulating_fit(tmp_path):
    keras.utils.set_random_seed(2)
    x, y = data(n=24)
    model, _ = pair()
    model.compile(keras.optimizers.SGD(0.1, gradient_accumulation_steps=2), "mse")
    memory = gradwatch.GradWatch(stats=["norm"])
    streamed = gradwatch.GradWatch(stats=["norm"], path=tmp_path / "stream", flush_every=4)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[memory, streamed], verbose=0)
    return memory.log, tmp_path / "stream"


def test_noise_scale_round_trips_through_csv_parquet_and_a_streamed_path(tmp_path):
    log, stream = accumulating_fit(tmp_path)
    frame = log.noise_scale
    np.testing.assert_array_equal(frame["step"], np.arange(1, 12, 2))
    assert list(log.scalars.columns) == [
        "step",
        "epoch",
        "batch",
        "loss",
        "learning_rate",
        "applied",
        "global_norm",
        "spike",
    ]
    streamed = gradwatch.read_log(stream)
    assert len(list(stream.rglob("part-*.parquet"))) > 1
    pd.testing.assert_frame_equal(streamed.noise_scale, frame)

    log.to_csv(tmp_path / "before.csv")
    # Rows from the host (the halves): a later row for a step replaces the earlier one.
    store = store_of(log)
    store.add_noise_rows([3, 4], [0, 0], [3, 4], [[2, 4, 7.0, 5.0], [2, 4, 6.0, 3.0]])
    both = log.noise_scale
    np.testing.assert_array_equal(both["step"], [1, 3, 4, 5, 7, 9, 11])
    assert both.set_index("step").loc[3, "g_small_sq"] == 7.0
    for name, write in (("log.csv", log.to_csv), ("log.parquet", log.to_parquet)):
        write(tmp_path / name)
        back = gradwatch.read_log(tmp_path / name)
        pd.testing.assert_frame_equal(back.noise_scale, both)
        assert back == log
    assert gradwatch.read_log(tmp_path / "before.csv") != log  # `==` compares the noise scale


# ------------------------------------------------------------------ the doctor
@pytest.mark.parametrize(
    ("trace", "regime"),
    [(320.0, "small for this gradient noise"), (32.0, "near B_simple"), (3.2, "large for")],
)
def test_diagnose_compares_the_batch_with_b_simple(trace, regime):
    keras.utils.set_random_seed(1)
    x, y = data(n=16)
    model, _ = pair()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    watch = gradwatch.GradWatch(stats=["norm"])
    model.fit(x, y, batch_size=4, shuffle=False, callbacks=[watch], verbose=0)
    log = watch.log
    assert "noise_scale" not in log.diagnose()["finding"].tolist()  # no estimate, no finding
    # Halves of 16 of a batch of 32, with |G|^2 = 1 and tr(Sigma) = trace at every step.
    g_small_sq, g_big_sq = 1 + trace / 16, 1 + trace / 32
    store_of(log).add_noise_rows([1, 3], [0, 0], [1, 3], [[16, 32, g_small_sq, g_big_sq]] * 2)
    b_simple = log.noise_scale["b_simple"].iloc[-1]
    np.testing.assert_allclose(b_simple, trace, rtol=1e-5)
    findings = log.diagnose()
    row = findings[findings["finding"] == "noise_scale"].iloc[0]
    assert row["severity"] == "info" and row["first_step"] == row["last_step"] == 3
    assert f"is {short_number(b_simple)} samples at step 3" in row["evidence"]
    assert f"{short_number(1 + b_simple / 32)}x the fewest possible steps" in row["evidence"]
    assert f"{short_number(1 + 32 / b_simple)}x the fewest possible samples" in row["evidence"]
    assert regime in row["advice"]
