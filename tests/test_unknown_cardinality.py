"""Data of unknown length (a generator, a filtered `tf.data` pipeline): the log holds the
steps that ran and no more, also where the end of an epoch is found by a fetch that
finds no data (TensorFlow runs no step there, though its graph has started one)."""

from __future__ import annotations

import functools

import keras
import numpy as np
import pytest
from keras import ops
from models import data, layers
from reference import grads_of, mse, no_grad, np_stats, skip_unless_supported, tf_only

import gradwatch

pytestmark = [
    pytest.mark.backends,  # run again under JAX and PyTorch (test_backends)
    # Keras warns at the end of each epoch whose length it does not know.
    pytest.mark.filterwarnings("ignore:Your input ran out of data:UserWarning"),
]

N_BATCHES, BATCH, LR = 4, 4, 0.1
X, Y = data(n=N_BATCHES * BATCH)
BATCHES = [(X[i : i + BATCH], Y[i : i + BATCH]) for i in range(0, len(X), BATCH)]
KINDS = {"plain": keras.Sequential, "mixin": gradwatch.Sequential}


@functools.cache
def reference(epochs: int) -> tuple[list[np.ndarray], np.ndarray, list[list[np.ndarray]]]:
    """The starting weights, and each step's loss and gradients of a plain gradient loop
    (the backend's own autodiff and SGD) over `BATCHES`, `epochs` times."""
    keras.utils.set_random_seed(0)
    model = keras.Sequential(layers(), name="net")
    start = [np.array(w) for w in model.get_weights()]
    optimizer = keras.optimizers.SGD(LR)
    losses, grads = [], []
    for x, y in BATCHES * epochs:

        def loss_of(x=x, y=y):
            return mse(y, model(x, training=True)) + sum(model.losses)

        loss, g = grads_of(loss_of, model.trainable_weights)
        losses.append(float(ops.convert_to_numpy(loss)))
        grads.append([np.asarray(ops.convert_to_numpy(v)) for v in g])
        with no_grad():
            optimizer.apply_gradients(zip(g, model.trainable_weights, strict=True))
    return start, np.asarray(losses), grads


def models(kind: str, steps_per_execution: int, jit: bool = False) -> tuple[keras.Model, ...]:
    """The model under test and a plain keras.Sequential twin, compiled alike, from the
    reference's starting weights."""
    start, _, _ = reference(2)
    out = []
    for cls in (KINDS[kind], keras.Sequential):
        model = cls(layers(), name="net")
        model.set_weights(start)
        model.compile(
            keras.optimizers.SGD(LR),
            "mse",
            steps_per_execution=steps_per_execution,
            jit_compile=jit,
        )
        out.append(model)
    return tuple(out)


def generator_dataset():
    """`BATCHES` from a Python generator: a dataset of unknown cardinality."""
    import tensorflow as tf

    spec = (tf.TensorSpec((None, 5), tf.float32), tf.TensorSpec((None, 2), tf.float32))
    return tf.data.Dataset.from_generator(lambda: iter(BATCHES), output_signature=spec)


def filtered_dataset():
    """`BATCHES` from rows with others mixed in and filtered out again: a dataset of
    unknown cardinality."""
    import tensorflow as tf

    # Every third row is a copy marked to be dropped (x[0] = 1e6).
    xs, ys = [], []
    for i, (x, y) in enumerate(zip(X, Y, strict=True)):
        if i % 3 == 0:
            xs.append(np.full_like(x, 1e6))
            ys.append(y)
        xs.append(x)
        ys.append(y)
    ds = tf.data.Dataset.from_tensor_slices((np.stack(xs), np.stack(ys)))
    return ds.filter(lambda x, y: x[0] < 1e5).batch(BATCH)


def check_steps(log, epochs: int, every: int = 1) -> None:
    """The log holds the steps that ran, numbered on across the epochs, with their epoch
    and batch; each step's norms and loss those of the reference loop."""
    _, losses, grads = reference(epochs)
    ran = [s for s in range(epochs * N_BATCHES) if s % every == 0]
    assert list(log.steps) == ran
    frame = log.frame
    rows = sorted(set(zip(frame.step, frame.epoch, frame.batch, strict=True)))
    assert rows == [(s, s // N_BATCHES, s % N_BATCHES) for s in ran]
    norm = log.stat("norm")
    for step in ran:
        for key, g in zip(log.variables, grads[step], strict=True):
            expected = np_stats(g)["norm"]
            assert norm.loc[step, key] == pytest.approx(expected, rel=1e-5), (step, key)
    scalars = log.scalars.set_index("step")
    np.testing.assert_allclose(scalars["loss"].to_numpy(), losses[ran], rtol=1e-5)
    np.testing.assert_allclose(scalars["learning_rate"].to_numpy(), LR, rtol=1e-6)
    assert scalars["applied"].all()


def check_weights(model, twin) -> None:
    for got, expected in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(got, expected)


@tf_only
@pytest.mark.parametrize(
    ("kind", "steps_per_execution", "jit", "source"),
    [
        ("plain", 1, False, generator_dataset),
        ("mixin", 1, False, generator_dataset),
        ("plain", 3, False, generator_dataset),
        ("mixin", 3, False, generator_dataset),
        ("plain", 1, False, filtered_dataset),
        ("mixin", 3, False, filtered_dataset),
    ],
)
def test_unknown_cardinality_records_only_the_steps_that_ran(
    kind, steps_per_execution, jit, source
):
    model, twin = models(kind, steps_per_execution, jit)
    watch = gradwatch.GradWatch()
    model.fit(source(), epochs=2, callbacks=[watch], verbose=0, shuffle=False)
    twin.fit(source(), epochs=2, verbose=0, shuffle=False)
    check_steps(watch.log, epochs=2)
    check_weights(model, twin)


@tf_only
@pytest.mark.parametrize("kind", ["plain", "mixin"])
def test_unknown_cardinality_every_picks_the_steps_that_ran(kind):
    # With `every > 1` the host picks the train function of each coming step: it counts
    # the call that ends each epoch on a failed fetch, which ran no step.
    model, twin = models(kind, 1)
    watch = gradwatch.GradWatch(every=3)
    model.fit(generator_dataset(), epochs=2, callbacks=[watch], verbose=0, shuffle=False)
    twin.fit(generator_dataset(), epochs=2, verbose=0, shuffle=False)
    check_steps(watch.log, epochs=2, every=3)
    check_weights(model, twin)


@pytest.mark.parametrize("kind", ["plain", "mixin"])
def test_unknown_cardinality_python_generator_records_each_batch(kind):
    # A Python generator has no length: the epoch ends where it stops.
    skip_unless_supported()
    model, twin = models(kind, 1)
    watch = gradwatch.GradWatch()
    model.fit((b for b in BATCHES), epochs=1, callbacks=[watch], verbose=0, shuffle=False)
    twin.fit((b for b in BATCHES), epochs=1, verbose=0, shuffle=False)
    check_steps(watch.log, epochs=1)
    check_weights(model, twin)


class CrashBefore(keras.callbacks.Callback):
    """Raises before the step at optimizer iteration `at`."""

    def __init__(self, at):
        super().__init__()
        self.at = at

    def on_train_batch_begin(self, batch, logs=None):
        if int(ops.convert_to_numpy(self.model.optimizer.iterations)) == self.at:
            raise RuntimeError(f"crash before iteration {self.at}")


@tf_only
def test_unknown_cardinality_backup_mid_epoch_resumes_at_its_step(tmp_path):
    # Keras' optimizer counts an iteration, but no step, at the end of each epoch of
    # unknown length (its graph starts the step before `get_next` fails): steps 0-3 are
    # iterations 0-3, steps 4-7 iterations 5-8, steps 8-11 iterations 10-13. The backup
    # after the 6th batch (step 5) holds iteration 7; the crash comes before step 11.
    # Keras restores the epoch: the resumed run trains epoch 1 again from step 6.
    path = tmp_path / "log"
    backup = keras.callbacks.BackupAndRestore(tmp_path / "backup", save_freq=6)
    model, _ = models("mixin", 1)
    fit = functools.partial(model.fit, epochs=3, verbose=0, shuffle=False)
    with pytest.raises(RuntimeError, match="crash before iteration 13"):
        fit(
            generator_dataset(), callbacks=[backup, gradwatch.GradWatch(path=path), CrashBefore(13)]
        )
    assert int(model.optimizer.iterations.numpy()) == 13  # iterations 5 and 10 ran no step
    fit(generator_dataset(), callbacks=[gradwatch.GradWatch(path=path), backup])
    log = gradwatch.read_log(path)
    rows = log.frame.drop_duplicates("step")
    assert rows["step"].tolist() == list(range(14))
    assert rows["epoch"].tolist() == [0] * 4 + [1] * 2 + [1] * 4 + [2] * 4
    assert rows["batch"].tolist() == [0, 1, 2, 3, 0, 1, 0, 1, 2, 3, 0, 1, 2, 3]
    assert [old.steps.tolist() for old in log.superseded] == [[6, 7, 8, 9, 10]]
