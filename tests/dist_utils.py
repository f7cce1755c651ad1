"""Spawning a few local gloo ranks for a test: a free rendezvous port every time (never a fixed 29500)."""

from __future__ import annotations

import os
import socket
from typing import Any, Callable

import torch.multiprocessing as mp


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _entry(rank: int, world_size: int, port: int, fn: Callable[..., Any], args: tuple) -> None:
    os.environ.update(
        MASTER_ADDR="127.0.0.1",
        MASTER_PORT=str(port),
        RANK=str(rank),
        WORLD_SIZE=str(world_size),
        LOCAL_RANK=str(rank),
        LOCAL_WORLD_SIZE=str(world_size),
        OMP_NUM_THREADS="1",
    )
    import torch

    torch.set_num_threads(1)
    fn(rank, world_size, *args)


def run_ranks(fn: Callable[..., Any], world_size: int, *args: Any) -> None:
    """Runs ``fn(rank, world_size, *args)`` in ``world_size`` spawned processes joined as one gloo job.

    ``fn`` must be importable (a module-level function). A failure on any rank fails the caller.
    """
    mp.start_processes(_entry, args=(world_size, free_port(), fn, args), nprocs=world_size, join=True, start_method="spawn")
