"""Forward + backward time of a batched set interaction arch vs a per-set Python loop, for K sets.

The batched arch (``multiembed.models.build_set_arch``, weights with a leading K dimension) against K separate
single-set arches called one after another, on the same ``[B, K, F, d]`` set-major embeddings (as the sparse arch
returns them), gradients for the parameters and the embeddings. Each configuration is timed in ``--rounds``
alternating rounds (batched, loop, batched, loop, ...) of ``--iters`` steps after warm-up and the median round is
reported, so a busy machine disturbs both sides alike; K = 1 is the control (the two sides run the same code).

Usage::

    .venv/bin/python benchmarks/bench_set_arch.py                   # DCNv2, K in 1 2 4 10, batch 2048, 39 fields
    .venv/bin/python benchmarks/bench_set_arch.py --quick           # small shapes, seconds
    .venv/bin/python benchmarks/bench_set_arch.py --backbones all --ks 1 4
    .venv/bin/python benchmarks/bench_set_arch.py --device cuda --json out.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from typing import Callable, Dict, List

from multiembed.data.metadata import atomic_write_text


def _parse_args(argv: List[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--backbones", nargs="+", default=["dcnv2"], help="backbones, or 'all'")
    parser.add_argument("--ks", nargs="+", type=int, default=[1, 2, 4, 10], help="numbers of sets")
    parser.add_argument("--batch", type=int, default=2048)
    parser.add_argument("--fields", type=int, default=39)
    parser.add_argument("--set-dim", type=int, default=None, help="set width (default: the backbone's base)")
    parser.add_argument("--hidden", type=int, default=400)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--iters", type=int, default=3, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=3, help="alternating timed rounds per side (median reported)")
    parser.add_argument("--threads", type=int, default=None, help="torch intra-op threads (default: torch's)")
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--quick", action="store_true", help="batch 256, K in 1 2 4, 2 steps")
    parser.add_argument("--json", default=None, help="also write the results here")
    args = parser.parse_args(argv)
    if args.quick:
        args.batch, args.ks, args.iters, args.warmup, args.rounds = 256, [1, 2, 4], 2, 1, 3
    return args


def _time_steps(step: Callable[[], None], iters: int, device) -> float:
    import torch

    if device.type == "cuda":
        torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(iters):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return (time.perf_counter() - start) / iters


def _median_alternating(steps: Dict[str, Callable[[], None]], warmup: int, iters: int, rounds: int, device):
    """Seconds per step of each side: the median of ``rounds`` rounds, the sides alternating within a round."""
    for step in steps.values():
        for _ in range(warmup):
            step()
    timings: Dict[str, List[float]] = {name: [] for name in steps}
    for _ in range(rounds):
        for name, step in steps.items():
            timings[name].append(_time_steps(step, iters, device))
    return {name: statistics.median(values) for name, values in timings.items()}


def _dcnv2_gflop(batch: int, k: int, fields: int, set_dim: int, hidden: int) -> float:
    """Forward + backward GFLOP of the cross net and projection (backward = 2 x forward for matmuls)."""
    width = fields * set_dim
    forward = k * (4 * 2 * batch * width * width + 2 * batch * width * hidden)
    return 3 * forward / 1e9


def main(argv: List[str]) -> int:
    args = _parse_args(argv)
    import torch
    from torch import nn
    from tqdm import tqdm

    from multiembed.models import BACKBONES, BASE_SET_DIM, build_set_arch, parse_model_name

    if args.threads:
        torch.set_num_threads(args.threads)
    device = torch.device(args.device)
    backbones = list(BACKBONES) if args.backbones == ["all"] else args.backbones
    results: List[Dict[str, float]] = []
    configs = [(b, k) for b in backbones for k in args.ks]
    for backbone, k in tqdm(configs, desc="set arch", file=sys.stderr):
        d = args.set_dim or BASE_SET_DIM[backbone]
        torch.manual_seed(0)
        batched = build_set_arch(parse_model_name(f"{backbone}-me-{k}x{d}"), args.fields, hidden=args.hidden,
                                 device=device)
        loop = nn.ModuleList(
            build_set_arch(parse_model_name(f"{backbone}-me-1x{d}"), args.fields, hidden=args.hidden, device=device)
            for _ in range(k)
        )
        embeddings = torch.randn(k, args.batch, args.fields, d, device=device).transpose(0, 1).requires_grad_()

        def batched_step() -> None:
            out = batched(embeddings).mean(dim=1)
            out.sum().backward()

        def loop_step() -> None:
            outs = [arch(embeddings[:, m : m + 1]) for m, arch in enumerate(loop)]
            torch.cat(outs, dim=1).mean(dim=1).sum().backward()

        seconds = _median_alternating({"batched": batched_step, "loop": loop_step}, args.warmup, args.iters,
                                      args.rounds, device)
        batched_s, loop_s = seconds["batched"], seconds["loop"]
        row = {"backbone": backbone, "K": k, "batch": args.batch, "fields": args.fields, "set_dim": d,
               "batched_ms": 1e3 * batched_s, "loop_ms": 1e3 * loop_s, "loop_over_batched": loop_s / batched_s}
        if backbone == "dcnv2":
            row["batched_gflops"] = _dcnv2_gflop(args.batch, k, args.fields, d, args.hidden) / batched_s
        results.append(row)

    print(f"device {device}, torch {torch.__version__}, threads {torch.get_num_threads()}, batch {args.batch}, "
          f"fields {args.fields}, hidden {args.hidden}, median of {args.rounds} alternating rounds of {args.iters} "
          f"steps after {args.warmup} warm-up")
    print(f"{'backbone':10} {'K':>3} {'d':>4} {'batched ms':>11} {'loop ms':>9} {'loop/batched':>13} {'GFLOP/s':>8}")
    for r in results:
        gflops = f"{r['batched_gflops']:8.1f}" if "batched_gflops" in r else f"{'-':>8}"
        print(f"{r['backbone']:10} {r['K']:>3} {r['set_dim']:>4} {r['batched_ms']:11.1f} {r['loop_ms']:9.1f} "
              f"{r['loop_over_batched']:13.2f} {gflops}")
    if args.json:
        from multiembed.benchmarks.machine import cpu_facts

        record = {"argv": argv, "conditions": cpu_facts(), "results": results}
        atomic_write_text(args.json, json.dumps(record, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
