"""Memory and storage: RAM per recorded value, frame build rate, bytes on disk, streaming RSS.

Usage: python benchmarks/memory.py [--smoke] [--steps N] [--out FILE]

- RAM per value: the bytes of the dense blocks a `GradientLog` holds, divided by
  the number of recorded values, after a real fit of the MLP (10x256, default stats).
- Frame build: rows per second of `log.frame` on a log of about 5M rows (the fitted
  log's blocks repeated, so the structure is real).
- Disk: bytes per recorded value of `to_parquet` and `to_csv` for the fitted log.
- Streaming RSS: growth of the process's resident memory over a long MLP run with
  `GradWatch(path=...)`, from step 1,000 (after warm-up) to the end.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time
from datetime import date

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

sys.path.insert(0, os.path.dirname(__file__))
import models as bench_models

import gradwatch
from gradwatch.log import store_of


def rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def mlp_model():
    keras.utils.set_random_seed(0)
    model = bench_models.mlp(gradwatch.Sequential)
    model.compile(
        keras.optimizers.SGD(1e-3), keras.losses.SparseCategoricalCrossentropy(from_logits=True)
    )
    return model


def block_bytes(log: gradwatch.GradientLog) -> int:
    total = 0
    store = store_of(log)
    for block in (*store.stat_blocks, *store.value_blocks, *store.hist_blocks):
        total += sum(a.nbytes for a in (block.steps, block.epochs, block.batches, block.codes))
        total += block.data.nbytes
    return total


def in_memory(steps: int) -> tuple[gradwatch.GradientLog, dict]:
    model = mlp_model()
    x, y = bench_models.data("mlp", 64 * steps)
    watch = gradwatch.GradWatch()
    model.fit(x, y, batch_size=64, epochs=1, verbose=0, callbacks=[watch])
    log = watch.log
    values = len(log.frame)
    return log, {"recorded values": values, "RAM bytes per value": block_bytes(log) / values}


def frame_rate(log: gradwatch.GradientLog, target_rows: int) -> dict:
    big = gradwatch.GradientLog(log.stat_names)
    store_of(big).add_variables(log.variables, [log.shapes[k] for k in log.variables])
    rows_per_copy = len(log.frame)
    copies = max(1, target_rows // rows_per_copy)
    span = int(log.steps[-1]) + 1
    for c in range(copies):
        for b in store_of(log).stat_blocks:
            store_of(big).append(
                b.steps + c * span, b.epochs, b.batches, b.codes, b.data,
                np.zeros((0,), np.int32), np.zeros((len(b.steps), 0), np.float32),
            )  # fmt: skip
    start = time.perf_counter()
    frame = big.frame
    seconds = time.perf_counter() - start
    return {"frame rows": len(frame), "frame build rows/s": len(frame) / seconds}


def disk(log: gradwatch.GradientLog) -> dict:
    values = len(log.frame)
    with tempfile.TemporaryDirectory() as d:
        log.to_parquet(os.path.join(d, "g.parquet"))
        log.to_csv(os.path.join(d, "g.csv"))
        pq = os.path.getsize(os.path.join(d, "g.parquet"))
        csv = os.path.getsize(os.path.join(d, "g.csv"))
    return {"Parquet bytes per value": pq / values, "CSV bytes per value": csv / values}


def streaming(steps: int) -> dict:
    model = mlp_model()
    x, y = bench_models.data("mlp", 64 * min(steps, 1000))
    samples = []

    class Sampler(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            samples.append(rss_mb())

    epochs = max(1, steps // (len(x) // 64))
    with tempfile.TemporaryDirectory() as d:
        watch = gradwatch.GradWatch(path=os.path.join(d, "run"))
        start = time.perf_counter()
        model.fit(x, y, batch_size=64, epochs=epochs, verbose=0, callbacks=[watch, Sampler()])
        seconds = time.perf_counter() - start
        n_parts = len(os.listdir(os.path.join(d, "run")))
    return {
        "streamed steps": epochs * (len(x) // 64),
        "parts written": n_parts,
        "RSS after first 1,000 steps (MB)": samples[0],
        "RSS growth after that (MB)": max(samples) - samples[0],
        "streamed run seconds": seconds,
    }


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="tiny run for CI")
    parser.add_argument("--steps", type=int, default=100_000, help="steps of the streamed run")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    bench_models.SMOKE = args.smoke
    log, results = in_memory(20 if args.smoke else 2000)
    results.update(frame_rate(log, 10_000 if args.smoke else 5_000_000))
    results.update(disk(log))
    results.update(streaming(100 if args.smoke else args.steps))
    lines = [f"| {k} | {v:,.2f} |" if isinstance(v, float) else f"| {k} | {v:,} |"
             for k, v in results.items()]  # fmt: skip
    table = "| measure | value |\n|---|---|\n" + "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Measured {date.today()}, {os.cpu_count()} cores.\n\n{table}\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
