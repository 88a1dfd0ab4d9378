"""The GPU rows of the capture overhead, from one command, within 8 minutes.

Usage: python benchmarks/gpu.py [--dry-run] [--out FILE] [--backends tensorflow,jax,torch]
    [--models mlp,transformer] [--no-install] [--rounds N] [--deadline SECONDS]

For each backend, in its own process: installs its CUDA build where it sees no GPU yet
(TensorFlow's `tensorflow[and-cuda]`, JAX's `jax[cuda12]`, PyTorch's PyPI wheel, which is
the CUDA build on Linux), then times the MLP and transformer rows of
`benchmarks/overhead.py` (`compare`: a plain and a gradwatch model, alternately, in one
process) with the default stats, `jit_compile` on and then off. Writes one Markdown table,
with the GPU's name, to `--out` (and stdout). A global deadline, 8 minutes from the start
by default, stops everything: each backend gets an equal share of the time left when its
turn comes, its process is killed when the share runs out, and what did not finish is
written as such in the table.

`--dry-run` runs the same path on the CPU with the smoke models, two steps a fit and one
round, no installs, and the TensorFlow backend alone unless `--backends` names others
(JAX's unjitted step and PyTorch's `torch.compile` take minutes on a CPU): CI runs it so
that the script cannot rot. Its numbers are not measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
BACKENDS = ("tensorflow", "jax", "torch")
MODELS = ("mlp", "transformer")
#: What each backend's CUDA build is installed with (`pip install ...`).
INSTALL = {
    "tensorflow": ["tensorflow[and-cuda]>=2.21,<2.22"],
    "jax": ["jax[cuda12]>=0.10,<0.11"],
    # PyPI's Linux wheel is the CUDA build; a CPU build (`+cpu`) already satisfies the
    # version, so it is reinstalled.
    "torch": ["--force-reinstall", "torch>=2.13,<2.14"],
}
DEADLINE = 480.0  # seconds: 8 minutes
MARGIN = 10.0  # seconds kept back for writing the table
HEADER = (
    "| backend | device | model | variables | jit_compile | plain ms/step "
    "| ratio (gradwatch / plain) |"
)


# ------------------------------------------------------------------ one backend's process
def _device(backend: str) -> tuple[str, bool]:
    """The device the backend runs on, as the framework names it, and whether it is a GPU."""
    if backend == "tensorflow":
        import tensorflow as tf

        gpus = tf.config.list_physical_devices("GPU")
        if not gpus:
            return f"CPU ({platform.processor() or platform.machine()})", False
        return tf.config.experimental.get_device_details(gpus[0]).get("device_name", "GPU"), True
    if backend == "jax":
        import jax

        device = jax.devices()[0]
        return device.device_kind, device.platform == "gpu"
    import torch

    if torch.cuda.is_available():
        return torch.cuda.get_device_name(0), True
    return f"CPU ({platform.processor() or platform.machine()})", False


def worker(backend: str, out: Path, dry_run: bool, rounds: int, models: list[str]) -> None:
    """Times the rows on this backend, one JSON line each in `out` as it finishes."""
    sys.path.insert(0, str(HERE))
    device, gpu = _device(backend)
    version = __import__(backend).__version__
    with out.open("a") as f:
        f.write(json.dumps({"device": device, "version": version, "gpu": gpu}) + "\n")
    if not gpu and not dry_run:
        return  # no GPU row to measure; the table says so
    import models as bench_models
    import overhead

    bench_models.SMOKE = dry_run
    for jit in (True, False):
        for name in models:
            steps = 2 if dry_run else overhead.STEPS[name]
            # The CPU-time ratio (second) means little beside a GPU: the wall ratio is kept.
            ratio, _, ms, n_vars = overhead.compare(name, {}, {"jit_compile": jit}, rounds, steps)
            row = {"model": name, "jit": jit, "ratio": ratio, "ms": ms, "variables": n_vars}
            with out.open("a") as f:
                f.write(json.dumps(row) + "\n")


# ------------------------------------------------------------------------- the driver
class Clock:
    """Seconds left before the global deadline."""

    def __init__(self, seconds: float):
        self.end = time.monotonic() + seconds

    def left(self) -> float:
        return max(0.0, self.end - time.monotonic() - MARGIN)


def _run(cmd: list[str], env: dict, timeout: float, log) -> str | None:
    """Runs `cmd` in its own process group; kills the group after `timeout` seconds.
    Returns None when it ended with 0, else why not."""
    if timeout <= 0:
        return "no time left"
    proc = subprocess.Popen(
        cmd, env=env, stdout=log, stderr=subprocess.STDOUT, start_new_session=True
    )
    try:
        code = proc.wait(timeout=timeout)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)
        proc.wait()
        return f"stopped at the deadline after {timeout:.0f} s"
    return None if code == 0 else f"exit status {code}"


def _env(backend: str, dry_run: bool) -> dict:
    env = {
        **os.environ,
        "KERAS_BACKEND": backend,
        "TF_CPP_MIN_LOG_LEVEL": "3",
        "PYTHONPATH": os.pathsep.join(p for p in (str(ROOT), os.environ.get("PYTHONPATH")) if p),
    }
    if dry_run:
        env.update(CUDA_VISIBLE_DEVICES="", JAX_PLATFORMS="cpu")
    return env


def _probe(backend: str, env: dict, timeout: float, log) -> bool:
    """Whether the backend imports and sees a GPU, in a fresh process."""
    code = (
        f"import sys; sys.path.insert(0, {str(HERE)!r}); import gpu; "
        f"sys.exit(0 if gpu._device({backend!r})[1] else 3)"
    )
    return _run([sys.executable, "-c", code], env, timeout, log) is None


def run_backend(backend: str, args, clock: Clock, share: float, logdir: Path) -> dict:
    """Installs (where needed) and runs one backend within `share` seconds; returns its
    device line, rows and the reason it stopped early, if it did."""
    end = time.monotonic() + share
    left = lambda: min(clock.left(), end - time.monotonic())  # noqa: E731
    env = _env(backend, args.dry_run)
    result: dict = {"backend": backend, "rows": [], "stopped": None, "device": None}
    with (logdir / f"{backend}.log").open("w") as log:
        if (
            not args.dry_run
            and not args.no_install
            and not _probe(backend, env, min(60, left()), log)
        ):
            pip = [sys.executable, "-m", "pip", "install", "--retries", "1", "--timeout", "15"]
            why = _run([*pip, *INSTALL[backend]], env, left(), log)
            if why is not None:
                result["install"] = f"pip install {' '.join(INSTALL[backend])}: {why}"
        rows = logdir / f"{backend}.jsonl"
        cmd = [sys.executable, __file__, "--worker", backend, "--rows", str(rows)]
        cmd += ["--rounds", str(args.rounds), "--models", ",".join(args.models)]
        cmd += ["--dry-run"] if args.dry_run else []
        result["stopped"] = _run(cmd, env, left(), log)
    lines = []
    for line in rows.read_text().splitlines() if rows.exists() else []:
        try:
            lines.append(json.loads(line))
        except json.JSONDecodeError:  # a line cut off when the process was killed
            break
    if lines:
        result["device"] = lines[0]
        result["rows"] = lines[1:]
    return result


def _gpu_name() -> str:
    """The GPU as nvidia-smi names it (name, memory, driver), or why there is none."""
    if shutil.which("nvidia-smi") is None:
        return "no nvidia-smi on this machine"
    query = ["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"]
    try:
        out = subprocess.run(query, capture_output=True, text=True, timeout=30, check=True).stdout
    except (OSError, subprocess.SubprocessError) as e:
        return f"nvidia-smi failed: {e}"
    return "; ".join(line.strip() for line in out.splitlines() if line.strip())


def table(results: list[dict], args, started: float) -> str:
    """The one Markdown table: a row per backend, model and jit setting."""
    kind = (
        "**Dry run on the CPU** (smoke models, 2 steps a fit, 1 round): not a measurement."
        if args.dry_run
        else f"GPU: {_gpu_name()}."
    )
    took = time.monotonic() - started
    lines = [
        f"{kind} Measured {date.today()} by `benchmarks/gpu.py` in {took:.0f} s "
        f"(deadline {args.deadline:.0f} s), {args.rounds} rounds, each backend in its own process; "
        "default stats; the ratio is the median over rounds of time(gradwatch) / time(plain).",
        "",
        HEADER,
        "|---|---|---|---|---|---|---|",
    ]
    for r in results:
        device = r["device"] or {}
        backend = f"{r['backend']} {device.get('version', '')}".strip()
        name = device.get("device", "-")
        done = {(row["model"], row["jit"]): row for row in r["rows"]}
        if device and not device["gpu"] and not args.dry_run:
            why = "not run: the backend sees no GPU"
        elif r["stopped"]:
            why = f"did not finish: {r['stopped']}"
        else:
            why = "not run"
        if r.get("install") and not done:
            why += f" ({r['install']})"
        for jit in (True, False):
            for model in args.models:
                row = done.get((model, jit))
                cells = [backend, name, model]
                if row is None:
                    cells += ["-", "on" if jit else "off", "-", why]
                else:
                    cells += [
                        str(row["variables"]),
                        "on" if jit else "off",
                        f"{row['ms']:.2f}",
                        f"{row['ratio']:.3f}x",
                    ]
                lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n"


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--dry-run", action="store_true", help="CPU, tiny sizes, no installs")
    parser.add_argument("--out", default=None, help="also write the table (Markdown) here")
    parser.add_argument("--backends", default=None, help="comma-separated; default: all three")
    parser.add_argument("--models", default=",".join(MODELS), help="default: mlp,transformer")
    parser.add_argument("--no-install", action="store_true", help="use what is installed")
    parser.add_argument("--rounds", type=int, default=None, help="default: 5 (1 in a dry run)")
    parser.add_argument("--deadline", type=float, default=DEADLINE, help="seconds, all in all")
    parser.add_argument("--worker", default=None, help=argparse.SUPPRESS)
    parser.add_argument("--rows", default=None, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.rounds is None:
        args.rounds = 1 if args.dry_run else 5
    args.models = args.models.split(",")
    if args.worker:
        worker(args.worker, Path(args.rows), args.dry_run, args.rounds, args.models)
        return 0
    backends = (args.backends or ("tensorflow" if args.dry_run else ",".join(BACKENDS))).split(",")
    for flag, given, known in (("backends", backends, BACKENDS), ("models", args.models, MODELS)):
        unknown = [b for b in given if b not in known]
        if unknown:
            parser.error(f"--{flag} takes {', '.join(known)}. Received: {','.join(unknown)}")
    started, clock = time.monotonic(), Clock(args.deadline)
    # Each backend's output (installs included) and rows, for a look when a row is missing.
    if args.out:
        logdir = Path(args.out).with_suffix(".logs")
        shutil.rmtree(logdir, ignore_errors=True)
        logdir.mkdir(parents=True)
    else:
        logdir = Path(tempfile.mkdtemp(prefix="gradwatch-gpu-"))
    print(f"logs: {logdir}", file=sys.stderr)
    results = []
    # Each backend is installed just before it runs: the three CUDA builds pin the shared
    # `nvidia-*` packages differently, and a later install cannot break a finished run.
    for i, backend in enumerate(backends):
        share = clock.left() / (len(backends) - i)
        results.append(run_backend(backend, args, clock, share, logdir))
    text = table(results, args, started)
    print(text, end="")
    if args.out:
        Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
