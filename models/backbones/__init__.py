"""The registry of backbones: every module of this package defines one :class:`Backbone` named ``BACKBONE``.

The modules are found by listing the package, so a new backbone is one new module (and its test).

Example::

    >>> sorted(REGISTRY)[:3]
    ['dcnv2', 'dcnv2lr', 'dlrm']
    >>> REGISTRY["dcnv2"].options
    {'cross_layers': 4, 'pair_scales': False}
"""

from __future__ import annotations

import importlib
import pkgutil
from typing import Dict

from multiembed.models.backbones.base import COMMON_OPTIONS, REGISTRY, Backbone, SetArchContext


def _discover() -> Dict[str, Backbone]:
    found = []
    for module in pkgutil.iter_modules(__path__):
        backbone = getattr(importlib.import_module(f"{__name__}.{module.name}"), "BACKBONE", None)
        if isinstance(backbone, Backbone):
            found.append(backbone)
    return {backbone.name: backbone for backbone in sorted(found, key=lambda b: (b.position, b.name))}


REGISTRY.update(_discover())


def get_backbone(name: str) -> Backbone:
    """The registered backbone called ``name``.

    Raises:
        ValueError: no backbone has that name; the message lists those that do.
    """
    try:
        return REGISTRY[name]
    except KeyError:
        raise ValueError(f"unknown backbone {name!r}; choose from {', '.join(REGISTRY)}") from None


__all__ = ["COMMON_OPTIONS", "REGISTRY", "Backbone", "SetArchContext", "get_backbone"]
