"""Charts under the Agg backend: their axes, labels and series match the log."""

import io
import itertools

import matplotlib
import numpy as np
import pytest
from logfiles import write_log
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


def _row_labels(fig):
    """The row labels of every panel of a `flow` or `heatmap`, top down, panel by panel."""
    return [
        t.get_text()
        for ax in fig.axes
        if ax.get_label() != "<colorbar>"
        for t in ax.get_yticklabels()
    ]


def _medians(ax):
    """{row: median} from the flow chart's median lines, one line per kind of variable."""
    out = {}
    for line in ax.get_lines():
        if line.get_label().startswith("median"):
            for x, y in zip(line.get_xdata(), line.get_ydata(), strict=True):
                out[int(y)] = x
    return out


def _ranges(ax):
    """[(lo, hi)] per row from the flow chart's range bars."""
    (bars,) = [c for c in ax.collections if c.get_label() == "range"]
    segments = sorted(bars.get_segments(), key=lambda s: s[0][1])
    return np.asarray([[s[0][0], s[1][0]] for s in segments])


def test_flow_draws_median_and_range_in_model_order(fitted):
    log = fitted[0].log
    norm = log.stat("norm").to_numpy(np.float64)
    fig = plot.flow(log)
    (ax,) = fig.axes
    assert ax.get_xscale() == "log"
    # Every row labelled, top down in model order, without the model's name they all share.
    assert _row_labels(fig) == [k.removeprefix("net/") for k in log.variables]
    assert ax.get_ylabel() == "variable (in net)"
    assert ax.get_xlabel() == "gradient norm (L2)"
    assert fig.get_suptitle() == "Gradient flow by variable, steps 0..5"
    medians = _medians(ax)
    np.testing.assert_allclose([medians[i] for i in range(4)], np.median(norm, axis=0), rtol=1e-6)
    np.testing.assert_allclose(_ranges(ax), np.stack([norm.min(0), norm.max(0)], 1), rtol=1e-6)
    assert not any(_is_red(t.get_color()) for t in ax.get_yticklabels())
    assert _red_pixels(fig) == 0


def test_flow_joins_each_kind_of_variable_apart(fitted):
    # Kernels and biases alternate in model order; a line through all of them zig-zags.
    ax = plot.flow(fitted[0].log).axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"median, kernel", "median, bias"}
    np.testing.assert_array_equal(lines["median, kernel"].get_ydata(), [0, 2])
    np.testing.assert_array_equal(lines["median, bias"].get_ydata(), [1, 3])


def test_flow_joins_a_later_update_of_a_variable_with_its_kind():
    # A variable updated twice in a step has the keys `d/kernel` and `d/kernel@1`: both
    # are kernels, joined by one line; by layer, the second update is the layer `d@1`.
    keys = ["net/d/kernel", "net/d/bias", "net/d/kernel@1", "net/d/bias@1"]
    log = GradientLog(stats=("norm",))
    store = store_of(log)
    store.add_variables(keys, [(3,)] * len(keys))
    store.append(
        np.arange(2),
        np.zeros(2, np.int64),
        np.arange(2),
        np.arange(len(keys), dtype=np.int32),
        np.arange(1.0, 9.0, dtype=np.float32).reshape(2, len(keys), 1),
        np.zeros((0,), np.int32),
        np.zeros((2, 0), np.float32),
    )
    ax = plot.flow(log, by="variable").axes[0]
    lines = {line.get_label(): line for line in ax.get_lines()}
    assert set(lines) == {"median, kernel", "median, bias"}
    np.testing.assert_array_equal(lines["median, kernel"].get_ydata(), [0, 2])
    np.testing.assert_array_equal(lines["median, bias"].get_ydata(), [1, 3])
    assert _row_labels(plot.flow(log, by="layer")) == ["d", "d@1"]


def test_flow_by_layer_draws_the_layer_norms(fitted):
    log = fitted[0].log
    norm = log.stat("norm").to_numpy(np.float64)
    # Independent: a layer's norm is that of its variables taken together.
    layers = np.sqrt(
        np.stack([norm[:, 0] ** 2 + norm[:, 1] ** 2, norm[:, 2] ** 2 + norm[:, 3] ** 2], 1)
    )
    fig = plot.flow(log, by="layer")
    (ax,) = fig.axes
    assert _row_labels(fig) == ["hidden", "out"] and ax.get_ylabel() == "layer (in net)"
    assert fig.get_suptitle() == "Gradient flow by layer, steps 0..5"
    medians = _medians(ax)
    np.testing.assert_allclose([medians[0], medians[1]], np.median(layers, axis=0), rtol=1e-6)
    np.testing.assert_allclose(_ranges(ax), np.stack([layers.min(0), layers.max(0)], 1), rtol=1e-6)
    with pytest.raises(ValueError, match=r"`by` must be 'auto'.*Received: by='layers'"):
        plot.flow(log, by="layers")


def test_flow_with_a_step_adds_that_steps_norms(fitted):
    log = fitted[0].log
    fig = plot.flow(log, step=4)
    (line,) = [x for x in fig.axes[0].get_lines() if x.get_label() == "step 4"]
    np.testing.assert_allclose(line.get_xdata(), log.stat("norm").loc[4].to_numpy())
    np.testing.assert_array_equal(line.get_ydata(), np.arange(4))
    assert fig.get_suptitle() == "Gradient flow by variable at step 4"
    with pytest.raises(KeyError, match=r"Step 99 was not recorded\. Recorded: 6 steps from 0 to 5"):
        plot.flow(log, step=99)


def test_flow_marks_nonfinite_variables_red(outlier):
    log = outlier.log
    fig = plot.flow(log)
    ax = fig.axes[0]
    assert all(_is_red(t.get_color()) for t in ax.get_yticklabels())
    (marks,) = [
        c for c in ax.collections if len(c.get_facecolor()) and _is_red(c.get_facecolor()[0])
    ]
    np.testing.assert_array_equal(marks.get_offsets()[:, 1], np.arange(4))
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert legend[-1] == (
        "non-finite gradient (NaN/Inf) at steps 3, 9, skipped by the LossScaleOptimizer"
    )
    assert "range over the finite steps" in legend
    assert _red_pixels(fig) > 0
    # At a finite step nothing is marked.
    fig = plot.flow(log, step=4)
    assert not any(_is_red(t.get_color()) for t in fig.axes[0].get_yticklabels())


def test_flow_keeps_the_range_off_the_nonfinite_steps():
    # At step 2 some elements overflowed: the norm over the finite rest is huge (or 0 where
    # all did). A range through that step would stretch every bar to it.
    log, _, norms = _synthetic(3, 2, nonfinite=[(2, "net/layer_1/kernel")], huge_at=2)
    finite = np.delete(norms, 2, axis=0)
    ax = plot.flow(log, by="variable").axes[0]
    np.testing.assert_allclose(_ranges(ax), np.stack([finite.min(0), finite.max(0)], 1), rtol=1e-6)
    medians = _medians(ax)
    np.testing.assert_allclose([medians[i] for i in range(6)], np.median(finite, 0), rtol=1e-6)
    # Where every step was non-finite the range spans them all, rather than nothing.
    log, _, norms = _synthetic(1, 2, steps=1, nonfinite=[(0, "net/layer_0/bias")])
    np.testing.assert_allclose(_ranges(plot.flow(log).axes[0]), np.stack([norms[0], norms[0]], 1))


def _synthetic(layers, per_layer, steps=5, nonfinite=(), seed=0, huge_at=None, stats=("norm",)):
    """A log of `layers` layers of `per_layer` variables each (`net/layer_i/kernel`, `bias`,
    `gamma`, `beta`), with seeded norms, and `nonfinite` (step, key) pairs as NaN/Inf
    alerts; with `huge_at`, every norm at that step is 1e6 times larger."""
    rng = np.random.default_rng(seed)
    names = ["kernel", "bias", "gamma", "beta"]
    keys = [f"net/layer_{i}/{names[j]}" for i in range(layers) for j in range(per_layer)]
    norms = 10.0 ** rng.uniform(-3, 1, size=(steps, len(keys)))
    if huge_at is not None:
        norms[huge_at] *= 1e6
    log = GradientLog(stats=stats)
    store = store_of(log)
    store.add_variables(keys, [(3,)] * len(keys))
    store.append(
        np.arange(steps),
        np.zeros(steps, np.int64),
        np.arange(steps),
        np.arange(len(keys), dtype=np.int32),
        np.repeat(norms[:, :, None], len(stats), axis=2).astype(np.float32),
        np.zeros((0,), np.int32),
        np.zeros((steps, 0), np.float32),
    )
    store.add_alerts([(s, k, "nonfinite", 1.0) for s, k in nonfinite])
    return log, keys, norms.astype(np.float32).astype(np.float64)


def _two_update_log(tmp_path):
    """A hand-written log of layer `a` updated twice a step (`a/kernel@1`, `a/bias@1`: the
    layer `a@1`) and layer `b`; NaN/Inf alerts on `b/kernel` at step 1 and on
    `a/kernel@1` at step 3. Returns the log and its layers' norms by hand."""
    shapes = {
        "net/a/kernel": (3, 2),
        "net/a/bias": (2,),
        "net/a/kernel@1": (3, 2),
        "net/a/bias@1": (2,),
        "net/b/kernel": (2, 1),
        "net/b/bias": (1,),
    }
    norms = 10.0 ** np.random.default_rng(3).uniform(-2, 1, size=(5, 6))
    log = write_log(
        tmp_path / "two.csv",
        shapes,
        {"norm": norms},
        alerts=[(1, "net/b/kernel", "nonfinite", 1.0), (3, "net/a/kernel@1", "nonfinite", 2.0)],
    )
    norms = norms.astype(np.float32).astype(np.float64)
    layers = np.sqrt(norms[:, 0::2] ** 2 + norms[:, 1::2] ** 2)  # a, a@1, b
    return log, layers


def test_charts_by_layer_mark_the_nonfinite_layer_of_each_alert(tmp_path):
    log, layers = _two_update_log(tmp_path)
    # flow: a red triangle and a red label on the rows of a@1 and b, and only there.
    fig = plot.flow(log, by="layer")
    (ax,) = fig.axes
    assert _row_labels(fig) == ["a", "a@1", "b"]
    (marks,) = [
        c for c in ax.collections if len(c.get_facecolor()) and _is_red(c.get_facecolor()[0])
    ]
    np.testing.assert_array_equal(marks.get_offsets()[:, 1], [1, 2])
    assert [_is_red(t.get_color()) for t in ax.get_yticklabels()] == [False, True, True]
    # At step 3 only a@1's alert counts.
    ax = plot.flow(log, by="layer", step=3).axes[0]
    (marks,) = [
        c for c in ax.collections if len(c.get_facecolor()) and _is_red(c.get_facecolor()[0])
    ]
    np.testing.assert_array_equal(marks.get_offsets()[:, 1], [1])
    # heatmap: the red cells are (a@1, step 3) and (b, step 1); triangles above steps 1, 3.
    ax = plot.heatmap(log, by="layer").axes[0]
    mesh, overlay, triangles = ax.collections
    np.testing.assert_allclose(mesh.get_array().reshape(3, 5), np.log10(layers.T), rtol=1e-6)
    red = ~np.ma.getmaskarray(overlay.get_array()).reshape(3, 5)
    assert sorted(zip(*np.nonzero(red), strict=True)) == [(1, 3), (2, 1)]
    np.testing.assert_array_equal(triangles.get_offsets()[:, 0], [1, 3])
    # norms: a red cross on each layer's own alert step, at that layer's norm.
    ax = plot.norms(log, by="layer").axes[0]
    assert [line.get_label() for line in ax.get_lines()] == ["a", "a@1", "b"]
    crosses = sorted(tuple(xy) for c in ax.collections for xy in c.get_offsets())
    np.testing.assert_allclose(crosses, [(1, layers[1, 2]), (3, layers[3, 1])], rtol=1e-6)


def test_charts_group_by_layer_above_30_variables():
    small, _, _ = _synthetic(15, 2)  # 30 variables: drawn one by one
    assert len(_row_labels(plot.flow(small))) == 30
    assert len(_row_labels(plot.heatmap(small))) == 30
    big, _, _ = _synthetic(16, 2)  # 32 variables in 16 layers
    layers = [f"layer_{i}" for i in range(16)]
    assert _row_labels(plot.flow(big)) == layers
    assert _row_labels(plot.heatmap(big)) == layers
    assert plot.norms(big).axes[0].get_title() == "Gradient norms of 16 layers of net, steps 0..4"
    assert len(_row_labels(plot.flow(big, by="variable"))) == 32
    # A stat that `by_layer` cannot aggregate from what was recorded stays by variable.
    spread, _, _ = _synthetic(16, 2, stats=("norm", "std", "cos_prev"))
    assert len(_row_labels(plot.heatmap(spread, stat="std"))) == 32  # std pools with mean
    assert len(_row_labels(plot.heatmap(spread, stat="cos_prev"))) == 32
    with pytest.raises(ValueError, match=r"`cos_prev` cannot be aggregated per layer"):
        plot.heatmap(spread, stat="cos_prev", by="layer")
    # A selection of few variables is drawn by variable.
    assert len(plot.norms(big, variables="*layer_3/*").axes[0].get_lines()) == 2


@pytest.mark.parametrize("count", [10, 142, 500])
def test_charts_stay_within_2400_pixels_and_label_every_row(count):
    log, keys, _ = _synthetic(count // 2, 2)
    labels = [k.removeprefix("net/") for k in keys]
    flow, heatmap = plot.flow(log, by="variable"), plot.heatmap(log, by="variable")
    for fig in (flow, heatmap, plot.norms(log)):
        width, height = fig.get_size_inches() * fig.dpi
        assert width <= 2400 and height <= 2400, (width, height)
    assert _row_labels(flow) == labels
    assert _row_labels(heatmap) == labels
    flow.draw_without_rendering()
    # Row labels are no smaller than 4 pt, and none overlaps the next.
    for ax in flow.axes:
        texts = ax.get_yticklabels()
        assert min(t.get_fontsize() for t in texts) >= 4
        boxes = [t.get_window_extent() for t in texts]
        assert all(a.y0 >= b.y1 - 0.5 for a, b in itertools.pairwise(boxes))


def test_norms_names_the_worst_lines_in_a_short_legend():
    bad = [(2, "net/layer_7/kernel"), (1, "net/layer_30/bias")]
    log, keys, norms = _synthetic(40, 2, nonfinite=bad)
    fig = plot.norms(log, by="variable")
    ax = fig.axes[0]
    legend = [t.get_text() for t in fig.legends[0].get_texts()]
    assert len(legend) <= 12
    colored = [line.get_label() for line in ax.get_lines() if not line.get_label().startswith("_")]
    # The non-finite ones first, first to fail first; then the largest and smallest.
    assert colored[:2] == ["layer_30/bias", "layer_7/kernel"]
    finite = np.delete(norms, [1, 2], axis=0)
    largest = keys[int(np.argmax(finite.max(0)))].removeprefix("net/")
    smallest = keys[int(np.argmin(np.median(finite, 0)))].removeprefix("net/")
    assert largest in colored and smallest in colored
    assert legend[: len(colored)] == colored
    assert f"{80 - len(colored)} other variables" in legend
    assert len(ax.get_lines()) == 80  # the others are drawn too, in grey
    grey = [line for line in ax.get_lines() if line.get_label().startswith("_")]
    assert all(line.get_color() == "#b0b0b0" for line in grey)


def test_norms_draws_one_line_per_selected_variable(fitted):
    log = fitted[0].log
    fig = plot.norms(log, variables="out*")
    (ax,) = fig.axes
    assert ax.get_yscale() == "log" and ax.get_xlabel() == "step"
    lines = ax.get_lines()
    assert [line.get_label() for line in lines] == ["kernel", "bias"]
    for line in lines:
        np.testing.assert_array_equal(line.get_xdata(), log.steps)
        np.testing.assert_array_equal(
            line.get_ydata(), log.stat("norm")[f"net/out/{line.get_label()}"]
        )
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
    assert _row_labels(fig) == [k.removeprefix("net/") for k in log.variables]
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


def test_heatmap_by_layer_and_in_panels_shares_one_colour_scale(fitted):
    log = fitted[0].log
    norm = log.stat("norm").to_numpy(np.float64)
    fig = plot.heatmap(log, by="layer")
    layers = np.sqrt(
        np.stack([norm[:, 0] ** 2 + norm[:, 1] ** 2, norm[:, 2] ** 2 + norm[:, 3] ** 2])
    )
    np.testing.assert_allclose(
        fig.axes[0].collections[0].get_array().reshape(2, 6), np.log10(layers), rtol=1e-6
    )
    assert _row_labels(fig) == ["hidden", "out"]
    big, _, norms = _synthetic(125, 2)  # 250 rows: three panels of 84, 84 and 82
    fig = plot.heatmap(big, by="variable")
    *panels, bar = fig.axes
    assert len(panels) == 3 and bar.get_ylabel() == "log10 norm"
    meshes = [ax.collections[0] for ax in panels]
    assert {m.get_clim() for m in meshes} == {(np.log10(norms).min(), np.log10(norms).max())}
    cells = np.concatenate([m.get_array().reshape(-1, 5) for m in meshes])
    np.testing.assert_allclose(cells, np.log10(norms.T), rtol=1e-6)


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
