"""Hypothesis fuzzing of the public API: every call works or raises a documented error."""

import re

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import gradwatch
from gradwatch.keys import match_patterns, resolve_key

DOCUMENTED = (ValueError, TypeError, KeyError, OSError)
FUZZ = settings(
    max_examples=150, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)

names = st.text(alphabet="abcd/#*?[]_.01", max_size=12)
patterns = st.one_of(
    names,
    st.lists(names, max_size=3),
    st.builds(re.compile, st.sampled_from(["kernel", "^net", "bias$", "out/.*"])),
    st.integers(),
    st.none(),
    st.floats(allow_nan=True),
)
steps = st.one_of(
    st.integers(-5, 20),
    st.lists(st.integers(-5, 20), max_size=4),
    st.builds(slice, *[st.one_of(st.none(), st.integers(-3, 10))] * 3),
    st.text(max_size=3),
    st.floats(allow_nan=True),
    st.just(True),
)


def _call(fn, *args, **kwargs):
    try:
        return fn(*args, **kwargs)
    except DOCUMENTED as e:
        assert str(e), f"{type(e).__name__} without a message"
        return None


stat_args = st.one_of(
    st.lists(st.sampled_from([*gradwatch.STATS, "nrm", ""]), max_size=3),
    st.text(max_size=6),
    st.integers(),
)
every_args = st.one_of(st.integers(-2, 5), st.floats(), st.none())
histogram_args = st.one_of(st.booleans(), st.integers(-2, 200), st.text(max_size=2))


@FUZZ
@given(variables=patterns, stats=stat_args, every=every_args, histogram=histogram_args)
def test_fuzz_gradwatch_constructor(variables, stats, every, histogram):
    _call(gradwatch.GradWatch, variables=variables, stats=stats, every=every, histogram=histogram)


@FUZZ
@given(pattern=patterns, name=st.one_of(names, st.integers(), st.none()))
def test_fuzz_key_lookups(pattern, name):
    keys = ["net/d/kernel", "net/d/bias", "net/d/kernel#1", "net/out/kernel"]
    _call(match_patterns, pattern, keys, "variables")
    _call(resolve_key, name, keys)


select_stats = st.one_of(
    st.none(),
    st.sampled_from(["norm", "max", "bogus"]),
    st.lists(st.sampled_from(["norm", "abs_max", "x"]), max_size=2),
    st.integers(),
)
any_step = st.one_of(st.integers(-2, 8), st.text(max_size=2), st.none())


@FUZZ
@given(
    variables=st.one_of(st.none(), patterns),
    stats=select_stats,
    step_sel=st.one_of(st.none(), steps),
    name=st.one_of(names, st.integers()),
    step=any_step,
)
def test_fuzz_log_queries(fitted, variables, stats, step_sel, name, step):
    log = fitted[0].log
    out = _call(log.select, variables=variables, stats=stats, steps=step_sel)
    if out is not None:
        assert set(out.columns) == {"step", "epoch", "batch", "variable", "stat", "value"}
    _call(log.gradient, name, step)
    _call(log.histogram, name, step)
    _call(log.stat, name)
    _call(log.by_layer, name)


HEADER = (
    b'# gradwatch-log {"format": "gradwatch-log", "version": 1, "variables": ["a"], '
    b'"stats": ["norm"], "shapes": {"a": [2]}}\n'
)


@FUZZ
@given(
    content=st.binary(max_size=300),
    prefix=st.sampled_from([b"", b"PAR1", b"# gradwatch-log ", HEADER, HEADER + b"step,epoch\n"]),
)
def test_fuzz_read_log_on_arbitrary_files(tmp_path, content, prefix):
    path = tmp_path / "fuzz.bin"
    path.write_bytes(prefix + content)
    log = _call(gradwatch.read_log, path)
    if log is not None:
        assert isinstance(log, gradwatch.GradientLog)


@pytest.mark.parametrize("bad", [None, 3, b"x", ["a"]])
def test_read_log_rejects_non_paths(bad):
    with pytest.raises(TypeError, match="`path` must be"):
        gradwatch.read_log(bad)
