import re

import keras
import numpy as np
import pytest
from keras import ops
from models import Model, Sequential, data, mixin_only, pair
from reference import (
    BACKEND,
    batches_of,
    clipped_by_hand,
    cosine,
    grads_of,
    mse,
    np_stats,
    reference_bins,
    skip_unjitted_jax_duplicate,
    skip_unless_supported,
    spe,
    tape_gradients,
)

import gradwatch
from gradwatch.stats import GRADIENT_STATS, compute_histograms, histogram_bins

KEYS = ["net/hidden/kernel", "net/hidden/bias", "net/out/kernel", "net/out/bias"]


@pytest.mark.parametrize("spe", [1, 4])
@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.backends
def test_every_step_matches_a_plain_tape_loop(spe, jit):
    skip_unless_supported(spe, jit)
    if spe > 1:
        skip_unjitted_jax_duplicate(jit)
    x, y = data()
    model, plain = pair()
    model.compile(keras.optimizers.Adam(0.05), "mse", steps_per_execution=spe, jit_compile=jit)
    watch = gradwatch.GradWatch(stats=list(GRADIENT_STATS), values="*")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)

    reference = tape_gradients(plain, keras.optimizers.Adam(0.05), batches_of(x, y, 8) * 2, mse)
    log = watch.log
    assert log.variables == KEYS
    np.testing.assert_array_equal(log.steps, np.arange(10))
    wide = {name: log.stat(name) for name in GRADIENT_STATS}
    for step, grads in enumerate(reference):
        for key, g in zip(KEYS, grads, strict=True):
            np.testing.assert_allclose(log.gradient(key, step), g, rtol=1e-5, atol=1e-6)
            ref = np_stats(g)
            for name in GRADIENT_STATS:
                np.testing.assert_allclose(
                    wide[name].loc[step, key], ref[name], rtol=1e-5, atol=1e-6, err_msg=name
                )
    # Weights end where the reference loop ends: the capture did not disturb training.
    for a, b in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.backends
def test_settings_not_recorded_yet_on_this_backend_are_refused_before_training():
    # `per_replica=True` is TensorFlow's (tf.distribute: tests/test_distributed.py).
    if BACKEND == "tensorflow":
        pytest.skip("TensorFlow records per_replica=True (tests/test_distributed.py)")
    model = Sequential([keras.Input((3,)), keras.layers.Dense(2)])
    model.compile("sgd", "mse")
    before = model.get_weights()
    watch = gradwatch.GradWatch(per_replica=True)
    with pytest.raises(
        NotImplementedError, match=f"does not yet record per_replica=True on the {BACKEND} backend"
    ):
        model.fit(np.ones((8, 3)), np.ones((8, 2)), callbacks=[watch], verbose=0)
    assert len(watch.log) == 0
    for a, b in zip(model.get_weights(), before, strict=True):
        np.testing.assert_array_equal(a, b)  # refused before any step ran


@pytest.mark.backends
def test_epoch_and_batch_are_what_keras_reports_with_spe():
    skip_unless_supported(spe=4)
    x, y = data(n=36)  # 5 batches of 8 and one of 4 per epoch
    model, _ = pair()
    model.compile("sgd", "mse", steps_per_execution=4)
    seen = []
    probe = keras.callbacks.LambdaCallback(on_train_batch_end=lambda b, logs: seen.append(b))
    watch = gradwatch.GradWatch(stats="norm")
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=3,
        shuffle=False,
        validation_data=(x[:8], y[:8]),  # evaluation runs no train steps
        callbacks=[watch, probe],
        verbose=0,
    )
    frame = watch.log.frame.drop_duplicates("step")
    np.testing.assert_array_equal(frame["step"], np.arange(15))
    np.testing.assert_array_equal(frame["epoch"], np.repeat([0, 1, 2], 5))
    np.testing.assert_array_equal(frame["batch"], np.tile(np.arange(5), 3))
    # Keras itself reports only the last batch of each execution, unclamped.
    assert seen == [3, 7] * 3


@pytest.mark.backends
def test_step_continues_across_fits_and_epoch_honours_initial_epoch():
    x, y = data(n=16)
    model, _ = pair()
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(stats="norm")
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[watch], verbose=0)
    model.fit(x, y, batch_size=8, epochs=4, initial_epoch=2, callbacks=[watch], verbose=0)
    frame = watch.log.frame.drop_duplicates("step")
    np.testing.assert_array_equal(frame["step"], np.arange(8))
    np.testing.assert_array_equal(frame["epoch"], [0, 0, 1, 1, 2, 2, 3, 3])
    np.testing.assert_array_equal(frame["batch"], [0, 1] * 4)


@mixin_only
@pytest.mark.backends
def test_steps_without_a_watch_still_count():
    x, y = data(n=16)
    model, plain = pair()
    for m in (model, plain):
        m.compile("sgd", "mse", metrics=["mae"])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # steps 0 and 1, unwatched
    watch = gradwatch.GradWatch(stats="norm")
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[watch], verbose=0)
    np.testing.assert_array_equal(watch.log.steps, [2, 3])
    model.fit(x, y, batch_size=8, epochs=1, verbose=0)  # steps 4 and 5: detached again
    np.testing.assert_array_equal(watch.log.steps, [2, 3])
    # The counter (a metric on JAX) stays out of what Keras reports.
    plain.fit(x, y, batch_size=8, epochs=1, verbose=0)
    assert model.metrics_names == plain.metrics_names
    assert len(model.evaluate(x, y, verbose=0)) == len(plain.evaluate(x, y, verbose=0)) == 2


@pytest.mark.parametrize("spe", [1, 3])
@pytest.mark.backends
def test_every_records_only_multiples_and_matches_reference(spe):
    skip_unless_supported(spe)
    x, y = data()
    model, plain = pair()
    model.compile(keras.optimizers.SGD(0.1), "mse", steps_per_execution=spe)
    watch = gradwatch.GradWatch(every=3, values="out/kernel")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    np.testing.assert_array_equal(watch.log.steps, [0, 3, 6, 9])
    reference = tape_gradients(plain, keras.optimizers.SGD(0.1), batches_of(x, y, 8) * 2, mse)
    for step in (0, 3, 6, 9):
        np.testing.assert_allclose(
            watch.log.gradient("out/kernel", step), reference[step][2], rtol=1e-5, atol=1e-6
        )
    with pytest.raises(KeyError, match=r"Step 4 .* not recorded.*from 0 to 9, every 3 steps"):
        watch.log.gradient("out/kernel", 4)


@pytest.mark.backends
def test_variables_selects_stats_rows_and_values_are_independent():
    x, y = data(n=16)
    model, _ = pair()
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(variables="*kernel", stats=("norm", "max"), values="hidden/bias")
    model.fit(x, y, batch_size=8, epochs=1, callbacks=[watch], verbose=0)
    log = watch.log
    assert list(log.frame["variable"].unique()) == ["net/hidden/kernel", "net/out/kernel"]
    assert list(log.frame["stat"].unique()) == ["norm", "max"]
    assert log.variables == ["net/hidden/kernel", "net/hidden/bias", "net/out/kernel"]
    assert log.gradient("hidden/bias", 1).shape == (4,)
    with pytest.raises(KeyError, match=r"was not kept.*values='net/out/kernel'"):
        log.gradient("out/kernel", 0)


@pytest.mark.backends
def test_duplicate_paths_get_numbered_keys():
    class Block(keras.layers.Layer):
        def __init__(self, **kw):
            super().__init__(**kw)
            self.a = keras.layers.Dense(2, name="d")
            self.b = keras.layers.Dense(2, name="d")

        def call(self, x):
            return self.b(self.a(x))

    inputs = keras.Input((3,))
    model = Model(inputs, Block(name="sub")(inputs), name="m")
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(stats="norm", values="d/kernel#1")
    x = np.ones((4, 3), "float32")
    model.fit(x, np.zeros((4, 2), "float32"), batch_size=4, callbacks=[watch], verbose=0)
    assert watch.log.variables == [
        "m/sub/d/kernel",
        "m/sub/d/bias",
        "m/sub/d/kernel#1",
        "m/sub/d/bias#1",
    ]
    assert watch.log.gradient("d/kernel#1", 0).shape == (2, 2)


@pytest.mark.backends
def test_pattern_matching_nothing_is_a_value_error_listing_keys():
    x, y = data(n=8)
    model, plain = pair()
    model.compile("sgd", "mse")
    start = model.get_weights()
    with pytest.raises(
        ValueError, match=r"'conv\*' in `variables` matches no variable.*net/out/bias"
    ):
        model.fit(x, y, callbacks=[gradwatch.GradWatch(variables="conv*")], verbose=0)
    with pytest.raises(ValueError, match=r"'emb' in `values` matches no variable"):
        model.fit(x, y, callbacks=[gradwatch.GradWatch(values="emb")], verbose=0)
    # The model is left detached and trains on: the failed fits stopped before any step,
    # so one plain fit takes it where the same fit takes its plain twin.
    plain.compile("sgd", "mse")
    for m in (model, plain):
        m.fit(x, y, shuffle=False, verbose=0)
    for a, b in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7)
    assert any(not np.array_equal(a, b) for a, b in zip(model.get_weights(), start, strict=True))


@pytest.mark.backends
def test_mixin_listed_after_keras_model_is_a_type_error():
    class Late(keras.Model, gradwatch.GradWatchMixin):
        def __init__(self):
            super().__init__()
            self.d = keras.layers.Dense(1)

        def call(self, x):
            return self.d(x)

    model = Late()
    model.compile("sgd", "mse")
    with pytest.raises(TypeError, match="Put the mixin first"):
        model.fit(np.ones((4, 2)), np.ones((4, 1)), callbacks=[gradwatch.GradWatch()], verbose=0)


@pytest.mark.backends
def test_one_watch_on_two_models_is_an_error():
    x, y = data(n=8)
    a, _ = pair()
    b, _ = pair()
    for m in (a, b):
        m.compile("sgd", "mse")
    watch = gradwatch.GradWatch()
    a.fit(x, y, callbacks=[watch], verbose=0)
    with pytest.raises(ValueError, match="already records another model"):
        b.fit(x, y, callbacks=[watch], verbose=0)
    assert len(watch.log) == 1  # nothing recorded is lost


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (
            {"stats": ["nrm"]},
            ValueError,
            r"Unknown stat 'nrm' in `stats`. Available: .*Received: stats=\['nrm'\]",
        ),
        ({"every": 0}, ValueError, r"`every` must be an integer >= 1. Received: every=0"),
        ({"every": 1.5}, TypeError, r"Received: every=1.5"),
        ({"every": True}, TypeError, r"Received: every=True"),
        ({"variables": 3}, TypeError, r"`variables` must be a glob.*Received: variables=3"),
        ({"values": [None]}, TypeError, r"`values` must be a glob"),
        ({"stats": 7}, TypeError, r"`stats` must be"),
    ],
)
def test_constructor_rejects_bad_arguments(kwargs, error, match):
    with pytest.raises(error, match=match):
        gradwatch.GradWatch(**kwargs)


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.backends
def test_sparse_embedding_gradient_equals_dense_equivalent(jit):
    skip_unless_supported(jit=jit)
    # Row 1 repeats within a batch; rows 2 and 4 are never touched.
    ids = np.array([[1, 1, 3], [0, 1, 3], [3, 3, 3], [1, 0, 0]], dtype="int32")
    y = np.linspace(-1, 1, 4 * 3 * 2).reshape(4, 3, 2).astype("float32")
    model = Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(5, 2, name="emb")])
    model.compile(keras.optimizers.SGD(0.1), "mse", steps_per_execution=spe(2), jit_compile=jit)
    table = model.get_weights()[0].astype(np.float64)
    stats = [*GRADIENT_STATS, "clipped_norm", "cos_prev"]
    watch = gradwatch.GradWatch(stats=stats, values="*", histogram=2)
    model.fit(ids, y, batch_size=2, shuffle=False, callbacks=[watch], verbose=0)
    # Reference: the dense gradient of mean((y - w[ids])**2), by hand, and SGD by hand.
    w = table
    previous = None
    for step, rows in enumerate((slice(0, 2), slice(2, 4))):
        residual = y[rows] - w[ids[rows]]
        dense = np.zeros_like(w)
        np.add.at(dense, ids[rows], -2.0 * residual / residual.size)
        w = w - 0.1 * dense
        log = watch.log
        key = log.key("emb/embeddings")
        np.testing.assert_allclose(log.gradient(key, step), dense, rtol=1e-6)
        for name, value in np_stats(dense).items():
            got = log.stat(name).loc[step, key]
            assert got == pytest.approx(value, rel=1e-5, abs=1e-7), name
        counts = log.histogram(key, step)["count"].to_numpy()
        expected = reference_bins(dense, 2)
        np.testing.assert_array_equal(counts, expected)
        assert log.stat("clipped_norm").loc[step, key] == pytest.approx(np.linalg.norm(dense))
        if previous is not None:
            cos = np.sum(dense * previous) / np.linalg.norm(dense) / np.linalg.norm(previous)
            assert log.stat("cos_prev").loc[step, key] == pytest.approx(cos, rel=1e-5)
        previous = dense


def test_sparse_embedding_gradient_with_nan_rows_has_the_stats_of_the_dense_one():
    # mean((y - w[ids])**2): a NaN target puts NaN in the gradient of the row it looks up.
    # Step 0 touches rows 0, 1, 3 with NaN targets only: every touched row is NaN, and the
    # untouched rows 2 and 4 are finite zeros (docs/reference.md: `norm` over the finite
    # elements is 0 there, NaN only where no element is finite). Step 1 touches rows 2
    # and 4, one NaN target on row 2: row 2 is NaN, row 4 finite.
    ids = np.array([[1, 1, 3], [0, 1, 3], [2, 4, 4], [2, 2, 4]], dtype="int32")
    y = np.linspace(-1, 1, 4 * 3 * 2).reshape(4, 3, 2).astype("float32")
    y[:2] = np.nan
    y[2, 0] = np.nan
    model = Sequential([keras.Input((3,), dtype="int32"), keras.layers.Embedding(5, 2, name="emb")])
    model.compile(keras.optimizers.SGD(0.1), "mse", jit_compile=False)
    w = model.get_weights()[0].astype(np.float64)
    watch = gradwatch.GradWatch(stats=GRADIENT_STATS, on_nonfinite="ignore", verbose=0)
    model.fit(ids, y, batch_size=2, shuffle=False, callbacks=[watch], verbose=0)
    log = watch.log
    key = log.key("emb/embeddings")
    for step, rows in enumerate((slice(0, 2), slice(2, 4))):
        residual = y[rows] - w[ids[rows]]
        dense = np.zeros_like(w)
        np.add.at(dense, ids[rows], -2.0 * residual / residual.size)
        w = w - 0.1 * dense  # (the NaN rows turn NaN; step 1 does not look them up)
        expected = np_stats(dense)
        for name, value in expected.items():
            got = log.stat(name).loc[step, key]
            assert got == pytest.approx(value, rel=1e-5, abs=1e-7, nan_ok=True), (step, name)
    assert log.stat("norm").loc[0, key] == 0.0  # the untouched rows' zeros
    assert log.stat("nonfinite")[key].tolist() == [6.0, 2.0]


@mixin_only
@pytest.mark.backends
def test_refit_with_the_same_watch_reuses_the_traced_step():
    x, y = data(n=16)
    model, _ = pair()
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(stats="norm")
    model.fit(x, y, batch_size=8, callbacks=[watch], verbose=0)
    traced = model.train_function
    model.fit(x, y, batch_size=8, callbacks=[watch], verbose=0)
    assert model.train_function is traced
    model.fit(x, y, batch_size=8, verbose=0)  # no watch: traced anew, without capture
    assert model.train_function is not traced
    model.train_on_batch(x[:8], y[:8])  # counted, not captured
    model.fit(x, y, batch_size=8, callbacks=[watch], verbose=0)
    np.testing.assert_array_equal(watch.log.steps, [0, 1, 2, 3, 7, 8])
    np.testing.assert_array_equal(watch.log.frame["epoch"].unique(), [0])


@pytest.mark.backends
def test_two_watches_in_one_fit_both_record():
    x, y = data(n=16)
    model, _ = pair()
    model.compile("sgd", "mse")
    a = gradwatch.GradWatch(stats="norm", variables="*kernel")
    b = gradwatch.GradWatch(stats="max", every=2)
    model.fit(x, y, batch_size=8, epochs=2, callbacks=[a, b], verbose=0)
    np.testing.assert_array_equal(a.log.steps, [0, 1, 2, 3])
    np.testing.assert_array_equal(b.log.steps, [0, 2])
    assert a.log.variables == ["net/hidden/kernel", "net/out/kernel"]


@pytest.mark.backends
def test_update_stats_of_an_sgd_step_match_the_weights_by_hand():
    # With momentum the applied update is not lr * gradient after the first step: the
    # stats must come from the weights themselves.
    make = lambda: keras.optimizers.SGD(0.1, momentum=0.5)  # noqa: E731
    x, y = data(n=24)
    model, plain = pair(regularize=False)
    model.compile(make(), "mse")
    watch = gradwatch.GradWatch(stats=["weight_norm", "update_norm", "update_ratio"])
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    # Reference: a plain tape loop over the same batches, the weights read around each step.
    optimizer = make()
    weights = [[np.asarray(w, np.float64) for w in plain.get_weights()]]
    for batch in batches_of(x, y, 8):
        tape_gradients(plain, optimizer, [batch], mse)
        weights.append([np.asarray(w, np.float64) for w in plain.get_weights()])
    log = watch.log
    np.testing.assert_array_equal(log.steps, [0, 1, 2])
    up, w, ratio = (log.stat(s) for s in ("update_norm", "weight_norm", "update_ratio"))
    for step in range(3):
        for j, key in enumerate(KEYS):
            before, after = weights[step][j], weights[step + 1][j]
            assert w.loc[step, key] == pytest.approx(np.linalg.norm(before), rel=1e-5), key
            applied = np.linalg.norm(after - before)
            assert up.loc[step, key] == pytest.approx(applied, rel=1e-4), (step, key)
            if np.linalg.norm(before) == 0:  # zero-initialised biases at step 0
                assert ratio.loc[step, key] == np.inf
            else:
                expected = applied / np.linalg.norm(before)
                assert ratio.loc[step, key] == pytest.approx(expected, rel=1e-4), (step, key)
    assert (ratio.loc[0, ["net/hidden/bias", "net/out/bias"]] == np.inf).all()


class WithSpare(gradwatch.GradWatchMixin, keras.Model):
    """A model with a layer that never touches the loss, and one seen through
    `stop_gradient` alone: the loss depends on neither's weights' gradient."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.used = keras.layers.Dense(2, name="used")
        self.spare = keras.layers.Dense(2, name="spare")
        self.held = keras.layers.Dense(2, name="held")

    def build(self, input_shape):
        for layer in (self.used, self.spare, self.held):
            layer.build(input_shape)

    def call(self, x):
        return self.used(x) + ops.stop_gradient(self.held(x))


@pytest.mark.backends
def test_disconnected_variables_are_nan_rows_listed_once(tmp_path):
    model = WithSpare(name="m")
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(values="*")
    x, y = data(n=16, features=3)
    model.build(x.shape)
    _, ref = grads_of(lambda: mse(y[:8], model(x[:8])), model.trainable_weights)
    with pytest.warns(UserWarning) as caught:  # TensorFlow's optimizer warns too
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    ours = [w for w in caught if "have no gradient" in str(w.message)]
    assert len(ours) == 1
    unused = ["m/spare/kernel", "m/spare/bias", "m/held/kernel", "m/held/bias"]
    assert str(unused) in str(ours[0].message)
    log = watch.log
    assert log.disconnected == unused
    norms = log.stat("norm")
    assert norms[unused].isna().all().all()
    assert norms[["m/used/kernel", "m/used/bias"]].notna().all().all()
    assert np.isnan(log.gradient("spare/kernel", 3)).all()
    assert np.isnan(log.gradient("held/bias", 0)).all()
    # The connected ones: the backend's own gradient at the start weights.
    for key, g in zip(log.variables[:2], ref[:2], strict=True):
        np.testing.assert_allclose(log.gradient(key, 0), g, rtol=1e-5, atol=1e-6)
    log.to_parquet(tmp_path / "g.parquet")
    assert gradwatch.read_log(tmp_path / "g.parquet").disconnected == log.disconnected


@pytest.mark.backends
def test_histogram_bins_edges_zeros_nonfinite_and_extremes_exactly():
    # Compiled where the backend compiles the step (jax.jit on JAX; TensorFlow's
    # counter is always XLA-compiled); eager on PyTorch.
    run = compute_histograms
    if BACKEND == "jax":
        import jax

        run = jax.jit(compute_histograms, static_argnums=1)
    rng = np.random.default_rng(0)
    for bins_per_decade in (1, 4, 7):
        lo, _, _ = histogram_bins(bins_per_decade)
        edges = np.unique(lo[np.isfinite(lo) & (lo > 0)]).astype(np.float32)
        tensors = [
            (rng.normal(size=(6, 40)) * 10.0 ** rng.uniform(-14, 6, size=(6, 40))).astype(
                "float32"
            ),
            np.concatenate([edges, np.nextafter(edges, np.float32(0)), -edges]),
            np.array(
                [0.0, -0.0, np.nan, np.inf, -np.inf, 1e-30, -1e-30, 1e9, -3e38, 1e-40, -1e-45],
                np.float32,
            ),
        ]
        counts = ops.convert_to_numpy(
            run([ops.convert_to_tensor(t) for t in tensors], bins_per_decade)
        )
        for row, t in zip(counts, tensors, strict=True):
            np.testing.assert_array_equal(row, reference_bins(t, bins_per_decade))


@pytest.mark.parametrize("clip", [{"clipnorm": 0.7}, {"global_clipnorm": 2.0}, {"clipvalue": 0.5}])
@pytest.mark.backends
def test_histogram_clipped_norm_and_cos_prev_match_a_plain_gradient_loop(clip):
    x, y = data(n=32)
    model, plain = pair()
    optimizer = keras.optimizers.SGD(0.1, **clip)
    if "clipnorm" in clip:  # clipped after unscaling
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0**10)
    model.compile(optimizer, "mse", steps_per_execution=spe(2))
    watch = gradwatch.GradWatch(stats=["norm", "clipped_norm", "cos_prev"], histogram=True)
    model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)
    reference = tape_gradients(plain, keras.optimizers.SGD(0.1, **clip), batches_of(x, y, 8), mse)
    log = watch.log
    np.testing.assert_array_equal(log.steps, np.arange(4))
    expected = np.array([clipped_by_hand(grads, **clip) for grads in reference])
    clipped = log.stat("clipped_norm")[KEYS].to_numpy()
    np.testing.assert_allclose(clipped, expected, rtol=1e-5)
    smaller = clipped < log.stat("norm")[KEYS].to_numpy() * (1 - 1e-6)
    assert smaller.any() and not smaller.all()  # the bound clips some and not others
    cos = log.stat("cos_prev")[KEYS]
    assert cos.loc[0].isna().all()  # no previous step
    for step in range(1, 4):
        for j, key in enumerate(KEYS):
            ref = cosine(reference[step][j], reference[step - 1][j])
            assert cos.loc[step, key] == pytest.approx(ref, rel=1e-5, abs=1e-6)
    for step, grads in enumerate(reference):
        for key, g in zip(KEYS, grads, strict=True):
            counts = log.histogram(key, step)["count"].to_numpy()
            np.testing.assert_array_equal(counts, reference_bins(g, 4), err_msg=key)


@pytest.mark.backends
def test_cos_prev_with_every_compares_with_the_step_before_each_recorded_one():
    x, y = data(n=48)
    model, plain = pair()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    watch = gradwatch.GradWatch(stats=["cos_prev"], every=2)
    model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)
    reference = tape_gradients(plain, keras.optimizers.SGD(0.1), batches_of(x, y, 8), mse)
    cos = watch.log.stat("cos_prev")[KEYS]
    assert list(cos.index) == [0, 2, 4]
    assert cos.loc[0].isna().all()
    for step in (2, 4):
        for j, key in enumerate(KEYS):
            ref = cosine(reference[step][j], reference[step - 1][j])
            assert cos.loc[step, key] == pytest.approx(ref, rel=1e-5, abs=1e-6)


@pytest.mark.backends
def test_streaming_drains_mid_epoch_and_keeps_every_step(tmp_path):
    # flush_every=2 drains the ring buffer twice an epoch, between executions: on JAX
    # the step's state is then off the model's variables (purged) and the buffer's
    # arrays are donated to the next execution, so each drain must attach and copy.
    x, y = data(n=48)
    model, plain = pair()
    model.compile(keras.optimizers.SGD(0.05), "mse", steps_per_execution=spe(2))
    watch = gradwatch.GradWatch(stats=["norm"], values="*", path=tmp_path / "run", flush_every=2)
    model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)
    reference = tape_gradients(plain, keras.optimizers.SGD(0.05), batches_of(x, y, 8), mse)
    log = gradwatch.read_log(tmp_path / "run")
    assert len(list((tmp_path / "run").rglob("part-*.parquet"))) == 3
    np.testing.assert_array_equal(log.steps, np.arange(6))
    for step, grads in enumerate(reference):
        for key, g in zip(KEYS, grads, strict=True):
            np.testing.assert_allclose(log.gradient(key, step), g, rtol=1e-5, atol=1e-6)
            assert log.stat("norm").loc[step, key] == pytest.approx(np.linalg.norm(g), rel=1e-5)


@pytest.mark.backends
def test_a_pattern_typo_on_a_model_built_in_its_first_step_leaves_it_trainable():
    x, y = data(n=16)
    # No Input: the model builds its variables inside the first traced step.
    layers = [keras.layers.Dense(4, activation="tanh", name="hidden"), keras.layers.Dense(2)]
    model = Sequential(layers, name="net")
    model.compile(keras.optimizers.SGD(0.1), "mse")
    typo = gradwatch.GradWatch(variables="hiden*")
    with pytest.raises(ValueError, match=r"'hiden\*' in `variables` matches no variable"):
        model.fit(x, y, batch_size=8, callbacks=[typo], verbose=0)
    # The model is whole: it trains without a watch, and records with one, exactly.
    history = model.fit(x, y, batch_size=8, shuffle=False, verbose=0)
    assert np.isfinite(history.history["loss"]).all()
    plain = keras.Sequential(
        [keras.Input((5,)), keras.layers.Dense(4, activation="tanh"), keras.layers.Dense(2)]
    )
    plain.set_weights(model.get_weights())
    watch = gradwatch.GradWatch(variables="hidden*", stats="norm")
    model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)
    reference = tape_gradients(plain, keras.optimizers.SGD(0.1), batches_of(x, y, 8), mse)
    assert watch.log.variables == ["net/hidden/kernel", "net/hidden/bias"]
    norms = watch.log.stat("norm")
    for row, grads in zip(norms.itertuples(index=False), reference, strict=True):
        expected = [np.linalg.norm(ops.convert_to_numpy(g)) for g in grads[:2]]
        np.testing.assert_allclose(list(row), expected, rtol=1e-5)


# Keras' own warning, where its trainer gives one (TensorFlow's).
@pytest.mark.filterwarnings("ignore:The model does not have any trainable weights")
@pytest.mark.backends
def test_a_model_without_trainable_weights_warns_and_trains_on():
    x, y = data(n=16)
    model, _ = pair()
    model.trainable = False
    model.compile(keras.optimizers.SGD(0.1), "mse")
    watch = gradwatch.GradWatch()
    with pytest.warns(UserWarning, match=r"nothing to record: the model 'net' does not have any"):
        history = model.fit(x, y, batch_size=8, epochs=2, callbacks=[watch], verbose=0)
    # No gradients, but each step's loss: two batches an epoch, whose mean Keras reports.
    assert len(history.history["loss"]) == 2 and watch.log.variables == []
    assert list(watch.log.steps) == [0, 1, 2, 3]
    per_epoch = watch.log.scalars["loss"].to_numpy().reshape(2, 2).mean(axis=1)
    np.testing.assert_allclose(per_epoch, history.history["loss"], rtol=1e-6)
    # Unfrozen, the same watch records it from there.
    model.trainable = True
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=8, callbacks=[watch], verbose=0)
    assert watch.log.variables == KEYS and list(watch.log.steps) == [0, 1, 2, 3, 4, 5]
    norm = watch.log.stat("norm")
    assert list(norm.index) == [4, 5] and norm.notna().all().all()


@pytest.mark.backends
def test_variables_keep_model_order_when_the_trainable_set_grows():
    x, y = data(n=16)
    inputs = keras.Input((5,))
    base = Sequential([keras.Input((5,)), keras.layers.Dense(4, name="hidden")], name="base")
    model = Model(inputs, keras.layers.Dense(2, name="out")(base(inputs)), name="net")
    base.trainable = False  # transfer learning: train the head first, then fine-tune
    model.compile(keras.optimizers.SGD(0.1), "mse")
    watch = gradwatch.GradWatch(stats="norm")
    model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)
    base.trainable = True
    model.compile(keras.optimizers.SGD(0.1), "mse")
    model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)
    order = ["net/base/hidden/kernel", "net/base/hidden/bias", "net/out/kernel", "net/out/bias"]
    assert len(model.trainable_weights) == 4
    assert watch.log.variables == order
    norms = watch.log.stat("norm")
    assert list(norms.columns) == order
    assert norms.iloc[:2, :2].isna().all().all() and norms.notna().iloc[2:].all().all()
    assert list(watch.log.frame["variable"].cat.categories) == order


def test_kept_tensors_and_histograms_stay_with_their_variable_when_the_trainable_set_grows():
    # The head's variables join the log first; unfrozen, the base's come before them in
    # model order, so every recorded block is renumbered. A linear model, by hand.
    x, y = data(n=16)
    inputs = keras.Input((5,))
    base = Sequential([keras.Input((5,)), keras.layers.Dense(4, name="hidden")], name="base")
    head = keras.layers.Dense(2, name="out")
    model = Model(inputs, head(base(inputs)), name="net")
    hk, hb = (w.numpy().astype(np.float64) for w in base.layers[0].weights)
    ok, ob = (w.numpy().astype(np.float64) for w in head.weights)
    watch = gradwatch.GradWatch(stats="norm", values="*", histogram=True)
    expected = []  # per step: {key: gradient}
    for trainable in (False, True):
        base.trainable = trainable
        model.compile(keras.optimizers.SGD(0.1), "mse")
        model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)
        for rows in (slice(0, 8), slice(8, 16)):
            h = x[rows] @ hk + hb
            d_out = 2.0 * (h @ ok + ob - y[rows]) / y[rows].size
            d_h = d_out @ ok.T
            grads = {"out/kernel": h.T @ d_out, "out/bias": d_out.sum(0)}
            ok, ob = ok - 0.1 * grads["out/kernel"], ob - 0.1 * grads["out/bias"]
            if trainable:
                grads |= {"hidden/kernel": x[rows].T @ d_h, "hidden/bias": d_h.sum(0)}
                hk, hb = hk - 0.1 * grads["hidden/kernel"], hb - 0.1 * grads["hidden/bias"]
            expected.append(grads)
    log = watch.log
    assert log.variables == [
        "net/base/hidden/kernel",
        "net/base/hidden/bias",
        "net/out/kernel",
        "net/out/bias",
    ]
    assert len(log.steps) == 4
    for step, grads in zip(log.steps, expected, strict=True):
        for key, g in grads.items():
            np.testing.assert_allclose(log.gradient(key, step), g, rtol=1e-5, atol=1e-7)
            counts = log.histogram(key, step)["count"].to_numpy()
            np.testing.assert_array_equal(counts, reference_bins(g, 4), err_msg=f"{key} {step}")


def test_a_ring_buffer_of_two_executions_is_drained_before_it_overflows(monkeypatch):
    from gradwatch._capture import plan as _plan

    # One slot asked for: the buffer gets its least capacity, two executions, so a
    # drain one execution late would overwrite steps not yet copied out.
    monkeypatch.setattr(_plan, "SLOTS", 1)
    x, y = data(n=48)
    model, plain = pair()
    model.compile(keras.optimizers.SGD(0.1), "mse", steps_per_execution=spe(3))
    watch = gradwatch.GradWatch(stats="norm", values="out/kernel")
    model.fit(x, y, batch_size=4, shuffle=False, callbacks=[watch], verbose=0)
    reference = tape_gradients(plain, keras.optimizers.SGD(0.1), batches_of(x, y, 4), mse)
    log = watch.log
    np.testing.assert_array_equal(log.steps, np.arange(12))
    norms = log.stat("norm")
    for step, grads in enumerate(reference):
        np.testing.assert_allclose(log.gradient("out/kernel", step), grads[2], rtol=1e-5, atol=1e-7)
        expected = [np.linalg.norm(g) for g in grads]
        np.testing.assert_allclose(norms.loc[step].to_numpy(), expected, rtol=1e-5)


@pytest.mark.backends
def test_stats_presets_record_what_the_doctor_reads_and_the_norm_alone():
    # "lean": the norm alone, equal to the plain tape loop's gradient norm at every step.
    x, y = data(n=24)
    model, plain = pair()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    lean = gradwatch.GradWatch(stats="lean")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[lean], verbose=0)
    assert lean.stats == ("norm",)
    assert list(lean.log.frame["stat"].unique()) == ["norm"]
    reference = tape_gradients(plain, keras.optimizers.SGD(0.1), batches_of(x, y, 8), mse)
    norm = lean.log.stat("norm")
    for step, grads in enumerate(reference):
        for key, g in zip(lean.log.variables, grads, strict=True):
            np.testing.assert_allclose(norm.loc[step, key], np.linalg.norm(g), rtol=1e-5)
    # "doctor": every stat a rule reads, so that no rule says it was not checked (each
    # stat a rule lacks is a finding of its own, naming the stat: see the lean log's).
    doctor_model, _ = pair()
    doctor_model.compile(keras.optimizers.SGD(0.1, clipnorm=1.0), "mse")
    doctor = gradwatch.GradWatch(stats="doctor")
    doctor_model.fit(x, y, batch_size=8, epochs=1, callbacks=[doctor], verbose=0)
    unchecked = lambda log: [  # noqa: E731
        e for e in log.diagnose()["evidence"] if "the log has no" in e
    ]
    assert unchecked(lean.log), "the lean log lacks stats that rules read"
    assert unchecked(doctor.log) == []
    assert set(doctor.stats) == {
        s for e in unchecked(lean.log) for s in re.findall("`(\\w+)` stat", e)
    } | {"norm"}
    assert tuple(doctor.log.stat_names) == doctor.stats


def test_stats_preset_names_are_no_stat_names_and_a_typo_lists_them():
    assert not set(gradwatch.stats.PRESETS) & set(gradwatch.STATS)
    with pytest.raises(
        ValueError, match=r"Unknown stat 'doktor'.*a preset by name: 'doctor' or 'lean'"
    ):
        gradwatch.GradWatch(stats="doktor")
