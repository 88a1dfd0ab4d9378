"""Draws the charts at three sizes of model, for docs/images/scale/: 10, 142 and 214 variables.

- a 5-layer MLP (10 variables) under a `LossScaleOptimizer` whose loss scale is too
  high for one batch of outlier targets, so that three steps overflow and are skipped;
- `keras.applications.MobileNetV3Small(weights=None)` (142 variables in 88 layers);
- `keras.applications.ResNet50(weights=None)` on 32x32 inputs (214 variables in 107 layers).

Each trains for a few steps on random data, from random weights (nothing is downloaded).
With more than 30 variables the charts group by layer (`by="auto"`); the ResNet's flow
chart is drawn by variable too, where the conv biases near 1e-8 (a bias before a
BatchNormalization gets almost no gradient) stand out. The report of the MLP is
screenshotted where Chromium, chromedriver and selenium are installed.

    python examples/charts_at_scale.py [OUTPUT_DIR]   # default: docs/images/scale

It writes PNGs to OUTPUT_DIR (the report itself goes to a temporary directory) and nothing
elsewhere; about 2 minutes on 2 CPU cores.
"""

import os
import shutil
import sys
import tempfile
import time
from pathlib import Path

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np
from PIL import Image

import gradwatch
import gradwatch.plot
from gradwatch.report import write_report

out = Path(sys.argv[1] if len(sys.argv) > 1 else "docs/images/scale")
out.mkdir(parents=True, exist_ok=True)


def mlp() -> gradwatch.GradientLog:
    keras.utils.set_random_seed(0)
    x = np.random.normal(size=(512, 16)).astype("float32")
    y = np.tanh(x @ np.random.normal(size=(16, 1))).astype("float32")
    y[10 * 32 : 11 * 32] *= 1e4  # batch 10 of each epoch: outlier targets
    model = keras.Sequential(
        [keras.Input((16,))]
        + [keras.layers.Dense(32, activation="relu", name=f"dense_{i}") for i in range(4)]
        + [keras.layers.Dense(1, name="out")],
        name="mlp",
    )
    optimizer = keras.optimizers.LossScaleOptimizer(
        keras.optimizers.Adam(1e-3), initial_scale=2.0**120
    )
    model.compile(optimizer, "mse")
    watch = gradwatch.GradWatch(histogram=True, on_nonfinite="ignore")
    model.fit(x, y, batch_size=32, epochs=3, shuffle=False, callbacks=[watch], verbose=0)
    return watch.log


def application(build, size: int, steps: int) -> gradwatch.GradientLog:
    keras.utils.set_random_seed(0)
    model = build(weights=None, input_shape=(size, size, 3), classes=10)
    x = np.random.normal(size=(4 * steps, size, size, 3)).astype("float32")
    y = np.random.randint(0, 10, size=(4 * steps,))
    model.compile(keras.optimizers.SGD(1e-2), "sparse_categorical_crossentropy")
    watch = gradwatch.GradWatch()
    model.fit(x, y, batch_size=4, epochs=1, callbacks=[watch], verbose=0)
    return watch.log


def save(fig, name: str) -> None:
    path = out / f"{name}.png"
    fig.savefig(path, dpi=100, metadata={"Software": None})
    # A palette of 256 colours keeps the PNGs small; the charts have few colours.
    with Image.open(path) as image:
        small = image.convert("RGB").quantize(256, dither=Image.Dither.NONE)
    small.save(path, optimize=True)
    print(f"Wrote {path} {small.size}")


runs = {
    "mlp10": mlp(),
    "mobilenet142": application(keras.applications.MobileNetV3Small, 64, 16),
    "resnet214": application(keras.applications.ResNet50, 32, 16),
}
for name, log in runs.items():
    print(f"{name}: {len(log.variables)} variables, {len(log)} steps")
    save(gradwatch.plot.flow(log), f"{name}-flow")
    save(gradwatch.plot.norms(log), f"{name}-norms")
    save(gradwatch.plot.heatmap(log), f"{name}-heatmap")
save(gradwatch.plot.flow(runs["resnet214"], by="variable"), "resnet214-flow-by-variable")

report = write_report(
    runs["mlp10"], Path(tempfile.mkdtemp()) / "report.html", title="gradwatch report: mlp"
)
chromium, driver_path = shutil.which("chromium"), shutil.which("chromedriver")
try:
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
except ImportError:
    webdriver = None
if webdriver is not None and chromium and driver_path:
    options = webdriver.ChromeOptions()
    options.binary_location = chromium
    for flag in (
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--no-first-run",
        "--disable-background-networking",
        "--disable-component-update",
        "--window-size=1400,1200",
        f"--user-data-dir={tempfile.mkdtemp()}",
    ):
        options.add_argument(flag)
    driver = webdriver.Chrome(service=Service(driver_path), options=options)
    try:
        driver.get(report.resolve().as_uri())
        # The interactive charts are drawn after the page loads: wait for them.
        while driver.execute_script("return document.body.dataset.charts") is None:
            time.sleep(0.05)
        driver.save_screenshot(str(out / "report.png"))
    finally:
        driver.quit()
    with Image.open(out / "report.png") as shot:
        small = shot.convert("RGB").quantize(256, dither=Image.Dither.NONE)
    small.save(out / "report.png", optimize=True)
    print(f"Wrote {out / 'report.png'} {small.size}")
