"""Log files written by hand in gradwatch's CSV format (docs/reference.md, "Files"), read
back with `gradwatch.read_log`: logs with exactly the stats, alerts and keys a test needs,
built through the public file format alone."""

from __future__ import annotations

import json
from collections.abc import Mapping, Sequence
from pathlib import Path

import numpy as np

import gradwatch


def write_log(
    path: Path,
    shapes: Mapping[str, tuple[int, ...]],
    stats: Mapping[str, np.ndarray],
    alerts: Sequence[tuple[int, str, str, float]] = (),
    skipped: Sequence[int] = (),
    disconnected: Sequence[str] = (),
) -> gradwatch.GradientLog:
    """Writes a version 2 CSV log at `path` and reads it back.

    `shapes` gives the keys in model order; `stats` maps a stat name to a
    `(steps, variables)` array (steps 0, 1, ...; one epoch); `alerts` are
    `(step, key, kind, value)`.
    """
    keys = list(shapes)
    k = len(next(iter(stats.values())))
    header = {
        "format": "gradwatch-log",
        "version": 2,
        "variables": keys,
        "stats": list(stats),
        "shapes": {key: list(s) for key, s in shapes.items()},
        "bins_per_decade": None,
        "disconnected": list(disconnected),
        "alerts": [list(a) for a in alerts],
        "skipped": list(skipped),
        "per_replica": False,
        "scalars": [],
    }
    lines = [f"# gradwatch-log {json.dumps(header)}", "step,epoch,batch,variable,stat,index,value"]
    lines += [
        f"{step},0,{step},{key},{stat},,{float(values[step][j])!r}"
        for step in range(k)
        for j, key in enumerate(keys)
        for stat, values in stats.items()
    ]
    path.write_text("\n".join(lines) + "\n")
    return gradwatch.read_log(path)
