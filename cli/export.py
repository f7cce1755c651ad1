"""``multiembed export``: a run's best checkpoint as a self-contained inference artifact (:mod:`multiembed.serving`)."""

from __future__ import annotations

import argparse
import json


def register(subparsers: "argparse._SubParsersAction[argparse.ArgumentParser]") -> None:
    p = subparsers.add_parser(
        "export",
        help="export a run's best checkpoint as an inference artifact (quantised tables + exported dense program)",
        description=(
            "Loads the best checkpoint of RUN_DIR (any world size and sharding), strips the table padding, quantises "
            "the tables row-wise with TorchRec's inference quantisation (int8 by default, int4, or none = fp32), "
            "exports the dense part with torch.export and writes --out: manifest.json (schema, vocabulary "
            "fingerprint, preprocessing, sizes), tables.pt, dense.pt2 and, for paper-mode data, vocab.npz. The "
            "directory is written beside --out and renamed into place; --out must not exist. Prints the manifest's "
            "sizes as JSON."
        ),
    )
    p.add_argument("run_dir", metavar="RUN_DIR")
    p.add_argument("--out", required=True, help="artifact directory to create")
    p.add_argument("--quantize", choices=["none", "int8", "int4"], default="int8",
                   help="table weights: row-wise int8 (default), int4, or none (fp32)")
    p.add_argument("--data", default=None,
                   help="the training data (its vocabulary is copied), when it moved from where config.json says")
    p.add_argument("--overwrite", action="store_true", help="replace --out when it is an earlier export artifact")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from multiembed.serving.export import export_run
    from multiembed.training.distributed import destroy

    try:
        result = export_run(args.run_dir, args.out, quantize=args.quantize, data_dir=args.data,
                            overwrite=args.overwrite)
    finally:
        destroy()
    print(json.dumps({"out": str(result.out), "checkpoint": str(result.checkpoint), "quantize": args.quantize,
                      **result.manifest.sizes}))
    return 0
