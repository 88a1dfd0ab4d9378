"""What the report and `gradwatch doctor` show of a long run: its spikes, the examples
behind its replayed steps, and its gradient noise scale. Pandas and NumPy only."""

from __future__ import annotations

from typing import Any

import numpy as np
import pandas as pd

from gradwatch._ui.text import short_number

#: The alert kinds of a spike (`GradWatch(on_spike=...)`).
SPIKE_KINDS = ("spike", "loss_spike")


def spikes(log: Any) -> pd.DataFrame:
    """The spikes of the log: `step`, `kind` and `value` (the global norm, or the loss)."""
    alerts = log.alerts
    rows = alerts[alerts["kind"].isin(SPIKE_KINDS)]
    return rows[["step", "kind", "value"]].reset_index(drop=True)


def top_examples(log: Any, most: int = 10) -> pd.DataFrame:
    """The replayed examples whose gradient norm stands highest over their step's median
    (`x_median`; a non-finite norm first), at most `most` of them."""
    ex = log.examples
    if not len(ex):
        return ex.assign(x_median=pd.Series(dtype=np.float64))
    norms = ex["grad_norm"].to_numpy(np.float64)
    finite = pd.Series(np.where(np.isfinite(norms), norms, np.nan), index=ex.index)
    median = finite.groupby(ex["step"]).transform("median").to_numpy(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ratio = np.where(np.isfinite(norms), norms / median, np.inf)
    out = ex.assign(x_median=ratio)
    order = np.argsort(-np.nan_to_num(ratio, nan=-1.0), kind="stable")
    return out.iloc[order[:most]].reset_index(drop=True)


def noise_line(log: Any) -> str | None:
    """One sentence on the latest finite gradient noise scale, or None without one."""
    frame = log.noise_scale
    finite = frame[np.isfinite(frame["b_simple"].to_numpy(np.float64))]
    if not len(finite):
        return None
    last = finite.iloc[-1]
    return (
        f"B_simple {short_number(float(last['b_simple']))} at step {int(last['step'])} "
        f"(a batch of {int(last['big_batch'])}; {len(finite)} estimates)"
    )


def text_lines(log: Any) -> list[str]:
    """The lines `gradwatch doctor` prints after its findings (none for a log without
    spikes, replayed examples or a noise scale)."""
    lines = []
    found = spikes(log)
    if len(found):
        shown = ", ".join(
            f"{int(s)} ({'gradient' if k == 'spike' else 'loss'})"
            for s, k in zip(found["step"][:8], found["kind"][:8], strict=True)
        )
        more = f" and {len(found) - 8} more" if len(found) > 8 else ""
        lines.append(f"spikes: {len(found)} at steps {shown}{more}")
    top = top_examples(log, most=5)
    if len(top):
        steps = log.examples["step"].nunique()
        lines.append(f"examples: {len(log.examples)} rows at {steps} replayed steps; highest:")
        for _, row in top.iterrows():
            sample = "" if pd.isna(row["sample"]) else f" sample {int(row['sample'])}"
            lines.append(
                f"  step {int(row['step'])} row {int(row['row'])}{sample}: grad_norm "
                f"{short_number(float(row['grad_norm']))} "
                f"({short_number(float(row['x_median']))}x its step's median), "
                f"loss {short_number(float(row['loss']))}"
            )
    noise = noise_line(log)
    if noise is not None:
        lines.append(f"noise scale: {noise}")
    return lines
