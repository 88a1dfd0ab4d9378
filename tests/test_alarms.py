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


def test_nonfinite_is_checked_on_steps_that_every_skips():
    watch = gradwatch.GradWatch(stats="norm", every=10)
    with pytest.warns(UserWarning, match="at step 3"):
        _fit(watch)
    assert watch.log.first_nonfinite()[0] == 3
    np.testing.assert_array_equal(watch.log.steps, [0])  # step 3 itself was not recorded


def test_nonfinite_stop_keeps_the_log(tmp_path):
    watch = gradwatch.GradWatch(stats="norm", on_nonfinite="stop", path=tmp_path / "run")
    model = _fit(watch, epochs=3)
    assert model.stop_training
    steps = gradwatch.read_log(tmp_path / "run").steps
    # Stopped a step or two after step 3 (callbacks run asynchronously), not at the end.
    assert 3 in steps and steps[-1] < 8
    np.testing.assert_array_equal(steps, np.arange(len(steps)))


def test_nonfinite_raise_writes_the_log_first(tmp_path):
    watch = gradwatch.GradWatch(stats="norm", on_nonfinite="raise", path=tmp_path / "run")
    with pytest.raises(
        FloatingPointError, match=r"step 3: \['net/hidden/kernel'.*record the `nonfinite` stat"
    ):
        _fit(watch, epochs=3)
    log = gradwatch.read_log(tmp_path / "run")
    assert 3 in log.steps
    assert log.first_nonfinite()[0] == 3


def test_nonfinite_ignore_is_silent():
    watch = gradwatch.GradWatch(stats=("norm", "nonfinite"), on_nonfinite="ignore")
    _fit(watch)  # filterwarnings=error: any warning would fail this test
    assert watch.log.first_nonfinite()[0] == 3  # still visible in the recorded stats


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


def test_min_norm_threshold_warns():
    x, y = data(n=16)
    model, _ = pair()
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(stats="norm", min_norm=1e6)
    with pytest.warns(UserWarning, match="min_norm=1000000.0 at step 0"):
        model.fit(x, y, batch_size=8, callbacks=[watch], verbose=0)
    assert set(watch.log.alerts["kind"]) == {"min_norm"}


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
