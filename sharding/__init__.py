"""Sharding plans for multi-embedding models: planner wrapper, named strategies, plan printing.

:class:`ShardingStrategy` imports nothing heavy; everything else imports torchrec (after the version guard) on
first use, so command-line parsers can list the strategies without loading torch.
"""

from __future__ import annotations

import importlib
from typing import Any, Dict

from multiembed.config.choices import ShardingStrategy

_LAZY: Dict[str, str] = {
    "DEFAULT_BATCH_SIZE": "planner",
    "CpuRowWiseEBCSharder": "planner",
    "SetParallelPartitioner": "planner",
    "ShardingError": "planner",
    "TableSpec": "planner",
    "build_constraints": "planner",
    "build_topology": "planner",
    "embedding_tables": "planner",
    "find_set_width": "planner",
    "make_sharders": "planner",
    "plan_sharding": "planner",
    "table_strategies": "planner",
    "format_plan": "report",
    "format_summary": "report",
    "plan_summary": "report",
}

__all__ = ["ShardingStrategy", *_LAZY]


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    value = getattr(importlib.import_module(f"multiembed.sharding.{_LAZY[name]}"), name)
    globals()[name] = value
    return value
