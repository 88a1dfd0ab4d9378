"""Quickstart: train a small model with gradwatch and look at its gradients by name."""

import os

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import gradwatch

keras.utils.set_random_seed(0)
x = np.random.normal(size=(512, 8)).astype("float32")
y = (x @ np.linspace(-1, 1, 8)[:, None] + 0.1 * np.random.normal(size=(512, 1))).astype("float32")

model = keras.Sequential(
    [
        keras.Input((8,)),
        keras.layers.Dense(16, activation="relu", name="hidden"),
        keras.layers.Dense(1, name="out"),
    ],
    name="quickstart",
)
model.compile(optimizer="adam", loss="mse", steps_per_execution=4)

watch = gradwatch.GradWatch(values="hidden/kernel")  # default stats on every variable
model.fit(x, y, batch_size=32, epochs=3, callbacks=[watch], verbose=0)

log = watch.log
print(log)
g = log.gradient("hidden/kernel", step=10)  # named, not positional
print(f"\nGradient of hidden/kernel at step 10: shape {g.shape}, first row:")
print(np.array2string(g[0], precision=3, max_line_width=100))
print("\nPer-variable gradient norm, last steps:")
print(log.stat("norm").tail().round(4).to_string())

log.to_parquet("grads.parquet")
log.to_csv("grads.csv")
assert gradwatch.read_log("grads.parquet") == log
print(f"\nWrote grads.parquet and grads.csv ({len(log.frame)} stat rows).")
