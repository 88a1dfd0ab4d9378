"""What a custom `train_step` records: some variables only, clipping by the optimizer that
applies the gradients, and several updates of one variable in one step (a critic loop).

Each recorded step is checked against a plain gradient loop (tf.GradientTape,
torch.autograd) over the same batches from the same weights, or against NumPy written
out by hand.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from keras import ops
from models import data
from reference import BACKEND, cosine, grads_of, mse, no_grad

import gradwatch

# Run again under JAX and PyTorch (tests/test_backends.py).
pytestmark = pytest.mark.backends


def _skip_stateful_steps_on_jax():
    if BACKEND == "jax":
        pytest.skip("a stateful custom train_step does not run on JAX")


class HeadOnly(keras.Model):
    """Fine-tunes the head alone: the step applies the gradients of `out` only."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.hidden = keras.layers.Dense(3, activation="tanh", name="hidden")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        head = self.out.trainable_weights
        loss, grads = grads_of(lambda: mse(y, self(x, training=True)), head)
        with no_grad():
            self.optimizer.apply(grads, head)
        return {"loss": loss}


def test_variables_a_custom_step_does_not_record_are_nan_not_disconnected():
    _skip_stateful_steps_on_jax()
    x, y = data(n=16, features=2, outputs=1)
    model = HeadOnly(name="net")
    model(x[:1])
    k1, b1, k2, b2 = (w.astype(np.float64) for w in model.get_weights())
    model.compile(keras.optimizers.SGD(0.1))
    watch = gradwatch.GradWatch(values="*")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    assert not [w for w in caught if issubclass(w.category, UserWarning)]  # nothing is wrong
    log = watch.log
    assert log.disconnected == []
    assert log.variables == [
        "net/hidden/kernel",
        "net/hidden/bias",
        "net/out/kernel",
        "net/out/bias",
    ]
    norms = log.stat("norm")
    assert norms[["net/hidden/kernel", "net/hidden/bias"]].isna().all().all()
    assert np.isnan(log.gradient("hidden/kernel", 1)).all()
    for step in range(2):
        xb, yb = x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8]
        h = np.tanh(xb @ k1 + b1)
        d_out = -2.0 * (yb - (h @ k2 + b2)) / len(xb)
        grads = [h.T @ d_out, d_out.sum(axis=0)]
        for key, g in zip(["out/kernel", "out/bias"], grads, strict=True):
            np.testing.assert_allclose(log.gradient(key, step), g, rtol=1e-5, atol=1e-7)
            assert norms.loc[step, f"net/{key}"] == pytest.approx(np.linalg.norm(g), rel=1e-5)
        k2, b2 = k2 - 0.1 * grads[0], b2 - 0.1 * grads[1]


class RecordsItself(keras.Model):
    """A custom step that records its gradients without `optimizer=`, then applies them
    with its optimizers: the model's own, or a GAN's two (`two=True`)."""

    def __init__(self, two=False, **kwargs):
        super().__init__(**kwargs)
        self.two = two
        self.hidden = keras.layers.Dense(3, activation="tanh", name="hidden")
        self.out = keras.layers.Dense(1, name="out")

    def call(self, x):
        return self.out(self.hidden(x))

    def train_step(self, data):
        x, y = data
        variables = self.trainable_variables
        loss, grads = grads_of(lambda: mse(y, self(x, training=True)), variables)
        gradwatch.record_gradients(self, grads, variables)
        with no_grad():
            if self.two:  # the hidden layer by one optimizer, the head by another
                self.first.apply(grads[:2], variables[:2])
                self.second.apply(grads[2:], variables[2:])
            else:
                self.optimizer.apply(grads, variables)
        return {"loss": loss}


def _clip_reference(model, x, y, clipnorm, steps):
    """The tape gradients of `steps` steps of SGD(0.1, clipnorm) from `model`'s weights,
    on a twin: `(gradients, clipped gradients)` per step, in NumPy."""
    twin = RecordsItself(name=model.name)
    twin(x[:1])
    twin.set_weights(model.get_weights())
    opt = keras.optimizers.SGD(0.1, clipnorm=clipnorm)
    out = []
    for step in range(steps):
        xb, yb = x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8]
        _, grads = grads_of(lambda xb=xb, yb=yb: mse(yb, twin(xb)), twin.trainable_variables)
        grads = [np.asarray(keras.ops.convert_to_numpy(g), np.float64) for g in grads]
        out.append(grads)
        with no_grad():
            opt.apply(
                [keras.ops.convert_to_tensor(g.astype("float32")) for g in grads],
                twin.trainable_variables,
            )
    return out


def test_clipped_norm_without_optimizer_follows_the_models_own_optimizer():
    _skip_stateful_steps_on_jax()
    x, y = data(n=16, features=2, outputs=1)
    model = RecordsItself(name="net")
    model(x[:1])
    reference = _clip_reference(model, x, y, clipnorm=0.05, steps=2)
    model.compile(keras.optimizers.SGD(0.1, clipnorm=0.05))
    watch = gradwatch.GradWatch(stats=["norm", "clipped_norm"])
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    norms, clipped = watch.log.stat("norm"), watch.log.stat("clipped_norm")
    for step, grads in enumerate(reference):
        by_hand = [np.linalg.norm(g) for g in grads]
        # Keras' clipnorm: each gradient scaled by c / max(|g|, c).
        expected = [n * 0.05 / max(n, 0.05) for n in by_hand]
        assert min(by_hand) > 0.05  # every gradient here is clipped
        np.testing.assert_allclose(norms.loc[step].to_numpy(), by_hand, rtol=1e-5)
        np.testing.assert_allclose(clipped.loc[step].to_numpy(), expected, rtol=1e-5)


def test_clipped_norm_without_optimizer_on_a_model_with_several_warns_once():
    _skip_stateful_steps_on_jax()
    x, y = data(n=16, features=2, outputs=1)
    model = RecordsItself(two=True, name="net")
    model(x[:1])
    model.compile()
    model.first = keras.optimizers.SGD(0.1, clipnorm=0.05)
    model.second = keras.optimizers.SGD(0.1, clipnorm=0.05)
    watch = gradwatch.GradWatch(stats=["norm", "clipped_norm"])
    with pytest.warns(UserWarning, match=r"`clipped_norm` of .*equals `norm`.*optimizer=") as w:
        model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    ours = [str(m.message) for m in w if "clipped_norm" in str(m.message)]
    assert len(ours) == 1
    log = watch.log
    assert str(log.variables) in ours[0]
    np.testing.assert_allclose(
        log.stat("clipped_norm").to_numpy(), log.stat("norm").to_numpy(), rtol=1e-6
    )


class CriticLoop(keras.Model):
    """WGAN-GP's shape (without the penalty): the critic `d` is updated `n_critic` times
    per step, by its own optimizer, then the generator `g` once. With `by_hand`, the step
    also calls `gradwatch.record_gradients` before each apply, as the docs advise."""

    def __init__(self, n_critic=3, by_hand=False, **kwargs):
        super().__init__(**kwargs)
        self.n_critic, self.by_hand = n_critic, by_hand
        self.g = keras.layers.Dense(2, activation="tanh", name="g")
        self.d = keras.layers.Dense(1, activation="tanh", name="d")

    def call(self, x):
        return self.d(self.g(x))

    def compile(self, d_optimizer, g_optimizer):
        super().compile()
        self.d_optimizer, self.g_optimizer = d_optimizer, g_optimizer

    def train_step(self, data):
        x, y = data
        d_vars, g_vars = self.d.trainable_weights, self.g.trainable_weights
        for _ in range(self.n_critic):
            loss_d, grads = grads_of(lambda: critic_loss(self, x, y), d_vars)
            if self.by_hand:
                gradwatch.record_gradients(self, grads, d_vars, self.d_optimizer)
            with no_grad():
                self.d_optimizer.apply_gradients(zip(grads, d_vars, strict=True))
        loss_g, grads = grads_of(lambda: -ops.mean(self.d(self.g(x, training=True))), g_vars)
        if self.by_hand:
            gradwatch.record_gradients(self, grads, g_vars, self.g_optimizer)
        with no_grad():
            self.g_optimizer.apply_gradients(zip(grads, g_vars, strict=True))
        return {"d_loss": loss_d, "g_loss": loss_g}


def critic_loss(model, x, y):
    """The Wasserstein critic loss: fake scores minus real ones."""
    fake = ops.stop_gradient(model.g(x))
    return ops.mean(model.d(fake, training=True)) - ops.mean(model.d(y, training=True))


def _critic_reference(model, x, y, steps, lr_d, lr_g, global_clipnorm, n_critic=3):
    """The same critic loop by hand, on a twin from `model`'s weights: per step, the
    generator's gradients and the critic's gradients of each of `n_critic` updates, in
    NumPy. `lr_d` may be a schedule."""
    twin = CriticLoop(n_critic=n_critic, name=model.name)
    twin(x[:1])
    twin.set_weights(model.get_weights())
    d_opt = keras.optimizers.SGD(lr_d, global_clipnorm=global_clipnorm)
    g_opt = keras.optimizers.SGD(lr_g)
    out = []
    for step in range(steps):
        xb, yb = x[8 * step : 8 * step + 8], y[8 * step : 8 * step + 8]
        d_vars, g_vars = twin.d.trainable_weights, twin.g.trainable_weights
        critic = []
        for _ in range(n_critic):
            _, gd = grads_of(lambda xb=xb, yb=yb: critic_loss(twin, xb, yb), d_vars)
            critic.append([np.asarray(ops.convert_to_numpy(g), np.float64) for g in gd])
            with no_grad():
                d_opt.apply_gradients(zip(gd, d_vars, strict=True))
        _, gg = grads_of(lambda xb=xb: -ops.mean(twin.d(twin.g(xb))), g_vars)
        with no_grad():
            g_opt.apply_gradients(zip(gg, g_vars, strict=True))
        out.append(([np.asarray(ops.convert_to_numpy(g), np.float64) for g in gg], critic))
    return out


CRITIC_KEYS = [
    "gan/g/kernel",
    "gan/g/bias",
    "gan/d/kernel",
    "gan/d/kernel@1",
    "gan/d/kernel@2",
    "gan/d/bias",
    "gan/d/bias@1",
    "gan/d/bias@2",
]


@pytest.mark.parametrize("by_hand", [False, True], ids=["at-apply", "by-hand"])
def test_a_critic_loop_keeps_every_update_apart_as_the_tape_computes_it(tmp_path, by_hand):
    _skip_stateful_steps_on_jax()
    x, y = data(n=24, features=3, outputs=2)
    model = CriticLoop(by_hand=by_hand, name="gan")
    model(x[:1])
    lr_d, lr_g, clip = 0.1, 0.05, 0.25
    reference = _critic_reference(model, x, y, 3, lr_d, lr_g, clip)
    model.compile(keras.optimizers.SGD(lr_d, global_clipnorm=clip), keras.optimizers.SGD(lr_g))
    stats = ["norm", "clipped_norm", "update_norm", "cos_prev"]
    watch = gradwatch.GradWatch(stats=stats, values="*", path=tmp_path / "stream")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    assert not [w for w in caught if issubclass(w.category, UserWarning)]
    log = watch.log
    assert log.variables == CRITIC_KEYS
    assert log.disconnected == []
    norms, clipped, updates, cos_prev = (log.stat(s) for s in stats)
    assert list(norms.columns) == CRITIC_KEYS
    factors, previous = [], None
    for step, (gen, critic) in enumerate(reference):
        expected = dict(zip(CRITIC_KEYS[:2], gen, strict=True))
        for k, grads in enumerate(critic):
            suffix = "" if k == 0 else f"@{k}"
            expected[f"gan/d/kernel{suffix}"], expected[f"gan/d/bias{suffix}"] = grads
            # Each critic update is its own apply: its global norm clips it alone.
            total = np.sqrt(sum(np.sum(g**2) for g in grads))
            factor = clip / max(total, clip)
            for name, g in zip(["kernel", "bias"], grads, strict=True):
                key = f"gan/d/{name}{suffix}"
                assert clipped.loc[step, key] == pytest.approx(
                    factor * np.linalg.norm(g), rel=1e-4, abs=1e-7
                )
                # SGD: this update moved the weights by lr * (clipped gradient).
                assert updates.loc[step, key] == pytest.approx(
                    lr_d * factor * np.linalg.norm(g), rel=1e-3, abs=1e-7
                )
                factors.append(factor)
        for key, g in expected.items():
            np.testing.assert_allclose(log.gradient(key, step), g, rtol=1e-5, atol=1e-7)
            assert norms.loc[step, key] == pytest.approx(np.linalg.norm(g), rel=1e-4, abs=1e-7)
        # The updates differ: each saw the weights the one before it left.
        assert not np.allclose(expected["gan/d/kernel"], expected["gan/d/kernel@1"])
        # cos_prev: with the same update of the step before.
        for key, g in expected.items():
            if previous is None:
                assert np.isnan(cos_prev.loc[step, key])
            else:
                assert cos_prev.loc[step, key] == pytest.approx(cosine(g, previous[key]), abs=1e-5)
        previous = expected
    assert min(factors) < 0.9 and max(factors) == 1.0  # some updates clipped, some not
    # Each update of the critic is a layer of its own in the per-layer view.
    layers = log.by_layer("norm")
    assert list(layers.columns) == ["gan/g", "gan/d", "gan/d@1", "gan/d@2"]
    np.testing.assert_allclose(
        layers["gan/d@1"], np.hypot(norms["gan/d/kernel@1"], norms["gan/d/bias@1"]), rtol=1e-6
    )
    frame = log.frame
    assert set(frame["variable"]) == set(CRITIC_KEYS)
    assert len(frame) == 3 * len(CRITIC_KEYS) * len(stats)
    # Every update survives the files, and the streamed parts.
    log.to_csv(tmp_path / "g.csv")
    log.to_parquet(tmp_path / "g.parquet")
    for path in (tmp_path / "g.csv", tmp_path / "g.parquet", tmp_path / "stream"):
        read = gradwatch.read_log(path)
        assert read.variables == CRITIC_KEYS
        assert read == log


# ExponentialDecay(0.1, decay_steps=4, decay_rate=0.5), written out.
def _critic_rate(iteration):
    return 0.1 * 0.5 ** (iteration / 4)


@pytest.fixture(scope="module")
def two_critic_updates():
    """A critic updated twice a step by its own scheduled optimizer, then the generator
    by another; watched with patterns that select some variables: the critic's kernel
    and the generator's bias get stats, the critic's bias is kept whole. 3 steps, with
    the reference's gradients."""
    if BACKEND == "jax":
        return None
    keras.utils.set_random_seed(11)
    x, y = data(n=24, features=3, outputs=2)
    model = CriticLoop(n_critic=2, name="gan")
    model(x[:1])

    def d_rate():
        return keras.optimizers.schedules.ExponentialDecay(0.1, 4, 0.5)

    reference = _critic_reference(model, x, y, 3, d_rate(), 0.05, None, n_critic=2)
    model.compile(keras.optimizers.SGD(d_rate()), keras.optimizers.SGD(0.05))
    watch = gradwatch.GradWatch(stats="norm", variables=["d/kernel", "g/bias"], values="d/bias")
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    return watch.log, reference


def test_patterns_select_every_update_of_a_variable_updated_twice(two_critic_updates):
    _skip_stateful_steps_on_jax()
    log, reference = two_critic_updates
    # Each selected variable in model order, followed by its later update.
    assert log.variables == [
        "gan/g/bias",
        "gan/d/kernel",
        "gan/d/kernel@1",
        "gan/d/bias",
        "gan/d/bias@1",
    ]
    assert log.value_variables == ["gan/d/bias", "gan/d/bias@1"]
    norms = log.stat("norm")
    for step, (gen, critic) in enumerate(reference):
        expected = {
            "gan/g/bias": gen[1],
            "gan/d/kernel": critic[0][0],
            "gan/d/kernel@1": critic[1][0],
        }
        for key, g in expected.items():
            assert norms.loc[step, key] == pytest.approx(np.linalg.norm(g), rel=1e-4, abs=1e-7)
        for key, g in (("gan/d/bias", critic[0][1]), ("gan/d/bias@1", critic[1][1])):
            np.testing.assert_allclose(log.gradient(key, step), g, rtol=1e-5, atol=1e-7)
        # The second update saw the weights the first left.
        assert not np.allclose(critic[0][0], critic[1][0])
    with pytest.raises(KeyError, match="values="):
        log.gradient("d/kernel@1", 0)


def test_scalars_learning_rate_of_a_two_optimizer_step_is_the_first_optimizers(
    two_critic_updates,
):
    # docs/reference.md: with several optimizers, the rate of the first optimizer the step
    # applies gradients with, read before its update: the critic's scheduled rate at its
    # `iterations` before the step's first critic update, 2 per step (not the generator's
    # 0.05, nor the rate of the `optimizer` that `compile` makes, nor the second update's).
    _skip_stateful_steps_on_jax()
    log, _ = two_critic_updates
    scalars = log.scalars
    np.testing.assert_array_equal(scalars["step"], [0, 1, 2])
    np.testing.assert_allclose(
        scalars["learning_rate"], [_critic_rate(2 * s) for s in range(3)], rtol=1e-6
    )
    # The step hands Keras' `loss` metric nothing: no loss (NaN), as documented.
    assert scalars["loss"].isna().all()


class StatelessCriticLoop(keras.Model):
    """The critic loop as a stateless JAX step: one optimizer (SGD) over both parts,
    three critic updates then one generator update, each recorded before its
    `stateless_apply` (which gradwatch cannot see)."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.g = keras.layers.Dense(2, activation="tanh", name="g")
        self.d = keras.layers.Dense(1, activation="tanh", name="d")

    def call(self, x):
        return self.d(self.g(x))

    def train_step(self, state, data):
        import jax

        trainable, non_trainable, optimizer_vars, metrics_vars = state
        x, y = data
        variables = self.trainable_variables
        n_g = len(self.g.trainable_variables)  # g's variables come first

        def parts(t):
            return list(t[:n_g]), list(t[n_g:])

        def critic(t):
            g, d = parts(t)
            fake = jax.lax.stop_gradient(self.g.stateless_call(g, [], x)[0])
            real_score = self.d.stateless_call(d, [], y)[0]
            return ops.mean(self.d.stateless_call(d, [], fake)[0]) - ops.mean(real_score)

        def generator(t):
            g, d = parts(t)
            return -ops.mean(self.d.stateless_call(d, [], self.g.stateless_call(g, [], x)[0])[0])

        for _ in range(3):
            grads = list(jax.grad(critic)(list(trainable)))
            grads[:n_g] = [ops.zeros_like(g) for g in grads[:n_g]]
            gradwatch.record_gradients(self, grads[n_g:], variables[n_g:], self.optimizer)
            trainable, optimizer_vars = self.optimizer.stateless_apply(
                optimizer_vars, grads, trainable
            )
        grads = list(jax.grad(generator)(list(trainable)))
        grads[n_g:] = [ops.zeros_like(g) for g in grads[n_g:]]
        gradwatch.record_gradients(self, grads[:n_g], variables[:n_g], self.optimizer)
        trainable, optimizer_vars = self.optimizer.stateless_apply(optimizer_vars, grads, trainable)
        return {}, (trainable, non_trainable, optimizer_vars, metrics_vars)


def test_a_stateless_jax_critic_loop_keeps_every_update_from_its_second_fit():
    if BACKEND != "jax":
        pytest.skip("a stateless train_step(state, data) is JAX's")
    x, y = data(n=24, features=3, outputs=2)
    model = StatelessCriticLoop(name="gan")
    model(x[:1])
    model.compile(keras.optimizers.SGD(0.1))
    watch = gradwatch.GradWatch(stats=["norm", "update_norm"], values="*")
    # The log's layout travels in the step's state, made before the first trace.
    with pytest.warns(UserWarning, match=r"updates .*gan/d/kernel.* more than once.*later `fit`"):
        model.fit(x[:8], y[:8], batch_size=8, shuffle=False, callbacks=[watch], verbose=0)
    assert watch.log.variables == ["gan/g/kernel", "gan/g/bias", "gan/d/kernel", "gan/d/bias"]
    reference = _critic_reference(model, x, y, 3, 0.1, 0.1, None)
    model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)
    log = watch.log
    # (The keys of the later updates join the log after those of the first fit.)
    assert sorted(log.variables) == sorted(CRITIC_KEYS)
    updates = log.stat("update_norm")
    for step, (gen, critic) in enumerate(reference, start=1):
        expected = dict(zip(CRITIC_KEYS[:2], gen, strict=True))
        for k, grads in enumerate(critic):
            suffix = "" if k == 0 else f"@{k}"
            expected[f"gan/d/kernel{suffix}"], expected[f"gan/d/bias{suffix}"] = grads
        for key, g in expected.items():
            np.testing.assert_allclose(log.gradient(key, step), g, rtol=1e-5, atol=1e-7)
        # Every update's weights are read from the step's input state: not known.
        assert updates.loc[step, CRITIC_KEYS[2:]].isna().all()
        assert updates.loc[step, "gan/g/kernel"] == pytest.approx(
            0.1 * np.linalg.norm(gen[0]), rel=1e-4
        )
