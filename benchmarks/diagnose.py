"""The doctor's speed: `GradientLog.diagnose()` on a 500-variable, 100,000-step log.

Usage: python benchmarks/diagnose.py [--smoke] [--variables N] [--steps N] [--out FILE]

The log is synthetic but has the structure of a real one: dense blocks of 1,000
steps (as the callback drains them), kernels and biases in layers, and every stat
that a rule reads (`norm`, `nonfinite`, `zero_frac`, `update_ratio`,
`clipped_norm`, `cos_prev`), with a few planted problems (a NaN burst, a dead
layer, an oscillating kernel) so that each rule does its work. It is built in
memory; no Keras is imported. Reported: the wall time of one `diagnose()` (the
best of `--repeat`), the time to build the log, and the findings.
"""

from __future__ import annotations

import argparse
import os
import sys
import time
from datetime import date

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import gradwatch
from gradwatch.log import store_of

STATS = ("norm", "nonfinite", "zero_frac", "update_ratio", "clipped_norm", "cos_prev")


def build_log(n_vars: int, n_steps: int, block: int = 1000, seed: int = 0):
    """A log of `n_vars` variables (kernel, bias pairs) and `n_steps` steps."""
    rng = np.random.default_rng(seed)
    log = gradwatch.GradientLog(stats=STATS)
    store = store_of(log)
    keys, shapes = [], []
    for i in range(n_vars // 2):
        keys += [f"model/dense_{i}/kernel", f"model/dense_{i}/bias"]
        shapes += [(64, 64), (64,)]
    codes = store.add_variables(keys, shapes)
    n = len(keys)
    scale = np.exp(rng.normal(size=n)).astype(np.float32)  # each variable's typical norm
    for start in range(0, n_steps, block):
        k = min(block, n_steps - start)
        steps = np.arange(start, start + k, dtype=np.int64)
        data = np.empty((k, n, len(STATS)), np.float32)
        norm = scale * np.exp(0.3 * rng.standard_normal((k, n), dtype=np.float32))
        data[:, :, 0] = norm
        data[:, :, 1] = 0
        data[:, :, 2] = 0.01
        data[:, :, 3] = 1e-3 * np.exp(0.2 * rng.standard_normal((k, n), dtype=np.float32))
        data[:, :, 4] = norm
        data[:, :, 5] = rng.uniform(-0.3, 0.6, size=(k, n)).astype(np.float32)
        # Planted: layer 3 is dead, bias 5 oscillates, a NaN burst at 10 steps mid-run.
        data[:, 6:8, 0] = 0
        data[:, 6:8, 2] = 1
        data[:, 10, 5] = -0.9
        if start <= n_steps // 2 < start + k:
            row = n_steps // 2 - start
            data[row : row + 10, n - 3, 1] = 7
        store.append(steps, steps // 1000, steps % 1000, codes, data, codes[:0], np.zeros((k, 0)))
    return log


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny log, to test the harness")
    parser.add_argument("--variables", type=int, default=500)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--repeat", type=int, default=3)
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    if args.smoke:
        args.variables, args.steps, args.repeat = 20, 2_000, 1
    t0 = time.perf_counter()
    log = build_log(args.variables, args.steps)
    built = time.perf_counter() - t0
    best = float("inf")
    for _ in range(args.repeat):
        t0 = time.perf_counter()
        findings = log.diagnose()
        best = min(best, time.perf_counter() - t0)
    names = ", ".join(f"{r.severity} {r.finding}" for r in findings.itertuples())
    lines = [
        f"Measured {date.today().isoformat()}, {os.cpu_count()} CPUs, NumPy {np.__version__}.",
        "",
        "| variables | steps | stats | build log s | diagnose s | findings |",
        "|---|---|---|---|---|---|",
        f"| {len(log.variables)} | {args.steps} | {len(STATS)} | {built:.2f} | {best:.2f} "
        f"| {names} |",
    ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
