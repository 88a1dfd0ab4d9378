"""gradwatch on Keras' JAX and PyTorch backends, each run in a fresh interpreter."""

from __future__ import annotations

import atexit
import importlib.util
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

import background
import pytest
from background import RUNS, collect
from components import HANG, require

ROOT = Path(__file__).resolve().parent.parent
_PACKAGES = {"jax": "jax", "torch": "torch", "tensorflow": "tensorflow"}


def _needs(backend: str) -> None:
    require(
        importlib.util.find_spec(_PACKAGES[backend]) is not None,
        f"the {backend} backend is not installed; "
        f"install it with pip install 'gradwatch[{backend}]'",
    )


def _run(backend: str, code: str, timeout: float = HANG) -> subprocess.CompletedProcess:
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    return subprocess.run(
        [sys.executable, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
        cwd=ROOT,
    )


# The reruns are chosen by marker (registered in pyproject.toml), not by file lists:
#
# - `@pytest.mark.backends`: run again under JAX and under PyTorch (`pytest -m backends`).
#   The seed's worked examples (test_seed), the stats kernels against NumPy (test_stats),
#   the per-step comparisons with a plain gradient loop and the alarms (test_callback,
#   test_alarms), bitwise neutrality and the mixin's custom steps (test_mixin,
#   test_custom_steps), plain models of every kind (test_any_model), resuming into one
#   path (test_resume), the per-step loss and learning rate (test_scalars), gradient
#   accumulation (test_accumulation, with PyTorch's mixed_float16 case), a table sliced to
#   the batch's sequence length (test_dynamic_shapes), the blocks a user's sink gets and
#   its close when `fit` raises (test_sinks) and JAX's stateless steps
#   (test_jax_steps, skipped elsewhere). Left unmarked in those files, as
#   no backend code runs in them: the argument checks of `check_stats`, of `GradWatch`'s
#   constructor and of the alarms, and the reading of old and newer file versions.
# - `@pytest.mark.plain_models`: run again on TensorFlow with plain Keras models
#   (`keras.Sequential`, `keras.Model`) and nothing but a `GradWatch` (tests/models.py's
#   KIND): what a watch does around the step, where the adopted model's class and
#   `stop_training` take part: the alarms (test_alarms), streaming (test_streaming, whose
#   tests use `per_replica`, TensorFlow's) and a user's sinks (test_sinks). The recording
#   itself is not run again: tests/test_any_model.py (marked `backends`, so on every
#   backend) checks that a plain Sequential, functional and subclassed model records the
#   mixin's log bit for bit and trains bitwise as without the watch, with every stat,
#   histograms and kept values, with `steps_per_execution` and XLA, `every`, several
#   watches, sparse gradients, custom and GAN steps; and the `backends` run checks the
#   mixin's log against plain gradient loops (test_callback, test_seed, test_mixin).
#
# The long runs, each in its own interpreter: started together when the tests are
# collected (tests/conftest.py runs this module's tests last), so that they use the
# CPU the TensorFlow tests leave idle, at a lower priority and one thread each. Under
# pytest-xdist (`-n 2`, the default) the controller starts them and publishes each one's
# end to a file (`background.SHARED`) that the test waiting for it reads, in its worker.
def _background_commands() -> dict[str, tuple[str, list[str]]]:
    # `-n 0`: each run is one interpreter, whatever the caller's options; but JAX's, the
    # longest (its compiles), on two workers, so that it ends on both cores once the
    # TensorFlow tests are done (at a lower priority, it runs mostly after them).
    pytest_args = ["-m", "pytest", "-q", "-p", "no:cacheprovider", "-n", "0", "tests"]
    return {
        "core-jax": ("jax", [*pytest_args, "-n", "2", "-m", "backends"]),
        "core-torch": ("torch", [*pytest_args, "-m", "backends"]),
        "torch-jit": ("torch", ["-c", textwrap.dedent(_TORCH_JIT)]),
        "plain-tensorflow": ("tensorflow", [*pytest_args, "-m", "plain_models"]),
    }


def _spawn(key: str, publish_to: str | None = None) -> None:
    backend, args = _background_commands()[key]
    if importlib.util.find_spec(_PACKAGES[backend]) is None:
        return  # the test that waits for it skips (or fails in CI)
    env = dict(os.environ, KERAS_BACKEND=backend, PYTHONPATH=str(ROOT))
    env.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
    env.update(OMP_NUM_THREADS="1", XLA_FLAGS="--xla_cpu_multi_thread_eigen=false")
    if key.startswith("plain-"):
        env["GRADWATCH_TEST_MODELS"] = "plain"
    if backend == "jax":
        # Tests that build the same model compile the same programs: XLA compiles each once
        # per run (about a fifth of the run's CPU time), into a folder of this run alone
        # (removed when pytest exits), so that every run starts from nothing.
        cache = tempfile.mkdtemp(prefix="gradwatch-jax-cache-")
        atexit.register(shutil.rmtree, cache, ignore_errors=True)
        # And LLVM's optimizations off (a sixth of the run's CPU): they change how fast
        # XLA's machine code runs, not what the compiled program computes; every
        # comparison of the run is made between programs compiled the same way.
        env["XLA_FLAGS"] += " --xla_backend_optimization_level=0"
        env.update(
            JAX_COMPILATION_CACHE_DIR=cache,
            JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
            JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="-1",
        )
    RUNS.start(key, [sys.executable, *args], env, cwd=str(ROOT))
    if publish_to is not None:
        RUNS.publish(key, os.path.join(publish_to, f"{key}.json"))


def start_in_background(test_names: list[str], publish_to: str | None = None) -> None:
    """Starts the long runs that the selected tests (by name) will wait for; with
    `publish_to` (pytest-xdist's controller), each one's end is written there."""
    for name in test_names:
        if name.startswith("test_backends_core_suite_passes["):
            _spawn("core-" + name.split("[")[1].rstrip("]"), publish_to)
        elif name == "test_core_suite_passes_on_plain_keras_models":
            _spawn("plain-tensorflow", publish_to)
        elif name == "test_backends_torch_jit_compile_records_the_compiled_step":
            _spawn("torch-jit", publish_to)


def _wait(key: str, timeout: float = HANG) -> subprocess.CompletedProcess:
    if background.SHARED is not None:  # a pytest-xdist worker: the controller runs it
        done = collect(os.path.join(background.SHARED, f"{key}.json"), timeout)
        assert done is not None, f"the background run {key!r} did not end in {timeout} s"
        return done
    _spawn(key)  # a no-op when it was started at collection
    return RUNS.wait(key, timeout)


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backends_import_and_fit_never_import_tensorflow(backend):
    # Every setting that has a TensorFlow-free path, TensorBoard included; the event
    # files are then read back with TensorBoard's own reader (its TensorFlow-free one).
    _needs(backend)
    result = _run(
        backend,
        """
        import sys
        import tempfile

        import keras
        import numpy as np

        import gradwatch

        after_import = "tensorflow" in sys.modules
        sys.path.insert(0, "tests")
        from models import data, layers
        from reference import log10_counts

        logdir = tempfile.mkdtemp()
        watch = gradwatch.GradWatch(
            stats=list(gradwatch.STATS), values="*", histogram=True, tensorboard_dir=logdir
        )
        model = gradwatch.Sequential(layers())
        model.compile(keras.optimizers.SGD(0.1, clipnorm=0.5), "mse")
        x, y = data(n=16)
        model.fit(x, y, batch_size=8, callbacks=[watch], verbose=0)
        print(keras.backend.backend(), after_import, "tensorflow" in sys.modules, len(watch.log))

        # TensorBoard's reader falls back to its own stub of TensorFlow when the import
        # fails: blocked here, so that this child never spends ten seconds importing it.
        sys.modules["tensorflow"] = None
        from tensorboard.backend.event_processing import event_accumulator
        from tensorboard.util import tensor_util

        acc = event_accumulator.EventAccumulator(
            logdir, size_guidance={event_accumulator.TENSORS: 0}
        )
        acc.Reload()
        log = watch.log
        norm = log.stat("norm")
        for key in log.variables:
            scalars = {e.step: tensor_util.make_ndarray(e.tensor_proto)
                       for e in acc.Tensors("norm/" + key)}
            assert sorted(scalars) == [0, 1], scalars
            for step, value in scalars.items():
                assert value == norm.loc[step, key], (key, step)  # float32: exact
            for e in acc.Tensors("log10_abs_grad/" + key):
                buckets = tensor_util.make_ndarray(e.tensor_proto)
                expected = log10_counts(log.gradient(key, e.step), 4)
                np.testing.assert_array_equal(buckets[:, 2], expected)
        assert acc.SummaryMetadata("global_norm").plugin_data.plugin_name == "scalars"
        print("tensorboard read back")
        """,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == [backend, "False", "False", "2", "tensorboard", "read", "back"]


@pytest.mark.parametrize("backend", ["jax", "torch"])
def test_backends_core_suite_passes(backend):
    _needs(backend)
    result = _wait(f"core-{backend}")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_core_suite_passes_on_plain_keras_models():
    result = _wait("plain-tensorflow")
    assert result.returncode == 0, result.stdout[-6000:] + result.stderr[-2000:]
    assert " passed" in result.stdout.splitlines()[-1]


def test_backends_torch_jit_compile_records_the_compiled_step():
    # One interpreter for all of `jit_compile=True` on PyTorch; nearly all of its time
    # (30-50 s on 2 CPU cores) is torch.compile compiling the steps. Started in the
    # background at collection (see `start_in_background`).
    _needs("torch")
    result = _wait("torch-jit")
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-6000:]
    assert result.stdout.splitlines()[-1] == "ok"


# PyTorch, `jit_compile=True`: the stock step and two custom ones against a torch.autograd loop.
_TORCH_JIT = """
        import sys

        sys.path.insert(0, "tests")
        import keras
        import numpy as np
        import torch
        from models import data, layers, pair
        from reference import batches_of, mse, np_stats, tape_gradients

        import gradwatch
        from gradwatch.stats import GRADIENT_STATS

        keras.utils.set_random_seed(3)
        x, y = data(n=24)
        watched, plain = pair()
        start = watched.get_weights()
        reference, _ = pair()
        reference.set_weights(watched.get_weights())
        for model in (watched, plain):
            model.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse", jit_compile=True)
        stats = [*GRADIENT_STATS, "weight_norm", "update_norm", "update_ratio"]
        watch = gradwatch.GradWatch(stats=stats, values="*")
        ha = watched.fit(x, y, batch_size=8, shuffle=False, callbacks=[watch], verbose=0)
        hb = plain.fit(x, y, batch_size=8, shuffle=False, verbose=0)
        assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > 0  # it compiled
        # Training is bitwise that of plain Keras with jit_compile=True.
        assert ha.history == hb.history, (ha.history, hb.history)
        for a, b in zip(watched.get_weights(), plain.get_weights(), strict=True):
            np.testing.assert_array_equal(a, b)
        # The log against a plain torch.autograd loop, run eagerly (float tolerance:
        # the compiled kernels round differently).
        before = [w.astype(np.float64) for w in reference.get_weights()]
        opt = keras.optimizers.SGD(0.1, momentum=0.9)
        log = watch.log
        assert list(log.steps) == [0, 1, 2]
        wide = {name: log.stat(name) for name in stats}
        losses = []
        for step, batch in enumerate(batches_of(x, y, 8)):
            with torch.no_grad():
                pred = reference(batch[0], training=True)
                losses.append(float(mse(batch[1], pred) + sum(reference.losses)))
            (grads,) = tape_gradients(reference, opt, [batch], mse)
            after = [w.astype(np.float64) for w in reference.get_weights()]
            for key, g, w0, w1 in zip(log.variables, grads, before, after, strict=True):
                np.testing.assert_allclose(log.gradient(key, step), g, rtol=1e-5, atol=1e-6)
                ref = np_stats(g)
                ref["weight_norm"] = np.linalg.norm(w0)
                ref["update_norm"] = np.linalg.norm(w1 - w0)
                ref["update_ratio"] = ref["update_norm"] / ref["weight_norm"]
                for name in stats:
                    got = wide[name].loc[step, key]
                    np.testing.assert_allclose(got, ref[name], rtol=1e-4, atol=1e-6, err_msg=name)
            before = after
        # Each step's loss, from what the compiled step added to Keras' loss metric.
        np.testing.assert_allclose(log.scalars["loss"], losses, rtol=1e-5)
        np.testing.assert_array_equal(log.scalars["learning_rate"], np.float32(0.1))

        # Custom steps under jit_compile=True: one calling `super().train_step`, and one
        # computing its gradients itself and calling `record_gradients` (recorded at a
        # graph break). Both record what the stock step recorded, from the same start.
        class Delegating(gradwatch.GradWatchMixin, keras.Sequential):
            def train_step(self, data):
                return super().train_step(data)

        class Own(gradwatch.GradWatchMixin, keras.Sequential):
            def train_step(self, data):
                x, y = data
                self.zero_grad()
                loss = self.compute_loss(x=x, y=y, y_pred=self(x, training=True))
                loss.backward()
                grads = [v.value.grad for v in self.trainable_weights]
                with torch.no_grad():
                    self.record_gradients(grads, self.trainable_weights, self.optimizer)
                    self.optimizer.apply(grads, self.trainable_weights)
                return {"loss": loss}

        for cls in (Delegating, Own):
            custom = cls(layers(), name="net")
            custom.set_weights(start)
            custom.compile(keras.optimizers.SGD(0.1, momentum=0.9), "mse", jit_compile=True)
            graphs = torch._dynamo.utils.counters["stats"]["unique_graphs"]
            other = gradwatch.GradWatch(values="*")
            custom.fit(x, y, batch_size=8, shuffle=False, callbacks=[other], verbose=0)
            assert torch._dynamo.utils.counters["stats"]["unique_graphs"] > graphs, cls
            assert list(other.log.steps) == [0, 1, 2], cls
            # `Own` never updates the loss metric: no loss; `Delegating` runs the stock step.
            scalars = other.log.scalars
            assert scalars["loss"].isna().all() == (cls is Own), cls
            if cls is Delegating:
                np.testing.assert_allclose(scalars["loss"], losses, rtol=1e-5)
            np.testing.assert_array_equal(scalars["learning_rate"], np.float32(0.1))
            for step in range(3):
                for mine, theirs in zip(other.log.variables, log.variables, strict=True):
                    np.testing.assert_allclose(
                        other.log.gradient(mine, step),
                        log.gradient(theirs, step),
                        rtol=1e-5,
                        atol=1e-7,
                        err_msg=f"{cls.__name__} {mine} {step}",
                    )
        print("ok")
"""
