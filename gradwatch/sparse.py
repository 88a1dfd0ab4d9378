"""Sparse gradients (an `Embedding` table's): their stats without a dense copy of the table."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np


class SparseGradient:
    """The gradient of a table of which a step touched only some rows.

    `rows[:count]` are the touched rows, each summed over its repeats in the
    batch, as the dense gradient has them; `rows[count:]` are zero padding, so
    that the shapes stay those of the batch (and compile under XLA). Every
    other element of the dense gradient, of shape `shape`, is zero.

    Example:

    >>> import tensorflow as tf
    >>> g = SparseGradient.from_indexed_slices(
    ...     tf.IndexedSlices(tf.constant([[1.0], [2.0], [4.0]]), tf.constant([3, 0, 3])),
    ...     (5, 1))
    >>> g.dense().numpy().ravel().tolist()
    [2.0, 0.0, 0.0, 5.0, 0.0]
    >>> int(g.implicit_zeros())
    3
    """

    def __init__(self, rows: Any, row_ids: Any, count: Any, shape: tuple[int, ...]):
        self.rows = rows  # (m, *shape[1:])
        self.row_ids = row_ids  # (m,) int32: the table row of each of `rows`
        self.count = count  # int32 scalar: the number of touched rows
        self.shape = tuple(int(d) for d in shape)
        self.dtype = rows.dtype

    @classmethod
    def from_indexed_slices(cls, grad: Any, shape: Any) -> SparseGradient:
        """Sums repeated rows: sort the row ids, number the runs, add up each run."""
        import tensorflow as tf

        indices = tf.cast(tf.reshape(grad.indices, (-1,)), tf.int32)
        values = tf.reshape(grad.values, tf.concat([tf.shape(indices), shape[1:]], 0))
        m = tf.shape(indices)[0]
        order = tf.argsort(indices, stable=True)
        ids = tf.gather(indices, order)
        starts = tf.concat([tf.ones([1], tf.bool)[:m], ids[1:] != ids[:-1]], 0)
        run = tf.cumsum(tf.cast(starts, tf.int32)) - 1
        rows = tf.math.unsorted_segment_sum(tf.gather(values, order), run, m)
        row_ids = tf.math.unsorted_segment_max(ids, run, m)
        count = tf.reduce_sum(tf.cast(starts, tf.int32))
        return cls(rows, row_ids, count, tuple(shape))

    def map(self, fn: Callable[[Any], Any]) -> SparseGradient:
        """The same gradient with `fn` applied to its elements (a cast, a division);
        `fn(0) == 0` must hold, since the untouched elements stay zero."""
        return SparseGradient(fn(self.rows), self.row_ids, self.count, self.shape)

    @property
    def size(self) -> int:
        """Elements of the dense gradient."""
        return int(np.prod(self.shape))

    def valid(self) -> Any:
        """A bool tensor shaped like `rows`: True on touched rows, False on padding."""
        import tensorflow as tf

        m = tf.shape(self.rows)[0]
        touched = tf.range(m) < self.count
        return tf.broadcast_to(
            tf.reshape(touched, tf.concat([[m], tf.ones([len(self.shape) - 1], tf.int32)], 0)),
            tf.shape(self.rows),
        )

    def implicit_zeros(self) -> Any:
        """The number of elements in untouched rows (float32 scalar)."""
        import tensorflow as tf

        row = float(np.prod(self.shape[1:]))
        return tf.cast(self.shape[0] - self.count, tf.float32) * row

    def dense(self) -> Any:
        """The dense gradient (for kept tensors and stats that need every element)."""
        import tensorflow as tf

        ids = tf.clip_by_value(self.row_ids, 0, self.shape[0] - 1)[:, None]
        # Padding rows are zero: adding them to row 0 changes nothing.
        return tf.tensor_scatter_nd_add(tf.zeros(self.shape, self.rows.dtype), ids, self.rows)


def dense(g: Any) -> Any:
    """`g` as a dense tensor (`None` stays `None`)."""
    return g.dense() if isinstance(g, SparseGradient) else g


def elements(g: Any) -> Any:
    """The tensor whose elements carry all of `g`'s non-zero values (its rows, if sparse)."""
    return g.rows if isinstance(g, SparseGradient) else g
