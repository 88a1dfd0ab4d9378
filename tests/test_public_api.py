import subprocess
import sys

import gradwatch


def test_public_api_is_pinned():
    assert sorted(gradwatch.__all__) == sorted(
        [
            "DEFAULT_STATS",
            "STATS",
            "GradWatch",
            "GradWatchMixin",
            "GradientLog",
            "Model",
            "Sequential",
            "__version__",
            "read_log",
        ]
    )
    for name in gradwatch.__all__:
        assert getattr(gradwatch, name) is not None
        obj = getattr(gradwatch, name)
        if callable(obj):
            assert obj.__doc__ and "Example" in obj.__doc__, name


def test_default_stats_are_the_documented_set():
    assert gradwatch.DEFAULT_STATS == ("norm", "mean", "std", "min", "max", "nonfinite")
    assert set(gradwatch.STATS) >= {"abs_max", "zero_frac", *gradwatch.DEFAULT_STATS}


_BLOCKED_EXTRAS = r"""
import importlib.util, sys, traceback

PACKAGE = importlib.util.find_spec("gradwatch").submodule_search_locations[0]
attempts = []

class BlockExtras:
    # Acts as if the optional extras were not installed, and notes who asked for them.
    def find_spec(self, name, path=None, target=None):
        if name.split(".")[0] in ("matplotlib", "tqdm", "tensorboard", "selenium"):
            # The importer: the innermost frame outside importlib and this finder.
            frames = traceback.extract_stack()[:-1]
            importer = next(f for f in reversed(frames) if not f.filename.startswith("<"))
            if importer.filename.startswith(PACKAGE):
                attempts.append(name)
            raise ImportError(f"{name} is blocked in this test")
        return None

sys.meta_path.insert(0, BlockExtras())
import numpy as np
import gradwatch, keras
model = gradwatch.Sequential([keras.Input((3,)), keras.layers.Dense(2)])
model.compile("sgd", "mse")
watch = gradwatch.GradWatch()
model.fit(np.ones((8, 3)), np.ones((8, 2)), batch_size=4, callbacks=[watch], verbose=0)
watch.log.to_parquet(sys.argv[1])
assert gradwatch.read_log(sys.argv[1]) == watch.log
print(sorted(set(attempts)), len(watch.log))
"""


def test_core_neither_imports_nor_needs_the_optional_extras(tmp_path):
    # Keras itself imports matplotlib when it is installed; gradwatch must not ask for it
    # (or tqdm, or tensorboard), and must work without them.
    out = subprocess.run(
        [sys.executable, "-c", _BLOCKED_EXTRAS, str(tmp_path / "log.parquet")],
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split("\n")[-2] == "[] 2"


_OPTIONAL = ("matplotlib", "tqdm", "tensorboard", "selenium")
_ON_DEMAND = (
    "gradwatch.plot",
    "gradwatch.cli",
    "gradwatch.report",
    "gradwatch.tensorboard",
    "gradwatch.progress",
)


def _python(code, *args):
    out = subprocess.run(
        [sys.executable, "-c", code, *map(str, args)], capture_output=True, text=True, timeout=120
    )
    assert out.returncode == 0, out.stderr
    return out


def test_import_does_not_pull_in_plotting_cli_or_tensorboard():
    # Keras itself imports matplotlib where it is installed, so compare with keras loaded.
    code = f"""
import sys
import keras, tensorflow
before = set(sys.modules)
import gradwatch
heavy = {(*_OPTIONAL, *_ON_DEMAND)!r}
new = set(sys.modules) - before
print(sorted(m for m in new if any(m == h or m.startswith(h + ".") for h in heavy)))
gradwatch.plot.flow  # the lazy attribute imports it
print("gradwatch.plot" in sys.modules)
"""
    assert _python(code).stdout.split("\n")[:2] == ["[]", "True"]


def test_missing_extras_give_an_error_naming_the_install_line(fitted, tmp_path):
    log = tmp_path / "grads.parquet"
    fitted[0].log.to_parquet(log)
    code = f"""
import importlib.abc, sys

class NotInstalled(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if name.split(".")[0] in {_OPTIONAL!r}:
            raise ModuleNotFoundError(f"No module named {{name!r}}", name=name)

sys.meta_path.insert(0, NotInstalled())
import gradwatch
try:
    gradwatch.plot
except ImportError as e:
    print(e)
from gradwatch.cli import main
log, out = sys.argv[1:]
print(main(["plot", log, "-o", out + ".png"]), main(["convert", log, out + ".csv"]))
print(main(["summary", log, "--csv"]))
from gradwatch.tensorboard import write_tensorboard
try:
    write_tensorboard(gradwatch.read_log(log), out + "_tb")
except ImportError as e:
    print(e)
"""
    run = _python(code, log, tmp_path / "out")
    lines = run.stdout.splitlines()
    assert lines[0] == (
        "gradwatch.plot needs matplotlib, which is not installed. Install it with: "
        "pip install 'gradwatch[plot]'"
    )
    assert lines[1] == "2 2"
    assert lines[2].startswith("variable,first_norm")  # summary needs no extra
    assert lines[-1] == (
        "gradwatch.tensorboard writes event files with the tensorboard package, which is "
        "not installed. Install it with: pip install tensorboard"
    )
    err = run.stderr.splitlines()
    assert "gradwatch plot: error: gradwatch.plot needs matplotlib" in err[-2]
    assert err[-1].endswith("Install it with: pip install 'gradwatch[cli]'")
