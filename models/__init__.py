"""TorchRec modules for multi-embedding CTR models (sparse arch over K sets, set interaction arches, over arch).

Drops into any TorchRec pipeline: nothing here imports ``multiembed.sharding`` or the trainer.

Example::

    from multiembed.models import MultiEmbeddingTrain, build_model

    model = build_model("dcnv2-me-4x", {"C1": 1000, "C2": 500})  # embedding tables on `meta`, for DMP
    train_module = MultiEmbeddingTrain(model)
"""

from multiembed.data.stack import require_torchrec_stack

require_torchrec_stack()

from multiembed.models.interactions import (  # noqa: E402
    BatchedCrossNet,
    BatchedLowRankCrossNet,
    CompressedInteraction,
    FieldWeightedFM,
    PairwiseInnerProducts,
    TwoStreamMLP,
)
from multiembed.models.layers import BatchedLinear, SetBatchNorm, SetProjection  # noqa: E402
from multiembed.models.model import (  # noqa: E402
    DEFAULT_SPECTRAL_REG_WEIGHT,
    MultiEmbeddingModel,
    MultiEmbeddingTrain,
    SetDenseArch,
    spectral_regularizer,
    weighted_bce_with_logits,
)
from multiembed.models.names import (  # noqa: E402
    BACKBONES,
    BASE_SET_DIM,
    MODES,
    PAPER_SCALES,
    ModelSpec,
    model_names,
    parse_model_name,
)
from multiembed.models.over_arch import BilinearFusionOverArch, CINOverArch, MLPOverArch  # noqa: E402
from multiembed.models.set_arch import (  # noqa: E402
    PREPEND_CHOICES,
    CINSetArch,
    CrossSetArch,
    FlatSetArch,
    FwFMSetArch,
    InnerProductSetArch,
    SetInteractionArch,
    TwoStreamSetArch,
)
from multiembed.models.sparse_arch import (  # noqa: E402
    INIT_SCHEMES,
    LAYOUTS,
    MultiEmbeddingSparseArch,
    PaddedUniformInit,
    TableSlice,
    build_sparse_arch,
    multi_embedding_tables,
    padded_set_dim,
)
from multiembed.models.zoo import BACKBONE_OPTIONS, build_model, build_over_arch, build_set_arch  # noqa: E402

__all__ = [
    "BACKBONES",
    "BACKBONE_OPTIONS",
    "BASE_SET_DIM",
    "DEFAULT_SPECTRAL_REG_WEIGHT",
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
    "FlatSetArch",
    "FwFMSetArch",
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
    "SetInteractionArch",
    "SetProjection",
    "TableSlice",
    "TwoStreamMLP",
    "TwoStreamSetArch",
    "build_model",
    "build_over_arch",
    "build_set_arch",
    "build_sparse_arch",
    "model_names",
    "multi_embedding_tables",
    "padded_set_dim",
    "parse_model_name",
    "spectral_regularizer",
    "weighted_bce_with_logits",
]
