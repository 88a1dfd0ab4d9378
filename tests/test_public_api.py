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
        if name.split(".")[0] in ("matplotlib", "tqdm", "tensorboard"):
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
