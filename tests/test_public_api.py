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


def test_import_does_not_pull_in_plotting():
    code = "import sys, gradwatch; print('matplotlib' in sys.modules)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "False"
