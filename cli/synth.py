"""``multiembed synth``: a synthetic Criteo-shaped click log with a known label model (see
:mod:`multiembed.data.synthetic`)."""

from __future__ import annotations

import argparse
import sys
from typing import TYPE_CHECKING, Dict, List, Optional

if TYPE_CHECKING:
    from multiembed.data.metadata import DatasetMetadata


def _split_weights(text: str) -> List[float]:
    try:
        weights = [float(part) for part in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected three comma-separated numbers like 8,1,1, got {text!r}") from None
    if len(weights) != 3 or any(w < 0 for w in weights) or sum(weights) <= 0:
        raise argparse.ArgumentTypeError(f"expected three non-negative numbers with a positive sum, got {text!r}")
    return weights


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser(
        "synth",
        help="generate a synthetic Criteo-shaped click log (Parquet + metadata, optional raw TSV)",
        description=(
            "Generate a synthetic click log with Criteo's shape (I1..I13 log-binned integers, C1..C26 categorical, "
            "13 dense features), Zipf-distributed ids and labels drawn from a known model with planted field-pair "
            "interactions. metadata.json records the Bayes-optimal AUC and log loss of every split."
        ),
    )
    parser.add_argument(
        "--rows", type=int, default=1_000_000,
        help="total rows over all splits, of every day with --days (default 1000000)",
    )
    parser.add_argument("--out", required=True, help="output dataset directory")
    parser.add_argument("--seed", type=int, default=0, help="seeds the label model and every row (default 0)")
    parser.add_argument(
        "--regime", choices=["default", "collapse"], default="default",
        help="default: the Criteo-shaped log above; collapse: 8 fields from 2 to 2000 ids, rich fields with "
        "planted interactions of total rank 22 and tiny fields interacting with them (the paper's "
        "interaction-collapse setting; README, 'The collapse regime'); --scale, --signal and --tsv do not apply",
    )
    parser.add_argument(
        "--scale", type=float, default=None,
        help="vocabulary sizes are Criteo Kaggle's times this (default 0.02: about 22k ids over 39 fields)",
    )
    parser.add_argument("--split", type=_split_weights, default=[8.0, 1.0, 1.0], help="train,val,test (default 8,1,1)")
    parser.add_argument("--tsv", default=None, help="also write every row as raw Criteo TSV to this file (.gz allowed)")
    parser.add_argument("--positive-rate", type=float, default=0.25, help="expected click rate (default 0.25)")
    parser.add_argument(
        "--signal", type=float, default=None,
        help="std of the first-order and of the interaction part of the logit (default 0.85: Bayes AUC about 0.78)",
    )
    days = parser.add_argument_group(
        "a drifting log (--days; docs/days.md)",
        "--days D writes D day datasets OUT/day-000 ... of --rows rows each, whose ids churn and whose click model "
        "drifts from day to day (default generator only; no --tsv)",
    )
    days.add_argument("--days", type=int, default=None, help="write this many day datasets (default: one dataset)")
    days.add_argument("--active-share", type=float, default=None,
                      help="share of each categorical field's ids live on a day (default 0.5)")
    days.add_argument("--churn", type=float, default=None,
                      help="share of each field's live ids replaced by new ids each day (default 0.05)")
    days.add_argument("--popularity-shift", type=float, default=None,
                      help="rank swaps per day, as a share of each field's live ids (default 0.05)")
    days.add_argument("--drift", type=float, default=None,
                      help="share of the click model's weight variance renewed each day (default 0.02)")
    parser.add_argument(
        "--vocab", choices=["hashing", "managed"], default=None,
        help="write the ids as that vocabulary mode of convert would (hashing: into --hash-size rows; managed: as "
        "63-bit keys for train --vocab managed; docs/managed.md); default: the generator's own ids",
    )
    parser.add_argument("--hash-size", type=int, default=None, metavar="N", help="rows of every field with --vocab hashing")
    parser.add_argument(
        "--stream", action="store_true",
        help="write no Parquet: metadata.json describes a stream whose rows are drawn from their index while "
        "training reads them (no row is trained twice; docs/results/fresh-rows); --rows and --split then give the "
        "rows of one training epoch (every epoch draws new rows) and the fixed validation and test rows",
    )
    parser.add_argument("--force", action="store_true", help="replace a dataset already in --out")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multiembed.data.owners import DATASET, check_directory_out, check_file_out
    from multiembed.data.synthetic import AnyConfig, CollapseRegimeConfig, SyntheticConfig, generate_dataset

    # One dataset may replace a dataset (with --force); --days writes day datasets inside a directory of its own.
    check_directory_out(args.out, "--out", may_be=() if args.days is not None else (DATASET,))
    if args.tsv is not None:
        check_file_out(args.tsv, "--tsv", overwrite=args.force, overwrite_flag="--force")

    config: AnyConfig
    if args.regime == "collapse":
        given = [flag for flag, value in (("--scale", args.scale), ("--signal", args.signal), ("--tsv", args.tsv))
                 if value is not None]
        if given:
            raise ValueError(
                f"{', '.join(given)}: not options of --regime collapse (its fields, sizes and signal strengths are "
                "fixed by its design; --rows, --seed, --split and --positive-rate apply)"
            )
        config = CollapseRegimeConfig(seed=args.seed, positive_rate=args.positive_rate)
    else:
        config = SyntheticConfig(
            seed=args.seed,
            scale=0.02 if args.scale is None else args.scale,
            positive_rate=args.positive_rate,
            first_order_std=0.85 if args.signal is None else args.signal,
            interaction_std=0.85 if args.signal is None else args.signal,
        )
    encoding = None
    if args.vocab is not None:
        from multiembed.data.synthetic.encoding import IdEncoding

        encoding = IdEncoding(args.vocab, table_rows=args.hash_size, seed=args.seed)
    elif args.hash_size is not None:
        raise ValueError("--hash-size: give --vocab hashing with it")
    args.encoding = encoding
    drift_flags = {"--active-share": args.active_share, "--churn": args.churn,
                   "--popularity-shift": args.popularity_shift, "--drift": args.drift}
    if args.stream:
        return _run_stream(args, config, drift_flags)
    if args.days is not None:
        return _run_days(args, config, drift_flags)
    given = [flag for flag, value in drift_flags.items() if value is not None]
    if given:
        raise ValueError(f"{', '.join(given)}: options of a drifting log; add --days D")
    meta = generate_dataset(
        args.out, args.rows, config, split=args.split, tsv_path=args.tsv, force=args.force,
        progress=not args.no_progress, encoding=encoding,
    )
    _print_summary(args.out, meta)
    if args.tsv:
        print(f"  raw Criteo TSV: {args.tsv}", file=sys.stderr)
    return 0


def _run_stream(args: argparse.Namespace, config: object, drift_flags: Dict[str, Optional[float]]) -> int:
    from multiembed.data.synthetic.stream import write_stream_dataset

    given = [flag for flag, value in (("--days", args.days), ("--tsv", args.tsv), *drift_flags.items())
             if value is not None]
    if given:
        raise ValueError(f"--stream: {', '.join(given)} not available (a stream writes no files and is one dataset)")
    meta = write_stream_dataset(args.out, args.rows, config, split=args.split, force=args.force)  # type: ignore[arg-type]
    _print_summary(args.out, meta)
    print("  source: stream (rows drawn while training; every epoch draws new training rows)", file=sys.stderr)
    return 0


def _run_days(args: argparse.Namespace, config: object, drift_flags: Dict[str, Optional[float]]) -> int:
    from multiembed.data.synthetic import SyntheticConfig
    from multiembed.data.synthetic.days import DriftConfig, day_dirs, generate_days

    if args.regime != "default" or args.tsv is not None:
        raise ValueError("--days: a drifting log is drawn from the default generator (no --regime collapse, no --tsv)")
    assert isinstance(config, SyntheticConfig)
    drift = DriftConfig(**{
        flag[2:].replace("-", "_"): value for flag, value in drift_flags.items() if value is not None
    })
    metas = generate_days(
        args.out, args.days, args.rows, config, drift, split=args.split, force=args.force,
        progress=not args.no_progress, encoding=args.encoding,
    )
    for path, meta in zip(day_dirs(args.out, args.days), metas):
        _print_summary(str(path), meta)
    return 0


def _print_summary(out: str, meta: "DatasetMetadata") -> None:
    rows = meta.split_rows()
    mode = meta.options.get("mode")
    ids = "ids as 63-bit keys" if mode == "managed" else f"{sum(f.vocab_size for f in meta.fields)} ids"
    print(
        f"wrote {out}: {sum(rows.values())} rows (train {rows['train']}, val {rows['val']}, test {rows['test']}), "
        f"{len(meta.fields)} fields, {ids}",
        file=sys.stderr,
    )
    for split, values in (meta.bayes or {}).items():
        auc = "n/a" if values["auc"] is None else f"{values['auc']:.4f}"
        print(
            f"  {split}: Bayes-optimal AUC {auc}, log loss {values['logloss']:.4f}, "
            f"positive rate {values['positive_rate']:.4f}",
            file=sys.stderr,
        )
