"""What a sharding plan costs: memory per rank and communication per step, as a dict and as a readable table.

The numbers are computed here from the plan's shard shapes, not taken from TorchRec's planner, so that every plan
(planned here, loaded from a checkpoint, or written by hand) is reported the same way and the arithmetic can be
checked by hand:

* **Memory**: each shard's weights (rows x columns x bytes per value) plus its optimizer state, fp32:
  SGD none; Adagrad one value per weight; row-wise Adagrad one value per row of the shard; Adam and LAMB two per
  weight; partial row-wise Adam / LAMB one per weight plus one per row. Data-parallel tables hold a full replica
  on every rank, with the state of the same optimizer (the trainer steps them with the sparse optimizer's
  rule through a regular torch optimizer). Dense (non-embedding) parameters are reported once, separately.
* **Communication** per training step, summed over all ranks (bytes sent), for a per-rank batch ``b``, ``W`` ranks,
  ``Wl`` ranks per host, a table of width ``D`` (shard width ``d``) whose features average ``L`` ids per sample
  (8-byte ids, 4-byte lengths, fp32 pooled embeddings):

  ========================  ====================  =========================  ==========================
  sharding                  input ids             forward (pooled)           backward (gradients)
  ========================  ====================  =========================  ==========================
  table-wise                (W-1) b (8L+4)        (W-1) b D 4                (W-1) b D 4
  column-wise, per shard    (W-1) b (8L+4)        (W-1) b d 4                (W-1) b d 4
  row-wise                  (W-1) b (8L+4)        W (W-1) b D 4              W (W-1) b D 4
  table-row-wise            (W-1) b (8L+4)        ((Wl-1) W + W-Wl) b D 4    same as forward
  data-parallel             0                     0                          2 (W-1) rows D 4 (all-reduce)
  ========================  ====================  =========================  ==========================

  Row-wise moves W times more pooled data than table-wise because every rank holds partial sums for the whole
  global batch (reduce-scatter forward, all-gather backward). Dense parameters add a ring all-reduce of
  ``2 (W-1) x dense bytes``. These are volumes, not times: what they cost depends on the links (NVLink inside a
  host, the network across hosts).
"""

from __future__ import annotations

import statistics
from typing import Any, Dict, List, Mapping, Optional, Sequence

from torch import nn
from torchrec.distributed.types import ShardingPlan, ShardingType

from multiembed.models.managed import table_collection
from multiembed.sharding.planner import DEFAULT_BATCH_SIZE, GB, TableSpec, embedding_tables

ID_BYTES = 8
LENGTH_BYTES = 4
POOLED_BYTES = 4
STATE_BYTES = 4

# Optimizer -> (state values per weight, state values per row), fp32.
_OPTIMIZER_STATE: Dict[str, tuple] = {
    "none": (0, 0),
    "sgd": (0, 0),
    "adagrad": (1, 0),
    "rowwise_adagrad": (0, 1),
    "adam": (2, 0),
    "lamb": (2, 0),
    "partial_rowwise_adam": (1, 1),
    "partial_rowwise_lamb": (1, 1),
    "lars_sgd": (1, 0),
}
_ALIASES = {
    "exactsgd": "sgd",
    "exactadagrad": "adagrad",
    "exactrowwiseadagrad": "rowwise_adagrad",
    "rowwiseadagrad": "rowwise_adagrad",
    "partialrowwiseadam": "partial_rowwise_adam",
    "partialrowwiselamb": "partial_rowwise_lamb",
    "larssgd": "lars_sgd",
}


def normalize_optimizer(optimizer: Any) -> str:
    """A canonical optimizer name from a name, an ``EmbOptimType`` or an optimizer class.

    Raises:
        ValueError: an optimizer whose state size is not known here.
    """
    if optimizer is None:
        return "none"
    if isinstance(optimizer, type):
        raw = optimizer.__name__
    else:
        raw = str(getattr(optimizer, "value", optimizer))
    key = raw.lower().replace("_", "").replace("-", "")
    name = _ALIASES.get(key, raw.lower().replace("-", "_"))
    if name not in _OPTIMIZER_STATE:
        raise ValueError(f"optimizer {raw!r}: unknown state size; known: {', '.join(sorted(_OPTIMIZER_STATE))}")
    return name


def optimizer_state_bytes(optimizer: str, rows: int, columns: int) -> int:
    """Bytes of fp32 optimizer state for a ``rows x columns`` shard."""
    per_weight, per_row = _OPTIMIZER_STATE[normalize_optimizer(optimizer)]
    return (per_weight * rows * columns + per_row * rows) * STATE_BYTES


def table_optimizer(module: nn.Module, table: TableSpec, fused_params: Optional[Mapping[str, Any]] = None) -> str:
    """The fused optimizer that updates ``table``: the in-backward optimizer on its weight, else ``fused_params``."""
    ebc = table_collection(module.get_submodule(table.module_path))
    weight = ebc.embedding_bags[table.name].weight  # type: ignore[index,union-attr]
    classes = getattr(weight, "_optimizer_classes", None)
    if classes:
        return normalize_optimizer(classes[0])
    return normalize_optimizer((fused_params or {}).get("optimizer"))


def format_bytes(n: float) -> str:
    """``n`` bytes in binary units (``1.5 GiB``)."""
    for unit, size in (("TiB", 1024**4), ("GiB", GB), ("MiB", 1024**2), ("KiB", 1024)):
        if abs(n) >= size:
            return f"{n / size:.2f} {unit}"
    return f"{int(n)} B"


def format_ranks(ranks: Sequence[int], in_order: bool = False, limit: int = 40) -> str:
    """A short rank list: runs as ``0-7,16-23``, or shard order (``8,0,24``) with ``in_order``; cut past ``limit``."""
    if in_order:
        text = ",".join(str(r) for r in ranks)
    else:
        runs: List[List[int]] = []
        for rank in sorted(set(ranks)):
            if runs and rank == runs[-1][1] + 1:
                runs[-1][1] = rank
            else:
                runs.append([rank, rank])
        text = ",".join(str(a) if a == b else f"{a}-{b}" for a, b in runs)
    if len(text) > limit:
        prefix, suffix = f"{len(ranks)} ranks: ", ",..."
        text = prefix + text[: limit - len(prefix) - len(suffix) + 1].rsplit(",", 1)[0] + suffix
    return text


def _shards(sharding: Any, table: TableSpec) -> List[Dict[str, int]]:
    if sharding.sharding_spec is None:  # data-parallel: a full replica per rank
        return [
            {"rank": r, "row_offset": 0, "col_offset": 0, "rows": table.num_embeddings, "cols": table.embedding_dim}
            for r in sharding.ranks
        ]
    return [
        {
            "rank": int(s.placement.rank()),
            "row_offset": int(s.shard_offsets[0]),
            "col_offset": int(s.shard_offsets[1]),
            "rows": int(s.shard_sizes[0]),
            "cols": int(s.shard_sizes[1]),
        }
        for s in sharding.sharding_spec.shards
    ]


def _communication(
    sharding_type: str,
    table: TableSpec,
    shards: Sequence[Mapping[str, int]],
    ids_per_sample: float,
    batch_size: int,
    world_size: int,
    local_world_size: int,
) -> Dict[str, int]:
    """Bytes sent per step (all ranks) for one table; the module docstring gives the formulas."""
    w, wl, b, width = world_size, local_world_size, batch_size, table.embedding_dim
    ids = (w - 1) * b * (ID_BYTES * ids_per_sample + LENGTH_BYTES * len(table.feature_names))
    if sharding_type == ShardingType.DATA_PARALLEL.value:
        return {"input": 0, "forward": 0, "backward": 2 * (w - 1) * table.num_embeddings * width * STATE_BYTES}
    if sharding_type == ShardingType.TABLE_WISE.value:
        pooled = (w - 1) * b * width * POOLED_BYTES
        return {"input": int(ids), "forward": pooled, "backward": pooled}
    if sharding_type in (ShardingType.COLUMN_WISE.value, ShardingType.TABLE_COLUMN_WISE.value):
        pooled = sum((w - 1) * b * s["cols"] * POOLED_BYTES for s in shards)
        return {"input": int(ids * len(shards)), "forward": pooled, "backward": pooled}
    if sharding_type == ShardingType.ROW_WISE.value:
        pooled = w * (w - 1) * b * width * POOLED_BYTES
        return {"input": int(ids), "forward": pooled, "backward": pooled}
    if sharding_type in (ShardingType.TABLE_ROW_WISE.value, ShardingType.GRID_SHARD.value):
        column_blocks = len({s["col_offset"] for s in shards})
        pooled = ((wl - 1) * w + (w - wl)) * b * width * POOLED_BYTES
        return {"input": int(ids * column_blocks), "forward": pooled, "backward": pooled}
    raise ValueError(f"table {table.name!r}: no communication model for sharding type {sharding_type!r}")


def plan_summary(
    plan: ShardingPlan,
    module: nn.Module,
    *,
    world_size: Optional[int] = None,
    local_world_size: Optional[int] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pooling_factors: Optional[Mapping[str, float]] = None,
    fused_params: Optional[Mapping[str, Any]] = None,
    device_type: Optional[str] = None,
    capacity_gb: Optional[float] = None,
) -> Dict[str, Any]:
    """A JSON-able account of ``plan``: per table, per rank memory, communication per step.

    Args:
        plan: the plan of ``module`` (from :func:`plan_sharding` or elsewhere).
        module: the model it shards (any device, ``meta`` included).
        world_size: ranks in the job; inferred from the highest rank in the plan when None (a lower bound when
            some ranks hold nothing).
        local_world_size: ranks per host (``world_size`` when None).
        batch_size: per-rank batch size.
        pooling_factors: ``{feature: mean ids per sample}`` (1 when absent).
        fused_params: FBGEMM options; their ``optimizer`` counts for tables without an in-backward optimizer.
        device_type: ``"cpu"`` or ``"cuda"``, to name the memory tier.
        capacity_gb: memory per rank in GiB, to report the share used.

    Returns:
        ``{"world_size", "local_world_size", "batch_size_per_rank", "device_type", "capacity_bytes_per_rank",
        "dense_parameter_bytes", "tables": [...], "ranks": [...], "memory": {...},
        "communication": {...}}``; each table has ``module``, ``name``, ``rows``, ``width``, ``features``,
        ``sharding_type``, ``compute_kernel``, ``ranks``, ``shards`` (rank, offsets, sizes; empty for replicas),
        ``optimizer``, ``weight_bytes``, ``optimizer_bytes``, ``max_bytes_per_rank``, ``communication_bytes``.

    Raises:
        ValueError: a table of ``module`` missing from ``plan``.
    """
    tables = embedding_tables(module)
    shardings = {}
    for table in tables:
        sharding = plan.plan.get(table.module_path, {}).get(table.name)  # type: ignore[union-attr]
        if sharding is None:
            raise ValueError(f"the plan has no entry for table {table.name!r} of module {table.module_path!r}")
        shardings[table.name] = sharding
    highest = max(r for s in shardings.values() for r in s.ranks)
    world = world_size if world_size is not None else highest + 1
    if highest >= world:
        raise ValueError(f"the plan uses rank {highest} but world_size is {world}")
    local = local_world_size or world
    factors = pooling_factors or {}
    memory = [{"weights": 0, "optimizer": 0} for _ in range(world)]
    totals = {"input": 0, "forward": 0, "backward": 0}
    table_rows: List[Dict[str, Any]] = []
    for table in tables:
        sharding = shardings[table.name]
        replicated = sharding.sharding_type == ShardingType.DATA_PARALLEL.value
        # Replicated tables are stepped with the same rule as sharded ones (a regular optimizer instead of the
        # fused kernel), so the optimizer marked on the weight counts for every table.
        optimizer = table_optimizer(module, table, fused_params)
        shards = _shards(sharding, table)
        per_rank: Dict[int, int] = {}
        weight_total = optimizer_total = 0
        for shard in shards:
            weights = shard["rows"] * shard["cols"] * table.bytes_per_value
            state = optimizer_state_bytes(optimizer, shard["rows"], shard["cols"])
            memory[shard["rank"]]["weights"] += weights
            memory[shard["rank"]]["optimizer"] += state
            per_rank[shard["rank"]] = per_rank.get(shard["rank"], 0) + weights + state
            weight_total += weights
            optimizer_total += state
        ids_per_sample = sum(float(factors.get(f, 1.0)) for f in table.feature_names)
        comm = _communication(sharding.sharding_type, table, shards, ids_per_sample, batch_size, world, local)
        for key, value in comm.items():
            totals[key] += value
        table_rows.append(
            {
                "module": table.module_path,
                "name": table.name,
                "rows": table.num_embeddings,
                "width": table.embedding_dim,
                "features": list(table.feature_names),
                "ids_per_sample": ids_per_sample,
                "sharding_type": sharding.sharding_type,
                "compute_kernel": sharding.compute_kernel,
                "ranks": [int(r) for r in sharding.ranks],
                "shards": [] if replicated else shards,
                "optimizer": optimizer,
                "weight_bytes": weight_total,
                "optimizer_bytes": optimizer_total,
                "max_bytes_per_rank": max(per_rank.values()),
                "communication_bytes": comm,
            }
        )
    embedding_params = {id(p) for t in tables for p in module.get_submodule(t.module_path).parameters()}
    dense_bytes = sum(p.numel() * p.element_size() for p in module.parameters() if id(p) not in embedding_params)
    dense_allreduce = 2 * (world - 1) * dense_bytes
    rank_rows = [
        {"rank": r, "weight_bytes": m["weights"], "optimizer_bytes": m["optimizer"], "total_bytes": sum(m.values())}
        for r, m in enumerate(memory)
    ]
    loads = [row["total_bytes"] for row in rank_rows]
    communication_total = sum(totals.values()) + dense_allreduce
    return {
        "world_size": world,
        "local_world_size": local,
        "batch_size_per_rank": batch_size,
        "device_type": device_type,
        "capacity_bytes_per_rank": None if capacity_gb is None else int(capacity_gb * GB),
        "dense_parameter_bytes": dense_bytes,
        "tables": table_rows,
        "ranks": rank_rows,
        "memory": {
            "total_bytes": sum(loads),
            "min_bytes": min(loads),
            "mean_bytes": sum(loads) / world,
            "median_bytes": statistics.median(loads),
            "max_bytes": max(loads),
            "max_rank": loads.index(max(loads)),
        },
        "communication": {
            "input_bytes": totals["input"],
            "forward_bytes": totals["forward"],
            "backward_bytes": totals["backward"],
            "dense_allreduce_bytes": dense_allreduce,
            "total_bytes": communication_total,
            "per_rank_mean_bytes": communication_total / world,
        },
    }


def format_summary(summary: Mapping[str, Any], max_rank_lines: int = 16) -> str:
    """Renders :func:`plan_summary` as text: one line per table, then memory per rank and communication.

    Topologies with more than ``max_rank_lines`` ranks get the spread (min, median, mean, max) and the five most
    loaded ranks instead of one line per rank.
    """
    world = summary["world_size"]
    local = summary["local_world_size"]
    hosts = f"{world // local} hosts x {local}" if local and world % local == 0 and local < world else "one host"
    lines = [
        f"Sharding plan: {len(summary['tables'])} tables on {world} ranks ({hosts}), per-rank batch "
        f"{summary['batch_size_per_rank']}; bytes include optimizer state"
    ]
    header = ("table", "rows", "width", "sharding", "kernel", "ranks", "max/rank", "total")
    rows = []
    for t in summary["tables"]:
        ordered = t["sharding_type"] == ShardingType.COLUMN_WISE.value
        ranks = [s["rank"] for s in t["shards"]] if ordered else t["ranks"]
        rows.append(
            (
                t["name"],
                f"{t['rows']:,}",
                str(t["width"]),
                t["sharding_type"],
                t["compute_kernel"],
                format_ranks(ranks, in_order=ordered),
                format_bytes(t["max_bytes_per_rank"]),
                format_bytes(t["weight_bytes"] + t["optimizer_bytes"]),
            )
        )
    widths = [max(len(str(r[i])) for r in rows + [header]) for i in range(len(header))]
    numeric = {1, 2, 6, 7}

    def line(cells: Sequence[str]) -> str:
        return "  ".join(c.rjust(w) if i in numeric else c.ljust(w) for i, (c, w) in enumerate(zip(cells, widths)))

    lines.append(line(header).rstrip())
    lines.extend(line(r).rstrip() for r in rows)
    replicated = ShardingType.DATA_PARALLEL.value
    states = []
    for kind, label in ((False, "sharded tables (fused in backward)"), (True, "data-parallel tables (torch optimizer)")):
        names = sorted({t["optimizer"] for t in summary["tables"] if (t["sharding_type"] == replicated) == kind})
        if names:
            states.append(f"{', '.join(names)} for {label}")
    lines.append(f"Optimizer state: {'; '.join(states)}")
    memory = summary["memory"]
    capacity = summary.get("capacity_bytes_per_rank")
    tier = {"cuda": "HBM", "cpu": "DDR"}.get(summary.get("device_type") or "", "memory")
    cap_text = f" of {format_bytes(capacity)} {tier}" if capacity else ""
    lines.append(
        f"Memory per rank (embedding weights + optimizer state){cap_text}: min {format_bytes(memory['min_bytes'])}, "
        f"median {format_bytes(memory['median_bytes'])}, mean {format_bytes(memory['mean_bytes'])}, "
        f"max {format_bytes(memory['max_bytes'])} (rank {memory['max_rank']}); "
        f"dense parameters {format_bytes(summary['dense_parameter_bytes'])} on every rank"
    )
    ranks = summary["ranks"]
    shown = ranks if world <= max_rank_lines else sorted(ranks, key=lambda r: -r["total_bytes"])[:5]
    if world > max_rank_lines:
        lines.append("  most loaded ranks:")
    for r in shown:
        lines.append(
            f"  rank {r['rank']:>4}: {format_bytes(r['total_bytes']):>11}  (weights {format_bytes(r['weight_bytes'])}"
            f", optimizer {format_bytes(r['optimizer_bytes'])})"
        )
    comm = summary["communication"]
    lines.append(
        f"Communication per step (estimate, all ranks): input ids {format_bytes(comm['input_bytes'])}, "
        f"pooled embeddings {format_bytes(comm['forward_bytes'])}, embedding gradients "
        f"{format_bytes(comm['backward_bytes'])}, dense all-reduce {format_bytes(comm['dense_allreduce_bytes'])}; "
        f"total {format_bytes(comm['total_bytes'])} ({format_bytes(comm['per_rank_mean_bytes'])} per rank)"
    )
    return "\n".join(lines)


def format_plan(plan: ShardingPlan, module: nn.Module, **kwargs: Any) -> str:
    """A readable table of ``plan``: every table with its rows, width, sharding, kernel, ranks and bytes, then
    memory per rank and communication per step. ``kwargs`` are those of :func:`plan_summary`.

    Example::

        >>> import torch
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> from multiembed.sharding import plan_sharding
        >>> ebc = EmbeddingBagCollection(
        ...     [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100, feature_names=["f0"])],
        ...     device=torch.device("meta"),
        ... )
        >>> plan = plan_sharding(ebc, "table_wise", world_size=2, local_world_size=2, device_type="cpu")
        >>> "t0" in format_plan(plan, ebc, world_size=2)
        True
    """
    return format_summary(plan_summary(plan, module, **kwargs))


def format_brief(summary: Mapping[str, Any], max_table_lines: int = 8) -> str:
    """:func:`format_summary` for a console: a plan with more than ``max_table_lines`` tables shows one line of
    table counts per sharding type and kernel instead of one line per table (a Criteo model has 39), then the same
    optimizer, memory and communication lines. The full table belongs in a file (the trainer's ``plan.txt``).

    Example::

        >>> summary = {"world_size": 2, "local_world_size": 2, "batch_size_per_rank": 8, "tables": [],
        ...     "memory": {"min_bytes": 0, "median_bytes": 0, "mean_bytes": 0, "max_bytes": 0, "max_rank": 0},
        ...     "dense_parameter_bytes": 0, "ranks": [], "communication": {k: 0 for k in ("input_bytes",
        ...     "forward_bytes", "backward_bytes", "dense_allreduce_bytes", "total_bytes", "per_rank_mean_bytes")}}
        >>> format_brief(summary).splitlines()[0]
        'Sharding plan: 0 tables on 2 ranks (one host), per-rank batch 8; bytes include optimizer state'
    """
    full = format_summary(summary)
    tables = summary["tables"]
    if len(tables) <= max_table_lines:
        return full
    lines = full.splitlines()
    # format_summary writes: the title, the column header, one line per table, then the rest.
    rest = lines[2 + len(tables):]
    counts: Dict[str, int] = {}
    for t in tables:
        key = f"{t['sharding_type']} ({t['compute_kernel']})"
        counts[key] = counts.get(key, 0) + 1
    by_type = ", ".join(f"{n} {key}" for key, n in sorted(counts.items(), key=lambda kv: -kv[1]))
    return "\n".join([lines[0], f"Tables: {by_type}", *rest])
