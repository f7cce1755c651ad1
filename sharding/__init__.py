"""Sharding plans for multi-embedding models: planner wrapper, named strategies, plan printing.

Importing this package imports torchrec (after the version guard); :mod:`multiembed.sharding.strategy` alone does
not, for command-line parsers.
"""

from multiembed.sharding.planner import (
    DEFAULT_BATCH_SIZE,
    CpuRowWiseEBCSharder,
    SetParallelPartitioner,
    ShardingError,
    TableSpec,
    build_constraints,
    build_topology,
    embedding_tables,
    find_set_width,
    make_sharders,
    plan_sharding,
    table_strategies,
)
from multiembed.sharding.report import format_plan, format_summary, plan_summary
from multiembed.sharding.strategy import ShardingStrategy

__all__ = [
    "DEFAULT_BATCH_SIZE",
    "CpuRowWiseEBCSharder",
    "SetParallelPartitioner",
    "ShardingError",
    "ShardingStrategy",
    "TableSpec",
    "build_constraints",
    "build_topology",
    "embedding_tables",
    "find_set_width",
    "format_plan",
    "format_summary",
    "make_sharders",
    "plan_sharding",
    "plan_summary",
    "table_strategies",
]
