"""Tiny seeded models and data shared by the tests."""

from __future__ import annotations

import os

import keras
import numpy as np
import pytest

import gradwatch

#: The kind of model that the core tests record: "mixin" (`gradwatch.Sequential` and
#: `gradwatch.Model`) or "plain" (`keras.Sequential` and `keras.Model`, with nothing but a
#: `GradWatch`). Chosen by GRADWATCH_TEST_MODELS; tests/test_backends.py runs the core
#: tests again with "plain", on each backend.
KIND = os.environ.get("GRADWATCH_TEST_MODELS", "mixin")
if KIND not in ("mixin", "plain"):
    raise ValueError(f"GRADWATCH_TEST_MODELS must be 'mixin' or 'plain'. Received: {KIND!r}")
Sequential = keras.Sequential if KIND == "plain" else gradwatch.Sequential
Model = keras.Model if KIND == "plain" else gradwatch.Model
#: Marks a test of what the mixin adds: it counts the steps run without a GradWatch
#: (and keeps its traced step across fits); a plain model counts the watched steps.
mixin_only = pytest.mark.skipif(
    KIND == "plain", reason="the mixin counts steps run without a GradWatch"
)


def data(n=40, features=5, outputs=2, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, features)).astype("float32")
    y = rng.normal(size=(n, outputs)).astype("float32")
    return x, y


def layers(regularize=True):
    reg = keras.regularizers.L2(0.01) if regularize else None
    return [
        keras.Input((5,)),
        keras.layers.Dense(4, activation="tanh", kernel_regularizer=reg, name="hidden"),
        keras.layers.Dense(2, name="out"),
    ]


def pair(regularize=True):
    """The model under test (a `Sequential` of `KIND`) and a plain keras.Sequential with the
    same starting weights."""
    watched = Sequential(layers(regularize), name="net")
    plain = keras.Sequential(layers(regularize), name="net")
    plain.set_weights(watched.get_weights())
    return watched, plain


class FailAt(keras.callbacks.Callback):
    """Raises RuntimeError from `on_train_batch_end` of the step numbered `step` (counted
    from 0 across the fit's epochs): a `fit` that ends early."""

    def __init__(self, step):
        super().__init__()
        self.at, self.step = step, 0

    def on_train_batch_end(self, batch, logs=None):
        step, self.step = self.step, self.step + 1
        if step == self.at:
            raise RuntimeError(f"a callback failed at step {step}")
