"""A `fit` that ends early, however it ends, keeps every step it ran: on disk by the time
the exception leaves `fit`, for plain models and the mixin alike, and the model gets its
class back. SIGKILL keeps every part written before it."""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from background import RUNS
from components import HANG, ctrl_c_raises, require
from crash_run import END, FLUSH_EVERY, PER_EPOCH
from models import FailAt, data, layers
from reference import batches_of, mse, tape_gradients

import gradwatch
import gradwatch._logdata.files
import gradwatch.buffer

ROOT = Path(__file__).resolve().parent.parent
CHILD = ROOT / "tests" / "crash_run.py"
ALL = ("callback", "data", "data_spe2", "keyboard", "exit", "nonfinite", "sigint", "sigkill")
# (backend, model kind) -> the endings its child runs, in this order (`sigkill` ends it).
CHILDREN = {
    ("tensorflow", "plain"): ALL,
    ("tensorflow", "mixin"): ALL,
    ("jax", "plain"): ("callback", "data", "data_spe2"),
    ("torch", "plain"): ("callback", "data"),
}
CASES = [(b, k, e) for (b, k), endings in CHILDREN.items() for e in endings]
RAISED = {
    "callback": "RuntimeError",
    "keyboard": "KeyboardInterrupt",
    "sigint": "KeyboardInterrupt",
    "exit": "SystemExit",
    "nonfinite": "FloatingPointError",
}


def _installed(backend: str) -> bool:
    return importlib.util.find_spec(backend) is not None


@pytest.fixture(scope="module")
def children(tmp_path_factory):
    """Runs the children at once (those of the installed backends), sends each its
    SIGINT and SIGKILL once it says it is ready, and returns their output folders."""
    outs = {}
    for (backend, kind), endings in CHILDREN.items():
        if not _installed(backend):
            continue
        key = f"crash-{backend}-{kind}"
        out = outs[backend, kind] = tmp_path_factory.mktemp(key)
        env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT))
        env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
        RUNS.start(key, [sys.executable, str(CHILD), kind, str(out), *endings], env, str(ROOT))
    sent: set[tuple[str, int]] = set()
    deadline = time.monotonic() + HANG
    running = {f"crash-{b}-{k}": out for (b, k), out in outs.items()}
    while running and time.monotonic() < deadline:
        for key, out in list(running.items()):
            if RUNS.poll(key) is not None:
                del running[key]
                continue
            for ending, signum in (("sigint", signal.SIGINT), ("sigkill", signal.SIGKILL)):
                if (out / f"{ending}.ready").exists() and (key, signum) not in sent:
                    RUNS.send_signal(key, signum)
                    sent.add((key, signum))
        time.sleep(0.05)  # polls the children; each ready file is waited for, not guessed
    results = {}
    for (backend, kind), out in outs.items():
        key = f"crash-{backend}-{kind}"
        done = RUNS.wait(key, timeout=max(1.0, deadline - time.monotonic()))
        results[backend, kind] = (out, done)
    return results


def _result(children, backend, kind, ending):
    require(
        _installed(backend),
        f"the {backend} backend is not installed; "
        f"install it with pip install 'gradwatch[{backend}]'",
    )
    out, done = children[backend, kind]
    expected = -signal.SIGKILL if "sigkill" in CHILDREN[backend, kind] else 0
    report = out / f"{ending}.json"
    assert done.returncode == expected and report.exists(), done.stderr[-3000:]
    return out, json.loads(report.read_text())


@pytest.mark.parametrize(("backend", "kind", "ending"), [c for c in CASES if c[2] != "sigkill"])
def test_crash_every_step_run_is_on_disk_when_fit_ends(children, backend, kind, ending):
    out, seen = _result(children, backend, kind, ending)
    if ending.startswith("data"):
        assert "the data source failed" in seen["message"]
    else:
        assert seen["raised"] == RAISED[ending]
    assert seen["class_restored"]
    # What is on disk is what a second watch recorded in memory in the same steps...
    disk = gradwatch.read_log(out / ending)
    memory = gradwatch.read_log(out / f"{ending}.memory.parquet")
    pd.testing.assert_frame_equal(disk.frame, memory.frame)
    if (backend, ending) == ("jax", "data_spe2"):
        # Keras deleted the state it had donated to the failed execution, weights and
        # device buffer alike: the log keeps epoch 0, drained at its end.
        assert seen["iterations"] is None
        np.testing.assert_array_equal(disk.steps, np.arange(PER_EPOCH))
        return
    # ...and holds every step that ran, from 0: Keras' own count where the step ran on a
    # batch; when the data fails, the batches it gave (steps 0..END-1). TensorFlow's
    # optimizer then counts one more iteration, for the fetch that failed with no step.
    ran = seen["iterations"]
    if ending.startswith("data"):
        assert ran in (END, END + 1)
        ran = END
    if ending == "nonfinite":
        # `on_nonfinite="raise"` kept step END's update, and those of the steps that ran
        # after it before `fit` ended, from the model: the optimizer counts the steps
        # before it (as for a LossScaleOptimizer's skipped steps), the log every step run.
        assert ran == END
        ran = int(disk.steps.max()) + 1
    np.testing.assert_array_equal(disk.steps, np.arange(ran))
    assert disk.frame["epoch"].max() >= 1  # epoch 0 drained to the host, epoch 1 on the device
    if ending in ("callback", "keyboard", "exit"):
        assert ran == END + 1  # raised at the end of step END
    elif ending in ("nonfinite", "sigint"):
        assert ran >= END + 1  # batch-end callbacks may lag a step; SIGINT comes later
    if ending == "nonfinite":
        assert "step 13" in seen["message"]
        assert disk.stat("nonfinite").loc[END].sum() > 0


@pytest.mark.parametrize(("backend", "kind"), [c[:2] for c in CASES if c[2] == "sigkill"])
def test_crash_sigkill_keeps_every_part_written(children, backend, kind):
    out, seen = _result(children, backend, kind, "sigkill")
    ran = seen["iterations"]
    assert ran == END + 1  # the child was killed after step END
    disk = gradwatch.read_log(out / "sigkill")
    written = len(disk.steps)
    # A part every FLUSH_EVERY recorded steps: at most that many are lost.
    assert ran - FLUSH_EVERY <= written <= ran
    np.testing.assert_array_equal(disk.steps, np.arange(written))
    memory = gradwatch.read_log(out / "sigkill.memory.parquet").frame
    pd.testing.assert_frame_equal(
        disk.frame, memory[memory["step"] < written].reset_index(drop=True)
    )


def test_crash_plain_model_is_plain_keras_again_after_fit_raises(tmp_path):
    x, y = data(n=40)
    model = keras.Sequential(layers(), name="net")
    twin = keras.Sequential(layers(), name="net")  # the same run, never watched
    ref = keras.Sequential(layers(), name="net")  # a tape loop over the same batches
    twin.set_weights(model.get_weights())
    ref.set_weights(model.get_weights())
    for m in (model, twin):
        m.compile(keras.optimizers.SGD(0.1), "mse")
    watch = gradwatch.GradWatch(stats="norm", path=tmp_path / "run")
    fit = dict(batch_size=4, epochs=2, shuffle=False, verbose=0)
    # Step 12 is epoch 1's third: epoch 0 drained to the host, 10-12 still on the device.
    with pytest.raises(RuntimeError, match="step 12"):
        model.fit(x, y, callbacks=[watch, FailAt(12)], **fit)
    disk = gradwatch.read_log(tmp_path / "run")  # as the exception left `fit`
    grads = tape_gradients(ref, keras.optimizers.SGD(0.1), (batches_of(x, y, 4) * 2)[:13], mse)
    np.testing.assert_array_equal(disk.steps, np.arange(13))
    for j, key in enumerate(disk.variables):
        expected = [np.linalg.norm(g[j]) for g in grads]
        np.testing.assert_allclose(disk.stat("norm")[key], expected, rtol=1e-5)
    assert type(model) is keras.Sequential

    with pytest.raises(RuntimeError, match="step 12"):
        twin.fit(x, y, callbacks=[FailAt(12)], **fit)
    for m in (model, twin):
        m.fit(x, y, **fit)
    for a, b in zip(model.get_weights(), twin.get_weights(), strict=True):
        np.testing.assert_array_equal(a, b)


@pytest.fixture
def ctrl_c():
    """SIGINT raises KeyboardInterrupt for the test (`components.ctrl_c_raises`); the
    handler is put back after."""
    previous = signal.getsignal(signal.SIGINT)
    ctrl_c_raises()
    yield
    signal.signal(signal.SIGINT, previous)


@pytest.mark.parametrize("where", ["after_copy", "in_part"])
def test_crash_ctrl_c_in_a_drain_loses_no_step(ctrl_c, tmp_path, monkeypatch, where):
    """A real SIGINT delivered at the worst moment: right after the ring buffer's slots
    were copied to the host (before the store has them), or while a part is written.
    The KeyboardInterrupt still ends `fit`, and the log on disk holds every step run."""
    original = {
        "after_copy": gradwatch.buffer.GradientBuffer.drain,
        "in_part": gradwatch._logdata.files.append_part,
    }[where]
    sent = []

    def interrupted(*args, **kwargs):
        out = original(*args, **kwargs)
        if not sent:
            sent.append(True)
            signal.raise_signal(signal.SIGINT)  # Python runs the handler at once
        return out

    if where == "after_copy":
        monkeypatch.setattr(gradwatch.buffer.GradientBuffer, "drain", interrupted)
    else:
        monkeypatch.setattr(gradwatch._logdata.files, "append_part", interrupted)
    x, y = data(n=40)
    model = keras.Sequential(layers(), name="net")
    ref = keras.Sequential(layers(), name="net")
    ref.set_weights(model.get_weights())
    model.compile(keras.optimizers.SGD(0.1), "mse")
    # A part every 4 steps: the first part is written (and interrupted) at step 4.
    watch = gradwatch.GradWatch(stats="norm", path=tmp_path / "run", flush_every=4, verbose=0)
    with pytest.raises(KeyboardInterrupt):
        model.fit(x, y, batch_size=4, epochs=2, shuffle=False, callbacks=[watch], verbose=0)
    assert sent
    ran = int(model.optimizer.iterations.numpy())
    assert ran >= 1
    disk = gradwatch.read_log(tmp_path / "run")
    np.testing.assert_array_equal(disk.steps, np.arange(ran))
    grads = tape_gradients(ref, keras.optimizers.SGD(0.1), (batches_of(x, y, 4) * 2)[:ran], mse)
    for j, key in enumerate(disk.variables):
        expected = [np.linalg.norm(g[j]) for g in grads]
        np.testing.assert_allclose(disk.stat("norm")[key], expected, rtol=1e-5)
    assert type(model) is keras.Sequential
