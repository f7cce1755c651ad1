"""bf16 against fp32 with paired seeds: speed-up and quality.

For each seed, the same model is trained twice, ``--precision fp32`` and ``--precision bf16``, with the same seed (the
same initialisation, data order and dropout streams), so the runs differ only by the dense arches' compute precision.
Reports per seed the test AUC of both and their training throughput; the mean paired difference (bf16 - fp32) with
its 95% t-interval; and, as the yardstick, the spread of fp32's test AUC over the seeds (a precision change whose
effect is well inside that spread does not change what a user would conclude). Refuses to run on a CPU without
native bf16 (the trainer's own refusal). Every result carries the CPU facts. Run::

    multiembed synth --rows 600000 --scale 0.001 --out runs/data/synth-600k
    python -m multiembed.benchmarks.bench_precision --data runs/data/synth-600k --work /tmp/precision --seeds 5 \\
        --json runs/bench-precision.json
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

PRECISIONS = ("fp32", "bf16")


def _train(args: argparse.Namespace, run: Path, precision: str, seed: int) -> Dict[str, Any]:
    command = [
        sys.executable, "-m", "multiembed.cli", "train", "--data", str(args.data), "--out", str(run),
        "--model", args.model, "--batch-size", str(args.batch_size), "--hidden", str(args.hidden), "--epochs", "1",
        "--max-steps", str(args.steps), "--eval-every", str(args.steps), "--patience", "0", "--dropout", "0",
        "--sparse-lr", "0.1", "--lr", "3e-3", "--decay-steps", str(args.steps), "--device", "cpu", "--no-progress",
        "--seed", str(seed), "--precision", precision, "--ia-every", "0",
    ]
    started = time.perf_counter()
    done = subprocess.run(command, env=dict(os.environ), capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{' '.join(command)} failed ({done.returncode}):\n{done.stderr.strip()[-3000:]}")
    summary = json.loads((run / "summary.json").read_text(encoding="utf-8"))
    return {
        "precision": precision, "seed": seed, "test_auc": summary["test_auc"], "test_logloss": summary["test_logloss"],
        "samples_per_s": summary["samples_per_s"], "steps": summary["steps"], "wall_s": time.perf_counter() - started,
    }


def summarize(results: List[Dict[str, Any]]) -> Dict[str, Any]:
    """Paired bf16 - fp32 test AUC (mean, 95% t-interval), fp32's spread over seeds, and the throughput ratio; the
    pairing and the interval are the scaling study's (:func:`multiembed.analysis.scaling.paired_differences`).

    Example::

        >>> rows = [{"precision": p, "seed": s, "test_auc": a, "samples_per_s": r}
        ...         for s, (a32, a16) in enumerate([(0.70, 0.701), (0.71, 0.709), (0.72, 0.722)])
        ...         for p, a, r in (("fp32", a32, 100.0), ("bf16", a16, 150.0))]
        >>> out = summarize(rows)
        >>> round(out["auc_difference_mean"], 4), round(out["fp32_auc_std_over_seeds"], 3), out["speedup"]
        (0.0007, 0.01, 1.5)
    """
    from multiembed.analysis.scaling import mean_std, paired_differences

    rows = [{"backbone": "model", "scale": 1, "mode": r["precision"], "seed": int(r["seed"]),
             "test_auc": r["test_auc"]} for r in results]
    (paired,) = paired_differences(rows, "test_auc", 0.95, first="bf16", second="fp32")
    by_seed = {(r["precision"], int(r["seed"])): r for r in results}
    _, fp32_std = mean_std([by_seed["fp32", s]["test_auc"] for s in paired.seeds])
    speedups = sorted(by_seed["bf16", s]["samples_per_s"] / by_seed["fp32", s]["samples_per_s"] for s in paired.seeds)
    def number(value: Optional[float]) -> float:
        return float("nan") if value is None else value  # None: one pair, no spread or interval

    return {
        "pairs": paired.n, "auc_difference_mean": paired.mean, "auc_difference_std": number(paired.std),
        "auc_difference_interval": [number(paired.low), number(paired.high)],
        "fp32_auc_std_over_seeds": number(fp32_std),
        "speedup": speedups[len(speedups) // 2],
    }


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--data", required=True, type=Path, help="converted dataset (e.g. multiembed synth output)")
    p.add_argument("--work", required=True, type=Path, help="folder for the runs (created; must not exist)")
    p.add_argument("--json", default=None, help="also write the results here")
    p.add_argument("--model", default="dcnv2-me-4x")
    p.add_argument("--seeds", type=int, default=5)
    p.add_argument("--batch-size", type=int, default=2048)
    p.add_argument("--hidden", type=int, default=256)
    p.add_argument("--steps", type=int, default=230, help="training steps per run (one pass of 480k rows at 2048)")
    args = p.parse_args(argv)
    if args.seeds < 2:
        raise SystemExit("--seeds: at least 2 (the interval and the spread need two)")
    if args.work.exists():
        raise SystemExit(f"--work {args.work}: exists; give a new folder (nothing here deletes what it did not create)")
    from multiembed.benchmarks.machine import cpu_facts

    facts = cpu_facts()
    if not facts.get("mkldnn_bf16_supported"):
        raise SystemExit(f"this CPU has no native bf16 ({facts.get('cpu_capability')}): nothing to compare")
    args.work.mkdir(parents=True)
    results = []
    for seed in range(args.seeds):
        for precision in PRECISIONS:
            results.append(_train(args, args.work / f"{precision}-seed{seed}", precision, seed))
            r = results[-1]
            print(f"seed {seed} {precision}: test AUC {r['test_auc']:.5f}, {r['samples_per_s']:,.0f} samples/s",
                  file=sys.stderr)
    summary = summarize(results)
    low, high = summary["auc_difference_interval"]
    print(f"{'seed':>4} {'fp32 AUC':>9} {'bf16 AUC':>9} {'bf16-fp32':>10} {'speed-up':>9}")
    for seed in range(args.seeds):
        a, b = (next(r for r in results if r["seed"] == seed and r["precision"] == q) for q in PRECISIONS)
        print(f"{seed:>4} {a['test_auc']:9.5f} {b['test_auc']:9.5f} {b['test_auc'] - a['test_auc']:+10.5f} "
              f"{b['samples_per_s'] / a['samples_per_s']:9.2f}")
    print(f"bf16 - fp32 test AUC: {summary['auc_difference_mean']:+.5f} (95% interval [{low:+.5f}, {high:+.5f}]); "
          f"fp32 test AUC std over seeds {summary['fp32_auc_std_over_seeds']:.5f}; median speed-up "
          f"{summary['speedup']:.2f}x ({facts.get('cpu')}, {facts.get('cpu_capability')})")
    if args.json:
        record = {"argv": list(sys.argv[1:] if argv is None else argv), "machine": facts, "results": results,
                  "summary": summary}
        atomic_write_text(args.json, json.dumps(record, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
