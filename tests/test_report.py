"""The HTML report: self-contained, and rendered with its charts by headless Chromium."""

import base64
import io
import json
import re
import sys
import time

import numpy as np
import pandas as pd
import pytest
from components import HANG, chromium
from PIL import Image

from gradwatch._logdata.store import SCALARS
from gradwatch._ui import interactive
from gradwatch._ui.plotly_js import plotly_js
from gradwatch.log import GradientLog, store_of
from gradwatch.report import render_report, verdict, write_report

RED = np.asarray([214, 39, 40])  # gradwatch.plot.NONFINITE_COLOR


def _red_pixels(png: bytes) -> int:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(rgb - RED).sum(axis=2) < 30).sum())


@pytest.fixture(scope="module")
def page(outlier, tmp_path_factory):
    """The report of the `outlier` log, written once for this file's tests to read."""
    return write_report(outlier.log, tmp_path_factory.mktemp("report") / "report.html", "run <7>")


def test_report_is_one_self_contained_file(outlier, page):
    log = outlier.log
    text = page.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<title>run &lt;7&gt;</title>" in text
    # Three inline scripts and no other: plotly.js (the plotly package's own copy, once),
    # the chart data (JSON) and the script that draws the charts.
    scripts = re.findall(r"<script([^>]*)>(.*?)</script>", text, re.S)
    assert [attrs for attrs, _ in scripts] == [
        "",
        ' type="application/json" id="gradwatch-chart-data"',
        "",
    ]
    assert scripts[0][1] == plotly_js() and text.count("plotly.js v") == 1
    assert json.loads(scripts[1][1]) == json.loads(interactive.to_json(interactive.chart_data(log)))
    # Nothing to fetch: no URLs, stylesheets or fonts from elsewhere, outside the scripts
    # (plotly.js names URLs of map tiles that a report's charts never load; the browser
    # test checks that the page fetches nothing).
    markup = re.sub(r"<script[^>]*>.*?</script>", "", text, flags=re.S)
    markup = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", markup)
    assert not re.search(r"https?:|//|<script|<link|@import|url\(", markup, re.I)
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">', text)
    norm = log.stat("norm")
    largest = norm.columns[int(np.nanargmax(norm.to_numpy(np.float64)) % norm.shape[1])]
    # The norms, loss and heatmap charts are interactive; the flow chart and the
    # histogram stay pictures.
    assert [alt.split(":")[0].split(",")[0] for alt, _ in images] == [
        "Gradient flow",
        f"Gradient histogram of {largest}",  # net/hidden/kernel on TensorFlow
    ]
    for plot_id in ("gw-norms", "gw-loss", "gw-heatmap"):
        assert f'<div class="plot" id="{plot_id}"' in text
    for _, data in images:
        png = base64.b64decode(data)
        assert Image.open(io.BytesIO(png)).size[0] >= 600
        assert _red_pixels(png) > 0  # steps 3 and 9 are non-finite
    # The verdict comes first. The NaN/Inf steps were skipped, and are called so; 2 skips in
    # 12 steps are more than the doctor's 1 in 20 (`loss_scale`), which leads as a warning.
    assert text.index('<section class="verdict warning"') < text.index("<h2>")
    assert text.index("<h2>Findings</h2>") < text.index("<dl>")
    assert "<p>loss_scale: 2 of 12 recorded steps skipped" in text
    assert "<li>Skipped by the LossScaleOptimizer: steps 3, 9 (2 of 12 recorded steps)" in text
    # From the log alone, skipped steps are only a note.
    alone = verdict(log)
    assert alone.level == "note"
    assert alone.sentence == (
        "No problem found: the 2 steps with NaN/Inf gradients (steps 3, 9) were skipped by "
        "the LossScaleOptimizer, and their updates never reached the weights."
    )
    assert "<dt>skipped steps</dt><dd>3, 9 (by the LossScaleOptimizer)</dd>" in text
    # The summary table: one row per variable, flagged as skipped, with the log's numbers.
    summary = log.summary()
    for key, row in summary.iterrows():
        cells = re.search(rf'<tr class="skipped"><td>{key}</td>(.*?)</tr>', text).group(1)
        values = re.findall(r"<td>([^<]*)</td>", cells)
        assert float(values[3]) == pytest.approx(row["max_norm"], rel=1e-3)
        assert values[4:] == [str(row["nonfinite"]), "3"]
    # The 8 alerts of the two skipped steps fold into one row per step, none of them red.
    assert (
        "<p>8 alerts, 8 of them at the 2 steps that the LossScaleOptimizer skipped "
        "(one row each).</p>"
    ) in text
    counts = log.stat("nonfinite")
    for step in (3, 9):
        assert (
            f'<tr class="skipped"><td>{step}</td><td>4 variables</td>'
            "<td>nonfinite, step skipped by the LossScaleOptimizer</td>"
            f"<td>{counts.loc[step].sum():.4g}</td></tr>"
        ) in text
    assert 'class="nonfinite"><td>' not in text


def _only(source, stat):
    """A log holding one stat of `source`, without histograms or alerts."""
    log = GradientLog((stat,))
    wide = source.stat(stat)
    store_of(log).add_variables(list(wide.columns), [source.shapes[k] for k in wide.columns])
    store_of(log).append(
        wide.index.to_numpy(),
        np.zeros(len(wide), np.int64),
        wide.index.to_numpy(),
        np.arange(wide.shape[1], dtype=np.int32),
        wide.to_numpy()[:, :, None],
        np.zeros((0,), np.int32),
        np.zeros((len(wide), 0), np.float32),
    )
    return log


def test_report_without_histograms_or_alerts(fitted):
    text = render_report(_only(fitted[0].log, "norm"))
    assert text.count("<img ") == 1  # the flow chart; no histograms recorded
    assert 'id="gw-loss"' not in text  # no loss recorded
    assert "<p>No alerts.</p>" in text and 'class="nonfinite"' not in text
    with pytest.raises(ValueError, match=r"no recorded steps"):
        render_report(GradientLog())
    with pytest.raises(KeyError, match=r"'norm' was not recorded"):
        render_report(_only(fitted[0].log, "mean"))


def test_verdict_names_the_skipped_steps(outlier):
    lead = verdict(outlier.log)
    assert lead.level == "note"
    assert lead.sentence == (
        "No problem found: the 2 steps with NaN/Inf gradients (steps 3, 9) were skipped by "
        "the LossScaleOptimizer, and their updates never reached the weights."
    )
    assert lead.facts[0] == (
        "Skipped by the LossScaleOptimizer: steps 3, 9 (2 of 12 recorded steps), with NaN/Inf "
        "gradients in 4 variables; their updates never reached the weights."
    )


def test_verdict_on_a_healthy_run_names_the_largest_and_smallest_layer(fitted):
    log = fitted[0].log
    lead = verdict(log)
    assert lead.level == "ok"
    assert lead.sentence == (
        "No problem found: every recorded gradient of the 6 steps was finite, and no alert "
        "was raised."
    )
    # Independent: the layers' norms from the variables' norms, by hand.
    norm = log.stat("norm").to_numpy(np.float64)
    hidden = np.median(np.sqrt(norm[:, 0] ** 2 + norm[:, 1] ** 2))
    out = np.median(np.sqrt(norm[:, 2] ** 2 + norm[:, 3] ** 2))
    (top, big), (low, small) = sorted(
        {"net/hidden": hidden, "net/out": out}.items(), key=lambda kv: -kv[1]
    )
    assert lead.facts == [
        f"Largest median gradient norm: {big:.3g} in layer {top}; smallest: {small:.3g} in "
        f"{low} ({big / small:.3g} times smaller)."
    ]


def test_verdict_leads_with_the_most_severe_fact(fitted):
    log = _only(fitted[0].log, "norm")
    store_of(log).add_alerts(
        [
            (1, "net/out/kernel", "max_norm", 5.0),
            (4, "net/out/bias", "nonfinite", 2.0),
            (2, "net/hidden/bias", "nonfinite", 1.0),
            (2, "net/hidden/kernel", "nonfinite", 3.0),
        ]
    )
    store_of(log).add_skipped([4])  # step 4's update was skipped; step 2's was not
    store_of(log).add_disconnected(["net/out/bias"])
    lead = verdict(log)
    assert lead.level == "problem"
    assert lead.sentence == (
        "NaN/Inf gradients reached the weights at 1 step (step 2), first at step 2 in "
        "net/hidden/kernel, net/hidden/bias."
    )
    assert lead.facts[:4] == [
        lead.sentence,
        "Gradient norms above `max_norm` at 1 step (step 1), first at step 1 in net/out/kernel.",
        "1 variable got no gradient (not connected to the loss): net/out/bias.",
        "Skipped by the LossScaleOptimizer: step 4 (1 of 6 recorded steps), with NaN/Inf "
        "gradients in 1 variable; their updates never reached the weights.",
    ]
    # The page's verdict: a problem, led by the doctor's findings where they say more; the
    # log's own lead is then among its facts.
    text = render_report(log)
    assert '<section class="verdict problem" id="verdict"><p>' in text
    assert f"<p>{lead.sentence}</p>" in text or f"<li>{lead.sentence}</li>" in text
    # Norm alerts alone are a warning.
    log = _only(fitted[0].log, "norm")
    store_of(log).add_alerts([(3, "net/hidden/kernel", "min_norm", 1e-9)])
    lead = verdict(log)
    assert lead.level == "warning" and lead.sentence == (
        "Gradient norms below `min_norm` at 1 step (step 3), first at step 3 in net/hidden/kernel."
    )


def test_verdict_leads_with_given_findings(fitted):
    findings = pd.DataFrame(
        {
            "severity": ["problem", "note"],
            "finding": ["Layer out explodes from step 3.", "The loss plateaus."],
        }
    )
    lead = verdict(fitted[0].log, findings)
    assert (lead.level, lead.sentence) == ("problem", "Layer out explodes from step 3.")
    assert lead.facts[:2] == ["Layer out explodes from step 3.", "The loss plateaus."]


def _layered_log(n_layers=17, n_steps=50, seed=3):
    """A log of `n_layers` layers of a kernel and a bias (more than 30 variables: the
    charts go by layer), with a loss and a learning rate, zero norms in one layer, a
    large one in another, and NaN/Inf alerts at steps 20-22 and 40."""
    rng = np.random.default_rng(seed)
    log = GradientLog(("norm",))
    store = store_of(log)
    keys = [f"net/d{i}/{leaf}" for i in range(n_layers) for leaf in ("kernel", "bias")]
    codes = store.add_variables(keys, [(3, 3) if k.endswith("kernel") else (3,) for k in keys])
    norms = rng.lognormal(size=(n_steps, len(keys))).astype(np.float32)
    norms[:, 4:6] = 0.0  # layer d2: no gradient to draw on a log scale
    norms[30, 8] = 1e6  # layer d4: a spike
    steps = np.arange(n_steps, dtype=np.int64)
    store.append(
        steps, steps // 10, steps % 10, codes, norms[:, :, None], codes[:0], np.zeros((n_steps, 0))
    )
    scalars = np.full((n_steps, len(SCALARS)), np.nan, np.float32)
    scalars[:, 0] = rng.uniform(0.5, 2.0, n_steps)
    scalars[:, 1] = 0.01 / (1 + steps)
    store.append_scalars(steps, steps // 10, steps % 10, scalars)
    store.add_alerts([(s, "net/d7/bias", "nonfinite", 1.0) for s in (20, 21, 22, 40)])
    return log, norms.astype(np.float64), scalars.astype(np.float64)


def _min_max_by_hand(values, size):
    """The positions of each bin's smallest and largest finite value, by hand."""
    out = []
    for start in range(0, len(values), size):
        finite = [p for p in range(start, min(start + size, len(values))) if np.isfinite(values[p])]
        if not finite:
            out += [start, start]
            continue
        low = min(finite, key=lambda p: values[p])
        high = max(finite, key=lambda p: values[p])
        out += sorted([low, high])
    return out


def test_chart_data_holds_the_logs_values_by_layer_and_binned():
    log, norms, scalars = _layered_log()
    data = interactive.chart_data(log, max_points=20, max_columns=7, shown_lines=10, shown_rows=12)
    assert data.by == "layer" and data.prefix == "net/" and data.bin_size == 5
    assert data.steps.tolist() == list(range(50))
    # Each layer's norm by hand: sqrt(kernel**2 + bias**2) of the recorded norms; 0 has no
    # place on a log scale.
    assert [line.name for line in data.norms] == [f"net/d{i}" for i in range(17)]
    assert [line.label for line in data.norms] == [f"d{i}" for i in range(17)]
    for i, line in enumerate(data.norms):
        layer = np.sqrt(norms[:, 2 * i] ** 2 + norms[:, 2 * i + 1] ** 2)
        layer[layer <= 0] = np.nan
        assert line.positions.tolist() == _min_max_by_hand(layer, 5)
        np.testing.assert_allclose(line.values, layer[line.positions], rtol=1e-12)
    assert 30 in data.norms[4].positions.tolist()  # the spike is kept
    assert np.isnan(data.norms[2].values).all()
    # Shown first: 10 lines, among them the NaN/Inf layer, the spike and the smallest.
    assert sum(line.shown for line in data.norms) == 10
    assert data.norms[7].shown and data.norms[4].shown
    # The loss, learning rate and global norm of each step, binned the same way.
    for line, column in ((data.loss, 0), (data.learning_rate, 1)):
        assert line.positions.tolist() == _min_max_by_hand(scalars[:, column], 5)
        np.testing.assert_allclose(line.values, scalars[line.positions, column], rtol=0)
    total = np.sqrt((norms**2).sum(axis=1))
    assert data.global_norm.positions.tolist() == _min_max_by_hand(total, 5)
    np.testing.assert_allclose(
        data.global_norm.values, total[data.global_norm.positions], rtol=1e-12
    )
    assert not data.loss_log  # 0.5..2: linear, as `plot.loss`
    # The heatmap: columns of 8 steps (50 steps in at most 7), each the bin's largest norm.
    assert data.heat_size == 8 and data.heat.shape == (17, 7)
    for i in range(17):
        layer = np.sqrt(norms[:, 2 * i] ** 2 + norms[:, 2 * i + 1] ** 2)
        by_hand = [layer[c * 8 : (c + 1) * 8].max() for c in range(7)]
        np.testing.assert_allclose(data.heat[i], by_hand, rtol=1e-12)
    assert data.heat_bad.sum() == 2 and data.heat_bad[7, 2] and data.heat_bad[7, 5]
    assert data.heat_shown.sum() == 12 and data.heat_shown[7] and data.heat_shown[4]
    assert data.spans == [(20, 22), (40, 40)]
    # The page's JSON holds these numbers: the steps exactly, the values as float32.
    page = json.loads(interactive.to_json(data))
    decoded = np.frombuffer(base64.b64decode(page["norms"][4]["values"]), "<f4")
    np.testing.assert_array_equal(decoded, data.norms[4].values.astype(np.float32))
    assert page["atBytes"] == 2
    at = np.frombuffer(base64.b64decode(page["norms"][4]["at"]), "<u2")
    assert at.tolist() == data.norms[4].positions.tolist()
    assert np.frombuffer(base64.b64decode(page["steps"]), "<f8").tolist() == list(range(50))
    heat = np.frombuffer(base64.b64decode(page["heat"]["values"]), "<f4").reshape(17, 7)
    np.testing.assert_array_equal(heat, data.heat.astype(np.float32))


def test_chart_data_of_a_short_log_is_every_step_by_variable(outlier):
    log = outlier.log
    data = interactive.chart_data(log)
    norm = log.stat("norm").astype(np.float64)  # the reference: the log's own frame
    assert data.by == "variable" and data.bin_size == 1 and data.heat_size == 1
    for line in data.norms:
        assert line.positions.tolist() == list(range(12)) and line.shown
        expected = norm[line.name].where(norm[line.name] > 0).to_numpy()
        np.testing.assert_array_equal(line.values, expected)
    # Every step: the page makes the positions itself (the 4 variables, loss, rate, global).
    assert interactive.to_json(data).count('"at":null') == 4 + 3
    np.testing.assert_array_equal(data.heat, np.abs(norm.where(np.isfinite(norm))).T.to_numpy())
    # Steps 3 and 9 had NaN/Inf gradients in every variable (the log's alerts).
    assert data.spans == [(3, 3), (9, 9)]
    assert data.heat_bad.sum(axis=0).tolist() == [4 if s in (3, 9) else 0 for s in range(12)]
    np.testing.assert_array_equal(data.loss.values, log.scalars["loss"].to_numpy(np.float64))


def test_report_without_plotly_names_the_extra(fitted, monkeypatch):
    # The report needs plotly.js from the `plotly` package; without it, a clear ImportError.
    plotly_js.cache_clear()
    monkeypatch.setitem(sys.modules, "plotly", None)
    try:
        with pytest.raises(ImportError, match=r"pip install 'gradwatch\[plot\]'"):
            render_report(fitted[0].log)
    finally:
        plotly_js.cache_clear()


@pytest.fixture(scope="module")
def browser(tmp_path_factory):
    """One headless Chromium for this file's browser tests, at 1400 x 900."""
    driver = chromium(tmp_path_factory.mktemp("chromium"), "the report")
    yield driver
    driver.quit()


def _open(driver, path):
    """Loads the page and waits until its charts are drawn."""
    driver.set_window_size(1400, 900)
    driver.get(path.as_uri())
    deadline = time.monotonic() + HANG
    while (state := driver.execute_script("return document.body.dataset.charts")) is None:
        assert time.monotonic() < deadline, "the charts were never drawn"
        time.sleep(0.05)
    assert state == "ready", state


def test_report_renders_its_charts_in_headless_chromium(browser, page, tmp_path):
    driver = browser
    _open(driver, page)
    assert driver.title == "run <7>"
    images = driver.execute_script(
        "return [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
    )
    assert len(images) == 2
    assert all(done and w >= 600 and h >= 300 for done, w, h in images), images
    # Nothing was fetched from anywhere: the page is its only resource. Its scripts are
    # inline, it links nothing, and its images are data: URIs.
    fetched = driver.execute_script(
        "return performance.getEntriesByType('resource').map(e => e.name)"
    )
    assert [u for u in fetched if not u.startswith("data:")] == []
    loaded = driver.execute_script(
        "return performance.getEntriesByType('navigation').map(e => e.name)"
    )
    assert loaded == [page.as_uri()]
    sources = driver.execute_script(
        "return [...document.querySelectorAll('script[src], link[href], img, iframe, object,"
        " embed, source, audio, video')].map(e => e.getAttribute('src') ?? e.getAttribute('href'))"
    )
    assert [u for u in sources if not u.startswith("data:")] == []
    rows = driver.find_elements("css selector", "tr.skipped")
    assert len(rows) == 4 + 2  # summary rows, and one alert row per skipped step
    # The verdict leads the page, in its first screen.
    lead = driver.find_element("css selector", "section.verdict")
    assert lead.location["y"] < 200
    assert "skipped by the LossScaleOptimizer" in lead.text.replace("Skipped", "skipped")
    # The layout uses the window: the interactive charts span it, flow and histogram side
    # by side.
    inner = driver.execute_script("return document.documentElement.clientWidth")
    for plot_id in ("gw-norms", "gw-loss", "gw-heatmap"):
        chart = driver.find_element("id", plot_id)
        assert chart.size["width"] > 0.85 * inner and chart.size["height"] >= 300
        # plotly drew it: an SVG with the plot's traces.
        assert chart.find_elements("css selector", "svg.main-svg")
    flow, hist = driver.find_elements("tag name", "img")
    assert flow.location["y"] == hist.location["y"]
    assert flow.location["x"] + flow.size["width"] <= hist.location["x"]
    # Screenshot each chart as the browser drew it: painted, with the red marks of the
    # non-finite steps 3 and 9.
    charts = [*driver.find_elements("css selector", ".plot"), flow, hist]
    for n, chart in enumerate(charts):
        driver.execute_script("arguments[0].scrollIntoView()", chart)
        png = chart.screenshot_as_png
        (tmp_path / f"chart{n}.png").write_bytes(png)
        pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
        assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
        assert _red_pixels(png) > 0
    height = driver.execute_script("return document.body.scrollHeight")
    driver.set_window_size(1400, height + 100)
    assert driver.save_screenshot(str(tmp_path / "report.png"))
    with Image.open(tmp_path / "report.png") as shot:
        assert shot.size[1] > 900  # the whole page, taller than the first window


# The pixel of a point of a plotly chart, in the window, from plotly's own axes: its
# trace, point and linear (or log10) value on each axis.
_PIXEL = """
const [id, x, y] = arguments;
const gd = document.getElementById(id), xa = gd._fullLayout.xaxis, ya = gd._fullLayout.yaxis;
const box = gd.getBoundingClientRect();
const ly = ya.type === "log" ? Math.log10(y) : y;
return [box.left + xa._offset + xa.l2p(x), box.top + ya._offset + ya.l2p(ly),
        box.left + box.width / 2, box.top + box.height / 2];
"""

# The point of the norms chart farthest (in pixels) from every other trace's points: a
# hover over it finds it alone.
_LONELY = """
const gd = document.getElementById("gw-norms"), xa = gd._fullLayout.xaxis;
const ya = gd._fullLayout.yaxis;
const px = (t, j) => [xa.l2p(t.x[j]), ya.l2p(Math.log10(t.y[j]))];
const seen = gd.data.map((t, i) => [t, i]).filter(([t]) => t.visible === true);
let best = null;
for (const [t, i] of seen) for (let j = 0; j < t.x.length; j++) {
  if (t.y[j] === null) continue;
  const [a, b] = px(t, j);
  let near = Infinity;
  for (const [u, k] of seen) if (k !== i) for (let m = 0; m < u.x.length; m++)
    if (u.y[m] !== null) {
      const [c, d] = px(u, m);
      near = Math.min(near, Math.hypot(a - c, b - d));
    }
  if (best === null || near > best[0]) best = [near, i, t.x[j], t.y[j]];
}
return best.slice(1);
"""


def _hover(driver, plot_id, x, y):
    """Moves the mouse over the point `(x, y)` of a chart, as a user would, and returns the
    text of the hover label that plotly shows."""
    from selenium.webdriver.common.action_chains import ActionChains

    chart = driver.find_element("id", plot_id)
    driver.execute_script("arguments[0].scrollIntoView()", chart)
    px, py, cx, cy = driver.execute_script(_PIXEL, plot_id, x, y)
    # Away first, so that plotly sees a move onto the point; offsets from the centre.
    ActionChains(driver).move_to_element_with_offset(chart, 0, -int(cy - 5)).perform()
    ActionChains(driver).move_to_element_with_offset(
        chart, round(px - cx), round(py - cy)
    ).perform()
    deadline = time.monotonic() + HANG
    while not (
        text := driver.execute_script(
            "const h = document.querySelector(`#${arguments[0]} .hoverlayer .hovertext`);"
            "return h ? [...h.querySelectorAll('text.nums tspan.line, text.nums')].map("
            "t => t.textContent) : null",
            plot_id,
        )
    ):
        assert time.monotonic() < deadline, "no hover label"
        time.sleep(0.05)
    return text


def _hovered(text):
    """`(name, step, value)` of a hover label (its text element, then its lines): the
    name, `step S` (or `steps A-B`, then `(A, B)`) and `norm V` (or `largest norm V`)."""
    joined = "|".join(text[1:] if len(text) > 1 else text)
    name, first, last, value = re.fullmatch(
        r"(.+)\|steps? (\d+)(?:\u2013(\d+))?\|(?:largest )?norm (\S+)", joined
    ).groups()
    step = int(first) if last is None else (int(first), int(last))
    return name, step, float(value.replace("\u2212", "-"))


def test_report_charts_show_the_logs_values_on_hover_zoom_and_pick(outlier, browser, page):
    from selenium.webdriver.support.ui import Select

    driver = browser
    _open(driver, page)
    norm = outlier.log.stat("norm")  # the reference: the log itself
    # Hover: the label names the variable, the step and the log's norm there.
    trace, step, value = driver.execute_script(_LONELY)
    name, shown_step, shown = _hovered(_hover(driver, "gw-norms", step, value))
    assert name == norm.columns[trace] and shown_step == step
    assert shown == pytest.approx(float(norm.loc[step, name]), rel=5e-4)
    before = driver.execute_script("return document.getElementById('gw-norms').data.map(t => t.y)")
    # Zoom: a narrower step range around the point; the data stay, and the same point
    # shows the same values.
    driver.execute_async_script(
        "const done = arguments[arguments.length - 1];"
        "Plotly.relayout('gw-norms', {'xaxis.range': [arguments[0] - 2, arguments[0] + 2]})"
        ".then(() => done())",
        step,
    )
    assert driver.execute_script(
        "return document.getElementById('gw-norms')._fullLayout.xaxis.range"
    ) == [step - 2, step + 2]
    after = driver.execute_script("return document.getElementById('gw-norms').data.map(t => t.y)")
    assert after == before
    assert _hovered(_hover(driver, "gw-norms", step, value)) == (name, step, shown)
    # Pick: a click on the variable's name in the legend hides its line, another shows it.
    toggle = driver.find_elements("css selector", "#gw-norms .legend .traces .legendtoggle")[trace]
    for visible in ("legendonly", True):
        toggle.click()
        deadline = time.monotonic() + HANG
        while (
            driver.execute_script(
                "return document.getElementById('gw-norms').data[arguments[0]].visible", trace
            )
            != visible
        ):
            assert time.monotonic() < deadline
            time.sleep(0.05)
    # The heatmap: a hover over a cell shows its variable, step and norm.
    names = list(norm.columns)
    row, col = len(names) - 1, 5
    heat_step = int(norm.index[col])
    label = _hover_cell(driver, row, heat_step)
    assert _hovered(label) == (
        names[row],
        heat_step,
        pytest.approx(float(norm.loc[heat_step, names[row]]), rel=5e-4),
    )
    # Picking rows in the heatmap's picker redraws it with those rows, in model order.
    picker = Select(driver.find_element("id", "gw-heatmap-layers"))
    assert [o.text for o in picker.all_selected_options] == names
    picker.deselect_by_index(0)
    picker.deselect_by_index(2)
    _until(driver, "return document.getElementById('gw-heatmap').data[0].y", [names[1], names[3]])
    driver.find_element("id", "gw-heatmap-all").click()
    _until(driver, "return document.getElementById('gw-heatmap').data[0].y", names)


def _hover_cell(driver, row, step):
    """The hover label of a heatmap cell: row `row` (counted from the top), at `step`."""
    return _hover(driver, "gw-heatmap", step, row)


def _until(driver, script, expected):
    deadline = time.monotonic() + HANG
    while (got := driver.execute_script(script)) != expected:
        assert time.monotonic() < deadline, got
        time.sleep(0.05)


def test_report_of_a_long_run_shows_each_bins_values_on_hover(browser, tmp_path, monkeypatch):
    # Binned as a long run is (here past 20 points and 7 columns): a line's point is a
    # recorded step's value, and a heatmap cell the largest norm of its bin.
    monkeypatch.setattr(interactive, "MAX_POINTS", 20)
    monkeypatch.setattr(interactive, "MAX_COLUMNS", 7)
    log, norms, _ = _layered_log()
    path = write_report(log, tmp_path / "long.html")
    _open(browser, path)
    layer = np.sqrt(norms[:, 0::2] ** 2 + norms[:, 1::2] ** 2)  # by hand, steps x layers
    # The spike of layer d4 at step 30, kept by its bin (steps 30-34).
    name, step, value = _hovered(_hover(browser, "gw-norms", 30, float(layer[30, 4])))
    assert (name, step) == ("net/d4", 30) and value == pytest.approx(layer[30, 4], rel=5e-4)
    # A cell of row d5, column 3: the largest norm of steps 24-31.
    rows = browser.execute_script("return document.getElementById('gw-heatmap').data[0].y")
    name, steps, value = _hovered(_hover_cell(browser, rows.index("net/d5"), 24))
    assert (name, steps) == ("net/d5", (24, 31))
    assert value == pytest.approx(layer[24:32, 5].max(), rel=5e-4)
