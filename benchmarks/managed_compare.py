"""Managed collision against hashing at the same table rows, on the drifting synthetic log (docs/managed.md).

Writes the drifting log of docs/days.md twice with the same rows, labels and click model: its ids as managed keys
(``synth --days D --vocab managed``) and hashed into ``--table-rows`` rows (``--vocab hashing --hash-size``). Then
runs the production loop (``multiembed days``, one process, CPU) for every model x seed on both: hashing runs train
on the hashed ids, managed runs on the keys with ``--vocab managed --table-rows`` (same rows per table).
``--intervals`` adds managed runs of the first model at other eviction intervals (AUC against the interval).

Every day line of every run goes to the CSV (``--csv``); the JSON (``--json``) holds the runs, the options and the
per-arm means. Run::

    python -m multiembed.benchmarks.managed_compare --work /tmp/mc-study --days 4 --rows 20000 --scale 0.001 \\
        --churn 0.05 --table-rows 32 --models dnn-me-2x,dnn-se-2x --seeds 0,1,2 --interval 5 --intervals 1,20,60 \\
        --json docs/results/managed/managed.json --csv docs/results/managed/days.csv

(docs/results/managed/README.md holds what it measured.)
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from multiembed.config.options import DEFAULT_EVICTION_INTERVAL
from multiembed.data.metadata import atomic_write_text
from multiembed.data.synthetic.days import day_dirs

COLUMNS = ("arm", "vocab", "model", "seed", "eviction_interval", "day", "pv_auc", "auc_after", "bayes_pv_auc",
           "new_ids", "managed_pv_fallback_share", "managed_train_fallback_share", "managed_rows_in_use",
           "managed_evictions")


def _cli(args: List[str]) -> None:
    """Runs ``multiembed ARGS`` in its own process (one intra-op thread); its output goes to this one's stderr."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    done = subprocess.run([sys.executable, "-m", "multiembed.cli", *args], env=env, stdout=sys.stderr)
    if done.returncode != 0:
        raise RuntimeError(f"multiembed {' '.join(args)} failed with status {done.returncode}")


def _days(log: Path, days: int) -> List[str]:
    return [str(p) for p in day_dirs(log, days)]


def run(args: argparse.Namespace) -> Dict[str, Any]:
    work: Path = args.work
    logs = {"managed": work / "log-managed", "hashing": work / "log-hashing"}
    common = ["--days", str(args.days), "--rows", str(args.rows), "--scale", str(args.scale), "--churn",
              str(args.churn), "--seed", str(args.data_seed), "--no-progress"]
    _cli(["synth", *common, "--out", str(logs["managed"]), "--vocab", "managed"])
    _cli(["synth", *common, "--out", str(logs["hashing"]), "--vocab", "hashing", "--hash-size", str(args.table_rows)])
    train = ["--batch-size", str(args.batch_size), "--hidden", str(args.hidden), "--device", "cpu",
             "--no-progress", "--ia-every", "0"]
    arms: List[Dict[str, Any]] = []
    for model in args.models:
        for seed in args.seeds:
            for vocab in ("hashing", "managed"):
                arms.append({"vocab": vocab, "model": model, "seed": seed,
                             "eviction_interval": args.interval if vocab == "managed" else None})
    for interval in args.intervals:
        for seed in args.seeds:
            arms.append({"vocab": "managed", "model": args.models[0], "seed": seed, "eviction_interval": interval})
    rows: List[Dict[str, Any]] = []
    for arm in arms:
        name = f"{arm['vocab']}-{arm['model']}-s{arm['seed']}" + (
            f"-i{arm['eviction_interval']}" if arm["vocab"] == "managed" else "")
        extra = ["--vocab", "managed", "--table-rows", str(args.table_rows), "--eviction-interval",
                 str(arm["eviction_interval"]), "--eviction", args.eviction] if arm["vocab"] == "managed" else []
        out = work / "runs" / name
        print(f"managed_compare: {name}", file=sys.stderr, flush=True)
        _cli(["days", "--data", *_days(logs[arm["vocab"]], args.days), "--out", str(out), "--model", arm["model"],
              "--seed", str(arm["seed"]), *train, *extra])
        summary = json.loads((out / "summary.json").read_text())
        for day in summary["days"]:
            rows.append({"arm": name, **arm, **{k: day.get(k) for k in COLUMNS if k in day}})
    return {"arms": arms, "rows": rows}


def arm_means(rows: Sequence[Dict[str, Any]], first_day: int = 1) -> Dict[str, Dict[str, float]]:
    """Per arm: the mean progressive-validation AUC and fallback share over days ``>= first_day`` (day 0's pv AUC
    is the untrained model's)."""
    out: Dict[str, Dict[str, float]] = {}
    for arm in sorted({r["arm"] for r in rows}):
        days = [r for r in rows if r["arm"] == arm and r["day"] >= first_day]
        out[arm] = {"pv_auc": statistics.fmean(r["pv_auc"] for r in days)}
        shares = [r["managed_pv_fallback_share"] for r in days if r.get("managed_pv_fallback_share") is not None]
        if shares:
            out[arm]["pv_fallback_share"] = statistics.fmean(shares)
    return out


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--work", required=True, type=Path, help="folder for the logs and runs (created; must not exist)")
    p.add_argument("--days", type=int, default=4)
    p.add_argument("--rows", type=int, default=20000, help="rows per day")
    p.add_argument("--scale", type=float, default=0.001)
    p.add_argument("--churn", type=float, default=0.05)
    p.add_argument("--data-seed", type=int, default=3)
    p.add_argument("--table-rows", type=int, default=64)
    p.add_argument("--models", type=lambda s: s.split(","), default=["dnn-se-2x", "dnn-me-2x"])
    p.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    p.add_argument("--interval", type=int, default=DEFAULT_EVICTION_INTERVAL, help="managed runs' eviction interval")
    p.add_argument("--intervals", type=lambda s: [int(x) for x in s.split(",") if x], default=[],
                   help="extra managed runs of the first model at these intervals")
    p.add_argument("--eviction", default="lfu")
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--hidden", type=int, default=64)
    p.add_argument("--json", default=None)
    p.add_argument("--csv", default=None)
    args = p.parse_args(argv)
    if args.work.exists():
        raise SystemExit(f"--work {args.work}: exists; give a new folder (nothing here deletes what it did not create)")
    result = run(args)
    result["options"] = {k: (str(v) if isinstance(v, Path) else v) for k, v in vars(args).items()}
    result["means"] = arm_means(result["rows"])
    for arm, means in result["means"].items():
        print(f"{arm:40s} " + " ".join(f"{k} {v:.5f}" for k, v in means.items()))
    if args.json:
        atomic_write_text(args.json, json.dumps(result, indent=2) + "\n")
    if args.csv:
        buffer = io.StringIO()
        writer = csv.DictWriter(buffer, fieldnames=list(COLUMNS), extrasaction="ignore")
        writer.writeheader()
        writer.writerows(result["rows"])
        atomic_write_text(args.csv, buffer.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main())
