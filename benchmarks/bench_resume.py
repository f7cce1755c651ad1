"""Final quality of runs resumed on another world size, next to the uninterrupted run (final AUCs are compared in
a benchmark, not a test).

Three runs of the same model, data, seed and global batch, each through ``torchrun`` (what the torchx component
runs), 2 gloo ranks or 1 process:

* ``uninterrupted``: 2 ranks, ``--max-steps TOTAL``;
* ``2->1``: 2 ranks to ``--max-steps FIRST``, then resumed on 1 rank to ``TOTAL``;
* ``1->2``: 1 rank to ``FIRST``, then resumed on 2 ranks to ``TOTAL``.

The global batches are the same rows in every run (``multiembed.data.loader``), so the runs differ only by summation
order and, after a resume, by the dropout streams of ranks new to the job. Prints the test AUC / log loss of each
and writes JSON with the CPU facts. Run::

    python -m multiembed.benchmarks.bench_resume --data DATA --work /tmp/resume --json runs/bench-resume.json
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from multiembed.data.metadata import atomic_write_text


def _train(ranks: int, args: argparse.Namespace, run: Path, max_steps: int, resume: bool) -> None:
    launcher = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks)]
    command = [
        *launcher, "-m", "multiembed.cli", "train", "--data", str(args.data), "--out", str(run), "--model", args.model,
        "--batch-size", str(args.batch_size), "--hidden", str(args.hidden), "--epochs", "100",
        "--max-steps", str(max_steps), "--eval-every", str(args.eval_every), "--patience", "0", "--device", "cpu",
        "--no-progress", "--seed", str(args.seed), *(["--resume"] if resume else []),
    ]
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run(command, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr[-3000:]}")


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="converted dataset (e.g. multiembed synth output)")
    p.add_argument("--work", required=True, type=Path, help="folder for the three runs (created; must not exist)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--model", default="dcnv2-me-4x")
    p.add_argument("--batch-size", type=int, default=1024)
    p.add_argument("--hidden", type=int, default=128)
    p.add_argument("--first", type=int, default=60, help="steps before the interruption (default 60)")
    p.add_argument("--total", type=int, default=180, help="steps of every run (default 180)")
    p.add_argument("--eval-every", type=int, default=60)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    if args.work.exists():
        raise SystemExit(f"--work {args.work}: exists; give a new folder (nothing here deletes what it did not create)")
    args.work.mkdir(parents=True)
    from multiembed.benchmarks.machine import cpu_facts

    plans = {"uninterrupted": [(2, args.total)], "2->1": [(2, args.first), (1, args.total)],
             "1->2": [(1, args.first), (2, args.total)]}
    results: List[Dict[str, Any]] = []
    for name, legs in plans.items():
        run = args.work / name.replace("->", "-to-")
        started = time.perf_counter()
        for i, (ranks, steps) in enumerate(legs):
            _train(ranks, args, run, steps, resume=i > 0)
        summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
        results.append({
            "run": name, "test_auc": summary["test_auc"], "test_logloss": summary["test_logloss"],
            "val_auc": summary["val_auc"], "steps": summary["steps"], "wall_s": time.perf_counter() - started,
        })
    reference = results[0]
    print(f"{'run':<14} {'test AUC':>9} {'vs uninterrupted':>17} {'test log loss':>14} {'steps':>6}")
    for r in results:
        print(f"{r['run']:<14} {r['test_auc']:9.5f} {r['test_auc'] - reference['test_auc']:+17.5f} "
              f"{r['test_logloss']:14.5f} {r['steps']:6d}")
    if args.json:
        record = {"argv": list(sys.argv[1:] if argv is None else argv), "machine": cpu_facts(), "results": results}
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
