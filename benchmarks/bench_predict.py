"""Serving speed of exported artifacts: predictions per second per core and p50 / p99 latency at batch 1, 64 and
1024, fp32 and int8 tables, in one run (``multiembed.benchmarks.bench_predict``).

Each artifact is loaded with :func:`multiembed.serving.load_artifact` and called on batches of one converted split
(features prepared beforehand: the figures are the model, not the loader). Latency is the wall time of one model
call under ``torch.inference_mode()``; throughput is rows per second divided by the intra-op threads torch uses.
The JSON records the CPU model and capabilities (``torch.backends.cpu.get_cpu_capability()``,
``torch.ops.mkldnn._is_mkldnn_bf16_supported()``), the thread count and the load average.

Example::

    python -m multiembed.benchmarks.bench_predict --artifacts runs/me4x.none runs/me4x.int8 --data DATA \\
        --json runs/bench_predict.json
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Sequence

import numpy as np
import torch

from multiembed.data.loader import ParquetBatchLoader
from multiembed.serving import ServingArtifact, load_artifact

BATCH_SIZES = (1, 64, 1024)


def cpu_facts() -> Dict[str, Any]:
    """CPU model, torch's CPU capability, native bf16 support, threads and load average."""
    model = platform.processor() or "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        bf16 = False
    return {
        "cpu": model,
        "cpu_count": os.cpu_count(),
        "cpu_capability": torch.backends.cpu.get_cpu_capability(),
        "mkldnn_bf16_supported": bf16,
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
    }


def time_artifact(artifact: ServingArtifact, batches: Sequence[Any], min_calls: int, min_seconds: float) -> Dict[str, float]:
    """Calls the model on ``batches`` round-robin (after 3 warm-up calls) until both minimums are met."""
    model = artifact.model
    latencies: List[float] = []
    rows = 0
    with torch.inference_mode():
        for batch in batches[:3]:
            model(batch.dense_features, batch.sparse_features)
        start = time.perf_counter()
        i = 0
        while len(latencies) < min_calls or time.perf_counter() - start < min_seconds:
            batch = batches[i % len(batches)]
            t0 = time.perf_counter()
            model(batch.dense_features, batch.sparse_features)
            latencies.append(time.perf_counter() - t0)
            rows += batch.dense_features.shape[0]
            i += 1
        total = time.perf_counter() - start
    ms = np.array(latencies) * 1e3
    per_second = rows / total
    return {
        "calls": len(latencies),
        "predictions_per_s": per_second,
        "predictions_per_s_per_core": per_second / torch.get_num_threads(),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", nargs="+", required=True, help="artifact directories (e.g. none and int8)")
    parser.add_argument("--data", required=True, help="converted dataset with the artifacts' vocabulary")
    parser.add_argument("--split", default="test")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--min-calls", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the per-core figure without OpenMP barrier waits, "
                             "which dominate on a shared, loaded machine)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    artifacts = [load_artifact(a) for a in args.artifacts]
    results: Dict[str, Any] = {"machine": cpu_facts(), "data": args.data, "split": args.split, "results": []}
    for size in sizes:
        loader = ParquetBatchLoader(args.data, args.split, size, last_batch="drop",
                                    use_dense=bool(artifacts[0].manifest.dense_fields), prefetch=0)
        batches = list(loader)[:64]
        if not batches:
            raise ValueError(f"{args.data}: split {args.split!r} has fewer than {size} rows")
        for artifact in artifacts:
            figures = time_artifact(artifact, batches, args.min_calls if size < 1024 else 30, args.min_seconds)
            row = {"artifact": str(artifact.directory), "model": artifact.manifest.model,
                   "tables": artifact.manifest.quantize, "batch": size, **figures}
            results["results"].append(row)
            print(f"{row['model']:>14} {row['tables']:>5} batch {size:>5}: {row['predictions_per_s_per_core']:>10,.0f} "
                  f"pred/s/core  p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms", file=sys.stderr)
    results["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
