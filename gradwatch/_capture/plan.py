"""The plan of a watch: which of the model's trainable variables get stats and kept
tensors, and the ring buffer sized for them; `Planner` keeps both up to date."""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

import numpy as np

from gradwatch._backend import current as _backend
from gradwatch._capture.counting import step_counter
from gradwatch._capture.step import Records, record_key, update_counts
from gradwatch._logdata.store import SCALARS, Store
from gradwatch._stats.specs import histogram_bin_count, needs_of
from gradwatch.buffer import GradientBuffer
from gradwatch.keys import match_patterns, model_paths, variable_keys

SLOTS = 256  # ring-buffer slots when memory allows; drained every ~SLOTS steps
BUFFER_BYTES = 64 * 2**20  # cap on one buffer's size when full tensors are kept


@dataclass
class Plan:
    """Which of the model's trainable variables get stats and kept tensors.

    Its rows are the variables' updates in one step: one row per variable, and
    a variable that the step updates n times (a critic's loop) has n rows in a
    row, keyed `key`, `key@1`, ..., `key@{n-1}` (see `update_key`).
    """

    signature: tuple[int, ...]  # the ids of model.trainable_weights
    variables: list[Any]  # each row's variable
    keys: list[str]  # each row's key in the log
    stat_index: list[int]  # rows
    value_index: list[int]
    stat_codes: np.ndarray  # codes in the log
    value_codes: np.ndarray
    # id(variable) -> its updates in one step, where more than one.
    counts: dict[int, int] = field(default_factory=dict)
    ids: list[Any] = field(default_factory=list)  # each row's key in the step's Records

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


def update_key(key: str, update: int) -> str:
    """The log's key of a variable's update in a step that updates it several times:
    the key itself for the first (0), `key@1`, `key@2`, ... for the later ones.

    >>> update_key("critic/dense/kernel", 0), update_key("critic/dense/kernel", 2)
    ('critic/dense/kernel', 'critic/dense/kernel@2')
    """
    return key if update == 0 else f"{key}@{update}"


def make_plan(
    model: Any, watch: Any, store: Store | None, counts: Mapping[int, int] | None = None
) -> Plan:
    """The plan of `watch` (its `variables`, `values` and `max_value_elements`) on the
    model's trainable variables, with `counts[id(variable)]` updates of a variable
    that the step updates more than once; the used rows are added to `store`
    (`None`: only check the arguments against the model)."""
    counts = {k: int(n) for k, n in (counts or {}).items() if n > 1}
    model_variables = list(model.trainable_weights)
    model_keys = variable_keys(model_paths(model))
    if not model_variables:
        # As Keras' own step, which warns and trains on; the patterns are matched once
        # the model has trainable weights (a frozen model unfrozen later).
        if store is not None:
            warnings.warn(
                f"GradWatch has nothing to record: the model {model.name!r} does not have "
                "any trainable weights. Training goes on; the log gets gradients once it has "
                "some.",
                stacklevel=3,
            )
        return Plan((), [], [], [], [], np.zeros((0,), np.int32), np.zeros((0,), np.int32))
    # Patterns match the variables' own keys; every update of a match is selected.
    variables, keys, ids, own_keys = [], [], [], []
    for var, key in zip(model_variables, model_keys, strict=True):
        for update in range(counts.get(id(var), 1)):
            variables.append(var)
            keys.append(update_key(key, update))
            ids.append(record_key(var, update))
            own_keys.append(key)
    stat_keys = set(match_patterns(watch.variables, model_keys, "variables"))
    value_keys = (
        set(match_patterns(watch.values, model_keys, "values"))
        if watch.values is not None
        else set()
    )
    floats = [_is_float(v) for v in variables]
    skipped = [k for k, v in zip(model_keys, model_variables, strict=True) if not _is_float(v)]
    if skipped and store is not None:
        warnings.warn(
            f"GradWatch skips the trainable variables {skipped}: they are not floating "
            "point, so they have no gradient to record.",
            stacklevel=3,
        )
    stat_index = [i for i, k in enumerate(own_keys) if k in stat_keys and floats[i]]
    value_index = [i for i, k in enumerate(own_keys) if k in value_keys and floats[i]]
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
    if store is None:
        codes = dict.fromkeys(used, -1)
    else:
        shapes = [tuple(variables[i].shape) for i in used]
        codes = dict(zip(used, store.add_variables([keys[i] for i in used], shapes), strict=True))
    return Plan(
        signature=tuple(id(v) for v in model_variables),
        variables=variables,
        keys=keys,
        stat_index=stat_index,
        value_index=value_index,
        stat_codes=np.asarray([codes[i] for i in stat_index], np.int32),
        value_codes=np.asarray([codes[i] for i in value_index], np.int32),
        counts=counts,
        ids=ids,
    )


def make_buffer(model: Any, plan: Plan, watch: Any) -> GradientBuffer:
    """A ring buffer for the plan: `SLOTS` slots where `BUFFER_BYTES` allows, and at least
    two executions of `steps_per_execution` steps."""
    sizes = [int(np.prod(plan.variables[i].shape)) for i in plan.value_index]
    n_stats = len(watch.stats)
    slot_bytes = 8 + 4 * (len(plan.stat_index) * n_stats + sum(sizes) + len(SCALARS))
    spe = int(model.steps_per_execution)
    n_bins = histogram_bin_count(watch.histogram) if watch.histogram else 0
    slot_bytes = slot_bytes + 4 * len(plan.stat_index) * n_bins
    n_replicas = _backend.num_replicas(model) if watch.per_replica else 0
    slot_bytes += 4 * n_replicas * len(plan.stat_index) * n_stats
    capacity = max(2 * spe, min(SLOTS, BUFFER_BYTES // slot_bytes))
    # The previous step's gradient, kept for the stats that need it (`cos_prev`).
    prev_size = sum(plan.stat_sizes) if "previous" in needs_of(watch.stats) else 0
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


class Planner:
    """A watch's plan and ring buffer: made from the model's variables (at the start of
    training, or inside the first traced step of a model built there), and made again
    when the variables change or the step updates a variable more often."""

    def __init__(self, watch: Any, store: Store):
        self.watch, self.store = watch, store
        self.plan: Plan | None = None
        self.buffer: GradientBuffer | None = None
        # id(variable) -> its updates in one step, where a step updates it more than once.
        self.counts: dict[int, int] = {}
        # An argument that the model's variables refuse (a `variables` pattern matching
        # none), found inside the traced step: raised on the host, after the step.
        self.error: ValueError | None = None
        # (signature_of(model), the ids of the watched variables): see `watched_ids`.
        self._watched: tuple[tuple[int, ...], frozenset[int]] | None = None

    def watched_ids(self, model: Any) -> frozenset[int]:
        """The ids of the model's variables whose gradients the watch checks (its
        `variables`), made once per set of trainable variables; none where a pattern
        matches nothing (the plan reports that)."""
        signature = signature_of(model)
        if self._watched is None or self._watched[0] != signature:
            try:
                plan = make_plan(model, self.watch, None)
            except ValueError:
                return frozenset()
            self._watched = (signature, frozenset(id(plan.variables[i]) for i in plan.stat_index))
        return self._watched[1]

    def prepare(self, model: Any) -> Plan | None:
        """At the start of training: the checks of the arguments against the model's
        variables, made before any step where they can be; and on JAX the plan, the ring
        buffer and the step counter, which travel in the stateless step's state and so
        must exist before Keras gathers it. Returns the plan where it is made now."""
        if _backend.STATE_IN_STEP or (
            # TensorFlow: made before the first trace (one that creates variables is
            # traced twice), for a model built before training and one replica (under
            # `tf.distribute` the strategy places them in the trace).
            _backend.PREMAKES_STATE
            and model.built
            and model.trainable_weights
            and _backend.num_replicas(model) == 1
        ):
            plan = self.plan_for(model)
            self.buffer_for(model, plan)
            step_counter(model)
            return plan
        if _backend.EAGER and self.stale(model):
            # The step runs eagerly and applies the update before it records: match
            # the patterns now, so that one matching nothing fails before any step; and
            # make the counter, which starts at `iterations` before any update. (The plan
            # itself is made at the first step, which shows how many times it updates
            # each variable.)
            make_plan(model, self.watch, None)
            step_counter(model)
        elif model.trainable_weights:
            # Built before training: match the patterns now too, so that one matching
            # nothing fails before any step. (A model built in its first step is matched
            # in that trace; see `in_step`.)
            make_plan(model, self.watch, None)
        return None

    def in_step(self, model: Any, records: Records) -> Plan | None:
        """The plan, made inside the step being traced; None if the model's variables
        refuse the arguments. A model built in its first step (a `Sequential` without
        an `Input`) creates its variables in that trace, and they are initialized only
        once the trace completes: an error raised there would leave them so for the
        session. The trace therefore completes without this watch's capture, and the
        error is raised on the host after that step (`take_error`)."""
        if self.error is not None:
            return None
        try:
            return self.plan_for(model, records)
        except ValueError as e:
            self.error = e
            return None

    def take_error(self) -> ValueError | None:
        error, self.error = self.error, None
        return error

    def plan_for(self, model: Any, records: Records | None = None) -> Plan:
        """The plan for the model's trainable variables and, from the step's `records`,
        the number of times the step updates each (the counts only grow: an update
        that a later step lacks is NaN there)."""
        counts = self.counts
        grown = {
            k: n for k, n in update_counts(records or {}).items() if n > max(counts.get(k, 1), 1)
        }
        if grown:
            counts = self.counts = {**counts, **grown}
        plan = self.plan
        current = plan is not None and plan.signature == signature_of(model)
        if current and plan.counts == counts:
            return plan
        if _backend.STATE_IN_STEP and records is not None and current and self.buffer is not None:
            # JAX: the ring buffer travels in the step's state, which Keras gathered
            # before this trace; the next `fit` makes the plan with every update.
            if grown:
                _warn_updates_next_fit(plan, grown)
            return plan
        self.plan = make_plan(model, self.watch, self.store, counts)
        self.buffer = None  # a new plan needs a buffer of its own shape
        return self.plan

    def buffer_for(self, model: Any, plan: Plan) -> GradientBuffer:
        if self.buffer is None:
            self.buffer = make_buffer(model, plan, self.watch)
        return self.buffer

    def stale(self, model: Any) -> bool:
        """Whether there is no plan yet for the model's current variables."""
        return self.plan is None or self.plan.signature != signature_of(model)


def _warn_updates_next_fit(plan: Plan, grown: dict[int, int]) -> None:
    keys = [k for v, k in zip(plan.variables, plan.keys, strict=True) if id(v) in grown]
    warnings.warn(
        f"GradWatch: the train step updates {keys} more than once. This `fit` records "
        "their first update only, as the log's layout travels in the step's state, which "
        "was made before the step was traced; a later `fit` with this GradWatch records "
        "every update (`key`, `key@1`, ...).",
        stacklevel=4,
    )


def _is_float(variable: Any) -> bool:
    return "float" in str(getattr(variable, "dtype", "float32"))
