"""`log.origins`: in `fit`, the first step that `on_nonfinite` kept from the model is
replayed on the weights from before it, and the log names where its first NaN or Inf was
born; the row is saved and read back, and the message, the doctor and the report name it.

The replay engine itself is pinned by tests/test_trace.py; these tests check that `fit`
hands it the right batch, on the right weights, with the rows' indices in the data.
"""

from __future__ import annotations

import keras
import numpy as np
import pandas as pd
import pytest
from keras import ops
from reference import BACKEND

import gradwatch

# Run again under JAX and PyTorch (tests/test_backends.py).
pytestmark = pytest.mark.backends

COLUMNS = ["step", "stage", "layer", "op", "rows", "samples", "detail"]
N, BATCH = 32, 4  # 8 steps an epoch


def _op(name):
    return name if BACKEND == "tensorflow" else None


class LogSum(keras.layers.Layer):
    """`log` of each row's sum: -inf for an all-zero row."""

    def call(self, x):
        return ops.log(ops.sum(x, axis=-1, keepdims=True))


def _data(seed=0):
    rng = np.random.default_rng(seed)
    x = (np.abs(rng.normal(size=(N, 3))) + 0.5).astype("float32")
    y = rng.normal(size=(N, 1)).astype("float32")
    return x, y


def _model(loss="mse", **compile_kwargs):
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((3,)),
            keras.layers.Dense(3, use_bias=False, name="d"),
            LogSum(name="log_sum"),
        ],
        name="net",
    )
    # Without a bias, only an all-zero row makes log(0) (a kernel of ones: every row's
    # sum is positive before training).
    model.get_layer("d").set_weights([np.ones((3, 3), "float32")])
    model.compile(keras.optimizers.SGD(0.01), loss, **compile_kwargs)
    return model


def _fit(x, y, watch, model=None, **kwargs):
    model = model or _model()
    kwargs.setdefault("shuffle", False)
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[watch], **kwargs)
    return model


def _row(log):
    assert list(log.origins.columns) == COLUMNS
    assert len(log.origins) == 1
    return log.origins.iloc[0].to_dict()


@pytest.fixture(scope="module")
def zero_row_fit():
    """Sample 22 is all zeros: step 5 (rows 20-23), row 2, makes log(0) in `log_sum`."""
    x, y = _data()
    x[22] = 0.0
    watch = gradwatch.GradWatch(on_nonfinite="skip", stats=["norm", "nonfinite"])
    with pytest.warns(UserWarning) as said:
        model = _fit(x, y, watch)
    return watch, model, [str(w.message) for w in said]


def test_origins_of_log_of_zero_in_a_custom_layer(zero_row_fit):
    watch, _, _ = zero_row_fit
    row = _row(watch.log)
    assert row["step"] == 5
    assert (row["stage"], row["layer"], row["op"]) == ("forward", "net/log_sum", _op("Log"))
    assert row["rows"] == (2,)
    assert row["samples"] == (22,)  # 5 * 4 + 2
    assert "all zeros" in row["detail"]
    assert list(watch.log.skipped_steps) == [5]


def test_origins_message_names_the_source_on_one_line(zero_row_fit):
    _, _, said = zero_row_fit
    [message] = [m for m in said if "Non-finite" in m]
    assert "\n" not in message
    born = "born in the forward pass of layer net/log_sum"
    op = f" (op {_op('Log')})" if _op("Log") else ""
    assert f"Non-finite gradients at step 5, {born}{op}, rows [2] (samples [22])" in message
    assert "Its update was skipped" in message


def test_origins_in_the_doctor_and_the_report(zero_row_fit):
    watch, _, _ = zero_row_fit
    findings = watch.log.diagnose()
    [nonfinite] = findings[findings["finding"] == "nonfinite"].to_dict("records")
    born = "born in the forward pass of layer net/log_sum"
    assert f"Replayed, step 5's first NaN/Inf was {born}" in nonfinite["evidence"]
    assert nonfinite["advice"].startswith(f"Guard {_op('Log') or 'its ops'} in layer net/log_sum")
    # The step `on_nonfinite` kept is not a loss-scale optimizer's skip.
    assert "loss_scale" not in set(findings["finding"])
    assert list(watch.log.kept_steps) == [5]
    from gradwatch.report import verdict as verdict_of

    verdict = verdict_of(watch.log)
    assert verdict.level == "problem"
    assert any(born in fact for fact in verdict.facts)
    assert "LossScaleOptimizer" not in " ".join(verdict.facts)


def test_origins_in_gradwatch_doctor(zero_row_fit, tmp_path, capsys):
    from gradwatch.cli import main

    zero_row_fit[0].log.to_parquet(tmp_path / "log.parquet")
    assert main(["doctor", str(tmp_path / "log.parquet")]) == 1
    out = capsys.readouterr().out
    assert "born in the forward pass of layer net/log_sum" in out
    assert "Guard" in out


def test_origins_survive_csv_parquet_and_read_log(zero_row_fit, tmp_path):
    log = zero_row_fit[0].log
    for name in ("log.csv", "log.parquet"):
        path = tmp_path / name
        (log.to_csv if name.endswith("csv") else log.to_parquet)(path)
        back = gradwatch.read_log(path)
        pd.testing.assert_frame_equal(back.origins, log.origins)
        assert list(back.skipped_steps) == [5]
        assert back == log


def test_origins_of_a_streamed_log(tmp_path):
    x, y = _data()
    x[22] = 0.0
    watch = gradwatch.GradWatch(on_nonfinite="skip", path=tmp_path / "run")
    with pytest.warns(UserWarning, match="born in the forward pass"):
        _fit(x, y, watch)
    back = gradwatch.read_log(tmp_path / "run")
    row = _row(back)
    assert (row["step"], row["stage"], row["layer"], row["rows"], row["samples"]) == (
        5,
        "forward",
        "net/log_sum",
        (2,),
        (22,),
    )


def test_origins_of_a_nan_in_one_input_row_with_stop(capsys):
    x, y = _data()
    x[13, 1] = np.nan  # step 3, row 1
    watch = gradwatch.GradWatch(on_nonfinite="stop")
    _fit(x, y, watch)
    row = _row(watch.log)
    assert (row["step"], row["stage"], row["layer"], row["op"]) == (3, "input", None, None)
    assert (row["rows"], row["samples"]) == ((1,), (13,))
    out = capsys.readouterr().out
    assert "step 3, born in the input `x`, rows [1] (samples [13])" in out


def test_origins_of_a_nan_in_one_target_and_unknown_samples_when_shuffled():
    x, y = _data()
    y[6, 0] = np.nan  # step 1, row 2 without shuffling
    watch = gradwatch.GradWatch(on_nonfinite="skip")
    with pytest.warns(UserWarning, match="born in the targets"):
        _fit(x, y, watch, shuffle=True)
    row = _row(watch.log)
    assert (row["stage"], row["layer"], row["op"], len(row["rows"])) == ("target", None, None, 1)
    assert row["samples"] is None  # shuffled: the rows' places in the data are unknown


def _over_row_sum(y_true, y_pred):
    # Each row's loss divides by its target's sum: a target of 0 divides by zero.
    return ops.mean(ops.square(y_pred) / ops.sum(y_true, axis=-1, keepdims=True), axis=-1)


def test_origins_of_a_division_by_zero_in_a_custom_loss():
    x, y = _data()
    y = np.abs(y) + 1.0
    y[9, 0] = 0.0  # step 2, row 1
    watch = gradwatch.GradWatch(on_nonfinite="skip")
    with pytest.warns(UserWarning, match="born in the loss"):
        _fit(x, y, watch, model=_model(loss=_over_row_sum))
    row = _row(watch.log)
    assert (row["step"], row["stage"], row["layer"]) == (2, "loss", None)
    assert (row["rows"], row["samples"]) == ((1,), (9,))


def test_origins_of_a_healthy_run_are_empty_with_the_columns(tmp_path):
    x, y = _data()
    watch = gradwatch.GradWatch(on_nonfinite="skip")
    _fit(x, y, watch)
    assert list(watch.log.origins.columns) == COLUMNS
    assert watch.log.origins.empty
    watch.log.to_parquet(tmp_path / "log.parquet")
    back = gradwatch.read_log(tmp_path / "log.parquet")
    assert list(back.origins.columns) == COLUMNS and back.origins.empty


@pytest.mark.skipif(BACKEND == "torch", reason="Keras runs one step per execution on PyTorch")
def test_origins_say_the_step_could_not_be_replayed_where_later_steps_moved_the_weights():
    x, y = _data()
    x[22] = 0.0  # step 5: the second of the execution of steps 4-7
    watch = gradwatch.GradWatch(on_nonfinite="skip")
    with pytest.warns(UserWarning, match="not replayed"):
        _fit(x, y, watch, model=_model(steps_per_execution=4))
    row = _row(watch.log)
    assert (row["step"], row["stage"], row["rows"], row["samples"]) == (5, None, (), None)
    assert "could not be replayed on the weights of that step" in row["detail"]


@pytest.mark.skipif(BACKEND == "torch", reason="Keras runs one step per execution on PyTorch")
def test_origins_with_steps_per_execution_replay_the_last_step_of_an_execution():
    x, y = _data()
    x[30] = 0.0  # step 7, row 2: the last of the execution of steps 4-7
    watch = gradwatch.GradWatch(on_nonfinite="skip")
    with pytest.warns(UserWarning, match="born in the forward pass"):
        _fit(x, y, watch, model=_model(steps_per_execution=4))
    row = _row(watch.log)
    assert (row["step"], row["stage"], row["layer"], row["rows"], row["samples"]) == (
        7,
        "forward",
        "net/log_sum",
        (2,),
        (30,),
    )


@pytest.mark.skipif(BACKEND != "tensorflow", reason="an XLA step keeps the batch on TF only")
def test_origins_of_an_xla_step_say_it_could_not_be_replayed():
    x, y = _data()
    x[22] = 0.0
    watch = gradwatch.GradWatch(on_nonfinite="skip")
    with pytest.warns(UserWarning, match="not replayed"):
        _fit(x, y, watch, model=_model(jit_compile=True))
    row = _row(watch.log)
    assert (row["step"], row["stage"], row["layer"], row["rows"]) == (5, None, None, ())
    assert "jit_compile=True" in row["detail"]
    assert "gradwatch.trace_nonfinite" in row["detail"]


def test_origins_of_a_log_written_before_them_read_empty(zero_row_fit, tmp_path):
    import json

    import pyarrow.parquet as pq

    log = zero_row_fit[0].log
    log.to_parquet(tmp_path / "new.parquet")
    table = pq.read_table(tmp_path / "new.parquet")
    meta = json.loads(table.schema.metadata[b"gradwatch"])
    del meta["origins"], meta["skipped_by_gradwatch"]  # as gradwatch wrote them before
    old = {**table.schema.metadata, b"gradwatch": json.dumps(meta).encode()}
    pq.write_table(table.replace_schema_metadata(old), tmp_path / "old.parquet")
    back = gradwatch.read_log(tmp_path / "old.parquet")
    assert list(back.origins.columns) == COLUMNS and back.origins.empty
    # Who skipped step 5 is unknown: read as before, a loss-scale optimizer's skip.
    assert list(back.skipped_steps) == [5] and list(back.kept_steps) == []
    assert "loss_scale" in set(back.diagnose()["finding"])
