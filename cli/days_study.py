"""``multiembed days-study``: the incremental loop against retraining from scratch and a frozen day-0 model, per model
and seed, judged by progressive validation (:mod:`multiembed.analysis.days_study`; docs/days.md)."""

from __future__ import annotations

import argparse
import dataclasses
from pathlib import Path
from typing import List

from multiembed.cli.days import LOOP_OPTIONS
from multiembed.cli.train import EXIT_DIVERGED, diverged
from multiembed.config import TrainConfig, add_arguments, cli_fields, from_arguments

DEFAULT_MODELS = "dcnv2-me-4x,dcnv2-se-4x"


def _models(text: str) -> List[str]:
    values = list(dict.fromkeys(v.strip() for v in text.split(",") if v.strip()))
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated model names, got {text!r}")
    return values


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "days-study",
        help="incremental loop vs retraining from scratch vs a frozen day-0 model, per model and seed",
        description=(
            "For every model and seed: the production loop over the days (incremental), a fresh model trained for "
            "one pass over days 0..k-1 shuffled together for each day k >= 2 (retrain), and the day-0 model never "
            "updated (frozen); each judged on day k's train rows before it saw them (progressive validation). Writes "
            "OUT/days_study.csv (one row per model, seed, arm and day), OUT/days_study.md (mean AUC per day, paired "
            "differences between arms and between models with t-intervals over seeds) and OUT/days_study.png. "
            "Rerunning the command resumes: nothing finished is trained or evaluated again. One process."
        ),
        epilog=f"Exit status: 0 done, 2 bad options or input, {EXIT_DIVERGED} a training loss became NaN or infinite.",
    )
    p.add_argument("--data", nargs="+", required=True, metavar="DAY",
                   help="day dataset directories in day order, at least 2 (multiembed synth --days writes them)")
    p.add_argument("--out", required=True, help="the study directory (continued when it exists)")
    p.add_argument("--models", type=_models, default=_models(DEFAULT_MODELS),
                   help=f"comma-separated models; the report compares the first with each other (default "
                        f"{DEFAULT_MODELS})")
    p.add_argument("--seeds", type=int, default=3, help="seeds 0..N-1 per model, paired across arms and models "
                                                        "(default 3)")
    names = [f.name for f in cli_fields(TrainConfig) if f.name not in LOOP_OPTIONS | {"model", "seed"}]
    add_arguments(p, TrainConfig, names)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multiembed.analysis.days_compare import DAYS_STUDY_CSV, DAYS_STUDY_MD, DAYS_STUDY_PNG
    from multiembed.analysis.days_study import StudyPoint, console_log, run_days_study
    from multiembed.models.names import parse_model_name
    from multiembed.training.distributed import destroy
    from multiembed.training.trainer import TrainingDiverged

    if args.seeds < 1:
        raise ValueError(f"--seeds must be >= 1, got {args.seeds}")
    base = from_arguments(TrainConfig, args, data=args.data[0], out=args.out, model=args.models[0])
    for model in args.models:  # every model refused before the first trains
        parse_model_name(model)
        dataclasses.replace(base, model=model).validate()
    points = [StudyPoint(model, seed) for model in args.models for seed in range(args.seeds)]
    try:
        try:
            run_days_study(base, args.data, args.out, points, log=console_log())
        except TrainingDiverged as e:
            return diverged("days-study", e, True)
        out = Path(args.out)
        print(f"study directory: {out} ({DAYS_STUDY_CSV}, {DAYS_STUDY_MD}, {DAYS_STUDY_PNG})")
        print((out / DAYS_STUDY_MD).read_text(encoding="utf-8"))
    finally:
        destroy()
    return 0
