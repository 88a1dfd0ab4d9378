"""benchmarks/gpu.py, the GPU rows' one command: its CPU dry run, end to end, so that it
cannot rot between the rare runs on a GPU (timings are not checked here).

The dry run times the MLP alone, on TensorFlow alone: the transformer's rows take the
same path (`overhead.compare` with another model), and TensorFlow's XLA compile of the
transformer alone takes minutes on a loaded CPU.
"""

import os
import re
import subprocess
import sys
from pathlib import Path

from components import HANG

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "gpu.sh"
HEADER = (
    "| backend | device | model | variables | jit_compile | plain ms/step "
    "| ratio (gradwatch / plain) |"
)


def _run(tmp_path, *args):
    out = tmp_path / "gpu.md"
    env = {**os.environ, "PYTHON": sys.executable}
    run = subprocess.run(
        ["sh", str(SCRIPT), "--out", str(out), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    text = out.read_text()
    assert run.stdout == text  # the same table on stdout
    return text


def _rows(text):
    lines = text.splitlines()
    assert lines[2] == HEADER and lines[3] == "|---|---|---|---|---|---|---|"
    return [[c.strip() for c in line.strip("|").split("|")] for line in lines[4:]]


def test_gpu_dry_run_writes_one_table_with_a_row_per_model_and_jit_setting(tmp_path):
    text = _run(tmp_path, "--dry-run", "--models", "mlp")
    assert text.startswith("**Dry run on the CPU** (smoke models, 2 steps a fit, 1 round)")
    rows = _rows(text)
    assert [(r[0].split()[0], r[2], r[4]) for r in rows] == [
        ("tensorflow", "mlp", "on"),
        ("tensorflow", "mlp", "off"),
    ]
    import tensorflow as tf

    for backend, device, _, variables, _, ms, ratio in rows:
        assert backend == f"tensorflow {tf.__version__}"
        assert device.startswith("CPU")  # the framework's own device name
        assert variables == "6"  # the smoke MLP: 3 Dense layers
        assert float(ms) > 0
        assert re.fullmatch(r"\d+\.\d{3}x", ratio)
    # Each backend's output is kept beside the table.
    assert (tmp_path / "gpu.logs" / "tensorflow.log").exists()


def test_gpu_rows_that_miss_the_deadline_are_written_as_such(tmp_path):
    # A deadline already passed: no backend starts, and the table says so for each row.
    text = _run(tmp_path, "--dry-run", "--deadline", "0", "--backends", "tensorflow,jax")
    rows = _rows(text)
    assert [(r[0], r[2], r[4]) for r in rows] == [
        (backend, model, jit)
        for backend in ("tensorflow", "jax")
        for jit in ("on", "off")
        for model in ("mlp", "transformer")
    ]
    for row in rows:
        assert row[1] == row[3] == row[5] == "-"
        assert row[6] == "did not finish: no time left"


def test_gpu_script_refuses_an_unknown_backend(tmp_path):
    run = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / "gpu.py"), "--backends", "tensorflow,mxnet"],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert run.returncode == 2
    assert "--backends takes tensorflow, jax, torch. Received: mxnet" in run.stderr
