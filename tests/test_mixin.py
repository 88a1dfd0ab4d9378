import keras
import numpy as np
import pytest
from keras import ops
from models import data, layers, pair
from reference import (
    BACKEND,
    batches_of,
    grads_of,
    mse,
    no_grad,
    skip_on_jax,
    skip_unjitted_jax_duplicate,
    spe,
    tape_gradients,
)

import gradwatch

# Run again under JAX and PyTorch (tests/test_backends.py).
pytestmark = pytest.mark.backends


def _fit_both(watched, plain, callbacks, spe=3, jit=False, **opt):
    x, y = data(n=45)
    sw = np.linspace(0.5, 2.0, len(x)).astype("float32")
    histories = []
    for model, cbs in ((watched, callbacks), (plain, [])):
        model.compile(
            keras.optimizers.SGD(0.1, momentum=0.9, **opt),
            "mse",
            metrics=["mae"],
            steps_per_execution=spe,
            jit_compile=jit,
        )
        h = model.fit(
            x, y, sample_weight=sw, batch_size=8, epochs=3, shuffle=False, callbacks=cbs, verbose=0
        )
        histories.append(h.history)
    return histories


@pytest.mark.parametrize("jit", [False, True])
def test_mixin_with_watch_is_bitwise_neutral_to_training(jit):
    skip_unjitted_jax_duplicate(jit)
    if jit and BACKEND == "torch":
        pytest.skip("torch jit_compile is tested in test_backends.py (compiling is slow)")
    watched, plain = pair(regularize=True)
    watch = gradwatch.GradWatch(stats=list(gradwatch.STATS), values="*", histogram=True)
    # A second watch records every other step, with the every-step checks on.
    sparse = gradwatch.GradWatch(stats="norm", every=2, max_norm=1e9, on_threshold="stop")
    ha, hb = _fit_both(watched, plain, [watch, sparse], spe=spe(3), jit=jit, global_clipnorm=0.05)
    assert ha == hb  # losses and metrics, exactly
    for a, b in zip(watched.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    assert len(watch.log) == 18
    np.testing.assert_array_equal(sparse.log.steps, np.arange(0, 18, 2))


def test_mixin_without_watch_trains_as_usual():
    watched, plain = pair(regularize=True)
    ha, hb = _fit_both(watched, plain, [], spe=spe(3), clipnorm=0.1)
    assert ha == hb
    for a, b in zip(watched.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


def test_recorded_gradient_is_pre_clip_and_includes_regularizer_and_add_loss():
    class AddLoss(keras.layers.Layer):
        def call(self, x):
            self.add_loss(0.5 * ops.sum(ops.square(x)))
            return x

    def build(cls):
        return cls(
            [
                keras.Input((5,)),
                keras.layers.Dense(4, kernel_regularizer=keras.regularizers.L2(0.1), name="hidden"),
                AddLoss(),
                keras.layers.Dense(2, name="out"),
            ],
            name="net",
        )

    model = build(gradwatch.Sequential)
    plain = build(keras.Sequential)
    plain.set_weights(model.get_weights())
    model.compile(keras.optimizers.SGD(0.01, clipvalue=1e-4), "mse")
    x, y = data(n=8)
    watch = gradwatch.GradWatch(values="*")
    model.fit(x, y, batch_size=8, callbacks=[watch], verbose=0)
    (ref,) = tape_gradients(plain, keras.optimizers.SGD(0.01), batches_of(x, y, 8), mse)
    got = watch.log.gradient("hidden/kernel", 0)
    np.testing.assert_allclose(got, ref[0], rtol=1e-5)
    assert np.abs(got).max() > 1e-3  # far above the clip value: recorded before clipping


def _mixed_precision_run(policy):
    """A fit under `policy`, and the float32 tape reference from the same start weights."""
    x, y = data(n=16)
    keras.mixed_precision.set_global_policy(policy)
    try:
        model = gradwatch.Sequential(layers(regularize=False), name="net")
        model.compile(keras.optimizers.SGD(0.01), "mse")
    finally:
        keras.mixed_precision.set_global_policy("float32")
    reference_model = keras.Sequential(layers(regularize=False), name="net")
    reference_model.set_weights(model.get_weights())
    watch = gradwatch.GradWatch(values="*")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    reference = tape_gradients(
        reference_model, keras.optimizers.SGD(0.01), batches_of(x, y, 8), mse
    )
    return model, watch, reference


def test_mixed_precision_records_unscaled_gradients():
    model, watch, reference = _mixed_precision_run("mixed_float16")
    assert isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    for step, grads in enumerate(reference):
        for key, g in zip(watch.log.variables, grads, strict=True):
            # float16 activations: agree with the float32 run to about 3 digits,
            # where a forgotten loss scale would be off by 2**15.
            np.testing.assert_allclose(watch.log.gradient(key, step), g, rtol=2e-2, atol=2e-3)


class TwoOptimizers(gradwatch.GradWatchMixin, keras.Model):
    """A custom step with two tapes and two optimizers, as in a GAN."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.a = keras.layers.Dense(3, activation="tanh", name="a")
        self.b = keras.layers.Dense(1, name="b")
        self.record = True
        self.twice = False

    def call(self, x):
        return self.b(self.a(x))

    def compile(self, opt_a, opt_b):
        super().compile()
        self.opt_a, self.opt_b = opt_a, opt_b

    def train_step(self, data):
        x, y = data
        # The variables are read after the loss: the first call builds the layers.
        loss_a, ga = grads_of(
            lambda: ops.mean(ops.square(y - self(x))), lambda: self.a.trainable_weights
        )
        loss_b, gb = grads_of(
            lambda: ops.mean(ops.square(self(x))), lambda: self.b.trainable_weights
        )
        if self.record:
            self.record_gradients(ga, self.a.trainable_weights)
            self.record_gradients(gb, self.b.trainable_weights)
        if self.twice:
            self.record_gradients([None], self.a.trainable_weights[:1])
        with no_grad():
            self.opt_a.apply_gradients(zip(ga, self.a.trainable_weights, strict=True))
            self.opt_b.apply_gradients(zip(gb, self.b.trainable_weights, strict=True))
        return {"loss_a": loss_a, "loss_b": loss_b}


def test_custom_train_step_feeds_the_log_through_record_gradients():
    skip_on_jax("two optimizers: a JAX step's state holds the compiled optimizer's alone")
    x, y = data(n=24, features=2, outputs=1)
    model = TwoOptimizers(name="gan")
    model(x[:1])
    start = [ops.convert_to_numpy(w).astype(np.float64) for w in model.trainable_weights]
    model.compile(keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.05))
    watch = gradwatch.GradWatch(values="*")
    model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)

    # The two losses' gradients, derived by hand, in float64 NumPy.
    a, b = start[:2], start[2:]
    for step in range(3):
        xb, yb = x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8]
        h = np.tanh(xb @ a[0] + a[1])
        out = h @ b[0] + b[1]
        d_out = -2.0 * (yb - out) / out.size  # d mean((y - out)**2) / d out
        d_pre = (d_out @ b[0].T) * (1.0 - h**2)
        ga = [xb.T @ d_pre, d_pre.sum(axis=0)]
        d_out = 2.0 * out / out.size  # d mean(out**2) / d out
        gb = [h.T @ d_out, d_out.sum(axis=0)]
        for key, g in zip(watch.log.variables, [*ga, *gb], strict=True):
            np.testing.assert_allclose(watch.log.gradient(key, step), g, rtol=1e-5, atol=1e-6)
        a = [v - 0.1 * g for v, g in zip(a, ga, strict=True)]
        b = [v - 0.05 * g for v, g in zip(b, gb, strict=True)]
    assert watch.log.variables == ["gan/a/kernel", "gan/a/bias", "gan/b/kernel", "gan/b/bias"]


class StatelessStep(gradwatch.GradWatchMixin, keras.Sequential):
    """A user's stateless JAX `train_step(state, data)`, as Keras' guide to customizing
    `fit` with JAX writes one: its own loss, scaled by the optimizer's state."""

    record = True
    twice = False

    def train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_vars, metrics_vars = state
        x, y = data

        def loss_fn(tv, ntv):
            pred, ntv = self.stateless_call(tv, ntv, x, training=True)
            loss = ops.mean(ops.square(y - pred))
            mapping = list(zip(self.optimizer.variables, optimizer_vars, strict=True))
            with keras.StatelessScope(state_mapping=mapping):
                return self.optimizer.scale_loss(loss), (loss, ntv)

        (_, (loss, non_trainable)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
            trainable, non_trainable
        )
        if self.record:
            self.record_gradients(grads, self.trainable_variables, optimizer=self.optimizer)
        if self.twice:
            self.record_gradients(grads[:1], self.trainable_variables[:1])
        trainable, optimizer_vars = self.optimizer.stateless_apply(optimizer_vars, grads, trainable)
        return {"loss": loss}, (trainable, non_trainable, optimizer_vars, metrics_vars)


class _Seen(keras.callbacks.Callback):
    """The weights (float64) and the loss scale before the first step and after each."""

    def on_train_begin(self, logs=None):
        self.weights = [[w.astype(np.float64) for w in self.model.get_weights()]]

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append([w.astype(np.float64) for w in self.model.get_weights()])


def test_custom_stateless_jax_train_step_feeds_the_log_with_state_read_in_the_step():
    if BACKEND != "jax":
        pytest.skip("a stateless train_step(state, data) is JAX's")
    x, y = data(n=48, features=2, outputs=1)
    y = 4 * y
    model = StatelessStep(
        [keras.Input((2,)), keras.layers.Dense(3, activation="tanh"), keras.layers.Dense(1)],
        name="net",
    )
    # A first scale of 2**127 overflows the scaled loss: the optimizer skips those
    # steps and halves the scale, so the scale and the weights change while it runs.
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.1), initial_scale=2.0**127
    )
    model.compile(optimizer, "mse")
    watch = gradwatch.GradWatch(values="*", stats=["norm", "weight_norm", "update_norm"])
    seen = _Seen()
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch, seen], verbose=0)
    log = watch.log
    np.testing.assert_array_equal(log.steps, np.arange(12))
    moved = [
        not all(np.array_equal(a, b) for a, b in zip(w0, w1, strict=True))
        for w0, w1 in zip(seen.weights, seen.weights[1:], strict=False)
    ]
    skipped = np.flatnonzero(np.logical_not(moved))
    assert 1 <= len(skipped) < 12
    np.testing.assert_array_equal(log.skipped_steps, skipped)
    # Applied steps: the gradient of mean((y - out)**2), by hand in float64 NumPy at
    # the weights the step started from (not scaled, whatever the scale was then).
    for step in np.flatnonzero(moved):
        k1, b1, k2, b2 = seen.weights[step]
        i = 8 * (step % 6)
        xb, yb = x[i : i + 8], y[i : i + 8]
        h = np.tanh(xb @ k1 + b1)
        d_out = -2.0 * (yb - (h @ k2 + b2)) / len(xb)
        d_pre = (d_out @ k2.T) * (1.0 - h**2)
        grads = [xb.T @ d_pre, d_pre.sum(axis=0), h.T @ d_out, d_out.sum(axis=0)]
        after = seen.weights[step + 1]
        for key, g, w, w1 in zip(log.variables, grads, seen.weights[step], after, strict=True):
            np.testing.assert_allclose(log.gradient(key, step), g, rtol=1e-4, atol=1e-6)
            assert log.stat("weight_norm").loc[step, key] == pytest.approx(
                np.linalg.norm(w), rel=1e-5
            )
            assert log.stat("update_norm").loc[step, key] == pytest.approx(
                np.linalg.norm(w1 - w), rel=1e-3
            )


def _custom_model(**flags):
    """A compiled model with a custom train_step of the backend's form."""
    if BACKEND == "jax":
        model = StatelessStep([keras.Input((2,)), keras.layers.Dense(1)])
        model.compile(keras.optimizers.SGD(0.1), "mse")
    else:
        model = TwoOptimizers()
        model.compile(keras.optimizers.SGD(0.1), keras.optimizers.SGD(0.1))
    for name, value in flags.items():
        setattr(model, name, value)
    return model


def test_custom_train_step_that_records_nothing_warns():
    x, y = data(n=8, features=2, outputs=1)
    model = _custom_model(record=False)
    with pytest.warns(UserWarning, match=r"recorded no gradients.*record_gradients"):
        model.fit(x, y, callbacks=[gradwatch.GradWatch()], verbose=0)


def test_record_gradients_outside_train_step_is_an_error():
    model, _ = pair()
    with pytest.raises(RuntimeError, match="inside `train_step`"):
        model.record_gradients([None], model.trainable_weights[:1])


def test_record_gradients_twice_for_one_variable_records_its_next_update():
    x, y = data(n=8, features=2, outputs=1)
    model = _custom_model(twice=True)
    watch = gradwatch.GradWatch(values="*")
    if BACKEND == "jax":  # the same gradient again; the log's layout is in the step's state
        with pytest.warns(UserWarning, match="more than once"):
            model.fit(x, y, callbacks=[watch], verbose=0)
        model.fit(x, y, callbacks=[watch], verbose=0)  # a later fit has both updates
        log, first = watch.log, model.trainable_variables[0].path
        step = int(log.stat("norm").index[-1])
        np.testing.assert_array_equal(log.gradient(f"{first}@1", step), log.gradient(first, step))
        assert not np.isnan(log.gradient(first, step)).any()
        return
    with pytest.warns(UserWarning, match=r"kernel@1'\] have no gradient"):  # recorded as None
        model.fit(x, y, callbacks=[watch], verbose=0)
    log = watch.log
    (second,) = log.disconnected
    first = second.removesuffix("@1")
    assert second.endswith("/a/kernel@1") and first in log.variables
    assert log.variables.index(second) == log.variables.index(first) + 1
    assert log.stat("norm")[first].notna().all() and log.stat("norm")[second].isna().all()


@keras.saving.register_keras_serializable(package="tests")
class Net(gradwatch.GradWatchMixin, keras.Model):
    def __init__(self, units=2, **kwargs):
        super().__init__(**kwargs)
        self.units = units
        self.d = keras.layers.Dense(units, name="d")

    def call(self, x):
        return self.d(x)

    def get_config(self):
        return {**super().get_config(), "units": self.units}


def _functional():
    inputs = keras.Input((5,))
    return gradwatch.Model(inputs, keras.layers.Dense(2, name="d")(inputs), name="fn")


@pytest.mark.parametrize(
    "make",
    [lambda: gradwatch.Sequential(layers(), name="net"), _functional, lambda: Net(name="sub")],
    ids=["sequential", "functional", "subclassed"],
)
def test_mixin_models_save_load_and_keep_training(make, tmp_path):
    x, y = data(n=16)
    model = make()
    model.compile("adam", "mse")
    watch = gradwatch.GradWatch()
    model.fit(x, y, batch_size=8, callbacks=[watch], verbose=0)
    path = tmp_path / "model.keras"
    model.save(path)
    loaded = keras.saving.load_model(path)
    assert type(loaded) is type(model)
    np.testing.assert_array_equal(loaded.predict(x, verbose=0), model.predict(x, verbose=0))
    again = gradwatch.GradWatch(stats="norm")
    loaded.fit(x, y, batch_size=8, callbacks=[again], verbose=0)
    assert len(again.log) == 2
    # Weights files hold no gradwatch state: they load into a plain model.
    model.save_weights(tmp_path / "w.weights.h5")
    if isinstance(model, gradwatch.Sequential):
        plain = keras.Sequential(layers(), name="net")
        plain.load_weights(tmp_path / "w.weights.h5")
        for a, b in zip(plain.get_weights(), model.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)


def test_exception_inside_fit_keeps_what_was_recorded():
    class Boom(keras.callbacks.Callback):
        def on_train_batch_end(self, batch, logs=None):
            if batch == 2:
                raise RuntimeError("boom")

    x, y = data(n=40)
    model, _ = pair()
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(stats="norm")
    with pytest.raises(RuntimeError, match="boom"):
        model.fit(x, y, batch_size=8, callbacks=[watch, Boom()], verbose=0)
    np.testing.assert_array_equal(watch.log.steps, [0, 1, 2])
    model.fit(x, y, batch_size=8, verbose=0)  # detached: trains on without capture
    np.testing.assert_array_equal(watch.log.steps, [0, 1, 2])


def test_mixed_bfloat16_records_gradients_close_to_float32():
    model, watch, reference = _mixed_precision_run("mixed_bfloat16")
    assert not isinstance(model.optimizer, keras.optimizers.LossScaleOptimizer)
    for step, grads in enumerate(reference):
        for key, g in zip(watch.log.variables, grads, strict=True):
            # bfloat16 keeps 8 bits of mantissa (about 0.4% per rounding): agree to a few
            # percent of the gradient's scale.
            got = watch.log.gradient(key, step)
            np.testing.assert_allclose(got, g, rtol=5e-2, atol=2e-2 * np.abs(g).max())


def test_reaches_loss_walks_the_jaxpr_back_from_the_loss():
    if BACKEND != "jax":
        pytest.skip("the jaxpr walk is JAX's")
    import jax
    import jax.numpy as jnp

    from gradwatch._backend.jax import _reaches_loss

    def loss(a, b, c, d, e, flag):
        inner = jax.jit(lambda u: u * 2.0)(a)  # through a higher-order primitive
        held = jax.lax.stop_gradient(b) * a  # b only through stop_gradient
        picked = jax.lax.cond(flag > 0, lambda: c, lambda: d)  # d: branch not taken
        return jnp.sum(inner) + jnp.sum(held) + jnp.sum(picked), e  # e: auxiliary only

    args = (*(jnp.full((2,), 1.5) for _ in range(5)), jnp.ones(()))
    grads = jax.grad(lambda *a: loss(*a)[0], argnums=(0, 1, 2, 3, 4))(*args)
    nonzero = [bool(jnp.any(g != 0)) for g in grads]
    assert nonzero == [True, False, True, False, False]  # JAX's own gradients
    # The walk agrees, except that it keeps the whole cond: d counts as used.
    assert _reaches_loss(loss, args, 5) == [True, False, True, True, False]
