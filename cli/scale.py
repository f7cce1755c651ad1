"""``multiembed scale``: the paper's scaling study (backbones x SE/ME x scales x seeds) with one command."""

from __future__ import annotations

import argparse
import os
import sys
from typing import List

from multiembed.config import STUDY_OPTIONS, TrainConfig, add_arguments
from multiembed.config.presets import PRESETS

PRESET_HELP = "; ".join(p.help_text() for p in PRESETS.values())


def _names(text: str) -> List[str]:
    values = [v.strip().lower() for v in text.split(",") if v.strip()]
    if not values:
        raise argparse.ArgumentTypeError(f"expected comma-separated names, got {text!r}")
    return values


def _ints(text: str) -> List[int]:
    try:
        values = [int(v) for v in text.replace("x", "").split(",") if v.strip()]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected comma-separated integers like 1,2,3,4,10, got {text!r}") from None
    if not values:
        raise argparse.ArgumentTypeError("expected at least one integer")
    return values


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "scale",
        help="scaling study: SE vs ME over backbones, scales and seeds -> scaling.csv / .md / .png",
        description=(
            "Trains every backbone x mode x scale x seed configuration (model names like dcnv2-me-4x) with early "
            "stopping, one after the other in this process, each in OUT/runs/<backbone>-<mode>-<s>x-seed<k>/; "
            "computes the information abundance of each run's best checkpoint (mean over sets and fields, rows "
            "L2-normalised); writes OUT/scaling.csv, OUT/scaling.md (mean +- std like the paper's Table 1 and the "
            "paired ME - SE test AUC with a 95% t-interval over seeds) and OUT/scaling.png. Resumable: runs whose "
            "summary.json exists are skipped, interrupted ones continue from their newest checkpoint. Options not "
            "given take the --preset's value, else the paper's (batch 2048, hidden 400, patience 3, 10 epochs)."
        ),
    )
    p.add_argument("--data", required=True, help="converted dataset directory (multiembed convert / synth)")
    p.add_argument("--out", required=True, help="study directory (created; rerun with the same --out to resume)")
    p.add_argument("--backbones", type=_names, default=None, help="comma-separated backbones (default dcnv2,dnn)")
    p.add_argument("--scales", type=_ints, default=None, help="comma-separated scale factors (default 1,2,3,4,10)")
    p.add_argument(
        "--modes", type=_names, default=None,
        help="comma-separated modes: se, me, mesi (ME sets sharing one interaction), se-sr (SE with the spectral "
        "regulariser, weight --spectral-reg), se-pr (SE DCNv2 with the projection regulariser of its cross maps, "
        "weight --projection-reg), se-pwr (the same with a learnable scalar per field-pair map, --pair-scales: the "
        "paper's weighted variant), me-dr (ME DCNv2 with the set divergence penalty, weight --divergence-reg), hetero "
        "(hetero-me-{s}x: the backbone and then --experts cycled over the sets; at 1x SE of the backbone) "
        "(default se,me)",
    )
    p.add_argument("--seeds", type=int, default=None, help="number of seeds per configuration, 0..N-1 (default 3)")
    p.add_argument("--preset", choices=list(PRESETS), default=None, help=f"named study size; {PRESET_HELP}")
    # The training options every run of the study shares: TrainConfig's fields, unset unless given (a preset or
    # the paper's defaults fill the rest).
    add_arguments(p, TrainConfig, STUDY_OPTIONS, unset_defaults=True)
    p.add_argument(
        "--tabulate", action="store_true",
        help="train nothing: write scaling.csv / .md / .png from the runs finished so far and name the others "
        "(safe beside the same study still training)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bars (one line per run is still printed)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multiembed.runtime.malloc import tune_allocator
    from multiembed.analysis.scaling import study_grid
    from multiembed.analysis.study import TRAIN_OPTIONS, describe_options, resolve_options, run_scaling_study
    from multiembed.training.distributed import destroy

    from multiembed.data.owners import check_directory_out
    from multiembed.data.paths import is_within

    if not is_within(args.out, args.data):  # that one the study refuses naming --data
        check_directory_out(args.out, "--out")
    tune_allocator()  # speed only: a step's temporaries stay in the heap between steps
    explicit = {k: getattr(args, k) for k in ("backbones", "modes", "scales", "seeds", *TRAIN_OPTIONS)}
    options = resolve_options(explicit, args.preset)
    points = study_grid(options["backbones"], options["modes"], options["scales"], options["seeds"])
    train_options = {k: options[k] for k in TRAIN_OPTIONS}
    described = describe_options(options)
    notes = [f"data: `{args.data}`", described]
    if args.preset:
        notes.append(f"preset: {args.preset}")
    # Under torchrun every rank runs this command; the header is rank 0's (RANK is set by the launcher).
    if os.environ.get("RANK", "0") == "0":
        grid = (
            f"{', '.join(options['backbones'])} x {', '.join(options['modes'])} x scales "
            f"{', '.join(str(s) for s in options['scales'])} x {options['seeds']} seeds"
        )
        print(
            f"scaling study: {len(points)} runs ({grid}) into {args.out}; finished runs are skipped, so rerunning "
            f"resumes\n{described}",
            file=sys.stderr,
        )
    try:
        result = run_scaling_study(
            args.data, args.out, points, train_options, notes=notes, progress=not args.no_progress,
            tabulate_only=args.tabulate,
        )
    finally:
        destroy()
    if result.pending:
        print(f"{len(result.pending)} of {len(points)} runs not finished yet (not trained by --tabulate): "
              f"{', '.join(result.pending)}")
    if result.files:
        print(
            f"{len(result.trained)} trained, {len(result.skipped)} skipped (finished earlier), "
            f"{len(result.failed)} failed, in {result.seconds:,.0f} s"
        )
        for name in ("csv", "md", "png"):
            print(f"  {result.files[name]}")
    if result.failed:
        for name, reason in result.failed.items():
            print(f"failed: {name}: {reason}", file=sys.stderr)
        return 1
    return 0
