"""The model zoo: a model name -> a built :class:`~multiembed.models.model.MultiEmbeddingModel`.

Each backbone in the SE and ME forms of the paper's code (``thuml/Multi-Embedding``, ``torchfm/model``), hidden
width ``H`` (400) and dropout (0.2) as there. Per set (SE: K = 1):

======== ============================================================ ==================================
backbone set branch ``P_m(I_m(e))``                                    shared over arch
======== ============================================================ ==================================
dnn      concat -> proj                                                MLP(H -> H) -> 1
dcnv2    4 full-rank cross layers on concat -> proj                    MLP(H -> H) -> 1
dcnv2lr  3 low-rank (r = 512) cross layers (TorchRec) -> proj          MLP(H -> H) -> 1
ipnn     SE: [concat, inner products] -> proj; ME: products -> proj    MLP(H -> H) -> 1
nfwfm    sum_ij r_ij e_i*e_j -> BN -> Dropout -> proj (d = 50)         MLP(H -> H) -> 1
xdeepfm  CIN (16, 16) features; concat -> proj                         Linear(32 -> 1) + MLP(H -> H) -> 1
finalmlp two streams MLP(F*d -> H -> H)                                bilinear fusion -> 1
dlrm     [dense field,] pairwise dots -> proj (d = 16)                 MLP(H -> H) -> 1
======== ============================================================ ==================================

``proj`` is Linear -> BatchNorm -> ReLU -> Dropout to ``H`` (the SE model's first MLP layer); the branch outputs are
averaged over sets before the over arch (or weighted by a learned gate, ``combiner="gate"``). ``hetero-me-{s}x``
(:mod:`multiembed.models.hetero`) gives the ``s`` sets different experts (option ``experts``, default dcnv2, ipnn,
nfwfm, dnn, cycled), each kind's sets batched as that backbone's ME arch, and the MLP over arch. ME with K = 1 is SE
for every backbone but IPNN (the paper's ME branch drops the embeddings), where ``ipnn-me-1x`` and ``ipnn-se-1x``
differ. ``mesi`` shares one branch (weights and BatchNorm affine parameters) across the sets.

Each backbone is one module of :mod:`multiembed.models.backbones` registering its set arch, over arch and options;
this module builds any of them the same way.
"""

from __future__ import annotations

from typing import Any, Dict, Mapping, Optional, Sequence, Union

import torch
from torch import nn

from multiembed.models.backbones import REGISTRY, SetArchContext, get_backbone
from multiembed.config.choices import Combiner
from multiembed.models.hetero import SetGate
from multiembed.models.model import MultiEmbeddingModel, SetDenseArch
from multiembed.models.names import ModelSpec, parse_model_name
from multiembed.models.set_arch import SetInteractionArch
from multiembed.models.sparse_arch import build_sparse_arch

DEFAULT_HIDDEN = 400
DEFAULT_DROPOUT = 0.2
DEFAULT_DENSE_ARCH_LAYER_SIZES = (512, 256)

# Backbone options (build_model's **backbone_overrides) and their defaults; None means "depends on the mode".
BACKBONE_OPTIONS: Dict[str, Mapping[str, Any]] = {name: backbone.options for name, backbone in REGISTRY.items()}


def build_set_arch(
    spec: ModelSpec,
    num_fields: int,
    *,
    hidden: int = DEFAULT_HIDDEN,
    dropout: float = DEFAULT_DROPOUT,
    dense_field: bool = False,
    device: Optional[torch.device] = None,
    **backbone_overrides: Any,
) -> SetInteractionArch:
    """The set interaction arch of ``spec`` over ``num_fields`` fields (the dense field, if any, included).

    Args:
        spec: the parsed model name.
        num_fields: F (+1 with a dense arch).
        hidden: projection width H.
        dropout: dropout probability.
        dense_field: the last field is the dense arch's output (DLRM concatenates it to its dot products).
        device: where the parameters live.
        **backbone_overrides: options of :data:`BACKBONE_OPTIONS` for this backbone (its module of
            :mod:`multiembed.models.backbones`).

    Example::

        >>> arch = build_set_arch(parse_model_name("dcnv2-me-4x"), num_fields=39)
        >>> arch.crossnet.weights[0].shape
        torch.Size([4, 390, 390])
    """
    backbone = get_backbone(spec.backbone)
    options = backbone.resolve_options(spec.name, backbone_overrides)
    groups = 1 if spec.shared_interaction else spec.num_sets
    ctx = SetArchContext(spec.num_sets, spec.set_dim, num_fields, groups, spec.mode, hidden, dropout, dense_field,
                         device)
    return backbone.set_arch(ctx, options)


def build_over_arch(
    spec: ModelSpec,
    set_arch: SetInteractionArch,
    *,
    hidden: int = DEFAULT_HIDDEN,
    dropout: float = DEFAULT_DROPOUT,
    over_layer_sizes: Optional[Sequence[int]] = None,
    device: Optional[torch.device] = None,
) -> nn.Module:
    """The shared head of ``spec`` over ``set_arch``'s averaged output.

    Args:
        spec: the parsed model name.
        set_arch: the set arch whose ``output_dim`` the head reads.
        hidden: hidden width (default layers ``(hidden,)``).
        dropout: dropout probability.
        over_layer_sizes: hidden widths of the MLP head (default ``(hidden,)``); not for FinalMLP.
        device: where the parameters live.

    Example::

        >>> spec = parse_model_name("dnn-me-2x")
        >>> build_over_arch(spec, build_set_arch(spec, num_fields=39)).in_features
        400
    """
    layers = (hidden,) if over_layer_sizes is None else tuple(over_layer_sizes)
    return get_backbone(spec.backbone).over_arch(set_arch, layers, dropout, device)


def build_model(
    name: Union[str, ModelSpec],
    vocab_sizes: Union[Mapping[str, int], Any],
    num_dense: int = 0,
    *,
    device: Optional[torch.device] = torch.device("meta"),
    dense_device: Optional[torch.device] = None,
    hidden: int = DEFAULT_HIDDEN,
    dropout: float = DEFAULT_DROPOUT,
    layout: str = "fused",
    init: str = "xavier_set",
    precision: str = "fp32",
    table_dtype: str = "fp32",
    combiner: str = "mean",
    **backbone_overrides: Any,
) -> MultiEmbeddingModel:
    """Builds the named model, e.g. ``build_model("dcnv2-me-4x", meta.vocab_sizes)``.

    Args:
        name: ``{backbone}-{se|me|mesi}-{s}x[width]`` (:func:`~multiembed.models.names.parse_model_name`) or a
            :class:`ModelSpec`.
        vocab_sizes: ``{field: rows}`` in schema order (the KJT keys), or anything with a ``vocab_sizes``
            attribute (``DatasetMetadata``, ``DatasetPreset``).
        num_dense: > 0 adds the DLRM-style dense arch for that many raw dense features (one extra field per set).
        device: where the embedding tables are built; ``meta`` (default) for DMP to materialise them.
        dense_device: where the dense arches are built (default: ``device``, or CPU when ``device`` is ``meta``;
            DMP moves them to its device).
        hidden: projection and over-arch width (400 in the paper).
        dropout: dropout probability (0.2 in the paper).
        layout: ``fused`` (one table per field, width ``K * stored``) or ``per_set`` (``K * F`` tables).
        init: embedding initialisation, ``xavier_set`` (the paper's), ``xavier_field`` or ``torchrec``.
        precision: the dense arches' compute precision, ``fp32`` or ``bf16`` (bf16 autocast, fp32 master weights;
            :mod:`multiembed.models.precision`).
        table_dtype: the tables' storage dtype, ``fp32`` or ``fp16`` (fp32 lookups out; no fp32 master copy).
        combiner: how the sets' outputs are combined: ``mean`` (the paper) or ``gate`` (a learned softmax gate,
            :class:`~multiembed.models.hetero.SetGate`).
        **backbone_overrides: ``cross_layers`` (dcnv2 4, dcnv2lr 3), ``cross_rank`` (dcnv2lr, 512),
            ``pair_scales`` (dcnv2, False: a learnable scalar per field-pair map of the first cross layer),
            ``include_embeddings`` (ipnn; default True for SE, False for ME/MESI, as the paper's code),
            ``cin_layer_sizes`` (xdeepfm, (16, 16)), ``stream_layer_sizes`` (finalmlp, (hidden, hidden)),
            ``over_layer_sizes`` (all but finalmlp, (hidden,)), ``dense_arch_layer_sizes`` ((512, 256)),
            ``stored_set_dim`` (default d padded to a multiple of 4; d itself builds the unpadded reference),
            ``experts`` (hetero: the experts cycled over the sets, default ``("dcnv2", "ipnn", "nfwfm", "dnn")``).

    Returns:
        the :class:`MultiEmbeddingModel`.

    Raises:
        ValueError: an unknown name, option, layout or init; inconsistent sizes.

    Example::

        >>> model = build_model("dcnv2-me-4x", {"f1": 100, "f2": 50}, device=torch.device("cpu"))
        >>> model.sparse_arch.num_sets, model.sparse_arch.set_dim, model.sparse_arch.stored_set_dim
        (4, 10, 12)
        >>> model.embedding_params
        6000
        >>> hetero = build_model("hetero-me-4x", {"f1": 100, "f2": 50}, device=torch.device("cpu"),
        ...                      experts=("dcnv2", "ipnn"), combiner="gate")
        >>> hetero.set_arch.set_kinds
        ['dcnv2', 'dcnv2', 'ipnn', 'ipnn']
    """
    spec = name if isinstance(name, ModelSpec) else parse_model_name(name)
    sizes: Mapping[str, int] = getattr(vocab_sizes, "vocab_sizes", vocab_sizes)
    if not isinstance(sizes, Mapping):
        raise ValueError(f"vocab_sizes must map field names to row counts, got {type(vocab_sizes).__name__}")
    if num_dense < 0:
        raise ValueError(f"num_dense must be >= 0, got {num_dense}")
    if hidden < 1:
        raise ValueError(f"hidden must be >= 1, got {hidden}")
    Combiner.parse(combiner, "combiner")
    backbone = get_backbone(spec.backbone)
    options = backbone.resolve_options(spec.name, backbone_overrides)
    if dense_device is None:
        dense_device = torch.device("cpu") if device is None or torch.device(device).type == "meta" else device
    sparse_arch = build_sparse_arch(
        sizes, spec.num_sets, spec.set_dim, layout=layout, init=init, device=device,
        stored_set_dim=options.get("stored_set_dim"), table_dtype=table_dtype,
    )
    dense_arch = None
    if num_dense > 0:
        layer_sizes = options.get("dense_arch_layer_sizes") or DEFAULT_DENSE_ARCH_LAYER_SIZES
        dense_arch = SetDenseArch(num_dense, layer_sizes, spec.num_sets, spec.set_dim, device=dense_device)
    set_arch = build_set_arch(
        spec, sparse_arch.num_fields + (1 if dense_arch is not None else 0), hidden=hidden, dropout=dropout,
        dense_field=dense_arch is not None, device=dense_device,
        **{key: value for key, value in options.items() if key in backbone.options},
    )
    over_arch = build_over_arch(spec, set_arch, hidden=hidden, dropout=dropout,
                                over_layer_sizes=options.get("over_layer_sizes"), device=dense_device)
    set_gate = None
    if combiner == "gate":
        set_gate = SetGate(spec.num_sets, set_arch.num_fields, spec.set_dim, device=dense_device)
    return MultiEmbeddingModel(sparse_arch, set_arch, over_arch, dense_arch, precision=precision, set_gate=set_gate)
