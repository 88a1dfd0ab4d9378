"""tf.distribute: the global gradient under MirroredStrategy and MultiWorkerMirroredStrategy.

The training runs in subprocesses (distributed_run.py): two logical CPU devices
can only be set up before TensorFlow first uses its devices, which this test
process did long ago, and a multi-worker cluster needs two processes anyway.
Each run is bounded in time and killed on failure. The expected values come
from a plain tf.GradientTape loop on one device over the same global batches
from the same starting weights.
"""

import contextlib
import json
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import keras
import numpy as np
import pytest
from components import HANG
from models import data, layers
from reference import batches_of, mse, np_stats

import gradwatch

if keras.backend.backend() != "tensorflow":  # a rerun under JAX or PyTorch: not imported
    pytest.skip("tf.distribute is TensorFlow's", allow_module_level=True)

import tensorflow as tf

HERE = Path(__file__).resolve().parent
SCRIPT = HERE / "distributed_run.py"
N, BATCH, EPOCHS, REPLICAS = 32, 8, 2, 2
RTOL, ATOL = 1e-5, 1e-6  # float32, summed in another order over two replicas


def _env(**extra):
    return {**os.environ, "PYTHONPATH": str(HERE.parent), "TF_CPP_MIN_LOG_LEVEL": "3", **extra}


def _run_all(commands, envs, out):
    """Runs the commands at once; fails (and kills them all) on a timeout or an error."""
    logs = [open(out / f"stderr_{i}.txt", "w") for i in range(len(commands))]  # noqa: SIM115
    procs = [
        subprocess.Popen(c, env=e, stdout=f, stderr=subprocess.STDOUT)
        for c, e, f in zip(commands, envs, logs, strict=True)
    ]
    deadline = time.monotonic() + HANG
    try:
        while any(p.poll() is None for p in procs):
            failed = [p for p in procs if p.poll() not in (None, 0)]
            if failed or time.monotonic() > deadline:
                break
            time.sleep(0.1)
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
            p.wait()
        for f in logs:
            f.close()
    for i, p in enumerate(procs):
        if p.returncode != 0:
            tail = (out / f"stderr_{i}.txt").read_text()[-3000:]
            pytest.fail(
                f"{commands[i][2:]} ended with {p.returncode} (killed on timeout?):\n{tail}"
            )


@pytest.fixture(scope="module")
def mirrored(tmp_path_factory):
    out = tmp_path_factory.mktemp("mirrored")
    _run_all([[sys.executable, str(SCRIPT), "mirrored", str(out)]], [_env()], out)
    return out, json.loads((out / "mirrored.json").read_text())


@contextlib.contextmanager
def _reserved_ports(n):
    """`n` ports for the workers' servers, kept from other processes until the run ends.

    Picking a free port and closing it before the workers bind it is a race: another
    process may take the port in between. Here each port stays bound by a socket that
    sets SO_REUSEADDR and never listens, for the whole run. Linux then lets another
    SO_REUSEADDR socket bind the port and listen, which TensorFlow's gRPC server does
    (it sets SO_REUSEADDR and turns SO_REUSEPORT off, so a SO_REUSEPORT hold would
    block it: measured). Everyone else is kept out: `bind(port 0)` and outgoing
    connections skip a bound port, and a bind without SO_REUSEADDR fails. Only a
    process that binds this very port with SO_REUSEADDR could still get in first.
    Bound on all addresses, as the server binds; a socket that does not listen gets
    no connections.
    """
    socks = []
    try:
        for _ in range(n):
            s = socket.socket()
            socks.append(s)
            s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
            s.bind(("", 0))
        yield [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


@pytest.fixture(scope="module")
def multi_worker(tmp_path_factory):
    out = tmp_path_factory.mktemp("multi_worker")
    commands = [[sys.executable, str(SCRIPT), "worker", str(i), str(out)] for i in range(2)]
    with _reserved_ports(2) as ports:
        cluster = {"worker": [f"127.0.0.1:{p}" for p in ports]}
        envs = [
            _env(TF_CONFIG=json.dumps({"cluster": cluster, "task": {"type": "worker", "index": i}}))
            for i in range(2)
        ]
        _run_all(commands, envs, out)
    return out, [json.loads((out / f"worker_{i}.json").read_text()) for i in range(2)]


def _weights(path):
    with np.load(path) as f:
        return [f[f"arr_{i}"] for i in range(len(f.files))]


def _gradients(model, x, y):
    with tf.GradientTape() as tape:
        loss = mse(y, model(x, training=True)) + tf.add_n(model.losses)
    return [np.asarray(g) for g in tape.gradient(loss, model.trainable_weights)]


def _clip(g, clipnorm):
    return g * clipnorm / max(float(np.linalg.norm(g)), clipnorm)


def _reference(start, clipnorm=None):
    """Each step's global gradient and replicas' local gradients, from a plain tape loop
    that applies what the replicated optimizer applies: the sum of the local gradients,
    each clipped first when the optimizer clips."""
    keras.utils.set_random_seed(3)
    model = keras.Sequential(layers(regularize=True), name="net")
    model.set_weights(start)
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    x, y = data(n=N)
    steps = []
    for _ in range(EPOCHS):
        for xb, yb, _ in batches_of(x, y, BATCH):
            half = len(xb) // REPLICAS
            # Keras divides each replica's loss by the number of replicas.
            local = [
                [
                    g / REPLICAS
                    for g in _gradients(
                        model, xb[r * half : (r + 1) * half], yb[r * half : (r + 1) * half]
                    )
                ]
                for r in range(REPLICAS)
            ]
            steps.append((_gradients(model, xb, yb), local))
            if clipnorm is None:
                applied = [sum(parts) for parts in zip(*local, strict=True)]
            else:
                applied = [
                    sum(_clip(g, clipnorm) for g in parts) for parts in zip(*local, strict=True)
                ]
            optimizer.apply_gradients(zip(applied, model.trainable_weights, strict=True))
    return steps


KEYS = ["net/hidden/kernel", "net/hidden/bias", "net/out/kernel", "net/out/bias"]


def test_skip_under_mirrored_strategy_skips_every_replicas_update(mirrored):
    # on_nonfinite="skip": the NaN row is in one replica's half-batch, and both replicas
    # skip the update (weights and Adam's state end as a plain run without the batch).
    _, results = mirrored
    skip = dict(results["skip"])
    (origin,) = skip.pop("origins")
    assert skip == {"equal": True, "finite": True, "skipped": [2], "batch": True}
    # No batch reached the host, so nothing was replayed; the row says why and what to do.
    assert (origin["step"], origin["stage"], origin["layer"]) == (2, None, None)
    assert origin["detail"].startswith("Step 2 could not be replayed: its batch did not reach")
    assert "`tf.distribute`" in origin["detail"]
    assert "gradwatch.trace_nonfinite(model, x, y)" in origin["detail"]
    # Two optimizers in a custom step, the first one's gradient finite: its update is put
    # back on every replica, and both end as the plain run without the batch.
    assert results["skip_two_optimizers"] == {"equal": True, "finite": True, "skipped": [2]}


def test_mirrored_records_the_global_gradient_of_a_single_device_run(mirrored):
    out, results = mirrored
    assert results["replicas"] == REPLICAS
    log = gradwatch.read_log(out / "plain.parquet")
    steps = _reference(_weights(out / "plain_start.npz"))
    np.testing.assert_array_equal(log.steps, np.arange(len(steps)))
    norms = log.stat("norm")
    for step, (grads, _) in enumerate(steps):
        for key, g in zip(KEYS, grads, strict=True):
            np.testing.assert_allclose(log.gradient(key, step), g, rtol=RTOL, atol=ATOL)
            assert norms.loc[step, key] == pytest.approx(np_stats(g)["norm"], rel=RTOL)
    # Not the local gradient that one replica hands the optimizer (half the batch, halved).
    local = steps[0][1][0][0]
    assert not np.allclose(log.gradient(KEYS[0], 0), local, rtol=1e-2)


def test_mirrored_scalars_are_the_global_batchs_loss_and_the_rate(mirrored):
    out, _ = mirrored
    log = gradwatch.read_log(out / "plain.parquet")
    # Each replica hands Keras' loss metric its own half-batch loss: recorded is their
    # mean, the loss of the global batch (regularizers included) of a single-device loop.
    model = keras.Sequential(layers(regularize=True), name="net")
    model.set_weights(_weights(out / "plain_start.npz"))
    optimizer = keras.optimizers.SGD(0.1, momentum=0.9)
    x, y = data(n=N)
    losses = []
    for _ in range(EPOCHS):
        for xb, yb, _ in batches_of(x, y, BATCH):
            with tf.GradientTape() as tape:
                loss = mse(yb, model(xb, training=True)) + tf.add_n(model.losses)
            losses.append(float(loss))
            grads = tape.gradient(loss, model.trainable_weights)
            optimizer.apply_gradients(zip(grads, model.trainable_weights, strict=True))
    np.testing.assert_array_equal(log.scalars["step"], np.arange(len(losses)))
    np.testing.assert_allclose(log.scalars["loss"], losses, rtol=RTOL)
    np.testing.assert_array_equal(log.scalars["learning_rate"], np.float32(0.1))
    assert log.scalars["applied"].all()  # every step updates the weights


def test_mirrored_per_replica_rows_hold_each_replicas_local_gradient(mirrored):
    out, _ = mirrored
    log = gradwatch.read_log(out / "plain.parquet")
    assert log.replicas == [0, 1]
    frame = log.frame
    assert list(frame.columns) == ["step", "epoch", "batch", "replica", "variable", "stat", "value"]
    assert frame["replica"].isna().sum() == len(log.steps) * len(KEYS) * len(log.stat_names)
    for step, (_, local) in enumerate(_reference(_weights(out / "plain_start.npz"))):
        for r in range(REPLICAS):
            for stat in ("norm", "mean", "std", "min", "max"):
                wide = log.stat(stat, replica=r)
                want = [np_stats(g)[stat] for g in local[r]]
                np.testing.assert_allclose(wide.loc[step, KEYS], want, rtol=1e-4, atol=ATOL)
            # Stats of the weights or of clipping are not per replica.
            assert log.stat("clipped_norm", replica=r).isna().all().all()
    # The two replicas saw different halves of the batch.
    assert not np.allclose(log.stat("norm", replica=0), log.stat("norm", replica=1))


def test_mirrored_per_replica_stats_under_a_loss_scale_are_of_the_unscaled_gradient(mirrored):
    out, _ = mirrored
    log = gradwatch.read_log(out / "scaled.parquet")
    # The gradients stay finite, so the scale stays 2**10 and the update is the unscaled
    # gradient's (a power of two scales and unscales exactly): the unscaled reference
    # loop trains along the same weights.
    steps = _reference(_weights(out / "scaled_start.npz"))
    np.testing.assert_array_equal(log.steps, np.arange(len(steps)))
    assert log.replicas == [0, 1]
    for step, (grads, local) in enumerate(steps):
        want = [np_stats(g)["norm"] for g in grads]
        np.testing.assert_allclose(log.stat("norm").loc[step, KEYS], want, rtol=1e-4)
        for r in range(REPLICAS):
            for stat in ("norm", "mean", "std", "min", "max"):
                want = [np_stats(g)[stat] for g in local[r]]
                got = log.stat(stat, replica=r).loc[step, KEYS]
                np.testing.assert_allclose(got, want, rtol=1e-4, atol=ATOL, err_msg=stat)


def test_mirrored_clipped_norm_is_of_the_sum_of_the_clipped_local_gradients(mirrored):
    out, _ = mirrored
    log = gradwatch.read_log(out / "clipped.parquet")
    steps = _reference(_weights(out / "clipped_start.npz"), clipnorm=0.05)
    norms, clipped = log.stat("norm"), log.stat("clipped_norm")
    for step, (grads, local) in enumerate(steps):
        for i, key in enumerate(KEYS):
            want = np.linalg.norm(sum(_clip(local[r][i], 0.05) for r in range(REPLICAS)))
            assert clipped.loc[step, key] == pytest.approx(want, rel=1e-4)
            assert norms.loc[step, key] == pytest.approx(np.linalg.norm(grads[i]), rel=1e-4)
    # Clipping bit: the recorded gradient is taken before it.
    assert (clipped < norms).all().all()


def test_mirrored_sparse_gradient_stats_equal_the_dense_global_gradient(mirrored):
    import tensorflow as tf
    from distributed_run import SPARSE_IDS

    out, _ = mirrored
    log = gradwatch.read_log(out / "sparse.parquet")
    ids = np.asarray(SPARSE_IDS, "int32")
    y = np.linspace(-1, 1, ids.size * 2).reshape(*ids.shape, 2).astype("float32")
    w = tf.Variable(np.load(out / "sparse_start.npy"))
    key = log.key("emb/embeddings")
    assert log.replicas == [0, 1]

    def gradient(rows, scale=1.0):
        with tf.GradientTape() as tape:
            loss = scale * tf.reduce_mean(tf.square(y[rows] - tf.gather(w, ids[rows])))
        return tf.convert_to_tensor(tape.gradient(loss, w)).numpy()

    for step in range(2):
        # Each replica's local gradient: its half of the batch, divided by the two replicas.
        for r in range(2):
            half = slice(4 * step + 2 * r, 4 * step + 2 * r + 2)
            local = np_stats(gradient(half, 0.5))
            for name in ("norm", "mean", "min", "max", "zero_frac"):
                got = log.stat(name, replica=r).loc[step, key]
                assert got == pytest.approx(local[name], rel=1e-5, abs=1e-7), (r, name)
        dense = gradient(slice(4 * step, 4 * step + 4))
        for name, value in np_stats(dense).items():
            got = log.stat(name).loc[step, key]
            assert got == pytest.approx(value, rel=1e-5, abs=1e-7), name
        w.assign_sub(0.1 * dense)


@pytest.mark.parametrize("run", ["plain", "clipped", "scaled"])
def test_mirrored_training_is_bitwise_the_same_with_and_without_a_watch(mirrored, run):
    out, _ = mirrored
    watched, plain = _weights(out / f"{run}_watched.npz"), _weights(out / f"{run}_plain.npz")
    start = _weights(out / f"{run}_start.npz")
    for a, b, s in zip(watched, plain, start, strict=True):
        np.testing.assert_array_equal(a, b)
        assert not np.array_equal(a, s)  # it did train


def test_mirrored_keras_limits_are_clear_errors_before_training(mirrored):
    _, results = mirrored
    for key, received in (
        ("spe", "Received: steps_per_execution=2, jit_compile=False."),
        ("jit", "Received: steps_per_execution=1, jit_compile=True."),
    ):
        message = results["limits"][key]
        assert message.startswith("ValueError: Keras 3.")
        assert "under MirroredStrategy" in message and received in message
        assert "Compile the model with `steps_per_execution=1, jit_compile=False`" in message
    # Keras itself still fails there; when it stops failing, gradwatch's check can go.
    assert results["keras_spe"].startswith("InvalidArgumentError")


def test_mirrored_streamed_log_is_worker_zero_of_a_hive_dataset(mirrored):
    out, _ = mirrored
    (worker,) = (out / "log").iterdir()
    assert worker.name == "worker=0"
    assert gradwatch.read_log(out / "log") == gradwatch.read_log(out / "plain.parquet")


def test_multi_worker_each_worker_records_the_global_gradient(multi_worker):
    out, results = multi_worker
    assert [r["replicas"] for r in results] == [2, 2]
    start = _weights(out / "chief_only_start_0.npz")
    for a, b in zip(start, _weights(out / "chief_only_start_1.npz"), strict=True):
        np.testing.assert_array_equal(a, b)
    steps = _reference(start)
    logs = [gradwatch.read_log(out / f"chief_only_memory_{i}.parquet") for i in range(2)]
    assert logs[0] == logs[1]
    np.testing.assert_array_equal(logs[0].steps, np.arange(len(steps)))
    for step, (grads, _) in enumerate(steps):
        for key, g in zip(KEYS, grads, strict=True):
            np.testing.assert_allclose(logs[0].gradient(key, step), g, rtol=RTOL, atol=ATOL)


def test_multi_worker_only_the_chief_writes_unless_all_workers(multi_worker):
    out, _ = multi_worker
    assert [p.name for p in (out / "chief_only").iterdir()] == ["worker=0"]
    chief = gradwatch.read_log(out / "chief_only")
    assert chief == gradwatch.read_log(out / "chief_only_memory_0.parquet")
    workers = sorted(p.name for p in (out / "all_workers").iterdir())
    assert workers == ["worker=0", "worker=1"]
    first = gradwatch.read_log(out / "all_workers", worker=0)
    second = gradwatch.read_log(out / "all_workers", worker=1)
    assert first == second
    assert first.replicas == [0, 1]  # gathered from both workers
    # per_replica rows: worker k's replica saw its half of each global batch.
    for step, (_, local) in enumerate(_reference(_weights(out / "all_workers_start_0.npz"))):
        for r in range(REPLICAS):
            want = [np_stats(g)["norm"] for g in local[r]]
            got = first.stat("norm", replica=r).loc[step, KEYS]
            np.testing.assert_allclose(got, want, rtol=1e-4, atol=ATOL)
    with pytest.raises(ValueError, match=r"no log of worker 2\. Received: worker=2"):
        gradwatch.read_log(out / "all_workers", worker=2)


def test_reserved_ports_keep_other_binds_out_and_let_a_reuseaddr_server_listen():
    with _reserved_ports(2) as ports:
        assert len(set(ports)) == 2
        for port in ports:
            other = socket.socket()
            with other, pytest.raises(OSError):  # EADDRINUSE: no one else gets it
                other.bind(("127.0.0.1", port))
            # A server like gRPC's (SO_REUSEADDR, no SO_REUSEPORT) binds it and listens.
            server = socket.socket()
            with server:
                server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
                server.bind(("", port))
                server.listen(1)
                socket.create_connection(("127.0.0.1", port), timeout=5).close()


def test_multi_worker_keras_limits_are_clear_errors_on_every_worker(multi_worker):
    _, results = multi_worker
    for r in results:
        for key in ("spe", "jit"):
            assert r["limits"][key].startswith("ValueError: Keras ")
            assert "MultiWorkerMirroredStrategy" in r["limits"][key]


# In this process: no strategy, so no subprocess is needed.


def test_per_replica_without_a_strategy_is_one_replica_zero_equal_to_the_global(tmp_path):
    x, y = data(n=24)
    model = gradwatch.Sequential(layers(), name="net")
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(per_replica=True)
    model.fit(x, y, batch_size=8, callbacks=[watch], verbose=0)
    log = watch.log
    assert log.replicas == [0]
    for stat in log.stat_names:
        np.testing.assert_array_equal(log.stat(stat, replica=0), log.stat(stat))
    assert log.frame["replica"].dtype == "Int64"
    for path in (tmp_path / "g.csv", tmp_path / "g.parquet"):
        (log.to_csv if path.suffix == ".csv" else log.to_parquet)(path)
        back = gradwatch.read_log(path)
        assert back == log and back.frame.equals(log.frame)
    with pytest.raises(KeyError, match=r"No stats of replica 1 were recorded\. .*\[0\]"):
        log.stat("norm", replica=1)


def test_without_per_replica_the_frame_has_no_replica_column():
    x, y = data(n=8)
    model = gradwatch.Sequential(layers(), name="net")
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch()
    model.fit(x, y, batch_size=8, callbacks=[watch], verbose=0)
    assert list(watch.log.frame.columns) == ["step", "epoch", "batch", "variable", "stat", "value"]
    assert watch.log.replicas == []
    with pytest.raises(KeyError, match="GradWatch\\(per_replica=True\\)"):
        watch.log.stat("norm", replica=0)


def test_distributed_arguments_are_checked():
    with pytest.raises(
        TypeError, match=r"`per_replica` must be True or False\. Received: per_replica=1"
    ):
        gradwatch.GradWatch(per_replica=1)
    with pytest.raises(TypeError, match="Received: all_workers='yes'"):
        gradwatch.GradWatch(all_workers="yes")


def test_a_strategy_gradwatch_does_not_know_is_refused_before_training():
    strategy = tf.distribute.experimental.CentralStorageStrategy()
    with strategy.scope():
        model = gradwatch.Sequential(layers(), name="net")
        model.compile("sgd", "mse")
    x, y = data(n=8)
    with pytest.raises(
        NotImplementedError, match="Received: a model built under CentralStorageStrategy"
    ):
        model.fit(x, y, batch_size=8, callbacks=[gradwatch.GradWatch()], verbose=0)
