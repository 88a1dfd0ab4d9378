"""The benchmark models: built the same way for plain Keras and for gradwatch."""

from __future__ import annotations

import keras
import numpy as np

#: Set by a benchmark's `--smoke`: the models are cut down (the MLP to 2 hidden layers), so
#: that CI's smoke run checks every code path of the harness without the full models'
#: tracing time. Its numbers are not the benchmark's.
SMOKE = False


def mlp(cls):
    """MLP 10x256, batch 64: short steps, where per-op overhead dominates (2x256 in smoke)."""
    layers = [keras.Input((256,))]
    layers += [keras.layers.Dense(256, activation="relu") for _ in range(2 if SMOKE else 10)]
    layers += [keras.layers.Dense(10)]
    return cls(layers)


def cnn(cls):
    """3 blocks of (conv + batch norm), 32x32x3 input."""
    layers = [keras.Input((32, 32, 3))]
    for filters in (32, 64, 64):
        layers += [
            keras.layers.Conv2D(filters, 3, padding="same"),
            keras.layers.BatchNormalization(),
            keras.layers.Activation("relu"),
            keras.layers.MaxPooling2D(),
        ]
    layers += [keras.layers.GlobalAveragePooling2D(), keras.layers.Dense(10)]
    return cls(layers)


class EncoderBlock(keras.layers.Layer):
    def __init__(self, dim=64, heads=4, ff=128, **kwargs):
        super().__init__(**kwargs)
        self.attn = keras.layers.MultiHeadAttention(heads, dim // heads)
        self.norm1 = keras.layers.LayerNormalization()
        self.ff1 = keras.layers.Dense(ff, activation="gelu")
        self.ff2 = keras.layers.Dense(dim)
        self.norm2 = keras.layers.LayerNormalization()

    def call(self, x):
        x = self.norm1(x + self.attn(x, x))
        return self.norm2(x + self.ff2(self.ff1(x)))


def transformer(cls):
    """A small Transformer encoder: 4 blocks, 68 trainable variables."""
    inputs = keras.Input((32,), dtype="int32")
    x = keras.layers.Embedding(1000, 64)(inputs)
    for _ in range(4):
        x = EncoderBlock()(x)
    outputs = keras.layers.Dense(10)(keras.layers.GlobalAveragePooling1D()(x))
    return _functional(cls, inputs, outputs)


def many(cls):
    """504 small variables: 252 parallel Dense(4) branches, summed."""
    inputs = keras.Input((16,))
    branches = [keras.layers.Dense(4)(inputs) for _ in range(252)]
    outputs = keras.layers.Dense(10)(keras.layers.Add()(branches))
    return _functional(cls, inputs, outputs)


def embedding(cls):
    """A 100k x 64 embedding table (sparse gradients) under a small classifier."""
    return cls(
        [
            keras.Input((20,), dtype="int32"),
            keras.layers.Embedding(100_000, 64),
            keras.layers.GlobalAveragePooling1D(),
            keras.layers.Dense(10),
        ]
    )


def _functional(cls, inputs, outputs):
    # `cls` is keras.Sequential or gradwatch.Sequential; use the matching Model.
    import gradwatch

    model_cls = gradwatch.Model if issubclass(cls, gradwatch.GradWatchMixin) else keras.Model
    return model_cls(inputs, outputs)


MODELS = {"mlp": mlp, "cnn": cnn, "transformer": transformer, "many": many, "embedding": embedding}


def data(name: str, n: int, seed: int = 0):
    rng = np.random.default_rng(seed)
    y = rng.integers(0, 10, size=(n,))
    if name == "mlp":
        return rng.normal(size=(n, 256)).astype("float32"), y
    if name == "cnn":
        return rng.normal(size=(n, 32, 32, 3)).astype("float32"), y
    if name == "transformer":
        return rng.integers(0, 1000, size=(n, 32)).astype("int32"), y
    if name == "embedding":
        return rng.integers(0, 100_000, size=(n, 20)).astype("int32"), y
    return rng.normal(size=(n, 16)).astype("float32"), y
