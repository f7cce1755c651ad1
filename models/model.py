"""The multi-embedding CTR model (sparse arch -> set interaction arch -> mean over sets -> over arch) and its
train wrapper, in the decomposition of TorchRec's ``torchrec/models/dlrm.py``.
"""

from __future__ import annotations

from typing import Any, List, Optional, Sequence, Tuple

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.modules.mlp import MLP
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from multiembed.models.hetero import SetGate
from multiembed.models.precision import compute_dtype, dense_autocast
from multiembed.models.regularizers import ProjectionRegularizer, SetDivergencePenalty, first_cross_net
from multiembed.models.set_arch import SetInteractionArch
from multiembed.models.sparse_arch import MultiEmbeddingSparseArch

# The paper's code's regulariser weight (its ablation sweeps 1e-3 .. 1e-5); MultiEmbeddingTrain defaults to off.
DEFAULT_SPECTRAL_REG_WEIGHT = 1e-4
# The paper's code's weight of the projection regulariser (its regularised DCNv2; it also runs 1e-5).
DEFAULT_PROJECTION_REG_WEIGHT = 1e-4
# The set divergence penalty's weight where none is given: the middle of the paper's Fig. 8(d) sweep (1e-4 .. 1e-2).
DEFAULT_DIVERGENCE_REG_WEIGHT = 1e-3


class SetDenseArch(nn.Module):
    """DLRM's dense arch for raw dense features, one output field per set: ``[B, num_dense] -> [B, K, d]``.

    TorchRec's ReLU ``MLP`` with widths ``layer_sizes + [K * d]``; set ``m``'s dense "embedding" is columns
    ``[m*d, (m+1)*d)``, joined to that set's fields as one more field (the last).

    Args:
        in_features: number of dense features.
        layer_sizes: hidden widths before the ``K * d`` output.
        num_sets: K.
        set_dim: d.
        device: where the parameters live.

    Example::

        >>> arch = SetDenseArch(13, [512, 256], num_sets=4, set_dim=10)
        >>> arch(torch.rand(32, 13)).shape
        torch.Size([32, 4, 10])
    """

    def __init__(
        self,
        in_features: int,
        layer_sizes: Sequence[int],
        num_sets: int,
        set_dim: int,
        device: Optional[torch.device] = None,
    ) -> None:
        super().__init__()
        if min(in_features, num_sets, set_dim) < 1 or any(h < 1 for h in layer_sizes):
            raise ValueError(
                f"in_features, num_sets, set_dim and layer_sizes must be positive, got {in_features}, {num_sets}, "
                f"{set_dim}, {list(layer_sizes)}"
            )
        self.in_features = in_features
        self.num_sets = num_sets
        self.set_dim = set_dim
        self.mlp = MLP(in_features, list(layer_sizes) + [num_sets * set_dim], bias=True, activation="relu",
                       device=device)

    def forward(self, dense_features: torch.Tensor) -> torch.Tensor:
        """
        Args:
            dense_features: ``[B, in_features]``.

        Returns:
            ``[B, K, d]``.
        """
        return self.mlp(dense_features).view(-1, self.num_sets, self.set_dim)


def append_field(embeddings: torch.Tensor, extra: torch.Tensor) -> torch.Tensor:
    """``[B, K, F, d]`` + ``[B, K, d]`` -> ``[B, K, F+1, d]`` (the extra field last), kept in set-major storage."""
    joined = torch.cat([embeddings.transpose(0, 1), extra.transpose(0, 1).unsqueeze(2)], dim=2)
    return joined.transpose(0, 1)


class MultiEmbeddingDensePath(nn.Module):
    """The dense path of a multi-embedding model: pooled embeddings (and raw dense features) -> logits.

    Dense arch (its output joined as the last field), set arch, mean over sets (or the learned gate), over arch. A
    subclass assigns the four modules: :class:`MultiEmbeddingModel` after its sparse arch, and the serving export
    (:class:`multiembed.serving.export.DenseHead`) as copies of a trained model's, so both run this one forward.

    Attributes:
        dense_arch: optional :class:`SetDenseArch` (None: no raw dense features).
        set_arch: the set-specific branches, ``[B, K, F', d] -> [B, K, O]``.
        over_arch: the shared head, ``[B, O] -> [B]``.
        set_gate: optional :class:`~multiembed.models.hetero.SetGate` (None: the mean over sets).
    """

    dense_arch: Optional[SetDenseArch]
    set_arch: SetInteractionArch
    over_arch: nn.Module
    set_gate: Optional[SetGate]

    def dense_forward(self, dense_features: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            dense_features: ``[B, num_dense]`` (ignored without a dense arch).
            embeddings: ``[B, K, F, d]`` pooled embeddings.

        Returns:
            logits ``[B]``.
        """
        fields = embeddings
        if self.dense_arch is not None:
            fields = append_field(embeddings, self.dense_arch(dense_features))
        per_set = self.set_arch(fields)
        if self.set_gate is not None:
            return self.over_arch(self.set_gate(per_set, fields))
        # The mean over sets as sum then divide: the same values as ``mean`` (which is that on CPU), but backward
        # hands the set arch a broadcast view of the [B, H] gradient instead of writing a [B, K, H] copy.
        return self.over_arch(per_set.sum(dim=1).div(self.set_arch.num_sets))


class MultiEmbeddingModel(MultiEmbeddingDensePath):
    """Multi-embedding CTR model: ``h = mean_m P_m(I_m(e^(m)))``, logit ``= over_arch(h)``.

    With a ``set_gate``, ``h = sum_m g_m P_m(I_m(e^(m)))`` with the gate's softmax weights ``g`` instead of the mean.

    SE is the K = 1 case. Loss on logits (:class:`MultiEmbeddingTrain`); apply a sigmoid only for probabilities.
    ``forward`` is traceable with ``torchrec.fx.symbolic_trace`` and hands the KJT to the embedding collection
    unmodified (TorchRec's ``TrainPipelineSparseDist`` needs both).

    Args:
        sparse_arch: the K embedding sets, ``KJT -> [B, K, F, d]``.
        set_arch: the set-specific branches, ``[B, K, F', d] -> [B, K, O]`` with ``F' = F`` (+1 with a dense arch).
        over_arch: the shared head, ``[B, O] -> [B]``.
        dense_arch: optional :class:`SetDenseArch` for raw dense features (DLRM style); None is the paper's
            all-categorical mode.
        precision: ``fp32``, or ``bf16``: the dense arches run under bf16 autocast (parameters stay fp32) and the
            logits are returned in fp32 (:mod:`multiembed.models.precision`).
        set_gate: optional :class:`~multiembed.models.hetero.SetGate` combining the sets' outputs with learned
            weights; None averages them (the paper).

    Raises:
        ValueError: the arches' K, d, field counts or widths disagree.

    Example::

        >>> from multiembed.models import build_model
        >>> model = build_model("dcnv2-me-2x", {"f1": 10, "f2": 20}, device=torch.device("cpu"), hidden=16)
        >>> features = KeyedJaggedTensor.from_lengths_sync(
        ...     keys=["f1", "f2"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1]))
        >>> model(torch.empty(2, 0), features).shape
        torch.Size([2])
    """

    def __init__(
        self,
        sparse_arch: MultiEmbeddingSparseArch,
        set_arch: SetInteractionArch,
        over_arch: nn.Module,
        dense_arch: Optional[SetDenseArch] = None,
        precision: str = "fp32",
        set_gate: Optional[SetGate] = None,
    ) -> None:
        super().__init__()
        compute_dtype(precision)  # validates the spelling
        expected_fields = sparse_arch.num_fields + (1 if dense_arch is not None else 0)
        checks = [
            ("set_arch num_sets", set_arch.num_sets, sparse_arch.num_sets),
            ("set_arch set_dim", set_arch.set_dim, sparse_arch.set_dim),
            ("set_arch num_fields", set_arch.num_fields, expected_fields),
        ]
        if dense_arch is not None:
            checks += [
                ("dense_arch num_sets", dense_arch.num_sets, sparse_arch.num_sets),
                ("dense_arch set_dim", dense_arch.set_dim, sparse_arch.set_dim),
            ]
        if set_gate is not None:
            checks += [
                ("set_gate num_sets", set_gate.num_sets, sparse_arch.num_sets),
                ("set_gate num_fields", set_gate.num_fields, expected_fields),
                ("set_gate set_dim", set_gate.set_dim, sparse_arch.set_dim),
            ]
        in_features = getattr(over_arch, "in_features", None)
        if in_features is not None:
            checks.append(("over_arch in_features", in_features, set_arch.output_dim))
        for what, got, expected in checks:
            if got != expected:
                raise ValueError(f"{what} is {got}, expected {expected}")
        self.sparse_arch = sparse_arch
        self.dense_arch = dense_arch
        self.set_arch = set_arch
        self.over_arch = over_arch
        self.set_gate = set_gate
        self.precision = precision

    def forward(self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor) -> torch.Tensor:
        """
        Args:
            dense_features: ``[B, num_dense]`` (ignored without a dense arch; ``[B, 0]`` is fine).
            sparse_features: KJT with one key per categorical field.

        Returns:
            logits ``[B]``.
        """
        logits, _ = self.forward_with_embeddings(dense_features, sparse_features)
        return logits

    def forward_with_embeddings(
        self, dense_features: torch.Tensor, sparse_features: KeyedJaggedTensor
    ) -> Tuple[torch.Tensor, torch.Tensor]:
        """As :meth:`forward`, also returning the pooled embeddings ``[B, K, F, d]`` (for the regulariser)."""
        embeddings = self.sparse_arch(sparse_features)
        if self.precision == "fp32":
            return self.dense_forward(dense_features, embeddings), embeddings
        # bf16: the dense arches under autocast (device from a parameter: plain Python, also while fx traces), the
        # logits back in fp32 for the loss and the metrics.
        device_type = next(self.over_arch.parameters()).device.type
        with dense_autocast(self.precision, device_type):
            logits = self.dense_forward(dense_features, embeddings)
        return logits.float(), embeddings

    def set_output_bias(self, value: float) -> None:
        """Sets the constant term of the logit to ``value`` (e.g. the log-odds of the positive rate, so that the
        first predictions sit at the base rate): the over arch's first output bias becomes ``value``, its others 0.

        Raises:
            ValueError: the over arch does not name the biases of its logit (no ``output_biases()``).

        Example::

            >>> from multiembed.models import build_model
            >>> model = build_model("dcnv2-me-2x", {"f1": 10, "f2": 20}, device=torch.device("cpu"), hidden=16)
            >>> model.set_output_bias(-1.25)
            >>> [b.item() for b in model.over_arch.output_biases()]
            [-1.25]
        """
        output_biases = getattr(self.over_arch, "output_biases", None)
        if output_biases is None:
            raise ValueError(
                f"{type(self.over_arch).__name__} has no output_biases(): the logit's constant term is unknown"
            )
        first, *rest = output_biases()
        with torch.no_grad():
            first.fill_(value)
            for bias in rest:
                bias.zero_()

    @property
    def num_sets(self) -> int:
        return self.sparse_arch.num_sets

    @property
    def embedding_params(self) -> int:
        """Logical embedding parameters, ``sum_i D_i * d * K`` (the paper's count)."""
        return self.sparse_arch.embedding_params

    @property
    def embedding_bytes(self) -> int:
        """Physical bytes of the stored (padded) tables."""
        return self.sparse_arch.embedding_bytes

    @property
    def dense_params(self) -> int:
        """Trainable parameters outside the embedding tables."""
        modules: List[nn.Module] = [self.set_arch, self.over_arch]
        if self.dense_arch is not None:
            modules.append(self.dense_arch)
        if self.set_gate is not None:
            modules.append(self.set_gate)
        return sum(p.numel() for m in modules for p in m.parameters() if p.requires_grad)


def spectral_regularizer(embeddings: torch.Tensor, row_mask: Optional[torch.Tensor] = None,
                         eps: float = 1e-12) -> torch.Tensor:
    r"""The singular-spectrum regulariser of the paper's code: per field (and set), :math:`\mathrm{var}(s /
    \mathrm{mean}(s))` of the singular values ``s`` of the batch's ``[B, d]`` embeddings, averaged.

    Penalises an uneven spectrum, i.e. pushes the batch embeddings towards high information abundance (the
    paper's appendix shows it does not fix collapse's effect on AUC). Variance is unbiased, as ``Tensor.var``.

    Args:
        embeddings: ``[B, K, F, d]``.
        row_mask: ``[B]``, rows to include (zeroed rows do not change the non-zero singular values); None: all.
        eps: floor of the mean singular value (an all-zero field gives 0, not NaN).

    Returns:
        a scalar.

    Example::

        >>> float(spectral_regularizer(torch.eye(4).repeat(2, 1).view(8, 1, 1, 4)))  # a flat spectrum
        0.0
    """
    per_field = embeddings.permute(1, 2, 0, 3)  # [K, F, B, d]
    if row_mask is not None:
        per_field = per_field * row_mask.to(per_field.dtype).view(1, 1, -1, 1)
    singular = torch.linalg.svdvals(per_field)  # [K, F, min(B, d)]
    normalized = singular / singular.mean(dim=-1, keepdim=True).clamp_min(eps)
    return normalized.var(dim=-1).mean()


def weighted_bce_with_logits(
    logits: torch.Tensor, labels: torch.Tensor, weights: Optional[torch.Tensor] = None
) -> torch.Tensor:
    """Binary cross-entropy on logits, the ``weights``-weighted mean over rows (rows of weight 0, e.g. padding,
    contribute nothing; all-zero weights give 0)."""
    if weights is None:
        return F.binary_cross_entropy_with_logits(logits, labels)
    per_row = F.binary_cross_entropy_with_logits(logits, labels, reduction="none")
    weights = weights.to(per_row.dtype)
    # A Python constant, not torch.finfo(dtype): the TorchRec pipeline fx-traces this, where dtype is a Proxy.
    return (per_row * weights).sum() / weights.sum().clamp_min(1e-30)


class MultiEmbeddingTrain(nn.Module):
    """Train wrapper like TorchRec's ``DLRMTrain``: batch -> ``(loss, (loss, logits, labels))`` (detached tuple).

    The batch needs ``dense_features``, ``sparse_features`` and ``labels``; an optional ``weights`` ``[B]`` makes
    the loss the weighted mean (0 for padding rows, which then contribute nothing to the loss or the regulariser;
    they still enter BatchNorm's batch statistics in training mode).

    Args:
        model: the :class:`MultiEmbeddingModel`.
        spectral_reg_weight: weight of :func:`spectral_regularizer` in the loss (0, the default, disables it;
            :data:`DEFAULT_SPECTRAL_REG_WEIGHT` = 1e-4 is the paper's ablation setting).
        projection_reg_weight: weight of the :class:`~multiembed.models.regularizers.ProjectionRegularizer` of the
            first cross layer (0 disables it; DCNv2 only). Its learnable ``lambdas`` are this module's parameters.
        divergence_reg_weight: weight of the :class:`~multiembed.models.regularizers.SetDivergencePenalty` of the
            first cross layer (0 disables it; DCNv2 with at least 2 weight sets only).

    Example::

        >>> from torchrec.datasets.utils import Batch
        >>> from multiembed.models import build_model
        >>> model = build_model("dnn-me-2x", {"f1": 10, "f2": 20}, device=torch.device("cpu"), hidden=16)
        >>> train = MultiEmbeddingTrain(model, spectral_reg_weight=1e-4)
        >>> batch = Batch(dense_features=torch.empty(2, 0), labels=torch.tensor([0.0, 1.0]),
        ...     sparse_features=KeyedJaggedTensor.from_lengths_sync(
        ...         keys=["f1", "f2"], values=torch.tensor([1, 2, 3, 4]), lengths=torch.tensor([1, 1, 1, 1])))
        >>> loss, (loss_detached, logits, labels) = train(batch)
        >>> logits.shape
        torch.Size([2])
    """

    def __init__(
        self,
        model: MultiEmbeddingModel,
        spectral_reg_weight: float = 0.0,
        projection_reg_weight: float = 0.0,
        divergence_reg_weight: float = 0.0,
    ) -> None:
        super().__init__()
        for name, weight in (("spectral_reg_weight", spectral_reg_weight),
                             ("projection_reg_weight", projection_reg_weight),
                             ("divergence_reg_weight", divergence_reg_weight)):
            if not weight >= 0.0:
                raise ValueError(f"{name} must be >= 0, got {weight}")
        self.model = model
        self.spectral_reg_weight = float(spectral_reg_weight)
        self.projection_reg_weight = float(projection_reg_weight)
        self.divergence_reg_weight = float(divergence_reg_weight)
        self.projection_regularizer: Optional[ProjectionRegularizer] = None
        self.divergence_penalty: Optional[SetDivergencePenalty] = None
        set_dim = model.sparse_arch.set_dim
        if self.projection_reg_weight > 0.0:
            crossnet = first_cross_net(model.set_arch, "projection_reg_weight")
            self.projection_regularizer = ProjectionRegularizer(
                crossnet.num_weight_sets, crossnet.in_features // set_dim, set_dim, device=crossnet.weights[0].device
            )
        if self.divergence_reg_weight > 0.0:
            crossnet = first_cross_net(model.set_arch, "divergence_reg_weight")
            if crossnet.num_weight_sets < 2:
                raise ValueError(
                    f"divergence_reg_weight: the set divergence penalty needs at least 2 sets with their own cross "
                    f"net (a dcnv2-me-{{s}}x model, s >= 2); this model has {crossnet.num_weight_sets}"
                )
            self.divergence_penalty = SetDivergencePenalty(
                crossnet.num_weight_sets, crossnet.in_features // set_dim, set_dim
            )

    def forward(self, batch: Any) -> Tuple[torch.Tensor, Tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
        """
        Args:
            batch: ``dense_features [B, num_dense]``, ``sparse_features`` (KJT), ``labels [B]``, optional
                ``weights [B]``.

        Returns:
            ``(loss, (loss.detach(), logits.detach(), labels.detach()))``, logits ``[B]``.
        """
        logits, embeddings = self.model.forward_with_embeddings(batch.dense_features, batch.sparse_features)
        labels = batch.labels.to(logits.dtype)
        weights = getattr(batch, "weights", None)
        loss = weighted_bce_with_logits(logits, labels, weights)
        if self.spectral_reg_weight > 0.0:
            row_mask = None if weights is None else weights > 0
            loss = loss + self.spectral_reg_weight * spectral_regularizer(embeddings, row_mask)
        if self.projection_regularizer is not None:
            loss = loss + self.projection_reg_weight * self.projection_regularizer(self._first_cross_weight())
        if self.divergence_penalty is not None:
            loss = loss + self.divergence_reg_weight * self.divergence_penalty(self._first_cross_weight())
        return loss, (loss.detach(), logits.detach(), labels.detach())

    def _first_cross_weight(self) -> torch.Tensor:
        """The first cross layer's weight ``[G, F*d, F*d]``, unscaled by any ``pair_scales`` (the regularisers'
        input; checked at construction)."""
        return self.model.set_arch.crossnet.weights[0]
