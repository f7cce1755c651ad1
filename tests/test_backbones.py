"""The backbone registry: one module per backbone, each building its set arch and head through the same calls."""

from __future__ import annotations

import pytest
import torch

from multiembed.models import BACKBONE_OPTIONS, BACKBONES, BASE_SET_DIM, HETERO_BACKBONE, build_model
from multiembed.models.backbones import COMMON_OPTIONS, REGISTRY, SetArchContext, get_backbone


def test_registry_lists_the_backbones_in_the_papers_order() -> None:
    assert BACKBONES == ("dnn", "ipnn", "nfwfm", "xdeepfm", "dcnv2", "dcnv2lr", "finalmlp", "dlrm", "ffm")
    assert list(REGISTRY) == [*BACKBONES, HETERO_BACKBONE]
    assert BASE_SET_DIM == {name: REGISTRY[name].base_set_dim for name in REGISTRY}
    assert BASE_SET_DIM["nfwfm"] == 50 and BASE_SET_DIM["dlrm"] == 16


def test_each_module_registers_its_options() -> None:
    assert BACKBONE_OPTIONS["dcnv2lr"] == {"cross_layers": 3, "cross_rank": 512}
    assert get_backbone("finalmlp").option_names() == frozenset({"stream_layer_sizes"}) | (
        COMMON_OPTIONS - {"over_layer_sizes"}
    )
    assert "over_layer_sizes" in get_backbone("dnn").option_names()


def test_unknown_backbone_and_option_are_one_line_errors() -> None:
    with pytest.raises(ValueError, match="unknown backbone 'nope'; choose from dnn, ipnn"):
        get_backbone("nope")
    with pytest.raises(ValueError, match="dnn-me-2x: unknown option\\(s\\) cross_rank; dnn takes"):
        get_backbone("dnn").resolve_options("dnn-me-2x", {"cross_rank": 4})


@pytest.mark.parametrize("name", list(REGISTRY))
def test_every_registered_backbone_builds_a_working_model(name: str) -> None:
    model = build_model(f"{name}-me-2x", {"a": 11, "b": 7, "c": 5}, device=torch.device("cpu"), hidden=8,
                        **({"cross_rank": 4} if name == "dcnv2lr" else {}))
    ctx = SetArchContext(num_sets=2, set_dim=BASE_SET_DIM[name], num_fields=3, groups=2, mode="me", hidden=8,
                         dropout=0.0)
    backbone = REGISTRY[name]
    arch = backbone.set_arch(ctx, backbone.resolve_options(name, {"cross_rank": 4} if name == "dcnv2lr" else {}))
    assert type(arch) is type(model.set_arch)
    assert arch.num_sets == 2 and arch.num_fields == 3
    assert type(backbone.over_arch(arch, (8,), 0.0, None)) is type(model.over_arch)
    assert sum(p.numel() for p in arch.parameters()) == sum(p.numel() for p in model.set_arch.parameters())
