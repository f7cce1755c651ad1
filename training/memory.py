"""Admission: the memory a run needs, against the memory this machine has, before anything is allocated.

One account (:class:`MemoryAccount`) of what one rank holds while it trains:

* the tables and their optimizer state (the whole job's bytes; sharded, so a rank holds about ``1 / world_size``
  of them; data-parallel tables are rare and small and are counted the same way);
* the dense parameters, their gradients and the dense optimizer's state (Adam: 2 values per weight; every rank
  holds a replica);
* the activations of one batch: every output of the dense arches (embeddings, set arch, over arch) for the
  rank's batch, run on the ``meta`` device (nothing is allocated), twice (kept for backward, and their
  gradients).

The account is built from the model on ``meta`` (:func:`memory_account`). The machine's side
(:func:`machine_memory`): on CPU ``MemTotal`` and ``MemAvailable`` of ``/proc/meminfo``, capped by the cgroup's
limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) less its usage, divided by the ranks on this host; on a
GPU, the device's total and free memory. :func:`admission_problem` compares the two in one line naming both
numbers; the dense part's bytes are also what the planner reserves (``dense_tensor_estimate``) and the machine's
capacity is the planner's ``Topology``, so the plan and the admission agree.

Example::

    >>> account = MemoryAccount(table_bytes=8 * 2**30, dense_bytes=2**30, activation_bytes=2**29, world_size=4)
    >>> account.per_rank_bytes == 2 * 2**30 + 2**30 + 2**29
    True
    >>> admission_problem(account, MachineMemory(2**40, 2 * 2**30, "test machine"), "dcnv2-me-4x") is not None
    True
"""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Mapping, Optional

import torch
from torch import nn

from multiembed.models import MultiEmbeddingModel
from multiembed.models.model import append_field
from multiembed.sharding import embedding_tables
from multiembed.sharding.report import format_bytes, optimizer_state_bytes, table_optimizer

# Values of dense optimizer state per dense weight (gradients counted apart).
DENSE_STATE_PER_WEIGHT: Mapping[str, int] = {"adam": 2, "sgd": 0}
# Activations are kept for backward and their gradients exist during it: twice the forward outputs.
ACTIVATION_FACTOR = 2


@dataclasses.dataclass(frozen=True)
class MemoryAccount:
    """What a run holds, in bytes.

    Attributes:
        table_bytes: every table's weights and optimizer state, over the whole job.
        dense_bytes: dense parameters + gradients + dense optimizer state (one replica, held by every rank).
        activation_bytes: one rank's batch: forward outputs, kept for backward, and their gradients.
        world_size: ranks the tables are sharded over.
    """

    table_bytes: int
    dense_bytes: int
    activation_bytes: int
    world_size: int

    @property
    def per_rank_bytes(self) -> int:
        """What one rank needs: its share of the tables, a dense replica and one batch's activations."""
        return -(-self.table_bytes // self.world_size) + self.dense_bytes + self.activation_bytes

    def describe(self) -> str:
        share = f" (/{self.world_size} ranks)" if self.world_size > 1 else ""
        return (f"tables + optimizer state {format_bytes(self.table_bytes)}{share}, dense parameters + gradients + "
                f"optimizer state {format_bytes(self.dense_bytes)}, activations of one batch "
                f"{format_bytes(self.activation_bytes)}")


@dataclasses.dataclass(frozen=True)
class MachineMemory:
    """Memory of this machine for one rank, in bytes.

    Attributes:
        total_bytes: what a rank may use at most (the planner's capacity per rank).
        available_bytes: what is free for it now.
        source: where the numbers come from, for messages.
    """

    total_bytes: int
    available_bytes: int
    source: str


def _dense_parameters(model: nn.Module) -> int:
    return sum(p.numel() * p.element_size() for name, p in model.named_parameters() if "embedding_bags" not in name)


def activation_bytes(model: MultiEmbeddingModel, batch_size: int) -> int:
    """Bytes of every floating-point output of the dense arches for ``batch_size`` rows (the embeddings included),
    times :data:`ACTIVATION_FACTOR`. The model's dense arches must be on ``meta`` (nothing is allocated)."""
    sparse = model.sparse_arch
    total = 0

    def count(_module: nn.Module, _inputs: object, output: object) -> None:
        nonlocal total
        if isinstance(output, torch.Tensor) and output.is_floating_point():
            total += output.numel() * output.element_size()

    arches = [arch for arch in (model.dense_arch, model.set_arch, model.over_arch) if arch is not None]
    hooks = [m.register_forward_hook(count) for arch in arches for m in arch.modules()]
    try:
        with torch.no_grad():
            embeddings = torch.empty(batch_size, sparse.num_sets, sparse.num_fields, sparse.set_dim, device="meta")
            total += embeddings.numel() * embeddings.element_size()
            fields = embeddings
            if model.dense_arch is not None:
                dense = torch.empty(batch_size, model.dense_arch.in_features, device="meta")
                fields = append_field(embeddings, model.dense_arch(dense))
            model.over_arch(model.set_arch(fields).sum(dim=1))
    finally:
        for hook in hooks:
            hook.remove()
    return ACTIVATION_FACTOR * total


def memory_account(
    model: MultiEmbeddingModel, train_module: nn.Module, dense_optimizer: str, world_size: int, batch_size: int
) -> MemoryAccount:
    """The account of a model built entirely on ``meta`` (tables and dense arches) with its sparse optimizer
    attached (:func:`~multiembed.training.build.build_meta_model`).

    Args:
        model: the zoo model, on ``meta``.
        train_module: the module the planner sees (holds ``model``), for each table's optimizer.
        dense_optimizer: ``adam`` or ``sgd``.
        world_size: ranks of the job.
        batch_size: rows per rank and step.
    """
    tables = 0
    for table in embedding_tables(train_module):
        state = optimizer_state_bytes(table_optimizer(train_module, table), table.num_embeddings, table.embedding_dim)
        tables += table.weight_bytes + state
    weights = _dense_parameters(model)
    dense = weights * (2 + DENSE_STATE_PER_WEIGHT.get(dense_optimizer, 2))
    return MemoryAccount(tables, dense, activation_bytes(model, batch_size), world_size)


def _meminfo() -> Mapping[str, int]:
    values = {}
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            key, _, rest = line.partition(":")
            parts = rest.split()
            if parts and parts[0].isdigit():
                values[key] = int(parts[0]) * (1024 if parts[1:] == ["kB"] else 1)
    except OSError:
        pass
    return values


def _read_int(path: str) -> Optional[int]:
    try:
        text = Path(path).read_text().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def _cgroup_limit() -> Optional[tuple]:
    """``(limit, usage)`` of this process's memory cgroup (v2, else v1), None without a limit."""
    for limit_file, usage_file in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                                   ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                                    "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        limit = _read_int(limit_file)
        if limit is not None and limit < 1 << 60:
            return limit, _read_int(usage_file) or 0
    return None


def machine_memory(device: torch.device, local_world_size: int) -> MachineMemory:
    """This machine's memory for one rank (see the module docstring)."""
    device = torch.device(device)
    if device.type == "cuda":
        free, total = torch.cuda.mem_get_info(device)
        return MachineMemory(int(total), int(free), f"GPU {device} memory")
    info = _meminfo()
    total, available = info.get("MemTotal", 0), info.get("MemAvailable", info.get("MemFree", 0))
    source = "MemTotal / MemAvailable of /proc/meminfo"
    cgroup = _cgroup_limit()
    if cgroup is not None and (not total or cgroup[0] < total):
        limit, usage = cgroup
        total, available = limit, min(available, max(limit - usage, 0)) if available else max(limit - usage, 0)
        source = "the memory cgroup's limit"
    ranks = max(int(local_world_size), 1)
    if ranks > 1:
        source += f", divided by the {ranks} ranks on this host"
    return MachineMemory(total // ranks, available // ranks, source)


@dataclasses.dataclass(frozen=True)
class PlanningCapacity:
    """Memory per rank a plan on paper is made for (GiB; None: TorchRec's default) and where it comes from."""

    hbm_gb: Optional[float]
    ddr_gb: Optional[float]
    source: str


def planning_capacity(device_type: str, local_world_size: int) -> PlanningCapacity:
    """This machine's memory per rank, as the capacity of a plan for ``device_type`` ranks.

    Host memory (``ddr``) is :func:`machine_memory`'s total per rank. GPU memory (``hbm``) is this machine's GPU's
    when it has one; a CUDA plan made on a machine without a GPU keeps TorchRec's default (the message says so).
    """
    host = machine_memory(torch.device("cpu"), local_world_size)
    ddr_gb = host.total_bytes / 2**30 if host.total_bytes > 0 else None
    host_source = f"host memory from {host.source}" if ddr_gb is not None else "TorchRec's default host memory"
    if device_type != "cuda":
        return PlanningCapacity(None, ddr_gb, host_source)
    if torch.cuda.is_available():
        gpu = machine_memory(torch.device("cuda", 0), 1)
        return PlanningCapacity(gpu.total_bytes / 2**30, ddr_gb, f"{gpu.source}; {host_source}")
    return PlanningCapacity(None, ddr_gb, f"TorchRec's default GPU memory (no GPU here); {host_source}")


def admission_problem(account: MemoryAccount, machine: MachineMemory, model: str) -> Optional[str]:
    """Why the run cannot start here (one line with both numbers), or None when it fits in the available memory.
    A machine that reports no memory (no ``/proc/meminfo``) admits everything."""
    if machine.available_bytes <= 0 or account.per_rank_bytes <= machine.available_bytes:
        return None
    return (f"--model {model}: needs about {format_bytes(account.per_rank_bytes)} per rank ({account.describe()}); "
            f"{format_bytes(machine.available_bytes)} is available per rank ({machine.source}); use a smaller model "
            "or scale, a smaller --batch-size, or more ranks")
