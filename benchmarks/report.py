"""The HTML report's interactive charts on a long log: size, render time, and the page in Chromium.

Usage: python benchmarks/report.py [--smoke] [--variables N] [--steps N] [--no-browser] [--out FILE]

The log is `benchmarks/diagnose.py`'s synthetic one (kernels and biases in layers, dense
blocks of 1,000 steps), with a loss and a learning rate, and NaN/Inf alerts at 10 steps mid-run.
Reported, in one process: the time of `render_report` and of its interactive charts'
data (`chart_data` and its JSON) against the three pictures they replace (`plot.norms`,
`plot.loss` and `plot.heatmap` as PNG, as the report drew them before); the page's size
and its parts (plotly.js, the chart data); and, in headless Chromium, the time from
opening the file to the charts drawn, of a hover over a point until its label shows, of
a zoom, and of showing every heatmap row.
"""

from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))

from diagnose import build_log

from gradwatch._logdata.store import SCALARS
from gradwatch.log import store_of

_MB = 1e6


def long_log(n_vars: int, n_steps: int):
    """`diagnose.build_log`'s log, with a loss, a learning rate and NaN/Inf alerts."""
    log = build_log(n_vars, n_steps)
    steps = log.steps
    scalars = np.full((len(steps), len(SCALARS)), np.nan, np.float32)
    rng = np.random.default_rng(1)
    scalars[:, 0] = 2.0 * np.exp(-steps / (n_steps / 3)) + 0.1 * rng.uniform(size=len(steps))
    scalars[:, 1] = 1e-3 * np.minimum(1.0, (steps + 1) / 100)
    store_of(log).append_scalars(steps, steps // 1000, steps % 1000, scalars)
    mid, key = n_steps // 2, log.variables[-3]
    store_of(log).add_alerts([(s, key, "nonfinite", 7.0) for s in range(mid, mid + 10)])
    return log


def _timed(f):
    t0 = time.perf_counter()
    out = f()
    return out, time.perf_counter() - t0


def _pictures(log) -> tuple[float, int]:
    """Draws the three charts as the report did before, as PNG: seconds, base64 bytes."""
    from gradwatch import plot
    from gradwatch.report import _png

    t0 = time.perf_counter()
    size = 0
    for draw, dpi in ((plot.norms, 140), (plot.loss, 140), (plot.heatmap, 100)):
        size += len(_png(draw(log), dpi))
    return time.perf_counter() - t0, size


def _browser(path: Path) -> dict[str, float]:
    """Seconds to the charts drawn, to a hover label, to a zoom and to all heatmap rows."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.common.action_chains import ActionChains

    options = webdriver.ChromeOptions()
    options.binary_location = shutil.which("chromium") or shutil.which("chromium-browser")
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        f"--user-data-dir={tempfile.mkdtemp()}",
        "--window-size=1400,900",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(shutil.which("chromedriver")), options=options)
    wait = "return document.body.dataset.charts"
    try:
        t0 = time.perf_counter()
        driver.get(path.as_uri())
        while driver.execute_script(wait) is None:
            time.sleep(0.01)
        drawn = time.perf_counter() - t0
        assert driver.execute_script(wait) == "ready"
        chart = driver.find_element("id", "gw-norms")
        px, py, cx, cy = driver.execute_script(
            "const gd = document.getElementById('gw-norms'), xa = gd._fullLayout.xaxis;"
            "const ya = gd._fullLayout.yaxis, box = gd.getBoundingClientRect();"
            "const t = gd.data.find(t => t.visible === true), j = Math.floor(t.x.length / 2);"
            "return [box.left + xa._offset + xa.l2p(t.x[j]),"
            " box.top + ya._offset + ya.l2p(Math.log10(t.y[j])),"
            " box.left + box.width / 2, box.top + box.height / 2]"
        )
        t0 = time.perf_counter()
        ActionChains(driver).move_to_element_with_offset(
            chart, round(px - cx), round(py - cy)
        ).perform()
        while not driver.execute_script("return document.querySelector('#gw-norms .hovertext')"):
            time.sleep(0.005)
        hover = time.perf_counter() - t0
        t0 = time.perf_counter()
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const gd = document.getElementById('gw-norms');"
            "const [a, b] = gd._fullLayout.xaxis.range;"
            "Plotly.relayout(gd, {'xaxis.range': [a, a + (b - a) / 10]}).then(() => done())"
        )
        zoom = time.perf_counter() - t0
        t0 = time.perf_counter()
        driver.execute_async_script(
            "const done = arguments[arguments.length - 1];"
            "const gd = document.getElementById('gw-heatmap');"
            "gd.once('plotly_afterplot', () => done());"
            "document.getElementById('gw-heatmap-all').click()"
        )
        all_rows = time.perf_counter() - t0
        heap = driver.execute_script("return performance.memory.usedJSHeapSize") / _MB
        return {"drawn": drawn, "hover": hover, "zoom": zoom, "all_rows": all_rows, "heap": heap}
    finally:
        driver.quit()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--smoke", action="store_true", help="a tiny log, to test the harness")
    parser.add_argument("--variables", type=int, default=500)
    parser.add_argument("--steps", type=int, default=10_000)
    parser.add_argument("--no-browser", action="store_true", help="leave Chromium out")
    parser.add_argument("--out", help="also write the table to this file")
    args = parser.parse_args()
    if args.smoke:
        args.variables, args.steps = 40, 3_000
    from gradwatch._ui import interactive
    from gradwatch._ui.plotly_js import plotly_js
    from gradwatch.report import write_report

    log, built = _timed(lambda: long_log(args.variables, args.steps))
    log.frame  # noqa: B018 - built once, as any first reader of the log does
    data, data_s = _timed(lambda: interactive.chart_data(log))
    text, json_s = _timed(lambda: interactive.to_json(data))
    pictures_s, pictures_size = _pictures(log)
    path = Path(tempfile.mkdtemp()) / "report.html"
    _, render_s = _timed(lambda: write_report(log, path))
    page = path.stat().st_size
    script = len(plotly_js())
    # The page as it was: the same page with the three pictures in place of the
    # interactive charts (plotly.js, the data and the drawing script).
    before = page - script - len(text) + pictures_size
    layers = len(data.norms)
    lines = [
        f"Measured {date.today().isoformat()}, {os.cpu_count()} CPUs, "
        f"load average {os.getloadavg()[0]:.1f}.",
        "",
        f"Log: {len(log.variables)} variables in {layers} {data.by}s, {args.steps} steps "
        f"(built in {built:.1f} s); lines in bins of {data.bin_size} steps "
        f"({2 * -(-args.steps // data.bin_size)} points a line), heatmap "
        f"{data.heat.shape[0]} x {data.heat.shape[1]} cells.",
        "",
        "| | seconds | MB |",
        "|---|---|---|",
        f"| `render_report`, the whole page | {render_s:.1f} | {page / _MB:.1f} |",
        f"| of which the chart data (`chart_data` + JSON) | {data_s + json_s:.1f} "
        f"| {len(text) / _MB:.1f} |",
        f"| of which plotly.js (inline) | - | {script / _MB:.1f} |",
        f"| before: the three charts as PNG (norms, loss, heatmap) | {pictures_s:.1f} "
        f"| {pictures_size / _MB:.1f} |",
        f"| before: the whole page, with those PNG | - | {before / _MB:.1f} |",
    ]
    if not args.no_browser:
        b = _browser(path)
        lines += [
            "",
            "| in headless Chromium | seconds |",
            "|---|---|",
            f"| open the file until the charts are drawn | {b['drawn']:.2f} |",
            f"| mouse over a point until its hover label shows | {b['hover']:.3f} |",
            f"| zoom the norms chart to a tenth of the steps | {b['zoom']:.3f} |",
            f"| show all {layers} heatmap rows | {b['all_rows']:.3f} |",
            f"| JavaScript heap after that (MB) | {b['heap']:.0f} |",
        ]
    table = "\n".join(lines)
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table + "\n")


if __name__ == "__main__":
    main()
