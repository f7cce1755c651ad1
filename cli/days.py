"""``multiembed days``: the production loop, one day after another, each judged before it is trained on
(:mod:`multiembed.training.days`; docs/days.md)."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from multiembed.cli.train import EXIT_DIVERGED, diverged
from multiembed.config import TrainConfig, add_arguments, cli_fields, from_arguments

# TrainConfig options the loop sets for every day itself (training/days.py: day_config).
LOOP_OPTIONS = frozenset({"data", "out", "epochs", "patience", "eval_every", "max_steps", "resume", "overwrite"})
PLOT_FILE = "auc_per_day.png"


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "days",
        help="train day after day, warm-started, each day judged before training on it (progressive validation)",
        description=(
            "Trains one pass over each day dataset in order, each day warm-started from the previous day's final "
            "checkpoint (tables, dense weights, optimizer state), and records per day the progressive-validation AUC "
            "and log loss (the model before it trains on the day), the AUC after, rows, new ids and IA per set in "
            "RUN/summary.json and RUN/auc_per_day.png. Rerunning the command resumes: finished days are not trained "
            "again, a day killed mid-way resumes from its newest checkpoint. Under torchrun / torchx each process is "
            "one rank."
        ),
        epilog=(
            f"Exit status: 0 done, 2 bad options or input, {EXIT_DIVERGED} the training loss became NaN or infinite."
        ),
    )
    p.add_argument("--data", nargs="+", required=True, metavar="DAY",
                   help="day dataset directories in day order (multiembed synth --days writes them)")
    p.add_argument("--out", required=True, help="the loop's run directory (continued when it exists)")
    p.add_argument("--keep-days", type=int, default=0,
                   help="keep the checkpoints of the last N finished days only (default 0: every day's)")
    add_arguments(p, TrainConfig, [f.name for f in cli_fields(TrainConfig) if f.name not in LOOP_OPTIONS])
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multiembed.runtime.malloc import tune_allocator
    from multiembed.analysis.days import format_days, plot_days
    from multiembed.training.days import run_days
    from multiembed.training.distributed import destroy, init_distributed
    from multiembed.training.trainer import TrainingDiverged

    from multiembed.data.owners import check_directory_out

    check_directory_out(args.out, "--out")
    tune_allocator()  # speed only: a step's temporaries stay in the heap between steps
    base = from_arguments(TrainConfig, args, data=args.data[0], out=args.out)
    base.validate()
    try:
        ctx = init_distributed(base.device)
        try:
            summary = run_days(base, args.data, args.out, keep_days=args.keep_days, ctx=ctx,
                               log=lambda line: print(line, file=sys.stderr, flush=True))
        except TrainingDiverged as e:
            return diverged("days", e, ctx.is_main)
        if ctx.is_main:
            plot_days(summary, Path(args.out) / PLOT_FILE)
            print(format_days(summary))
            print(f"run directory: {args.out} (summary.json, {PLOT_FILE})")
    finally:
        destroy()
    return 0
