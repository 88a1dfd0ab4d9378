"""Histograms, update and weight norms, cos_prev, and the derived views, against references."""

import math

import keras
import numpy as np
import pytest
from models import data, layers, pair
from reference import batches_of, clipped_by_hand, mse, reference_bins, tape_gradients

import gradwatch
from gradwatch.log import GradientLog, store_of
from gradwatch.stats import compute_histograms, histogram_bins

KEYS = ["net/hidden/kernel", "net/hidden/bias", "net/out/kernel", "net/out/bias"]


@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize("bins_per_decade", [1, 4, 7])
def test_histogram_counts_match_reference_binning(bins_per_decade, mode):
    import tensorflow as tf

    rng = np.random.default_rng(bins_per_decade)
    edges = (10.0 ** (-12 + np.arange(16 * bins_per_decade + 1) / bins_per_decade)).astype(
        np.float32
    )
    on_edges = np.concatenate([edges, np.nextafter(edges, np.float32(0)), -edges])
    special = np.array(
        [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-30, -1e-30, 1e9, -1e9, 1e-40, -1e-45, 3e38],
        np.float32,
    )
    tensors = [
        (rng.normal(size=200) * 10.0 ** rng.uniform(-14, 6, size=200)).astype(np.float32),
        on_edges.astype(np.float32),
        special,
        np.zeros((0,), np.float32),
    ]
    run = lambda ts: compute_histograms(ts, bins_per_decade)  # noqa: E731
    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
    # All together (one has NaN: the exact path), and each alone (finite: the fast path).
    batches = [tensors] + [[t] for t in tensors]
    for batch in batches:
        counts = np.asarray(run([tf.constant(t) for t in batch]))
        for row, t in zip(counts, batch, strict=True):
            np.testing.assert_array_equal(row, reference_bins(t, bins_per_decade))
            assert row.sum() == t.size  # every element in exactly one bin


def test_histogram_bins_are_documented_edges():
    lo, hi, sign = histogram_bins(2)
    k = 32
    assert len(lo) == 2 * k + 2
    assert list(sign[[0, k - 1, k, k + 1, 2 * k, 2 * k + 1]]) == [
        "-",
        "-",
        "0",
        "+",
        "+",
        "nonfinite",
    ]
    assert hi[0] == np.inf and lo[k - 1] == 0.0  # most negative bin first
    assert lo[k + 1] == 0.0 and hi[k + 1] == pytest.approx(10**-11.5)
    assert lo[2 * k] == pytest.approx(10**3.5) and hi[2 * k] == np.inf
    assert math.isnan(lo[-1]) and math.isnan(hi[-1])


def test_histogram_of_seed_example_3_by_hand():
    model = gradwatch.Sequential(
        [keras.Input((1,)), keras.layers.Dense(1, kernel_initializer="ones")]
    )
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(histogram=True)
    model.fit(np.array([[2.0]]), np.array([[5.0]]), callbacks=[watch], verbose=0)
    h = watch.log.histogram("dense/kernel", step=0)
    hit = h[h["count"] > 0]
    # |-12| lies in [10**1.0, 10**1.25) with 4 bins per decade, on the negative side.
    assert hit[["sign", "count"]].values.tolist() == [["-", 1]]
    assert hit["lo"].item() == pytest.approx(10.0) and hit["hi"].item() == pytest.approx(10**1.25)
    bias = watch.log.histograms.query("variable == 'sequential/dense/bias'")
    assert bias["lo"].item() == pytest.approx(10**0.75)  # |-6| in [5.62, 10)


def test_histogram_frame_counts_sum_to_element_counts(fitted):
    log = fitted[0].log
    frame = log.histograms
    assert list(frame.columns) == ["step", "variable", "lo", "hi", "sign", "count"]
    sums = frame.groupby(["step", "variable"], observed=True)["count"].sum()
    assert len(sums) == 6 * 4
    for (_, key), total in sums.items():
        assert total == int(np.prod(log.shapes[key]))
    assert (frame["count"] > 0).all()


def test_histogram_lookup_errors(fitted):
    with pytest.raises(KeyError, match=r"Step 99 .* not recorded"):
        fitted[0].log.histogram("out/kernel", 99)
    with pytest.raises(KeyError, match=r"GradWatch\(histogram=True\)"):
        GradientLog().histogram("x", 0)


@pytest.mark.parametrize(("value", "error"), [(0, ValueError), (101, ValueError), ("4", TypeError)])
def test_histogram_argument_is_checked(value, error):
    with pytest.raises(error, match="Received: histogram="):
        gradwatch.GradWatch(histogram=value)


def _fit_with_reference(optimizer, **watch_kwargs):
    x, y = data()
    model, plain = pair()
    weights = []  # the reference loop's weights before each step
    model.compile(optimizer(), "mse", steps_per_execution=2)
    watch = gradwatch.GradWatch(**watch_kwargs)
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)

    ref_opt = optimizer()
    grads = []
    for xb, yb, _ in batches_of(x, y, 8) * 2:
        weights.append([w.numpy().copy() for w in plain.trainable_weights])
        grads.extend(tape_gradients(plain, ref_opt, [(xb, yb, None)], mse))
    weights.append([w.numpy().copy() for w in plain.trainable_weights])
    return watch.log, grads, weights


def test_update_norm_is_lr_times_gradient_norm_with_plain_sgd():
    log, grads, weights = _fit_with_reference(
        lambda: keras.optimizers.SGD(0.1), stats=["norm", *gradwatch.stats.UPDATE_STATS]
    )
    up, w, ratio, norm = (
        log.stat(s) for s in ("update_norm", "weight_norm", "update_ratio", "norm")
    )
    for step, g in enumerate(grads):
        for j, key in enumerate(KEYS):
            assert up.loc[step, key] == pytest.approx(0.1 * np.linalg.norm(g[j]), rel=1e-5)
            assert w.loc[step, key] == pytest.approx(np.linalg.norm(weights[step][j]), rel=1e-5)
            with np.errstate(divide="ignore"):  # zero-initialised biases: ratio +inf
                expected = np.float64(up.loc[step, key]) / np.float64(w.loc[step, key])
            assert ratio.loc[step, key] == pytest.approx(expected, rel=1e-6)
    np.testing.assert_allclose(up.to_numpy(), 0.1 * norm.to_numpy(), rtol=1e-5)


def test_update_norm_is_what_the_optimizer_applied_with_momentum_and_decay():
    make = lambda: keras.optimizers.AdamW(0.01, weight_decay=0.1)  # noqa: E731
    log, _, weights = _fit_with_reference(make, stats=["update_norm"])
    up = log.stat("update_norm")
    for step in range(10):
        for j, key in enumerate(KEYS):
            applied = np.linalg.norm(weights[step + 1][j] - weights[step][j])
            assert up.loc[step, key] == pytest.approx(applied, rel=1e-4, abs=1e-9)


def test_cos_prev_is_one_for_a_constant_gradient():
    model = gradwatch.Sequential([keras.Input((3,)), keras.layers.Dense(2, name="d")])
    model.compile("sgd", loss=lambda y_true, y_pred: y_pred)  # d loss / d kernel = mean x: constant
    watch = gradwatch.GradWatch(stats=["cos_prev"])
    x = np.tile(np.array([[1.0, -2.0, 0.5]], "float32"), (12, 1))
    model.fit(x, np.zeros((12, 2)), batch_size=4, epochs=2, callbacks=[watch], verbose=0)
    cos = watch.log.stat("cos_prev")
    assert cos.loc[0].isna().all()  # no previous step
    np.testing.assert_allclose(cos.loc[1:].to_numpy(), 1.0, rtol=1e-6)


@pytest.mark.parametrize("every", [1, 3])
def test_cos_prev_matches_reference_consecutive_gradients(every):
    log, grads, _ = _fit_with_reference(
        lambda: keras.optimizers.SGD(0.1), stats=["cos_prev"], every=every
    )
    cos = log.stat("cos_prev")
    assert list(cos.index) == list(range(0, 10, every))
    for step in cos.index[1:]:
        for j, key in enumerate(KEYS):
            a, b = grads[step][j].ravel(), grads[step - 1][j].ravel()
            ref = a @ b / (np.linalg.norm(a) * np.linalg.norm(b))
            assert cos.loc[step, key] == pytest.approx(ref, rel=1e-5, abs=1e-6)


def test_global_norm_equals_tape_reference(fitted):
    import tensorflow as tf

    x, y = fitted[2], fitted[3]
    model, plain = pair()
    model.compile(keras.optimizers.Adam(0.01), "mse")
    w2 = gradwatch.GradWatch(stats="norm")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[w2], verbose=0)
    grads = tape_gradients(plain, keras.optimizers.Adam(0.01), batches_of(x, y, 8), mse)
    for step, g in enumerate(grads):
        ref = float(tf.linalg.global_norm([tf.constant(t) for t in g]))
        assert w2.log.global_norm().loc[step] == pytest.approx(ref, rel=1e-5)


def test_by_layer_aggregates_equal_the_layer_as_one_tensor():
    log, grads, _ = _fit_with_reference(
        lambda: keras.optimizers.SGD(0.1), stats=list(gradwatch.stats.GRADIENT_STATS)
    )
    layers = {"net/hidden": [0, 1], "net/out": [2, 3]}
    checks = {
        "norm": np.linalg.norm,
        "mean": np.mean,
        "std": np.std,
        "min": np.min,
        "max": np.max,
        "abs_max": lambda a: np.abs(a).max(),
        "nonfinite": lambda a: float((~np.isfinite(a)).sum()),
        "zero_frac": lambda a: float(np.mean(a == 0)),
    }
    for stat, fn in checks.items():
        table = log.by_layer(stat)
        assert list(table.columns) == list(layers)
        for step, g in enumerate(grads):
            for layer, idx in layers.items():
                joined = np.concatenate([g[i].ravel() for i in idx]).astype(np.float64)
                assert table.loc[step, layer] == pytest.approx(fn(joined), rel=1e-4, abs=1e-6), stat


def test_by_layer_refuses_cos_prev(fitted):
    with pytest.raises(ValueError, match="cannot be aggregated per layer"):
        fitted[0].log.by_layer("cos_prev")


def test_summary_per_variable(fitted):
    log = fitted[0].log
    table = log.summary()
    norm = log.stat("norm")
    assert list(table.index) == KEYS
    assert list(table.columns) == [
        "first_norm",
        "last_norm",
        "median_norm",
        "max_norm",
        "nonfinite",
        "first_nonfinite_step",
    ]
    for key in KEYS:
        assert table.loc[key, "first_norm"] == norm.loc[0, key]
        assert table.loc[key, "last_norm"] == norm.loc[5, key]
        assert table.loc[key, "median_norm"] == pytest.approx(np.median(norm[key]))
        assert table.loc[key, "max_norm"] == norm[key].max()
        assert table.loc[key, "nonfinite"] == 0
        assert table["first_nonfinite_step"].isna().all()


def test_summary_finds_the_first_nonfinite_step():
    log = GradientLog(stats=("norm", "nonfinite"))
    codes = store_of(log).add_variables(["m/a", "m/b"], [(3,), (2,)])
    stats = np.zeros((4, 2, 2), np.float32)
    stats[:, :, 0] = [[1, 2], [3, 4], [5, 6], [7, 8]]
    stats[2, 1, 1] = 2.0  # m/b has 2 non-finite elements at step 12
    stats[3, 1, 1] = 1.0
    store_of(log).append(np.array([10, 11, 12, 13]), np.zeros(4), np.arange(4), codes, stats,
                         np.zeros(0, np.int32), np.zeros((4, 0), np.float32))  # fmt: skip
    table = log.summary()
    assert table.loc["m/b", "nonfinite"] == 3
    assert table.loc["m/b", "first_nonfinite_step"] == 12
    assert pd_isna(table.loc["m/a", "first_nonfinite_step"])
    assert table.loc["m/a", "median_norm"] == 4.0


def pd_isna(v):
    import pandas as pd

    return pd.isna(v)


@pytest.mark.parametrize(
    "clip", [{}, {"clipnorm": 0.3}, {"global_clipnorm": 1.3}, {"clipvalue": 0.5}]
)
def test_clipped_norm_is_the_norm_after_the_optimizers_clipping(clip):
    log, grads, _ = _fit_with_reference(
        lambda: keras.optimizers.SGD(0.1, **clip), stats=["norm", "clipped_norm"]
    )
    clipped, norm = log.stat("clipped_norm"), log.stat("norm")
    expected = np.array([clipped_by_hand(g, **clip) for g in grads])
    np.testing.assert_allclose(clipped[KEYS].to_numpy(), expected, rtol=1e-5)
    # The reference gradients are the unclipped ones, and `norm` stays theirs.
    np.testing.assert_allclose(
        norm[KEYS].to_numpy(), [[np.linalg.norm(x) for x in g] for g in grads], rtol=1e-5
    )
    if clip:  # the bounds chosen clip some steps and not others
        smaller = clipped.to_numpy() < norm.to_numpy() * (1 - 1e-6)
        assert smaller.any() and not smaller.all()
    else:
        np.testing.assert_array_equal(clipped.to_numpy(), norm.to_numpy())


def test_clipped_norm_under_a_loss_scale_is_clipped_after_unscaling():
    x, y = data()
    model, plain = pair()
    make = lambda: keras.optimizers.LossScaleOptimizer(  # noqa: E731
        keras.optimizers.SGD(0.1, clipnorm=0.3), initial_scale=2.0**10
    )
    model.compile(make(), "mse")
    watch = gradwatch.GradWatch(stats=["clipped_norm"])
    model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)
    grads = tape_gradients(plain, keras.optimizers.SGD(0.1, clipnorm=0.3), batches_of(x, y, 8), mse)
    expected = np.array([clipped_by_hand(g, clipnorm=0.3) for g in grads])
    np.testing.assert_allclose(watch.log.stat("clipped_norm")[KEYS].to_numpy(), expected, rtol=1e-4)


class TwoClippedGroups(gradwatch.Sequential):
    """A custom step that applies one optimizer to the hidden layer and another to the
    output layer, and records each group with the optimizer that applies it."""

    def compile(self, opt_hidden, opt_out):
        super().compile(loss="mse")
        self.opt_hidden, self.opt_out = opt_hidden, opt_out

    def train_step(self, data):
        import tensorflow as tf

        x, y = data
        with tf.GradientTape() as tape:
            loss = mse(y, self(x, training=True))
        weights = self.trainable_weights
        grads = tape.gradient(loss, weights)
        for opt, group in ((self.opt_hidden, slice(0, 2)), (self.opt_out, slice(2, 4))):
            self.record_gradients(grads[group], weights[group], optimizer=opt)
            opt.apply_gradients(zip(grads[group], weights[group], strict=True))
        return {"loss": loss}


def test_clipped_norm_with_two_optimizers_clips_each_group_by_its_own_global_norm():
    import tensorflow as tf

    # global_clipnorm scales by the norm over the gradients of that optimizer alone. The
    # bounds are set so that each group is clipped on some steps, and so that a norm
    # taken over both groups (or the other optimizer's bound) gives other numbers.
    bounds = {"hidden": 0.6, "out": 1.0}
    x, y = data()
    model = TwoClippedGroups(layers(regularize=False), name="net")
    plain = keras.Sequential(layers(regularize=False), name="net")
    plain.set_weights(model.get_weights())
    model.compile(*(keras.optimizers.SGD(0.1, global_clipnorm=c) for c in bounds.values()))
    watch = gradwatch.GradWatch(stats=["norm", "clipped_norm"])
    model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)

    # The same two optimizers in a plain tape loop.
    opt_hidden, opt_out = (keras.optimizers.SGD(0.1, global_clipnorm=c) for c in bounds.values())
    grads = []
    for xb, yb, _ in batches_of(x, y, 8):
        with tf.GradientTape() as tape:
            loss = mse(yb, plain(xb, training=True))
        g = tape.gradient(loss, plain.trainable_weights)
        grads.append([t.numpy() for t in g])
        opt_hidden.apply_gradients(zip(g[:2], plain.trainable_weights[:2], strict=True))
        opt_out.apply_gradients(zip(g[2:], plain.trainable_weights[2:], strict=True))

    log = watch.log
    np.testing.assert_array_equal(log.steps, np.arange(len(grads)))
    norm = log.stat("norm")[KEYS].to_numpy()
    np.testing.assert_allclose(norm, [[np.linalg.norm(t) for t in g] for g in grads], rtol=1e-5)
    expected = np.array(
        [
            np.concatenate(
                [
                    clipped_by_hand(g[:2], global_clipnorm=bounds["hidden"]),
                    clipped_by_hand(g[2:], global_clipnorm=bounds["out"]),
                ]
            )
            for g in grads
        ]
    )
    clipped = log.stat("clipped_norm")[KEYS].to_numpy()
    np.testing.assert_allclose(clipped, expected, rtol=1e-5)
    smaller = expected < norm * (1 - 1e-6)
    assert smaller[:, :2].any() and smaller[:, 2:].any() and not smaller.all()
    over_both = np.array(
        [
            np.concatenate(
                [
                    clipped_by_hand(g, global_clipnorm=bounds["hidden"])[:2],
                    clipped_by_hand(g, global_clipnorm=bounds["out"])[2:],
                ]
            )
            for g in grads
        ]
    )
    assert not np.allclose(over_both, expected, rtol=1e-2)
