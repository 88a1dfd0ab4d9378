"""keras.distribution on JAX: the global gradient under `DataParallel` and `ModelParallel`,
in one process of eight CPU devices and in two processes after `jax.distributed.initialize`.

The training runs in subprocesses (jax_distribution_run.py), all three at once: JAX makes
eight CPU devices only when told before it starts, this test process runs TensorFlow, and
a multi-process run needs two processes anyway. The expected values come from a plain
`tf.GradientTape` loop on one device, here, over the same global batches from the same
starting weights: independent of gradwatch and of JAX.
"""

import json
import re
import sys

import keras
import numpy as np
import pytest
from reference import batches_of, mse, np_stats

import gradwatch
from gradwatch._capture.plan import SLOTS

if keras.backend.backend() != "tensorflow":  # a rerun under JAX or PyTorch: not imported
    pytest.skip("the reference loop is TensorFlow's", allow_module_level=True)

import tensorflow as tf
from components import require
from jax_distribution_run import BATCH, CONFIGS, EPOCHS, data, layers
from test_distributed import HERE, _env, _reserved_ports, _run_all, _weights

SCRIPT = HERE / "jax_distribution_run.py"
RTOL, ATOL = 1e-5, 1e-6  # float32, summed in another order over the shards
KEYS = ["net/hidden/kernel", "net/hidden/bias", "net/out/kernel", "net/out/bias"]


def _jax_installed() -> bool:
    try:
        import jax  # noqa: F401
    except ImportError:
        return False
    return True


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
    require(_jax_installed(), "JAX is not installed (pip install '.[jax]')")
    out = tmp_path_factory.mktemp("jax_distribution")
    (out / "multi").mkdir()
    env = _env(KERAS_BACKEND="jax")
    env.pop("XLA_FLAGS", None)
    with _reserved_ports(1) as (port,):
        commands = [
            [sys.executable, str(SCRIPT), "single", str(out)],
            *(
                [sys.executable, str(SCRIPT), "process", str(i), str(port), str(out / "multi")]
                for i in range(2)
            ),
        ]
        _run_all(commands, [env] * 3, out)
    single = json.loads((out / "single.json").read_text())
    processes = [json.loads((out / "multi" / f"process_{i}.json").read_text()) for i in range(2)]
    return out, single, processes


def _reference(start):
    """Each step's gradient from a plain tape loop over the global batches, applying it
    as the optimizer does."""
    model = keras.Sequential(layers(), name="net")
    model.set_weights(start)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    x, y = data()
    steps = []
    for _ in range(EPOCHS):
        for xb, yb, _ in batches_of(x, y, BATCH):
            with tf.GradientTape() as tape:
                loss = mse(yb, model(xb, training=True)) + tf.add_n(model.losses)
            grads = tape.gradient(loss, model.trainable_weights)
            steps.append([np.asarray(g) for g in grads])
            optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
    return steps


def _assert_global_gradient(log, steps):
    """Every step's default stats are the reference gradient's, and the kept tensors
    are the whole reference gradient."""
    np.testing.assert_array_equal(log.steps, np.arange(len(steps)))
    for step, grads in enumerate(steps):
        for key, g in zip(KEYS, grads, strict=True):
            kept = log.gradient(key, step)
            assert kept.shape == g.shape  # the whole tensor, not a shard
            np.testing.assert_allclose(kept, g, rtol=RTOL, atol=ATOL)
            want = np_stats(g)
            for stat in gradwatch.DEFAULT_STATS:
                got = log.stat(stat).loc[step, key]
                assert got == pytest.approx(want[stat], rel=RTOL, abs=ATOL), (step, key, stat)


@pytest.mark.parametrize("config", list(CONFIGS))
def test_distribution_records_the_global_gradient_of_a_single_device_run(runs, config):
    out, single, _ = runs
    assert single["devices"] == 8
    log = gradwatch.read_log(out / f"{config}.parquet")
    _assert_global_gradient(log, _reference(_weights(out / f"{config}_start.npz")))


def test_model_parallel_shards_the_kernels_and_keeps_gradwatchs_state_replicated(runs):
    _, single, _ = runs
    want = {
        "data": "P(None, None)",
        "model": "P(None, 'model')",
        "both": "P('batch', 'model')",
    }
    for config, spec in want.items():
        kernels = single[config]["kernels"]
        assert kernels["net/hidden/kernel"] == kernels["net/out/kernel"] == spec
        assert kernels["net/hidden/bias"] == "P(None,)"
        # The ring buffer (its kept tensors too): one whole copy on every device.
        assert single[config]["state_replicated"]


def test_no_collective_moves_the_ring_buffer_between_devices(runs):
    # The compiled train steps (XLA's text, after its SPMD partitioning): each writes its
    # slot on every device; a kept kernel sharded under ModelParallel is gathered as one
    # slot (its own size), never as the whole buffer after the write.
    out, _, _ = runs
    texts = [p.read_text() for p in (out / "hlo").glob("*train_step.cpu_after_optimizations.txt")]
    watched = [t for t in texts if f"f32[{SLOTS}," in t]  # the steps with the buffer's slots
    assert len(watched) == len(CONFIGS)
    collective = re.compile(
        r"= (.*?) (all-gather|all-reduce|collective-permute|all-to-all|reduce-scatter)"
        r"(-start)?\("
    )
    moved = [
        line.strip()[:200]
        for text in watched
        for line in text.splitlines()
        if (m := collective.search(line)) and re.search(rf"\[{SLOTS}[,\]]", m.group(1))
    ]
    assert not moved


@pytest.mark.parametrize("config", list(CONFIGS))
def test_distribution_training_is_bitwise_the_same_with_and_without_a_watch(runs, config):
    out, _, _ = runs
    watched, plain = _weights(out / f"{config}_watched.npz"), _weights(out / f"{config}_plain.npz")
    for a, b, s in zip(watched, plain, _weights(out / f"{config}_start.npz"), strict=True):
        assert a.dtype == b.dtype and (a == b).all()
        assert not np.array_equal(a, s)  # it did train


def test_per_replica_under_data_parallel_is_refused_before_training_with_what_to_use(runs):
    _, single, _ = runs
    message = single["per_replica"]
    assert message.startswith(
        "NotImplementedError: GradWatch does not yet record per_replica=True on the jax backend"
    )
    assert "`keras.distribution`" in message
    assert "That global gradient is what GradWatch records: drop per_replica=True" in message
    assert "KERAS_BACKEND=tensorflow under `tf.distribute.MirroredStrategy`" in message
    assert single["per_replica_untouched"]  # no step ran, nothing recorded


def test_multi_process_each_process_records_the_global_gradient(runs):
    out, _, processes = runs
    multi = out / "multi"
    for i, p in enumerate(processes):
        assert (p["devices"], p["local_devices"], p["process_index"]) == (4, 2, i)
    start = _weights(multi / "chief_only_0_start.npz")
    for a, b in zip(start, _weights(multi / "chief_only_1_start.npz"), strict=True):
        np.testing.assert_array_equal(a, b)
    steps = _reference(start)
    logs = [gradwatch.read_log(multi / f"chief_only_memory_{i}.parquet") for i in range(2)]
    assert logs[0] == logs[1]
    _assert_global_gradient(logs[0], steps)
    for i in range(2):  # training as without the watch, on both processes
        for run in ("chief_only", "all_workers"):
            watched = _weights(multi / f"{run}_{i}_watched.npz")
            for a, b in zip(watched, _weights(multi / f"{run}_{i}_plain.npz"), strict=True):
                assert (a == b).all()


def test_multi_process_only_process_zero_writes_unless_all_workers(runs):
    out, _, _ = runs
    multi = out / "multi"
    assert [p.name for p in (multi / "chief_only").iterdir()] == ["worker=0"]
    chief = gradwatch.read_log(multi / "chief_only")  # one history, steps 0..7
    assert chief == gradwatch.read_log(multi / "chief_only_memory_0.parquet")
    _assert_global_gradient(chief, _reference(_weights(multi / "chief_only_0_start.npz")))
    workers = sorted(p.name for p in (multi / "all_workers").iterdir())
    assert workers == ["worker=0", "worker=1"]
    first = gradwatch.read_log(multi / "all_workers", worker=0)
    second = gradwatch.read_log(multi / "all_workers", worker=1)
    assert first == second == gradwatch.read_log(multi / "all_workers_memory_1.parquet")
    _assert_global_gradient(first, _reference(_weights(multi / "all_workers_0_start.npz")))
