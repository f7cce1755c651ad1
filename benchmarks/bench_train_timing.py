"""Timing and memory counters of the benchmark: synchronised wall time, medians, tensor bytes, page faults, peak RSS;
contenders interleaved in blocks and compared by paired ratios."""

from __future__ import annotations

import math
import resource
import statistics
import sys
import time
from typing import Any, Callable, Dict, List, Mapping, Sequence, Tuple

import torch
import torch.distributed as dist
from tqdm import tqdm

from multiembed.benchmarks import machine


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed_call(fn: Callable[[], Any], device: torch.device) -> Tuple[float, Any]:
    """``fn()``'s synchronised wall seconds and its result."""
    sync(device)
    start = time.perf_counter()
    out = fn()
    sync(device)
    return time.perf_counter() - start, out


def timed(fn: Callable[[], Any], device: torch.device) -> float:
    return timed_call(fn, device)[0]


def median_time(fn: Callable[[], Any], device: torch.device, reps: int) -> float:
    return statistics.median(timed(fn, device) for _ in range(reps))


def tensor_bytes(obj: Any) -> int:
    """Bytes of every tensor (local shards of sharded tensors) inside nested dicts / lists / tuples."""
    if isinstance(obj, torch.Tensor):
        local = getattr(obj, "local_shards", None)
        if callable(local):
            return sum(tensor_bytes(shard.tensor) for shard in local())
        to_local = getattr(obj, "to_local", None)
        if callable(to_local):
            return tensor_bytes(to_local())
        return obj.numel() * obj.element_size()
    if isinstance(obj, Mapping):
        return sum(tensor_bytes(v) for v in obj.values())
    if isinstance(obj, (list, tuple)):
        return sum(tensor_bytes(v) for v in obj)
    return 0


def page_faults() -> int:
    """Minor page faults of this process so far."""
    return int(resource.getrusage(resource.RUSAGE_SELF).ru_minflt)


def peak_rss_bytes() -> int:
    """Peak resident set size of this process's address space (:func:`machine.peak_rss_bytes`: ``VmHWM``, not the
    ``ru_maxrss`` a child process inherits from its parent)."""
    return machine.peak_rss_bytes()


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


def all_ranks_max(value: float, device: torch.device) -> float:
    if not dist.is_initialized() or dist.get_world_size() == 1:
        return value
    t = torch.tensor([value], dtype=torch.float64, device=device if device.type == "cuda" else "cpu")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t.item())
