"""The plain-PyTorch baseline: ME-DCNv2 written the way the paper's public code writes it.

``thuml/Multi-Embedding`` (``torchfm/layer.py``, ``torchfm/model/awesome.py``: ``MultiDCNnew2``) builds a
multi-embedding model as K independent single-embedding models glued by a mean:

* one ``nn.Embedding(sum_i D_i, d)`` per set over all fields, a field's ids shifted by the field's row offset;
* a Python loop over the sets, each running its own cross network (4 full-rank layers) and its own first MLP layer
  (Linear -> BatchNorm -> ReLU -> Dropout, 400 units);
* the mean over sets, then the shared ``Linear(400, 400) -> BatchNorm -> ReLU -> Dropout -> Linear(400, 1)``;
* one dense ``torch.optim.Adam`` (lr 1e-3, weight decay 1e-6) over every parameter, the whole tables included.

The maths is exactly that of ``build_model("dcnv2-me-{K}x", ...)`` (:func:`copy_weights_from` loads our weights
and the two give the same logits). Two deliberate differences from the paper's file, both in the baseline's favour
or neutral: the cross layer's ``W x`` is ``F.linear`` (one GEMM per layer; the paper's ``torch.matmul(W,
x.unsqueeze(2))`` is the same maths) and the loss is ``binary_cross_entropy_with_logits`` (the paper applies a
sigmoid then ``BCELoss``; same value, more stable). Nothing else is tuned: this is the honest "plain PyTorch"
reference the package's speed is compared with.

The *savvy* baseline (:class:`SavvyTrainStep`) is the same model written the way a savvy PyTorch user would train
it: ``nn.Embedding(sparse=True)`` tables stepped by a sparse-gradient optimizer (only the looked-up rows are read and
written; :data:`SAVVY_TABLE_OPTIMIZERS`: ``SparseAdam`` by default, two fp32 moments per weight allocated whole at
the first step, or ``Adagrad`` / ``SGD`` to match the package's table optimizer) and ``Adam(fused=True)`` for the
rest, optionally with the dense part under ``torch.compile`` (:func:`compiled_forward`). The table optimizers have
no weight decay here (``SparseAdam`` has none; the dense parameters keep 1e-6).

Example::

    >>> baseline = PaperMultiDCNv2([100, 50], num_sets=2, set_dim=10, hidden=16)
    >>> baseline(torch.randint(0, 50, (8, 2))).shape
    torch.Size([8])
"""

from __future__ import annotations

from typing import Any, Callable, List, Optional, Sequence

import torch
import torch.nn.functional as F
from torch import nn


class FeaturesEmbedding(nn.Module):
    """One set's embeddings: a single ``nn.Embedding(sum_i D_i, d)``, field ``i``'s rows at offset ``sum_{j<i} D_j``.

    Initialised xavier-uniform over the whole ``[sum_i D_i, d]`` table (the paper's ``xavier_set``).

    Args:
        field_dims: ``[D_1, ..., D_F]``.
        embed_dim: d.
        sparse: sparse gradients (``nn.Embedding(sparse=True)``, for ``SparseAdam``: the savvy baseline).

    Example::

        >>> FeaturesEmbedding([10, 20], 4)(torch.tensor([[1, 2], [3, 4]])).shape
        torch.Size([2, 2, 4])
    """

    def __init__(self, field_dims: Sequence[int], embed_dim: int, sparse: bool = False) -> None:
        super().__init__()
        if not field_dims or min(field_dims) < 1 or embed_dim < 1:
            raise ValueError(f"field_dims must be non-empty and positive and embed_dim >= 1, got {list(field_dims)}, {embed_dim}")
        self.embedding = nn.Embedding(sum(field_dims), embed_dim, sparse=sparse)
        offsets = torch.tensor([0, *list(field_dims)[:-1]], dtype=torch.int64).cumsum(0)
        self.register_buffer("offsets", offsets, persistent=False)
        nn.init.xavier_uniform_(self.embedding.weight)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """
        Args:
            ids: ``[B, F]`` per-field ids.

        Returns:
            ``[B, F, d]``.
        """
        return self.embedding(ids + self.offsets.unsqueeze(0))


class CrossNetworkV2(nn.Module):
    r"""Full-rank DCNv2 cross network, :math:`x_{l+1} = x_0 \odot (W_l x_l + b_l) + x_l`, one ``[D, D]`` per layer.

    Args:
        input_dim: D = F * d.
        num_layers: 4 in the paper.

    Example::

        >>> CrossNetworkV2(390, 4)(torch.randn(8, 390)).shape
        torch.Size([8, 390])
    """

    def __init__(self, input_dim: int, num_layers: int) -> None:
        super().__init__()
        if input_dim < 1 or num_layers < 1:
            raise ValueError(f"input_dim and num_layers must be >= 1, got {input_dim}, {num_layers}")
        self.W = nn.ParameterList([nn.Parameter(torch.empty(input_dim, input_dim)) for _ in range(num_layers)])
        self.b = nn.ParameterList([nn.Parameter(torch.zeros(input_dim)) for _ in range(num_layers)])
        for weight in self.W:
            nn.init.xavier_uniform_(weight)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """
        Args:
            x: ``[B, D]``.

        Returns:
            ``[B, D]``.
        """
        x0 = x
        for weight, bias in zip(self.W, self.b):
            x = x0 * F.linear(x, weight, bias) + x
        return x


def mlp_block(in_features: int, out_features: int, dropout: float) -> List[nn.Module]:
    """Linear -> BatchNorm1d -> ReLU -> Dropout, the paper's ``MultiLayerPerceptron`` layer."""
    return [nn.Linear(in_features, out_features), nn.BatchNorm1d(out_features), nn.ReLU(), nn.Dropout(dropout)]


class PaperMultiDCNv2(nn.Module):
    """ME-DCNv2 as the paper's ``MultiDCNnew2``: K (embedding, cross, projection) branches looped in Python, the mean
    over sets, a shared MLP head. Returns logits.

    Args:
        field_dims: ``[D_1, ..., D_F]``.
        num_sets: K.
        set_dim: d.
        hidden: MLP width (400).
        dropout: dropout probability (0.2).
        cross_layers: cross layers per set (4).
        sparse: sparse embedding gradients (the savvy baseline, :class:`SavvyTrainStep`).

    Example::

        >>> model = PaperMultiDCNv2([100, 50, 7], num_sets=4, set_dim=10, hidden=32)
        >>> model(torch.randint(0, 7, (16, 3))).shape
        torch.Size([16])
    """

    def __init__(
        self,
        field_dims: Sequence[int],
        num_sets: int,
        set_dim: int,
        hidden: int = 400,
        dropout: float = 0.2,
        cross_layers: int = 4,
        sparse: bool = False,
    ) -> None:
        super().__init__()
        if num_sets < 1 or hidden < 1:
            raise ValueError(f"num_sets and hidden must be >= 1, got {num_sets}, {hidden}")
        self.field_dims = list(field_dims)
        self.num_sets = num_sets
        self.set_dim = set_dim
        self.input_dim = len(self.field_dims) * set_dim
        self.embeddings = nn.ModuleList(FeaturesEmbedding(self.field_dims, set_dim, sparse) for _ in range(num_sets))
        self.cns = nn.ModuleList(
            nn.Sequential(CrossNetworkV2(self.input_dim, cross_layers), *mlp_block(self.input_dim, hidden, dropout))
            for _ in range(num_sets)
        )
        self.mlp = nn.Sequential(*mlp_block(hidden, hidden, dropout), nn.Linear(hidden, 1))

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        """
        Args:
            ids: ``[B, F]`` per-field ids.

        Returns:
            logits ``[B]``.
        """
        per_set = [cn(embedding(ids).view(-1, self.input_dim)) for embedding, cn in zip(self.embeddings, self.cns)]
        return self.head(per_set)

    def head(self, per_set: List[torch.Tensor]) -> torch.Tensor:
        """The mean over sets and the shared MLP: K ``[B, hidden]`` -> logits ``[B]``."""
        return self.mlp(torch.stack(per_set, dim=-1).mean(dim=-1)).squeeze(1)

    def dense_forward(self, lookups: List[torch.Tensor]) -> torch.Tensor:
        """Everything after the lookups: K ``[B, F * d]`` (one per set) -> logits ``[B]``."""
        return self.head([cn(x) for cn, x in zip(self.cns, lookups)])

    @property
    def embedding_parameters(self) -> int:
        return sum(p.numel() for p in self.embeddings.parameters())

    @property
    def dense_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters()) - self.embedding_parameters


class PaperTrainStep:
    """One training step of the paper's loop: ``zero_grad``, forward, BCE on logits, backward, dense Adam.

    Args:
        model: the :class:`PaperMultiDCNv2`.
        lr: Adam learning rate (1e-3, the paper's).
        weight_decay: Adam weight decay (1e-6, the paper's).

    Example::

        >>> step = PaperTrainStep(PaperMultiDCNv2([10, 10], 2, 4, hidden=8))
        >>> loss = step(torch.randint(0, 10, (4, 2)), torch.tensor([0.0, 1.0, 1.0, 0.0]))
        >>> loss > 0
        True
    """

    def __init__(self, model: PaperMultiDCNv2, lr: float = 1e-3, weight_decay: float = 1e-6) -> None:
        self.model = model
        self.optimizer = torch.optim.Adam(model.parameters(), lr=lr, weight_decay=weight_decay)

    def __call__(self, ids: torch.Tensor, labels: torch.Tensor) -> float:
        self.model.train()
        self.model.zero_grad()
        loss = F.binary_cross_entropy_with_logits(self.model(ids), labels)
        loss.backward()
        self.step_optimizers()
        return float(loss.detach())

    @property
    def optimizers(self) -> List[torch.optim.Optimizer]:
        """Every optimizer of the step (one here)."""
        return [self.optimizer]

    def step_optimizers(self) -> None:
        """The optimizer part of a step (after backward)."""
        self.optimizer.step()

    def optimizer_state_bytes(self) -> int:
        """Bytes of the optimizers' state (Adam: both moments of every parameter once a step has run)."""
        return sum(
            value.numel() * value.element_size()
            for optimizer in self.optimizers
            for state in optimizer.state.values()
            for value in state.values()
            if isinstance(value, torch.Tensor)
        )


# The savvy baseline's table optimizers (sparse gradients), by the package's ``--sparse-optimizer`` names: the same
# update rule as the package's fused one where plain PyTorch has it (row-wise Adagrad it has not).
SAVVY_TABLE_OPTIMIZERS = ("adam", "adagrad", "sgd")
# FBGEMM's Adagrad epsilon (the package's table optimizer), also given to torch's.
ADAGRAD_EPS = 1e-8


def sparse_table_optimizer(name: str, tables: List[nn.Parameter], lr: float) -> torch.optim.Optimizer:
    """A plain-PyTorch optimizer for sparse-gradient tables: ``SparseAdam``, ``Adagrad`` or ``SGD``.

    Raises:
        ValueError: ``name`` is not in :data:`SAVVY_TABLE_OPTIMIZERS`.
    """
    if name == "adam":
        return torch.optim.SparseAdam(tables, lr=lr)
    if name == "adagrad":
        return torch.optim.Adagrad(tables, lr=lr, eps=ADAGRAD_EPS)
    if name == "sgd":
        return torch.optim.SGD(tables, lr=lr)
    raise ValueError(
        f"the savvy baseline has no plain-PyTorch table optimizer {name!r}; expected one of "
        f"{', '.join(SAVVY_TABLE_OPTIMIZERS)}"
    )


def compiled_forward(model: PaperMultiDCNv2) -> Callable[[torch.Tensor], torch.Tensor]:
    """``model``'s forward with everything after the lookups under ``torch.compile`` (the sparse-gradient lookups
    stay eager: AOTAutograd does not produce sparse gradients)."""
    dense = torch.compile(model.dense_forward)

    def forward(ids: torch.Tensor) -> torch.Tensor:
        return dense([embedding(ids).view(-1, model.input_dim) for embedding in model.embeddings])

    return forward


class SavvyTrainStep(PaperTrainStep):
    """The savvy plain-PyTorch step: sparse embedding gradients + a sparse-gradient table optimizer
    (:func:`sparse_table_optimizer`), ``Adam(fused=True)`` (one multi-tensor kernel per step) for the dense
    parameters; ``zero_grad`` drops gradients (``set_to_none``).

    Args:
        model: a :class:`PaperMultiDCNv2` built with ``sparse=True``.
        lr: the dense Adam's learning rate (1e-3, the paper's).
        weight_decay: the dense parameters' weight decay (1e-6); the tables get none.
        table_optimizer: ``adam`` (``SparseAdam``), ``adagrad`` or ``sgd``.
        table_lr: the tables' learning rate (None: ``lr``).
        compile: the dense part under ``torch.compile`` (:func:`compiled_forward`).

    Raises:
        ValueError: the model's tables do not have sparse gradients, or an unknown table optimizer.

    Example::

        >>> step = SavvyTrainStep(PaperMultiDCNv2([10, 10], 2, 4, hidden=8, sparse=True))
        >>> step(torch.randint(0, 10, (4, 2)), torch.tensor([0.0, 1.0, 1.0, 0.0])) > 0
        True
    """

    def __init__(
        self, model: PaperMultiDCNv2, lr: float = 1e-3, weight_decay: float = 1e-6, table_optimizer: str = "adam",
        table_lr: Optional[float] = None, compile: bool = False,
    ) -> None:
        if not all(e.embedding.sparse for e in model.embeddings):
            raise ValueError("SavvyTrainStep needs PaperMultiDCNv2(..., sparse=True)")
        self.model = model
        tables = list(model.embeddings.parameters())
        table_ids = {id(p) for p in tables}
        dense = [p for p in model.parameters() if id(p) not in table_ids]
        self.sparse_optimizer = sparse_table_optimizer(table_optimizer, tables, lr if table_lr is None else table_lr)
        self.optimizer = torch.optim.Adam(dense, lr=lr, weight_decay=weight_decay, fused=True)
        self.forward: Callable[[torch.Tensor], torch.Tensor] = compiled_forward(model) if compile else model

    def __call__(self, ids: torch.Tensor, labels: torch.Tensor) -> float:
        self.model.train()
        self.model.zero_grad(set_to_none=True)
        loss = F.binary_cross_entropy_with_logits(self.forward(ids), labels)
        loss.backward()
        self.step_optimizers()
        return float(loss.detach())

    @property
    def optimizers(self) -> List[torch.optim.Optimizer]:
        return [self.sparse_optimizer, self.optimizer]

    def step_optimizers(self) -> None:
        self.sparse_optimizer.step()
        self.optimizer.step()


@torch.no_grad()
def copy_weights_from(baseline: PaperMultiDCNv2, model: Any) -> None:
    """Loads a ``multiembed`` ME-DCNv2 (``build_model("dcnv2-me-{K}x", ...)``, unsharded, on CPU) into ``baseline``.

    Used to check that the baseline computes the same function as the package's model.

    Raises:
        ValueError: the shapes disagree (another backbone, K, d, F or width).
    """
    sparse, set_arch, over = model.sparse_arch, model.set_arch, model.over_arch
    k, d = sparse.num_sets, sparse.set_dim
    if (k, d, sparse.num_fields) != (baseline.num_sets, baseline.set_dim, len(baseline.field_dims)):
        raise ValueError(
            f"model has K={k}, d={d}, F={sparse.num_fields}; baseline has K={baseline.num_sets}, "
            f"d={baseline.set_dim}, F={len(baseline.field_dims)}"
        )
    for m, table in enumerate(sparse.weights_per_set()):
        baseline.embeddings[m].embedding.weight.copy_(torch.cat([table[f] for f in sparse.field_names], dim=0))
    crossnet, projection = set_arch.crossnet, set_arch.projection
    per_weight = k // crossnet.num_weight_sets
    hidden = projection.out_features
    for m, branch in enumerate(baseline.cns):
        cross, linear, norm = branch[0], branch[1], branch[2]
        for layer in range(crossnet.num_layers):
            cross.W[layer].copy_(crossnet.weights[layer][m // per_weight])
            cross.b[layer].copy_(crossnet.biases[layer][m // per_weight])
        group = m // (k // projection.linear.num_weight_sets)
        linear.weight.copy_(projection.linear.weight[group])
        linear.bias.copy_(projection.linear.bias[group])
        batch_norm = projection.norm.batch_norm
        channels = slice(m * hidden, (m + 1) * hidden)
        norm.running_mean.copy_(batch_norm.running_mean[channels])
        norm.running_var.copy_(batch_norm.running_var[channels])
        if batch_norm.affine:
            norm.weight.copy_(batch_norm.weight[channels])
            norm.bias.copy_(batch_norm.bias[channels])
        else:
            norm.weight.copy_(projection.norm.weight[group, 0])
            norm.bias.copy_(projection.norm.bias[group, 0])
    head = [module for module in over.layers]
    if len(head) != len(baseline.mlp):
        raise ValueError(f"over arch has {len(head)} modules, the baseline head {len(baseline.mlp)}")
    baseline.mlp.load_state_dict(nn.Sequential(*head).state_dict())


def dcnv2_step_flops(batch_size: int, num_sets: int, input_dim: int, hidden: int, cross_layers: int = 4) -> int:
    """Analytic GEMM FLOPs of one ME-DCNv2 training step (forward + backward), from the layer shapes.

    Every Linear-like layer ``[B, n] -> [B, m]`` costs ``2 B n m`` forward and twice that backward (input and weight
    gradients; the embeddings need the input gradient all the way down). Element-wise work (bias, Hadamard
    products, BatchNorm, ReLU, dropout) and the embedding lookups are not counted.

    Example::

        >>> round(dcnv2_step_flops(2048, 4, 390, 400) / 1e9, 1)
        39.5
    """
    def linear(n: int, m: int) -> int:
        return 3 * 2 * batch_size * n * m

    per_set = cross_layers * linear(input_dim, input_dim) + linear(input_dim, hidden)
    return num_sets * per_set + linear(hidden, hidden) + linear(hidden, 1)


__all__ = [
    "CrossNetworkV2",
    "FeaturesEmbedding",
    "PaperMultiDCNv2",
    "PaperTrainStep",
    "SAVVY_TABLE_OPTIMIZERS",
    "SavvyTrainStep",
    "compiled_forward",
    "copy_weights_from",
    "sparse_table_optimizer",
    "dcnv2_step_flops",
]
