"""Capture overhead: plain Keras fit against gradwatch fit, side by side in one process.

Usage: python benchmarks/overhead.py [--smoke] [--rounds N] [--only mlp,cnn] [--configs A,B]
    [--out FILE]

For each model and configuration, a plain `keras.Sequential`/`keras.Model` and a gradwatch
model with the same weights are fitted on the same data, alternately (A B A B ...) after a
warm-up. Each fit is timed from `on_train_begin` to `on_train_end` by the last callback, so the
time includes gradwatch's own callback work (drains) but not Keras' data set-up. The reported
figure is the median over rounds of time(gradwatch) / time(plain); the second, the same
for the process's CPU time over each fit (all its threads), is less sensitive to other
processes on the machine. The load average (`os.getloadavg`) is printed beside each row.
"""

from __future__ import annotations

import argparse
import os
import platform
import statistics
import sys
import time
from datetime import date

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras

sys.path.insert(0, os.path.dirname(__file__))
import models as bench_models

import gradwatch

# (model, label, GradWatch kwargs, compile kwargs, steps per fit)
# A configuration whose label ends so records a plain Keras model (no mixin): the one
# callback on `keras.Sequential`, against the same model without it.
PLAIN = ", plain model"
# ...and this one times the plain model's later fits without the watch, after one fit
# with it: Keras' stock train function again, at no cost.
LATER = "plain model, later fit without the watch"
SMOKE_CONFIGS = ("default, jit, spe=8", "histogram + 1 kept tensor", LATER)
STEPS = {"mlp": 120, "cnn": 16, "transformer": 40, "many": 120, "embedding": 60}


# The default stats and the three optimizer health stats.
HEALTH = [*gradwatch.DEFAULT_STATS, "v_ratio", "eps_frac", "update_cos"]


def _adam():
    return keras.optimizers.Adam(1e-3)


_ADAM_JIT = {"optimizer": _adam, "jit_compile": True}


def configs(name: str) -> list[tuple[str, dict, dict]]:
    small = {
        "mlp": f"dense_{2 if bench_models.SMOKE else 10}/bias",  # the output layer's
        "cnn": "dense/bias",
        "transformer": "dense_8/bias",
        "embedding": "dense/bias",
    }
    value = small.get(name, "dense_252/bias")
    if keras.backend.backend() == "torch":
        # What gradwatch records on PyTorch (one step per execution, no jit).
        return [
            ("torch: default", {}, {}),
            ("torch: 1 kept tensor", {"values": value}, {}),
            ("torch: every=10", {"every": 10}, {}),
            ("torch: histogram", {"histogram": True}, {}),
            ("torch: on_spike=ignore", {"on_spike": "ignore"}, {}),
            ('torch: stats="lean"', {"stats": "lean"}, {}),
            ('torch: stats="doctor"', {"stats": "doctor"}, {}),
            ("torch: default" + PLAIN, {}, {}),
            ("torch: " + LATER, {}, {}),
        ]
    if keras.backend.backend() == "jax":
        # Keras jit-compiles the step on JAX.
        return [
            ("jax: default", {}, {}),
            ("jax: default, spe=8", {}, {"steps_per_execution": 8}),
            ("jax: 1 kept tensor", {"values": value}, {}),
            ("jax: histogram", {"histogram": True}, {}),
            ("jax: every=10", {"every": 10}, {}),
            ("jax: on_spike=ignore", {"on_spike": "ignore"}, {}),
            ('jax: stats="lean"', {"stats": "lean"}, {}),
            ('jax: stats="doctor"', {"stats": "doctor"}, {}),
            ("jax: default" + PLAIN, {}, {}),
            ("jax: " + LATER, {}, {}),
        ]
    return [
        ("default", {}, {}),
        ("default, jit", {}, {"jit_compile": True}),
        ("default, spe=8", {}, {"steps_per_execution": 8}),
        ("default, jit, spe=8", {}, {"jit_compile": True, "steps_per_execution": 8}),
        ("histogram + 1 kept tensor", {"histogram": True, "values": value}, {}),
        ("every=10", {"every": 10}, {}),
        # Keeps a non-finite step's update from the model: a branch around `apply`.
        ("on_nonfinite=skip", {"on_nonfinite": "skip"}, {}),
        # The spike judge (on by default, "warn"): off, and keeping a spike's update back.
        ("on_spike=ignore", {"on_spike": "ignore"}, {}),
        ("on_spike=skip", {"on_spike": "skip"}, {}),
        # The presets: the norm alone, and every stat the doctor reads.
        ('stats="lean"', {"stats": "lean"}, {}),
        ('stats="doctor"', {"stats": "doctor"}, {}),
        # The optimizer health stats, which read Adam's second moment: against the
        # default stats under the same Adam.
        ("adam: default", {}, {"optimizer": _adam}),
        ("adam: default + health", {"stats": HEALTH}, {"optimizer": _adam}),
        ("adam jit: default", {}, _ADAM_JIT),
        ("adam jit: default + health", {"stats": HEALTH}, _ADAM_JIT),
        ("default" + PLAIN, {}, {}),
        (LATER, {}, {}),
    ]


class Timer(keras.callbacks.Callback):
    def on_train_begin(self, logs=None):
        self.start = time.perf_counter()
        self.cpu_start = time.process_time()

    def on_train_end(self, logs=None):
        self.seconds = time.perf_counter() - self.start
        self.cpu_seconds = time.process_time() - self.cpu_start


def timed_fit(model, x, y, callbacks) -> tuple[float, float]:
    """The fit's wall time and the process's CPU time over it."""
    timer = Timer()
    model.fit(
        x, y, batch_size=64, epochs=1, shuffle=False, verbose=0, callbacks=[*callbacks, timer]
    )
    return timer.seconds, timer.cpu_seconds


def compare(
    name: str,
    watch_kwargs: dict,
    compile_kwargs: dict,
    rounds: int,
    steps: int,
    plain_model: bool = False,
    later: bool = False,
):
    keras.backend.clear_session(free_memory=False)
    keras.utils.set_random_seed(0)
    build = bench_models.MODELS[name]
    watched = build(keras.Sequential if plain_model else gradwatch.Sequential)
    plain = build(keras.Sequential)
    plain.set_weights(watched.get_weights())
    x, y = bench_models.data(name, 64 * steps)
    compile_kwargs = dict(compile_kwargs)
    # An optimizer is made for each model (a factory, in the configuration); SGD by default.
    make_optimizer = compile_kwargs.pop("optimizer", lambda: keras.optimizers.SGD(1e-3))
    for model in (plain, watched):
        model.compile(
            make_optimizer(),
            keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            **compile_kwargs,
        )
    watch = gradwatch.GradWatch(**watch_kwargs)
    timed_fit(plain, x, y, [])  # warm-up: trace and compile both
    timed_fit(watched, x, y, [watch])
    timed = [] if later else [watch]
    if later:
        timed_fit(watched, x, y, [])  # the stock train function, traced again
    ratios, cpu_ratios, plain_times = [], [], []
    for _ in range(rounds):
        a, a_cpu = timed_fit(plain, x, y, [])
        b, b_cpu = timed_fit(watched, x, y, timed)
        ratios.append(b / a)
        cpu_ratios.append(b_cpu / a_cpu)
        plain_times.append(a)
    n_vars = len(watched.trainable_weights)
    ms = statistics.median(plain_times) / steps * 1e3
    return statistics.median(ratios), statistics.median(cpu_ratios), ms, n_vars


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI: 1 round, 4 steps")
    parser.add_argument("--rounds", type=int, default=7)
    parser.add_argument("--only", default=",".join(bench_models.MODELS))
    parser.add_argument("--out", default=None, help="also write the table (markdown) here")
    parser.add_argument(
        "--configs", default=None, help="only these configurations (labels, comma-separated)"
    )
    args = parser.parse_args(argv)
    bench_models.SMOKE = args.smoke
    rounds = 1 if args.smoke else args.rounds
    rows = []
    header = (
        "| model | variables | configuration | plain ms/step | ratio (gradwatch / plain) "
        "| CPU-time ratio | load |"
    )
    print(header)
    print("|---|---|---|---|---|---|---|")
    for name in args.only.split(","):
        steps = 4 if args.smoke else STEPS[name]
        chosen = configs(name)
        if args.smoke and keras.backend.backend() == "tensorflow":
            # the harness's every path once: a watched gradwatch model (spe + jit; histogram
            # + values) and a plain model watched once, then fitted without the watch
            chosen = [c for c in chosen if c[0] in SMOKE_CONFIGS]
        if args.configs:
            chosen = [c for c in chosen if c[0] in args.configs.split(",")]
        for label, watch_kwargs, compile_kwargs in chosen:
            later = label.endswith(LATER)
            plain = later or label.endswith(PLAIN)
            ratio, cpu_ratio, ms, n_vars = compare(
                name, watch_kwargs, compile_kwargs, rounds, steps, plain, later
            )
            load = os.getloadavg()[0]
            row = (
                f"| {name} | {n_vars} | {label} | {ms:.2f} | {ratio:.3f}x | {cpu_ratio:.3f}x "
                f"| {load:.1f} |"
            )
            rows.append(row)
            print(row, flush=True)
    if args.out:
        backend = keras.backend.backend()
        version = __import__(backend).__version__
        with open(args.out, "w") as f:
            f.write(
                f"Measured {date.today()} on {platform.processor() or platform.machine()}, "
                f"{os.cpu_count()} cores, {backend} {version}, Keras {keras.__version__}, "
                f"{rounds} rounds.\n\n{header}\n{'|---' * 7}|\n" + "\n".join(rows) + "\n"
            )
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
