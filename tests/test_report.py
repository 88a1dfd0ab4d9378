"""The HTML report: self-contained, and rendered with its charts by headless Chromium."""

import base64
import io
import re
import shutil
import tempfile

import numpy as np
import pytest
from components import require
from PIL import Image

from gradwatch.log import GradientLog, store_of
from gradwatch.report import render_report, write_report

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
    assert [alt.split(":")[0].split(",")[0] for alt, _ in images] == [
        "Gradient flow",
        "Gradient norm of each variable over the steps",
        "Gradient norm heatmap (log10)",
        "The loss and learning rate of each step",
        "Gradient histogram of net/hidden/kernel",
    ]
    for _, data in images:
        png = base64.b64decode(data)
        assert Image.open(io.BytesIO(png)).size[0] >= 600
        assert _red_pixels(png) > 0  # steps 3 and 9 are non-finite
    # The summary table: one row per variable, flagged, with the log's numbers.
    summary = log.summary()
    for key, row in summary.iterrows():
        cells = re.search(rf'<tr class="nonfinite"><td>{key}</td>(.*?)</tr>', text).group(1)
        values = re.findall(r"<td>([^<]*)</td>", cells)
        assert float(values[3]) == pytest.approx(row["max_norm"], rel=1e-3)
        assert values[4:] == [str(row["nonfinite"]), "3"]
    assert "<p>8 alerts.</p>" in text
    assert text.count('<tr class="nonfinite"><td>3</td>') == 4
    assert text.count('<tr class="nonfinite"><td>9</td>') == 4


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
    options.add_argument("--window-size=1200,900")
    driver = webdriver.Chrome(service=Service(CHROMEDRIVER), options=options)
    try:
        driver.set_page_load_timeout(60)
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
        rows = driver.find_elements("css selector", "tr.nonfinite")
        assert len(rows) == 4 + 8  # summary rows and alert rows, all non-finite
        # Screenshot each chart as the browser drew it: painted, with the red marks.
        for n, image in enumerate(driver.find_elements("tag name", "img")):
            driver.execute_script("arguments[0].scrollIntoView()", image)
            png = image.screenshot_as_png
            (tmp_path / f"chart{n}.png").write_bytes(png)
            pixels = np.asarray(Image.open(io.BytesIO(png)).convert("RGB"))
            assert len(np.unique(pixels.reshape(-1, 3), axis=0)) > 50  # not blank
            assert _red_pixels(png) > 0
        height = driver.execute_script("return document.body.scrollHeight")
        driver.set_window_size(1200, height + 100)
        assert driver.save_screenshot(str(tmp_path / "report.png"))
        with Image.open(tmp_path / "report.png") as shot:
            assert shot.size[1] > 900  # the whole page, taller than the first window
    finally:
        driver.quit()
