"""Process-group set-up and the collectives the package uses: one code path for a plain process, torchrun, torchx
(local, slurm, kubernetes).

Every collective helper is the identity in a one-rank job (or without a process group), so single-process code runs
the same calls.

gloo + CPU when no GPU is visible, nccl + CUDA when one is; chosen at start, nothing else in the trainer branches on
it except the optimizer defaults (FBGEMM's CPU kernels lack fused Adam).
"""

from __future__ import annotations

import dataclasses
import os
import socket
from datetime import timedelta
from typing import List, Optional

import torch
import torch.distributed as dist

from multiembed.config.choices import Device
from multiembed.training.quiet import silence_known_warnings


@dataclasses.dataclass(frozen=True)
class DistContext:
    """Where this process sits in the job.

    Attributes:
        rank: global rank.
        world_size: number of ranks in the job.
        local_rank: rank on this node (selects the GPU).
        local_world_size: ranks per node (the planner's topology needs it).
        device: ``cuda:<local_rank>`` or ``cpu``.
        backend: ``"nccl"`` or ``"gloo"``.
        launched: True when started by torchrun / torchx (env:// rendezvous), False for a plain process.
    """

    rank: int
    world_size: int
    local_rank: int
    local_world_size: int
    device: torch.device
    backend: str
    launched: bool

    @property
    def is_main(self) -> bool:
        return self.rank == 0


def free_port() -> int:
    """A TCP port that was free a moment ago (for single-process and test rendezvous; never a fixed 29500)."""
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _env_int(name: str, default: int) -> int:
    value = os.environ.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def init_distributed(device: str = "auto", timeout_s: float = 1800.0) -> DistContext:
    """Initialises ``torch.distributed`` (if not already) and returns this process's :class:`DistContext`.

    Under torchrun / torchx the launcher sets ``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``, ``LOCAL_WORLD_SIZE`` and the
    rendezvous address; the same variables are what slurm and kubernetes schedulers get from torchx, so nothing
    scheduler-specific is read here. A plain process becomes a one-rank group on a free local port, so DMP and the
    pipeline run the same code single-process.

    Args:
        device: ``"auto"`` (CUDA when available), ``"cpu"`` or ``"cuda"``.
        timeout_s: collective timeout.

    Raises:
        ValueError: ``device="cuda"`` without a visible GPU, or an unknown device.
    """
    Device.parse(device, "--device")
    # Every job starts here: silence the known third-party warnings once, before TorchRec builds anything.
    silence_known_warnings()
    use_cuda = torch.cuda.is_available() if device == "auto" else device == "cuda"
    if use_cuda and not torch.cuda.is_available():
        raise ValueError("--device cuda: no CUDA device is visible to this process")
    launched = "WORLD_SIZE" in os.environ and "RANK" in os.environ
    rank = _env_int("RANK", 0)
    world_size = _env_int("WORLD_SIZE", 1)
    local_rank = _env_int("LOCAL_RANK", 0)
    # Launchers that omit LOCAL_WORLD_SIZE get one rank per node in the planner's topology: safe, if pessimistic.
    local_world_size = _env_int("LOCAL_WORLD_SIZE", 1)
    backend = "nccl" if use_cuda else "gloo"
    if use_cuda:
        torch.cuda.set_device(local_rank)
        dev = torch.device("cuda", local_rank)
    else:
        dev = torch.device("cpu")
    if not dist.is_initialized():
        if launched:
            dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
        else:
            store = dist.TCPStore("127.0.0.1", free_port(), world_size=1, is_master=True)
            dist.init_process_group(backend=backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=timeout_s))
    return DistContext(
        rank=rank,
        world_size=world_size,
        local_rank=local_rank,
        local_world_size=local_world_size,
        device=dev,
        backend=backend,
        launched=launched,
    )


def is_multi_rank() -> bool:
    """True inside a process group of more than one rank."""
    return dist.is_initialized() and dist.get_world_size() > 1


def barrier() -> None:
    if dist.is_initialized():
        dist.barrier()


def all_reduce_sum(tensor: torch.Tensor) -> torch.Tensor:
    """Sums ``tensor`` over the ranks, in place; returns it."""
    if is_multi_rank():
        dist.all_reduce(tensor, op=dist.ReduceOp.SUM)
    return tensor


def all_ranks_agree(flag: bool) -> bool:
    """True only when ``flag`` holds on every rank (a MIN all-reduce)."""
    if not is_multi_rank():
        return flag
    t = torch.tensor([1 if flag else 0], dtype=torch.int64)
    dist.all_reduce(t, op=dist.ReduceOp.MIN)
    return bool(t.item())


def all_gather_object(obj: object) -> List[object]:
    """Every rank's ``obj``, in rank order (``[obj]`` in a one-rank job)."""
    if not is_multi_rank():
        return [obj]
    out: List[object] = [None] * dist.get_world_size()
    dist.all_gather_object(out, obj)
    return out


def raise_collectively(error: Optional[str]) -> None:
    """Raises ``ValueError(error)`` on every rank when rank 0 found one (so no rank waits forever)."""
    error = broadcast_object(error)
    if error:
        raise ValueError(error)


def broadcast_object(obj: Optional[object], src: int = 0) -> object:
    """Rank ``src``'s object on every rank (identity in a one-rank job)."""
    if not is_multi_rank():
        return obj
    box = [obj]
    dist.broadcast_object_list(box, src=src)
    return box[0]


def destroy() -> None:
    if dist.is_initialized():
        dist.destroy_process_group()
