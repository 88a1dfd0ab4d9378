"""A slow training that streams its log, run as a subprocess by test_serve.py.

`python serve_run.py live OUT`: a seeded `keras.Sequential` named `net` trains with
`GradWatch(path=OUT/log)` (the default `flush_every`: no part before the end), sleeping
`SLEEP` seconds after each step so that it runs while the test watches, until `AFTER`
steps after the file `OUT/go` appears (the test makes it once the page has shown a step).
At the end it writes the watch's in-memory log to `OUT/memory.parquet`.

`python serve_run.py crash OUT`: the same training, with a second watch that writes a
part at every drain (`OUT/ref`, `flush_every=1`), ends the process at step `CRASH`
with `os._exit`, as a killed process ends: no `on_train_end`, no last part.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")

import keras
import numpy as np

import gradwatch

STEPS, BATCH = 400, 4  # at most
SLEEP = 0.25
AFTER = 3
CRASH = 12


class Slow(keras.callbacks.Callback):
    def __init__(self, out: Path, mode: str):
        super().__init__()
        self.out, self.mode = out, mode
        self.left: int | None = None  # steps to go once `go` is there

    def on_train_batch_end(self, batch, logs=None):
        time.sleep(SLEEP)
        if self.mode == "crash" and batch == CRASH:
            os._exit(0)
        if self.mode == "live":
            if self.left is None and (self.out / "go").exists():
                self.left = AFTER
            if self.left is not None:
                self.left -= 1
                self.model.stop_training = self.left <= 0


def main(mode: str, out: Path) -> None:
    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [
            keras.Input((6,)),
            keras.layers.Dense(8, activation="tanh", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ],
        name="net",
    )
    model.compile(keras.optimizers.SGD(0.05), "mse")
    rng = np.random.default_rng(0)
    x = rng.normal(size=(STEPS * BATCH, 6)).astype("float32")
    y = rng.normal(size=(STEPS * BATCH, 1)).astype("float32")
    watch = gradwatch.GradWatch(path=out / "log", verbose=0)
    watches = [watch]
    if mode == "crash":
        watches.append(gradwatch.GradWatch(path=out / "ref", flush_every=1, verbose=0))
    model.fit(x, y, batch_size=BATCH, epochs=1, verbose=0, callbacks=[*watches, Slow(out, mode)])
    watch.log.to_parquet(out / "memory.parquet")


if __name__ == "__main__":
    main(sys.argv[1], Path(sys.argv[2]))
