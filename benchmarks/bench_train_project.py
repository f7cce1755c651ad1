"""The project contender: the trainer's own training step (DMP, fused sparse optimizer, dense Adam, pipeline) on the
benchmark's batches, also timed phase by phase inside real steps."""

from __future__ import annotations

import contextlib
import copy
import math
from typing import Any, Callable, ContextManager, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch
from torch import nn
from torchrec.datasets.utils import Batch

from multiembed.benchmarks.bench_train_phases import PhaseClock, StepTimer, arch_hooks, module_hooks, patched
from multiembed.benchmarks.bench_train_timing import tensor_bytes, timed
from multiembed.benchmarks.bench_train_workload import BenchBatch
from multiembed.benchmarks.bench_train_yardstick import GemmTimer
from multiembed.config import TrainConfig
from multiembed.models import ModelSpec, MultiEmbeddingModel, SetInteractionArch
from multiembed.training.build import build_training
from multiembed.training.distributed import DistContext


def project_train_config(
    model_name: str, batch_size: int, device_type: str, layout: str, hidden: int, dropout: float, sharding: str,
    seed: int, precision: str, table_dtype: str,
) -> TrainConfig:
    """The training options :class:`ProjectRunner` builds with (the trainer's defaults for the rest, its optimizers
    included), validated.

    Raises:
        ValueError: an invalid option.
    """
    config = TrainConfig(
        data="", model=model_name, out="", layout=layout, hidden=hidden, dropout=dropout, sharding=sharding, seed=seed,
        batch_size=batch_size, device=device_type, precision=precision, table_dtype=table_dtype,
    )
    config.validate()
    return config


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
        config = project_train_config(name, local_batch * ctx.world_size, ctx.device.type, layout, hidden, dropout,
                                      sharding, seed, precision, table_dtype)
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

    def run(self, batches: Sequence[BenchBatch], steps: int, offset: int = 0,
            around_step: Callable[[], ContextManager[Any]] = contextlib.nullcontext) -> float:
        """Trains ``steps`` steps cycling over ``batches``; returns the wall time in seconds (pipeline drained).

        ``around_step()`` is entered around each ``progress`` call of the pipeline (the last call, which finds the
        batches exhausted, leaves it with ``StopIteration``).
        """
        feed: Iterator[Batch] = (batches[(offset + i) % len(batches)].batch for i in range(steps))
        self._pipelined = True

        def train() -> None:
            done = 0
            while True:
                try:
                    with around_step():
                        loss, *_ = self.pipeline.progress(feed)
                except StopIteration:
                    break
                done += 1
            if done != steps:
                raise RuntimeError(f"the pipeline ran {done} of {steps} steps")
            if not math.isfinite(float(loss)):
                raise RuntimeError("the project model's loss is not finite")

        return timed(train, self.device)

    def run_phases(self, batches: Sequence[BenchBatch], steps: int, offset: int,
                   phases: List[Dict[str, float]], gemm_timer: Optional[GemmTimer] = None) -> float:
        """:meth:`run`, each step timed phase by phase (:mod:`bench_train_phases`: hooks on the pipeline, the
        optimizer and the sparse, set and over arches, installed for this call only); each step's seconds per phase
        are appended to ``phases``. With ``gemm_timer``, the steps' GEMMs are also timed call by call and charged to
        the phase they ran in."""
        clock = PhaseClock(self.device)
        if gemm_timer is not None:
            gemm_timer.phase_of(lambda: clock.current)
        model = self.inner
        hooks = [arch_hooks(clock, model.sparse_arch, "lookup_fwd", "other", "lookup_bwd"),
                 arch_hooks(clock, model.set_arch, "interaction_fwd", "over_arch", "interaction_bwd")]

        def end_of_lookup(_: nn.Module, inputs: Any, output: Any) -> None:
            if isinstance(output, torch.Tensor):
                clock.after_graph(output, "communication")

        pipeline_methods = {
            "enqueue_batch": "loader", "_wait_for_batch": "loader", "start_sparse_data_dist": "communication",
            "wait_sparse_data_dist": "communication", "_model_fwd": "other", "_backward": "over_arch",
            "_optimizer_step": "optimizer",
        }
        with module_hooks(hooks), patched(self.pipeline, pipeline_methods, clock), \
                patched(self.optimizer, {"zero_grad": "optimizer"}, clock):
            handle = model.sparse_arch.register_forward_hook(end_of_lookup)
            try:
                with contextlib.nullcontext() if gemm_timer is None else gemm_timer:
                    return self.run(batches, steps, offset, around_step=lambda: StepTimer(clock, phases))
            finally:
                handle.remove()

    def embeddings(self, bench_batch: BenchBatch) -> torch.Tensor:
        """The batch's pooled embeddings ``[B, K, F, d]`` (detached), from the sparse arch alone.

        Must run before the first :meth:`run`: the pipeline rewires the sharded collection's forward and input
        distribution for its own schedule, after which it cannot be called alone.
        """
        if self._pipelined:
            raise RuntimeError("embeddings() must run before the pipeline's first step")
        with torch.no_grad():
            return self.inner.sparse_arch(bench_batch.batch.sparse_features).detach()

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
