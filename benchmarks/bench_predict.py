"""Serving speed of exported artifacts, interpreted and compiled: predictions per second per core, p50 / p99
latency at batch 1, 64 and 1024, the fraction of the FLOP limit, and the raw-line tokenisation and table lookup at
batch 1 (``multiembed.benchmarks.bench_predict``).

Each artifact is loaded twice with :func:`multiembed.serving.load_artifact`: as exported (the dense program
interpreted) and with ``compile=True`` (AOTInductor, :mod:`multiembed.serving.compiled`; ``--no-compile`` leaves
these rows out). Both are called on the same batches of one converted split (features prepared beforehand: the
figures are the model, not the loader). Latency is the wall time of one whole :meth:`ServingArtifact.predict` call,
ids to probabilities; throughput is rows per second divided by the intra-op threads torch uses.

The FLOP limit of a row is the fastest the model could run on this core: the single-core fp32 GEMM rate measured
in the same run (:func:`gemm_rate`) over the dense program's forward FLOPs per prediction (``torch.utils.
flop_counter``; the table lookup counts none). ``flop_fraction`` is the row's predictions per second per core over
that limit. With ``--raw`` (lines of the artifact's raw format), the tokenisation of one line (parse, vocabulary,
features: :meth:`multiembed.serving.predict.RawLineEncoder.features`, what a server calls per request and
``predict --raw`` does for short chunks) and the table lookup of one row are timed separately, each as a fraction
of the batch-1 p50 of every artifact's rows.

The JSON records the machine (:func:`multiembed.benchmarks.machine.cpu_facts`, threads, load average), the GEMM
rate, every row and the issue's targets for the compiled rows (:data:`TARGETS`) with whether each held.

Example::

    python -m multiembed.benchmarks.bench_predict --artifacts runs/me4x.none runs/me4x.int8 --data DATA \\
        --raw day_23.tsv --json docs/results/serving/predict.json
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import numpy as np
import torch

from multiembed.benchmarks.machine import cpu_facts
from multiembed.data.formats import RawFormat
from multiembed.data.loader import ParquetBatchLoader
from multiembed.data.metadata import atomic_write_text
from multiembed.data.rawlog import open_source, row_layout
from multiembed.serving import ServingArtifact, load_artifact
from multiembed.serving.artifact import dense_input_shapes
from multiembed.serving.predict import RawLineEncoder

BATCH_SIZES = (1, 64, 1024)
# The compiled rows' targets: batch-1 latency ceilings (ms), FLOP-limit floors per batch size, and the ceiling of
# the tokenisation and the table lookup as fractions of the batch-1 p50.
TARGETS: Dict[str, Any] = {
    "batch_1_p50_ms": 0.6, "batch_1_p99_ms": 1.2, "flop_fraction": {"64": 0.65, "1024": 0.7}, "stage_fraction": 0.25,
}
GEMM_SIZE = 1024


def machine_facts() -> Dict[str, Any]:
    """:func:`~multiembed.benchmarks.machine.cpu_facts` plus torch's threads and version and the load average."""
    return {
        **cpu_facts(),
        "torch_threads": torch.get_num_threads(),
        "load_average": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
        "torch": torch.__version__,
    }


def latencies_ms(call: Callable[[int], Any], count: int, min_calls: int, min_seconds: float) -> np.ndarray:
    """Wall times (ms) of ``call(i)`` over inputs ``i`` round-robin in ``range(count)``, after 3 warm-up calls,
    until both ``min_calls`` calls and ``min_seconds`` seconds are reached."""
    for i in range(3):
        call(i % count)
    out: List[float] = []
    start = time.perf_counter()
    i = 0
    while len(out) < min_calls or time.perf_counter() - start < min_seconds:
        t0 = time.perf_counter()
        call(i % count)
        out.append(time.perf_counter() - t0)
        i += 1
    return np.array(out) * 1e3


def time_predict(
    artifact: ServingArtifact, batches: Sequence[Any], min_calls: int, min_seconds: float
) -> Dict[str, float]:
    """Latency and throughput of the whole predict call (ids to probabilities) on ``batches`` round-robin."""
    ms = latencies_ms(lambda i: artifact.predict(batches[i].dense_features, batches[i].sparse_features),
                      len(batches), min_calls, min_seconds)
    rows = sum(batches[i % len(batches)].dense_features.shape[0] for i in range(len(ms)))
    per_second = float(rows / (ms.sum() / 1e3))
    return {
        "calls": int(len(ms)),
        "predictions_per_s": per_second,
        "predictions_per_s_per_core": per_second / torch.get_num_threads(),
        "p50_ms": float(np.percentile(ms, 50)),
        "p99_ms": float(np.percentile(ms, 99)),
    }


def gemm_rate(size: int = GEMM_SIZE, repeats: int = 10) -> float:
    """The fp32 GEMM rate (FLOP/s per core) of the best of ``repeats`` ``[size, size] @ [size, size]`` products on
    torch's intra-op threads."""
    a, b = torch.randn(size, size), torch.randn(size, size)
    out = torch.empty(size, size)
    torch.mm(a, b, out=out)
    best = min(_timed(lambda: torch.mm(a, b, out=out)) for _ in range(repeats))
    return 2.0 * size**3 / best / torch.get_num_threads()


def _timed(call: Callable[[], Any]) -> float:
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def flops_per_prediction(artifact: ServingArtifact, batch: int = 64) -> float:
    """Forward FLOPs of the artifact's dense program per prediction (``FlopCounterMode`` on a ``batch``-row call of
    the interpreted program; the table lookup counts none)."""
    from torch.utils.flop_counter import FlopCounterMode

    shapes = dense_input_shapes(artifact.manifest)
    inputs = [torch.randn(batch, *sizes) for sizes in shapes.values()]
    with torch.inference_mode(), FlopCounterMode(display=False) as counter:
        artifact.model.dense(*inputs)
    return counter.get_total_flops() / batch


def raw_lines(fmt: RawFormat, path: str, count: int) -> List[Tuple[int, bytes]]:
    """``(line number, line)`` of the first ``count`` data lines of a raw file of format ``fmt``."""
    out: List[Tuple[int, bytes]] = []
    with open_source(path) as f:
        if fmt.header:
            f.readline()
        for row, line in enumerate(f):
            if row == count:
                break
            out.append((row + 1 + int(fmt.header), line))
    if not out:
        raise ValueError(f"{path}: no data lines")
    return out


def time_stages(artifact: ServingArtifact, raw: Optional[str], batch_1: Sequence[Any], min_calls: int,
                min_seconds: float) -> Dict[str, Any]:
    """p50 / p99 (ms) at batch 1 of the tokenisation of one raw line (:meth:`RawLineEncoder.features`: parse,
    vocabulary, features; None without ``raw``) and of the table lookup of one row."""
    model = artifact.model

    def lookup(i: int) -> None:
        with torch.inference_mode():
            model.sparse_arch(batch_1[i].sparse_features)

    stages = {"tokenise": None, "lookup": _percentiles(latencies_ms(lookup, len(batch_1), min_calls, min_seconds))}
    if raw is not None:
        encoder = RawLineEncoder(artifact, source=raw)
        fmt = row_layout(raw, encoder.format)
        lines = raw_lines(fmt, raw, 64)

        def tokenise(i: int) -> None:
            number, line = lines[i]
            encoder.features([line], first_line=number)

        stages["tokenise"] = _percentiles(latencies_ms(tokenise, len(lines), min_calls, min_seconds))
    return stages


def _percentiles(ms: np.ndarray) -> Dict[str, float]:
    return {"calls": int(len(ms)), "p50_ms": float(np.percentile(ms, 50)), "p99_ms": float(np.percentile(ms, 99))}


def check_targets(rows: Sequence[Dict[str, Any]], stages: Dict[str, Any]) -> List[Dict[str, Any]]:
    """Every target of :data:`TARGETS` for each compiled artifact: ``{"artifact", "target", "limit", "value",
    "held"}``."""
    out: List[Dict[str, Any]] = []
    for row in rows:
        if not row["compiled"]:
            continue
        checks = []
        if row["batch"] == 1:
            checks += [("batch 1 p50 ms <=", TARGETS["batch_1_p50_ms"], row["p50_ms"]),
                       ("batch 1 p99 ms <=", TARGETS["batch_1_p99_ms"], row["p99_ms"])]
            for stage, figures in stages.get(row["artifact"], {}).items():
                if figures is not None:
                    checks.append((f"{stage} p50 / batch 1 p50 <", TARGETS["stage_fraction"],
                                   figures["p50_ms"] / row["p50_ms"]))
        floor = TARGETS["flop_fraction"].get(str(row["batch"]))
        if floor is not None:
            checks.append((f"batch {row['batch']} flop fraction >=", floor, row["flop_fraction"]))
        for target, limit, value in checks:
            held = value >= limit if ">=" in target else (value <= limit if "<=" in target else value < limit)
            out.append({"artifact": row["artifact"], "target": target, "limit": limit, "value": float(value),
                        "held": bool(held)})
    return out


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--artifacts", nargs="+", required=True, help="artifact directories (e.g. none and int8)")
    parser.add_argument("--data", required=True, help="converted dataset with the artifacts' vocabulary")
    parser.add_argument("--split", default="test")
    parser.add_argument("--raw", default=None,
                        help="raw lines of the artifacts' format: times predict --raw's tokenisation of one line")
    parser.add_argument("--batch-sizes", default=",".join(map(str, BATCH_SIZES)))
    parser.add_argument("--min-calls", type=int, default=200)
    parser.add_argument("--min-seconds", type=float, default=3.0)
    parser.add_argument("--threads", type=int, default=1,
                        help="torch intra-op threads (default 1: the per-core figure without OpenMP barrier waits, "
                             "which dominate on a shared, loaded machine)")
    parser.add_argument("--no-compile", action="store_true", help="leave out the compiled rows")
    parser.add_argument("--compile-cache", default=None, help="cache of compiled programs (see multiembed predict)")
    parser.add_argument("--json", default=None, help="write the results here")
    args = parser.parse_args(argv)
    if args.threads < 1:
        raise ValueError(f"--threads must be >= 1, got {args.threads}")
    if args.min_calls < 1 or args.min_seconds < 0:
        raise ValueError("--min-calls must be >= 1 and --min-seconds >= 0")
    torch.set_num_threads(args.threads)
    sizes = [int(s) for s in args.batch_sizes.split(",")]
    variants = [(a, False) for a in args.artifacts]
    if not args.no_compile:
        variants += [(a, True) for a in args.artifacts]
    loaded = [(load_artifact(a, compile=c, cache_dir=args.compile_cache if c else None), c) for a, c in variants]
    results: Dict[str, Any] = {"machine": machine_facts(), "data": args.data, "split": args.split, "raw": args.raw,
                               "gemm_flops_per_s_per_core": gemm_rate(), "results": []}
    flops = {str(a.directory): flops_per_prediction(a) for a, c in loaded if not c}
    results["flops_per_prediction"] = flops
    results["compile_seconds"] = {str(a.directory): a.compiled.compile_seconds for a, c in loaded if c and a.compiled}
    batch_1: List[Any] = []
    for size in sizes:
        loader = ParquetBatchLoader(args.data, args.split, size, last_batch="drop",
                                    use_dense=bool(loaded[0][0].manifest.dense_fields), prefetch=0)
        batches = list(loader)[:64]
        if not batches:
            raise ValueError(f"{args.data}: split {args.split!r} has fewer than {size} rows")
        if size == 1:
            batch_1 = batches
        for artifact, compiled in loaded:
            figures = time_predict(artifact, batches, args.min_calls if size < 1024 else 30, args.min_seconds)
            limit = results["gemm_flops_per_s_per_core"] / flops[str(artifact.directory)]
            row = {"artifact": str(artifact.directory), "model": artifact.manifest.model, "compiled": compiled,
                   "tables": artifact.manifest.quantize, "batch": size, **figures,
                   "flop_limit_predictions_per_s_per_core": limit,
                   "flop_fraction": figures["predictions_per_s_per_core"] / limit}
            results["results"].append(row)
            print(f"{row['model']:>14} {row['tables']:>5} {'compiled' if compiled else 'exported':>8} batch {size:>5}: "
                  f"{row['predictions_per_s_per_core']:>10,.0f} pred/s/core ({row['flop_fraction']:.2f} of the FLOP "
                  f"limit)  p50 {row['p50_ms']:8.3f} ms  p99 {row['p99_ms']:8.3f} ms", file=sys.stderr)
    stages: Dict[str, Any] = {}
    if batch_1:
        for artifact, compiled in loaded:
            if not compiled:
                stages[str(artifact.directory)] = time_stages(artifact, args.raw, batch_1, args.min_calls,
                                                              args.min_seconds)
                for stage, figures in stages[str(artifact.directory)].items():
                    if figures is not None:
                        print(f"{artifact.manifest.model:>14} {artifact.manifest.quantize:>5} {stage:>8} batch     1: "
                              f"p50 {figures['p50_ms']:8.3f} ms  p99 {figures['p99_ms']:8.3f} ms", file=sys.stderr)
    results["stages"] = stages
    results["targets"] = check_targets(results["results"], stages)
    for check in results["targets"]:
        print(f"target {check['artifact']}: {check['target']} {check['limit']}: {check['value']:.3f} "
              f"{'held' if check['held'] else 'MISSED'}", file=sys.stderr)
    results["machine"]["load_average_after"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        atomic_write_text(args.json, json.dumps(results, indent=2) + "\n")
    print(json.dumps(results["results"]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
