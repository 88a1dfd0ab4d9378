"""The HTML report: self-contained, and rendered with its charts by headless Chromium."""

import base64
import io
import re
import shutil
import tempfile

import numpy as np
import pandas as pd
import pytest
from components import HANG, require
from PIL import Image

from gradwatch.log import GradientLog, store_of
from gradwatch.report import render_report, verdict, write_report

CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
CHROMEDRIVER = shutil.which("chromedriver")
# Without these Chromium tries to reach the network at start-up, and hangs where it is closed.
CHROMIUM_FLAGS = (
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
)
RED = np.asarray([214, 39, 40])  # gradwatch.plot.NONFINITE_COLOR


def _red_pixels(png: bytes) -> int:
    rgb = np.asarray(Image.open(io.BytesIO(png)).convert("RGB")).astype(int)
    return int((np.abs(rgb - RED).sum(axis=2) < 30).sum())


def test_report_is_one_self_contained_file(outlier, tmp_path):
    log = outlier.log
    path = write_report(log, tmp_path / "report.html", title="run <7>")
    text = path.read_text(encoding="utf-8")
    assert text.startswith("<!DOCTYPE html>") and "<title>run &lt;7&gt;</title>" in text
    # Nothing to fetch: no URLs, scripts, stylesheets or fonts from elsewhere.
    markup = re.sub(r"data:image/png;base64,[A-Za-z0-9+/=]+", "data:", text)
    assert not re.search(r"https?:|//|<script|<link|@import|url\(", markup, re.I)
    images = re.findall(r'<img alt="([^"]*)" src="data:image/png;base64,([^"]+)">', text)
    norm = log.stat("norm")
    largest = norm.columns[int(np.nanargmax(norm.to_numpy(np.float64)) % norm.shape[1])]
    assert [alt.split(":")[0].split(",")[0] for alt, _ in images] == [
        "Gradient norm of each variable over the steps",
        "The loss and learning rate of each step",
        "Gradient flow",
        "Gradient norm heatmap by variable (log10)",
        f"Gradient histogram of {largest}",  # net/hidden/kernel on TensorFlow
    ]
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
    assert text.count("<img ") == 3  # no histograms recorded
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


def test_report_renders_its_charts_in_headless_chromium(outlier, tmp_path):
    require(
        bool(CHROMIUM and CHROMEDRIVER),
        "Chromium and chromedriver are not installed, so the report is not rendered in a "
        "browser; install the Debian packages chromium and chromium-driver (.ci/run does).",
    )
    from selenium import webdriver  # a test extra: pip install '.[test]'
    from selenium.webdriver.chrome.service import Service

    path = write_report(outlier.log, tmp_path / "report.html")
    options = webdriver.ChromeOptions()
    options.binary_location = CHROMIUM
    for flag in (*CHROMIUM_FLAGS, f"--user-data-dir={tempfile.mkdtemp(dir=tmp_path)}"):
        options.add_argument(flag)
    options.add_argument("--window-size=1400,900")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(HANG)
        driver.get(path.as_uri())
        assert driver.title == "gradwatch report"
        images = driver.execute_script(
            "return [...document.images].map(i => [i.complete, i.naturalWidth, i.naturalHeight])"
        )
        assert len(images) == 5
        assert all(done and w >= 600 and h >= 300 for done, w, h in images), images
        # Nothing was fetched from anywhere: the page is its only resource.
        fetched = driver.execute_script(
            "return performance.getEntriesByType('resource').map(e => e.name)"
        )
        assert [u for u in fetched if not u.startswith("data:")] == []
        rows = driver.find_elements("css selector", "tr.skipped")
        assert len(rows) == 4 + 2  # summary rows, and one alert row per skipped step
        # The verdict leads the page, in its first screen.
        lead = driver.find_element("css selector", "section.verdict")
        assert lead.location["y"] < 200
        assert "skipped by the LossScaleOptimizer" in lead.text.replace("Skipped", "skipped")
        # The layout uses the window: the norms chart spans it, flow and heatmap side by side.
        inner = driver.execute_script("return document.documentElement.clientWidth")
        figures = driver.find_elements("css selector", ".charts figure")
        norms, loss, flow, heat = (f.find_element("tag name", "img") for f in figures[:4])
        assert norms.size["width"] > 0.85 * inner and loss.size["width"] > 0.85 * inner
        assert flow.location["y"] == heat.location["y"]
        assert flow.location["x"] + flow.size["width"] <= heat.location["x"]
        # Screenshot each chart as the browser drew it: painted, with the red marks.
        for n, image in enumerate(driver.find_elements("tag name", "img")):
            driver.execute_script("arguments[0].scrollIntoView()", image)
            png = image.screenshot_as_png
            (tmp_path / f"chart{n}.png").write_bytes(png)
            pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
            assert _red_pixels(png) > 0
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1400, height + 100)
        assert driver.save_screenshot(str(tmp_path / "report.png"))
        with Image.open(tmp_path / "report.png") as shot:
            assert shot.size[1] > 900  # the whole page, taller than the first window
    finally:
        driver.quit()
