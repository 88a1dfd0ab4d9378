"""Notebooks: the charts display as images with no magic, and the log and the callback
have reprs that summarise them; checked by executing a real notebook with nbconvert."""

import base64
import io
import os
import re
import subprocess
import sys
from html.parser import HTMLParser
from pathlib import Path

import numpy as np
from components import HANG, require
from PIL import Image

import gradwatch
from gradwatch import plot

ROOT = Path(__file__).resolve().parents[1]
STATS = ["norm", "mean", "std", "min", "max", "nonfinite"]


class _Rows(HTMLParser):
    """The `<th>name</th><td>text</td>` rows of an HTML table, as a dict."""

    def __init__(self):
        super().__init__()
        self.rows, self._cell, self._name = {}, None, None

    def handle_starttag(self, tag, attrs):
        if tag in ("th", "td"):
            self._cell = tag

    def handle_endtag(self, tag):
        self._cell = None

    def handle_data(self, data):
        if self._cell == "th":
            self._name = data
        elif self._cell == "td":
            self.rows[self._name] = data


def _html_rows(text):
    parser = _Rows()
    parser.feed(text)
    return parser.rows


def _first_bad_step(log):
    # From the recorded NaN/Inf counts, independently of the log's alerts.
    bad = log.stat("nonfinite")
    rows = bad[(bad > 0).any(axis=1)]
    step = int(rows.index[0])
    return step, [k for k in log.variables if rows.loc[step, k] > 0]


def test_log_repr_gives_steps_variables_stats_and_the_first_nonfinite_step(outlier):
    log = outlier.log
    # 48 samples in batches of 8 for 2 epochs: 12 steps; batch 3 overflows (the fixture).
    step, keys = _first_bad_step(log)
    assert (step, len(keys)) == (3, 4)
    assert repr(log) == (
        f"GradientLog(12 recorded steps, steps 0..11, 4 variables, stats={STATS}, "
        "first non-finite step 3 (skipped by the LossScaleOptimizer) in 4 variables)"
    )
    assert repr(gradwatch.GradientLog()) == (
        f"GradientLog(0 recorded steps, no steps, 0 variables, stats={STATS}, no non-finite step)"
    )
    # Without the `nonfinite` stat the log cannot say there was none.
    assert repr(gradwatch.GradientLog(stats=["norm"])) == (
        "GradientLog(0 recorded steps, no steps, 0 variables, stats=['norm'])"
    )


def test_log_notebook_view_is_a_table_of_the_same_facts(outlier):
    log = outlier.log
    rows = _html_rows(log._repr_html_())
    step, keys = _first_bad_step(log)
    skipped = [int(s) for s in log.skipped_steps]
    assert skipped == [3, 9]  # the outlier batch, in both epochs
    alerts = int((log.stat("nonfinite") > 0).to_numpy().sum())
    assert rows == {
        "steps": "12 recorded steps, steps 0..11",
        "variables": f"4: {', '.join(log.variables)}",
        "stats": ", ".join(STATS),
        "first non-finite step": f"{step} (skipped by the LossScaleOptimizer): {', '.join(keys)}",
        "skipped steps": "2: 3, 9",
        "histograms": "4 bins per decade",
        "alerts": f"{alerts} nonfinite",
    }
    # A log with kept tensors and many variables: names past the sixth are counted.
    import keras

    keras.utils.set_random_seed(1)
    model = keras.Sequential(
        [keras.Input((3,))] + [keras.layers.Dense(2, name=f"d{i}") for i in range(4)]
    )
    model.compile("sgd", "mse")
    watch = gradwatch.GradWatch(values="d3/*")
    model.fit(np.ones((4, 3)), np.ones((4, 2)), batch_size=2, callbacks=[watch], verbose=0)
    rows = _html_rows(watch.log._repr_html_())
    names = [f"sequential/d{i}/{v}" for i in range(4) for v in ("kernel", "bias")]
    assert rows == {
        "steps": "2 recorded steps, steps 0..1",
        "variables": f"8: {', '.join(names[:6])} and 2 more",
        "stats": ", ".join(STATS),
        "first non-finite step": "none",
        "kept tensors": "2: sequential/d3/kernel, sequential/d3/bias",
    }


def test_gradwatch_repr_shows_its_settings_as_a_call(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    assert repr(gradwatch.GradWatch()) == (
        f"GradWatch(variables='*', stats={tuple(STATS)}, every=1)"
    )
    watch = gradwatch.GradWatch(
        variables=["dense*", re.compile("out/.*")],
        stats="norm",
        every=5,
        histogram=8,
        path=Path("runs") / "grads",
        on_nonfinite="raise",
        max_norm=10.0,
    )
    text = repr(watch)
    assert text == (
        "GradWatch(variables=['dense*', re.compile('out/.*')], stats='norm', every=5, "
        "histogram=8, path='runs/grads', on_nonfinite='raise', max_norm=10.0)"
    )
    # The repr is a call that makes the same callback.
    again = eval(text, {"GradWatch": gradwatch.GradWatch, "re": re})
    assert repr(again) == text
    for name in ("variables", "stats", "every", "histogram", "path", "on_nonfinite", "max_norm"):
        assert getattr(again, name) == getattr(watch, name), name
    assert list(tmp_path.iterdir()) == []  # making one writes nothing


def test_chart_renders_itself_as_png_for_notebooks(outlier):
    fig = plot.norms(outlier.log)
    png = fig._repr_png_()
    saved = io.BytesIO()
    fig.savefig(saved, format="png")
    # The same image `savefig` writes, at the figure's size.
    assert Image.open(io.BytesIO(png)).size == Image.open(saved).size
    w, h = fig.get_size_inches() * fig.dpi
    assert Image.open(io.BytesIO(png)).size == (round(w), round(h))
    assert isinstance(fig, plot.Figure.__mro__[1])  # still a matplotlib Figure


_CELLS = [
    "import gradwatch\nimport gradwatch.plot\nlog = gradwatch.read_log(LOG)",
    "log",
    "gradwatch.plot.norms(log)",
    "gradwatch.plot.flow(log)",
    "gradwatch.plot.heatmap(log)",
    "gradwatch.plot.histogram(log, 'out/kernel')",
]


def test_notebook_executed_with_nbconvert_shows_charts_as_images(outlier, tmp_path):
    require(
        all(map(_has, ("nbformat", "nbconvert", "ipykernel"))),
        "nbconvert, nbformat or ipykernel is not installed: pip install '.[test]'",
    )
    import nbformat

    log = tmp_path / "grads.parquet"
    outlier.log.to_parquet(log)
    notebook = nbformat.v4.new_notebook()
    notebook.cells = [nbformat.v4.new_code_cell(c.replace("LOG", repr(str(log)))) for c in _CELLS]
    notebook.metadata["kernelspec"] = {"name": "python3", "display_name": "Python 3"}
    source = tmp_path / "charts.ipynb"
    nbformat.write(notebook, source)
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]),
        "TF_CPP_MIN_LOG_LEVEL": "3",
    }
    env.pop("MPLBACKEND", None)  # the kernel's own default, as a user's Jupyter has it
    run = subprocess.run(
        [sys.executable, "-m", "nbconvert", "--to", "notebook", "--execute", str(source),
         "--output", "executed.ipynb", f"--ExecutePreprocessor.timeout={HANG}"],
        capture_output=True, text=True, env=env, timeout=HANG, cwd=tmp_path,
    )  # fmt: skip
    assert run.returncode == 0, run.stderr[-3000:]
    executed = nbformat.read(tmp_path / "executed.ipynb", as_version=4)
    results = [
        [o for o in cell["outputs"] if o["output_type"] == "execute_result"]
        for cell in executed["cells"]
    ]
    assert [len(r) for r in results] == [0, 1, 1, 1, 1, 1]
    data = [r[0]["data"] if r else {} for r in results]
    # The log: its repr, and its table for the notebook.
    assert data[1]["text/plain"] == repr(outlier.log)
    assert _html_rows(data[1]["text/html"]) == _html_rows(outlier.log._repr_html_())
    # Each chart: a PNG of the size the same chart has here.
    charts = [
        plot.norms(outlier.log),
        plot.flow(outlier.log),
        plot.heatmap(outlier.log),
        plot.histogram(outlier.log, "out/kernel"),
    ]
    for shown, fig in zip(data[2:6], charts, strict=True):
        assert "image/png" in shown, shown.keys()
        image = Image.open(io.BytesIO(base64.b64decode(shown["image/png"])))
        assert image.format == "PNG"
        w, h = fig.get_size_inches() * fig.dpi
        assert image.size == (round(w), round(h))
        assert len(np.unique(np.asarray(image.convert("L")))) > 2  # something is drawn
    assert not any("%matplotlib" in "".join(c["source"]) for c in executed["cells"])


def _has(module):
    import importlib.util

    return importlib.util.find_spec(module) is not None
