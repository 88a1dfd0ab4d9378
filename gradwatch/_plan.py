"""The plan of a watch: which of the model's trainable variables get stats and kept
tensors, and the ring buffer sized for them."""

from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Any

import numpy as np

from gradwatch._backend import current as _backend
from gradwatch._catalogue import histogram_bin_count
from gradwatch._store import Store
from gradwatch.buffer import GradientBuffer
from gradwatch.keys import match_patterns, model_paths, variable_keys

SLOTS = 256  # ring-buffer slots when memory allows; drained every ~SLOTS steps
BUFFER_BYTES = 64 * 2**20  # cap on one buffer's size when full tensors are kept


@dataclass
class Plan:
    """Which of the model's trainable variables get stats and kept tensors."""

    signature: tuple[int, ...]
    variables: list[Any]  # model.trainable_weights
    keys: list[str]
    stat_index: list[int]
    value_index: list[int]
    stat_codes: np.ndarray  # codes in the log
    value_codes: np.ndarray

    def __post_init__(self) -> None:
        # The keys of the variables that get stats, in the order of the stats rows: made
        # once, as the alarms and the drain read them at every execution.
        self.stat_keys = [self.keys[i] for i in self.stat_index]

    @property
    def stat_sizes(self) -> list[int]:
        """The element counts of the variables that get stats."""
        return [int(np.prod(self.variables[i].shape)) for i in self.stat_index]


def signature_of(model: Any) -> tuple[int, ...]:
    return tuple(id(v) for v in model.trainable_weights)


def make_plan(model: Any, watch: Any, store: Store) -> Plan:
    """The plan of `watch` (its `variables`, `values` and `max_value_elements`) on the
    model's trainable variables; the used variables are added to `store`."""
    variables = list(model.trainable_weights)
    keys = variable_keys(model_paths(model))
    if not variables:
        # As Keras' own step, which warns and trains on; the patterns are matched once
        # the model has trainable weights (a frozen model unfrozen later).
        warnings.warn(
            f"GradWatch has nothing to record: the model {model.name!r} does not have any "
            "trainable weights. Training goes on; the log gets steps once it has some.",
            stacklevel=3,
        )
        return Plan((), [], [], [], [], np.zeros((0,), np.int32), np.zeros((0,), np.int32))
    stat_keys = set(match_patterns(watch.variables, keys, "variables"))
    value_keys = (
        set(match_patterns(watch.values, keys, "values")) if watch.values is not None else set()
    )
    floats = [_is_float(v) for v in variables]
    skipped = [k for k, f in zip(keys, floats, strict=True) if not f]
    if skipped:
        warnings.warn(
            f"GradWatch skips the trainable variables {skipped}: they are not floating "
            "point, so they have no gradient to record.",
            stacklevel=3,
        )
    stat_index = [i for i, k in enumerate(keys) if k in stat_keys and floats[i]]
    value_index = [i for i, k in enumerate(keys) if k in value_keys and floats[i]]
    too_big = {
        keys[i]: int(np.prod(variables[i].shape))
        for i in value_index
        if np.prod(variables[i].shape) > watch.max_value_elements
    }
    if too_big:
        raise ValueError(
            f"`values` would keep the full gradient of {too_big} (elements), above "
            f"max_value_elements={watch.max_value_elements} per variable. Each kept "
            "tensor costs its size in memory at every recorded step. Narrow `values`, "
            "or raise the limit with GradWatch(max_value_elements=...)."
        )
    used = sorted(set(stat_index) | set(value_index))
    codes = dict(
        zip(
            used,
            store.add_variables([keys[i] for i in used], [tuple(variables[i].shape) for i in used]),
            strict=True,
        )
    )
    return Plan(
        signature=tuple(id(v) for v in variables),
        variables=variables,
        keys=keys,
        stat_index=stat_index,
        value_index=value_index,
        stat_codes=np.asarray([codes[i] for i in stat_index], np.int32),
        value_codes=np.asarray([codes[i] for i in value_index], np.int32),
    )


def make_buffer(model: Any, plan: Plan, watch: Any) -> GradientBuffer:
    """A ring buffer for the plan: `SLOTS` slots where `BUFFER_BYTES` allows, and at least
    two executions of `steps_per_execution` steps."""
    sizes = [int(np.prod(plan.variables[i].shape)) for i in plan.value_index]
    n_stats = len(watch.stats)
    slot_bytes = 8 + 4 * (len(plan.stat_index) * n_stats + sum(sizes))
    spe = int(model.steps_per_execution)
    n_bins = histogram_bin_count(watch.histogram) if watch.histogram else 0
    slot_bytes = slot_bytes + 4 * len(plan.stat_index) * n_bins
    n_replicas = _backend.num_replicas(model) if watch.per_replica else 0
    slot_bytes += 4 * n_replicas * len(plan.stat_index) * n_stats
    capacity = max(2 * spe, min(SLOTS, BUFFER_BYTES // slot_bytes))
    prev_size = sum(plan.stat_sizes) if "cos_prev" in watch.stats else 0
    with _backend.lift():
        return GradientBuffer(
            len(plan.stat_index),
            n_stats,
            sizes,
            capacity,
            n_bins=n_bins,
            prev_size=prev_size,
            n_replicas=n_replicas,
        )


def _is_float(variable: Any) -> bool:
    return "float" in str(getattr(variable, "dtype", "float32"))
