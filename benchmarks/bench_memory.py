"""Memory per table row: bytes per embedding row (tables + optimizer state + training workspace), from the peak RSS
of short training runs at two table sizes, each in a fresh process (``multiembed bench --memory``).

Method
    For each contender and each of two sizes ``R1 < R2`` (rows per set, spread over Criteo's 39 fields as
    :func:`~multiembed.benchmarks.bench_train_workload.scaled_vocab_sizes`), a fresh Python process builds the
    model, trains
    ``steps`` steps on synthetic batches and reports its peak RSS (``VmHWM``, the high-water mark of its address
    space, so transient copies while the tables are built or the optimizer state is first created count too; not
    ``ru_maxrss``, which a child inherits from its parent at ``fork``). Everything that does not
    grow with the tables (interpreter, libraries, dense arches, activations) is the same at both sizes, so

        bytes per row = (peak(R2) - peak(R1)) / (rows(R2) - rows(R1)),

    where a *row* is one id of one field with all K of its sets (one row of every set). The intercept
    ``peak(R1) - slope * rows(R1)`` is the fixed part; the largest rows-per-set that fits a memory budget ``M`` is
    ``(M - intercept) / slope``.

Contenders
    * ``project``: the package's training step through :func:`multiembed.training.build.build_training` (DMP, fused
      FBGEMM optimizer, dense Adam), with the given sparse optimizer and table dtype. Stored width per set is ``d``
      padded to a multiple of 4 (10 -> 12). Per-row state: Adagrad keeps one fp32 sum per stored weight; row-wise
      Adagrad one fp32 per table row (the fused layout: one per field row, shared by its K sets).
    * ``savvy``: the plain model with ``nn.Embedding(sparse=True)`` + ``SparseAdam`` (two fp32 moments per weight,
      allocated whole at the first step) and fused dense Adam (:mod:`paper_baseline`); width ``d`` unpadded.

Run::

    .venv/bin/python -m multiembed.cli bench --model dcnv2-me-4x --memory --memory-rows 2000000,8000000 ...
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional, Sequence

GIB = 2**30

# The child prints its result on one line starting with this marker (library warnings may share stdout).
_RESULT_MARKER = "MULTIEMBED_MEMORY_RESULT "


@dataclasses.dataclass(frozen=True)
class MemoryProbeSpec:
    """One short training run whose peak RSS is measured (a JSON-able record; the child rebuilds it).

    Attributes:
        kind: ``project`` or ``savvy``.
        model: zoo name (``dcnv2-me-4x``).
        rows_per_set: rows per set (spread over the 39 Criteo-shaped fields).
        batch_size: rows per step.
        steps: training steps after the build.
        hidden, dropout: as the model.
        sparse_optimizer: ``project`` only: the fused table optimizer (``adagrad``, ``rowwise_adagrad``, ``sgd``).
        table_dtype: ``project`` only: ``fp32`` or ``fp16``.
        seed, id_exponent: batch and initialisation seeds, id skew (as the harness).
        threads: torch intra-op threads (0: torch's default).
    """

    kind: str
    model: str
    rows_per_set: int
    batch_size: int = 2048
    steps: int = 3
    hidden: int = 400
    dropout: float = 0.2
    sparse_optimizer: str = "adagrad"
    table_dtype: str = "fp32"
    seed: int = 0
    id_exponent: float = 3.0
    threads: int = 0

    @property
    def label(self) -> str:
        """The contender's name in the results (``savvy``, ``project adagrad fp32``, ...)."""
        if self.kind == "savvy":
            return "savvy"
        return f"project {self.sparse_optimizer} {self.table_dtype}"


def _peak_rss_bytes() -> int:
    from multiembed.benchmarks.machine import peak_rss_bytes

    return peak_rss_bytes()


def run_probe(spec: MemoryProbeSpec) -> Dict[str, Any]:
    """Builds and trains ``spec`` in this process; returns peak RSS after the build and after training (bytes).

    Meant for a fresh process (:func:`probe_in_subprocess`): the peak RSS is the process's whole-life high-water
    mark.
    """
    import torch

    from multiembed.benchmarks.bench_train_baseline import BaselineRunner
    from multiembed.benchmarks.bench_train_workload import make_batches, scaled_vocab_sizes

    if spec.threads:
        torch.set_num_threads(spec.threads)
    vocab = scaled_vocab_sizes(spec.rows_per_set)
    device = torch.device("cpu")
    batches = make_batches(vocab, spec.batch_size, 2, spec.seed, spec.id_exponent, device)
    started = time.perf_counter()
    result: Dict[str, Any] = {"rows_per_set_actual": sum(vocab.values())}
    if spec.kind == "project":
        from multiembed.config import TrainConfig
        from multiembed.training.build import build_training
        from multiembed.training.distributed import destroy, init_distributed

        ctx = init_distributed("cpu")
        try:
            config = TrainConfig(
                data="", model=spec.model, out="", hidden=spec.hidden, dropout=spec.dropout, seed=spec.seed,
                batch_size=spec.batch_size, device="cpu", sparse_optimizer=spec.sparse_optimizer,
                table_dtype=spec.table_dtype,
            )
            config.validate()
            built = build_training(config, vocab, num_dense=0, ctx=ctx, local_batch=spec.batch_size)
            result["peak_rss_after_build_bytes"] = _peak_rss_bytes()
            feed = (batches[i % len(batches)].batch for i in range(spec.steps))
            done = 0
            while True:
                try:
                    built.pipeline.progress(feed)
                except StopIteration:
                    break
                done += 1
            if done != spec.steps:
                raise RuntimeError(f"the pipeline ran {done} of {spec.steps} steps")
            result["table_bytes"] = int(built.model.embedding_bytes)
        finally:
            destroy()
    elif spec.kind == "savvy":
        runner = BaselineRunner(spec.model, vocab, device, spec.hidden, spec.dropout, spec.seed,
                                            kind="savvy")
        result["peak_rss_after_build_bytes"] = _peak_rss_bytes()
        runner.run(batches, spec.steps)
        result["table_bytes"] = sum(
            p.numel() * p.element_size() for p in runner.model.embeddings.parameters()
        )
    else:
        raise ValueError(f"unknown memory contender kind {spec.kind!r}; expected project or savvy")
    result["peak_rss_bytes"] = _peak_rss_bytes()
    result["seconds"] = time.perf_counter() - started
    return result


def probe_in_subprocess(spec: MemoryProbeSpec, timeout_s: float = 1800.0) -> Dict[str, Any]:
    """:func:`run_probe` in a fresh Python process (not part of any launcher's job: its rank variables are removed).

    Raises:
        RuntimeError: the child failed (its stderr tail is in the message).
    """
    env = {k: v for k, v in os.environ.items()
           if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT")}
    code = "import sys; from multiembed.benchmarks.bench_memory import _child_main; _child_main(sys.argv[1])"
    done = subprocess.run(
        [sys.executable, "-c", code, json.dumps(dataclasses.asdict(spec))], env=env, capture_output=True, text=True,
        timeout=timeout_s,
    )
    for line in done.stdout.splitlines():
        if line.startswith(_RESULT_MARKER):
            return json.loads(line[len(_RESULT_MARKER):])
    raise RuntimeError(
        f"memory probe {spec.label} at {spec.rows_per_set:,} rows per set failed (exit code {done.returncode}):\n"
        + done.stderr[-3000:]
    )


def _child_main(spec_json: str) -> None:
    spec = MemoryProbeSpec(**json.loads(spec_json))
    print(_RESULT_MARKER + json.dumps(run_probe(spec)), flush=True)


def bytes_per_row(points: Sequence[Dict[str, Any]], budget_bytes: int) -> Dict[str, Any]:
    """Slope, intercept and the largest rows-per-set within ``budget_bytes`` from two or more probe results.

    A least-squares line of peak RSS against rows (exact through two points).

    Example::

        >>> fit = bytes_per_row([{"rows_per_set_actual": 1000, "peak_rss_bytes": 600_000},
        ...                      {"rows_per_set_actual": 3000, "peak_rss_bytes": 1_400_000}], 2_000_000)
        >>> fit["bytes_per_row"], fit["fixed_bytes"], fit["max_rows_per_set"]
        (400.0, 200000.0, 4500)
    """
    xs = [float(p["rows_per_set_actual"]) for p in points]
    ys = [float(p["peak_rss_bytes"]) for p in points]
    if len(xs) < 2 or max(xs) == min(xs):
        raise ValueError("bytes per row needs probes at two or more different table sizes")
    mean_x, mean_y = sum(xs) / len(xs), sum(ys) / len(ys)
    slope = sum((x - mean_x) * (y - mean_y) for x, y in zip(xs, ys)) / sum((x - mean_x) ** 2 for x in xs)
    intercept = mean_y - slope * mean_x
    max_rows = int((budget_bytes - intercept) // slope) if slope > 0 else None
    return {"bytes_per_row": slope, "fixed_bytes": intercept, "max_rows_per_set": max_rows}


def measure_memory(
    specs: Sequence[MemoryProbeSpec], rows: Sequence[int], budget_gib: float, log: Optional[Any] = None
) -> Dict[str, Any]:
    """Probes every contender of ``specs`` (their ``rows_per_set`` is replaced) at every size of ``rows``, one fresh
    process each, and fits bytes per row.

    Returns:
        ``{"method": ..., "rows_per_set": [...], "budget_gib": ..., "contenders": {label: {"points": [...],
        "bytes_per_row": ..., "bytes_per_set_row": ..., "fixed_bytes": ..., "max_rows_per_set": ..., "assumes":
        ...}}, "ratio_vs_savvy": {label: ...}}``.
    """
    contenders: Dict[str, Dict[str, Any]] = {}
    budget = int(budget_gib * GIB)
    for spec in specs:
        points: List[Dict[str, Any]] = []
        for count in rows:
            sized = dataclasses.replace(spec, rows_per_set=int(count))
            if log is not None:
                log(f"bench: memory probe {spec.label}, {count:,} rows per set")
            points.append({"rows_per_set": int(count), **probe_in_subprocess(sized)})
        fit = bytes_per_row(points, budget)
        num_sets = _num_sets(spec.model)
        contenders[spec.label] = {
            "points": points,
            **fit,
            "bytes_per_set_row": fit["bytes_per_row"] / num_sets,
            "assumes": _assumptions(spec),
        }
    result: Dict[str, Any] = {
        "method": (
            "peak RSS (VmHWM) of a fresh process that builds the model and trains a few steps, at each table "
            "size; bytes per row = slope over rows per set (a row = one id of one field in all K sets)"
        ),
        "rows_per_set": [int(r) for r in rows],
        "budget_gib": budget_gib,
        "contenders": contenders,
    }
    if "savvy" in contenders:
        savvy = contenders["savvy"]["bytes_per_row"]
        result["ratio_vs_savvy"] = {
            label: (row["bytes_per_row"] / savvy if savvy > 0 else None)
            for label, row in contenders.items() if label != "savvy"
        }
    return result


def _num_sets(model: str) -> int:
    from multiembed.models import parse_model_name

    return parse_model_name(model).num_sets


def _assumptions(spec: MemoryProbeSpec) -> str:
    from multiembed.models import parse_model_name
    from multiembed.models.sparse_arch import padded_set_dim

    parsed = parse_model_name(spec.model)
    if spec.kind == "savvy":
        return (f"nn.Embedding(sparse=True) fp32, width {parsed.set_dim} (no padding); SparseAdam: two fp32 moments "
                "per weight; fused dense Adam")
    state = {
        "adagrad": "Adagrad: one fp32 sum per stored weight",
        "rowwise_adagrad": "row-wise Adagrad: one fp32 per table row (shared by the row's K sets)",
        "sgd": "SGD: no state",
    }.get(spec.sparse_optimizer, spec.sparse_optimizer)
    return (f"{spec.table_dtype} tables{' (no fp32 master copy)' if spec.table_dtype == 'fp16' else ''}, stored width "
            f"{padded_set_dim(parsed.set_dim)} per set (d = {parsed.set_dim} padded to a multiple of 4); {state}; "
            "dense Adam")


__all__ = ["MemoryProbeSpec", "bytes_per_row", "measure_memory", "probe_in_subprocess", "run_probe"]
