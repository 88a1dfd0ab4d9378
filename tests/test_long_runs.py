"""What the report and `gradwatch doctor` show of a long run: the spikes, the examples
behind the replayed steps, and the gradient noise scale, from one real training (the
spiking data of tests/test_spikes.py, with the noise scale every 5th step) saved to
Parquet. Expected values are computed here from the log's own frames."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
from models import pair
from test_spikes import WINDOW, _fit

import gradwatch
from gradwatch.cli import main
from gradwatch.report import render_report


@pytest.fixture(scope="module")
def long_run(tmp_path_factory):
    watched, _ = pair()
    watch = gradwatch.GradWatch(spike_window=WINDOW, noise_scale_every=5)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # the spikes' warnings
        _fit(watched, watch)
    path = tmp_path_factory.mktemp("long_run") / "log.parquet"
    watch.log.to_parquet(path)
    return gradwatch.read_log(path), path


def _highest(log):
    """The replayed example whose gradient norm is the most times its step's median."""
    ex = log.examples
    best = None
    for step, rows in ex.groupby("step"):
        norms = rows["grad_norm"].to_numpy()
        ratio = norms / np.median(norms)
        i = int(np.argmax(ratio))
        if best is None or ratio[i] > best[0]:
            best = (ratio[i], int(step), int(rows["row"].iloc[i]))
    return best


def test_gradwatch_doctor_prints_the_spikes_examples_and_noise_scale(long_run, capsys):
    log, path = long_run
    spikes = log.alerts[log.alerts.kind.isin(["spike", "loss_spike"])]
    assert len(spikes) and len(log.examples) and np.isfinite(log.noise_scale["b_simple"]).any()
    main(["doctor", str(path)])
    out = capsys.readouterr().out
    assert f"spikes: {len(spikes)} at steps {int(spikes.step.iloc[0])} (" in out
    steps = log.examples["step"].nunique()
    assert f"examples: {len(log.examples)} rows at {steps} replayed steps" in out
    _, step, row = _highest(log)
    assert f"  step {step} row {row} sample {step * 8 + row}:" in out
    last = log.noise_scale.dropna(subset=["b_simple"]).iloc[-1]
    assert "noise scale: B_simple " in out and f"at step {int(last['step'])}" in out


def test_the_report_has_a_long_runs_section(long_run):
    log, _ = long_run
    page = render_report(log)
    section = page[page.index('<section id="long-runs">') :]
    assert "<h3>Spikes</h3>" in section and "<h3>Examples</h3>" in section
    assert "<h3>Gradient noise scale</h3>" in section
    _, step, row = _highest(log)
    assert f"<td>{step * 8 + row}</td>" in section  # the top example's sample
    for step in log.alerts[log.alerts.kind == "spike"].step:
        assert f"<td>{int(step)}</td>" in section


def test_a_log_without_long_run_data_shows_none(tmp_path):
    watched, _ = pair()
    watch = gradwatch.GradWatch(on_spike="ignore")
    watched.compile(optimizer="sgd", loss="mse")
    rng = np.random.default_rng(0)
    watched.fit(
        rng.normal(size=(16, 5)),
        rng.normal(size=(16, 2)),
        batch_size=8,
        verbose=0,
        callbacks=[watch],
    )
    assert 'id="long-runs"' not in render_report(watch.log)
