import math

import keras
import numpy as np
import pandas as pd
import pytest
from keras import ops
from models import data, pair
from reference import (
    BACKEND,
    batches_of,
    mse,
    np_stats,
    reference_bins,
    tape_gradients,
    tf_only,
)

import gradwatch
from gradwatch import stats as S
from gradwatch._logdata.views import by_layer
from gradwatch._stats.specs import REDUCTIONS, SPECS, Kernel, StatSpec


@pytest.mark.backends
def test_stats_hand_computed_values():
    g = np.array([3.0, -4.0, 0.0, 0.0])
    out = np.asarray(S.compute_stats([g], list(S.GRADIENT_STATS)))[0]
    got = dict(zip(S.GRADIENT_STATS, out.tolist(), strict=True))
    # norm = sqrt(9 + 16) = 5; mean = -1/4; std = sqrt(((3.25)^2 + (3.75)^2 + 2*(0.25)^2)/4)
    assert got["norm"] == pytest.approx(5.0)
    assert got["mean"] == pytest.approx(-0.25)
    assert got["std"] == pytest.approx(math.sqrt((3.25**2 + 3.75**2 + 2 * 0.25**2) / 4))
    assert got["min"] == -4.0
    assert got["max"] == 3.0
    assert got["abs_max"] == 4.0
    assert got["nonfinite"] == 0.0
    assert got["zero_frac"] == 0.5


@pytest.mark.backends
def test_stats_nonfinite_elements_are_excluded_from_moments():
    g = np.array([1.0, 3.0, np.nan, np.inf, -np.inf])
    got = dict(
        zip(
            S.GRADIENT_STATS,
            np.asarray(S.compute_stats([g], list(S.GRADIENT_STATS)))[0].tolist(),
            strict=True,
        )
    )
    assert got["norm"] == pytest.approx(math.sqrt(10.0))
    assert got["mean"] == pytest.approx(2.0)
    assert got["std"] == pytest.approx(1.0)
    assert got["min"] == -np.inf
    assert got["max"] == np.inf
    assert got["abs_max"] == np.inf
    assert got["nonfinite"] == 3.0
    assert got["zero_frac"] == 0.0


@pytest.mark.backends
def test_stats_zero_frac_counts_all_elements_when_some_are_nonfinite():
    # 2 exact zeros among 5 elements, 2 of them non-finite: zero_frac = 2/5, not 2/3
    # (the zeros over the finite elements only). Also one row of a stacked group.
    g = np.array([0.0, np.nan, 0.0, np.inf, 2.0], "float32")
    others = [np.array([1.0, 0.0, -1.0, 3.0, 4.0], "float32"), np.array([0.0, 0.0], "float32")]
    out = np.asarray(S.compute_stats([g, *others], ["zero_frac", "nonfinite", "mean"]))
    assert out[0].tolist() == pytest.approx([0.4, 2.0, 2.0 / 3.0])
    assert out[1].tolist() == pytest.approx([0.2, 0.0, 7.0 / 5.0])
    assert out[2].tolist() == pytest.approx([1.0, 0.0, 0.0])


@pytest.mark.backends
def test_stats_all_nan_and_empty_tensors():
    out = np.asarray(
        S.compute_stats(
            [np.full(3, np.nan), np.zeros((0, 4)), np.array([np.inf, -np.inf, np.nan])],
            list(S.GRADIENT_STATS),
        )
    )
    all_nan = dict(zip(S.GRADIENT_STATS, out[0].tolist(), strict=True))
    # No finite element: the norm is NaN (a norm of 0 would read as a vanishing gradient).
    assert all_nan["nonfinite"] == 3.0
    for name in ("norm", "mean", "std", "min", "max", "abs_max"):
        assert math.isnan(all_nan[name]), name
    none_finite = dict(zip(S.GRADIENT_STATS, out[2].tolist(), strict=True))
    assert math.isnan(none_finite["norm"]) and none_finite["nonfinite"] == 3.0
    assert none_finite["min"] == -np.inf and none_finite["max"] == np.inf
    assert math.isnan(S.norm(np.full((2, 2), np.nan)))
    empty = dict(zip(S.GRADIENT_STATS, out[1].tolist(), strict=True))
    assert empty["norm"] == 0.0 and empty["nonfinite"] == 0.0
    for name in ("mean", "std", "min", "max", "abs_max", "zero_frac"):
        assert math.isnan(empty[name])


@pytest.mark.backends
def test_stats_none_gives_a_nan_row_and_keeps_the_order():
    out = np.asarray(S.compute_stats([np.array([2.0]), None, np.array([-1.0, 1.0])], ["norm"]))
    assert out[0, 0] == pytest.approx(2.0)
    assert math.isnan(out[1, 0])
    assert out[2, 0] == pytest.approx(math.sqrt(2.0))


@pytest.mark.parametrize("seed", range(5))
@pytest.mark.backends
def test_stats_fused_equal_numpy_reference_on_random_tensors(seed):
    rng = np.random.default_rng(seed)
    shapes = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (1, 1)]
    tensors = []
    for shape in shapes:
        t = rng.normal(scale=10.0 ** rng.integers(-6, 4), size=shape).astype(np.float32)
        if t.size > 2:
            flat = t.reshape(-1)
            flat[rng.integers(0, t.size)] = rng.choice([np.nan, np.inf, -np.inf, 0.0])
        tensors.append(t)
    _assert_match_numpy(S.compute_stats(tensors, list(S.GRADIENT_STATS)), tensors)


def _assert_match_numpy(out, tensors):
    for row, t in zip(np.asarray(out), tensors, strict=True):
        ref = np_stats(t)
        # float32: the error scales with the largest finite magnitude, not the result.
        finite = t[np.isfinite(t)]
        scale = float(np.abs(finite).max()) if finite.size else 0.0
        for j, name in enumerate(S.GRADIENT_STATS):
            np.testing.assert_allclose(
                row[j], ref[name], rtol=1e-5, atol=1e-6 * scale + 1e-30, err_msg=name
            )


@pytest.mark.backends
def test_stats_half_precision_inputs_are_computed_in_float32():
    # Every element is exact in float16 (spacing 32 above 32768), but float16 arithmetic
    # would overflow (max 65504): sum 120000, sum of squares 4.928e9 -> inf.
    big = np.array([32000.0, 40000.0, 48000.0], dtype=np.float16)
    # float16(1e-4) = 1.0001659393310547e-4 exactly; its square (1.0003e-8) is below
    # float16's smallest subnormal (5.96e-8), so float16 would give norm 0.
    small = np.full(16, 1e-4, dtype=np.float16)
    out = np.asarray(S.compute_stats([big, small], ["norm", "mean", "std"]), np.float64)
    # By hand: norm = sqrt(1.024e9 + 1.6e9 + 2.304e9) = sqrt(4.928e9); mean = 120000 / 3;
    # std = sqrt((8000**2 + 0 + 8000**2) / 3) = 8000 * sqrt(2 / 3).
    assert out[0, 0] == pytest.approx(math.sqrt(4.928e9), rel=1e-6)
    assert out[0, 1] == pytest.approx(40000.0, rel=1e-6)
    assert out[0, 2] == pytest.approx(8000.0 * math.sqrt(2 / 3), rel=1e-4)
    # norm = sqrt(16 * v**2) = 4 * v; std 0 (all equal).
    v = 1.0001659393310547e-4
    assert float(small[0]) == v
    assert out[1, 0] == pytest.approx(4 * v, rel=1e-6)
    assert out[1, 1] == pytest.approx(v, rel=1e-6)
    assert out[1, 2] == pytest.approx(0.0, abs=1e-9)
    assert S.norm(big) == pytest.approx(math.sqrt(4.928e9), rel=1e-6)


def test_check_stats_unknown_name_is_keras_style_error():
    with pytest.raises(
        ValueError, match=r"Unknown stat 'nrm' in `stats`.*Received: stats=\['nrm'\]"
    ):
        S.check_stats(["nrm"])


@pytest.mark.parametrize("bad", [3, [1, 2], None, b"norm"])
def test_check_stats_wrong_type(bad):
    with pytest.raises(TypeError, match="`stats` must be"):
        S.check_stats(bad)


def test_check_stats_empty_and_duplicates():
    with pytest.raises(ValueError, match="at least one stat"):
        S.check_stats([])
    assert S.check_stats(["max", "norm", "max"]) == ("max", "norm")


def _random_tensors(rng, case):
    """Tensors of many shapes (scalars, empty, small ones of one size, rows wider than
    1024, one above the stacking size). "one-pass": zero-mean, finite, and no single
    elements (they have no spread), so the one-pass results stand; "dominant mean" and
    "nonfinite" (offsets on about half the tensors) take the exact path."""
    shapes = [(), (0,), (1,), (7,), (3, 5), (2, 3, 4), (1, 1), (7,), (130, 130), (40, 40), (1600,)]
    if case == "one-pass":
        shapes = [s for s in shapes if int(np.prod(s)) != 1]
    tensors = []
    for shape in shapes:
        t = rng.normal(scale=10.0 ** rng.integers(-6, 4), size=shape)
        if case != "one-pass" and rng.random() < 0.5:
            t = t + rng.normal() * 10.0 ** rng.integers(0, 4) * np.abs(t).max(initial=1.0)
        t = t.astype(np.float32)
        if case == "nonfinite" and t.size > 2:
            # A zero too: zero_frac must count over all elements, non-finite included.
            at = rng.choice(t.size, size=2, replace=False)
            t.reshape(-1)[at] = [rng.choice([np.nan, np.inf, -np.inf]), 0.0]
        tensors.append(t)
    return tensors


def _stats_function(jit):
    """`compute_stats` of all gradient stats as the backend runs it in a step."""
    if BACKEND == "tensorflow":
        import tensorflow as tf

        step = tf.function(lambda ts: S.compute_stats(ts, S.GRADIENT_STATS), jit_compile=jit)
        return lambda ts: step([tf.constant(t) for t in ts])
    if BACKEND == "torch" and jit:
        pytest.skip("on PyTorch the stats are computed outside torch.compile")
    step = lambda ts: S.compute_stats(ts, S.GRADIENT_STATS)  # noqa: E731
    if BACKEND == "jax" and jit:
        import jax

        step = jax.jit(step)
    return lambda ts: step([ops.convert_to_tensor(t) for t in ts])


@pytest.mark.parametrize("jit", [False, True])
@pytest.mark.parametrize("case", ["one-pass", "dominant mean", "nonfinite"])
@pytest.mark.backends
def test_stats_fast_and_exact_paths_equal_numpy_reference(case, jit):
    # Three seeds through one traced (and compiled) function: the shapes are the seeds'.
    stats_of = _stats_function(jit)
    for seed in range(3):
        rng = np.random.default_rng(100 + seed)
        tensors = _random_tensors(rng, case)
        _assert_match_numpy(stats_of(tensors), tensors)


def _sparse_case(case, rng):
    """(values, indices, table shape) of an IndexedSlices gradient."""
    shape = (9, 3)
    if case == "empty":
        return np.zeros((0, 3), "float32"), np.zeros((0,), "int32"), shape
    indices = {
        "repeats": np.array([4, 1, 4, 7, 1, 4], "int32"),
        "every row": np.array([*range(9), 2, 0], "int32")[::-1].copy(),
        "nonfinite": np.array([5, 2, 5], "int32"),
        "a row nan": np.array([5, 2, 5, 7], "int32"),
        "touched rows nan": np.array([5, 2, 5], "int32"),
        "every row nan": np.array([*range(9), 4], "int32"),
    }[case]
    values = rng.normal(size=(len(indices), 3)).astype("float32")
    if case == "nonfinite":
        values[0, 1], values[2, 2] = np.nan, -np.inf
    if case == "a row nan":  # row 2 wholly NaN, row 5 NaN in one repeat: NaN where summed
        values[1], values[2, 0] = np.nan, np.nan
    if case in ("touched rows nan", "every row nan"):
        values[:] = np.nan
    return values, indices, shape


@tf_only  # sparse gradients (IndexedSlices) are TensorFlow's
@pytest.mark.parametrize("mode", ["eager", "graph", "xla"])
@pytest.mark.parametrize(
    "case",
    [
        "repeats",
        "every row",
        "nonfinite",
        "empty",
        "a row nan",
        "touched rows nan",  # the untouched rows' zeros are finite: norm 0, not NaN
        "every row nan",  # no finite element: norm, mean, min, ... NaN
    ],
)
@pytest.mark.backends
def test_sparse_gradient_stats_equal_those_of_the_dense_gradient(case, mode):
    import tensorflow as tf

    from gradwatch.sparse import SparseGradient

    values, indices, shape = _sparse_case(case, np.random.default_rng(0))
    # The reference: the dense gradient, repeated rows added up in float64.
    dense = np.zeros(shape)
    np.add.at(dense, indices, values.astype(np.float64))

    def run(v, i):
        g = SparseGradient.from_indexed_slices(tf.IndexedSlices(v, i), shape)
        return (
            S.compute_stats([g, None, g], list(S.GRADIENT_STATS)),
            S.compute_histograms([g], 2),
            g.dense(),
        )

    if mode != "eager":
        run = tf.function(run, jit_compile=mode == "xla")
    table, hist, back = (np.asarray(t) for t in run(tf.constant(values), tf.constant(indices)))
    expected = np_stats(dense)
    for j, name in enumerate(S.GRADIENT_STATS):
        assert table[0, j] == pytest.approx(expected[name], rel=1e-5, abs=1e-7, nan_ok=True), name
    np.testing.assert_array_equal(table[0], table[2])
    assert np.isnan(table[1]).all()
    # The histogram of the dense gradient, binned one element at a time (untouched rows
    # are zeros, in the "0" bin).
    np.testing.assert_array_equal(hist[0], reference_bins(dense, 2))
    np.testing.assert_allclose(back, dense, rtol=1e-6)


# ------------------------------------------------------------------ the stat specs
def test_specs_are_the_one_source_of_the_public_catalogue():
    assert list(S.STATS) == list(SPECS)
    assert {name: spec.doc for name, spec in SPECS.items()} == S.STATS
    assert tuple(n for n, spec in SPECS.items() if spec.kernel is not None) == S.GRADIENT_STATS
    assert tuple(n for n, spec in SPECS.items() if "weights" in spec.needs) == S.UPDATE_STATS
    for name, spec in SPECS.items():
        assert spec.name == name
        # A stat is computed from the gradient alone (a kernel) or from what it needs.
        assert (spec.kernel is None) == bool(spec.needs), name
        assert spec.needs <= {"weights", "optimizer", "previous", "optimizer_state"}, name
        assert set(spec.pool_reads) <= set(SPECS), name
        if spec.kernel is not None:
            assert set(spec.kernel.reads) <= set(REDUCTIONS), name


def _layer_by_numpy(name, tensors, weights=None, updates=None):
    """`name` of the layer's tensors taken together as one, in NumPy."""
    joined = np.concatenate([t.ravel() for t in tensors]).astype(np.float64)
    if name in np_stats(joined):
        return np_stats(joined)[name]
    if name in ("weight_norm", "update_norm", "update_ratio"):
        w = np.linalg.norm(np.concatenate([t.ravel() for t in weights]))
        up = np.linalg.norm(np.concatenate([t.ravel() for t in updates]))
        return {"weight_norm": w, "update_norm": up, "update_ratio": up / w}[name]
    # The optimizer health stats, with the weights standing in for the second moment
    # (g**2 / w**2) and for the denominator's term (|w| < 1): the pooling is what is tested.
    if name == "v_ratio":
        return max(float(np.max(g**2 / w**2)) for g, w in zip(tensors, weights, strict=True))
    if name == "eps_frac":
        return float(np.mean(np.abs(np.concatenate([w.ravel() for w in weights])) < 1.0))
    return float(np.linalg.norm(joined))  # clipped_norm: the norm of the clipped tensors


def test_spec_pools_equal_numpy_on_the_layer_as_one_tensor():
    # Two layers of variables of several sizes, with exact zeros, over three steps.
    rng = np.random.default_rng(3)
    keys = ["m/a/kernel", "m/a/bias", "m/b/kernel", "m/b/gamma", "m/b/bias"]
    shapes = [(4, 3), (3,), (3, 5), (5,), (5,)]
    steps = []
    for _ in range(3):
        step = {}
        for kind in ("grad", "weight", "update"):
            step[kind] = [rng.normal(size=s) * 10.0 ** rng.integers(-3, 3) for s in shapes]
        step["grad"][1][:2] = 0.0
        steps.append(step)
    sizes = pd.Series({k: float(np.prod(s)) for k, s in zip(keys, shapes, strict=True)})

    def per_variable(name):
        rows = []
        for step in steps:
            row = []
            for j in range(len(keys)):
                one = _layer_by_numpy(
                    name, [step["grad"][j]], [step["weight"][j]], [step["update"][j]]
                )
                row.append(one)
            rows.append(row)
        return pd.DataFrame(rows, columns=keys, dtype=np.float64)

    layers = {"m/a": [0, 1], "m/b": [2, 3, 4]}
    for name, spec in SPECS.items():
        if spec.pool is None:
            assert name in ("cos_prev", "update_cos")  # no pooling from per-variable values
            continue
        table = by_layer(per_variable(name), sizes, name, per_variable)
        assert list(table.columns) == list(layers), name
        for i, step in enumerate(steps):
            for layer, idx in layers.items():
                expected = _layer_by_numpy(
                    name,
                    [step["grad"][j] for j in idx],
                    [step["weight"][j] for j in idx],
                    [step["update"][j] for j in idx],
                )
                assert table.loc[i, layer] == pytest.approx(expected, rel=1e-9), (name, layer)


class _WithEmpty(keras.layers.Layer):
    """A layer whose one variable has no elements: its gradient is an empty tensor."""

    def build(self, shape):
        self.nothing = self.add_weight(shape=(0, 2), initializer="zeros", name="nothing")

    def call(self, x):
        return x + ops.sum(self.nothing)


# Each stat of an empty tensor, written out in NumPy from its definition.
_EMPTY = np.zeros((0, 2))
with np.errstate(invalid="ignore"):
    NUMPY_EMPTY = {
        **np_stats(_EMPTY),
        "weight_norm": float(np.linalg.norm(_EMPTY)),
        "update_norm": float(np.linalg.norm(_EMPTY - _EMPTY)),
        "update_ratio": 0.0,  # no update is a ratio of 0 (docs/reference.md), not 0 / 0
        "cos_prev": float(np.sum(_EMPTY * _EMPTY) / (np.linalg.norm(_EMPTY) ** 2)),
        "clipped_norm": float(np.linalg.norm(np.clip(_EMPTY, -1.0, 1.0))),
        # The largest of no ratios, a share of no elements, a cosine of 0 / 0.
        "v_ratio": math.nan,
        "eps_frac": float(np.sum(_EMPTY < 1.0) / _EMPTY.size),
        "update_cos": float(np.sum(_EMPTY * _EMPTY) / (np.linalg.norm(_EMPTY) ** 2)),
    }


@pytest.mark.backends
def test_spec_empty_values_are_what_an_empty_variable_records_and_numpy_says():
    assert set(NUMPY_EMPTY) == set(SPECS)
    inputs = keras.Input((3,))
    outputs = keras.layers.Dense(1, name="out")(_WithEmpty(name="e")(inputs))
    model = keras.Model(inputs, outputs)
    model.compile(keras.optimizers.SGD(0.1, clipnorm=1.0), "mse")
    watch = gradwatch.GradWatch(stats=list(SPECS), verbose=0)
    x, y = data(n=8, features=3, outputs=1)
    model.fit(x, y, batch_size=4, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    (key,) = [k for k in watch.log.variables if k.endswith("e/nothing")]
    for name, spec in SPECS.items():
        np.testing.assert_equal(spec.empty, NUMPY_EMPTY[name], err_msg=name)
        recorded = watch.log.stat(name)[key].to_numpy(np.float64)
        np.testing.assert_equal(recorded, np.full(2, spec.empty), err_msg=name)


@pytest.fixture
def rms_registered(monkeypatch):
    """A stat that gradwatch does not have, added as one entry of the registry: the root
    mean square of the finite elements, pooled over a layer as that of its elements."""

    def pool(values, sizes, other):
        return np.sqrt((values**2 * sizes).sum(axis=1, min_count=1) / sizes.sum())

    def exact(q, m):
        mean_square = q["sum_sq"] / m.maximum(q["n_finite"], 1.0)
        return m.where(q["n_finite"] == 0, math.nan, m.sqrt(mean_square))

    spec = StatSpec(
        "rms",
        "Root mean square of the finite elements: sqrt(sum(g_i**2) / n_finite).",
        Kernel(("sq",), lambda r, size, m: m.sqrt(r["sq"] / size), exact),
        pool,
    )
    monkeypatch.setitem(SPECS, "rms", spec)
    return spec


def _rms(g):
    g = np.asarray(g, np.float64).ravel()
    finite = g[np.isfinite(g)]
    return float(np.sqrt(np.mean(finite**2))) if finite.size else math.nan


@pytest.mark.backends
def test_a_stat_added_to_the_registry_alone_is_recorded_pooled_and_computed(rms_registered):
    x, y = data(n=16)
    model, plain = pair()
    model.compile(keras.optimizers.SGD(0.1), "mse")
    watch = gradwatch.GradWatch(stats=["norm", "rms"], verbose=0)
    model.fit(x, y, batch_size=8, epochs=1, shuffle=False, callbacks=[watch], verbose=0)
    grads = tape_gradients(plain, keras.optimizers.SGD(0.1), batches_of(x, y, 8), mse)
    log = watch.log
    rms, layers = log.stat("rms"), log.by_layer("rms")
    assert list(rms.index) == [0, 1]
    assert list(layers.columns) == ["net/hidden", "net/out"]
    for step, g in enumerate(grads):
        for j, key in enumerate(log.variables):
            assert rms.loc[step, key] == pytest.approx(_rms(g[j]), rel=1e-5), key
        for layer, idx in (("net/hidden", [0, 1]), ("net/out", [2, 3])):
            joined = np.concatenate([g[i].ravel() for i in idx])
            assert layers.loc[step, layer] == pytest.approx(_rms(joined), rel=1e-5), layer
    # The exact path (a NaN in the step) and the empty value, computed directly.
    tensors = [np.array([3.0, np.nan, -4.0], "float32"), np.array([1.0, 2.0], "float32")]
    out = np.asarray(S.compute_stats([*tensors, np.zeros(0, "float32")], ["rms", "nonfinite"]))
    np.testing.assert_allclose(out[:2, 0], [_rms(tensors[0]), _rms(tensors[1])], rtol=1e-6)
    assert math.isnan(out[2, 0]) and out[:, 1].tolist() == [1.0, 0.0, 0.0]


@pytest.mark.backends
def test_stats_total_sum_of_squares_of_many_small_tensors():
    # The spike judge's global norm: one call over all gradients (PyTorch: one
    # `torch._foreach_norm`), against NumPy in float64, over 504 small tensors of
    # two sizes and a large one, as the benchmarks' many-variable model has.
    from gradwatch._stats.compute import total_sum_of_squares

    rng = np.random.default_rng(3)
    arrays = [rng.standard_normal(s).astype("float32") for s in [(16, 4), (4,)] * 252]
    arrays.append(rng.standard_normal((300, 70)).astype("float32") * 1e3)
    expected = sum(float(np.sum(a.astype(np.float64) ** 2)) for a in arrays)
    got = total_sum_of_squares([ops.convert_to_tensor(a) for a in arrays])
    assert tuple(got.shape) == ()
    np.testing.assert_allclose(float(ops.convert_to_numpy(got)), expected, rtol=1e-5)
