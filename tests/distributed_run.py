"""Training runs under tf.distribute, run as subprocesses by test_distributed.py.

`python distributed_run.py mirrored OUT` trains on two logical CPU devices, which
TensorFlow lets a process set up only before it first uses its devices; the test
process has long done so. `python distributed_run.py worker INDEX OUT` is one
worker of a MultiWorkerMirroredStrategy cluster that `TF_CONFIG` describes.
Each writes what it saw to OUT; the tests compare that with a plain
tf.GradientTape reference on one device.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
os.environ.setdefault("KERAS_BACKEND", "tensorflow")
sys.path.insert(0, str(Path(__file__).resolve().parent))

import tensorflow as tf

N, BATCH, EPOCHS = 32, 8, 2  # four global batches of 8 per epoch, split over two replicas
# An embedding run: two global batches of 4 (row 1 repeats; rows 2 and 5 are never touched).
SPARSE_IDS = [
    [1, 1, 3],
    [0, 1, 3],
    [3, 3, 3],
    [1, 0, 4],
    [4, 4, 1],
    [0, 3, 1],
    [1, 1, 1],
    [4, 0, 3],
]


def _model(strategy, **compile_kwargs):
    """A seeded gradwatch.Sequential built under `strategy`.

    Under MultiWorkerMirroredStrategy, Keras 3.15's `fit` fails with or without
    gradwatch: it reduces the first batch's (x, y) tuple, which that strategy's
    `reduce` rejects, and reduces each scalar log along axis 0. The model is
    therefore built from one host batch before `fit`, and its step returns its
    logs with a leading axis of 1.
    """
    import keras
    from models import data, layers

    import gradwatch

    class Net(gradwatch.Sequential):
        def train_step(self, batch):
            logs = super().train_step(batch)
            return {k: tf.reshape(v, [1]) for k, v in logs.items()}

    multi_worker = isinstance(strategy, tf.distribute.MultiWorkerMirroredStrategy)
    keras.utils.set_random_seed(3)
    with strategy.scope():
        model = (Net if multi_worker else gradwatch.Sequential)(layers(regularize=True), name="net")
        model.compile(
            **{
                "optimizer": keras.optimizers.SGD(0.1, momentum=0.9),
                "loss": "mse",
                **compile_kwargs,
            }
        )
    if multi_worker:
        x, y = data(n=N)
        model._maybe_symbolic_build(data_batch=(x[:BATCH], y[:BATCH]))
        model._maybe_symbolic_build = lambda iterator=None, data_batch=None: None
    return model


def _error(fn) -> str:
    """The message of the error `fn` raises, or '' if it raises none."""
    try:
        fn()
    except Exception as e:  # the tests check the type and the words
        return f"{type(e).__name__}: {e}"
    return ""


def _fit_pair(strategy, out: Path, name: str, watch, loss_scale=None, **opt) -> None:
    """Trains a watched and a plain model from the same weights; saves both weights.
    With `loss_scale`, both optimizers are wrapped in a LossScaleOptimizer of that
    initial scale."""
    import keras
    import numpy as np
    from models import data, layers

    import gradwatch

    keras.utils.set_random_seed(3)
    x, y = data(n=N)
    with strategy.scope():
        watched = gradwatch.Sequential(layers(regularize=True), name="net")
        plain = keras.Sequential(layers(regularize=True), name="net")
        plain.set_weights(watched.get_weights())
        for model in (watched, plain):
            optimizer = keras.optimizers.SGD(0.1, momentum=0.9, **opt)
            if loss_scale is not None:
                optimizer = keras.optimizers.LossScaleOptimizer(optimizer, initial_scale=loss_scale)
            model.compile(optimizer, "mse")
    np.savez(out / f"{name}_start.npz", *watched.get_weights())
    for model, callbacks in ((watched, [watch]), (plain, [])):
        model.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, callbacks=callbacks, verbose=0
        )
    np.savez(out / f"{name}_watched.npz", *watched.get_weights())
    np.savez(out / f"{name}_plain.npz", *plain.get_weights())
    watch.log.to_parquet(out / f"{name}.parquet")


def _limits(strategy) -> dict[str, str]:
    """The errors of a watched fit with steps_per_execution=2 and with jit_compile=True."""
    from models import data

    import gradwatch

    x, y = data(n=N)
    found = {}
    for key, kwargs in (("spe", {"steps_per_execution": 2}), ("jit", {"jit_compile": True})):
        model = _model(strategy, **kwargs)
        found[key] = _error(
            lambda m=model: m.fit(
                x, y, batch_size=BATCH, callbacks=[gradwatch.GradWatch()], verbose=0
            )
        )
    return found


def _sparse(strategy, out: Path) -> None:
    """An Embedding's sparse gradients under the strategy: all stats, per replica too."""
    import keras
    import numpy as np

    import gradwatch

    ids = np.asarray(SPARSE_IDS, "int32")
    y = np.linspace(-1, 1, ids.size * 2).reshape(*ids.shape, 2).astype("float32")
    keras.utils.set_random_seed(5)
    with strategy.scope():
        model = gradwatch.Sequential(
            [keras.Input((3,), dtype="int32"), keras.layers.Embedding(6, 2, name="emb")],
            name="sparse",
        )
        model.compile(keras.optimizers.SGD(0.1), "mse")
    np.save(out / "sparse_start.npy", model.get_weights()[0])
    watch = gradwatch.GradWatch(stats=gradwatch.stats.GRADIENT_STATS, per_replica=True)
    model.fit(ids, y, batch_size=4, shuffle=False, callbacks=[watch], verbose=0)
    watch.log.to_parquet(out / "sparse.parquet")


def _fit_skipping(watched, plain, x, y):
    """Fits `watched` with `GradWatch(on_nonfinite="skip")` on `x, y` (40 rows, a NaN in
    the batch of step 2), and `plain`, from the same weights, on the other batches alone;
    returns the watch."""
    import warnings

    import numpy as np

    import gradwatch

    plain.set_weights(watched.get_weights())
    watch = gradwatch.GradWatch(on_nonfinite="skip", verbose=0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        watched.fit(x, y, batch_size=8, shuffle=False, verbose=0, callbacks=[watch])
    keep = np.ones(40, bool)
    keep[16:24] = False
    plain.fit(x[keep], y[keep], batch_size=8, shuffle=False, verbose=0)
    return watch


def _skip(strategy) -> dict:
    """`on_nonfinite="skip"` under the strategy: a NaN target in one replica's half of the
    batch of step 2; every replica skips that update, as a plain run without the batch."""

    import keras
    import numpy as np
    from models import data, layers

    x, y = data(n=40)
    y[17, 0] = np.nan  # the batch of step 2
    models = []
    for _ in range(2):
        with strategy.scope():
            m = keras.Sequential(layers(), name="net")
            m.compile(optimizer=keras.optimizers.Adam(0.01), loss="mse")
        models.append(m)
    watched, plain = models
    watch = _fit_skipping(watched, plain, x, y)
    pairs = list(zip(watched.get_weights(), plain.get_weights(), strict=True))
    optimizers = zip(watched.optimizer.variables, plain.optimizer.variables, strict=True)
    pairs += [(np.asarray(a), np.asarray(b)) for a, b in optimizers]
    return {
        "equal": all(np.array_equal(a, b) for a, b in pairs),
        "finite": all(np.isfinite(a).all() for a, _ in pairs),
        "skipped": [int(s) for s in watch.log.skipped_steps],
        "batch": watch.skipped_batch is None,
        # The step's batch stays on the devices: its row of `log.origins` says so.
        "origins": [
            {"step": int(row.step), "stage": row.stage, "layer": row.layer, "detail": row.detail}
            for row in watch.log.origins.itertuples()
        ],
    }


def _skip_two_optimizers(strategy) -> dict:
    """The same with two optimizers in a custom step: `a` (its loss never sees `y`) is
    applied first, then `b`, whose gradient alone is NaN at step 2; both skip the step."""

    import keras
    import numpy as np
    from models import data

    class TwoParts(keras.Model):
        def __init__(self):
            super().__init__(name="two")
            self.a = keras.layers.Dense(1, name="a")
            self.b = keras.layers.Dense(1, name="b")

        def call(self, x):
            return self.a(x) + self.b(x)

        def compile(self, opt_a, opt_b):
            super().compile()
            self.opt_a, self.opt_b = opt_a, opt_b

        def train_step(self, data):
            x, y = data[0], data[1]
            for layer, opt, target in (
                (self.a, self.opt_a, tf.ones_like(y)),
                (self.b, self.opt_b, y),
            ):
                with tf.GradientTape() as tape:
                    loss = tf.reduce_mean(tf.square(target - layer(x)))
                grads = tape.gradient(loss, layer.trainable_weights)
                opt.apply_gradients(zip(grads, layer.trainable_weights, strict=True))
            return {"loss": loss}

    x, y = data(n=40)
    y[17, 0] = np.nan  # the batch of step 2
    models = []
    for _ in range(2):
        with strategy.scope():
            m = TwoParts()
            m(x[:1])
            m.compile(keras.optimizers.Adam(0.01), keras.optimizers.SGD(0.1))
            # Built here: an optimizer built in the replicas' first step fails under
            # MirroredStrategy, with or without gradwatch (Keras 3.15).
            m.opt_a.build(m.a.trainable_weights)
            m.opt_b.build(m.b.trainable_weights)
        models.append(m)
    watched, plain = models
    watch = _fit_skipping(watched, plain, x, y)
    pairs = list(zip(watched.get_weights(), plain.get_weights(), strict=True))
    for mine, theirs in ((watched.opt_a, plain.opt_a), (watched.opt_b, plain.opt_b)):
        pairs += [
            (np.asarray(a), np.asarray(b))
            for a, b in zip(mine.variables, theirs.variables, strict=True)
        ]
    return {
        "equal": all(np.array_equal(a, b) for a, b in pairs),
        "finite": all(np.isfinite(a).all() for a, _ in pairs),
        "skipped": [int(s) for s in watch.log.skipped_steps],
    }


def mirrored(out: Path) -> None:
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    from models import data, layers

    import gradwatch

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    results = {"replicas": strategy.num_replicas_in_sync, "limits": _limits(strategy)}
    # Keras' own limit, without gradwatch: when Keras lifts it, gradwatch's check can go.
    with strategy.scope():
        model = keras.Sequential(layers(), name="net")
        model.compile("sgd", "mse", steps_per_execution=2)
    x, y = data(n=N)
    results["keras_spe"] = _error(lambda: model.fit(x, y, batch_size=BATCH, verbose=0))
    stats = ("norm", "mean", "std", "min", "max", "nonfinite", "clipped_norm")
    _fit_pair(
        strategy,
        out,
        "plain",
        gradwatch.GradWatch(stats=stats, values="*", per_replica=True, path=out / "log"),
    )
    _fit_pair(
        strategy,
        out,
        "clipped",
        gradwatch.GradWatch(stats=("norm", "clipped_norm"), per_replica=True),
        clipnorm=0.05,
    )
    # Each replica's tape gradient is 2**10 times its local gradient here: the per-replica
    # stats, like the global ones, must be of the gradient divided by the loss scale.
    _fit_pair(
        strategy,
        out,
        "scaled",
        gradwatch.GradWatch(stats=("norm", "mean", "std", "min", "max"), per_replica=True),
        loss_scale=2.0**10,
    )
    _sparse(strategy, out)
    results["skip"] = _skip(strategy)
    results["skip_two_optimizers"] = _skip_two_optimizers(strategy)
    (out / "mirrored.json").write_text(json.dumps(results))


def noise(out: Path) -> None:
    """A watched fit at a learning rate of 0 (the weights stay the initial ones, saved)
    under MirroredStrategy: its gradient noise scale, in memory and streamed. 29 rows in
    global batches of 8: the last one, 5 rows, is split 3 + 2 over the replicas."""
    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    import numpy as np
    from models import data, layers

    import gradwatch

    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    keras.utils.set_random_seed(5)
    with strategy.scope():
        model = gradwatch.Sequential(layers(regularize=True), name="net")
        model.compile(keras.optimizers.SGD(0.0), "mse")
    np.savez(out / "noise_weights.npz", *model.get_weights())
    x, y = data(n=29)
    watch = gradwatch.GradWatch(stats=("norm",), per_replica=True, path=out / "noise_log")
    model.fit(x, y, batch_size=BATCH, shuffle=False, callbacks=[watch], verbose=0)
    watch.log.to_csv(out / "noise.csv")


def worker(index: int, out: Path) -> None:
    import numpy as np
    from models import data

    import gradwatch

    strategy = tf.distribute.MultiWorkerMirroredStrategy()
    results = {"replicas": strategy.num_replicas_in_sync, "limits": _limits(strategy)}
    x, y = data(n=N)
    runs = {
        "chief_only": gradwatch.GradWatch(values="*", path=out / "chief_only"),
        "all_workers": gradwatch.GradWatch(
            values="*", per_replica=True, path=out / "all_workers", all_workers=True
        ),
    }
    for name, watch in runs.items():
        model = _model(strategy)
        np.savez(out / f"{name}_start_{index}.npz", *model.get_weights())
        model.fit(
            x, y, batch_size=BATCH, epochs=EPOCHS, shuffle=False, callbacks=[watch], verbose=0
        )
        # What this worker holds, written or not.
        watch.log.to_parquet(out / f"{name}_memory_{index}.parquet")
    (out / f"worker_{index}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    if sys.argv[1] == "mirrored":
        mirrored(Path(sys.argv[2]))
    elif sys.argv[1] == "noise":
        noise(Path(sys.argv[2]))
    else:
        worker(int(sys.argv[2]), Path(sys.argv[3]))
