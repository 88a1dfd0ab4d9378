"""Query a streamed gradwatch log with DuckDB: SQL over the hive-partitioned Parquet dataset.

    pip install duckdb
    python examples/duckdb_query.py [runs/duckdb]

trains a small model twice into the same log directory (two runs), then asks DuckDB
which variables had the largest gradient norms, and for the global gradient norm of
each step, without loading the log into pandas first.
"""

from __future__ import annotations

import os
import sys

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras
import numpy as np

import gradwatch

# The layout is <path>/worker=<k>/run=<id>/part-NNNNNN.parquet; DuckDB turns the
# directory names into the columns `worker` and `run`.
LARGEST_NORMS = """
SELECT variable, max(value) AS max_norm, arg_max(step, value) AS at_step
FROM read_parquet($files, hive_partitioning = true)
WHERE stat = 'norm' AND worker = 0
GROUP BY variable
ORDER BY max_norm DESC
"""

GLOBAL_NORM = """
SELECT run, step, sqrt(sum(value * value)) AS global_norm
FROM read_parquet($files, hive_partitioning = true)
WHERE stat = 'norm' AND worker = 0
GROUP BY run, step
ORDER BY step
"""


def train(path: str) -> None:
    keras.utils.set_random_seed(0)
    x = np.random.normal(size=(256, 8)).astype("float32")
    y = (x @ np.linspace(-1, 1, 8)[:, None]).astype("float32")
    model = gradwatch.Sequential(
        [
            keras.Input((8,)),
            keras.layers.Dense(16, activation="relu", name="hidden"),
            keras.layers.Dense(1, name="out"),
        ],
        name="net",
    )
    model.compile(optimizer="adam", loss="mse")
    # Two runs into one directory, as when training is resumed: each GradWatch is a run.
    for epochs in (2, 1):
        watch = gradwatch.GradWatch(stats=("norm", "max"), path=path, flush_every=10)
        model.fit(x, y, batch_size=32, epochs=epochs, callbacks=[watch], verbose=0)


def main(path: str = "runs/duckdb") -> dict:
    """Trains into `path` and runs the queries; returns their results as DataFrames."""
    import duckdb

    train(path)
    files = os.path.join(path, "**", "*.parquet")
    con = duckdb.connect()
    out = {
        "largest_norms": con.execute(LARGEST_NORMS, {"files": files}).df(),
        "global_norm": con.execute(GLOBAL_NORM, {"files": files}).df(),
    }
    print("Largest gradient norm of each variable:")
    print(out["largest_norms"].to_string(index=False))
    print("\nGlobal gradient norm, last steps:")
    print(out["global_norm"].tail().to_string(index=False))
    return out


if __name__ == "__main__":
    main(*sys.argv[1:2])
