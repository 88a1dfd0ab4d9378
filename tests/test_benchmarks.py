"""The benchmarks' smoke mode: the harness runs end to end (timings are not checked here).

The benchmarks run one after another in one subprocess (a benchmark is a script,
and `benchmarks/models.py` would shadow the tests' own `models` in this process), so
TensorFlow is imported once for all of them; each test reads its benchmark's table."""

import json
import os
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from components import HANG

ROOT = Path(__file__).resolve().parent.parent

# Runs each script as `python SCRIPT --smoke --out TABLE ARGS...` would, and writes what
# became of each (its exit status, or the end of its traceback) to the report file.
_DRIVER = textwrap.dedent(
    """
    import json, runpy, sys, traceback
    jobs, report = json.loads(sys.argv[1]), sys.argv[2]
    results = {}
    for name, argv in jobs.items():
        sys.argv = argv
        try:
            runpy.run_path(argv[0], run_name="__main__")
            results[name] = 0
        except SystemExit as e:
            results[name] = e.code or 0
        except BaseException:
            results[name] = traceback.format_exc()[-3000:]
    with open(report, "w") as f:
        json.dump(results, f)
    """
)


@pytest.fixture(scope="module")
def tables(outlier, tmp_path_factory):
    """Each benchmark's table (or what stopped it), from one `--smoke` run of them all."""
    tmp = tmp_path_factory.mktemp("benchmarks")
    outlier.log.to_parquet(tmp / "grads.parquet")
    extra = {
        "overhead": ["--only", "mlp"],
        "memory": [],
        "cli_start": ["--log", str(tmp / "grads.parquet")],
        "diagnose": [],
        "replay": [],
        "examples": [],
    }
    jobs = {
        name: [str(ROOT / "benchmarks" / f"{name}.py"), "--smoke", "--out", str(tmp / name), *args]
        for name, args in extra.items()
    }
    env = {**os.environ, "PYTHONPATH": str(ROOT), "TF_CPP_MIN_LOG_LEVEL": "3"}
    run = subprocess.run(
        [sys.executable, "-c", _DRIVER, json.dumps(jobs), str(tmp / "report.json")],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    report = json.loads((tmp / "report.json").read_text())
    return {name: (report[name], tmp / name) for name in jobs}


def _table(tables, name):
    status, path = tables[name]
    assert status == 0, status
    return path.read_text()


def test_overhead_benchmark_smoke(tables):
    table = _table(tables, "overhead")
    rows = [line for line in table.splitlines() if line.startswith("| mlp")]
    assert [r.split(" | ")[2] for r in rows] == [
        "default, jit, spe=8",
        "histogram + 1 kept tensor",
        "plain model, later fit without the watch",
    ]
    for row in rows:
        # the wall-time ratio, the CPU-time ratio, the load average
        wall, cpu, load = re.search(r"\| ([0-9.]+)x \| ([0-9.]+)x \| ([0-9.]+) \|$", row).groups()
        assert float(wall) > 0 and float(cpu) > 0 and float(load) >= 0


def test_memory_benchmark_smoke(tables):
    table = _table(tables, "memory")
    assert "| RAM bytes per value |" in table
    assert "| parts written | 1 |" in table


def test_cli_start_benchmark_smoke(tables):
    table = _table(tables, "cli_start")
    rows = [line for line in table.splitlines() if line.startswith("| ") and "ms" not in line]
    assert [r.split(" | ")[0] for r in rows] == [
        "| python -c pass",
        "| gradwatch --help",
        "| gradwatch summary LOG",
        "| gradwatch summary LOG --sort max_norm",
    ]


def test_diagnose_benchmark_smoke(tables):
    table = _table(tables, "diagnose")
    (row,) = [line for line in table.splitlines() if line.startswith("| 20 | 2000 |")]
    # The planted problems are found: a NaN burst, a dead layer, an oscillating kernel;
    # and spikes: the global norm of 20 log-normal norms (sigma 0.3 each, 2000 steps) has
    # tails that pass 6 sigma of its last 128 values now and then.
    # The rules whose stats the benchmark's log lacks say so (info).
    assert row.endswith(
        "| error nonfinite, warning dead, warning oscillation, warning spikes, "
        "info epsilon, info second_moment |"
    )
    assert float(row.split(" | ")[4]) > 0


def test_replay_benchmark_smoke(tables):
    table = _table(tables, "replay")
    (row,) = [line for line in table.splitlines() if line.startswith("| mlp | 8 |")]
    cells = row.strip("|").split(" | ")
    assert float(cells[2]) > 0 and float(cells[3]) > 0


def test_examples_benchmark_smoke(tables):
    table = _table(tables, "examples")
    rows = [line for line in table.splitlines() if line.startswith("| mlp | 8 |")]
    assert [r.split(" | ")[2] for r in rows] == ["vectorized", "loop", "halves"]
    for row in rows:
        cells = row.strip("|").split(" | ")
        assert float(cells[3]) > 0 and float(cells[5]) > 0
        assert float(cells[6].rstrip("x |")) > 0
