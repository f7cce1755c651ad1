"""The supported stacks side by side: the same measurements under each environment, in one window.

Each stack is an environment the Makefile builds (``make venv STACK=cpu`` -> ``.venv``, ``STACK=cpu-2.14`` ->
``.venv-cpu-2.14``). This script runs, under every stack in turn, in this order:

1. ``make train STACK=S`` into ``WORK/train-S`` on one shared synthetic log: test AUC and its gap to Bayes;
2. ``multiembed export`` of that run (int8 tables), then ``multiembed predict`` of every stack's artifact and
   ``multiembed evaluate`` of every stack's run with every stack (runs and artifacts move between stacks);
3. ``bench_predict`` of the stack's own artifact: batch 1 / 64 / 1024 latency and throughput on one thread;
4. ``multiembed bench`` (dcnv2-me-4x, batch 2048, package only), ``--bench-rounds`` times, the stacks interleaved;
5. the parity protocol's package side for ``--parity-model`` over ``--folds`` x ``--seeds`` (each stack a tag;
   every later stack paired with the first by fold and seed through the protocol's ``--baseline-tag``).

Writes ``--json`` (every figure, the commands, the machine) and prints a summary. Time it only on a quiet machine.

Example::

    python -m multiembed.benchmarks.compare_stacks --stacks cpu,cpu-2.14 --work runs/stacks \\
        --raw ../shared/data/criteo_dac_train_head10k.txt --json docs/results/stacks/stacks.json
"""

from __future__ import annotations

import argparse
import json
import os
import shlex
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Mapping, Sequence

import numpy as np
import pyarrow.parquet as pq

from multiembed.data.metadata import atomic_write_text
from multiembed.data.metrics import log_loss, roc_auc

ROOT = Path(__file__).resolve().parents[1]
BENCH_ARGS = ["--model", "dcnv2-me-4x", "--batch-size", "2048", "--rows-per-set", "1100000", "--steps", "20",
              "--no-scaling", "--no-layout-comparison", "--no-baseline", "--no-precision-comparison", "--no-progress"]


def venv_of(stack: str) -> Path:
    """The environment the Makefile builds for ``stack`` (``.venv`` for the default, ``.venv-STACK`` otherwise)."""
    return ROOT / (".venv" if stack == "cpu" else f".venv-{stack}")


def _run(command: Sequence[str], log: Path) -> float:
    """Runs ``command`` from the repository root with its output in ``log``; returns the wall seconds."""
    log.parent.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()
    print(f"$ {shlex.join(command)}", file=sys.stderr, flush=True)
    with open(log, "w", encoding="utf-8") as out:
        proc = subprocess.run(list(command), cwd=ROOT, stdout=out, stderr=subprocess.STDOUT)
    if proc.returncode != 0:
        tail = log.read_text(encoding="utf-8", errors="replace")[-3000:]
        raise RuntimeError(f"{shlex.join(command)} exited {proc.returncode} (log {log}):\n{tail}")
    return time.perf_counter() - started


def _read_json(path: Path) -> Any:
    return json.loads(path.read_text(encoding="utf-8"))


def _last_json_line(log: Path) -> Any:
    """The last line of ``log`` that is a JSON object (what ``multiembed evaluate`` prints on stdout)."""
    lines = [line for line in log.read_text(encoding="utf-8").splitlines() if line.startswith("{")]
    if not lines:
        raise RuntimeError(f"{log}: no JSON line")
    return json.loads(lines[-1])


def _versions(stack: str) -> Dict[str, str]:
    code = "import json, multiembed.runtime.stack as s; print(json.dumps(s.installed_versions()))"
    out = subprocess.run([str(venv_of(stack) / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    return json.loads(out)


def predictions_metrics(path: Path) -> Dict[str, float]:
    """AUC and log loss of a ``multiembed predict`` Parquet file (columns ``prob`` and ``label``)."""
    table = pq.read_table(path, columns=["prob", "label"])
    probs = table.column("prob").to_numpy().astype(np.float64)
    labels = table.column("label").to_numpy().astype(np.float64)
    return {"auc": roc_auc(labels, probs), "logloss": log_loss(labels, probs), "rows": int(len(labels))}


def train_and_export(stack: str, work: Path, data: Path, rows: int) -> Dict[str, Any]:
    """``make train`` for ``stack`` into ``WORK/train-STACK``, then an int8 export of it."""
    run_dir, artifact = work / f"train-{stack}", work / f"artifact-{stack}"
    command = ["make", "train", f"STACK={stack}", f"TRAIN_ROWS={rows}", f"TRAIN_DATA={data}", f"TRAIN_RUN={run_dir}"]
    wall = _run(command, work / "logs" / f"train-{stack}.log")
    summary = _read_json(run_dir / "summary.json")
    exporter = str(venv_of(stack) / "bin" / "multiembed")
    _run([exporter, "export", str(run_dir), "--out", str(artifact), "--quantize", "int8", "--overwrite"],
         work / "logs" / f"export-{stack}.log")
    return {
        "command": shlex.join(command),
        "wall_s": wall,
        "test_auc": summary["test_auc"],
        "test_logloss": summary.get("test_logloss"),
        "bayes_test_auc": summary.get("bayes_test_auc"),
        "gap_to_bayes": summary["bayes_test_auc"] - summary["test_auc"] if "bayes_test_auc" in summary else None,
        "run_dir": str(run_dir),
        "artifact": str(artifact),
    }


def cross_stack(stacks: Sequence[str], work: Path, data: Path) -> List[Dict[str, Any]]:
    """Every stack evaluates every stack's run and predicts with every stack's artifact (test split)."""
    rows = []
    for runner in stacks:
        cli = str(venv_of(runner) / "bin" / "multiembed")
        for made_by in stacks:
            log = work / "logs" / f"evaluate-{made_by}-by-{runner}.log"
            _run([cli, "evaluate", str(work / f"train-{made_by}"), "--data", str(data)], log)
            evaluated = _last_json_line(log)
            predictions = work / f"predict-{made_by}-by-{runner}.parquet"
            predictions.unlink(missing_ok=True)
            _run([cli, "predict", str(work / f"artifact-{made_by}"), "--data", str(data), "--out", str(predictions)],
                 work / "logs" / f"predict-{made_by}-by-{runner}.log")
            rows.append({"made_by": made_by, "run_by": runner,
                         "evaluate_test_auc": evaluated["test_auc"],
                         "predict": predictions_metrics(predictions)})
    return rows


def bench_predict(stack: str, work: Path, data: Path) -> Dict[str, Any]:
    out = work / f"bench-predict-{stack}.json"
    _run([str(venv_of(stack) / "bin" / "python"), "-m", "multiembed.benchmarks.bench_predict", "--artifacts",
          str(work / f"artifact-{stack}"), "--data", str(data), "--json", str(out)],
         work / "logs" / f"bench-predict-{stack}.log")
    return {"json": out.name, "results": _read_json(out)["results"]}


def bench_train(stack: str, work: Path, round_index: int) -> Dict[str, Any]:
    out = work / f"bench-{stack}-{round_index}.json"
    command = [str(venv_of(stack) / "bin" / "multiembed"), "bench", *BENCH_ARGS, "--json", str(out)]
    _run(command, work / "logs" / f"bench-{stack}-{round_index}.log")
    record = _read_json(out)
    return {"round": round_index, "samples_per_s": record["samples_per_s"], "step_ms": 2048 / record["samples_per_s"]
            * 1e3, "load_average": [record["conditions"]["load_average_start"][0],
                                     record["conditions"]["load_average_end"][0]]}


def parity(stacks: Sequence[str], work: Path, raw: Path, model: str, folds: int, seeds: int) -> Dict[str, Any]:
    """The protocol's package side under each stack; later stacks are paired with the first by fold and seed."""
    records = {}
    for i, stack in enumerate(stacks):
        out = work / f"parity-{stack}.json"
        command = [str(venv_of(stack) / "bin" / "python"), "-m", "multiembed.benchmarks.parity", "--raw", str(raw),
                   "--work", str(work / "parity"), "--models", model, "--seeds", str(seeds), "--folds", str(folds),
                   "--sides", "package", "--tag", f"stack-{stack}", "--json", str(out)]
        if i:
            command += ["--baseline-tag", f"stack-{stacks[0]}"]
        _run(command, work / "logs" / f"parity-{stack}.log")
        record = _read_json(out)
        aucs = [r["test_auc"] for r in record["runs"]]
        records[stack] = {"runs": len(aucs), "mean_test_auc": float(np.mean(aucs)), "effects": record["effects"]}
    return records


def machine_facts(stack: str) -> Dict[str, Any]:
    code = "import json; from multiembed.benchmarks.machine import cpu_facts; print(json.dumps(cpu_facts()))"
    out = subprocess.run([str(venv_of(stack) / "bin" / "python"), "-c", code], capture_output=True, text=True,
                         check=True, cwd=ROOT).stdout
    return {**json.loads(out), "load_average_start": list(os.getloadavg())}


def summary_lines(record: Mapping[str, Any]) -> List[str]:
    """The printed summary: one line per measurement and stack."""
    lines = []
    for stack, train in record.get("train", {}).items():
        lines.append(f"[train] {stack}: test AUC {train['test_auc']:.5f}, gap to Bayes {train['gap_to_bayes']:.5f}, "
                     f"{train['wall_s']:.0f} s")
    for row in record.get("cross_stack", []):
        lines.append(f"[cross] made by {row['made_by']}, run by {row['run_by']}: evaluate AUC "
                     f"{row['evaluate_test_auc']:.6f}, predict AUC {row['predict']['auc']:.6f}")
    for stack, bench in record.get("bench_predict", {}).items():
        for row in bench["results"]:
            compiled = "compiled, " if row.get("compiled") else ""
            lines.append(f"[predict] {stack}: {compiled}batch {row['batch']}: p50 {row['p50_ms']:.3f} ms, p99 "
                         f"{row['p99_ms']:.3f} ms, {row['predictions_per_s_per_core']:.0f} pred/s/core")
    for stack, rounds in record.get("bench", {}).items():
        lines.append(f"[bench] {stack}: " + ", ".join(f"{r['samples_per_s']:.0f}" for r in rounds) + " samples/s")
    for stack, result in record.get("parity", {}).items():
        effects = "; ".join(f"{e['metric']} {e['diff']['mean']:+.5f} [{e['diff']['ci95'][0]:+.5f}, "
                            f"{e['diff']['ci95'][1]:+.5f}] over {e['pairs']} pairs" for e in result["effects"])
        lines.append(f"[parity] {stack}: {result['runs']} runs, mean test AUC {result['mean_test_auc']:.5f}"
                     + (f"; vs first stack: {effects}" if effects else ""))
    return lines


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--stacks", default="cpu,cpu-2.14", help="comma-separated Makefile STACKs (the first is the base)")
    p.add_argument("--work", type=Path, required=True, help="work directory (runs, artifacts, logs)")
    p.add_argument("--raw", type=Path, required=True, help="Criteo train.txt rows for the parity protocol")
    p.add_argument("--json", type=Path, required=True, help="where to write the record")
    p.add_argument("--bench-rounds", type=int, default=2)
    p.add_argument("--parity-model", default="dcnv2-se-1x")
    p.add_argument("--folds", type=int, default=5)
    p.add_argument("--seeds", type=int, default=3)
    p.add_argument("--train-rows", type=int, default=2_000_000, help="rows of make train's synthetic log")
    args = p.parse_args(argv)
    stacks = [s.strip() for s in args.stacks.split(",") if s.strip()]
    missing = [s for s in stacks if not (venv_of(s) / "bin" / "python").exists()]
    if len(stacks) < 2 or missing:
        p.error(f"--stacks: need two or more built environments; missing {missing} (run `make venv STACK=...`)")
    work = args.work.resolve()
    data = work / f"synth-{args.train_rows}"
    started = time.perf_counter()
    record: Dict[str, Any] = {
        "command": shlex.join([sys.executable, "-m", "multiembed.benchmarks.compare_stacks",
                               *(sys.argv[1:] if argv is None else argv)]),
        "commit": subprocess.run(["git", "rev-parse", "HEAD"], cwd=ROOT, capture_output=True, text=True).stdout.strip(),
        "stacks": {s: _versions(s) for s in stacks},
        "machine": machine_facts(stacks[0]),
    }
    if not (data / "metadata.json").exists():
        _run([str(venv_of(stacks[0]) / "bin" / "multiembed"), "synth", "--rows", str(args.train_rows), "--scale",
              "0.001", "--out", str(data)], work / "logs" / "synth.log")
    record["train"] = {s: train_and_export(s, work, data, args.train_rows) for s in stacks}
    record["cross_stack"] = cross_stack(stacks, work, data)
    record["bench_predict"] = {s: bench_predict(s, work, data) for s in stacks}
    record["bench"] = {s: [] for s in stacks}
    for round_index in range(args.bench_rounds):
        for s in stacks:
            record["bench"][s].append(bench_train(s, work, round_index))
    record["parity"] = parity(stacks, work, args.raw.resolve(), args.parity_model, args.folds, args.seeds)
    record["wall_s"] = time.perf_counter() - started
    record["load_average_end"] = list(os.getloadavg())
    atomic_write_text(args.json, json.dumps(record, indent=1) + "\n")
    print("\n".join(summary_lines(record)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
