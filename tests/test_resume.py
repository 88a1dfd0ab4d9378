"""Resuming a run into the same log: `model.save`, `keras.saving.load_model` (or
`keras.models.clone_model`), then `fit` with a new `GradWatch(path=...)` on the same path."""

import keras
import numpy as np
import pandas as pd
import pytest
from models import KIND, Model, Sequential, data

import gradwatch

# Run again under JAX and PyTorch (tests/test_backends.py).
pytestmark = pytest.mark.backends


@keras.saving.register_keras_serializable(package="test_resume")
class Net(*((keras.Model,) if KIND == "plain" else (gradwatch.GradWatchMixin, keras.Model))):
    """A subclassed model: its layers are created in `__init__`, built in the first step."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.inner = keras.layers.Dense(4, activation="tanh", name="hidden")
        self.head = keras.layers.Dense(2, name="out")

    def call(self, x):
        return self.head(self.inner(x))


def _model(kind):
    if kind == "sequential":  # no Input: built inside its first step
        layers = [keras.layers.Dense(4, activation="tanh", name="hidden")]
        return Sequential([*layers, keras.layers.Dense(2, name="out")], name="net")
    if kind == "functional":
        inputs = keras.Input((5,))
        hidden = keras.layers.Dense(4, activation="tanh", name="hidden")(inputs)
        return Model(inputs, keras.layers.Dense(2, name="out")(hidden), name="net")
    return Net(name="net")


def _fit(model, watch, epochs=1, initial_epoch=0):
    x, y = data(n=16)
    model.fit(
        x,
        y,
        batch_size=8,
        epochs=epochs,
        initial_epoch=initial_epoch,
        shuffle=False,
        callbacks=[watch],
        verbose=0,
    )


@pytest.mark.parametrize("kind", ["sequential", "functional", "subclassed"])
def test_a_run_resumed_after_load_model_reads_as_the_uninterrupted_run(tmp_path, kind):
    # The reference: the same seeded model trained for both epochs in one `fit`.
    reference = _model(kind)
    reference.compile(keras.optimizers.Adam(0.01), "mse")
    whole = gradwatch.GradWatch()
    _fit(reference, whole, epochs=2)

    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(1234)  # the reference's starting weights again
    model = _model(kind)
    model.compile(keras.optimizers.Adam(0.01), "mse")
    _fit(model, gradwatch.GradWatch(path=tmp_path / "log"), epochs=1)
    model.save(tmp_path / "model.keras")
    del model
    keras.backend.clear_session(free_memory=False)  # as in a new process
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    assert int(loaded.optimizer.iterations.numpy()) == 2
    second = gradwatch.GradWatch(path=tmp_path / "log")
    _fit(loaded, second, epochs=2, initial_epoch=1)

    log = gradwatch.read_log(tmp_path / "log")
    assert len(list((tmp_path / "log" / "worker=0").iterdir())) == 2  # a run per GradWatch
    assert not log.frame.duplicated(["step", "variable", "stat"]).any()
    assert log.variables == [
        "net/hidden/kernel",
        "net/hidden/bias",
        "net/out/kernel",
        "net/out/bias",
    ]
    assert log.variables == whole.log.variables
    frame, expected = log.frame, whole.log.frame
    columns = ["step", "epoch", "batch", "variable", "stat"]
    pd.testing.assert_frame_equal(frame[columns].astype(str), expected[columns].astype(str))
    np.testing.assert_allclose(frame["value"], expected["value"], rtol=1e-5, atol=1e-7)
    # The resumed watch's own log is the whole history too.
    assert sorted(set(second.log.frame["step"])) == [0, 1, 2, 3]


def test_a_clone_records_under_the_keys_of_its_original():
    # A subclassed model built in its first step: `variable.path` has the model's name
    # scope there, and not in a clone built outside it.
    original = _model("subclassed")
    original.compile("sgd", "mse")
    first = gradwatch.GradWatch(stats="norm")
    _fit(original, first)
    clone = keras.models.clone_model(original)
    clone.build((None, 5))
    clone.set_weights(original.get_weights())
    clone.compile("sgd", "mse")
    again = gradwatch.GradWatch(stats="norm")
    _fit(clone, again)
    assert [v.path for v in clone.trainable_weights] != [v.path for v in original.trainable_weights]
    assert (
        again.log.variables
        == first.log.variables
        == [
            "net/hidden/kernel",
            "net/hidden/bias",
            "net/out/kernel",
            "net/out/bias",
        ]
    )


def test_a_new_model_appended_to_a_log_continues_its_steps_with_a_warning(tmp_path):
    first = _model("functional")
    first.compile("sgd", "mse")
    _fit(first, gradwatch.GradWatch(path=tmp_path / "log"), epochs=2)  # steps 0-3
    fresh = _model("functional")  # its optimizer's `iterations` is 0
    fresh.compile("sgd", "mse")
    watch = gradwatch.GradWatch(path=tmp_path / "log")
    with pytest.warns(UserWarning, match=r"steps from 4, not from the model's own step count 0"):
        _fit(fresh, watch)
    steps = gradwatch.read_log(tmp_path / "log").frame.drop_duplicates(["step", "variable"])
    assert sorted(set(steps["step"])) == [0, 1, 2, 3, 4, 5]
    assert len(steps) == 6 * 4  # one row per step and variable and stat: no step twice
    # The model goes on counting from there: its next fit appends steps 6 and 7, and
    # warns no more (pytest makes warnings errors).
    _fit(fresh, watch)
    assert sorted(set(watch.log.frame["step"])) == list(range(8))


def test_steps_a_loss_scale_optimizer_skipped_are_not_numbered_twice(tmp_path):
    # The first batch's scaled gradients overflow: that update is skipped, so
    # `iterations` (which `model.save` keeps) is behind the steps the log holds.
    x, y = data(n=16)
    y[:8] *= 1e4
    model = _model("functional")
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.SGD(0.01), initial_scale=2.0**120
    )
    model.compile(optimizer, "mse")
    first = gradwatch.GradWatch(path=tmp_path / "log", on_nonfinite="ignore")
    model.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[first], verbose=0)
    skipped = first.log.skipped_steps.tolist()  # of steps 0-3
    assert skipped[:1] == [0] and len(skipped) < 4
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    applied = 4 - len(skipped)
    assert int(loaded.optimizer.iterations.numpy()) == applied
    match = rf"steps from 4, not from the model's own step count {applied}"
    second = gradwatch.GradWatch(path=tmp_path / "log", on_nonfinite="ignore")
    with pytest.warns(UserWarning, match=match):
        loaded.fit(x, y, batch_size=8, shuffle=False, callbacks=[second], verbose=0)
    log = gradwatch.read_log(tmp_path / "log")
    assert sorted(set(log.frame["step"])) == list(range(6))
    assert not log.frame.duplicated(["step", "variable", "stat"]).any()
    assert log.skipped_steps.tolist()[: len(skipped)] == skipped


def test_a_loaded_model_records_every_nth_step_of_its_own_count(tmp_path):
    x, y = data(n=24)  # 3 steps an epoch
    model = _model("functional")
    model.compile(keras.optimizers.SGD(0.01), "mse")
    model.fit(x, y, batch_size=8, shuffle=False, verbose=0)  # steps 0-2, no watch
    model.save(tmp_path / "model.keras")
    loaded = keras.saving.load_model(tmp_path / "model.keras")
    watch = gradwatch.GradWatch(every=2, stats="norm")
    loaded.fit(x, y, batch_size=8, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    # Steps 3-8: the even ones are recorded, numbered within their epoch from 0.
    frame = watch.log.frame
    assert sorted(set(frame["step"])) == [4, 6, 8]
    rows = frame.drop_duplicates("step").set_index("step")
    assert rows["batch"].to_dict() == {4: 1, 6: 0, 8: 2}
    assert rows["epoch"].to_dict() == {4: 0, 6: 1, 8: 1}
