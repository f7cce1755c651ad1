"""Sharding plans for the ``EmbeddingBagCollection``s of a model: topology, sharders, planner, named strategies.

Every strategy goes through TorchRec's ``EmbeddingShardingPlanner``: a named strategy is a per-table
``ParameterConstraints`` (one sharding type, its compute kernel, the column-shard width), so the planner's storage
estimates, storage reservation and balancing apply to all of them, and a plan that does not fit is refused the
same way whatever the strategy.

Two TorchRec 1.8 behaviours on CPU are handled here:

* the stock ``EmbeddingBagCollectionSharder`` does not offer row-wise sharding on CPU, although DMP runs it
  correctly with gloo; :func:`make_sharders` returns a sharder that offers it.
* column-wise sharding splits a table only when ``ParameterConstraints.min_partition`` says how wide a shard is;
  :func:`plan_sharding` sets it to one embedding set's stored width.
"""

from __future__ import annotations

import contextlib
import dataclasses
import heapq
import inspect
import logging
import os
import warnings
from typing import Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch.distributed as dist
from torch import nn
from torchrec.distributed.embedding_types import EmbeddingComputeKernel
from torchrec.distributed.embeddingbag import EmbeddingBagCollectionSharder
from torchrec.distributed.planner import EmbeddingShardingPlanner, ParameterConstraints, Topology
from torchrec.distributed.types import ModuleSharder, ShardingPlan, ShardingType

from multiembed.runtime.stack import SUPPORTED, describe_installed, private_api_error


try:  # planner internals this module builds on (not TorchRec's documented API; checked against the pinned stack)
    from torchrec.distributed.planner.partitioners import GreedyPerfPartitioner
    from torchrec.distributed.planner.stats import NoopEmbeddingStats
    from torchrec.distributed.planner.storage_reservations import HeuristicalStorageReservation
    from torchrec.distributed.planner.types import (
        KernelConfig,
        PlannerError,
        PlannerErrorType,
        ShardingOption,
        TopologyFactory,
        TrainerConfig,
    )
    from torchrec.modules.embedding_configs import DATA_TYPE_NUM_BITS
except ImportError as e:  # pragma: no cover - depends on the installed TorchRec
    raise private_api_error("TorchRec planner internals (multiembed.sharding)", e) from e
from torchrec.modules.embedding_modules import EmbeddingBagCollection
from torchrec.modules.mc_embedding_modules import ManagedCollisionEmbeddingBagCollection

from multiembed.config.choices import ShardingStrategy
from multiembed.models.managed import table_collection

GB = 1024**3
DEFAULT_BATCH_SIZE = 2048
# TorchRec's default margin of HBM kept free for what the heuristics miss (activations, allocator slack).
DEFAULT_RESERVED_FRACTION = 0.15
DEVICE_TYPES = ("cpu", "cuda")
# FBGEMM's TBE kernels and TorchRec's table-/row-wise sharding need embedding widths divisible by this.
WIDTH_MULTIPLE = 4

_KERNEL_FOR_STRATEGY: Dict[ShardingStrategy, str] = {
    ShardingStrategy.TABLE_WISE: EmbeddingComputeKernel.FUSED.value,
    ShardingStrategy.ROW_WISE: EmbeddingComputeKernel.FUSED.value,
    ShardingStrategy.COLUMN_WISE: EmbeddingComputeKernel.FUSED.value,
    ShardingStrategy.DATA_PARALLEL: EmbeddingComputeKernel.DENSE.value,
}


class ShardingError(ValueError):
    """No sharding plan fits the topology, or the request cannot be planned; the message is one line."""


@dataclasses.dataclass(frozen=True)
class TableSpec:
    """One embedding table as the planner sees it.

    Attributes:
        module_path: path of its ``EmbeddingBagCollection`` in the model (``""`` when the model is the EBC), the key
            of ``ShardingPlan.plan``.
        name: table name (``EmbeddingBagConfig.name``), the key of the module's plan.
        num_embeddings: rows.
        embedding_dim: stored width (columns).
        feature_names: the KJT features looked up in it.
        bytes_per_value: bytes of one weight (4 for fp32).

    Example::

        >>> import torch
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> ebc = EmbeddingBagCollection(
        ...     [EmbeddingBagConfig(name="t0", embedding_dim=8, num_embeddings=100, feature_names=["f0"])],
        ...     device=torch.device("meta"),
        ... )
        >>> embedding_tables(ebc)[0].weight_bytes
        3200
    """

    module_path: str
    name: str
    num_embeddings: int
    embedding_dim: int
    feature_names: Tuple[str, ...]
    bytes_per_value: int

    @property
    def weight_bytes(self) -> int:
        return self.num_embeddings * self.embedding_dim * self.bytes_per_value


def embedding_tables(module: nn.Module) -> List[TableSpec]:
    """The tables of every ``EmbeddingBagCollection`` in ``module``, in module then table order.

    Only modules whose type is exactly ``EmbeddingBagCollection`` count: TorchRec's planner and DMP look sharders up
    by exact type, so a subclass would silently stay unsharded.

    Raises:
        ValueError: no EBC, a table name used in two EBCs (constraints are keyed by table name), or a width that is
            not a multiple of 4.
    """
    specs: List[TableSpec] = []

    def visit(path: str, child: nn.Module) -> None:
        # A managed collection is sharded as one module (its tables keyed by its own path).
        if type(child) in (EmbeddingBagCollection, ManagedCollisionEmbeddingBagCollection):
            for config in table_collection(child).embedding_bag_configs():
                specs.append(
                    TableSpec(
                        module_path=path,
                        name=config.name,
                        num_embeddings=int(config.num_embeddings),
                        embedding_dim=int(config.embedding_dim),
                        feature_names=tuple(config.feature_names),
                        bytes_per_value=DATA_TYPE_NUM_BITS[config.data_type] // 8,
                    )
                )
            return
        for name, grandchild in child.named_children():
            visit(f"{path}.{name}" if path else name, grandchild)

    visit("", module)
    if not specs:
        raise ValueError(f"{type(module).__name__} contains no EmbeddingBagCollection to shard")
    seen: Dict[str, str] = {}
    for spec in specs:
        if spec.name in seen and seen[spec.name] != spec.module_path:
            raise ValueError(
                f"table {spec.name!r} appears in two EmbeddingBagCollections ({seen[spec.name]!r} and "
                f"{spec.module_path!r}); TorchRec's planner keys constraints by table name, so names must be unique"
            )
        seen[spec.name] = spec.module_path
        if spec.embedding_dim % WIDTH_MULTIPLE:
            raise ValueError(
                f"table {spec.name!r}: embedding_dim {spec.embedding_dim} is not a multiple of {WIDTH_MULTIPLE}; "
                "FBGEMM's kernels and TorchRec's sharding need widths divisible by 4 (store each set padded, "
                "e.g. 10 -> 12)"
            )
    return specs


def build_topology(
    world_size: int,
    local_world_size: int,
    device_type: str,
    hbm_gb: Optional[float] = None,
    ddr_gb: Optional[float] = None,
) -> Topology:
    """A planner ``Topology`` for ``world_size`` ranks, ``local_world_size`` per host.

    Reads nothing from the environment: the trainer passes the sizes it got from ``torch.distributed`` and
    ``LOCAL_WORLD_SIZE`` (torchrun, torchx local / slurm / kubernetes all set them), and ``multiembed plan`` passes a
    topology it does not have. ``device_type="cuda"`` works without a GPU (planning on paper).

    Args:
        world_size: number of ranks.
        local_world_size: ranks per host (the intra-host group for table-row-wise sharding and bandwidths).
        device_type: ``"cuda"`` (tables in HBM) or ``"cpu"`` (tables in DDR).
        hbm_gb: GPU memory per rank in GiB (TorchRec's default, 32, when None). CUDA only.
        ddr_gb: host memory per rank in GiB (TorchRec's default, 128, when None).

    Raises:
        ValueError: sizes that are not positive, a local world size that does not divide the world size, an unknown
            device type, or ``hbm_gb`` for a CPU topology.

    Example::

        >>> build_topology(128, 8, "cuda", hbm_gb=80).world_size
        128
    """
    for name, value in (("world_size", world_size), ("local_world_size", local_world_size)):
        if isinstance(value, bool) or not isinstance(value, int) or value < 1:
            raise ValueError(f"{name}: expected a positive integer, got {value!r}")
    if local_world_size > world_size or world_size % local_world_size:
        raise ValueError(
            f"local_world_size {local_world_size} must divide world_size {world_size} (ranks per host x hosts)"
        )
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type: expected one of {', '.join(DEVICE_TYPES)}, got {device_type!r}")
    if hbm_gb is not None and device_type != "cuda":
        raise ValueError("hbm_gb: GPU memory applies to cuda topologies; a cpu topology keeps tables in ddr_gb")
    for name, value in (("hbm_gb", hbm_gb), ("ddr_gb", ddr_gb)):
        if value is not None and not value > 0:
            raise ValueError(f"{name}: expected a positive size in GiB, got {value!r}")
    hbm_cap = None if hbm_gb is None else int(hbm_gb * GB)
    ddr_cap = None if ddr_gb is None else int(ddr_gb * GB)
    return TopologyFactory.create_topology(
        trainer_config=TrainerConfig(
            world_size=world_size,
            local_world_size=local_world_size,
            hbm_cap_bytes=hbm_cap,
            ddr_cap_bytes=ddr_cap,
        ),
        kernel_config=KernelConfig(compute_device=device_type),
    )


class CpuRowWiseEBCSharder(EmbeddingBagCollectionSharder):
    """``EmbeddingBagCollectionSharder`` that also offers row-wise sharding on CPU.

    TorchRec's sharder lists row-wise sharding for CUDA only, so its planner never proposes it on CPU and refuses a
    row-wise constraint, although DMP shards row-wise correctly on CPU with gloo (checked against the unsharded
    module in ``tests/test_sharding_dist.py``). Table-row-wise and grid sharding stay CUDA-only: not verified here.

    Example::

        >>> "row_wise" in CpuRowWiseEBCSharder().sharding_types("cpu")
        True
    """

    def sharding_types(self, compute_device_type: str) -> List[str]:
        types = list(super().sharding_types(compute_device_type))
        if compute_device_type == "cpu" and ShardingType.ROW_WISE.value not in types:
            types.append(ShardingType.ROW_WISE.value)
        return types


def make_sharders(
    fused_params: Optional[Mapping[str, object]] = None, device_type: str = "cpu"
) -> List[ModuleSharder[nn.Module]]:
    """The sharders to give both the planner and ``DistributedModelParallel``.

    Args:
        fused_params: FBGEMM options for the fused tables (e.g. ``{"optimizer": EmbOptimType.EXACT_ADAGRAD,
            "learning_rate": 0.05}``); copied, never mutated. Not needed when the tables carry an in-backward
            optimizer (``apply_optimizer_in_backward``), which TorchRec reads from the parameters.
        device_type: ``"cpu"`` or ``"cuda"``; on CPU the sharder also offers row-wise sharding.

    Raises:
        ValueError: an unknown device type.
    """
    if device_type not in DEVICE_TYPES:
        raise ValueError(f"device_type: expected one of {', '.join(DEVICE_TYPES)}, got {device_type!r}")
    params = dict(fused_params) if fused_params else None
    sharder_class = CpuRowWiseEBCSharder if device_type == "cpu" else EmbeddingBagCollectionSharder
    return [sharder_class(fused_params=params)]


def _partition_hook_matches() -> bool:
    """True when TorchRec's greedy partitioner still has the private hook :class:`SetParallelPartitioner` overrides,
    with the parameters it had in the pinned TorchRec."""
    hook = getattr(GreedyPerfPartitioner, "_device_partition", None)
    if hook is None:
        return False
    try:
        parameters = list(inspect.signature(hook).parameters)
    except (TypeError, ValueError):
        return False
    return parameters[:2] == ["sharding_option", "minheap_devices"]


# Whether the override can take effect; when it cannot, plan_sharding's check of the plan says so if it matters.
PARTITION_HOOK_MATCHES = _partition_hook_matches()


class SetParallelPartitioner(GreedyPerfPartitioner):
    """TorchRec's greedy partitioner, with the column shards of one table on distinct ranks.

    The greedy partitioner puts each column-wise shard on the least-loaded rank, which can be the same rank for two
    sets of a small table; with set-wide shards that defeats set parallelism. TorchRec keeps column shards apart
    only for key-value tables, so this partitioner places every column-wise table that way (least-loaded rank
    first, as TorchRec orders them) whenever there are at least as many ranks as shards.

    It overrides a private method of TorchRec's ``GreedyPerfPartitioner`` (``_device_partition``, as in the pinned
    TorchRec). :func:`plan_sharding` checks every plan for the promise (column shards of a table on distinct ranks
    when there are enough ranks) and raises ``RuntimeError`` naming the installed versions when a TorchRec that no
    longer calls the hook broke it.

    Example::

        >>> planner = EmbeddingShardingPlanner(
        ...     topology=build_topology(8, 8, "cuda"), partitioner=SetParallelPartitioner(), debug=False
        ... )
    """

    @classmethod
    def _device_partition(
        cls,
        sharding_option: ShardingOption,
        minheap_devices: list,
        bulk_heapify_threshold: float = 0.25,
    ) -> None:
        if (
            sharding_option.sharding_type != ShardingType.COLUMN_WISE.value
            or not 1 < sharding_option.num_shards <= len(minheap_devices)
        ):
            super()._device_partition(sharding_option, minheap_devices, bulk_heapify_threshold)
            return
        used_ranks = set()
        for shard in sharding_option.shards:
            for ordered in sorted(d for d in minheap_devices if d.device.rank not in used_ranks):
                if shard.storage.fits_in(ordered.device.storage):
                    shard.rank = ordered.device.rank
                    ordered.device.storage -= shard.storage
                    ordered.device.perf += shard.perf
                    used_ranks.add(shard.rank)
                    break
            else:
                raise PlannerError(
                    error_type=PlannerErrorType.PARTITION,
                    message=f"no rank left for a column shard of table {sharding_option.name} ({shard.storage})",
                )
        heapq.heapify(minheap_devices)


def find_set_width(module: nn.Module) -> Optional[int]:
    """The ``stored_set_dim`` a multi-embedding sparse arch declares (one set's padded width), if any."""
    widths = {int(m.stored_set_dim) for m in module.modules() if isinstance(getattr(m, "stored_set_dim", None), int)}
    if len(widths) > 1:
        raise ValueError(f"the model declares several set widths {sorted(widths)}; pass set_width explicitly")
    return widths.pop() if widths else None


def table_strategies(
    tables: Sequence[TableSpec],
    strategy: Union[str, ShardingStrategy],
    overrides: Optional[Mapping[str, Union[str, ShardingStrategy]]] = None,
) -> Dict[str, ShardingStrategy]:
    """``{table name: strategy}``: ``strategy`` for every table, except those named in ``overrides``.

    Raises:
        ValueError: an unknown strategy or a table name the model does not have.
    """
    default = ShardingStrategy.parse(strategy)
    chosen = {t.name: default for t in tables}
    for name, value in (overrides or {}).items():
        if name not in chosen:
            known = ", ".join(list(chosen)[:8]) + (f", ... ({len(chosen)} tables)" if len(chosen) > 8 else "")
            raise ValueError(f"sharding override: unknown table {name!r} (tables: {known})")
        chosen[name] = ShardingStrategy.parse(value, where=f"sharding override for table {name!r}")
    return chosen


def build_constraints(
    tables: Sequence[TableSpec],
    strategies: Mapping[str, ShardingStrategy],
    set_width: Optional[int],
    pooling_factors: Optional[Mapping[str, float]] = None,
) -> Dict[str, ParameterConstraints]:
    """Per-table planner constraints that express the chosen strategies.

    Args:
        tables: the model's tables.
        strategies: ``{table: strategy}`` from :func:`table_strategies`.
        set_width: column-shard width (one embedding set); required when a table is ``column_wise``.
        pooling_factors: ``{feature: mean ids per sample}`` (1 for one-hot features when absent).

    Raises:
        ValueError: a column-wise table without a set width, a set width that does not divide the table width or is
            not a multiple of 4, or a pooling factor for a feature no table reads.
    """
    if set_width is not None and (set_width <= 0 or set_width % WIDTH_MULTIPLE):
        raise ValueError(f"set_width: expected a positive multiple of {WIDTH_MULTIPLE}, got {set_width}")
    features = {f for t in tables for f in t.feature_names}
    unknown = sorted(set(pooling_factors or {}) - features)
    if unknown:
        raise ValueError(f"pooling_factors: no table reads feature(s) {', '.join(unknown)}")
    constraints: Dict[str, ParameterConstraints] = {}
    for table in tables:
        strategy = strategies[table.name]
        min_partition = None
        if strategy is ShardingStrategy.COLUMN_WISE:
            if set_width is None:
                raise ValueError(
                    f"table {table.name!r}: column_wise sharding needs set_width (one embedding set's stored width)"
                )
            if table.embedding_dim % set_width:
                raise ValueError(
                    f"table {table.name!r}: width {table.embedding_dim} is not a multiple of set_width {set_width}"
                )
        if set_width is not None and table.embedding_dim % set_width == 0:
            # Column shards one set wide, also when the planner picks column-wise under ``auto``.
            min_partition = set_width
        kwargs: Dict[str, object] = {"min_partition": min_partition}
        if strategy is ShardingStrategy.AUTO:
            # Tables stay in device memory: UVM offload to host memory (fused_uvm, fused_uvm_caching) needs
            # FBGEMM's CUDA build, which cannot be exercised here, and would hide a plan that does not fit.
            kwargs["compute_kernels"] = sorted(set(_KERNEL_FOR_STRATEGY.values()))
        else:
            kwargs["sharding_types"] = [strategy.value]
            kwargs["compute_kernels"] = [_KERNEL_FOR_STRATEGY[strategy]]
        if pooling_factors:
            kwargs["pooling_factors"] = [float(pooling_factors.get(f, 1.0)) for f in table.feature_names]
        constraints[table.name] = ParameterConstraints(**kwargs)  # type: ignore[arg-type]
    return constraints


class _DropPlannerRecords(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return f"{os.sep}torchrec{os.sep}distributed{os.sep}planner{os.sep}" not in record.pathname


@contextlib.contextmanager
def _quiet_planner() -> Iterator[None]:
    """Silences the planner's own chatter while it runs.

    The planner logs one root-logger warning per data-parallel table and warns about its storage heuristics on
    every call; the plan is reported by ``format_plan`` instead.
    """
    planner_logger = logging.getLogger("torchrec.distributed.planner")
    old_level = planner_logger.level
    planner_logger.setLevel(logging.ERROR)
    root_filter = _DropPlannerRecords()
    logging.getLogger().addFilter(root_filter)
    try:
        with warnings.catch_warnings():
            warnings.filterwarnings("ignore", module=r"torchrec\.distributed\.planner")
            warnings.filterwarnings("ignore", message=r".*StorageReservation.*")
            yield
    finally:
        logging.getLogger().removeFilter(root_filter)
        planner_logger.setLevel(old_level)


def plan_sharding(
    module: nn.Module,
    strategy: Union[str, ShardingStrategy] = ShardingStrategy.AUTO,
    *,
    world_size: int,
    local_world_size: int,
    device_type: str,
    set_width: Optional[int] = None,
    overrides: Optional[Mapping[str, Union[str, ShardingStrategy]]] = None,
    pg: Optional[dist.ProcessGroup] = None,
    fused_params: Optional[Mapping[str, object]] = None,
    hbm_gb: Optional[float] = None,
    ddr_gb: Optional[float] = None,
    batch_size: int = DEFAULT_BATCH_SIZE,
    pooling_factors: Optional[Mapping[str, float]] = None,
    reserved_fraction: float = DEFAULT_RESERVED_FRACTION,
    dense_tensor_estimate: Optional[int] = None,
) -> ShardingPlan:
    """Plans how the ``EmbeddingBagCollection``s of ``module`` are sharded over ``world_size`` ranks.

    The module may live on the ``meta`` device (nothing is allocated). Give ``DistributedModelParallel`` the
    returned plan together with ``make_sharders(fused_params, device_type)``.

    Args:
        module: the model (or an EBC); every ``EmbeddingBagCollection`` inside is planned.
        strategy: a :class:`ShardingStrategy` or its name, applied to every table not in ``overrides``.
        world_size: number of ranks.
        local_world_size: ranks per host.
        device_type: ``"cpu"`` or ``"cuda"`` (``"cuda"`` plans on paper without a GPU).
        set_width: column-shard width, one embedding set's stored width: column-wise shards then hold whole sets
            and a table's sets land on different ranks. Taken from the model's ``stored_set_dim`` when None.
        overrides: ``{table name: strategy}`` for tables that differ from ``strategy``.
        pg: process group of the job: rank 0 plans and every rank receives the same plan (or the same refusal).
            None plans locally, on paper.
        fused_params: FBGEMM options, as for :func:`make_sharders`.
        hbm_gb: GPU memory per rank in GiB (cuda only).
        ddr_gb: host memory per rank in GiB.
        batch_size: per-rank batch size (sizes the planner's input/output buffers and its perf model).
        pooling_factors: ``{feature: mean ids per sample}`` for multi-hot features.
        reserved_fraction: share of HBM kept free besides the dense-parameter and input reservations.
        dense_tensor_estimate: bytes of the dense part per rank (parameters, gradients, optimizer state,
            activations) the planner reserves; None: TorchRec's heuristic (6x the module's dense parameters).

    Returns:
        A TorchRec ``ShardingPlan`` keyed by module path, then table name.

    Raises:
        ValueError: a malformed request (see :func:`build_topology`, :func:`embedding_tables`,
            :func:`build_constraints`).
        ShardingError: no plan fits; the one-line message says how much memory is missing.

    Example::

        >>> import torch
        >>> from torchrec import EmbeddingBagCollection, EmbeddingBagConfig
        >>> ebc = EmbeddingBagCollection(
        ...     [EmbeddingBagConfig(name="t0", embedding_dim=48, num_embeddings=10**6, feature_names=["f0"])],
        ...     device=torch.device("meta"),
        ... )
        >>> plan = plan_sharding(ebc, "column_wise", world_size=4, local_world_size=4, device_type="cuda", set_width=12)
        >>> sorted(plan.plan[""]["t0"].ranks)
        [0, 1, 2, 3]
    """
    if batch_size < 1:
        raise ValueError(f"batch_size: expected a positive per-rank batch size, got {batch_size}")
    if not 0 <= reserved_fraction < 1:
        raise ValueError(f"reserved_fraction: expected a value in [0, 1), got {reserved_fraction}")
    if pg is not None and pg.size() != world_size:
        raise ValueError(f"world_size {world_size} differs from the process group's size {pg.size()}")
    tables = embedding_tables(module)
    strategies = table_strategies(tables, strategy, overrides)
    if set_width is None:
        set_width = find_set_width(module)
    constraints = build_constraints(tables, strategies, set_width, pooling_factors)
    topology = build_topology(world_size, local_world_size, device_type, hbm_gb=hbm_gb, ddr_gb=ddr_gb)
    sharders = make_sharders(fused_params, device_type)
    with _quiet_planner():
        reservation = HeuristicalStorageReservation(
            percentage=reserved_fraction, dense_tensor_estimate=dense_tensor_estimate
        )
        planner = EmbeddingShardingPlanner(
            topology=topology,
            batch_size=batch_size,
            constraints=constraints,
            storage_reservation=reservation,
            partitioner=SetParallelPartitioner(),
            stats=NoopEmbeddingStats(),
            debug=False,
        )

        def solve() -> Tuple[str, object]:
            try:
                return "plan", planner.plan(module, sharders)
            except PlannerError as e:
                return "error", _refusal(e, tables, strategies, set_width, topology, reservation, module, fused_params)

        if pg is None or pg.size() == 1:
            kind, payload = solve()
        else:
            # TorchRec's collective_plan lets rank 0 raise alone while the other ranks wait in the broadcast
            # forever; broadcasting the outcome makes every rank return the plan or raise the same refusal.
            box: List[object] = [solve() if pg.rank() == 0 else None]
            dist.broadcast_object_list(box, src=dist.get_global_rank(pg, 0), group=pg)
            kind, payload = box[0]  # type: ignore[misc]
    if kind == "error":
        raise ShardingError(str(payload))
    plan = payload
    assert isinstance(plan, ShardingPlan)
    _check_plan(plan, tables, strategies, set_width, world_size)
    return plan


def _check_plan(
    plan: ShardingPlan,
    tables: Sequence[TableSpec],
    strategies: Mapping[str, ShardingStrategy],
    set_width: Optional[int],
    world_size: int,
) -> None:
    """Guards the promises of the named strategies, and of :class:`SetParallelPartitioner`, against a planner that
    would quietly do otherwise.

    Raises:
        ShardingError: a table unplanned, planned with another strategy or with column shards not one set wide.
        RuntimeError: column shards of one table sharing a rank although there are enough ranks (the partitioner
            override did not take effect: a TorchRec other than the pinned one).
    """
    for table in tables:
        sharding = plan.plan.get(table.module_path, {}).get(table.name)  # type: ignore[union-attr]
        if sharding is None:
            raise ShardingError(f"the planner left table {table.name!r} unplanned")
        wanted = strategies[table.name]
        if wanted is not ShardingStrategy.AUTO and sharding.sharding_type != wanted.value:
            raise ShardingError(
                f"table {table.name!r}: asked for {wanted.value}, the planner chose {sharding.sharding_type}"
            )
        if sharding.sharding_type == ShardingType.COLUMN_WISE.value and set_width is not None:
            widths = {s.shard_sizes[1] for s in sharding.sharding_spec.shards}
            if table.embedding_dim % set_width == 0 and widths != {set_width}:
                raise ShardingError(
                    f"table {table.name!r}: column shards of width {sorted(widths)}, expected one set ({set_width})"
                )
        if sharding.sharding_type == ShardingType.COLUMN_WISE.value:
            ranks = list(sharding.ranks or [])
            if 1 < len(ranks) <= world_size and len(set(ranks)) < len(ranks):
                hook = "" if PARTITION_HOOK_MATCHES else " (GreedyPerfPartitioner._device_partition has changed)"
                raise RuntimeError(
                    f"table {table.name!r}: column shards on ranks {ranks}, expected distinct ranks (one set per rank); "
                    f"SetParallelPartitioner's override of TorchRec's private GreedyPerfPartitioner hook did not take "
                    f"effect{hook}; installed: {describe_installed()}; supported: {SUPPORTED}"
                )


def _refusal(
    error: PlannerError,
    tables: Sequence[TableSpec],
    strategies: Mapping[str, ShardingStrategy],
    set_width: Optional[int],
    topology: Topology,
    reservation: HeuristicalStorageReservation,
    module: nn.Module,
    fused_params: Optional[Mapping[str, object]],
) -> str:
    """One line that says why nothing fits: memory needed against memory offered."""
    from multiembed.sharding.report import format_bytes, optimizer_state_bytes, table_optimizer

    tier = "hbm" if topology.compute_device == "cuda" else "ddr"
    capacity = getattr(topology.devices[0].storage, tier)
    reserved = reservation.last_reserved_topology
    available = max(getattr(reserved.devices[0].storage, tier) if reserved is not None else capacity, 0)
    world = topology.world_size
    replicated = sharded = 0
    largest_name, largest_need = "", 0
    for table in tables:
        optimizer = table_optimizer(module, table, fused_params)
        state = table.weight_bytes + optimizer_state_bytes(optimizer, table.num_embeddings, table.embedding_dim)
        strategy = strategies[table.name]
        if strategy is ShardingStrategy.DATA_PARALLEL:
            replicated += state
            continue
        sharded += state
        if strategy in (ShardingStrategy.ROW_WISE, ShardingStrategy.AUTO):
            need = -(-state // world)
        elif strategy is ShardingStrategy.COLUMN_WISE and set_width:
            need = state * set_width // table.embedding_dim
        else:
            need = state
        if need > largest_need:
            largest_name, largest_need = table.name, need
    total = replicated * world + sharded
    problems = []
    if total > available * world:
        problems.append(
            f"the tables need at least {format_bytes(total)} in all (weights + optimizer state), "
            f"{format_bytes(available * world)} is available"
        )
    if replicated + largest_need > available:
        parts = [f"{format_bytes(replicated)} of data-parallel replicas"] if replicated else []
        if largest_name:
            parts.append(f"{format_bytes(largest_need)} of table {largest_name!r} ({strategies[largest_name].value})")
        problems.append(f"one rank needs at least {format_bytes(replicated + largest_need)} ({' + '.join(parts)})")
    if not problems:
        problems.append(f"the planner could not place the shards ({str(error).strip().splitlines()[0]})")
    reason = "; ".join(problems)
    return (
        f"no sharding plan fits on {world} ranks x {format_bytes(capacity)} {tier.upper()} "
        f"({format_bytes(available)} per rank left for embeddings after reserving dense parameters, input buffers "
        f"and a margin): {reason}; use more ranks, more memory per rank, a smaller model or another strategy"
    )
