"""Model names of the zoo: ``{backbone}-{se|me|mesi}-{s}x[{width}]`` -> :class:`ModelSpec`.

The names make the paper's result tables one call away (``build_model("dcnv2-me-4x", vocab_sizes)``):

* ``se``: single embedding, one set of width ``s * base`` (SE scaled ``s`` times);
* ``me``: multi-embedding, ``s`` sets of the base width, each with its own interaction arch;
* ``mesi``: the paper's ablation, ``s`` sets of the base width sharing one interaction arch;
* ``hetero-me-{s}x``: heterogeneous multi-embedding, ``s`` sets of width 10 feeding different interaction experts
  (:mod:`multiembed.models.hetero`; the experts are a build option, not part of the name).

The base width is the paper's: 10 for every backbone except NFwFM (50); DLRM (TorchRec's dot interaction, not in
the paper) uses 16 so that its stored tables need no padding. A width suffix replaces the base width:
``dcnv2-me-4x16`` is 4 sets of width 16, ``dcnv2-se-4x16`` one set of width 64.

The backbones and their base widths are those registered in :mod:`multiembed.models.backbones`.
"""

from __future__ import annotations

import dataclasses
import re
from typing import Dict, List, Tuple

from multiembed.models.backbones import REGISTRY

# Heterogeneous ME: not a backbone of its own (its sets feed several), only in the ``me`` mode.
HETERO_BACKBONE = "hetero"
# The registered backbones (multiembed.models.backbones), in the paper's table order, and each one's base width.
BACKBONES: Tuple[str, ...] = tuple(name for name in REGISTRY if name != HETERO_BACKBONE)
MODES: Tuple[str, ...] = ("se", "me", "mesi")
PAPER_SCALES: Tuple[int, ...] = (1, 2, 3, 4, 10)
BASE_SET_DIM: Dict[str, int] = {name: backbone.base_set_dim for name, backbone in REGISTRY.items()}
# Any positive scale parses (benchmarks sweep others); the paper's tables use PAPER_SCALES.
MAX_SCALE = 1024

_NAME = re.compile(r"^(?P<backbone>[a-z0-9]+)-(?P<mode>[a-z]+)-(?P<scale>[0-9]+)x(?P<width>[0-9]+)?$")


@dataclasses.dataclass(frozen=True)
class ModelSpec:
    """A parsed model name.

    Attributes:
        backbone: one of :data:`BACKBONES`.
        mode: ``se``, ``me`` or ``mesi``.
        scale: the scale factor ``s`` (embedding parameters are ``s`` times the base model's).
        num_sets: ``K``, the number of embedding sets (1 for SE, ``s`` otherwise).
        set_dim: ``d``, the logical width of each set (``s * base`` for SE, ``base`` otherwise).

    Example::

        >>> parse_model_name("dcnv2-me-4x")
        ModelSpec(backbone='dcnv2', mode='me', scale=4, num_sets=4, set_dim=10)
    """

    backbone: str
    mode: str
    scale: int
    num_sets: int
    set_dim: int

    @property
    def heterogeneous(self) -> bool:
        """True for ``hetero-me-{s}x``: the sets feed different interaction experts."""
        return self.backbone == HETERO_BACKBONE

    @property
    def shared_interaction(self) -> bool:
        """True for the ``mesi`` ablation: all sets share one interaction arch."""
        return self.mode == "mesi"

    @property
    def name(self) -> str:
        """The canonical name (the width suffix only where it differs from the base width)."""
        base = self.set_dim // self.scale if self.mode == "se" else self.set_dim
        suffix = "" if base == BASE_SET_DIM[self.backbone] else str(base)
        return f"{self.backbone}-{self.mode}-{self.scale}x{suffix}"


def model_names(scales: Tuple[int, ...] = PAPER_SCALES) -> List[str]:
    """Every canonical name at the given scales, e.g. ``['dnn-se-1x', ..., 'dlrm-mesi-10x']``."""
    return [f"{b}-{m}-{s}x" for b in BACKBONES for m in MODES for s in scales]


def _name_error(name: str, why: str) -> ValueError:
    return ValueError(
        f"unknown model name {name!r}: {why}. Names are {{backbone}}-{{se|me|mesi}}-{{s}}x[width] with backbone in "
        f"{', '.join(BACKBONES)} and s a positive integer (the paper's scales: "
        f"{', '.join(str(s) for s in PAPER_SCALES)}), e.g. dcnv2-se-1x, dcnv2-me-4x, dnn-se-10x, dcnv2-me-4x16; "
        f"or {HETERO_BACKBONE}-me-{{s}}x[width] (heterogeneous experts)"
    )


def parse_model_name(name: str) -> ModelSpec:
    """Parses ``{backbone}-{se|me|mesi}-{s}x[width]``.

    Args:
        name: the model name.

    Returns:
        the :class:`ModelSpec`.

    Raises:
        ValueError: the name does not follow the pattern, or names an unknown backbone or mode, a zero scale or
            width; the message lists the valid choices.

    Example::

        >>> parse_model_name("dcnv2-se-10x").set_dim
        100
        >>> parse_model_name("dcnv2-me-4x16").num_sets, parse_model_name("dcnv2-me-4x16").set_dim
        (4, 16)
    """
    match = _NAME.match(name.strip().lower()) if isinstance(name, str) else None
    if match is None:
        raise _name_error(str(name), "it does not match the pattern")
    backbone, mode = match["backbone"], match["mode"]
    if backbone not in BACKBONES and backbone != HETERO_BACKBONE:
        raise _name_error(name, f"backbone {backbone!r} is not one of {', '.join(BACKBONES)}")
    if mode not in MODES:
        raise _name_error(name, f"mode {mode!r} is not one of {', '.join(MODES)}")
    if backbone == HETERO_BACKBONE and mode != "me":
        raise _name_error(name, f"{HETERO_BACKBONE} models are multi-embedding only ({HETERO_BACKBONE}-me-{{s}}x)")
    scale = int(match["scale"])
    if not 1 <= scale <= MAX_SCALE:
        raise _name_error(name, f"scale {scale} is outside 1..{MAX_SCALE}")
    base = int(match["width"]) if match["width"] else BASE_SET_DIM[backbone]
    if base < 1:
        raise _name_error(name, "the set width must be at least 1")
    if mode == "se":
        return ModelSpec(backbone=backbone, mode=mode, scale=scale, num_sets=1, set_dim=scale * base)
    return ModelSpec(backbone=backbone, mode=mode, scale=scale, num_sets=scale, set_dim=base)
