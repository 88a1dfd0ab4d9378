"""The cost of one replay: time and peak memory of `gradwatch.trace_nonfinite` on one batch.

Usage: python benchmarks/replay.py [--smoke] [--batch N] [--repeat N] [--out FILE]

The batch is finite, so the replay walks every stage (input, targets, each layer's
output, the loss, the backward pass layer by layer): the most a replay costs. Its model
is the benchmarks' Transformer (`models.transformer`, 4 encoder blocks), trained one
step first. A replay runs only at the first step that `on_nonfinite` kept from the
model; finite steps never pay it. Peak memory is the growth of the process's peak
resident set (VmHWM) over the replays, above what the trained model already held.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras

sys.path.insert(0, os.path.dirname(__file__))
import models as bench_models

import gradwatch


def peak_rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny model, to test the harness")
    parser.add_argument("--batch", type=int, default=64)
    parser.add_argument("--repeat", type=int, default=5)
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
    before = peak_rss_mb()
    first = time.perf_counter()
    assert gradwatch.trace_nonfinite(model, x, y) is None  # finite: every stage walked
    first = time.perf_counter() - first
    times = []
    for _ in range(args.repeat):
        start = time.perf_counter()
        gradwatch.trace_nonfinite(model, x, y)
        times.append(time.perf_counter() - start)
    peak = peak_rss_mb() - before
    backend = keras.backend.backend()
    lines = [
        f"Replay of one batch ({date.today()}, {backend}, {os.cpu_count()} CPUs)",
        "",
        "| model | batch | first replay (s) | replay, median of "
        f"{args.repeat} (s) | peak RSS growth (MB) |",
        "|---|---|---|---|---|",
        f"| {name} | {args.batch} | {first:.2f} | {sorted(times)[len(times) // 2]:.2f} "
        f"| {peak:.0f} |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
