"""Sharding plans run through DMP on 2 gloo ranks give the unsharded module's outputs, for every strategy."""

from __future__ import annotations

import socket
from datetime import timedelta
from typing import Dict, List, Optional, Tuple

import pytest

import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import nn
from torchrec import EmbeddingBagCollection, EmbeddingBagConfig, KeyedJaggedTensor
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.types import ShardingEnv

from multiembed.sharding import ShardingError, make_sharders, plan_sharding

WORLD_SIZE = 2
SET_WIDTH = 4
# (name, rows, width): two 2-set tables and one 4-set table (more sets than ranks).
TABLES: List[Tuple[str, int, int]] = [("t0", 13, 8), ("t1", 7, 8), ("t2", 20, 16)]
BATCH = 5
# (label, strategy, overrides)
CASES: List[Tuple[str, str, Optional[Dict[str, str]]]] = [
    ("table_wise", "table_wise", None),
    ("row_wise", "row_wise", None),
    ("column_wise", "column_wise", None),
    ("data_parallel", "data_parallel", None),
    ("auto", "auto", None),
    ("mixed", "table_wise", {"t1": "row_wise", "t2": "data_parallel"}),
]


class _SparseArch(nn.Module):
    """Stands in for the model zoo's sparse arch: the EBC plus the stored set width the planner reads."""

    def __init__(self, ebc: EmbeddingBagCollection) -> None:
        super().__init__()
        self.embedding_bag_collection = ebc
        self.stored_set_dim = SET_WIDTH


class _Model(nn.Module):
    def __init__(self, device: torch.device) -> None:
        super().__init__()
        configs = [
            EmbeddingBagConfig(name=name, num_embeddings=rows, embedding_dim=width, feature_names=[f"f_{name}"])
            for name, rows, width in TABLES
        ]
        self.sparse_arch = _SparseArch(EmbeddingBagCollection(tables=configs, device=device))

    def forward(self, features: KeyedJaggedTensor):
        return self.sparse_arch.embedding_bag_collection(features)


def _local_batch(rank: int) -> KeyedJaggedTensor:
    """A different batch on each rank, with empty bags and repeated ids."""
    generator = torch.Generator().manual_seed(1000 + rank)
    lengths = torch.randint(0, 4, (len(TABLES) * BATCH,), generator=generator)
    values = []
    for (name, rows, _), table_lengths in zip(TABLES, lengths.view(len(TABLES), BATCH)):
        values.append(torch.randint(0, rows, (int(table_lengths.sum()),), generator=generator))
    return KeyedJaggedTensor.from_lengths_sync(
        keys=[f"f_{name}" for name, _, _ in TABLES], values=torch.cat(values), lengths=lengths
    )


def _copy_weights_in(dmp: nn.Module, reference: Dict[str, torch.Tensor]) -> None:
    """Writes the reference weights into this rank's shards (state_dict entries are views of the kernels' weights)."""
    with torch.no_grad():
        for key, tensor in dmp.state_dict().items():
            full = reference[key]
            if hasattr(tensor, "local_shards"):
                for shard in tensor.local_shards():
                    (r0, c0), (nr, nc) = shard.metadata.shard_offsets, shard.metadata.shard_sizes
                    shard.tensor.copy_(full[r0 : r0 + nr, c0 : c0 + nc])
            else:
                tensor.copy_(full)


def _local_column_offsets(dmp: nn.Module, table: str) -> List[int]:
    key = f"sparse_arch.embedding_bag_collection.embedding_bags.{table}.weight"
    return sorted(int(s.metadata.shard_offsets[1]) for s in dmp.state_dict()[key].local_shards())


def _worker(rank: int, port: int) -> None:
    dist.init_process_group(
        "gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=WORLD_SIZE, timeout=timedelta(seconds=120)
    )
    try:
        torch.manual_seed(0)  # the same reference weights on both ranks
        reference_model = _Model(torch.device("cpu"))
        reference = reference_model.state_dict()
        features = _local_batch(rank)
        expected = reference_model(features).to_dict()
        pg = dist.group.WORLD
        for label, strategy, overrides in CASES:
            model = _Model(torch.device("meta"))
            plan = plan_sharding(
                model, strategy, world_size=WORLD_SIZE, local_world_size=WORLD_SIZE, device_type="cpu",
                overrides=overrides, pg=pg, batch_size=BATCH,
            )
            dmp = DistributedModelParallel(
                model,
                device=torch.device("cpu"),
                plan=plan,
                sharders=make_sharders(None, "cpu"),
                env=ShardingEnv.from_process_group(pg),
            )
            _copy_weights_in(dmp, reference)
            got = dmp(features).to_dict()
            assert sorted(got) == sorted(expected), label
            for key in expected:
                torch.testing.assert_close(got[key], expected[key], rtol=1e-5, atol=1e-6, msg=f"{label}: {key}")

            module_plan = plan.plan["sparse_arch.embedding_bag_collection"]
            wanted = {name: (overrides or {}).get(name, strategy) for name, _, _ in TABLES}
            for name, want in wanted.items():
                if want != "auto":
                    assert module_plan[name].sharding_type == want, (label, name)
            if strategy == "column_wise":
                for name, _, width in TABLES:
                    shards = module_plan[name].sharding_spec.shards
                    # Shard k holds set k: columns [k * SET_WIDTH, (k + 1) * SET_WIDTH).
                    assert [list(s.shard_offsets) for s in shards] == [[0, k * SET_WIDTH] for k in range(len(shards))]
                    assert all(s.shard_sizes[1] == SET_WIDTH for s in shards)
                    placed = [s.placement.rank() for s in shards]
                    if len(shards) <= WORLD_SIZE:
                        assert len(set(placed)) == len(shards), (name, placed)  # sets on different ranks
                    here = sorted(k * SET_WIDTH for k, r in enumerate(placed) if r == rank)
                    assert _local_column_offsets(dmp, name) == here, (name, rank)

        _check_zoo_models(rank, pg)

        # Every rank gets the same one-line refusal, none waits for a plan forever.
        with pytest.raises(ShardingError, match="no sharding plan fits on 2 ranks"):
            plan_sharding(
                _Model(torch.device("meta")), "data_parallel", world_size=WORLD_SIZE, local_world_size=WORLD_SIZE,
                device_type="cpu", ddr_gb=1e-6, pg=pg, batch_size=BATCH,
            )
    finally:
        dist.destroy_process_group()


ZOO_VOCAB = {"C1": 50, "C2": 31, "C3": 17}
# (layout, strategy): the model zoo's two table layouts under the strategies that split them differently.
ZOO_CASES = [("fused", "column_wise"), ("per_set", "table_wise"), ("per_set", "auto")]


def _check_zoo_models(rank: int, pg: dist.ProcessGroup) -> None:
    """A real ``build_model`` model, sharded, gives the unsharded model's logits (eval mode, same weights)."""
    from multiembed.models import build_model

    generator = torch.Generator().manual_seed(2000 + rank)
    lengths = torch.ones(len(ZOO_VOCAB) * BATCH, dtype=torch.long)
    values = torch.cat([torch.randint(0, n, (BATCH,), generator=generator) for n in ZOO_VOCAB.values()])
    features = KeyedJaggedTensor.from_lengths_sync(keys=list(ZOO_VOCAB), values=values, lengths=lengths)
    dense = torch.empty(BATCH, 0)
    for layout, strategy in ZOO_CASES:
        label = f"dcnv2-me-2x {layout} {strategy}"
        torch.manual_seed(0)
        reference_model = build_model("dcnv2-me-2x", ZOO_VOCAB, device=torch.device("cpu"), layout=layout, hidden=16)
        reference_model.eval()
        expected = reference_model(dense, features)
        model = build_model("dcnv2-me-2x", ZOO_VOCAB, device=torch.device("meta"), layout=layout, hidden=16)
        set_width = model.sparse_arch.stored_set_dim
        plan = plan_sharding(
            model, strategy, world_size=WORLD_SIZE, local_world_size=WORLD_SIZE, device_type="cpu", pg=pg,
            batch_size=BATCH,
        )
        dmp = DistributedModelParallel(
            model, device=torch.device("cpu"), plan=plan, sharders=make_sharders(None, "cpu"),
            env=ShardingEnv.from_process_group(pg),
        )
        _copy_weights_in(dmp, reference_model.state_dict())
        dmp.eval()
        torch.testing.assert_close(dmp(dense, features), expected, rtol=1e-5, atol=1e-6, msg=label)
        if strategy == "column_wise":
            for sharding in plan.plan["sparse_arch.embedding_bag_collection"].values():
                assert {s.shard_sizes[1] for s in sharding.sharding_spec.shards} == {set_width}, label


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.mark.multiprocess
def test_every_strategy_matches_the_unsharded_module_on_two_ranks() -> None:
    mp.spawn(_worker, args=(_free_port(),), nprocs=WORLD_SIZE, join=True)
