"""The cost of the examples behind a step: one per-example replay of a batch (each
example's loss and gradient norm) against one plain training step of the same batch; and
of one noise-scale replay (`noise_scale_every`: the gradients of the batch's two halves
and of the whole, `halves`).

Usage: python benchmarks/examples.py [--smoke] [--batch N] [--repeat N] [--out FILE]

The model is the benchmarks' Transformer (`models.transformer`, 4 encoder blocks, 68
trainable variables), trained one step first; the replay takes every trainable variable
(what `GradWatch` watches by default) on the weights as they are. Both are timed in this
process, alternately, after a first call that compiles each (the replay's first call is
reported apart: it is paid once per model and batch size). Each path of
`gradwatch._forensics.examples.PATHS` that compiles is timed on its own (`vectorized`, then
`loop`). A step that is not replayed pays nothing: the replay runs on the host, between
steps, only for the steps it is asked for.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import models as bench_models

from gradwatch._forensics.examples import example_gradients
from gradwatch._forensics.halves import halves_sq_norms
from gradwatch._forensics.replay import Batch


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model, to test the harness")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=7)
    parser.add_argument(
        "--paths", default="vectorized,loop,halves", help="comma-separated (halves: noise scale)"
    )
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    name = "mlp" if args.smoke else "transformer"
    if args.smoke:
        bench_models.SMOKE = True
        args.batch, args.repeat = 8, 1
    keras.utils.set_random_seed(0)
    model = bench_models.MODELS[name](keras.Sequential)
    model.compile(
        keras.optimizers.Adam(1e-3),
        keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    x, y = bench_models.data(name, args.batch)
    model.fit(x, y, batch_size=args.batch, epochs=1, verbose=0)
    model.train_on_batch(x, y)  # the step compiled, outside the timings
    batch = Batch(x, y, None, args.batch)
    variables = model.trainable_variables
    backend = keras.backend.backend()
    lines = [
        f"Per-example replay of one batch ({date.today()}, {backend}, {os.cpu_count()} CPUs)",
        "",
        f"| model | batch | path | plain step, median of {args.repeat} (ms) | first replay (s) "
        f"| replay, median of {args.repeat} (ms) | replay / step |",
        "|---|---|---|---|---|---|---|",
    ]

    def run_once(path: str) -> None:
        if path == "halves":
            row = halves_sq_norms(model, batch, variables)
            assert row is not None and np.isfinite(row[2:]).all()
            return
        losses, norms = example_gradients(model, batch, variables, path=path)
        assert losses.shape == norms.shape == (args.batch,) and np.isfinite(norms).all()

    for path in args.paths.split(","):
        start = time.perf_counter()
        run_once(path)
        first = time.perf_counter() - start
        steps, replays = [], []
        for _ in range(args.repeat):  # alternately, so that a load on the machine hits both
            start = time.perf_counter()
            model.train_on_batch(x, y)
            steps.append(time.perf_counter() - start)
            start = time.perf_counter()
            run_once(path)
            replays.append(time.perf_counter() - start)
        step, replay = float(np.median(steps)), float(np.median(replays))
        lines.append(
            f"| {name} | {args.batch} | {path} | {step * 1e3:.1f} | {first:.2f} "
            f"| {replay * 1e3:.1f} | {replay / step:.1f}x |"
        )
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
