"""`GradWatch(on_spike=...)`: the step judges each recorded step's global gradient norm
and loss against the mean + `spike_sigma` standard deviations of their previous
`spike_window` finite values.

Each run trains on 30 batches of 8 rows (`shuffle=False`) of which two carry targets
scaled up (steps 20 and 26), so that their loss and gradient jump. The reference is a
plain gradient loop of the backend over the same batches from the same weights: its
losses and global norms, judged by `gradwatch._doctor.spikes.spike_flags` (the rule
written out on the host, over float64), give the steps that must spike; for "skip" the
loop leaves out the update of those steps.
"""

from __future__ import annotations

import warnings

import keras
import numpy as np
import pytest
from keras import ops
from models import pair
from reference import grads_of, mse, no_grad, skip_unless_supported, spe

import gradwatch
from gradwatch._doctor.spikes import spike_flags

BATCH, STEPS, WINDOW = 8, 30, 12
SPIKES = (20, 26)  # the steps whose targets are scaled up


def _data():
    rng = np.random.default_rng(3)
    x = rng.normal(size=(BATCH * STEPS, 5)).astype("float32")
    y = (x[:, :2] * 0.5 + 0.1 * rng.normal(size=(BATCH * STEPS, 2))).astype("float32")
    for step, scale in zip(SPIKES, (40.0, 8.0), strict=True):
        y[step * BATCH : (step + 1) * BATCH] *= scale
    return x, y


def _reference(model, x, y, optimizer, kept_back=(), steps=STEPS):
    """The loss and global gradient norm of each of the first `steps` steps of a plain
    gradient loop; the steps in `kept_back` are not applied. Returns the two series."""
    losses, norms = [], []
    weights = model.trainable_weights
    for step in range(steps):
        xb, yb = x[step * BATCH : (step + 1) * BATCH], y[step * BATCH : (step + 1) * BATCH]

        def loss_of(xb=xb, yb=yb):
            loss = mse(yb, model(xb, training=True))
            return loss + sum(model.losses) if model.losses else loss

        loss, grads = grads_of(loss_of, weights)
        losses.append(float(ops.convert_to_numpy(loss)))
        squares = [np.sum(np.square(ops.convert_to_numpy(g).astype(np.float64))) for g in grads]
        norms.append(float(np.sqrt(np.sum(squares))))
        if step not in kept_back:
            with no_grad():
                optimizer.apply_gradients(zip(grads, weights, strict=True))
    return np.asarray(losses), np.asarray(norms)


def _fit(model, watch, steps_per_execution=1, jit_compile=False, **kwargs):
    model.compile(
        optimizer=keras.optimizers.SGD(0.05),
        loss="mse",
        steps_per_execution=spe(steps_per_execution),
        jit_compile=jit_compile,
    )
    x, y = _data()
    return model.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[watch], **kwargs)


def _expected(losses, norms):
    """The steps the rule flags: `(gradient spikes, loss spikes)`."""
    grad = np.flatnonzero(spike_flags(norms, window=WINDOW))
    loss = np.flatnonzero(spike_flags(losses, window=WINDOW))
    return grad, loss


def test_spikes_are_the_steps_a_tape_loop_flags_and_warn_names_them():
    watched, plain = pair()
    watch = gradwatch.GradWatch(spike_window=WINDOW)
    with pytest.warns(UserWarning) as caught:
        _fit(watched, watch)
    x, y = _data()
    losses, norms = _reference(plain, x, y, keras.optimizers.SGD(0.05))
    grad, loss = _expected(losses, norms)
    assert 20 in grad and 20 in loss  # the data makes step 20 spike; the rule says which else

    alerts = watch.log.alerts
    got = alerts[alerts.kind == "spike"]
    np.testing.assert_array_equal(got.step, grad)
    assert (got.variable == "*").all()
    np.testing.assert_allclose(got.value, norms[grad], rtol=1e-4)
    got = alerts[alerts.kind == "loss_spike"]
    np.testing.assert_array_equal(got.step, loss)
    np.testing.assert_allclose(got.value, losses[loss], rtol=1e-4)
    # Every step's judged values, and its verdict as a code (1: gradient, 2: loss).
    scalars = watch.log.scalars
    np.testing.assert_allclose(scalars.global_norm, norms, rtol=1e-4)
    code = np.isin(np.arange(STEPS), grad) + 2 * np.isin(np.arange(STEPS), loss)
    np.testing.assert_array_equal(scalars.spike, code)
    assert scalars.applied.all()  # "warn" applies the update
    # The examples behind each spike, replayed on the weights from before it.
    ex = watch.log.examples
    spiking = sorted(set(grad) | set(loss))
    assert sorted(set(ex["step"])) == spiking
    np.testing.assert_array_equal(
        ex["sample"].to_numpy(), np.concatenate([s * BATCH + np.arange(BATCH) for s in spiking])
    )
    messages = [str(w.message) for w in caught]
    assert any(f"Gradient-norm spike at step {grad[0]}:" in m for m in messages)
    assert any(f"Loss spike at step {loss[0]}:" in m for m in messages)
    assert sum("spike at step" in m for m in messages) == 2  # one warning per kind


# Under JAX and PyTorch too (the judge and the undo are each backend's; their reference
# loops run op by op there, so the other tests of this file run on TensorFlow alone).
@pytest.mark.parametrize(
    ("steps_per_execution", "jit"), [pytest.param(1, False, marks=pytest.mark.backends), (4, True)]
)
def test_on_spike_skip_keeps_each_spiking_update_from_the_model(steps_per_execution, jit):
    skip_unless_supported(steps_per_execution, jit)
    watched, plain = pair()
    watch = gradwatch.GradWatch(on_spike="skip", spike_window=WINDOW)
    with pytest.warns(UserWarning, match="on_spike='skip'"):
        _fit(watched, watch, steps_per_execution, jit)
    # The reference learns its spikes as it goes: a skipped step leaves the weights,
    # so the later steps' values are those of the weights without it.
    x, y = _data()
    start = [w.copy() for w in plain.get_weights()]
    kept: list[int] = []
    for _ in range(3):  # to a fixed point: the skips change the later values
        plain.set_weights(start)
        losses, norms = _reference(plain, x, y, keras.optimizers.SGD(0.05), kept)
        grad, loss = _expected(losses, norms)
        now = sorted(set(grad) | set(loss))
        if now == kept:
            break
        kept = now
    assert kept and 20 in kept
    np.testing.assert_array_equal(watch.log.skipped_steps, kept)
    np.testing.assert_array_equal(watch.log.kept_steps, kept)
    np.testing.assert_array_equal(watch.log.scalars.applied, ~np.isin(np.arange(STEPS), kept))
    for a, b in zip(watched.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)
    # A kept spike has no NaN to trace: `log.origins` stays empty.
    assert watch.log.origins.empty


def test_on_spike_stop_ends_training_with_the_weights_from_before_the_spike(capsys):
    watched, plain = pair()
    start = [w.copy() for w in plain.get_weights()]
    watch = gradwatch.GradWatch(on_spike="stop", spike_window=WINDOW)
    _fit(watched, watch)
    x, y = _data()
    losses, norms = _reference(plain, x, y, keras.optimizers.SGD(0.05))
    first = min(np.r_[_expected(losses, norms)[0], _expected(losses, norms)[1]])
    assert watch.log.steps[-1] == first
    np.testing.assert_array_equal(watch.log.kept_steps, [first])
    assert f"spike at step {first}" in capsys.readouterr().out
    # The weights are those of the loop's steps before the spike.
    plain.set_weights(start)
    _reference(plain, x, y, keras.optimizers.SGD(0.05), steps=int(first))
    for a, b in zip(watched.get_weights(), plain.get_weights(), strict=True):
        np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6)


def test_on_spike_raise_raises_after_writing_the_log(tmp_path):
    watched, _ = pair()
    watch = gradwatch.GradWatch(on_spike="raise", spike_window=WINDOW, path=tmp_path / "log")
    with pytest.raises(FloatingPointError, match=r"spike at step 20"):
        _fit(watched, watch)
    saved = gradwatch.read_log(tmp_path / "log")
    assert saved.steps[-1] == 20 and 20 in saved.alerts.step.to_numpy()
    np.testing.assert_array_equal(saved.kept_steps, [20])


def test_spikes_are_judged_at_recorded_steps_only():
    watched, plain = pair()
    watch = gradwatch.GradWatch(spike_window=WINDOW, every=3, on_spike="skip")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _fit(watched, watch)
    # Steps 0, 3, ..., 27 are judged: step 20 (not recorded) is applied, step 26 not
    # judged either; the window holds the recorded steps' values only.
    x, y = _data()
    _, norms = _reference(plain, x, y, keras.optimizers.SGD(0.05))
    recorded = np.arange(0, STEPS, 3)
    assert not (spike_flags(norms[recorded], window=WINDOW).any())
    assert watch.log.alerts.empty
    assert len(watch.log.skipped_steps) == 0
    np.testing.assert_allclose(watch.log.scalars.global_norm, norms[recorded], rtol=1e-4)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        ({"on_spike": "skipp"}, r"`on_spike` must be one of \['ignore', 'warn', 'skip'"),
        ({"spike_window": 0}, r"`spike_window` must be an integer >= 1. Received: spike_window=0"),
        ({"spike_sigma": 0}, r"`spike_sigma` must be a finite number > 0. Received: spike_sigma=0"),
        ({"spike_sigma": float("nan")}, r"Received: spike_sigma=nan"),
        ({"spike_sigma": True}, r"Received: spike_sigma=True"),
    ],
)
def test_spike_arguments_are_checked(kwargs, match):
    with pytest.raises((ValueError, TypeError), match=match):
        gradwatch.GradWatch(**kwargs)


def test_on_spike_ignore_judges_nothing():
    watched, _ = pair()
    watch = gradwatch.GradWatch(on_spike="ignore", spike_window=WINDOW)
    _fit(watched, watch)
    assert watch.log.alerts.empty
    assert watch.log.scalars.spike.isna().all() and watch.log.scalars.global_norm.isna().all()


@pytest.mark.parametrize("policy", ["warn", "ignore"])
def test_the_doctor_names_the_spikes_and_the_layers_that_rose(policy):
    watched, plain = pair()
    watch = gradwatch.GradWatch(on_spike=policy, spike_window=WINDOW)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)
        _fit(watched, watch)
    x, y = _data()
    losses, norms = _reference(plain, x, y, keras.optimizers.SGD(0.05))
    found = watch.log.diagnose()
    row = found[found.finding == "spikes"]
    assert len(row) == 1 and row.severity.iloc[0] == "warning"
    if policy == "warn":  # the step's own verdicts, over the window it was given
        grad, loss = _expected(losses, norms)
    else:  # judged by the doctor over the recorded series, at the default window
        grad = np.flatnonzero(spike_flags(norms))
        loss = np.flatnonzero(spike_flags(losses))
    spiking = sorted(set(grad) | set(loss))
    assert row.first_step.iloc[0] == spiking[0] and row.last_step.iloc[0] == spiking[-1]
    evidence = row.evidence.iloc[0]
    assert f"{len(spiking)} of " in evidence and f"steps {grad[0]}" in evidence
    # The scaled targets reach the output layer first: its norm rises with the global one.
    assert "net/out" in row.variables.iloc[0]


def test_the_doctor_finds_no_spike_in_a_smooth_training():
    watched, _ = pair()
    watch = gradwatch.GradWatch(spike_window=WINDOW)
    watched.compile(optimizer=keras.optimizers.SGD(0.05), loss="mse")
    rng = np.random.default_rng(5)
    x = rng.normal(size=(BATCH * STEPS, 5)).astype("float32")
    y = (x[:, :2] * 0.5).astype("float32")
    watched.fit(x, y, batch_size=BATCH, shuffle=False, verbose=0, callbacks=[watch])
    assert watch.log.alerts.empty
    assert "spikes" not in watch.log.diagnose().finding.tolist()
