"""Hypothesis fuzzing of the public API. Each generated input is classified as valid or
invalid from the documented rules (README, docstrings), without asking gradwatch: valid
input must succeed and give what an independent oracle gives (fnmatch/regex, a pandas
filter of `log.frame`, NumPy stats of the kept tensors), and invalid input must raise the
documented error type, with a message naming the argument (or the file)."""

import fnmatch
import re

import numpy as np
import pandas as pd
import pytest
from hypothesis import HealthCheck, event, example, given, settings
from hypothesis import strategies as st
from reference import README_STATS, np_stats, reference_bins

import gradwatch
from gradwatch._stats.specs import SPECS
from gradwatch.keys import match_patterns, resolve_key

# Derandomized (and no example database), so that every run, in CI too, tries the same inputs.
FUZZ = settings(
    max_examples=150,
    deadline=None,
    derandomize=True,
    database=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture],
)

GRADIENT_STATS = README_STATS[:8]

names = st.text(alphabet="abcd/#*?[]_.01", max_size=12)
globs = st.sampled_from(
    ["*", "*kernel", "d/*", "out*", "net/d/*", "kernel#1", "*#?", "[do]*/kernel", "bias", "*/b*"]
)
regexes = st.builds(re.compile, st.sampled_from(["kernel", "^net", "bias$", "out/.*", "zz"]))
patterns = st.one_of(
    names,
    globs,
    st.lists(st.one_of(names, globs, regexes), max_size=3),
    regexes,
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


def _message(error):
    """The message an error was raised with (`str(KeyError)` adds quotes and escapes)."""
    return str(error.args[0]) if error.args else ""


def _outcome(fn, *args, **kwargs):
    """`(result, None)`, or `(None, error)` for an exception of any type."""
    try:
        return fn(*args, **kwargs), None
    except Exception as e:  # classified by the caller against the oracle
        return None, e


def _assert_raised(error, expected, name):
    """`error` is of the type the oracle expects for `name`, and its message names it."""
    assert error is not None, f"expected {expected.__name__} for {name}, got a result"
    assert isinstance(error, expected), f"{name}: {type(error).__name__}: {error}"
    assert name in _message(error), (name, _message(error))


def _assert_one_of(error, errors):
    """`error` is what the oracle expects for one of the invalid arguments in `errors`
    (`{argument: (error type, text the message must hold)}`): which one is reported first
    is not documented."""
    assert error is not None, f"expected one of {errors}, got a result"
    assert any(isinstance(error, t) and text in _message(error) for t, text in errors.values()), (
        errors,
        repr(error),
    )


# ------------------------------------------------------------------------ the oracles
def _pattern_list(patterns):
    """The documented forms: a glob, an `re.Pattern`, or a non-empty list of them; else None."""
    if isinstance(patterns, (str, re.Pattern)):
        return [patterns]
    if (
        isinstance(patterns, (list, tuple))
        and patterns
        and all(isinstance(p, (str, re.Pattern)) for p in patterns)
    ):
        return list(patterns)
    return None


def _hits(pattern, key):
    """README: a regex matches when `pattern.search(key)` does; a glob when it matches the
    full key or a suffix of it on `/` boundaries, written here as one regex: any prefix
    ending in `/`, then the glob."""
    if isinstance(pattern, re.Pattern):
        return pattern.search(key) is not None
    return re.match(r"(?:.*/)?" + fnmatch.translate(pattern), key) is not None


def _matched(patterns, keys, arg):
    """`(keys that the patterns match, in key order, or None; {arg: error} if invalid)`."""
    items = _pattern_list(patterns)
    if items is None:
        return None, {arg: (TypeError, f"`{arg}`")}
    if any(not any(_hits(p, k) for k in keys) for p in items):
        return None, {arg: (ValueError, f"`{arg}`")}
    return [k for k in keys if any(_hits(p, k) for p in items)], {}


def _resolved(name, keys):
    """README: a full key, or a suffix on `/` boundaries that exactly one key ends with."""
    if not isinstance(name, str):
        return None, TypeError
    if name in keys:
        return name, None
    tails = [k for k in keys if k.endswith("/" + name)]
    return (tails[0], None) if len(tails) == 1 else (None, KeyError)


def _recorded_step(step, log_steps):
    return isinstance(step, int) and not isinstance(step, bool) and step in log_steps


# ------------------------------------------------------------------ GradWatch(...)
def mostly(valid, anything):
    """Valid arguments three times in four, so that all four of the constructor's are
    valid together often enough (`one_of` picks a branch uniformly)."""
    return st.one_of(valid, valid, valid, anything)


stat_args = mostly(
    st.one_of(st.sampled_from(README_STATS), st.lists(st.sampled_from(README_STATS), min_size=1)),
    st.one_of(
        st.lists(st.sampled_from([*README_STATS, "nrm", ""]), max_size=3),
        st.text(max_size=6),
        st.integers(),
    ),
)
every_args = mostly(st.integers(1, 5), st.one_of(st.integers(-2, 5), st.floats(), st.none()))
histogram_args = mostly(
    st.one_of(st.booleans(), st.integers(1, 100)),
    st.one_of(st.integers(-2, 200), st.text(max_size=2)),
)
valid_patterns = st.one_of(st.text(max_size=5), globs, regexes, st.lists(globs, min_size=1))


def _constructor_errors(variables, stats, every, histogram):
    """`{argument: (error type, text)}` for each argument that breaks the documented rules."""
    errors = {}
    if _pattern_list(variables) is None:
        errors["variables"] = (TypeError, "`variables`")
    items = [stats] if isinstance(stats, str) else stats
    if not isinstance(items, (list, tuple)) or not all(isinstance(s, str) for s in items):
        errors["stats"] = (TypeError, "`stats`")
    elif not items or any(s not in README_STATS for s in items):
        errors["stats"] = (ValueError, "`stats`")
    if isinstance(every, bool) or not isinstance(every, int):
        errors["every"] = (TypeError, "every=")
    elif every < 1:
        errors["every"] = (ValueError, "every=")
    # True, False, or a number of bins per decade from 1 to 100.
    if not isinstance(histogram, bool) and (
        not isinstance(histogram, int) or not 1 <= histogram <= 100
    ):
        kind = ValueError if isinstance(histogram, int) else TypeError
        errors["histogram"] = (kind, "histogram=")
    return errors


@FUZZ
@given(
    variables=mostly(valid_patterns, patterns),
    stats=stat_args,
    every=every_args,
    histogram=histogram_args,
)
@example(variables="*", stats=["norm", "max", "norm"], every=1, histogram=100)
@example(variables=["*kernel", re.compile("bias$")], stats="std", every=5, histogram=1)
@example(variables="*", stats="norm", every=1, histogram=101)
@example(variables="*", stats="norm", every=1, histogram=0)
@example(variables="*", stats=[], every=1, histogram=False)
@example(variables=[], stats="norm", every=0, histogram=True)
def test_fuzz_gradwatch_constructor(variables, stats, every, histogram):
    errors = _constructor_errors(variables, stats, every, histogram)
    watch, error = _outcome(
        gradwatch.GradWatch, variables=variables, stats=stats, every=every, histogram=histogram
    )
    event("constructor: " + (f"invalid {sorted(errors)}" if errors else "valid"))
    if errors:
        _assert_one_of(error, errors)
        return
    assert error is None, repr(error)
    # Valid arguments are kept as given: patterns as a tuple, stats in order without
    # repeats, True as 4 bins per decade (the README's default), False as none.
    names = [stats] if isinstance(stats, str) else list(stats)
    assert watch.variables == tuple(_pattern_list(variables))
    assert watch.stats == tuple(dict.fromkeys(names))
    assert watch.every == every
    bins = 4 if histogram is True else 0 if histogram is False else histogram
    assert watch.histogram == bins
    assert watch.log.stat_names == watch.stats and len(watch.log) == 0
    assert watch.log.bins_per_decade == (bins or None)


# ----------------------------------------------------------------------- key lookups
KEYS = ["net/d/kernel", "net/d/bias", "net/d/kernel#1", "net/out/kernel"]
key_names = st.one_of(
    st.sampled_from(["d/bias", "out/kernel", "net/d/kernel#1", "kernel#1"]),
    names,
    st.sampled_from(["kernel", "d/kernel", "bias", "kernel#1", "out/kernel", "net/d/kernel", ""]),
    st.integers(),
    st.none(),
)


@FUZZ
@given(pattern=patterns, name=key_names)
@example(pattern="d*", name="d/kernel")  # `d/kernel#1` ends with `d/kernel#1`, not `/d/kernel`
@example(pattern=["*1", re.compile("^net/out")], name="kernel")  # ambiguous
def test_fuzz_key_lookups(pattern, name):
    expected, errors = _matched(pattern, KEYS, "variables")
    got, error = _outcome(match_patterns, pattern, KEYS, "variables")
    event("match_patterns: " + ("invalid" if errors else "valid"))
    if errors:
        _assert_one_of(error, errors)
    else:
        assert error is None, repr(error)
        assert got == expected
    expected, kind = _resolved(name, KEYS)
    got, error = _outcome(resolve_key, name, KEYS)
    event("resolve_key: " + ("valid" if kind is None else kind.__name__))
    if kind is None:
        assert error is None, repr(error)
        assert got == expected
    else:
        _assert_raised(error, kind, repr(name) if kind is KeyError else "variable")


# ------------------------------------------------------------------------ log queries
select_stats = st.one_of(
    st.none(),
    st.sampled_from(["norm", "max", "bogus"]),
    st.lists(st.sampled_from(["norm", "abs_max", "x"]), max_size=2),
    st.integers(),
)
any_step = st.one_of(st.integers(0, 5), st.integers(-2, 8), st.text(max_size=2), st.none())
variable_names = st.one_of(
    st.sampled_from(["out/kernel", "net/out/bias", "out/bias", "hidden/kernel", "hidden/bias"]),
    st.sampled_from(["kernel", "bias", "hidden", "out/kernel#1", "net/out/bias/x", ""]),
    names,
    st.integers(),
)
stat_names = st.one_of(
    st.sampled_from(README_STATS), st.sampled_from(["nrm", "grad", "hist"]), names, st.integers()
)


def _select_oracle(log, variables, stats, steps):
    """`(the rows of log.frame that a pandas filter keeps, {argument: error} if invalid)`."""
    frame = log.frame
    keep = np.ones(len(frame), bool)
    errors = {}
    if variables is not None:
        keys, errors = _matched(variables, log.variables, "variables")
        if keys is not None:
            keep &= frame["variable"].astype(str).isin(keys).to_numpy()
    if stats is not None:
        chosen = [stats] if isinstance(stats, str) else stats
        if not isinstance(chosen, (list, tuple)):
            errors["stats"] = (TypeError, "`stats`")
        elif any(s not in log.stat_names for s in chosen):
            errors["stats"] = (KeyError, "was not recorded")
        else:
            keep &= frame["stat"].astype(str).isin(chosen).to_numpy()
    if steps is not None:
        step = frame["step"].to_numpy()
        if isinstance(steps, slice):
            # "slice(start, stop, every) over step numbers, half-open as in Python": the
            # steps in range(start, stop, every), start 0 when left out.
            start = 0 if steps.start is None else steps.start
            stop = max(step.max(initial=0), start) + 1 if steps.stop is None else steps.stop
            if steps.step is not None and steps.step < 1:
                errors["steps"] = (ValueError, "steps=")
            else:
                keep &= np.isin(step, list(range(start, stop, steps.step or 1)))
        elif isinstance(steps, int) and not isinstance(steps, bool):
            keep &= step == steps
        elif isinstance(steps, (list, tuple)) and all(
            isinstance(s, int) and not isinstance(s, bool) for s in steps
        ):
            keep &= np.isin(step, list(steps))
        else:  # a string is not a list of steps, not even the empty one
            errors["steps"] = (TypeError, "steps=")
    return frame[keep].reset_index(drop=True), errors


def _lookup_error(log, name, step, kept):
    """`(the key, None)` where `name` names a variable whose `kept` data has `step`; else
    `(key or None, (error type, text its message must hold))`, from the README's errors."""
    key, kind = _resolved(name, log.variables)
    if kind is TypeError:
        return None, (TypeError, "variable")
    if kind is KeyError:  # no such key, or an ambiguous suffix: the name is quoted
        return None, (KeyError, repr(name))
    if key not in kept:
        return key, (KeyError, "was not kept")
    if not _recorded_step(step, log.steps):
        return key, (KeyError, f"Step {step!r}")
    return key, None


def _check_gradient(log, model, name, step):
    key, expected_error = _lookup_error(log, name, step, ["net/out/kernel", "net/out/bias"])
    got, error = _outcome(log.gradient, name, step)
    event("gradient: " + ("valid" if expected_error is None else expected_error[0].__name__))
    if expected_error is not None:
        _assert_raised(error, *expected_error)
        return
    assert error is None, repr(error)
    shapes = {w.path: tuple(w.shape) for w in model.trainable_weights}
    assert got.shape == shapes[key] and got.dtype == np.float32
    # The kept tensor and the stats computed in the step agree (NumPy on the one).
    recorded = log.frame[(log.frame["step"] == step) & (log.frame["variable"] == key)]
    recorded = dict(zip(recorded["stat"].astype(str), recorded["value"], strict=True))
    for stat, value in np_stats(got).items():
        assert recorded[stat] == pytest.approx(value, rel=1e-5, abs=1e-7), stat


def _check_histogram(log, name, step):
    # Every variable has histograms (histogram=True).
    key, expected_error = _lookup_error(log, name, step, log.variables)
    got, error = _outcome(log.histogram, name, step)
    if expected_error is not None:
        _assert_raised(error, *expected_error)
        return
    assert error is None, repr(error)
    assert list(got.columns) == ["lo", "hi", "sign", "count"]
    assert len(got) == 2 * 16 * 4 + 2  # 4 bins per decade, each sign, zeros, non-finite
    assert got["count"].sum() == int(np.prod(log.shapes[key]))
    if key.startswith("net/out/"):  # kept: the reference binning of the tensor itself
        expected = reference_bins(log.gradient(key, step), 4)
        np.testing.assert_array_equal(got["count"].to_numpy(), expected)


def _check_stat_views(log, name):
    recorded = isinstance(name, str) and name in README_STATS  # the fixture records all
    wide, error = _outcome(log.stat, name)
    event("stat: " + ("valid" if recorded else "invalid"))
    if not recorded:
        _assert_raised(error, KeyError, "was not recorded")
    else:
        assert error is None, repr(error)
        # Row by row from the long frame: step down, variable across in model order.
        expected = np.full((6, 4), np.nan, np.float32)
        frame = log.frame[log.frame["stat"] == name]
        for row in frame.itertuples():
            expected[row.step, log.variables.index(row.variable)] = row.value
        assert list(wide.columns) == log.variables
        np.testing.assert_array_equal(wide.index, np.arange(6))
        np.testing.assert_array_equal(wide.to_numpy(), expected)
    layers, error = _outcome(log.by_layer, name)
    if not recorded:
        _assert_raised(error, KeyError, "was not recorded")
        return
    if SPECS[name].pool is None:  # does not combine per layer (cos_prev, update_cos): refused
        _assert_raised(error, ValueError, name)
        return
    assert error is None, repr(error)
    assert list(layers.columns) == ["net/hidden", "net/out"]
    np.testing.assert_array_equal(layers.index, np.arange(6))
    if name in GRADIENT_STATS:
        # Layer net/out's gradients are kept: its stats as if they were one tensor.
        for step in range(6):
            g = np.concatenate([log.gradient(k, step).ravel() for k in ("out/kernel", "out/bias")])
            expected = np_stats(g)[name]
            got = layers.loc[step, "net/out"]
            assert got == pytest.approx(expected, rel=1e-4, abs=1e-6), (step, name)


@FUZZ
@given(
    variables=mostly(
        st.one_of(st.none(), st.sampled_from(["out*", "*kernel", "hidden/*", "net/*/bias"])),
        patterns,
    ),
    stats=mostly(st.none(), select_stats),
    step_sel=mostly(
        st.one_of(
            st.none(),
            st.builds(slice, *[st.one_of(st.none(), st.integers(-3, 10))] * 2, st.integers(1, 4)),
            st.lists(st.integers(-1, 7), max_size=4),
        ),
        steps,
    ),
    name=variable_names,
    step=any_step,
    stat=stat_names,
)
@example(
    variables="out*", stats="norm", step_sel=slice(1, 6, 2), name="out/bias", step=3, stat="norm"
)
@example(
    variables=None, stats=None, step_sel=slice(None, None, 2), name="kernel", step=0, stat="std"
)
@example(variables=None, stats=[], step_sel="", name="out/kernel", step="1", stat="cos_prev")
@example(
    variables=[re.compile("bias$")],
    stats=None,
    step_sel=[],
    name="out/bias",
    step=5,
    stat="zero_frac",
)
def test_fuzz_log_queries(fitted, variables, stats, step_sel, name, step, stat):
    watch, model, _, _ = fitted
    log = watch.log
    expected, errors = _select_oracle(log, variables, stats, step_sel)
    out, error = _outcome(log.select, variables=variables, stats=stats, steps=step_sel)
    event("select: " + (f"invalid {sorted(errors)}" if errors else "valid"))
    if errors:
        _assert_one_of(error, errors)
    else:
        assert error is None, repr(error)
        assert list(out.columns) == ["step", "epoch", "batch", "variable", "stat", "value"]
        pd.testing.assert_frame_equal(out, expected)
    _check_gradient(log, model, name, step)
    _check_histogram(log, name, step)
    _check_stat_views(log, stat)


# ----------------------------------------------------------------------- read_log
HEADER = (
    b'# gradwatch-log {"format": "gradwatch-log", "version": 1, "variables": ["a"], '
    b'"stats": ["norm"], "shapes": {"a": [2]}}\n'
)


@FUZZ
@given(
    source=st.one_of(
        st.sampled_from(["csv", "parquet"]),
        st.tuples(
            st.sampled_from([b"", b"PAR1", b"# gradwatch-log ", HEADER, HEADER + b"step,epoch\n"]),
            st.binary(max_size=300),
        ),
    )
)
@example(source="csv")
@example(source="parquet")
def test_fuzz_read_log_on_arbitrary_files(fitted, tmp_path, source):
    path = tmp_path / "fuzz.bin"
    log = fitted[0].log
    event(f"read_log: {source}" if isinstance(source, str) else "read_log: not a log")
    if isinstance(source, str):
        # A whole log, in either format: read back equal, whatever the file's name.
        getattr(log, f"to_{source}")(path)
        back, error = _outcome(gradwatch.read_log, path)
        assert error is None, repr(error)
        assert back == log
        return
    prefix, content = source
    path.write_bytes(prefix + content)
    # None of these is a gradwatch log: no column line after a header, a Parquet magic
    # with no valid file behind it (300 bytes hold no footer of one), or random bytes. The
    # README: `ValueError` saying what is missing; the file is readable, so no OSError.
    _, error = _outcome(gradwatch.read_log, path)
    _assert_raised(error, ValueError, str(path))


@pytest.mark.parametrize("bad", [None, 3, b"x", ["a"]])
def test_read_log_rejects_non_paths(bad):
    with pytest.raises(TypeError, match="`path` must be"):
        gradwatch.read_log(bad)
