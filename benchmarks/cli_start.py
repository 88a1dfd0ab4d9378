"""Start-up time of the `gradwatch` command line, against a bare Python start.

Usage: python benchmarks/cli_start.py [--smoke] [--rounds N] [--log LOG] [--out FILE]

Each command runs as a fresh `python -m gradwatch ...` subprocess; the rows are
measured alternately, round after round, and the table gives each one's median
wall time and its ratio to `python -c pass` (a bare interpreter start). The log
is a real one: a small MLP fitted for 60 steps, saved as Parquet (or `--log`).
`import keras` is there for scale: what every command would pay if it imported
Keras (left out with `--smoke`).
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def make_log(path: str) -> None:
    import keras
    import numpy as np

    import gradwatch

    keras.utils.set_random_seed(0)
    model = keras.Sequential(
        [keras.Input((16,)), keras.layers.Dense(64, activation="relu"), keras.layers.Dense(4)]
    )
    model.compile("sgd", "mse")
    x, y = np.random.rand(960, 16), np.random.rand(960, 4)
    watch = gradwatch.GradWatch()
    model.fit(x, y, batch_size=16, callbacks=[watch], verbose=0)
    watch.log.to_parquet(path)


def commands(log: str, smoke: bool) -> dict[str, list[str]]:
    py = sys.executable
    rows = {
        "python -c pass": [py, "-c", "pass"],
        "gradwatch --help": [py, "-m", "gradwatch", "--help"],
        "gradwatch summary LOG": [py, "-m", "gradwatch", "summary", log],
        "gradwatch summary LOG --sort max_norm": [
            *[py, "-m", "gradwatch", "summary", log, "--sort", "max_norm"]
        ],
    }
    if not smoke:
        rows["python -c 'import keras' (for scale)"] = [py, "-c", "import keras"]
    return rows


def timed(argv: list[str]) -> float:
    env = {**os.environ, "PYTHONPATH": ROOT}
    start = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env)
    return time.perf_counter() - start


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="one round, for CI")
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--log", default=None, help="a saved log (default: fit one)")
    parser.add_argument("--out", default=None)
    args = parser.parse_args(argv)
    rounds = 1 if args.smoke else args.rounds
    with tempfile.TemporaryDirectory() as tmp:
        log = args.log
        if log is None:
            log = os.path.join(tmp, "grads.parquet")
            make_log(log)
        rows = commands(log, args.smoke)
        if not args.smoke:
            for argv_ in rows.values():  # warm the file cache once
                timed(argv_)
        times: dict[str, list[float]] = {name: [] for name in rows}
        for _ in range(rounds):
            for name, argv_ in rows.items():
                times[name].append(timed(argv_))
    bare = statistics.median(times["python -c pass"])
    lines = []
    for name, values in times.items():
        ms = statistics.median(values) * 1e3
        lines.append(f"| {name} | {ms:.0f} | {ms / (bare * 1e3):.1f}x |")
    table = "| command | median ms | ratio to `python -c pass` |\n|---|---|---|\n"
    table += "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(f"Measured {date.today()}, {os.cpu_count()} cores, {rounds} rounds.\n\n")
            f.write(table + "\n")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
