"""Charts under the Agg backend: their axes, labels and series match the log."""

import io

import matplotlib
import numpy as np
import pytest
from PIL import Image

matplotlib.use("Agg")

import gradwatch
from gradwatch import plot
from gradwatch.log import GradientLog, store_of
from gradwatch.stats import HIST_MAX_EXP, HIST_MIN_EXP

RED = matplotlib.colors.to_rgba(plot.NONFINITE_COLOR)


def _is_red(color):
    return np.allclose(matplotlib.colors.to_rgba(color)[:3], RED[:3])


def _red_pixels(fig):
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    rgb = np.asarray(Image.open(buffer).convert("RGB")).astype(int)
    target = np.asarray([int(255 * c) for c in RED[:3]])
    return int((np.abs(rgb - target).sum(axis=2) < 30).sum())


def test_plot_uses_the_agg_backend_and_never_shows(fitted, monkeypatch):
    import matplotlib.pyplot as plt

    assert matplotlib.get_backend().lower() == "agg"
    monkeypatch.setattr(plt, "show", lambda *a, **k: pytest.fail("show() was called"))
    monkeypatch.setattr(matplotlib.figure.Figure, "show", lambda *a, **k: pytest.fail("show"))
    log = fitted[0].log
    figures = [
        plot.flow(log),
        plot.norms(log),
        plot.heatmap(log),
        plot.histogram(log, "out/kernel"),
    ]
    assert all(isinstance(f, matplotlib.figure.Figure) for f in figures)
    assert plt.get_fignums() == []  # no pyplot state left behind
    assert gradwatch.plot is plot  # the lazy attribute


def test_flow_draws_median_and_range_in_model_order(fitted):
    log = fitted[0].log
    norm = log.stat("norm").to_numpy(np.float64)
    fig = plot.flow(log)
    (ax,) = fig.axes
    assert ax.get_yscale() == "log"
    assert [t.get_text() for t in ax.get_xticklabels()] == log.variables
    assert ax.get_ylabel() == "gradient norm (L2)"
    assert ax.get_title() == "Gradient flow, steps 0..5"
    (median,) = ax.get_lines()
    np.testing.assert_allclose(median.get_ydata(), np.median(norm, axis=0), rtol=1e-6)
    np.testing.assert_array_equal(median.get_xdata(), np.arange(4))
    (band,) = ax.collections
    y = band.get_paths()[0].vertices[:, 1]
    np.testing.assert_allclose([y.min(), y.max()], [norm.min(), norm.max()], rtol=1e-6)
    assert not any(_is_red(t.get_color()) for t in ax.get_xticklabels())
    assert _red_pixels(fig) == 0


def test_flow_with_a_step_adds_that_steps_norms(fitted):
    log = fitted[0].log
    fig = plot.flow(log, step=4)
    lines = fig.axes[0].get_lines()
    assert len(lines) == 2 and lines[1].get_label() == "step 4"
    np.testing.assert_allclose(lines[1].get_ydata(), log.stat("norm").loc[4].to_numpy())
    with pytest.raises(KeyError, match=r"Step 99 was not recorded\. Recorded: 6 steps from 0 to 5"):
        plot.flow(log, step=99)


def test_flow_marks_nonfinite_variables_red(outlier):
    log = outlier.log
    fig = plot.flow(log)
    ax = fig.axes[0]
    assert all(_is_red(t.get_color()) for t in ax.get_xticklabels())
    (marks,) = [c for c in ax.collections if _is_red(c.get_facecolor()[0])]
    np.testing.assert_array_equal(marks.get_offsets()[:, 0], np.arange(4))
    legend = [t.get_text() for t in ax.get_legend().get_texts()]
    assert legend[-1] == "non-finite gradient (NaN/Inf) at steps 3, 9"
    assert _red_pixels(fig) > 0
    # At a finite step nothing is marked.
    fig = plot.flow(log, step=4)
    assert not any(_is_red(t.get_color()) for t in fig.axes[0].get_xticklabels())


def test_norms_draws_one_line_per_selected_variable(fitted):
    log = fitted[0].log
    fig = plot.norms(log, variables="out*")
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "step"
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["net/out/kernel", "net/out/bias"]
    for line in lines:
        np.testing.assert_array_equal(line.get_xdata(), log.steps)
        np.testing.assert_array_equal(line.get_ydata(), log.stat("norm")[line.get_label()])
    assert len(plot.norms(log).axes[0].get_lines()) == 4
    with pytest.raises(ValueError, match=r"matches no variable|match"):
        plot.norms(log, variables="nothing*")


def test_norms_shades_nonfinite_steps_red(outlier):
    log = outlier.log
    ax = plot.norms(log).axes[0]
    spans = [p for p in ax.patches if _is_red(p.get_facecolor())]
    covered = sorted((p.get_bbox().x0 + p.get_bbox().x1) / 2 for p in spans)
    assert covered == [3, 9]
    # Every element was non-finite there, so the norm (over finite elements) is 0: a gap.
    for line in ax.get_lines():
        assert np.isnan(line.get_ydata()[[3, 9]]).all()
        assert np.isfinite(line.get_ydata()[[0, 1, 2, 4, 10, 11]]).all()


def test_heatmap_cells_are_log10_of_the_stat(fitted):
    log = fitted[0].log
    fig = plot.heatmap(log, stat="norm")
    ax, bar = fig.axes
    mesh = ax.collections[0]
    expected = np.log10(log.stat("norm").to_numpy(np.float64).T)
    np.testing.assert_allclose(mesh.get_array().reshape(4, 6), expected, rtol=1e-6)
    assert [t.get_text() for t in ax.get_yticklabels()] == log.variables
    assert bar.get_ylabel() == "log10 norm"
    assert len(ax.collections) == 1  # no red overlay
    fig = plot.heatmap(log, stat="mean")
    mean = log.stat("mean").to_numpy(np.float64).T
    np.testing.assert_allclose(
        fig.axes[0].collections[0].get_array().reshape(4, 6), np.log10(np.abs(mean)), rtol=1e-6
    )
    assert fig.axes[1].get_ylabel() == "log10 |mean|"
    with pytest.raises(KeyError, match=r"'nrm' was not recorded"):
        plot.heatmap(log, stat="nrm")


def test_heatmap_marks_nonfinite_cells_red(outlier):
    ax = plot.heatmap(outlier.log).axes[0]
    _, overlay, triangles = ax.collections
    red = ~np.ma.getmaskarray(overlay.get_array()).reshape(4, 12)
    assert set(np.nonzero(red.all(axis=0))[0]) == {3, 9}
    assert red.sum() == 8
    np.testing.assert_array_equal(triangles.get_offsets()[:, 0], [3, 9])


def _positive_counts(g, bins_per_decade):
    """Independent: numpy counts of the positive elements in log10 |g| bins, ends folded."""
    g = np.asarray(g, np.float64).ravel()
    g = g[g > 0]
    k = (HIST_MAX_EXP - HIST_MIN_EXP) * bins_per_decade
    edges = HIST_MIN_EXP + np.arange(k + 1) / bins_per_decade
    return np.histogram(np.clip(np.log10(g), edges[0], edges[-1] - 1e-9), bins=edges)[0]


def test_histogram_draws_the_recorded_counts(fitted):
    log = fitted[0].log  # keeps the full gradients of out/*
    fig = plot.histogram(log, "out/kernel", steps=[0, 5])
    top, bottom = fig.axes
    assert top.get_xscale() == "log" and top.get_title() == "Gradient histogram of net/out/kernel"
    assert len(top.patches) == 2 and len(bottom.patches) == 2
    for patch, step in zip(top.patches, [0, 5], strict=True):
        g = log.gradient("out/kernel", step)
        np.testing.assert_array_equal(patch.get_data().values, _positive_counts(g, 4))
        assert patch.get_label() == f"step {step} ({int((g == 0).sum())} zeros)"
    for patch, step in zip(bottom.patches, [0, 5], strict=True):
        g = -log.gradient("out/kernel", step)
        np.testing.assert_array_equal(patch.get_data().values, _positive_counts(g, 4))
    # Default: up to 5 steps spread over the recorded ones, first and last included.
    labels = [p.get_label() for p in plot.histogram(log, "out/bias").axes[0].patches]
    assert len(labels) == 5 and labels[0].startswith("step 0 ") and labels[-1].startswith("step 5 ")


def test_histogram_draws_a_nonfinite_step_red_and_dashed(outlier):
    fig = plot.histogram(outlier.log, "hidden/kernel", steps=[2, 3])
    fine, bad = fig.axes[0].patches
    assert _is_red(bad.get_edgecolor()) and bad.get_linestyle() == "--"
    assert not _is_red(fine.get_edgecolor())
    assert bad.get_label() == "step 3 (0 zeros, 20 NaN/Inf)"
    (note,) = fig.axes[0].texts
    assert note.get_text() == "non-finite: step 3: 20 NaN/Inf" and _is_red(note.get_color())


def test_plot_errors(fitted, outlier):
    log = fitted[0].log
    with pytest.raises(TypeError, match=r"`log` must be a gradwatch.GradientLog.*DataFrame"):
        plot.flow(log.frame)
    with pytest.raises(ValueError, match=r"no recorded steps"):
        plot.norms(GradientLog())
    with pytest.raises(KeyError, match=r"Step 42 of 'net/out/kernel' was not recorded"):
        plot.histogram(log, "out/kernel", steps=[42])
    with pytest.raises(TypeError, match=r"`steps` must be a step number.*Received: steps='0'"):
        plot.histogram(log, "out/kernel", steps="0")
    small = GradientLog(stats=("mean",))
    store_of(small).add_variables(["a"], [(1,)])
    store_of(small).append(
        np.asarray([0]),
        np.asarray([0]),
        np.asarray([0]),
        np.asarray([0], np.int32),
        np.ones((1, 1, 1), np.float32),
        np.zeros((0,), np.int32),
        np.zeros((1, 0), np.float32),
    )
    with pytest.raises(KeyError, match=r"'norm' was not recorded"):
        plot.flow(small)
    with pytest.raises(KeyError, match=r"No histograms were recorded"):
        plot.histogram(small, "a")


def test_loss_draws_each_steps_loss_and_rate_above_the_global_norm(outlier, fitted):
    log = outlier.log
    fig = plot.loss(log)
    by_label = {ax.get_ylabel(): ax for ax in fig.axes}
    assert sorted(by_label) == ["global gradient norm", "learning rate", "loss"]
    top, rate, bottom = (by_label[k] for k in ("loss", "learning rate", "global gradient norm"))
    assert bottom.get_yscale() == "log" and bottom.get_xlabel() == "step"
    assert top.get_shared_x_axes().joined(top, bottom)  # one step axis
    # The outlier steps' loss is ~1e8 times the others': a log scale; a plain run's is linear.
    assert top.get_yscale() == "log"
    assert plot.loss(fitted[0].log).axes[0].get_yscale() == "linear"
    scalars = log.scalars
    (line,) = top.get_lines()
    np.testing.assert_array_equal(line.get_xdata(), scalars["step"])
    np.testing.assert_array_equal(line.get_ydata(), scalars["loss"].astype(np.float64))
    (line,) = rate.get_lines()
    np.testing.assert_array_equal(line.get_ydata(), np.full(12, np.float32(0.05)))
    # The global norm, by hand from the per-variable norms; 0 at the non-finite steps
    # 3 and 9 (every element there was non-finite), which a log scale leaves as gaps.
    norms = log.stat("norm").to_numpy(np.float64)
    by_hand = np.sqrt((norms**2).sum(axis=1))
    by_hand[by_hand == 0] = np.nan
    (line,) = bottom.get_lines()
    np.testing.assert_allclose(line.get_ydata(), by_hand, rtol=1e-12)
    assert np.isnan(line.get_ydata()[[3, 9]]).all()
    for ax in (top, bottom):
        spans = [p for p in ax.patches if _is_red(p.get_facecolor())]
        assert sorted((p.get_bbox().x0 + p.get_bbox().x1) / 2 for p in spans) == [3, 9]
    labels = [t.get_text() for t in top.get_legend().get_texts()]
    assert labels == ["loss", "learning rate", plot.NONFINITE_LABEL]
    width, height = fig.get_size_inches() * fig.dpi
    assert width <= 2400 and height <= 2400


def test_loss_of_a_log_without_a_loss_is_a_key_error(fitted):
    log = GradientLog(stats=("norm",))
    store_of(log).add_variables(["a"], [(1,)])
    store_of(log).append(
        np.asarray([0]),
        np.asarray([0]),
        np.asarray([0]),
        np.asarray([0], np.int32),
        np.ones((1, 1, 1), np.float32),
        np.zeros((0,), np.int32),
        np.zeros((1, 0), np.float32),
    )
    with pytest.raises(KeyError, match=r"no loss to plot.*log.scalars"):
        plot.loss(log)
    with pytest.raises(TypeError, match=r"`log` must be a gradwatch.GradientLog"):
        plot.loss(fitted[0].log.scalars)
