"""``multiembed predict``: predictions of an exported artifact on a converted split or on raw log lines."""

from __future__ import annotations

import argparse
import json
import sys


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "predict",
        help="predict with an exported artifact (converted --data split or --raw Criteo/Avazu lines)",
        description=(
            "Loads the artifact directory ARTIFACT (written by multiembed export; no code runs from its files) and "
            "predicts every row of --split of --data (which must have the artifact's vocabulary fingerprint) or "
            "every line of the raw file --raw (tokenised as convert does, with the artifact's vocabulary; unknown "
            "tokens get the OOV id). Writes --out (Parquet: row, logit, prob, label; refused when it exists, unless "
            "--overwrite, and inside any dataset, run or artifact directory) and prints "
            '{"rows", "auc", "logloss", "out"} as JSON (auc / logloss null without both labels).'
        ),
    )
    p.add_argument("artifact", metavar="ARTIFACT")
    source = p.add_mutually_exclusive_group(required=True)
    source.add_argument("--data", help="converted dataset directory")
    source.add_argument("--raw", help="raw Criteo TSV / Avazu CSV file of the artifact's format (.gz allowed)")
    p.add_argument("--split", choices=["train", "val", "test"], default="test", help="split of --data (default test)")
    p.add_argument("--out", required=True,
                   help="Parquet file of predictions to write (new, outside any dataset, run or artifact directory)")
    p.add_argument("--overwrite", action="store_true",
                   help="replace --out when it is an existing regular file (never an input of this command)")
    p.add_argument("--batch-size", type=int, default=4096, help="rows per model call (default 4096)")
    p.add_argument("--on-error", choices=["fail", "skip"], default="fail",
                   help="--raw: stop at the first bad line (default) or skip and count bad lines")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multiembed.serving import load_artifact
    from multiembed.serving.outputs import check_prediction_out
    from multiembed.serving.predict import predict_dataset, predict_raw

    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    check_prediction_out(args.out, args.overwrite, [args.artifact, args.raw if args.raw is not None else args.data])
    artifact = load_artifact(args.artifact)
    if args.raw is not None:
        result = predict_raw(artifact, args.raw, batch_size=args.batch_size, on_error=args.on_error)
    else:
        result = predict_dataset(artifact, args.data, split=args.split, batch_size=args.batch_size)
    path = result.write_parquet(args.out)
    report = {**result.metrics(), "out": str(path)}
    if result.skipped:
        report["skipped"] = result.skipped
        print(f"multiembed predict: skipped {sum(result.skipped.values())} bad lines: {result.skipped}", file=sys.stderr)
    print(json.dumps(report))
    return 0
