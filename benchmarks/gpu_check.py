"""GPU check in pure torch (no FBGEMM, no TorchRec): the set interaction arch against the card's own GEMM rate,
and an NCCL all-reduce sanity check with one process.

The lent GPU machines run torch 2.11 (CUDA 13) on Python 3.12 without the CUDA FBGEMM wheel, so the package's
fused TorchRec paths cannot run there; its dense arches can. This script imports the package's own
``BatchedCrossNet`` and ``SetProjection`` through ``multiembed.models`` like any user, so the machine needs the
package and a TorchRec stack that matches its torch: torch 2.11 pairs with ``fbgemm-gpu-cpu==1.6.0`` and
``torchrec==1.6.1`` (about 10 MiB of wheels, carried with the checkout and installed with ``pip install --no-deps``,
then ``pip install --no-deps -e .``). It measures:

* ``gemm``: fp32 ``[B, F*d] x [F*d, F*d]`` (TF32 off, true fp32), the rate the interaction arch is compared with;
  TF32 and bf16 rates of the same shape are reported for reference;
* ``interaction``: ME-DCNv2's set interaction arch (K sets, 4 full-rank cross layers on ``F*d``, projection to
  400 with BatchNorm, ReLU, dropout) forward + backward, fp32, its analytic GEMM FLOPs (``2 b n m`` forward per
  Linear-like layer, twice that backward) over the measured time, and that rate over the GEMM's;
* ``nccl``: a one-rank NCCL process group; all-reduce of a known tensor (the result must equal the input) and the
  time of a 256 MiB all-reduce (a plumbing check: one rank moves no data between GPUs).

Each measurement alternates with the GEMM in rounds (median reported), so the ratio is taken under the same
conditions. Run::

    python -m multiembed.benchmarks.gpu_check --json gpu_check.json   # on the GPU machine
    python -m multiembed.benchmarks.gpu_check --device cpu --quick    # smoke test anywhere (gloo instead of NCCL)
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import socket
import statistics
import time
from datetime import timedelta
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch
import torch.distributed as dist
from torch import nn



class SetInteraction(nn.Module):
    """ME-DCNv2's set branch on set-major input: cross net then projection, ``[K, B, D] -> [B, K, H]``.

    Mirrors ``CrossSetArch.forward`` without its ``[B, K, F, d]`` flattening (a view), so that it needs nothing
    but the two plain-torch modules.
    """

    def __init__(self, crossnet: nn.Module, projection: nn.Module) -> None:
        super().__init__()
        self.crossnet = crossnet
        self.projection = projection

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.projection(self.crossnet(x))


def interaction_flops(batch: int, num_sets: int, width: int, hidden: int, layers: int) -> int:
    """Forward + backward GEMM FLOPs of the set arch (the harness's ``set_arch_flops`` for full-rank DCNv2)."""
    return num_sets * (layers * 6 * batch * width * width + 6 * batch * width * hidden)


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _time(fn: Callable[[], Any], device: torch.device, iters: int) -> float:
    """Seconds per call of ``fn``, averaged over ``iters`` calls between two synchronisations."""
    _sync(device)
    start = time.perf_counter()
    for _ in range(iters):
        fn()
    _sync(device)
    return (time.perf_counter() - start) / iters


def measure_interaction(
    device: torch.device, batch: int, num_sets: int, fields: int, set_dim: int, hidden: int, layers: int,
    rounds: int, iters: int,
) -> Dict[str, Any]:
    """The set arch's forward + backward rate and an fp32 GEMM's, alternating in ``rounds`` rounds."""
    from multiembed.models import BatchedCrossNet, SetProjection
    width = fields * set_dim
    arch = SetInteraction(
        BatchedCrossNet(num_sets, width, layers, device=device), SetProjection(num_sets, width, hidden, 0.2, device=device)
    ).train()
    x = torch.randn(num_sets, batch, width, device=device, requires_grad=True)
    a = torch.randn(batch, width, device=device)
    b = torch.randn(width, width, device=device)

    def step() -> None:
        out = arch(x)
        out.backward(torch.ones_like(out))

    def gemm() -> None:
        torch.mm(a, b)

    for fn in (step, gemm):
        fn()
    arch_times, gemm_times = [], []
    for _ in range(rounds):
        gemm_times.append(_time(gemm, device, iters * 8))
        arch_times.append(_time(step, device, iters))
    flops = interaction_flops(batch, num_sets, width, hidden, layers)
    gemm_flops = 2 * batch * width * width
    return {
        "batch": batch,
        "num_sets": num_sets,
        "width": width,
        "interaction_ms": statistics.median(arch_times) * 1e3,
        "interaction_gflops": flops / statistics.median(arch_times) / 1e9,
        "gemm_gflops": gemm_flops / statistics.median(gemm_times) / 1e9,
        "interaction_vs_gemm": statistics.median(
            (flops / t) / (gemm_flops / g) for t, g in zip(arch_times, gemm_times)
        ),
        "interaction_samples_per_s": batch / statistics.median(arch_times),
    }


def reference_gemm_rates(device: torch.device, batch: int, width: int, iters: int) -> Dict[str, float]:
    """GFLOP/s of the same GEMM in TF32 and bf16 (reference only; the package's numbers are fp32)."""
    rates: Dict[str, float] = {}
    flops = 2 * batch * width * width
    if device.type == "cuda":
        torch.backends.cuda.matmul.allow_tf32 = True
        a, b = torch.randn(batch, width, device=device), torch.randn(width, width, device=device)
        torch.mm(a, b)
        rates["tf32_gemm_gflops"] = flops / _time(lambda: torch.mm(a, b), device, iters) / 1e9
        torch.backends.cuda.matmul.allow_tf32 = False
    a16 = torch.randn(batch, width, device=device, dtype=torch.bfloat16)
    b16 = torch.randn(width, width, device=device, dtype=torch.bfloat16)
    torch.mm(a16, b16)
    rates["bf16_gemm_gflops"] = flops / _time(lambda: torch.mm(a16, b16), device, iters) / 1e9
    return rates


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _nccl_version() -> str:
    version = torch.cuda.nccl.version()
    return ".".join(map(str, version)) if isinstance(version, tuple) else str(version)


def collective_check(device: torch.device, megabytes: int) -> Dict[str, Any]:
    """A one-rank process group (NCCL on CUDA, gloo on CPU): all-reduce of a known tensor and a timed large one."""
    backend = "nccl" if device.type == "cuda" else "gloo"
    created = not dist.is_initialized()
    if created:
        store = dist.TCPStore("127.0.0.1", _free_port(), world_size=1, is_master=True)
        device_id = torch.device("cuda", torch.cuda.current_device()) if device.type == "cuda" else None
        dist.init_process_group(backend, store=store, rank=0, world_size=1, timeout=timedelta(seconds=120),
                                device_id=device_id)
    try:
        expected = torch.arange(1024, dtype=torch.float32, device=device)
        reduced = expected.clone()
        dist.all_reduce(reduced)
        big = torch.ones(megabytes * 2**20 // 4, device=device)
        dist.all_reduce(big)
        _sync(device)
        seconds = _time(lambda: dist.all_reduce(big), device, 5)
        ok = bool(torch.equal(reduced, expected)) and bool((big == 1).all())
        return {
            "backend": backend,
            "world_size": dist.get_world_size(),
            "all_reduce_correct": ok,
            "all_reduce_mib": megabytes,
            "all_reduce_ms": seconds * 1e3,
            "nccl_version": _nccl_version() if backend == "nccl" else None,
        }
    finally:
        if created:
            dist.destroy_process_group()


def device_info(device: torch.device) -> Dict[str, Any]:
    info: Dict[str, Any] = {
        "device": str(device),
        "torch": torch.__version__,
        "python": platform.python_version(),
        "threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()),
    }
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name, capability=f"{props.major}.{props.minor}", memory_gib=round(props.total_memory / 2**30, 1),
            multiprocessors=props.multi_processor_count, cuda=torch.version.cuda,
        )
    return info


def format_table(record: Dict[str, Any]) -> str:
    info = record["device_info"]
    lines = [
        f"### Set interaction arch vs fp32 GEMM on {info.get('gpu', info['device'])} (torch {info['torch']})",
        "",
        "| batch | K | D | set arch fwd+bwd ms | set arch GFLOP/s | fp32 GEMM GFLOP/s | ratio | samples/s (arch) |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for row in record["interaction"]:
        lines.append(
            f"| {row['batch']} | {row['num_sets']} | {row['width']} | {row['interaction_ms']:.3f} | "
            f"{row['interaction_gflops']:,.1f} | {row['gemm_gflops']:,.1f} | {row['interaction_vs_gemm']:.2f} | "
            f"{row['interaction_samples_per_s']:,.0f} |"
        )
    ref = record["reference_gemm"]
    lines += ["", "Reference GEMM rates: " + ", ".join(f"{k} {v:,.1f}" for k, v in ref.items())]
    c = record["collective"]
    lines.append(
        f"{c['backend']} one-rank all-reduce: correct={c['all_reduce_correct']}, {c['all_reduce_mib']} MiB in "
        f"{c['all_reduce_ms']:.2f} ms" + (f" (NCCL {c['nccl_version']})" if c["nccl_version"] else "")
    )
    return "\n".join(lines)


def run(argv: Optional[Sequence[str]] = None) -> Dict[str, Any]:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", choices=["cuda", "cpu"])
    parser.add_argument("--batch-sizes", default="2048,16384,65536", help="comma-separated (default 2048,16384,65536)")
    parser.add_argument("--num-sets", type=int, default=4)
    parser.add_argument("--fields", type=int, default=39)
    parser.add_argument("--set-dim", type=int, default=10)
    parser.add_argument("--hidden", type=int, default=400)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=20, help="arch steps per timed round (GEMMs: 8x)")
    parser.add_argument("--all-reduce-mib", type=int, default=256)
    parser.add_argument("--quick", action="store_true", help="small shapes, few repetitions (smoke test)")
    parser.add_argument("--json", default=None, help="also write the result here")
    args = parser.parse_args(argv)
    if args.device == "cuda" and not torch.cuda.is_available():
        parser.error("--device cuda: no CUDA device is visible")
    batches: List[int] = [int(v) for v in args.batch_sizes.split(",") if v.strip()]
    if args.quick:
        batches, args.fields, args.hidden, args.rounds, args.iters, args.all_reduce_mib = [64], 6, 32, 2, 2, 1
    device = torch.device(args.device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
        torch.backends.cuda.matmul.allow_tf32 = False  # the comparison is fp32 throughout
        torch.backends.cudnn.allow_tf32 = False
    torch.manual_seed(0)
    record: Dict[str, Any] = {"device_info": device_info(device), "interaction": []}
    for batch in batches:
        record["interaction"].append(
            measure_interaction(device, batch, args.num_sets, args.fields, args.set_dim, args.hidden, args.layers,
                                args.rounds, args.iters)
        )
    record["reference_gemm"] = reference_gemm_rates(device, batches[0], args.fields * args.set_dim, args.iters * 8)
    record["collective"] = collective_check(device, args.all_reduce_mib)
    if device.type == "cuda":
        record["gpu_peak_allocated_bytes"] = int(torch.cuda.max_memory_allocated(device))
    print(format_table(record))
    if args.json:
        target = Path(args.json)
        tmp = target.with_name(target.name + ".tmp")
        tmp.write_text(json.dumps(record, indent=2) + "\n", encoding="utf-8")
        tmp.replace(target)
    return record


if __name__ == "__main__":
    run()
