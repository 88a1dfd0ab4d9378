"""Faults and odd input: disconnected variables, big tensors, interrupts, SIGKILL."""

import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from models import data, pair

import gradwatch


def test_values_on_a_big_variable_is_a_value_error_with_the_size():
    x, y = data(n=8)
    model, _ = pair()
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(values="*kernel", max_value_elements=10)
    with pytest.raises(ValueError, match=r"'net/hidden/kernel': 20.*max_value_elements=10"):
        model.fit(x, y, callbacks=[watch], verbose=0)
    with pytest.raises(ValueError, match="Received: max_value_elements=0"):
        gradwatch.GradWatch(max_value_elements=0)


def test_keyboard_interrupt_flushes_the_log_before_it_propagates(tmp_path):
    class Interrupt(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            if batch == 7:
                raise KeyboardInterrupt

    x, y = data(n=80)
    model, _ = pair()
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(stats="norm", path=tmp_path / "run", flush_every=1000)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=8, callbacks=[watch, Interrupt()], verbose=0)
    np.testing.assert_array_equal(gradwatch.read_log(tmp_path / "run").steps, np.arange(7))


SCRIPT = textwrap.dedent(
    """
    import os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import keras, numpy as np
    import gradwatch
    keras.utils.set_random_seed(0)
    model = gradwatch.Sequential([keras.Input((4,)), keras.layers.Dense(3), keras.layers.Dense(1)])
    model.compile("sgd", "mse")
    x = np.random.rand(64, 4).astype("float32"); y = np.random.rand(64, 1).astype("float32")
    watch = gradwatch.GradWatch(path=sys.argv[1], flush_every=16)
    model.fit(x, y, batch_size=8, epochs=100000, callbacks=[watch], verbose=0)
    """
)


def test_sigkill_mid_training_leaves_a_readable_log(tmp_path):
    run = tmp_path / "run"
    script = tmp_path / "train.py"
    script.write_text(SCRIPT)
    env = {**os.environ, "PYTHONPATH": str(Path(__file__).resolve().parent.parent)}
    proc = subprocess.Popen([sys.executable, str(script), str(run)], env=env)
    try:
        deadline = time.monotonic() + 120
        while time.monotonic() < deadline:
            if run.exists() and len(list(run.rglob("part-*.parquet"))) >= 3:
                break
            assert proc.poll() is None, "the training process ended early"
            time.sleep(0.05)
        else:
            pytest.fail("no parts were written in time")
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    log = gradwatch.read_log(run)
    n = len(log.steps)
    assert n >= 48 and n % 16 == 0  # whole parts only: every step up to the last flush
    np.testing.assert_array_equal(log.steps, np.arange(n))
    assert log.stat("norm").notna().all().all()


class IntCounter(keras.layers.Layer):
    """A layer with a trainable int variable (Keras allows one; it has no gradient)."""

    def build(self, input_shape):
        self.count = self.add_weight(shape=(2,), dtype="int32", trainable=True, name="count")

    def call(self, x):
        return x


def test_non_float_trainable_variables_are_skipped_with_a_message():
    if keras.backend.backend() == "torch":
        pytest.skip("PyTorch itself refuses a trainable variable that is not floating point")
    model = gradwatch.Sequential(
        [keras.Input((3,)), IntCounter(name="ints"), keras.layers.Dense(1, name="d")]
    )
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(stats="norm")
    x, y = np.ones((8, 3), "float32"), np.zeros((8, 1), "float32")
    with pytest.warns(UserWarning) as caught:  # Keras warns about the missing gradient too
        model.fit(x, y, batch_size=8, callbacks=[watch], verbose=0)
    ours = [str(w.message) for w in caught if "not floating point" in str(w.message)]
    assert len(ours) == 1 and "ints/count" in ours[0]
    assert watch.log.variables == ["sequential/d/kernel", "sequential/d/bias"]
    assert watch.log.stat("norm").notna().all().all()
