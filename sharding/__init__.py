"""Sharding plans for multi-embedding models: planner wrapper, named strategies, plan printing.

Importing the package checks the TorchRec stack once (``multiembed.runtime.stack_check``); its heavy names load on
first use. The strategy names themselves live in :mod:`multiembed.config` (torch-free, for command-line parsers).
"""

from __future__ import annotations

import multiembed.runtime.stack_check  # noqa: F401  (checks the TorchRec stack before any torchrec import)

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
