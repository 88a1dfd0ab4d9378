"""`keras.callbacks.BackupAndRestore` with a streamed log: a run that crashes (an exception,
or SIGKILL) and resumes from its last backup reads as the uninterrupted run, and the steps
it trained again are kept as superseded."""

import functools
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import keras
import numpy as np
import pandas as pd
import pytest
from models import data

import gradwatch

TESTS = Path(__file__).resolve().parent
# 16 samples in batches of 4: steps 0-3 are epoch 0, 4-7 epoch 1, 8-11 epoch 2. The
# backup at the end of epoch 1 holds iterations 0-7; the crash comes before step 11.
X, Y = data(n=16)
CRASH = 11
COLUMNS = ["step", "epoch", "batch", "variable", "stat"]


def _model(kind):
    seeded = keras.initializers.GlorotUniform  # the same starting weights in every process
    cls = keras.Sequential if kind == "plain" else gradwatch.Sequential
    model = cls(
        [
            keras.Input((5,)),
            keras.layers.Dense(4, "tanh", kernel_initializer=seeded(seed=1), name="hidden"),
            keras.layers.Dense(2, kernel_initializer=seeded(seed=2), name="out"),
        ],
        name="net",
    )
    model.compile(keras.optimizers.Adam(0.01), "mse")
    return model


def _fit(model, callbacks):
    model.fit(X, Y, batch_size=4, epochs=3, shuffle=False, callbacks=callbacks, verbose=0)


class CrashAt(keras.callbacks.Callback):
    """Ends the training before the step at optimizer iteration `at`: with an exception,
    or with SIGKILL (the process dies as it would when the machine is taken away)."""

    def __init__(self, at, kill=False):
        super().__init__()
        self.at, self.kill = at, kill

    def on_train_batch_begin(self, batch, logs=None):
        if int(keras.ops.convert_to_numpy(self.model.optimizer.iterations)) == self.at:
            if self.kill:
                os.kill(os.getpid(), signal.SIGKILL)
            raise RuntimeError(f"crash before iteration {self.at}")


@functools.cache
def _reference(kind):
    """The uninterrupted run: its log's frame and its final weights."""
    model = _model(kind)
    watch = gradwatch.GradWatch()
    _fit(model, [watch])
    return watch.log.frame, [w.copy() for w in model.get_weights()]


def _check_history(path, kind, weights, first=0, superseded=()):
    """The log at `path` holds the uninterrupted run's steps from `first` on, each once
    with its values, and `superseded` (steps, as the crashed run recorded them)."""
    frame, final = _reference(kind)
    log = gradwatch.read_log(path)
    assert not log.frame.duplicated(["step", "variable", "stat"]).any()
    expected = frame[frame["step"] >= first].reset_index(drop=True)
    pd.testing.assert_frame_equal(log.frame[COLUMNS].astype(str), expected[COLUMNS].astype(str))
    np.testing.assert_array_equal(log.frame["value"], expected["value"])
    for a, b in zip(weights, final, strict=True):
        np.testing.assert_array_equal(a, b)  # bitwise
    assert [old.steps.tolist() for old in log.superseded] == (
        [list(superseded)] if superseded else []
    )
    for old in log.superseded:  # the crashed run recorded what the uninterrupted one did
        rows = frame[frame["step"].isin(superseded)].reset_index(drop=True)
        pd.testing.assert_frame_equal(old.frame[COLUMNS].astype(str), rows[COLUMNS].astype(str))
        np.testing.assert_array_equal(old.frame["value"], rows["value"])


@pytest.mark.parametrize(
    ("kind", "flush_every"),
    [(kind, flush) for kind in ("mixin", "plain") for flush in (1000, 3)],
)
def test_backup_and_restore_after_an_exception_reads_as_the_uninterrupted_run(
    tmp_path, kind, flush_every
):
    path, backup = tmp_path / "log", keras.callbacks.BackupAndRestore(tmp_path / "backup")
    model = _model(kind)
    crashed = gradwatch.GradWatch(path=path, flush_every=flush_every)
    with pytest.raises(RuntimeError, match="crash before iteration 11"):
        _fit(model, [backup, crashed, CrashAt(CRASH)])
    # The watch comes before the backup: the restore happens after its `on_train_begin`.
    resumed = gradwatch.GradWatch(path=path, flush_every=flush_every)
    _fit(model, [resumed, backup])
    assert int(model.optimizer.iterations.numpy()) == 12
    _check_history(path, kind, model.get_weights(), superseded=[8, 9, 10])
    assert resumed.log.steps.tolist() == list(range(12))  # the watch reads the same history


@pytest.mark.parametrize("streamed", [False, True])
def test_a_watch_used_again_after_the_crash_keeps_the_steps_it_trained_again_apart(
    tmp_path, streamed
):
    path = tmp_path / "log" if streamed else None
    backup = keras.callbacks.BackupAndRestore(tmp_path / "backup")
    model = _model("mixin")
    watch = gradwatch.GradWatch(path=path)
    with pytest.raises(RuntimeError, match="crash before iteration 11"):
        _fit(model, [backup, watch, CrashAt(CRASH)])
    _fit(model, [backup, watch])
    frame, final = _reference("mixin")
    log = watch.log
    pd.testing.assert_frame_equal(log.frame[COLUMNS].astype(str), frame[COLUMNS].astype(str))
    np.testing.assert_array_equal(log.frame["value"], frame["value"])
    assert [old.steps.tolist() for old in log.superseded] == [[8, 9, 10]]
    for a, b in zip(model.get_weights(), final, strict=True):
        np.testing.assert_array_equal(a, b)
    if streamed:  # the steps after the restore went to a run of their own
        assert len(list((tmp_path / "log" / "worker=0").iterdir())) == 2
        _check_history(path, "mixin", model.get_weights(), superseded=[8, 9, 10])


def test_a_backup_taken_mid_epoch_numbers_the_resumed_steps_from_its_iteration(tmp_path):
    # Backups every 3 batches: the last one before the crash is after step 8 (iteration
    # 9), in epoch 2. Keras restores the epoch, not the batch: the resumed run trains
    # epoch 2 from its first batch, from the weights of iteration 9.
    path = tmp_path / "log"
    backup = keras.callbacks.BackupAndRestore(tmp_path / "backup", save_freq=3)
    model = _model("mixin")
    with pytest.raises(RuntimeError, match="crash before iteration 11"):
        _fit(model, [backup, gradwatch.GradWatch(path=path), CrashAt(CRASH)])
    _fit(model, [gradwatch.GradWatch(path=path), backup])
    assert int(model.optimizer.iterations.numpy()) == 13
    log = gradwatch.read_log(path)
    assert not log.frame.duplicated(["step", "variable", "stat"]).any()
    rows = log.frame.drop_duplicates("step")
    assert rows["step"].tolist() == list(range(13))
    assert rows["epoch"].tolist() == [0] * 4 + [1] * 4 + [2] + [2] * 4
    assert rows["batch"].tolist() == [0, 1, 2, 3] * 2 + [0] + [0, 1, 2, 3]
    assert [old.steps.tolist() for old in log.superseded] == [[9, 10]]
    # Up to the backup, the history is the uninterrupted run's.
    frame, _ = _reference("mixin")
    before = log.frame[log.frame["step"] < 9].reset_index(drop=True)
    np.testing.assert_array_equal(before["value"], frame[frame["step"] < 9]["value"])


# One process per crash: each child resumes the previous configuration's crash, then
# starts and kills its own, so two configurations take three processes. Each kind of
# model and each `flush_every` (nothing written before the kill, or parts) once: the
# four pairs are each resumed after an exception above, in this process.
CONFIGS = [("mixin", 1000), ("plain", 3)]
CHILD = f"""
import sys
sys.path.insert(0, {str(TESTS)!r})
from test_backup_restore import run_actions
run_actions(sys.argv[1])
"""


def run_actions(actions_file):
    """In a child process: each `[action, kind, flush_every, directory]` in turn; "crash"
    trains until SIGKILL, "resume" trains to the end and saves the final weights."""
    for action, kind, flush_every, directory in json.loads(Path(actions_file).read_text()):
        directory = Path(directory)
        keras.utils.set_random_seed(1234)
        model = _model(kind)
        backup = keras.callbacks.BackupAndRestore(directory / "backup")
        watch = gradwatch.GradWatch(path=directory / "log", flush_every=flush_every)
        if action == "crash":
            _fit(model, [backup, watch, CrashAt(CRASH, kill=True)])
            raise AssertionError("the training outlived its SIGKILL")
        _fit(model, [watch, backup])
        np.savez(directory / "weights.npz", *model.get_weights())


@pytest.fixture(scope="module")
def killed_and_resumed(tmp_path_factory):
    """Every configuration of CONFIGS, killed at iteration 11 and resumed: its directory."""
    root = tmp_path_factory.mktemp("sigkill")
    dirs = {config: root / f"{config[0]}-{config[1]}" for config in CONFIGS}
    script = root / "child.py"
    script.write_text(CHILD)
    env = {**os.environ, "PYTHONPATH": str(TESTS.parent)}
    for i in range(len(CONFIGS) + 1):
        actions = []
        if i > 0:
            actions.append(["resume", *CONFIGS[i - 1], str(dirs[CONFIGS[i - 1]])])
        if i < len(CONFIGS):
            actions.append(["crash", *CONFIGS[i], str(dirs[CONFIGS[i]])])
        (root / f"actions{i}.json").write_text(json.dumps(actions))
        run = subprocess.run(
            [sys.executable, str(script), str(root / f"actions{i}.json")],
            env=env,
            capture_output=True,
            text=True,
        )
        expected = -signal.SIGKILL if i < len(CONFIGS) else 0
        assert run.returncode == expected, run.stderr[-3000:]
    return dirs


@pytest.mark.parametrize(("kind", "flush_every"), CONFIGS)
def test_backup_and_restore_after_sigkill_reads_as_the_uninterrupted_run(
    killed_and_resumed, kind, flush_every
):
    directory = killed_and_resumed[(kind, flush_every)]
    with np.load(directory / "weights.npz") as saved:
        weights = [saved[f"arr_{i}"] for i in range(len(saved.files))]
    if flush_every == 1000:
        # The killed run wrote nothing: the log holds the resumed steps 8-11, and the
        # steps of the backup's epochs are lost with the process that recorded them.
        _check_history(directory / "log", kind, weights, first=8)
    else:
        # Parts of 3 steps: 0-2, 3-5 and 6-8 reached the disk; steps 9 and 10 died with
        # the process. Step 8 was trained again after the restore.
        _check_history(directory / "log", kind, weights, superseded=[8])
