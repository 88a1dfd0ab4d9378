"""The store behind a `GradientLog`: recorded steps as dense numpy blocks, and what they describe.

The callback and the file readers write a store through its methods; the log, the
file writers and the TensorBoard export read it through its read-only attributes.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, replace
from types import MappingProxyType
from typing import Any, TypeVar

import numpy as np

T = TypeVar("T")

# The per-step scalars recorded beside the gradients, in column order. `applied` is
# held as 1.0 (the optimizer updated the weights at that step), 0.0 (it did not: a
# step that only accumulates a gradient, or one a loss-scale optimizer skipped).
SCALARS = ("loss", "learning_rate", "applied", "global_norm", "spike")
# The raw columns of a gradient-noise-scale estimate at a step (`gradwatch._logdata.noise`):
# the two batch sizes and the squared norms of their gradients.
NOISE_RAW = ("small_batch", "big_batch", "g_small_sq", "g_big_sq")


@dataclass
class StatBlock:
    """k recorded steps of one stat layout (also the layout of a histogram block)."""

    steps: np.ndarray  # int64 (k,)
    epochs: np.ndarray  # int64 (k,)
    batches: np.ndarray  # int64 (k,)
    codes: np.ndarray  # int32 (n_variables,): positions in Store.variables
    data: np.ndarray  # float32 (k, n_variables, n_stats); histograms: (k, n_variables, n_bins)


@dataclass
class ReplicaBlock:
    """k recorded steps of each replica's local-gradient stats."""

    steps: np.ndarray
    epochs: np.ndarray
    batches: np.ndarray
    codes: np.ndarray  # int32 (n_variables,)
    data: np.ndarray  # float32 (k, n_replicas, n_variables, n_stats), replicas 0, 1, ...


@dataclass
class ScalarBlock:
    """k recorded steps of the step's scalars (`SCALARS`: the loss, the learning rate,
    whether the step applied an update)."""

    steps: np.ndarray
    epochs: np.ndarray
    batches: np.ndarray
    data: np.ndarray  # float32 (k, len(SCALARS)); NaN where a step had none


@dataclass
class NoiseBlock:
    """k steps' raw noise-scale estimates (`NOISE_RAW`), from the step or the host."""

    steps: np.ndarray
    epochs: np.ndarray
    batches: np.ndarray
    data: np.ndarray  # float32 (k, len(NOISE_RAW))


@dataclass
class ValueBlock:
    """k recorded steps of kept gradient tensors."""

    steps: np.ndarray
    epochs: np.ndarray
    batches: np.ndarray
    codes: np.ndarray  # int32 (n_kept,)
    # float32 (k, sum of sizes): each step's kept tensors, flattened, in code order
    data: np.ndarray


#: The columns of `GradientLog.origins`: where a replayed step's first NaN/Inf was born.
ORIGIN_COLUMNS = ("step", "stage", "layer", "op", "rows", "samples", "detail")
#: The columns of `GradientLog.examples`: each example's loss and gradient norm in a step.
EXAMPLE_COLUMNS = ("step", "row", "sample", "loss", "grad_norm")


@dataclass
class Examples:
    """One step's examples (`GradientLog.examples`): their rows in the batch, their
    indices in the training data (-1 where unknown), losses and gradient norms."""

    rows: np.ndarray  # int64 (m,)
    samples: np.ndarray  # int64 (m,), -1: unknown
    losses: np.ndarray  # float64 (m,)
    grad_norms: np.ndarray  # float64 (m,)


class Store:
    """The recorded history of one run, and its description.

    Blocks keep their variables in code order (the order in which the variables
    were added), so that frames built from them are canonical. Every write drops
    what `cached` holds.

    Args:
        stats: The stat names recorded, in column order.
        bins_per_decade: The histogram resolution, or `None` when no histograms
            are recorded. Defaults to `None`.
        per_replica: Whether per-replica stats are recorded. Defaults to `False`.

    Example:

    >>> store = Store(("norm",))
    >>> codes = store.add_variables(["m/w"], [(2,)])
    >>> store.append(np.array([0]), np.array([0]), np.array([0]), codes,
    ...              np.ones((1, 1, 1), np.float32), codes[:0], np.zeros((1, 0), np.float32))
    >>> store.variables, store.stat_blocks[0].data.shape
    (('m/w',), (1, 1, 1))
    """

    def __init__(
        self,
        stats: Sequence[str],
        bins_per_decade: int | None = None,
        per_replica: bool = False,
    ):
        self.stats = tuple(stats)
        self.bins_per_decade = bins_per_decade
        self.per_replica = bool(per_replica)
        self._variables: list[str] = []
        self._codes: dict[str, int] = {}
        self._shapes: dict[str, tuple[int, ...]] = {}
        self._stat_blocks: list[StatBlock] = []
        self._hist_blocks: list[StatBlock] = []
        self._value_blocks: list[ValueBlock] = []
        self._replica_blocks: list[ReplicaBlock] = []
        self._scalar_blocks: list[ScalarBlock] = []
        self._noise_blocks: list[NoiseBlock] = []
        self._alerts: dict[tuple[int, str, str], float] = {}
        self._skipped: set[int] = set()
        # Of `_skipped`, the steps that gradwatch's `on_nonfinite` kept from the model
        # (the others a loss-scale optimizer skipped).
        self._guarded: set[int] = set()
        # Where a replay found a skipped step's first NaN/Inf: step -> ORIGIN_FIELDS.
        self._origins: dict[int, tuple] = {}
        # Each example's loss and gradient norm in a replayed step: step -> Examples.
        # Like the blocks, written with the next part of a streamed log, then forgotten.
        self._examples: dict[int, Examples] = {}
        self._disconnected: list[str] = []
        # The steps that a run resumed from an earlier iteration superseded, one store
        # per run they were recorded in (see `gradwatch._logdata.resume`).
        self._superseded: list[Store] = []
        self._cache: dict[str, Any] = {}

    # ----------------------------------------------------------------- reading
    @property
    def variables(self) -> tuple[str, ...]:
        """The keys of the variables, in the order they were added (model order)."""
        return tuple(self._variables)

    @property
    def codes(self) -> Mapping[str, int]:
        """Each key's code: its position in `variables`."""
        return MappingProxyType(self._codes)

    @property
    def shapes(self) -> Mapping[str, tuple[int, ...]]:
        """The shape of each variable, by key."""
        return MappingProxyType(self._shapes)

    @property
    def stat_blocks(self) -> tuple[StatBlock, ...]:
        return tuple(self._stat_blocks)

    @property
    def hist_blocks(self) -> tuple[StatBlock, ...]:
        """Histogram counts `(k, n_variables, n_bins)` in the bins of `histogram_bins`."""
        return tuple(self._hist_blocks)

    @property
    def value_blocks(self) -> tuple[ValueBlock, ...]:
        return tuple(self._value_blocks)

    @property
    def replica_blocks(self) -> tuple[ReplicaBlock, ...]:
        return tuple(self._replica_blocks)

    @property
    def scalar_blocks(self) -> tuple[ScalarBlock, ...]:
        """The loss and learning rate of the recorded steps, in `SCALARS` order."""
        return tuple(self._scalar_blocks)

    @property
    def noise_blocks(self) -> tuple[NoiseBlock, ...]:
        """The raw noise-scale estimates, in writing order (a step may have several)."""
        return tuple(self._noise_blocks)

    @property
    def alerts(self) -> Mapping[tuple[int, str, str], float]:
        """`(step, key, kind) -> value`, in the order they were added."""
        return MappingProxyType(self._alerts)

    @property
    def skipped(self) -> frozenset[int]:
        """The steps whose update a loss-scale optimizer skipped."""
        return frozenset(self._skipped)

    @property
    def guarded(self) -> frozenset[int]:
        """Of `skipped`, the steps whose update `on_nonfinite` kept from the model."""
        return frozenset(self._guarded)

    @property
    def origins(self) -> Mapping[int, tuple]:
        """`step -> (stage, layer, op, rows, samples, detail)`, by step."""
        return MappingProxyType(dict(sorted(self._origins.items())))

    @property
    def examples(self) -> Mapping[int, Examples]:
        """`step -> Examples`, by step."""
        return MappingProxyType(dict(sorted(self._examples.items())))

    @property
    def disconnected(self) -> tuple[str, ...]:
        """The keys of the variables that had no gradient, in the order found."""
        return tuple(self._disconnected)

    @property
    def superseded(self) -> tuple[Store, ...]:
        """The stores of the steps that a resumed run superseded, in writing order."""
        return tuple(self._superseded)

    def size(self, key: str) -> int:
        """The number of elements of a variable."""
        return int(np.prod(self._shapes[key], dtype=np.int64))

    def cached(self, name: str, build: Callable[[], T]) -> T:
        """`build()`, computed once until the next write to the store."""
        if name not in self._cache:
            self._cache[name] = build()
        return self._cache[name]

    # ----------------------------------------------------------------- writing
    def add_variables(self, keys: Sequence[str], shapes: Sequence[Sequence[int]]) -> np.ndarray:
        """Registers keys, given in model order, and returns their codes.

        A new key goes just before the next of `keys` that the store has (last where
        none follows), so that `variables` keeps model order when the trainable set
        grows (a frozen base unfrozen). The keys already there keep their relative
        order, so the codes of the recorded blocks are renumbered and stay sorted.

        Example:

        >>> store = Store(("norm",))
        >>> store.add_variables(["m/head/w"], [(1,)])
        array([0], dtype=int32)
        >>> store.append(np.array([0]), np.array([0]), np.array([0]), np.array([0], np.int32),
        ...              np.ones((1, 1, 1), np.float32), np.zeros((0,), np.int32),
        ...              np.zeros((1, 0), np.float32))
        >>> store.add_variables(["m/base/w", "m/base/b", "m/head/w"], [(2,), (2,), (1,)])
        array([0, 1, 2], dtype=int32)
        >>> store.variables, store.stat_blocks[0].codes
        (('m/base/w', 'm/base/b', 'm/head/w'), array([2], dtype=int32))
        """
        order = list(self._variables)
        position = {k: i for i, k in enumerate(order)}
        new: list[tuple[int, str]] = []  # (position of the next known key, key)
        following = len(order)
        for key in reversed(list(dict.fromkeys(keys))):
            if key in position:
                following = position[key]
            else:
                new.append((following, key))
        for at, key in sorted(new, key=lambda item: item[0], reverse=True):
            order.insert(at, key)  # later positions first, so earlier ones stay valid
        if len(order) != len(self._variables):
            self._renumber(order)
        for key, shape in zip(keys, shapes, strict=True):
            self._shapes[key] = tuple(int(d) for d in shape)
        self._cache.clear()
        return np.asarray([self._codes[k] for k in keys], dtype=np.int32)

    def _renumber(self, order: list[str]) -> None:
        """Makes `order` the variables' order, renumbering the codes in the blocks."""
        codes = {k: i for i, k in enumerate(order)}
        old_to_new = np.asarray([codes[k] for k in self._variables], np.int32)
        for block in (
            *self._stat_blocks,
            *self._hist_blocks,
            *self._value_blocks,
            *self._replica_blocks,
        ):
            block.codes = old_to_new[block.codes]
        self._variables, self._codes = order, codes

    def append(
        self,
        steps: np.ndarray,
        epochs: np.ndarray,
        batches: np.ndarray,
        stat_codes: np.ndarray,
        stats: np.ndarray,
        value_codes: np.ndarray,
        values: np.ndarray,
        hist: np.ndarray | None = None,
        replica_stats: np.ndarray | None = None,
        scalars: np.ndarray | None = None,
    ) -> None:
        """Appends k recorded steps: stats `(k, n_vars, n_stats)`, values `(k, total)`.

        `hist`, if given, holds `(k, n_vars, n_bins)` counts for the stat variables,
        `replica_stats` `(k, n_replicas, n_vars, n_stats)` local-gradient stats, and
        `scalars` `(k, len(SCALARS))` the steps' loss and learning rate.
        """
        if len(steps) == 0:
            return
        steps = np.asarray(steps, np.int64)
        epochs = np.asarray(epochs, np.int64)
        batches = np.asarray(batches, np.int64)
        if scalars is not None:
            self.append_scalars(steps, epochs, batches, scalars)
        if len(stat_codes):
            perm = np.argsort(stat_codes, kind="stable")
            if stats.shape[2]:
                self._stat_blocks.append(
                    StatBlock(steps, epochs, batches, stat_codes[perm], stats[:, perm, :])
                )
            if hist is not None:
                self._hist_blocks.append(
                    StatBlock(steps, epochs, batches, stat_codes[perm], hist[:, perm, :])
                )
            if replica_stats is not None:
                self.append_replicas(steps, epochs, batches, stat_codes, replica_stats)
        if len(value_codes):
            sizes = [self.size(self._variables[c]) for c in value_codes]
            offsets = np.concatenate([[0], np.cumsum(sizes)])
            perm = np.argsort(value_codes, kind="stable")
            cols = np.concatenate([np.arange(offsets[i], offsets[i + 1]) for i in perm]).astype(
                np.int64
            )
            self._value_blocks.append(
                ValueBlock(steps, epochs, batches, value_codes[perm], values[:, cols])
            )
        self._cache.clear()

    def append_replicas(
        self,
        steps: np.ndarray,
        epochs: np.ndarray,
        batches: np.ndarray,
        codes: np.ndarray,
        data: np.ndarray,
    ) -> None:
        """Appends the local-gradient stats `(k, n_replicas, n_vars, n_stats)` of k steps."""
        if not len(steps) or not data.shape[1] or not data.shape[3]:
            return
        perm = np.argsort(codes, kind="stable")
        self._replica_blocks.append(
            ReplicaBlock(
                np.asarray(steps, np.int64),
                np.asarray(epochs, np.int64),
                np.asarray(batches, np.int64),
                codes[perm],
                data[:, :, perm, :],
            )
        )
        self._cache.clear()

    def append_scalars(
        self, steps: np.ndarray, epochs: np.ndarray, batches: np.ndarray, data: np.ndarray
    ) -> None:
        """Appends the scalars `(k, len(SCALARS))` (NaN: none) of k steps."""
        data = np.asarray(data, np.float32)
        if not len(steps):
            return
        if data.shape != (len(steps), len(SCALARS)):
            raise ValueError(
                f"The scalars of {len(steps)} steps must have the shape "
                f"({len(steps)}, {len(SCALARS)}). Received: shape={data.shape}"
            )
        self._scalar_blocks.append(
            ScalarBlock(
                np.asarray(steps, np.int64),
                np.asarray(epochs, np.int64),
                np.asarray(batches, np.int64),
                data,
            )
        )
        self._cache.clear()

    def add_noise_rows(
        self, steps: np.ndarray, epochs: np.ndarray, batches: np.ndarray, data: np.ndarray
    ) -> None:
        """Appends k steps' raw noise-scale estimates `(k, len(NOISE_RAW))`; a later row
        for the same step wins (see `gradwatch._logdata.noise.noise_rows`)."""
        data = np.asarray(data, np.float32)
        if not len(steps):
            return
        if data.shape != (len(steps), len(NOISE_RAW)):
            raise ValueError(
                f"The noise-scale rows of {len(steps)} steps must have the shape "
                f"({len(steps)}, {len(NOISE_RAW)}). Received: shape={data.shape}"
            )
        self._noise_blocks.append(
            NoiseBlock(
                np.asarray(steps, np.int64),
                np.asarray(epochs, np.int64),
                np.asarray(batches, np.int64),
                data,
            )
        )
        self._cache.clear()

    def add_alerts(self, rows: Sequence[tuple[int, str, str, float]]) -> None:
        """Adds `(step, key, kind, value)` alerts; a later one for the same key wins."""
        for step, key, kind, value in rows:
            self._alerts[(int(step), key, kind)] = float(value)

    def add_skipped(self, steps: Sequence[int] | np.ndarray) -> None:
        """Marks steps whose update a loss-scale optimizer skipped."""
        self._skipped.update(int(s) for s in steps)

    def add_guarded(self, steps: Sequence[int] | np.ndarray) -> None:
        """Marks skipped steps whose update `on_nonfinite` kept from the model."""
        steps = [int(s) for s in steps]
        self._skipped.update(steps)
        self._guarded.update(steps)

    def add_origin(
        self,
        step: int,
        stage: str | None,
        layer: str | None,
        op: str | None,
        rows: Sequence[int],
        samples: Sequence[int] | None,
        detail: str,
    ) -> None:
        """Notes where a replay of `step` found its first NaN/Inf (`stage` None: it could
        not be replayed; `detail` says why)."""
        self._origins[int(step)] = (
            None if stage is None else str(stage),
            None if layer is None else str(layer),
            None if op is None else str(op),
            tuple(int(r) for r in rows),
            None if samples is None else tuple(int(r) for r in samples),
            str(detail),
        )

    def add_examples(
        self,
        step: int,
        rows: Sequence[int] | np.ndarray,
        samples: Sequence[int | None] | np.ndarray | None,
        losses: Sequence[float] | np.ndarray,
        grad_norms: Sequence[float] | np.ndarray,
    ) -> None:
        """Notes each example's loss and gradient norm in `step`: `rows` (in the batch),
        `samples` (their indices in the training data; None, or None and negative
        entries, where unknown), in one order; a step added again is replaced.

        Example:

        >>> store = Store(("norm",))
        >>> store.add_examples(7, [0, 1], None, [0.5, 9.0], [1.0, 30.0])
        >>> store.examples[7].grad_norms.tolist(), store.examples[7].samples.tolist()
        ([1.0, 30.0], [-1, -1])
        """
        rows = np.asarray(rows, np.int64).reshape(-1)
        m = len(rows)
        if samples is None:
            samples = np.full(m, -1, np.int64)
        else:
            samples = np.asarray([-1 if s is None else int(s) for s in samples], np.int64)
        losses = np.asarray(losses, np.float64).reshape(-1)
        grad_norms = np.asarray(grad_norms, np.float64).reshape(-1)
        if not len(samples) == len(losses) == len(grad_norms) == m:
            raise ValueError(
                "`rows`, `samples`, `losses` and `grad_norms` must have one entry per "
                f"example. Received lengths: {m}, {len(samples)}, {len(losses)}, "
                f"{len(grad_norms)}"
            )
        self._examples[int(step)] = Examples(rows, np.maximum(samples, -1), losses, grad_norms)
        self._cache.clear()

    def add_disconnected(self, keys: Sequence[str]) -> list[str]:
        """Marks variables as disconnected; returns those not marked before, in order."""
        new = [k for k in dict.fromkeys(keys) if k not in self._disconnected]
        self._disconnected.extend(new)
        return new

    def add_superseded(self, store: Store) -> None:
        """Keeps `store` among the superseded steps (see `superseded`)."""
        self._superseded.append(store)

    def split_from(self, step: int) -> Store:
        """Moves the recorded steps from `step` on (their rows, alerts and skipped marks)
        into a new store with this one's description, and returns it.

        Example:

        >>> store = Store(("norm",))
        >>> codes = store.add_variables(["m/w"], [(1,)])
        >>> store.append(np.arange(4), np.zeros(4), np.arange(4), codes,
        ...              np.ones((4, 1, 1), np.float32), codes[:0], np.zeros((4, 0), np.float32))
        >>> later = store.split_from(2)
        >>> store.stat_blocks[0].steps.tolist(), later.stat_blocks[0].steps.tolist()
        ([0, 1], [2, 3])
        """
        later = Store(self.stats, self.bins_per_decade, self.per_replica)
        later._variables, later._codes = list(self._variables), dict(self._codes)
        later._shapes, later._disconnected = dict(self._shapes), list(self._disconnected)
        for name in ("_stat_blocks", "_hist_blocks", "_value_blocks", "_replica_blocks"):
            kept, moved = _split(getattr(self, name), step)
            setattr(self, name, kept)
            setattr(later, name, moved)
        self._scalar_blocks, later._scalar_blocks = _split(self._scalar_blocks, step)
        self._noise_blocks, later._noise_blocks = _split(self._noise_blocks, step)
        later._alerts = {k: v for k, v in self._alerts.items() if k[0] >= step}
        self._alerts = {k: v for k, v in self._alerts.items() if k[0] < step}
        later._skipped = {s for s in self._skipped if s >= step}
        self._skipped -= later._skipped
        later._guarded = {s for s in self._guarded if s >= step}
        self._guarded -= later._guarded
        later._origins = {k: v for k, v in self._origins.items() if k >= step}
        self._origins = {k: v for k, v in self._origins.items() if k < step}
        later._examples = {k: v for k, v in self._examples.items() if k >= step}
        self._examples = {k: v for k, v in self._examples.items() if k < step}
        self._cache.clear()
        return later

    def since(self, step: int) -> Store:
        """A new store with this one's description and events, and the recorded steps
        from `step` on; this one is left as it is (a streamed log's live tail is cut
        from it).

        Example:

        >>> store = Store(("norm",))
        >>> codes = store.add_variables(["m/w"], [(1,)])
        >>> store.append(np.arange(4), np.zeros(4), np.arange(4), codes,
        ...              np.ones((4, 1, 1), np.float32), codes[:0], np.zeros((4, 0), np.float32))
        >>> store.since(3).stat_blocks[0].steps.tolist(), len(store.stat_blocks[0].steps)
        ([3], 4)
        """
        return self._copy(lambda blocks: _split(blocks, step)[1])

    def snapshot(self) -> Store:
        """A copy that shares the recorded arrays: writes to either store afterwards
        (appends, new variables) leave the other as it is. For reading a store in one
        thread while another one extends it."""
        copy = self._copy(lambda blocks: [replace(b) for b in blocks])
        copy._superseded = list(self._superseded)
        return copy

    def _copy(self, blocks_of: Callable[[list[Any]], list[Any]]) -> Store:
        """A store with this one's description and events, and each of its lists of
        blocks as `blocks_of` makes it from this one's."""
        copy = Store(self.stats, self.bins_per_decade, self.per_replica)
        copy._variables, copy._codes = list(self._variables), dict(self._codes)
        copy._shapes, copy._disconnected = dict(self._shapes), list(self._disconnected)
        for name in _BLOCK_LISTS:
            setattr(copy, name, blocks_of(getattr(self, name)))
        copy._alerts, copy._skipped = dict(self._alerts), set(self._skipped)
        copy._guarded, copy._origins = set(self._guarded), dict(self._origins)
        copy._examples = dict(self._examples)
        return copy

    def extend(self, other: Store) -> None:
        """Appends the recorded steps, variables and events of `other`, a later stretch
        of the same log (the next part of a streamed log), after this one's.

        Example:

        >>> first, later = Store(("norm",)), Store(("norm",))
        >>> for store, step in ((first, 0), (later, 1)):
        ...     codes = store.add_variables(["m/w"], [(1,)])
        ...     store.append(np.array([step]), np.zeros(1), np.array([step]), codes,
        ...                  np.ones((1, 1, 1), np.float32), codes[:0], np.zeros((1, 0)))
        >>> first.extend(later)
        >>> [b.steps.tolist() for b in first.stat_blocks]
        [[0], [1]]
        """
        if other.stats != self.stats or other.bins_per_decade != self.bins_per_decade:
            raise ValueError(
                f"A store of stats {list(other.stats)} cannot extend one of "
                f"{list(self.stats)}: a log holds one set of stats and histogram bins."
            )
        keys = other.variables
        codes = self.add_variables(keys, [other.shapes[k] for k in keys])
        none = np.zeros((0,), np.int32)
        for b in other.stat_blocks:
            k = len(b.steps)
            self.append(
                b.steps, b.epochs, b.batches, codes[b.codes], b.data, none, np.zeros((k, 0))
            )
        for b in other.hist_blocks:
            k, n = len(b.steps), len(b.codes)
            stats = np.zeros((k, n, 0), np.float32)
            self.append(
                b.steps, b.epochs, b.batches, codes[b.codes], stats, none, np.zeros((k, 0)), b.data
            )
        for b in other.value_blocks:
            k = len(b.steps)
            stats = np.zeros((k, 0, len(self.stats)), np.float32)
            self.append(b.steps, b.epochs, b.batches, none, stats, codes[b.codes], b.data)
        for b in other.replica_blocks:
            self.append_replicas(b.steps, b.epochs, b.batches, codes[b.codes], b.data)
        for b in other.scalar_blocks:
            self.append_scalars(b.steps, b.epochs, b.batches, b.data)
        for b in other.noise_blocks:
            self.add_noise_rows(b.steps, b.epochs, b.batches, b.data)
        self.add_alerts([(*key, value) for key, value in other.alerts.items()])
        self.add_skipped(sorted(other.skipped - other.guarded))
        self.add_guarded(sorted(other.guarded))
        self._origins.update(other.origins)
        self._examples.update(other.examples)
        self.add_disconnected(other.disconnected)
        self._cache.clear()

    def clear_blocks(self) -> None:
        """Forgets the recorded steps and examples (after they were written out); keeps
        the rest."""
        self._stat_blocks, self._hist_blocks, self._value_blocks = [], [], []
        self._replica_blocks, self._scalar_blocks = [], []
        self._noise_blocks = []
        self._examples = {}
        self._cache.clear()


#: A store's lists of recorded blocks, by attribute.
_BLOCK_LISTS = (
    "_stat_blocks",
    "_hist_blocks",
    "_value_blocks",
    "_replica_blocks",
    "_scalar_blocks",
    "_noise_blocks",
)


def _split(blocks: list[Any], step: int) -> tuple[list[Any], list[Any]]:
    """Blocks cut into the rows of steps before `step` and those from it on."""
    kept, moved = [], []
    for block in blocks:
        later = block.steps >= step
        if not later.all():
            kept.append(_rows(block, ~later))
        if later.any():
            moved.append(_rows(block, later))
    return kept, moved


def _rows(block: Any, mask: np.ndarray) -> Any:
    return replace(
        block,
        steps=block.steps[mask],
        epochs=block.epochs[mask],
        batches=block.batches[mask],
        data=block.data[mask],
    )
