"""The one build path: a zoo model, its fused sparse optimizer, the sharding plan, DMP, the combined optimizer and
TorchRec's sparse-dist pipeline, from a :class:`~multiembed.config.TrainConfig`.

The trainer, evaluation, analysis, ``multiembed plan`` and the benchmark all build through here, so they agree on
what a run is: which optimizer updates each table (:func:`~multiembed.training.optim.table_update_rule`), how it
is sharded, and what the plan's memory figures count.

Two levels:

* :func:`plan_model`: the model on ``meta`` with its optimizer marks, and its plan (nothing allocated; any
  topology, on paper) plus the plan's account (``plan_summary``) - what ``multiembed plan`` prints.
* :func:`build_training`: the same plan over the job's process group, then DMP, optimizer and pipeline.

Example::

    from multiembed.config import TrainConfig
    from multiembed.training.build import build_training
    from multiembed.training.distributed import init_distributed

    ctx = init_distributed("cpu")
    config = TrainConfig(data="runs/data/synth", model="dcnv2-me-4x", out="runs/x", hidden=64)
    built = build_training(config, {"C1": 1000, "C2": 500}, num_dense=0, ctx=ctx, local_batch=256)
    loss, logits, labels, weights = built.pipeline.progress(iter(batches))
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable, Dict, List, Mapping, Optional, Tuple

import torch
import torch.distributed as dist
from torchrec.distributed import DistributedModelParallel
from torchrec.distributed.train_pipeline import TrainPipelineSparseDist
from torchrec.distributed.types import ShardingPlan, ShardingType
from torchrec.optim.keyed import CombinedOptimizer
from torchrec.optim.warmup import WarmupOptimizer

from multiembed.config import TrainConfig, VocabSource, default_of
from multiembed.data.metadata import DatasetMetadata
from multiembed.models import MultiEmbeddingModel, MultiEmbeddingTrain, build_model, parse_experts, parse_model_name
from multiembed.models.managed import ManagedSpec, table_collection
from multiembed.models.precision import check_precision
from multiembed.sharding import embedding_tables, format_plan, make_sharders, plan_sharding, plan_summary
from multiembed.sharding.managed import managed_sharders, plan_managed
from multiembed.sharding.planner import GB
from multiembed.training.distributed import DistContext, broadcast_object
from multiembed.training.memory import (
    MachineMemory, MemoryAccount, admission_problem, machine_memory, memory_account,
)
from multiembed.training.optim import (
    OptimizerConfig,
    attach_sparse_optimizer,
    build_optimizer,
    table_update_rule,
)


def optimizer_config(config: TrainConfig, device_type: str) -> OptimizerConfig:
    """The run's optimizer options, with the device's defaults for those not given.

    Raises:
        ValueError: an optimizer the device cannot run, or an inconsistent schedule.
    """
    return OptimizerConfig.for_device(
        device_type,
        sparse_optimizer=config.sparse_optimizer,
        sparse_lr=config.sparse_lr,
        lr=config.lr,
        weight_decay=config.weight_decay,
        warmup_steps=config.warmup_steps,
        decay_start=config.decay_start,
        decay_steps=config.decay_steps,
        dense_optimizer=config.dense_optimizer,
    )


@dataclasses.dataclass
class PlannedModel:
    """A model on ``meta`` with its sparse optimizer attached, and its sharding plan.

    Attributes:
        model: the zoo model (tables on ``meta``).
        train_module: ``MultiEmbeddingTrain(model)`` (loss and outputs), what DMP wraps.
        optim_config: the resolved optimizer options.
        plan: TorchRec's sharding plan.
        summary: :func:`~multiembed.sharding.plan_summary` of the plan (per table: sharding, optimizer, bytes).
        text: the plan as printed (:func:`~multiembed.sharding.format_plan`).
    """

    model: MultiEmbeddingModel
    train_module: MultiEmbeddingTrain
    optim_config: OptimizerConfig
    plan: ShardingPlan
    summary: Dict[str, Any]
    text: str


def model_options(config: TrainConfig) -> Dict[str, Any]:
    """The backbone options of ``build_model`` that ``config`` sets: ``experts`` for ``hetero-me-{K}x`` models,
    ``pair_scales`` for ``dcnv2-*`` models with ``--pair-scales``.

    Raises:
        ValueError: ``--experts`` other than the default for a model that is not heterogeneous, an unknown expert,
            or ``--pair-scales`` for a model that is not ``dcnv2-*``.
    """
    try:
        spec = parse_model_name(config.model)
    except ValueError:
        return {}  # build_model reports the unknown name
    options: Dict[str, Any] = {}
    if config.pair_scales:
        if spec.backbone != "dcnv2":
            raise ValueError(f"--pair-scales: scales the field-pair maps of DCNv2's full-rank cross layer; "
                             f"{config.model} has none (use a dcnv2-* model)")
        options["pair_scales"] = True
    if spec.heterogeneous:
        return {**options, "experts": parse_experts(config.experts)}
    if config.experts != default_of("experts"):
        raise ValueError(f"--experts: only hetero-me-{{K}}x models take experts, not {config.model}")
    return options


def is_managed(config: TrainConfig) -> bool:
    """Whether the run's tables are managed-collision tables (``--vocab managed``)."""
    return config.vocab == VocabSource.MANAGED.value


def managed_spec(config: TrainConfig, world_size: int) -> ManagedSpec:
    """The managed tables of a ``--vocab managed`` run on ``world_size`` ranks (one bucket per rank).

    Raises:
        ValueError: ``--table-rows`` not a multiple of the world size, or fewer than 2 rows per rank (one line).
    """
    return ManagedSpec(config.table_rows, config.eviction, config.eviction_interval, buckets=world_size)


def build_unsharded(
    config: TrainConfig,
    vocab_sizes: Mapping[str, int],
    *,
    num_dense: int,
    device_type: str,
    dense_device: Optional[torch.device] = None,
    world_size: int = 1,
) -> Tuple[MultiEmbeddingModel, MultiEmbeddingTrain, OptimizerConfig]:
    """``config.model`` with its tables on ``meta`` (and its dense arches on ``dense_device``, default CPU), wrapped
    for training, its tables marked for the sparse optimizer: ``(model, train_module, optim_config)``. With
    ``--vocab managed`` every field's table has ``--table-rows`` rows behind managed-collision modules for
    ``world_size`` ranks."""
    optim_config = optimizer_config(config, device_type)
    spec = managed_spec(config, world_size) if is_managed(config) else None
    if spec is not None:
        vocab_sizes = {field: spec.table_rows for field in vocab_sizes}
    model = build_model(
        config.model,
        vocab_sizes,
        num_dense=num_dense,
        device=torch.device("meta"),
        dense_device=dense_device,
        hidden=config.hidden,
        dropout=config.dropout,
        layout=config.layout,
        precision=config.precision,
        table_dtype=config.table_dtype,
        combiner=config.combiner,
        **model_options(config),
    )
    train_module = MultiEmbeddingTrain(
        model, spectral_reg_weight=config.spectral_reg, projection_reg_weight=config.projection_reg,
        divergence_reg_weight=config.divergence_reg,
    )
    if spec is not None:
        model.sparse_arch.use_managed_collision(spec)
    attach_sparse_optimizer(table_collection(model.sparse_arch.embedding_bag_collection), optim_config)
    return model, train_module, optim_config


def account_memory(
    config: TrainConfig, vocab_sizes: Mapping[str, int], *, num_dense: int, device_type: str, world_size: int,
    batch_size: int,
) -> MemoryAccount:
    """The memory one rank of the run needs (:mod:`multiembed.training.memory`), from the model built entirely on
    ``meta``: nothing is allocated, however large the model.

    Raises:
        ValueError: one line: a tensor of the model is too large for torch to describe at all (its byte count
            overflows 64 bits).
    """
    try:
        model, train_module, optim_config = build_unsharded(
            config, vocab_sizes, num_dense=num_dense, device_type=device_type, dense_device=torch.device("meta"),
            world_size=world_size,
        )
    except RuntimeError as e:
        if "overflow" not in str(e):
            raise
        raise ValueError(
            f"--model {config.model}: a tensor of this model would hold more than 2^63 bytes "
            f"({str(e).splitlines()[0][:160]}); use a smaller model"
        ) from None
    return memory_account(model, train_module, optim_config.dense_optimizer, world_size, batch_size)


def plan_model(
    config: TrainConfig,
    vocab_sizes: Mapping[str, int],
    *,
    num_dense: int,
    world_size: int,
    local_world_size: int,
    device_type: str,
    batch_size: int,
    pg: Optional[dist.ProcessGroup] = None,
    overrides: Optional[Mapping[str, str]] = None,
    set_width: Optional[int] = None,
    hbm_gb: Optional[float] = None,
    ddr_gb: Optional[float] = None,
    pooling_factors: Optional[Mapping[str, float]] = None,
    capacity_gb: Optional[float] = None,
    dense_device: Optional[torch.device] = None,
    dense_tensor_estimate: Optional[int] = None,
) -> PlannedModel:
    """Builds ``config.model`` on ``meta``, marks its tables for the sparse optimizer and plans their sharding.

    Args:
        config: the run's options (model, its sizes, optimizers, ``sharding`` strategy).
        vocab_sizes: ``{field: rows}``.
        num_dense: dense input features fed to the model (0 without ``--dense-features``).
        world_size, local_world_size: the topology.
        device_type: ``"cpu"`` or ``"cuda"``.
        batch_size: per-rank batch size.
        pg: the job's process group (rank 0 plans, every rank gets the same plan); None plans on paper.
        overrides, set_width, hbm_gb, ddr_gb, pooling_factors: as :func:`~multiembed.sharding.plan_sharding`.
        capacity_gb: memory per rank, for the summary's share used.
        dense_device: where the dense arches are built (default CPU, where DMP takes them from; ``meta`` to plan
            without allocating them).
        dense_tensor_estimate: bytes the dense part holds per rank (:class:`~multiembed.training.memory.MemoryAccount`),
            reserved by the planner; None lets TorchRec's heuristic guess from the module.

    Raises:
        ValueError: a bad option, or a plan whose tables the optimizer cannot update (e.g. row-wise Adagrad on a
            data-parallel table).
        ShardingError: no plan fits.
    """
    model, train_module, optim_config = build_unsharded(
        config, vocab_sizes, num_dense=num_dense, device_type=device_type, dense_device=dense_device,
        world_size=world_size,
    )
    if is_managed(config):
        # Row-wise, one bucket per rank, planned here: TorchRec's planner offers managed tables nothing on CPU.
        plan = plan_managed(train_module, world_size=world_size, local_world_size=local_world_size,
                            device_type=device_type)
    else:
        plan = plan_sharding(
            train_module,
            config.sharding,
            world_size=world_size,
            local_world_size=local_world_size,
            device_type=device_type,
            set_width=model.sparse_arch.stored_set_dim if set_width is None else set_width,
            overrides=overrides,
            pg=pg,
            hbm_gb=hbm_gb,
            ddr_gb=ddr_gb,
            batch_size=batch_size,
            pooling_factors=pooling_factors,
            dense_tensor_estimate=dense_tensor_estimate,
        )
    check_update_rules(plan, train_module, optim_config)
    report = dict(
        world_size=world_size, local_world_size=local_world_size, batch_size=batch_size, device_type=device_type,
        pooling_factors=pooling_factors,
    )
    summary = plan_summary(plan, train_module, capacity_gb=capacity_gb, **report)
    summary["sparse_optimizer"] = optim_config.sparse_optimizer
    text = format_plan(plan, train_module, **report)
    return PlannedModel(model, train_module, optim_config, plan, summary, text)


def check_update_rules(plan: ShardingPlan, module: torch.nn.Module, optim_config: OptimizerConfig) -> None:
    """Refuses a plan with a table that no optimizer of the run can update as the options say.

    Raises:
        ValueError: a data-parallel table under an optimizer with no element-wise torch equivalent.
    """
    for table in embedding_tables(module):
        sharding = plan.plan.get(table.module_path, {}).get(table.name)  # type: ignore[union-attr]
        if sharding is None:
            continue
        table_update_rule(optim_config, replicated=sharding.sharding_type == ShardingType.DATA_PARALLEL.value,
                          table=table.name)


def forward_with_weights(dmp: torch.nn.Module) -> Callable[[Any], Tuple[torch.Tensor, Tuple[torch.Tensor, ...]]]:
    """The pipeline's forward: DMP's ``(loss, (loss, logits, labels))`` plus the batch's row weights (zero for the
    padding rows of an evaluation's last batch; None for a batch type without weights), so ``pipeline.progress``
    returns ``(loss, logits, labels, weights)``."""

    def forward(batch: Any) -> Tuple[torch.Tensor, Tuple[Optional[torch.Tensor], ...]]:
        loss, (loss_detached, logits, labels) = dmp(batch)
        return loss, (loss_detached, logits, labels, getattr(batch, "weights", None))

    return forward


@dataclasses.dataclass
class BuiltTraining:
    """What :func:`build_training` returns: everything a training or evaluation loop needs, built and sharded.

    Attributes:
        planned: the model, its options and its plan (:class:`PlannedModel`).
        dmp: ``DistributedModelParallel(train_module)``; its forward returns ``(loss, (loss, logits, labels))``.
        optimizer: the fused sparse optimizer and the dense optimizer, combined under the LR schedule.
        schedules: the two schedule wrappers (sparse, dense), for reading the current rates.
        pipeline: TorchRec's ``TrainPipelineSparseDist`` over ``dmp`` and ``optimizer``; ``progress`` returns
            ``(loss, logits, labels, weights)`` (:func:`forward_with_weights`).
    """

    planned: PlannedModel
    dmp: DistributedModelParallel
    optimizer: CombinedOptimizer
    schedules: List[WarmupOptimizer]
    pipeline: TrainPipelineSparseDist

    @property
    def model(self) -> MultiEmbeddingModel:
        """The zoo model as DMP holds it (sharded tables, dense arches on the device)."""
        return self.dmp.module.model

    @property
    def optim_config(self) -> OptimizerConfig:
        return self.planned.optim_config


# What :func:`admit` returns: the run's memory account and this machine's memory per rank.
Admission = Tuple[MemoryAccount, MachineMemory]


def admit(
    config: TrainConfig, vocab_sizes: Mapping[str, int], *, num_dense: int, ctx: DistContext, local_batch: int
) -> Admission:
    """Checks, before anything is built or written, that the run can start here: ``--precision`` on this device and
    the memory one rank needs against what this machine has available (a collective: rank 0 decides for every rank,
    since the free memory each rank reads differs; all start, or all refuse).

    Args: as :func:`build_training`.

    Returns:
        The run's :class:`~multiembed.training.memory.MemoryAccount` and this machine's memory per rank.

    Raises:
        ValueError: one line: ``--precision bf16`` on a CPU without native bf16, or the run needs more memory per
            rank than is available (:func:`~multiembed.training.memory.admission_problem`, both numbers).
    """
    check_precision(config.precision, ctx.device.type)
    account = account_memory(config, vocab_sizes, num_dense=num_dense, device_type=ctx.device.type,
                             world_size=ctx.world_size, batch_size=local_batch)
    machine = machine_memory(ctx.device, ctx.local_world_size)
    problem = broadcast_object(admission_problem(account, machine, config.model) if ctx.is_main else None)
    if problem is not None:
        raise ValueError(str(problem))
    return account, machine


def build_training(
    config: TrainConfig,
    vocab_sizes: Mapping[str, int],
    *,
    num_dense: int,
    ctx: DistContext,
    local_batch: int,
    admission: Optional[Admission] = None,
) -> BuiltTraining:
    """Builds, plans over the job's ranks, shards (DMP) and wraps ``config.model`` for training or evaluation.

    Seeds torch with ``config.seed`` first, so the initial weights depend on the seed only.

    Args:
        config: the run's options.
        vocab_sizes: ``{field: rows}``.
        num_dense: dense input features fed to the model.
        ctx: this process's place in the job.
        local_batch: rows per rank and step.
        admission: the result of :func:`admit` for these arguments when the caller admitted the run already (a
            trainer admits it before it touches its run directory); admitted here otherwise.

    Raises:
        ValueError: see :func:`plan_model`; ``--precision bf16`` on a CPU without native bf16
            (:func:`~multiembed.models.precision.check_precision`); the run needs more memory per rank than this
            machine has available (:func:`~multiembed.training.memory.admission_problem`: one line with both
            numbers, before anything is allocated). The planner's capacity is this machine's memory per rank.
    """
    account, machine = admission or admit(config, vocab_sizes, num_dense=num_dense, ctx=ctx, local_batch=local_batch)
    torch.manual_seed(config.seed)
    capacity_gb = machine.total_bytes / GB if machine.total_bytes > 0 else None
    planned = plan_model(
        config,
        vocab_sizes,
        num_dense=num_dense,
        world_size=ctx.world_size,
        local_world_size=ctx.local_world_size,
        device_type=ctx.device.type,
        batch_size=local_batch,
        pg=dist.group.WORLD,
        hbm_gb=capacity_gb if ctx.device.type == "cuda" else None,
        ddr_gb=capacity_gb if ctx.device.type != "cuda" else None,
        dense_tensor_estimate=account.dense_bytes + account.activation_bytes,
    )
    sharders = managed_sharders() if is_managed(config) else make_sharders(device_type=ctx.device.type)
    dmp = DistributedModelParallel(planned.train_module, device=ctx.device, plan=planned.plan, sharders=sharders)
    optimizer, schedules = build_optimizer(dmp, dmp.fused_optimizer, planned.optim_config)
    pipeline = TrainPipelineSparseDist(dmp, optimizer, ctx.device, custom_model_fwd=forward_with_weights(dmp))
    return BuiltTraining(planned, dmp, optimizer, schedules, pipeline)


def check_vocab(config: TrainConfig, meta: DatasetMetadata, where: str = "") -> None:
    """Refuses ``--vocab managed`` on data whose ids are not raw keys, and such data without it (one line).

    Raises:
        ValueError: the dataset's vocabulary mode and ``--vocab`` disagree.
    """
    mode = meta.options.get("mode")
    source = where or config.data
    if is_managed(config) and mode != "managed":
        raise ValueError(
            f"{source}: --vocab managed needs data converted with --vocab managed (raw 64-bit token hashes); this "
            f"dataset's ids are {mode or 'native'}-mode ids"
        )
    if not is_managed(config) and mode == "managed":
        raise ValueError(
            f"{source}: its ids are raw 64-bit token hashes (converted with --vocab managed); train it with --vocab "
            "managed --table-rows N"
        )


def build_for_data(
    config: TrainConfig, meta: DatasetMetadata, ctx: DistContext, local_batch: int,
    admission: Optional[Admission] = None,
) -> BuiltTraining:
    """:func:`build_training` for the vocabulary and dense fields of the dataset ``meta`` describes.

    Args:
        config: the run's options (``dense_features`` decides whether the dense fields are fed).
        meta: the dataset's metadata.
        ctx: this process's place in the job.
        local_batch: rows per rank and step.
        admission: :func:`admit_for_data`'s result, when the caller admitted the run already.
    """
    check_vocab(config, meta)
    num_dense = len(meta.dense_fields) if config.dense_features else 0
    return build_training(config, meta.vocab_sizes, num_dense=num_dense, ctx=ctx, local_batch=local_batch,
                          admission=admission)


def admit_for_data(config: TrainConfig, meta: DatasetMetadata, ctx: DistContext, local_batch: int) -> Admission:
    """:func:`admit` for the vocabulary and dense fields of the dataset ``meta`` describes (after
    :func:`check_vocab`)."""
    check_vocab(config, meta)
    num_dense = len(meta.dense_fields) if config.dense_features else 0
    return admit(config, meta.vocab_sizes, num_dense=num_dense, ctx=ctx, local_batch=local_batch)
