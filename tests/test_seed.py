"""The three worked examples of the seed note on tf.GradientTape, reproduced through gradwatch."""

import keras
import numpy as np
import pytest
from keras import ops
from models import Sequential

import gradwatch

# Run again under JAX and PyTorch, and on plain models (tests/test_backends.py).
pytestmark = pytest.mark.backends


class Scalar(keras.layers.Layer):
    """One scalar variable `x`; outputs x for every sample."""

    def __init__(self, value, **kwargs):
        super().__init__(**kwargs)
        self.value = value

    def build(self, input_shape):
        self.x = self.add_weight(
            shape=(), initializer=keras.initializers.Constant(self.value), name="x"
        )

    def call(self, inputs):
        return ops.zeros_like(inputs) + self.x


def test_seed_example_1_gradient_of_x_squared_at_3_is_6():
    model = Sequential([keras.Input((1,)), Scalar(3.0, name="f")])
    model.compile("sgd", loss=lambda y_true, y_pred: ops.square(y_pred))  # y = x**2
    watch = gradwatch.GradWatch(values="x")
    model.fit(np.zeros((1, 1)), np.zeros((1, 1)), callbacks=[watch], verbose=0)
    assert float(watch.log.gradient("f/x", step=0)) == pytest.approx(6.0)


def test_seed_example_2_gradients_of_w_x_plus_b_are_4_and_1():
    dense = keras.layers.Dense(
        1,
        kernel_initializer=keras.initializers.Constant(2.0),  # w = 2
        bias_initializer=keras.initializers.Constant(1.0),  # b = 1
        name="linear",
    )
    model = Sequential([keras.Input((1,)), dense])
    model.compile("sgd", loss=lambda y_true, y_pred: y_pred)  # the target is y = w*x + b
    watch = gradwatch.GradWatch(values="*")
    model.fit(np.array([[4.0]]), np.zeros((1, 1)), callbacks=[watch], verbose=0)  # x = 4
    np.testing.assert_allclose(watch.log.gradient("linear/kernel", step=0), [[4.0]])
    np.testing.assert_allclose(watch.log.gradient("linear/bias", step=0), [1.0])


def test_seed_example_3_dense_kernel_minus_12_bias_minus_6():
    model = Sequential(
        [
            keras.Input((1,)),
            keras.layers.Dense(
                1, use_bias=True, kernel_initializer="ones", bias_initializer="zeros"
            ),
        ]
    )
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(values="*")
    model.fit(np.array([[2.0]]), np.array([[5.0]]), callbacks=[watch], verbose=0)
    np.testing.assert_allclose(watch.log.gradient("dense/kernel", step=0), [[-12.0]])
    np.testing.assert_allclose(watch.log.gradient("dense/bias", step=0), [-6.0])
    norms = watch.log.stat("norm")
    assert norms.loc[0, watch.log.key("dense/kernel")] == pytest.approx(12.0)
    assert norms.loc[0, watch.log.key("dense/bias")] == pytest.approx(6.0)
