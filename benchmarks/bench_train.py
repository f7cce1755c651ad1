"""Training throughput of multiembed models against an honest plain-PyTorch baseline, measured in one run.

What is timed
    * **Project step**: the trainer's own build path (``multiembed.training.build.build_training``): the model on
      ``meta``, the fused in-backward sparse optimizer (device default: Adagrad on CPU, Adam on GPU), the plan and
      ``DistributedModelParallel`` on the job's process group (a one-rank gloo group when started alone), dense Adam,
      and TorchRec's ``TrainPipelineSparseDist``. One step is forward + backward + both optimizers.
    * **Baseline step**: :mod:`paper_baseline` (the paper's public code: one ``nn.Embedding`` per set, a Python loop
      over sets, dense Adam over the whole tables), on the same batches.
    * The two run **interleaved** in blocks of steps (project, baseline, project, ...) so that both see the same
      machine load; ratios are the median of the per-round ratios. The other table layout, the K sweep and the batch
      sweep are interleaved with the main model in phases of their own, afterwards.
    * The baseline trains in a **process of its own** (started by the harness, driven over a pipe, building the same
      batches from the same seed), as it would in practice: sharing one process let each contender's allocations
      reshape the other's malloc heap (measured: the project page-faulted 4 MB a step alone and 60-75 MB a step
      after the baseline had run in the same process), so the step times depended on the neighbour.
    * Under ``torchrun`` each rank trains its share of the global batch through DMP; ``samples_per_s`` is the global
      batch over the slowest rank's step. The baseline then runs beside every rank alone on the local batch (no
      gradient exchange, so an upper bound for it).
    * Memory: glibc returns large freed blocks to the kernel, so a step page-faults its big temporaries back in
      (``page_fault_mb_per_step``, each contender counted in its own process; the baseline's dense embedding
      gradients and Adam temporaries, over glibc's 32 MB mmap limit, fault every step). ``--malloc retain`` keeps
      freed memory in the process for both contenders (both processes); report both settings.

Workload
    ``R`` rows per set are spread over the 39 fields of Criteo Kaggle in the proportions of the ``criteo-kaggle``
    preset (:func:`scaled_vocab_sizes`). One id per field per row, drawn as ``floor(D * u**a)`` with ``u``
    uniform (``a = --id-exponent``, 3 by default: a heavy head, as click logs have; 1 is uniform). A pool of
    pre-built batches is cycled, so batch generation is never timed.

Step-time breakdown (method: separately timed sub-steps on the same model and batch, median of repetitions)
    ``input_dist``: the sharded collection's input distribution; ``embedding_fwd``: the sparse arch's forward less
    ``input_dist`` (lookup, output distribution, set slicing); ``embedding_bwd``: backward through the lookup,
    which runs the fused optimizer's row updates; ``interaction_fwd`` / ``interaction_bwd``: the set interaction
    arch; ``over_arch``: mean over sets, over arch and loss, forward + backward; ``optimizer``: ``zero_grad`` +
    ``step`` of the combined optimizer (dense Adam; the fused part already ran in backward); ``other``: the full step
    less the parts (pipeline bookkeeping, DDP gradient hooks, autograd overhead). ``--profile`` also writes
    ``torch.profiler``'s operator table of a few full steps.

FLOPs and GEMM rate
    ``interaction_gflops`` is the set interaction arch's analytic forward + backward GEMM FLOPs (from the layer
    shapes, :func:`set_arch_flops`) over its measured forward + backward time; ``gemm_gflops`` is an fp32
    ``[B, F*d] x [F*d, F*d]`` GEMM, timed alternately with the arch in the same run, as is the baseline's per-set
    Python loop over branches of the same shapes (``set_arch.per_set_loop_ms``; :mod:`paper_baseline`'s branch
    modules, built in the harness's process; ``benchmarks/bench_set_arch.py`` sweeps that comparison over every
    backbone). Step FLOPs add the over arch (counted by ``torch.utils.flop_counter`` on a
    ``meta`` copy); element-wise work and lookups are not counted.

Run (the target configuration; ``--malloc retain`` for the second memory setting)::

    .venv/bin/python -m multiembed.cli bench --model dcnv2-me-4x --batch-size 2048 --rows-per-set 1100000 \\
        --steps 20 --json runs/bench.json
"""

from __future__ import annotations

import copy
import dataclasses
import functools
import json
import math
import os
import platform
import resource
import socket
import statistics
import subprocess
import sys
import time
import traceback
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

from multiembed.benchmarks import bench_memory, machine
from multiembed.runtime.stack import installed_versions
from multiembed.models.precision import check_precision, dense_autocast

import torch
import torch.distributed as dist
import torch.nn.functional as F
from torch import nn
from torchrec.datasets.utils import Batch
from torchrec.sparse.jagged_tensor import KeyedJaggedTensor
from tqdm import tqdm

from multiembed.data.presets import preset
from multiembed.models import (
    BatchedCrossNet,
    BatchedLowRankCrossNet,
    CrossSetArch,
    MultiEmbeddingModel,
    ModelSpec,
    SetInteractionArch,
    parse_model_name,
)
from multiembed.training.distributed import DistContext, init_distributed
from multiembed.config import TrainConfig
from multiembed.benchmarks import paper_baseline
from multiembed.training.build import build_training


DEFAULT_PRESET = "criteo-kaggle"
# The plain-PyTorch baselines, each in a process of its own: the paper's code and the savvy rewrite.
BASELINE_KINDS = ("paper", "savvy")
MALLOC_MODES = ("default", "retain")
BREAKDOWN_PARTS = (
    "input_dist", "embedding_fwd", "embedding_bwd", "interaction_fwd", "interaction_bwd", "over_arch", "optimizer",
)


# ------------------------------------------------------------------------------------------------ configuration
@dataclasses.dataclass
class BenchConfig:
    """Options of one benchmark run (``multiembed bench --help`` documents each). The options it shares with a
    training run (batch size, model sizes, layout, sharding, seed, device, precision) take
    :class:`~multiembed.config.TrainConfig`'s defaults, and the command line's help and choices, from there.

    ``steps`` timed steps per contender are split into blocks of ``block_steps``; ``quick`` shrinks the scaling
    sweeps (K in {1, 2}, two batch sizes) and the repetition counts for a smoke run.
    """

    model: str = "dcnv2-me-4x"
    batch_size: int = TrainConfig.batch_size
    rows_per_set: int = 1_100_000
    steps: int = 20
    block_steps: int = 2
    warmup_steps: int = 2
    baseline: Optional[bool] = None
    quick: bool = False
    layout: str = TrainConfig.layout
    compare_layouts: bool = True
    scaling: bool = True
    k_values: Tuple[int, ...] = (1, 2, 4, 10)
    batch_sizes: Tuple[int, ...] = (512, 1024, 2048, 4096)
    hidden: int = TrainConfig.hidden
    dropout: float = TrainConfig.dropout
    sharding: str = TrainConfig.sharding
    threads: int = 0
    id_exponent: float = 3.0
    batch_pool: int = 4
    seed: int = TrainConfig.seed
    device: str = TrainConfig.device
    malloc: str = "default"
    profile: Optional[str] = None
    progress: bool = True
    precision: str = TrainConfig.precision
    table_dtype: str = TrainConfig.table_dtype
    compare_precision: bool = True
    memory: bool = False
    memory_only: bool = False
    memory_rows: Tuple[int, ...] = (2_000_000, 8_000_000)
    memory_steps: int = 3
    memory_budget_gib: float = 24.0
    memory_variants: Tuple[str, ...] = ("adagrad:fp32", "rowwise_adagrad:fp32", "adagrad:fp16", "rowwise_adagrad:fp16")

    def validate(self) -> None:
        for name in ("batch_size", "rows_per_set", "steps", "block_steps", "batch_pool"):
            if getattr(self, name) < 1:
                raise ValueError(f"--{name.replace('_', '-')}: must be >= 1, got {getattr(self, name)}")
        if self.warmup_steps < 0 or self.threads < 0:
            raise ValueError("--warmup-steps and --threads must be >= 0")
        if not self.id_exponent > 0:
            raise ValueError(f"--id-exponent: must be > 0, got {self.id_exponent}")
        if self.malloc not in MALLOC_MODES:
            raise ValueError(f"--malloc: expected one of {', '.join(MALLOC_MODES)}, got {self.malloc!r}")
        from multiembed.models.precision import PRECISIONS, TABLE_DTYPES

        if self.precision not in PRECISIONS or self.table_dtype not in TABLE_DTYPES:
            raise ValueError(f"--precision / --table-dtype: expected {PRECISIONS} / {TABLE_DTYPES}, got "
                             f"{self.precision!r} / {self.table_dtype!r}")
        if self.memory or self.memory_only:
            if len(set(self.memory_rows)) < 2 or min(self.memory_rows) < 1:
                raise ValueError("--memory-rows: needs two or more different positive sizes")
            for variant in self.memory_variants:
                optimizer, _, dtype = variant.partition(":")
                if optimizer not in ("adagrad", "rowwise_adagrad", "sgd") or dtype not in TABLE_DTYPES:
                    raise ValueError(f"--memory-variants: {variant!r} is not OPTIMIZER:TABLE_DTYPE (optimizer adagrad, "
                                     f"rowwise_adagrad or sgd; table dtype {' or '.join(TABLE_DTYPES)})")
        if not self.k_values or min(self.k_values) < 1 or not self.batch_sizes or min(self.batch_sizes) < 1:
            raise ValueError("--k-values and --batch-sizes must be non-empty lists of positive integers")
        spec = parse_model_name(self.model)
        if self.baseline and spec.backbone != "dcnv2":
            raise ValueError(
                f"--baseline: the plain-PyTorch baseline implements the paper's ME-DCNv2 only, not {spec.backbone}; "
                "pass --no-baseline"
            )
        if self.baseline and spec.mode == "mesi":
            raise ValueError("--baseline: the baseline has one interaction per set; mesi shares one (--no-baseline)")

    @property
    def with_baseline(self) -> bool:
        spec = parse_model_name(self.model)
        return bool(self.baseline) if self.baseline is not None else spec.backbone == "dcnv2" and spec.mode != "mesi"


def scaled_vocab_sizes(rows_per_set: int, preset_name: str = DEFAULT_PRESET) -> Dict[str, int]:
    """``rows_per_set`` rows spread over the preset's fields in its proportions (each field >= 1 row).

    Example::

        >>> sizes = scaled_vocab_sizes(1_100_000)
        >>> len(sizes), abs(sum(sizes.values()) - 1_100_000) < 40
        (39, True)
    """
    if rows_per_set < 1:
        raise ValueError(f"rows_per_set must be >= 1, got {rows_per_set}")
    sizes = preset(preset_name).vocab_sizes
    total = sum(sizes.values())
    return {field: max(1, round(rows * rows_per_set / total)) for field, rows in sizes.items()}


@dataclasses.dataclass
class BenchBatch:
    """One synthetic batch in both input formats.

    Attributes:
        batch: TorchRec ``Batch`` (``dense_features [B, 0]``, KJT with one id per field and row, ``labels [B]``).
        ids: the same ids as ``[B, F]`` (the baseline's input).
    """

    batch: Batch
    ids: torch.Tensor

    @property
    def size(self) -> int:
        return int(self.ids.shape[0])


def make_batches(
    vocab_sizes: Mapping[str, int], batch_size: int, count: int, seed: int, id_exponent: float, device: torch.device
) -> List[BenchBatch]:
    """``count`` batches of ``batch_size`` rows; ids ``floor(D * u**id_exponent)``, labels Bernoulli(0.25)."""
    generator = torch.Generator().manual_seed(seed)
    rows = torch.tensor(list(vocab_sizes.values()), dtype=torch.float64)
    out: List[BenchBatch] = []
    for _ in range(count):
        uniform = torch.rand(batch_size, len(rows), generator=generator, dtype=torch.float64)
        ids = torch.minimum((rows * uniform.pow(id_exponent)).long(), rows.long() - 1)
        labels = (torch.rand(batch_size, generator=generator) < 0.25).float()
        features = KeyedJaggedTensor.from_lengths_sync(
            keys=list(vocab_sizes),
            values=ids.t().reshape(-1),
            lengths=torch.ones(batch_size * len(rows), dtype=torch.int32),
        )
        batch = Batch(dense_features=torch.empty(batch_size, 0), sparse_features=features, labels=labels)
        out.append(BenchBatch(batch=batch.to(device), ids=ids.to(device)))
    return out


# ------------------------------------------------------------------------------------------------------ FLOPs
def _linear_flops(batch: int, n: int, m: int) -> int:
    """Forward + backward GEMM FLOPs of ``[batch, n] -> [batch, m]``: ``2 b n m`` forward, twice that backward."""
    return 3 * 2 * batch * n * m


def set_arch_flops(arch: SetInteractionArch, batch_size: int) -> Optional[int]:
    """Analytic forward + backward GEMM FLOPs of a cross set arch from its layer shapes (None for other arches).

    Per set: each full-rank cross layer is a ``[B, D] x [D, D]`` GEMM, each low-rank one two GEMMs through rank
    ``r``, then the projection ``[B, D] x [D, H]``; backward computes input and weight gradients (2x forward).
    Element-wise work is not counted.
    """
    if not isinstance(arch, CrossSetArch):
        return None
    cross, d_in = arch.crossnet, arch.crossnet.in_features
    if isinstance(cross, BatchedCrossNet):
        per_set = cross.num_layers * _linear_flops(batch_size, d_in, d_in)
    elif isinstance(cross, BatchedLowRankCrossNet):
        per_set = cross.num_layers * 2 * _linear_flops(batch_size, d_in, cross.low_rank)
    else:
        return None
    projection = arch.projection
    return arch.num_sets * (per_set + _linear_flops(batch_size, projection.in_features, projection.out_features))


def counted_flops(module: nn.Module, *shapes: Sequence[int]) -> int:
    """Forward + backward FLOPs that ``torch.utils.flop_counter`` counts (GEMMs) for ``module`` on random inputs of
    ``shapes``, run on a ``meta`` copy: logical layer shapes, no compute, and none of the CPU fast path's padding."""
    from torch.utils.flop_counter import FlopCounterMode

    meta = copy.deepcopy(module).to(torch.device("meta"))
    inputs = [torch.empty(*shape, device="meta", requires_grad=True) for shape in shapes]
    with FlopCounterMode(display=False) as counter:
        meta(*inputs).sum().backward()
    return int(counter.get_total_flops())


def step_flops(model: MultiEmbeddingModel, batch_size: int) -> int:
    """Forward + backward GEMM FLOPs of one training step of ``model``: the set arch (analytic for cross arches,
    counted otherwise) plus the over arch and the dense arch (counted on a ``batch_size`` input)."""
    set_arch = model.set_arch
    total = set_arch_flops(set_arch, batch_size)
    if total is None:
        total = counted_flops(set_arch, (batch_size, set_arch.num_sets, set_arch.num_fields, set_arch.set_dim))
    total += counted_flops(model.over_arch, (batch_size, set_arch.output_dim))
    if model.dense_arch is not None:
        total += counted_flops(model.dense_arch, (batch_size, model.dense_arch.in_features))
    return total


# ----------------------------------------------------------------------------------------------------- timing
def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _timed(fn: Callable[[], Any], device: torch.device) -> float:
    _sync(device)
    start = time.perf_counter()
    fn()
    _sync(device)
    return time.perf_counter() - start


def _median_time(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    return statistics.median(_timed(fn, device) for _ in range(reps))


def _tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor (local shards of sharded tensors) inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        local = getattr(obj, "local_shards", None)
        if callable(local):
            return sum(_tensor_bytes(shard.tensor) for shard in local())
        to_local = getattr(obj, "to_local", None)
        if callable(to_local):
            return _tensor_bytes(to_local())
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(_tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(_tensor_bytes(v) for v in obj)
    return 0


def retain_freed_memory() -> None:
    """Makes glibc keep freed memory for reuse instead of returning it to the kernel (``--malloc retain``).

    By default glibc serves every allocation above its mmap threshold with a fresh ``mmap`` and unmaps it on free,
    so a training step that allocates hundreds of MB of activations, gradients and optimizer temporaries pays a
    page fault (and the kernel's zeroing) for every 4 KiB of them, every step: measured here, about 660 MB a step
    for the plain baseline (its dense embedding gradients and Adam temporaries) and 60 MB for the project. With
    ``mmap`` off and trimming off, the heap is reused after the first steps. It changes speed, not results, and it
    is process-wide (both contenders get it).

    Raises:
        OSError: not glibc, or ``mallopt`` refused.
    """
    from multiembed.runtime.malloc import M_MMAP_MAX, M_TOP_PAD, M_TRIM_THRESHOLD, set_malloc_options

    if not set_malloc_options([(M_MMAP_MAX, 0), (M_TRIM_THRESHOLD, 2**31 - 1), (M_TOP_PAD, 64 * 2**20)]):
        raise OSError("--malloc retain needs Linux glibc, and glibc accepting mallopt")


def page_faults() -> int:
    """Minor page faults of this process so far."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's address space (:func:`machine.peak_rss_bytes`: ``VmHWM``, not the
    ``ru_maxrss`` a child process inherits from its parent)."""
    return machine.peak_rss_bytes()


# ----------------------------------------------------------------------------------------------------- runners
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

        return _timed(train, self.device)

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

        times["input_dist"] = _median_time(input_dist, device, reps)
        sparse_forward = _median_time(lambda: sparse_arch(batch.sparse_features), device, reps)
        times["embedding_fwd"] = max(sparse_forward - times["input_dist"], 0.0)

        embeddings = sparse_arch(batch.sparse_features)
        grad = torch.randn_like(embeddings) * 1e-3
        backward_times = []
        for _ in range(reps):
            embeddings = sparse_arch(batch.sparse_features)
            backward_times.append(_timed(lambda: embeddings.backward(grad), device))
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
            forward_times.append(_timed(lambda: interaction_forward(box), device))
            out = box[0]
            backward_times.append(_timed(lambda: out.backward(torch.ones_like(out)), device))
        times["interaction_fwd"] = statistics.median(forward_times)
        times["interaction_bwd"] = statistics.median(backward_times)

        with autocast():
            per_set = set_arch(leaf).detach().requires_grad_()
        labels = batch.labels

        def over_step() -> None:
            with autocast():
                logits = over_arch(per_set.sum(dim=1).div(per_set.shape[1]))
            F.binary_cross_entropy_with_logits(logits.float(), labels).backward()

        times["over_arch"] = _median_time(over_step, device, reps)

        optimizer_times = []
        for _ in range(reps):
            self.optimizer.zero_grad()
            loss, _ = self.dmp(batch)
            loss.backward()
            optimizer_times.append(_timed(self.optimizer.step, device))
        times["optimizer"] = statistics.median(optimizer_times)
        self.optimizer.zero_grad()
        return {key: value * 1e3 for key, value in times.items()}, leaf.detach()

    def byte_counts(self) -> Dict[str, int]:
        """Parameter and optimizer-state bytes held by this rank (after at least one step)."""
        dense = [p for n, p in self.dmp.named_parameters() if ".embedding_bags." not in n and p.requires_grad]
        state = self.optimizer.state_dict()["state"]
        sparse_state = sum(_tensor_bytes(v) for k, v in state.items() if ".embedding_bags." in k)
        dense_state = sum(_tensor_bytes(v) for k, v in state.items() if ".embedding_bags." not in k)
        return {
            "embedding_param_bytes": int(self.model.embedding_bytes),
            "dense_param_bytes": sum(p.numel() * p.element_size() for p in dense),
            "sparse_optimizer_state_bytes": int(sparse_state),
            "dense_optimizer_state_bytes": int(dense_state),
        }


class BaselineRunner:
    """A plain-PyTorch ME-DCNv2 (:mod:`paper_baseline`): ``paper`` (dense tables, one dense Adam over everything, the
    paper's code) or ``savvy`` (sparse-gradient tables + ``SparseAdam``, fused dense Adam).

    Args:
        model_name: a ``dcnv2-me-*`` / ``dcnv2-se-*`` zoo name (K and d are read from it).
        vocab_sizes: ``{field: rows}``.
        device: where the model runs.
        hidden, dropout: as the project model.
        seed: initialisation seed.
        kind: ``paper`` or ``savvy`` (:data:`BASELINE_KINDS`).
    """

    def __init__(
        self, model_name: str, vocab_sizes: Mapping[str, int], device: torch.device, hidden: int = 400,
        dropout: float = 0.2, seed: int = 0, kind: str = "paper",
    ) -> None:
        if kind not in BASELINE_KINDS:
            raise ValueError(f"unknown baseline kind {kind!r}; expected one of {', '.join(BASELINE_KINDS)}")
        spec = parse_model_name(model_name)
        torch.manual_seed(seed)
        self.device = device
        self.kind = kind
        self.model = paper_baseline.PaperMultiDCNv2(
            list(vocab_sizes.values()), spec.num_sets, spec.set_dim, hidden=hidden, dropout=dropout,
            sparse=kind == "savvy",
        ).to(device)
        self.step = (paper_baseline.SavvyTrainStep if kind == "savvy" else paper_baseline.PaperTrainStep)(self.model)

    def run(self, batches: Sequence[BenchBatch], steps: int, offset: int = 0) -> float:
        def train() -> None:
            for i in range(steps):
                bench = batches[(offset + i) % len(batches)]
                loss = self.step(bench.ids, bench.batch.labels)
            if not math.isfinite(loss):
                raise RuntimeError("the baseline's loss is not finite")

        return _timed(train, self.device)

    def breakdown(self, bench_batch: BenchBatch, reps: int) -> Dict[str, float]:
        """Median milliseconds of the baseline's sub-steps (same parts as the project's; no input dist)."""
        device, model, ids, labels = self.device, self.model, bench_batch.ids, bench_batch.batch.labels
        model.train()
        times: Dict[str, float] = {}
        lookups: List[torch.Tensor] = []
        times["embedding_fwd"] = _median_time(
            lambda: lookups.__setitem__(slice(None), [e(ids).view(-1, model.input_dim) for e in model.embeddings]),
            device, reps,
        )
        backward_times = []
        for _ in range(reps):
            model.zero_grad()
            outs = [e(ids) for e in model.embeddings]
            backward_times.append(_timed(lambda: torch.autograd.backward(outs, [torch.ones_like(o) for o in outs]),
                                         device))
        times["embedding_bwd"] = statistics.median(backward_times)
        leaves = [x.detach().requires_grad_() for x in lookups]
        forward_times, backward_times = [], []
        for _ in range(reps):
            box: List[torch.Tensor] = []
            forward_times.append(_timed(lambda: box.append(torch.stack([cn(x) for cn, x in zip(model.cns, leaves)],
                                                                       dim=-1)), device))
            out = box[0]
            backward_times.append(_timed(lambda: out.backward(torch.ones_like(out)), device))
        times["interaction_fwd"] = statistics.median(forward_times)
        times["interaction_bwd"] = statistics.median(backward_times)
        stacked = out.detach().requires_grad_()

        def over_step() -> None:
            F.binary_cross_entropy_with_logits(model.mlp(stacked.mean(dim=-1)).squeeze(1), labels).backward()

        times["over_arch"] = _median_time(over_step, device, reps)
        optimizer_times = []
        for _ in range(reps):
            model.zero_grad()
            F.binary_cross_entropy_with_logits(model(ids), labels).backward()
            optimizer_times.append(_timed(self.step.step_optimizers, device))
        times["optimizer"] = statistics.median(optimizer_times)
        model.zero_grad()
        return {key: value * 1e3 for key, value in times.items()}

    def byte_counts(self) -> Dict[str, int]:
        model = self.model
        return {
            "embedding_param_bytes": sum(p.numel() * p.element_size() for p in model.embeddings.parameters()),
            "dense_param_bytes": sum(
                p.numel() * p.element_size() for n, p in model.named_parameters() if not n.startswith("embeddings.")
            ),
            "optimizer_state_bytes": self.step.optimizer_state_bytes(),
        }


@dataclasses.dataclass(frozen=True)
class BaselineSpec:
    """What a baseline process needs to build the baseline and the same batches as the harness (picklable).

    Attributes:
        model_name: a ``dcnv2-me-*`` / ``dcnv2-se-*`` zoo name.
        vocab_sizes: ``{field: rows}``.
        batch_size, batch_pool, seed, id_exponent: as :func:`make_batches` (the harness's own arguments).
        device: ``cpu`` or ``cuda:N``.
        hidden, dropout, model_seed: as :class:`BaselineRunner`.
        threads: torch intra-op threads (the harness's count).
        malloc: ``default`` or ``retain`` (:func:`retain_freed_memory`).
        kind: ``paper`` or ``savvy`` (:class:`BaselineRunner`).
    """

    model_name: str
    vocab_sizes: Dict[str, int]
    batch_size: int
    batch_pool: int
    seed: int
    id_exponent: float
    device: str
    hidden: int
    dropout: float
    model_seed: int
    threads: int
    malloc: str
    kind: str = "paper"


def serve_baseline(fd: int) -> None:
    """Body of a baseline process: reads a :class:`BaselineSpec` and then commands from the socket ``fd``, answers each.

    Commands (tuples): ``("run", steps, offset)`` -> ``(seconds, minor page faults)``; ``("breakdown", reps)`` ->
    ms per part; ``("bytes",)`` -> :meth:`BaselineRunner.byte_counts`; ``("peak_rss",)`` -> bytes; ``("stop",)``.
    A failure is answered with ``("error", traceback text)`` and ends the process.
    """
    from multiprocessing.connection import Connection

    conn = Connection(fd)
    try:
        spec: BaselineSpec = conn.recv()
        if spec.malloc == "retain":
            retain_freed_memory()
        torch.set_num_threads(spec.threads)
        device = torch.device(spec.device)
        batches = make_batches(spec.vocab_sizes, spec.batch_size, spec.batch_pool, spec.seed, spec.id_exponent, device)
        runner = BaselineRunner(spec.model_name, spec.vocab_sizes, device, spec.hidden, spec.dropout, spec.model_seed,
                                spec.kind)
        conn.send(("ready",))
        while True:
            command = conn.recv()
            if command[0] == "stop":
                break
            if command[0] == "run":
                before = page_faults()
                seconds = runner.run(batches, command[1], command[2])
                conn.send(("ok", (seconds, page_faults() - before)))
            elif command[0] == "breakdown":
                conn.send(("ok", runner.breakdown(batches[0], command[1])))
            elif command[0] == "bytes":
                conn.send(("ok", runner.byte_counts()))
            elif command[0] == "peak_rss":
                conn.send(("ok", peak_rss_bytes()))
            else:
                raise ValueError(f"unknown command {command!r}")
    except EOFError:
        pass  # the harness went away: nothing to answer
    except BaseException:
        try:
            conn.send(("error", traceback.format_exc()))
        except OSError:
            pass
        raise
    finally:
        conn.close()


class BaselineProcess:
    """:class:`BaselineRunner` in a child process of its own, driven over a socket (see the module docstring for why).

    The child builds the baseline and the same batches (same generator seed) itself, so only commands and numbers
    cross the pipe. Call :meth:`close` when done (``run_benchmark`` does, also on errors).

    Args:
        spec: the baseline and batches to build.

    Raises:
        RuntimeError: the child failed (its traceback is in the message) or exited.
    """

    def __init__(self, spec: BaselineSpec) -> None:
        from multiprocessing.connection import Connection

        parent, child = socket.socketpair()
        code = "import sys; from multiembed.benchmarks.bench_train import serve_baseline; serve_baseline(int(sys.argv[1]))"
        self._process = subprocess.Popen([sys.executable, "-c", code, str(child.fileno())], pass_fds=(child.fileno(),))
        child.close()
        self._conn = Connection(parent.detach())
        self.page_faults = 0
        self._conn.send(spec)
        self._receive()

    def _receive(self) -> Any:
        try:
            reply = self._conn.recv()
        except EOFError:
            code = self._process.wait()
            raise RuntimeError(f"the baseline process exited (code {code}) without answering") from None
        if reply[0] == "error":
            self._process.wait()
            raise RuntimeError(f"the baseline process failed:\n{reply[1]}")
        return reply[1] if len(reply) > 1 else None

    def _call(self, *command: Any) -> Any:
        self._conn.send(command)
        return self._receive()

    def run(self, steps: int, offset: int = 0) -> float:
        """Trains ``steps`` baseline steps (batches ``offset``, ``offset + 1``, ...); returns the wall seconds."""
        seconds, faults = self._call("run", steps, offset)
        self.page_faults += faults
        return seconds

    def breakdown(self, reps: int) -> Dict[str, float]:
        """:meth:`BaselineRunner.breakdown` on the first batch."""
        return self._call("breakdown", reps)

    def byte_counts(self) -> Dict[str, int]:
        return self._call("bytes")

    def peak_rss_bytes(self) -> int:
        """Peak resident set size of the baseline process."""
        return self._call("peak_rss")

    def close(self) -> None:
        """Stops the child (idempotent)."""
        if self._process.poll() is None:
            try:
                self._conn.send(("stop",))
            except OSError:
                pass
            try:
                self._process.wait(timeout=60)
            except subprocess.TimeoutExpired:
                self._process.kill()
                self._process.wait()
        self._conn.close()


def fp32_gemm_unit(
    model: MultiEmbeddingModel, batch: int, device: torch.device, reps: int = 4
) -> Tuple[Callable[[], None], int]:
    """``reps`` fp32 GEMMs ``[batch, F*d] x [F*d, F*d]`` (the cross layers' shape, as :func:`measure_interaction_vs_gemm`)
    as one timed unit, and its FLOPs."""
    width = model.set_arch.num_fields * model.set_arch.set_dim
    a = torch.randn(batch, width, device=device)
    b = torch.randn(width, width, device=device)

    def unit() -> None:
        for _ in range(reps):
            torch.mm(a, b)

    return unit, reps * 2 * batch * width * width


def set_arch_per_set_loop(
    config: BenchConfig, project: ProjectRunner
) -> Optional[Callable[[torch.Tensor], torch.Tensor]]:
    """The baseline's per-set branches (cross + projection per set, :mod:`paper_baseline`) as a loop over sets, for
    ``[B, K, F, d]`` input (None without a baseline). Built here (the timed baseline lives in its own process)."""
    if not config.with_baseline:
        return None
    arch = project.inner.set_arch
    shape_only = paper_baseline.PaperMultiDCNv2(
        [1] * arch.num_fields, arch.num_sets, arch.set_dim, hidden=config.hidden, dropout=config.dropout
    ).to(project.device)
    branches = shape_only.cns
    d_in = shape_only.input_dim

    def loop(embeddings: torch.Tensor) -> torch.Tensor:
        per_set = embeddings.transpose(0, 1)
        return torch.stack([branch(x.reshape(-1, d_in)) for branch, x in zip(branches, per_set)], dim=1)

    return loop


# ------------------------------------------------------------------------------------------------- measurement
def interleave(
    contenders: Mapping[str, Callable[[int, int], float]], steps: int, block_steps: int, progress: bool, label: str
) -> Dict[str, List[float]]:
    """Runs each contender in turn, ``block_steps`` steps a block, until each has run ``steps`` steps.

    ``contenders[name](steps, offset)`` trains and returns seconds. Returns per-block seconds per step.
    """
    per_step: Dict[str, List[float]] = {name: [] for name in contenders}
    rounds = max(1, math.ceil(steps / block_steps))
    bar = tqdm(total=rounds * len(contenders), desc=label, unit="block", file=sys.stderr, disable=not progress,
               leave=False)
    with bar:
        for r in range(rounds):
            n = min(block_steps, steps - r * block_steps) if steps > r * block_steps else block_steps
            for name, run in contenders.items():
                per_step[name].append(run(n, r * block_steps) / n)
                bar.update(1)
    return per_step


def paired_ratio(numerator: Sequence[float], denominator: Sequence[float]) -> float:
    """Median over rounds of ``numerator[r] / denominator[r]`` (both measured in the same round)."""
    return statistics.median(a / b for a, b in zip(numerator, denominator))


def _all_ranks_max(value: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())


def measure_interaction_vs_gemm(
    project: ProjectRunner,
    embeddings: torch.Tensor,
    loop: Optional[Callable[[torch.Tensor], torch.Tensor]],
    rounds: int,
) -> Dict[str, Any]:
    """Alternates the batched set arch (forward + backward), the per-set loop and the GEMM; medians and rates."""
    device = project.device
    set_arch, _ = project.detached_dense_arches()
    batch = embeddings.shape[0]
    width = set_arch.num_fields * set_arch.set_dim
    a = torch.randn(batch, width, device=device)
    b = torch.randn(width, width, device=device)
    gemm_reps = 4
    leaf = embeddings.detach().requires_grad_()
    loop_leaf = embeddings.detach().requires_grad_()

    precision = project.inner.precision

    def batched() -> None:
        with dense_autocast(precision, device.type):
            out = set_arch(leaf)
        out.backward(torch.ones_like(out))

    def per_set() -> None:
        assert loop is not None
        out = loop(loop_leaf)
        out.backward(torch.ones_like(out))

    def gemm() -> None:
        for _ in range(gemm_reps):
            torch.mm(a, b)

    a_bf16, b_bf16 = a.bfloat16(), b.bfloat16()

    def gemm_bf16() -> None:
        for _ in range(gemm_reps):
            torch.mm(a_bf16, b_bf16)

    batched(), gemm()
    if loop is not None:
        per_set()
    if precision == "bf16":
        gemm_bf16()
    times: Dict[str, List[float]] = {"batched": [], "gemm": [], "per_set_loop": [], "gemm_bf16": []}
    for _ in range(rounds):
        times["gemm"].append(_timed(gemm, device) / gemm_reps)
        if precision == "bf16":
            times["gemm_bf16"].append(_timed(gemm_bf16, device) / gemm_reps)
        times["batched"].append(_timed(batched, device))
        if loop is not None:
            times["per_set_loop"].append(_timed(per_set, device))
    set_arch.zero_grad(set_to_none=True)
    flops = set_arch_flops(set_arch, batch)
    if flops is None:
        flops = counted_flops(set_arch, tuple(embeddings.shape))
    gemm_flops = 2 * batch * width * width
    result: Dict[str, Any] = {
        "interaction_flops": int(flops),
        "interaction_ms": statistics.median(times["batched"]) * 1e3,
        "interaction_gflops": flops / statistics.median(times["batched"]) / 1e9,
        "gemm_shape": [batch, width, width],
        "gemm_gflops": gemm_flops / statistics.median(times["gemm"]) / 1e9,
        "interaction_vs_gemm": statistics.median(
            (flops / t_arch) / (gemm_flops / t_gemm) for t_arch, t_gemm in zip(times["batched"], times["gemm"])
        ),
        "rounds": rounds,
    }
    if precision == "bf16":
        result["gemm_gflops_bf16"] = gemm_flops / statistics.median(times["gemm_bf16"]) / 1e9
    if loop is not None:
        result["per_set_loop_ms"] = statistics.median(times["per_set_loop"]) * 1e3
        result["batched_vs_loop_speedup"] = paired_ratio(times["per_set_loop"], times["batched"])
    return result


def conditions(config: BenchConfig, ctx: DistContext, argv: Optional[Sequence[str]]) -> Dict[str, Any]:
    """The machine and software the numbers were measured on (CPU facts: :func:`machine.cpu_facts`)."""
    info: Dict[str, Any] = {
        "command": " ".join(["multiembed", "bench", *argv]) if argv is not None else None,
        **machine.cpu_facts(),
        "torch_threads": torch.get_num_threads(),
        "malloc": config.malloc,
        "load_average_start": list(os.getloadavg()),
        "device": str(ctx.device),
        "backend": ctx.backend,
        "world_size": ctx.world_size,
        "versions": installed_versions(),
        "python": platform.python_version(),
    }
    if ctx.device.type == "cuda":
        info["gpu"] = torch.cuda.get_device_name(ctx.device)
    return info


# ------------------------------------------------------------------------------------------------------ driver
def run_benchmark(config: BenchConfig, argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    """Runs every measurement of ``config`` and returns the result record (see :func:`format_table`)."""
    config.validate()
    if config.threads:
        torch.set_num_threads(config.threads)
    if config.malloc == "retain":
        retain_freed_memory()
    ctx = init_distributed(config.device)
    check_precision(config.precision, ctx.device.type)
    if config.batch_size % ctx.world_size:
        raise ValueError(f"--batch-size {config.batch_size} must divide evenly over {ctx.world_size} ranks")
    local_batch = config.batch_size // ctx.world_size
    vocab = scaled_vocab_sizes(config.rows_per_set)
    device = ctx.device
    rounds_small = 3 if config.quick else 7
    record: Dict[str, Any] = {"config": dataclasses.asdict(config), "conditions": conditions(config, ctx, argv)}
    record["config"]["fields"] = len(vocab)
    record["config"]["rows_per_set_actual"] = sum(vocab.values())
    record["config"]["local_batch"] = local_batch
    if config.memory_only:
        if ctx.is_main:
            record["memory_per_row"] = bench_memory.measure_memory(
                memory_specs(config), config.memory_rows, config.memory_budget_gib,
                log=(lambda message: print(message, file=sys.stderr, flush=True)) if config.progress else None,
            )
        record["conditions"]["load_average_end"] = list(os.getloadavg())
        return record
    baselines: Dict[str, BaselineProcess] = {}
    try:
        if config.with_baseline:
            for kind in BASELINE_KINDS:
                baselines[kind] = BaselineProcess(BaselineSpec(
                    model_name=config.model, vocab_sizes=dict(vocab), batch_size=local_batch,
                    batch_pool=config.batch_pool, seed=config.seed + 1000 * ctx.rank, id_exponent=config.id_exponent,
                    device=str(device), hidden=config.hidden, dropout=config.dropout, model_seed=config.seed,
                    threads=torch.get_num_threads(), malloc=config.malloc, kind=kind,
                ))
        return _measure(config, ctx, record, vocab, baselines, rounds_small)
    finally:
        for baseline in baselines.values():
            baseline.close()


# The JSON prefix of each contender's figures: the paper-style baseline keeps the original ``baseline_*`` keys.
CONTENDER_PREFIX = {"project": "", "paper": "baseline_", "savvy": "savvy_baseline_"}


def _measure(
    config: BenchConfig, ctx: DistContext, record: Dict[str, Any], vocab: Mapping[str, int],
    baselines: Mapping[str, "BaselineProcess"], rounds_small: int,
) -> Dict[str, Any]:
    """The measurements of :func:`run_benchmark`, filling ``record``."""
    device, local_batch = ctx.device, config.batch_size // ctx.world_size
    progress = config.progress and ctx.is_main

    def log(message: str) -> None:
        if ctx.is_main and config.progress:
            print(message, file=sys.stderr, flush=True)

    batches = make_batches(vocab, local_batch, config.batch_pool, config.seed + 1000 * ctx.rank, config.id_exponent,
                           device)
    log(f"bench: {config.model}, {len(vocab)} fields, {sum(vocab.values()):,} rows per set, batch {config.batch_size}")
    project = ProjectRunner(config.model, vocab, ctx, local_batch, config.layout, config.hidden, config.dropout,
                            config.sharding, config.seed, config.precision, config.table_dtype)
    log("bench: step-time breakdown")
    reps = 3 if config.quick else 5
    parts, embeddings = project.breakdown(batches[0], reps)
    project.run(batches, max(config.warmup_steps, 1))
    record["memory"] = {"peak_rss_after_project_bytes": peak_rss_bytes()}
    record["bytes"] = project.byte_counts()
    flops = step_flops(project.inner, local_batch)
    record["flops_per_step"] = flops * ctx.world_size

    contenders: Dict[str, Callable[[int, int], float]] = {"project": lambda n, o: project.run(batches, n, o)}
    for kind, process in baselines.items():
        process.run(max(config.warmup_steps, 1))
        record[CONTENDER_PREFIX[kind] + "bytes"] = process.byte_counts()
        process.page_faults = 0
        contenders[kind] = functools.partial(lambda n, o, p: p.run(n, o), p=process)
    # The fp32 GEMM as one more contender of the same rounds: step efficiency compares each round's step with that
    # round's GEMM rate, so a shared machine's load changes both alike.
    gemm_unit, gemm_unit_flops = fp32_gemm_unit(project.inner, local_batch, device)
    gemm_unit()
    contenders["gemm"] = lambda n, o: _timed(lambda: [gemm_unit() for _ in range(n)], device)
    faults = {name: 0 for name in contenders}

    def counting_faults(name: str, run: Callable[[int, int], float]) -> Callable[[int, int], float]:
        if name in baselines or name == "gemm":
            return run  # counted in its own process, or not a training step
        def counted(steps: int, offset: int) -> float:
            before = page_faults()
            seconds = run(steps, offset)
            faults[name] += page_faults() - before
            return seconds

        return counted

    log("bench: throughput, interleaved: " + ", ".join(contenders))
    per_step = interleave({name: counting_faults(name, run) for name, run in contenders.items()}, config.steps,
                          config.block_steps, progress, "throughput")
    gemm_times = per_step.pop("gemm")
    faults.pop("gemm")
    for kind, process in baselines.items():
        faults[kind] = process.page_faults
    page = resource.getpagesize()
    record["page_fault_mb_per_step"] = {
        ("baseline" if name == "paper" else name): count * page / config.steps / 2**20 for name, count in faults.items()
    }
    step_s = _all_ranks_max(statistics.median(per_step["project"]), device)
    record["step_ms"] = step_s * 1e3
    record["samples_per_s"] = config.batch_size / step_s
    record["achieved_step_gflops"] = record["flops_per_step"] / step_s / 1e9
    record["baseline_samples_per_s"] = None
    record["savvy_baseline_samples_per_s"] = None
    # The baselines compute the same model (paper_baseline.copy_weights_from), so the same GEMM FLOPs per step.
    baseline_flops = flops if baselines else 0
    for kind in baselines:
        prefix = CONTENDER_PREFIX[kind]
        seconds = _all_ranks_max(statistics.median(per_step[kind]), device)
        record[prefix + "step_ms"] = seconds * 1e3
        record[prefix + "samples_per_s"] = config.batch_size / seconds
        record[prefix + "achieved_step_gflops"] = baseline_flops / seconds / 1e9
        record["speedup_vs_" + prefix.rstrip("_")] = paired_ratio(per_step[kind], per_step["project"])
    record["blocks_ms_per_step"] = {
        ("baseline" if name == "paper" else name): [t * 1e3 for t in times] for name, times in per_step.items()
    }
    if config.compare_layouts:
        record["layouts"] = compare_layouts(config, ctx, vocab, batches, project, progress)
    if config.precision == "bf16" and config.compare_precision:
        log("bench: bf16 against fp32, interleaved")
        record["precisions"] = compare_precisions(config, ctx, vocab, batches, project, progress)

    parts["other"] = record["step_ms"] - sum(parts.values())
    record["breakdown_ms"] = parts
    record["breakdown_method"] = (
        f"separately timed sub-steps, median of {reps} repetitions; other = step - sum of parts (negative when the "
        "parts, each paying its own allocations and page faults alone, add up to more than the step)"
    )
    for kind, process in baselines.items():
        prefix = CONTENDER_PREFIX[kind]
        baseline_parts = process.breakdown(reps)
        baseline_parts["other"] = record[prefix + "step_ms"] - sum(baseline_parts.values())
        record[prefix + "breakdown_ms"] = baseline_parts

    log("bench: interaction arch vs GEMM")
    loop = set_arch_per_set_loop(config, project)
    record["set_arch"] = measure_interaction_vs_gemm(project, embeddings, loop, rounds_small)
    record["interaction_gflops"] = record["set_arch"]["interaction_gflops"]
    record["gemm_gflops"] = record["set_arch"]["gemm_gflops"]
    record["interaction_vs_gemm"] = record["set_arch"]["interaction_vs_gemm"]
    # Step efficiency: the step's GEMM FLOPs per second over the fp32 GEMM rate of the same round (median over the
    # throughput rounds, where the GEMM ran as one more contender); per rank (each rank has its own cores).
    record["gemm_gflops_in_rounds"] = gemm_unit_flops / statistics.median(gemm_times) / 1e9
    record["gemm_unit"] = {"flops": gemm_unit_flops, "blocks_ms": [t * 1e3 for t in gemm_times]}
    for kind in ("project", *baselines):
        prefix = CONTENDER_PREFIX[kind]
        record[prefix + "step_efficiency"] = statistics.median(
            (flops / t_step) / (gemm_unit_flops / t_gemm) for t_step, t_gemm in zip(per_step[kind], gemm_times)
        )
    record["step_efficiency_method"] = (
        "median over the throughput rounds of (analytic forward + backward GEMM FLOPs of one step per rank / that "
        f"round's step time) / (that round's fp32 GEMM rate, {'x'.join(map(str, record['set_arch']['gemm_shape']))}, "
        "timed as one more contender of the rounds); element-wise work and lookups are not counted as FLOPs"
    )

    if config.profile:
        record["profile"] = write_profile(project, batches, config.profile, steps=3 if config.quick else 5)

    for kind, process in baselines.items():
        record["memory"][("baseline" if kind == "paper" else CONTENDER_PREFIX[kind].rstrip("_"))
                         + "_process_peak_rss_bytes"] = process.peak_rss_bytes()
        process.close()
    if config.scaling:
        record["scaling_k"] = scale_over_k(config, ctx, vocab, batches, project, progress)
        record["scaling_batch"] = scale_over_batch(config, ctx, vocab, project, progress)
    record["memory"]["peak_rss_bytes"] = peak_rss_bytes()
    if device.type == "cuda":
        record["memory"]["gpu_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    if config.memory and ctx.is_main and device.type == "cpu":
        record["memory_per_row"] = bench_memory.measure_memory(
            memory_specs(config), config.memory_rows, config.memory_budget_gib, log=log
        )
    record["conditions"]["load_average_end"] = list(os.getloadavg())
    return record


def memory_specs(config: BenchConfig) -> List[bench_memory.MemoryProbeSpec]:
    """The ``--memory`` phase's contenders: the savvy baseline, then the package at each of ``memory_variants``."""
    common = dict(model=config.model, rows_per_set=config.rows_per_set, batch_size=config.batch_size,
                  steps=config.memory_steps, hidden=config.hidden, dropout=config.dropout, seed=config.seed,
                  id_exponent=config.id_exponent, threads=config.threads)
    specs = [bench_memory.MemoryProbeSpec(kind="savvy", **common)] if config.with_baseline else []
    for variant in config.memory_variants:
        optimizer, _, dtype = variant.partition(":")
        specs.append(bench_memory.MemoryProbeSpec(kind="project", sparse_optimizer=optimizer, table_dtype=dtype,
                                                  **common))
    return specs


def compare_precisions(
    config: BenchConfig, ctx: DistContext, vocab: Mapping[str, int], batches: Sequence[BenchBatch],
    project: ProjectRunner, progress: bool,
) -> Dict[str, Any]:
    """Step time of the main (bf16) model against the same model in fp32, interleaved in a phase of their own
    (same initial weights, same batches). Keyed by precision, plus ``bf16_speedup`` (median paired fp32 / bf16)."""
    other = ProjectRunner(config.model, vocab, ctx, batches[0].size, config.layout, config.hidden, config.dropout,
                          config.sharding, config.seed, "fp32", config.table_dtype)
    other.run(batches, max(config.warmup_steps, 1))
    runners = {config.precision: project, "fp32": other}
    per_step = interleave({name: (lambda n, o, r=runner: r.run(batches, n, o)) for name, runner in runners.items()},
                          config.steps, config.block_steps, progress, "precisions")
    rows: Dict[str, Any] = {}
    for name in runners:
        seconds = _all_ranks_max(statistics.median(per_step[name]), ctx.device)
        rows[name] = {"step_ms": seconds * 1e3, "samples_per_s": config.batch_size / seconds}
    rows["bf16_speedup"] = paired_ratio(per_step["fp32"], per_step[config.precision])
    return rows


def compare_layouts(
    config: BenchConfig, ctx: DistContext, vocab: Mapping[str, int], batches: Sequence[BenchBatch],
    project: ProjectRunner, progress: bool,
) -> Dict[str, Dict[str, float]]:
    """Step time of the main model against the same model with the other table layout, interleaved in a phase of
    their own (after the baseline comparison: a second model in the process reshapes its malloc heap, see the module
    docstring, so it must not share the main measurement). Keyed by layout name."""
    layout = "per_set" if config.layout == "fused" else "fused"
    other = ProjectRunner(config.model, vocab, ctx, batches[0].size, layout, config.hidden, config.dropout,
                          config.sharding, config.seed, config.precision, config.table_dtype)
    other.run(batches, max(config.warmup_steps, 1))
    runners = {config.layout: project, layout: other}
    faults = {name: 0 for name in runners}

    def timed(name: str, runner: ProjectRunner) -> Callable[[int, int], float]:
        def run(steps: int, offset: int) -> float:
            before = page_faults()
            seconds = runner.run(batches, steps, offset)
            faults[name] += page_faults() - before
            return seconds

        return run

    per_step = interleave({name: timed(name, runner) for name, runner in runners.items()}, config.steps,
                          config.block_steps, progress, "layouts")
    rows = {}
    for name in runners:
        seconds = _all_ranks_max(statistics.median(per_step[name]), ctx.device)
        rows[name] = {
            "step_ms": seconds * 1e3,
            "samples_per_s": config.batch_size / seconds,
            "page_fault_mb_per_step": faults[name] * resource.getpagesize() / config.steps / 2**20,
        }
    rows[layout]["time_ratio_vs_" + config.layout] = paired_ratio(per_step[layout], per_step[config.layout])
    return rows


def scale_over_k(
    config: BenchConfig, ctx: DistContext, vocab: Mapping[str, int], batches: Sequence[BenchBatch],
    project: ProjectRunner, progress: bool,
) -> List[Dict[str, Any]]:
    """Step time vs the number of sets K at fixed d (the same backbone), interleaved; FLOPs from the layer shapes."""
    spec = parse_model_name(config.model)
    k_values = tuple(sorted(set((1, 2) if config.quick else config.k_values)))
    runners: Dict[int, ProjectRunner] = {}
    for k in k_values:
        if k == spec.num_sets:
            runners[k] = project
            continue
        # K sets of the model's own set width d (SE models sweep the ME family of the same d).
        k_spec = dataclasses.replace(spec, mode="me" if spec.mode == "se" else spec.mode, scale=k, num_sets=k)
        runners[k] = ProjectRunner(k_spec, vocab, ctx, batches[0].size, config.layout, config.hidden, config.dropout,
                                   config.sharding, config.seed, config.precision, config.table_dtype)
        runners[k].run(batches, max(config.warmup_steps, 1))
    per_step = interleave(
        {str(k): (lambda n, o, r=runner: r.run(batches, n, o)) for k, runner in runners.items()},
        config.steps, config.block_steps, progress, "scaling K",
    )
    rows = []
    base_k = k_values[0]
    base_flops = step_flops(runners[base_k].inner, batches[0].size)
    for k, runner in runners.items():
        seconds = _all_ranks_max(statistics.median(per_step[str(k)]), ctx.device)
        flops = step_flops(runner.inner, batches[0].size) * ctx.world_size
        rows.append({
            "num_sets": k,
            "step_ms": seconds * 1e3,
            "samples_per_s": config.batch_size / seconds,
            "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / seconds / 1e9,
            "time_ratio": paired_ratio(per_step[str(k)], per_step[str(base_k)]),
            "flops_ratio": flops / (base_flops * ctx.world_size),
        })
    return rows


def scale_over_batch(
    config: BenchConfig, ctx: DistContext, vocab: Mapping[str, int], project: ProjectRunner, progress: bool
) -> List[Dict[str, Any]]:
    """Step time and samples/s vs the global batch size, on the main model, interleaved."""
    sizes = tuple(sorted(set(config.batch_sizes)))
    if config.quick:
        sizes = (max(ctx.world_size, config.batch_size // 2), config.batch_size)
    pools: Dict[int, List[BenchBatch]] = {}
    for size in sizes:
        if size % ctx.world_size:
            raise ValueError(f"--batch-sizes: {size} does not divide evenly over {ctx.world_size} ranks")
        pools[size] = make_batches(vocab, size // ctx.world_size, config.batch_pool, config.seed + 7 + 1000 * ctx.rank,
                                   config.id_exponent, ctx.device)
        project.run(pools[size], 1)
    per_step = interleave(
        {str(size): (lambda n, o, p=pool: project.run(p, n, o)) for size, pool in pools.items()},
        config.steps, config.block_steps, progress, "scaling batch",
    )
    rows = []
    for size in sizes:
        seconds = _all_ranks_max(statistics.median(per_step[str(size)]), ctx.device)
        flops = step_flops(project.inner, size // ctx.world_size) * ctx.world_size
        rows.append({
            "batch_size": size,
            "step_ms": seconds * 1e3,
            "samples_per_s": size / seconds,
            "gflop_per_step": flops / 1e9,
            "achieved_gflops": flops / seconds / 1e9,
        })
    return rows


def write_profile(project: ProjectRunner, batches: Sequence[BenchBatch], path: str, steps: int) -> str:
    """``torch.profiler`` operator table (self time) of ``steps`` full training steps, written to ``path``."""
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if project.device.type == "cuda" else [])
    with profile(activities=activities) as prof:
        project.run(batches, steps)
    table = prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=40)
    Path(path).write_text(table + "\n", encoding="utf-8")
    return path


# ------------------------------------------------------------------------------------------------------ output
def _fmt(value: Optional[float], digits: int = 1) -> str:
    return "-" if value is None else f"{value:,.{digits}f}"


def memory_lines(record: Mapping[str, Any]) -> List[str]:
    """The ``--memory`` table (no lines without it)."""
    memory = record.get("memory_per_row")
    if not memory:
        return []
    lines = [
        "",
        f"Memory per table row ({memory['method']}; sizes {', '.join(f'{r:,}' for r in memory['rows_per_set'])} "
        f"rows per set; largest rows per set within {memory['budget_gib']:g} GiB):",
        "",
        "| contender | bytes per row (K sets) | per set-row | fixed MB | vs savvy | max rows per set | assumes |",
        "|---|---|---|---|---|---|---|",
    ]
    ratios = memory.get("ratio_vs_savvy", {})
    for label, row in memory["contenders"].items():
        lines.append(
            f"| {label} | {_fmt(row['bytes_per_row'])} | {_fmt(row['bytes_per_set_row'])} | "
            f"{row['fixed_bytes'] / 2**20:,.0f} | {_fmt(ratios.get(label), 2)} | "
            f"{row['max_rows_per_set'] or 0:,} | {row['assumes']} |"
        )
    return lines


def format_table(record: Mapping[str, Any]) -> str:
    """The result as markdown tables (throughput against both baselines, breakdown, memory per row, scaling)."""
    cfg, cond = record["config"], record["conditions"]
    if "samples_per_s" not in record:  # --memory-only
        return "\n".join([
            f"### {cfg['model']}: memory per table row (CPU: {cond['cpu']}, {cond['cpu_count']} CPUs, capability "
            f"{cond.get('cpu_capability')}, native bf16 {cond.get('mkldnn_bf16_supported')})",
            *memory_lines(record),
        ])
    sizes = record["bytes"]
    paper_bytes, savvy_bytes = record.get("baseline_bytes", {}), record.get("savvy_baseline_bytes", {})

    def per_contender(key: str, digits: int = 1) -> str:
        return " | ".join(_fmt(record.get(prefix + key), digits) for prefix in ("", "baseline_", "savvy_baseline_"))

    def megabytes(value: Optional[int]) -> str:
        return "-" if value is None else f"{value / 2**20:,.1f}"

    lines = [
        f"### {cfg['model']}, batch {cfg['batch_size']}, {cfg['rows_per_set_actual']:,} rows per set over "
        f"{cfg['fields']} fields, precision {cfg.get('precision', 'fp32')}, tables {cfg.get('table_dtype', 'fp32')} "
        f"({cond['device']}, {cond['torch_threads']} threads, malloc {cond['malloc']})",
        "",
        f"CPU: {cond['cpu']}, {cond['cpu_count']} CPUs, capability {cond.get('cpu_capability')}, native bf16 "
        f"{cond.get('mkldnn_bf16_supported')}, fp32 GEMM backend {cond.get('gemm_backend', {}).get('float32')}.",
        "",
        "| metric | project | paper baseline | savvy baseline | project / paper | project / savvy |",
        "|---|---|---|---|---|---|",
        f"| samples/s | {per_contender('samples_per_s', 0)} | {_fmt(record.get('speedup_vs_baseline'), 2)} | "
        f"{_fmt(record.get('speedup_vs_savvy_baseline'), 2)} |",
        f"| step ms | {per_contender('step_ms')} | | |",
        f"| step GFLOP/s (fwd+bwd GEMMs, {_fmt(record['flops_per_step'] / 1e9)} GFLOP a step) | "
        f"{per_contender('achieved_step_gflops')} | | |",
        f"| step efficiency (step GFLOP/s / fp32 GEMM GFLOP/s of the same rounds, "
        f"{_fmt(record.get('gemm_gflops_in_rounds'))}) | {per_contender('step_efficiency', 2)} | | |",
        f"| embedding / dense parameter MB | {megabytes(sizes['embedding_param_bytes'])} / "
        f"{megabytes(sizes['dense_param_bytes'])} | "
        + " | ".join(
            f"{megabytes(b['embedding_param_bytes'])} / {megabytes(b['dense_param_bytes'])}" if b else "-"
            for b in (paper_bytes, savvy_bytes)
        ) + " | | |",
        f"| optimizer state MB (sparse + dense) | {megabytes(sizes['sparse_optimizer_state_bytes'])} + "
        f"{megabytes(sizes['dense_optimizer_state_bytes'])} | "
        + " | ".join(megabytes(b.get("optimizer_state_bytes")) if b else "-" for b in (paper_bytes, savvy_bytes))
        + " | | |",
        f"| page faults MB / step | {_fmt(record['page_fault_mb_per_step']['project'])} | "
        f"{_fmt(record['page_fault_mb_per_step'].get('baseline'))} | "
        f"{_fmt(record['page_fault_mb_per_step'].get('savvy'))} | | |",
        f"| peak RSS MB (whole run / own process) | {record['memory']['peak_rss_bytes'] / 2**20:,.0f} | "
        f"{megabytes(record['memory'].get('baseline_process_peak_rss_bytes'))} | "
        f"{megabytes(record['memory'].get('savvy_baseline_process_peak_rss_bytes'))} | | |",
        "",
        "| set arch and GEMM | value | |",
        "|---|---|---|",
        f"| interaction arch GFLOP/s (fwd+bwd) | {_fmt(record['interaction_gflops'])} | "
        f"{_fmt(record['interaction_vs_gemm'], 2)} of GEMM |",
        f"| fp32 GEMM {'x'.join(map(str, record['set_arch']['gemm_shape']))} GFLOP/s | {_fmt(record['gemm_gflops'])} | |",
    ]
    if "gemm_gflops_bf16" in record["set_arch"]:
        lines.append(f"| bf16 GEMM, same shape, GFLOP/s | {_fmt(record['set_arch']['gemm_gflops_bf16'])} | |")
    if "per_set_loop_ms" in record["set_arch"]:
        lines.append(
            f"| set arch fwd+bwd ms: batched / per-set loop | {_fmt(record['set_arch']['interaction_ms'])} / "
            f"{_fmt(record['set_arch']['per_set_loop_ms'])} | {_fmt(record['set_arch']['batched_vs_loop_speedup'], 2)}x |"
        )
    for name, row in record.get("layouts", {}).items():
        lines.append(f"| layout {name}: samples/s | {_fmt(row['samples_per_s'], 0)} | |")
    precisions = record.get("precisions")
    if precisions:
        lines.append(f"| bf16 / fp32 samples/s (interleaved) | {_fmt(precisions['bf16']['samples_per_s'], 0)} / "
                     f"{_fmt(precisions['fp32']['samples_per_s'], 0)} | {_fmt(precisions['bf16_speedup'], 2)}x |")
    lines += [
        "",
        f"Step-time breakdown, ms ({record['breakdown_method']}):",
        "",
        "| part | project | paper baseline | savvy baseline |",
        "|---|---|---|---|",
    ]
    paper_parts = record.get("baseline_breakdown_ms", {})
    savvy_parts = record.get("savvy_baseline_breakdown_ms", {})
    for part in (*BREAKDOWN_PARTS, "other"):
        lines.append(f"| {part} | {_fmt(record['breakdown_ms'].get(part))} | {_fmt(paper_parts.get(part))} | "
                     f"{_fmt(savvy_parts.get(part))} |")
    lines += memory_lines(record)
    if record.get("scaling_k"):
        lines += ["", "| K | step ms | samples/s | GFLOP/step | GFLOP/s | time ratio | FLOP ratio |",
                  "|---|---|---|---|---|---|---|"]
        for row in record["scaling_k"]:
            lines.append(
                f"| {row['num_sets']} | {_fmt(row['step_ms'])} | {_fmt(row['samples_per_s'], 0)} | "
                f"{_fmt(row['gflop_per_step'], 2)} | {_fmt(row['achieved_gflops'])} | {_fmt(row['time_ratio'], 2)} | "
                f"{_fmt(row['flops_ratio'], 2)} |"
            )
    if record.get("scaling_batch"):
        lines += ["", "| batch | step ms | samples/s | GFLOP/s |", "|---|---|---|---|"]
        for row in record["scaling_batch"]:
            lines.append(
                f"| {row['batch_size']} | {_fmt(row['step_ms'])} | {_fmt(row['samples_per_s'], 0)} | "
                f"{_fmt(row['achieved_gflops'])} |"
            )
    load = record["conditions"]
    lines += ["", f"Load average at start / end: {load['load_average_start'][0]:.2f} / "
                  f"{load.get('load_average_end', [float('nan')])[0]:.2f} on {load['cpu_count']} CPUs ({load['cpu']})."]
    return "\n".join(lines)


def write_json(record: Mapping[str, Any], path: str) -> None:
    """Writes ``record`` to ``path`` atomically (temp name, then rename)."""
    from multiembed.data.metadata import atomic_write_text

    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(target, json.dumps(record, indent=2, default=str) + "\n")

