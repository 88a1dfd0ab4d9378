"""The `gradwatch` command line, through `main([...])` and once as a real subprocess."""

import io
import os
import re
import subprocess
import sys
import tomllib
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
from components import HANG, require
from PIL import Image

import gradwatch
from gradwatch import progress
from gradwatch.cli import main

ROOT = Path(__file__).resolve().parents[1]
COMMANDS = ("summary", "doctor", "plot", "convert", "report", "tensorboard", "serve")


@pytest.fixture(scope="module")
def logfile(outlier, tmp_path_factory):
    path = tmp_path_factory.mktemp("cli") / "grads.parquet"
    outlier.log.to_parquet(path)
    return path


def _summary_matches_numpy(out: str, log):
    """Checks `gradwatch summary --csv` output against NumPy over the log's norms and
    NaN/Inf counts; returns (table, norms, counts) for further checks."""
    table = pd.read_csv(io.StringIO(out), index_col="variable")
    norm = log.stat("norm").to_numpy(np.float64)
    bad = log.stat("nonfinite").to_numpy(np.float64)
    assert list(table.index) == log.variables
    np.testing.assert_allclose(table["first_norm"], norm[0], rtol=1e-6)
    np.testing.assert_allclose(table["last_norm"], norm[-1], rtol=1e-6)
    # A step whose gradient has no finite element has a NaN norm, left out (steps 3, 9).
    np.testing.assert_allclose(table["max_norm"], np.nanmax(norm, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(table["nonfinite"], bad.sum(axis=0))
    return table, norm, bad


def test_cli_summary_csv_matches_numpy(outlier, logfile, capsys):
    assert main(["summary", str(logfile), "--csv"]) == 0
    out = capsys.readouterr().out
    table, norm, bad = _summary_matches_numpy(out, outlier.log)
    np.testing.assert_allclose(table["median_norm"], np.nanmedian(norm, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(table["first_nonfinite_step"], np.argmax(bad > 0, axis=0))
    assert table["nonfinite"].tolist() == [40, 8, 16, 4]  # 2 bad steps x elements


def test_cli_summary_prints_a_table_and_the_first_nonfinite_step(outlier, logfile, capsys):
    assert main(["summary", str(logfile)]) == 0
    out = capsys.readouterr().out.splitlines()
    assert out[0] == f"{logfile}: 12 recorded steps (steps 0..11), 4 variables"
    assert out[1].split() == [
        "first_norm",
        "last_norm",
        "median_norm",
        "max_norm",
        "nonfinite",
        "first_nonfinite_step",
    ]
    row = next(line.split() for line in out if line.startswith("net/out/bias"))
    norm = outlier.log.stat("norm")["net/out/bias"].to_numpy(np.float64)
    assert float(row[4]) == pytest.approx(np.nanmax(norm), rel=1e-3)
    assert row[5:] == ["4", "3"]
    assert out[-3] == (
        "First non-finite step: 3 (net/hidden/kernel, net/hidden/bias, net/out/kernel, "
        "net/out/bias)"
    )
    assert out[-2] == "Alerts: 8 nonfinite"
    # Steps 3 and 9 of 12 were skipped by the loss scale: 2 of the 11 steps after step 0
    # (18% > 5%) is a warning; the 8 rules whose stats the default set lacks are info.
    assert out[-1] == f"Findings: 0 errors, 1 warning, 8 info. Details: gradwatch doctor {logfile}"


@pytest.mark.parametrize(
    ("kind", "extra", "size"),
    [
        ("flow", [], (700, 340)),
        ("norms", ["--variables", "hidden*"], (1000, 600)),
        ("heatmap", ["--stat", "norm"], (900, 300)),
        ("histogram", ["--variable", "out/kernel", "--steps", "2", "3"], (800, 550)),
    ],
)
def test_cli_plot_writes_each_kind(logfile, tmp_path, capsys, kind, extra, size):
    out = tmp_path / f"{kind}.png"
    assert main(["plot", str(logfile), "--kind", kind, "-o", str(out), *extra]) == 0
    assert capsys.readouterr().out == f"Wrote {out}\n"
    with Image.open(out) as image:
        assert image.size == size  # the figure's inches at --dpi 100
        rgb = np.asarray(image.convert("RGB")).astype(int)
    red = (np.abs(rgb - [214, 39, 40]).sum(axis=2) < 30).sum()
    assert red > 0  # steps 3 and 9 are non-finite: every chart marks them


def test_cli_convert_round_trips(outlier, logfile, tmp_path, capsys):
    for name in ("grads.csv", "grads.parquet"):
        assert main(["convert", str(logfile), str(tmp_path / name)]) == 0
        assert gradwatch.read_log(tmp_path / name) == outlier.log
    assert main(["convert", str(tmp_path / "grads.csv"), str(tmp_path / "back.parquet")]) == 0
    assert gradwatch.read_log(tmp_path / "back.parquet") == outlier.log
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"Wrote {tmp_path / 'back.parquet'} (12 recorded steps)"
    )


def test_cli_report_and_tensorboard_write_their_outputs(logfile, tmp_path, capsys):
    assert main(["report", str(logfile), "-o", str(tmp_path / "r.html")]) == 0
    text = (tmp_path / "r.html").read_text()
    assert "<title>gradwatch report: grads.parquet</title>" in text
    assert text.count("<img alt=") == 2  # the flow chart and a histogram
    # The norms, loss and heatmap charts are interactive.
    assert all(f'id="{c}"' in text for c in ("gw-norms", "gw-loss", "gw-heatmap"))
    assert main(["tensorboard", str(logfile), "--logdir", str(tmp_path / "tb")]) == 0
    assert capsys.readouterr().out.splitlines()[-1] == (
        f"Wrote 12 steps to {tmp_path / 'tb'}; view them with: tensorboard --logdir "
        f"{tmp_path / 'tb'}"
    )
    assert list((tmp_path / "tb").glob("events.out.tfevents.*"))


def _errors(logfile, tmp_path):
    text = tmp_path / "notes.csv"
    text.write_text("step,value\n0,1\n")
    log = str(logfile)
    png = str(tmp_path / "x.png")
    return [
        (["summary", str(tmp_path / "missing.parquet")], r"summary: error: No gradwatch log at "),
        (["summary", str(text)], r"is not a gradwatch log: its first line should start"),
        (["plot", log, "--kind", "pie", "-o", png], r"invalid choice: 'pie' \(choose from"),
        (["plot", log, "--kind", "histogram", "--variable", "nope", "-o", png], r"'nope'"),
        (["plot", log, "--kind", "histogram", "-o", png], r"needs `--variable KEY`"),
        (["plot", log, "--kind", "norms", "--variables", "zz*", "-o", png], r"zz\*"),
        (["plot", log, "-o", str(tmp_path / "x.doc")], r"Use one of .*\.png.*Received: -o "),
        (["plot", log, "-o", str(tmp_path / "no" / "x.png")], r"does not exist. Create it"),
        (["plot", log, "--stat", "mean", "-o", png], r"`--stat` applies to --kind heatmap"),
        (["plot", log, "--step", "99", "-o", png], r"Step 99 was not recorded"),
        (["convert", log, str(tmp_path / "out.json")], r"Use one of .csv, .parquet, .pq"),
        (["report", log, "-o", str(tmp_path / "r.pdf")], r"Use one of .htm, .html"),
        (["tensorboard", log], r"the following arguments are required: --logdir"),
        ([], r"the following arguments are required: COMMAND"),
        (["fly"], r"invalid choice: 'fly'"),
    ]


def test_cli_errors_go_to_stderr_with_exit_code_2(logfile, tmp_path, capsys):
    for argv, message in _errors(logfile, tmp_path):
        assert main(argv) == 2, argv
        captured = capsys.readouterr()
        assert captured.out == "", argv
        assert "Traceback" not in captured.err
        assert captured.err.count("error:") == 1, captured.err
        assert re.search(message, captured.err), (argv, captured.err)
    assert not (tmp_path / "x.png").exists()


def test_cli_help_works_on_every_command(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    assert all(c in out for c in COMMANDS)
    for command in COMMANDS:
        assert main([command, "--help"]) == 0
        out = capsys.readouterr().out
        assert out.startswith(f"usage: gradwatch {command} "), out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out == f"gradwatch {gradwatch.__version__}\n"


def test_cli_shows_progress_on_a_terminal(logfile, tmp_path, monkeypatch):
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stderr = Terminal()
    monkeypatch.setattr(progress, "DELAY_S", 0)
    monkeypatch.setattr(sys, "stderr", stderr)
    assert main(["report", str(logfile), "-o", str(tmp_path / "r.html")]) == 0
    # tqdm redraws at most every 0.1 s: the bar's start is there, and some of its 4 parts.
    assert "report:   0%|" in stderr.getvalue()
    assert re.search(r"report: +[1-9]\d*%\|[^\r]*[1-4]/4 \[", stderr.getvalue())


def test_cli_is_a_console_script_and_runs_as_a_subprocess(logfile):
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    assert pyproject["project"]["scripts"] == {"gradwatch": "gradwatch.cli:main"}
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-m", "gradwatch", "summary", str(logfile), "--csv"],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG,
    )
    assert run.returncode == 0, run.stderr
    assert run.stdout.splitlines()[0].startswith("variable,first_norm,")
    assert len(run.stdout.splitlines()) == 5
    bad = subprocess.run(
        [sys.executable, "-m", "gradwatch", "convert", str(logfile), "out.txt"],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG,
    )
    assert bad.returncode == 2
    assert bad.stderr.strip().endswith("Received: out.txt")


def test_installed_console_script_summarises_a_saved_log(outlier, logfile):
    # The `gradwatch` command that `pip install` puts beside the interpreter (the entry
    # point in pyproject.toml), run for real on a saved log.
    script = Path(sys.executable).parent / ("gradwatch.exe" if os.name == "nt" else "gradwatch")
    require(
        script.exists(),
        f"no `gradwatch` console script beside {sys.executable}: pip install -e .",
    )
    env = {  # this checkout's gradwatch, also where the install points elsewhere
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [str(script), "summary", str(logfile), "--csv"],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG,
    )
    assert run.returncode == 0, run.stderr
    table, _, _ = _summary_matches_numpy(run.stdout, outlier.log)
    # Steps 3 and 9 are the outlier batch (see the fixture): 2 steps x the elements.
    assert table["nonfinite"].tolist() == [2 * 20, 2 * 4, 2 * 8, 2 * 2]
    assert table["first_nonfinite_step"].tolist() == [3, 3, 3, 3]


def test_cli_summary_sorts_by_a_column_largest_first(outlier, logfile, capsys):
    norm = outlier.log.stat("norm").to_numpy(np.float64)
    keys = np.array(outlier.log.variables)
    median = np.nanmedian(norm, axis=0)
    assert main(["summary", str(logfile), "--csv", "--sort", "median_norm"]) == 0
    table = pd.read_csv(io.StringIO(capsys.readouterr().out), index_col="variable")
    assert list(table.index) == list(keys[np.argsort(-median, kind="stable")])
    np.testing.assert_allclose(table["median_norm"], np.sort(median)[::-1], rtol=1e-6)
    assert main(["summary", str(logfile), "--sort", "median_norm", "--ascending"]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split()[0] for line in lines if line.startswith(tuple(keys))]
    assert rows == list(keys[np.argsort(median, kind="stable")])


def test_cli_summary_sort_puts_missing_values_last(outlier, tmp_path, capsys):
    # A variable with no value in the sorted column (a norm of NaN at every step, as
    # for a disconnected variable) goes last, also smallest first.
    csv = tmp_path / "grads.csv"
    outlier.log.to_csv(csv)
    meta, *rows = csv.read_text().splitlines(keepends=True)
    table = pd.read_csv(io.StringIO("".join(rows)), dtype={"index": "Int64"})
    gone = "net/hidden/bias"
    table.loc[(table["variable"] == gone) & (table["stat"] == "norm"), "value"] = np.nan
    csv.write_text(meta + table.to_csv(index=False))
    keys = [k for k in outlier.log.variables if k != gone]
    last = outlier.log.stat("norm")[keys].to_numpy(np.float64)[-1]
    for extra, order in [
        ([], np.argsort(-last, kind="stable")),
        (["--ascending"], np.argsort(last)),
    ]:
        assert main(["summary", str(csv), "--csv", "--sort", "last_norm", *extra]) == 0
        out = pd.read_csv(io.StringIO(capsys.readouterr().out), index_col="variable")
        assert list(out.index) == [*(keys[i] for i in order), gone]
        assert np.isnan(out.loc[gone, "last_norm"])


def test_cli_summary_formats_every_number_alike(outlier, fitted, logfile, tmp_path, capsys):
    # Norms spanning many decades all print as d.ddde±XX (no `8772` beside `1.325e+04`),
    # counts and steps as integers, and a missing value as `-`.
    assert main(["summary", str(logfile)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows = [line.split() for line in lines if line.startswith("net/")]
    assert len(rows) == 4
    real = re.compile(r"(\d\.\d{3}e[+-]\d\d|inf|-)")
    for row in rows:
        assert all(real.fullmatch(cell) for cell in row[1:5]), row
        assert all(re.fullmatch(r"\d+|-", cell) for cell in row[5:]), row
    norm = outlier.log.stat("norm").to_numpy(np.float64)
    first = dict(zip(outlier.log.variables, norm[0], strict=True))
    for row in rows:
        assert float(row[1]) == pytest.approx(first[row[0]], rel=1e-3)
    # A log without NaN/Inf: no first non-finite step, shown as `-`.
    path = tmp_path / "finite.parquet"
    fitted[0].log.to_parquet(path)
    assert main(["summary", str(path)]) == 0
    rows = [line.split() for line in capsys.readouterr().out.splitlines()[3:-1]]  # -1: findings
    assert [row[0] for row in rows] == fitted[0].log.variables
    assert [row[5:] for row in rows] == [["0", "-"]] * len(rows)
    assert all(real.fullmatch(cell) for row in rows for cell in row[1:5])


def _imported_modules(*argv):
    """The modules a real `python -m gradwatch ARGV...` imports, read from
    `-X importtime`, and its result."""
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
    }
    run = subprocess.run(
        [sys.executable, "-X", "importtime", "-m", "gradwatch", *map(str, argv)],
        capture_output=True,
        text=True,
        env=env,
        timeout=HANG,
    )
    names = {
        line.rsplit("|", 1)[1].strip().split(".")[0]
        for line in run.stderr.splitlines()
        if line.startswith("import time:") and "|" in line
    }
    return names, run


def test_cli_help_starts_without_numpy_pandas_or_keras():
    names, run = _imported_modules("--help")
    assert run.returncode == 0, run.stderr[-2000:]
    assert "summary" in run.stdout
    assert "gradwatch" in names  # the import log was read
    heavy = {"numpy", "pandas", "pyarrow", "keras", "tensorflow", "matplotlib", "jax", "torch"}
    assert names & heavy == set()


@pytest.mark.parametrize(
    "command",
    [
        ["summary", "{log}", "--sort", "max_norm"],
        ["convert", "{log}", "{out}.csv"],
        ["plot", "{log}", "-o", "{out}.png"],
        ["report", "{log}", "-o", "{out}.html"],
        ["tensorboard", "{log}", "--logdir", "{out}_tb"],
    ],
    ids=lambda c: c[0],
)
def test_cli_commands_import_neither_tensorflow_nor_keras(logfile, tmp_path, command):
    argv = [c.format(log=logfile, out=tmp_path / "out") for c in command]
    names, run = _imported_modules(*argv)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "pandas" in names
    assert names & {"keras", "tensorflow", "jax", "torch"} == set()


_WITHOUT_TQDM = r"""
import sys

class NoTqdm:
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] == "tqdm":
            raise ModuleNotFoundError(f"No module named {name!r}", name=name)

sys.meta_path.insert(0, NoTqdm())
from gradwatch.cli import main
log, out = sys.argv[1:]
print(main(["report", log, "-o", out + ".html"]), main(["convert", log, out + ".csv"]),
      main(["tensorboard", log, "--logdir", out + "_tb"]))
print("tqdm" in sys.modules)
"""


def test_cli_works_without_tqdm(logfile, tmp_path):
    # A progress bar is never a requirement: without tqdm, no bar and no error.
    run = subprocess.run(
        [sys.executable, "-c", _WITHOUT_TQDM, str(logfile), str(tmp_path / "out")],
        capture_output=True,
        text=True,
        timeout=HANG,
    )
    assert run.returncode == 0, run.stderr[-3000:]
    assert run.stdout.splitlines()[-2:] == ["0 0 0", "False"]
    assert "error" not in run.stderr
    html = (tmp_path / "out.html").read_text()
    assert html.count("data:image/png;base64,") >= 3
    assert gradwatch.read_log(tmp_path / "out.csv") == gradwatch.read_log(logfile)
    assert any((tmp_path / "out_tb").iterdir())
