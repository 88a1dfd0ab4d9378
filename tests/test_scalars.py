"""`GradientLog.scalars`: each step's loss and learning rate, recorded in the step, against
a plain gradient loop of the backend; stored in files and read back."""

import json

import keras
import numpy as np
import pandas as pd
import pytest
from keras import ops
from models import data, pair
from reference import (
    BACKEND,
    batches_of,
    grads_of,
    mse,
    no_grad,
    skip_on_jax,
    skip_unless_supported,
    spe,
)

import gradwatch

# ExponentialDecay(0.1, decay_steps=2, decay_rate=0.5), written out: 0.1 * 0.5 ** (i / 2).
LR0, DECAY_STEPS = 0.1, 2


def schedule():
    return keras.optimizers.schedules.ExponentialDecay(LR0, DECAY_STEPS, 0.5)


def rate_by_hand(iteration):
    return LR0 * 0.5 ** (iteration / DECAY_STEPS)


def tape_losses(model, optimizer, batches):
    """Trains `model` with a plain gradient loop; returns each step's loss (the mse plus
    the model's regularization losses, as Keras adds them), and sets `tape_losses.norms`
    to each step's global gradient norm."""
    losses, norms = [], []
    for x, y, _ in batches:

        def loss_of(x=x, y=y):
            loss = mse(y, model(x, training=True))
            return loss + sum(model.losses) if model.losses else loss

        loss, grads = grads_of(loss_of, model.trainable_weights)
        losses.append(float(ops.convert_to_numpy(loss)))
        squares = [np.sum(np.square(ops.convert_to_numpy(g).astype(np.float64))) for g in grads]
        norms.append(np.sqrt(np.sum(squares)))
        with no_grad():
            optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
    tape_losses.norms = np.asarray(norms)
    return np.asarray(losses)


@pytest.mark.parametrize(
    ("steps_per_execution", "loss_scale", "jit"),
    [(1, False, False), (3, False, True), (3, True, False)],
)
@pytest.mark.backends
def test_scalars_are_each_steps_loss_and_scheduled_rate_of_a_tape_loop(
    steps_per_execution, loss_scale, jit
):
    skip_unless_supported(jit=jit)
    x, y = data(n=24)  # 6 batches of 4 an epoch, 2 epochs: steps 0..11
    model, plain = pair()
    optimizer = keras.optimizers.SGD(schedule())
    if loss_scale:  # the loss is recorded before scaling; the rate is the inner optimizer's
        optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=2.0**10)
    model.compile(optimizer, "mse", steps_per_execution=spe(steps_per_execution), jit_compile=jit)
    watch = gradwatch.GradWatch()
    history = model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[watch], verbose=0)

    reference = tape_losses(plain, keras.optimizers.SGD(schedule()), batches_of(x, y, 4) * 2)
    scalars = watch.log.scalars
    assert list(scalars.columns) == [
        *("step", "epoch", "batch", "loss", "learning_rate", "applied", "global_norm", "spike")
    ]
    assert scalars["loss"].dtype == np.float32 and scalars["learning_rate"].dtype == np.float32
    # Without gradient accumulation every step applies (none overflowed here).
    assert scalars["applied"].dtype == "boolean" and scalars["applied"].all()
    np.testing.assert_array_equal(scalars["step"], np.arange(12))
    np.testing.assert_array_equal(scalars["epoch"], np.arange(12) // 6)
    np.testing.assert_array_equal(scalars["batch"], np.arange(12) % 6)
    np.testing.assert_allclose(scalars["loss"], reference, rtol=1e-5)
    # The spike judge's global norm (over every watched gradient, unscaled); 12 steps
    # are fewer than the 16 it needs before it judges one.
    np.testing.assert_allclose(scalars["global_norm"], tape_losses.norms, rtol=1e-5)
    np.testing.assert_array_equal(scalars["spike"], np.zeros(12))
    np.testing.assert_allclose(
        scalars["learning_rate"], [rate_by_hand(i) for i in range(12)], rtol=1e-6
    )
    # Keras' epoch loss is the batch-size weighted mean of the steps' losses (equal batches).
    np.testing.assert_allclose(history.history["loss"], reference.reshape(2, 6).mean(1), rtol=1e-5)


@pytest.mark.backends
def test_scalars_with_every_are_those_of_the_recorded_steps():
    x, y = data(n=24)
    model, plain = pair()
    # Two steps an execution: the step gates its own capture (a conditional in the step).
    model.compile(keras.optimizers.SGD(schedule()), "mse", steps_per_execution=spe(2))
    watch = gradwatch.GradWatch(every=4)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[watch], verbose=0)

    reference = tape_losses(plain, keras.optimizers.SGD(schedule()), batches_of(x, y, 4) * 2)
    scalars = watch.log.scalars
    np.testing.assert_array_equal(scalars["step"], [0, 4, 8])
    np.testing.assert_allclose(scalars["loss"], reference[[0, 4, 8]], rtol=1e-5)
    np.testing.assert_allclose(scalars["learning_rate"], [rate_by_hand(i) for i in (0, 4, 8)])


@pytest.mark.backends
def test_scalars_of_a_custom_step_without_the_loss_metric_have_a_nan_loss():
    skip_on_jax("a stateful custom train_step")

    class Step(keras.Sequential):
        def train_step(self, data):
            x, y = data
            if BACKEND == "torch":
                self.zero_grad()
                loss = mse(y, self(x, training=True))
                loss.backward()
                grads = [v.value.grad for v in self.trainable_weights]
            else:
                loss, grads = grads_of(
                    lambda: mse(y, self(x, training=True)), self.trainable_weights
                )
            with no_grad():
                self.optimizer.apply(grads, self.trainable_weights)
            return {"mse": loss}

    x, y = data(n=16)
    model = Step([keras.Input((5,)), keras.layers.Dense(2)])
    model.compile(keras.optimizers.SGD(0.25))
    watch = gradwatch.GradWatch()
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    scalars = watch.log.scalars
    np.testing.assert_array_equal(scalars["step"], [0, 1])
    assert scalars["loss"].isna().all()
    np.testing.assert_array_equal(scalars["learning_rate"], np.float32(0.25))


@pytest.mark.backends
def test_scalars_read_back_from_files_and_streamed_parts(tmp_path):
    x, y = data(n=24)
    model, _ = pair()
    model.compile(keras.optimizers.SGD(schedule()), "mse", steps_per_execution=spe(2))
    watch = gradwatch.GradWatch(path=tmp_path / "run", flush_every=5)
    model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    scalars = watch.log.scalars
    assert len(scalars) == 12 and np.isfinite(scalars[["loss", "learning_rate"]]).all().all()
    watch.log.to_csv(tmp_path / "log.csv")
    watch.log.to_parquet(tmp_path / "log.parquet")
    for path in (tmp_path / "log.csv", tmp_path / "log.parquet", tmp_path / "run"):
        back = gradwatch.read_log(path).scalars
        pd.testing.assert_frame_equal(back, scalars)


def test_scalars_of_a_version_1_file_are_empty_and_its_stats_read(tmp_path):
    # A log as gradwatch wrote it before it recorded scalars: version 1, no "scalars".
    meta = {
        "format": "gradwatch-log",
        "version": 1,
        "variables": ["d/kernel"],
        "stats": ["norm"],
        "shapes": {"d/kernel": [2, 1]},
        "bins_per_decade": None,
        "disconnected": [],
        "alerts": [],
        "skipped": [],
        "per_replica": False,
    }
    path = tmp_path / "old.csv"
    path.write_text(
        "# gradwatch-log "
        + json.dumps(meta)
        + "\nstep,epoch,batch,variable,stat,index,value\n"
        + "0,0,0,d/kernel,norm,,1.5\n1,0,1,d/kernel,norm,,0.5\n"
    )
    log = gradwatch.read_log(path)
    np.testing.assert_array_equal(log.stat("norm")["d/kernel"], [1.5, 0.5])
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
    assert log.scalars.empty
    # Written again, it is a current file that reads back the same.
    log.to_parquet(tmp_path / "new.parquet")
    assert gradwatch.read_log(tmp_path / "new.parquet") == log


def test_scalars_of_a_file_without_applied_read_it_as_unknown(tmp_path):
    # A version 2 log as gradwatch wrote it before it recorded whether a step applied.
    meta = {
        "format": "gradwatch-log",
        "version": 2,
        "variables": ["d/kernel"],
        "stats": ["norm"],
        "shapes": {"d/kernel": [2, 1]},
        "bins_per_decade": None,
        "disconnected": [],
        "alerts": [],
        "skipped": [],
        "per_replica": False,
        "scalars": ["loss", "learning_rate"],
    }
    path = tmp_path / "old.csv"
    path.write_text(
        "# gradwatch-log "
        + json.dumps(meta)
        + "\nstep,epoch,batch,variable,stat,index,value\n"
        + "0,0,0,d/kernel,norm,,1.5\n0,0,0,,loss,,0.25\n0,0,0,,learning_rate,,0.125\n"
        + "1,0,1,d/kernel,norm,,0.5\n1,0,1,,loss,,0.75\n1,0,1,,learning_rate,,0.0625\n"
    )
    log = gradwatch.read_log(path)
    scalars = log.scalars
    np.testing.assert_array_equal(scalars["loss"], np.float32([0.25, 0.75]))
    np.testing.assert_array_equal(scalars["learning_rate"], np.float32([0.125, 0.0625]))
    assert scalars["applied"].dtype == "boolean" and scalars["applied"].isna().all()
    # Written again and read back, it is unknown still.
    log.to_parquet(tmp_path / "new.parquet")
    assert gradwatch.read_log(tmp_path / "new.parquet") == log


def test_a_file_of_a_newer_version_is_refused_naming_the_versions_read(tmp_path):
    path = tmp_path / "newer.csv"
    meta = {"format": "gradwatch-log", "version": 3, "variables": [], "stats": [], "shapes": {}}
    path.write_text("# gradwatch-log " + json.dumps(meta) + "\n")
    with pytest.raises(ValueError, match="version 3; this gradwatch reads versions 1, 2"):
        gradwatch.read_log(path)
