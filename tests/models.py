"""Tiny seeded models and data shared by the tests."""

from __future__ import annotations

import keras
import numpy as np

import gradwatch


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
    """A gradwatch.Sequential and a plain keras.Sequential with the same starting weights."""
    watched = gradwatch.Sequential(layers(regularize), name="net")
    plain = keras.Sequential(layers(regularize), name="net")
    plain.set_weights(watched.get_weights())
    return watched, plain
