#!/usr/bin/env python3
"""A multi-embedding model in your own TorchRec training loop, without ``multiembed.training``.

The shape is TorchRec's golden training example (``examples/golden_training/train_dlrm.py``): a process group (gloo
on CPU, nccl on GPU), embedding tables on ``meta``, the sparse optimizer fused into backward
(``_apply_optimizer_in_backward``), TorchRec's planner, ``DistributedModelParallel`` and ``TrainPipelineSparseDist``.
The only multiembed pieces are the model (``build_model``) and its train wrapper (``MultiEmbeddingTrain``, TorchRec's
``DLRMTrain`` contract: ``batch -> (loss, (loss, logits, labels))``), so they drop into any TorchRec code.

The data is made here: a few categorical fields with uniform ids, and clicks drawn from a hidden logistic model
(one weight per id and field, plus one planted field-pair interaction), so the loss has something to learn and the
example needs no dataset. Every rank draws its own batches.

Run on two local CPU ranks (the venv's ``bin`` on ``PATH``; torchx starts ``torchrun`` through bash)::

    torchx run -s local_cwd dist.ddp -j 1x2 --script examples/train_own_loop.py
    torchx run -s local_cwd dist.ddp -j 1x2 --script examples/train_own_loop.py -- --steps 60 --json losses.json

or with torchrun directly: ``torchrun --nproc_per_node 2 examples/train_own_loop.py``. Rank 0 prints the mean loss
every 10 steps and, at the end, the mean loss of the first and the last 10 steps (``--json OUT`` writes them).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Dict, Iterator, List, Optional, Sequence

import torch
from torch import distributed as dist
from torch.distributed.elastic.multiprocessing.errors import record
from torch.distributed.optim import _apply_optimizer_in_backward
from torchrec.datasets.utils import Batch
from torchrec.distributed import TrainPipelineSparseDist
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.model_parallel import DistributedModelParallel
from torchrec.distributed.planner import EmbeddingShardingPlanner
from torchrec.distributed.planner.storage_reservations import FixedPercentageStorageReservation
from torchrec.distributed.planner.types import KernelConfig, TopologyFactory, TrainerConfig
from torchrec.optim import Adagrad
from torchrec.optim.keyed import CombinedOptimizer, KeyedOptimizerWrapper
from torchrec.optim.optimizers import in_backward_optimizer_filter
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor

from multiembed.models import MultiEmbeddingTrain, build_model


class PlantedClicks:
    """Endless batches of one-hot categorical features whose clicks follow a hidden logistic model.

    ``logit = bias + sum_f w_f[id_f] + u[id_0] * u[id_1]``: one weight per (field, id) and a planted interaction of
    the first two fields, all drawn once from ``seed`` (the same on every rank: one ground truth); the ids and clicks
    of each batch come from a generator seeded by ``seed`` and the rank (different rows on every rank).

    Args:
        num_fields: categorical fields (KJT keys ``f0``, ``f1``, ...).
        vocab_size: ids per field.
        batch_size: rows per batch (per rank).
        rank: this process's rank (selects its stream of rows).
        seed: seed of the hidden model.
    """

    def __init__(self, num_fields: int, vocab_size: int, batch_size: int, rank: int, seed: int = 0) -> None:
        truth = torch.Generator().manual_seed(seed)
        self.keys = [f"f{i}" for i in range(num_fields)]
        self.vocab_size = vocab_size
        self.batch_size = batch_size
        self.weights = 1.5 * torch.randn(num_fields, vocab_size, generator=truth)
        self.pair = torch.randn(vocab_size, generator=truth)
        self.bias = -1.0
        self.rows = torch.Generator().manual_seed(seed * 1000 + 1 + rank)

    def click_probability(self, ids: torch.Tensor) -> torch.Tensor:
        """The hidden model's click probability of rows ``ids`` ``[B, F]``, ``[B]``."""
        fields = torch.arange(ids.shape[1])
        logit = self.bias + self.weights[fields, ids].sum(dim=1) + self.pair[ids[:, 0]] * self.pair[ids[:, 1]]
        return torch.sigmoid(logit)

    def __iter__(self) -> Iterator[Batch]:
        while True:
            ids = torch.randint(self.vocab_size, (self.batch_size, len(self.keys)), generator=self.rows)
            labels = torch.bernoulli(self.click_probability(ids), generator=self.rows)
            # KJT values are key-major: all rows of f0, then all rows of f1, ...; one id per row and field.
            features = KeyedJaggedTensor.from_lengths_sync(
                keys=self.keys,
                values=ids.t().reshape(-1),
                lengths=torch.ones(len(self.keys) * self.batch_size, dtype=torch.int32),
            )
            yield Batch(dense_features=torch.empty(self.batch_size, 0), sparse_features=features, labels=labels)


def mean_over_ranks(value: torch.Tensor) -> float:
    """The mean of a scalar over all ranks (a collective)."""
    total = value.detach().to(torch.float64).reshape(1).clone()
    dist.all_reduce(total)
    return float(total.item()) / dist.get_world_size()


def train(
    model_name: str = "dcnv2-me-2x",
    steps: int = 60,
    batch_size: int = 256,
    num_fields: int = 4,
    vocab_size: int = 100,
    hidden: int = 32,
    sparse_lr: float = 0.1,
    dense_lr: float = 3e-3,
    seed: int = 0,
) -> List[float]:
    """Builds, shards and trains ``model_name`` for ``steps`` steps on every rank (SPMD); returns the loss of each
    step, averaged over ranks.

    Args:
        model_name: a multiembed model name, e.g. ``dcnv2-me-2x`` (2 embedding sets of width 10).
        steps: training steps.
        batch_size: rows per rank and step.
        num_fields: categorical fields of the synthetic data.
        vocab_size: ids per field.
        hidden: MLP width of the model.
        sparse_lr: Adagrad learning rate of the embedding tables (fused into backward).
        dense_lr: Adam learning rate of the dense part.
        seed: seed of the model's initialisation and of the data.
    """
    # Process group, device, rank and backend: nccl + one GPU per rank when there are GPUs, gloo + CPU otherwise.
    rank = int(os.environ.get("RANK", "0"))
    local_rank = int(os.environ.get("LOCAL_RANK", "0"))
    if torch.cuda.is_available():
        device = torch.device(f"cuda:{local_rank}")
        torch.cuda.set_device(device)
        backend = "nccl"
    else:
        device = torch.device("cpu")
        backend = "gloo"
    dist.init_process_group(backend=backend)
    world_size = dist.get_world_size()
    torch.manual_seed(seed)

    # The model: embedding tables on `meta` (DMP materialises each rank's shards), dense arches on the device.
    data = PlantedClicks(num_fields, vocab_size, batch_size, rank=rank, seed=seed)
    model = build_model(
        model_name, {key: vocab_size for key in data.keys}, device=torch.device("meta"), dense_device=device,
        hidden=hidden, dropout=0.0,
    )
    train_model = MultiEmbeddingTrain(model)

    # The sparse optimizer runs inside backward on the touched rows (FBGEMM's fused kernels): mark the table weights
    # before sharding; the sharder reads the marks. FBGEMM's CPU kernels offer Adagrad, row-wise Adagrad and SGD.
    _apply_optimizer_in_backward(Adagrad, model.sparse_arch.embedding_bag_collection.parameters(), {"lr": sparse_lr})

    # TorchRec's planner picks a sharding per table for this topology (TorchRec 1.8 builds topologies through
    # TopologyFactory and recommends a fixed memory reservation); every rank computes the same plan.
    sharders = [EmbeddingBagCollectionSharder()]
    topology = TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size, local_world_size=int(os.environ.get("LOCAL_WORLD_SIZE", world_size))
        ),
        kernel_config=KernelConfig(compute_device=device.type),
    )
    planner = EmbeddingShardingPlanner(
        topology=topology, batch_size=batch_size, storage_reservation=FixedPercentageStorageReservation(0.15)
    )
    plan = planner.collective_plan(train_model, sharders, dist.GroupMember.WORLD)
    dmp = DistributedModelParallel(module=train_model, device=device, plan=plan, sharders=sharders)
    if rank == 0:
        print(f"{model_name} on {world_size} ranks ({backend}):")
        print(plan)

    # Everything the fused optimizer does not update (the dense arches; tables the planner made data-parallel)
    # gets Adam; DMP's fused optimizer and this one step together.
    dense_optimizer = KeyedOptimizerWrapper(
        dict(in_backward_optimizer_filter(dmp.named_parameters())),
        lambda params: torch.optim.Adam(params, lr=dense_lr),
    )
    optimizer = CombinedOptimizer([("fused", dmp.fused_optimizer), ("dense", dense_optimizer)])

    # The pipeline overlaps the next batch's input distribution with this batch's forward and backward.
    pipeline = TrainPipelineSparseDist(dmp, optimizer, device)
    batches = iter(data)
    losses: List[float] = []
    dmp.train()
    for step in range(1, steps + 1):
        loss, _logits, _labels = pipeline.progress(batches)
        losses.append(mean_over_ranks(loss))
        if rank == 0 and step % 10 == 0:
            print(f"step {step:>4}: loss {sum(losses[-10:]) / len(losses[-10:]):.4f} (mean of the last 10 steps)")
    return losses


def parse_args(argv: Optional[Sequence[str]] = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--model", default="dcnv2-me-2x", help="multiembed model name (default: dcnv2-me-2x)")
    parser.add_argument("--steps", type=int, default=60, help="training steps (default: 60)")
    parser.add_argument("--batch-size", type=int, default=256, help="rows per rank and step (default: 256)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the model and the data (default: 0)")
    parser.add_argument("--json", default=None, help="rank 0 writes the per-step losses and the summary here")
    args = parser.parse_args(argv)
    if args.steps < 20:
        parser.error("--steps must be at least 20 (the summary compares the first and the last 10 steps)")
    return args


@record
def main(argv: Optional[Sequence[str]] = None) -> None:
    args = parse_args(argv)
    losses = train(model_name=args.model, steps=args.steps, batch_size=args.batch_size, seed=args.seed)
    if dist.get_rank() == 0:
        summary: Dict[str, object] = {
            "model": args.model,
            "world_size": dist.get_world_size(),
            "steps": len(losses),
            "first10_loss": sum(losses[:10]) / 10,
            "last10_loss": sum(losses[-10:]) / 10,
            "losses": losses,
        }
        print(f"mean loss: first 10 steps {summary['first10_loss']:.4f}, last 10 steps {summary['last10_loss']:.4f}")
        if args.json:
            with open(args.json, "w", encoding="utf-8") as f:
                json.dump(summary, f, indent=1)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
