"""``multiembed analyze``: embedding-collapse report of a run's best checkpoint (or of a given checkpoint)."""

from __future__ import annotations

import argparse

from multiembed.config import TrainConfig, add_arguments
from multiembed.config.choices import Device


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "analyze",
        help="embedding-collapse report (information abundance, spectra) of a run's best checkpoint",
        description=(
            "Rebuilds the run's model from RUN_DIR/config.json, loads its best checkpoint (the one summary.json "
            "names, else the newest complete one) or the checkpoint directory given (RUN/checkpoints/step-N), and "
            "writes into --out: collapse.json (information abundance per field and set, spectra, the sets "
            "concatenated, a random-initialisation reference, DCNv2 sub-embedding IA, the fields marked collapsed: IA "
            "below --collapse-warn x the random init of the same shape) and the figures spectra.png, "
            "ia_vs_random.png, ia_sets.png, sub_embedding.png (DCNv2). Rows are L2-normalised before the spectra "
            "unless --raw. Prints a summary table and the files written. Under torchrun every rank streams its own "
            "shards; no table is gathered."
        ),
    )
    p.add_argument("path", metavar="RUN_DIR|CHECKPOINT", help="a run directory or RUN/checkpoints/step-N")
    p.add_argument("--out", required=True, help="report folder (created; files in it are replaced)")
    p.add_argument("--raw", action="store_true", help="spectra of the raw rows (default: rows L2-normalised first)")
    p.add_argument("--no-sub-embedding", action="store_true", help="skip DCNv2's sub-embedding IA")
    p.add_argument(
        "--compare", action="append", default=[], metavar="COLLAPSE_JSON|DIR",
        help="an earlier analysis drawn next to this one in ia_sets.png (e.g. SE of the same scale); repeatable",
    )
    p.add_argument("--data", default=None, help="dataset directory to use if the run's has moved (same vocabulary)")
    p.add_argument("--device", choices=Device.choices(), default="auto")
    add_arguments(p, TrainConfig, ["collapse_warn"])
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multiembed.analysis.analyze import analyze_run, print_report, read_comparison
    from multiembed.training.distributed import destroy

    from multiembed.data.owners import RUN, check_directory_out

    check_directory_out(args.out, "--out", may_be=(RUN,), beside_run=True)  # a report may sit beside a run's files
    comparisons = [read_comparison(path) for path in args.compare]
    try:
        analysis = analyze_run(
            args.path, args.out, row_normalized=not args.raw, sub_embedding=not args.no_sub_embedding,
            data=args.data, device=args.device, compare_with=comparisons, progress=not args.no_progress,
            collapse_warn=args.collapse_warn,
        )
        if analysis.report is not None:
            print_report(analysis)
    finally:
        destroy()
    return 0
