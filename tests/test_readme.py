"""The README's recipes and command-line examples, run as they stand: the quickstart
writes its log, the recipes' code blocks run on it, and the `gradwatch` lines of the
README run on that same log."""

import json
import os
import re
import shlex
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from components import HANG

import gradwatch

ROOT = Path(__file__).resolve().parents[1]
README = (ROOT / "README.md").read_text()


def _section(text, heading):
    """The lines under `heading` (a whole line) up to the next heading of its level or
    above; a `#` line inside a code block is no heading."""
    level = len(heading.split(" ")[0])
    lines = text.splitlines(keepends=True)
    start = lines.index(heading + "\n") + 1
    fenced = False
    for i in range(start, len(lines)):
        if lines[i].startswith("```"):
            fenced = not fenced
        elif not fenced and re.match(rf"#{{1,{level}}} ", lines[i]):
            return "".join(lines[start:i])
    return "".join(lines[start:])


def _blocks(text, language):
    return re.findall(rf"^```{language}\n(.*?)^```$", text, flags=re.M | re.S)


RECIPES = _section(README, "## Recipes")
LAYERS = _blocks(_section(RECIPES, "### Which layer explodes or vanishes?"), "python")
FIRST_NAN = _blocks(_section(RECIPES, "### Where did the first NaN come from?"), "python")
RESUME = _blocks(_section(RECIPES, "### Resume a run into the same log"), "python")
CLI = [
    shlex.split(line.split("#")[0])
    for block in _blocks(_section(README, "## The command line"), "bash")
    for line in block.splitlines()
    if line.startswith("gradwatch ")
]

# Runs the quickstart, then each block in a fresh namespace, in one interpreter (one Keras
# import for all); each block's stdout, or its traceback, is kept apart. Then the README's
# `gradwatch` lines, through the command line's `main`.
_RUNNER = r"""
import contextlib, io, json, os, runpy, sys, traceback, warnings
warnings.simplefilter("ignore")
blocks, commands, quickstart = json.loads(sys.argv[1]), json.loads(sys.argv[2]), sys.argv[3]
out = {"errors": {}}
with contextlib.redirect_stdout(io.StringIO()):
    runpy.run_path(quickstart, run_name="__main__")
for name, code in blocks.items():
    text = io.StringIO()
    try:
        with contextlib.redirect_stdout(text):
            exec(compile(code, name, "exec"), {"__name__": "__main__"})
    except Exception:
        out["errors"][name] = traceback.format_exc()
    out[name] = text.getvalue()
from gradwatch.cli import main
out["codes"] = []
for argv in commands:
    with contextlib.redirect_stdout(io.StringIO()):
        out["codes"].append(main(argv))
print("RESULT " + json.dumps(out))
"""


@pytest.fixture(scope="module")
def readme(tmp_path_factory):
    """Where the README's code ran, and what it printed (by block)."""
    cwd = tmp_path_factory.mktemp("readme")
    blocks = {"layers": LAYERS[0], "first_nan": FIRST_NAN[0], "resume": RESUME[0]}
    return cwd, _run(cwd, blocks, [c[1:] for c in CLI])


def _run(tmp_path, blocks, commands=()):
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    run = subprocess.run(
        [sys.executable, "-c", _RUNNER, json.dumps(blocks), json.dumps(list(commands)),
         str(ROOT / "examples" / "quickstart.py")],
        capture_output=True, text=True, env=env, cwd=tmp_path, timeout=HANG,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    line = next(x for x in run.stdout.splitlines() if x.startswith("RESULT "))
    return json.loads(line.removeprefix("RESULT "))


def test_readme_has_the_three_recipes_and_the_command_lines():
    assert [len(b) for b in (LAYERS, FIRST_NAN, RESUME)] == [1, 1, 1]
    assert [c[1] for c in CLI] == ["summary", "plot", "report", "convert", "tensorboard"]
    # Every command line runs on the quickstart's own log.
    assert all(c[2] == "grads.parquet" for c in CLI)
    assert "examples/quickstart.py" in README and "grads.parquet" in README


def test_readme_recipes_and_command_lines_run_on_the_quickstarts_log(readme):
    tmp_path, out = readme
    assert "layers" not in out["errors"] and "first_nan" not in out["errors"], out["errors"]
    assert out["codes"] == [0] * len(CLI)
    for c in CLI:  # what each line writes is there
        for option in ("-o", "--logdir"):
            if option in c:
                assert (tmp_path / c[c.index(option) + 1]).exists(), c
    assert gradwatch.read_log(tmp_path / "grads_copy.csv") == gradwatch.read_log(
        tmp_path / "grads.parquet"
    )

    # Which layer: each layer's median norm, from the per-variable norms by hand.
    log = gradwatch.read_log(tmp_path / "grads.parquet")
    norm = log.stat("norm").astype(np.float64)
    medians = {}
    for layer in ("quickstart/hidden", "quickstart/out"):
        cols = [k for k in norm.columns if k.startswith(layer + "/")]
        medians[layer] = np.median(np.sqrt((norm[cols] ** 2).sum(axis=1)))
    printed = dict(re.findall(r"^(quickstart/\w+)\s+([0-9.e+-]+)$", out["layers"], flags=re.M))
    order = sorted(medians, key=medians.get)
    assert list(printed) == order  # vanishing first
    for layer, value in printed.items():
        assert float(value) == pytest.approx(medians[layer], rel=1e-5)
    rows = re.findall(r"^(quickstart/\w+/\w+)\s", out["layers"], flags=re.M)
    assert rows == list(norm.max().sort_values(ascending=False).index)

    # The first NaN: the bad value is sample 100, feature 5, in batch 3 of epoch 0 (step 3).
    text = out["first_nan"]
    assert re.search(r"^input \(100,\)$", text, flags=re.M), text  # `log.origins`
    counts = dict(re.findall(r"^net/(\w+/\w+)\s+([0-9.]+)$", text, flags=re.M))
    # At that step every element of every gradient is NaN/Inf: the sizes of the variables.
    assert {k: float(v) for k, v in counts.items()} == {
        "hidden/kernel": 8 * 16,
        "hidden/bias": 16,
        "out/kernel": 16,
        "out/bias": 1,
    }
    assert "Name: 3," in text


def test_readme_resume_recipe_reads_one_history(readme):
    tmp_path, out = readme
    assert "resume" not in out["errors"], out["errors"]["resume"]
    assert out["resume"].startswith("GradientLog(16 recorded steps, steps 0..15, 4 variables")
    log = gradwatch.read_log(tmp_path / "runs" / "resume")
    np.testing.assert_array_equal(log.steps, np.arange(16))
    assert log.variables == [
        f"net/{layer}/{v}" for layer in ("hidden", "out") for v in ("kernel", "bias")
    ]


def test_readme_quickstart_has_two_commands_and_ci_runs_the_test_one_verbatim():
    """The Quickstart is two commands (run the example; install and run the tests), and
    `.ci/run` runs the second one verbatim, after collecting the tests in a fresh
    virtualenv with nothing but the README's install (which catches a module or test that
    fails to collect without PyTorch, JAX or a browser)."""
    commands = [
        line
        for block in _blocks(_section(README, "## Quickstart"), "bash")
        for line in block.splitlines()
        if line.strip()
    ]
    assert len(commands) == 2, commands
    run, test = commands
    assert run.endswith("python examples/quickstart.py"), run
    assert test.endswith("-m pytest"), test
    ci = (ROOT / ".ci" / "run").read_text().splitlines()
    assert ci[-1] == test
    install = test.split(" && ")[1].split("pip install ", 1)[1]
    fresh = next(i for i, line in enumerate(ci) if f'pip" install --quiet {install}' in line)
    assert "-m pytest --collect-only" in ci[fresh + 1]
    assert fresh < next(i for i, line in enumerate(ci) if "/opt/wheels" in line)
