"""Sharding plans on paper: strategies, set-parallel column shards, memory and communication accounting, refusals,
and ``multiembed plan``. The 2-rank DMP checks are in ``test_sharding_dist.py``."""

from __future__ import annotations

import json
from typing import Dict, List, Optional, Sequence, Tuple

import pytest

import torch
from torch import nn
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
from torchrec import optim as trec_optim
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.partitioners import GreedyPerfPartitioner

from multiembed.sharding import (
    SetParallelPartitioner,
    ShardingError,
    ShardingStrategy,
    build_constraints,
    build_topology,
    embedding_tables,
    format_plan,
    make_sharders,
    plan_sharding,
    plan_summary,
    table_strategies,
)
from multiembed.sharding.report import format_ranks

SET_WIDTH = 12
# Criteo-1TB-like spread: two huge tables, mid-size and tiny ones; 4 sets of 12 columns each.
TABLES: List[Tuple[str, int, int]] = [
    ("C1", 40_000_000, 48),
    ("C2", 39_060, 48),
    ("C3", 3_067_956, 48),
    ("C4", 3, 48),
    ("C5", 40_000_000, 48),
    ("C6", 976, 48),
]
MAX_RANKS_PER_STRATEGY = 128


class SparseArch(nn.Module):
    def __init__(self, ebc: EmbeddingBagCollection, stored_set_dim: Optional[int]) -> None:
        super().__init__()
        self.embedding_bag_collection = ebc
        if stored_set_dim is not None:
            self.stored_set_dim = stored_set_dim


class Model(nn.Module):
    """The model zoo's shape: ``model.sparse_arch.embedding_bag_collection`` plus a dense part."""

    def __init__(
        self,
        tables: Sequence[Tuple[str, int, int]] = TABLES,
        stored_set_dim: Optional[int] = SET_WIDTH,
        device: str = "meta",
    ) -> None:
        super().__init__()
        configs = [
            EmbeddingBagConfig(name=f"t_{name}", num_embeddings=rows, embedding_dim=width, feature_names=[name])
            for name, rows, width in tables
        ]
        ebc = EmbeddingBagCollection(tables=configs, device=torch.device(device))
        self.sparse_arch = SparseArch(ebc, stored_set_dim)
        self.over_arch = nn.Linear(64, 1, device=torch.device(device))


def with_optimizer(model: Model, optimizer: type) -> Model:
    _apply_optimizer_in_backward(optimizer, model.sparse_arch.parameters(), {"lr": 0.01})
    return model


def module_plan(plan) -> Dict[str, object]:
    return plan.plan["sparse_arch.embedding_bag_collection"]


# --------------------------------------------------------------------------------------------------- strategies


@pytest.mark.parametrize("strategy", ["table_wise", "row_wise", "column_wise", "data_parallel"])
def test_each_named_strategy_shards_every_table_its_way_on_paper(strategy: str) -> None:
    world = 16
    model = Model()
    # data_parallel replicates the 40M-row tables on every rank: give it the room.
    plan = plan_sharding(
        model, strategy, world_size=world, local_world_size=8, device_type="cuda",
        hbm_gb=400 if strategy == "data_parallel" else 80,
    )
    for name, rows, width in TABLES:
        sharding = module_plan(plan)[f"t_{name}"]
        assert sharding.sharding_type == strategy
        if strategy == "data_parallel":
            assert sharding.sharding_spec is None and sharding.ranks == list(range(world))
            assert sharding.compute_kernel == "dense"
            continue
        assert sharding.compute_kernel == "fused"
        shards = sharding.sharding_spec.shards
        if strategy == "table_wise":
            assert len(shards) == 1 and list(shards[0].shard_sizes) == [rows, width]
        elif strategy == "row_wise":
            assert [s.placement.rank() for s in shards] == list(range(world))
            assert sum(s.shard_sizes[0] for s in shards) == rows
            offsets = [s.shard_offsets[0] for s in shards]
            assert offsets == sorted(offsets) and offsets[0] == 0
        else:  # one shard per embedding set, every set of a table on its own rank
            assert [list(s.shard_offsets) for s in shards] == [[0, k * SET_WIDTH] for k in range(width // SET_WIDTH)]
            assert all(list(s.shard_sizes) == [rows, SET_WIDTH] for s in shards)
            assert len({s.placement.rank() for s in shards}) == width // SET_WIDTH


def test_overrides_change_only_the_named_tables() -> None:
    plan = plan_sharding(
        Model(), "table_wise", world_size=8, local_world_size=8, device_type="cuda", hbm_gb=80,
        overrides={"t_C1": "row_wise", "t_C6": "data_parallel"},
    )
    types = {name: s.sharding_type for name, s in module_plan(plan).items()}
    assert types == {
        "t_C1": "row_wise", "t_C2": "table_wise", "t_C3": "table_wise", "t_C4": "table_wise",
        "t_C5": "table_wise", "t_C6": "data_parallel",
    }


def test_auto_plan_for_128_ranks_names_every_table_and_summarises_the_ranks() -> None:
    model = with_optimizer(Model(), trec_optim.Adam)
    plan = plan_sharding(model, "auto", world_size=128, local_world_size=8, device_type="cuda", hbm_gb=80)
    text = format_plan(plan, model, world_size=128, local_world_size=8, device_type="cuda", capacity_gb=80)
    lines = text.splitlines()
    table_lines = {line.split()[0] for line in lines}
    assert {f"t_{name}" for name, _, _ in TABLES} <= table_lines
    # One line per table plus a bounded summary, never one line (or column) per rank.
    assert len(lines) <= len(TABLES) + 12
    assert max(len(line) for line in lines) < 400
    assert "most loaded ranks" in text and "16 hosts x 8" in text
    # Every shard lands on a rank of the topology.
    for sharding in module_plan(plan).values():
        assert all(0 <= r < 128 for r in sharding.ranks)


@pytest.mark.filterwarnings("ignore:HeuristicalStorageReservation:FutureWarning")
def test_set_parallel_partitioner_keeps_the_sets_of_a_table_apart() -> None:
    # A heavily pooled one-set table loads rank 0; TorchRec's greedy partitioner then puts both sets of the light
    # two-set table on rank 1, the set-parallel one spreads them.
    model = Model(tables=[("heavy", 1000, 12), ("light", 10, 24)])
    tables = embedding_tables(model)
    constraints = build_constraints(
        tables, table_strategies(tables, "column_wise"), SET_WIDTH, pooling_factors={"heavy": 500.0, "light": 1.0}
    )
    topology = build_topology(2, 2, "cuda", hbm_gb=80)

    def light_ranks(partitioner) -> List[int]:
        planner = EmbeddingShardingPlanner(
            topology=topology, batch_size=512, constraints=constraints, partitioner=partitioner, debug=False
        )
        plan = planner.plan(model, [EmbeddingBagCollectionSharder()])
        return [s.placement.rank() for s in module_plan(plan)["t_light"].sharding_spec.shards]

    stock = light_ranks(GreedyPerfPartitioner())
    assert len(set(stock)) == 1, f"TorchRec now spreads column shards itself ({stock}); the override may go"
    assert sorted(light_ranks(SetParallelPartitioner())) == [0, 1]


def test_cpu_sharder_offers_row_wise_where_torchrecs_does_not() -> None:
    assert "row_wise" not in EmbeddingBagCollectionSharder().sharding_types("cpu")
    assert "row_wise" in make_sharders(None, "cpu")[0].sharding_types("cpu")
    plan = plan_sharding(Model(), "row_wise", world_size=2, local_world_size=2, device_type="cpu")
    assert {s.sharding_type for s in module_plan(plan).values()} == {"row_wise"}


def test_set_width_comes_from_the_model_or_the_caller() -> None:
    explicit = plan_sharding(
        Model(stored_set_dim=None), "column_wise", world_size=4, local_world_size=4, device_type="cuda",
        hbm_gb=400, set_width=24,
    )
    assert {s.shard_sizes[1] for s in module_plan(explicit)["t_C1"].sharding_spec.shards} == {24}
    with pytest.raises(ValueError, match="column_wise sharding needs set_width"):
        plan_sharding(Model(stored_set_dim=None), "column_wise", world_size=4, local_world_size=4, device_type="cuda")


# --------------------------------------------------------------------------------------------------- accounting


def _shard_bytes(sharding, rows: int, width: int) -> Dict[int, Tuple[int, int]]:
    """{rank: (shard rows, shard columns)} read straight from the plan's shard metadata."""
    if sharding.sharding_spec is None:
        return {r: (rows, width) for r in sharding.ranks}
    out: Dict[int, Tuple[int, int]] = {}
    for s in sharding.sharding_spec.shards:
        out[s.placement.rank()] = (s.shard_sizes[0], s.shard_sizes[1])
    return out


@pytest.mark.parametrize(
    "strategy, optimizer, per_weight, per_row",
    [
        ("table_wise", trec_optim.Adagrad, 1, 0),
        ("row_wise", trec_optim.RowWiseAdagrad, 0, 1),
        ("column_wise", trec_optim.Adam, 2, 0),
        ("data_parallel", trec_optim.Adagrad, 1, 0),  # replicas are stepped with the tables' own rule
    ],
)
def test_memory_per_rank_is_weights_plus_optimizer_state(strategy, optimizer, per_weight, per_row) -> None:
    tables = [("a", 1000, 24), ("b", 37, 24), ("c", 501, 48)]
    world = 4
    model = with_optimizer(Model(tables=tables), optimizer)
    plan = plan_sharding(model, strategy, world_size=world, local_world_size=world, device_type="cuda", hbm_gb=8)
    expected = [0] * world
    for name, rows, width in tables:
        for rank, (r, c) in _shard_bytes(module_plan(plan)[f"t_{name}"], rows, width).items():
            expected[rank] += 4 * (r * c + per_weight * r * c + per_row * r)
    summary = plan_summary(plan, model, world_size=world)
    assert [r["total_bytes"] for r in summary["ranks"]] == expected
    assert summary["memory"]["max_bytes"] == max(expected)
    assert summary["dense_parameter_bytes"] == (64 + 1) * 4
    json.dumps(summary)  # saved by the trainer as is


def _comm(strategy: str, rows: int, batch: int, world: int) -> Dict[str, int]:
    model = Model(tables=[("x", rows, 48)])
    plan = plan_sharding(model, strategy, world_size=world, local_world_size=world, device_type="cuda", hbm_gb=80)
    return plan_summary(plan, model, world_size=world, batch_size=batch)["tables"][0]["communication_bytes"]


def test_communication_estimates_follow_the_sharding() -> None:
    tw = _comm("table_wise", 10_000, 256, 4)
    assert tw == _comm("table_wise", 20_000, 256, 4)  # lookups move ids and pooled rows, not the table
    assert {k: 2 * v for k, v in tw.items()} == _comm("table_wise", 10_000, 512, 4)
    rw = _comm("row_wise", 10_000, 256, 4)
    assert rw["forward"] == 4 * tw["forward"] and rw["input"] == tw["input"]  # partial sums of the global batch
    dp = _comm("data_parallel", 10_000, 256, 4)
    assert dp["input"] == dp["forward"] == 0
    assert _comm("data_parallel", 20_000, 256, 4)["backward"] == 2 * dp["backward"]  # the whole gradient
    assert set(_comm("table_wise", 10_000, 256, 1).values()) == {0}


# --------------------------------------------------------------------------------------------------- refusals


def test_refuses_in_one_line_when_nothing_fits() -> None:
    # About 83M rows x 48 fp32 columns do not fit in 8 x 1 GiB, however the planner cuts them.
    need = f"{sum(rows * width * 4 for _, rows, width in TABLES) / 2**30:.2f} GiB"
    with pytest.raises(ShardingError) as err:
        plan_sharding(Model(), "auto", world_size=8, local_world_size=8, device_type="cuda", hbm_gb=1)
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("no sharding plan fits on 8 ranks x 1.00 GiB HBM")
    assert f"the tables need at least {need} in all" in message
    # The same tables fit on 128 ranks.
    plan_sharding(Model(), "auto", world_size=128, local_world_size=8, device_type="cuda", hbm_gb=1)
    with pytest.raises(ShardingError, match=rf"one rank needs at least {need} \({need} of data-parallel replicas\)"):
        plan_sharding(Model(), "data_parallel", world_size=8, local_world_size=8, device_type="cuda", hbm_gb=8)


@pytest.mark.parametrize(
    "kwargs, needle",
    [
        ({"world_size": 8, "local_world_size": 3}, "must divide world_size"),
        ({"world_size": 0, "local_world_size": 1}, "world_size: expected a positive integer"),
        ({"device_type": "tpu"}, "device_type"),
        ({"device_type": "cpu", "hbm_gb": 80}, "hbm_gb"),
        ({"strategy": "diagonal"}, "unknown sharding strategy 'diagonal'"),
        ({"overrides": {"t_nope": "row_wise"}}, "unknown table 't_nope'"),
        ({"overrides": {"t_C1": "sideways"}}, "override for table 't_C1'"),
        ({"strategy": "column_wise", "set_width": 36}, "not a multiple of set_width 36"),
        ({"set_width": 10}, "set_width: expected a positive multiple of 4"),
        ({"pooling_factors": {"C99": 3.0}}, "C99"),
        ({"batch_size": 0}, "batch_size"),
    ],
)
def test_malformed_requests_are_clear_value_errors(kwargs: dict, needle: str) -> None:
    args = {"world_size": 8, "local_world_size": 8, "device_type": "cuda", "strategy": "table_wise"}
    args.update(kwargs)
    strategy = args.pop("strategy")
    with pytest.raises(ValueError, match=needle):
        plan_sharding(Model(), strategy, **args)


def test_widths_not_divisible_by_four_are_refused_by_name() -> None:
    with pytest.raises(ValueError, match=r"table 't_odd': embedding_dim 10 is not a multiple of 4"):
        embedding_tables(Model(tables=[("ok", 10, 12), ("odd", 10, 10)]))
    with pytest.raises(ValueError, match="no EmbeddingBagCollection"):
        embedding_tables(nn.Linear(3, 3))


def test_strategy_names_parse_with_either_separator() -> None:
    assert ShardingStrategy.parse("column-wise") is ShardingStrategy.COLUMN_WISE
    assert ShardingStrategy.choices() == ["auto", "table_wise", "row_wise", "column_wise", "data_parallel"]


def test_rank_lists_stay_short_for_big_topologies() -> None:
    assert format_ranks(list(range(128))) == "0-127"
    assert format_ranks([11, 8, 9, 10, 0, 1, 2, 3]) == "0-3,8-11"
    assert format_ranks([8, 0, 24], in_order=True) == "8,0,24"  # column shards: set k on the k-th rank
    every_other = format_ranks(list(range(0, 128, 2)))
    assert every_other.startswith("64 ranks: 0,2,4") and every_other.endswith(",...") and len(every_other) <= 40
