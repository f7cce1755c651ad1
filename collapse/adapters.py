"""Model adapters: the collapse metrics of a model zoo model, plain or wrapped by TorchRec / torch.distributed.

A model reaches the analysis as a bare :class:`~multiembed.models.MultiEmbeddingModel`, inside its train wrapper
:class:`~multiembed.models.MultiEmbeddingTrain`, or inside ``DistributedModelParallel`` (and the DDP it puts around
the dense part); :func:`unwrap_model` strips the distributed wrappers with TorchRec's own
``get_unwrapped_module`` and the train wrapper by its ``model`` attribute. The embedding collection's state dict gives
each rank its shards, whatever the sharding, and the first cross layer of a full-rank DCNv2 its sub-embedding maps.

Example::

    >>> import torch
    >>> from multiembed.collapse import collapse_from_model, unwrap_model
    >>> from multiembed.models import MultiEmbeddingTrain, build_model
    >>> model = build_model("dnn-me-2x", {"f1": 100, "f2": 50}, device=torch.device("cpu"), hidden=16)
    >>> unwrap_model(MultiEmbeddingTrain(model)) is model
    True
    >>> result = collapse_from_model(MultiEmbeddingTrain(model))
    >>> result.num_sets, result.fields, result.sub_embedding is None
    (2, ['f1', 'f2'], True)
"""

from __future__ import annotations

from typing import Any, Optional

import torch
import torch.distributed as dist
from torch import nn
from torchrec.distributed.model_parallel import get_unwrapped_module

from multiembed.collapse.result import CollapseResult
from multiembed.collapse.shards import local_shards_from_tensors
from multiembed.collapse.streaming import collapse_from_sharded
from multiembed.models.interactions import BatchedCrossNet
from multiembed.models.managed import table_collection
from multiembed.models.model import MultiEmbeddingModel, MultiEmbeddingTrain
from multiembed.models.set_arch import CrossSetArch, FieldAwareSetArch


def unwrap_model(model: nn.Module) -> MultiEmbeddingModel:
    """The model zoo's model inside ``DistributedModelParallel`` / DDP / FSDP and ``MultiEmbeddingTrain``.

    Args:
        model: a :class:`~multiembed.models.MultiEmbeddingModel`, its
            :class:`~multiembed.models.MultiEmbeddingTrain`, or either wrapped by TorchRec's
            ``DistributedModelParallel`` (sharded in place: the returned model holds the sharded embedding
            collection).

    Returns:
        the :class:`~multiembed.models.MultiEmbeddingModel`.

    Raises:
        ValueError: when no ``MultiEmbeddingModel`` is inside.

    Example::

        >>> import torch
        >>> from multiembed.collapse import unwrap_model
        >>> from multiembed.models import MultiEmbeddingTrain, build_model
        >>> model = build_model("dnn-se-1x", {"f1": 10}, device=torch.device("cpu"), hidden=8)
        >>> unwrap_model(MultiEmbeddingTrain(model)) is model
        True
    """
    inner = get_unwrapped_module(model)  # DMP, and the DDP / FSDP that DMP puts around the dense part
    if isinstance(inner, MultiEmbeddingTrain):
        inner = get_unwrapped_module(inner.model)
    if not isinstance(inner, MultiEmbeddingModel):
        raise ValueError(
            f"{type(model).__name__}: expected a MultiEmbeddingModel, a MultiEmbeddingTrain, or a "
            f"DistributedModelParallel / DDP of one; found a {type(inner).__name__} inside"
        )
    return inner


def first_cross_weights(model: nn.Module) -> Optional[torch.Tensor]:
    """The first full-rank cross layer's weight per set over the categorical fields only.

    The dense arch's field (DLRM-style models) comes last in the cross input, so its block is cut off.

    Args:
        model: a model zoo model, possibly wrapped (see :func:`unwrap_model`).

    Returns:
        ``[K, F*d, F*d]``, or None for a model without one (every backbone but DCNv2; low-rank DCN has no
        ``W_{i->j}`` blocks).

    Example::

        >>> import torch
        >>> from multiembed.collapse import first_cross_weights
        >>> from multiembed.models import build_model
        >>> model = build_model("dcnv2-me-2x", {"f1": 100, "f2": 50}, device=torch.device("cpu"), hidden=16)
        >>> first_cross_weights(model).shape  # K = 2, F * d = 2 * 10
        torch.Size([2, 20, 20])
    """
    model = unwrap_model(model)
    set_arch = model.set_arch
    if not isinstance(set_arch, CrossSetArch) or not isinstance(set_arch.crossnet, BatchedCrossNet):
        return None
    width = model.sparse_arch.num_fields * model.sparse_arch.set_dim
    return set_arch.cross_weights(0)[:, :width, :width]


def field_pair_maps(model: nn.Module) -> Optional[torch.Tensor]:
    r"""The maps by which each field sees every other, per set, over the categorical fields: DCNv2's first cross
    layer (:func:`first_cross_weights`), or FFM's sub-embedding selections
    (:meth:`~multiembed.models.interactions.FieldAwareInnerProducts.sub_embedding_maps`, the same for every set).

    Returns:
        ``[K, F*d, F*d]`` (block ``(j, i)`` maps field ``i`` to what field ``j`` sees), or None for other backbones.

    Example::

        >>> import torch
        >>> from multiembed.collapse import field_pair_maps
        >>> from multiembed.models import build_model
        >>> model = build_model("ffm-se-1x4", {"f1": 100, "f2": 50, "f3": 20}, device=torch.device("cpu"), hidden=8)
        >>> field_pair_maps(model).shape  # K = 1, F * d = 3 * 4
        torch.Size([1, 12, 12])
    """
    inner = unwrap_model(model)
    set_arch = inner.set_arch
    if not isinstance(set_arch, FieldAwareSetArch):
        return first_cross_weights(inner)
    width = inner.sparse_arch.num_fields * inner.sparse_arch.set_dim
    maps = set_arch.products.sub_embedding_maps()[:width, :width]
    return maps.unsqueeze(0).expand(inner.sparse_arch.num_sets, -1, -1)


def collapse_from_model(
    model: nn.Module, *, group: Optional[dist.ProcessGroup] = None, sub_embedding: bool = True, **options: Any
) -> CollapseResult:
    """Collapse metrics of a model zoo model, unsharded or sharded by DistributedModelParallel.

    A collective when ``torch.distributed`` is initialised: every rank calls it. Sharded tables (row-, column-,
    table-wise) contribute each rank's local shards; replicated tables (unsharded model, data-parallel tables)
    count once (rank 0's copy). Sub-embedding IA is added for full-rank DCNv2 and FFM (:func:`field_pair_maps`).

    Args:
        model: a ``MultiEmbeddingModel`` (or its ``MultiEmbeddingTrain``, or a DMP / DDP wrapping either),
            embeddings materialised.
        group: the process group (default: the default group when initialised, else this process alone).
        sub_embedding: compute the sub-embedding IA when the model has field-pair maps (DCNv2's full-rank cross
            layer, FFM's sub-embeddings).
        **options: as for :func:`~multiembed.collapse.collapse_from_sharded` (``row_normalized``, ``concat``,
            ``random_init_seed``, ``chunk_rows``, ``device``, ``progress``).

    Returns:
        the :class:`~multiembed.collapse.CollapseResult`, identical on every rank.

    Example::

        >>> import torch
        >>> from multiembed.collapse import collapse_from_model
        >>> from multiembed.models import build_model
        >>> model = build_model("dcnv2-me-2x", {"f1": 100, "f2": 50}, device=torch.device("cpu"), hidden=16)
        >>> result = collapse_from_model(model)
        >>> sorted(result.sets[0]), result.sub_embedding[0]["fields"]  # sub_embedding[k]["ia"]: [F, F]
        (['f1', 'f2'], ['f1', 'f2'])
    """
    if "cross_weights" in options or "cross_fields" in options:
        raise ValueError("collapse_from_model reads the cross weights from the model; use sub_embedding=False to skip")
    model = unwrap_model(model)
    sparse_arch = model.sparse_arch
    state = table_collection(sparse_arch.embedding_bag_collection).state_dict()
    tables = {}
    for name in sparse_arch.table_names:
        key = f"embedding_bags.{name}.weight"
        if key not in state:
            raise ValueError(f"table {name!r}: {key} is not in the embedding collection's state dict")
        tables[name] = state[key]
    distributed = dist.is_available() and dist.is_initialized()
    rank = dist.get_rank(group) if distributed else 0
    cross = field_pair_maps(model) if sub_embedding else None
    return collapse_from_sharded(
        local_shards_from_tensors(tables, rank=rank),
        sparse_arch.table_layout,
        group=group,
        cross_weights=None if cross is None else list(cross),
        cross_fields=None if cross is None else list(sparse_arch.field_names),
        **options,
    )
