"""TorchRec modules for multi-embedding CTR models (sparse arch over K sets, set interaction arches, over arch).

Drops into any TorchRec pipeline: nothing here imports ``multiembed.sharding`` or the trainer.

Example::

    from multiembed.models import MultiEmbeddingTrain, build_model

    model = build_model("dcnv2-me-4x", {"C1": 1000, "C2": 500})  # embedding tables on `meta`, for DMP
    train_module = MultiEmbeddingTrain(model)
"""

import multiembed.runtime.stack_check  # noqa: F401  (checks the TorchRec stack before any torchrec import)

from multiembed.models.interactions import (
    BatchedCrossNet,
    BatchedLowRankCrossNet,
    CompressedInteraction,
    FieldWeightedFM,
    PairwiseInnerProducts,
    TwoStreamMLP,
)
from multiembed.models.hetero import (
    COMBINERS,
    DEFAULT_EXPERTS,
    HETERO_EXPERTS,
    HeteroSetArch,
    SetGate,
    expert_groups,
    parse_experts,
    set_experts,
)
from multiembed.models.layers import BatchedLinear, SetBatchNorm, SetProjection
from multiembed.models.model import (
    DEFAULT_DIVERGENCE_REG_WEIGHT,
    DEFAULT_PROJECTION_REG_WEIGHT,
    DEFAULT_SPECTRAL_REG_WEIGHT,
    MultiEmbeddingModel,
    MultiEmbeddingTrain,
    SetDenseArch,
    spectral_regularizer,
    weighted_bce_with_logits,
)
from multiembed.models.names import (
    BACKBONES,
    BASE_SET_DIM,
    HETERO_BACKBONE,
    MODES,
    PAPER_SCALES,
    ModelSpec,
    model_names,
    parse_model_name,
)
from multiembed.models.over_arch import BilinearFusionOverArch, CINOverArch, MLPOverArch
from multiembed.models.set_arch import (
    PREPEND_CHOICES,
    CINSetArch,
    CrossSetArch,
    FieldAwareSetArch,
    FlatSetArch,
    FwFMSetArch,
    InnerProductSetArch,
    SetInteractionArch,
    TwoStreamSetArch,
)
from multiembed.models.sparse_arch import (
    INIT_SCHEMES,
    LAYOUTS,
    MultiEmbeddingSparseArch,
    PaddedUniformInit,
    TableSlice,
    build_sparse_arch,
    multi_embedding_tables,
    padded_set_dim,
)
from multiembed.models.zoo import BACKBONE_OPTIONS, build_model, build_over_arch, build_set_arch

__all__ = [
    "BACKBONES",
    "BACKBONE_OPTIONS",
    "BASE_SET_DIM",
    "COMBINERS",
    "DEFAULT_EXPERTS",
    "DEFAULT_DIVERGENCE_REG_WEIGHT",
    "DEFAULT_PROJECTION_REG_WEIGHT",
    "DEFAULT_SPECTRAL_REG_WEIGHT",
    "HETERO_BACKBONE",
    "HETERO_EXPERTS",
    "INIT_SCHEMES",
    "LAYOUTS",
    "MODES",
    "PAPER_SCALES",
    "PREPEND_CHOICES",
    "BatchedCrossNet",
    "BatchedLinear",
    "BatchedLowRankCrossNet",
    "BilinearFusionOverArch",
    "CINOverArch",
    "CINSetArch",
    "CompressedInteraction",
    "CrossSetArch",
    "FieldWeightedFM",
    "FieldAwareSetArch",
    "FlatSetArch",
    "FwFMSetArch",
    "HeteroSetArch",
    "InnerProductSetArch",
    "MLPOverArch",
    "ModelSpec",
    "MultiEmbeddingModel",
    "MultiEmbeddingSparseArch",
    "MultiEmbeddingTrain",
    "PaddedUniformInit",
    "PairwiseInnerProducts",
    "SetBatchNorm",
    "SetDenseArch",
    "SetGate",
    "SetInteractionArch",
    "SetProjection",
    "TableSlice",
    "TwoStreamMLP",
    "TwoStreamSetArch",
    "build_model",
    "build_over_arch",
    "build_set_arch",
    "build_sparse_arch",
    "expert_groups",
    "model_names",
    "multi_embedding_tables",
    "padded_set_dim",
    "parse_experts",
    "parse_model_name",
    "set_experts",
    "spectral_regularizer",
    "weighted_bce_with_logits",
]
