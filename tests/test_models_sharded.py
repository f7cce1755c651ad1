"""Padding under DMP: on 2 gloo ranks, every sharding of the fused tables gets the per-set xavier bound on its
logical columns and exact zeros on its padding columns, and keeps them zero through fused-optimizer steps.

Covers the ``init_fn`` views TorchRec passes per rank (see ``multiembed.models.sparse_arch``): column-wise with one
set per shard, column-wise with two shards on one rank (stacked row-wise), row-wise, table-wise (a rank holding
nothing gets an empty tensor) and data-parallel.
"""

from __future__ import annotations

import math
import os
import socket

import pytest
import torch
import torch.multiprocessing as mp

pytestmark = pytest.mark.multiprocess

VOCAB = {"cw_split": 50, "cw_stacked": 60, "rw": 70, "tw": 40, "dp": 30}
NUM_SETS, SET_DIM, STORED = 4, 10, 12
STEPS, BATCH = 3, 8


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _rank(rank: int, world_size: int, port: int) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port), RANK=str(rank), WORLD_SIZE=str(world_size),
                      LOCAL_RANK=str(rank), LOCAL_WORLD_SIZE=str(world_size))
    torch.set_num_threads(1)
    import torch.distributed as dist

    dist.init_process_group("gloo", rank=rank, world_size=world_size)
    try:
        _check(rank, world_size)
    finally:
        dist.destroy_process_group()


def _check(rank: int, world_size: int) -> None:
    from torchrec.datasets.utils import Batch
    from torchrec.distributed.model_parallel import DistributedModelParallel
    from torchrec.distributed.sharding_plan import (
        column_wise,
        construct_module_sharding_plan,
        data_parallel,
        row_wise,
        table_wise,
    )
    from torchrec.distributed.types import ShardingPlan
    from torchrec.optim.apply_optimizer_in_backward import apply_optimizer_in_backward
    from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

    from multiembed.models import MultiEmbeddingTrain, build_model

    torch.manual_seed(rank)
    model = build_model("dnn-me-4x", VOCAB, device=torch.device("meta"), hidden=8)
    collection = model.sparse_arch.embedding_bag_collection
    apply_optimizer_in_backward(torch.optim.Adagrad, collection.parameters(), {"lr": 0.5})
    plan = construct_module_sharding_plan(
        collection,
        {
            "t_cw_split": column_wise(ranks=[0, 1, 0, 1], compute_kernel="fused"),  # one set per shard
            "t_cw_stacked": column_wise(ranks=[0, 1], compute_kernel="fused"),  # two sets per shard
            "t_rw": row_wise(compute_kernel="fused"),
            "t_tw": table_wise(rank=1, compute_kernel="fused"),
            "t_dp": data_parallel(),
        },
        world_size=world_size,
        local_size=world_size,
        device_type="cpu",
    )
    train = MultiEmbeddingTrain(model)
    dmp = DistributedModelParallel(
        train, device=torch.device("cpu"), plan=ShardingPlan({"model.sparse_arch.embedding_bag_collection": plan})
    )
    bound = math.sqrt(6.0 / (sum(VOCAB.values()) + SET_DIM))

    def local_blocks():
        for key, value in dmp.state_dict().items():
            if "embedding_bags" not in key:
                continue
            shards = value.local_shards() if hasattr(value, "local_shards") else None
            if shards is None:
                yield key, value.detach(), 0
            else:
                for shard in shards:
                    yield key, shard.tensor.detach(), shard.metadata.shard_offsets[1]

    def check_blocks(when: str) -> int:
        checked = 0
        for key, block, col_offset in local_blocks():
            columns = torch.arange(col_offset, col_offset + block.shape[1])
            padding = columns % STORED >= SET_DIM
            assert padding.any(), f"{key}: block without padding columns"
            assert torch.equal(block[:, padding], torch.zeros_like(block[:, padding])), f"{when} {key}: padding != 0"
            logical = block[:, ~padding]
            assert logical.abs().max() > 0, f"{when} {key}: logical columns are zero"
            if when == "init":
                assert logical.abs().max() <= bound, f"{key}: {logical.abs().max()} above the bound {bound}"
            checked += 1
        return checked

    assert check_blocks("init") > 0
    initial = {(key, offset): block.clone() for key, block, offset in local_blocks()}
    dense_optimizer = torch.optim.Adagrad([p for n, p in dmp.named_parameters() if "embedding_bags" not in n
                                           or "t_dp" in n], lr=0.5)
    keys = list(VOCAB)
    for step in range(STEPS):
        generator = torch.Generator().manual_seed(100 * step + rank)
        values = torch.cat([torch.randint(0, VOCAB[k], (BATCH,), generator=generator) for k in keys])
        batch = Batch(
            dense_features=torch.empty(BATCH, 0),
            sparse_features=KeyedJaggedTensor.from_lengths_sync(
                keys=keys, values=values, lengths=torch.ones(BATCH * len(keys), dtype=torch.int32)
            ),
            labels=torch.randint(0, 2, (BATCH,), generator=generator).float(),
        )
        loss, _ = dmp(batch)
        dense_optimizer.zero_grad()
        loss.backward()
        dense_optimizer.step()
    assert check_blocks("trained") > 0
    for key, block, offset in local_blocks():
        assert not torch.equal(block, initial[(key, offset)]), f"{key} (columns from {offset}) did not train"


def test_padding_is_zero_and_stays_zero_in_every_sharding() -> None:
    mp.start_processes(_rank, args=(2, _free_port()), nprocs=2, join=True, start_method="spawn")
