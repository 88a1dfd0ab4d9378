"""Draws the README's charts from a real, short training run with non-finite steps.

The run trains a small MLP for 3 epochs. One batch has outlier targets, and the
optimizer is a `LossScaleOptimizer` whose loss scale (2**120) is too high for
that batch: its scaled gradients overflow to Inf, the optimizer skips the
update and halves the scale, and training goes on. gradwatch records those
steps' NaN/Inf gradients, and every chart marks them in red.

    python examples/plots.py [OUTPUT_DIR]   # default: docs/images

It also writes the log to plots.parquet (the quickstart writes grads.parquet), for trying
the `gradwatch` command line on a log with non-finite steps.
"""

import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import gradwatch
import gradwatch.plot

out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images")
out.mkdir(parents=True, exist_ok=True)

keras.utils.set_random_seed(0)
x = np.random.normal(size=(1024, 16)).astype("float32")
y = np.tanh(x @ np.random.normal(size=(16, 1))).astype("float32")
y[20 * 32 : 21 * 32] *= 1e4  # batch 20 of each epoch: outlier targets

model = gradwatch.Sequential(
    [
        keras.Input((16,)),
        keras.layers.Dense(64, activation="relu", name="dense_in"),
        keras.layers.Dense(64, activation="relu", name="hidden_1"),
        keras.layers.Dense(64, activation="relu", name="hidden_2"),
        keras.layers.Dense(1, name="out"),
    ],
    name="mlp",
)
optimizer = keras.optimizers.LossScaleOptimizer(keras.optimizers.Adam(1e-3), initial_scale=2.0**120)
model.compile(optimizer, "mse")
watch = gradwatch.GradWatch(histogram=True, on_nonfinite="ignore")
model.fit(x, y, batch_size=32, epochs=3, shuffle=False, callbacks=[watch], verbose=0)

log = watch.log
print(log)
print("Non-finite steps:", sorted(set(log.alerts["step"])))
log.to_parquet("plots.parquet")  # for the command line: gradwatch report plots.parquet ...
charts = {
    "flow.png": gradwatch.plot.flow(log),
    "norms.png": gradwatch.plot.norms(log, variables="*kernel"),
    "heatmap.png": gradwatch.plot.heatmap(log),
    "histogram.png": gradwatch.plot.histogram(log, "hidden_1/kernel", steps=[0, 20, 50, 95]),
    "loss.png": gradwatch.plot.loss(log),
}
for name, fig in charts.items():
    fig.savefig(out / name, dpi=90, metadata={"Software": None})
    print("Wrote", out / name)
