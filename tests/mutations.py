"""A mutation check: plausible bugs, put into a copy of gradwatch one at a time, each of
which the tests named beside it must catch.

    python tests/mutations.py            # every mutation; exits 1 if one survives
    python tests/mutations.py --list     # the mutations and their tests
    python tests/mutations.py zero-frac-over-finite global-clipnorm-over-all-optimizers

Each mutation is a replacement of a text that occurs exactly once in its file. When a
refactor moves the code, the script says which text it no longer finds: point the
mutation at the code's new home, keep the bug the same, and run it again. Run it with
the environment the tests use (`.venv/bin/python tests/mutations.py`).
"""

from __future__ import annotations

import argparse
import os
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


@dataclass(frozen=True)
class Mutation:
    name: str
    bug: str
    file: str
    old: str
    new: str
    tests: tuple[str, ...]


# The tests of issue #26's mutations, named once.
TWICE = "tests/test_custom_steps.py::test_patterns_select_every_update_of_a_variable_updated_twice"
RATE = (
    "tests/test_custom_steps.py::"
    "test_scalars_learning_rate_of_a_two_optimizer_step_is_the_first_optimizers"
)
SPARSE_NAN = (
    "tests/test_callback.py::"
    "test_sparse_embedding_gradient_with_nan_rows_has_the_stats_of_the_dense_one"
)
GLOBAL_NORM = (
    "tests/test_diagnose.py::"
    "test_global_norm_leaves_out_a_step_with_no_finite_element_in_the_log_and_the_doctor"
)
RENUMBER = (
    "tests/test_callback.py::"
    "test_kept_tensors_and_histograms_stay_with_their_variable_when_the_trainable_set_grows"
)


MUTATIONS = (
    Mutation(
        "zero-frac-over-finite",
        "`zero_frac` divides by the finite elements instead of all elements",
        "gradwatch/_stats/specs.py",
        'lambda q, m: q["n_zero"] / q["n"],',
        'lambda q, m: q["n_zero"] / _safe_n(q, m),',
        ("tests/test_stats.py",),
    ),
    Mutation(
        "per-replica-not-unscaled",
        "`per_replica` stats are not divided by the loss scale",
        "gradwatch/_stats/derived.py",
        "grads.append(_backend.unscaled_float32(entry.grad, entry.scale))",
        "grads.append(_backend.unscaled_float32(entry.grad))",
        (
            "tests/test_distributed.py::"
            "test_mirrored_per_replica_stats_under_a_loss_scale_are_of_the_unscaled_gradient",
        ),
    ),
    Mutation(
        "global-clipnorm-over-all-optimizers",
        "`global_clipnorm` of one optimizer is taken over the gradients of all optimizers",
        "gradwatch/_stats/derived.py",
        "gn = array_ops.sqrt(total[applies[key]])",
        "gn = array_ops.sqrt(sum(sq.values()))",
        (
            "tests/test_signals.py::"
            "test_clipped_norm_with_two_optimizers_clips_each_group_by_its_own_global_norm",
        ),
    ),
    Mutation(
        "one-optimizers-clipping-for-all",
        "the first optimizer's clipping is used for every variable",
        "gradwatch/_stats/derived.py",
        "        opt = optimizers[key]\n",
        "        opt = next(iter(optimizers.values()))\n",
        (
            "tests/test_signals.py::"
            "test_clipped_norm_with_two_optimizers_clips_each_group_by_its_own_global_norm",
        ),
    ),
    Mutation(
        "loss-scale-inner-clipping-ignored",
        "the clipping of a LossScaleOptimizer's inner optimizer is ignored",
        "gradwatch/_stats/derived.py",
        'optimizers[key] = getattr(optimizer, "inner_optimizer", optimizer)',
        "optimizers[key] = optimizer",
        ("tests/test_signals.py::test_clipped_norm_under_a_loss_scale_is_clipped_after_unscaling",),
    ),
    Mutation(
        "replicas-averaged-not-summed",
        "the global gradient under a strategy is the mean of the local ones, not their sum",
        "gradwatch/_backend/tensorflow.py",
        "context.all_reduce(tf.distribute.ReduceOp.SUM, [dense(records[k].grad) for k in keys])",
        "context.all_reduce(tf.distribute.ReduceOp.MEAN, [dense(records[k].grad) for k in keys])",
        (
            "tests/test_distributed.py::"
            "test_mirrored_records_the_global_gradient_of_a_single_device_run",
        ),
    ),
    Mutation(
        "loss-scale-not-divided",
        "gradients of a loss-scale optimizer are recorded scaled",
        "gradwatch/_backend/tensorflow.py",
        "x = tf.cast(x, tf.float32)\n        return x if scale is None else x / scale",
        "x = tf.cast(x, tf.float32)\n        return x",
        ("tests/test_mixin.py::test_mixed_precision_records_unscaled_gradients",),
    ),
    Mutation(
        "duplicate-keys-numbered-from-one",
        "the second variable of a path is keyed `#2` instead of `#1`",
        "gradwatch/keys.py",
        'keys.append(path if n == 0 else f"{path}#{n}")',
        'keys.append(path if n == 0 else f"{path}#{n + 1}")',
        ("tests/test_keys.py",),
    ),
    Mutation(
        "one-pass-guard-too-loose",
        "the one-pass variance stands where the mean dominates the spread",
        "gradwatch/_stats/specs.py",
        'm.square(r["sum"] / size) <= 16.0 * _fast_variance(r, size, m)',
        'm.square(r["sum"] / size) <= 1e12 * _fast_variance(r, size, m)',
        ("tests/test_stats.py",),
    ),
    Mutation(
        "std-with-bessel-correction",
        "`std` divides by n - 1 instead of n on the exact path",
        "gradwatch/_stats/specs.py",
        'm.sqrt(q["spread"] / _safe_n(q, m))',
        'm.sqrt(q["spread"] / m.maximum(q["n_finite"] - 1.0, 1.0))',
        ("tests/test_stats.py",),
    ),
    Mutation(
        "min-ignores-minus-inf",
        "`min` leaves out -Inf instead of only NaN",
        "gradwatch/_stats/kernels.py",
        '"min": ops.min(ops.where(notnan, x, math.inf), axis=1),',
        '"min": ops.min(ops.where(finite, x, math.inf), axis=1),',
        ("tests/test_stats.py",),
    ),
    Mutation(
        "histogram-edge-to-lower-bin",
        "a magnitude exactly on a bin edge falls in the bin below (`lo < |g| <= hi`)",
        "gradwatch/_stats/kernels.py",
        'j = g - 1 + ops.cast(safe >= ops.take(edges, g), "int32")',
        'j = g - 1 + ops.cast(safe > ops.take(edges, g), "int32")',
        ("tests/test_callback.py::test_histogram_bins_edges_zeros_nonfinite_and_extremes_exactly",),
    ),
    Mutation(
        "every-off-by-one",
        "with `every=N` the steps N*k + 1 are recorded instead of N*k",
        "gradwatch/_capture/in_step.py",
        "_backend.when(step % watch.every == 0, record, buffer.variables)",
        "_backend.when(step % watch.every == 1, record, buffer.variables)",
        ("tests/test_callback.py::test_every_records_only_multiples_and_matches_reference",),
    ),
    Mutation(
        "half-precision-computed-in-half",
        "float16 gradients are reduced in float16, which overflows and underflows",
        "gradwatch/_stats/compute.py",
        'flat = [ops.reshape(ops.cast(tensors[i], "float32"), (size,)) for i in rows]',
        "flat = [ops.reshape(ops.cast(tensors[i], "
        '"float16" if "16" in str(tensors[i].dtype) else "float32"), (size,)) for i in rows]',
        ("tests/test_stats.py::test_stats_half_precision_inputs_are_computed_in_float32",),
    ),
    Mutation(
        "step-slice-ignores-start",
        "`log.select(steps=slice(a, b, c))` counts its stride from 0 instead of from `a`",
        "gradwatch/log.py",
        "base = 0 if steps.start is None else steps.start",
        "base = 0",
        ("tests/test_fuzz.py::test_fuzz_log_queries",),
    ),
    Mutation(
        "histogram-100-refused",
        "`GradWatch(histogram=100)`, the documented maximum, is refused",
        "gradwatch/_capture/args.py",
        "if 1 <= histogram <= 100:",
        "if 1 <= histogram < 100:",
        ("tests/test_fuzz.py::test_fuzz_gradwatch_constructor",),
    ),
    Mutation(
        "histogram-rows-wrong-epoch",
        "the histogram rows of CSV and Parquet files carry the step as their epoch",
        "gradwatch/_logdata/frames.py",
        'parts["epoch"].append(b.epochs[i])',
        'parts["epoch"].append(b.steps[i])',
        ("tests/test_io.py::test_written_files_hold_the_fitted_runs_values_for_plain_readers",),
    ),
    Mutation(
        "skipped-steps-not-saved",
        "the steps a loss-scale optimizer skipped are lost in CSV and Parquet files",
        "gradwatch/_logdata/files.py",
        '"skipped": sorted(store.skipped),',
        '"skipped": [],',
        ("tests/test_alarms.py::test_skipped_steps_round_trip_through_files",),
    ),
    Mutation(
        "step-count-from-updates",
        "with gradient accumulation the step count starts at `iterations`, the updates",
        "gradwatch/_capture/counting.py",
        'counter = getattr(optimizer, "_iterations", None)',
        "counter = None",
        (
            "tests/test_accumulation.py::"
            "test_accumulation_resumed_after_load_model_continues_at_the_micro_step",
        ),
    ),
    Mutation(
        "applied-ignores-skipped",
        "a step whose update a loss-scale optimizer skipped counts as applied",
        "gradwatch/_capture/in_step.py",
        "applied = applied * (1 - _backend.float32(ops.not_equal(skipped, 0)))",
        "applied = applied * 1",
        (
            "tests/test_accumulation.py::"
            "test_accumulation_with_skipped_updates_applies_at_every_nth_micro_step_kept",
        ),
    ),
    # Issue #26: where the suite was thinnest.
    Mutation(
        "plan-several-updates-from-three",
        "a variable updated twice in a step gets one row: only 3 or more updates are kept apart",
        "gradwatch/_capture/plan.py",
        "counts = {k: int(n) for k, n in (counts or {}).items() if n > 1}",
        "counts = {k: int(n) for k, n in (counts or {}).items() if n > 2}",
        (TWICE,),
    ),
    Mutation(
        "plan-patterns-match-update-keys",
        "`variables=` patterns are matched against `key@n`, so a later update is not selected",
        "gradwatch/_capture/plan.py",
        "stat_index = [i for i, k in enumerate(own_keys) if k in stat_keys and floats[i]]",
        "stat_index = [i for i, k in enumerate(keys) if k in stat_keys and floats[i]]",
        (TWICE,),
    ),
    Mutation(
        "update-counts-off-by-one",
        "a variable's updates in a step are counted one short",
        "gradwatch/_capture/step.py",
        "                counts[var] = update + 1",
        "                counts[var] = update",
        (TWICE,),
    ),
    Mutation(
        "learning-rate-of-the-last-optimizer",
        "`log.scalars`' learning rate is that of the step's last optimizer, not its first",
        "gradwatch/_capture/counting.py",
        "    if scope.learning_rate is None:\n        first = optimizer or",
        "    if scope.learning_rate is None or optimizer is not None:\n"
        "        first = optimizer or",
        (RATE,),
    ),
    Mutation(
        "learning-rate-of-the-compiled-optimizer",
        "`log.scalars`' learning rate is `model.optimizer`'s, not the applying optimizer's",
        "gradwatch/_capture/counting.py",
        'first = optimizer or getattr(model, "optimizer", None)',
        'first = getattr(model, "optimizer", None) or optimizer',
        (RATE,),
    ),
    Mutation(
        "sparse-min-max-forget-untouched-zeros",
        "`min`/`max`/`abs_max` of a sparse gradient whose touched rows are all NaN are NaN, "
        "though the untouched rows are zeros",
        "gradwatch/_backend/tensorflow.py",
        '"n_notnan": ops.sum(ops.cast(notnan, "float32")) + zeros,',
        '"n_notnan": ops.sum(ops.cast(notnan, "float32")),',
        (SPARSE_NAN,),
    ),
    Mutation(
        "sparse-norm-nan-without-finite-touched-rows",
        "the `norm` of a sparse gradient whose touched rows are all NaN is NaN, not 0",
        "gradwatch/_backend/tensorflow.py",
        '"n_finite": n_finite,',
        '"n_finite": n_finite - zeros,',
        (SPARSE_NAN,),
    ),
    Mutation(
        "log-global-norm-of-no-norm-is-zero",
        "`log.global_norm()` and the doctor's global norm (one function) are 0, not NaN, "
        "at a step where no variable has a norm",
        "gradwatch/_logdata/views.py",
        "return np.where(has_norm, np.sqrt(squares.sum(axis=1)), np.nan)",
        "return np.sqrt(squares.sum(axis=1))",
        (GLOBAL_NORM,),
    ),
    Mutation(
        "chart-alert-layer-ignores-update",
        "the charts by layer mark an alert of `d/kernel@1` on the layer `d`, not `d@1`",
        "gradwatch/_ui/chart_parts.py",
        '{"step": alerts["step"], "name": [layer_of_key(k) for k in alerts["variable"]]}',
        '{"step": alerts["step"], "name": [k.rsplit("/", 1)[0] for k in alerts["variable"]]}',
        ("tests/test_plot.py::test_charts_by_layer_mark_the_nonfinite_layer_of_each_alert",),
    ),
    Mutation(
        "random-streams-shared-across-signatures",
        "the traced functions of two input signatures draw on one stream per op",
        "gradwatch/_backend/tensorflow.py",
        'key = (seed, seed2, repr(getattr(graph, "structured_input_signature", None)))',
        "key = (seed, seed2)",
        (
            "tests/test_any_model.py::"
            "test_stateful_random_streams_of_each_input_signature_go_on_as_without_the_watch",
        ),
    ),
    Mutation(
        "drain-one-execution-late",
        "the ring buffer is drained one execution too late, overwriting steps",
        "gradwatch/_capture/drain.py",
        "return (since_drain + 1) * steps_per_execution > limit",
        "return since_drain * steps_per_execution > limit",
        (
            "tests/test_callback.py::"
            "test_a_ring_buffer_of_two_executions_is_drained_before_it_overflows",
        ),
    ),
    Mutation(
        "renumber-forgets-kept-tensors",
        "when the trainable set grows, the kept tensors' blocks keep their old codes",
        "gradwatch/_logdata/store.py",
        "            *self._value_blocks,\n",
        "",
        (RENUMBER,),
    ),
    Mutation(
        "skip-keeps-earlier-updates",
        "with several optimizers in a step, an update applied before a later non-finite "
        "gradient stays applied",
        "gradwatch/_capture/guard.py",
        "for snapshot in scope.snapshots[:-1] if snapshot",
        "for snapshot in scope.snapshots[:0] if snapshot",
        (
            "tests/test_skip.py::"
            "test_a_custom_step_skips_all_its_updates_together_whichever_applies_first",
        ),
    ),
    Mutation(
        "skip-snapshot-after-learning",
        "an eager step snapshots none of its applies once it learned their count",
        "gradwatch/_capture/guard.py",
        "and index >= learned - 1:",
        "and index >= 0:",
        (
            "tests/test_skip.py::"
            "test_a_custom_step_skips_all_its_updates_together_whichever_applies_first",
        ),
    ),
    Mutation(
        "renumber-forgets-histograms",
        "when the trainable set grows, the histograms' blocks keep their old codes",
        "gradwatch/_logdata/store.py",
        "            *self._hist_blocks,\n",
        "",
        (RENUMBER,),
    ),
    Mutation(
        "jax-every-process-is-worker-zero",
        "in a multi-process JAX run every process is the chief and writes worker=0",
        "gradwatch/_backend/jax.py",
        "    index = jax.process_index()\n",
        "    index = 0\n",
        (
            "tests/test_jax_distribution.py::"
            "test_multi_process_only_process_zero_writes_unless_all_workers",
        ),
    ),
    Mutation(
        "jax-slot-written-sharded",
        "under ModelParallel, a kept sharded kernel is written into the ring buffer shard "
        "by shard, and XLA gathers the whole buffer after each step",
        "gradwatch/_backend/jax.py",
        "    value = _replicated(ops.reshape(",
        "    value = (ops.reshape(",
        (
            "tests/test_jax_distribution.py::"
            "test_no_collective_moves_the_ring_buffer_between_devices",
        ),
    ),
)


def _copy_of_the_project(into: Path) -> None:
    for name in ("gradwatch", "tests"):
        shutil.copytree(
            ROOT / name, into / name, ignore=shutil.ignore_patterns("__pycache__", "*.pyc")
        )
    shutil.copy(ROOT / "pyproject.toml", into / "pyproject.toml")


def _pytest(where: Path, tests: tuple[str, ...]) -> subprocess.CompletedProcess:
    # The copy first on the path, ahead of an installed (or editable) gradwatch.
    env = dict(os.environ, PYTHONPATH=str(where))
    env.pop("CI", None)  # a missing optional backend is a skip here, not the bug caught
    command = [sys.executable, "-m", "pytest", "-x", "-q", "-p", "no:cacheprovider", "-n", "0"]
    command += tests
    return subprocess.run(command, cwd=where, env=env, capture_output=True, text=True)


def apply(mutation: Mutation, where: Path) -> None:
    """Puts `mutation` into the copy at `where`; a ValueError if its text is not found once."""
    path = where / mutation.file
    text = path.read_text()
    if text.count(mutation.old) != 1:
        raise ValueError(
            f"mutation {mutation.name!r}: the text to replace occurs "
            f"{text.count(mutation.old)} times in {mutation.file}, not once; point the "
            f"mutation at the code's new home. Text: {mutation.old!r}"
        )
    path.write_text(text.replace(mutation.old, mutation.new))


def run(mutations: list[Mutation]) -> int:
    all_tests = tuple(dict.fromkeys(t for m in mutations for t in m.tests))
    with tempfile.TemporaryDirectory() as tmp:
        clean = Path(tmp) / "clean"
        _copy_of_the_project(clean)
        for m in mutations:  # every text must be found before anything is run
            apply(m, Path(shutil.copytree(clean, Path(tmp) / "check" / m.name)))
        print(f"baseline: {len(all_tests)} test selections without any mutation ...", flush=True)
        base = _pytest(clean, all_tests)
        if base.returncode != 0:
            print(base.stdout[-4000:], base.stderr[-2000:])
            print("The tests fail without a mutation: fix that first.")
            return 2
        survived = []
        print("| mutation | caught | seconds | tests |\n|---|---|---|---|", flush=True)
        for m in mutations:
            where = Path(tmp) / "check" / m.name
            start = time.monotonic()
            result = _pytest(where, m.tests)
            caught = result.returncode == 1  # tests failed; other codes are pytest errors
            if result.returncode not in (0, 1):
                print(result.stdout[-3000:], result.stderr[-2000:])
            if not caught:
                survived.append(m.name)
            seconds = time.monotonic() - start
            verdict = "yes" if caught else f"**NO** (pytest exit {result.returncode})"
            print(f"| {m.name} | {verdict} | {seconds:.0f} | {' '.join(m.tests)} |", flush=True)
    if survived:
        print(f"Survived: {', '.join(survived)}")
        return 1
    print(f"All {len(mutations)} mutations caught.")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("names", nargs="*", help="mutations to run (default: all)")
    parser.add_argument("--list", action="store_true", help="list the mutations and exit")
    args = parser.parse_args(argv)
    by_name = {m.name: m for m in MUTATIONS}
    unknown = [n for n in args.names if n not in by_name]
    if unknown:
        parser.error(f"unknown mutation(s) {unknown}; known: {sorted(by_name)}")
    chosen = [by_name[n] for n in args.names] or list(MUTATIONS)
    if args.list:
        for m in chosen:
            print(f"{m.name}: {m.bug}\n    {m.file}; caught by {' '.join(m.tests)}")
        return 0
    return run(chosen)


if __name__ == "__main__":
    sys.exit(main())
