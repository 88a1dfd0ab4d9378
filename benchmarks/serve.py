"""The live page: what the live tail costs the training, and how `gradwatch serve` keeps up
with a long log.

Usage: python benchmarks/serve.py [--tail] [--page] [--rounds N] [--steps N] [--variables N]

`--tail`: for each model, the same watched `fit` (`GradWatch(path=...)`, the default
`flush_every`) with the live tail (a frame every `TAIL_SECONDS`) and without it
(`TAIL_SECONDS = inf`), alternately after a warm-up; the ratio is the median over rounds
of time(with) / time(without), each fit timed from `on_train_begin` to `on_train_end`.

`--page`: a synthetic streamed log (`--variables` variables in layers of a kernel and a
bias, `--steps` steps, the default stats, parts of 1,000 steps written with the store's
own writers, and a live tail of 500 steps), then `gradwatch serve`'s state on it: the
first read and page (what a browser waits for), a poll with nothing new, a poll with a
new tail frame of 100 steps, a poll with a new part, the JSON's size, the doctor's run
and the process's resident memory.
"""

from __future__ import annotations

import argparse
import os
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")


def _rss_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) / 1024
    return float("nan")


def _peak_mb() -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmHWM:"):
                return int(line.split()[1]) / 1024
    return float("nan")


# ------------------------------------------------------------------ the tail's cost
def tail_cost(rounds: int) -> None:
    import keras

    sys.path.insert(0, os.path.dirname(__file__))
    import models as bench_models

    import gradwatch
    from gradwatch._capture import live_tail

    class Timer(keras.callbacks.Callback):
        def on_train_begin(self, logs=None):
            self.start = time.perf_counter()

        def on_train_end(self, logs=None):
            self.seconds = time.perf_counter() - self.start

    # The time spent in the tail's writes, within each fit with the tail: a share that the
    # machine's load changes less than the ratio of two fits.
    spent = [0.0]
    write = live_tail.LiveTail.write

    def timed_write(self, *args):
        start = time.perf_counter()
        write(self, *args)
        spent[0] += time.perf_counter() - start

    live_tail.LiveTail.write = timed_write
    steps = {"mlp": 2000, "many": 1000}
    print(
        "| model | variables | steps per fit | without tail s | with tail s | ratio | "
        "in the tail's writes |"
    )
    print("|---|---|---|---|---|---|---|")
    default = live_tail.TAIL_SECONDS
    for name, n in steps.items():
        keras.utils.set_random_seed(0)
        model = bench_models.MODELS[name](keras.Sequential)
        model.compile("sgd", keras.losses.SparseCategoricalCrossentropy(from_logits=True))
        x, y = bench_models.data(name, 64 * n)
        times: dict[bool, list[float]] = {True: [], False: []}
        shares: list[float] = []
        with tempfile.TemporaryDirectory() as tmp:
            for i in range(rounds + 1):
                for tail in (False, True):
                    live_tail.TAIL_SECONDS = default if tail else float("inf")
                    watch = gradwatch.GradWatch(path=Path(tmp) / f"{tail}{i}", verbose=0)
                    timer = Timer()
                    spent[0] = 0.0
                    model.fit(
                        x, y, batch_size=64, epochs=1, shuffle=False, verbose=0,
                        callbacks=[watch, timer],
                    )  # fmt: skip
                    if i:  # the first round warms up
                        times[tail].append(timer.seconds)
                        if tail:
                            shares.append(spent[0] / timer.seconds)
        live_tail.TAIL_SECONDS = default
        ratios = [a / b for a, b in zip(times[True], times[False], strict=True)]
        print(
            f"| {name} | {len(model.trainable_variables)} | {n} | "
            f"{statistics.median(times[False]):.2f} | {statistics.median(times[True]):.2f} | "
            f"{statistics.median(ratios):.3f}x | {100 * statistics.median(shares):.1f}% |",
            flush=True,
        )


# ------------------------------------------------------------------ the page
def _synthetic(start: int, steps: int, keys: list[str], rng):
    import numpy as np

    from gradwatch._logdata.store import SCALARS, Store
    from gradwatch.stats import DEFAULT_STATS

    store = Store(DEFAULT_STATS)
    codes = store.add_variables(keys, [(64,)] * len(keys))
    step = np.arange(start, start + steps)
    data = rng.lognormal(size=(steps, len(keys), len(DEFAULT_STATS))).astype(np.float32)
    data[:, :, DEFAULT_STATS.index("nonfinite")] = 0
    scalars = np.zeros((steps, len(SCALARS)), np.float32)
    scalars[:, SCALARS.index("loss")] = rng.random(steps)
    scalars[:, SCALARS.index("learning_rate")] = 1e-3
    scalars[:, SCALARS.index("applied")] = 1
    scalars[:, SCALARS.index("global_norm")] = np.sqrt((data[:, :, 0] ** 2).sum(1))
    none = np.zeros((steps, 0), np.float32)
    store.append(
        step, step // 1000, step % 1000, codes, data, codes[:0], none, scalars=scalars
    )  # fmt: skip
    return store


def page(steps: int, variables: int) -> None:
    import json

    import numpy as np

    from gradwatch._logdata import files
    from gradwatch._logdata.tail import append_frame, frame_bytes, tail_file
    from gradwatch._ui.live_server import LiveState

    rng = np.random.default_rng(0)
    keys = [f"net/dense_{i // 2}/{'kernel' if i % 2 == 0 else 'bias'}" for i in range(variables)]
    root = Path(tempfile.mkdtemp())
    run = files.run_directory(root, 0, files.new_run_id())
    run.mkdir(parents=True)
    start = time.perf_counter()
    parts = steps // 1000
    for i in range(parts - 1):
        files.append_part(_synthetic(i * 1000, 1000, keys, rng), run)
    last = _synthetic((parts - 1) * 1000, 1000, keys, rng)
    tail = tail_file(run, parts - 1)
    head = last.since(0)
    later = head.split_from(last.stat_blocks[0].steps[0] + 500)
    append_frame(tail, frame_bytes(files.part_table(head)))
    build = time.perf_counter() - start
    size = sum(p.stat().st_size for p in root.rglob("*")) / 2**20
    print(f"log: {variables} variables, {steps} steps ({parts - 1} parts and a tail of 500 steps)")
    print(f"built and written in {build:.1f} s, {size:.0f} MB on disk")
    rss0 = _rss_mb()

    state = LiveState(root)
    start = time.perf_counter()
    state.update()  # the first answer: the tail and the first parts
    first = time.perf_counter() - start
    first_body = state.answer(None)
    while state.follower.queue:
        state.update()
    whole = time.perf_counter() - start
    body = state.answer(None)
    rss1 = _rss_mb()
    state.update()  # starts the doctor, now that the whole log is read
    state.doctor.thread.join()
    doctor = state.doctor.took
    state.update()  # the doctor's result into the JSON
    rows = [
        ("first answer (the tail and the first parts)", first, len(first_body)),
        ("the whole log read, and its page", whole, len(body)),
    ]

    def poll(label: str) -> None:
        start = time.perf_counter()
        state.update()
        rows.append((label, time.perf_counter() - start, len(state.answer(None))))

    poll("poll, nothing new")
    head = later.since(0)
    more = head.split_from(int(later.stat_blocks[0].steps[0]) + 100)
    append_frame(tail, frame_bytes(files.part_table(head)))
    poll("poll, a tail frame of 100 steps")
    del more
    files.append_part(last, run)
    poll("poll, a new part of 1,000 steps")
    assert json.loads(state.answer(None))["last_step"] == steps - 1
    print()
    print("| what | seconds | JSON bytes |")
    print("|---|---|---|")
    for label, seconds, n in rows:
        print(f"| {label} | {seconds:.3f} | {n:,} |")
    print()
    print(f"the doctor on the whole log: {doctor:.1f} s (in its own thread)")
    state.stop.set()
    shutil.rmtree(root, ignore_errors=True)
    peak = _peak_mb()
    print(f"RSS: {rss0:.0f} MB before, {rss1:.0f} MB after the first read; peak {peak:.0f} MB")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tail", action="store_true", help="the live tail's cost to training")
    parser.add_argument("--page", action="store_true", help="the server on a long log")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=100_000)
    parser.add_argument("--variables", type=int, default=500)
    args = parser.parse_args()
    if not (args.tail or args.page):
        args.tail = args.page = True
    if args.page:
        page(args.steps, args.variables)
    if args.tail:
        tail_cost(args.rounds)


if __name__ == "__main__":
    main()
