"""Resumed runs: which optimizer iteration each step number stood at (anchors), the step
a model restored to an earlier iteration numbers next, and which rows that supersedes.

An anchor is a pair `(step, iteration)` read on the host at one moment: the number of
the model's next step and its optimizer's `iterations`. Steps advance the iteration by
one, except those that a `LossScaleOptimizer` skipped (and micro-steps of gradient
accumulation), so anchors taken now and then map iterations to steps. A model restored
to an earlier iteration (`keras.callbacks.BackupAndRestore`, an older checkpoint) goes
on from the step that stood at that iteration; a streamed run that does so marks the
rows of the runs before it from that step on as superseded.
"""

from __future__ import annotations

import math
from collections.abc import Collection, Sequence

Anchor = tuple[int, int]


def add_anchor(anchors: list[Anchor], anchor: Anchor) -> None:
    """Appends `anchor`, dropping a middle one where three lie on one line of slope 1
    (steps and iterations advanced together: the middle one says nothing new)."""
    anchor = (int(anchor[0]), int(anchor[1]))
    if anchors and anchors[-1] == anchor:
        return
    if len(anchors) >= 2:
        (s0, i0), (s1, i1) = anchors[-2], anchors[-1]
        if s1 - s0 == i1 - i0 >= 0 and anchor[0] - s1 == anchor[1] - i1 >= 0:
            anchors[-1] = anchor
            return
    anchors.append(anchor)


def timeline(anchors: Sequence[Anchor]) -> list[Anchor]:
    """The anchors since the optimizer's count last went down (a new optimizer, whose
    steps were numbered on): the history that a restored model can go back into."""
    start = 0
    for j in range(1, len(anchors)):
        if anchors[j][1] < anchors[j - 1][1]:
            start = j
    return list(anchors[start:])


def restored_step(
    iteration: int, anchors: Sequence[Anchor], skipped: Collection[int]
) -> int | None:
    """The step a model whose optimizer stands at `iteration` numbers next, if that is
    before the end of the history `anchors` (a model restored to an earlier iteration);
    None otherwise.

    An optimizer at iteration 0 never applied an update: a new model (or a new
    optimizer from `compile`), whose steps are numbered on, not a restored one.
    `skipped` are the steps known to have left the iteration where it was.

    Example:

    >>> restored_step(8, [(0, 0), (11, 11)], ())
    8
    >>> restored_step(2, [(0, 0), (5, 3)], {0, 1})  # steps 0 and 1 were skipped
    4
    >>> restored_step(11, [(0, 0), (11, 11)], ()) is None  # where the history ends
    True
    >>> restored_step(2, [(0, 0), (4, 5)], ())  # iteration 5 had no step (an epoch's end)
    2
    """
    line = timeline(anchors)
    if iteration <= 0 or not line or iteration >= line[-1][1]:
        return None
    after = next(j for j, (_, it) in enumerate(line) if it > iteration)
    step_b, it_b = line[after]
    if after == 0:
        # Each step advances the iteration by at most one: the step at `iteration` is
        # at most this many before the first anchor past it.
        return max(step_b - (it_b - iteration), 0)
    # On from the anchor before it, one iteration a step but for the skipped ones. (Not
    # back from the anchor past it: on TensorFlow Keras' optimizer counts an iteration
    # without a step at the end of each epoch of unknown length, where its `get_next`
    # found no data; an anchor is noted after each epoch, past that iteration.)
    step, it = line[after - 1]
    while it < iteration and step < step_b:
        if step not in skipped:
            it += 1
        step += 1
    return step


def cutoffs(resumes: Sequence[int | None]) -> list[float]:
    """For each run, in writing order, the first of its steps that a later run
    superseded (`math.inf`: none), from each run's resumed step (None: not resumed).

    A run resumed at step s supersedes the rows of every run before it from s on.

    Example:

    >>> cutoffs([None, 8, None, 5])
    [5, 5, 5, inf]
    """
    out: list[float] = []
    cut = math.inf
    for resumed in reversed(resumes):
        out.append(cut)
        if resumed is not None:
            cut = min(cut, resumed)
    return out[::-1]
