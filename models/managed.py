"""Managed-collision tables: TorchRec's MCH modules map raw 63-bit ids to the rows of a fixed-size table.

A managed-mode dataset (``convert --vocab managed``) keeps every token as its key; a ``train --vocab managed`` run
wraps the sparse arch's ``EmbeddingBagCollection`` in TorchRec's ``ManagedCollisionEmbeddingBagCollection``, one
:class:`CountingMCHModule` (TorchRec's ``MCHManagedCollisionModule`` with counters) per table:

* a key that holds a row is looked up there; any other key, including every key first seen since the last
  eviction, shares the table's fallback row (the last row of each row-wise shard);
* every ``eviction_interval`` training steps the keys seen in the interval compete with the keys holding rows under
  the eviction policy (``lfu``: counts, ``lru``: last step seen); winners take free or evicted rows, whose weights
  and optimizer state are reset (sharded tables only: TorchRec's unsharded collection leaves them as they are);
* the remapping (sorted keys, their rows, the policy's counts) is module state, so it is in ``state_dict`` and in
  the checkpoints.

Example::

    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    >>> from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
    >>> ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_f", embedding_dim=4, num_embeddings=8,
    ...                                                   feature_names=["f"])])
    >>> mc = managed_collection(ebc, ManagedSpec(table_rows=8, eviction="lfu", eviction_interval=2))
    >>> kjt = KeyedJaggedTensor.from_lengths_sync(keys=["f"], values=torch.tensor([10**15, 7]),
    ...                                          lengths=torch.tensor([1, 1]))
    >>> _ = mc(kjt)  # step 1: both keys unseen, looked up in the fallback row
    >>> counts = managed_counts(mc)
    >>> counts["train_lookups"], counts["train_fallback"], counts["rows_in_use"]
    (2, 2, 0)
    >>> _ = mc(kjt)  # step 2: the interval ends before the lookup; both keys take free rows
    >>> counts = managed_counts(mc)
    >>> counts["train_fallback"], counts["rows_in_use"], counts["assigned"], counts["evictions"]
    (0, 2, 2, 0)
"""

from __future__ import annotations

import dataclasses
from typing import Any, Dict, Iterator, List, Optional

import torch
from torch import nn
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection
from torchrec.modules.mc_modules import (
    LFU_EvictionPolicy,
    LRU_EvictionPolicy,
    ManagedCollisionCollection,
    MCHEvictionPolicy,
    MCHManagedCollisionModule,
)
from torchrec.sparse.jagged_tensor import JaggedTensor

from multiembed.data.vocab import MANAGED_ID_SPACE

EVICTION_POLICIES = ("lfu", "lru")
# The counters every module keeps, summed over modules (and ranks) by managed_counts.
COUNTERS = ("train_lookups", "train_fallback", "eval_lookups", "eval_fallback", "assigned", "evictions")


@dataclasses.dataclass(frozen=True)
class ManagedSpec:
    """The managed tables of a run.

    Attributes:
        table_rows: rows of every field's table, the fallback row(s) included.
        eviction: ``lfu`` or ``lru``.
        eviction_interval: training steps between two evictions (new keys get rows only then).
        buckets: row-wise shards of every table (the world size; ``table_rows`` must be a multiple).

    Raises:
        ValueError: a policy other than lfu/lru, fewer than two rows per bucket, rows not a multiple of the buckets,
            or an interval below 1 (one line naming the option).
    """

    table_rows: int
    eviction: str = "lfu"
    eviction_interval: int = 100
    buckets: int = 1

    def __post_init__(self) -> None:
        if self.eviction not in EVICTION_POLICIES:
            raise ValueError(f"--eviction: expected one of {', '.join(EVICTION_POLICIES)}, got {self.eviction!r}")
        if self.eviction_interval < 1:
            raise ValueError(f"--eviction-interval: must be >= 1 step, got {self.eviction_interval}")
        if self.buckets < 1:
            raise ValueError(f"buckets: must be >= 1, got {self.buckets}")
        if self.table_rows % self.buckets:
            raise ValueError(
                f"--table-rows {self.table_rows}: must be a multiple of the world size {self.buckets} (each rank's "
                "row-wise shard of a managed table is one bucket of equal rows)"
            )
        if self.table_rows < 2 * self.buckets:
            raise ValueError(
                f"--table-rows {self.table_rows}: needs at least 2 rows per rank ({2 * self.buckets} on "
                f"{self.buckets} rank(s)): each shard keeps one fallback row for the ids without a row"
            )

    def policy(self) -> MCHEvictionPolicy:
        """A new eviction policy object of TorchRec's."""
        return LFU_EvictionPolicy() if self.eviction == "lfu" else LRU_EvictionPolicy()


class CountingMCHModule(MCHManagedCollisionModule):
    """TorchRec's ``MCHManagedCollisionModule`` that also counts what it does (plain attributes, not state).

    Counters (read and reset by :meth:`take_counts`): lookups and fallback hits in training and in evaluation, rows
    assigned at evictions, and evictions proper (assigned rows that held another key). TorchRec rebuilds the module
    per shard with ``type(self)(...)`` when it shards the collection, so the shards count too.

    Args:
        *args, **kwargs: those of ``MCHManagedCollisionModule``.
    """

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.counts: Dict[str, int] = dict.fromkeys(COUNTERS, 0)

    @property
    def fallback_row(self) -> int:
        """The (global) row every key without a row of its own is looked up in."""
        return self._output_global_offset + self._zch_size - 1

    def rows_in_use(self) -> int:
        """Rows of this module's range that hold a key (the fallback row excluded)."""
        return int(self._zch_size - 1 - int(self.open_slots().item()))

    def _owners(self) -> torch.Tensor:
        """The key owning each row of this module's range (``[zch_size]``, the int64 maximum where none)."""
        owners = torch.empty_like(self._mch_sorted_raw_ids)
        owners[self._mch_remapped_ids_mapping - self._output_global_offset] = self._mch_sorted_raw_ids
        return owners

    def _count_changes(self, before: torch.Tensor) -> None:
        """Counts the rows whose key changed since ``before`` (:meth:`_owners`): assigned rows, and evictions among
        them (rows that held another key)."""
        after = self._owners()
        free = torch.iinfo(torch.int64).max
        changed = (after != before) & (after != free)
        self.counts["assigned"] += int(changed.sum())
        self.counts["evictions"] += int((changed & (before != free)).sum())

    def _evicts_next(self) -> bool:
        """Whether the next training :meth:`profile` call ends an eviction interval."""
        if self._current_iter == -1:  # TorchRec starts counting from the checkpointed iteration at the first call
            return self._eviction_interval == 1
        return self._current_iter + 1 - self._last_eviction_iter == self._eviction_interval

    def profile(self, features: Dict[str, JaggedTensor]) -> Dict[str, JaggedTensor]:
        if not self.training or not self._evicts_next():
            return super().profile(features)
        before = self._owners()
        out = super().profile(features)
        self._count_changes(before)
        return out

    def remap(
        self,
        features: Dict[str, JaggedTensor],
        mutate_miss_lengths: bool = True,
        write_weights: Optional[torch.Tensor] = None,
    ) -> Dict[str, JaggedTensor]:
        out = super().remap(features, mutate_miss_lengths, write_weights)
        mode = "train" if self.training else "eval"
        for jt in out.values():
            values = jt.values()
            self.counts[f"{mode}_lookups"] += int(values.numel())
            self.counts[f"{mode}_fallback"] += int((values == self.fallback_row).sum())
        return out

    @torch.no_grad()
    def close_interval(self) -> bool:
        """Ends the current eviction interval now: the keys seen since the last eviction compete for rows as at an
        interval's end, and the next interval starts at this step. Returns whether rows were assigned (their
        embeddings must then be reset before they are read: the sharded collection does it in its next ``compute``,
        or :func:`close_intervals` at once).

        A checkpoint taken right after holds the whole remapping state (TorchRec keeps the keys seen in an interval
        in a buffer that is not part of ``state_dict``), so a resumed run continues exactly.
        """
        if self._current_iter < 0 or self._current_history_buffer_offset == 0:
            return False
        before = self._owners()
        self._coalesce_history()
        self._last_eviction_iter = self._current_iter
        self._count_changes(before)
        return bool(self._evicted)

    def take_counts(self) -> Dict[str, int]:
        """The counters since the last call, then zeroed."""
        counts, self.counts = self.counts, dict.fromkeys(COUNTERS, 0)
        return counts


def managed_collection(ebc: EmbeddingBagCollection, spec: ManagedSpec) -> ManagedCollisionEmbeddingBagCollection:
    """``ebc`` behind one :class:`CountingMCHModule` per table (``spec.table_rows`` rows each, the tables' size).

    Raises:
        ValueError: a table whose rows differ from ``spec.table_rows``.
    """
    configs = ebc.embedding_bag_configs()
    for config in configs:
        if config.num_embeddings != spec.table_rows:
            raise ValueError(f"table {config.name}: {config.num_embeddings} rows, the managed spec has {spec.table_rows}")
    modules = {
        config.name: CountingMCHModule(
            zch_size=spec.table_rows,
            device=ebc.device if ebc.device.type != "meta" else torch.device("cpu"),
            eviction_policy=spec.policy(),
            eviction_interval=spec.eviction_interval,
            input_hash_size=MANAGED_ID_SPACE,
            name=config.name,
            buckets=spec.buckets,
        )
        for config in configs
    }
    return ManagedCollisionEmbeddingBagCollection(
        ebc, ManagedCollisionCollection(modules, configs), return_remapped_features=False
    )


def table_collection(collection: nn.Module) -> nn.Module:
    """The module that holds the table weights: the ``EmbeddingBagCollection`` (or its sharded form) inside a managed
    collection (or its sharded form), else ``collection`` itself."""
    return getattr(collection, "_embedding_module", collection)


def counting_modules(module: nn.Module) -> Iterator[CountingMCHModule]:
    """Every :class:`CountingMCHModule` in ``module`` (shards of a sharded collection included)."""
    for child in module.modules():
        if isinstance(child, CountingMCHModule):
            yield child


def managed_counts(module: nn.Module, group: Optional[Any] = None) -> Dict[str, int]:
    """The counters of every managed module in ``module`` since the last call (then zeroed), summed over the modules
    and, when ``torch.distributed`` is initialised, over the ranks of ``group`` (a collective), plus
    ``rows_in_use`` and ``rows`` (all tables, the fallback rows excluded from ``rows_in_use``, included in
    ``rows``).
    """
    totals = dict.fromkeys(COUNTERS, 0)
    rows_in_use = rows = 0
    for child in counting_modules(module):
        for key, value in child.take_counts().items():
            totals[key] += value
        rows_in_use += child.rows_in_use()
        rows += int(child._zch_size)
    names: List[str] = [*COUNTERS, "rows_in_use", "rows"]
    values = torch.tensor([totals[k] for k in COUNTERS] + [rows_in_use, rows], dtype=torch.int64)
    if torch.distributed.is_available() and torch.distributed.is_initialized():
        torch.distributed.all_reduce(values, group=group)
    return {name: int(v) for name, v in zip(names, values.tolist())}


def remapping(module: nn.Module) -> Dict[str, "tuple[torch.Tensor, torch.Tensor]"]:
    """``{table: (keys, rows)}``: the keys that own rows (sorted int64) and their global rows, read from the managed
    modules in ``module`` (one process holding every shard, e.g. a run loaded on one rank for export).

    Raises:
        ValueError: a table whose rows are split over modules this process holds only some of.
    """
    found: Dict[str, "tuple[torch.Tensor, torch.Tensor]"] = {}
    for child in counting_modules(module):
        name = str(child._name)
        if name in found:
            raise ValueError(f"table {name}: several managed modules in this process; load the run on one rank")
        sorted_ids = child._mch_sorted_raw_ids.detach().cpu()
        owned = sorted_ids != torch.iinfo(torch.int64).max
        keys = sorted_ids[owned]
        rows = child._mch_remapped_ids_mapping.detach().cpu()[owned]
        order = torch.argsort(keys)
        found[name] = (keys[order], rows[order])
    return found
