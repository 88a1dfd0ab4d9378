"""Draining: the ring buffer's new slots, copied to the host as one block and added to
the store; the block as the sinks get it; and when a drain is due."""

from __future__ import annotations

import warnings
from collections.abc import Sequence
from typing import Any

import numpy as np

from gradwatch._backend import current as _backend
from gradwatch._capture.plan import Plan
from gradwatch._logdata.store import SCALARS, Store
from gradwatch.buffer import Drained, GradientBuffer
from gradwatch.sinks import SinkBlock


def drain(
    model: Any, buffer: GradientBuffer, plan: Plan, store: Store, epoch: int, epoch_start: int
) -> Drained | None:
    """Copies the slots written since the last drain and appends them to `store`, at
    `epoch`, with batch numbers counted from `epoch_start`. None when there are none
    (or no device state to read yet)."""
    # JAX: mid-epoch the state is off the model's variables; attach it, and copy the
    # buffer out at once (its arrays are donated to the next step).
    if model is not None and not _backend.sync_state(model, buffer.count):
        return None
    block = buffer.drain()
    if block.lost:
        warnings.warn(
            f"GradWatch lost {block.lost} recorded steps that were overwritten in the "
            "ring buffer before they were copied out.",
            stacklevel=3,
        )
    k = len(block.steps)
    if k == 0:
        return None
    values = np.concatenate(block.values, axis=1) if block.values else np.zeros((k, 0), np.float32)
    store.append(
        block.steps,
        np.full(k, epoch, np.int64),
        block.steps - epoch_start,
        plan.stat_codes,
        block.stats,
        plan.value_codes,
        values,
        hist=block.hist,
        replica_stats=block.replica_stats,
        scalars=block.scalars,
    )
    if block.noise is not None:
        # A step with an estimate has its small batch: not NaN.
        has = ~np.isnan(block.noise[:, 0])
        if has.any():
            steps = block.steps[has]
            store.add_noise_rows(
                steps, np.full(len(steps), epoch, np.int64), steps - epoch_start, block.noise[has]
            )
    store.add_skipped(block.steps[block.skipped])
    store.add_guarded(block.steps[block.skipped & ~block.loss_scaled])
    return block


def sink_block(
    block: Drained,
    plan: Plan,
    epoch: int,
    epoch_start: int,
    stats: Sequence[str],
    bins_per_decade: int | None,
) -> SinkBlock:
    """The drained block as the sinks get it: each stat, scalar and kept gradient by
    name, in views of the drained arrays (no copy)."""
    kept = [(plan.keys[i], tuple(plan.variables[i].shape)) for i in plan.value_index]
    k = len(block.steps)
    replica = block.replica_stats
    scalars = block.scalars
    return SinkBlock(
        steps=block.steps.view(),  # views: the sinks see read-only ones, the store not
        epoch=int(epoch),
        batches=block.steps - epoch_start,
        keys=tuple(plan.stat_keys),
        stats={name: block.stats[:, :, j] for j, name in enumerate(stats)},
        scalars=None if scalars is None else {n: scalars[:, j] for j, n in enumerate(SCALARS)},
        skipped=block.skipped.view(),
        values={
            key: v.reshape((k, *shape)) for (key, shape), v in zip(kept, block.values, strict=True)
        },
        histograms=None if block.hist is None else block.hist.view(),
        bins_per_decade=bins_per_decade if block.hist is not None else None,
        replica_stats=(
            None if replica is None else {name: replica[:, :, :, j] for j, name in enumerate(stats)}
        ),
    )


def drain_due(since_drain: int, steps_per_execution: int, capacity: int, room: int | None) -> bool:
    """Before an execution: whether it could overwrite slots not yet copied out, or
    bring more steps than `room` (steps until a part is due; None: no parts)."""
    limit = capacity
    if room is not None:  # drain in time to write a part
        limit = min(limit, max(room, steps_per_execution))
    return (since_drain + 1) * steps_per_execution > limit
