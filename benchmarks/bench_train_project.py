"""The project contender: the trainer's own training step (DMP, fused sparse optimizer, dense Adam, pipeline) on the
benchmark's batches, with its step-time breakdown."""

from __future__ import annotations

import copy
import functools
import math
import statistics
from typing import Any, Dict, Iterator, List, Mapping, Sequence, Tuple, Union

import torch
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch

from multiembed.benchmarks.bench_train_timing import median_time, tensor_bytes, timed
from multiembed.benchmarks.bench_train_workload import BenchBatch
from multiembed.config import TrainConfig
from multiembed.models import ModelSpec, MultiEmbeddingModel, SetInteractionArch
from multiembed.models.precision import dense_autocast
from multiembed.training.build import build_training
from multiembed.training.distributed import DistContext


class ProjectRunner:
    """The trainer's training step on synthetic batches: DMP + fused sparse optimizer + dense Adam + pipeline.

    Args:
        model_name: a zoo name or a parsed :class:`ModelSpec`.
        vocab_sizes: ``{field: rows}``.
        ctx: the process's place in the job.
        local_batch: rows per rank and step (the planner's estimate only; any batch size runs).
        layout: ``fused`` or ``per_set``.
        hidden, dropout: as ``build_model``.
        sharding: strategy name for ``plan_sharding``.
        seed: initialisation seed.
        precision: the dense arches' compute precision (``fp32`` or ``bf16``).
        table_dtype: the tables' storage dtype (``fp32`` or ``fp16``).
    """

    def __init__(
        self,
        model_name: Union[str, ModelSpec],
        vocab_sizes: Mapping[str, int],
        ctx: DistContext,
        local_batch: int,
        layout: str = "fused",
        hidden: int = 400,
        dropout: float = 0.2,
        sharding: str = "auto",
        seed: int = 0,
        precision: str = "fp32",
        table_dtype: str = "fp32",
    ) -> None:
        self.device = ctx.device
        name = model_name.name if isinstance(model_name, ModelSpec) else model_name
        config = TrainConfig(
            data="", model=name, out="", layout=layout, hidden=hidden, dropout=dropout, sharding=sharding, seed=seed,
            batch_size=local_batch * ctx.world_size, device=ctx.device.type, precision=precision,
            table_dtype=table_dtype,
        )
        config.validate()
        built = build_training(config, vocab_sizes, num_dense=0, ctx=ctx, local_batch=local_batch)
        self.model = built.planned.model
        self.optim_config = built.optim_config
        self.dmp = built.dmp
        self.optimizer = built.optimizer
        self.pipeline = built.pipeline
        self.dmp.train()
        self._pipelined = False

    @property
    def inner(self) -> MultiEmbeddingModel:
        """The model inside DMP (sharded collection, dense arches on the device)."""
        return self.dmp.module.model

    def detached_dense_arches(self) -> Tuple[SetInteractionArch, nn.Module]:
        """Copies of the set arch and the over arch, for timing them alone.

        DMP's DDP wrapper (``static_graph``) hooks the real parameters and refuses a backward that reaches only some
        of them; the copies compute the same thing on the same device without the hooks.
        """
        return copy.deepcopy(self.inner.set_arch), copy.deepcopy(self.inner.over_arch)

    def run(self, batches: Sequence[BenchBatch], steps: int, offset: int = 0) -> float:
        """Trains ``steps`` steps cycling over ``batches``; returns the wall time in seconds (pipeline drained)."""
        feed: Iterator[Batch] = (batches[(offset + i) % len(batches)].batch for i in range(steps))
        self._pipelined = True

        def train() -> None:
            done = 0
            while True:
                try:
                    loss, *_ = self.pipeline.progress(feed)
                except StopIteration:
                    break
                done += 1
            if done != steps:
                raise RuntimeError(f"the pipeline ran {done} of {steps} steps")
            if not math.isfinite(float(loss)):
                raise RuntimeError("the project model's loss is not finite")

        return timed(train, self.device)

    def breakdown(self, bench_batch: BenchBatch, reps: int) -> Tuple[Dict[str, float], torch.Tensor]:
        """Median milliseconds of each sub-step (see the module docstring) on ``bench_batch``, and the batch's
        embeddings ``[B, K, F, d]`` (detached).

        Must run before the first :meth:`run`: the pipeline rewires the sharded collection's forward and input
        distribution for its own schedule, after which they cannot be called alone.
        """
        if self._pipelined:
            raise RuntimeError("breakdown() must run before the pipeline's first step")
        device, batch = self.device, bench_batch.batch
        model = self.inner
        sparse_arch = model.sparse_arch
        set_arch, over_arch = self.detached_dense_arches()
        collection = sparse_arch.embedding_bag_collection
        times: Dict[str, float] = {}

        def input_dist() -> Any:
            context = collection.create_context()
            return collection.input_dist(context, batch.sparse_features).wait().wait()

        times["input_dist"] = median_time(input_dist, device, reps)
        sparse_forward = median_time(lambda: sparse_arch(batch.sparse_features), device, reps)
        times["embedding_fwd"] = max(sparse_forward - times["input_dist"], 0.0)

        embeddings = sparse_arch(batch.sparse_features)
        grad = torch.randn_like(embeddings) * 1e-3
        backward_times = []
        for _ in range(reps):
            embeddings = sparse_arch(batch.sparse_features)
            backward_times.append(timed(lambda: embeddings.backward(grad), device))
        times["embedding_bwd"] = statistics.median(backward_times)

        leaf = embeddings.detach().requires_grad_()
        forward_times, backward_times = [], []
        # The dense arches in the model's precision (bf16: under autocast, as the model's forward runs them).
        autocast = functools.partial(dense_autocast, model.precision, device.type)

        def interaction_forward(box: List[torch.Tensor]) -> None:
            with autocast():
                box.append(set_arch(leaf))

        for _ in range(reps):
            box: List[torch.Tensor] = []
            forward_times.append(timed(lambda: interaction_forward(box), device))
            out = box[0]
            backward_times.append(timed(lambda: out.backward(torch.ones_like(out)), device))
        times["interaction_fwd"] = statistics.median(forward_times)
        times["interaction_bwd"] = statistics.median(backward_times)

        with autocast():
            per_set = set_arch(leaf).detach().requires_grad_()
        labels = batch.labels

        def over_step() -> None:
            with autocast():
                logits = over_arch(per_set.sum(dim=1).div(per_set.shape[1]))
            F.binary_cross_entropy_with_logits(logits.float(), labels).backward()

        times["over_arch"] = median_time(over_step, device, reps)

        optimizer_times = []
        for _ in range(reps):
            self.optimizer.zero_grad()
            loss, _ = self.dmp(batch)
            loss.backward()
            optimizer_times.append(timed(self.optimizer.step, device))
        times["optimizer"] = statistics.median(optimizer_times)
        self.optimizer.zero_grad()
        return {key: value * 1e3 for key, value in times.items()}, leaf.detach()

    def byte_counts(self) -> Dict[str, int]:
        """Parameter and optimizer-state bytes held by this rank (after at least one step)."""
        dense = [p for n, p in self.dmp.named_parameters() if ".embedding_bags." not in n and p.requires_grad]
        state = self.optimizer.state_dict()["state"]
        sparse_state = sum(tensor_bytes(v) for k, v in state.items() if ".embedding_bags." in k)
        dense_state = sum(tensor_bytes(v) for k, v in state.items() if ".embedding_bags." not in k)
        return {
            "embedding_param_bytes": int(self.model.embedding_bytes),
            "dense_param_bytes": sum(p.numel() * p.element_size() for p in dense),
            "sparse_optimizer_state_bytes": int(sparse_state),
            "dense_optimizer_state_bytes": int(dense_state),
        }
