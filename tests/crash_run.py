"""Trainings that end early, run as a subprocess by test_crash.py.

`python crash_run.py KIND OUT ENDING [ENDING ...]` trains a seeded `keras.Sequential`
(KIND `plain`) or `gradwatch.Sequential` (KIND `mixin`), one `fit` per ENDING, each
with a `GradWatch(path=OUT/ENDING)`, and ends that `fit` the ENDING's way (`ENDINGS`).
A second `GradWatch` without `path` records the same steps in memory: the child writes
that record to `OUT/ENDING.memory.parquet`, and what it saw after the `fit` (the
exception, the optimizer's update count, the model's class) to `OUT/ENDING.json`.

`sigint` and `sigkill` wait for the test: the child writes `OUT/ENDING.ready` once it
has trained `END + 1` steps, and the test then sends the signal. `sigint` trains on
until it comes; `sigkill` (last, as it ends the child) writes its record first and
then waits to be killed.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np
from components import ctrl_c_raises

import gradwatch

ctrl_c_raises()  # the `sigint` ending needs Ctrl-C's KeyboardInterrupt

BATCH, PER_EPOCH = 8, 10
END = 13  # the ending comes in the step numbered 13: epoch 1, batch 3
FLUSH_EVERY = 4  # of the `sigkill` run: a part every 4 recorded steps
STATS = ("norm", "nonfinite")
ENDINGS = (
    "callback",  # a callback's `on_train_batch_end` raises RuntimeError
    "data",  # the data (a generator) raises OSError
    "data_spe2",  # the same, with steps_per_execution=2 (where the backend has it)
    "keyboard",  # a callback raises KeyboardInterrupt
    "exit",  # a callback calls sys.exit(3)
    "nonfinite",  # a NaN batch, and GradWatch(on_nonfinite="raise")
    "sigint",  # a real SIGINT, sent by the test while training runs
    "sigkill",  # a real SIGKILL, sent by the test
)


def batches(x: np.ndarray, y: np.ndarray, ending: str):
    """The batches, epoch after epoch; the `data` endings raise at step `END`, and
    `nonfinite` makes that batch NaN."""
    step = 0
    while True:
        for i in range(PER_EPOCH):
            xb, yb = x[i * BATCH : (i + 1) * BATCH], y[i * BATCH : (i + 1) * BATCH]
            if step == END and ending.startswith("data"):
                raise OSError("the data source failed")
            if step == END and ending == "nonfinite":
                xb = np.full_like(xb, np.nan)
            yield xb, yb
            step += 1


class Raise(keras.callbacks.Callback):
    """Ends the `fit` from `on_train_batch_end` of step `END`, the ENDING's way."""

    def __init__(self, ending: str):
        super().__init__()
        self.ending, self.step = ending, 0

    def on_train_batch_end(self, batch, logs=None):
        step, self.step = self.step, self.step + 1
        if step != END:
            return
        if self.ending == "callback":
            raise RuntimeError("a callback failed at step 13")
        if self.ending == "keyboard":
            raise KeyboardInterrupt
        sys.exit(3)


class Ready(keras.callbacks.Callback):
    """Tells the test, once step `END` has run, that it may send its signal. Only
    `on_train_batch_begin`: Keras then still runs the batch-end callbacks asynchronously."""

    def __init__(self, ending: str, out: Path, memory: gradwatch.GradWatch):
        super().__init__()
        self.ending, self.out, self.memory = ending, out, memory
        self.step = 0

    def on_train_batch_begin(self, batch, logs=None):
        step, self.step = self.step, self.step + 1
        if step != END + 1:
            return
        if self.ending == "sigkill":
            self.memory.log.to_parquet(self.out / "sigkill.memory.parquet")
            report(self.out, "sigkill", None, self.model, type(self.model))
        (self.out / f"{self.ending}.ready").touch()
        while self.ending == "sigkill":  # until the test kills this process
            time.sleep(0.01)


def updates(model) -> int | None:
    """The optimizer's update count; None where Keras deleted it (JAX, a failed execution
    of `steps_per_execution` steps)."""
    try:
        return int(keras.ops.convert_to_numpy(model.optimizer.iterations))
    except RuntimeError:
        return None


def report(out: Path, ending: str, error: BaseException | None, model, cls) -> None:
    (out / f"{ending}.json").write_text(
        json.dumps(
            {
                "raised": None if error is None else type(error).__name__,
                "message": "" if error is None else str(error),
                "iterations": updates(model),
                "class_restored": type(model) is cls,
            }
        )
    )


def run(kind: str, out: Path, ending: str) -> None:
    keras.utils.set_random_seed(0)
    cls = keras.Sequential if kind == "plain" else gradwatch.Sequential
    model = cls(
        [
            keras.Input((4,)),
            keras.layers.Dense(3, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ],
        name="net",
    )
    spe = 2 if ending == "data_spe2" and keras.backend.backend() != "torch" else 1
    model.compile(keras.optimizers.SGD(0.05), "mse", steps_per_execution=spe)
    rng = np.random.default_rng(0)
    x = rng.normal(size=(BATCH * PER_EPOCH, 4)).astype("float32")
    y = rng.normal(size=(BATCH * PER_EPOCH, 1)).astype("float32")
    watch = gradwatch.GradWatch(
        stats=STATS,
        path=out / ending,
        flush_every=FLUSH_EVERY if ending == "sigkill" else 1000,
        on_nonfinite="raise" if ending == "nonfinite" else "ignore",
        verbose=0,
    )
    memory = gradwatch.GradWatch(stats=STATS, on_nonfinite="ignore", verbose=0)
    callbacks = [watch, memory]
    if ending in ("callback", "keyboard", "exit"):
        callbacks.append(Raise(ending))
    if ending in ("sigint", "sigkill"):
        callbacks.append(Ready(ending, out, memory))
    epochs = 10**6 if ending == "sigint" else 3
    error = None
    try:
        model.fit(
            batches(x, y, ending),
            steps_per_epoch=PER_EPOCH,
            epochs=epochs,
            callbacks=callbacks,
            verbose=0,
        )
    except BaseException as e:  # KeyboardInterrupt and SystemExit too
        error = e
    memory.log.to_parquet(out / f"{ending}.memory.parquet")
    report(out, ending, error, model, cls)


if __name__ == "__main__":
    kind, out = sys.argv[1], Path(sys.argv[2])
    for ending in sys.argv[3:]:
        run(kind, out, ending)
