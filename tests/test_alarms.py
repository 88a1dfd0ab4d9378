"""on_nonfinite and thresholds: checked at every step, warn / stop / raise, nothing lost."""

import keras
import numpy as np
import pytest
from models import data, pair

import gradwatch


def _poisoned(n=80, bad_step=3):
    """Data whose batch `bad_step` (batch size 8) has a NaN input: NaN gradients there."""
    x, y = data(n=n)
    x[bad_step * 8 + 2, 1] = np.nan
    return x, y


def _fit(watch, epochs=1, n=80, **fit):
    x, y = _poisoned(n)
    model, _ = pair(regularize=False)
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(x, y, batch_size=8, epochs=epochs, shuffle=False, callbacks=[watch], verbose=0, **fit)
    return model


@pytest.mark.backends
@pytest.mark.plain_models
def test_nonfinite_warns_once_naming_the_first_step_and_variables():
    watch = gradwatch.GradWatch(stats=("norm", "nonfinite"))
    with pytest.warns(
        UserWarning, match=r"Non-finite gradients at step 3: \{'net/hidden/kernel': "
    ):
        _fit(watch)
    log = watch.log
    step, keys = log.first_nonfinite()
    assert step == 3 and "net/hidden/kernel" in keys
    alerts = log.alerts
    assert list(alerts.columns) == ["step", "variable", "kind", "value"]
    assert set(alerts["kind"]) == {"nonfinite"}
    assert alerts["step"].min() == 3
    kernel = alerts[(alerts.step == 3) & (alerts.variable == "net/hidden/kernel")]
    recorded = log.stat("nonfinite").loc[3, "net/hidden/kernel"]
    assert kernel["value"].item() == recorded > 0


@pytest.mark.backends
@pytest.mark.plain_models
def test_nonfinite_is_checked_on_steps_that_every_skips():
    watch = gradwatch.GradWatch(stats="norm", every=10)
    with pytest.warns(UserWarning, match="at step 3"):
        _fit(watch)
    assert watch.log.first_nonfinite()[0] == 3
    np.testing.assert_array_equal(watch.log.steps, [0])  # step 3 itself was not recorded


@pytest.mark.backends
@pytest.mark.plain_models
def test_nonfinite_stop_keeps_the_log(tmp_path):
    watch = gradwatch.GradWatch(stats="norm", on_nonfinite="stop", path=tmp_path / "run")
    model = _fit(watch, epochs=3)
    assert model.stop_training
    log = gradwatch.read_log(tmp_path / "run")
    # Where in epoch 0 training stops depends on when Keras' asynchronous batch-end
    # callbacks run; what does not: the check trips in step 3, so training stops after
    # it at the earliest (steps 0-3 ran and are recorded), and Keras waits for those
    # callbacks at the end of the epoch, where GradWatch polls again, so it stops in
    # epoch 0 at the latest: at most its 10 steps (80 / 8), not the 30 of 3 epochs.
    steps = log.steps
    np.testing.assert_array_equal(steps, np.arange(len(steps)))
    assert 4 <= len(steps) <= 10
    assert (log.frame["epoch"] == 0).all()
    # The offending step is the one reported, for the variables whose gradient had NaN.
    alerts = log.alerts
    assert set(alerts["kind"]) == {"nonfinite"} and set(alerts["step"]) == {3}
    assert "net/hidden/kernel" in set(alerts["variable"])


@pytest.mark.backends
@pytest.mark.plain_models
def test_nonfinite_raise_writes_the_log_first(tmp_path):
    watch = gradwatch.GradWatch(stats="norm", on_nonfinite="raise", path=tmp_path / "run")
    with pytest.raises(
        FloatingPointError,
        match=r"step 3, born in the input `x`, rows \[2\] \(samples \[26\]\): "
        r"\['net/hidden/kernel'.*record the `nonfinite` stat",
    ):
        _fit(watch, epochs=3)
    log = gradwatch.read_log(tmp_path / "run")
    assert 3 in log.steps
    assert log.first_nonfinite()[0] == 3
    # The replayed source is written out before the error too.
    assert log.origins[["step", "stage", "rows"]].values.tolist() == [[3, "input", (2,)]]


@pytest.mark.backends
@pytest.mark.plain_models
def test_nonfinite_ignore_is_silent():
    watch = gradwatch.GradWatch(stats=("norm", "nonfinite"), on_nonfinite="ignore")
    _fit(watch)  # filterwarnings=error: any warning would fail this test
    assert watch.log.first_nonfinite()[0] == 3  # still visible in the recorded stats


@pytest.mark.backends
@pytest.mark.plain_models
def test_max_norm_threshold_alerts_and_stops():
    x, y = data(n=40)
    model, _ = pair()
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(stats="norm", max_norm=1e-6, on_threshold="stop")
    model.fit(x, y, batch_size=8, epochs=3, callbacks=[watch], verbose=0)
    assert model.stop_training
    alerts = watch.log.alerts
    assert set(alerts["kind"]) == {"max_norm"}
    assert alerts["step"].min() == 0
    norms = watch.log.stat("norm")
    for row in alerts.itertuples():
        assert row.value == pytest.approx(norms.loc[row.step, row.variable])


@pytest.mark.backends
@pytest.mark.plain_models
def test_min_norm_threshold_warns():
    x, y = data(n=16)
    model, _ = pair()
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(stats="norm", min_norm=1e6)
    with pytest.warns(UserWarning, match="min_norm=1000000.0 at step 0"):
        model.fit(x, y, batch_size=8, callbacks=[watch], verbose=0)
    assert set(watch.log.alerts["kind"]) == {"min_norm"}


@pytest.mark.backends
@pytest.mark.plain_models
def test_alerts_round_trip_through_files(tmp_path):
    watch = gradwatch.GradWatch(stats=("norm", "nonfinite"), on_nonfinite="ignore")
    _fit(watch)
    watch.log.to_csv(tmp_path / "g.csv")
    back = gradwatch.read_log(tmp_path / "g.csv")
    assert back == watch.log
    assert back.alerts.equals(watch.log.alerts)


@pytest.mark.parametrize(
    ("kwargs", "match"),
    [
        (
            {"on_nonfinite": "panic"},
            r"`on_nonfinite` must be one of .*Received: on_nonfinite='panic'",
        ),
        ({"on_threshold": None}, r"Received: on_threshold=None"),
        ({"max_norm": -1.0}, r"Received: max_norm=-1.0"),
        ({"min_norm": "1"}, r"Received: min_norm='1'"),
    ],
)
def test_alarm_arguments_are_checked(kwargs, match):
    with pytest.raises(ValueError, match=match):
        gradwatch.GradWatch(**kwargs)


class _Weights(keras.callbacks.Callback):
    """The model's weights and the optimizer's loss scale, first and after each step."""

    def on_train_begin(self, logs=None):
        self.weights = [self.model.get_weights()]
        self.scales = [self.model.optimizer.initial_scale]

    def on_train_batch_end(self, batch, logs=None):
        self.weights.append(self.model.get_weights())
        self.scales.append(float(self.model.optimizer.dynamic_scale.numpy()))


def _loss_scaled_fit(watch, poisoned=False):
    """SGD in a LossScaleOptimizer whose first scale, 2**127, overflows the scaled gradients (about
    1e2 here) to Inf: the optimizer skips those steps and halves the scale until it fits."""
    x, y = _poisoned(n=80) if poisoned else data(n=80)
    y = 100 * y
    model, _ = pair(regularize=False)
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(1e-5), initial_scale=2.0**127
    )
    model.compile(optimizer, "mse")
    weights = _Weights()
    model.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch, weights], verbose=0, epochs=2)
    return model, weights


@pytest.mark.backends
@pytest.mark.plain_models
def test_steps_a_loss_scale_optimizer_skipped_are_recorded_and_marked():
    watch = gradwatch.GradWatch(stats=("norm", "nonfinite"), on_nonfinite="raise")
    _, seen = _loss_scaled_fit(watch)  # skipped steps do not raise: nothing bad was applied
    log = watch.log
    # Independent reference: a skipped step leaves every weight as it was and halves the scale.
    unchanged = [
        all(np.array_equal(a, b) for a, b in zip(before, after, strict=True))
        for before, after in zip(seen.weights, seen.weights[1:], strict=False)
    ]
    halved = [b == a / 2 for a, b in zip(seen.scales, seen.scales[1:], strict=False)]
    expected = np.flatnonzero(unchanged)
    assert len(expected) >= 2 and expected[-1] < len(log.steps) - 1  # some, not all
    np.testing.assert_array_equal(log.skipped_steps, expected)
    np.testing.assert_array_equal(np.flatnonzero(halved), expected)
    # Recorded as they were: the unscaled gradient overflowed there, and only there.
    nonfinite = log.stat("nonfinite").sum(axis=1)
    np.testing.assert_array_equal(np.flatnonzero(nonfinite.to_numpy() > 0), expected)
    assert log.first_nonfinite()[0] == expected[0]
    assert set(log.alerts["step"]) == set(expected)


@pytest.mark.backends
@pytest.mark.plain_models
def test_nonfinite_gradients_that_were_applied_still_alarm_beside_skipped_steps():
    # Without a loss scale the NaN batch is applied; with one it is skipped (and stays
    # silent), so only the plain optimizer raises.
    watch = gradwatch.GradWatch(stats=("norm", "nonfinite"), on_nonfinite="raise")
    _, _ = _loss_scaled_fit(watch, poisoned=True)
    assert 3 in watch.log.skipped_steps
    with pytest.raises(FloatingPointError, match="at step 3"):
        _fit(gradwatch.GradWatch(stats=("norm", "nonfinite"), on_nonfinite="raise"))


@pytest.mark.backends
@pytest.mark.plain_models
def test_skipped_steps_round_trip_through_files(tmp_path):
    watch = gradwatch.GradWatch(stats=("norm", "nonfinite"), path=tmp_path / "run", every=1)
    _loss_scaled_fit(watch)
    assert len(watch.log.skipped_steps)
    streamed = gradwatch.read_log(tmp_path / "run")
    np.testing.assert_array_equal(streamed.skipped_steps, watch.log.skipped_steps)
    watch.log.to_csv(tmp_path / "log.csv")
    assert gradwatch.read_log(tmp_path / "log.csv") == watch.log


@pytest.mark.backends
@pytest.mark.plain_models
def test_all_nan_gradient_has_nan_norm_and_is_no_min_norm_alert():
    # Batch 3 has a NaN input, so every element of every gradient there is NaN (the NaN
    # sample reaches every unit and every weight). Its norm is NaN, not 0: a vanishing
    # gradient alert (min_norm) would be wrong. filterwarnings=error: a min_norm
    # warning would fail this test; the non-finite one is expected.
    watch = gradwatch.GradWatch(stats=("norm", "nonfinite"), min_norm=1e-12)
    with pytest.warns(UserWarning, match="Non-finite gradients at step 3"):
        model = _fit(watch)
    log = watch.log
    norms, nonfinite = log.stat("norm"), log.stat("nonfinite")
    for v in model.trainable_weights:
        key = log.key(v.path)
        assert nonfinite.loc[3, key] == np.prod(v.shape)  # no finite element at all
        assert (norms.loc[:2, key] > 0).all()
        # From step 3 on the weights are NaN too: every later gradient is all NaN.
        assert norms.loc[3:, key].isna().all()
    alerts = log.alerts
    assert set(alerts["kind"]) == {"nonfinite"}
    assert set(alerts["step"]) == set(range(3, 10))


@pytest.mark.parametrize("every", [1, 10])
@pytest.mark.backends
@pytest.mark.plain_models
def test_thresholds_skip_non_finite_gradients_in_both_checks(every):
    # every=1: from the recorded stats; every=10 and "raise": the check in the step.
    watch = gradwatch.GradWatch(
        stats="norm", every=every, min_norm=1e-12, max_norm=1e6, on_threshold="raise"
    )
    with pytest.warns(UserWarning, match="Non-finite gradients at step 3"):
        _fit(watch)  # no FloatingPointError: step 3's NaN norms trip no threshold
    assert watch.log.first_nonfinite()[0] == 3
    assert set(watch.log.alerts["kind"]) == {"nonfinite"}


@pytest.mark.backends
@pytest.mark.plain_models
def test_nonfinite_stop_says_why_naming_the_step_and_variables(capfd):
    # As Keras' TerminateOnNaN prints "Batch 2: Invalid loss, terminating training".
    # Read from the process's own output (file descriptors 1 and 2), where it is printed.
    watch = gradwatch.GradWatch(stats=("norm", "nonfinite"), on_nonfinite="stop")
    capfd.readouterr()
    model = _fit(watch, epochs=3)
    print("stopped:", model.stop_training)
    out = capfd.readouterr().out
    lines = out.splitlines()
    said = [line for line in lines if line.startswith("GradWatch:")]
    assert len(said) == 1, out
    # The step was kept from the model and replayed: its NaN is row 2's input (sample 26).
    assert said[0].startswith(
        "GradWatch: Non-finite gradients at step 3, born in the input `x`, rows [2] "
        "(samples [26]): {"
    )
    assert "'net/hidden/kernel': 20" in said[0]  # 5 x 4 elements, all NaN
    assert "'net/out/bias': 2" in said[0]
    assert said[0].endswith("Terminating training.")
    assert lines[-1] == "stopped: True"
