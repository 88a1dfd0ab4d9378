"""The benchmarks' smoke mode: the harness runs end to end (timings are not checked here)."""

import os
import re
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def _run(script, tmp_path, *args):
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    out = tmp_path / "table.md"
    result = subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / script), "--smoke", "--out", str(out), *args],
        capture_output=True,
        text=True,
        env=env,
        timeout=600,
    )
    assert result.returncode == 0, result.stderr[-3000:]
    return out.read_text()


def test_overhead_benchmark_smoke(tmp_path):
    table = _run("overhead.py", tmp_path, "--only", "mlp")
    rows = [line for line in table.splitlines() if line.startswith("| mlp")]
    assert len(rows) == 6
    assert [r.split(" | ")[2] for r in rows[-2:]] == [
        "default, plain model",
        "plain model, later fit without the watch",
    ]
    for row in rows:
        ratio = float(re.search(r"\| ([0-9.]+)x \|$", row).group(1))
        assert ratio > 0


def test_memory_benchmark_smoke(tmp_path):
    table = _run("memory.py", tmp_path)
    assert "| RAM bytes per value |" in table
    assert "| parts written | 1 |" in table


def test_cli_start_benchmark_smoke(outlier, tmp_path):
    outlier.log.to_parquet(tmp_path / "grads.parquet")
    table = _run("cli_start.py", tmp_path, "--log", str(tmp_path / "grads.parquet"))
    rows = [line for line in table.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| python -c pass",
        "| gradwatch --help",
        "| gradwatch summary LOG",
        "| gradwatch summary LOG --sort max_norm",
    ]


def test_diagnose_benchmark_smoke(tmp_path):
    table = _run("diagnose.py", tmp_path)
    (row,) = [line for line in table.splitlines() if line.startswith("| 20 | 2000 |")]
    # The planted problems are found: a NaN burst, a dead layer, an oscillating kernel.
    assert row.endswith("| error nonfinite, warning dead, warning oscillation |")
    assert float(row.split(" | ")[4]) > 0
