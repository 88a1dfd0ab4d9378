import re

import numpy as np
import pandas as pd
import pytest

import gradwatch
from gradwatch.log import GradientLog

KEYS = ["net/hidden/kernel", "net/hidden/bias", "net/out/kernel", "net/out/bias"]


def test_log_frame_is_long_tidy_and_typed(fitted):
    log = fitted[0].log
    frame = log.frame
    assert list(frame.columns) == ["step", "epoch", "batch", "variable", "stat", "value"]
    assert len(frame) == 6 * 4 * len(gradwatch.STATS)
    assert frame["step"].dtype == np.int64 and frame["batch"].dtype == np.int64
    assert frame["value"].dtype == np.float32
    assert isinstance(frame["variable"].dtype, pd.CategoricalDtype)
    assert list(frame["variable"].cat.categories) == KEYS
    assert list(frame["stat"].cat.categories) == list(gradwatch.STATS)
    assert frame["step"].is_monotonic_increasing
    one = frame[(frame.step == 4) & (frame.variable == "net/out/kernel") & (frame.stat == "norm")]
    assert one["value"].item() == pytest.approx(np.linalg.norm(log.gradient("out/kernel", 4)))
    assert one[["epoch", "batch"]].values.tolist() == [[1, 1]]


def test_log_metadata(fitted):
    log = fitted[0].log
    assert log.variables == KEYS
    np.testing.assert_array_equal(log.steps, np.arange(6))
    assert log.stat_names == tuple(gradwatch.STATS)
    assert log.value_variables == ["net/out/kernel", "net/out/bias"]
    assert log.shapes["net/hidden/kernel"] == (5, 4)
    assert len(log) == 6
    assert re.match(r"GradientLog\(6 recorded steps, steps 0\.\.5, 4 variables", repr(log))


def test_log_stat_is_wide_by_step_and_variable(fitted):
    log = fitted[0].log
    wide = log.stat("max")
    assert list(wide.columns) == KEYS
    assert list(wide.index) == list(range(6))
    for step in range(6):
        assert wide.loc[step, "net/out/bias"] == pytest.approx(log.gradient("out/bias", step).max())


def test_log_stat_errors(fitted):
    log = fitted[0].log
    with pytest.raises(KeyError, match=r"'nrm' was not recorded.*Recorded: \['norm'"):
        log.stat("nrm")
    small = GradientLog(stats=("norm",))
    with pytest.raises(KeyError, match=r"known stat; record it with GradWatch\(stats="):
        small.stat("max")


def test_log_select_filters_variables_stats_and_steps(fitted):
    log = fitted[0].log
    sub = log.select(variables="out*", stats="norm", steps=slice(1, 4))
    assert sorted(sub["step"].unique()) == [1, 2, 3]
    assert set(sub["variable"].astype(str)) == {"net/out/kernel", "net/out/bias"}
    assert set(sub["stat"].astype(str)) == {"norm"}
    assert len(sub) == 3 * 2
    assert list(log.select(steps=slice(0, None, 2))["step"].unique()) == [0, 2, 4]
    assert list(log.select(steps=[5, 0])["step"].unique()) == [0, 5]
    assert list(log.select(steps=3)["step"].unique()) == [3]
    assert len(log.select()) == len(log.frame)


def test_log_select_bad_input(fitted):
    log = fitted[0].log
    with pytest.raises(ValueError, match=r"matches no variable.*Available keys"):
        log.select(variables="conv*")
    with pytest.raises(KeyError, match="was not recorded"):
        log.select(stats=["norm", "bogus"])
    with pytest.raises(TypeError, match="`steps` must be an int"):
        log.select(steps="0:10")
    with pytest.raises(TypeError, match="slice takes integers"):
        log.select(steps=slice(0.5, 2))
    with pytest.raises(ValueError, match="step must be >= 1"):
        log.select(steps=slice(0, 5, 0))


def test_log_gradient_lookups_and_errors(fitted):
    log = fitted[0].log
    g = log.gradient("out/kernel", step=5)
    assert g.shape == (4, 2) and g.dtype == np.float32
    np.testing.assert_array_equal(g, log.gradient("net/out/kernel", 5))
    with pytest.raises(
        KeyError, match=r"ambiguous: it matches \['net/hidden/kernel', 'net/out/kernel'\]"
    ):
        log.gradient("kernel", 0)
    with pytest.raises(KeyError, match=r"No variable is named 'conv/kernel'.*Available"):
        log.gradient("conv/kernel", 0)
    with pytest.raises(KeyError, match=r"'net/hidden/kernel' was not kept.*GradWatch\(values="):
        log.gradient("hidden/kernel", 0)
    with pytest.raises(KeyError, match=r"Step 99 .* not recorded\. Recorded: 6 steps from 0 to 5"):
        log.gradient("out/kernel", 99)


def test_log_values_frame_rebuilds_the_tensors(fitted):
    log = fitted[0].log
    vf = log.values_frame
    assert list(vf.columns) == ["step", "epoch", "batch", "variable", "index", "value"]
    assert len(vf) == 6 * (8 + 2)
    rows = vf[(vf.step == 3) & (vf.variable == "net/out/kernel")].sort_values("index")
    np.testing.assert_array_equal(rows["index"], np.arange(8))
    np.testing.assert_array_equal(
        rows["value"].to_numpy().reshape(4, 2), log.gradient("out/kernel", 3)
    )


def test_empty_log_queries():
    log = GradientLog()
    assert len(log.frame) == 0 and log.frame.columns[0] == "step"
    assert len(log.values_frame) == 0
    assert len(log.steps) == 0
    assert "no steps" in repr(log)
    with pytest.raises(KeyError, match="No variable is named"):
        log.gradient("x", 0)
