"""Training runs under `keras.distribution` on JAX, run as subprocesses by
test_jax_distribution.py.

`python jax_distribution_run.py single OUT` trains on eight CPU devices, which JAX
creates only from `XLA_FLAGS=--xla_force_host_platform_device_count=8` set before it
starts (the test process runs TensorFlow, with one device), once under each
distribution of `CONFIGS`. `python jax_distribution_run.py process INDEX PORT OUT` is
process INDEX of two, each with two CPU devices, after
`jax.distributed.initialize("127.0.0.1:PORT", num_processes=2, process_id=INDEX)`,
training under `DataParallel` over the four devices (JAX's CPU collectives, gloo).
Each writes what it saw to OUT; the tests compare it with a plain `tf.GradientTape`
loop on one device over the same global batches from the same weights.
"""

from __future__ import annotations

import json
import os
import sys
from pathlib import Path

#: Global batches of 8 rows, two epochs of four steps each; 8 inputs, 4 outputs, so
#: that every kernel dimension divides by the mesh axes.
N, BATCH, EPOCHS, FEATURES, OUTPUTS = 32, 8, 2, 8, 4
#: The distributions of a single process, by name: the kernels' layout, the mesh shape,
#: how many of the eight devices it takes.
CONFIGS = {
    "data": None,  # DataParallel over the eight devices
    "model": ((None, "model"), (2, 4), 8),  # kernels sharded on the model axis
    "both": (("batch", "model"), (2, 2), 4),  # kernels sharded on both axes of a 2x2 mesh
}


def data():
    import numpy as np

    rng = np.random.default_rng(0)
    x = rng.normal(size=(N, FEATURES)).astype("float32")
    y = rng.normal(size=(N, OUTPUTS)).astype("float32")
    return x, y


def layers():
    import keras

    return [
        keras.Input((FEATURES,)),
        keras.layers.Dense(
            8, activation="tanh", kernel_regularizer=keras.regularizers.L2(0.01), name="hidden"
        ),
        keras.layers.Dense(OUTPUTS, name="out"),
    ]


def _distribution(name: str):
    import keras

    devices = keras.distribution.list_devices()
    if CONFIGS[name] is None:
        return keras.distribution.DataParallel(devices=devices)
    spec, shape, n = CONFIGS[name]
    mesh = keras.distribution.DeviceMesh(shape, ["batch", "model"], devices[:n])
    layout_map = keras.distribution.LayoutMap(mesh)
    layout_map[".*kernel"] = spec
    return keras.distribution.ModelParallel(layout_map=layout_map, batch_dim_name="batch")


def _fit_pair(out: Path, name: str, watch, x, y, batch_size: int) -> dict:
    """Trains a watched and a plain model from the same weights under the current
    distribution; saves the start and both ends, and the watch's log."""
    import keras
    import numpy as np

    keras.utils.set_random_seed(3)
    watched = keras.Sequential(layers(), name="net")
    plain = keras.Sequential(layers(), name="net")
    plain.set_weights(watched.get_weights())
    for model in (watched, plain):
        model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse")
    np.savez(out / f"{name}_start.npz", *watched.get_weights())
    for model, callbacks in ((watched, [watch]), (plain, [])):
        model.fit(
            x,
            y,
            batch_size=batch_size,
            epochs=EPOCHS,
            shuffle=False,
            callbacks=callbacks,
            verbose=0,
        )
    np.savez(out / f"{name}_watched.npz", *watched.get_weights())
    np.savez(out / f"{name}_plain.npz", *plain.get_weights())
    buffer = watch._planner.buffer
    return {
        "kernels": {v.path: str(v.value.sharding.spec) for v in watched.trainable_variables},
        "state_replicated": all(v.value.sharding.is_fully_replicated for v in buffer.variables),
    }


def _refused(fn) -> str:
    """The error `fn` raises, or '' if it raises none."""
    try:
        fn()
    except Exception as e:  # the test checks the type and the words
        return f"{type(e).__name__}: {e}"
    return ""


def single(out: Path) -> None:
    import jax
    import keras
    import numpy as np

    import gradwatch

    results = {"devices": jax.device_count()}
    x, y = data()
    for name in CONFIGS:
        keras.distribution.set_distribution(_distribution(name))
        watch = gradwatch.GradWatch(values="*")
        results[name] = _fit_pair(out, name, watch, x, y, BATCH)
        watch.log.to_parquet(out / f"{name}.parquet")
    # per_replica under DataParallel: refused before any step runs.
    keras.distribution.set_distribution(_distribution("data"))
    model = keras.Sequential(layers(), name="net")
    model.compile("sgd", "mse")
    before = model.get_weights()
    watch = gradwatch.GradWatch(per_replica=True)
    results["per_replica"] = _refused(
        lambda: model.fit(x, y, batch_size=BATCH, callbacks=[watch], verbose=0)
    )
    results["per_replica_untouched"] = (
        all(np.array_equal(a, b) for a, b in zip(before, model.get_weights(), strict=True))
        and len(watch.log) == 0
    )
    (out / "single.json").write_text(json.dumps(results))


def process(index: int, port: int, out: Path) -> None:
    import jax

    jax.config.update("jax_num_cpu_devices", 2)
    jax.distributed.initialize(f"127.0.0.1:{port}", num_processes=2, process_id=index)
    import keras
    import numpy as np

    import gradwatch

    distribution = keras.distribution.DataParallel(devices=keras.distribution.list_devices())
    # Each process hands `fit` its own half of every global batch (NumPy arrays).
    distribution.auto_shard_dataset = False
    keras.distribution.set_distribution(distribution)
    x, y = data()
    half = BATCH // 2
    starts = [s * BATCH + index * half for s in range(N // BATCH)]
    rows = np.concatenate([np.arange(a, a + half) for a in starts])
    results = {
        "devices": jax.device_count(),
        "local_devices": jax.local_device_count(),
        "process_index": jax.process_index(),
    }
    runs = {
        "chief_only": gradwatch.GradWatch(values="*", path=out / "chief_only"),
        "all_workers": gradwatch.GradWatch(values="*", path=out / "all_workers", all_workers=True),
    }
    for name, watch in runs.items():
        results[name] = _fit_pair(out, f"{name}_{index}", watch, x[rows], y[rows], half)
        # What this process holds, written or not.
        watch.log.to_parquet(out / f"{name}_memory_{index}.parquet")
    (out / f"process_{index}.json").write_text(json.dumps(results))


if __name__ == "__main__":
    # Set here, not on import: the test imports `data` and `layers` from this file.
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    os.environ["KERAS_BACKEND"] = "jax"
    if sys.argv[1] == "single":
        # Eight devices; and the compiled train steps as text, where the test looks for
        # the collectives that move gradwatch's ring buffer (there must be none).
        os.environ["XLA_FLAGS"] = (
            f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count=8 "
            f"--xla_dump_to={Path(sys.argv[2]) / 'hlo'} --xla_dump_hlo_as_text "
            "--xla_dump_hlo_module_re=.*train_step.* --xla_dump_hlo_pass_re=^$"
        )
        single(Path(sys.argv[2]))
    else:
        process(int(sys.argv[2]), int(sys.argv[3]), Path(sys.argv[4]))
