"""Sharding managed-collision tables: a row-wise plan built here and TorchRec's managed-collision sharder.

TorchRec shards a ``ManagedCollisionEmbeddingBagCollection`` row-wise only: each rank owns one bucket of every
table's rows and the remapping of the ids routed to it. On this stack (TorchRec 1.8, CPU, gloo) it runs with the
package's :class:`~multiembed.sharding.planner.CpuRowWiseEBCSharder` as the inner sharder (stock TorchRec offers no
CPU sharding type for it), the fused kernel (the dense kernel fails at the first eviction) and as many buckets as
ranks; the planner's proposals are not used, because it would offer nothing on CPU. :func:`plan_managed` writes
that plan directly.

Example::

    >>> import torch
    >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
    >>> from multiembed.models.managed import ManagedSpec, managed_collection
    >>> ebc = EmbeddingBagCollection([EmbeddingBagConfig(name="t_f", embedding_dim=8, num_embeddings=16,
    ...                                                   feature_names=["f"])], device=torch.device("meta"))
    >>> mc = managed_collection(ebc, ManagedSpec(table_rows=16, buckets=2))
    >>> plan = plan_managed(mc, world_size=2, local_world_size=2, device_type="cpu")
    >>> [s.shard_sizes for s in plan.plan[""]["t_f"].sharding_spec.shards]
    [[8, 8], [8, 8]]
"""

from __future__ import annotations

from typing import Any, Dict, List, Mapping, Optional

from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.mc_embeddingbag import (
    ManagedCollisionEmbeddingBagCollectionSharder,
    ShardedManagedCollisionEmbeddingBagCollection,
)
from torchrec.distributed.sharding_plan import construct_module_sharding_plan, row_wise
from torchrec.distributed.types import ModuleSharder, ShardingPlan
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection

from multiembed.models.managed import counting_modules, table_collection
from multiembed.sharding.planner import CpuRowWiseEBCSharder

MANAGED_DEVICE_TYPES = ("cpu",)


def managed_sharders(fused_params: Optional[Mapping[str, Any]] = None) -> List[ModuleSharder[nn.Module]]:
    """The sharders for DMP: TorchRec's managed-collision sharder over the package's CPU row-wise EBC sharder."""
    params = dict(fused_params) if fused_params else None
    return [ManagedCollisionEmbeddingBagCollectionSharder(ebc_sharder=CpuRowWiseEBCSharder(fused_params=params))]


def managed_collections(module: nn.Module) -> Dict[str, ManagedCollisionEmbeddingBagCollection]:
    """``{module path: collection}`` of every managed collection in ``module`` (``""`` for ``module`` itself)."""
    return {
        path: child for path, child in module.named_modules()
        if isinstance(child, ManagedCollisionEmbeddingBagCollection)
    }


def plan_managed(module: nn.Module, *, world_size: int, local_world_size: int, device_type: str) -> ShardingPlan:
    """The row-wise plan of every managed collection in ``module``: each table in ``world_size`` equal row shards
    (one bucket per rank), fused kernel.

    Raises:
        ValueError: no managed collection, a device other than CPU, or table rows that are not a multiple of the
            world size (one line).
    """
    if device_type not in MANAGED_DEVICE_TYPES:
        raise ValueError(
            f"--vocab managed runs on {', '.join(MANAGED_DEVICE_TYPES)} (gloo), as checked on this stack; got a "
            f"{device_type} device (use --device cpu)"
        )
    collections = managed_collections(module)
    if not collections:
        raise ValueError(f"{type(module).__name__} holds no managed-collision collection")
    sharder = managed_sharders()[0]
    plans = {}
    for path, collection in collections.items():
        per_table = {}
        for config in table_collection(collection).embedding_bag_configs():
            if config.num_embeddings % world_size:
                raise ValueError(
                    f"table {config.name}: {config.num_embeddings} rows are not a multiple of the world size "
                    f"{world_size} (--table-rows must be: one bucket of equal rows per rank)"
                )
            per_table[config.name] = row_wise(
                compute_kernel=EmbeddingComputeKernel.FUSED.value, num_buckets=world_size
            )
        plans[path] = construct_module_sharding_plan(
            collection, per_table, sharder=sharder, local_size=local_world_size, world_size=world_size,
            device_type=device_type,
        )
    return ShardingPlan(plans)


def close_intervals(module: nn.Module) -> int:
    """Ends the eviction interval of every managed table in ``module`` now (before a checkpoint: the keys seen since
    the last eviction are not module state) and resets the rows that changed hands, as an interval's end does.

    A sharded collection resets the weights and optimizer state of those rows at once, through TorchRec's own
    eviction step (``ShardedManagedCollisionEmbeddingBagCollection._evict``, as in its ``compute``); an unsharded one
    leaves them, as its forward does. Call it on every rank (each rank closes its own shards; no collective).

    Returns:
        The number of modules whose interval assigned rows.
    """
    closed = 0
    for child in module.modules():
        if isinstance(child, ShardedManagedCollisionEmbeddingBagCollection):
            collection = child._managed_collision_collection
            closed += sum(m.close_interval() for m in counting_modules(collection))
            child._evict(collection.evict())
        elif isinstance(child, ManagedCollisionEmbeddingBagCollection):
            collection = child._managed_collision_collection
            closed += sum(m.close_interval() for m in counting_modules(collection))
            collection.evict()
    return closed
