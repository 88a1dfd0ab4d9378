"""Optimizers with `gradient_accumulation_steps`: each micro-step's gradient, whether it
applied, its learning rate and its number, against a hand-written loop that accumulates
and applies every 4th micro-step; bitwise training; resuming after `load_model`."""

import keras
import numpy as np
import pytest
from keras import ops
from models import data, layers, pair
from reference import batches_of, grads_of, mse, no_grad, spe

import gradwatch

pytestmark = pytest.mark.backends  # run again under JAX and PyTorch (test_backends)

N = 4  # gradient_accumulation_steps
# ExponentialDecay(0.05, decay_steps=4, decay_rate=0.5), written out. Keras evaluates it
# at the micro-step count: 0.05 * 0.5 ** (s / 4) at micro-step s.
LR0, DECAY_STEPS = 0.05, 4
STATS = ["norm", "weight_norm", "update_norm", "update_ratio"]
# 24 samples in micro-batches of 4: 6 micro-steps an epoch, so that an accumulation
# runs across the end of an epoch (steps 4-7) and the second epoch ends mid-way.
BATCH, EPOCHS = 4, 2


def rate_by_hand(step):
    return LR0 * 0.5 ** (step / DECAY_STEPS)


def adam():
    schedule = keras.optimizers.schedules.ExponentialDecay(LR0, DECAY_STEPS, 0.5)
    return keras.optimizers.Adam(schedule, gradient_accumulation_steps=N)


def accumulating_loop(model, batches):
    """Trains `model` by hand: each micro-batch's gradient (mse plus the regularization
    losses) is added up, and every N-th micro-step a plain Adam (no accumulation)
    applies their mean at the rate of the schedule at that micro-step. Returns each
    micro-step's (loss, gradients, weights before, weights after), in NumPy."""
    optimizer = keras.optimizers.Adam(LR0)
    variables = model.trainable_weights
    summed = None
    steps = []
    for step, (x, y, _) in enumerate(batches):

        def loss_of(x=x, y=y):
            loss = mse(y, model(x, training=True))
            return loss + sum(model.losses) if model.losses else loss

        before = [np.array(ops.convert_to_numpy(v)) for v in variables]
        loss, grads = grads_of(loss_of, variables)
        if (step + 1) % N:
            summed = (
                grads if summed is None else [a + g for a, g in zip(summed, grads, strict=True)]
            )
        else:
            mean = [(g + a) / N for g, a in zip(grads, summed, strict=True)]
            summed = None
            optimizer.learning_rate = rate_by_hand(step)
            with no_grad():
                optimizer.apply_gradients(zip(mean, variables, strict=True))
        after = [np.array(ops.convert_to_numpy(v)) for v in variables]
        numpy_grads = [np.array(ops.convert_to_numpy(g)) for g in grads]
        steps.append((float(ops.convert_to_numpy(loss)), numpy_grads, before, after))
    return steps


@pytest.fixture(scope="module")
def accumulated():
    """One seeded fit with `Adam(schedule, gradient_accumulation_steps=4)` and a watch,
    its plain-Keras twin, and the hand-written loop over the same data from the same
    weights: (watch, model, plain, histories, loop steps)."""
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(11)
    x, y = data(n=24)
    model, plain = pair()
    reference, _ = pair()
    reference.set_weights(model.get_weights())
    watch = gradwatch.GradWatch(stats=STATS, values="*")
    histories = []
    for m, callbacks in ((model, [watch]), (plain, [])):
        m.compile(adam(), "mse", steps_per_execution=spe(2))
        h = m.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=EPOCHS,
            shuffle=False,
            callbacks=callbacks,
            verbose=0,
        )
        histories.append(h.history)
    loop = accumulating_loop(reference, batches_of(x, y, BATCH) * EPOCHS)
    return watch, model, plain, histories, loop


def test_accumulation_numbers_every_micro_step_and_flags_those_that_apply(accumulated):
    watch, model, _, _, loop = accumulated
    log = watch.log
    steps = np.arange(len(loop))  # 12 micro-steps: `fit` runs 6 an epoch
    np.testing.assert_array_equal(log.steps, steps)
    scalars = log.scalars
    np.testing.assert_array_equal(scalars["step"], steps)
    np.testing.assert_array_equal(scalars["epoch"], steps // 6)
    np.testing.assert_array_equal(scalars["batch"], steps % 6)
    assert scalars["applied"].dtype == "boolean"
    assert scalars["applied"].tolist() == [(s + 1) % N == 0 for s in steps]
    # The optimizer's own counts: micro-steps (what the log numbers), and updates.
    assert int(ops.convert_to_numpy(model.optimizer._iterations)) == len(steps)
    assert int(ops.convert_to_numpy(model.optimizer.iterations)) == len(steps) // N


def test_accumulation_records_each_micro_batch_gradient_of_the_loop(accumulated):
    watch, _, _, _, loop = accumulated
    log = watch.log
    norms = log.stat("norm")
    for step, (_, grads, _, _) in enumerate(loop):
        for key, g in zip(log.variables, grads, strict=True):
            # The micro-batch's own gradient, handed to `apply`: not the running sum,
            # nor the mean that the optimizer applies.
            np.testing.assert_allclose(
                log.gradient(key, step), g, rtol=1e-5, atol=1e-7, err_msg=f"{key} {step}"
            )
            np.testing.assert_allclose(norms.loc[step, key], np.linalg.norm(g), rtol=1e-5)


def test_accumulation_update_stats_are_zero_until_the_step_that_applies(accumulated):
    watch, _, _, _, loop = accumulated
    log = watch.log
    wide = {name: log.stat(name) for name in STATS}
    for step, (_, _, before, after) in enumerate(loop):
        applies = (step + 1) % N == 0
        for key, w0, w1 in zip(log.variables, before, after, strict=True):
            update = wide["update_norm"].loc[step, key]
            weight = np.linalg.norm(w0)
            np.testing.assert_allclose(wide["weight_norm"].loc[step, key], weight, rtol=1e-5)
            if not applies:
                # Only accumulated: the weights did not move, to the bit.
                assert update == 0 and wide["update_ratio"].loc[step, key] == 0, (key, step)
                continue
            expected = np.linalg.norm(w1.astype(np.float64) - w0)
            assert expected > 0
            np.testing.assert_allclose(update, expected, rtol=1e-4, err_msg=f"{key} {step}")
            if weight:
                np.testing.assert_allclose(
                    wide["update_ratio"].loc[step, key], expected / weight, rtol=1e-4
                )


def test_accumulation_records_the_loss_and_the_rate_keras_applies(accumulated):
    watch, _, _, _, loop = accumulated
    scalars = watch.log.scalars
    np.testing.assert_allclose(scalars["loss"], [step[0] for step in loop], rtol=1e-5)
    # The schedule at the micro-step (not at `iterations`, the count of updates): the
    # loop applied at that rate, and its weights are the model's (the test above).
    rates = [rate_by_hand(s) for s in range(len(loop))]
    np.testing.assert_allclose(scalars["learning_rate"], rates, rtol=1e-6)


def test_accumulation_update_ratio_rules_judge_the_steps_that_applied(accumulated):
    log = accumulated[0].log
    applied = log.scalars["applied"].to_numpy(bool)
    kernels = ["net/hidden/kernel", "net/out/kernel"]
    # The medians over the 3 applying steps (over all 12 steps they would be 0).
    medians = log.stat("update_ratio")[kernels][applied].median()
    assert (medians > 0).all()
    assert "update_ratio_low" not in set(log.diagnose()["finding"])

    def low(threshold):
        found = log.diagnose(update_ratio_low=threshold)
        return found[found["finding"] == "update_ratio_low"]["variables"].tolist()

    assert low(medians.min() * 0.999) == []
    assert low(medians.max() * 1.001) == [kernels]


def test_accumulation_trains_bitwise_as_plain_keras(accumulated):
    _, model, plain, (watched, unwatched), loop = accumulated
    assert watched == unwatched
    for a, b in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    # And as the hand-written loop (float tolerance: its own kernels).
    for a, b in zip(model.trainable_weights, loop[-1][3], strict=True):
        np.testing.assert_allclose(ops.convert_to_numpy(a), b, rtol=1e-5, atol=1e-6)


@pytest.fixture
def mixed_float16():
    keras.mixed_precision.set_dtype_policy("mixed_float16")
    try:
        yield
    finally:
        keras.mixed_precision.set_dtype_policy("float32")


def test_accumulation_under_mixed_float16_records_unscaled_micro_batch_gradients(
    mixed_float16, accumulated
):
    # `compile` wraps the optimizer in a `LossScaleOptimizer`, whose `iterations` are its
    # inner optimizer's: a floor division made in the step. A plain Keras model here,
    # whatever the models under test (the mixin's are the fixture's by default).
    _, _, _, _, loop = accumulated
    keras.utils.set_random_seed(11)  # the float32 fit's starting weights
    x, y = data(n=24)
    model = keras.Sequential(layers(), name="net")
    plain = keras.Sequential(layers(), name="net")
    plain.set_weights(model.get_weights())
    watch = gradwatch.GradWatch(stats=STATS)
    histories = []
    for m, callbacks in ((model, [watch]), (plain, [])):
        m.compile(adam(), "mse")
        assert isinstance(m.optimizer, keras.optimizers.LossScaleOptimizer)
        h = m.fit(
            x,
            y,
            batch_size=BATCH,
            epochs=EPOCHS,
            shuffle=False,
            callbacks=callbacks,
            verbose=0,
        )
        histories.append(h.history)
    assert histories[0] == histories[1]
    for a, b in zip(model.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)
    log = watch.log
    steps = np.arange(len(loop))
    np.testing.assert_array_equal(log.steps, steps)
    assert log.skipped_steps.size == 0  # the reference below assumes no skipped update
    applied = log.scalars["applied"].tolist()
    assert applied == [(s + 1) % N == 0 for s in steps]
    np.testing.assert_allclose(
        log.scalars["learning_rate"], [rate_by_hand(s) for s in steps], rtol=1e-6
    )
    update = log.stat("update_norm")
    assert (update[~np.asarray(applied)] == 0).all().all()
    assert (update[np.asarray(applied)] > 0).all().all()
    # Unscaled (the loss scale is 2**15): the float32 loop's norms, to float16's precision.
    norms = log.stat("norm")
    for step, (_, grads, _, _) in enumerate(loop):
        for key, g in zip(log.variables, grads, strict=True):
            np.testing.assert_allclose(
                norms.loc[step, key], np.linalg.norm(g), rtol=3e-2, err_msg=f"{key} {step}"
            )


def test_accumulation_with_skipped_updates_applies_at_every_nth_micro_step_kept():
    # Micro-batch 3 of each epoch overflows under a loss scale of 2**120: the
    # `LossScaleOptimizer` drops it (its micro-step is not counted, nothing accumulates)
    # and halves the scale. At step 3 the micro-step would have applied.
    x, y = data(n=24)
    y[3 * BATCH : 4 * BATCH] *= 1e4
    model = keras.Sequential(layers(regularize=False), name="net")
    inner = keras.optimizers.Adam(0.01, gradient_accumulation_steps=N)
    model.compile(keras.optimizers.LossScaleOptimizer(inner, initial_scale=2.0**120), "mse")
    watch = gradwatch.GradWatch(stats=STATS, on_nonfinite="ignore")
    model.fit(x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, callbacks=[watch], verbose=0)
    log = watch.log
    steps = np.arange(12)
    np.testing.assert_array_equal(log.steps, steps)
    skipped = log.skipped_steps.tolist()
    assert skipped == [3, 9]
    # By hand: count the micro-steps kept; every N-th of them applies.
    applied, kept = [], 0
    for step in steps:
        if step in skipped:
            applied.append(False)
            continue
        kept += 1
        applied.append(kept % N == 0)
    assert applied == [s in (4, 8) for s in steps]
    assert log.scalars["applied"].tolist() == applied
    assert int(ops.convert_to_numpy(inner._iterations)) == kept == 10
    update = log.stat("update_norm")
    assert (update[~np.asarray(applied)] == 0).all().all()
    assert (update[np.asarray(applied)] > 0).all().all()


def test_accumulation_resumed_after_load_model_continues_at_the_micro_step(tmp_path):
    x, y = data(n=24)  # 6 micro-steps an epoch: saved mid-way through an accumulation
    model, _ = pair()
    model.compile(adam(), "mse")
    whole, _ = pair()
    whole.set_weights(model.get_weights())
    whole.compile(adam(), "mse")
    uninterrupted = gradwatch.GradWatch(stats=STATS)
    fit = {"batch_size": BATCH, "shuffle": False, "verbose": 0}
    whole.fit(x, y, epochs=2, callbacks=[uninterrupted], **fit)

    path = tmp_path / "log"
    model.fit(x, y, callbacks=[gradwatch.GradWatch(stats=STATS, path=path)], **fit)
    model.save(tmp_path / "model.keras")
    del model
    keras.backend.clear_session(free_memory=False)  # as in a new process
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert int(ops.convert_to_numpy(loaded.optimizer.iterations)) == 1  # 6 // 4 updates
    # Steps 6-11, the model's own count of micro-steps: the log does not renumber them
    # (it would warn that it holds those steps, an error under pytest).
    second = gradwatch.GradWatch(stats=STATS, path=path)
    loaded.fit(x, y, epochs=2, initial_epoch=1, callbacks=[second], **fit)

    log = gradwatch.read_log(path)
    assert second.log == log  # a resumed watch's log is the whole history
    expected = uninterrupted.log
    np.testing.assert_array_equal(log.steps, np.arange(12))
    assert log.scalars["applied"].tolist() == [(s + 1) % N == 0 for s in range(12)]
    assert log.scalars["applied"].tolist() == expected.scalars["applied"].tolist()
    # The resumed run is the uninterrupted one: the saved accumulator carried steps 4
    # and 5 into the update at step 7.
    for name in STATS:
        np.testing.assert_allclose(
            log.stat(name).to_numpy(), expected.stat(name).to_numpy(), rtol=1e-5, atol=1e-7
        )
    for a, b in zip(loaded.get_weights(), whole.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7)
