"""Heterogeneous multi-embedding: K embedding sets of one width feeding *different* interaction experts.

Beyond the paper (which gives every set the same interaction module): the variant reported for production ads
ranking (Pan et al., KDD 2024, arXiv 2403.00793), where the sets feed different experts, e.g. DCNv2, IPNN, NFwFM and a
DNN, each ending in its own projection; the experts' outputs are averaged or weighted by a learned gate.

The sets keep one common width ``d``, so the sparse arch (fused tables of width ``K * d``) and set-parallel sharding
are exactly those of homogeneous ME. Experts are assigned by cycling the expert list over the K sets, and the sets of
one kind are made consecutive (ordered by the list), so each kind's sets are one contiguous slice of the set-major
embeddings and run as one batched arch (a view, no copy): ``experts=("dcnv2", "ipnn")`` with K = 5 gives sets
``[dcnv2, dcnv2, dcnv2, ipnn, ipnn]``.
"""

from __future__ import annotations

from typing import List, Sequence, Tuple

import torch
from torch import nn

from multiembed.config.choices import Combiner
from multiembed.models.set_arch import SetInteractionArch

# Backbones whose set arch ends in a projection to H and is read by the plain MLP head, so they can share one.
HETERO_EXPERTS: Tuple[str, ...] = ("dcnv2", "dcnv2lr", "ipnn", "nfwfm", "dnn")
DEFAULT_EXPERTS: Tuple[str, ...] = ("dcnv2", "ipnn", "nfwfm", "dnn")
COMBINERS: Tuple[str, ...] = Combiner.values()


def parse_experts(experts: Sequence[str] | str) -> Tuple[str, ...]:
    """An expert list from a sequence or a comma-separated string, checked.

    Raises:
        ValueError: an empty list, or an expert that is not one of :data:`HETERO_EXPERTS`.

    Example::

        >>> parse_experts("dcnv2, ipnn")
        ('dcnv2', 'ipnn')
    """
    names = [e.strip().lower() for e in (experts.split(",") if isinstance(experts, str) else experts)]
    names = [e for e in names if e]
    if not names:
        raise ValueError(f"experts: give at least one of {', '.join(HETERO_EXPERTS)}")
    unknown = [e for e in names if e not in HETERO_EXPERTS]
    if unknown:
        raise ValueError(
            f"experts: {', '.join(unknown)} cannot be a heterogeneous expert; choose from {', '.join(HETERO_EXPERTS)} "
            "(xdeepfm and finalmlp have their own heads, dlrm is ipnn's products)"
        )
    return tuple(names)


def expert_groups(experts: Sequence[str], num_sets: int) -> List[Tuple[str, int]]:
    """``(kind, number of sets)`` per expert kind, in the list's order: the list cycled over ``num_sets`` sets.

    Example::

        >>> expert_groups(("dcnv2", "ipnn", "dcnv2"), 5)
        [('dcnv2', 3), ('ipnn', 2)]
    """
    if num_sets < 1:
        raise ValueError(f"num_sets must be >= 1, got {num_sets}")
    kinds = parse_experts(experts)
    counts: dict = {}
    for m in range(num_sets):
        kind = kinds[m % len(kinds)]
        counts[kind] = counts.get(kind, 0) + 1
    return list(counts.items())


def set_experts(experts: Sequence[str], num_sets: int) -> List[str]:
    """The expert kind of each set, in set order (:func:`expert_groups` expanded).

    Example::

        >>> set_experts(("dcnv2", "ipnn"), 5)
        ['dcnv2', 'dcnv2', 'dcnv2', 'ipnn', 'ipnn']
    """
    return [kind for kind, count in expert_groups(experts, num_sets) for _ in range(count)]


class HeteroSetArch(SetInteractionArch):
    """K sets feeding different experts: ``[B, K, F, d] -> [B, K, H]``, each kind's sets as one batched arch.

    Args:
        kinds: the expert kind of each arch (for reports), e.g. ``("dcnv2", "ipnn")``.
        arches: one built :class:`SetInteractionArch` per kind, over that kind's consecutive sets (its ``num_sets``);
            all with the same ``num_fields``, ``set_dim`` and ``output_dim``.

    Raises:
        ValueError: no arches, kinds and arches of different lengths, or arches that disagree on fields, width or
            output width.

    Example::

        >>> from multiembed.models import build_set_arch, parse_model_name
        >>> arch = HeteroSetArch(("dcnv2", "dnn"), [build_set_arch(parse_model_name("dcnv2-me-2x"), 3, hidden=8),
        ...                                          build_set_arch(parse_model_name("dnn-me-1x"), 3, hidden=8)])
        >>> arch(torch.randn(4, 3, 3, 10)).shape, arch.set_kinds
        (torch.Size([4, 3, 8]), ['dcnv2', 'dcnv2', 'dnn'])
    """

    def __init__(self, kinds: Sequence[str], arches: Sequence[SetInteractionArch]) -> None:
        if not arches or len(kinds) != len(arches):
            raise ValueError(f"give one arch per expert kind, got {len(kinds)} kinds and {len(arches)} arches")
        first = arches[0]
        for kind, arch in zip(kinds, arches):
            for what in ("num_fields", "set_dim", "output_dim"):
                if getattr(arch, what) != getattr(first, what):
                    raise ValueError(
                        f"expert {kind!r}: {what} is {getattr(arch, what)}, expected {getattr(first, what)} "
                        f"(the first expert's)"
                    )
        super().__init__(sum(a.num_sets for a in arches), first.num_fields, first.set_dim, first.output_dim)
        self.kinds = tuple(kinds)
        self.experts = nn.ModuleList(arches)
        self.set_kinds = [kind for kind, arch in zip(kinds, arches) for _ in range(arch.num_sets)]

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            embeddings: ``[B, K, F, d]``.

        Returns:
            ``[B, K, H]``, set ``m``'s row from its expert.
        """
        outputs = []
        start = 0
        for arch in self.experts:
            outputs.append(arch(embeddings.narrow(1, start, arch.num_sets)))
            start += arch.num_sets
        return outputs[0] if len(outputs) == 1 else torch.cat(outputs, dim=1)


class SetGate(nn.Module):
    """A learned gate over the sets: ``softmax(W mean_m(e^(m)) + b)`` weights the sets' outputs.

    ``[B, K, H]`` branch outputs and ``[B, K, F, d]`` pooled embeddings -> ``[B, H]``: the gate reads the mean over
    sets of the pooled embeddings, flattened (``[B, F*d]``), and gives one softmax weight per set (each set is one
    expert instance). Initialised to zeros, so training starts at the mean over sets.

    Args:
        num_sets: K.
        num_fields: F (the fields the embeddings hold, the dense arch's field included when present).
        set_dim: d.
        device: where the parameters live.

    Example::

        >>> gate = SetGate(num_sets=3, num_fields=2, set_dim=4)
        >>> per_set, embeddings = torch.randn(5, 3, 8), torch.randn(5, 3, 2, 4)
        >>> torch.allclose(gate(per_set, embeddings), per_set.mean(dim=1))  # zero init: the mean
        True
    """

    def __init__(self, num_sets: int, num_fields: int, set_dim: int, device: torch.device | None = None) -> None:
        super().__init__()
        if min(num_sets, num_fields, set_dim) < 1:
            raise ValueError(f"num_sets, num_fields and set_dim must be >= 1, got {num_sets}, {num_fields}, {set_dim}")
        self.num_sets = num_sets
        self.num_fields = num_fields
        self.set_dim = set_dim
        self.linear = nn.Linear(num_fields * set_dim, num_sets, device=device)
        self.reset_parameters()

    def reset_parameters(self) -> None:
        nn.init.zeros_(self.linear.weight)
        nn.init.zeros_(self.linear.bias)

    def weights(self, embeddings: torch.Tensor) -> torch.Tensor:
        """The gate's weights ``[B, K]`` (rows sum to 1) for pooled embeddings ``[B, K, F, d]``."""
        return torch.softmax(self.linear(embeddings.mean(dim=1).flatten(1)), dim=-1)

    def forward(self, per_set: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """
        Args:
            per_set: ``[B, K, H]`` the sets' branch outputs.
            embeddings: ``[B, K, F, d]`` what the branches read.

        Returns:
            ``[B, H]``, the gate-weighted sum over sets.
        """
        return torch.bmm(self.weights(embeddings).unsqueeze(1), per_set).squeeze(1)
