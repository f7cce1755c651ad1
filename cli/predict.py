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
            "tokens get the OOV id; rows without the label column, such as Criteo's test.txt, are predicted "
            "without metrics). Writes --out (Parquet: row, logit, prob, and label when known; refused when it "
            "exists, unless --overwrite, and inside any dataset, run or artifact directory) and ends with one "
            'summary line, JSON: {"rows", "out"} and, when the rows have labels, "auc" and "logloss" (auc null '
            'unless both classes occur); with --compile also "compiled": {"entry", "built"}. --compile compiles the '
            "checked dense program on this machine with AOTInductor and the C++ compiler (about 10-20 s the first "
            "time) and reuses the library from the cache afterwards; it is refused when no compiler is found."
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
    p.add_argument("--compile", action="store_true",
                   help="serve the dense program compiled ahead of time on this machine (AOTInductor; needs a C++ "
                        "compiler; never loads a library from the artifact)")
    p.add_argument("--compile-cache", default=None, metavar="DIR",
                   help="cache of compiled programs, mode 0700 (default $MULTIEMBED_COMPILE_CACHE, else "
                        "$XDG_CACHE_HOME/multiembed/compiled, else ~/.cache/multiembed/compiled)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multiembed.serving import load_artifact
    from multiembed.serving.outputs import check_prediction_out
    from multiembed.serving.predict import predict_dataset, predict_raw
    from multiembed.training.quiet import silence_known_warnings

    silence_known_warnings()  # TorchRec's lookup logs a deprecation of torch's own (is_fx_tracing) at the first batch
    if args.batch_size < 1:
        raise ValueError(f"--batch-size must be >= 1, got {args.batch_size}")
    if args.compile_cache is not None and not args.compile:
        raise ValueError("--compile-cache needs --compile")
    check_prediction_out(args.out, args.overwrite, [args.artifact, args.raw if args.raw is not None else args.data])
    if args.compile_cache is not None:
        from multiembed.data.owners import check_directory_out

        check_directory_out(args.compile_cache, "--compile-cache")
    artifact = load_artifact(args.artifact, compile=args.compile, cache_dir=args.compile_cache)
    compiled = artifact.compiled
    if compiled is not None and compiled.built:
        print(f"multiembed predict: compiled the dense program in {compiled.compile_seconds:.1f} s (cached in "
              f"{compiled.entry})", file=sys.stderr)
    if args.raw is not None:
        result = predict_raw(artifact, args.raw, batch_size=args.batch_size, on_error=args.on_error)
    else:
        result = predict_dataset(artifact, args.data, split=args.split, batch_size=args.batch_size)
    path = result.write_parquet(args.out)
    report = {**result.metrics(), "out": str(path)}
    if compiled is not None:
        report["compiled"] = {"entry": str(compiled.entry), "built": compiled.built}
    if result.skipped:
        report["skipped"] = result.skipped
        print(f"multiembed predict: skipped {sum(result.skipped.values())} bad lines: {result.skipped}", file=sys.stderr)
    print(json.dumps(report))
    return 0
